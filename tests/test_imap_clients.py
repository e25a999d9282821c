"""More real IMAP clients from Debian against the real server process (tests/server.py): each
over IMAPS with the server's generated certificate as the only trusted CA (host name checked
against "localhost"), doing what a user does with it and checking what the user would see.

- offlineimap3: a two-way Maildir sync of several folders (nested, non-ASCII), run three times
- curl: LIST, EXAMINE, FETCH by UID and section, APPEND by upload, SEARCH, custom commands
- fetchmail over IMAP: --keep and flush, byte-exact delivery to an MDA, nothing fetched twice
- getmail6: IMAP retrieval from several folders, nothing fetched twice, delete on the server
- mutt (driven on a pseudo-terminal): read, pipe, flag, copy, save to a non-ASCII folder,
  delete and expunge; new mail and another client's flag seen by an open mutt
"""

from __future__ import annotations

import email
import email.header
import email.policy
import os
import pty
import re
import select
import signal
import smtplib
import ssl
import subprocess
import sys
import time
import uuid

import pytest
from imapclient import IMAPClient

from tests.conftest import require_tool
from tests.server import Server

ALICE = "alice@example.com"
PASSWORD = "alice pw"
#: a folder name outside ASCII (modified UTF-7 on the wire: Entw&APw-rfe)
UMLAUT = "Entwürfe"
UMLAUT_WIRE = "Entw&APw-rfe"


@pytest.fixture
def server(tmp_path):
    srv = Server(str(tmp_path / "tm")).init()
    srv.add_mailbox(ALICE, PASSWORD)
    srv.start(roles=("smtp", "imaps"))
    yield srv
    srv.stop()


def cert(srv: Server) -> str:
    return os.path.join(srv.root, "tls", "server.crt")


def imaps(srv: Server) -> IMAPClient:
    """imapclient over IMAPS, trusting only the test certificate."""
    ctx = ssl.create_default_context(cafile=cert(srv))
    c = IMAPClient("localhost", port=srv.ports["imaps"], ssl=True, ssl_context=ctx, timeout=20)
    c.login(ALICE, PASSWORD)
    return c


def message(n: int, subject: str | None = None, body: str | None = None, eol: str = "\r\n") -> bytes:
    subject = subject or f"message {n}"
    body = body or f"Body of message {n}.{eol}Second line with ümlaut.{eol}"
    return (f"From: Sender {n} <sender{n}@example.org>{eol}To: {ALICE}{eol}Subject: {subject}{eol}"
            f"Message-ID: <{uuid.uuid4().hex}.{n}@example.org>{eol}Date: Mon, 2 Nov 2026 10:00:0{n % 10} +0000{eol}"
            f"MIME-Version: 1.0{eol}Content-Type: text/plain; charset=utf-8{eol}"
            f"Content-Transfer-Encoding: 8bit{eol}{eol}{body}").encode()


def subject_of(raw: bytes) -> str:
    return str(email.message_from_bytes(raw, policy=email.policy.default)["Subject"])


def lf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def server_state(c: IMAPClient, folder: str) -> dict[str, tuple[int, frozenset, bytes]]:
    """Subject -> (UID, flags without \\Recent, BODY[]) of a server folder (read-only)."""
    c.select_folder(folder, readonly=True)
    uids = c.search(["ALL"])
    data = c.fetch(uids, ["FLAGS", "BODY.PEEK[]"]) if uids else {}
    out: dict[str, tuple[int, frozenset, bytes]] = {}
    for uid, item in data.items():
        raw = item[b"BODY[]"]
        subject = subject_of(raw)
        assert subject not in out, f"duplicate {subject!r} on the server in {folder}"
        out[subject] = (uid, frozenset(f.decode() for f in item[b"FLAGS"]) - {"\\Recent"}, raw)
    return out


def flags_of(state: dict) -> dict[str, frozenset]:
    return {s: v[1] for s, v in state.items()}


# -- offlineimap3 ------------------------------------------------------------------------------

MAILDIR_FLAGS = {"\\Seen": "S", "\\Flagged": "F", "\\Answered": "R", "\\Deleted": "T", "\\Draft": "D"}


def letters(flags: frozenset) -> str:
    return "".join(sorted(MAILDIR_FLAGS[f] for f in flags if f in MAILDIR_FLAGS))


def local_state(path: str) -> dict[str, tuple[int | None, str, bytes, str]]:
    """Subject -> (offlineimap's U= (the server UID), flag letters, content, file) of a Maildir."""
    out: dict[str, tuple[int | None, str, bytes, str]] = {}
    for sub in ("new", "cur"):
        d = os.path.join(path, sub)
        for name in os.listdir(d):
            with open(os.path.join(d, name), "rb") as f:
                raw = f.read()
            subject = subject_of(raw)
            assert subject not in out, f"duplicate {subject!r} in {path}"
            m = re.search(r",U=(\d+)", name)
            flags = name.split(":2,", 1)[1] if ":2," in name else ""
            out[subject] = (int(m.group(1)) if m else None, flags, raw, os.path.join(d, name))
    return out


def set_local_flags(path: str, subject: str, flags: str) -> None:
    _uid, _old, _raw, file = local_state(path)[subject]
    base = os.path.basename(file).split(":2,", 1)[0]
    os.rename(file, os.path.join(path, "cur", base + ":2," + "".join(sorted(flags))))


def new_local_message(path: str, name: str, data: bytes, flags: str = "") -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    with open(os.path.join(path, "cur" if flags else "new", name + (":2," + flags if flags else "")), "wb") as f:
        f.write(data)


def write_offlineimaprc(srv: Server, base: str) -> str:
    rc = os.path.join(base, "offlineimaprc")
    with open(rc, "w") as f:
        f.write(f"""[general]
accounts = tm
metadata = {base}/meta
ui = basic

[Account tm]
localrepository = local
remoterepository = remote
utf8foldernames = yes

[Repository local]
type = Maildir
localfolders = {base}/mail
sep = /

[Repository remote]
type = IMAP
remotehost = localhost
remoteport = {srv.ports["imaps"]}
remoteuser = {ALICE}
remotepass = {PASSWORD}
ssl = yes
sslcacertfile = {cert(srv)}
""")
    return rc


def run_offlineimap(rc: str) -> str:
    exe = require_tool("offlineimap")
    debug = ["-d", "imap"] if os.environ.get("OFFLINEIMAP_DEBUG") else []
    r = subprocess.run([exe, "-c", rc, "-o", *debug], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "HOME": os.path.dirname(rc)})
    out = r.stdout + r.stderr
    # a folder that fails to sync is reported as ERROR (and a crash as a traceback)
    assert r.returncode == 0 and "ERROR" not in out and "Traceback" not in out, out
    return out


def assert_in_sync(c: IMAPClient, local_root: str, folder: str) -> dict:
    """The server folder and its local copy hold the same messages (bytes up to line endings),
    with the same flags, and every local file carries the server UID of its message."""
    srv_state = server_state(c, folder)
    loc = local_state(os.path.join(local_root, *folder.split("/")))
    assert set(loc) == set(srv_state), (folder, sorted(loc), sorted(srv_state))
    for subject, (uid, flags, raw) in srv_state.items():
        l_uid, l_flags, l_raw, _file = loc[subject]
        assert l_uid == uid, (folder, subject, l_uid, uid)
        assert l_flags == letters(flags), (folder, subject, l_flags, flags)
        assert lf(l_raw) == lf(raw), (folder, subject)
        # it appended with UIDPLUS (APPENDUID) rather than marking messages to find them again
        assert b"X-OfflineIMAP" not in raw
    return srv_state


def test_offlineimap_two_way_sync_three_runs(server, tmp_path):
    c = imaps(server)
    c.append("INBOX", message(1, "inbox one"), flags=[b"\\Seen"])
    c.append("INBOX", message(2, "inbox two"))
    c.append("INBOX", message(3, "inbox three"))
    c.append("INBOX", message(4, "inbox four"))
    c.create_folder("Work/Projects")
    c.append("Work/Projects", message(14, "project plan"), flags=[b"\\Flagged"])
    c.create_folder(UMLAUT)
    c.append(UMLAUT, message(5, "draft ä"), flags=[b"\\Draft"])
    uidvalidity = {f: c.folder_status(f, ["UIDVALIDITY"])[b"UIDVALIDITY"]
                   for f in ("INBOX", "Work/Projects", UMLAUT)}
    c.logout()

    base = str(tmp_path / "oi")
    os.makedirs(base)
    local = os.path.join(base, "mail")
    rc = write_offlineimaprc(server, base)

    # run 1: everything comes down, folders as nested local directories, the umlaut as UTF-8
    run_offlineimap(rc)
    c = imaps(server)
    before = {f: assert_in_sync(c, local, f) for f in ("INBOX", "Work/Projects", UMLAUT)}
    assert flags_of(before["INBOX"]) == {"inbox one": {"\\Seen"}, "inbox two": set(),
                                         "inbox three": set(), "inbox four": set()}
    assert flags_of(before["Work/Projects"]) == {"project plan": {"\\Flagged"}}
    assert flags_of(before[UMLAUT]) == {"draft ä": {"\\Draft"}}
    assert os.path.isdir(os.path.join(local, "Entwürfe", "cur"))
    c.logout()

    # local changes: new messages (INBOX, the umlaut folder, a new nested non-ASCII folder),
    # flags set, a message trashed (T) and a file deleted (offlineimap: \Deleted + EXPUNGE)
    inbox_dir = os.path.join(local, "INBOX")
    new_local_message(inbox_dir, "1800000000.local1.client", message(11, "local new", eol="\n"), "S")
    new_local_message(os.path.join(local, UMLAUT), "1800000000.local2.client",
                      message(12, "local draft ö", eol="\n"))
    new_local_message(os.path.join(local, "Work", "Täglich"), "1800000000.local3.client",
                      message(13, "daily note", eol="\n"), "F")
    set_local_flags(inbox_dir, "inbox one", "FS")
    set_local_flags(inbox_dir, "inbox two", "S")
    set_local_flags(inbox_dir, "inbox three", "T")
    os.remove(local_state(os.path.join(local, UMLAUT))["draft ä"][3])
    # server changes meanwhile: new messages, flag changes, deletions with expunge
    c = imaps(server)
    c.append("INBOX", message(6, "server new"))
    c.select_folder("INBOX")
    c.add_flags([before["INBOX"]["inbox four"][0]], [b"\\Deleted"])
    c.expunge()
    c.select_folder("Work/Projects")
    c.remove_flags([before["Work/Projects"]["project plan"][0]], [b"\\Flagged"])
    c.add_flags([before["Work/Projects"]["project plan"][0]], [b"\\Answered"])
    c.append("Work/Projects", message(7, "project budget"), flags=[b"\\Seen"])
    c.append("Work/Projects", message(8, "project obsolete"))
    c.select_folder("Work/Projects")
    gone = c.search(["SUBJECT", "obsolete"])
    c.add_flags(gone, [b"\\Deleted"])
    c.expunge()
    c.logout()

    # run 2: each change reaches the other side once
    run_offlineimap(rc)
    c = imaps(server)
    after = {f: assert_in_sync(c, local, f) for f in ("INBOX", "Work/Projects", UMLAUT, "Work/Täglich")}
    assert flags_of(after["INBOX"]) == {
        "inbox one": {"\\Seen", "\\Flagged"}, "inbox two": {"\\Seen"},
        "inbox three": {"\\Deleted"},  # trashed (T) locally: \Deleted, left for the user to expunge
        "local new": {"\\Seen"}, "server new": set()}  # "inbox four" expunged on the server: gone
    assert flags_of(after["Work/Projects"]) == {"project plan": {"\\Answered"},
                                                "project budget": {"\\Seen"}}
    assert flags_of(after[UMLAUT]) == {"local draft ö": set()}
    assert flags_of(after["Work/Täglich"]) == {"daily note": {"\\Flagged"}}
    # messages that were there before keep their UIDs, and the folders their UIDVALIDITY
    for folder in ("INBOX", "Work/Projects"):
        for subject, (uid, _f, _r) in after[folder].items():
            if subject in before[folder]:
                assert uid == before[folder][subject][0], (folder, subject)
    for folder, value in uidvalidity.items():
        assert c.folder_status(folder, ["UIDVALIDITY"])[b"UIDVALIDITY"] == value
    folders = {name for _f, _d, name in c.list_folders()}
    assert {"INBOX", "Work", "Work/Projects", UMLAUT, "Work/Täglich"} <= folders
    c.logout()

    # run 3: nothing left to do: no copies, no duplicates, the same UIDs and flags both sides
    out = run_offlineimap(rc)
    for action in ("Copy message", "Adding flag", "Deleting flag", "Deleting "):
        assert action not in out, out
    c = imaps(server)
    again = {f: assert_in_sync(c, local, f) for f in after}
    assert {f: {s: v[:2] for s, v in st.items()} for f, st in again.items()} == \
        {f: {s: v[:2] for s, v in st.items()} for f, st in after.items()}
    c.logout()


# -- curl --------------------------------------------------------------------------------------


def curl(srv: Server, path: str, *args: str, rc: int = 0) -> bytes:
    """curl imaps://localhost:PORT/PATH over TLS checked against the test certificate."""
    exe = require_tool("curl")
    port = srv.ports["imaps"]
    r = subprocess.run(
        [exe, "-sS", "--max-time", "15", "--cacert", cert(srv), "--resolve", f"localhost:{port}:127.0.0.1",
         "-u", f"{ALICE}:{PASSWORD}", *args, f"imaps://localhost:{port}/{path}"],
        capture_output=True, timeout=30)
    assert r.returncode == rc, (path, args, r.returncode, r.stderr)
    return r.stdout


def list_lines(out: bytes) -> dict[str, tuple[str, str]]:
    """Name -> (attributes, separator) from LIST output."""
    found = {}
    for line in out.decode().splitlines():
        m = re.fullmatch(r'\* LIST \(([^)]*)\) "(.)" (.+)', line)
        assert m, line
        found[m.group(3)] = (m.group(1), m.group(2))
    return found


def test_curl_list_examine_fetch_append_search(server, tmp_path):
    # an 8-bit body, a line starting with a dot, a long line, no final line break
    tricky = message(1, "curl tricky", body="Grüße aus Köln\r\n.leading dot\r\n" + "x" * 900
                     + "\r\nno final newline")
    plain = message(2, "curl plain")
    c = imaps(server)
    c.append("INBOX", tricky)
    c.append("INBOX", plain, flags=[b"\\Seen"])
    c.create_folder("Work/Projects")
    c.create_folder(UMLAUT)
    c.append(UMLAUT, message(3, "umlaut folder"))
    uidvalidity = c.folder_status("INBOX", ["UIDVALIDITY"])[b"UIDVALIDITY"]
    c.logout()

    # LIST: every folder, with its hierarchy separator; the non-ASCII one in modified UTF-7
    folders = list_lines(curl(server, ""))
    assert {"INBOX", "Work", "Work/Projects", UMLAUT_WIRE, "Sent", "Drafts", "Trash"} <= set(folders)
    assert all(sep == "/" for _a, sep in folders.values())
    assert "\\HasChildren" in folders["Work"][0] and "\\Sent" in folders["Sent"][0]
    assert list_lines(curl(server, "Work/")).keys() == {"Work", "Work/Projects"}

    # EXAMINE: read-only, the counts and the same UIDVALIDITY as any other client sees
    out = curl(server, "", "-X", "EXAMINE INBOX").decode()
    assert "* 2 EXISTS\r\n" in out and "[PERMANENTFLAGS ()]" in out
    assert f"* OK [UIDVALIDITY {uidvalidity}]" in out and "* OK [UIDNEXT 3]" in out

    # FETCH by UID: the message byte for byte; sections and partial fetches; by sequence number
    assert curl(server, "INBOX;UID=1") == tricky
    assert curl(server, f"INBOX;UIDVALIDITY={uidvalidity};UID=2") == plain
    assert curl(server, "INBOX;UID=1;SECTION=TEXT") == tricky.split(b"\r\n\r\n", 1)[1]
    assert curl(server, "INBOX;UID=1;SECTION=HEADER.FIELDS%20(SUBJECT)") == b"Subject: curl tricky\r\n\r\n"
    assert curl(server, "INBOX;UID=1;PARTIAL=6.20") == tricky[6:26]
    assert curl(server, "INBOX;MAILINDEX=2") == plain
    # fetching BODY[] (not PEEK) marks the message read, as in any mail reader
    out = curl(server, "INBOX", "-X", "UID FETCH 1:* (FLAGS)").decode()
    assert re.findall(r"UID (\d) FLAGS \(([^)]*)\)", out) == [("1", "\\Seen"), ("2", "\\Seen")], out
    # a stale UIDVALIDITY and a UID that does not exist are errors for curl (78: not found)
    curl(server, f"INBOX;UIDVALIDITY={uidvalidity + 1};UID=1", rc=78)
    curl(server, "INBOX;UID=99", rc=78)
    # the non-ASCII folder by its modified UTF-7 name, and by UTF-8 as a user would type it
    assert subject_of(curl(server, f"{UMLAUT_WIRE};UID=1")) == "umlaut folder"
    assert subject_of(curl(server, "Entw%C3%BCrfe;UID=1")) == "umlaut folder"

    # APPEND by upload: stored byte for byte (curl marks it \Seen), fetched back the same, even
    # a stray CR, CR CR LF and no final line break (curl sends the file as it is)
    upload = tmp_path / "upload.eml"
    uploaded = message(4, "curl upload", body="uploaded body\r\n" + "y" * 2000
                       + "\r\nstray\rCR\r\nCR CR LF\r\r\nend")
    upload.write_bytes(uploaded)
    assert curl(server, "INBOX", "-T", str(upload)) == b""
    assert curl(server, f"{UMLAUT_WIRE}", "-T", str(upload)) == b""
    assert curl(server, "INBOX;UID=3") == uploaded
    c = imaps(server)
    state = server_state(c, "INBOX")
    assert state["curl upload"] == (3, {"\\Seen"}, uploaded)
    assert server_state(c, UMLAUT)["curl upload"][1:] == ({"\\Seen"}, uploaded)
    c.logout()

    # SEARCH from the URL query, and custom commands with their untagged answers as output
    assert curl(server, "INBOX?SUBJECT%20upload") == b"* SEARCH 3\r\n"
    assert curl(server, "INBOX", "-X", "UID SEARCH ALL") == b"* SEARCH 1 2 3\r\n"
    assert curl(server, "INBOX", "-X", "UID SEARCH BODY \"leading dot\"") == b"* SEARCH 1\r\n"
    assert curl(server, "", "-X", "STATUS INBOX (MESSAGES UNSEEN UIDNEXT)") == \
        b"* STATUS INBOX (MESSAGES 3 UNSEEN 0 UIDNEXT 4)\r\n"
    assert curl(server, "INBOX", "-X", "UID STORE 2 +FLAGS (\\Flagged)") == \
        b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Seen))\r\n"
    assert curl(server, "", "-X", "CREATE Archive/2026") == b""
    assert "Archive/2026" in list_lines(curl(server, ""))
    # a command the server refuses makes curl fail (21: quote command error)
    curl(server, "", "-X", "SELECT NoSuchFolder", rc=21)
    c = imaps(server)
    assert server_state(c, "INBOX")["curl plain"][:2] == (2, {"\\Seen", "\\Flagged"})
    c.logout()


# -- fetchmail over IMAP -----------------------------------------------------------------------


def smtp_deliver(srv: Server, *messages: bytes) -> None:
    """Mail for alice through the server's SMTP listener, as the world sends it."""
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        for m in messages:
            assert s.sendmail("carol@remote.example", [ALICE], m) == {}


def wait_inbox(srv: Server, count: int) -> None:
    def arrived() -> bool:
        c = imaps(srv)
        try:
            return c.select_folder("INBOX", readonly=True)[b"EXISTS"] == count
        finally:
            c.logout()
    srv.wait_for(arrived, interval=0.2)


def run_fetchmail(srv: Server, base: str, outdir: str, *args: str) -> tuple[int, str]:
    exe = require_tool("fetchmail")
    rc = os.path.join(base, "fetchmailrc")
    with open(rc, "w") as f:
        f.write(f'poll localhost service {srv.ports["imaps"]} protocol imap auth password\n'
                f'  user "{ALICE}" there with password "{PASSWORD}" is "{os.environ.get("USER", "root")}" here\n'
                f'  folder INBOX\n'
                f'  ssl sslcertck sslcertfile "{cert(srv)}" sslproto "TLS1.2+"\n'
                f'  mda "/bin/sh -c \'cat > {outdir}/msg.$$$$\'"\n')
    os.chmod(rc, 0o600)
    r = subprocess.run([exe, "-f", rc, "--nodetach", "--nosyslog", "-v", *args], capture_output=True,
                       text=True, timeout=30, env=dict(os.environ, FETCHMAILHOME=base, HOME=base))
    return r.returncode, r.stdout + r.stderr


def take_delivered(outdir: str) -> list[bytes]:
    out = []
    for name in sorted(os.listdir(outdir)):
        with open(os.path.join(outdir, name), "rb") as f:
            out.append(f.read())
        os.remove(os.path.join(outdir, name))
    return out


def assert_delivered(delivered: list[bytes], expected: dict[str, tuple[int, frozenset, bytes]]) -> None:
    """Each server message reached the MDA once: the server's bytes with LF line ends, plus
    fetchmail's own Received header (put after Return-Path and Delivered-To), nothing else."""
    assert len(delivered) == len(expected), [subject_of(d) for d in delivered]
    by_subject = {subject_of(d): d for d in delivered}
    assert set(by_subject) == set(expected)
    for subject, (_uid, _flags, raw) in expected.items():
        got = by_subject[subject]
        ours = re.compile(rb"^Received: from localhost \[127\.0\.0\.1\]\n\tby \S+ with IMAP "
                          rb"\(fetchmail-[^)]*\)\n(\t[^\n]*\n)*", re.M)
        assert len(ours.findall(got.split(b"\n\n", 1)[0] + b"\n")) == 1, got[:600]
        assert ours.sub(b"", got, count=1) == lf(raw), subject


def test_fetchmail_imaps_keep_then_flush(server, tmp_path):
    base = str(tmp_path / "fm")
    outdir = os.path.join(base, "out")
    os.makedirs(outdir)
    body = "Line one\r\n.a leading dot\r\n..two dots\r\nGrüße\r\n" + "z" * 990 + "\r\n"
    first = [message(n, f"fetch first {n}", body=f"{body}first {n}\r\n") for n in range(1, 4)]
    smtp_deliver(server, *first)
    wait_inbox(server, 3)
    c = imaps(server)
    before = server_state(c, "INBOX")
    assert all(flags == set() for _u, flags, _r in before.values())
    c.logout()

    # --keep: every new message delivered once, left on the server and now marked read
    code, out = run_fetchmail(server, base, outdir, "--keep")
    assert code == 0, out
    assert_delivered(take_delivered(outdir), before)
    c = imaps(server)
    kept = server_state(c, "INBOX")
    assert {s: (u, f) for s, (u, f, _r) in kept.items()} == \
        {s: (u, {"\\Seen"}) for s, (u, _f, _r) in before.items()}
    c.logout()
    # again: nothing new (fetchmail's exit code 1 is "no mail")
    code, out = run_fetchmail(server, base, outdir, "--keep")
    assert code == 1, out
    assert take_delivered(outdir) == []

    # without --keep: the two new messages are fetched, then \Deleted and expunged on the server;
    # the three already read are left alone
    second = [message(n, f"fetch second {n}", body=f"{body}second {n}\r\n") for n in range(4, 6)]
    smtp_deliver(server, *second)
    wait_inbox(server, 5)
    c = imaps(server)
    new = {s: v for s, v in server_state(c, "INBOX").items() if s.startswith("fetch second")}
    c.logout()
    assert len(new) == 2
    code, out = run_fetchmail(server, base, outdir)
    assert code == 0, out
    assert_delivered(take_delivered(outdir), new)
    assert len(re.findall(r"IMAP> A\d+ STORE \d+ \+FLAGS \((\\Seen )?\\Deleted\)", out)) == 2, out
    assert re.search(r"\(\\Seen \\Deleted\).*IMAP> A\d+ EXPUNGE\n.*IMAP< \* \d+ EXPUNGE", out, re.S), out
    c = imaps(server)
    left = server_state(c, "INBOX")
    assert {s: (u, f) for s, (u, f, _r) in left.items()} == {s: (u, {"\\Seen"}) for s, (u, _f, _r) in before.items()}
    c.logout()
    code, out = run_fetchmail(server, base, outdir)
    assert code == 1, out
    assert take_delivered(outdir) == []

    # --all without --keep: the read ones too; the mailbox ends empty and a last run finds nothing
    code, out = run_fetchmail(server, base, outdir, "--all")
    assert code == 0, out
    assert_delivered(take_delivered(outdir), left)
    c = imaps(server)
    assert c.select_folder("INBOX")[b"EXISTS"] == 0
    c.logout()
    code, out = run_fetchmail(server, base, outdir, "--all")
    assert code == 1, out
    assert take_delivered(outdir) == []


# -- getmail6 ----------------------------------------------------------------------------------


def run_getmail(srv: Server, base: str, outdir: str, *, read_all: bool, delete: bool) -> str:
    exe = require_tool("getmail")
    rc = os.path.join(base, "getmailrc")
    with open(rc, "w") as f:
        f.write(f"""[retriever]
type = SimpleIMAPSSLRetriever
server = localhost
port = {srv.ports["imaps"]}
username = {ALICE}
password = {PASSWORD}
ca_certs = {cert(srv)}
mailboxes = ("INBOX", "{UMLAUT}", "Work/Projects")

[destination]
type = MDA_external
path = /bin/sh
arguments = ("-c", "cat > {outdir}/m.$$")
allow_root_commands = true
unixfrom = false

[options]
read_all = {read_all}
delete = {delete}
delivered_to = false
received = false
verbose = 2
""")
    r = subprocess.run([exe, "--getmaildir", base, "--rcfile", "getmailrc"], capture_output=True,
                       text=True, timeout=30, env=dict(os.environ, HOME=base))
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "rror" not in out, out
    return out


def assert_getmail_delivered(delivered: list[bytes], expected: dict[str, tuple[str, bytes]]) -> None:
    """Each message once, the server's bytes with LF line ends; getmail only puts a Return-Path
    (the message's own, or <unknown>) in front and the folder it came from at the header's end."""
    assert sorted(subject_of(d) for d in delivered) == sorted(expected)
    for d in delivered:
        folder, raw = expected[subject_of(d)]
        raw = lf(raw)
        m = re.match(rb"Return-Path: <([^>\n]*)>\n", raw)
        rest = raw[m.end():] if m else raw
        head, body = rest.split(b"\n\n", 1)
        got_folder = re.search(rb"\nX-getmail-retrieved-from-mailbox: ([^\n]*)\n\n", d)
        assert got_folder, d
        assert str(email.header.make_header(email.header.decode_header(got_folder.group(1).decode()))) == folder
        assert d == (b"Return-Path: <%s>\n" % (m.group(1) if m else b"unknown") + head
                     + got_folder.group(0) + body), d


def test_getmail_imaps_folders_once_then_delete(server, tmp_path):
    base = str(tmp_path / "gm")
    outdir = os.path.join(base, "out")
    os.makedirs(outdir)
    smtp_deliver(server, message(1, "getmail inbox 1"), message(2, "getmail inbox 2"))
    wait_inbox(server, 2)
    c = imaps(server)
    c.select_folder("INBOX")
    c.add_flags(c.search(["SUBJECT", "inbox 2"]), [b"\\Seen"])
    c.create_folder(UMLAUT)
    c.append(UMLAUT, message(3, "getmail umlaut ß"))
    c.create_folder("Work/Projects")
    c.append("Work/Projects", message(4, "getmail nested"), flags=[b"\\Flagged"])
    state = {f: server_state(c, f) for f in ("INBOX", UMLAUT, "Work/Projects")}
    c.logout()
    everything = {s: (f, raw) for f, st in state.items() for s, (_u, _f, raw) in st.items()}

    # first run: all four from the three folders (read or not); the server flags are untouched
    out = run_getmail(server, base, outdir, read_all=False, delete=False)
    assert "4 messages" in out, out
    assert_getmail_delivered(take_delivered(outdir), everything)
    c = imaps(server)
    assert {f: server_state(c, f) for f in state} == state
    c.logout()

    # second run: getmail remembers UIDVALIDITY/UID, and the server kept them: nothing again
    out = run_getmail(server, base, outdir, read_all=False, delete=False)
    assert take_delivered(outdir) == [], out
    # a new message in INBOX and one in the umlaut folder: only those two come
    smtp_deliver(server, message(5, "getmail inbox 5"))
    wait_inbox(server, 3)
    c = imaps(server)
    c.append(UMLAUT, message(6, "getmail umlaut 6"))
    new = {s: (f, raw) for f in ("INBOX", UMLAUT) for s, (_u, _f, raw) in server_state(c, f).items()
           if s.endswith((" 5", " 6"))}
    c.logout()
    run_getmail(server, base, outdir, read_all=False, delete=False)
    assert_getmail_delivered(take_delivered(outdir), new)

    # read_all + delete: everything once more, then deleted and expunged in every folder
    run_getmail(server, base, outdir, read_all=True, delete=True)
    assert_getmail_delivered(take_delivered(outdir), {**everything, **new})
    c = imaps(server)
    for folder in state:
        assert c.folder_status(folder, ["MESSAGES"])[b"MESSAGES"] == 0, folder
    c.logout()
    run_getmail(server, base, outdir, read_all=True, delete=True)
    assert take_delivered(outdir) == []


# -- mutt --------------------------------------------------------------------------------------


def run_mutt(srv: Server, base: str, folder: str, keys: str, timeout: float = 20.0) -> bytes:
    """mutt on a pseudo-terminal (it needs one), opening imaps://...FOLDER and running ``keys``
    (a push string of mutt functions) up to its <quit>; returns what it drew on the screen."""
    exe = require_tool("mutt")
    rc = os.path.join(base, "muttrc")
    with open(rc, "w") as f:
        f.write(f"""set folder="imaps://{ALICE.replace('@', '%40')}@localhost:{srv.ports['imaps']}/"
set imap_pass="{PASSWORD}"
set spoolfile="+INBOX"
set ssl_ca_certificates_file="{cert(srv)}"
set certificate_file="{base}/certificates"
set ssl_force_tls=yes
set ssl_starttls=no
set header_cache=""
set message_cachedir=""
set imap_check_subscribed=no
set move=no
set confirmappend=no
set confirmcreate=no
set delete=yes
set quit=yes
set wait_key=no
set pipe_decode=no
set mark_old=no
set resolve=no
set sleep_time=0
set charset="utf-8"
""")
    env = dict(os.environ, HOME=base, TERM="vt100", LANG="C.UTF-8", LC_ALL="C.UTF-8")
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec mutt, never return into pytest
        try:
            debug = ["-d", "5"] if os.environ.get("MUTT_DEBUG") else []
            os.execve(exe, [exe, "-n", *debug, "-F", rc, "-f", folder, "-e", f'push "{keys}"'], env)
        finally:
            os._exit(127)
    screen = b""
    deadline = time.monotonic() + timeout
    status = None
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's other side is gone
                    data = b""
                screen += data
                if data:
                    continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if ready:  # EOF but not reaped yet
                time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"mutt did not finish in {timeout}s; screen:\n{screen[-3000:]!r}")
    finally:
        os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, screen[-3000:])
    for bad in (b"rror", b"failed", b"Bad IMAP", b"unable"):
        assert bad not in screen, screen[-3000:]
    return screen


def test_mutt_reads_flags_copies_saves_deletes(server, tmp_path):
    base = str(tmp_path / "mutt")
    os.makedirs(base)
    smtp_deliver(server, message(1, "mutt hello", body="Hello from the list.\r\n.dot line\r\nGrüße\r\n"),
                 message(2, "mutt junk one"), message(3, "mutt archive me"), message(4, "mutt junk two"))
    wait_inbox(server, 4)
    c = imaps(server)
    c.create_folder("Work/Projects")
    c.create_folder(UMLAUT)
    before = server_state(c, "INBOX")
    c.logout()
    piped = os.path.join(base, "piped.eml")
    piped2 = os.path.join(base, "piped2.eml")

    # one session, as a user at the keyboard: read "hello" (pager, back), pipe it to a file,
    # flag it, copy it to the nested folder; save "archive me" to the umlaut folder; delete the
    # two junk messages by pattern; sync (expunge) and quit
    run_mutt(server, base, "=INBOX",
             "<search>mutt hello<enter><display-message><exit>"
             f"<pipe-message>cat > {piped}<enter>"
             "<flag-message><copy-message>=Work/Projects<enter>"
             f"<search>archive me<enter><save-message>={UMLAUT}<enter>"
             "<tag-pattern>~s junk<enter><tag-prefix><delete-message>"
             "<sync-mailbox><quit>")

    with open(piped, "rb") as f:
        assert f.read() == lf(before["mutt hello"][2])
    c = imaps(server)
    inbox = server_state(c, "INBOX")
    assert flags_of(inbox) == {"mutt hello": {"\\Seen", "\\Flagged"}}
    assert inbox["mutt hello"][0] == before["mutt hello"][0]  # same UID
    projects = server_state(c, "Work/Projects")
    assert flags_of(projects) == {"mutt hello": {"\\Seen", "\\Flagged"}}
    assert projects["mutt hello"][2] == before["mutt hello"][2]
    saved = server_state(c, UMLAUT)
    assert list(saved) == ["mutt archive me"] and saved["mutt archive me"][2] == before["mutt archive me"][2]
    assert "\\Seen" not in saved["mutt archive me"][1]  # saving did not read it
    c.logout()

    # a second session straight into the umlaut folder (its name typed in UTF-8): read the
    # saved message there and delete it; the folder ends empty
    run_mutt(server, base, f"={UMLAUT}",
             f"<pipe-message>cat > {piped2}<enter><delete-message><sync-mailbox><quit>")
    with open(piped2, "rb") as f:
        assert f.read() == lf(before["mutt archive me"][2])
    c = imaps(server)
    assert server_state(c, UMLAUT) == {}
    assert set(server_state(c, "INBOX")) == {"mutt hello"}
    c.logout()


def test_mutt_open_folder_sees_new_mail_and_other_clients_flags(server, tmp_path):
    """While mutt has INBOX open, mail arrives and another client (a phone) flags a message:
    mutt shows both (the new message can be read, the flag selects it for a copy)."""
    base = str(tmp_path / "mutt")
    os.makedirs(base)
    smtp_deliver(server, message(1, "early one"), message(2, "early two"))
    wait_inbox(server, 2)
    c = imaps(server)
    c.create_folder("Flagged")
    c.logout()
    other = os.path.join(base, "other_client.py")
    with open(other, "w") as f:
        f.write(f"""import smtplib, ssl, time
from imapclient import IMAPClient
with smtplib.SMTP("127.0.0.1", {server.ports["smtp"]}, timeout=10) as s:
    s.sendmail("carol@remote.example", [{ALICE!r}], {message(3, "late arrival")!r})
c = IMAPClient("localhost", port={server.ports["imaps"]}, timeout=10,
               ssl_context=ssl.create_default_context(cafile={cert(server)!r}))
c.login({ALICE!r}, {PASSWORD!r})
for _ in range(100):
    if c.select_folder("INBOX")[b"EXISTS"] == 3:
        break
    time.sleep(0.1)
c.add_flags(c.search(["SUBJECT", "early two"]), [b"\\\\Flagged"])
c.logout()
""")
    piped = os.path.join(base, "late.eml")
    run_mutt(server, base, "=INBOX",
             f"<shell-escape>{sys.executable} {other}<enter><imap-fetch-mail>"
             f"<search>late arrival<enter><pipe-message>cat > {piped}<enter>"
             "<tag-pattern>~F<enter><tag-prefix><copy-message>=Flagged<enter><quit>")
    c = imaps(server)
    inbox = server_state(c, "INBOX")
    assert set(inbox) == {"early one", "early two", "late arrival"}
    with open(piped, "rb") as f:
        assert f.read() == lf(inbox["late arrival"][2])
    assert flags_of(server_state(c, "Flagged")) == {"early two": {"\\Flagged"}}
    c.logout()

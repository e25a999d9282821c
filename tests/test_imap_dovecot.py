"""Dovecot interoperability: a throwaway Dovecot (127.0.0.1, free port, no TLS, passwd-file,
base_dir/log in a temporary folder) serves the very Maildir TMmail writes.  UIDs, UIDVALIDITY,
flags, keywords and folders must agree both ways: TMmail writes -> Dovecot reads, then
Dovecot appends, flags, expunges and creates -> TMmail reads; then both at once (a Dovecot
flag change reaches an idling TMmail session, a TMmail flag change reaches Dovecot)."""

from __future__ import annotations

import imaplib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from tests.conftest import require_tool
from tests.imap_fixtures import start_imap, stop_imap
from tests.server import free_port
from tests.test_imap_server import client, cmd, deliver, login_raw, message
from tests.test_imap_server_concurrency import wait_line

#: Dovecot refuses to access mail as root: run as root, the Maildir is handed to "nobody";
#: run as an ordinary user, Dovecot runs entirely as that user
AS_ROOT = os.geteuid() == 0
MAIL_UID = 65534 if AS_ROOT else os.geteuid()
_ME = pwd.getpwuid(os.geteuid()).pw_name
INTERNAL_USER = "dovecot" if AS_ROOT else _ME
LOGIN_USER = "dovenull" if AS_ROOT else _ME
DOVECOT_PASSWORD = "dovepass"


@pytest.fixture
def shared_root():
    """A folder other users can traverse (pytest's tmp_path is private to root)."""
    root = tempfile.mkdtemp(prefix="tmmail-dovecot-", dir="/tmp")
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def chown_tree(path: str, uid: int) -> None:
    if not AS_ROOT:
        return  # both servers already run as this user
    os.chown(path, uid, 65534)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, 65534)


class Dovecot:
    def __init__(self, root: str, maildir: str) -> None:
        self.exe = require_tool("dovecot")
        self.root = os.path.join(root, "dovecot")
        os.makedirs(self.root)
        os.chmod(self.root, 0o755)
        self.port = free_port()
        self.log = os.path.join(self.root, "dovecot.log")
        users = os.path.join(self.root, "users")
        with open(users, "w") as f:
            gid = 65534 if AS_ROOT else os.getegid()
            f.write(f"alice:{{PLAIN}}{DOVECOT_PASSWORD}:{MAIL_UID}:{gid}::{root}::\n")
        os.chmod(users, 0o644)
        self.conf = os.path.join(self.root, "dovecot.conf")
        with open(self.conf, "w") as f:
            f.write(f"""base_dir = {self.root}/run
state_dir = {self.root}/state
instance_name = tmmail-test-{self.port}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
log_path = {self.log}
default_internal_user = {INTERNAL_USER}
default_login_user = {LOGIN_USER}
first_valid_uid = {min(100, MAIL_UID)}
mail_location = maildir:{maildir}
mail_privileged_group =
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {users}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-F", "-c", self.conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise AssertionError("dovecot did not start:\n" + self.read_log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def read_log(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return "(no log)"

    def connect(self) -> imaplib.IMAP4:
        m = imaplib.IMAP4("127.0.0.1", self.port, timeout=20)
        m.login("alice", DOVECOT_PASSWORD)
        return m


def fetch_state(m: imaplib.IMAP4, folder: str) -> tuple[int, dict[int, set[str]]]:
    """(UIDVALIDITY, {uid: flags without \\Recent}) of a folder, through any IMAP server."""
    typ, _ = m.select('"%s"' % folder)
    assert typ == "OK", folder
    uidvalidity = int(m.response("UIDVALIDITY")[1][0])
    typ, data = m.uid("FETCH", "1:*", "(FLAGS)")
    out: dict[int, set[str]] = {}
    for item in data:
        if not item:
            continue
        text = item.decode() if isinstance(item, bytes) else item[0].decode()
        mm = re.search(r"UID (\d+)", text)
        ff = re.search(r"FLAGS \(([^)]*)\)", text)
        if mm and ff:
            out[int(mm.group(1))] = set(ff.group(1).split()) - {"\\Recent"}
    m.close()
    return uidvalidity, out


def test_dovecot_reads_tmmail_and_tmmail_reads_dovecot(reactor_thread, shared_root):
    env = start_imap(reactor_thread, shared_root)
    dove = Dovecot(shared_root, env.maildir())
    try:
        # -- TMmail writes ----------------------------------------------------------------
        for n in range(1, 5):
            deliver(env, message(n), tmp_name=f"m{n}")
        c = client(env)
        c.create_folder("Work/Projects")
        c.append("Work/Projects", message(9, subject="in a folder"), flags=[b"$Work", b"\\Seen"])
        c.select_folder("INBOX")
        c.add_flags([1], [b"\\Seen", b"$Label1"])
        c.add_flags([2], [b"\\Flagged", b"NonJunk"])
        c.add_flags([3], [b"\\Deleted"])
        c.expunge()
        c.add_flags([4], [b"\\Answered", b"\\Draft"])
        c.logout()
        m = env.connect("alice@example.com")
        tm_inbox = fetch_state(m, "INBOX")
        tm_work = fetch_state(m, "Work/Projects")
        m.logout()
        assert sorted(tm_inbox[1]) == [1, 2, 4]
        assert tm_inbox[1][1] >= {"\\Seen", "$Label1"}

        # -- Dovecot reads the same Maildir --------------------------------------------------
        chown_tree(env.maildir(), MAIL_UID)
        dove.start()
        d = dove.connect()
        assert fetch_state(d, "INBOX") == tm_inbox
        assert fetch_state(d, "Work/Projects") == tm_work
        typ, listing = d.list()
        names = {re.search(rb'"/" "?([^"]*)"?$', ln).group(1).decode() for ln in listing}
        assert {"INBOX", "Sent", "Drafts", "Trash", "Work/Projects"} <= names
        d.select("INBOX")
        typ, body = d.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"Subject: message 1" in body[0][1]

        # -- Dovecot writes --------------------------------------------------------------------
        typ, data = d.append("INBOX", r"(\Seen $FromDovecot)", None,
                             message(20, subject="from dovecot").replace(b"\n", b"\r\n"))
        appended_uid = int(re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1))
        d.select("INBOX")
        d.uid("STORE", "2", "+FLAGS", r"(\Answered)")
        d.uid("STORE", "4", "+FLAGS", r"(\Deleted)")
        d.expunge()
        d.create("FromDovecot")
        d.select("Work/Projects")
        d.uid("STORE", "1", "-FLAGS", "($Work)")
        dove_inbox = fetch_state(d, "INBOX")
        dove_work = fetch_state(d, "Work/Projects")
        d.logout()
        assert appended_uid in dove_inbox[1]

        # -- TMmail reads what Dovecot wrote ---------------------------------------------------
        m = env.connect("alice@example.com")
        assert fetch_state(m, "INBOX") == dove_inbox
        assert fetch_state(m, "Work/Projects") == dove_work
        inbox = fetch_state(m, "INBOX")[1]
        assert inbox[appended_uid] == {"\\Seen", "$FromDovecot"}
        assert "\\Answered" in inbox[2] and 4 not in inbox
        typ, listing = m.list()
        assert any(b"FromDovecot" in ln for ln in listing)
        m.select("INBOX")
        typ, data = m.uid("FETCH", str(appended_uid), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"Subject: from dovecot" in data[0][1]
        m.logout()

        # -- both at once: flag changes travel while the other side is connected ------------
        s, f = login_raw(env)
        sel = cmd(s, f, b"a", b"SELECT INBOX (CONDSTORE)")
        highest = int(next(re.search(rb"HIGHESTMODSEQ (\d+)", ln).group(1) for ln in sel
                           if b"HIGHESTMODSEQ" in ln))
        s.sendall(b"b IDLE\r\n")
        assert f.readline().startswith(b"+ ")
        d = dove.connect()
        d.select("INBOX")
        d.uid("STORE", "1", "+FLAGS", r"(\Flagged)")
        got = wait_line(s, f, lambda ln: b"FETCH (UID 1 " in ln and b"\\Flagged" in ln, timeout=5)
        # Dovecot's flag change gets a new TMmail modseq when TMmail's index notices it
        pushed = re.search(rb"MODSEQ \((\d+)\)", got[-1])
        assert pushed and int(pushed.group(1)) > highest, got
        s.sendall(b"DONE\r\n")
        wait_line(s, f, lambda ln: ln.startswith(b"b OK"))
        cmd(s, f, b"c", b"UID STORE 2 +FLAGS (\\Draft)")
        seen = False
        for _ in range(30):  # Dovecot notices the rename on its next sync
            typ, data = d.noop()
            typ, data = d.uid("FETCH", "2", "(FLAGS)")
            if b"\\Draft" in data[0]:
                seen = True
                break
            time.sleep(0.1)
        assert seen, data
        d.logout()
        s.close()
    finally:
        dove.stop()
        stop_imap(reactor_thread, env)


def test_sent_date_searches_agree_with_dovecot(reactor_thread, shared_root):
    """SENTBEFORE/SENTON/SENTSINCE on messages whose Date: is missing or unparseable: TMmail
    answers exactly as Dovecot 2.3 on the same Maildir (such a message counts as sent on
    1-Jan-1970; Dovecot does not fall back to INTERNALDATE)."""
    env = start_imap(reactor_thread, shared_root)
    dove = Dovecot(shared_root, env.maildir())
    dates = ["Mon, 2 Nov 2026 10:00:00 +0000", None, "garbage, not a date",
             "Thu, 31 Dec 2099 23:30:00 -0800"]
    for n, date in enumerate(dates, 1):
        head = f"From: a@example.org\nSubject: s{n}\n" + (f"Date: {date}\n" if date else "")
        deliver(env, (head + "\nbody\n").encode(), tmp_name=f"d{n}")
    today = time.strftime("%d-%b-%Y")
    keys = ["SENTBEFORE 1-Jan-2000", "SENTON 1-Jan-1970", "SENTSINCE 1-Jan-2026",
            "SENTON 31-Dec-2099", f"SENTON {today}", "NOT SENTBEFORE 2-Jan-1970"]
    try:
        m = env.connect("alice@example.com")
        m.select("INBOX")
        ours = {k: m.search(None, k)[1][0].split() for k in keys}
        m.logout()
        assert ours["SENTON 1-Jan-1970"] == [b"2", b"3"]
        chown_tree(env.maildir(), MAIL_UID)
        dove.start()
        d = dove.connect()
        d.select("INBOX")
        theirs = {k: d.search(None, k)[1][0].split() for k in keys}
        d.logout()
        assert ours == theirs
    finally:
        dove.stop()
        stop_imap(reactor_thread, env)

"""Dovecot and TMmail on the same Maildir: same UIDs, UIDVALIDITY, flags, keywords and folders.

Runs Dovecot's own ``imap`` binary pre-authenticated on stdin/stdout (no daemon, no network) on a
Maildir that TMmail wrote, and the other way round.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest

from tests.conftest import require_tool
from tmmail import maildir, store
from tmmail.store import Store

IMAP_BIN = "/usr/lib/dovecot/imap"


class Dovecot:
    def __init__(self, home: str) -> None:
        require_tool("dovecot")
        if not os.path.exists(IMAP_BIN):
            pytest.fail(f"{IMAP_BIN} missing although dovecot is installed")
        self.home = home
        self.maildir = os.path.join(home, "Maildir")
        self.root = os.geteuid() == 0
        uid, gid = (65534, 65534) if self.root else (os.getuid(), os.getgid())
        self.conf = os.path.join(home, "dovecot.conf")
        with open(self.conf, "w") as f:
            f.write(
                f"base_dir = {home}/run\nstate_dir = {home}/state\nlog_path = /dev/stderr\nssl = no\n"
                f"mail_location = maildir:{self.maildir}\nmail_uid = {uid}\nmail_gid = {gid}\n"
                "first_valid_uid = 0\nfirst_valid_gid = 0\n"
                "namespace inbox {\n  inbox = yes\n  separator = /\n}\n"
            )

    def run(self, *commands: bytes | str, binary: str = IMAP_BIN, logout: bytes = b"z LOGOUT\r\n") -> str:
        data = b"".join(c.encode() if isinstance(c, str) else c for c in commands) + logout
        argv = [binary, "-c", self.conf]
        if self.root:
            subprocess.run(["chown", "-R", "65534:65534", self.home], check=True)
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
        p = subprocess.run(argv, input=data, capture_output=True, timeout=30,
                           env={"USER": "test", "HOME": self.home, "PATH": os.environ.get("PATH", "")})
        out = p.stdout.decode("utf-8", "replace")
        assert out.startswith(("* PREAUTH", "+OK")), out + p.stderr.decode("utf-8", "replace")
        return out


@pytest.fixture
def dv():
    home = tempfile.mkdtemp(prefix="tmmail-dovecot-")
    os.chmod(home, 0o755)
    yield Dovecot(home)
    shutil.rmtree(home, ignore_errors=True)


def literal(tag: str, cmd: str, data: bytes) -> bytes:
    return f"{tag} {cmd} {{{len(data)}+}}\r\n".encode() + data + b"\r\n"


def fetched(out: str) -> dict[int, set[str]]:
    """UID -> flags from ``* n FETCH (UID u FLAGS (...))`` lines."""
    res = {}
    for m in re.finditer(r"\* \d+ FETCH \(UID (\d+) FLAGS \(([^)]*)\)", out):
        res[int(m.group(1))] = set(m.group(2).split()) - {"\\Recent"}
    return res


def test_dovecot_reads_what_tmmail_wrote(dv):
    maildir.create(dv.maildir)
    st = Store(dv.maildir)
    src = os.path.join(dv.home, "m.eml")
    with open(src, "wb") as f:
        f.write(b"Subject: delivered\n\nbody\n")
    maildir.deliver(dv.maildir, src)
    uv, uid2 = st.append("INBOX", b"Subject: appended\r\n\r\nx\r\n", ["\\Flagged"], internal_date=1_000_000_000)
    view = st.open("INBOX")
    view.store_flags([1], ["\\Seen", "$Junk", "NonJunk"], "add")
    st.create_folder("Work/Projects")
    st.create_folder("Café")
    st.subscribe("Work/Projects")
    out = dv.run("a SELECT INBOX\r\n", "b UID FETCH 1:* (FLAGS RFC822.SIZE INTERNALDATE)\r\n",
                 'c LIST "" "*"\r\n', 'd LSUB "" "*"\r\n')
    assert f"[UIDVALIDITY {uv}]" in out
    assert "[UIDNEXT 3]" in out
    assert fetched(out) == {1: {"\\Seen", "$Junk", "NonJunk"}, 2: {"\\Flagged"}}
    assert "RFC822.SIZE 28" in out  # ,W= of "Subject: delivered\n\nbody\n"
    assert 'INTERNALDATE "09-Sep-2001 01:46:40 +0000"' in out
    assert '* LIST (\\HasChildren) "/" Work\r\n' in out
    assert '* LIST (\\HasNoChildren) "/" Work/Projects\r\n' in out
    assert '* LIST (\\HasNoChildren) "/" Caf&AOk-\r\n' in out
    assert '* LSUB () "/" Work/Projects\r\n' in out and '* LSUB () "/" Sent\r\n' in out


def test_tmmail_reads_what_dovecot_wrote_and_continues_the_uids(dv):
    out = dv.run(literal("a", "APPEND INBOX (\\Seen $Work)", b"Subject: one\r\n\r\nbody\r\n"),
                 literal("b", 'APPEND INBOX (\\Answered) "17-Jul-1996 02:44:25 -0700"', b"Subject: two\r\n\r\nb\r\n"),
                 "c CREATE Lists/Dev\r\n", "d SUBSCRIBE Lists/Dev\r\n",
                 literal("e", "APPEND Lists/Dev (Later)", b"Subject: three\r\n\r\nc\r\n"))
    uv = int(re.search(r"APPENDUID (\d+) 1\]", out).group(1))
    store._indexes.clear()
    st = Store(dv.maildir)
    inbox = st.open("INBOX")
    assert inbox.uidvalidity == uv
    assert [(m.uid, m.flags) for m in inbox.messages] == [
        (1, frozenset({"\\Seen", "$Work"})), (2, frozenset({"\\Answered"}))]
    assert inbox.messages[1].internal_date == 837596665  # 1996-07-17 09:44:25 UTC
    assert inbox.read(1) == b"Subject: one\n\nbody\n"
    assert "Lists/Dev" in [f.name for f in st.list_folders()]
    assert "Lists/Dev" in st.subscriptions()
    assert [m.flags for m in st.open("Lists/Dev").messages] == [frozenset({"Later"})]
    # TMmail continues the UID sequence and changes flags; Dovecot sees both
    _, uid = st.append("INBOX", b"Subject: mine\n\nz\n", ["NonJunk"])
    assert uid == 3
    inbox.store_flags([1], ["$Work"], "remove")
    inbox.store_flags([2], ["\\Deleted"], "add")
    out = dv.run("a SELECT INBOX\r\n", "b UID FETCH 1:* (FLAGS)\r\n")
    assert f"[UIDVALIDITY {uv}]" in out
    assert fetched(out) == {1: {"\\Seen"}, 2: {"\\Answered", "\\Deleted"}, 3: {"NonJunk"}}
    # Dovecot expunges; TMmail's open view learns it through refresh()
    dv.run("a SELECT INBOX\r\n", "b EXPUNGE\r\n")
    changes = inbox.refresh()
    assert changes.expunged == [(2, 2)]
    assert [m.uid for m in inbox.messages] == [1, 3]


def test_pop3_uidls_match_dovecot(dv):
    """Switching a mailbox between Dovecot and TMmail must not make POP3 clients download again."""
    from tmmail.pop3 import open_maildrop

    maildir.create(dv.maildir)
    src = os.path.join(dv.home, "m.eml")
    with open(src, "wb") as f:
        f.write(b"Subject: pop\n\nbody\n")
    for _ in range(3):
        maildir.deliver(dv.maildir, src)
    Store(dv.maildir).open("INBOX").store_flags([2], ["\\Seen"], "add")
    # a record with Dovecot's migrated-UIDL field
    ul_path = os.path.join(dv.maildir, "dovecot-uidlist")
    with open(ul_path) as f:
        text = f.read()
    with open(ul_path, "w") as f:
        f.write(text.replace("\n3 :", "\n3 Pold-server-uidl-3 :"))
    out = dv.run("UIDL\r\n", binary="/usr/lib/dovecot/pop3", logout=b"QUIT\r\n")
    theirs = re.findall(r"^(\d+ \S+)\r$", out, re.M)
    assert len(theirs) == 3 and theirs[2] == "3 old-server-uidl-3"
    store._indexes.clear()
    drop = open_maildrop(dv.maildir)
    try:
        ours = [f"{i} {u.decode()}" for i, u in enumerate(drop.uidls, 1)]
    finally:
        drop.release()
    assert ours == theirs

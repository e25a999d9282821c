"""Two sessions on one folder: sequence numbers stay consistent per session, EXPUNGE is only
sent where RFC 3501 §7.4.1 allows it, and IDLE pushes new mail, flag changes and expunges
(from this process at once, from other processes by the 1 s poll)."""

from __future__ import annotations

import os
import time

import pytest

from tests.imap_fixtures import start_imap, stop_imap
from tests.test_imap_server import cmd, deliver, login_raw, message


@pytest.fixture
def env(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path)
    yield e
    stop_imap(reactor_thread, e)


def wait_line(s, f, predicate, timeout: float = 5.0) -> list[bytes]:
    """Read lines until one satisfies ``predicate`` (bounded by ``timeout``)."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            line = f.readline()
            if not line:
                break
            got.append(line)
            if predicate(line):
                return got
    except (TimeoutError, OSError):
        pass
    finally:
        s.settimeout(10)
    raise AssertionError(f"expected line not seen in {timeout}s; got {got!r}")


def test_expunge_in_one_session_reaches_the_other_only_at_allowed_points(env):
    for n in range(1, 4):
        deliver(env, message(n), tmp_name=f"m{n}")
    a, fa = login_raw(env)
    b, fb = login_raw(env)
    cmd(a, fa, b"a1", b"SELECT INBOX")
    cmd(b, fb, b"b1", b"SELECT INBOX")
    cmd(a, fa, b"a2", b"STORE 2 +FLAGS.SILENT (\\Deleted)")
    assert cmd(a, fa, b"a3", b"EXPUNGE")[0] == b"* 2 EXPUNGE\r\n"
    # FETCH by sequence number: no EXPUNGE, old numbering still valid (message 3 is still 3)
    lines = cmd(b, fb, b"b2", b"FETCH 1:3 (UID)")
    assert not any(b"EXPUNGE" in ln for ln in lines)
    assert lines[-1].startswith(b"b2 ")
    assert b"* 3 FETCH (UID 3)\r\n" in lines
    # the expunged message cannot be read any more
    lines = cmd(b, fb, b"b3", b"FETCH 2 BODY.PEEK[]")
    assert lines[-1].startswith(b"b3 NO [EXPUNGEISSUED]")
    # STORE and SEARCH also keep the numbering
    assert not any(b"EXPUNGE" in ln for ln in cmd(b, fb, b"b4", b"SEARCH ALL"))
    # NOOP is an allowed point: now the EXPUNGE arrives and numbers shift
    lines = cmd(b, fb, b"b5", b"NOOP")
    assert lines[0] == b"* 2 EXPUNGE\r\n"
    lines = cmd(b, fb, b"b6", b"FETCH 2 (UID)")
    assert lines[0] == b"* 2 FETCH (UID 3)\r\n"
    a.close()
    b.close()


def test_uid_commands_receive_expunges(env):
    for n in range(1, 3):
        deliver(env, message(n), tmp_name=f"m{n}")
    a, fa = login_raw(env)
    b, fb = login_raw(env)
    cmd(a, fa, b"a1", b"SELECT INBOX")
    cmd(b, fb, b"b1", b"SELECT INBOX")
    cmd(a, fa, b"a2", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    cmd(a, fa, b"a3", b"EXPUNGE")
    lines = cmd(b, fb, b"b2", b"UID FETCH 1:* (FLAGS)")
    assert lines[0] == b"* 1 EXPUNGE\r\n"
    assert lines[1].startswith(b"* 1 FETCH (UID 2 FLAGS")
    a.close()
    b.close()


def test_idle_pushes_delivery_flags_and_expunge_within_a_second(env):
    deliver(env, message(1), tmp_name="m1")
    a, fa = login_raw(env)
    b, fb = login_raw(env)
    cmd(a, fa, b"a1", b"SELECT INBOX")
    cmd(b, fb, b"b1", b"SELECT INBOX")
    b.sendall(b"b2 IDLE\r\n")
    assert fb.readline().startswith(b"+ ")
    # new mail delivered by SMTP (maildir.deliver wakes the watchers)
    t0 = time.monotonic()
    deliver(env, message(2), tmp_name="m2")
    wait_line(b, fb, lambda ln: ln == b"* 2 EXISTS\r\n", timeout=3)
    assert time.monotonic() - t0 < 1.5
    # a flag change by the other session
    cmd(a, fa, b"a2", b"STORE 1 +FLAGS (\\Flagged)")
    wait_line(b, fb, lambda ln: ln.startswith(b"* 1 FETCH") and b"\\Flagged" in ln, timeout=3)
    # an expunge by the other session
    cmd(a, fa, b"a3", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    cmd(a, fa, b"a4", b"EXPUNGE")
    wait_line(b, fb, lambda ln: ln == b"* 1 EXPUNGE\r\n", timeout=3)
    b.sendall(b"DONE\r\n")
    wait_line(b, fb, lambda ln: ln.startswith(b"b2 OK"))
    lines = cmd(b, fb, b"b3", b"FETCH 1 (UID)")
    assert lines[0] == b"* 1 FETCH (UID 2)\r\n"
    a.close()
    b.close()


def test_idle_sees_changes_by_another_process(env):
    """A change made on disk by someone else (Dovecot, another TMmail) arrives by polling."""
    name = deliver(env, message(1), tmp_name="m1")
    b, fb = login_raw(env)
    cmd(b, fb, b"b1", b"SELECT INBOX")  # moves the file to cur/
    b.sendall(b"b2 IDLE\r\n")
    assert fb.readline().startswith(b"+ ")
    cur = os.path.join(env.maildir(), "cur")
    (fname,) = [n for n in os.listdir(cur) if n.startswith(name.split(",")[0])]
    os.rename(os.path.join(cur, fname), os.path.join(cur, fname.split(":2,")[0] + ":2,F"))
    wait_line(b, fb, lambda ln: ln.startswith(b"* 1 FETCH") and b"\\Flagged" in ln, timeout=4)
    b.sendall(b"DONE\r\n")
    wait_line(b, fb, lambda ln: ln.startswith(b"b2 OK"))
    b.close()


def test_noop_reports_new_mail_and_append_from_other_session(env):
    a, fa = login_raw(env)
    b, fb = login_raw(env)
    cmd(b, fb, b"b1", b"SELECT INBOX")
    body = b"Subject: x\r\n\r\nhello\r\n"
    a.sendall(b"a1 APPEND INBOX {%d+}\r\n%s\r\n" % (len(body), body))
    wait_line(a, fa, lambda ln: ln.startswith(b"a1 OK"))
    lines = cmd(b, fb, b"b2", b"NOOP")
    assert b"* 1 EXISTS\r\n" in lines and lines[-1].startswith(b"b2 OK")
    a.close()
    b.close()

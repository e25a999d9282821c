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
    # the expunged message cannot be read any more (no content; OK [EXPUNGEISSUED] as Dovecot)
    lines = cmd(b, fb, b"b3", b"FETCH 2 BODY.PEEK[]")
    assert lines[-1].startswith(b"b3 OK [EXPUNGEISSUED]")
    assert not any(b"Body of message 2" in ln for ln in lines)
    # STORE and SEARCH also keep the numbering: message 3 is still 3, no EXPUNGE in between
    lines = cmd(b, fb, b"b4a", b"STORE 3 +FLAGS (\\Flagged)")
    assert not any(b"EXPUNGE" in ln for ln in lines)
    assert lines[0].startswith(b"* 3 FETCH (FLAGS (") and b"\\Flagged" in lines[0]
    assert lines[-1].startswith(b"b4a OK")
    assert not any(b"EXPUNGE" in ln for ln in cmd(b, fb, b"b4", b"SEARCH ALL"))
    # NOOP is an allowed point: now the EXPUNGE arrives and numbers shift
    lines = cmd(b, fb, b"b5", b"NOOP")
    assert lines[0] == b"* 2 EXPUNGE\r\n"
    lines = cmd(b, fb, b"b6", b"FETCH 2 (UID)")
    assert lines[0] == b"* 2 FETCH (UID 3)\r\n"
    a.close()
    b.close()


def _expunged_by_other_session(env, count: int = 3):
    """Sessions a and b on INBOX with ``count`` messages; b expunges message 1 (UID 1) and a
    has not been told yet."""
    for n in range(1, count + 1):
        deliver(env, message(n, subject=f"needle {n}", body=f"needle body {n}\n"), tmp_name=f"m{n}")
    a, fa = login_raw(env)
    b, fb = login_raw(env)
    cmd(a, fa, b"a1", b"SELECT INBOX")
    cmd(b, fb, b"b1", b"SELECT INBOX")
    cmd(b, fb, b"b2", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert cmd(b, fb, b"b3", b"EXPUNGE")[0] == b"* 1 EXPUNGE\r\n"
    return a, fa, b, fb


def test_search_skips_messages_another_session_expunged(env):
    """RFC 2180 §4.1.2: a content SEARCH over a message expunged by another session returns the
    other matches (not NO for the whole command); the gone message simply does not match."""
    a, fa, b, fb = _expunged_by_other_session(env)
    for n, criteria in enumerate((b"BODY needle", b"SUBJECT needle", b"TEXT needle",
                                  b"NOT BODY nomatch", b"SENTSINCE 1-Jan-2000")):
        tag = b"s%d" % n
        lines = cmd(a, fa, tag, b"SEARCH " + criteria)
        assert lines[0] == b"* SEARCH 2 3\r\n", (criteria, lines)
        assert lines[-1].startswith(tag + b" OK [EXPUNGEISSUED]"), (criteria, lines)
        assert not any(b"EXPUNGE\r\n" in ln for ln in lines)
    # the UID form reports the expunge first and then searches the live messages
    lines = cmd(a, fa, b"u1", b"UID SEARCH BODY needle")
    assert lines[0] == b"* 1 EXPUNGE\r\n"
    assert lines[1] == b"* SEARCH 2 3\r\n" and lines[-1].startswith(b"u1 OK UID SEARCH completed")
    a.close()
    b.close()


def test_fetch_store_copy_of_live_and_expunged_messages(env):
    """RFC 2180 §4.1.3/§4.4: FETCH 1:3 returns the live messages and answers
    OK [EXPUNGEISSUED] (Dovecot's reply); STORE changes the live ones; COPY copies the live
    ones (COPYUID names them); no EXPUNGE is sent during these non-UID commands."""
    a, fa, b, fb = _expunged_by_other_session(env)
    lines = cmd(a, fa, b"f1", b"FETCH 1:3 (UID BODY.PEEK[TEXT])")
    text = b"".join(lines)
    assert b"* 2 FETCH (UID 2 BODY[TEXT]" in text and b"needle body 2" in text
    assert b"* 3 FETCH (UID 3 BODY[TEXT]" in text and b"needle body 3" in text
    assert b"needle body 1" not in text and b"EXPUNGE\r\n" not in text
    assert lines[-1].startswith(b"f1 OK [EXPUNGEISSUED]")
    lines = cmd(a, fa, b"f2", b"STORE 1:3 +FLAGS (\\Flagged)")
    assert lines[-1].startswith(b"f2 OK") and not any(b"EXPUNGE\r\n" in ln for ln in lines)
    assert any(ln.startswith(b"* 2 FETCH") and b"\\Flagged" in ln for ln in lines)
    assert any(ln.startswith(b"* 3 FETCH") and b"\\Flagged" in ln for ln in lines)
    lines = cmd(a, fa, b"f3", b"COPY 1:3 Trash")
    assert lines[-1].startswith(b"f3 OK [COPYUID ") and b" 2:3 1:2] " in lines[-1], lines
    assert not any(b"EXPUNGE\r\n" in ln for ln in lines)
    # the other session sees the flags; Trash holds exactly the two live messages
    lines = cmd(b, fb, b"b4", b"FETCH 1:2 (UID FLAGS)")
    assert all(b"\\Flagged" in ln for ln in lines[:2])
    lines = cmd(b, fb, b"b5", b"STATUS Trash (MESSAGES)")
    assert lines[0] == b"* STATUS Trash (MESSAGES 2)\r\n"
    # NOOP: now a is told, and numbering shifts
    assert cmd(a, fa, b"f4", b"NOOP")[0] == b"* 1 EXPUNGE\r\n"
    assert cmd(a, fa, b"f5", b"FETCH 1 (UID)")[0] == b"* 1 FETCH (UID 2)\r\n"
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


def test_idle_pushes_delivery_flags_and_expunge_within_two_seconds(env):
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
    assert time.monotonic() - t0 < 2.0
    # a flag change by the other session: pushed within 2 s of its STORE completing
    cmd(a, fa, b"a2", b"STORE 1 +FLAGS (\\Flagged)")
    t0 = time.monotonic()
    wait_line(b, fb, lambda ln: ln.startswith(b"* 1 FETCH") and b"\\Flagged" in ln, timeout=3)
    assert time.monotonic() - t0 < 2.0
    # an expunge by the other session: pushed within 2 s of its EXPUNGE completing
    cmd(a, fa, b"a3", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    got = wait_line(b, fb, lambda ln: ln.startswith(b"* 1 FETCH") and b"\\Deleted" in ln, timeout=3)
    cmd(a, fa, b"a4", b"EXPUNGE")
    t0 = time.monotonic()
    got = wait_line(b, fb, lambda ln: ln == b"* 1 EXPUNGE\r\n", timeout=3)
    assert time.monotonic() - t0 < 2.0, got
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


def test_new_keyword_announces_flags_to_this_and_other_sessions(env):
    """RFC 3501 §7.2.6: STORE of a keyword the folder did not have sends FLAGS and
    OK [PERMANENTFLAGS] before the FETCH and the tagged reply; other sessions get them at their
    next NOOP, an idling one at once (before the FETCH that uses the keyword)."""
    deliver(env, message(1), tmp_name="m1")
    deliver(env, message(2), tmp_name="m2")
    a, fa = login_raw(env)
    b, fb = login_raw(env)
    c, fc = login_raw(env)
    cmd(a, fa, b"a1", b"SELECT INBOX")
    cmd(b, fb, b"b1", b"SELECT INBOX")
    cmd(c, fc, b"c1", b"SELECT INBOX")
    c.sendall(b"c2 IDLE\r\n")
    assert fc.readline().startswith(b"+ ")
    lines = cmd(a, fa, b"a2", b"STORE 1 +FLAGS ($Label1)")
    assert lines[0] == b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Label1)\r\n", lines
    assert lines[1].startswith(b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen "
                               b"\\Draft $Label1 \\*)]"), lines
    assert lines[2].startswith(b"* 1 FETCH (FLAGS (") and b"$Label1" in lines[2]
    assert lines[3].startswith(b"a2 OK")
    # the same keyword again, or an old one: no FLAGS
    lines = cmd(a, fa, b"a3", b"STORE 2 +FLAGS ($Label1 \\Seen)")
    assert not any(ln.startswith((b"* FLAGS", b"* OK [PERMANENTFLAGS")) for ln in lines)
    # the idling session: FLAGS arrives before the FETCH that carries the keyword
    got = wait_line(c, fc, lambda ln: ln.startswith(b"* 1 FETCH") and b"$Label1" in ln, timeout=3)
    flags_at = [i for i, ln in enumerate(got) if ln.startswith(b"* FLAGS (") and b"$Label1" in ln]
    assert flags_at and flags_at[0] < len(got) - 1, got
    c.sendall(b"DONE\r\n")
    wait_line(c, fc, lambda ln: ln.startswith(b"c2 OK"))
    # the other session learns at NOOP, FLAGS and PERMANENTFLAGS before the FETCHes
    lines = cmd(b, fb, b"b2", b"NOOP")
    assert lines[0] == b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Label1)\r\n", lines
    assert lines[1].startswith(b"* OK [PERMANENTFLAGS (") and b"$Label1" in lines[1]
    assert any(ln.startswith(b"* 1 FETCH") and b"$Label1" in ln for ln in lines[2:])
    assert not any(ln.startswith(b"* FLAGS") for ln in cmd(b, fb, b"b3", b"NOOP"))
    for s in (a, b, c):
        s.close()


def _read_to_eof(s, f, timeout: float = 5.0) -> list[bytes]:
    s.settimeout(timeout)
    lines = []
    while True:
        line = f.readline()
        if not line:
            return lines
        lines.append(line)


@pytest.mark.parametrize("how", ["DELETE", "RENAME"])
def test_selected_folder_deleted_or_renamed_by_another_session_ends_the_session(env, how):
    """Like Dovecot: the session whose selected folder another session DELETEd or RENAMEd gets
    * BYE at its next command (an idling one at once) and is closed; it never answers from the
    stale view."""
    a, fa = login_raw(env)
    b, fb = login_raw(env)
    i, fi = login_raw(env)
    cmd(b, fb, b"b1", b"CREATE Work")
    cmd(b, fb, b"b1b", b"CREATE Work/Sub")
    body = b"Subject: x\r\n\r\nhello\r\n"
    b.sendall(b"b2 APPEND Work {%d+}\r\n%s\r\n" % (len(body), body))
    wait_line(b, fb, lambda ln: ln.startswith(b"b2 OK"))
    assert cmd(a, fa, b"a1", b"SELECT Work")[-1].startswith(b"a1 OK")
    assert cmd(i, fi, b"i1", b"SELECT Work/Sub")[-1].startswith(b"i1 OK")
    i.sendall(b"i2 IDLE\r\n")
    assert fi.readline().startswith(b"+ ")
    t0 = time.monotonic()
    line = b"DELETE Work/Sub" if how == "DELETE" else b"RENAME Work Play"
    assert cmd(b, fb, b"b3", line)[-1].startswith(b"b3 OK")
    # the idling session on the deleted/renamed folder is told at once
    got = wait_line(i, fi, lambda ln: ln.startswith(b"* BYE"), timeout=3)
    assert time.monotonic() - t0 < 2.0
    assert not any(ln.startswith(b"i2 OK") for ln in got)
    assert _read_to_eof(i, fi) == []
    if how == "DELETE":  # Work itself is still there: a stays usable
        lines = cmd(a, fa, b"a2", b"FETCH 1 (FLAGS)")
        assert lines[-1].startswith(b"a2 OK")
        assert cmd(b, fb, b"b4", b"DELETE Work")[-1].startswith(b"b4 OK")
    # the non-idling session: its next command gets BYE, not an answer from the stale view
    a.sendall(b"a3 FETCH 1 (FLAGS)\r\n")
    lines = _read_to_eof(a, fa)
    assert lines and lines[0].startswith(b"* BYE"), lines
    assert not any(b"FETCH (" in ln or ln.startswith(b"a3 ") for ln in lines), lines
    # the session that made the change goes on
    assert cmd(b, fb, b"b5", b"NOOP")[-1].startswith(b"b5 OK")
    b.close()


def test_rename_inbox_by_another_session_is_pushed_as_expunges(env):
    """RENAME INBOX keeps INBOX: a session idling on it is not closed, it sees the messages go."""
    for n in range(1, 3):
        deliver(env, message(n), tmp_name=f"m{n}")
    a, fa = login_raw(env)
    b, fb = login_raw(env)
    cmd(b, fb, b"b1", b"SELECT INBOX")
    b.sendall(b"b2 IDLE\r\n")
    assert fb.readline().startswith(b"+ ")
    assert cmd(a, fa, b"a1", b"RENAME INBOX Saved")[-1].startswith(b"a1 OK")
    t0 = time.monotonic()
    got = wait_line(b, fb, lambda ln: ln == b"* 1 EXPUNGE\r\n", timeout=3)
    assert time.monotonic() - t0 < 2.0
    assert b"* 2 EXPUNGE\r\n" in got and not any(ln.startswith(b"* BYE") for ln in got)
    b.sendall(b"DONE\r\n")
    wait_line(b, fb, lambda ln: ln.startswith(b"b2 OK"))
    assert cmd(b, fb, b"b3", b"NOOP")[-1].startswith(b"b3 OK")
    a.close()
    b.close()

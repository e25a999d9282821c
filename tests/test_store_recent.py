"""\\Recent for appended messages (RFC 3501 §6.3.11, §2.3.2), as Dovecot does it.

Dovecot's maildir-save.c marks every saved message recent; a message without flags is written to
new/, one with flags to cur/ ("files in new/ can't have flags").  The session that next selects the
folder read-write (or the one that has it selected) sees it \\Recent; later sessions do not.
"""

from __future__ import annotations

import os

import pytest
from imapclient import IMAPClient

from tests.imap_fixtures import PASSWORD, start_imap, stop_imap
from tmmail import maildir
from tmmail.store import Store

MSG = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture
def md(tmp_path):
    root = str(tmp_path / "Maildir")
    maildir.create(root)
    return root


@pytest.mark.parametrize("flags", [(), ("\\Seen",), ("\\Flagged", "$Work")])
def test_appended_message_is_recent_for_the_next_read_write_view_only(md, flags):
    st = Store(md)
    _, uid = st.append("INBOX", MSG, flags)
    assert st.status("INBOX").recent == 1
    examine = st.open("INBOX", readonly=True)
    assert examine.recent == set()
    first = st.open("INBOX")
    assert first.recent == {uid}
    assert first.info(uid).flags == frozenset(flags)
    assert st.status("INBOX").recent == 0
    assert st.open("INBOX").recent == set()
    assert first.recent == {uid}  # stays recent for the session that got it


def test_flagless_append_lands_in_new_like_dovecot(md):
    st = Store(md)
    st.append("INBOX", MSG)
    st.append("INBOX", MSG, ["\\Seen"])
    assert len(os.listdir(os.path.join(md, "new"))) == 1
    [name] = os.listdir(os.path.join(md, "cur"))
    assert name.endswith(":2,S")


def test_selected_view_gets_recent_for_an_append_on_refresh(md):
    st = Store(md)
    view = st.open("INBOX")
    _, uid1 = st.append("INBOX", MSG)
    _, uid2 = st.append("INBOX", MSG, ["\\Answered"])
    ch = view.refresh()
    assert [m.uid for m in ch.new] == [uid1, uid2]
    assert ch.recent == 2 and view.recent == {uid1, uid2}
    assert st.open("INBOX").recent == set()


def test_imap_select_after_append_reports_recent(reactor_thread, tmp_path):
    env = start_imap(reactor_thread, tmp_path)
    try:
        a = IMAPClient("127.0.0.1", port=env.port, ssl=False, timeout=20)
        a.login("alice@example.com", PASSWORD)
        a.append("INBOX", MSG)
        a.append("INBOX", MSG, flags=[b"\\Seen"])
        assert a.folder_status("INBOX", [b"RECENT"])[b"RECENT"] == 2
        b = IMAPClient("127.0.0.1", port=env.port, ssl=False, timeout=20)
        b.login("alice@example.com", PASSWORD)
        sel = b.select_folder("INBOX")
        assert sel[b"RECENT"] == 2
        flags = b.get_flags([1, 2])
        assert b"\\Recent" in flags[1] and set(flags[2]) == {b"\\Recent", b"\\Seen"}
        # the next session does not see them as recent any more
        assert a.select_folder("INBOX")[b"RECENT"] == 0
        a.logout()
        b.logout()
    finally:
        stop_imap(reactor_thread, env)


def test_unclaimed_recent_appends_are_bounded(md, monkeypatch):
    from tmmail import store_index

    monkeypatch.setattr(store_index, "MAX_UNCLAIMED", 3)
    st = Store(md)
    uids = [st.append("Sent", MSG, ["\\Seen"])[1] for _ in range(5)]
    assert st.status("Sent").recent == 3  # nobody selected Sent: only the newest few wait
    assert st.open("Sent").recent == set(uids[-3:])


def test_imap_append_to_the_selected_folder_reports_it_recent(reactor_thread, tmp_path):
    from tests.imap_fixtures import raw_session, read_until_tag

    env = start_imap(reactor_thread, tmp_path)
    try:
        s, f = raw_session(env)
        s.sendall(b'L LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
        assert read_until_tag(f, b"L")[-1].startswith(b"L OK")
        s.sendall(b"S SELECT INBOX\r\n")
        assert b"* 0 RECENT\r\n" in read_until_tag(f, b"S")
        s.sendall(b"A APPEND INBOX (\\Flagged) {%d+}\r\n%s\r\n" % (len(MSG), MSG))
        lines = read_until_tag(f, b"A")
        assert b"* 1 EXISTS\r\n" in lines and b"* 1 RECENT\r\n" in lines, lines
        s.sendall(b"F FETCH 1 FLAGS\r\n")
        fetched = b"".join(read_until_tag(f, b"F"))
        assert b"\\Recent" in fetched and b"\\Flagged" in fetched
        s.close()
    finally:
        stop_imap(reactor_thread, env)


def test_imap_copy_and_move_make_the_copies_recent_for_the_destination_session(reactor_thread, tmp_path):
    """RFC 3501 §6.4.7: "the \\Recent flag SHOULD be set, in the copy" -- a session with the
    destination selected sees * RECENT grow and \\Recent on the copies (imaptest copy); one
    MOVE into the folder it is in (RFC 6851 allows it: a new UID, \\Recent, the old one gone)."""
    from tests.imap_fixtures import raw_session, read_until_tag

    env = start_imap(reactor_thread, tmp_path)
    try:
        def session():
            s, f = raw_session(env)
            s.sendall(b'L LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
            assert read_until_tag(f, b"L")[-1].startswith(b"L OK")
            return s, f

        def cmd(conn, tag, line):
            conn[0].sendall(tag + b" " + line + b"\r\n")
            return read_until_tag(conn[1], tag)

        a, b = session(), session()
        cmd(a, b"c", b"CREATE src")
        cmd(a, b"d", b"CREATE dst")
        for i in range(3):
            a[0].sendall(b"A%d APPEND src (\\Seen) {%d+}\r\n%s\r\n" % (i, len(MSG), MSG))
            assert read_until_tag(a[1], b"A%d" % i)[-1].startswith(b"A%d OK" % i)
        cmd(a, b"s", b"SELECT src")
        assert b"* 0 RECENT\r\n" in cmd(b, b"s", b"SELECT dst")
        assert cmd(a, b"k", b"COPY 1 dst")[-1].startswith(b"k OK [COPYUID")
        lines = cmd(b, b"n", b"NOOP")
        assert b"* 1 EXISTS\r\n" in lines and b"* 1 RECENT\r\n" in lines, lines
        assert cmd(b, b"f", b"FETCH 1 FLAGS")[0] == b"* 1 FETCH (FLAGS (\\Recent \\Seen))\r\n"
        assert cmd(a, b"m", b"MOVE 2 dst")[-1] == b"m OK MOVE completed\r\n"
        lines = cmd(b, b"n2", b"NOOP")
        assert b"* 2 EXISTS\r\n" in lines and b"* 2 RECENT\r\n" in lines, lines
        # MOVE into the selected folder itself: COPYUID, the old UID expunged, a new \Recent one
        lines = cmd(a, b"x", b"UID MOVE 3 src")
        assert lines[0] == b"* OK [COPYUID %s 3 4] Moved\r\n" % lines[0].split()[3]
        assert b"* 2 EXPUNGE\r\n" in lines and lines[-1] == b"x OK UID MOVE completed\r\n"
        assert cmd(a, b"g", b"UID FETCH 1:* FLAGS") == [
            b"* 1 FETCH (UID 1 FLAGS (\\Recent \\Seen))\r\n",
            b"* 2 FETCH (UID 4 FLAGS (\\Recent \\Seen))\r\n", b"g OK UID FETCH completed\r\n"]
        # the next session to select src does not get \Recent again
        c = session()
        assert b"* 0 RECENT\r\n" in cmd(c, b"s", b"SELECT src")
        for conn in (a, b, c):
            conn[0].close()
    finally:
        stop_imap(reactor_thread, env)

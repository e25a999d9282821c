"""IMAP server on the real Maildir++ store, driven by imaplib and imapclient over real sockets:
SELECT/EXAMINE, FETCH, STORE, SEARCH, COPY/MOVE (UIDPLUS), APPEND, EXPUNGE, CLOSE, UNSELECT,
CREATE/DELETE/RENAME, LIST/LSUB (special-use, children), STATUS, SUBSCRIBE, and bad names."""

from __future__ import annotations

import imaplib
import os
import re
import time

import pytest
from imapclient import IMAPClient

from tests.imap_fixtures import PASSWORD, client, cmd, login_raw, raw_session, read_until_tag, start_imap, stop_imap
from tmmail import maildir


@pytest.fixture
def env(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path)
    yield e
    stop_imap(reactor_thread, e)


def message(n: int, subject: str | None = None, body: str | None = None) -> bytes:
    subject = subject or f"message {n}"
    body = body or f"Body of message {n}.\nSecond line.\n"
    return (f"From: Sender {n} <sender{n}@example.org>\nTo: alice@example.com\n"
            f"Subject: {subject}\nMessage-ID: <m{n}@example.org>\n"
            f"Date: Mon, 2 Nov 2026 10:00:0{n % 10} +0000\n\n{body}").encode()


def deliver(env, data: bytes, folder: str | None = None, tmp_name: str = "msg") -> str:
    """Put a message in the mailbox the way SMTP delivery does.

    The store is synced after each delivery so UIDs follow delivery order (Maildir names of one
    second do not sort by time)."""
    from tmmail.store import Store

    src = os.path.join(env.root, tmp_name + ".eml")
    with open(src, "wb") as f:
        f.write(data)
    name = maildir.deliver(env.maildir(), src, folder=folder)
    Store(env.maildir()).status(folder or "INBOX")
    return name





# -- SELECT / EXAMINE -------------------------------------------------------------------------


def test_select_and_examine_report_everything(env):
    for n in range(1, 4):
        deliver(env, message(n))
    s, f = login_raw(env)
    lines = cmd(s, f, b"a", b"SELECT INBOX")
    text = b"".join(lines).decode()
    assert "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft" in text
    assert re.search(r"\* OK \[PERMANENTFLAGS \([^)]*\\\*\)\]", text)
    assert "* 3 EXISTS" in text and "* 3 RECENT" in text
    assert "* OK [UNSEEN 1]" in text
    assert re.search(r"\* OK \[UIDVALIDITY \d+\]", text)
    assert "* OK [UIDNEXT 4]" in text
    assert lines[-1].startswith(b"a OK [READ-WRITE]")
    # a second session sees the messages, no longer \Recent
    s2, f2 = login_raw(env)
    text2 = b"".join(cmd(s2, f2, b"b", b"EXAMINE inbox")).decode()
    assert "* 3 EXISTS" in text2 and "* 0 RECENT" in text2
    assert "[PERMANENTFLAGS ()]" in text2 and "b OK [READ-ONLY]" in text2
    # EXAMINE never sets \Seen
    cmd(s2, f2, b"c", b"FETCH 1 BODY[]")
    assert b"\\Seen" not in b"".join(cmd(s2, f2, b"d", b"FETCH 1 FLAGS"))
    assert cmd(s2, f2, b"e", b"STORE 1 +FLAGS (\\Seen)")[-1].startswith(b"e NO")
    assert cmd(s, f, b"x", b"SELECT Nonexistent")[-1].startswith(b"x NO [NONEXISTENT]")
    # a failed SELECT leaves no mailbox selected
    assert cmd(s, f, b"y", b"FETCH 1 FLAGS")[-1].startswith(b"y BAD")
    s.close()
    s2.close()


# -- FETCH ------------------------------------------------------------------------------------


def test_fetch_items_and_seen(env):
    deliver(env, message(1, subject="Hello =?utf-8?q?W=C3=B6rld?="))
    c = client(env)
    c.select_folder("INBOX")
    r = c.fetch([1], ["UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE",
                      "BODY.PEEK[HEADER.FIELDS (SUBJECT)]", "BODY.PEEK[]<0.10>"])[1]
    raw = message(1, subject="Hello =?utf-8?q?W=C3=B6rld?=").replace(b"\n", b"\r\n")
    assert r[b"RFC822.SIZE"] == len(raw)
    assert r[b"BODY[HEADER.FIELDS (SUBJECT)]"] == b"Subject: Hello =?utf-8?q?W=C3=B6rld?=\r\n\r\n"
    assert r[b"BODY[]<0>"] == raw[:10]
    assert r[b"ENVELOPE"].subject == b"Hello =?utf-8?q?W=C3=B6rld?="
    assert r[b"BODYSTRUCTURE"][0] == b"text"
    assert b"\\Seen" not in r[b"FLAGS"]
    # a non-PEEK body fetch sets \Seen and reports FLAGS in the same response
    r = c.fetch([1], ["BODY[TEXT]"])[1]
    assert r[b"BODY[TEXT]"] == b"Body of message 1.\r\nSecond line.\r\n"
    assert b"\\Seen" in r[b"FLAGS"]
    assert b"\\Seen" in c.get_flags([1])[1]
    # byte-exact RFC822
    assert c.fetch([1], ["RFC822"])[1][b"RFC822"] == raw
    c.logout()


def test_uid_fetch_huge_range_and_star(env):
    for n in range(1, 4):
        deliver(env, message(n))
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    t0 = time.monotonic()
    lines = cmd(s, f, b"b", b"UID FETCH 1:4294967295 (FLAGS)")
    assert time.monotonic() - t0 < 2
    assert [ln.split()[1] for ln in lines[:-1]] == [b"1", b"2", b"3"]
    assert b"UID 3" in lines[2]
    # n:* with n beyond the last UID still returns the last message (RFC 3501 §6.4.8)
    lines = cmd(s, f, b"c", b"UID FETCH 100:* (FLAGS)")
    assert len(lines) == 2 and b"UID 3" in lines[0]
    lines = cmd(s, f, b"d", b"FETCH 2:* (UID)")
    assert len(lines) == 3
    assert cmd(s, f, b"e", b"FETCH x (UID)")[-1].startswith(b"e BAD")
    assert cmd(s, f, b"g", b"FETCH 1 (NOSUCHITEM)")[-1].startswith(b"g BAD")
    s.close()


def test_fetch_header_names_are_echoed_as_astrings_and_numbers_are_32_bit(env):
    """A field name is echoed so that the response still parses (a quote inside it came back
    raw); names that are not RFC 5322 field names and partial numbers over 2^32-1 are BAD."""
    deliver(env, message(1))
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    lines = cmd(s, f, b"b", b'FETCH 1 BODY.PEEK[HEADER.FIELDS (Subject "X-{odd}" "Sub\\"ject")]')
    assert lines[0] == b'* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT "X-{ODD}" "SUB\\"JECT")] {22}\r\n'
    for i, item in enumerate([b"BODY[]<4294967296.1>", b"BODY[]<1.4294967296>",
                              b"BODY[HEADER.FIELDS (A:B)]", "BODY[HEADER.FIELDS (S\u00fcb)]".encode(),
                              "BODY[]<\u0661.2>".encode()]):
        tag = b"c%d" % i
        assert cmd(s, f, tag, b"FETCH 1 " + item)[-1].startswith(tag + b" BAD"), item
    assert cmd(s, f, b"d", b"FETCH 1 BODY.PEEK[]<4294967295.4294967295>")[0] == b"* 1 FETCH (BODY[]<4294967295> {0}\r\n"
    s.close()


def test_silent_store_still_reports_a_change_made_by_someone_else(env):
    """RFC 3501 §6.4.6: even with .SILENT, a flag change from an external source is reported
    (it was absorbed into the session's view and never sent)."""
    deliver(env, message(1))
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    assert cmd(s, f, b"b", b"FETCH 1 FLAGS")[0] == b"* 1 FETCH (FLAGS (\\Recent))\r\n"
    cur = os.path.join(env.maildir(), "cur")
    [name] = os.listdir(cur)
    os.rename(os.path.join(cur, name), os.path.join(cur, name.split(":")[0] + ":2,F"))  # Dovecot
    lines = cmd(s, f, b"c", b"STORE 1 +FLAGS.SILENT (\\Seen)")
    assert lines == [b"* 1 FETCH (FLAGS (\\Flagged \\Recent \\Seen))\r\n", b"c OK STORE completed\r\n"]
    # a silent STORE that only does what was asked stays silent
    assert cmd(s, f, b"d", b"STORE 1 -FLAGS.SILENT (\\Seen)") == [b"d OK STORE completed\r\n"]
    s.close()


def test_sequence_numbers_beyond_exists_are_bad_uids_are_not(env):
    """RFC 3501 §9 seq-number: a sequence number above EXISTS (or "*" in an empty mailbox) in
    FETCH, STORE, COPY or MOVE gets a tagged BAD and changes nothing; UID forms and SEARCH
    just match nothing (as Dovecot)."""
    s, f = login_raw(env)
    cmd(s, f, b"a", b"CREATE Empty")
    cmd(s, f, b"b", b"SELECT Empty")
    for i, line in enumerate([b"FETCH 1:* FLAGS", b"FETCH * FLAGS", b"STORE 1 +FLAGS \\Seen",
                              b"COPY 1 INBOX", b"MOVE * INBOX"]):
        tag = b"e%d" % i
        assert cmd(s, f, tag, line)[-1].startswith(tag + b" BAD"), line
    assert cmd(s, f, b"u", b"UID FETCH 1:* FLAGS") == [b"u OK UID FETCH completed\r\n"]
    assert cmd(s, f, b"v", b"SEARCH 1:5")[-1].startswith(b"v OK")
    for n in range(1, 4):
        deliver(env, message(n))
    cmd(s, f, b"c", b"SELECT INBOX")
    assert cmd(s, f, b"d", b"FETCH 3:4 FLAGS")[-1].startswith(b"d BAD")
    assert cmd(s, f, b"g", b"STORE 2,9 +FLAGS \\Deleted")[-1].startswith(b"g BAD")
    assert cmd(s, f, b"h", b"COPY 4 Empty")[-1].startswith(b"h BAD")
    assert cmd(s, f, b"i", b"UID STORE 9 +FLAGS \\Deleted") == [b"i OK UID STORE completed\r\n"]
    lines = cmd(s, f, b"j", b"FETCH 1:* (UID FLAGS)")
    assert len(lines) == 4 and not any(b"Deleted" in ln for ln in lines)  # nothing was stored
    assert cmd(s, f, b"k", b"STATUS Empty (MESSAGES)")[0] == b"* STATUS Empty (MESSAGES 0)\r\n"
    s.close()


# -- STORE ------------------------------------------------------------------------------------


def test_store_flags_keywords_and_silent(env):
    for n in range(1, 4):
        deliver(env, message(n))
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    lines = cmd(s, f, b"b", b"STORE 1:2 +FLAGS (\\Flagged $Label1)")
    # a new keyword: FLAGS and PERMANENTFLAGS first, then one FETCH per message
    assert len(lines) == 5 and lines[0].startswith(b"* FLAGS (") and b"$Label1" in lines[0]
    assert lines[1].startswith(b"* OK [PERMANENTFLAGS (")
    assert b"\\Flagged" in lines[2] and b"$Label1" in lines[2] and lines[-1].startswith(b"b OK")
    lines = cmd(s, f, b"c", b"UID STORE 2 -FLAGS.SILENT (\\Flagged)")
    assert lines == [b"c OK UID STORE completed\r\n"]
    lines = cmd(s, f, b"d", b"UID STORE 3 FLAGS (\\Answered \\Draft)")
    assert re.match(rb"\* 3 FETCH \(UID 3 FLAGS \(\\Answered \\Draft( \\Recent)?\)\)", lines[0]), lines
    assert cmd(s, f, b"e", b"STORE 1 +FLAGS (\\Bogus)")[-1].startswith(b"e BAD")
    assert cmd(s, f, b"g", b"STORE 1 XFLAGS (\\Seen)")[-1].startswith(b"g BAD")
    flags = b"".join(cmd(s, f, b"h", b"FETCH 1:3 (FLAGS)"))
    assert flags.count(b"$Label1") == 2 and flags.count(b"\\Flagged") == 1
    # the keyword is now part of FLAGS/PERMANENTFLAGS of a new SELECT
    assert b"$Label1" in cmd(s, f, b"i", b"SELECT INBOX")[0]
    s.close()
    # flags live in the file names (Dovecot-compatible)
    names = sorted(os.listdir(os.path.join(env.maildir(), "cur")))
    assert any(n.endswith(":2,DR") for n in names), names


# -- SEARCH -----------------------------------------------------------------------------------


def test_search(env):
    deliver(env, message(1, subject="alpha"))
    deliver(env, message(2, subject="Grüße aus Köln"))
    deliver(env, message(3, subject="gamma", body="needle in the body\n"))
    c = client(env)
    c.select_folder("INBOX")
    c.add_flags([1], [b"\\Seen"])
    assert c.search(["UNSEEN"]) == [2, 3]
    assert c.search(["SEEN"]) == [1]
    assert c.search(["BODY", "needle"]) == [3]
    assert c.search(["SUBJECT", "grüße"], charset="UTF-8") == [2]
    assert c.search(["UID", "2:*", "NOT", "SEEN"]) == [2, 3]
    c.logout()
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    assert cmd(s, f, b"b", b"UID SEARCH UNSEEN") == [b"* SEARCH 2 3\r\n", b"b OK UID SEARCH completed\r\n"]
    assert cmd(s, f, b"c", b"SEARCH CHARSET KOI8-R ALL")[-1].startswith(b"c NO [BADCHARSET")
    assert cmd(s, f, b"d", b"SEARCH FROBNICATE")[-1].startswith(b"d BAD")
    assert cmd(s, f, b"e", b"SEARCH SUBJECT nothing-matches")[0] == b"* SEARCH\r\n"
    s.close()


# -- COPY / MOVE ------------------------------------------------------------------------------


def test_copy_and_move_report_copyuid(env):
    for n in range(1, 5):
        deliver(env, message(n))
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    uidvalidity = int(re.search(rb"UIDVALIDITY (\d+)", b"".join(cmd(s, f, b"st", b"STATUS Trash (UIDVALIDITY)"))).group(1))
    lines = cmd(s, f, b"b", b"COPY 1:2 Trash")
    assert lines[-1] == b"b OK [COPYUID %d 1:2 1:2] COPY completed\r\n" % uidvalidity
    lines = cmd(s, f, b"c", b"UID MOVE 3 Trash")
    assert lines[0] == b"* OK [COPYUID %d 3 3] Moved\r\n" % uidvalidity
    assert lines[1] == b"* 3 EXPUNGE\r\n"
    assert lines[-1].startswith(b"c OK")
    lines = cmd(s, f, b"d", b"MOVE 1 Trash")
    assert lines[1] == b"* 1 EXPUNGE\r\n"
    assert cmd(s, f, b"e", b"COPY 1 Missing")[-1].startswith(b"e NO [TRYCREATE]")
    assert cmd(s, f, b"g", b"UID COPY 999 Trash")[-1].startswith(b"g OK")
    text = b"".join(cmd(s, f, b"h", b"STATUS Trash (MESSAGES)"))
    assert b"MESSAGES 4" in text
    text = b"".join(cmd(s, f, b"i", b"STATUS INBOX (MESSAGES)"))
    assert b"MESSAGES 2" in text
    s.close()


# -- APPEND -----------------------------------------------------------------------------------


def test_append_uidplus_flags_date_and_limits(reactor_thread, tmp_path):
    env = start_imap(reactor_thread, tmp_path, imap={"max_literal_size": 10000})
    try:
        c = client(env)
        msg = message(7)
        r = c.append("Drafts", msg, flags=[b"\\Draft", b"$Work"],
                     msg_time=__import__("datetime").datetime(2020, 5, 17, 12, 30, 0,
                                                              tzinfo=__import__("datetime").timezone.utc))
        m = re.search(rb"\[APPENDUID (\d+) (\d+)\]", r)
        assert m, r
        c.select_folder("Drafts")
        got = c.fetch([int(m.group(2))], ["FLAGS", "INTERNALDATE", "BODY.PEEK[]"])[int(m.group(2))]
        assert set(got[b"FLAGS"]) >= {b"\\Draft", b"$Work"}
        assert got[b"INTERNALDATE"].timestamp() == 1589718600
        assert got[b"BODY[]"] == msg.replace(b"\n", b"\r\n")
        with pytest.raises(IMAPClient.Error, match="TRYCREATE"):
            c.append("NoSuchFolder", msg)
        c.logout()
        s, f = login_raw(env)
        # LITERAL+: no continuation, stored as received
        body = b"Subject: plus\r\n\r\nhi\r\n"
        s.sendall(b"a APPEND INBOX (\\Seen) {%d+}\r\n%s\r\n" % (len(body), body))
        lines = read_until_tag(f, b"a")
        assert lines[-1].startswith(b"a OK [APPENDUID")
        assert cmd(s, f, b"b", b"APPEND INBOX {20000}")[-1].startswith(b"b NO [TOOBIG]")
        assert cmd(s, f, b"c", b'APPEND INBOX "bad date" {3+}\r\nabc')[-1].startswith(b"c BAD")
        # impossible dates were rolled over (31-Feb -> 2-Mar) or clipped by the file system
        for i, date in enumerate([b"31-Feb-2020 00:00:00 +0000", b" 1-Jan-2020 25:61:61 +0000",
                                  b" 1-Jan-2020 00:00:00 +9999", b"01-Jan-9999 00:00:00 +0000",
                                  b"01-Jan-1900 00:00:00 +0000"]):
            tag = b"d%d" % i
            assert cmd(s, f, tag, b'APPEND INBOX "%s" {3+}\r\nabc' % date)[-1].startswith(tag + b" BAD"), date
        # RFC 3501 §9: the message is a literal, not an atom or a quoted string
        assert cmd(s, f, b"e", b"APPEND INBOX x")[-1].startswith(b"e BAD")
        assert cmd(s, f, b"g", b'APPEND INBOX "Subject: x"')[-1].startswith(b"g BAD")
        lines = cmd(s, f, b"h", b"STATUS INBOX (MESSAGES)")
        assert lines[0] == b"* STATUS INBOX (MESSAGES 1)\r\n"  # only the LITERAL+ one above
        s.close()
    finally:
        stop_imap(reactor_thread, env)


# -- EXPUNGE / CLOSE / UNSELECT ---------------------------------------------------------------


def test_expunge_uid_expunge_close_unselect(env):
    for n in range(1, 7):
        deliver(env, message(n), tmp_name=f"m{n}")
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    cmd(s, f, b"b", b"STORE 1:6 +FLAGS.SILENT (\\Deleted)")
    lines = cmd(s, f, b"c", b"UID EXPUNGE 2,4")
    assert lines[:-1] == [b"* 4 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    cmd(s, f, b"d", b"STORE 1 -FLAGS.SILENT (\\Deleted)")
    lines = cmd(s, f, b"e", b"EXPUNGE")
    assert lines[:-1] == [b"* 4 EXPUNGE\r\n", b"* 3 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    assert b"* 1 EXISTS" in b"".join(cmd(s, f, b"g", b"SELECT INBOX"))
    cmd(s, f, b"h", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert cmd(s, f, b"i", b"UNSELECT") == [b"i OK UNSELECT completed\r\n"]
    assert b"* 1 EXISTS" in b"".join(cmd(s, f, b"j", b"SELECT INBOX"))
    lines = cmd(s, f, b"k", b"CLOSE")
    assert lines == [b"k OK CLOSE completed\r\n"]  # silent expunge
    assert b"* 0 EXISTS" in b"".join(cmd(s, f, b"l", b"EXAMINE INBOX"))
    assert cmd(s, f, b"m", b"EXPUNGE")[-1].startswith(b"m NO [READ-ONLY]")
    s.close()


# -- folders ----------------------------------------------------------------------------------


def test_list_special_use_children_and_patterns(env):
    c = client(env)
    c.create_folder("Work/Projects")
    c.create_folder("Reisen & Pläne")
    folders = {name: flags for flags, delim, name in c.list_folders()}
    assert delim_ok(c)
    assert set(folders) >= {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive", "Work",
                            "Work/Projects", "Reisen & Pläne"}
    assert b"\\Sent" in folders["Sent"] and b"\\Trash" in folders["Trash"]
    assert b"\\Junk" in folders["Junk"] and b"\\Drafts" in folders["Drafts"]
    assert b"\\HasChildren" in folders["Work"]
    assert b"\\HasNoChildren" in folders["Work/Projects"]
    top = {name for _f, _d, name in c.list_folders("", "%")}
    assert "Work" in top and "Work/Projects" not in top
    assert {name for _f, _d, name in c.list_folders("Work/", "%")} == {"Work/Projects"}
    assert {name for _f, _d, name in c.list_folders("", "inbox")} == {"INBOX"}
    c.logout()
    s, f = login_raw(env)
    assert cmd(s, f, b"a", b'LIST "" ""')[0] == b'* LIST (\\Noselect) "/" ""\r\n'
    lines = cmd(s, f, b"b", b'LIST "" "Reisen*"')
    assert lines[0] == b'* LIST (\\HasNoChildren) "/" "Reisen &- Pl&AOQ-ne"\r\n'
    lines = cmd(s, f, b"c", b'LIST (SPECIAL-USE) "" "*" RETURN (SPECIAL-USE)')
    assert lines[-1].startswith(b"c OK")
    s.close()


def delim_ok(c) -> bool:
    return all(d == b"/" for _f, d, _n in c.list_folders())


def test_create_delete_rename_and_bad_names(env):
    s, f = login_raw(env)
    assert cmd(s, f, b"a", b"CREATE Projects/2026/")[-1].startswith(b"a OK")
    assert cmd(s, f, b"b", b"CREATE Projects")[-1].startswith(b"b NO [ALREADYEXISTS]")
    assert cmd(s, f, b"c", b"CREATE INBOX")[-1].startswith(b"c NO")
    for i, bad in enumerate([b'"a..b"', b'"with.dot"', b'"a//b"', b'"&Jjo"', b'"star*"']):
        line = cmd(s, f, b"bad%d" % i, b"CREATE " + bad)[-1]
        assert line.startswith(b"bad%d NO" % i), (bad, line)
        assert len(line) > 15  # a reason is given
    assert cmd(s, f, b"d", b"RENAME Projects Archive2")[-1].startswith(b"d OK")
    names = b"".join(cmd(s, f, b"e", b'LIST "" "*"'))
    assert b"Archive2/2026" in names and b"Projects" not in names
    assert cmd(s, f, b"g", b"RENAME Nope Other")[-1].startswith(b"g NO [NONEXISTENT]")
    assert cmd(s, f, b"h", b"RENAME Archive2 Sent")[-1].startswith(b"h NO [ALREADYEXISTS]")
    assert cmd(s, f, b"i", b"DELETE INBOX")[-1].startswith(b"i NO")
    assert cmd(s, f, b"j", b"DELETE Archive2/2026")[-1].startswith(b"j OK")
    assert cmd(s, f, b"k", b"DELETE Archive2/2026")[-1].startswith(b"k NO [NONEXISTENT]")
    s.close()


def test_rename_inbox_moves_messages(env):
    """RFC 3501 §6.3.5: RENAME INBOX moves its messages into the new folder; INBOX stays (empty,
    same UIDVALIDITY, UIDNEXT not reused) and its children such as INBOX/sub are not renamed."""
    for n in range(1, 3):
        deliver(env, message(n), tmp_name=f"m{n}")
    s, f = login_raw(env)
    assert cmd(s, f, b"a0", b"CREATE INBOX/sub")[-1].startswith(b"a0 OK")
    before = b"".join(cmd(s, f, b"a1", b"STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY)"))
    uidvalidity = re.search(rb"UIDVALIDITY (\d+)", before).group(1)
    assert b"MESSAGES 2" in before and b"UIDNEXT 3" in before
    assert cmd(s, f, b"a", b"RENAME INBOX Old-Inbox")[-1].startswith(b"a OK")
    assert b"MESSAGES 2" in b"".join(cmd(s, f, b"b", b'STATUS "Old-Inbox" (MESSAGES)'))
    after = b"".join(cmd(s, f, b"c", b"STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY)"))
    assert b"MESSAGES 0" in after
    assert b"UIDVALIDITY " + uidvalidity in after  # INBOX itself was not replaced
    assert b"UIDNEXT 3" in after  # UIDs 1 and 2 are never handed out again in INBOX
    listing = b"".join(cmd(s, f, b"d", b'LIST "" "*"'))
    assert b'"/" INBOX/sub\r\n' in listing and b"Old-Inbox/sub" not in listing
    assert re.search(rb'\* LIST \([^)]*\) "/" INBOX\r\n', listing)
    # a new message in INBOX gets UID 3
    deliver(env, message(3), tmp_name="m3")
    lines = cmd(s, f, b"e", b"SELECT INBOX")
    assert b"* 1 EXISTS\r\n" in lines
    assert cmd(s, f, b"g", b"FETCH 1 (UID)")[0] == b"* 1 FETCH (UID 3)\r\n"
    s.close()


def test_subscribe_lsub_status(env):
    deliver(env, message(1))
    c = client(env)
    c.create_folder("News")
    c.subscribe_folder("News")
    c.subscribe_folder("Ghost")  # allowed for a missing name
    subs = {name for _f, _d, name in c.list_sub_folders()}
    assert {"News", "Ghost", "Sent"} <= subs
    c.unsubscribe_folder("News")
    assert "News" not in {name for _f, _d, name in c.list_sub_folders()}
    st = c.folder_status("INBOX", ["MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN"])
    assert st[b"MESSAGES"] == 1 and st[b"UNSEEN"] == 1 and st[b"UIDNEXT"] == 2
    assert st[b"UIDVALIDITY"] > 0
    with pytest.raises(IMAPClient.Error):
        c.folder_status("Nope", ["MESSAGES"])
    c.logout()


def test_lsub_percent_returns_an_unsubscribed_parent_as_noselect(env):
    """RFC 3501 §6.3.9: with "r2/a/b" subscribed and "r2/a" not, LSUB "" "r2/%" returns r2/a
    flagged \\Noselect (a MUST); "*" returns only the subscribed name."""
    s, f = login_raw(env)
    cmd(s, f, b"a", b"CREATE r2/a/b")
    cmd(s, f, b"b", b"SUBSCRIBE r2/a/b")
    assert cmd(s, f, b"c", b'LSUB "" r2/%') == [b'* LSUB (\\Noselect) "/" r2/a\r\n', b"c OK LSUB completed\r\n"]
    assert cmd(s, f, b"d", b'LSUB "" r2/*') == [b'* LSUB () "/" r2/a/b\r\n', b"d OK LSUB completed\r\n"]
    assert cmd(s, f, b"e", b'LSUB "" %/%/%') == [b'* LSUB () "/" r2/a/b\r\n', b"e OK LSUB completed\r\n"]
    cmd(s, f, b"g", b"SUBSCRIBE r2")  # a subscribed parent is listed once, as itself
    r2 = [ln for ln in cmd(s, f, b"h", b'LSUB "" %') if ln.endswith(b" r2\r\n")]
    assert r2 == [b'* LSUB () "/" r2\r\n']
    s.close()


def test_pipelined_commands_are_answered_in_order(env):
    for n in range(1, 3):
        deliver(env, message(n), tmp_name=f"m{n}")
    s, f = login_raw(env)
    s.sendall(b"a SELECT INBOX\r\nb FETCH 1:* (UID)\r\nc STORE 1 +FLAGS (\\Seen)\r\nd NOOP\r\n")
    tags = []
    for _ in range(200):
        line = f.readline()
        if not line.startswith(b"*"):
            tags.append(line.split()[0])
            if line.startswith(b"d "):
                break
    assert tags == [b"a", b"b", b"c", b"d"]
    s.close()


def test_imaplib_full_session(env):
    deliver(env, message(1))
    m = imaplib.IMAP4("127.0.0.1", env.port, timeout=20)
    m.login("alice@example.com", PASSWORD)
    typ, data = m.select("INBOX")
    assert typ == "OK" and data == [b"1"]
    typ, data = m.fetch("1", "(RFC822.HEADER)")
    assert typ == "OK" and b"Subject: message 1" in data[0][1]
    assert m.store("1", "+FLAGS", "\\Flagged")[0] == "OK"
    assert m.search(None, "FLAGGED") == ("OK", [b"1"])
    assert m.check()[0] == "OK"
    assert m.close()[0] == "OK"
    assert m.logout()[0] == "BYE"


def test_internal_error_costs_one_command_not_the_connection(env, monkeypatch):
    deliver(env, message(1))
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr("tmmail.imap.messages.fetch_data", boom)
    assert cmd(s, f, b"b", b"FETCH 1 BODY.PEEK[]")[-1].startswith(b"b NO [SERVERBUG]")
    monkeypatch.setattr("tmmail.store.Store.list_folders", boom)
    assert cmd(s, f, b"c", b'LIST "" "*"')[-1].startswith(b"c NO [SERVERBUG]")
    monkeypatch.setattr("tmmail.store.Store.create_folder", boom)  # runs in a thread
    assert cmd(s, f, b"d", b"CREATE Foo")[-1].startswith(b"d NO [SERVERBUG]")
    assert cmd(s, f, b"e", b"FETCH 1 (UID)")[0] == b"* 1 FETCH (UID 1)\r\n"
    s.close()


def test_content_fetch_of_large_messages_is_made_off_the_reactor(env, monkeypatch):
    """A FETCH that reads and parses megabytes (a header folded over tens of thousands of
    lines, sent by anyone over port 25) must not stall the other sessions: while it is being
    made, another client's NOOP is answered; the FETCH then completes byte-exact."""
    import threading

    from tmmail.imap import messages

    folded = b"Subject: " + b"\n ".join([b"=?utf-8?b?w6k=?= word"] * 60000) + b"\n"
    big = folded + b"From: a@example.org\n\nbody\n"
    deliver(env, big)
    release = threading.Event()
    started = threading.Event()
    real = messages.fetch_data

    def slow(items, msg):
        started.set()
        assert release.wait(20), "never released"
        return real(items, msg)

    monkeypatch.setattr(messages, "fetch_data", slow)
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    s.sendall(b"b FETCH 1 (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])\r\n")
    assert started.wait(10)
    other, of = login_raw(env)  # the reactor is free: a new session logs in and is served
    assert cmd(other, of, b"n", b"NOOP") == [b"n OK NOOP completed\r\n"]
    release.set()
    head = f.readline()
    assert head.startswith(b"* 1 FETCH (BODY[HEADER.FIELDS (FROM SUBJECT)] {")
    n = int(head.rsplit(b"{", 1)[1].rstrip(b"}\r\n"))
    body = f.read(n)
    want = big.replace(b"\n", b"\r\n")
    want = want[: want.index(b"\r\n\r\n") + 4]
    assert body == want  # Subject (all its folds) and From, in message order, then CRLF
    assert f.readline() == b")\r\n"
    assert f.readline() == b"b OK FETCH completed\r\n"
    s.close()
    other.close()


def test_a_client_that_pipelines_without_reading_is_throttled_not_buffered(env):
    """A client that sends FETCH after FETCH and reads nothing: once the answers fill the
    connection the server stops answering and then stops reading (its send blocks), instead
    of holding every answer in memory; when the client reads, every answer comes, in order."""
    import socket

    deliver(env, b"Subject: big\n\n" + (b"y" * 78 + b"\n") * 3000)  # 240 KB
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    pad = b" ".join(b"X-PAD-%d" % i for i in range(400))  # ~4 KB per command
    s.settimeout(3)
    sent = 0
    blocked = False
    try:
        for sent in range(4000):  # 16 MB of commands, 1 GB of answers if all were made
            s.sendall(b"f%d FETCH 1 (BODY.PEEK[] BODY.PEEK[HEADER.FIELDS (%s)])\r\n" % (sent, pad))
    except socket.timeout:
        blocked = True
    assert blocked, "the server kept reading commands whose answers nobody read"
    s.settimeout(30)
    s.setblocking(True)
    s.settimeout(30)
    tags = []
    for _ in range(sent * 10):
        line = f.readline()
        if line.startswith(b"* 1 FETCH"):
            n = int(line.rsplit(b"{", 1)[1].rstrip(b"}\r\n"))
            assert len(f.read(n)) == n
            rest = f.readline()
            m = re.search(rb"\{(\d+)\}\r\n$", rest)
            if m:
                f.read(int(m.group(1)))
                f.readline()
            continue
        tags.append(line.split()[0])
        if len(tags) == sent:
            break
    assert tags == [b"f%d" % i for i in range(sent)]
    s.close()


def test_big_fetch_over_tls_with_a_slow_reader(env):
    """Content FETCH is streamed with flow control: every byte arrives, in order, over TLS."""
    from tests.imap_fixtures import client_tls

    big = [message(n, body=(f"line {n} " * 40 + "\n") * 1000) for n in range(1, 21)]
    for n, data in enumerate(big, 1):
        deliver(env, data, tmp_name=f"big{n}")
    s, f = raw_session(env)
    s.sendall(b"t STARTTLS\r\n")
    assert f.readline().startswith(b"t OK")
    tls = client_tls().wrap_socket(s, server_hostname="localhost")
    tf = tls.makefile("rb")
    tls.sendall(b'L LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
    read_until_tag(tf, b"L")
    tls.sendall(b"a EXAMINE INBOX\r\nb FETCH 1:* (UID BODY.PEEK[])\r\n")
    read_until_tag(tf, b"a")
    time.sleep(0.5)  # let the server fill the socket buffers and pause
    got = []
    for n in range(1, 21):
        line = tf.readline()
        m = re.match(rb"\* (\d+) FETCH \(UID (\d+) BODY\[\] \{(\d+)\}\r\n", line)
        assert m, line
        got.append(tf.read(int(m.group(3))))
        assert tf.readline() == b")\r\n"
    assert tf.readline().startswith(b"b OK")
    assert got == [d.replace(b"\n", b"\r\n") for d in big]
    tls.close()


def test_commands_real_clients_send(env):
    """Command shapes seen from Thunderbird, K-9/FairEmail, iOS Mail and Outlook."""
    deliver(env, message(1))
    s, f = login_raw(env)
    shapes = [
        b'ID ("name" "Thunderbird" "version" "128.0")',
        b'LIST (SUBSCRIBED) "" "*"',
        b'LIST "" "%" RETURN (CHILDREN SPECIAL-USE)',
        b'LIST "" ("INBOX" "Sent")',
        b'LSUB "" "*"',
        b'STATUS "INBOX" (UIDNEXT MESSAGES UNSEEN RECENT UIDVALIDITY)',
        b"SELECT INBOX",
        b"UID SEARCH 1:* NOT DELETED",
        b"UID FETCH 1:* (UID INTERNALDATE RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (date subject "
        b"from content-type to cc reply-to message-id references in-reply-to)])",
        b"UID FETCH 1 (UID RFC822.SIZE BODY.PEEK[])",
        b"FETCH 1:* (FLAGS UID)",
        b"UID FETCH 1 (BODYSTRUCTURE)",
        b"UID FETCH 1 (BODY.PEEK[1.MIME] BODY.PEEK[1])",
        b"UID STORE 1 +FLAGS.SILENT (\\Seen $MDNSent)",
        b"UID SEARCH UID 1:4294967295 SINCE 1-Jan-2020",
        b"UID SEARCH CHARSET UTF-8 OR SUBJECT message FROM sender",
        b"NOOP",
        b"CHECK",
    ]
    for i, shape in enumerate(shapes):
        tag = b"t%d" % i
        last = cmd(s, f, tag, shape)[-1]
        assert last.startswith(tag + b" OK"), (shape, last)
    s.close()


def test_large_append_sync_and_literal_plus(env):
    big = message(1, body="x" * 100 + "\n") + b"y" * (3 * 1024 * 1024) + b"\n"
    c = client(env)
    r = c.append("INBOX", big)
    assert b"APPENDUID" in r
    c.logout()
    s, f = login_raw(env)
    crlf = big.replace(b"\n", b"\r\n")
    s.sendall(b"a APPEND INBOX {%d+}\r\n" % len(crlf) + crlf + b"\r\nb NOOP\r\n")
    assert read_until_tag(f, b"a")[-1].startswith(b"a OK [APPENDUID")
    assert read_until_tag(f, b"b")[-1].startswith(b"b OK")
    cmd(s, f, b"c", b"EXAMINE INBOX")
    lines = cmd(s, f, b"d", b"FETCH 1:2 (RFC822.SIZE)")
    assert lines[0] == lines[1].replace(b"* 2", b"* 1") == b"* 1 FETCH (RFC822.SIZE %d)\r\n" % len(crlf)
    s.close()


def test_imapclient_idle_move_copy_unselect_uid_expunge(env):
    for n in range(1, 4):
        deliver(env, message(n), tmp_name=f"m{n}")
    c = client(env)
    assert c.has_capability("MOVE") and c.has_capability("UIDPLUS") and c.has_capability("IDLE")
    c.select_folder("INBOX")
    c.copy([1], "Archive")
    c.move([2], "Trash")
    assert c.search(["ALL"]) == [1, 3]
    c.add_flags([1, 3], [b"\\Deleted"])
    c.uid_expunge([3])
    assert c.search(["ALL"]) == [1]
    c.unselect_folder()
    assert c.folder_status("INBOX", ["MESSAGES"])[b"MESSAGES"] == 1  # UNSELECT did not expunge 1
    c.select_folder("INBOX")
    c.idle()
    deliver(env, message(4), tmp_name="m4")
    responses = c.idle_check(timeout=5)
    c.idle_done()
    assert (2, b"EXISTS") in responses
    assert c.folder_status("Archive", ["MESSAGES"])[b"MESSAGES"] == 1
    assert c.folder_status("Trash", ["MESSAGES"])[b"MESSAGES"] == 1
    c.logout()


def test_lower_case_commands_and_items(env):
    deliver(env, message(1))
    s, f = login_raw(env)
    assert cmd(s, f, b"a", b"select inbox")[-1].startswith(b"a OK")
    lines = cmd(s, f, b"b", b"uid fetch 1:* (flags body.peek[header.fields (subject)])")
    assert lines[-1].startswith(b"b OK") and b"BODY[HEADER.FIELDS (SUBJECT)]" in lines[0].upper()
    assert b"Subject: message 1" in lines[1]
    line = cmd(s, f, b"c", b"uid store 1 +flags (\\seen)")[0]
    assert line.startswith(b"* 1 FETCH (UID 1 FLAGS (") and b"\\Seen" in line
    assert cmd(s, f, b"d", b"search unseen")[0] == b"* SEARCH\r\n"
    s.close()


def test_random_commands_never_break_the_session(env):
    """Seeded random command soup in the selected state: every command gets a tagged answer,
    none is a server bug, and the session still works afterwards."""
    import random

    for n in range(1, 4):
        deliver(env, message(n), tmp_name=f"m{n}")
    words = [b"FETCH", b"UID", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"LIST", b"STATUS", b"EXPUNGE",
             b"SELECT", b"EXAMINE", b"CREATE", b"RENAME", b"NOOP", b"CHECK", b"LSUB", b"ENABLE", b"ID"]
    args = [b"1", b"*", b"1:*", b"2:1", b"0", b"4294967296", b"-1", b"1,,2", b"(", b")", b"()", b'"x"',
            b'""', b"INBOX", b"Trash", b"NIL", b"FLAGS", b"+FLAGS.SILENT", b"(\\Seen)", b"\\Bogus",
            b"BODY[]", b"BODY.PEEK[1.2.3]<5.2>", b"BODY[HEADER.FIELDS ()]", b"(UID FLAGS", b"ALL",
            b"OR", b"NOT", b"SUBJECT", b"CHARSET", b"UTF-8", b"BEFORE", b"1-Jan-2020", b"LARGER",
            b"&-", b"&AOQ", b"a/b", b"%", b"(MESSAGES UNSEEN)", b"RFC822.SIZE", b"ENVELOPE",
            b"BODYSTRUCTURE", b"BINARY[1]", b"[", b"]", b"\\", b'"\\"', b"\xff\xfe"]
    rnd = random.Random(int(os.environ.get("IMAP_FUZZ_SEED", "3501")))
    s, f = login_raw(env)
    cmd(s, f, b"sel", b"SELECT INBOX")
    for i in range(400):
        line = b" ".join([rnd.choice(words)] + [rnd.choice(args) for _ in range(rnd.randint(0, 5))])
        tag = b"r%d" % i
        last = cmd(s, f, tag, line)[-1]
        assert last.split(b" ")[1] in (b"OK", b"NO", b"BAD"), (line, last)
        assert b"SERVERBUG" not in last, (line, last)
        if b"SELECT" not in line and b"EXAMINE" not in line:
            continue
        cmd(s, f, b"re%d" % i, b"SELECT INBOX")  # keep a mailbox selected
    assert cmd(s, f, b"end", b"NOOP")[-1].startswith(b"end OK")
    s.close()


def fill(env, count: int) -> None:
    """Write ``count`` messages straight into new/ (as a fast MDA would), UIDs in order."""
    md = env.maildir()
    for i in range(1, count + 1):
        data = message(i)
        base = f"{1700000000 + i}.M{i:06d}P1Q{i}.fill"
        vsize = len(data) + data.count(b"\n")
        name = f"{base},S={len(data)},W={vsize}"
        with open(os.path.join(md, "tmp", base), "wb") as f:
            f.write(data)
        os.rename(os.path.join(md, "tmp", base), os.path.join(md, "new", name))


def test_bulk_flag_changes_and_implicit_seen_run_off_the_reactor(env):
    fill(env, 300)
    s, f = login_raw(env)
    assert b"* 300 EXISTS" in b"".join(cmd(s, f, b"a", b"SELECT INBOX"))
    lines = cmd(s, f, b"b", b"STORE 1:* +FLAGS (\\Flagged)")
    assert len(lines) == 301 and all(b"\\Flagged" in ln for ln in lines[:-1])
    assert cmd(s, f, b"c", b"SEARCH FLAGGED")[0] == b"* SEARCH " + b" ".join(b"%d" % i for i in range(1, 301)) + b"\r\n"
    lines = cmd(s, f, b"d", b"FETCH 1:250 (BODY[HEADER.FIELDS (SUBJECT)])")
    assert lines[-1].startswith(b"d OK")
    assert sum(1 for ln in lines if b"FLAGS (" in ln and b"\\Seen" in ln) == 250
    assert cmd(s, f, b"e", b"SEARCH UNSEEN")[0] == b"* SEARCH " + b" ".join(b"%d" % i for i in range(251, 301)) + b"\r\n"
    lines = cmd(s, f, b"g", b"UID STORE 1:* -FLAGS.SILENT (\\Flagged \\Seen)")
    assert lines == [b"g OK UID STORE completed\r\n"]
    assert cmd(s, f, b"h", b"SEARCH OR SEEN FLAGGED")[0] == b"* SEARCH\r\n"
    s.close()


def test_quota_refuses_append_and_copy_with_overquota(reactor_thread, tmp_path):
    env = start_imap(reactor_thread, tmp_path, quotas={"alice@example.com": 6000})
    try:
        c = client(env)
        c.append("INBOX", message(1, body="a" * 2000 + "\n"))
        c.append("INBOX", message(2, body="b" * 2000 + "\n"))
        with pytest.raises(IMAPClient.Error, match="OVERQUOTA"):
            c.append("INBOX", message(3, body="c" * 3000 + "\n"))
        c.select_folder("INBOX")
        with pytest.raises(IMAPClient.Error, match="OVERQUOTA"):
            c.copy([1, 2], "Archive")
        c.move([1], "Archive")  # moving does not add data
        assert c.folder_status("Archive", ["MESSAGES"])[b"MESSAGES"] == 1
        c.logout()
    finally:
        stop_imap(reactor_thread, env)


def test_absurdly_nested_search_is_bad_not_a_crash(env):
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    assert cmd(s, f, b"b", b"SEARCH " + b"(" * 5000 + b"ALL" + b")" * 5000)[-1].startswith(b"b BAD")
    assert cmd(s, f, b"c", b"SEARCH " + b"NOT " * 5000 + b"ALL")[-1].startswith(b"c BAD")
    assert cmd(s, f, b"d", b"NOOP")[-1].startswith(b"d OK")
    s.close()

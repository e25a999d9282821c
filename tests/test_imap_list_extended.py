"""LIST-EXTENDED (RFC 5258), the SPECIAL-USE selection option (RFC 6154) and LIST-STATUS
(RFC 5819): the parser and the selection as pure logic, then the real server over real sockets
with imaplib/imapclient and raw lines."""

from __future__ import annotations

import imaplib

import pytest
from imapclient import IMAPClient

from tests.imap_fixtures import PASSWORD, cmd, login_raw, raw_session, read_until_tag, start_imap, stop_imap
from tmmail.imap import listing
from tmmail.imap.encoding import ParseError, tokenize
from tmmail.store import FolderInfo


def parse(line: bytes) -> listing.ListRequest:
    return listing.parse_list(tokenize(line), lambda tok, what: bytes(tok))


FOLDERS = [
    FolderInfo("INBOX", ("\\HasNoChildren",), False),
    FolderInfo("Sent", ("\\HasNoChildren", "\\Sent"), True),
    FolderInfo("Trash", ("\\HasNoChildren", "\\Trash"), True),
    FolderInfo("Work", ("\\HasChildren",), False),
    FolderInfo("Work/2026", ("\\HasChildren",), False),
    FolderInfo("Work/2026/Q4", ("\\HasNoChildren",), True),
    FolderInfo("Lists", ("\\Noselect", "\\HasChildren"), False),
    FolderInfo("Lists/Archive", ("\\HasNoChildren", "\\Archive"), False),
]
SUBS = ["Sent", "Trash", "Work/2026/Q4", "Gone", "Old/Sub"]


def listed(line: bytes) -> list[tuple[str, list[str], list[str]]]:
    return [(e.name, e.attributes, e.childinfo) for e in listing.select(parse(line), FOLDERS, SUBS)]


# -- pure logic ------------------------------------------------------------------------------------


def test_parse_options_patterns_and_return():
    r = parse(b'(SUBSCRIBED RECURSIVEMATCH) "" ("INBOX" "Work/%") RETURN (CHILDREN STATUS (MESSAGES unseen))')
    assert r.subscribed and r.recursive and r.return_subscribed and not r.special_use
    assert r.patterns == ["INBOX", "Work/%"]
    assert r.status_items == [b"MESSAGES", b"UNSEEN"]
    plain = parse(b'"" "*"')
    assert not (plain.subscribed or plain.recursive or plain.special_use or plain.return_subscribed)
    assert plain.status_items is None
    assert parse(b'() "" "%" RETURN ()').patterns == ["%"]


@pytest.mark.parametrize("line", [
    b'(RECURSIVEMATCH) "" "*"',  # nothing for it to modify (RFC 5258 §3)
    b'(REMOTE RECURSIVEMATCH) "" "*"',
    b'(BOGUS) "" "*"',
    b'"" "*" RETURN (BOGUS)',
    b'"" "*" RETURN',
    b'"" "*" RETURN CHILDREN',
    b'"" "*" RETURN (STATUS)',
    b'"" "*" RETURN (STATUS ())',
    b'"" "*" RETURN (STATUS (SIZE))',
    b'"" "*" RETURN (STATUS (MESSAGES) STATUS (UNSEEN))',
    b'"" ()',
    b'"" "*" EXTRA',
    b'((SUBSCRIBED)) "" "*"',
    b'""',
])
def test_parse_rejects_what_it_does_not_understand(line):
    with pytest.raises(ParseError):
        parse(line)


def test_special_use_selection_lists_only_special_use_mailboxes():
    assert [n for n, _a, _c in listed(b'(SPECIAL-USE) "" "*"')] == ["Lists/Archive", "Sent", "Trash"]


def test_subscribed_selection_includes_names_that_no_longer_exist():
    out = listed(b'(SUBSCRIBED) "" "*"')
    assert out == [
        ("Gone", ["\\NonExistent", "\\HasNoChildren", "\\Subscribed"], []),
        ("Old/Sub", ["\\NonExistent", "\\HasNoChildren", "\\Subscribed"], []),
        ("Sent", ["\\HasNoChildren", "\\Sent", "\\Subscribed"], []),
        ("Trash", ["\\HasNoChildren", "\\Trash", "\\Subscribed"], []),
        ("Work/2026/Q4", ["\\HasNoChildren", "\\Subscribed"], []),
    ]


def test_recursivematch_returns_matching_parents_with_childinfo():
    out = {n: (a, c) for n, a, c in listed(b'(SUBSCRIBED RECURSIVEMATCH) "" "%"')}
    assert out["Work"] == (["\\HasChildren"], ["SUBSCRIBED"])  # not subscribed itself
    assert out["Old"] == (["\\NonExistent", "\\HasNoChildren"], ["SUBSCRIBED"])
    assert "Work/2026/Q4" not in out and "Work/2026" not in out  # "%" stops at one level
    assert out["Sent"] == (["\\HasNoChildren", "\\Sent", "\\Subscribed"], [])
    assert "INBOX" not in out  # neither subscribed nor a parent of a subscribed name
    # a subscribed child the pattern lists itself needs no CHILDINFO on its parents
    deep = {n: c for n, _a, c in listed(b'(SUBSCRIBED RECURSIVEMATCH) "" "Work/*"')}
    assert deep == {"Work/2026/Q4": []}
    mid = {n: c for n, _a, c in listed(b'(SUBSCRIBED RECURSIVEMATCH) "" "Work/%"')}
    assert mid == {"Work/2026": ["SUBSCRIBED"]}


def test_return_subscribed_marks_without_filtering():
    out = {n: a for n, a, _c in listed(b'"" "*" RETURN (SUBSCRIBED)')}
    assert "\\Subscribed" in out["Work/2026/Q4"] and "\\Subscribed" not in out["Work/2026"]
    assert "INBOX" in out and "Gone" not in out  # a plain LIST lists what exists


def test_multiple_patterns_and_reference():
    assert [n for n, _a, _c in listed(b'"" ("INBOX" "Work/%")')] == ["INBOX", "Work/2026"]
    assert [n for n, _a, _c in listed(b'"Work/" "%"')] == ["Work/2026"]


# -- the real server -------------------------------------------------------------------------------


@pytest.fixture
def env(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path)
    yield e
    stop_imap(reactor_thread, e)




def test_capability_advertises_list_extended_and_list_status(env):
    c = IMAPClient("127.0.0.1", port=env.port, ssl=False, timeout=20)
    c.login("alice@example.com", PASSWORD)
    caps = c.capabilities()
    assert b"LIST-EXTENDED" in caps and b"LIST-STATUS" in caps and b"SPECIAL-USE" in caps
    c.logout()


def test_list_status_gives_each_folder_counts_after_its_list_line(env):
    c = IMAPClient("127.0.0.1", port=env.port, ssl=False, timeout=20)
    c.login("alice@example.com", PASSWORD)
    c.create_folder("Projects/Alpha")
    c.append("Projects/Alpha", b"Subject: one\r\n\r\nbody\r\n")
    c.append("Projects/Alpha", b"Subject: two\r\n\r\nbody\r\n", flags=[b"\\Seen"])
    c.append("INBOX", b"Subject: three\r\n\r\nbody\r\n")
    c.delete_folder("Projects")  # it has a child: it stays as a \Noselect name
    c.logout()
    s, f = login_raw(env)
    lines = cmd(s, f, b"a", b'LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN UIDNEXT))')
    assert lines[-1].startswith(b"a OK")
    body = lines[:-1]
    pairs = {}
    for i, line in enumerate(body):
        if line.startswith(b"* STATUS "):
            prev = body[i - 1]
            assert prev.startswith(b"* LIST ")  # each STATUS right after its LIST line
            assert prev.split(b'"/" ', 1)[1].strip() == line.split(b" ")[2]
            pairs[line.split(b" ")[2]] = line.split(b" (", 1)[1].strip()
    assert pairs[b"INBOX"] == b"MESSAGES 1 UNSEEN 1 UIDNEXT 2)"
    assert pairs[b"Projects/Alpha"] == b"MESSAGES 2 UNSEEN 1 UIDNEXT 3)"
    assert b"Projects" not in pairs  # a \Noselect parent gets no STATUS
    assert any(b'"/" Projects\r\n' in x and b"\\Noselect" in x for x in body)
    # unknown STATUS item: BAD, and the session goes on
    assert cmd(s, f, b"b", b'LIST "" "*" RETURN (STATUS (SIZE))')[-1].startswith(b"b BAD")
    assert cmd(s, f, b"c", b"NOOP")[-1].startswith(b"c OK")
    s.close()


def test_subscribed_selection_and_recursivematch_over_the_wire(env):
    s, f = login_raw(env)
    assert cmd(s, f, b"a", b"CREATE Clients/Acme")[-1].startswith(b"a OK")
    assert cmd(s, f, b"b", b"SUBSCRIBE Clients/Acme")[-1].startswith(b"b OK")
    assert cmd(s, f, b"c", b"SUBSCRIBE Vanished")[-1].startswith(b"c OK")
    lines = cmd(s, f, b"d", b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)')
    assert lines[-1].startswith(b"d OK")
    assert b'* LIST (\\HasChildren) "/" Clients ("CHILDINFO" ("SUBSCRIBED"))\r\n' in lines
    assert b'* LIST (\\NonExistent \\HasNoChildren \\Subscribed) "/" Vanished\r\n' in lines
    assert not any(b"Clients/Acme" in x for x in lines)
    assert not any(b'"/" INBOX' in x for x in lines)  # INBOX is not subscribed here
    lines = cmd(s, f, b"e", b'LIST (SUBSCRIBED) "" "*"')
    assert b'* LIST (\\HasNoChildren \\Subscribed) "/" Clients/Acme\r\n' in lines
    assert all(b"\\Subscribed" in x for x in lines[:-1])
    lines = cmd(s, f, b"f", b'LIST (SPECIAL-USE) "" "*" RETURN (SPECIAL-USE)')
    names = sorted(x.rsplit(b" ", 1)[1].strip() for x in lines[:-1])
    assert names == [b"Archive", b"Drafts", b"Junk", b"Sent", b"Trash"]
    for bad in (b'LIST (RECURSIVEMATCH) "" "*"', b'LIST (FOO) "" "*"', b'LIST "" "*" RETURN (FOO)',
                b'LIST "" "*" RETURN'):
        assert cmd(s, f, b"g", bad)[-1].startswith(b"g BAD")
    assert cmd(s, f, b"h", b"NOOP")[-1].startswith(b"h OK")
    s.close()


def test_imaplib_list_with_return_options_from_a_client(env):
    """What a client library sends verbatim: imaplib passes the extended arguments through."""
    m = imaplib.IMAP4("127.0.0.1", env.port, timeout=20)
    m.login("alice@example.com", PASSWORD)
    typ, data = m._simple_command("LIST", '""', '"%"', "RETURN", "(SPECIAL-USE STATUS (UNSEEN))")
    assert typ == "OK"
    assert [x for x in m.untagged_responses.get("STATUS", []) if x.startswith(b"INBOX ")] == [b"INBOX (UNSEEN 0)"]
    m.logout()

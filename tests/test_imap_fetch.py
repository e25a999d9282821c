"""FETCH data items: byte-exact against Dovecot 2.3 on a corpus, plus partial fetch and item parsing.

The corpus expectations (tests/mime_corpus/*.expected.json) were recorded from a throwaway
Dovecot by tests/mime_corpus/make_expected.py, so these tests do not need Dovecot.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone

import pytest

from tmmail.imap.encoding import ParseError, tokenize
from tmmail.imap.fetch import (
    FetchItem,
    body_structure,
    envelope,
    fetch_data,
    format_flags,
    format_internal_date,
    parse_fetch_items,
    section,
    with_flags,
)
from tmmail.imap.mime import Message

CORPUS = os.path.join(os.path.dirname(__file__), "mime_corpus")
NAMES = sorted(n for n in os.listdir(CORPUS) if n.endswith(".eml"))


class Stored:
    """A StoredMessage as the mailbox hands it over; counts load() calls."""

    def __init__(self, raw: bytes, uid: int = 7, flags: set[str] | None = None, size: int | None = None,
                 internal_date: datetime | float = 0.0) -> None:
        self.raw = raw
        self.seq = 1
        self.uid = uid
        self.flags = flags if flags is not None else set()
        self.size = size if size is not None else len(Message(raw).data)
        self.internal_date = internal_date
        self.loads = 0

    def load(self) -> bytes:
        self.loads += 1
        return self.raw


def items(text: str, uid: bool = False) -> list[FetchItem]:
    return parse_fetch_items(tokenize(text.encode())[0], uid_command=uid)


def fetch(raw: bytes, text: str) -> bytes:
    return fetch_data(items(text), Stored(raw))


def corpus_cases() -> list[tuple[str, str, str]]:
    cases = []
    for name in NAMES:
        with open(os.path.join(CORPUS, name[:-4] + ".expected.json")) as f:
            exp = json.load(f)
        for item, want in exp.items():
            cases.append((name, item, want))
    return cases


def test_corpus_is_big_enough():
    assert len(NAMES) >= 12
    for name in NAMES:
        assert os.path.exists(os.path.join(CORPUS, name[:-4] + ".expected.json")), name


@pytest.mark.parametrize("name,item,want", corpus_cases(), ids=lambda v: str(v)[:40])
def test_matches_dovecot(name, item, want):
    with open(os.path.join(CORPUS, name), "rb") as f:
        raw = f.read()
    assert fetch(raw, item).decode("latin-1") == want


SIMPLE = b"From: a@b.example\nSubject: hi\n\n0123456789\nabcdefghij\n"


def test_lf_crlf_and_mixed_inputs_give_identical_output():
    lf = SIMPLE
    crlf = SIMPLE.replace(b"\n", b"\r\n")
    mixed = b"From: a@b.example\r\nSubject: hi\n\r\n0123456789\nabcdefghij\r\n"
    spec = "(RFC822.SIZE BODYSTRUCTURE BODY.PEEK[] BODY.PEEK[TEXT]<3.4>)"
    outs = {fetch_data(items(spec), Stored(r, size=None)) for r in (lf, crlf, mixed)}
    assert len(outs) == 1
    out = outs.pop()
    assert b"RFC822.SIZE 58 " in out
    assert b"BODY[TEXT]<3> {4}\r\n3456" in out


def test_partial_fetch_slices_and_labels_origin_only():
    out = fetch(SIMPLE, "BODY.PEEK[]<0.10>")
    assert out == b"BODY[]<0> {10}\r\nFrom: a@b."
    out = fetch(SIMPLE, "BODY.PEEK[TEXT]<10.100>")
    assert out == b"BODY[TEXT]<10> {14}\r\n\r\nabcdefghij\r\n"


def test_partial_start_beyond_end_is_empty():
    assert fetch(SIMPLE, "BODY.PEEK[1]<500.10>") == b"BODY[1]<500> {0}\r\n"


def test_partial_zero_length_is_a_syntax_error():
    with pytest.raises(ParseError):
        items("BODY[]<0.0>")


def test_nonexistent_part_is_empty_string():
    assert fetch(SIMPLE, "BODY.PEEK[3.2]") == b"BODY[3.2] {0}\r\n"


def test_body_of_single_part_message_is_section_1():
    assert fetch(SIMPLE, "BODY.PEEK[1]") == b"BODY[1] {24}\r\n0123456789\r\nabcdefghij\r\n"


def test_header_fields_keeps_duplicates_in_order_and_folding():
    raw = (b"Received: one\n\tfolded\nSubject: s\nreceived: two\nX-Other: o\n\nbody\n")
    out = fetch(raw, 'BODY.PEEK[HEADER.FIELDS (RECEIVED)]')
    assert out == b"BODY[HEADER.FIELDS (RECEIVED)] {41}\r\nReceived: one\r\n\tfolded\r\nreceived: two\r\n\r\n"
    out = fetch(raw, "BODY.PEEK[HEADER.FIELDS.NOT (received subject)]")
    assert out == b"BODY[HEADER.FIELDS.NOT (RECEIVED SUBJECT)] {14}\r\nX-Other: o\r\n\r\n"


def test_header_fields_accepts_quoted_names():
    raw = b"Subject: s\nFrom: f@x\n\nb\n"
    assert fetch(raw, 'BODY.PEEK[HEADER.FIELDS ("From")]') == b"BODY[HEADER.FIELDS (FROM)] {13}\r\nFrom: f@x\r\n\r\n"


def test_rfc822_items_and_size():
    out = fetch(SIMPLE, "(RFC822.HEADER RFC822.TEXT)")
    assert out == (b"RFC822.HEADER {34}\r\nFrom: a@b.example\r\nSubject: hi\r\n\r\n"
                   b" RFC822.TEXT {24}\r\n0123456789\r\nabcdefghij\r\n")
    assert fetch(SIMPLE, "RFC822") == b"RFC822 {58}\r\n" + SIMPLE.replace(b"\n", b"\r\n")


def test_flag_and_date_items_never_load_the_message():
    msg = Stored(SIMPLE, uid=42, flags={"\\Seen", "$Label", "\\Answered"},
                 internal_date=datetime(1996, 7, 17, 2, 44, 25, tzinfo=timezone(timedelta(hours=-7))))
    out = fetch_data(items("(UID FLAGS INTERNALDATE RFC822.SIZE)"), msg)
    assert out == b'UID 42 FLAGS (\\Answered \\Seen $Label) INTERNALDATE "17-Jul-1996 02:44:25 -0700" RFC822.SIZE 58'
    assert msg.loads == 0


def test_content_items_load_once():
    msg = Stored(SIMPLE)
    fetch_data(items("(ENVELOPE BODYSTRUCTURE BODY[] BODY.PEEK[1] RFC822.HEADER)"), msg)
    assert msg.loads == 1


def test_macros_and_uid_command():
    assert [i.name for i in items("ALL")] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]
    assert [i.name for i in items("FAST")] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    assert [i.name for i in items("FULL")][-1] == "BODY"
    assert [i.name for i in items("FLAGS", uid=True)] == ["UID", "FLAGS"]
    assert [i.name for i in items("(uid flags)", uid=True)] == ["UID", "FLAGS"]


def test_seen_semantics():
    its = items("(BODY[TEXT] BODY.PEEK[1] RFC822.HEADER RFC822 RFC822.TEXT)")
    assert [i.sets_seen for i in its] == [True, False, False, True, True]
    assert [i.name for i in with_flags(its)][-1] == "FLAGS"
    assert with_flags(items("(FLAGS BODY[])")) == items("(FLAGS BODY[])")


@pytest.mark.parametrize("bad", [
    "(FLAGS", "BODY[", "BODY[1.0]", "BODY[0]", "BODY[MIME]", "BODY[HEADER.FIELDS]",
    "BODY[HEADER.FIELDS ()]", "BODY[TEXT.1]", "NOSUCH", "(FLAGS (UID))", "BODY[]<x.1>",
    "BINARY[1]", "BODY[1]<1.2", "BODY[1.]", "BODY[]<0." + "9" * 5000 + ">", "BODY[" + "9" * 5000 + "]",
])
def test_bad_fetch_syntax_raises_parse_error(bad):
    with pytest.raises(ParseError):
        parse_fetch_items(tokenize(bad.encode())[0] if tokenize(bad.encode()) else [])


def test_missing_fetch_items():
    with pytest.raises(ParseError):
        parse_fetch_items([])


def test_default_bodystructure_for_missing_content_type():
    m = Message(b"Subject: x\n\nhello\nworld\n")
    assert body_structure(m) == b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 2 NIL NIL NIL NIL)'
    assert body_structure(m, False) == b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 2)'


def test_bodystructure_parameter_with_semicolon_and_8bit_name():
    m = Message(b'Content-Type: application/pdf; name="a;b.pdf"\nContent-Disposition: attachment;'
                b' filename="\xc3\xa9t\xc3\xa9.pdf"\n\nx\n')
    bs = body_structure(m)
    assert b'("name" "a;b.pdf")' in bs
    assert b'("attachment" ("filename" {9}\r\n\xc3\xa9t\xc3\xa9.pdf))' in bs


def test_envelope_defaults_and_groups():
    m = Message(b"From: A <a@x.example>\nTo: g: b@y.example, c@z.example;\nSubject: s\n\nb\n")
    env = envelope(m)
    assert env == (b'(NIL "s" (("A" NIL "a" "x.example")) (("A" NIL "a" "x.example")) (("A" NIL "a" "x.example"))'
                   b' ((NIL NIL "g" NIL)(NIL NIL "b" "y.example")(NIL NIL "c" "z.example")(NIL NIL NIL NIL))'
                   b' NIL NIL NIL NIL)')


def test_envelope_of_empty_message_is_all_nil():
    assert envelope(Message(b"")) == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def test_section_helper_and_nested_message_parts():
    with open(os.path.join(CORPUS, "04-forwarded-rfc822.eml"), "rb") as f:
        m = Message(f.read())
    assert section(m, "2.1") == b"Plan:\r\n1. design\r\n2. build\r\n"
    assert section(m, "2.2") == b"<ol><li>design</li><li>build</li></ol>\r\n"
    assert section(m, "2.HEADER.FIELDS (subject)") == b"Subject: Project plan\r\n\r\n"
    assert section(m, "2.1.HEADER") == b""
    assert section(m, "2.MIME") == b"Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"


def test_internal_date_formats():
    local = datetime.fromtimestamp(0).astimezone()
    assert format_internal_date(0) == format_internal_date(local)
    dt = datetime(2024, 12, 5, 23, 1, 2, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert format_internal_date(dt) == b'"05-Dec-2024 23:01:02 +0530"'
    assert format_internal_date(datetime(2024, 1, 2, 3, 4, 5)) == b'"02-Jan-2024 03:04:05 +0000"'


def test_format_flags_empty_and_order():
    assert format_flags(set()) == b"()"
    assert format_flags({"$b", "\\Deleted", "$A", "\\Draft"}) == b"(\\Deleted \\Draft $A $b)"


def _imaplib_pieces(data: bytes) -> list:
    """Split a FETCH response the way imaplib hands it to clients: (line, literal) tuples."""
    import re

    out: list = []
    i = 0
    pat = re.compile(rb"\{(\d+)\}\r\n")
    while True:
        m = pat.search(data, i)
        if not m:
            out.append(data[i:])
            return out
        n = int(m.group(1))
        out.append((data[i : m.start()] + m.group(0)[:-2], data[m.end() : m.end() + n]))
        i = m.end() + n


@pytest.mark.parametrize("name", NAMES)
def test_imapclient_parses_every_corpus_response(name):
    from imapclient.response_parser import parse_fetch_response

    with open(os.path.join(CORPUS, name), "rb") as f:
        raw = f.read()
    msg = Stored(raw, uid=9, flags={"\\Seen", "$Work"})
    data = fetch_data(items("(UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY BODY.PEEK[1.MIME]"
                            " BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[]<0.5>)"), msg)
    parsed = parse_fetch_response(_imaplib_pieces(b"1 (" + data + b")"))[9]
    assert parsed[b"RFC822.SIZE"] == len(Message(raw).data)
    assert parsed[b"FLAGS"] == (b"\\Seen", b"$Work")
    assert parsed[b"BODY[]<0>"] == Message(raw).data[:5]
    env = parsed[b"ENVELOPE"]
    root = Message(raw).root
    assert (env.subject is None) == (root.header("Subject") is None)
    bs = parsed[b"BODYSTRUCTURE"]
    assert bs.is_multipart == root.is_multipart


with open(os.path.join(CORPUS, "addresses.expected.json"), encoding="utf-8") as _f:
    ADDRESSES = json.load(_f)


@pytest.mark.parametrize("header", sorted(ADDRESSES))
def test_envelope_addresses_like_dovecot(header):
    raw = b"To: " + header.encode("utf-8") + b"\n\nbody\n"
    assert b"ENVELOPE " + envelope(Message(raw)) == ADDRESSES[header].encode("latin-1")

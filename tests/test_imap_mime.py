"""MIME part tree robustness (fuzz), parameter/address parsing, and the wire-syntax helpers."""

from __future__ import annotations

import os
import random

import pytest

from tmmail.imap.encoding import (
    Atom,
    ParseError,
    String,
    astring,
    decode_header,
    imap_string,
    literal_announcement,
    rfc2231_value,
    string_for_humans,
    tokenize,
    utf7_decode,
    utf7_encode,
)
from tmmail.imap.fetch import body_structure, envelope, fetch_data, parse_fetch_items
from tmmail.imap.mime import Message, Part, parse_addresses, parse_params, to_crlf

CORPUS = os.path.join(os.path.dirname(__file__), "mime_corpus")


def corpus() -> list[bytes]:
    out = []
    for n in sorted(os.listdir(CORPUS)):
        if n.endswith(".eml"):
            with open(os.path.join(CORPUS, n), "rb") as f:
                out.append(f.read())
    return out


def walk(p: Part):
    yield p
    for c in p.children:
        yield from walk(c)
    if p.message is not None:
        yield from walk(p.message)


def check_invariants(m: Message) -> None:
    n = len(m.data)
    for p in walk(m.root):
        assert 0 <= p.start <= p.body_start <= p.end <= n
        for c in p.children:
            assert p.body_start <= c.start and c.end <= p.end
        if p.message is not None:
            assert p.body_start <= p.message.start and p.message.end <= p.end


ITEMS = parse_fetch_items(tokenize(
    b"(ENVELOPE BODYSTRUCTURE BODY BODY.PEEK[1] BODY.PEEK[2.1.MIME] BODY.PEEK[HEADER.FIELDS (FROM)]"
    b" BODY.PEEK[2.HEADER] BODY.PEEK[TEXT]<3.50> RFC822.SIZE)")[0])


class Stored:
    uid = 1
    seq = 1
    flags: set[str] = set()
    internal_date = 0.0
    size = 0

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def load(self) -> bytes:
        return self.raw


def full_fetch_is_parseable(raw: bytes) -> None:
    m = Message(raw)
    check_invariants(m)
    out = fetch_data(ITEMS, Stored(raw))
    toks = tokenize(b"(" + out + b")")   # balanced parentheses, valid strings and literals
    assert len(toks) == 1 and isinstance(toks[0], list)


def test_fuzz_random_bytes_never_raise():
    rng = random.Random(1234)
    alphabet = b"\r\n\n\n-- :;=\"\\()<>@,abcXYZ\t\x00\xff" + b"Content-Type multipart/mixed boundary"
    for _ in range(400):
        size = rng.randint(0, 400)
        if rng.random() < 0.5:
            raw = bytes(rng.getrandbits(8) for _ in range(size))
        else:
            raw = bytes(rng.choice(alphabet) for _ in range(size))
        full_fetch_is_parseable(raw)


def test_fuzz_mutated_corpus_never_raise():
    rng = random.Random(99)
    msgs = corpus()
    for _ in range(300):
        raw = bytearray(rng.choice(msgs))
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randint(0, len(raw))
            if op < 0.3:
                del raw[pos : pos + rng.randint(1, 30)]
            elif op < 0.6:
                raw[pos:pos] = rng.choice([b"\n--", b"\n\n", b"\"", b";", b"(", b"\r", b"\n--=-=-=--\n",
                                           b"Content-Type: message/rfc822\n", b"\xe9", b"{5}"])
            else:
                raw = raw[:pos]
        full_fetch_is_parseable(bytes(raw))


def test_deep_nesting_is_bounded():
    depth = 2000
    head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(depth))
    raw = head + b"\ninnermost\n"
    m = Message(raw)
    bs = body_structure(m)
    assert bs.count(b"(") == bs.count(b")")
    nested = b"Subject: x\nContent-Type: message/rfc822\n\n" * depth + b"body\n"
    assert envelope(Message(nested)).startswith(b"(NIL")
    body_structure(Message(nested))


def test_many_parts_are_capped():
    raw = b"Content-Type: multipart/mixed; boundary=x\n\n" + b"--x\n\nA\n" * 20000 + b"--x--\n"
    m = Message(raw)
    assert 1000 <= len(m.root.children) <= 5001


def test_boundary_bomb_without_blank_lines_is_linear():
    # 200,000 empty parts with no blank line: a parser that looks for the blank line from each
    # part to the end of the message would spend minutes here (the suite's timeout catches it)
    raw = b"Content-Type: multipart/mixed; boundary=b\n\n" + b"--b\nX: 1\n" * 200000
    m = Message(raw)
    assert len(m.root.children) == 5000
    assert m.data[m.root.children[-1].start:m.root.children[-1].end] == b"X: 1"
    assert body_structure(m).count(b'("text" "plain"') == 5000


def test_header_folded_over_200000_lines_is_linear_and_exact():
    # legal SMTP (every line short), ~2.6 MB of one Subject: joining each fold onto the value
    # so far was quadratic and froze the server for minutes on a 24 MB header
    folds = [b"w%d" % i for i in range(200000)]
    raw = b"Subject: " + b"\r\n ".join(folds) + b"\r\nFrom: a@b.example\r\n\r\nbody\r\n"
    m = Message(raw)
    (name, value), = [h for h in m.head.headers if h[0].lower() == "subject"]
    assert value == b" " + b"\r\n ".join(folds)
    out = fetch_data(parse_fetch_items(tokenize(b"(BODY.PEEK[HEADER.FIELDS (SUBJECT)] ENVELOPE)")[0]),
                     _Msg(raw))
    header = raw[: raw.index(b"\r\nFrom:") + 2]
    assert out.startswith(b"BODY[HEADER.FIELDS (SUBJECT)] {%d}\r\n" % (len(header) + 2) + header + b"\r\n")
    assert b"w0 w1 w2" in out and b"w199999" in out


class _Msg:
    seq = uid = 1
    flags: set = set()
    internal_date = 0.0
    recent = False

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.size = len(raw)

    def load(self) -> bytes:
        return self.raw


def test_crlf_normalisation():
    assert to_crlf(b"a\nb\n") == b"a\r\nb\r\n"
    assert to_crlf(b"a\r\nb\n") == b"a\r\nb\r\n"
    assert to_crlf(b"a\r\n\r\n") == b"a\r\n\r\n"
    assert to_crlf(b"bare\rcr\n") == b"bare\rcr\r\n"
    for raw in corpus():
        lf = raw.replace(b"\r\n", b"\n")
        assert Message(lf).data == Message(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")).data
        assert body_structure(Message(lf)) == body_structure(Message(to_crlf(lf)))


def test_offsets_of_a_multipart():
    raw = b"Content-Type: multipart/mixed; boundary=q\n\npre\n--q\nX: 1\n\nA\n--q\n\nB\n--q--\nepi\n"
    m = Message(raw)
    a, b = m.root.children
    assert m.data[a.start : a.body_start] == b"X: 1\r\n\r\n"
    assert m.data[a.body_start : a.end] == b"A"
    assert m.data[b.body_start : b.end] == b"B"
    assert a.header("x") == b" 1"
    assert b.maintype == "text" and b.defaulted


@pytest.mark.parametrize("value,want", [
    (b"; a=1; b=\"x;y\"", [("a", "1"), ("b", "x;y")]),
    (b"; format=flowed; delsp", [("format", "flowed")]),
    (b"; a=1; delsp; skipped=1; b=2", [("a", "1"), ("b", "2")]),
    (b"; Name=\"Report.PDF\"", [("Name", "Report.PDF")]),
    (b"; a=1; a=2", [("a", "1"), ("a", "2")]),
    (b"; x=\"unterminated", []),
    (b"; n*1=b; n*0=a; z=1", [("z", "1"), ("n", "ab")]),
    (b"; f*=utf-8''%E2%82%AC.pdf", [("f*", "utf-8''%E2%82%AC.pdf")]),
    (b"; f*0*=utf-8''%E2; f*1=.pdf", [("f*", "utf-8''%E2.pdf")]),
    (b" (comment) ; a = \"q\\\"uote\" (c)", [("a", 'q"uote')]),
    (b";;;=;=x;", []),
])
def test_parse_params(value, want):
    assert parse_params(value) == want


def addr_tuples(value: bytes):
    return [(a.name, a.adl, a.mailbox, a.host) for a in parse_addresses(value)]


def test_addresses():
    assert addr_tuples(b'"Doe, J" <j@d.example>, x@y') == [
        (b"Doe, J", None, b"j", b"d.example"), (None, None, b"x", b"y")]
    assert addr_tuples(b"undisclosed-recipients:;") == [(None, None, b"undisclosed-recipients", None),
                                                        (None, None, None, None)]
    assert addr_tuples(b"a@b (Real Name)") == [(b"Real Name", None, b"a", b"b")]
    assert addr_tuples(b"<>") == [(None, None, b"MISSING_MAILBOX", b"MISSING_DOMAIN")]
    assert addr_tuples(b"local") == [(None, None, b"local", b"MISSING_DOMAIN")]
    assert addr_tuples(b"") == []
    assert addr_tuples(b"G: a@b, \"c d\" <e@f>") == [
        (None, None, b"G", None), (None, None, b"a", b"b"), (b"c d", None, b"e", b"f"), (None, None, None, None)]
    assert addr_tuples(b"Joe Q. Public <jq@example.com>") == [(b"Joe Q. Public", None, b"jq", b"example.com")]
    assert addr_tuples(b"A.B.  C <x@y>, (c1) d@e (c2) (c3), a@b (nested (c) x)") == [
        (b"A.B. C", None, b"x", b"y"), (b"c3", None, b"d", b"e"), (b"nested (c) x", None, b"a", b"b")]
    assert addr_tuples(b"x@[192.0.2.1]") == [(None, None, b"x", b"[192.0.2.1]")]


# --- encoding helpers ----------------------------------------------------------------------


def test_tokenize_command_with_lists_strings_and_literals():
    toks = tokenize(b'A1 APPEND "Sent Items" (\\Seen $x) {5}\r\nhello')
    assert toks == [b"A1", b"APPEND", b"Sent Items", [b"\\Seen", b"$x"], b"hello"]
    assert isinstance(toks[0], Atom) and isinstance(toks[2], String) and not toks[2].literal
    assert toks[4].literal
    toks = tokenize(b'a FETCH 1:*,5 (FLAGS BODY.PEEK[HEADER.FIELDS (From "To")]<0.100>)')
    assert toks[3] == [b"FLAGS", b'BODY.PEEK[HEADER.FIELDS (From "To")]<0.100>']
    assert tokenize(b'x "a\\"b\\\\c" {0+}\r\n ~{2}\r\nab') == [b"x", b'a"b\\c', b"", b"ab"]
    assert tokenize(b"a LIST \"\" %") == [b"a", b"LIST", b"", b"%"]
    assert tokenize(b"a LIST \"\" [Gmail]/*") == [b"a", b"LIST", b"", b"[Gmail]/*"]
    assert tokenize(b"a (NIL ())") == [b"a", [b"NIL", []]]


@pytest.mark.parametrize("bad", [
    b'a "unterminated', b"a (x", b"a x)", b"a {5}\r\nabc", b"a {x}\r\n", b'a "bad\\q"', b"a {3}abc",
    b"a \x01", b'a "cr\r"',
])
def test_tokenize_errors(bad):
    with pytest.raises(ParseError):
        tokenize(bad)


def test_literal_announcement():
    assert literal_announcement(b"a APPEND INBOX {310}") == (310, False)
    assert literal_announcement(b"a APPEND INBOX (\\Seen) {5+}") == (5, True)
    assert literal_announcement(b"a APPEND INBOX ~{5}") == (5, False)
    assert literal_announcement(b"a LOGIN x y") is None
    assert literal_announcement(b"a SEARCH SUBJECT x{5}") is None
    assert literal_announcement(b"{99999999999999999}") is None


def test_imap_string_quoting():
    assert imap_string(None) == b"NIL"
    assert imap_string("plain") == b'"plain"'
    assert imap_string(b'a"b\\c') == b'"a\\"b\\\\c"'
    assert imap_string("caf\u00e9") == b"{5}\r\ncaf\xc3\xa9"
    assert imap_string(b"two\r\nlines") == b"{10}\r\ntwo\r\nlines"
    assert imap_string(b"") == b'""'
    assert astring("INBOX") == b"INBOX"
    assert astring("Sent Items") == b'"Sent Items"'
    assert astring("NIL") == b'"NIL"'
    assert astring("") == b'""'
    assert string_for_humans(b"a\r\n  b\tc") == b"{5}\r\na b c"
    assert string_for_humans(b"ok") == b'"ok"'
    assert string_for_humans(b"  ") == b'""'


@pytest.mark.parametrize("name,enc", [
    ("INBOX", b"INBOX"), ("Entw\u00fcrfe", b"Entw&APw-rfe"), ("a&b", b"a&-b"),
    ("\u263a!", b"&Jjo-!"), ("\u65e5\u672c\u8a9e", b"&ZeVnLIqe-"), ("Gel\u00f6schte Objekte", b"Gel&APY-schte Objekte"),
    ("\U0001f600", b"&2D3eAA-"),
])
def test_utf7_roundtrip(name, enc):
    assert utf7_encode(name) == enc
    assert utf7_decode(enc) == name


@pytest.mark.parametrize("bad", [b"&Jjo", b"&A-", b"a\xffb", b"&AGE-"])
def test_utf7_invalid(bad):
    with pytest.raises(ParseError):
        utf7_decode(bad)


def test_decode_header():
    assert decode_header(b"=?UTF-8?Q?Gr=C3=BC=C3=9Fe?= =?UTF-8?B?IOKAkw==?=") == "Gr\u00fc\u00dfe \u2013"
    assert decode_header(b"=?iso-8859-1?q?Andr=E9?= <a@b>") == "Andr\u00e9 <a@b>"
    assert decode_header(b"plain\r\n folded") == "plain folded"
    assert decode_header(b"=?utf-8?b?w6Q=?=\r\n =?utf-8?b?w7Y=?=") == "\u00e4\u00f6"
    assert decode_header(b"=?bogus-charset?q?abc?=") == "abc"
    assert decode_header(b"=?utf-8?q?broken") == "=?utf-8?q?broken"
    assert decode_header("J\u00fcrgen".encode()) == "J\u00fcrgen"
    assert decode_header(b"\xe9t\xe9") == "\u00e9t\u00e9"
    # a multi-byte character split across two encoded words
    assert decode_header(b"=?utf-8?q?=C3?= =?utf-8?q?=A4?=") == "\u00e4"


def test_rfc2231_value():
    assert rfc2231_value("utf-8''Rechnung%20M%C3%A4rz.pdf") == "Rechnung M\u00e4rz.pdf"
    assert rfc2231_value("iso-8859-1'de'%DCbersicht") == "\u00dcbersicht"
    assert rfc2231_value("no-quotes%20here") == "no-quotes here"


def test_nul_bytes_are_served_as_0x80_with_unchanged_sizes():
    raw = b"Subject: a\x00b\n\nx\x00y\n"
    m = Message(raw)
    assert b"\x00" not in m.data and len(m.data) == len(raw) + 3
    assert m.data == b"Subject: a\x80b\r\n\r\nx\x80y\r\n"


def test_string_for_humans_shows_nul_as_replacement_char_and_keeps_other_bytes():
    assert string_for_humans(b"caf\xe9  x") == b"{6}\r\ncaf\xe9 x"
    assert string_for_humans(b"a\x80b") == b"{5}\r\na\xef\xbf\xbdb"
    assert string_for_humans("\u20ac".encode()) == b"{3}\r\n\xe2\x82\xac"


def test_boundaries_match_by_prefix_innermost_first():
    raw = (b"Content-Type: multipart/mixed; boundary=a\n\n--a\nContent-Type: multipart/alternative;"
           b" boundary=a_b\n\n--a_b\n\ninner\n--a_b--\n--a  \n\nsecond\n--axyz\n\nthird\n--a--\n")
    m = Message(raw)
    kids = m.root.children
    assert len(kids) == 3 and kids[0].is_multipart and len(kids[0].children) == 1
    assert [m.data[k.body_start:k.end] for k in kids[1:]] == [b"second", b"third"]


def test_imap_string_round_trips_through_the_tokenizer():
    rng = random.Random(5)
    for _ in range(500):
        value = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.5:
            value = bytes(rng.choice(b'ab \\"(){}[]%*\r\n\t') for _ in range(rng.randint(0, 20)))
        toks = tokenize(b"x " + imap_string(value))
        assert toks[1] == value


def test_fuzzed_messages_never_break_search():
    from tmmail.imap.search import parse_search, search

    rng = random.Random(17)
    msgs = corpus()
    prog = parse_search(tokenize(b'OR OR TEXT "caf\xc3\xa9" BODY x OR SUBJECT a OR SENTON 1-Jan-2024 HEADER Content-Type ""'))

    class S:
        flags: set[str] = set()
        size = 1
        internal_date = 0.0

        def __init__(self, i, raw):
            self.seq = self.uid = i
            self.raw = raw

        def load(self):
            return self.raw

    batch = []
    for i in range(200):
        raw = bytearray(rng.choice(msgs))
        for _ in range(rng.randint(1, 6)):
            pos = rng.randint(0, len(raw))
            raw[pos:pos] = rng.choice([b"=", b"=?utf-8?b?", b"?=", b"\n--", b"\xff\xfe", b"charset=utf-16;",
                                       b"Content-Transfer-Encoding: base64\n", b"Date: 99 Foo 2024\n"])
        batch.append(S(i + 1, bytes(raw)))
    found = search(prog, batch, len(batch), len(batch))
    assert 0 < len(found) <= len(batch)


def test_huge_numbers_in_content_do_not_raise():
    # Python refuses int() of > 4300 digits; content must never reach it unguarded
    raw = (b"Content-Type: multipart/mixed; boundary=b; name*" + b"9" * 5000 + b"*=x\n"
           b"Date: Mon, " + b"9" * 5000 + b" Jan 2024 10:00:00 +0000\n\n--b\n\nx\n--b--\n")
    full_fetch_is_parseable(raw)
    from tmmail.imap.search import parse_search, search
    assert search(parse_search(tokenize(b"SENTON 1-Jan-1970")), [Stored(raw)], 1, 1)


def test_params_with_empty_values_like_dovecot():
    assert parse_params(b"; a=; b=1") == [("a", ""), ("b", "1")]
    assert parse_params(b"; a=  ") == [("a", "")]
    assert parse_params(b'; a="') == []

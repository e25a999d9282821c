"""Pure parts of the SMTP server: path/parameter parsing, DATA/BDAT readers, rate limiter."""

from __future__ import annotations

import pytest

from tmmail.ratelimit import RateLimiter
from tmmail.smtpdata import (
    BARE_NEWLINE,
    FROM_NOT_OWNED,
    INTERNAL,
    LINE_TOO_LONG,
    STORAGE,
    TOO_BIG,
    ContentReader,
    FromPolicy,
    MessageSink,
    header_name,
)
from tmmail.smtppath import (
    ParamError,
    PathError,
    check_mail_params,
    check_rcpt_params,
    parse_params,
    parse_path,
    split_argument,
)

# -- paths and parameters -------------------------------------------------------------------


def test_split_argument_forms():
    assert split_argument("FROM:<a@b.c>", "FROM") == ("a@b.c", "")
    assert split_argument("from: <a@b.c> SIZE=10 BODY=8BITMIME", "FROM") == ("a@b.c", "SIZE=10 BODY=8BITMIME")
    assert split_argument('TO:<"x>y"@b.c>', "TO") == ('"x>y"@b.c', "")
    assert split_argument("FROM:<>", "FROM") == ("", "")
    for bad in ("FROM:a@b.c", "FROM:<a@b.c", "FROM:<a@b.c>SIZE=1", "TO:<a@b.c>", "FROM:<<a@b.c>>"):
        with pytest.raises(PathError):
            split_argument(bad, "FROM")


def test_parse_path_canonical_forms():
    p = parse_path("John.Doe@Example.COM", utf8=False, allow_null=False)
    assert p.address == "John.Doe@example.com" and not p.routing
    assert parse_path('"john"@example.com', utf8=False, allow_null=False).address == "john@example.com"
    q = parse_path('"john smith"@example.com', utf8=False, allow_null=False)
    assert q.address == '"john smith"@example.com'
    assert parse_path("", utf8=False, allow_null=True).is_null
    with pytest.raises(PathError):
        parse_path("", utf8=False, allow_null=False)


def test_parse_path_utf8():
    p = parse_path("j\u00f6e@b\u00fccher.example", utf8=True, allow_null=False)
    assert p.address == "j\u00f6e@xn--bcher-kva.example" and p.utf8
    with pytest.raises(PathError) as e:
        parse_path("j\u00f6e@example.com", utf8=False, allow_null=False)
    assert e.value.utf8


def test_source_route_is_marked_as_routing():
    p = parse_path("@a.example,@b.example:user@c.example", utf8=False, allow_null=False)
    assert p.route == ("a.example", "b.example") and p.routing and p.address == "user@c.example"


def test_path_length_limits():
    with pytest.raises(PathError):
        parse_path("x@" + ".".join(["a" * 63] * 5), utf8=False, allow_null=False)
    with pytest.raises(PathError):
        parse_path("x@" + "a" * 64 + ".com", utf8=False, allow_null=False)


VALID_LITERALS = [
    ("192.0.2.1", "[192.0.2.1]"),
    ("0.0.0.0", "[0.0.0.0]"),
    ("255.255.255.255", "[255.255.255.255]"),
    ("192.000.002.001", "[192.000.002.001]"),  # Snum = 1*3DIGIT: leading zeros are grammar
    ("IPv6:2001:DB8::1", "[ipv6:2001:db8::1]"),
    ("ipv6:::1", "[ipv6:::1]"),
    ("IPv6:::", "[ipv6:::]"),
    ("IPv6:1:2:3:4:5:6:7:8", "[ipv6:1:2:3:4:5:6:7:8]"),
    ("IPv6:1:2:3::4:5:6", "[ipv6:1:2:3::4:5:6]"),
    ("IPv6:::ffff:192.0.2.1", "[ipv6:::ffff:192.0.2.1]"),
    ("IPv6:1:2:3:4:5:6:192.0.2.1", "[ipv6:1:2:3:4:5:6:192.0.2.1]"),
    ("IPv6:1:2::3:4:192.0.2.1", "[ipv6:1:2::3:4:192.0.2.1]"),
    ("x-tag:some-content", "[x-tag:some-content]"),  # General-address-literal
]

BAD_LITERALS = [
    "anything", "", " ", "192.0.2", "192.0.2.1.5", "256.0.0.1", "192.0.2.1 ", "192.0.2.01234",
    "1.2.3.-1", "+1.2.3.4", "IPv6:", "IPv6:zz::1", "IPv6:192.0.2.1", "IPv6:1:2:3:4:5:6:7",
    "IPv6:1:2:3:4:5:6:7:8:9", "IPv6:1:2:3:4:5:6:7::",  # "::" stands for at least 2 groups (§4.1.3)
    "IPv6:1::2::3", "IPv6::1", "IPv6:1:", "IPv6:12345::1", "IPv6:fe80::1%eth0", "IPv6:[::1]",
    "IPv6:1:2:3:4:5::192.0.2.1",  # IPv6v4-comp: at most 4 groups beside "::"
    "IPv6:::ffff:256.0.0.1", "IPv6 :::1", "tag-:x", "tag:", ":x", "tag:a[b", "tag:a]b",
    "tag:a\\b", "tag:a b", "[192.0.2.1]", "192.0.2.1]",
]


@pytest.mark.parametrize("literal,domain", VALID_LITERALS)
def test_address_literals_of_rfc5321_are_accepted(literal, domain):
    p = parse_path(f"user@[{literal}]", utf8=False, allow_null=False)
    assert p.ip_literal and p.domain == domain and p.address == "user@" + domain
    assert parse_path(f"user@[{literal}]", utf8=True, allow_null=False).domain == domain


@pytest.mark.parametrize("literal", BAD_LITERALS)
def test_malformed_address_literals_are_syntax_errors(literal):
    for utf8 in (False, True):
        with pytest.raises(PathError) as e:
            parse_path(f"user@[{literal}]", utf8=utf8, allow_null=False)
        assert not e.value.utf8


@pytest.mark.parametrize("literal", [
    "\u0661\u0669\u0662.0.2.1", "192.0.2.\uff11", "IPv6:\u0662001:db8::1", "IPv6:2001:db8::\u00b9",
    "x:caf\u00e9",
])
def test_non_ascii_in_an_address_literal_is_a_syntax_error_with_or_without_smtputf8(literal):
    # str.isdigit() and int() read "\u0661\u0669\u0662" as 192: only ASCII digits are digits
    for utf8 in (False, True):
        with pytest.raises(PathError) as e:
            parse_path(f"user@[{literal}]", utf8=utf8, allow_null=False)
        assert not e.value.utf8  # 501 5.1.x, not "553 5.6.7 use SMTPUTF8": SMTPUTF8 would not help
    # a non-ASCII local part beside a valid literal still only needs SMTPUTF8
    with pytest.raises(PathError) as e:
        parse_path("j\u00f6e@[192.0.2.1]", utf8=False, allow_null=False)
    assert e.value.utf8
    assert parse_path("j\u00f6e@[192.0.2.1]", utf8=True, allow_null=False).ip_literal


def test_parse_params():
    assert parse_params("SIZE=10 body=8bitmime SMTPUTF8") == {"SIZE": "10", "BODY": "8bitmime", "SMTPUTF8": None}
    for bad, param in (("SIZE=1 SIZE=2", "SIZE"), ("=x", "=x"), ("SIZE=", "SIZE"), ("A=b=c", "A"), ("-X=1", "-X=1"),
                       ("\u00e9=1", "?=1"), ("X" * 50 + "=", "X" * 40)):
        with pytest.raises(ParamError) as e:
            parse_params(bad)
        # a syntax error in the parameters (501 5.5.4), named in printable ASCII
        assert not e.value.unknown and e.value.param == param
        assert e.value.duplicate == (bad == "SIZE=1 SIZE=2")


def test_mail_params():
    got = check_mail_params(
        parse_params("SIZE=1000 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=abc+2Bdef"), auth_offered=False
    )
    assert got == {"SIZE": "1000", "BODY": "8BITMIME", "SMTPUTF8": "", "RET": "HDRS", "ENVID": "abc+2Bdef"}
    assert check_mail_params({"AUTH": "<>"}, auth_offered=True) == {"AUTH": "<>"}
    assert check_mail_params({"SIZE": "0" * 19 + "7"}, auth_offered=False) == {"SIZE": "7"}
    for bad in ({"SIZE": "x"}, {"SIZE": None}, {"SIZE": "\u00b2"}, {"SIZE": "\u0661\u0662"}, {"SIZE": "\uff11"},
                {"SIZE": "1\u00b2"}, {"SIZE": "1" * 21}, {"SIZE": "+1"}, {"SIZE": " 1"}, {"BODY": "9BIT"}, {"BODY": None}, {"SMTPUTF8": "yes"},
                {"RET": "ALL"}, {"RET": None}, {"ENVID": "a+zz"}, {"ENVID": "x" * 101}):
        with pytest.raises(ParamError) as e:
            check_mail_params(bad, auth_offered=False)
        assert not e.value.unknown and e.value.param == next(iter(bad))  # 501 5.5.4
    with pytest.raises(ParamError) as e:
        check_mail_params({"AUTH": "a b"}, auth_offered=True)
    assert not e.value.unknown
    for bad in ({"FOO": "1"}, {"AUTH": "<>"}, {"MT-PRIORITY": "1"}, {"HOLDFOR": "10"}, {"BODY": "binarymime"}):
        with pytest.raises(ParamError) as e:
            check_mail_params(bad, auth_offered=False)
        assert e.value.unknown  # 555 5.5.4


def test_rcpt_params():
    assert check_rcpt_params({"NOTIFY": "success,failure"}) == {"NOTIFY": "SUCCESS,FAILURE"}
    assert check_rcpt_params({"NOTIFY": "never"}) == {"NOTIFY": "NEVER"}
    assert check_rcpt_params({"ORCPT": "rfc822;a+40b@c"}) == {"ORCPT": "rfc822;a+40b@c"}
    for bad in ({"NOTIFY": "NEVER,SUCCESS"}, {"NOTIFY": "SOMETIMES"}, {"NOTIFY": "DELAY,DELAY"}, {"NOTIFY": None},
                {"ORCPT": "noseparator"}, {"ORCPT": "rfc822;"}, {"ORCPT": "rfc822;a+zz"}, {"ORCPT": None}):
        with pytest.raises(ParamError) as e:
            check_rcpt_params(bad)
        assert not e.value.unknown and e.value.param == next(iter(bad))


ORCPT_VALID = [
    ("rfc822;a+40b@c", False), ("x400;c+3Dus;a+3D+20;p+3Dx", False), ("X-Local;a+2Bb", False),
    # RFC 6533 §3: utf-8-addr-xtext anywhere, utf-8-addr-unitext (raw UTF-8) only under SMTPUTF8
    ("utf-8;j\\x{F6}e@example.com", False), ("utf-8;\\x{10FFFF}\\x{5C}\\x{20}@x", False),
    ("UTF-8;a+40b@c", False), ("utf-8;j\u00f6e@b\u00fccher.example", True), ("utf-8;j\u00f6\\x{20}e@x", True),
]

ORCPT_INVALID = [
    # non-ASCII is not xtext whatever the address type, with or without SMTPUTF8
    ("x400;j\u00f6e", False), ("x400;j\u00f6e", True), ("rfc822;j\u00f6e@example.com", True),
    ("unknown;\u0661\u0662", True), ("x-local;a+zz", False), ("x-local;a+2b", False),
    # utf-8-addr-unitext without SMTPUTF8, and malformed \x{...}
    ("utf-8;j\u00f6e@example.com", False), ("utf-8;a\\b", False), ("utf-8;a\\x{}", False),
    ("utf-8;\\x{00F6}", False), ("utf-8;\\x{D800}", False), ("utf-8;\\x{110000}", False),
    ("utf-8;\\x{41}", False),  # ASCII letters are written as themselves
    ("utf-8;\\xF6", True), ("utf-8;", True),
]


@pytest.mark.parametrize("value,smtputf8", ORCPT_VALID)
def test_orcpt_values_accepted(value, smtputf8):
    assert check_rcpt_params({"ORCPT": value}, smtputf8=smtputf8) == {"ORCPT": value}


@pytest.mark.parametrize("value,smtputf8", ORCPT_INVALID)
def test_orcpt_value_checked_as_xtext_for_every_address_type(value, smtputf8):
    with pytest.raises(ParamError) as e:
        check_rcpt_params({"ORCPT": value}, smtputf8=smtputf8)
    assert not e.value.unknown and e.value.param == "ORCPT"  # 501 5.5.4 Syntax error in parameter ORCPT
    for bad in ({"SIZE": "1"}, {"SMTPUTF8": None}, {"FOO": "BAR"}):
        with pytest.raises(ParamError) as e:
            check_rcpt_params(bad)
        assert e.value.unknown


# -- content readers ------------------------------------------------------------------------


class Store:
    def __init__(self, fail: bool = False):
        self.data = b""
        self.fail = fail

    def write(self, data: bytes) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.data += data


def read_data(wire: bytes, chunk: int = 0, max_line: int = 1000, max_size: int = 10**6, from_policy=None):
    """Feed ``wire`` in chunks of ``chunk`` bytes (0 = at once); (stored, error, rest, done)."""
    store = Store()
    sink = MessageSink(store.write, max_size, from_policy)
    reader = ContentReader(sink, max_line, dot_mode=True)
    buf = bytearray()
    done = False
    pieces = [wire] if not chunk else [wire[i : i + chunk] for i in range(0, len(wire), chunk)]
    for piece in pieces:
        buf += piece
        if reader.feed(buf):
            done = True
            break
    sink.finish()
    return store.data, sink.error, bytes(buf), done


@pytest.mark.parametrize("chunk", [0, 1, 2, 3, 7, 64])
def test_data_unstuffs_and_converts_to_lf_whatever_the_chunking(chunk):
    wire = b"Subject: x\r\n\r\n..leading dot\r\nline\r\n.\r\nNOOP\r\n"
    stored, error, rest, done = read_data(wire, chunk)
    assert done and error is None
    assert stored == b"Subject: x\n\n.leading dot\nline\n"
    if chunk == 0:
        assert rest == b"NOOP\r\n"  # what follows the end of data stays a command


@pytest.mark.parametrize(
    "wire",
    [
        b"a\r\n\n.\n\r\nMAIL FROM:<x@y>\r\n",  # <LF>.<LF>
        b"a\n.\r\nMAIL FROM:<x@y>\r\n",  # <LF>.<CRLF>
        b"a\r\n.\nMAIL FROM:<x@y>\r\n",  # <CRLF>.<LF>
        b"a\r.\rMAIL FROM:<x@y>\r\n",  # <CR>.<CR>
        b"a\r\n.\r.\r\nMAIL FROM:<x@y>\r\n",
    ],
)
def test_smuggling_sequences_do_not_end_data(wire):
    stored, error, rest, done = read_data(wire)
    assert not done  # still in DATA: nothing after is a command
    _, error, rest, done = read_data(wire + b"\r\n.\r\n")
    assert done and error == BARE_NEWLINE and rest == b""


def test_line_too_long_discards_and_keeps_reading():
    wire = b"a" * 5000 + b"\r\nMAIL FROM:<x@y>\r\n.\r\n"
    for chunk in (0, 100, 999, 1000, 1001):
        stored, error, rest, done = read_data(wire, chunk)
        assert done and error == LINE_TOO_LONG and stored == b""


def test_line_at_limit_is_fine():
    line = b"a" * 998 + b"\r\n"
    stored, error, _, done = read_data(line + b".\r\n", 0, max_line=1000)
    assert done and error is None and stored == b"a" * 998 + b"\n"
    _, error, _, done = read_data(b"a" + line + b".\r\n", 0, max_line=1000)
    assert done and error == LINE_TOO_LONG


def test_size_limit_counts_wire_octets():
    body = b"x" * 98 + b"\r\n"  # 100 octets per line
    _, error, _, done = read_data(body * 10 + b".\r\n", max_size=1000)
    assert done and error is None
    _, error, _, done = read_data(body * 11 + b".\r\n", max_size=1000)
    assert done and error == TOO_BIG


def test_empty_message():
    stored, error, _, done = read_data(b".\r\n")
    assert done and error is None and stored == b""


def test_storage_failure_is_reported():
    sink = MessageSink(Store(fail=True).write, 10**6)
    reader = ContentReader(sink, 1000, dot_mode=True)
    assert reader.feed(bytearray(b"x\r\n.\r\n"))
    sink.finish()
    assert sink.error == STORAGE


def test_bdat_chunks_keep_lines_across_chunk_boundaries():
    store = Store()
    sink = MessageSink(store.write, 10**6)
    reader = ContentReader(sink, 1000, dot_mode=False)
    pending = bytearray()
    for chunk in (b"Subject: a\r", b"\n\r\n.not stuffed\r\nlast line no crlf"):
        pending += chunk
        reader.feed(pending)
    reader.finish_chunks(pending)
    sink.finish()
    assert sink.error is None
    assert store.data == b"Subject: a\n\n.not stuffed\nlast line no crlf\n"


def test_bdat_bare_lf_refused():
    sink = MessageSink(Store().write, 10**6)
    reader = ContentReader(sink, 1000, dot_mode=False)
    pending = bytearray(b"a\nb\r\n")
    reader.feed(pending)
    reader.finish_chunks(pending)
    assert sink.error == BARE_NEWLINE


def allow(*addresses):
    return lambda a: a in addresses


def test_from_header_refused_when_not_owned():
    pol = FromPolicy(allowed=allow("me@x.example"), mode="refuse", rewrite_to="me@x.example")
    _, error, _, _ = read_data(b"From: Boss <boss@x.example>\r\nSubject: s\r\n\r\nb\r\n.\r\n", from_policy=pol)
    assert error == FROM_NOT_OWNED
    stored, error, _, _ = read_data(b"From: Me\r\n <me@x.example>\r\n\r\nFrom: body line\r\n.\r\n", from_policy=pol)
    assert error is None and stored == b"From: Me\n <me@x.example>\n\nFrom: body line\n"


def test_from_header_rewritten_including_folded_lines():
    pol = FromPolicy(allowed=allow("me@x.example"), mode="rewrite", rewrite_to="me@x.example")
    wire = b"Subject: s\r\nfrom: Boss\r\n\t<boss@x.example>\r\nTo: y@z\r\n\r\nbody\r\n.\r\n"
    stored, error, _, _ = read_data(wire, chunk=5, from_policy=pol)
    assert error is None
    assert stored == b"Subject: s\nFrom: <me@x.example>\nTo: y@z\n\nbody\n"


def test_header_name_parsing_accepts_obsolete_space_before_colon():
    assert header_name(b"From: a@b") == b"from"
    assert header_name(b"FROM : a@b") == b"from"
    assert header_name(b"From\t: a@b") == b"from"
    assert header_name(b"From \t :a@b") == b"from"
    assert header_name(b"Sender:x") == b"sender"
    assert header_name(b"X-From: a@b") == b"x-from"
    for not_a_field in (b" From: a@b", b"From a@b", b": a@b", b"Fr om: a@b", b"\tFrom: a"):
        assert header_name(not_a_field) is None


@pytest.mark.parametrize("line", [b"From : Boss <boss@x.example>", b"From\t: boss@x.example",
                                  b"fRoM \t : boss@x.example", b"Sender: boss@x.example",
                                  b"Sender : boss@x.example"])
def test_author_header_variants_refused_when_not_owned(line):
    pol = FromPolicy(allowed=allow("me@x.example"), mode="refuse", rewrite_to="me@x.example")
    _, error, _, _ = read_data(b"From: me@x.example\r\n" + line + b"\r\nSubject: s\r\n\r\nb\r\n.\r\n",
                               from_policy=pol)
    assert error == FROM_NOT_OWNED


def test_folded_and_repeated_from_headers_all_checked():
    pol = FromPolicy(allowed=allow("me@x.example"), mode="refuse", rewrite_to="me@x.example")
    folded = b"From : Me <me@x.example>,\r\n\tBoss\r\n <boss@x.example>\r\n\r\nb\r\n.\r\n"
    assert read_data(folded, chunk=3, from_policy=pol)[1] == FROM_NOT_OWNED
    second = b"From: me@x.example\r\nTo: y@z\r\nFrom: boss@x.example\r\n\r\nb\r\n.\r\n"
    assert read_data(second, from_policy=pol)[1] == FROM_NOT_OWNED
    ok = b"From : Me\r\n <me@x.example>\r\nSender:\tme@x.example\r\n\r\nb\r\n.\r\n"
    stored, error, _, _ = read_data(ok, from_policy=pol)
    assert error is None and stored == b"From : Me\n <me@x.example>\nSender:\tme@x.example\n\nb\n"


def test_rewrite_mode_uses_the_same_header_parsing():
    pol = FromPolicy(allowed=allow("me@x.example"), mode="rewrite", rewrite_to="me@x.example")
    wire = (b"From\t: Boss <boss@x.example>\r\nFrom : other@x.example\r\nSender : boss@x.example\r\n"
            b"To: y@z\r\n\r\nbody\r\n.\r\n")
    stored, error, _, _ = read_data(wire, from_policy=pol)
    assert error is None
    assert stored == b"From: <me@x.example>\nSender: <me@x.example>\nTo: y@z\n\nbody\n"


def test_a_raising_check_marks_the_message_internal_error():
    def broken(address):
        raise KeyError("providers snapshot gone")

    pol = FromPolicy(allowed=broken, mode="refuse", rewrite_to="me@x.example")
    stored, error, rest, done = read_data(b"From: me@x.example\r\n\r\nb\r\n.\r\nNOOP\r\n", from_policy=pol)
    assert error == INTERNAL and done and rest == b"NOOP\r\n"


def test_header_only_message_from_is_checked():
    pol = FromPolicy(allowed=allow("me@x.example"), mode="refuse", rewrite_to="me@x.example")
    _, error, _, _ = read_data(b"From: boss@x.example\r\n.\r\n", from_policy=pol)
    assert error == FROM_NOT_OWNED


# -- rate limiter ---------------------------------------------------------------------------


def test_rate_limiter_sliding_hour():
    now = [1000.0]
    rl = RateLimiter(3, 5, lambda: now[0])
    assert rl.check("a@x") is None
    rl.record("a@x", 2)
    rl.record("A@X", 2)  # accounts are case-insensitive
    assert rl.usage("a@x") == (2, 4)
    assert rl.check("a@x", 1, 1) is None
    assert rl.check("a@x", 1, 2) == "recipients"
    rl.record("a@x", 1)
    assert rl.check("a@x") == "messages"
    assert rl.check("b@x") is None  # other accounts unaffected
    now[0] += 3600 + 60
    assert rl.check("a@x") is None and rl.usage("a@x") == (0, 0)


def test_rate_limiter_zero_is_unlimited_and_memory_bounded():
    now = [0.0]
    rl = RateLimiter(0, 0, lambda: now[0])
    for i in range(5000):
        now[0] = i * 2.0
        rl.record("a@x", 10)
    assert rl.check("a@x") is None
    assert len(rl._buckets["a@x"]) <= 61


def test_rate_limiter_reservations_count_until_committed_or_released():
    """Transactions in flight hold their share: a second session cannot take the same slot."""
    now = [1000.0]
    rl = RateLimiter(2, 3, lambda: now[0])
    a = rl.reserve("a@x", 1, 2)
    assert a.over is None and rl.check("a@x", 1, 2) == "recipients"
    b = rl.reserve("A@X", 1, 1)
    assert b.over is None
    c = rl.reserve("a@x", 1, 0)
    assert c.over == "messages" and rl.pending("a@x") == (2, 3)
    assert not b.grow(0, 1) and b.over == "recipients"
    b.release()
    b.release()  # idempotent: every exit path may call it
    assert rl.pending("a@x") == (1, 2) and rl.check("a@x", 1, 1) is None
    a.shrink(0, 1)
    a.commit(1)
    assert rl.usage("a@x") == (1, 1) and rl.pending("a@x") == (0, 0)
    a.release()  # after commit: nothing more is given back
    assert rl.check("a@x", 1, 2) is None and rl.check("a@x", 2, 0) == "messages"


# -- connection limit keys ------------------------------------------------------------------


def test_connection_key_counts_ipv6_per_64():
    from tmmail.smtpserver import connection_key

    assert connection_key("192.0.2.7") == "192.0.2.7"
    assert connection_key("2001:db8:1:2::1") == connection_key("2001:db8:1:2:ffff:eeee:dddd:cccc") == "2001:db8:1:2::/64"
    assert connection_key("2001:db8:1:3::1") != connection_key("2001:db8:1:2::1")
    assert connection_key("::ffff:192.0.2.7") == "192.0.2.7"


def test_per_ip_connection_limit_applies_to_an_ipv6_64():
    """Rotating through the addresses of one /64 must not get around max_connections_per_ip."""
    from twisted.internet import task

    from tmmail import config
    from tmmail.smtpserver import SMTPFactory

    settings = config.parse({"smtp": {"max_connections_per_ip": 2}}, "/nonexistent/tmmail.toml")
    f = SMTPFactory(settings, "smtp", None, None, None, None, None, reactor=task.Clock())
    assert f.admit("2001:db8:1:2::1") is None
    assert f.admit("2001:db8:1:2::2") is None
    assert f.admit("2001:db8:1:2::3") == "per_ip"
    assert f.admit("2001:db8:1:99::1") is None  # another /64 is another client
    f.release("2001:db8:1:2::1")
    assert f.admit("2001:db8:1:2::4") is None
    assert f.admit("192.0.2.1") is None and f.admit("192.0.2.1") is None and f.admit("192.0.2.1") == "per_ip"

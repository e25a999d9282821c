"""Pure units of the IMAP server: the bounded command reader (lines, synchronising and
LITERAL+ literals, limits, raw lines for IDLE/AUTHENTICATE, the STARTTLS discard), the fast
INTERNALDATE formatter and the flags-only SEARCH detection."""

from __future__ import annotations

from tmmail.imap.reader import (
    Command,
    CommandReader,
    Line,
    LiteralTooBig,
    NeedContinuation,
    TooLong,
)


def reader(max_line: int = 100, append_limit: int = 1000) -> CommandReader:
    def limit(head: bytes, received: int) -> int:
        return append_limit if b" APPEND " in head.upper() else max(0, max_line - received)

    return CommandReader(max_line, limit)


def events(r: CommandReader) -> list:
    out = []
    for _ in range(100):
        e = r.next_event()
        if e is None:
            return out
        out.append(e)
    raise AssertionError("too many events")


def test_lines_split_on_crlf_and_bare_lf_and_partial_input_waits():
    r = reader()
    r.feed(b"a NOOP\r\nb NO")
    assert events(r) == [Command(b"a NOOP")]
    r.feed(b"OP\nc CAPA")
    assert events(r) == [Command(b"b NOOP")]
    r.feed(b"BILITY\r\n")
    assert events(r) == [Command(b"c CAPABILITY")]


def test_synchronising_literal_asks_for_continuation_and_is_inlined():
    r = reader()
    r.feed(b"a LOGIN {5}\r\n")
    assert events(r) == [NeedContinuation(5)]
    r.feed(b"al\r\nc {3}\r\npw\n\r\n")
    assert events(r) == [NeedContinuation(3), Command(b"a LOGIN {5}\r\nal\r\nc {3}\r\npw\n")]


def test_literal_plus_needs_no_continuation():
    r = reader()
    r.feed(b"a APPEND INBOX {4+}\r\nabcd\r\nb NOOP\r\n")
    assert events(r) == [Command(b"a APPEND INBOX {4+}\r\nabcd"), Command(b"b NOOP")]


def test_too_long_line_is_skipped_with_its_tag():
    r = reader(max_line=20)
    r.feed(b"tag1 NOOP " + b"x" * 50)
    assert events(r) == []
    r.feed(b"y" * 50 + b"\r\nb NOOP\r\n")
    assert events(r) == [TooLong(b"tag1"), Command(b"b NOOP")]
    r.feed(b"c " + b"z" * 30 + b"\r\n")
    assert events(r) == [TooLong(b"c")]
    assert r.buffered == 0


def test_literal_too_big_sync_and_nonsync():
    r = reader(append_limit=10)
    r.feed(b"a APPEND INBOX {11}\r\nb NOOP\r\n")
    assert events(r) == [LiteralTooBig(b"a", 11, True), Command(b"b NOOP")]
    r.feed(b"c APPEND INBOX {20+}\r\n" + b"q" * 20 + b" more {3+}\r\nxyz\r\nd NOOP\r\n")
    assert events(r) == [LiteralTooBig(b"c", 20, False), Command(b"d NOOP")]


def test_non_append_literals_count_against_the_line_limit():
    r = reader(max_line=50)
    r.feed(b"a LOGIN {100+}\r\n" + b"u" * 100 + b" p\r\nb NOOP\r\n")
    assert events(r) == [LiteralTooBig(b"a", 100, False), Command(b"b NOOP")]


def test_raw_lines_and_discard():
    r = reader()
    r.raw_lines = True
    r.feed(b"DONE\r\nx {5}\r\n")
    assert events(r) == [Line(b"DONE"), Line(b"x {5}")]
    r.raw_lines = False
    r.feed(b"a NOOP\r\nb NOOP\r\n")
    assert r.discard_buffer() == len(b"a NOOP\r\nb NOOP\r\n")
    assert events(r) == []
    r.feed(b"c NOOP\r\n")
    assert events(r) == [Command(b"c NOOP")]


def test_fast_internal_date_matches_the_general_formatter():
    import random

    from tmmail.imap.fetch import format_internal_date
    from tmmail.imap.messages import internal_date_bytes

    rnd = random.Random(7)
    values = [0, 1, 59.999, 86399, 86400, 951782400, 4102444799.5] + [
        rnd.uniform(0, 4_000_000_000) for _ in range(2000)]
    for v in values:
        assert internal_date_bytes(v) == format_internal_date(v), v


def test_flags_only_search_detection():
    from tmmail.imap.encoding import tokenize
    from tmmail.imap.messages import flags_only

    for text in (b"UNSEEN", b"NOT DELETED", b"OR SEEN FLAGGED", b"KEYWORD $Junk UNSEEN",
                 b"CHARSET UTF-8 UNSEEN", b"(UNSEEN NOT DELETED)", b"ALL"):
        assert flags_only(tokenize(text)), text
    for text in (b"1:5 UNSEEN", b"SUBJECT x", b"UID 3", b"LARGER 5", b"SINCE 1-Jan-2020",
                 b"KEYWORD", b"CHARSET UTF-8 BODY x"):
        assert not flags_only(tokenize(text)), text


def test_timeouts_follow_the_injected_clock(tmp_path):
    """Protocol unit on StringTransport + task.Clock: 60 s before login, then BYE."""
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from tmmail import config
    from tmmail.imap.server import IMAPFactory

    clock = task.Clock()
    settings = config.parse({"server": {"state_dir": str(tmp_path)},
                             "imap": {"idle_timeout_unauthenticated": 60.0}})
    factory = IMAPFactory(settings, "imap", None, None, None, reactor=clock)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.value().startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert b"STARTTLS" not in transport.value()  # no TLS context: not offered
    clock.advance(59)
    proto.dataReceived(b"a NOOP\r\n")
    assert transport.value().endswith(b"a OK NOOP completed\r\n")
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.value().endswith(b"* BYE Autologout; idle for too long\r\n")
    assert transport.disconnecting


def test_timeout_and_appendlimit_defaults():
    """RFC 3501 §5.4: the autologout timer after login is at least 30 minutes (1800 s); before
    login it is much shorter; the APPEND limit follows SMTP's message size unless set."""
    from tmmail import config

    s = config.parse({})
    assert s.imap.idle_timeout_authenticated == 1800.0
    assert s.imap.idle_timeout_unauthenticated == 60.0
    assert s.imap.idle_timeout_unauthenticated < s.imap.idle_timeout_authenticated
    assert s.imap.max_literal_size == s.smtp.max_message_size == 25 * 1024 * 1024
    s = config.parse({"smtp": {"max_message_size": 10_000_000}})
    assert s.imap.max_literal_size == 10_000_000
    s = config.parse({"smtp": {"max_message_size": 10_000_000}, "imap": {"max_literal_size": 5000}})
    assert s.imap.max_literal_size == 5000


def test_login_switches_to_the_authenticated_timeout(tmp_path):
    """On an injected clock: the pre-login timeout is replaced by idle_timeout_authenticated."""
    from twisted.internet import defer, task
    from twisted.internet.testing import StringTransport

    from tmmail import config
    from tmmail.imap.server import IMAPFactory

    clock = task.Clock()
    settings = config.parse({"server": {"state_dir": str(tmp_path)},
                             "imap": {"allow_plaintext_auth": True}})

    class Auth:
        def authenticate(self, login, password, ip):
            return defer.succeed(type("E", (), {"login": login, "postoffice": "P", "mailbox": "M"})())

    factory = IMAPFactory(settings, "imap", None, Auth(), None, reactor=clock)
    factory.open_account = lambda entry: defer.succeed(object())
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"a LOGIN u@example.com pw\r\n")
    assert b"a OK [CAPABILITY" in transport.value()
    clock.advance(1799)
    assert not transport.disconnecting
    proto.dataReceived(b"b NOOP\r\n")
    clock.advance(1799)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.value().endswith(b"* BYE Autologout; idle for too long\r\n")
    assert transport.disconnecting


def test_incomplete_command_is_acked_at_once(tmp_path):
    """While a command is incomplete (a literal, or its final CRLF, still to come) the server
    sets TCP_QUICKACK after each read, so a client that sends the literal and the CRLF in two
    writes (imaplib's APPEND) is not held ~40 ms by Nagle + delayed ACK; complete commands cost
    no extra system call."""
    import socket

    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from tmmail import config
    from tmmail.imap.server import IMAPFactory

    class Sock:
        calls: list = []

        def setsockopt(self, *a):
            self.calls.append(a)

    settings = config.parse({"server": {"state_dir": str(tmp_path)}})
    factory = IMAPFactory(settings, "imap", None, None, None, reactor=task.Clock())
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    transport.socket = Sock()
    proto.makeConnection(transport)
    quick = (socket.IPPROTO_TCP, getattr(socket, "TCP_QUICKACK", 12), 1)
    proto.dataReceived(b"a NOOP\r\n")
    assert Sock.calls == []
    proto.dataReceived(b"b NOOP {5}\r\n")
    assert transport.value().endswith(b"+ Ready for literal data\r\n")
    proto.dataReceived(b"hello")
    assert Sock.calls and all(c == quick for c in Sock.calls)
    n = len(Sock.calls)
    proto.dataReceived(b"\r\n")
    assert transport.value().endswith(b"b OK NOOP completed\r\n")  # the command was complete
    assert len(Sock.calls) == n


def test_literal_plus_after_an_over_long_line_is_thrown_away_not_run():
    """RFC 7888 §4: `a NOOP "<long>" {14+}` -- the line is refused, and the announced literal
    and the rest of the command must be discarded; they are not commands."""
    r = reader(max_line=40)
    r.feed(b'a NOOP "' + b"x" * 60 + b'" {14+}\r\nb CAPABILITY\r\n\r\nc NOOP\r\n')
    assert events(r) == [TooLong(b"a"), Command(b"c NOOP")]
    # the same when the long line arrives in pieces (the reader is already skipping it)
    r = reader(max_line=40)
    r.feed(b'a NOOP "' + b"x" * 60)
    assert events(r) == []
    r.feed(b'" {14+}\r\nb CAP')
    assert events(r) == [TooLong(b"a")]
    r.feed(b"ABILITY\r\n more {3+}\r\nxyz\r\nc NOOP\r\n")
    assert events(r) == [Command(b"c NOOP")]


def test_many_literals_cannot_grow_a_command_beyond_its_budget():
    """Each literal is checked against what is left of the command's budget, so announcing
    literal after literal cannot make the server buffer without bound."""
    r = reader(max_line=100)
    r.feed(b"a LOGIN {40+}\r\n" + b"u" * 40 + b" {40+}\r\n" + b"p" * 40 + b" {40+}\r\n" + b"q" * 40
           + b"\r\nb NOOP\r\n")
    assert events(r) == [LiteralTooBig(b"a", 40, False), Command(b"b NOOP")]


def test_list_patterns_match_like_rfc3501_and_never_backtrack():
    """'*' matches anything, '%' anything but '/'; many wildcards use the automaton, which must
    agree with the plain regex on every small case (and is linear: the regex backtracked for
    seconds on "*a*a*a*a*a*a*a*b" against a 60-character name)."""
    import random
    import re

    from tmmail.imap.names import _compile, _Glob, list_pattern

    def reference(p: str) -> bool:
        return re.compile("".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c)
                                  for c in p) + r"\Z", re.S)

    rnd = random.Random(7)
    for _ in range(5000):
        p = "".join(rnd.choice("ab/*%") for _ in range(rnd.randint(0, 9)))
        n = "".join(rnd.choice("ab/") for _ in range(rnd.randint(0, 9)))
        collapsed: list[str] = []
        for ch in p:
            if ch in "*%" and collapsed and collapsed[-1] in "*%":
                collapsed[-1] = "*" if ch == "*" else collapsed[-1]
                continue
            collapsed.append(ch)
        assert _Glob(collapsed).match(n) == bool(reference(p).match(n)), (p, n)
    slow = _compile("*a*a*a*a*a*a*a*b")
    assert isinstance(slow, _Glob)
    assert not slow.match("a" * 5000) and slow.match("a" * 5000 + "b")
    assert list_pattern("", "inbox/%").match("INBOX/Sent")
    assert not list_pattern("", "%").match("A/B") and list_pattern("", "*").match("A/B")
    assert list_pattern("Work/", "%%%").match("Work/Projects")

"""Hostile input against the SMTP server: smuggling, long lines, no CRLF, STARTTLS injection, relay tricks.

Every defect of Twisted's ESMTP listed in the survey (§1.4-1.6) has a test here that would fail
on it; each test checks the replies and what landed in the spool.
"""

from __future__ import annotations

import smtplib

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from tests.smtpharness import Harness, Raw, client_tls


@pytest.fixture
def h(tmp_path, reactor_thread):
    harness = Harness(tmp_path, reactor_thread)
    yield harness
    harness.stop()


@pytest.fixture
def server_errors():
    """Events the SMTP server logs with a traceback or at error level or above ("no traceback")."""
    events = []

    def observe(event):
        if str(event.get("log_namespace", "")).startswith("tmmail.smtp") and (
            "log_failure" in event or event.get("log_level", LogLevel.info) >= LogLevel.error
        ):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def session(port, rcpt=b"alice@example.com"):
    r = Raw(port)
    assert r.reply().startswith(b"220")
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n")
    replies = r.replies(4)
    assert replies[3].startswith(b"354"), replies
    return r


def still_serves(port):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("c")
        return s.noop()[0] == 250


# -- DATA: smuggling, bare CR/LF, long lines ---------------------------------------------------


@pytest.mark.parametrize(
    "ending",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"],
    ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CR", "CR.CRLF", "CRLF.CR"],
)
def test_smuggling_end_of_data_variants_deliver_nothing(h, ending):
    port = h.start("smtp")
    r = session(port)
    r.send(b"Subject: first\r\n\r\nbody" + ending
           + b"MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
           + b"Subject: SMUGGLED\r\n\r\nx\r\n.\r\n")
    # the only end of data is the final <CRLF>.<CRLF>: one reply, a refusal
    assert r.reply() == b"550 5.6.2 Bare CR or LF not allowed"
    r.send(b"NOOP\r\n")
    assert r.reply() == b"250 2.0.0 Ok"
    r.close()
    assert h.incoming() == [] and h.tmp_files() == []


def test_bare_lf_inside_a_line_refused(h):
    port = h.start("smtp")
    r = session(port)
    r.send(b"Subject: x\r\n\r\nline1\nline2\r\n.\r\n")
    assert r.reply() == b"550 5.6.2 Bare CR or LF not allowed"
    r.close()
    assert h.incoming() == []


def test_long_line_in_data_does_not_smuggle_a_second_message(h):
    port = h.start("smtp")
    r = session(port)
    r.send(b"Subject: long\r\n\r\n" + b"A" * 20000 + b"\r\n"
           + b".\r\nMAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
           + b"Subject: SMUGGLED\r\n\r\nx\r\n.\r\n")
    # <CRLF>.<CRLF> after the long line ends the data: the rest are real commands of this client
    assert r.reply() == b"500 5.5.2 Line too long"
    replies = r.replies(4)
    assert [x[:3] for x in replies] == [b"250", b"250", b"354", b"250"]
    r.close()
    # only the client's second (well-formed) message was stored, never the over-long one
    [(env, eml)] = h.incoming()
    assert [x.address for x in env.recipients] == ["bob@example.com"]
    assert b"AAAA" not in eml


def test_long_line_then_more_body_stays_data(h):
    port = h.start("smtp")
    r = session(port)
    r.send(b"A" * 5000 + b"\r\nMAIL FROM:<smuggled@evil.example>\r\nQUIT\r\n.\r\n")
    assert r.reply() == b"500 5.5.2 Line too long"
    r.send(b"NOOP\r\n")
    assert r.reply() == b"250 2.0.0 Ok"
    r.close()
    assert h.incoming() == []


def test_data_without_any_crlf_is_bounded_and_answered(h):
    port = h.start("smtp")
    r = session(port)
    chunk = b"x" * 65536
    for _ in range(64):  # 4 MiB without a single line end
        r.send(chunk)
    r.send(b"\r\n.\r\n")
    assert r.reply() == b"500 5.5.2 Line too long"
    r.close()
    assert h.incoming() == [] and still_serves(port)


def test_data_that_never_ends_is_closed(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread, smtp={"max_message_size": 100000})
    port = h.start("smtp")
    r = session(port)
    line = b"y" * 998 + b"\r\n"
    try:
        for _ in range(400):  # 400 kB > 2 x max_message_size
            r.send(line)
    except OSError:
        pass  # the server may already have closed
    assert r.reply().startswith(b"421 4.7.0")
    assert r.closed()
    assert h.incoming() == [] and h.tmp_files() == []
    h.stop()


# -- commands: long lines, no CRLF -------------------------------------------------------------


def test_command_line_too_long(h):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<" + b"a" * 3000 + b"@remote.test>\r\nNOOP\r\n")
    assert r.replies(3)[1:] == [b"500 5.5.2 Line too long", b"250 2.0.0 Ok"]
    r.close()


def test_commands_without_crlf_bounded_memory_and_closed(h):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    try:
        for _ in range(64):  # 4 MiB, no line end at all
            r.send(b"z" * 65536)
    except OSError:
        pass
    assert r.reply() == b"500 5.5.2 Line too long"
    assert r.reply().startswith(b"421 4.7.0")
    assert r.closed()
    assert still_serves(port)


def test_bare_lf_command_is_refused_not_run(h):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\nMAIL FROM:<x@remote.test>\r\n")
    # the bare LF ends a broken line (refused); the next line is a command on its own
    assert r.reply() == b"500 5.5.2 Bare CR or LF not allowed; commands end with CRLF"
    assert r.reply() == b"503 5.5.1 Error: send HELO/EHLO first"
    r.close()


# -- STARTTLS -----------------------------------------------------------------------------


def test_starttls_plaintext_injection_is_discarded(h):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\n")
    r.reply()
    r.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<alice@example.com>\r\n")
    assert r.reply() == b"220 2.0.0 Ready to start TLS"
    r.starttls()
    # nothing of the injected commands survives, and EHLO state is forgotten (RFC 3207 §4.2)
    r.send(b"RCPT TO:<alice@example.com>\r\n")
    assert r.reply() == b"503 5.5.1 Error: need MAIL command"
    r.send(b"MAIL FROM:<x@remote.test>\r\n")
    assert r.reply() == b"503 5.5.1 Error: send HELO/EHLO first"
    r.send(b"EHLO c\r\n")
    ehlo = r.reply()
    assert b"STARTTLS" not in ehlo and b"AUTH PLAIN LOGIN" in ehlo
    r.send(b"STARTTLS\r\n")
    assert r.reply() == b"503 5.5.1 Error: TLS already active"
    r.close()


def test_starttls_resets_transaction_and_protocol_is_esmtps(h):
    port = h.start("smtp")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("c")
        s.mail("x@remote.test")
        s.starttls(context=client_tls())
        s.ehlo("c")
        assert s.rcpt("alice@example.com")[0] == 503  # the MAIL before TLS is gone
        s.mail("x@remote.test")
        s.rcpt("alice@example.com")
        assert s.data(b"Subject: tls\r\n\r\nx\r\n")[0] == 250
    [(env, eml)] = h.incoming()
    assert env.protocol == "ESMTPS" and b"with ESMTPS id" in eml


def test_no_starttls_without_context(h):
    port = h.start("smtp", tls=False)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("c")
        assert "starttls" not in s.esmtp_features
        assert s.docmd("STARTTLS") == (454, b"4.7.0 TLS not available")


# -- relay tricks over the wire -----------------------------------------------------------------


RELAY_TRICKS = [
    b"user%remote.test@example.com",
    b"@example.com:user@remote.test",
    b'"user@remote.test"@example.com',
    b"remote.test!user@example.com",
    b"user@[127.0.0.1]",
]


@pytest.mark.parametrize("trick", RELAY_TRICKS)
def test_relay_tricks_refused_over_smtp(h, trick):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<" + trick + b">\r\nDATA\r\n")
    replies = r.replies(4)
    assert replies[2].startswith(b"554 5.7.1 <") and replies[2].endswith(b">: Relay access denied")
    assert replies[3] == b"554 5.5.1 Error: no valid recipients"
    r.close()
    assert h.incoming() == []


@pytest.mark.parametrize(
    "bad",
    [b"user@remote.test@example.com", b"alice@example.com.", b"alice@example.com.."],
)
def test_malformed_relay_attempts_are_syntax_errors(h, bad):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<" + bad + b">\r\n")
    assert r.replies(3)[2] == b"501 5.1.3 Bad recipient address syntax"
    r.close()


def test_address_literals_are_checked_over_smtp(h, server_errors):
    """RFC 5321 §4.1.3: only [IPv4], [IPv6:addr] and [tag:content] are address literals;
    anything else in brackets is a syntax error for the sender (501 5.1.7) and the recipient
    (501 5.1.3).  A valid literal stays a valid sender and, as a recipient, a refused relay."""
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\n")
    r.reply()
    bad = [b"anything", b"192.0.2.300", b"IPv6:zz::1", b"IPv6:fe80::1%eth0", b"1.2.3", b"", b"IPv6:1:2:3:4:5:6:7::"]
    for literal in bad:
        r.send(b"MAIL FROM:<a@[" + literal + b"]>\r\n")
        assert r.reply() == b"501 5.1.7 Bad sender address syntax", literal
    # str.isdigit() reads Arabic-Indic digits as digits: not with or without SMTPUTF8
    r.send("MAIL FROM:<a@[\u0661\u0669\u0662.0.2.1]>\r\nMAIL FROM:<a@[\u0661\u0669\u0662.0.2.1]> SMTPUTF8\r\n"
           .encode())
    assert r.replies(2) == [b"501 5.1.7 Bad sender address syntax"] * 2
    r.send(b"MAIL FROM:<a@[192.0.2.1]>\r\n")
    assert r.reply() == b"250 2.1.0 Ok"
    for literal in bad:
        r.send(b"RCPT TO:<user@[" + literal + b"]>\r\n")
        assert r.reply() == b"501 5.1.3 Bad recipient address syntax", literal
    for literal in (b"192.0.2.1", b"IPv6:2001:db8::1", b"IPv6:::ffff:192.0.2.1"):
        r.send(b"RCPT TO:<user@[" + literal + b"]>\r\n")
        assert r.reply() == b"554 5.7.1 <user@[" + literal.lower() + b"]>: Relay access denied"
    r.send(b"RCPT TO:<alice@example.com>\r\n")
    assert r.reply() == b"250 2.1.5 Ok"  # the session goes on
    r.close()
    assert server_errors == []


def test_lookalike_domains_over_smtp(h):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\n")
    r.reply()
    r.send("MAIL FROM:<x@remote.test> SMTPUTF8\r\nRCPT TO:<alice@exаmple.com>\r\n"
           "RCPT TO:<alice@ｅｘａｍｐｌｅ.com>\r\nRCPT TO:<alice@EXAMPLE.COM>\r\n".encode())
    replies = r.replies(4)
    assert replies[1] == b"554 5.7.1 <alice@xn--exmple-4nf.com>: Relay access denied"
    assert replies[2] == b"501 5.1.3 Bad recipient address syntax"
    assert replies[3] == b"250 2.1.5 Ok"  # plain case difference: the hosted domain itself
    r.close()


def test_relay_allowed_for_access_ip_only(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread, tables={"SMTP-ACCESS.tab": "127.0.0.0/8\t1\n"})
    port = h.start("smtp")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("c")
        s.mail("x@remote.test")
        assert s.rcpt("y@remote.test")[0] == 250
        # tricks stay refused even for a trusted client
        assert s.docmd("RCPT TO:<user%elsewhere.test@example.com>")[0] == 553
        assert s.data(b"Subject: relay\r\n\r\nx\r\n")[0] == 250
    h.stop()
    [(env, _)] = h.incoming()
    assert [r.address for r in env.recipients] == ["y@remote.test"]


def test_anti_spoofing_over_smtp(h):
    port = h.start("smtp")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("c")
        code, text = s.mail("alice@example.com")
        assert code == 550 and text.startswith(b"5.7.1")
        assert s.mail("someone@example.org")[0] == 250  # anti_spoofing=0 for that domain


def test_blacklisted_sender_over_smtp(h):
    port = h.start("smtp")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("c")
        assert s.mail("x@spam.example")[0] == 554
        assert s.mail("x@banned-for-acme.example")[0] == 250
        assert s.rcpt("alice@example.com")[0] == 554
        assert s.rcpt("carol@other.test")[0] == 250


# -- ESMTP arguments: only ASCII digits are digits ------------------------------------------------

#: str.isdigit() is true for all of these; int() raises for some and accepts the others
UNICODE_DIGITS = [b"\xc2\xb2", b"\xd9\xa1\xd9\xa2", b"\xef\xbc\x91", b"\xe2\x91\xa0", b"1\xc2\xb2", b"\xdb\xb5"]
UNICODE_DIGIT_IDS = ["superscript-2", "arabic-indic-12", "fullwidth-1", "circled-1", "1-superscript-2",
                     "extended-arabic-5"]


@pytest.mark.parametrize("size", UNICODE_DIGITS, ids=UNICODE_DIGIT_IDS)
def test_bdat_size_in_unicode_digits_closes_like_any_bad_size(h, server_errors, size):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.com>\r\n")
    assert [x[:3] for x in r.replies(3)] == [b"250", b"250", b"250"]
    # RFC 3030: the server cannot know where such a chunk ends, so none of what follows may
    # run as a command -- one 501, then the connection closes, as for "BDAT 1x"
    r.send(b"BDAT " + size + b" LAST\r\nRSET\r\nNOOP\r\nMAIL FROM:<y@remote.test>\r\n")
    assert r.reply() == b"501 5.5.4 Syntax: BDAT size [LAST]"
    assert r.closed()
    assert r.buf == b""
    h.stop()
    assert h.incoming() == [] and h.tmp_files() == []
    assert server_errors == []


def test_bdat_with_unicode_digits_closes_even_without_a_transaction(h, server_errors):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nBDAT \xd9\xa1\r\nXNOOP\r\n")  # with "BDAT 1" the X would be the chunk
    assert r.replies(2)[1] == b"501 5.5.4 Syntax: BDAT size [LAST]"
    assert r.closed() and r.buf == b""
    assert server_errors == []


def test_bdat_last_marker_must_be_ascii(h, server_errors):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.com>\r\n")
    r.replies(3)
    # "LA\u017fT".upper() == "LAST" (long s); the old check upper-cased before comparing
    r.send(b"BDAT 3 LA\xc5\xbfT\r\nX\r\nNOOP\r\n")
    assert r.reply() == b"501 5.5.4 Syntax: BDAT size [LAST]"
    assert r.closed()
    h.stop()
    assert h.incoming() == [] and h.tmp_files() == [] and server_errors == []


def test_bdat_ascii_sizes_and_lower_case_last_still_work(h, server_errors):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.com>\r\n")
    r.replies(3)
    r.send(b"BDAT 004\r\nSubjBDAT 10 last\r\nect: x\r\n\r\n")
    assert r.reply() == b"250 2.0.0 4 octets received"
    assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
    r.send(b"NOOP\r\n")
    assert r.reply() == b"250 2.0.0 Ok"
    r.close()
    h.stop()
    [(env, eml)] = h.incoming()
    assert eml.endswith(b"\nSubject: x\n\n") and server_errors == []


def test_bdat_chunk_is_read_and_answered_once_when_starting_it_raises(h, server_errors):
    port = h.start("smtp")
    h.factories["smtp"].spool = BrokenSpool()
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.com>\r\n")
    r.replies(3)
    r.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")  # the chunk is "QUIT\r\n": never run
    assert r.reply() == b"451 4.3.0 Error: internal server error, try again later"
    assert r.reply() == b"250 2.0.0 Ok"
    r.send(b"RCPT TO:<alice@example.com>\r\n")
    assert r.reply() == b"503 5.5.1 Error: need MAIL command"  # the transaction is gone
    r.close()
    h.stop()
    assert h.incoming() == []
    assert [e["log_format"] for e in server_errors] == ["error starting a BDAT chunk from {client_ip}"]


class BrokenSpool:
    """A spool whose open_message has a bug (not an OSError)."""

    def open_message(self):
        raise RuntimeError("spool bug")


# -- MAIL/RCPT parameters: 501 5.5.4 for a syntax error, 555 5.5.4 for an unknown one -------------

MAIL_PARAMETER_ERRORS = [
    (b"SIZE=", b"501 5.5.4 Syntax error in parameter SIZE"),
    (b"SIZE", b"501 5.5.4 Syntax error in parameter SIZE"),
    (b"SIZE=-1", b"501 5.5.4 Syntax error in parameter SIZE"),
    (b"SIZE=" + b"9" * 21, b"501 5.5.4 Syntax error in parameter SIZE"),
    (b"RET=FULL RET=HDRS", b"501 5.5.4 Duplicate parameter RET"),
    (b"size=1 SIZE=1", b"501 5.5.4 Duplicate parameter SIZE"),
    (b"RET=ALL", b"501 5.5.4 Syntax error in parameter RET"),
    (b"ENVID=a+zz", b"501 5.5.4 Syntax error in parameter ENVID"),
    (b"ENVID=" + b"x" * 101, b"501 5.5.4 Syntax error in parameter ENVID"),
    (b"BODY=", b"501 5.5.4 Syntax error in parameter BODY"),
    (b"BODY=9BIT", b"501 5.5.4 Syntax error in parameter BODY"),
    (b"SMTPUTF8=yes", b"501 5.5.4 Syntax error in parameter SMTPUTF8"),
    (b"=x", b"501 5.5.4 Syntax error in parameter =x"),
    (b"A=b=c", b"501 5.5.4 Syntax error in parameter A"),
    (b"FOO=BAR", b"555 5.5.4 Unsupported parameter FOO"),
    (b"MT-PRIORITY=1", b"555 5.5.4 Unsupported parameter MT-PRIORITY"),
    (b"HOLDFOR=10", b"555 5.5.4 Unsupported parameter HOLDFOR"),
    (b"BODY=BINARYMIME", b"555 5.5.4 Unsupported parameter BODY=BINARYMIME"),
    (b"AUTH=<>", b"555 5.5.4 Unsupported parameter AUTH"),  # AUTH is not offered before TLS
]


@pytest.mark.parametrize("params,reply", MAIL_PARAMETER_ERRORS, ids=[p.decode()[:20] for p, _ in MAIL_PARAMETER_ERRORS])
def test_mail_parameter_errors_are_5_5_4_and_the_session_goes_on(h, server_errors, params, reply):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test> " + params + b"\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    # no transaction was started: RCPT and DATA are refused, nothing reaches the spool
    assert r.replies(4)[1:] == [reply, b"503 5.5.1 Error: need MAIL command", b"503 5.5.1 Error: need MAIL command"]
    r.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    assert [x[:3] for x in r.replies(3)] == [b"250", b"250", b"354"]
    r.send(b"Subject: after\r\n\r\nx\r\n.\r\n")
    assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
    r.close()
    h.stop()
    [(env, _)] = h.incoming()
    assert env.mail_params == {}
    assert server_errors == []


RCPT_PARAMETER_ERRORS = [
    (b"NOTIFY=", b"501 5.5.4 Syntax error in parameter NOTIFY"),
    (b"NOTIFY", b"501 5.5.4 Syntax error in parameter NOTIFY"),
    (b"NOTIFY=MAYBE", b"501 5.5.4 Syntax error in parameter NOTIFY"),
    (b"NOTIFY=NEVER,SUCCESS", b"501 5.5.4 Syntax error in parameter NOTIFY"),
    (b"NOTIFY=NEVER NOTIFY=NEVER", b"501 5.5.4 Duplicate parameter NOTIFY"),
    (b"ORCPT=rfc822;a+ZZ", b"501 5.5.4 Syntax error in parameter ORCPT"),
    (b"ORCPT=", b"501 5.5.4 Syntax error in parameter ORCPT"),
    (b"ORCPT=noseparator", b"501 5.5.4 Syntax error in parameter ORCPT"),
    # RFC 3461 §4.2: xtext for every address type, not only rfc822; raw UTF-8 only with SMTPUTF8
    ("ORCPT=x400;j\u00f6e".encode(), b"501 5.5.4 Syntax error in parameter ORCPT"),
    ("ORCPT=utf-8;j\u00f6e@example.com".encode(), b"501 5.5.4 Syntax error in parameter ORCPT"),
    (b"ORCPT=x-local;a+zz", b"501 5.5.4 Syntax error in parameter ORCPT"),
    (b"ORCPT=utf-8;a\\b", b"501 5.5.4 Syntax error in parameter ORCPT"),
    (b"FOO=BAR", b"555 5.5.4 Unsupported parameter FOO"),
    (b"SIZE=1", b"555 5.5.4 Unsupported parameter SIZE"),
    (b"SMTPUTF8", b"555 5.5.4 Unsupported parameter SMTPUTF8"),
]


@pytest.mark.parametrize("params,reply", RCPT_PARAMETER_ERRORS, ids=[p.decode()[:20] for p, _ in RCPT_PARAMETER_ERRORS])
def test_rcpt_parameter_errors_are_5_5_4_and_the_recipient_is_not_added(h, server_errors, params, reply):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<bob@example.com> " + params + b"\r\n"
           b"RCPT TO:<alice@example.com>\r\nDATA\r\n")
    replies = r.replies(5)
    assert replies[2:] == [reply, b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>"]
    r.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
    assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
    r.close()
    h.stop()
    [(env, _)] = h.incoming()
    assert [x.address for x in env.recipients] == ["alice@example.com"]  # never bob
    assert server_errors == []


def test_orcpt_utf8_forms_over_smtp(h, server_errors):
    """RFC 6533 §3: ORCPT=utf-8; takes utf-8-addr-xtext always and raw UTF-8 only in an SMTPUTF8
    transaction; any other address type is xtext (ASCII) even with SMTPUTF8."""
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send("EHLO c\r\nMAIL FROM:<x@remote.test> SMTPUTF8\r\n"
           "RCPT TO:<alice@example.com> ORCPT=utf-8;j\u00f6e@example.com\r\n"
           "RCPT TO:<bob@example.com> ORCPT=x400;j\u00f6e\r\n"
           "RCPT TO:<bob@example.com> ORCPT=rfc822;j\u00f6e@example.com\r\n"
           "DATA\r\n".encode())
    assert r.replies(6)[2:] == [b"250 2.1.5 Ok", b"501 5.5.4 Syntax error in parameter ORCPT",
                                b"501 5.5.4 Syntax error in parameter ORCPT", b"354 End data with <CR><LF>.<CR><LF>"]
    r.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
    assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
    r.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.com> ORCPT=utf-8;j\\x{F6}e@example.com\r\n"
           b"RCPT TO:<bob@example.com> ORCPT=utf-8;j\xc3\xb6e@example.com\r\nDATA\r\n")
    assert r.replies(4) == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"501 5.5.4 Syntax error in parameter ORCPT",
                            b"354 End data with <CR><LF>.<CR><LF>"]
    r.send(b"Subject: y\r\n\r\ny\r\n.\r\n")
    assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
    r.close()
    h.stop()
    orcpts = sorted(rc.orcpt for env, _ in h.incoming() for rc in env.recipients)
    assert orcpts == ["utf-8;j\\x{F6}e@example.com", "utf-8;j\u00f6e@example.com"]
    assert server_errors == []


def test_a_bad_address_is_still_an_address_error(h, server_errors):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@@remote.test> SIZE=10\r\nMAIL FROM:<x@remote.test> SIZE=10\r\n"
           b"RCPT TO:<alice@example.com.> NOTIFY=NEVER\r\nRCPT TO:<alice@example.com>SIZE=1\r\n")
    assert r.replies(5)[1:] == [b"501 5.1.7 Bad sender address syntax", b"250 2.1.0 Ok",
                                b"501 5.1.3 Bad recipient address syntax", b"501 5.1.3 Bad recipient address syntax"]
    r.close()
    assert server_errors == []


def test_parameters_after_helo_are_unsupported(h, server_errors):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"HELO c\r\nMAIL FROM:<x@remote.test> SIZE=10\r\nMAIL FROM:<x@remote.test>\r\n"
           b"RCPT TO:<alice@example.com> NOTIFY=NEVER\r\n")
    assert r.replies(4)[1:] == [b"555 5.5.4 Unsupported parameter SIZE", b"250 2.1.0 Ok",
                                b"555 5.5.4 Unsupported parameter NOTIFY"]
    r.close()
    assert server_errors == []


@pytest.mark.parametrize("size", UNICODE_DIGITS, ids=UNICODE_DIGIT_IDS)
def test_mail_size_in_unicode_digits_is_a_syntax_error(h, server_errors, size):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    # port 25, no login: "SIZE=²" made int() raise (451 4.3.0 and a critical traceback) and
    # "SIZE=١٢" was taken as 12
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test> SIZE=" + size + b"\r\nRCPT TO:<alice@example.com>\r\n")
    assert r.replies(3)[1:] == [b"501 5.5.4 Syntax error in parameter SIZE", b"503 5.5.1 Error: need MAIL command"]
    r.send(b"MAIL FROM:<x@remote.test> SIZE=12\r\nRCPT TO:<alice@example.com>\r\nBDAT 14 LAST\r\nSubject: x\r\n\r\n")
    assert [x[:3] for x in r.replies(2)] == [b"250", b"250"]
    assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
    r.close()
    h.stop()
    [(env, _)] = h.incoming()
    assert env.mail_params == {"SIZE": "12"}
    assert server_errors == []


# -- keywords are ASCII: str.upper() maps "ı" to I, "ſ" to S, "ﬆ" to ST ----------------------------


def test_verbs_that_only_upper_case_to_a_command_are_unknown(h, server_errors):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send("EHLO c\r\nMAıL FROM:<x@remote.test>\r\nﬆARTTLS\r\nRſET\r\nQUıT\r\nMAIL FROM:<x@remote.test>\r\n"
           "RCPT TO:<alice@example.com>\r\n".encode())
    replies = r.replies(7)
    assert replies[1:5] == [b"500 5.5.2 Error: command not recognized"] * 4
    assert replies[5:] == [b"250 2.1.0 Ok", b"250 2.1.5 Ok"]  # still open, no TLS, no transaction reset
    r.close()
    assert server_errors == []


@pytest.mark.parametrize("param", ["BODY=7BıT", "BODY=8bıtmıme", "RET=HDRſ", "RET=hdrſ"],
                         ids=["7bit", "8bitmime", "hdrs", "lower-hdrs"])
def test_mail_parameter_values_that_only_upper_case_to_a_keyword_are_refused(h, server_errors, param):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(f"EHLO c\r\nMAIL FROM:<x@remote.test> {param}\r\nMAIL FROM:<x@remote.test>\r\n".encode())
    name = param.split("=")[0].encode()
    assert r.replies(3)[1:] == [b"501 5.5.4 Syntax error in parameter " + name, b"250 2.1.0 Ok"]
    r.close()
    assert server_errors == []


def test_notify_words_that_only_upper_case_to_a_keyword_are_refused(h, server_errors):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send("EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<bob@example.com> NOTIFY=ſucceſſ\r\n"
           "RCPT TO:<bob@example.com> NOTIFY=faılure\r\nRCPT TO:<alice@example.com> NOTIFY=success\r\n".encode())
    assert r.replies(5)[2:] == [b"501 5.5.4 Syntax error in parameter NOTIFY"] * 2 + [b"250 2.1.5 Ok"]
    r.close()
    assert server_errors == []


def test_auth_mechanism_must_be_ascii(tmp_path, reactor_thread, server_errors):
    h = Harness(tmp_path, reactor_thread, smtp={"allow_plaintext_auth": True})
    port = h.start("submission", tls=False)
    r = Raw(port)
    r.reply()
    r.send("EHLO c\r\nAUTH PLAıN\r\nAUTH LOGıN\r\nAUTH plain\r\n".encode())
    assert r.replies(4)[1:] == [b"504 5.5.4 Unrecognized authentication mechanism"] * 2 + [b"334 "]
    r.send(b"*\r\n")
    assert r.reply() == b"501 5.0.0 Authentication cancelled"
    r.close()
    h.stop()
    assert server_errors == []

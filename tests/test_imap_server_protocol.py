"""IMAP protocol engine over real sockets: greeting and capabilities, STARTTLS (and the
plaintext-injection defence), LOGINDISABLED, LOGIN / AUTHENTICATE PLAIN (SASL-IR, continuation,
cancel), literals (synchronising, LITERAL+, too big), line limits, BAD recovery, ID, ENABLE,
NAMESPACE, IDLE's DONE handling, timeouts and per-IP limits."""

from __future__ import annotations

import base64
import imaplib
import socket
import time

import pytest

from tests.imap_fixtures import (
    PASSWORD,
    client_tls,
    raw_session,
    read_until_tag,
    start_imap,
    stop_imap,
)


@pytest.fixture
def env(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path)
    yield e
    stop_imap(reactor_thread, e)


@pytest.fixture
def strict_env(reactor_thread, tmp_path):
    """Plaintext auth not allowed before TLS (the production default)."""
    e = start_imap(reactor_thread, tmp_path, imap={"allow_plaintext_auth": False})
    yield e
    stop_imap(reactor_thread, e)


EXPECTED = ["IMAP4REV1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UIDPLUS",
            "MOVE", "UNSELECT", "CHILDREN", "LIST-EXTENDED", "LIST-STATUS", "SPECIAL-USE", "QUOTA", "CONDSTORE", "QRESYNC"]


def test_greeting_carries_capabilities_and_plain_port_offers_starttls(strict_env):
    s, f = raw_session(strict_env)
    s.sendall(b"a CAPABILITY\r\n")
    lines = read_until_tag(f, b"a")
    caps = lines[0].decode().split()
    for cap in EXPECTED + ["STARTTLS", "LOGINDISABLED"]:
        assert cap.upper() in [c.upper() for c in caps], cap
    assert "AUTH=PLAIN" not in caps
    s.close()


def test_logindisabled_refuses_login_and_authenticate_before_tls(strict_env):
    m = imaplib.IMAP4("127.0.0.1", strict_env.port, timeout=10)
    assert "LOGINDISABLED" in m.capabilities
    s, f = raw_session(strict_env)
    s.sendall(b"a LOGIN alice@example.com \"" + PASSWORD.encode() + b"\"\r\n")
    assert read_until_tag(f, b"a")[-1].startswith(b"a NO [PRIVACYREQUIRED]")
    ir = base64.b64encode(b"\0alice@example.com\0" + PASSWORD.encode())
    s.sendall(b"b AUTHENTICATE PLAIN " + ir + b"\r\n")
    assert read_until_tag(f, b"b")[-1].startswith(b"b NO [PRIVACYREQUIRED]")
    s.close()
    # after STARTTLS the same login works and AUTH=PLAIN is offered
    m.starttls(client_tls())
    m._get_capabilities()
    assert "AUTH=PLAIN" in m.capabilities and "LOGINDISABLED" not in m.capabilities
    assert "STARTTLS" not in m.capabilities
    typ, data = m.login("alice@example.com", PASSWORD)
    assert typ == "OK" and b"CAPABILITY" in data[0]
    m.logout()


def test_starttls_discards_pipelined_plaintext(strict_env):
    """RFC 3501 §6.2.1 / CVE-2011-0411 style injection: commands sent before the TLS
    handshake must not be executed inside the TLS session."""
    s, f = raw_session(strict_env)
    s.sendall(b"a STARTTLS\r\nb LOGIN alice@example.com \"x\"\r\nc CAPABILITY\r\n")
    assert f.readline().startswith(b"a OK")
    tls = client_tls().wrap_socket(s, server_hostname="localhost")
    tf = tls.makefile("rb")
    tls.sendall(b"d NOOP\r\n")
    line = tf.readline()
    # the injected b/c commands got no answers: the first reply is for d
    assert line.startswith(b"d OK"), line
    tls.close()


def test_implicit_tls_role(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path, role="imaps", imap={"allow_plaintext_auth": False})
    try:
        m = imaplib.IMAP4_SSL("127.0.0.1", e.port, ssl_context=client_tls(), timeout=10)
        assert "AUTH=PLAIN" in m.capabilities
        assert "STARTTLS" not in m.capabilities and "LOGINDISABLED" not in m.capabilities
        m.login("alice@example.com", PASSWORD)
        m.logout()
    finally:
        stop_imap(reactor_thread, e)


def test_login_success_and_failure(env):
    s, f = raw_session(env)
    s.sendall(b"a LOGIN alice@example.com wrong\r\n")
    assert read_until_tag(f, b"a")[-1].startswith(b"a NO [AUTHENTICATIONFAILED]")
    s.sendall(b"b SELECT INBOX\r\n")
    assert read_until_tag(f, b"b")[-1].startswith(b"b BAD")
    s.sendall(b'c LOGIN "alice@example.com" "' + PASSWORD.encode() + b'"\r\n')
    last = read_until_tag(f, b"c")[-1]
    assert last.startswith(b"c OK [CAPABILITY IMAP4rev1"), last
    s.sendall(b"d LOGIN alice@example.com x\r\n")
    assert read_until_tag(f, b"d")[-1].startswith(b"d BAD")
    s.close()


def test_login_with_literal_password(env):
    s, f = raw_session(env)
    pw = PASSWORD.encode()
    s.sendall(b"a LOGIN alice@example.com {%d}\r\n" % len(pw))
    assert f.readline().startswith(b"+ ")
    s.sendall(pw + b"\r\n")
    assert read_until_tag(f, b"a")[-1].startswith(b"a OK")
    s.close()


def test_login_blocked_after_many_failures(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path, auth={"free_failures": 100, "block_after": 2,
                                                   "base_delay": 0.0})
    try:
        s, f = raw_session(e)
        for i in range(2):
            s.sendall(b"a%d LOGIN alice@example.com nope\r\n" % i)
            read_until_tag(f, b"a%d" % i)
        s.sendall(b'z LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
        assert read_until_tag(f, b"z")[-1].startswith(b"z NO [UNAVAILABLE]")
        s.close()
    finally:
        stop_imap(reactor_thread, e)


def test_authenticate_plain_sasl_ir_continuation_and_cancel(env):
    cred = base64.b64encode(b"\0alice@example.com\0" + PASSWORD.encode())
    s, f = raw_session(env)
    s.sendall(b"a AUTHENTICATE PLAIN\r\n")
    assert f.readline() == b"+ \r\n"
    s.sendall(b"*\r\n")
    assert read_until_tag(f, b"a")[-1].startswith(b"a BAD")
    s.sendall(b"b AUTHENTICATE PLAIN\r\n")
    assert f.readline() == b"+ \r\n"
    s.sendall(b"%%%notbase64\r\n")
    assert read_until_tag(f, b"b")[-1].startswith(b"b BAD")
    s.sendall(b"c AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice@example.com\0bad") + b"\r\n")
    assert read_until_tag(f, b"c")[-1].startswith(b"c NO [AUTHENTICATIONFAILED]")
    s.sendall(b"d AUTHENTICATE PLAIN\r\n")
    assert f.readline() == b"+ \r\n"
    s.sendall(cred + b"\r\n")
    assert read_until_tag(f, b"d")[-1].startswith(b"d OK [CAPABILITY")
    s.close()
    s, f = raw_session(env)
    s.sendall(b"e AUTHENTICATE PLAIN " + cred + b"\r\n")  # SASL-IR
    assert read_until_tag(f, b"e")[-1].startswith(b"e OK")
    s.sendall(b"f AUTHENTICATE XOAUTH2 abc\r\n")
    assert read_until_tag(f, b"f")[-1].startswith(b"f BAD")  # already authenticated
    s.close()


def test_unknown_mechanism(env):
    s, f = raw_session(env)
    s.sendall(b"a AUTHENTICATE CRAM-MD5\r\n")
    assert read_until_tag(f, b"a")[-1].startswith(b"a NO")
    s.close()


def test_imapclient_login_uses_sasl_plain(env):
    from imapclient import IMAPClient

    c = IMAPClient("127.0.0.1", port=env.port, ssl=False, timeout=10)
    c.plain_login("alice@example.com", PASSWORD)
    info = c.id_({"name": "pytest"})[0]
    assert dict(zip(info[::2], info[1::2]))[b"name"] == b"TMmail"
    assert c.namespace().personal == (("", "/"),)
    c.logout()


def test_malformed_commands_get_bad_and_session_continues(env):
    s, f = raw_session(env)
    s.sendall(b"a FROBNICATE\r\n")
    assert read_until_tag(f, b"a")[-1].startswith(b"a BAD")
    s.sendall(b"b NOOP (\r\n")
    assert read_until_tag(f, b"b")[-1].startswith(b"b BAD")
    s.sendall(b"c\r\n")
    assert read_until_tag(f, b"c")[-1].startswith(b"c BAD")
    s.sendall(b"+bad NOOP\r\n")
    assert f.readline().startswith(b"* BAD")
    s.sendall(b'd LOGIN "unterminated\r\n')
    assert read_until_tag(f, b"d")[-1].startswith(b"d BAD")
    s.sendall(b"e FETCH 1 FLAGS\r\n")
    assert read_until_tag(f, b"e")[-1].startswith(b"e BAD")
    s.sendall(b"f NOOP\r\n")
    assert read_until_tag(f, b"f")[-1].startswith(b"f OK")
    s.close()


def test_line_too_long_gets_bad_and_session_continues(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path, imap={"max_line_length": 1000})
    try:
        s, f = raw_session(e)
        s.sendall(b"a NOOP " + b"x" * 5000 + b"\r\nb NOOP\r\n")
        first = f.readline()
        assert first.startswith(b"a BAD"), first
        assert read_until_tag(f, b"b")[-1].startswith(b"b OK")
        s.close()
    finally:
        stop_imap(reactor_thread, e)


def test_literal_too_big_sync_and_nonsync(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path, imap={"max_literal_size": 1000})
    try:
        s, f = raw_session(e)
        s.sendall(b'a LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
        read_until_tag(f, b"a")
        # synchronising: refused before the client sends the data
        s.sendall(b"b APPEND INBOX {5000}\r\n")
        assert read_until_tag(f, b"b")[-1].startswith(b"b NO [TOOBIG]")
        # LITERAL+: the announced bytes are read and thrown away, the session goes on
        s.sendall(b"c APPEND INBOX {3000+}\r\n" + b"y" * 3000 + b"\r\nd NOOP\r\n")
        assert read_until_tag(f, b"c")[-1].startswith(b"c NO [TOOBIG]")
        assert read_until_tag(f, b"d")[-1].startswith(b"d OK")
        # non-APPEND literals are limited by the line length
        s.sendall(b"e LOGIN {100000+}\r\n" + b"z" * 100000 + b" x\r\nf NOOP\r\n")
        assert read_until_tag(f, b"e")[-1].startswith(b"e NO [TOOBIG]")
        assert read_until_tag(f, b"f")[-1].startswith(b"f OK")
        s.close()
    finally:
        stop_imap(reactor_thread, e)


def test_no_message_literal_before_login(env):
    """Before login APPEND is not valid, so its literal shares the small line budget: a
    synchronising one is refused at once (nothing is read), a LITERAL+ one is thrown away
    as it arrives -- an unauthenticated client cannot make the server hold megabytes."""
    s, f = raw_session(env)
    s.sendall(b"a APPEND INBOX {20000000}\r\n")
    assert read_until_tag(f, b"a") == [b"a NO [TOOBIG] Literal too large\r\n"]
    chunk = b"y" * 65536
    s.sendall(b"b APPEND INBOX {2097152+}\r\n")
    for _ in range(32):
        s.sendall(chunk)
    s.sendall(b"\r\nc NOOP\r\n")
    assert read_until_tag(f, b"b") == [b"b NO [TOOBIG] Literal too large\r\n"]
    assert read_until_tag(f, b"c") == [b"c OK NOOP completed\r\n"]
    s.sendall(b'd LOGIN alice@example.com {%d+}\r\n%s\r\n' % (len(PASSWORD), PASSWORD.encode()))
    assert read_until_tag(f, b"d")[-1].startswith(b"d OK")
    s.close()


def test_literal_plus_login(env):
    s, f = raw_session(env)
    pw = PASSWORD.encode()
    s.sendall(b"a LOGIN {17+}\r\nalice@example.com {%d+}\r\n%s\r\n" % (len(pw), pw))
    lines = read_until_tag(f, b"a")
    assert not any(line.startswith(b"+") for line in lines)
    assert lines[-1].startswith(b"a OK")
    s.close()


def test_enable_namespace_id(env):
    s, f = raw_session(env)
    s.sendall(b'a ID ("name" "test" "version" "1")\r\n')
    lines = read_until_tag(f, b"a")
    assert lines[0].startswith(b'* ID ("name" "TMmail"') and lines[-1].startswith(b"a OK")
    s.sendall(b"b ID NIL\r\n")
    assert read_until_tag(f, b"b")[-1].startswith(b"b OK")
    s.sendall(b'c LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
    read_until_tag(f, b"c")
    s.sendall(b"d ENABLE CONDSTORE\r\n")
    lines = read_until_tag(f, b"d")
    assert lines[0] == b"* ENABLED CONDSTORE\r\n" and lines[-1].startswith(b"d OK")
    s.sendall(b"e NAMESPACE\r\n")
    lines = read_until_tag(f, b"e")
    assert lines[0] == b'* NAMESPACE (("" "/")) NIL NIL\r\n'
    s.close()


def test_idle_only_done_ends_it(env):
    s, f = raw_session(env)
    s.sendall(b'a LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
    read_until_tag(f, b"a")
    s.sendall(b"b IDLE\r\n")
    assert f.readline().startswith(b"+ ")
    s.sendall(b"c NOOP\r\n")  # not DONE: IDLE goes on
    assert f.readline().startswith(b"* BAD")
    s.sendall(b"done\r\nd NOOP\r\n")
    assert read_until_tag(f, b"b")[-1].startswith(b"b OK")
    assert read_until_tag(f, b"d")[-1].startswith(b"d OK")
    s.close()


def test_unauthenticated_timeout(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path, imap={"idle_timeout_unauthenticated": 0.5})
    try:
        s, f = raw_session(e)
        deadline = time.monotonic() + 10
        line = f.readline()
        assert line.startswith(b"* BYE"), line
        assert f.readline() == b""
        assert time.monotonic() < deadline
        s.close()
    finally:
        stop_imap(reactor_thread, e)


def test_connections_per_ip_limit(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path, imap={"max_connections_per_ip": 2})
    try:
        a = raw_session(e)
        b = raw_session(e)
        c = socket.create_connection(("127.0.0.1", e.port), timeout=10)
        cf = c.makefile("rb")
        assert cf.readline().startswith(b"* BYE [UNAVAILABLE]")
        a[1].close()
        a[0].close()
        c.close()
        for _ in range(50):  # a slot frees up once the server saw the close
            time.sleep(0.05)
            d = socket.create_connection(("127.0.0.1", e.port), timeout=10)
            greeting = d.makefile("rb").readline()
            d.close()
            if greeting.startswith(b"* OK"):
                break
        assert greeting.startswith(b"* OK")
        b[0].close()
    finally:
        stop_imap(reactor_thread, e)


def test_connections_per_ip_count_an_ipv6_client_per_64(env):
    """Rotating through the addresses of one IPv6 /64 does not escape the per-IP limit."""
    f = env.factory
    limit = f.settings.imap.max_connections_per_ip
    for i in range(limit):
        assert f.connection_opened("2001:db8:1:2::%x" % (i + 1))
    assert not f.connection_opened("2001:db8:1:2:ffff::1")
    assert f.connection_opened("2001:db8:1:3::1")  # another /64
    f.connection_closed("2001:db8:1:2::1")
    assert f.connection_opened("2001:db8:1:2:abcd::9")


def test_connections_per_ip_span_the_imap_and_imaps_listeners(env):
    """The imaps listener of the same server counts against the same per-client limit: a
    second port does not double what one client may hold open."""
    from tmmail.imap.server import IMAPFactory

    f = env.factory
    limit = f.settings.imap.max_connections_per_ip
    for i in range(limit - 1):
        assert f.connection_opened("192.0.2.50")
    imaps = IMAPFactory(f.settings, "imaps", f.provider_store, f.authenticator, None, reactor=f.reactor)
    assert imaps.connection_opened("192.0.2.50")
    assert not imaps.connection_opened("192.0.2.50")
    assert not f.connection_opened("192.0.2.50")
    assert imaps.connection_opened("192.0.2.51")  # another client
    f.connection_closed("192.0.2.50")
    assert imaps.connection_opened("192.0.2.50")


def test_logout(env):
    s, f = raw_session(env)
    s.sendall(b"a LOGOUT\r\n")
    lines = read_until_tag(f, b"a")
    assert lines[0].startswith(b"* BYE") and lines[-1].startswith(b"a OK")
    assert f.readline() == b""
    s.close()


def test_starttls_twice_is_refused(env):
    """STARTTLS twice is refused; the session stays usable."""
    m = imaplib.IMAP4("127.0.0.1", env.port, timeout=10)
    m.starttls(client_tls())
    with pytest.raises(imaplib.IMAP4.error, match="TLS is already active"):
        m._simple_command("STARTTLS")
    assert m.noop()[0] == "OK"
    m.logout()


def test_many_pipelined_commands_without_recursion(env):
    """Thousands of pipelined commands that complete at once (failed logins answer from the
    block list synchronously, IDLE/DONE pairs) are answered in order without deep recursion."""
    s, f = raw_session(env)
    s.sendall(b'a LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
    read_until_tag(f, b"a")
    batch = b"".join(b"i%d IDLE\r\nDONE\r\nn%d NOOP\r\n" % (i, i) for i in range(1500))
    s.sendall(batch)
    last = read_until_tag(f, b"n1499", limit=20000)
    assert last[-1].startswith(b"n1499 OK")
    assert sum(1 for ln in last if ln.startswith(b"i") and b" OK " in ln) == 1500
    s.close()


def test_random_bytes_never_break_the_session(env):
    """Seeded random byte lines (no literal markers) before login: each gets one BAD/NO/OK,
    the connection survives, and a normal login still works."""
    import random

    rnd = random.Random(7888)
    alphabet = bytes(b for b in range(1, 256) if b not in (0x0A, 0x0D, 0x7B))
    s, f = raw_session(env)
    for i in range(300):
        body = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 60)))
        if body.split(b" ", 1)[0].upper() in (b"LOGOUT", b"STARTTLS", b"AUTHENTICATE", b"IDLE"):
            continue
        s.sendall(b"q%d " % i + body + b"\r\n")
        line = f.readline()
        assert line.startswith(b"q%d " % i) or line.startswith(b"* "), (body, line)
        while line.startswith(b"* ") and not line.startswith(b"* BAD"):
            line = f.readline()
        assert b"SERVERBUG" not in line, (body, line)
        if i % 10 == 0:  # a good command now and then: 50 BADs in a row end the session
            s.sendall(b"ok%d NOOP\r\n" % i)
            assert read_until_tag(f, b"ok%d" % i)[-1].startswith(b"ok%d OK" % i)
    s.sendall(b'z LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
    assert read_until_tag(f, b"z")[-1].startswith(b"z OK")
    s.close()


def test_fifty_bad_commands_in_a_row_close_the_connection(env):
    s, f = raw_session(env)
    s.sendall(b"".join(b"b%d FROB\r\n" % i for i in range(60)))
    lines = [f.readline() for _ in range(51)]
    assert all(ln.startswith(b"b%d BAD" % i) for i, ln in enumerate(lines[:50]))
    assert lines[50].startswith(b"* BYE")
    assert f.readline() == b""
    s.close()


def test_invalid_tags_and_idle_garbage_count_toward_the_error_limit(env):
    """Lines that are not even commands (a bad tag) and anything but DONE while idling are
    BADs like any other: 50 in a row close the connection (they used to be unlimited)."""
    s, f = raw_session(env)
    s.sendall(b"+ x\r\n" * 60)
    lines = [f.readline() for _ in range(51)]
    assert lines[:50] == [b"* BAD Invalid tag\r\n"] * 50
    assert lines[50].startswith(b"* BYE") and f.readline() == b""
    s.close()
    s, f = raw_session(env)
    s.sendall(b'a LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
    read_until_tag(f, b"a")
    s.sendall(b"i IDLE\r\n")
    assert f.readline() == b"+ idling\r\n"
    s.sendall(b"garbage\r\n" * 10 + b"DONE\r\n")
    lines = read_until_tag(f, b"i")
    assert lines == [b"* BAD Expected DONE\r\n"] * 10 + [b"i OK IDLE completed\r\n"]
    s.sendall(b"j IDLE\r\n")
    f.readline()
    s.sendall(b"garbage\r\n" * 60)
    lines = [f.readline() for _ in range(51)]
    assert lines[:50] == [b"* BAD Expected DONE\r\n"] * 50 and lines[50].startswith(b"* BYE")
    s.close()


def test_id_arguments_must_be_string_pairs(env, logged_failures):
    """RFC 2971 id-params-list: pairs of string and nstring; a list inside is BAD (it raised a
    TypeError, answered NO [SERVERBUG] and logged a traceback per command)."""
    s, f = raw_session(env)
    for i, bad in enumerate([b"((a) b)", b'("name" ("x"))', b"(name x)", b'("a")']):
        tag = b"t%d" % i
        s.sendall(tag + b" ID " + bad + b"\r\n")
        assert read_until_tag(f, tag)[-1].startswith(tag + b" BAD"), bad
    s.sendall(b'u ID ("name" "mutt" "version" NIL)\r\n')
    assert read_until_tag(f, b"u")[-1] == b"u OK ID completed\r\n"
    s.close()
    assert logged_failures == []


def test_overlong_lines_inside_authenticate_and_idle(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path, imap={"max_line_length": 1000})
    try:
        s, f = raw_session(e)
        s.sendall(b"a AUTHENTICATE PLAIN\r\n")
        assert f.readline() == b"+ \r\n"
        s.sendall(b"A" * 3000 + b"\r\n")
        assert read_until_tag(f, b"a")[-1].startswith(b"a BAD")
        s.sendall(b'b LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
        assert read_until_tag(f, b"b")[-1].startswith(b"b OK")
        s.sendall(b"c IDLE\r\n")
        assert f.readline().startswith(b"+ ")
        s.sendall(b"x" * 3000 + b"\r\nDONE\r\n")
        lines = read_until_tag(f, b"c")
        assert lines[0].startswith(b"* BAD [TOOBIG]") and lines[-1].startswith(b"c OK")
        s.close()
    finally:
        stop_imap(reactor_thread, e)


# -- tags, exact capability sets, the authenticated timeout --------------------------------------

BASE_CAPS = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UIDPLUS",
             "MOVE", "UNSELECT", "CHILDREN", "LIST-EXTENDED", "LIST-STATUS", "SPECIAL-USE", "QUOTA", "CONDSTORE", "QRESYNC"]


def caps_of(line: bytes) -> set[str]:
    """The capability atoms of ``* CAPABILITY ...`` or of an ``[CAPABILITY ...]`` code."""
    text = line.decode()
    if "[CAPABILITY " in text:
        text = text.split("[CAPABILITY ", 1)[1].split("]", 1)[0]
    else:
        text = text.split("CAPABILITY ", 1)[1]
    return set(text.split())


def test_tags_may_contain_close_bracket(env):
    """RFC 3501 §9: tag = 1*<any ASTRING-CHAR except "+">, and ASTRING-CHAR includes "]"."""
    s, f = raw_session(env)
    s.sendall(b"a]1 NOOP\r\n")
    assert read_until_tag(f, b"a]1") == [b"a]1 OK NOOP completed\r\n"]
    s.sendall(b"]] CAPABILITY\r\n")
    assert read_until_tag(f, b"]]")[-1] == b"]] OK CAPABILITY completed\r\n"
    s.sendall(b"x+y NOOP\r\n")  # "+" stays invalid
    assert f.readline() == b"* BAD Invalid tag\r\n"
    s.sendall(b"b NOOP\r\n")
    assert read_until_tag(f, b"b")[-1] == b"b OK NOOP completed\r\n"
    s.close()


def test_exact_capabilities_plain_starttls_imaps_and_after_login(reactor_thread, tmp_path):
    """The whole sets, not subsets: greeting and CAPABILITY on the plain port before TLS, after
    STARTTLS, on imaps, and after login; APPENDLIMIT follows smtp.max_message_size."""
    limit = 12345678
    e = start_imap(reactor_thread, tmp_path, imap={"allow_plaintext_auth": False},
                   smtp={"max_message_size": limit})
    try:
        appendlimit = f"APPENDLIMIT={limit}"
        before_tls = set(BASE_CAPS) | {appendlimit, "STARTTLS", "LOGINDISABLED"}
        after_tls = set(BASE_CAPS) | {appendlimit, "AUTH=PLAIN"}
        logged_in = set(BASE_CAPS) | {appendlimit}
        s = socket.create_connection(("127.0.0.1", e.port), timeout=10)
        f = s.makefile("rb")
        assert caps_of(f.readline()) == before_tls  # greeting
        s.sendall(b"a CAPABILITY\r\n")
        lines = read_until_tag(f, b"a")
        assert caps_of(lines[0]) == before_tls and lines[-1].startswith(b"a OK")
        s.sendall(b"b STARTTLS\r\n")
        assert f.readline().startswith(b"b OK")
        tls = client_tls().wrap_socket(s, server_hostname="localhost")
        tf = tls.makefile("rb")
        tls.sendall(b"c CAPABILITY\r\n")
        lines = read_until_tag(tf, b"c")
        assert caps_of(lines[0]) == after_tls
        tls.sendall(b'd LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
        assert caps_of(read_until_tag(tf, b"d")[-1]) == logged_in
        tls.sendall(b"e CAPABILITY\r\n")
        assert caps_of(read_until_tag(tf, b"e")[0]) == logged_in
        tls.close()
    finally:
        stop_imap(reactor_thread, e)
    e2 = start_imap(reactor_thread, tmp_path / "imaps", role="imaps",
                    imap={"allow_plaintext_auth": False})
    try:
        default_limit = f"APPENDLIMIT={25 * 1024 * 1024}"
        m = imaplib.IMAP4_SSL("127.0.0.1", e2.port, ssl_context=client_tls(), timeout=10)
        assert {c.upper() for c in m.capabilities} == {c.upper() for c in BASE_CAPS} | {
            default_limit, "AUTH=PLAIN"}
        typ, data = m.capability()
        assert caps_of(b"CAPABILITY " + data[0]) == set(BASE_CAPS) | {default_limit, "AUTH=PLAIN"}
        typ, data = m.login("alice@example.com", PASSWORD)
        assert caps_of(data[0]) == set(BASE_CAPS) | {default_limit}
        m.logout()
    finally:
        stop_imap(reactor_thread, e2)


def test_authenticated_timeout_uses_the_configured_value(reactor_thread, tmp_path):
    """A logged-in client idle for longer than idle_timeout_authenticated gets BYE and is closed;
    the shorter pre-login timeout no longer applies after login."""
    e = start_imap(reactor_thread, tmp_path, imap={"idle_timeout_unauthenticated": 0.6,
                                                   "idle_timeout_authenticated": 2.0})
    try:
        s, f = raw_session(e)
        s.sendall(b'a LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
        assert read_until_tag(f, b"a")[-1].startswith(b"a OK")
        s.sendall(b"b SELECT INBOX\r\n")
        assert read_until_tag(f, b"b")[-1].startswith(b"b OK")
        t0 = time.monotonic()
        s.settimeout(15)
        line = f.readline()
        waited = time.monotonic() - t0
        assert line == b"* BYE Autologout; idle for too long\r\n"
        assert f.readline() == b""  # closed
        assert waited >= 1.5  # the 0.6 s pre-login timeout was replaced by the 2 s one
        s.close()
    finally:
        stop_imap(reactor_thread, e)


def _fill_maildir(path: str, count: int) -> list[bool]:
    """``count`` messages written straight into the Maildir, every third one \\Seen."""
    import os

    seen = []
    for i in range(1, count + 1):
        is_seen = i % 3 == 0
        base = f"{1_700_000_000 + i}.M{i}P1.test,S=40"
        sub, name = ("cur", base + ":2,S") if is_seen else ("new", base)
        with open(os.path.join(path, sub, name), "wb") as f:
            f.write(b"Subject: m%d\n\nbody %d\n" % (i, i))
        seen.append(is_seen)
    return seen


@pytest.mark.parametrize("tls", [False, True])
def test_large_uid_fetch_flags_is_complete_and_in_order(env, tls):
    """A UID FETCH FLAGS answer bigger than one output slice (it is sent in slices as it is
    formatted) arrives whole, in order, before the tagged OK and before the next pipelined
    command's answer, on plain TCP and inside TLS."""
    seen = _fill_maildir(env.maildir(), 4500)
    m = env.connect(starttls=tls)
    m.login("alice@example.com", PASSWORD)
    m.select("INBOX")
    m.send(b"a UID FETCH 1:* (UID FLAGS)\r\nb FETCH 1:* (FLAGS UID)\r\nc NOOP\r\n")
    lines = [m.readline() for _ in range(2 * 4500 + 3)]
    recent = "\\Recent"
    want_a = [b"* %d FETCH (UID %d FLAGS (%s))\r\n" % (
        i, i, ("\\Seen" if seen[i - 1] else recent).encode()) for i in range(1, 4501)]
    want_b = [b"* %d FETCH (FLAGS (%s) UID %d)\r\n" % (
        i, ("\\Seen" if seen[i - 1] else recent).encode(), i) for i in range(1, 4501)]
    assert lines[:4500] == want_a
    assert lines[4500].startswith(b"a OK")
    assert lines[4501:9001] == want_b
    assert lines[9001].startswith(b"b OK")
    assert lines[9002].startswith(b"c OK")
    m.logout()

"""POP3 on real sockets: poplib and raw clients against POP3Factory in the reactor thread."""

from __future__ import annotations

import base64
import os
import poplib
import socket
import ssl
import time

import pytest
from twisted.internet import reactor
from twisted.internet import ssl as tssl
from twisted.protocols.tls import TLSMemoryBIOFactory

from tests.smtpharness import PASSWORD, client_tls, write_tables
from tmmail import config, maildir
from tmmail.cred import Authenticator
from tmmail.pop3 import DotStuffer, POP3Factory, TopLimiter
from tmmail.providers import ProviderStore
from tmmail.store import Store
from tmmail.tlsutil import generate_self_signed

ALICE = "alice@example.com"


class Harness:
    def __init__(self, root, runner, pop3: dict | None = None, auth: dict | None = None) -> None:
        self.root = str(root)
        self.runner = runner
        config_dir = os.path.join(self.root, "config")
        write_tables(config_dir)
        auth_settings = {"free_failures": 100, "block_after": 1000}
        auth_settings.update(auth or {})
        pop3_settings = {"idle_timeout": 20.0}
        pop3_settings.update(pop3 or {})
        self.settings = config.parse(
            {"server": {"hostname": "mx.example.com", "state_dir": self.root, "config_dir": config_dir},
             "pop3": pop3_settings, "auth": auth_settings},
            os.path.join(self.root, "tmmail.toml"),
        )
        self.providers = ProviderStore(config_dir, interval=0.0)
        cert, key = os.path.join(self.root, "server.crt"), os.path.join(self.root, "server.key")
        generate_self_signed("mx.example.com", cert, key)
        with open(cert, "rb") as fc, open(key, "rb") as fk:
            self.tls = tssl.PrivateCertificate.loadPEM(fc.read() + fk.read()).options()
        self.authenticator = Authenticator(self.providers, self.settings.auth, reactor)
        self.ports = []
        self.maildir = maildir.mailbox_path(self.settings.postoffices_dir, "ACME", "ALICE")
        maildir.create(self.maildir)

    def start(self, role: str = "pop3") -> int:
        factory = POP3Factory(self.settings, role, self.providers, self.authenticator, self.tls, reactor=reactor)
        wrapped = TLSMemoryBIOFactory(self.tls, False, factory) if role == "pop3s" else factory
        port = self.runner.listen(wrapped)
        self.ports.append(port)
        return port.getHost().port

    def stop(self) -> None:
        for port in self.ports:
            self.runner.call(port.stopListening)

    def deliver(self, data: bytes) -> str:
        src = os.path.join(self.root, "msg.eml")
        with open(src, "wb") as f:
            f.write(data)
        return maildir.deliver(self.maildir, src)

    def count(self) -> int:
        return sum(len(os.listdir(os.path.join(self.maildir, d))) for d in ("new", "cur"))

    def per_ip(self) -> dict:
        """The live per-client connection counts of this server's POP3 listeners."""
        from tmmail.connlimit import shared_counts

        return self.runner.call(lambda: dict(shared_counts(self.settings, "pop3").per_ip))


@pytest.fixture
def h(tmp_path, reactor_thread):
    harness = Harness(tmp_path, reactor_thread)
    yield harness
    harness.stop()


def login(port: int) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    pop.stls(client_tls())
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    return pop


class Raw:
    def __init__(self, port: int, tls: bool = False) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = client_tls().wrap_socket(s) if tls else s
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def multi(self) -> list[bytes]:
        first = self.line()
        assert first.startswith(b"+OK"), first
        out = []
        while True:
            line = self.line()
            if line == b".":
                return out
            out.append(line)

    def starttls(self) -> None:
        assert not self.buf
        self.sock = client_tls().wrap_socket(self.sock)

    def closed(self) -> bool:
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False


# -- pure parts -----------------------------------------------------------------------------------


def stuff_in_chunks(data: bytes, size: int) -> bytes:
    s = DotStuffer()
    return b"".join(s.feed(data[i:i + size]) for i in range(0, len(data), size)) + s.finish()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 4096, 1 << 20])
def test_dot_stuffer_is_independent_of_chunking(size):
    data = b".a\n..b\nc\n.\n\n.\r\nmixed\r\nbare\rcr\nend."
    expected = b"..a\r\n...b\r\nc\r\n..\r\n\r\n..\r\nmixed\r\nbare\rcr\r\nend.\r\n.\r\n"
    assert stuff_in_chunks(data, size) == expected


def test_dot_stuffer_empty_and_trailing_newline():
    assert stuff_in_chunks(b"", 10) == b".\r\n"
    assert stuff_in_chunks(b"x\n", 10) == b"x\r\n.\r\n"


def test_top_limiter():
    msg = b"A: 1\nB: 2\n\nl1\nl2\nl3\n"
    for size in (1, 3, 100):
        for n, want in [(0, b"A: 1\nB: 2\n\n"), (2, b"A: 1\nB: 2\n\nl1\nl2\n"), (9, msg)]:
            lim = TopLimiter(n)
            out = b""
            for i in range(0, len(msg), size):
                out += lim.feed(msg[i:i + size])
                if lim.done:
                    break
            assert out == want, (size, n)


# -- sessions -------------------------------------------------------------------------------------


def test_retr_after_stls_is_byte_identical(h):
    body = b"".join(b"line %d\n" % i for i in range(5))
    msg = b"From: a@example.com\nSubject: one\n\n" + body
    h.deliver(msg)
    pop = login(h.start())
    count, size = pop.stat()
    assert count == 1 and size == len(msg) + msg.count(b"\n")
    resp, lines, octets = pop.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == msg.replace(b"\n", b"\r\n")
    assert pop.list()[1] == [b"1 %d" % size]
    pop.quit()


def test_dot_stuffing_at_16k_boundaries_round_trips(h):
    # lines starting with "." everywhere, including exactly at 16 KiB chunk boundaries
    parts = [b"Subject: dots\n\n"]
    total = len(parts[0])
    i = 0
    while total < 5 * 16384:
        boundary = 16384 - total % 16384
        if boundary < 80:
            line = b"x" * (boundary - 1) + b"\n"  # the next line starts exactly at a boundary
        else:
            line = (b"." * (1 + i % 3)) + b"%d dotted\n" % i
        parts.append(line)
        total += len(line)
        i += 1
    parts.append(b".\n..\n.end")
    msg = b"".join(parts)
    h.deliver(msg)
    pop = login(h.start())
    _, lines, _ = pop.retr(1)  # poplib un-stuffs
    assert b"\r\n".join(lines) == msg.replace(b"\n", b"\r\n")
    _, top, _ = pop.top(1, 3)
    assert top[:4] == [b"Subject: dots", b"", b".0 dotted", b"..1 dotted"]
    assert len(top) == 5
    pop.quit()


def test_capabilities_before_and_after_stls(h):
    port = h.start()
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    caps = pop.capa()
    assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
    assert {"TOP", "UIDL", "RESP-CODES", "PIPELINING", "IMPLEMENTATION"} <= set(caps)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop.user(ALICE)
    pop.stls(client_tls())
    caps = pop.capa()
    assert "STLS" not in caps and caps["SASL"] == ["PLAIN"] and "USER" in caps
    pop.quit()


def test_plaintext_allowed_by_setting(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread, pop3={"allow_plaintext_auth": True})
    try:
        pop = poplib.POP3("127.0.0.1", h.start(), timeout=10)
        pop.user(ALICE)
        assert pop.pass_(PASSWORD).startswith(b"+OK")
        pop.quit()
    finally:
        h.stop()


def test_pop3s_implicit_tls(h):
    h.deliver(b"Subject: s\n\nhi\n")
    pop = poplib.POP3_SSL("127.0.0.1", h.start("pop3s"), context=client_tls(), timeout=10)
    assert "STLS" not in pop.capa()
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    assert pop.stat()[0] == 1
    pop.quit()


def test_auth_plain_initial_response_and_continuation(h):
    port = h.start("pop3s")
    token = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())
    r = Raw(port, tls=True)
    assert r.line().startswith(b"+OK")
    r.send(b"AUTH PLAIN " + token + b"\r\n")
    assert r.line().startswith(b"+OK")
    r.send(b"QUIT\r\n")
    assert r.line().startswith(b"+OK")
    r = Raw(port, tls=True)
    r.line()
    r.send(b"AUTH PLAIN\r\n")
    assert r.line() == b"+ "
    r.send(token + b"\r\n")
    assert r.line().startswith(b"+OK")
    r = Raw(port, tls=True)
    r.line()
    r.send(b"AUTH PLAIN\r\n")
    r.line()
    r.send(b"*\r\n")
    assert r.line().startswith(b"-ERR")
    r.send(b"AUTH PLAIN " + base64.b64encode(b"\0" + ALICE.encode() + b"\0wrong") + b"\r\n")
    assert r.line().startswith(b"-ERR [AUTH]")
    r.send(b"AUTH CRAM-MD5\r\n")
    assert r.line().startswith(b"-ERR")
    r.send(b"AUTH PLAIN !!!notbase64\r\n")
    assert r.line().startswith(b"-ERR")
    r.send(b"NOOP\r\n")  # still in AUTHORIZATION
    assert r.line().startswith(b"-ERR")


def test_wrong_password_and_blocked_login(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread, auth={"free_failures": 0, "base_delay": 0.01, "max_delay": 0.01,
                                               "block_after": 2})
    try:
        port = h.start("pop3s")
        r = Raw(port, tls=True)
        r.line()
        replies = []
        for _ in range(3):
            r.send(b"USER " + ALICE.encode() + b"\r\nPASS nope\r\n")
            r.line()
            replies.append(r.line())
        assert replies[0].startswith(b"-ERR [AUTH]")
        assert replies[-1] == b"-ERR [AUTH] Too many failed logins, try again later"
    finally:
        h.stop()


def test_stls_discards_pipelined_plaintext(h):
    port = h.start()
    r = Raw(port)
    r.line()
    r.send(b"STLS\r\nUSER injected@example.com\r\n")
    assert r.line().startswith(b"+OK")
    r.starttls()
    r.send(b"PASS " + PASSWORD.encode() + b"\r\n")
    # the injected USER was dropped: PASS without USER
    assert r.line().startswith(b"-ERR")


def test_uidl_stable_across_new_to_cur_and_flag_changes(h):
    h.deliver(b"Subject: 1\n\none\n")
    h.deliver(b"Subject: 2\n\ntwo\n")
    port = h.start("pop3s")
    pop = poplib.POP3_SSL("127.0.0.1", port, context=client_tls(), timeout=10)
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    first = pop.uidl()[1]
    pop.quit()
    # an IMAP session moves the messages to cur/ and marks one read
    imap_view = Store(h.maildir).open("INBOX")
    imap_view.store_flags([1], ["\\Seen"], "add")
    assert not os.listdir(os.path.join(h.maildir, "new"))
    pop = poplib.POP3_SSL("127.0.0.1", port, context=client_tls(), timeout=10)
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    assert pop.uidl()[1] == first
    assert pop.uidl(2).split()[-1] == first[1].split()[-1]
    uv = imap_view.uidvalidity
    assert first[0] == b"1 %08x%08x" % (1, uv)  # as Dovecot prints %08Xu%08Xv
    pop.quit()


def test_deletes_happen_only_at_quit(h):
    for i in range(3):
        h.deliver(b"Subject: %d\n\nbody\n" % i)
    port = h.start()
    pop = login(port)
    pop.dele(1)
    pop.dele(2)
    with pytest.raises(poplib.error_proto):
        pop.dele(1)  # already deleted
    with pytest.raises(poplib.error_proto):
        pop.retr(1)
    assert pop.stat()[0] == 1
    pop.rset()
    assert pop.stat()[0] == 3
    pop.dele(3)
    assert h.count() == 3  # nothing removed before QUIT
    assert b"1 messages deleted" in pop.quit()
    assert h.count() == 2


def test_dropped_connection_deletes_nothing(h):
    for i in range(2):
        h.deliver(b"Subject: %d\n\nbody\n" % i)
    port = h.start()
    pop = login(port)
    pop.dele(1)
    pop.dele(2)
    pop.sock.shutdown(socket.SHUT_RDWR)  # drop the connection without QUIT
    pop.sock.close()
    pop.file.close()
    # once the session is gone the maildrop is free again, and complete
    deadline = time.monotonic() + 10
    while True:
        try:
            pop = login(port)
            break
        except poplib.error_proto as e:
            assert b"IN-USE" in e.args[0] and time.monotonic() < deadline
            time.sleep(0.05)
    assert pop.stat()[0] == 2
    pop.quit()
    assert h.count() == 2


def test_second_session_gets_in_use(h):
    port = h.start()
    first = login(port)
    second = poplib.POP3("127.0.0.1", port, timeout=10)
    second.stls(client_tls())
    second.user(ALICE)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    first.quit()
    login(port).quit()


def test_bad_commands_and_pipelining(h):
    h.deliver(b"Subject: p\n\nhi\n")
    port = h.start("pop3s")
    r = Raw(port, tls=True)
    r.line()
    r.send(b"USER " + ALICE.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\nBOGUS\r\n"
           b"LIST 99\r\nLIST x\r\nRETR 1\r\nUIDL 1\r\nNOOP\r\n")
    assert r.line().startswith(b"+OK")
    assert r.line().startswith(b"+OK")
    assert r.line() == b"+OK 1 %d" % len(b"Subject: p\r\n\r\nhi\r\n")
    assert r.line().startswith(b"-ERR")
    assert r.line().startswith(b"-ERR")
    assert r.line().startswith(b"-ERR")
    assert r.multi() == [b"Subject: p", b"", b"hi"]
    assert r.line().startswith(b"+OK 1 ")
    assert r.line() == b"+OK"
    r.send(b"X" * 10000 + b"\r\n")
    assert r.line().startswith(b"-ERR")
    assert r.closed()


def test_idle_timeout_closes(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread, pop3={"idle_timeout": 0.3})
    try:
        r = Raw(h.start())
        r.line()
        r.sock.settimeout(10)
        assert r.line().startswith(b"-ERR")
        assert r.closed()
    finally:
        h.stop()


def test_message_removed_by_other_session_is_an_error_not_a_drop(h):
    h.deliver(b"Subject: gone\n\nx\n")
    h.deliver(b"Subject: stays\n\ny\n")
    pop = login(h.start())
    view = Store(h.maildir).open("INBOX")
    view.store_flags([1], ["\\Deleted"], "add")
    view.expunge()
    with pytest.raises(poplib.error_proto):
        pop.retr(1)
    assert pop.retr(2)[1][-1] == b"y"
    pop.quit()


def test_connection_dropped_during_large_retr(h):
    big = b"Subject: big\n\n" + b"".join(b".%07d and some text to make the line longer\n" % i for i in range(60000))
    h.deliver(big)
    port = h.start()
    r = Raw(port)
    r.line()
    r.send(b"STLS\r\n")
    r.line()
    r.starttls()
    r.send(b"USER " + ALICE.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
    r.line(), r.line()
    r.send(b"RETR 1\r\n")
    assert r.line() == b"+OK %d octets" % (len(big) + big.count(b"\n"))
    assert r.line() == b"Subject: big"
    r.sock.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            pop = login(port)
            break
        except poplib.error_proto as e:
            assert b"IN-USE" in e.args[0] and time.monotonic() < deadline
            time.sleep(0.05)
    _, lines, _ = pop.retr(1)
    assert len(lines) == 60002 and lines[-1] == b".0059999 and some text to make the line longer"
    pop.quit()
    assert h.count() == 1


def test_lock_held_by_another_process_gives_in_use(h):
    import fcntl
    import multiprocessing

    ready = multiprocessing.get_context("fork").Event()
    release = multiprocessing.get_context("fork").Event()

    def holder() -> None:  # another TMmail process serving the same maildrop
        fd = os.open(os.path.join(h.maildir, "tmmail-pop3.lock"), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        ready.set()
        release.wait(20)

    p = multiprocessing.get_context("fork").Process(target=holder)
    p.start()
    try:
        assert ready.wait(10)
        port = h.start()
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.stls(client_tls())
        pop.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            pop.pass_(PASSWORD)
    finally:
        release.set()
        p.join(10)
    login(port).quit()  # the kernel dropped the lock with the process


# -- hostile input ----------------------------------------------------------------------------------


def raw_login(port: int) -> Raw:
    """A raw pop3s session logged in as ALICE (the greeting and the login replies consumed)."""
    r = Raw(port, tls=True)
    assert r.line().startswith(b"+OK")
    r.send(b"USER " + ALICE.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert r.line().startswith(b"+OK")
    assert r.line().startswith(b"+OK Maildrop has")
    return r


def test_non_ascii_digits_are_a_syntax_error_and_the_session_goes_on(h, logged_failures):
    h.deliver(b"Subject: one\n\nfirst\n")
    h.deliver(b"Subject: two\n\nsecond\n")
    r = raw_login(h.start("pop3s"))
    # the audit's byte-level repro: superscript two used to drop the connection
    r.send(b"LIST \xc2\xb2\r\n")
    assert r.line() == b"-ERR Syntax error: invalid message number"
    for cmd in (b"RETR \xc2\xb2", b"DELE \xc2\xb2", b"UIDL \xc2\xb2", b"TOP \xc2\xb2 1",
                b"RETR \xd9\xa1",  # Arabic-Indic one used to return message 1
                b"DELE \xd9\xa1", b"LIST \xef\xbc\x91",  # fullwidth one
                b"DELE 1\xc2\xb2"):
        r.send(cmd + b"\r\n")
        assert r.line() == b"-ERR Syntax error: invalid message number", cmd
    r.send(b"TOP 1 \xc2\xb2\r\n")
    assert r.line() == b"-ERR Syntax error: invalid line count"
    r.send(b"TOP 1 \xd9\xa1\r\n")
    assert r.line() == b"-ERR Syntax error: invalid line count"
    # "\u017f".upper() == "S": a command name must be ASCII letters
    r.send("\u017fTAT\r\n".encode())
    assert r.line() == b"-ERR Unknown command"
    # the session goes on, nothing was deleted, ASCII numbers still work
    r.send(b"NOOP\r\nSTAT\r\nLIST 01\r\nTOP 2 0\r\n")
    assert r.line() == b"+OK"
    assert r.line().startswith(b"+OK 2 ")
    assert r.line().startswith(b"+OK 1 ")
    assert r.multi() == [b"Subject: two", b""]
    r.send(b"LIST 99999999999999999999\r\nTOP 1 99999999999999999999\r\n")
    assert r.line() == b"-ERR No such message"
    assert r.multi() == [b"Subject: one", b"", b"first"]
    r.send(b"QUIT\r\n")
    assert r.line() == b"+OK Bye, 0 messages deleted"
    assert h.count() == 2
    assert not logged_failures  # no traceback (the ValueError used to escape dataReceived)


def test_a_failing_command_costs_that_command_not_the_session(h, monkeypatch):
    from tmmail.pop3 import POP3Server

    def broken(self, args):
        raise RuntimeError("bug")

    broken.states = ("TRANSACTION",)
    monkeypatch.setattr(POP3Server, "do_STAT", broken)
    h.deliver(b"Subject: one\n\nfirst\n")
    r = raw_login(h.start("pop3s"))
    r.send(b"STAT\r\nLIST\r\n")
    assert r.line() == b"-ERR [SYS/TEMP] Internal error"
    assert r.multi() == [b"1 %d" % len(b"Subject: one\r\n\r\nfirst\r\n")]


def test_error_limit_counts_errors_in_a_row_once_logged_in(h, logged_failures):
    """A pipeline of 40 failing DELEs (messages another client deleted) between 20 good ones
    goes on to QUIT: the limit of 20 is for errors in a row, as in IMAP, not per session."""
    for i in range(20):
        h.deliver(b"Subject: m%d\n\nbody\n" % i)
    r = raw_login(h.start("pop3s"))
    pipeline = b"".join(b"DELE %d\r\nDELE %d\r\nRETR %d\r\n" % (1000 + i, i, i) for i in range(1, 21))
    r.send(pipeline + b"QUIT\r\n")
    for i in range(1, 21):
        assert r.line() == b"-ERR No such message", i
        assert r.line() == b"+OK Message deleted", i
        assert r.line() == b"-ERR Message already deleted", i
    assert r.line() == b"+OK Bye, 20 messages deleted"
    assert r.closed()
    assert h.count() == 0
    assert not logged_failures


def test_only_bad_commands_are_still_closed_after_20_in_a_row(h):
    h.deliver(b"Subject: one\n\nfirst\n")
    r = raw_login(h.start("pop3s"))
    # 19 errors, a success, then errors only: the 20th in a row closes the session
    r.send(b"BOGUS\r\n" * 19 + b"NOOP\r\n" + b"DELE 99\r\n" * 25)
    assert [r.line() for _ in range(19)] == [b"-ERR Unknown command"] * 19
    assert r.line() == b"+OK"
    assert [r.line() for _ in range(20)] == [b"-ERR No such message"] * 20
    assert r.line() == b"-ERR Too many errors, closing connection"
    assert r.closed()
    assert h.count() == 1


def test_before_login_errors_add_up_for_the_session(h):
    """Before login, USER (always +OK) does not clear the count: a client that alternates it
    with bad commands is closed after 20 errors; a successful login starts the count afresh."""
    port = h.start("pop3s")
    r = Raw(port, tls=True)
    assert r.line().startswith(b"+OK")
    r.send(b"USER x\r\nBOGUS\r\nCAPA\r\n" * 25)
    replies = []
    while not replies or replies[-1] != b"-ERR Too many errors, closing connection":
        line = r.line()
        assert line, replies
        replies.append(line)
    assert replies.count(b"-ERR Unknown command") == 20
    assert r.closed()
    r = Raw(port, tls=True)
    assert r.line().startswith(b"+OK")
    r.send(b"BOGUS\r\n" * 19 + b"USER " + ALICE.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n"
           + b"DELE 99\r\n" * 19 + b"NOOP\r\n")
    assert [r.line() for _ in range(19)] == [b"-ERR Unknown command"] * 19
    assert r.line().startswith(b"+OK")
    assert r.line().startswith(b"+OK Maildrop has")
    assert [r.line() for _ in range(19)] == [b"-ERR No such message"] * 19
    assert r.line() == b"+OK"  # 38 errors in the session, never 20 in a row after login


def greeting_of(port: int, tls: bool = False) -> tuple[Raw, bytes]:
    r = Raw(port, tls=tls)
    return r, r.line()


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_default_per_ip_limit_refuses_the_21st_connection(h):
    assert h.settings.pop3.max_connections_per_ip == 20
    port = h.start()
    # the audit's repro: 30 simultaneous connections from 127.0.0.1 all got +OK
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(30)]
    try:
        greetings = []
        for s in socks:
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(1000)
                if not chunk:
                    break
                data += chunk
            greetings.append(data)
        assert greetings[:20] == [b"+OK TMmail POP3 server ready\r\n"] * 20
        assert greetings[20:] == [b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n"] * 10
        for s in socks[20:]:
            assert s.recv(1000) == b""  # and closed
    finally:
        for s in socks:
            s.close()
    # once they are gone the client may connect again
    wait_until(lambda: not h.per_ip())
    r, greeting = greeting_of(port)
    assert greeting.startswith(b"+OK")


def test_per_ip_limit_spans_pop3_and_pop3s_and_frees_on_close(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread, pop3={"max_connections_per_ip": 3})
    try:
        h.deliver(b"Subject: one\n\nfirst\n")
        plain, tls = h.start("pop3"), h.start("pop3s")
        first = raw_login(tls)
        second, g2 = greeting_of(plain)
        third, g3 = greeting_of(plain)
        assert g2.startswith(b"+OK") and g3.startswith(b"+OK")
        over, refused = greeting_of(tls, tls=True)
        assert refused == b"-ERR [SYS/TEMP] Too many connections from your address, try again later"
        assert over.closed()
        over, refused = greeting_of(plain)
        assert refused.startswith(b"-ERR [SYS/TEMP]") and over.closed()
        # the admitted sessions are unaffected
        first.send(b"STAT\r\n")
        assert first.line().startswith(b"+OK 1 ")
        second.send(b"CAPA\r\n")
        assert b"PIPELINING" in second.multi()
        # a closed session frees its slot
        third.send(b"QUIT\r\n")
        assert third.line() == b"+OK Bye" and third.closed()
        wait_until(lambda: h.per_ip() == {"127.0.0.1": 2})
        again, greeting = greeting_of(plain)
        assert greeting.startswith(b"+OK")
        first.send(b"QUIT\r\n")
        assert first.line().startswith(b"+OK Bye")
    finally:
        h.stop()


def test_per_ip_counts_ipv6_per_64(h):
    factory = POP3Factory(h.settings, "pop3", h.providers, h.authenticator, h.tls, reactor=reactor)
    limit = h.settings.pop3.max_connections_per_ip
    for i in range(limit):
        assert factory.connection_opened("2001:db8:0:1::%x" % (i + 1))
    assert not factory.connection_opened("2001:db8:0:1:ffff::9")  # same /64, another address
    assert factory.connection_opened("2001:db8:0:2::1")  # the next /64 is another client
    assert factory.per_ip["2001:db8:0:1::/64"] == limit
    factory.connection_closed("2001:db8:0:1::5")
    assert factory.connection_opened("2001:db8:0:1::abcd")
    # the pop3s listener of the same server shares the counts
    other = POP3Factory(h.settings, "pop3s", h.providers, h.authenticator, h.tls, reactor=reactor)
    assert not other.connection_opened("2001:db8:0:1::77")


# -- pipelining and flow control (RFC 2449 §6.6) ------------------------------------------------------


def plain_login(port: int, login: str = ALICE) -> Raw:
    r = Raw(port)
    assert r.line().startswith(b"+OK")
    r.send(b"USER " + login.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert r.line().startswith(b"+OK")
    assert r.line().startswith(b"+OK Maildrop has")
    return r


@pytest.fixture
def hp(tmp_path, reactor_thread):
    """A harness whose plain pop3 listener allows USER/PASS (the audit's setup)."""
    harness = Harness(tmp_path, reactor_thread, pop3={"allow_plaintext_auth": True})
    yield harness
    harness.stop()


@pytest.mark.parametrize("role", ["pop3", "pop3s"])
def test_pipelined_burst_of_100_dele_and_quit(hp, role, logged_failures):
    for i in range(100):
        hp.deliver(b"Subject: m%d\n\nbody\n" % i)
    port = hp.start(role)
    r = plain_login(port) if role == "pop3" else raw_login(port)
    # the audit's repro: one write of DELE 1 ... DELE 100, QUIT used to get
    # "-ERR Too many pipelined commands", a closed connection and nothing deleted
    r.send(b"".join(b"DELE %d\r\n" % i for i in range(1, 101)) + b"QUIT\r\n")
    assert [r.line() for _ in range(100)] == [b"+OK Message deleted"] * 100
    assert r.line() == b"+OK Bye, 100 messages deleted"
    assert r.closed()
    assert hp.count() == 0
    assert not logged_failures


def test_pipelined_deletes_without_quit_delete_nothing(hp):
    for i in range(100):
        hp.deliver(b"Subject: m%d\n\nbody\n" % i)
    port = hp.start()
    r = plain_login(port)
    r.send(b"".join(b"DELE %d\r\n" % i for i in range(1, 101)) + b"STAT\r\n")
    assert [r.line() for _ in range(100)] == [b"+OK Message deleted"] * 100
    assert r.line() == b"+OK 0 0"
    assert hp.count() == 100  # marks only, until QUIT
    r.sock.close()  # dropped: RFC 1939 §6, no UPDATE state
    wait_until(lambda: not hp.per_ip())
    r = plain_login(port)
    r.send(b"STAT\r\nQUIT\r\n")
    assert r.line().startswith(b"+OK 100 ")
    assert r.line() == b"+OK Bye, 0 messages deleted"
    assert hp.count() == 100


def _server_output_pending(proto) -> int:
    """Bytes the server has written for this session that are not yet in the kernel."""
    total, t = 0, proto.transport
    while t is not None:
        total += sum(len(b) for b in getattr(t, "_appSendBuffer", ()))  # TLS, before the handshake
        if hasattr(t, "dataBuffer"):
            total += len(t.dataBuffer) - t.offset + t._tempDataLen
        t = getattr(t, "transport", None)
    return total


def test_pipeline_from_a_client_that_does_not_read_is_bounded_and_completes(hp, monkeypatch, logged_failures):
    import threading

    from tmmail import pop3

    sessions = []
    build = pop3.POP3Factory.buildProtocol
    monkeypatch.setattr(pop3.POP3Factory, "buildProtocol",
                        lambda self, addr: sessions.append(build(self, addr)) or sessions[-1])
    body = b"".join(b".%06d a line of text that makes the message a little larger\n" % i for i in range(3000))
    msg = b"Subject: big\n\n" + body
    hp.deliver(msg)
    hp.deliver(b"Subject: small\n\nx\n")
    port = hp.start()
    r = plain_login(port)
    server = sessions[-1]
    # 60 RETR of a 200 KB message (12 MB of replies) then 30000 small commands (>64 KiB of input),
    # sent in one go by a client that does not read meanwhile
    retrs, noops = 60, 30000
    burst = b"RETR 1\r\n" * retrs + b"NOOP\r\nDELE 2\r\nRSET\r\n" * (noops // 3)
    sender = threading.Thread(target=r.sock.sendall, args=(burst,), daemon=True)
    sender.start()

    def state():
        return hp.runner.call(lambda: (server._reading_paused, len(server._buf), _server_output_pending(server)))

    wait_until(lambda: state()[0])
    peak_out = peak_in = 0
    for _ in range(20):  # the server holds still: reading paused, output bounded
        paused, pending_in, pending_out = state()
        assert paused
        peak_in, peak_out = max(peak_in, pending_in), max(peak_out, pending_out)
        time.sleep(0.02)
    assert peak_in <= pop3.MAX_PENDING_INPUT + 2 * 65536
    assert peak_out <= 512 * 1024
    # meanwhile another client is served
    other = plain_login(port, "bob@example.com")
    other.send(b"STAT\r\nQUIT\r\n")
    assert other.line() == b"+OK 0 0" and other.line().startswith(b"+OK Bye")
    # now the client reads: every reply arrives, complete and in order
    wire = msg.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
    one_retr = b"+OK %d octets\r\n" % (len(msg) + msg.count(b"\n")) + wire + b".\r\n"
    expected = one_retr * retrs + b"+OK\r\n+OK Message deleted\r\n+OK Maildrop reset\r\n" * (noops // 3)
    r.sock.settimeout(30)
    got = bytearray()
    while len(got) < len(expected):
        chunk = r.sock.recv(1 << 20)
        assert chunk, "connection closed early"
        got += chunk
    assert got == expected
    sender.join(10)
    r.send(b"QUIT\r\n")
    assert r.line() == b"+OK Bye, 0 messages deleted"
    assert hp.count() == 2
    assert not logged_failures


def test_stalled_client_is_timed_out_and_its_resources_freed(tmp_path, reactor_thread, monkeypatch):
    from tmmail import pop3

    monkeypatch.setattr(pop3, "CLOSE_GRACE", 0.3)
    h = Harness(tmp_path, reactor_thread, pop3={"idle_timeout": 0.5, "allow_plaintext_auth": True})
    try:
        big = b"Subject: big\n\n" + b"".join(b"%070d\n" % i for i in range(150000))
        h.deliver(big)
        port = h.start()
        stalled = plain_login(port)
        stalled.send(b"RETR 1\r\n" + b"NOOP\r\n" * 20)  # then never reads the ~10 MB answer
        # the server gives up on it (idle timeout, then the close grace) ...
        wait_until(lambda: not h.per_ip())
        # ... and the maildrop is free again, complete
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user(ALICE)
        pop.pass_(PASSWORD)
        assert pop.stat()[0] == 1
        pop.quit()
        stalled.sock.close()
    finally:
        h.stop()

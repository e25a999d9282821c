"""The outbound ESMTP client against real receiving servers (aiosmtpd) on 127.0.0.1."""

from __future__ import annotations

import random
import time

import pytest
from twisted.internet import defer, protocol, reactor
from twisted.internet.ssl import Certificate

from tests.smtpsink import Sink, make_pki
from tmmail import smtpclient
from tmmail.smtpclient import (
    DEFERRED,
    DELIVERED,
    FAILED,
    ClientConfig,
    DotStuffer,
    OutboundMessage,
    OutboundRecipient,
    ProtocolError,
    Reply,
    ReplyError,
    Timeout,
    TLSFailed,
    open_session,
    xtext,
)

# -- pure pieces ---------------------------------------------------------------------------------


def unstuff(wire: bytes) -> bytes:
    """What an RFC 5321 receiver stores: split at CRLF, strip one leading dot, stop at "."."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire.split(b"\r\n")
    out = []
    for line in lines:
        if line == b".":
            break
        out.append(line[1:] if line.startswith(b".") else line)
    return b"".join(x + b"\r\n" for x in out)


def stuff_in_chunks(data: bytes, sizes) -> bytes:
    s = DotStuffer()
    out, pos = [], 0
    for n in sizes:
        out.append(s.feed(data[pos : pos + n]))
        pos += n
    out.append(s.feed(data[pos:]))
    out.append(s.finish())
    return b"".join(out)


def test_dot_stuffer_first_line_and_every_line():
    assert stuff_in_chunks(b".hidden\n..two\nplain\n.\n", []) == b"..hidden\r\n...two\r\nplain\r\n..\r\n.\r\n"


def test_dot_stuffer_chunk_boundaries_do_not_matter():
    rng = random.Random(7)
    body = b"".join(rng.choice([b".", b"..", b"x", b".x", b"\n", b"\r\n", b"ab.", b"\n.\n"]) for _ in range(3000))
    body = body.replace(b"\r\n", b"\n") + b"\n"
    whole = stuff_in_chunks(body, [])
    assert unstuff(whole) == body.replace(b"\n", b"\r\n")
    for _ in range(200):
        sizes = [rng.randint(0, 50) for _ in range(rng.randint(1, 80))]
        assert stuff_in_chunks(body, sizes) == whole


def test_dot_stuffer_line_endings_are_normalised():
    # a chunk ending in CR followed by one starting with LF is one line ending, not two
    assert stuff_in_chunks(b"a\r\n.b\rc", [2]) == b"a\r\n..b\r\nc\r\n.\r\n"
    # bare CR and bare LF never reach the wire (SMTP smuggling)
    wire = stuff_in_chunks(b"x\n.\rMAIL FROM:<evil>\r", [])
    assert b"\r\n.\r\n" not in wire[:-5]
    assert wire.count(b"\n") == wire.count(b"\r\n")


def test_dot_stuffer_empty_and_unterminated():
    assert stuff_in_chunks(b"", []) == b".\r\n"
    assert stuff_in_chunks(b"no newline", []) == b"no newline\r\n.\r\n"


def test_reply_parts():
    r = Reply(550, ("5.1.1 <bob@x.test>: no such user", "second line"))
    assert r.enhanced == "5.1.1"
    assert r.text == "<bob@x.test>: no such user second line"
    assert str(r) == "550 5.1.1 <bob@x.test>: no such user second line"
    assert Reply(450, ("mailbox busy",)).enhanced is None
    assert str(Reply(450, ("mailbox busy",))) == "450 mailbox busy"
    # an enhanced code of the wrong class is not taken as one
    assert Reply(250, ("5.0.0 odd",)).enhanced is None


def test_xtext():
    assert xtext("rfc822;a+b=c d@x") == "rfc822;a+2Bb+3Dc+20d@x"


# -- against real servers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")), "sink.test")


def config(**kw) -> ClientConfig:
    kw.setdefault("helo_name", "relay.tmmail.test")
    kw.setdefault("connect_timeout", 5)
    kw.setdefault("command_timeout", 5)
    return ClientConfig(**kw)


def message(path, *rcpts, sender="alice@src.test", **kw) -> OutboundMessage:
    recipients = tuple(r if isinstance(r, OutboundRecipient) else OutboundRecipient(r) for r in rcpts)
    return OutboundMessage(sender=sender, recipients=recipients, path=str(path), **kw)


def write(tmp_path, body: bytes, name="msg.eml"):
    p = tmp_path / name
    p.write_bytes(body)
    return p


def run(reactor_thread, port, cfg, msgs, use_tls=True, host="sink.test"):
    """Open a session, send each message, QUIT; returns (results per message, session)."""

    async def go():
        s = await open_session(reactor, host, "127.0.0.1", port, cfg, use_tls)
        out = []
        for m in msgs:
            out.append(await s.send(m))
        await s.quit()
        return out, s

    return reactor_thread.call(lambda: defer.Deferred.fromCoroutine(go()))


def connect_error(reactor_thread, port, cfg, use_tls=True):
    async def go():
        s = await open_session(reactor, "sink.test", "127.0.0.1", port, cfg, use_tls)
        await s.quit()

    with pytest.raises(smtpclient.SMTPClientError) as e:
        reactor_thread.call(lambda: defer.Deferred.fromCoroutine(go()))
    return e.value


BODY = b"Subject: hello\nFrom: alice@src.test\n\n.leading dot\nline\n"


@pytest.mark.parametrize("pipelining", [True, False])
def test_delivers_with_esmtp_parameters(reactor_thread, tmp_path, pipelining):
    path = write(tmp_path, BODY)
    with Sink(pipelining=pipelining) as sink:
        rc = OutboundRecipient("bob@dst.test", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;bob@orig.test")
        m = message(path, rc, "carol@dst.test", size=len(BODY) + 5, body="8BITMIME", ret="HDRS", envid="Q123")
        (results,), session = run(reactor_thread, sink.port, config(), [m])
    assert [r.status for r in results] == [DELIVERED, DELIVERED]
    assert results[0].reply.code == 250 and results[0].stage == "DATA"
    assert session.remote_mta == "dns; sink.test"
    got = sink.messages[0]
    assert got.content == BODY.replace(b"\n", b"\r\n")
    assert got.mail_from == "alice@src.test"
    assert got.rcpt_tos == ["bob@dst.test", "carol@dst.test"]
    assert got.helo == "relay.tmmail.test"
    assert f"SIZE={len(BODY) + 5}" in got.mail_options and "BODY=8BITMIME" in got.mail_options
    assert got.mail_dsn == {"RET": "HDRS", "ENVID": "Q123"}
    assert got.rcpt_dsn[0] == {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;bob@orig.test"}
    assert got.rcpt_dsn[1] == {}


@pytest.mark.parametrize("smtputf8", [True, False])
def test_utf8_orcpt_goes_on_as_utf8_addr_xtext(reactor_thread, tmp_path, smtputf8):
    """RFC 6533 §3: an ORCPT=utf-8; value taken raw in an SMTPUTF8 transaction goes on as
    utf-8-addr-xtext ("\\x{F6}"), not as xtext "+C3+B6"; already encoded parts stay."""
    path = write(tmp_path, BODY)
    with Sink(smtputf8=smtputf8) as sink:
        rcpts = [OutboundRecipient("bob@dst.test", orcpt="utf-8;j\u00f6e@b\u00fccher.example"),
                 OutboundRecipient("carol@dst.test", orcpt="utf-8;c\\x{E9}a+2Bb@x.example"),
                 OutboundRecipient("dave@dst.test", orcpt="rfc822;dave+2Bx@orig.test")]
        (results,), _ = run(reactor_thread, sink.port, config(), [message(path, *rcpts)])
    assert [r.status for r in results] == [DELIVERED] * 3
    got = sink.messages[0]
    assert [d["ORCPT"] for d in got.rcpt_dsn] == ["utf-8;j\\x{F6}e@b\\x{FC}cher.example",
                                                  "utf-8;c\\x{E9}a+2Bb@x.example", "rfc822;dave+2Bx@orig.test"]
    assert smtpclient.utf8_addr_xtext("a\U0001f600b") == "a\\x{1F600}b"


def test_no_dsn_parameters_to_a_server_without_dsn(reactor_thread, tmp_path):
    path = write(tmp_path, BODY)
    with Sink(dsn=False) as sink:
        rc = OutboundRecipient("bob@dst.test", notify=("NEVER",), orcpt="rfc822;bob@orig.test")
        (results,), _ = run(reactor_thread, sink.port, config(), [message(path, rc, ret="FULL", envid="X")])
    # aiosmtpd would answer 555 to unknown parameters: delivery proves none were sent
    assert results[0].status == DELIVERED
    assert sink.messages[0].content == BODY.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("pipelining", [True, False])
def test_mixed_recipient_outcomes(reactor_thread, tmp_path, pipelining):
    path = write(tmp_path, BODY)
    with Sink(pipelining=pipelining) as sink:
        sink.script.rcpt["later@dst.test"] = "450 4.2.1 mailbox busy, try later"
        sink.script.rcpt["nobody@dst.test"] = "550 5.1.1 no such user here"
        m = message(path, "ok@dst.test", "later@dst.test", "nobody@dst.test")
        (results,), _ = run(reactor_thread, sink.port, config(), [m])
    assert [r.status for r in results] == [DELIVERED, DEFERRED, FAILED]
    assert str(results[1].reply) == "450 4.2.1 mailbox busy, try later"
    assert (results[2].reply.code, results[2].reply.enhanced, results[2].stage) == (550, "5.1.1", "RCPT")
    assert results[2].reply.text == "no such user here"
    assert sink.messages[0].rcpt_tos == ["ok@dst.test"]


@pytest.mark.parametrize("pipelining", [True, False])
def test_no_recipient_accepted_sends_no_message(reactor_thread, tmp_path, pipelining):
    path = write(tmp_path, BODY)
    with Sink(pipelining=pipelining) as sink:
        sink.script.rcpt["a@dst.test"] = "550 5.1.1 nope"
        sink.script.rcpt["b@dst.test"] = "451 4.3.0 later"
        (results, again), _ = run(reactor_thread, sink.port, config(), [message(path, "a@dst.test", "b@dst.test"),
                                                                       message(path, "c@dst.test")])
    assert [r.status for r in results] == [FAILED, DEFERRED]
    # the session is still usable for the next message
    assert again[0].status == DELIVERED
    assert len(sink.messages) == 1 and sink.messages[0].rcpt_tos == ["c@dst.test"]


def test_mail_from_refused(reactor_thread, tmp_path):
    path = write(tmp_path, BODY)
    with Sink() as sink:
        sink.script.mail = "553 5.7.1 sender rejected"
        (results,), _ = run(reactor_thread, sink.port, config(), [message(path, "a@dst.test", "b@dst.test")])
    assert [(r.status, r.stage, r.reply.enhanced) for r in results] == [(FAILED, "MAIL", "5.7.1")] * 2


@pytest.mark.parametrize("reply,status", [("554 5.6.0 content rejected", FAILED), ("452 4.3.1 disk full", DEFERRED)])
def test_data_reply_applies_to_every_accepted_recipient(reactor_thread, tmp_path, reply, status):
    path = write(tmp_path, BODY)
    with Sink() as sink:
        sink.script.rcpt["x@dst.test"] = "550 5.1.1 unknown"
        sink.script.data = reply
        (results,), _ = run(reactor_thread, sink.port, config(), [message(path, "a@dst.test", "x@dst.test", "b@dst.test")])
    assert [r.status for r in results] == [status, FAILED, status]
    assert str(results[0].reply) == reply and results[0].stage == "DATA"
    assert results[1].stage == "RCPT"
    assert sink.messages == []


@pytest.mark.parametrize("action", ["drop", "drop-mid"])
def test_dropped_connection_defers_accepted_recipients(reactor_thread, tmp_path, action):
    path = write(tmp_path, (b"x" * 70 + b"\n") * 3000)
    with Sink() as sink:
        sink.script.rcpt["x@dst.test"] = "550 5.1.1 unknown"
        sink.script.data = action
        (results,), session = run(reactor_thread, sink.port, config(), [message(path, "a@dst.test", "x@dst.test")])
    assert [r.status for r in results] == [DEFERRED, FAILED]
    assert results[0].stage == "connection" and results[0].reply.enhanced == "4.4.2"
    assert not results[0].remote
    assert not session.usable


def test_several_messages_share_one_connection(reactor_thread, tmp_path):
    paths = [write(tmp_path, b"Subject: %d\n\nbody %d\n" % (i, i), f"m{i}.eml") for i in range(3)]
    with Sink() as sink:
        sink.script.data_sequence = [None, "451 4.3.0 temporary", None]
        results, session = run(reactor_thread, sink.port, config(), [message(p, f"r{i}@dst.test") for i, p in enumerate(paths)])
    assert [r[0].status for r in results] == [DELIVERED, DEFERRED, DELIVERED]
    assert sink.connections == 1
    assert [m.rcpt_tos for m in sink.messages] == [["r0@dst.test"], ["r2@dst.test"]]
    assert sink.messages[1].content == b"Subject: 2\r\n\r\nbody 2\r\n"
    assert session.transactions == 3


def test_dots_at_chunk_boundaries_arrive_byte_identical(reactor_thread, tmp_path):
    """A line starting with "." at offset 0, at every 16 KiB boundary (twisted's chunk size) and at
    every 64 KiB boundary (ours), plus dot-only lines and a smuggling attempt."""
    body = bytearray(b".first line starts with a dot\n")
    boundary = 16384
    rng = random.Random(3)
    while len(body) < 5 * 65536:
        room = boundary - (len(body) % boundary)
        if room > 90:
            n = min(room - 1, rng.randint(1, 80))
            body += rng.choice([b".", b"x", b".."]) + b"y" * (n - 1) + b"\n"
        else:
            body += b"z" * (room - 1) + b"\n"  # the next line starts exactly at the boundary
            body += b".\nMAIL FROM:<smuggled@evil.test>\n..\n"
    body += b".\n.last line without newline"
    path = write(tmp_path, bytes(body))
    with Sink() as sink:
        (results,), _ = run(reactor_thread, sink.port, config(), [message(path, "bob@dst.test")])
    assert results[0].status == DELIVERED
    assert len(sink.messages) == 1
    expected = bytes(body).replace(b"\n", b"\r\n") + b"\r\n"
    assert sink.messages[0].content == expected
    assert sum(1 for k in range(0, len(body), boundary) if body[k : k + 1] == b".") > 10


def test_opportunistic_starttls(reactor_thread, tmp_path, pki):
    path = write(tmp_path, BODY)
    with Sink(tls=pki.server_context()) as sink:
        (results,), session = run(reactor_thread, sink.port, config(), [message(path, "bob@dst.test")])
    assert results[0].status == DELIVERED
    assert session.tls and sink.messages[0].tls


def test_starttls_handshake_failure_is_reported_as_tls_failure(reactor_thread, pki):
    # the server offers STARTTLS but cannot complete a handshake
    with Sink(tls=pki.server_context(broken=True)) as sink:
        err = connect_error(reactor_thread, sink.port, config())
    assert isinstance(err, TLSFailed)


def test_required_tls_with_verified_certificate_and_auth(reactor_thread, tmp_path, pki):
    path = write(tmp_path, BODY)
    trust = Certificate.loadPEM(pki.ca_pem)
    cfg = config(tls="starttls", verify=True, trust_root=trust, user="relay", password="s3cret")
    with Sink(tls=pki.server_context(), auth={"relay": "s3cret"}) as sink:
        (results,), session = run(reactor_thread, sink.port, cfg, [message(path, "bob@dst.test")])
    assert results[0].status == DELIVERED
    assert sink.messages[0].tls and sink.messages[0].login == "relay"


def test_auth_login_when_plain_is_not_offered(reactor_thread, tmp_path, pki, monkeypatch):
    path = write(tmp_path, BODY)
    original = smtpclient._parse_ehlo

    def only_login(reply):
        ext = original(reply)
        if "AUTH" in ext:
            ext["AUTH"] = "LOGIN"
        return ext

    monkeypatch.setattr(smtpclient, "_parse_ehlo", only_login)
    cfg = config(tls="starttls", user="relay", password="s3cret")
    with Sink(tls=pki.server_context(), auth={"relay": "s3cret"}) as sink:
        (results,), _ = run(reactor_thread, sink.port, cfg, [message(path, "bob@dst.test")])
    assert results[0].status == DELIVERED and sink.messages[0].login == "relay"


def test_wrong_password_is_an_auth_error(reactor_thread, pki):
    cfg = config(tls="starttls", user="relay", password="wrong")
    with Sink(tls=pki.server_context(), auth={"relay": "s3cret"}) as sink:
        err = connect_error(reactor_thread, sink.port, cfg)
    assert isinstance(err, ReplyError) and err.stage == "AUTH" and err.reply.code == 535


def test_verification_failure_with_unknown_ca(reactor_thread, tmp_path, pki):
    other = make_pki(str(tmp_path / "other"), "sink.test")
    cfg = config(tls="starttls", verify=True, trust_root=Certificate.loadPEM(other.ca_pem))
    with Sink(tls=pki.server_context()) as sink:
        err = connect_error(reactor_thread, sink.port, cfg)
    assert isinstance(err, TLSFailed)
    assert sink.messages == []


def test_verification_failure_with_wrong_name(reactor_thread, pki):
    cfg = config(tls="starttls", verify=True, trust_root=Certificate.loadPEM(pki.ca_pem))
    with Sink(tls=pki.server_context()) as sink:
        async def go():
            await open_session(reactor, "other.test", "127.0.0.1", sink.port, cfg)

        with pytest.raises(TLSFailed):
            reactor_thread.call(lambda: defer.Deferred.fromCoroutine(go()))


def test_required_starttls_not_offered(reactor_thread):
    with Sink() as sink:
        err = connect_error(reactor_thread, sink.port, config(tls="starttls"))
    assert isinstance(err, TLSFailed) and "STARTTLS" in err.text


def test_credentials_never_sent_without_tls(reactor_thread):
    with Sink() as sink:
        err = connect_error(reactor_thread, sink.port, config(user="relay", password="pw"))
    assert isinstance(err, TLSFailed)


def test_implicit_tls_with_auth(reactor_thread, tmp_path, pki):
    path = write(tmp_path, BODY)
    cfg = config(tls="implicit", verify=True, trust_root=Certificate.loadPEM(pki.ca_pem), user="relay", password="s3cret")
    with Sink(implicit_tls=pki.server_context(), auth={"relay": "s3cret"}) as sink:
        (results,), session = run(reactor_thread, sink.port, cfg, [message(path, "bob@dst.test")])
    assert results[0].status == DELIVERED and session.tls
    assert sink.messages[0].login == "relay"


def test_greeting_refusal(reactor_thread):
    with Sink() as sink:
        sink.script.greeting = "554 5.3.2 no service here"
        err = connect_error(reactor_thread, sink.port, config())
    assert isinstance(err, ReplyError) and err.stage == "greeting" and err.reply.code == 554


def test_smtputf8_address_to_a_server_without_it(reactor_thread, tmp_path):
    path = write(tmp_path, BODY)
    with Sink(smtputf8=False) as sink:
        (results,), _ = run(reactor_thread, sink.port, config(), [message(path, "jörg@dst.test", "ascii@dst.test")])
    assert [(r.status, r.reply.enhanced) for r in results] == [(FAILED, "5.6.7")] * 2
    assert sink.messages == []


def test_idn_domain_goes_as_a_labels_to_a_server_without_smtputf8(reactor_thread, tmp_path):
    path = write(tmp_path, BODY)
    with Sink(smtputf8=False) as sink:
        (results,), _ = run(reactor_thread, sink.port, config(), [message(path, "bob@bücher.test", sender="a@münchen.test")])
    assert results[0].status == DELIVERED
    assert sink.messages[0].rcpt_tos == ["bob@xn--bcher-kva.test"]
    assert sink.messages[0].mail_from == "a@xn--mnchen-3ya.test"
    assert "SMTPUTF8" not in sink.messages[0].mail_options


def test_smtputf8_address_to_a_server_with_it(reactor_thread, tmp_path):
    path = write(tmp_path, BODY)
    with Sink() as sink:
        (results,), _ = run(reactor_thread, sink.port, config(), [message(path, "jörg@dst.test")])
    assert results[0].status == DELIVERED
    assert "SMTPUTF8" in sink.messages[0].mail_options and sink.messages[0].rcpt_tos == ["jörg@dst.test"]


# -- scripted misbehaving peers (plain Twisted servers) ------------------------------------------


class Scripted(protocol.Protocol):
    """Writes ``greeting`` on connect, then answers each line from ``answers`` (a dict by prefix)."""

    def __init__(self, greeting: bytes | None, answers: dict[bytes, bytes]) -> None:
        self.greeting, self.answers, self.buf = greeting, answers, b""

    def connectionMade(self):
        if self.greeting is not None:
            self.transport.write(self.greeting)

    def dataReceived(self, data):
        self.buf += data
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            for prefix, answer in self.answers.items():
                if line.upper().startswith(prefix):
                    self.transport.write(answer)
                    break


def scripted(reactor_thread, greeting, answers):
    factory = protocol.Factory.forProtocol(lambda: Scripted(greeting, answers))
    return reactor_thread.listen(factory)


def test_silent_server_times_out(reactor_thread):
    port = scripted(reactor_thread, None, {})
    try:
        t0 = time.monotonic()
        err = connect_error(reactor_thread, port.getHost().port, config(command_timeout=0.5))
        assert isinstance(err, Timeout)
        assert time.monotonic() - t0 < 5
    finally:
        reactor_thread.call(port.stopListening)


def test_connection_refused(reactor_thread):
    from tests.smtpsink import free_port

    err = connect_error(reactor_thread, free_port(), config())
    assert isinstance(err, smtpclient.ConnectFailed)


def test_plaintext_after_starttls_reply_is_refused(reactor_thread):
    port = scripted(
        reactor_thread,
        b"220 evil.test ESMTP\r\n",
        {b"EHLO": b"250-evil.test\r\n250 STARTTLS\r\n", b"STARTTLS": b"220 go ahead\r\n250 injected\r\n"},
    )
    try:
        err = connect_error(reactor_thread, port.getHost().port, config())
        assert isinstance(err, ProtocolError)
    finally:
        reactor_thread.call(port.stopListening)


def test_helo_fallback_and_bounded_reply_lines(reactor_thread, tmp_path):
    port = scripted(
        reactor_thread,
        b"220 old.test SMTP\r\n",
        {b"EHLO": b"502 command not implemented\r\n", b"HELO": b"250 old.test\r\n", b"MAIL": b"250 ok\r\n",
         b"RCPT": b"250 ok\r\n", b"DATA": b"354 go\r\n", b".": b"250 queued\r\n", b"QUIT": b"221 bye\r\n"},
    )
    try:
        path = write(tmp_path, b"hi\n")
        (results,), session = run(reactor_thread, port.getHost().port, config(), [message(path, "a@old.test")],
                                  host="old.test")
        assert results[0].status == DELIVERED
        assert not session.esmtp
    finally:
        reactor_thread.call(port.stopListening)

    port = scripted(reactor_thread, b"220-" + b"x" * 10000 + b"\r\n", {})
    try:
        err = connect_error(reactor_thread, port.getHost().port, config())
        assert isinstance(err, ProtocolError)
    finally:
        reactor_thread.call(port.stopListening)


class Stalling(Scripted):
    """Answers like a server up to 354 and then stops reading: the client's writes stall."""

    def dataReceived(self, data):
        if getattr(self, "stalled", False):
            return
        super().dataReceived(data)
        if b"DATA\r\n" in data:
            self.stalled = True
            self.transport.pauseProducing()


def test_stalled_data_transfer_times_out(reactor_thread, tmp_path):
    answers = {b"EHLO": b"250 stall.test\r\n", b"MAIL": b"250 ok\r\n", b"RCPT": b"250 ok\r\n", b"DATA": b"354 go\r\n"}
    # a paused server connection is referenced by nothing in the reactor: keep it, or the
    # garbage collector closes its socket and the client sees a reset instead of silence
    servers: list[Stalling] = []

    def build() -> Stalling:
        servers.append(Stalling(b"220 stall.test\r\n", answers))
        return servers[-1]

    port = reactor_thread.listen(protocol.Factory.forProtocol(build))
    try:
        path = write(tmp_path, (b"z" * 999 + b"\n") * 32768)  # 32 MB: more than the socket buffers
        t0 = time.monotonic()
        (results,), session = run(reactor_thread, port.getHost().port, config(command_timeout=1.0),
                                  [message(path, "a@stall.test")])
        assert results[0].status == DEFERRED and results[0].stage == "connection"
        assert "no reply within 1 seconds" in results[0].reply.text
        assert not session.usable
        assert time.monotonic() - t0 < 20
    finally:
        reactor_thread.call(port.stopListening)
        for server in servers:
            reactor_thread.call(server.transport.abortConnection)


def test_end_of_data_waits_twice_the_command_timeout(reactor_thread, tmp_path):
    answers = {b"EHLO": b"250 slow.test\r\n", b"MAIL": b"250 ok\r\n", b"RCPT": b"250 ok\r\n", b"DATA": b"354 go\r\n"}
    port = scripted(reactor_thread, b"220 slow.test\r\n", answers)  # never answers the final dot
    try:
        path = write(tmp_path, b"hi\n")
        (results,), _ = run(reactor_thread, port.getHost().port, config(command_timeout=0.5), [message(path, "a@slow.test")])
        assert results[0].status == DEFERRED
        assert "no reply within 1 seconds" in results[0].reply.text
    finally:
        reactor_thread.call(port.stopListening)


def test_refused_pipelined_rset_defers_the_message_and_drops_the_session(reactor_thread, tmp_path):
    # RSET opens the pipelined group of a reused connection (RFC 2920); if the server refuses
    # it, nothing after it counts: the message is deferred and the connection is not reused
    path = write(tmp_path, b"Subject: x\n\nbody\n")
    port = scripted(
        reactor_thread,
        b"220 pipe.test ESMTP\r\n",
        {b"EHLO": b"250-pipe.test\r\n250 PIPELINING\r\n", b"RSET": b"503 5.5.1 no\r\n", b"MAIL": b"250 ok\r\n",
         b"RCPT": b"250 ok\r\n", b"DATA": b"354 go\r\n", b".": b"250 2.0.0 queued\r\n"},
    )

    async def go():
        s = await open_session(reactor, "pipe.test", "127.0.0.1", port.getHost().port, config(), False)
        first = await s.send(message(path, "a@dst.test"))
        second = await s.send(message(path, "b@dst.test"))
        s.abort()
        return first, second, s

    try:
        first, second, s = reactor_thread.call(lambda: defer.Deferred.fromCoroutine(go()))
    finally:
        reactor_thread.call(port.stopListening)
    assert first[0].status == DELIVERED
    assert second[0].status == DEFERRED and not s.usable


# -- only ASCII digits are digits in what a remote server says -----------------------------------


def test_size_limit_and_enhanced_codes_take_ascii_digits_only():
    assert smtpclient._size_limit("12") == 12 and smtpclient._size_limit("0") == 0
    assert smtpclient._size_limit(None) == 0 and smtpclient._size_limit("") == 0
    # int() reads all of these as numbers: none is a SIZE (RFC 1870 1*DIGIT)
    for odd in ("\u0661\u0662", "\uff11\uff12", "1_000", "+12", "\u00b2", "12\u00b2", "1" * 21):
        assert smtpclient._size_limit(odd) == 0, odd
    assert Reply(550, ("5.1.1 no",)).enhanced == "5.1.1"
    for odd in ("5.\u0661.\u0661 no", "5.\uff11.1 no", "5.1.\u0663 no", "\u0665.1.1 no", "5.1.1\u00a0no"):
        r = Reply(550, (odd,))
        assert r.enhanced is None and r.text == odd and str(r) == "550 " + odd, odd


def test_remote_ehlo_size_and_reply_codes_in_other_scripts(reactor_thread, tmp_path):
    """A peer that advertises "SIZE \u0661\u0662" (Arabic-Indic 12) has no 12-octet limit; a
    peer that answers "550 5.\u0661.\u0661" gives no enhanced status code."""
    port = scripted(
        reactor_thread,
        b"220 odd.test ESMTP\r\n",
        {b"EHLO": "250-odd.test\r\n250 SIZE \u0661\u0662\r\n".encode(), b"MAIL": b"250 ok\r\n",
         b"RCPT TO:<A@": "550 5.\u0661.\u0661 no such user\r\n".encode(), b"RCPT": b"250 ok\r\n",
         b"DATA": b"354 go\r\n", b".": b"250 2.0.0 queued\r\n", b"QUIT": b"221 bye\r\n"},
    )
    try:
        path = write(tmp_path, b"Subject: longer than twelve octets\n\nbody\n")
        (results,), session = run(reactor_thread, port.getHost().port, config(),
                                  [message(path, "a@odd.test", "b@odd.test", size=40)], use_tls=False,
                                  host="odd.test")
    finally:
        reactor_thread.call(port.stopListening)
    assert session.extensions["SIZE"] == "\u0661\u0662"
    assert (results[0].status, results[0].stage, results[0].reply.enhanced) == (FAILED, "RCPT", None)
    assert results[1].status == DELIVERED  # not refused here as "552 5.3.4 exceeds 12"


def test_remote_ascii_size_limit_still_applies(reactor_thread, tmp_path):
    port = scripted(reactor_thread, b"220 small.test ESMTP\r\n",
                    {b"EHLO": b"250-small.test\r\n250 SIZE 12\r\n", b"QUIT": b"221 bye\r\n"})
    try:
        path = write(tmp_path, b"Subject: longer than twelve octets\n\nbody\n")
        (results,), _ = run(reactor_thread, port.getHost().port, config(),
                            [message(path, "a@small.test", size=40)], use_tls=False, host="small.test")
    finally:
        reactor_thread.call(port.stopListening)
    assert (results[0].status, results[0].stage, results[0].reply.code) == (FAILED, "SIZE", 552)


def test_ehlo_keywords_and_auth_mechanisms_are_ascii_only():
    ehlo = Reply(250, ("odd.test", "\u017fmtputf8", "d\u017fn", "PIPELINING", "AUTH PLA\u0131N login",
                       "SIZE \u00a012", "8BITMIME "))
    ext = smtpclient._parse_ehlo(ehlo)
    assert ext == {"PIPELINING": "", "AUTH": "PLA\u0131N login", "SIZE": "\u00a012", "8BITMIME": ""}
    assert smtpclient._auth_mechanisms(ext["AUTH"]) == ["LOGIN"]  # "PLA\u0131N".upper() == "PLAIN"
    assert smtpclient._size_limit(ext["SIZE"]) == 0
    assert smtpclient._parse_ehlo(Reply(250, ("x", "AUTH=PLAIN LOGIN"))) == {"AUTH": "PLAIN LOGIN"}


def test_unicode_ehlo_keywords_are_not_extensions(reactor_thread, tmp_path):
    """"\u017fmtputf8".upper() is "SMTPUTF8": a peer that says so has not offered SMTPUTF8, so
    a non-ASCII local part is not sent to it."""
    port = scripted(
        reactor_thread,
        b"220 odd.test ESMTP\r\n",
        {b"EHLO": "250-odd.test\r\n250-\u017fmtputf8\r\n250 d\u017fn\r\n".encode(), b"QUIT": b"221 bye\r\n"},
    )
    try:
        path = write(tmp_path, b"Subject: x\n\nbody\n")
        (results,), session = run(reactor_thread, port.getHost().port, config(),
                                  [message(path, "j\u00f6rg@odd.test")], use_tls=False, host="odd.test")
    finally:
        reactor_thread.call(port.stopListening)
    assert not session.has("SMTPUTF8") and not session.has("DSN")
    assert (results[0].status, results[0].stage, results[0].reply.enhanced) == (FAILED, "SMTPUTF8", "5.6.7")

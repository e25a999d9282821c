"""The outbound ESMTP client: one connection, one or more mail transactions (RFC 5321).

A small protocol on a bounded line reader instead of twisted.mail.smtp.ESMTPClient, whose
per-chunk dot-stuffing misses dots at 16 KiB chunk boundaries and on the first line (an SMTP
smuggling vector) and which has no timeouts (docs/survey §1.5, §1.7).  What it does:

* EHLO with HELO fallback (§4.1.1.1, §3.2); STARTTLS (RFC 3207) opportunistic or required, and
  implicit TLS (RFC 8314); plaintext received after the 220 to STARTTLS is refused (response
  injection, the client side of CVE-2011-0411); AUTH PLAIN / LOGIN (RFC 4954) only under TLS
  unless TLS is explicitly off.
* MAIL FROM with SIZE (RFC 1870), BODY=8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531) and the RFC 3461
  DSN parameters RET/ENVID and per-RCPT NOTIFY/ORCPT, only when the peer advertises them;
  PIPELINING (RFC 2920) when offered.
* DATA streamed from the spool file through :class:`DotStuffer` (LF -> CRLF, a "." at the start
  of any line doubled wherever it falls in a read chunk, §4.5.2), RSET between messages, QUIT.
* A timeout for the connection, the TLS handshake, every reply and every stalled write
  (§4.5.3.2); a peer that goes silent is dropped, never waited on forever.
* Per-recipient results: the RCPT reply (2xx accepted, 4xx deferred, 5xx failed) and then the
  DATA reply for the accepted ones; a 421 or a lost connection defers whatever is left.

Blocking work: none; the message file is read in chunks as the transport asks for more.
"""

from __future__ import annotations

import base64
import collections
import ipaddress
import re
from dataclasses import dataclass, replace
from typing import IO, Any, Sequence

from OpenSSL import SSL
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IHandshakeListener, IPullProducer
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "Reply",
    "DotStuffer",
    "ClientConfig",
    "OutboundRecipient",
    "OutboundMessage",
    "RecipientResult",
    "Session",
    "open_session",
    "SMTPClientError",
    "ConnectFailed",
    "ReplyError",
    "TLSFailed",
    "Timeout",
    "ConnectionDropped",
    "ProtocolError",
    "xtext",
    "ascii_address",
    "DELIVERED",
    "DEFERRED",
    "FAILED",
]

log = Logger(namespace="tmmail.smtpclient")

#: RFC 5321 §4.5.3.1.5 says 512 octets per reply line; be generous but bounded
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 200
#: bytes read from the spool file per write
CHUNK_SIZE = 1 << 16

DELIVERED = "delivered"
DEFERRED = "deferred"
FAILED = "failed"

TLS_MODES = ("opportunistic", "starttls", "implicit", "none")

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_REPLY_LINE = re.compile(rb"^([2-5]\d\d)([ -]?)(.*)$", re.DOTALL)


# -- replies and errors ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...] = ("",)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code of the first line, if the server sent one."""
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m and m.group(1) == str(self.code)[0] else None

    @property
    def text(self) -> str:
        """All lines joined with spaces, the enhanced code of the first line removed."""
        first = self.lines[0] if self.lines else ""
        m = _ENHANCED.match(first)
        if m and m.group(1) == str(self.code)[0]:
            first = first[m.end():]
        return " ".join([first, *self.lines[1:]]).strip()

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        """The reply as one line, as DSN Diagnostic-Code shows it: "550 5.1.1 no such user"."""
        enhanced = self.enhanced
        return f"{self.code} {enhanced} {self.text}".rstrip() if enhanced else f"{self.code} {self.text}".rstrip()


class SMTPClientError(Exception):
    """Something went wrong at the connection level; ``text`` is for logs and DSNs."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class ConnectFailed(SMTPClientError):
    """TCP connect failed or timed out."""


class ReplyError(SMTPClientError):
    """The peer refused a session-level command (greeting, EHLO/HELO, STARTTLS, AUTH)."""

    def __init__(self, stage: str, reply: Reply) -> None:
        super().__init__(f"{stage}: {reply}")
        self.stage = stage
        self.reply = reply


class TLSFailed(SMTPClientError):
    """The TLS handshake failed (opportunistic mode may reconnect without TLS)."""


class Timeout(SMTPClientError):
    """No reply (or no write progress) within the command timeout."""


class ConnectionDropped(SMTPClientError):
    """The peer closed the connection."""


class ProtocolError(SMTPClientError):
    """The peer sent something that is not an SMTP reply (the connection is dropped)."""


# -- the dot-stuffer ---------------------------------------------------------------------------


class DotStuffer:
    """Turns LF-terminated message bytes into the DATA stream, chunk by chunk (RFC 5321 §4.5.2).

    State carried across chunks: whether the output is at the start of a line and whether the
    last chunk ended in CR.  Every line ending (LF, CRLF, a lone CR) becomes CRLF, so no bare
    CR or LF ever reaches the wire (SMTP smuggling), and a "." that starts a line is doubled
    whether it is the first byte of the message, of a chunk, or anywhere else.
    """

    def __init__(self) -> None:
        self._bol = True
        self._cr = False

    def feed(self, data: bytes) -> bytes:
        if self._cr and data[:1] == b"\n":
            data = data[1:]
        if not data:
            self._cr = False
            return b""
        self._cr = data.endswith(b"\r")
        out = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        out = out.replace(b"\r\n.", b"\r\n..")
        if self._bol and out[:1] == b".":
            out = b"." + out
        self._bol = out.endswith(b"\r\n")
        return out

    def finish(self) -> bytes:
        """The end-of-data marker, after a CRLF if the message did not end with one."""
        tail = b"" if self._bol else b"\r\n"
        self._bol = True
        return tail + b".\r\n"


def xtext(value: str) -> str:
    """RFC 3461 §4: encode "+", "=", controls, space and non-ASCII as "+HH"."""
    out = []
    for ch in value.encode("utf-8"):
        if ch < 33 or ch > 126 or ch in (0x2B, 0x3D):
            out.append(f"+{ch:02X}")
        else:
            out.append(chr(ch))
    return "".join(out)


def _xtext_safe(value: str) -> str:
    """A value that may already be xtext (from a client's MAIL/RCPT): encode only what must be."""
    out = []
    for ch in value.encode("utf-8"):
        if ch < 33 or ch > 126 or ch == 0x3D:
            out.append(f"+{ch:02X}")
        else:
            out.append(chr(ch))
    return "".join(out)


# -- the wire protocol -------------------------------------------------------------------------


@implementer(IHandshakeListener)
class ClientProtocol(protocol.Protocol):
    """Bounded reply reader + command writer; every wait is covered by ``timeout`` seconds."""

    def __init__(self, clock: Any, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._buf = b""
        self._code: bytes | None = None
        self._lines: list[str] = []
        self._waiters: collections.deque[defer.Deferred] = collections.deque()
        self._timer: Any = None
        self._timed_out = False
        self._handshake: defer.Deferred | None = None
        self._producing = False
        #: waiting for the reply to the final dot (RFC 5321 §4.5.3.2.6: 10 minutes)
        self._awaiting_dot = False
        self._armed_for = timeout
        self._timeout_text = ""
        self.closed = False
        self.closing_reply: Reply | None = None
        self.tls = False
        self.lost_reason: Failure | None = None
        self._lost_waiters: list[defer.Deferred] = []
        self.greeting = self._expect()

    def when_closed(self) -> defer.Deferred:
        """A Deferred fired (with None) once the connection is closed."""
        if self.closed:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._lost_waiters.append(d)
        return d

    # connection events

    def connectionMade(self) -> None:
        self._arm()

    def handshakeCompleted(self) -> None:
        self.tls = True
        d, self._handshake = self._handshake, None
        self._arm()
        if d is not None:
            d.callback(None)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        self.lost_reason = reason
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._timed_out:
            err: SMTPClientError = Timeout(self._timeout_text)
        elif reason.check(SSL.Error):
            err = TLSFailed(f"TLS failed: {_ssl_text(reason.value)}")
        else:
            err = ConnectionDropped("connection lost" + (f" ({reason.value})" if reason.value else ""))
        d, self._handshake = self._handshake, None
        if d is not None:
            d.errback(err if isinstance(err, (Timeout, TLSFailed)) else TLSFailed(f"TLS handshake failed: {err.text}"))
        waiters, self._waiters = self._waiters, collections.deque()
        for w in waiters:
            w.errback(err)
        lost, self._lost_waiters = self._lost_waiters, []
        for w in lost:
            w.callback(None)

    # timeouts

    def _busy(self) -> bool:
        return bool(self._waiters) or self._handshake is not None or self._producing

    def _arm(self) -> None:
        """(Re)start the inactivity timer while something is awaited; stop it otherwise."""
        if self.closed or self._timed_out:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self._busy():
            self._timer = None
            return
        # the end of data gets twice the command timeout (default 600 s, RFC 5321 §4.5.3.2.6)
        self._armed_for = self.timeout * 2 if self._awaiting_dot and not self._producing else self.timeout
        self._timer = self.clock.callLater(self._armed_for, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._timed_out = True
        self._timeout_text = f"no reply within {self._armed_for:g} seconds"
        log.info("SMTP peer {peer} timed out", peer=_peer(self.transport))
        self.transport.abortConnection()

    # reading replies

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self._buf += data
        while not self.closed:
            i = self._buf.find(b"\n")
            if i < 0:
                if len(self._buf) > MAX_REPLY_LINE:
                    self._protocol_error("reply line too long")
                return
            line, self._buf = self._buf[:i], self._buf[i + 1 :]
            if len(line) > MAX_REPLY_LINE:
                self._protocol_error("reply line too long")
                return
            self._line(line.rstrip(b"\r"))

    def _line(self, line: bytes) -> None:
        m = _REPLY_LINE.match(line)
        if m is None or (self._code is not None and m.group(1) != self._code):
            self._protocol_error(f"malformed reply line {line[:80]!r}")
            return
        self._code = m.group(1)
        self._lines.append(m.group(3).decode("utf-8", "replace"))
        if m.group(2) == b"-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._protocol_error("reply with too many lines")
            return
        reply = Reply(int(self._code), tuple(self._lines))
        self._code, self._lines = None, []
        if not self._waiters:
            # RFC 5321 §3.8: a server may send 421 at any time before closing
            if reply.code == 421:
                self.closing_reply = reply
                self.transport.loseConnection()
            else:
                self._protocol_error(f"unexpected reply {reply}")
            return
        d = self._waiters.popleft()
        self._arm()
        d.callback(reply)

    def _protocol_error(self, why: str) -> None:
        log.warn("SMTP peer {peer}: {why}", peer=_peer(self.transport), why=why)
        self._buf = b""
        err = ProtocolError(why)
        waiters, self._waiters = self._waiters, collections.deque()
        self.transport.abortConnection()
        for w in waiters:
            w.errback(err)

    def _expect(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        if self.transport is not None:
            self._arm()
        return d

    # writing commands

    def command(self, line: bytes) -> defer.Deferred:
        """Send one command line; Deferred[Reply]."""
        return self.pipeline([line])[0]

    def pipeline(self, lines: Sequence[bytes]) -> list[defer.Deferred]:
        """Send several commands in one write (RFC 2920); one Deferred[Reply] each, in order."""
        if self.closed:
            return [defer.fail(ConnectionDropped("connection already closed")) for _ in lines]
        ds = [self._expect() for _ in lines]
        self.transport.write(b"".join(line + b"\r\n" for line in lines))
        return ds

    def start_tls(self, context: Any) -> defer.Deferred:
        """Switch to TLS after the 220 to STARTTLS; Deferred fires when the handshake is done."""
        if self._buf:
            # plaintext that arrived with the 220 would be read as if it came under TLS
            self._protocol_error("data after the STARTTLS reply (response injection)")
            return defer.fail(ProtocolError("data after the STARTTLS reply"))
        self._handshake = defer.Deferred()
        d = self._handshake
        self.transport.startTLS(context)
        self._arm()
        return d

    def send_body(self, fileobj: IO[bytes]) -> defer.Deferred:
        """Stream the message (after 354) and the final dot; Deferred[Reply] to the dot."""
        d = self._expect()
        producer = _BodyProducer(self, fileobj)
        self._producing = True
        self._awaiting_dot = True
        self._arm()
        self.transport.registerProducer(producer, False)

        def done(result: Any) -> Any:
            self._awaiting_dot = False
            producer.stop()
            return result

        return d.addBoth(done)

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abortConnection()


@implementer(IPullProducer)
class _BodyProducer:
    """Feeds the file through a DotStuffer whenever the transport wants more (pull producer)."""

    def __init__(self, proto: ClientProtocol, fileobj: IO[bytes]) -> None:
        self.proto = proto
        self.file = fileobj
        self.stuffer = DotStuffer()
        self.finished = False

    def resumeProducing(self) -> None:
        if self.finished or self.proto.closed:
            return
        chunk = self.file.read(CHUNK_SIZE)
        if chunk:
            self.proto.transport.write(self.stuffer.feed(chunk))
        else:
            self.proto.transport.write(self.stuffer.finish())
            self.stop()
        self.proto._arm()

    def stopProducing(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.proto._producing = False
        if not self.proto.closed:
            self.proto.transport.unregisterProducer()
            self.proto._arm()


def _peer(transport: Any) -> str:
    try:
        p = transport.getPeer()
        return f"{p.host}:{p.port}"
    except Exception:
        return "?"


def _ssl_text(err: Any) -> str:
    try:
        parts = [e[2] for e in err.args[0] if len(e) > 2]
        return ", ".join(p for p in parts if p) or str(err)
    except Exception:
        return str(err)


# -- configuration and message descriptions ----------------------------------------------------


@dataclass(frozen=True)
class ClientConfig:
    """How to talk to one kind of destination (MX, route, smarthost)."""

    helo_name: str
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    #: "opportunistic" (MX: STARTTLS if offered, plain if not or if it fails), "starttls"
    #: (required), "implicit" (TLS from the first byte, port 465), "none"
    tls: str = "opportunistic"
    #: verify the certificate (service-identity against the host name); required modes only
    verify: bool = False
    #: IOpenSSLTrustRoot for verification; None = the platform's CA store
    trust_root: Any = None
    user: str = ""
    password: str = ""
    source_address: str = ""

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"unknown TLS mode {self.tls!r}")


@dataclass(frozen=True)
class OutboundRecipient:
    address: str
    notify: tuple[str, ...] | None = None
    #: "rfc822;addr" (as stored in the envelope: already xtext from a client, or plain)
    orcpt: str | None = None


@dataclass(frozen=True)
class OutboundMessage:
    sender: str
    recipients: tuple[OutboundRecipient, ...]
    #: the spool file (LF line endings)
    path: str
    #: octets on the wire (CRLF form) for SIZE=
    size: int = 0
    #: "8BITMIME", "7BIT" or None (from the client's MAIL FROM BODY=)
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


@dataclass
class RecipientResult:
    """What happened to one recipient in one transaction."""

    status: str  # DELIVERED, DEFERRED, FAILED
    reply: Reply
    #: "MAIL", "RCPT", "DATA", "SIZE", "SMTPUTF8" or "connection"
    stage: str
    #: True when ``reply`` came from the peer (DSN Diagnostic-Code "smtp; ...")
    remote: bool = True


# -- the session -------------------------------------------------------------------------------


class Session:
    """An open, greeted (and maybe TLS-protected, authenticated) connection to one hop."""

    def __init__(self, proto: ClientProtocol, host: str, address: str, port: int, config: ClientConfig) -> None:
        self.proto = proto
        self.host = host
        self.address = address
        self.port = port
        self.config = config
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.greeting_name = ""
        self.transactions = 0
        self.broken = False
        #: the current/last transaction got as far as sending message data
        self.data_sent = False

    @property
    def tls(self) -> bool:
        return self.proto.tls

    @property
    def usable(self) -> bool:
        return not self.proto.closed and not self.broken

    @property
    def remote_mta(self) -> str:
        """RFC 3464 §2.3.5 Remote-MTA value: the host name we connected to."""
        return f"dns; {self.host}"

    def __str__(self) -> str:
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.host}[{addr}]:{self.port}"

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    # -- session setup ----------------------------------------------------------------------

    async def _hello(self) -> None:
        name = self.config.helo_name.encode("idna") if not self.config.helo_name.isascii() else self.config.helo_name.encode()
        reply = await self.proto.command(b"EHLO " + name)
        if reply.transient:
            raise ReplyError("EHLO", reply)
        if reply.positive:
            self.esmtp = True
            self.extensions = _parse_ehlo(reply)
            return
        # §4.1.4 / §3.2: servers that do not know EHLO get HELO
        reply = await self.proto.command(b"HELO " + name)
        if not reply.positive:
            raise ReplyError("HELO", reply)
        self.esmtp = False
        self.extensions = {}

    async def _starttls(self, context: Any) -> None:
        reply = await self.proto.command(b"STARTTLS")
        if reply.code != 220:
            raise ReplyError("STARTTLS", reply)
        await self.proto.start_tls(context)
        # RFC 3207 §4.2: forget everything learnt before TLS and say EHLO again
        self.extensions = {}
        await self._hello()

    async def _auth(self) -> None:
        cfg = self.config
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + cfg.user.encode() + b"\0" + cfg.password.encode())
            reply = await self.proto.command(b"AUTH PLAIN " + token)
            if reply.code == 334:
                reply = await self.proto.command(token)
        elif "LOGIN" in mechanisms:
            reply = await self.proto.command(b"AUTH LOGIN")
            if reply.code == 334:
                reply = await self.proto.command(base64.b64encode(cfg.user.encode()))
            if reply.code == 334:
                reply = await self.proto.command(base64.b64encode(cfg.password.encode()))
        else:
            raise ReplyError("AUTH", Reply(504, ("5.7.4 no supported AUTH mechanism offered (need PLAIN or LOGIN)",)))
        if reply.code != 235:
            if reply.code == 334:  # the server wants more than we have: cancel (RFC 4954 §4)
                reply = await self.proto.command(b"*")
            raise ReplyError("AUTH", reply)

    # -- transactions -----------------------------------------------------------------------

    async def send(self, msg: OutboundMessage) -> list[RecipientResult]:
        """Run one mail transaction; one RecipientResult per ``msg.recipients`` entry."""
        n = len(msg.recipients)
        if not n:
            return []
        results: list[RecipientResult | None] = [None] * n
        try:
            await self._send(msg, results)
        except SMTPClientError as e:
            self.broken = True
            reply = self.proto.closing_reply or Reply(421, (f"4.4.2 {e.text}",))
            remote = self.proto.closing_reply is not None
            for i in range(n):
                if results[i] is None or (results[i].status == DELIVERED and results[i].stage == "RCPT"):
                    results[i] = RecipientResult(DEFERRED, reply, "connection", remote=remote)
        self.transactions += 1
        return [r for r in results if r is not None]

    async def _send(self, msg: OutboundMessage, results: list[RecipientResult | None]) -> None:
        self.data_sent = False
        if self.transactions:
            reply = await self.proto.command(b"RSET")
            if not reply.positive:
                raise ReplyError("RSET", reply)
        utf8_needed = not (msg.sender.isascii() and all(r.address.isascii() for r in msg.recipients))
        if utf8_needed and not self.has("SMTPUTF8"):
            # internationalised domains have an ASCII form (IDNA A-labels); local parts do not
            converted = _ascii_message(msg)
            if converted is not None:
                msg, utf8_needed = converted, False
        if utf8_needed and not self.has("SMTPUTF8"):
            # RFC 6531 §3.2: an address that needs SMTPUTF8 cannot go to a server without it
            refusal = Reply(553, ("5.6.7 the receiving server does not support SMTPUTF8 (non-ASCII address)",))
            for i in range(len(results)):
                results[i] = RecipientResult(FAILED, refusal, "SMTPUTF8", remote=False)
            return
        limit = _size_limit(self.extensions.get("SIZE"))
        if limit and msg.size > limit:
            refusal = Reply(552, (f"5.3.4 message size {msg.size} exceeds the fixed maximum of {self} ({limit})",))
            for i in range(len(results)):
                results[i] = RecipientResult(FAILED, refusal, "SIZE", remote=False)
            return

        mail = self._mail_command(msg, utf8_needed)
        rcpts = [self._rcpt_command(r, utf8_needed) for r in msg.recipients]
        data_reply: Reply | None = None
        if self.has("PIPELINING"):
            # RFC 2920 §3.1: MAIL, every RCPT and DATA in one group; replies come in order
            outcome = await defer.DeferredList(self.proto.pipeline([mail, *rcpts, b"DATA"]), consumeErrors=True)
            replies = []
            for ok, value in outcome:
                if not ok:
                    break
                replies.append(value)
            mail_reply = replies[0] if replies else None
            rcpt_replies = replies[1 : 1 + len(rcpts)]
            if len(replies) == len(outcome):
                data_reply = replies[-1]
            if mail_reply is None:
                outcome[0][1].raiseException()
        else:
            mail_reply = await self.proto.command(mail)
            rcpt_replies = []
            if mail_reply.positive:
                for line in rcpts:
                    reply = await self.proto.command(line)
                    rcpt_replies.append(reply)
                    if reply.code == 421:
                        break
        if not mail_reply.positive:
            for i in range(len(results)):
                results[i] = _result_for(mail_reply, "MAIL")
            if mail_reply.code == 421:
                self.proto.closing_reply = mail_reply
                raise ReplyError("MAIL", mail_reply)
            if data_reply is not None and data_reply.code == 354:
                await self.proto.send_body(_Empty())
            return
        accepted = []
        for i, reply in enumerate(rcpt_replies):
            results[i] = _result_for(reply, "RCPT")
            if reply.positive:
                accepted.append(i)
            if reply.code == 421:
                self.proto.closing_reply = reply
                raise ReplyError("RCPT", reply)
        if len(rcpt_replies) < len(rcpts):
            # the pipelined group broke off: the connection is gone
            raise ConnectionDropped("connection lost during RCPT")
        if data_reply is None:
            if self.has("PIPELINING"):
                raise ConnectionDropped("connection lost before the reply to DATA")
            if not accepted:
                return
            data_reply = await self.proto.command(b"DATA")
        if data_reply.code != 354:
            if accepted:
                for i in accepted:
                    results[i] = _result_for(data_reply, "DATA")
            if data_reply.code == 421:
                self.proto.closing_reply = data_reply
                raise ReplyError("DATA", data_reply)
            return
        if not accepted:
            # RFC 2920 §3.1: DATA was accepted anyway; end an empty message and forget it
            await self.proto.send_body(_Empty())
            await self.proto.command(b"RSET")
            return
        with open(msg.path, "rb") as f:
            self.data_sent = True
            final = await self.proto.send_body(f)
        for i in accepted:
            results[i] = _result_for(final, "DATA")
        if final.code == 421:
            self.broken = True

    def _mail_command(self, msg: OutboundMessage, utf8: bool) -> bytes:
        parts = [f"MAIL FROM:<{msg.sender}>"]
        if self.has("SIZE") and msg.size:
            parts.append(f"SIZE={msg.size}")
        if msg.body and msg.body.upper() == "8BITMIME" and self.has("8BITMIME"):
            parts.append("BODY=8BITMIME")
        if utf8 or (msg.smtputf8 and self.has("SMTPUTF8")):
            parts.append("SMTPUTF8")
        if self.has("DSN"):
            if msg.ret:
                parts.append(f"RET={msg.ret.upper()}")
            if msg.envid:
                parts.append(f"ENVID={_xtext_safe(msg.envid)}")
        return " ".join(parts).encode("utf-8")

    def _rcpt_command(self, r: OutboundRecipient, utf8: bool) -> bytes:
        parts = [f"RCPT TO:<{r.address}>"]
        if self.has("DSN"):
            if r.notify:
                parts.append("NOTIFY=" + ",".join(n.upper() for n in r.notify))
            if r.orcpt:
                kind, _, value = r.orcpt.partition(";")
                parts.append(f"ORCPT={kind};{_xtext_safe(value)}")
        return " ".join(parts).encode("utf-8")

    async def quit(self) -> None:
        """Say QUIT and close (errors ignored: the mail is already delivered or not)."""
        if self.proto.closed:
            return
        try:
            await self.proto.command(b"QUIT")
        except SMTPClientError:
            pass
        if not self.proto.closed:
            self.proto.transport.loseConnection()

    def abort(self) -> None:
        self.broken = True
        self.proto.abort()


class _Empty:
    def read(self, n: int = -1) -> bytes:
        return b""


def ascii_address(address: str) -> str | None:
    """``user@bücher.example`` -> ``user@xn--bcher-kva.example``; None if the local part is not
    ASCII (RFC 6531 §3.2: such an address cannot be sent without SMTPUTF8)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address if address.isascii() else None
    if not local.isascii():
        return None
    if domain.isascii():
        return address
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return None


def _ascii_message(msg: OutboundMessage) -> OutboundMessage | None:
    sender = ascii_address(msg.sender) if msg.sender else ""
    rcpts = []
    for r in msg.recipients:
        a = ascii_address(r.address)
        if a is None or sender is None:
            return None
        rcpts.append(replace(r, address=a))
    return replace(msg, sender=sender, recipients=tuple(rcpts))


def _result_for(reply: Reply, stage: str) -> RecipientResult:
    if reply.positive:
        status = DELIVERED
    elif reply.transient:
        status = DEFERRED
    else:
        status = FAILED
    return RecipientResult(status, reply, stage)


def _parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-case) -> parameters; "AUTH=PLAIN" (pre-RFC 4954 form) counts as AUTH."""
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        word, _, params = line.strip().partition(" ")
        if not word:
            continue
        word = word.upper()
        if word.startswith("AUTH="):
            params = (word[5:] + " " + params).strip()
            word = "AUTH"
            if "AUTH" in ext:
                continue
        ext[word] = params.strip()
    return ext


def _size_limit(params: str | None) -> int:
    try:
        return int(params.split()[0]) if params else 0
    except ValueError:
        return 0


# -- opening a session -------------------------------------------------------------------------


def _tls_context(config: ClientConfig, host: str) -> Any:
    if config.verify and config.tls in ("starttls", "implicit"):
        trust = config.trust_root if config.trust_root is not None else platformTrust()
        return optionsForClientTLS(host, trustRoot=trust)
    return CertificateOptions()


def _endpoint(reactor: Any, address: str, port: int, config: ClientConfig) -> Any:
    v6 = ipaddress.ip_address(address).version == 6
    bind = None
    if config.source_address:
        src_v6 = ipaddress.ip_address(config.source_address).version == 6
        if src_v6 == v6:
            bind = (config.source_address, 0)
    cls = endpoints.TCP6ClientEndpoint if v6 else endpoints.TCP4ClientEndpoint
    return cls(reactor, address, port, timeout=config.connect_timeout, bindAddress=bind)


async def _open(reactor: Any, host: str, address: str, port: int, config: ClientConfig, use_tls: bool) -> Session:
    proto = ClientProtocol(reactor, config.command_timeout)
    endpoint = _endpoint(reactor, address, port, config)
    if config.tls == "implicit":
        endpoint = endpoints.wrapClientTLS(_tls_context(config, host), endpoint)
    try:
        await endpoints.connectProtocol(endpoint, proto)
    except Exception as e:  # ConnectError, TimeoutError, ...
        raise ConnectFailed(f"connect to {host}[{address}]:{port} failed: {e.__class__.__name__}") from None
    session = Session(proto, host, address, port, config)
    try:
        greeting = await proto.greeting
        if greeting.code != 220:
            # §3.1: 554 (or 4xx) greeting: no service here; try elsewhere
            raise ReplyError("greeting", greeting)
        session.greeting_name = (greeting.lines[0].split() or [""])[0]
        await session._hello()
        tls = config.tls
        if tls == "starttls" or (tls == "opportunistic" and use_tls and session.has("STARTTLS")):
            if not session.has("STARTTLS") and tls == "starttls":
                raise TLSFailed(f"{session} does not offer STARTTLS, which is required")
            try:
                await session._starttls(_tls_context(config, host))
            except ReplyError as e:
                if tls == "starttls":
                    raise TLSFailed(f"STARTTLS refused: {e.reply}") from None
                log.info("STARTTLS refused by {peer} ({reply}); continuing without TLS", peer=str(session), reply=str(e.reply))
        if config.user:
            if not session.tls and tls != "none":
                raise TLSFailed(f"not sending credentials to {session} without TLS")
            if not session.has("AUTH"):
                raise ReplyError("AUTH", Reply(530, (f"5.7.0 {session} does not offer AUTH",)))
            await session._auth()
    except BaseException:
        session.abort()
        raise
    return session


def open_session(reactor: Any, host: str, address: str, port: int, config: ClientConfig, use_tls: bool = True) -> defer.Deferred:
    """Connect, read the greeting, EHLO, STARTTLS/AUTH as configured: Deferred[Session].

    Fails with ConnectFailed, ReplyError (greeting/EHLO/AUTH refused), TLSFailed (handshake
    failed or TLS required and unavailable: with opportunistic TLS the caller reconnects with
    ``use_tls=False``), Timeout, ConnectionDropped or ProtocolError.
    """
    return defer.Deferred.fromCoroutine(_open(reactor, host, address, port, config, use_tls))

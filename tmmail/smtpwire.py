"""The SMTP client's wire layer: replies, the dot-stuffer and the bounded reply reader.

Pure pieces (:class:`Reply`, :class:`DotStuffer`, :func:`xtext`) and :class:`ClientProtocol`, a
Twisted protocol that writes command lines and hands back each reply as a Deferred, with one
inactivity timer covering every reply, the TLS handshake and a stalled DATA transfer
(RFC 5321 §4.5.3.2).  Replaces twisted.mail.smtp.SMTPClient, whose per-chunk dot-stuffing
misses a "." at 16 KiB chunk boundaries and on the first line (docs/survey §1.5) and which has
no timeouts (§1.7).  The mail-transaction logic is in tmmail.smtpclient.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import IO, Any, Sequence

from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, IPullProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "Reply",
    "DotStuffer",
    "ClientProtocol",
    "SMTPClientError",
    "ConnectFailed",
    "ReplyError",
    "TLSFailed",
    "Timeout",
    "ConnectionDropped",
    "ProtocolError",
    "xtext",
    "xtext_safe",
    "MAX_REPLY_LINE",
    "CHUNK_SIZE",
]

log = Logger(namespace="tmmail.smtpclient")

#: RFC 5321 §4.5.3.1.5 says 512 octets per reply line; be generous but bounded
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 200
#: bytes read from the spool file per write
CHUNK_SIZE = 1 << 16

#: RFC 3463 / RFC 2034 status-code at the start of a reply line, then SP.  ASCII digits only:
#: on str, \d also takes "\u0661" (Arabic-Indic one) and \s "\u00a0", so a remote reply
#: "550 5.\u0661.\u0661" made a status code of them (then in a DSN's Status: field)
_ENHANCED = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?:[ \t]+|$)")
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


def xtext_safe(value: str) -> str:
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
        # Commands and the final dot are small writes each answered before the next: with Nagle
        # they wait ~40 ms for the peer's delayed ACK on every message.
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
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
        data = self.stuffer.feed(chunk) if chunk else b""
        last = not chunk
        if chunk and len(chunk) < CHUNK_SIZE:
            # a short read is usually the end: check now so the final dot goes in the same write
            more = self.file.read(CHUNK_SIZE)
            if more:
                data += self.stuffer.feed(more)
            else:
                last = True
        if last:
            data += self.stuffer.finish()
        self.proto.transport.write(data)
        if last:
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

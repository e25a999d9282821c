"""Streaming a stored message onto the wire: LF -> CRLF, dot-stuffing, TOP, flow control.

Pure transformers (``DotStuffer``, ``TopLimiter``) plus a pull producer that feeds them from the
message file in 16 KiB chunks, so a large RETR never builds one big string and chunk boundaries
never change the bytes sent (RFC 1939 §3 byte-stuffing; the survey §1.5/§3 boundary bug).
"""

from __future__ import annotations

from typing import Any, BinaryIO, Callable

from twisted.internet import defer, interfaces
from zope.interface import implementer

CHUNK = 16 * 1024


class DotStuffer:
    """LF (or CRLF) message bytes -> CRLF, dot-stuffed lines for POP3/SMTP, chunk by chunk.

    State carries over between chunks: whether the next byte starts a line, and a CR held back
    in case the next chunk starts with LF.  ``finish()`` returns the bytes that end the
    multi-line response (a CRLF if the message did not end with one, then ``.`` CRLF).
    """

    def __init__(self) -> None:
        self.at_line_start = True
        self._cr = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._cr + chunk
        self._cr = b""
        if data.endswith(b"\r"):
            self._cr = b"\r"
            data = data[:-1]
        if not data:
            return b""
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self.at_line_start and data[:1] == b".":
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        self.at_line_start = data.endswith(b"\r\n")
        return data

    def finish(self) -> bytes:
        out = b""
        if self._cr:
            out = self._cr
            self._cr = b""
            self.at_line_start = False
        if not self.at_line_start:
            out += b"\r\n"
        return out + b".\r\n"


class TopLimiter:
    """Passes the header, the blank line and the first ``lines`` body lines (RFC 1939 TOP)."""

    def __init__(self, lines: int) -> None:
        self.remaining = lines
        self.in_header = True
        self.at_line_start = True
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        pos = 0
        n = len(chunk)
        while pos < n and not self.done:
            if not self.in_header and self.remaining <= 0:
                self.done = True
                break
            nl = chunk.find(b"\n", pos)
            end = n if nl < 0 else nl + 1
            piece = chunk[pos:end]
            if self.in_header and self.at_line_start and piece in (b"\n", b"\r\n"):
                self.in_header = False  # the blank line separating header and body
                out += piece
            else:
                out += piece
                if nl >= 0 and not self.in_header:
                    self.remaining -= 1
            self.at_line_start = nl >= 0
            pos = end
        if not self.in_header and self.remaining <= 0:
            self.done = True
        return bytes(out)


@implementer(interfaces.IPullProducer)
class MessageProducer:
    """Streams one message file to the transport: (TOP limit) -> DotStuffer -> chunks."""

    def __init__(self, transport: Any, f: BinaryIO, top: int | None, on_progress: Callable[[], None],
                 first_line: bytes = b"") -> None:
        self.transport = transport
        self.file = f
        self.stuffer = DotStuffer()
        self.limiter = TopLimiter(top) if top is not None else None
        self.on_progress = on_progress
        self.deferred: defer.Deferred[None] = defer.Deferred()
        #: the "+OK" line goes out in the same write as the first chunk, and the terminating
        #: "." in the same write as the last one (read-ahead): no small segments for Nagle and
        #: delayed ACKs to stall (one write for a small message)
        self._prefix = first_line
        self._ahead: bytes | None = None

    def start(self) -> defer.Deferred[None]:
        self.transport.registerProducer(self, False)
        return self.deferred

    def _read(self) -> bytes:
        if self._ahead is not None:
            chunk, self._ahead = self._ahead, None
            return chunk
        return self.file.read(CHUNK)

    def resumeProducing(self) -> None:
        if self.deferred.called:
            return
        try:
            raw = self._read()
            eof = not raw
            if not eof:
                self._ahead = self.file.read(CHUNK)
                eof = not self._ahead
        except OSError as e:
            self._end(e)
            return
        chunk = raw
        if self.limiter is not None and raw:
            chunk = self.limiter.feed(raw)
            eof = eof or self.limiter.done
        out = self._prefix + self.stuffer.feed(chunk)
        self._prefix = b""
        if eof:
            out += self.stuffer.finish()
        if out:
            self.transport.write(out)
        if eof:
            self._end(None)
        else:
            self.on_progress()

    def stopProducing(self) -> None:
        """The connection went away mid-message: stop quietly (nothing to report to anyone)."""
        self._end(None)

    def _end(self, error: Exception | None) -> None:
        if self.deferred.called:
            return
        self.file.close()
        try:
            self.transport.unregisterProducer()
        except Exception:
            pass
        if error is None:
            self.deferred.callback(None)
        else:
            self.deferred.errback(error)

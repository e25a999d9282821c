"""Message content readers for DATA and BDAT, and the sink that stores what they read.

Pure logic, no reactor.  The readers never let message content turn into commands and never
hold more than one line in memory:

* DATA (RFC 5321 §4.1.1.4, §4.5.2): only ``<CRLF>.<CRLF>`` ends the data.  Lines must end
  in CRLF and contain no other CR or LF; a bare CR or LF (the SMTP smuggling vectors
  ``<LF>.<LF>``, ``<LF>.<CRLF>``, ``<CR>.<CR>``) marks the message bad but reading goes on
  until the real end, so the client's remaining bytes are still data, not commands.
* An over-long line (more than ``max_line`` octets with its CRLF; RFC 5321 §4.5.3.1.6)
  marks the message bad and the rest of that line is discarded as it arrives.
* BDAT (RFC 3030): byte-counted, no dot-stuffing; the same line rules are applied so the
  spool can store LF line endings losslessly (docs/contracts.md).

The sink converts CRLF to LF, counts the size (RFC 1870, wire octets) and can check or
rewrite the author headers ``From:`` and ``Sender:`` of authenticated senders (tmmail.policy
decides the addresses).  Header names are parsed as mail readers parse them: RFC 5322 §4.5.3
(obsolete syntax, which readers accept) allows white space before the colon, so
``From : boss@x`` and ``From<TAB>: boss@x`` are From fields too and are checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import getaddresses
from typing import Callable

# error kinds, first one wins
TOO_BIG = "too_big"
LINE_TOO_LONG = "line_too_long"
BARE_NEWLINE = "bare_newline"
FROM_NOT_OWNED = "from_not_owned"
STORAGE = "storage"
#: a check raised while the content was read (``MessageSink.exception`` holds it)
INTERNAL = "internal"

#: header fields whose addresses must belong to an authenticated sender (lower-case names):
#: both name the author to the recipient (RFC 5322 §3.6.2), so a foreign Sender: would let a
#: user send "on behalf of" anyone
CHECKED_FIELDS = (b"from", b"sender")
_WSP = b" \t"

_FLUSH_AT = 64 * 1024
_MAX_FROM_HEADER = 16 * 1024


@dataclass(frozen=True)
class FromPolicy:
    """Which header From: addresses an authenticated sender may use."""

    #: allowed(address) -> bool; the address is lower-case
    allowed: Callable[[str], bool]
    #: "refuse" or "rewrite"
    mode: str
    #: the address written instead in rewrite mode
    rewrite_to: str


def header_name(line: bytes) -> bytes | None:
    """The lower-case field name of a header line, or None if it does not start a field.

    The name is the bytes before the first colon with trailing white space removed
    (RFC 5322 §4.5.3 obs-optional: ``From : x`` is a From field); it must then be printable
    ASCII without spaces (§3.6.8 ftext), as readers require.
    """
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon].rstrip(_WSP)
    if not name or any(c < 33 or c > 126 for c in name):
        return None
    return name.lower()


class MessageSink:
    """Receives content lines (without line ending), writes LF-terminated lines."""

    def __init__(
        self,
        write: Callable[[bytes], None],
        max_size: int,
        from_policy: FromPolicy | None = None,
    ) -> None:
        self._write = write
        self.max_size = max_size
        self.size = 0
        self.error: str | None = None
        self.error_detail: str = ""
        self.from_policy = from_policy
        self.from_rewritten = False
        self._out: list[bytes] = []
        self._out_len = 0
        self._in_headers = True
        self._held: list[bytes] | None = None  # lines of a From:/Sender: header being collected
        self._held_name = b""
        self._held_len = 0
        self._rewritten: set[bytes] = set()  # fields already written in rewrite mode
        #: the exception a check raised (error INTERNAL), for the caller to log
        self.exception: BaseException | None = None

    def fail(self, kind: str, detail: str = "") -> None:
        if self.error is None:
            self.error = kind
            self.error_detail = detail
            self._out = []
            self._out_len = 0
            self._held = None

    def raw(self, data: bytes) -> None:
        """Write bytes as they are (the Received: header); not counted against SIZE."""
        if self.error is None:
            self._emit(data)

    def line(self, content: bytes) -> None:
        """One line of message content, without CRLF."""
        self.size += len(content) + 2
        if self.error is not None:
            return
        if self.size > self.max_size:
            self.fail(TOO_BIG)
            return
        if self._in_headers:
            self._header_line(content)
            return
        self._emit(content + b"\n")

    def _header_line(self, content: bytes) -> None:
        if self._held is not None:
            if content[:1] in (b" ", b"\t"):
                self._held.append(content)
                self._held_len += len(content)
                if self._held_len > _MAX_FROM_HEADER:
                    self.fail(FROM_NOT_OWNED, "From: header too long")
                return
            self._release_from()
            if self.error is not None:
                return
        if content == b"":
            self._in_headers = False
            self._emit(b"\n")
            return
        if self.from_policy is not None:
            name = header_name(content)
            if name in CHECKED_FIELDS:
                self._held = [content]
                self._held_name = name
                self._held_len = len(content)
                return
        self._emit(content + b"\n")

    def _release_from(self) -> None:
        held, self._held = self._held, None
        assert held is not None and self.from_policy is not None
        name = self._held_name
        first = held[0][held[0].index(b":") + 1 :]
        value = b" ".join(part.strip() for part in [first, *held[1:]])
        text = value.decode("utf-8", "replace")
        addresses = [addr.strip().lower() for _name, addr in getaddresses([text])]
        addresses = [a for a in addresses if a]
        try:
            owned = bool(addresses) and all(self.from_policy.allowed(a) for a in addresses)
        except Exception as e:  # a broken check must not drop the connection (the caller logs it)
            self.fail(INTERNAL, f"{name.decode()} check raised {e!r}")
            self.exception = e
            return
        if owned:
            for part in held:
                self._emit(part + b"\n")
            return
        if self.from_policy.mode == "rewrite":
            self.from_rewritten = True
            if name not in self._rewritten:  # several foreign From: lines become one
                self._rewritten.add(name)
                label = b"From" if name == b"from" else b"Sender"
                self._emit(label + b": <" + self.from_policy.rewrite_to.encode("utf-8") + b">\n")
            return
        self.fail(FROM_NOT_OWNED, f"{name.decode()}: " + (", ".join(addresses) or "(none)"))

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self._out_len += len(data)
        if self._out_len >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self.error is not None or not self._out:
            return
        data = b"".join(self._out)
        self._out = []
        self._out_len = 0
        try:
            self._write(data)
        except OSError as e:
            self.fail(STORAGE, str(e))

    def finish(self) -> None:
        """End of message: release a From: header still held (header-only message), flush."""
        if self.error is None and self._held is not None:
            self._release_from()
        self.flush()


class ContentReader:
    """Splits message content into lines under the rules above and feeds a MessageSink.

    ``dot_mode=True`` for DATA (end at ``<CRLF>.<CRLF>``, dot-unstuffing); ``False`` for
    BDAT chunks.  ``feed`` consumes complete lines from ``buf`` (a bytearray) and deletes
    them; a partial line is left in ``buf`` unless it is already too long, in which case
    it is discarded.
    """

    def __init__(self, sink: MessageSink, max_line: int, dot_mode: bool) -> None:
        self.sink = sink
        self.max_line = max_line
        self.dot_mode = dot_mode
        self.total = 0  # octets consumed (for the "never ends" limit)
        self._prev_crlf = True  # the command line before the data ended in CRLF
        self._discarding = False
        self._last_cr = False

    def _bad(self, kind: str) -> None:
        self.sink.fail(kind)

    def feed(self, buf: bytearray) -> bool:
        """Consume lines; True when the DATA terminator was read (bytes after it stay in buf)."""
        pos = 0
        done = False
        n = len(buf)
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                rest = n - pos
                if rest and (self._discarding or rest > self.max_line):
                    if not self._discarding:
                        self._bad(LINE_TOO_LONG)
                        self._discarding = True
                    self._last_cr = buf[n - 1] == 0x0D
                    pos = n
                break
            line = bytes(buf[pos : nl + 1])
            pos = nl + 1
            if self._discarding:
                self._discarding = False
                self._prev_crlf = line.endswith(b"\r\n") or (line == b"\n" and self._last_cr)
                if not self._prev_crlf:
                    self._bad(BARE_NEWLINE)
                continue
            if len(line) > self.max_line:
                self._bad(LINE_TOO_LONG)
                self._prev_crlf = line.endswith(b"\r\n")
                continue
            if not line.endswith(b"\r\n"):
                self._bad(BARE_NEWLINE)
                self._prev_crlf = False
                continue
            content = line[:-2]
            if self.dot_mode and content == b"." and self._prev_crlf:
                done = True
                break
            self._prev_crlf = True
            if b"\r" in content:
                self._bad(BARE_NEWLINE)
                continue
            if self.dot_mode and content[:1] == b".":
                content = content[1:]
            self.sink.line(content)
        self.total += pos
        del buf[:pos]
        return done

    def finish_chunks(self, buf: bytearray) -> None:
        """BDAT LAST: a final line without CRLF is kept; a dangling CR is a bare CR."""
        if self._discarding:
            self._discarding = False
        elif buf:
            if b"\r" in buf:
                self._bad(BARE_NEWLINE)
            else:
                self.sink.line(bytes(buf))
        del buf[:]

"""Bounded reader for IMAP command lines and literals (RFC 3501 §2.2, §4.3; RFC 7888 LITERAL+).

One job: cut the client's byte stream into whole commands without ever holding more than
``max_line`` bytes of command text plus the literals the caller allows.  The reader is
*pull* based: the protocol calls :meth:`CommandReader.next_event` only when it is ready for
the next command, so a state change made by one command (STARTTLS, IDLE, AUTHENTICATE)
applies to the very next bytes.  Pure logic, no reactor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tmmail.imap.encoding import literal_announcement


@dataclass(frozen=True)
class Command:
    """A complete command: ``data`` is the whole text with literals inlined, without final CRLF."""

    data: bytes


@dataclass(frozen=True)
class Line:
    """A raw client line (IDLE's ``DONE``, an AUTHENTICATE response), without CRLF."""

    data: bytes


@dataclass(frozen=True)
class NeedContinuation:
    """A synchronising literal was announced: the server must send ``+ ...`` before it comes."""

    size: int


@dataclass(frozen=True)
class TooLong:
    """The command line passed ``max_line``; the rest of it is discarded.  ``tag`` may be b""."""

    tag: bytes


@dataclass(frozen=True)
class LiteralTooBig:
    """A literal was larger than allowed; ``sync`` tells whether the client waits for ``+``.

    For a non-synchronising literal the reader discards the announced bytes and the rest of
    the command itself (RFC 7888 §4), so the session continues.
    """

    tag: bytes
    size: int
    sync: bool


Event = Command | Line | NeedContinuation | TooLong | LiteralTooBig


def _tag_of(data: bytes) -> bytes:
    return data.split(b" ", 1)[0][:64]


class CommandReader:
    """Buffers input and hands out one :data:`Event` at a time.

    ``literal_limit(first_line, received)`` returns the largest literal accepted next in a
    command whose first line is ``first_line`` and of which ``received`` octets (lines and
    literals) have arrived: APPEND after login gets the message size limit, everything else
    what is left of the line limit, so no command grows beyond its budget however many
    literals it announces.
    """

    def __init__(self, max_line: int, literal_limit: Callable[[bytes, int], int]) -> None:
        self.max_line = max_line
        self.literal_limit = literal_limit
        self.raw_lines = False
        self._buf = bytearray()
        self._parts: list[bytes] = []  # the command so far (lines and literals, CRLFs kept)
        self._parts_len = 0
        self._text_len = 0
        self._literal_left = 0  # bytes of the current literal still to come
        self._literal_buf = bytearray()
        self._discard_literal = 0  # bytes to drop (refused non-sync literal)
        self._skip_line = False  # drop input up to the next LF (over-long line)
        self._skip_tag = b""
        self._skip_command = False  # after a refused literal: drop the rest of the command

    # -- input ---------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self._buf += data

    def discard_buffer(self) -> int:
        """Forget everything received but not yet handed out (STARTTLS, RFC 3501 §6.2.1)."""
        n = len(self._buf)
        self._buf.clear()
        self._reset_command()
        self._skip_line = False
        self._discard_literal = 0
        self._skip_command = False
        return n

    @property
    def pending(self) -> int:
        """Received bytes not yet looked at (not counting a literal being collected)."""
        return len(self._buf)

    @property
    def buffered(self) -> int:
        return len(self._buf) + len(self._literal_buf) + self._parts_len

    def _reset_command(self) -> None:
        self._parts = []
        self._parts_len = 0
        self._text_len = 0  # command text without literals (what max_line limits)
        self._literal_left = 0
        self._literal_buf = bytearray()

    # -- output --------------------------------------------------------------------------
    def next_event(self) -> Event | None:
        """The next complete event, or None when more input is needed."""
        while True:
            if self._discard_literal:
                n = min(self._discard_literal, len(self._buf))
                del self._buf[:n]
                self._discard_literal -= n
                if self._discard_literal:
                    return None
                continue
            if self._literal_left:
                n = min(self._literal_left, len(self._buf))
                self._literal_buf += self._buf[:n]
                del self._buf[:n]
                self._literal_left -= n
                if self._literal_left:
                    return None
                lit = bytes(self._literal_buf)
                self._literal_buf = bytearray()
                self._parts.append(lit)
                self._parts_len += len(lit)
                continue
            nl = self._buf.find(b"\n")
            if self._skip_line:
                if nl < 0:
                    self._buf.clear()
                    return None
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                self._skip_line = False
                if self._skip_command:
                    # the skipped tail may itself announce a literal to be thrown away
                    ann = literal_announcement(line.rstrip(b"\r"))
                    if ann is not None:
                        if not ann[1]:
                            self._skip_command = False
                            continue
                        self._discard_literal = ann[0]
                        self._skip_line = True
                        continue
                    self._skip_command = False
                    continue
                self._skip_literal(line.rstrip(b"\r"))
                return TooLong(self._skip_tag)
            if nl < 0:
                if len(self._buf) + self._text_len > self.max_line:
                    self._skip_tag = _tag_of(self._parts[0] if self._parts else bytes(self._buf[:80]))
                    self._buf.clear()
                    self._reset_command()
                    self._skip_line = True
                return None
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) + self._text_len > self.max_line:
                tag = _tag_of(self._parts[0] if self._parts else line[:80])
                self._reset_command()
                self._skip_literal(line)
                return TooLong(tag)
            if self.raw_lines and not self._parts:
                return Line(line)
            ann = literal_announcement(line)
            if ann is None:
                # _parts: line CRLF, literal, line CRLF, literal, ..., then this last line
                self._parts.append(line)
                data = b"".join(self._parts)
                self._reset_command()
                return Command(data)
            size, non_sync = ann
            head = self._parts[0] if self._parts else line
            if size > self.literal_limit(head, self._parts_len + len(line)):
                tag = _tag_of(head)
                self._reset_command()
                if non_sync:
                    self._discard_literal = size
                    self._skip_line = True
                    self._skip_command = True
                return LiteralTooBig(tag, size, not non_sync)
            self._parts.append(line + b"\r\n")
            self._parts_len += len(line) + 2
            self._text_len += len(line) + 2
            self._literal_left = size
            if not non_sync:
                return NeedContinuation(size)

    def _skip_literal(self, line: bytes) -> None:
        """A refused line that ends with a LITERAL+ announcement: the literal and the rest of
        the command follow without waiting for us and must be thrown away, not run as
        commands (RFC 7888 §4).  A synchronising one is never sent (no ``+`` comes)."""
        ann = literal_announcement(line)
        if ann is not None and ann[1]:
            self._discard_literal = ann[0]
            self._skip_line = True
            self._skip_command = True

"""IMAP wire syntax: the command tokenizer, string/literal quoting, modified UTF-7, RFC 2047/2231.

One job: turn bytes from the client into tokens and values into bytes for the client
(RFC 3501 §4 data formats, §5.1.3 mailbox naming, §9 formal syntax; RFC 7888 LITERAL+;
RFC 2047 encoded words; RFC 2231 parameter continuations). No I/O.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import quopri
import re
from typing import Union

__all__ = [
    "Atom",
    "String",
    "ParseError",
    "Token",
    "literal_announcement",
    "tokenize",
    "imap_string",
    "string_for_humans",
    "astring",
    "utf7_encode",
    "utf7_decode",
    "decode_header",
    "decode_bytes",
    "rfc2231_value",
]


class ParseError(ValueError):
    """Client syntax error; ``str(e)`` is the short reason the server puts after ``BAD``."""


class Atom(bytes):
    """An unquoted token (atom, number, sequence set, flag, fetch item with its [section])."""

    literal = False


class String(bytes):
    """A quoted string or a literal (``literal`` says which)."""

    literal = False


class _Literal(String):
    literal = True


Token = Union[Atom, String, list]

_LITERAL_END = re.compile(rb"~?\{(\d+)(\+?)\}$")


def literal_announcement(line: bytes) -> tuple[int, bool] | None:
    """If ``line`` (without CRLF) ends with ``{n}``/``{n+}``/``~{n}``: ``(n, non_sync)`` (RFC 7888)."""
    m = _LITERAL_END.search(line)
    if not m:
        return None
    # A literal marker inside a quoted string would be preceded by an odd number of quotes; the
    # marker must start a token: preceded by SP, "(" or start of line.
    start = m.start()
    if start > 0 and line[start - 1 : start] not in (b" ", b"("):
        return None
    if len(m.group(1)) > 13:
        return None
    return int(m.group(1)), bool(m.group(2))


_SPECIALS = frozenset(b' ()"{')


def tokenize(data: bytes) -> list[Token]:
    """Split one complete command (literals inlined as received, no final CRLF) into tokens.

    Parenthesised lists become nested Python lists.  ``[...]`` inside an atom is kept whole
    with its spaces and parentheses (fetch items such as ``BODY[HEADER.FIELDS (A B)]<0.9>``).
    """
    stack: list[list[Token]] = [[]]
    i = 0
    n = len(data)
    while i < n:
        c = data[i]
        if c == 0x20:
            i += 1
            continue
        if c == 0x28:  # (
            new: list[Token] = []
            stack[-1].append(new)
            stack.append(new)
            i += 1
            continue
        if c == 0x29:  # )
            if len(stack) == 1:
                raise ParseError("Unexpected ')'")
            stack.pop()
            i += 1
            continue
        if c == 0x22:  # "
            i += 1
            out = bytearray()
            while True:
                if i >= n:
                    raise ParseError("Missing closing quote")
                ch = data[i]
                if ch == 0x5C:  # backslash
                    if i + 1 >= n:
                        raise ParseError("Missing closing quote")
                    nxt = data[i + 1]
                    if nxt not in (0x22, 0x5C):
                        raise ParseError("Invalid escape in quoted string")
                    out.append(nxt)
                    i += 2
                    continue
                if ch == 0x22:
                    i += 1
                    break
                if ch in (0x0D, 0x0A, 0x00):
                    raise ParseError("CR, LF or NUL in quoted string")
                out.append(ch)
                i += 1
            stack[-1].append(String(bytes(out)))
            continue
        if c == 0x7B or (c == 0x7E and i + 1 < n and data[i + 1] == 0x7B):  # { or ~{
            j = data.find(b"}", i)
            if j < 0:
                raise ParseError("Bad literal")
            spec = data[i + (2 if c == 0x7E else 1) : j]
            if spec.endswith(b"+"):
                spec = spec[:-1]
            if not spec.isdigit() or len(spec) > 13:
                raise ParseError("Bad literal size")
            size = int(spec)
            if data[j + 1 : j + 3] != b"\r\n":
                raise ParseError("Literal size not followed by CRLF")
            start = j + 3
            if start + size > n:
                raise ParseError("Literal shorter than announced")
            stack[-1].append(_Literal(data[start : start + size]))
            i = start + size
            continue
        # atom (lenient: anything up to SP, parens, quote; [...] kept whole)
        j = i
        while j < n:
            ch = data[j]
            if ch == 0x5B:  # [
                close = _matching_bracket(data, j)
                if close < 0:
                    j += 1
                    continue
                j = close + 1
                continue
            if ch in (0x20, 0x28, 0x29, 0x22) or ch < 0x20 or ch == 0x7F:
                break
            j += 1
        if j == i:
            raise ParseError("Unexpected control character")
        stack[-1].append(Atom(data[i:j]))
        i = j
    if len(stack) != 1:
        raise ParseError("Missing ')'")
    return stack[0]


def _matching_bracket(data: bytes, pos: int) -> int:
    """Index of the ``]`` closing the ``[`` at ``pos`` (quoted strings inside skipped), or -1."""
    i = pos + 1
    n = len(data)
    while i < n:
        c = data[i]
        if c == 0x5D:
            return i
        if c in (0x0D, 0x0A, 0x5B):
            return -1
        if c == 0x22:
            i += 1
            while i < n and data[i] != 0x22:
                if data[i] == 0x5C:
                    i += 1
                elif data[i] in (0x0D, 0x0A):
                    return -1
                i += 1
        i += 1
    return -1


_ATOM_SAFE = re.compile(rb"^[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|~\[]+$")


def imap_string(value: bytes | str | None) -> bytes:
    """``NIL``, a quoted string when safe, else a literal (RFC 3501 §4.3 / §9 nstring)."""
    if value is None:
        return b"NIL"
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if _NEEDS_LITERAL.search(value):
        return b"{%d}\r\n%s" % (len(value), value)
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_NEEDS_LITERAL = re.compile(rb"[\x00\r\n\x80-\xff]")
_HUMAN_CHANGE = re.compile(rb'[\x00\r\n\t"\\\x80-\xff]|  |^ | $')
_HUMAN_WS = re.compile(rb"[\r\n\t ]+")


def string_for_humans(value: bytes | str | None) -> bytes:
    """ENVELOPE subject / display names as Dovecot sends them (imap_append_string_for_humans).

    Unchanged text goes out quoted; otherwise whitespace runs (incl. folding) become one space,
    the ends are trimmed, NUL becomes 0x80, and the result is sent as a literal.
    """
    if value is None:
        return b"NIL"
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if not _HUMAN_CHANGE.search(value):
        return b'"' + value + b'"'
    clean = _HUMAN_WS.sub(b" ", value).strip(b" ").replace(b"\x00", b"\x80")
    if b"\x80" in clean:
        # a NUL in the message (served as 0x80) shows as U+FFFD, as Dovecot sends it; other
        # invalid UTF-8 passes through unchanged
        text = clean.decode("utf-8", "surrogateescape").replace("\udc80", "\ufffd")
        clean = text.encode("utf-8", "surrogateescape")
    if not clean:
        return b'""'
    return b"{%d}\r\n%s" % (len(clean), clean)


def astring(value: bytes | str) -> bytes:
    """An atom when every byte is an ATOM-CHAR (and it is not ``NIL``), else :func:`imap_string`."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if value and _ATOM_SAFE.match(value) and value.upper() != b"NIL":
        return value
    return imap_string(value)


# --- modified UTF-7 (RFC 3501 §5.1.3) -------------------------------------------------------


def utf7_encode(name: str) -> bytes:
    """Encode a mailbox name: printable ASCII as is, ``&`` as ``&-``, the rest as ``&base64,-``."""
    out = bytearray()
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.extend(b"&" + base64.b64encode(raw).rstrip(b"=").replace(b"/", b",") + b"-")
            pending.clear()

    for ch in name:
        o = ord(ch)
        if 0x20 <= o <= 0x7E:
            flush()
            out.extend(b"&-" if ch == "&" else ch.encode("ascii"))
        else:
            pending.append(ch)
    flush()
    return bytes(out)


def utf7_decode(name: bytes) -> str:
    """Decode a modified UTF-7 mailbox name; raise :class:`ParseError` when malformed."""
    out: list[str] = []
    i = 0
    n = len(name)
    while i < n:
        c = name[i]
        if c > 0x7E or c < 0x20:
            raise ParseError("Mailbox name is not modified UTF-7")
        if c != 0x26:  # &
            out.append(chr(c))
            i += 1
            continue
        j = name.find(b"-", i + 1)
        if j < 0:
            raise ParseError("Unterminated &-sequence in mailbox name")
        chunk = name[i + 1 : j]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(b",", b"/")
            try:
                raw = base64.b64decode(b64 + b"=" * (-len(b64) % 4), validate=True)
                text = raw.decode("utf-16-be")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise ParseError("Bad modified UTF-7 in mailbox name") from None
            if any(0x20 <= ord(ch) <= 0x7E for ch in text):
                raise ParseError("Printable ASCII must not be base64-encoded in mailbox names")
            out.append(text)
        i = j + 1
    return "".join(out)


# --- RFC 2047 / RFC 2231 -----------------------------------------------------------------------

_ENCODED_WORD = re.compile(rb"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(rb"^[ \t\r\n]+$")


def decode_bytes(raw: bytes, charset: str | None) -> str:
    """Decode ``raw`` in ``charset`` (unknown charsets and errors fall back to UTF-8/Latin-1)."""
    if charset:
        cs = charset.strip().strip('"').lower()
        if cs in ("us-ascii", "ascii", "unknown-8bit", "x-unknown", "unknown"):
            cs = "utf-8"
        try:
            codecs.lookup(cs)
        except LookupError:
            cs = "utf-8"
        try:
            return raw.decode(cs)
        except UnicodeDecodeError:
            pass
        except Exception:  # odd codecs (e.g. punycode) may raise anything
            pass
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _decode_word(charset: bytes, enc: bytes, text: bytes) -> bytes | None:
    try:
        if enc in (b"b", b"B"):
            t = text + b"=" * (-len(text) % 4)
            return base64.b64decode(t)
        return quopri.decodestring(text.replace(b"_", b" "), header=True)
    except (binascii.Error, ValueError):
        return None


def decode_header(value: bytes | str) -> str:
    """Unfold and decode RFC 2047 encoded words; whitespace between adjacent words is dropped."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    value = re.sub(rb"\r?\n(?=[ \t])", b"", value).replace(b"\r", b"").replace(b"\n", b"")
    out: list[str] = []
    pos = 0
    last_was_word = False
    # Adjacent words in the same charset are joined as bytes first (multi-byte chars split
    # across words, common with base64 UTF-8 subjects).
    pending_cs: str | None = None
    pending: bytearray = bytearray()

    def flush() -> None:
        nonlocal pending_cs
        if pending_cs is not None:
            out.append(decode_bytes(bytes(pending), pending_cs))
            pending.clear()
            pending_cs = None

    for m in _ENCODED_WORD.finditer(value):
        between = value[pos : m.start()]
        decoded = _decode_word(m.group(1), m.group(2), m.group(3))
        if decoded is None:
            continue
        if not (last_was_word and (not between or _BETWEEN_WORDS.match(between))):
            flush()
            out.append(decode_bytes(between, "utf-8"))
        cs = m.group(1).decode("ascii", "replace")
        if pending_cs is not None and pending_cs.lower() != cs.lower():
            flush()
        pending_cs = cs
        pending.extend(decoded)
        pos = m.end()
        last_was_word = True
    flush()
    out.append(decode_bytes(value[pos:], "utf-8"))
    return "".join(out)


def rfc2231_value(value: str) -> str:
    """Decode an RFC 2231 extended value ``charset'lang'percent-encoded`` into text."""
    parts = value.split("'", 2)
    if len(parts) == 3:
        charset, _lang, encoded = parts
    else:
        charset, encoded = "", value
    raw = re.sub(
        r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), encoded
    ).encode("latin-1", "replace")
    return decode_bytes(raw, charset or "utf-8")

"""IMAP FETCH data items: sections, partial fetch, BODYSTRUCTURE, ENVELOPE (RFC 3501 §6.4.5, §7.4.2).

One job: given the requested items and a stored message, produce the bytes that go between the
parentheses of ``* n FETCH (...)``.  Section bytes are byte-exact slices of the CRLF message;
BODYSTRUCTURE/ENVELOPE follow Dovecot's choices (values as written in the message, quoted).
Content problems never raise; only bad client syntax raises :class:`ParseError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable, Protocol, Sequence

from tmmail.imap.encoding import Atom, ParseError, String, astring, imap_string, string_for_humans, tokenize
from tmmail.imap.mime import (
    Address,
    Message,
    Part,
    parse_addresses,
    parse_cte,
    parse_value_and_params,
    unfold,
)

__all__ = [
    "StoredMessage",
    "FetchItem",
    "parse_fetch_items",
    "with_flags",
    "fetch_data",
    "body_structure",
    "envelope",
    "section",
    "format_internal_date",
    "format_flags",
]


class StoredMessage(Protocol):
    """What the mailbox hands to FETCH and SEARCH (duck-typed)."""

    seq: int
    uid: int
    flags: set[str]
    size: int
    internal_date: datetime | float

    def load(self) -> bytes: ...


_SIMPLE = {"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY",
           "RFC822", "RFC822.HEADER", "RFC822.TEXT", "MODSEQ"}
_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_CONTENT = {"ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822", "RFC822.HEADER", "RFC822.TEXT"}


@dataclass(frozen=True)
class FetchItem:
    """One fetch attribute.  For ``BODY[...]`` items: ``section`` holds the parsed section."""

    name: str                                   # "BODY[...]" for body sections
    peek: bool = False
    parts: tuple[int, ...] = ()                 # section part numbers
    text: str = ""                              # "", HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME
    fields: tuple[bytes, ...] = ()              # header names for HEADER.FIELDS[.NOT]
    partial: tuple[int, int] | None = None      # (start, length)

    @property
    def sets_seen(self) -> bool:
        return (self.name == "BODY[...]" and not self.peek) or self.name in ("RFC822", "RFC822.TEXT")

    @property
    def needs_content(self) -> bool:
        return self.name in _CONTENT or self.name == "BODY[...]"

    def section_label(self) -> bytes:
        spec = ".".join(str(n) for n in self.parts)
        if self.text:
            spec = f"{spec}.{self.text}" if spec else self.text
        out = spec.encode("ascii")
        if self.fields:
            out += b" (" + b" ".join(astring(f) for f in self.fields) + b")"
        return out

    def label(self) -> bytes:
        """The response name: ``BODY[1.MIME]<0>`` (the partial shows only its origin)."""
        if self.name != "BODY[...]":
            return self.name.encode("ascii")
        lab = b"BODY[" + self.section_label() + b"]"
        if self.partial is not None:
            lab += b"<%d>" % self.partial[0]
        return lab


# ASCII digits only: in a str pattern \d also matches other scripts' digits (int() takes them)
_BODY_ITEM = re.compile(r"^(BODY|BODY\.PEEK)\[(.*)\](?:<([0-9]{1,10})\.([0-9]{1,10})>)?$", re.S | re.I)
_SECTION = re.compile(r"^((?:[1-9][0-9]{0,8})(?:\.[1-9][0-9]{0,8})*)?(?:(?(1)\.)(HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME))?(.*)$", re.S | re.I)
#: RFC 5322 field names: printable ASCII but ":" (and no space)
_FIELD_NAME = re.compile(rb"^[!-9;-~]+$")
_MAX_NUMBER = 4294967295


def _parse_section(spec: str) -> tuple[tuple[int, ...], str, tuple[bytes, ...]]:
    m = _SECTION.match(spec)
    if not m:
        raise ParseError("Invalid BODY[] section")
    nums = tuple(int(x) for x in m.group(1).split(".")) if m.group(1) else ()
    text = (m.group(2) or "").upper()
    rest = m.group(3)
    if text == "MIME" and not nums:
        raise ParseError("BODY[MIME] needs a part number")
    if text.startswith("HEADER.FIELDS"):
        rest = rest.strip()
        try:
            toks = tokenize(rest.encode("utf-8"))
        except ParseError:
            raise ParseError("Invalid header list in BODY[] section") from None
        if len(toks) != 1 or not isinstance(toks[0], list) or not toks[0]:
            raise ParseError("HEADER.FIELDS needs a parenthesised list of field names")
        names = []
        for t in toks[0]:
            if isinstance(t, list) or not _FIELD_NAME.match(t):
                raise ParseError("Invalid header field name")
            names.append(bytes(t).upper())
        return nums, text, tuple(names)
    if rest:
        raise ParseError("Invalid BODY[] section")
    return nums, text, ()


def parse_fetch_items(tokens: object, uid_command: bool = False) -> list[FetchItem]:
    """Parse the fetch-att argument (an Atom, or a list of Atoms) into items (RFC 3501 §6.4.5)."""
    if isinstance(tokens, list) and len(tokens) == 1 and isinstance(tokens[0], list):
        tokens = tokens[0]
    if isinstance(tokens, (bytes, Atom)):
        name = bytes(tokens).decode("utf-8", "replace").upper()
        if name in _MACROS:
            items = [FetchItem(n) for n in _MACROS[name]]
            return _add_uid(items, uid_command)
        tokens = [tokens]
    if not isinstance(tokens, list) or not tokens:
        raise ParseError("Missing fetch items")
    items: list[FetchItem] = []
    for tok in tokens:
        if isinstance(tok, list) or isinstance(tok, String) or not isinstance(tok, bytes):
            raise ParseError("Invalid fetch item")
        raw = bytes(tok).decode("utf-8", "replace")
        up = raw.upper()
        if up in _SIMPLE:
            items.append(FetchItem(up))
            continue
        m = _BODY_ITEM.match(raw)
        if not m:
            raise ParseError(f"Unknown fetch item {raw[:40]!s}")
        nums, text, fields = _parse_section(m.group(2))
        partial = None
        if m.group(3) is not None:
            start, length = int(m.group(3)), int(m.group(4))
            if length == 0:
                raise ParseError("Partial length must be non-zero")
            if start > _MAX_NUMBER or length > _MAX_NUMBER:
                raise ParseError("Partial numbers must fit in 32 bits")  # RFC 3501 §9 number
            partial = (start, length)
        items.append(FetchItem("BODY[...]", m.group(1).upper() == "BODY.PEEK", nums, text, fields, partial))
    return _add_uid(items, uid_command)


def _add_uid(items: list[FetchItem], uid_command: bool) -> list[FetchItem]:
    if uid_command and not any(i.name == "UID" for i in items):
        items = [FetchItem("UID")] + items
    return items


def with_modseq(items: list[FetchItem]) -> list[FetchItem]:
    """Append MODSEQ if missing (CHANGEDSINCE, or a flag change with CONDSTORE enabled)."""
    if any(i.name == "MODSEQ" for i in items):
        return items
    return items + [FetchItem("MODSEQ")]


def with_flags(items: list[FetchItem]) -> list[FetchItem]:
    """Append FLAGS if missing (after an implicit \\Seen the client must learn the new flags)."""
    if any(i.name == "FLAGS" for i in items):
        return items
    return items + [FetchItem("FLAGS")]


# --- formatting helpers --------------------------------------------------------------------

_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def _as_datetime(value: datetime | float | int) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value
    # an epoch (Maildir mtime) is shown in the server's local time, as Dovecot does
    return datetime.fromtimestamp(float(value)).astimezone()


def format_internal_date(value: datetime | float) -> bytes:
    """``"17-Jul-1996 02:44:25 -0700"`` (RFC 3501 date-time); naive datetimes are UTC."""
    dt = _as_datetime(value)
    off = dt.utcoffset() or timedelta(0)
    mins = int(off.total_seconds() // 60)
    sign = "+" if mins >= 0 else "-"
    mins = abs(mins)
    s = "%02d-%s-%04d %02d:%02d:%02d %s%02d%02d" % (
        dt.day, _MONTHS[dt.month - 1], dt.year, dt.hour, dt.minute, dt.second, sign, mins // 60, mins % 60
    )
    return b'"' + s.encode("ascii") + b'"'


def format_flags(flags: Iterable[str]) -> bytes:
    """``(\\Seen $Label)``: system flags first, then keywords, each group sorted."""
    fl = sorted(set(flags), key=lambda f: (not f.startswith("\\"), f.lower()))
    return b"(" + " ".join(fl).encode("utf-8", "replace") + b")"


def _nstr(value: bytes | str | None) -> bytes:
    return imap_string(value)


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


# --- sections ------------------------------------------------------------------------------


def _resolve(root: Part, nums: Sequence[int]) -> Part | None:
    """Walk part numbers (RFC 3501 §6.4.5) the way Dovecot does.

    A multipart selects its n-th child; a message/rfc822 part is entered (to its message) when
    more numbers follow; a non-multipart part answers ``1`` with itself, once in a row (so
    ``BODY[1]`` of a single-part message is its body, and ``BODY[1.1]`` of it is empty).
    """
    part = root
    selfed = False
    last = len(nums) - 1
    for k, n in enumerate(nums):
        if part.is_multipart:
            if not 0 < n <= len(part.children):
                return None
            part = part.children[n - 1]
            selfed = False
        else:
            if n != 1 or selfed:
                return None
            selfed = True
        if k < last and part.message is not None:
            part = part.message
            selfed = False
    return part


def _header_chunks(data: bytes, start: int, end: int) -> list[tuple[bytes | None, bytes]]:
    """Raw header lines of ``data[start:end]``, each field with its continuation lines and CRLFs.

    Lines without a colon get the name None (HEADER.FIELDS.NOT keeps them, as Dovecot does).
    """
    # (name, first octet, end octet): a field and its continuation lines are one contiguous
    # slice, cut once at the end (a field folded over 35,000 lines is not copied per line)
    spans: list[list] = []
    pos = start
    while pos < end:
        eol = data.find(b"\r\n", pos, end)
        nxt = end if eol < 0 else eol + 2
        line_start = pos
        pos = nxt
        if nxt - line_start <= 2 and data.startswith(b"\r\n", line_start, nxt) or nxt == line_start:
            continue
        first = data[line_start]
        if (first == 0x20 or first == 0x09) and spans:
            spans[-1][2] = nxt
            continue
        colon = data.find(b":", line_start, nxt)
        name = data[line_start:colon].rstrip(b" \t").upper() if colon > line_start else None
        spans.append([name, line_start, nxt])
    chunks: list[tuple[bytes | None, bytes]] = []
    for name, a, b in spans:
        chunk = data[a:b]
        if not chunk.endswith(b"\r\n"):
            chunk += b"\r\n"                # the message ended inside this line
        chunks.append((name, chunk))
    return chunks


def _section_bytes(msg: Message, item: FetchItem) -> bytes | None:
    """Bytes of one BODY[section] (RFC 3501 §6.4.5), or None when the part does not exist."""
    data = msg.data
    text = item.text
    if not item.parts:
        ent = msg.head
        if text == "":
            return data
    else:
        part = _resolve(msg.root, item.parts)
        if part is None:
            return None
        if text == "":
            return data[part.body_start : part.end]
        if text == "MIME":
            return data[part.start : part.body_start]
        # HEADER / TEXT / HEADER.FIELDS[.NOT] of a part: only message/rfc822 parts have them
        if part.message is None:
            return None
        ent = part.message
    if text == "TEXT":
        return data[ent.body_start : ent.end]
    if text == "HEADER":
        return data[ent.start : ent.body_start]
    names = set(item.fields)
    chunks = _header_chunks(data, ent.start, ent.fields_end)
    if text == "HEADER.FIELDS":
        sel = [c for n, c in chunks if n is not None and n in names]
        # a blank line ends the result, unless the last field selected is the message's last,
        # unterminated line: then only its CRLF is added (as Dovecot)
        unterminated = not data.endswith(b"\r\n", 0, ent.fields_end) and ent.fields_end > ent.start
        if sel and unterminated and chunks and sel[-1] is chunks[-1][1]:
            return b"".join(sel)
        return b"".join(sel) + b"\r\n"
    kept = b"".join(c for n, c in chunks if n is None or n not in names)
    # Dovecot passes the header's own blank line through (none if the header has none)
    return kept + data[ent.fields_end : ent.body_start]


def section(msg: Message, spec: str) -> bytes:
    """Bytes of ``BODY[spec]`` (e.g. ``"1.2"``, ``"HEADER.FIELDS (From)"``); empty if absent."""
    nums, text, fields = _parse_section(spec)
    out = _section_bytes(msg, FetchItem("BODY[...]", True, nums, text, fields))
    return b"" if out is None else out


# --- BODYSTRUCTURE -------------------------------------------------------------------------


def _param_list(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(_nstr(k) + b" " + _nstr(v) for k, v in params) + b")"


def _hdr_str(part: Part, name: str) -> bytes:
    v = part.header(name)
    if v is None:
        return b"NIL"
    v = unfold(v).strip(b" \t")
    return _nstr(v) if v else b"NIL"


def _disposition(part: Part) -> bytes:
    v = part.header("Content-Disposition")
    if v is None:
        return b"NIL"
    kind, params = parse_value_and_params(v)
    return b"(" + _nstr(kind) + b" " + _param_list(params) + b")"


def _language(part: Part) -> bytes:
    v = part.header("Content-Language")
    if v is None:
        return b"NIL"
    langs = [x.strip() for x in re.split(rb"[,\s]+", unfold(v)) if x.strip()]
    langs = [x for x in langs if re.fullmatch(rb"[A-Za-z0-9\-]+", x)]
    if not langs:
        return b"NIL"
    return b"(" + b" ".join(_nstr(x) for x in langs) + b")"


def _ext_common(part: Part) -> bytes:
    return b" ".join([_disposition(part), _language(part), _hdr_str(part, "Content-Location")])


def _structure(msg: Message, part: Part, ext: bool, depth: int = 0) -> bytes:
    data = msg.data
    if part.is_multipart:
        if part.children:
            inner = b"".join(_structure(msg, c, ext, depth + 1) for c in part.children)
        else:
            # a multipart needs one body (RFC 3501 body-type-mpart): report an empty text part
            inner = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0'
            inner += b" NIL NIL NIL NIL)" if ext else b")"
        out = b"(" + inner + b" " + _nstr(part.subtype_raw)
        if ext:
            out += b" " + _param_list(part.params) + b" " + _ext_common(part)
        return out + b")"
    mime = part.mime
    fields = [
        _nstr(part.type_raw),
        _nstr(part.subtype_raw),
        _param_list(part.params),
        _hdr_str(part, "Content-ID") if mime else b"NIL",
        _hdr_str(part, "Content-Description") if mime else b"NIL",
    ]
    cte = parse_cte(part.header("Content-Transfer-Encoding")) if mime else None
    fields.append(_nstr(cte) if cte else b'"7bit"')
    fields.append(b"%d" % part.body_size)
    if part.message is not None:
        fields.append(_envelope(data, part.message))
        fields.append(_structure(msg, part.message, ext, depth + 1))
        fields.append(b"%d" % part.lines)
    elif part.maintype == "text":
        fields.append(b"%d" % part.lines)
    if ext:
        if mime:
            fields.append(_hdr_str(part, "Content-MD5"))
            fields.append(_ext_common(part))
        else:
            fields.append(b"NIL NIL NIL NIL")
    return b"(" + b" ".join(fields) + b")"


def body_structure(msg: Message, extensible: bool = True) -> bytes:
    """BODYSTRUCTURE (``extensible``) or BODY value of the message (RFC 3501 §7.4.2)."""
    return _structure(msg, msg.root, extensible)


# --- ENVELOPE ------------------------------------------------------------------------------


def _addr_list(addrs: list[Address]) -> bytes:
    if not addrs:
        return b"NIL"
    return b"(" + b"".join(
        b"(" + b" ".join(
            [string_for_humans(a.name), _nstr(a.adl), _nstr(a.mailbox), _nstr(a.host)]
        ) + b")" for a in addrs
    ) + b")"


def _envelope(data: bytes, ent: Part) -> bytes:
    def raw(name: str) -> bytes | None:
        v = ent.header(name)
        return None if v is None else v.lstrip(b" \t")

    def nolf(name: str) -> bytes:
        v = raw(name)
        return b"NIL" if v is None else _nstr(v.replace(b"\r", b"").replace(b"\n", b""))

    def addrs(name: str) -> list[Address]:
        v = ent.header(name)
        return parse_addresses(v) if v is not None else []

    frm = addrs("From")
    sender = addrs("Sender") or frm
    reply_to = addrs("Reply-To") or frm
    parts = [
        nolf("Date"),
        string_for_humans(raw("Subject")),
        _addr_list(frm),
        _addr_list(sender),
        _addr_list(reply_to),
        _addr_list(addrs("To")),
        _addr_list(addrs("Cc")),
        _addr_list(addrs("Bcc")),
        nolf("In-Reply-To"),
        nolf("Message-ID"),
    ]
    return b"(" + b" ".join(parts) + b")"


def envelope(msg: Message) -> bytes:
    """ENVELOPE value (RFC 3501 §7.4.2): raw unfolded header values, parsed address lists."""
    return _envelope(msg.data, msg.head)


# --- FETCH response ------------------------------------------------------------------------


def _body_item(msg: Message, item: FetchItem) -> bytes:
    content = _section_bytes(msg, item)
    if content is None:
        content = b""
    if item.partial is not None:
        start, length = item.partial
        content = content[start : start + length]
    return item.label() + b" " + _literal(content)


def fetch_data(items: list[FetchItem], msg: StoredMessage) -> bytes:
    """The FETCH response data for one message; ``msg.load()`` is called at most once."""
    cache: list[Message] = []

    def message() -> Message:
        if not cache:
            cache.append(Message(msg.load()))
        return cache[0]

    out: list[bytes] = []
    for item in items:
        name = item.name
        if name == "UID":
            out.append(b"UID %d" % msg.uid)
        elif name == "FLAGS":
            out.append(b"FLAGS " + format_flags(msg.flags))
        elif name == "INTERNALDATE":
            out.append(b"INTERNALDATE " + format_internal_date(msg.internal_date))
        elif name == "MODSEQ":
            out.append(b"MODSEQ (%d)" % getattr(msg, "modseq", 0))
        elif name == "RFC822.SIZE":
            size = getattr(msg, "size", None)
            if not isinstance(size, int):
                size = message().size
            out.append(b"RFC822.SIZE %d" % size)
        elif name == "ENVELOPE":
            out.append(b"ENVELOPE " + envelope(message()))
        elif name == "BODYSTRUCTURE":
            out.append(b"BODYSTRUCTURE " + body_structure(message(), True))
        elif name == "BODY":
            out.append(b"BODY " + body_structure(message(), False))
        elif name == "RFC822":
            out.append(b"RFC822 " + _literal(message().data))
        elif name == "RFC822.HEADER":
            m = message()
            out.append(b"RFC822.HEADER " + _literal(m.data[m.head.start : m.head.body_start]))
        elif name == "RFC822.TEXT":
            m = message()
            out.append(b"RFC822.TEXT " + _literal(m.data[m.head.body_start : m.head.end]))
        else:
            out.append(_body_item(message(), item))
    return b" ".join(out)

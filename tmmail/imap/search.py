"""IMAP SEARCH: sequence sets and search programs (RFC 3501 §6.4.4, §9 search-key, sequence-set).

One job: parse the tokenised SEARCH arguments into a predicate tree and evaluate it over
messages.  Flag, size, date, UID and sequence keys never load a message; header and body keys
load it once per message.  Text matches are case-insensitive substrings of RFC 2047-decoded
header values and transfer- and charset-decoded text parts.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from bisect import bisect_left, bisect_right
from datetime import date, datetime
from email.utils import parsedate_tz
from typing import Callable, Iterable, Sequence

from tmmail.imap.encoding import Atom, ParseError, String, decode_bytes, decode_header
from tmmail.imap.mime import Message, Part, parse_addresses, parse_cte, unfold

__all__ = [
    "SequenceSet",
    "SearchProgram",
    "BadCharset",
    "MessageGone",
    "parse_search",
    "search",
    "parse_date",
]

MAX_NUMBER = 4294967295
SUPPORTED_CHARSETS = ("UTF-8", "US-ASCII")


class MessageGone(Exception):
    """Raised by a message's ``load()`` when it was expunged meanwhile (another session, RFC 2180
    §4.1.2): :func:`search` leaves the message out of the result instead of failing."""


class BadCharset(Exception):
    """CHARSET other than UTF-8/US-ASCII: reply ``NO [BADCHARSET (UTF-8 US-ASCII)]`` (§6.4.4)."""

    def __init__(self, charset: str) -> None:
        super().__init__(f"Unsupported charset {charset}")
        self.charset = charset


# --- sequence sets -------------------------------------------------------------------------

_SEQ_ITEM = re.compile(rb"^(\d{1,10}|\*)(?::(\d{1,10}|\*))?$")


class SequenceSet:
    """``1:5,7,9:*``: inclusive ranges where None stands for ``*`` (largest number in use)."""

    __slots__ = ("ranges", "_resolved")

    def __init__(self, ranges: Sequence[tuple[int | None, int | None]]) -> None:
        self.ranges = tuple(ranges)
        self._resolved: tuple[int, list[int], list[int]] | None = None

    @classmethod
    def parse(cls, text: bytes | str) -> "SequenceSet":
        if isinstance(text, str):
            text = text.encode("ascii", "replace")
        if not text:
            raise ParseError("Empty sequence set")
        ranges: list[tuple[int | None, int | None]] = []
        for item in text.split(b","):
            m = _SEQ_ITEM.match(item)
            if not m:
                raise ParseError("Invalid sequence set")
            lo = _seq_number(m.group(1))
            hi = _seq_number(m.group(2)) if m.group(2) is not None else lo
            ranges.append((lo, hi))
        return cls(ranges)

    @staticmethod
    def looks_like(text: bytes) -> bool:
        return bool(text) and all(_SEQ_ITEM.match(i) for i in text.split(b","))

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Merged, sorted inclusive ranges with ``*`` replaced by ``largest`` (n:m with n > m swapped)."""
        spans = []
        for lo, hi in self.ranges:
            a = largest if lo is None else lo
            b = largest if hi is None else hi
            if a > b:
                a, b = b, a
            spans.append((a, b))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1] + 1:
                if b > merged[-1][1]:
                    merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return merged

    def contains(self, n: int, largest: int) -> bool:
        """Membership by bisection over the merged ranges (resolved once per ``largest``): a
        SEARCH with a 32,000-item set over a big mailbox must not scan the set per message."""
        r = self._resolved
        if r is None or r[0] != largest:
            merged = self.resolve(largest)
            r = self._resolved = (largest, [a for a, _ in merged], [b for _, b in merged])
        i = bisect_right(r[1], n) - 1
        return i >= 0 and n <= r[2][i]

    def filter(self, values: Sequence[int], largest: int) -> list[int]:
        """The members of sorted ``values`` in the set, by bisection (``1:4294967295`` is cheap)."""
        out: list[int] = []
        for a, b in self.resolve(largest):
            out.extend(values[bisect_left(values, a) : bisect_right(values, b)])
        return out

    def __repr__(self) -> str:
        return f"SequenceSet({self.ranges!r})"


def _seq_number(tok: bytes) -> int | None:
    if tok == b"*":
        return None
    n = int(tok)
    if n < 1 or n > MAX_NUMBER:
        raise ParseError("Invalid sequence number")
    return n


# --- dates ---------------------------------------------------------------------------------

_MONTHS = {m: i + 1 for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"])}
_DATE = re.compile(rb"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$")


def parse_date(text: bytes) -> date:
    """RFC 3501 ``date``: ``1-Feb-1994`` (quotes already removed by the tokenizer)."""
    m = _DATE.match(text)
    if not m or m.group(2).lower().decode() not in _MONTHS:
        raise ParseError(f"Invalid search date {text[:20].decode('ascii', 'replace')}")
    try:
        return date(int(m.group(3)), _MONTHS[m.group(2).lower().decode()], int(m.group(1)))
    except ValueError:
        raise ParseError(f"Invalid search date {text[:20].decode('ascii', 'replace')}") from None


def _internal_day(value: datetime | float) -> date:
    """Calendar day of the internal date: aware datetimes in their own zone, epochs in local time."""
    if isinstance(value, datetime):
        return value.date()
    return datetime.fromtimestamp(float(value)).date()


_EPOCH_DAY = date(1970, 1, 1)


def _sent_day(msg: Message) -> date | None:
    """Day of the Date: header in the sender's own timezone (RFC 3501 §6.4.4 SENT*)."""
    v = msg.head.header("Date")
    if v is None:
        return None
    try:
        t = parsedate_tz(unfold(v).decode("latin-1").strip())
    except (TypeError, ValueError, IndexError):
        return None
    if not t:
        return None
    try:
        return date(t[0], t[1], t[2])
    except (ValueError, TypeError):
        return None


# --- evaluation context --------------------------------------------------------------------


class _Ctx:
    """Per-message lazy state: the message is loaded and decoded only when a key needs it."""

    __slots__ = ("msg", "max_seq", "max_uid", "_message", "_flags", "_headers", "_body", "_decoded")

    def __init__(self, msg: object, max_seq: int, max_uid: int) -> None:
        self.msg = msg
        self.max_seq = max_seq
        self.max_uid = max_uid
        self._message: Message | None = None
        self._flags: set[str] | None = None
        self._headers: str | None = None
        self._body: str | None = None
        self._decoded: dict[str, list[str]] = {}

    @property
    def flags(self) -> set[str]:
        if self._flags is None:
            self._flags = {f.lower() for f in self.msg.flags}  # type: ignore[attr-defined]
        return self._flags

    @property
    def message(self) -> Message:
        if self._message is None:
            self._message = Message(self.msg.load())  # type: ignore[attr-defined]
        return self._message

    def values(self, name: str) -> list[str]:
        """Decoded, casefolded, whitespace-collapsed values of top-level header ``name``."""
        got = self._decoded.get(name)
        if got is None:
            got = [_norm(decode_header(v)) for n, v in self.message.head.headers if n.lower() == name]
            self._decoded[name] = got
        return got

    def addresses(self, name: str) -> list[str]:
        """The values of address header ``name`` as written, and also as the parsed addresses
        (``name <mailbox@host>``, comments and quoting gone, as in ENVELOPE): FROM
        ``user@domain.org`` must find ``<user (comment)@ (comment) domain.org>`` (RFC 3501
        §6.4.4 matches the envelope structure's field; Dovecot does the same)."""
        key = "\0addr:" + name
        got = self._decoded.get(key)
        if got is None:
            got = list(self.values(name))
            for n, v in self.message.head.headers:
                if n.lower() == name:
                    got.append(_norm(", ".join(_address_text(a) for a in parse_addresses(v)
                                                if a.host is not None)))
            self._decoded[key] = got
        return got

    @property
    def body(self) -> str:
        """Casefolded decoded text of the text parts (BODY; no headers at any level, as Dovecot)."""
        if self._body is None:
            m = self.message
            chunks: list[str] = []
            _collect_text(m.data, m.root, chunks, False, 0)
            self._body = "\n".join(chunks).casefold()
        return self._body

    @property
    def text(self) -> str:
        """TEXT: every header (top, MIME part headers, attached messages) plus the text parts."""
        if self._headers is None:
            m = self.message
            chunks: list[str] = []
            _collect_text(m.data, m.root, chunks, True, 0)
            self._headers = "\n".join(chunks).casefold()
        return self._headers


def _address_text(a: object) -> str:
    mailbox = (a.mailbox or b"").decode("utf-8", "replace")  # type: ignore[attr-defined]
    spec = f"{mailbox}@{a.host.decode('utf-8', 'replace')}"  # type: ignore[attr-defined]
    name = a.name  # type: ignore[attr-defined]
    return f"{decode_header(name)} <{spec}>" if name else spec


_WS = re.compile(r"\s+")


def _norm(value: str) -> str:
    return _WS.sub(" ", value).strip().casefold()


def _decode_part(data: bytes, part: Part) -> str:
    raw = data[part.body_start : part.end]
    cte = (parse_cte(part.header("Content-Transfer-Encoding")) or b"").lower() if part.mime else b""
    try:
        if cte == b"base64":
            raw = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/]", b"", raw) + b"===", validate=False)
        elif cte == b"quoted-printable":
            raw = quopri.decodestring(raw)
    except (binascii.Error, ValueError):
        pass
    return decode_bytes(raw, part.param("charset"))


def _is_text(part: Part) -> bool:
    return part.defaulted or (part.maintype == "text" and part.subtype != "")


def _collect_text(data: bytes, part: Part, out: list[str], headers: bool, depth: int) -> None:
    if depth > 50:
        return
    if headers:
        out.extend(f"{n}: {_norm(decode_header(v))}" for n, v in part.headers)
    if part.is_multipart:
        for c in part.children:
            _collect_text(data, c, out, headers, depth + 1)
    elif part.message is not None:
        _collect_text(data, part.message, out, headers, depth + 1)
    elif _is_text(part):
        out.append(_decode_part(data, part))


# --- predicate tree ------------------------------------------------------------------------


class _Node:
    needs_content = False
    flags_only = False       # depends on flags alone (not size, dates, UIDs, sequence numbers)

    def match(self, c: _Ctx) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


class _All(_Node):
    flags_only = True

    def match(self, c: _Ctx) -> bool:
        return True


class _Flag(_Node):
    flags_only = True

    def __init__(self, flag: str, present: bool) -> None:
        self.flag = flag.lower()
        self.present = present

    def match(self, c: _Ctx) -> bool:
        return (self.flag in c.flags) == self.present


class _New(_Node):
    flags_only = True

    def match(self, c: _Ctx) -> bool:
        return "\\recent" in c.flags and "\\seen" not in c.flags


class _Not(_Node):
    def __init__(self, inner: _Node) -> None:
        self.inner = inner
        self.needs_content = inner.needs_content
        self.flags_only = inner.flags_only

    def match(self, c: _Ctx) -> bool:
        return not self.inner.match(c)


class _And(_Node):
    def __init__(self, items: list[_Node]) -> None:
        # cheap keys first, so content is loaded only for messages that pass them
        self.items = sorted(items, key=lambda n: n.needs_content)
        self.needs_content = any(n.needs_content for n in items)
        self.flags_only = all(n.flags_only for n in items)

    def match(self, c: _Ctx) -> bool:
        return all(n.match(c) for n in self.items)


class _Or(_Node):
    def __init__(self, a: _Node, b: _Node) -> None:
        self.a, self.b = sorted((a, b), key=lambda n: n.needs_content)
        self.needs_content = a.needs_content or b.needs_content
        self.flags_only = a.flags_only and b.flags_only

    def match(self, c: _Ctx) -> bool:
        return self.a.match(c) or self.b.match(c)


class _Size(_Node):
    def __init__(self, n: int, larger: bool) -> None:
        self.n = n
        self.larger = larger

    def match(self, c: _Ctx) -> bool:
        size = c.msg.size  # type: ignore[attr-defined]
        return size > self.n if self.larger else size < self.n


class _Seq(_Node):
    def __init__(self, seqset: SequenceSet, uid: bool) -> None:
        self.seqset = seqset
        self.uid = uid

    def match(self, c: _Ctx) -> bool:
        if self.uid:
            return self.seqset.contains(c.msg.uid, c.max_uid)  # type: ignore[attr-defined]
        return self.seqset.contains(c.msg.seq, c.max_seq)  # type: ignore[attr-defined]


_CMP: dict[str, Callable[[date, date], bool]] = {
    "BEFORE": lambda d, ref: d < ref,
    "ON": lambda d, ref: d == ref,
    "SINCE": lambda d, ref: d >= ref,
}


class _Modseq(_Node):
    """``MODSEQ [entry-name entry-type] n`` (RFC 7162 §3.1.5): per-message modseq >= n (the
    store keeps one modseq per message, so the metadata entry named does not narrow it)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def match(self, c: _Ctx) -> bool:
        return getattr(c.msg, "modseq", 0) >= self.n


MAX_MODSEQ = 2 ** 63 - 1


def parse_modseq(tok: object, what: str, zero: bool = False) -> int:
    """A mod-sequence-value (1..2^63-1) or, with ``zero``, a mod-sequence-valzer (0..2^63-1)."""
    if isinstance(tok, (list, String)) or not isinstance(tok, (bytes, bytearray)):
        raise ParseError(f"{what} needs a mod-sequence value")
    raw = bytes(tok)
    if not raw.isdigit() or not raw.isascii() or len(raw) > 19:
        raise ParseError(f"{what} needs a mod-sequence value")
    n = int(raw)
    if n > MAX_MODSEQ or (n == 0 and not zero):
        raise ParseError(f"Invalid mod-sequence value for {what}")
    return n


class _Date(_Node):
    def __init__(self, op: str, ref: date, sent: bool) -> None:
        self.cmp = _CMP[op]
        self.ref = ref
        self.sent = sent
        self.needs_content = sent

    def match(self, c: _Ctx) -> bool:
        if self.sent:
            # a missing or unparseable Date: counts as 1-Jan-1970 (as Dovecot)
            d = _sent_day(c.message) or _EPOCH_DAY
        else:
            d = _internal_day(c.msg.internal_date)  # type: ignore[attr-defined]
        return self.cmp(d, self.ref)


class _Header(_Node):
    needs_content = True

    def __init__(self, names: tuple[str, ...], needle: str) -> None:
        self.names = names
        self.needle = needle.casefold()

    def match(self, c: _Ctx) -> bool:
        return any(self.needle in v for name in self.names for v in c.values(name))


class _AddressHeader(_Header):
    """FROM / TO / CC / BCC: the header text or its parsed addresses."""

    def match(self, c: _Ctx) -> bool:
        return any(self.needle in v for name in self.names for v in c.addresses(name))


class _Body(_Node):
    needs_content = True

    def __init__(self, needle: str, with_headers: bool) -> None:
        self.needle = needle.casefold()
        self.with_headers = with_headers

    def match(self, c: _Ctx) -> bool:
        return self.needle in (c.text if self.with_headers else c.body)


# --- parser --------------------------------------------------------------------------------

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "DELETED": ("\\Deleted", True), "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True), "SEEN": ("\\Seen", True), "RECENT": ("\\Recent", True),
    "UNANSWERED": ("\\Answered", False), "UNDELETED": ("\\Deleted", False), "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False), "UNSEEN": ("\\Seen", False), "OLD": ("\\Recent", False),
}
_ADDR_KEYS = {"BCC": "bcc", "CC": "cc", "FROM": "from", "TO": "to"}
_DATE_KEYS = {"BEFORE": ("BEFORE", False), "ON": ("ON", False), "SINCE": ("SINCE", False),
              "SENTBEFORE": ("BEFORE", True), "SENTON": ("ON", True), "SENTSINCE": ("SINCE", True)}


class _Parser:
    def __init__(self, tokens: list, charset: str, top: "_Parser | None" = None) -> None:
        self.tokens = tokens
        self.pos = 0
        self.charset = charset
        self.top = top or self

    @property
    def uses_modseq(self) -> bool:
        return self.top.__dict__.get("_uses_modseq", False)

    @uses_modseq.setter
    def uses_modseq(self, value: bool) -> None:
        self.top.__dict__["_uses_modseq"] = value

    def _next(self, what: str) -> object:
        if self.pos >= len(self.tokens):
            raise ParseError(f"Missing argument for {what}")
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def _string(self, what: str) -> str:
        tok = self._next(what)
        if isinstance(tok, list):
            raise ParseError(f"{what} needs a string argument")
        return bytes(tok).decode("utf-8", "replace")

    def _atom(self, what: str) -> bytes:
        tok = self._next(what)
        if isinstance(tok, list):
            raise ParseError(f"{what} needs an atom argument")
        return bytes(tok)

    def _number(self, what: str) -> int:
        tok = self._atom(what)
        if not tok.isdigit() or len(tok) > 10 or int(tok) > MAX_NUMBER:
            raise ParseError(f"{what} needs a number")
        return int(tok)

    def key(self) -> _Node:
        tok = self._next("SEARCH")
        if isinstance(tok, list):
            if not tok:
                raise ParseError("Empty search key list")
            sub = _Parser(tok, self.charset, self.top)
            items = []
            while sub.pos < len(tok):
                items.append(sub.key())
            return items[0] if len(items) == 1 else _And(items)
        if isinstance(tok, String):
            raise ParseError("Search key expected, got a string")
        raw = bytes(tok)
        name = raw.decode("ascii", "replace").upper()
        if name == "ALL":
            return _All()
        if name in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[name]
            return _Flag(flag, present)
        if name == "NEW":
            return _New()
        if name in ("KEYWORD", "UNKEYWORD"):
            kw = self._atom(name).decode("utf-8", "replace")
            return _Flag(kw, name == "KEYWORD")
        if name in _ADDR_KEYS:
            return _AddressHeader((_ADDR_KEYS[name],), self._string(name))
        if name == "SUBJECT":
            return _Header(("subject",), self._string(name))
        if name == "HEADER":
            field = self._string(name).lower()
            return _Header((field,), self._string(name))
        if name == "BODY":
            return _Body(self._string(name), False)
        if name == "TEXT":
            return _Body(self._string(name), True)
        if name in _DATE_KEYS:
            op, sent = _DATE_KEYS[name]
            return _Date(op, parse_date(self._atom(name)), sent)
        if name in ("LARGER", "SMALLER"):
            return _Size(self._number(name), name == "LARGER")
        if name == "NOT":
            return _Not(self.key())
        if name == "OR":
            a = self.key()
            b = self.key()
            return _Or(a, b)
        if name == "UID":
            return _Seq(SequenceSet.parse(self._atom(name)), True)
        if name == "MODSEQ":
            tok = self._next(name)
            if isinstance(tok, String) or (not isinstance(tok, list) and not bytes(tok).isdigit()):
                # entry-name entry-type-req (RFC 7162 §3.1.5): "/flags/<flag>" priv|shared|all
                entry = bytes(tok) if not isinstance(tok, list) else b""
                if not entry.lower().startswith(b"/flags/"):
                    raise ParseError("MODSEQ entry name must be /flags/<flag>")
                kind = self._atom(name).lower()
                if kind not in (b"priv", b"shared", b"all"):
                    raise ParseError("MODSEQ entry type must be priv, shared or all")
                tok = self._next(name)
            self.uses_modseq = True
            return _Modseq(parse_modseq(tok, "MODSEQ", zero=True))
        if name == "CHARSET":
            raise ParseError("CHARSET must come first")
        if SequenceSet.looks_like(raw):
            return _Seq(SequenceSet.parse(raw), False)
        raise ParseError(f"Unknown search key {name[:30]}")


class SearchProgram:
    """A parsed search program; evaluate with :meth:`matches` or :func:`search`."""

    def __init__(self, root: _Node, charset: str, uses_modseq: bool = False) -> None:
        self.root = root
        self.charset = charset
        #: the program has a MODSEQ key: the response ends with (MODSEQ n) (RFC 7162 §3.1.5)
        self.uses_modseq = uses_modseq

    @property
    def needs_content(self) -> bool:
        return self.root.needs_content

    @property
    def flags_only(self) -> bool:
        """True if the result depends only on each message's flags (incl. \\Recent): the server
        may evaluate once per distinct flag set."""
        return self.root.flags_only

    def matches(self, msg: object, max_seq: int, max_uid: int) -> bool:
        return self.root.match(_Ctx(msg, max_seq, max_uid))


def parse_search(tokens: list) -> SearchProgram:
    """Parse SEARCH arguments (tokens after ``SEARCH``); ParseError -> BAD, BadCharset -> NO."""
    tokens = list(tokens)
    charset = "UTF-8"
    if len(tokens) >= 1 and not isinstance(tokens[0], list) and bytes(tokens[0]).upper() == b"CHARSET" \
            and isinstance(tokens[0], Atom):
        if len(tokens) < 2 or isinstance(tokens[1], list):
            raise ParseError("Missing charset name")
        charset = bytes(tokens[1]).decode("ascii", "replace").upper()
        if charset not in SUPPORTED_CHARSETS:
            raise BadCharset(charset)
        tokens = tokens[2:]
    if not tokens:
        raise ParseError("Missing search program")
    p = _Parser(tokens, charset)
    items = []
    while p.pos < len(tokens):
        items.append(p.key())
    root = items[0] if len(items) == 1 else _And(items)
    return SearchProgram(root, charset, p.uses_modseq)


def search(program: SearchProgram, messages: Iterable, max_seq: int, max_uid: int,
           gone: list | None = None) -> list:
    """The messages matching ``program``, in input order.

    A message whose content is needed but has been expunged (``load()`` raises
    :class:`MessageGone`) does not match; it is appended to ``gone`` when given."""
    root = program.root
    out = []
    for m in messages:
        try:
            if root.match(_Ctx(m, max_seq, max_uid)):
                out.append(m)
        except MessageGone:
            if gone is not None:
                gone.append(m)
    return out

"""MIME part tree with byte offsets, for IMAP FETCH sections and BODYSTRUCTURE.

One job: find where every part's header and body start and end in the CRLF form of a message
(RFC 2045 §5, RFC 2046 §5.1 multipart boundaries, §5.2.1 message/rfc822), and parse the
header fields IMAP reports (Content-Type parameters incl. RFC 2231, RFC 5322 address lists).
It never raises on message content: malformed input yields a best-effort tree, as Dovecot does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "to_crlf",
    "imap_form",
    "Message",
    "Part",
    "parse_header_block",
    "parse_params",
    "parse_content_type",
    "parse_addresses",
    "Address",
    "unfold",
]

MAX_DEPTH = 40        # nesting of multipart / message/rfc822 beyond this is treated as a leaf
MAX_PARTS = 5000      # total parts parsed per message (defends against boundary bombs)
MAX_PARAM_FIELD = 64 * 1024      # Content-Type/-Disposition/-Transfer-Encoding bytes looked at
MAX_ADDRESS_FIELD = 128 * 1024   # address header bytes looked at (~3000 recipients); both keep a
                                 # hostile header from costing seconds of reactor time per FETCH

_NL = re.compile(rb"\r?\n")


def to_crlf(data: bytes) -> bytes:
    """Normalise LF / CRLF / mixed line endings to CRLF (IMAP's canonical form)."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    return _NL.sub(b"\r\n", data)


def imap_form(data: bytes) -> bytes:
    """What IMAP serves: CRLF line endings, and NUL (not allowed in literals, RFC 3501 §4.3)
    replaced by 0x80 as Dovecot does; sizes do not change."""
    data = to_crlf(data)
    if b"\x00" in data:
        data = data.replace(b"\x00", b"\x80")
    return data


def unfold(value: bytes) -> bytes:
    """Remove header folding (CRLF before WSP) and stray line breaks (RFC 5322 §2.2.3)."""
    return value.replace(b"\r\n", b"").replace(b"\n", b"").replace(b"\r", b"")


@dataclass
class Part:
    """One MIME entity: ``data[start:body_start]`` is the header (with its blank line, if any)."""

    start: int
    body_start: int
    end: int
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    type_raw: str = "text"
    subtype_raw: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)
    defaulted: bool = True          # no usable Content-Type header
    children: list["Part"] = field(default_factory=list)
    message: "Part | None" = None   # enclosed message of a message/rfc822 part
    lines: int = 0
    fields_end: int = -1            # end of the header fields (== body_start if no blank line)
    cut: bool = False               # header ended by a boundary line instead of a blank line
    mime: bool = True               # False: a message without MIME-Version and Content-Type,
                                    # whose other Content-* fields are ignored (as Dovecot)

    @property
    def maintype(self) -> str:
        return self.type_raw.lower()

    @property
    def subtype(self) -> str:
        return self.subtype_raw.lower()

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart"

    @property
    def is_message(self) -> bool:
        return self.message is not None

    def header(self, name: str) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), raw with folding, or None."""
        index = self.__dict__.get("_index")
        if index is None:
            index = {}
            for n, v in self.headers:
                index.setdefault(n.lower(), v)
            self.__dict__["_index"] = index
        return index.get(name.lower())

    def header_all(self, name: str) -> list[bytes]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def param(self, name: str) -> str | None:
        lname = name.lower()
        for n, v in self.params:
            if n.lower() == lname:
                return v
        return None

    @property
    def body_size(self) -> int:
        return self.end - self.body_start


class Message:
    """A message in CRLF form with a lazily parsed part tree."""

    def __init__(self, raw: bytes) -> None:
        self.data = imap_form(raw)
        self._root: Part | None = None
        self._head: Part | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def root(self) -> Part:
        if self._root is None:
            self._root = _Parser(self.data).parse()
        return self._root

    @property
    def head(self) -> Part:
        """The top-level entity with its header fields only (no MIME walk): cheap for
        BODY[HEADER...], BODY[TEXT], RFC822.* and ENVELOPE on big messages."""
        if self._root is not None:
            return self._root
        if self._head is None:
            data = self.data
            hdr_end, body_start, _blank = _header_end(data, 0, len(data))
            part = Part(0, body_start, len(data), parse_header_block(data[:hdr_end]))
            part.fields_end = hdr_end
            self._head = part
        return self._head


# --- header block --------------------------------------------------------------------------


def _header_end(data: bytes, start: int, end: int) -> tuple[int, int, bool]:
    """Return (end of header fields, start of body) for the entity at ``start``.

    The header ends at the first empty line; the body starts after it.  With no empty line the
    whole entity is header and the body is empty (Dovecot does the same).
    """
    if data.startswith(b"\r\n", start) and start + 2 <= end:
        return start, start + 2, True
    idx = data.find(b"\r\n\r\n", start, end)
    if idx < 0:
        return end, end, False
    return idx + 2, idx + 4, True


_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")


def parse_header_block(block: bytes) -> list[tuple[str, bytes]]:
    """Split a header block into (name, raw value) pairs; values keep their folding.

    Lines without a colon (or with an invalid field name) are skipped; continuation lines
    before the first field are ignored.
    """
    fields: list[tuple[str, list[bytes]]] = []
    match = _FIELD.match
    open_field = False          # continuation lines belong to the line before, valid or not
    for line in block.split(b"\r\n"):
        if not line:
            continue
        first = line[0]
        if first == 0x20 or first == 0x09:
            if open_field:
                fields[-1][1].append(line)  # joined once below: a header folded over
            continue                        # 35,000 lines must not cost 35,000 copies
        m = match(line)
        if m is None:
            open_field = False
            continue
        fields.append((m.group(1).decode("ascii"), [line[m.end() :]]))
        open_field = True
    return [(name, parts[0] if len(parts) == 1 else b"\r\n".join(parts)) for name, parts in fields]


# --- Content-Type and parameters -----------------------------------------------------------

_TOKEN = re.compile(rb"[^\s()<>@,;:\\\"/\[\]?=]+")


def _skip_cfws(s: bytes, i: int) -> int:
    n = len(s)
    while i < n:
        c = s[i]
        if c in b" \t\r\n":
            i += 1
        elif c == 0x28:  # comment, may nest
            depth = 0
            while i < n:
                if s[i] == 0x5C:
                    i += 2
                    continue
                if s[i] == 0x28:
                    depth += 1
                elif s[i] == 0x29:
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        else:
            break
    return i


def _read_quoted(s: bytes, i: int) -> tuple[bytes, int]:
    """Read a quoted string starting at ``s[i] == '"'``; unterminated strings run to the end."""
    val, end, _closed = _read_quoted_closed(s, i)
    return val, end


def _read_quoted_closed(s: bytes, i: int) -> tuple[bytes, int, bool]:
    """As :func:`_read_quoted`, also telling whether the closing quote was found."""
    out = bytearray()
    i += 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == 0x5C and i + 1 < n:
            out.append(s[i + 1])
            i += 2
            continue
        if c == 0x22:
            return bytes(out), i + 1, True
        out.append(c)
        i += 1
    return bytes(out), i, False


def _text(b: bytes) -> str:
    """Header bytes as str, losslessly: 8-bit that is not UTF-8 survives as surrogates and is
    written back byte for byte by ``imap_string``."""
    return b.decode("utf-8", "surrogateescape")


def parse_params(s: bytes, i: int = 0) -> list[tuple[str, str]]:
    """Parse ``; name=value`` parameters leniently (RFC 2045 §5.1), merging RFC 2231 sections.

    Matches Dovecot: names and values as written, duplicates kept, quoted values may contain
    ``;``; a parameter without ``=`` is dropped together with the one after it; an unterminated
    quoted value is dropped.  RFC 2231 parameters (``name*``, ``name*0``, ``name*1*``) follow the
    plain ones, sorted by name, their sections joined raw: ``("name*", "utf-8''%E2%82%AC")`` when
    any section is extended, else ``("name", joined)``.
    """
    s = unfold(s)[:MAX_PARAM_FIELD]
    raw: list[tuple[str, str]] = []
    n = len(s)
    while i < n:
        semi = s.find(b";", i)
        if semi < 0:
            break
        i = _skip_cfws(s, semi + 1)
        m = _TOKEN.match(s, i)
        if not m:
            continue
        pname = m.group(0)
        i = _skip_cfws(s, m.end())
        if i >= n or s[i] != 0x3D:
            # '=' missing: skip past the offending character to the next ";" (so "delsp;
            # charset=x" also loses charset, as in Dovecot)
            nxt = s.find(b";", i + 1)
            i = n if nxt < 0 else nxt
            continue
        i = _skip_cfws(s, i + 1)
        if i < n and s[i] == 0x22:
            val, i, closed = _read_quoted_closed(s, i)
            if not closed:
                continue
        else:
            # an unquoted value is one token; anything after it up to ";" is ignored (Dovecot)
            mv = _TOKEN.match(s, i)
            val = mv.group(0) if mv else b""   # "name=" keeps an empty value (Dovecot)
            i = mv.end() if mv else i
        raw.append((_text(pname), _text(val)))
    return _merge_2231(raw)


def _rfc2231_name(name: str) -> tuple[str, int] | None:
    """(base, section) for ``base*``, ``base*N`` or ``base*N*``; None for a plain name.

    String operations, not a regex: a name made of thousands of ``*`` must stay linear."""
    core = name[:-1] if name.endswith("*") else name
    if core is not name and "*" not in core:
        return core, 0
    base, star, num = core.rpartition("*")
    if star and num.isdigit() and len(num) <= 9 and num.isascii():
        return base, int(num)
    if core is not name:
        return core, 0
    return None


def _merge_2231(raw: list[tuple[str, str]]) -> list[tuple[str, str]]:
    plain: list[tuple[str, str]] = []
    groups: dict[str, tuple[str, list[tuple[int, str]]]] = {}
    extended: set[str] = set()
    for name, value in raw:
        split = _rfc2231_name(name)
        if split is None:
            plain.append((name, value))
            continue
        base, index = split
        key = base.lower()
        groups.setdefault(key, (base, []))[1].append((index, value))
        if name.endswith("*"):
            extended.add(key)
    out = plain
    for key in sorted(groups):
        base, secs = groups[key]
        joined = "".join(v for _, v in sorted(secs, key=lambda t: t[0]))
        out.append((base + "*" if key in extended else base, joined))
    return out


def parse_content_type(value: bytes | None) -> tuple[str, str, list[tuple[str, str]], bool]:
    """(type, subtype, params, present) as written.

    As Dovecot: ``text`` alone gives subtype ""; anything but ``;`` after the type/subtype (or a
    missing type) makes the whole value invalid, reported as ``"" ""`` without parameters.
    """
    if value is None:
        return "text", "plain", [], False
    s = unfold(value)[:MAX_PARAM_FIELD]
    n = len(s)
    i = _skip_cfws(s, 0)
    m = _TOKEN.match(s, i)
    if not m:
        return "", "", [], True
    typ = m.group(0)
    i = _skip_cfws(s, m.end())
    if i >= n:
        return _text(typ), "", [], True
    if s[i] != 0x2F:
        return "", "", [], True
    i = _skip_cfws(s, i + 1)
    m2 = _TOKEN.match(s, i)
    if not m2:
        return "", "", [], True
    i = _skip_cfws(s, m2.end())
    if i < n and s[i] != 0x3B:
        return "", "", [], True
    return _text(typ), _text(m2.group(0)), parse_params(s, i), True


_CTE = re.compile(rb"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")


def parse_cte(value: bytes | None) -> bytes | None:
    """Content-Transfer-Encoding as written if it is one token (comments allowed), else None."""
    if value is None:
        return None
    s = unfold(value)[:MAX_PARAM_FIELD]
    i = _skip_cfws(s, 0)
    m = _CTE.match(s, i)
    if not m or _skip_cfws(s, m.end()) < len(s):
        return None
    return m.group(0)


def parse_value_and_params(value: bytes) -> tuple[str, list[tuple[str, str]]]:
    """For Content-Disposition: the first token and its parameters."""
    s = unfold(value)[:MAX_PARAM_FIELD]
    i = _skip_cfws(s, 0)
    m = _TOKEN.match(s, i)
    if not m:
        return "", []
    return _text(m.group(0)), parse_params(s, m.end())


# --- parser --------------------------------------------------------------------------------


class _Parser:
    """Single pass over the message with a stack of active boundaries, as Dovecot parses.

    A line starting with ``--boundary`` (prefix match, RFC 2046 §5.1.1 plus Dovecot's leniency)
    ends the current entity; the innermost matching boundary wins, so an unclosed inner
    multipart is ended by its parent's boundary.  The CRLF before a boundary line belongs to
    the boundary, unless it ends another boundary line or a header without its blank line.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.count = 0
        self.stack: list[bytes] = []     # b"--" + boundary, outermost first

    def parse(self) -> Part:
        try:
            return self.entity(0, False, 0, True)[0]
        except RecursionError:  # pragma: no cover - depth is capped, belt and braces
            return Part(0, 0, len(self.data))

    # -- boundary lines -------------------------------------------------------------------
    def _match(self, line: int) -> tuple[int, bool]:
        """(stack level, is_close) of the boundary starting the line at ``line``, or (-1, False)."""
        data = self.data
        stack = self.stack
        for level in range(len(stack) - 1, -1, -1):
            delim = stack[level]
            if data.startswith(delim, line):
                return level, data.startswith(b"--", line + len(delim))
        return -1, False

    def find_boundary(self, pos: int, limit: int | None = None) -> tuple[int | None, int, bool]:
        """The first boundary line starting at or after line start ``pos`` (before ``limit``)."""
        if not self.stack:
            return None, -1, False
        data = self.data
        if limit is None:
            limit = len(data)
        if pos < limit and data.startswith(b"--", pos):
            level, close = self._match(pos)
            if level >= 0:
                return pos, level, close
        while True:
            i = data.find(b"\r\n--", pos, limit)
            if i < 0:
                return None, -1, False
            line = i + 2
            level, close = self._match(line)
            if level >= 0:
                return line, level, close
            pos = line

    def _line_end(self, line: int) -> int:
        eol = self.data.find(b"\r\n", line)
        return len(self.data) if eol < 0 else eol + 2

    # -- entities -------------------------------------------------------------------------
    def entity(self, start: int, digest: bool, depth: int,
               root: bool = False) -> tuple[Part, int | None, int, bool]:
        """Parse the entity at ``start``; returns it and the boundary line that ended it."""
        self.count += 1
        data = self.data
        n = len(data)
        # the first enclosing boundary line ahead bounds every search below (no quadratic
        # rescans when thousands of parts have no blank line)
        following = self.find_boundary(start)
        limit = n if following[0] is None else following[0]
        cut = False
        stop: int | None = None
        level, close = -1, False
        if data.startswith(b"\r\n", start):
            fields_end = start                      # empty header, then the blank line
        else:
            blank = data.find(b"\r\n\r\n", start, limit)
            fields_end = limit if blank < 0 else blank + 2
            if blank < 0 and following[0] is not None:
                # a boundary line among the header lines ends the entity there (no body)
                cut = True
                stop, level, close = following
                fields_end = max(stop - 2, start)
        body_start = fields_end if cut else min(fields_end + 2, n)
        part = Part(start, body_start, body_start, parse_header_block(data[start:fields_end]))
        typ, sub, params, present = parse_content_type(part.header("Content-Type"))
        if root and not present and part.header("MIME-Version") is None:
            part.mime = False
        if present:
            part.type_raw, part.subtype_raw, part.params, part.defaulted = typ, sub, params, False
        elif digest:
            part.type_raw, part.subtype_raw = "message", "rfc822"
        if part.maintype == "text" and part.param("charset") is None:
            part.params = part.params + [("charset", "us-ascii")]
        boundary = part.param("boundary") if part.maintype == "multipart" else None
        if not cut and fields_end < n and data.startswith(b"--", body_start):
            # an enclosing boundary right after the blank line takes the blank line's CRLF,
            # unless it is this multipart's own first boundary (as Dovecot parses)
            own = boundary is not None and data.startswith(b"--" + boundary.encode("utf-8", "surrogateescape"),
                                                           body_start)
            if not own:
                level, close = self._match(body_start)
                if level >= 0:
                    cut = True
                    stop = body_start
                    fields_end = body_start = body_start - 2
                    part.body_start = part.end = body_start
        part.fields_end = fields_end
        part.cut = cut
        is_message = part.maintype == "message" and part.subtype == "rfc822"
        if not cut:
            deep = depth < MAX_DEPTH and self.count <= MAX_PARTS
            if deep and boundary:
                stop, level, close = self.multipart(part, boundary.encode("utf-8", "surrogateescape"), depth)
            elif deep and is_message:
                inner, stop, level, close = self.entity(body_start, False, depth + 1, True)
                part.message = inner
                # a cut inner header leaves the CRLF before the boundary in this part
                part.end = stop if inner.cut and stop is not None else inner.end
            else:
                stop, level, close = following if following[0] is not None else (None, -1, False)
                part.end = n if stop is None else max(stop - 2, body_start)
        if is_message and part.message is None:
            # message/rfc822 always has an enclosed message in BODYSTRUCTURE (RFC 3501 body-type-msg)
            empty = Part(body_start, body_start, body_start, params=[("charset", "us-ascii")])
            empty.fields_end = body_start
            part.message = empty
        part.lines = data.count(b"\n", body_start, part.end)
        return part, stop, level, close

    def multipart(self, part: Part, boundary: bytes, depth: int) -> tuple[int | None, int, bool]:
        data = self.data
        self.stack.append(b"--" + boundary)
        mine = len(self.stack) - 1
        digest = part.subtype == "digest"
        try:
            stop, level, close = self.find_boundary(part.body_start)     # end of the preamble
            while stop is not None and level == mine and not close:
                if data.find(b"\r\n", stop) < 0:
                    # a last delimiter line without its line end starts no part (Dovecot)
                    part.end = len(data)
                    return None, -1, False
                if self.count > MAX_PARTS:     # beyond the cap: only walk the boundaries
                    stop, level, close = self.find_boundary(self._line_end(stop))
                    continue
                child, stop, level, close = self.entity(self._line_end(stop), digest, depth + 1)
                part.children.append(child)
            if stop is None:
                part.end = len(data)
                return None, -1, False
            if level < mine:                       # a parent's boundary: left unclosed
                part.end = max(stop - 2, part.body_start)
                return stop, level, close
            close_end = self._line_end(stop)       # our close delimiter; then the epilogue
        finally:
            self.stack.pop()
        stop, level, close = self.find_boundary(close_end)
        part.end = len(data) if stop is None else max(stop - 2, close_end)
        return stop, level, close


# --- addresses (RFC 5322 §3.4, lenient) ----------------------------------------------------


@dataclass
class Address:
    """One ENVELOPE address: name/adl/mailbox/host as raw bytes or None.

    A group start is (None, None, group-name, None); a group end is (None, None, None, None).
    """

    name: bytes | None
    adl: bytes | None
    mailbox: bytes | None
    host: bytes | None


_ATOM_RUN = re.compile(rb'[^ \t\r\n()"<>@,;:\[\]]+')


def _tokens(s: bytes) -> list[tuple[str, bytes]]:
    """Lex an address header into (kind, text): kinds 'q' quoted, 'a' atom, or a special char."""
    out: list[tuple[str, bytes]] = []
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c in b" \t\r\n":
            i += 1
        elif c == 0x28:
            depth = 0
            j = i
            while j < n:
                if s[j] == 0x5C:
                    j += 2
                    continue
                if s[j] == 0x28:
                    depth += 1
                elif s[j] == 0x29:
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            out.append(("c", s[i + 1 : min(j, n)].replace(b"\\", b"")))
            i = j + 1
        elif c == 0x22:
            val, i = _read_quoted(s, i)
            out.append(("q", val))
        elif c in b"<>@,;:[]":
            if c == 0x5B:  # domain literal
                j = s.find(b"]", i)
                j = n - 1 if j < 0 else j
                out.append(("a", s[i : j + 1]))
                i = j + 1
                continue
            out.append((chr(c), bytes([c])))
            i += 1
        else:
            m = _ATOM_RUN.match(s, i)
            j = m.end() if m else i + 1
            out.append(("a", s[i:j]))
            i = j
    return out


def _join_words(toks: list[tuple[str, bytes]]) -> bytes:
    """Join display-name words with single spaces; a '.' joins without spaces (obs-phrase)."""
    out = bytearray()
    prev_dot = True
    for kind, text in toks:
        if kind == "c":
            continue
        if kind == ".":
            out.extend(b".")
            prev_dot = True
            continue
        if out and not prev_dot:
            out.extend(b" ")
        out.extend(text)
        prev_dot = False
    return bytes(out)


MISSING_MAILBOX = b"MISSING_MAILBOX"
MISSING_DOMAIN = b"MISSING_DOMAIN"
SYNTAX_ERROR = b"SYNTAX_ERROR"


def _addr_spec(toks: list[tuple[str, bytes]]) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(adl, mailbox, host) from the tokens of an addr-spec / route-addr content."""
    toks = [t for t in toks if t[0] != "c"]
    adl = None
    if toks and toks[0][0] == "@":
        # obsolete source route "@a,@b:" -> adl
        colon = next((k for k, t in enumerate(toks) if t[0] == ":"), -1)
        if colon >= 0:
            adl = b"".join(t for _, t in toks[:colon])
            toks = toks[colon + 1 :]
    at = next((k for k, t in enumerate(toks) if t[0] == "@"), -1)
    if at < 0:
        local = b"".join(t for _, t in toks)
        return adl, (local or None), None
    local = b"".join(t for _, t in toks[:at])
    # the domain is one token (dot-atom or domain literal); anything after it is ignored
    host = toks[at + 1][1] if at + 1 < len(toks) and toks[at + 1][0] == "a" else b""
    return adl, (local or None), (host or None)


def parse_addresses(value: bytes | None) -> list[Address]:
    """Parse an address-list header into ENVELOPE addresses (groups as start/end markers).

    As Dovecot: quoted local parts are unquoted, a comment after a bare addr-spec becomes the
    name, and a missing mailbox or host is ``MISSING_MAILBOX`` / ``MISSING_DOMAIN`` (a NIL host
    would read as a group marker, RFC 3501 §7.4.2).
    """
    if value is None:
        return []
    toks = _tokens(unfold(value)[:MAX_ADDRESS_FIELD])
    out: list[Address] = []
    in_group = False
    cur: list[tuple[str, bytes]] = []

    def emit(item: list[tuple[str, bytes]]) -> bool:
        """Append the address in ``item``; True if it was malformed so that parsing stops."""
        words = [t for t in item if t[0] != "c"]
        if not words:
            return False
        stop = False
        lt = next((k for k, t in enumerate(item) if t[0] == "<"), -1)
        at = next((k for k, t in enumerate(words) if t[0] == "@"), -1)
        if lt >= 0 and not any(t[0] == "@" for t in item[:lt]):
            gt = next((k for k in range(lt + 1, len(item)) if item[k][0] == ">"), -1)
            name = _join_words(item[:lt]) or None
            adl, mbox, host = _addr_spec(item[lt + 1 : gt if gt >= 0 else len(item)])
            if gt < 0 and mbox is not None:
                host = SYNTAX_ERROR     # unterminated "<...", as Dovecot reports it
        elif at < 0 and words[0][0] in ("a", "q"):
            run = 0
            while run < len(words) and words[run][0] in ("a", "q"):
                run += 1
            if run > 1 or words[0][0] == "q":
                # a display name without an address (e.g. a truncated header)
                name, adl, mbox, host = _join_words(words[:run]) or None, None, None, None
            else:
                name, adl, mbox, host = None, None, words[0][1], None
            stop = run < len(words)         # junk after it ends the list, as in Dovecot
        elif at > 1 and all(k in ("a", "q") for k, _ in words[:at]):
            # "john doe@x": a phrase where an address was expected (Dovecot stops here)
            name, adl, mbox, host = _join_words(words[:at]) or None, None, None, None
            stop = True
        else:
            if lt >= 0:                 # "a@b <c@d>": the addr-spec counts, the rest is junk
                item = item[:lt]
                stop = True
            comments = [t for k, t in item if k == "c"]
            name = comments[-1].strip() or None if comments else None
            adl, mbox, host = _addr_spec(item)
            if 0 <= at and at + 2 < len(words):
                stop = True                 # words after "local@domain": Dovecot stops there
        if host is not None and host[:1] != b"[" and (
                host.startswith(b".") or host.endswith(b".") or b".." in host):
            host = None
        out.append(Address(name, adl, mbox or MISSING_MAILBOX, host or MISSING_DOMAIN))
        return stop

    group_ended = False
    for kind, text in toks:
        if kind == "," and not _inside_angle(cur):
            if not group_ended and not [t for t in cur if t[0] != "c"]:
                # an empty list element between commas is reported, as Dovecot does
                out.append(Address(None, None, MISSING_MAILBOX, MISSING_DOMAIN))
            if emit(cur):
                cur = []
                break
            cur = []
            group_ended = False
        elif kind == ":" and not _inside_angle(cur) and not (cur and cur[0][0] == "@"):
            if in_group or any(k in ("@", "<", ">") for k, _ in cur):
                # not a group start (or a group inside a group): end here, as Dovecot stops
                emit(cur)
                cur = []
                break
            out.append(Address(None, None, _join_words(cur) or b"", None))
            in_group = True
            cur = []
        elif kind == ";":
            stop = emit(cur)
            cur = []
            if not in_group:
                break                   # ";" outside a group: Dovecot stops parsing
            out.append(Address(None, None, None, None))
            in_group = False
            group_ended = True
            if stop:
                break
        else:
            cur.append((kind, text))
            group_ended = False
    emit(cur)
    if in_group:
        out.append(Address(None, None, None, None))
    return out


def _inside_angle(cur: list[tuple[str, bytes]]) -> bool:
    depth = 0
    for kind, _ in cur:
        if kind == "<":
            depth = 1
        elif kind == ">":
            depth = 0
    return depth == 1

"""Parsing of the MAIL FROM / RCPT TO arguments: the path and its ESMTP parameters.

Pure logic.  RFC 5321 §4.1.2 (Path, Mailbox, Local-part, Domain), §4.1.3 (address literals),
§4.5.3.1 (size limits), RFC 6531 §3.3 (UTF-8 local parts and U-label domains when SMTPUTF8 is
used), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 3461 (DSN: RET, ENVID, NOTIFY, ORCPT),
RFC 4954 §5 (MAIL AUTH=).

The parser is strict on purpose: a path is what policy and router act on, so every
ambiguity that other MTAs have read as "relay this" (source routes, ``%``/``!`` hacks,
quoted ``@``, trailing dots, IP literals, look-alike Unicode domains) is made visible here
(``Path.routing``, ``Path.ip_literal``) or refused as a syntax error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import idna

#: RFC 5321 §4.1.2 atext (RFC 5322 §3.2.3)
_ATEXT = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_LDH_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
#: RFC 1870 size-value = 1*20DIGIT, ASCII digits only: str.isdigit() is also true for "²"
#: (int() then raises) and for "١٢" or "１" (int() reads them as 12 and 1)
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")
#: characters in a local part that ask an MTA to route further (RFC 1123 §5.2.16 "%",
#: UUCP bang paths, RFC 821-style "@" inside a quoted local part)
ROUTING_CHARACTERS = frozenset("%!@")

MAX_LOCAL_OCTETS = 64
MAX_DOMAIN_OCTETS = 255
MAX_PATH_OCTETS = 256


class PathError(ValueError):
    """The argument is not a valid path; ``reason`` is a short text for the log."""

    def __init__(self, reason: str, *, utf8: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        #: the refusal is only that non-ASCII was used without SMTPUTF8 (RFC 6531: 553 5.6.7)
        self.utf8 = utf8


@dataclass(frozen=True)
class Path:
    """A parsed reverse-path or forward-path.

    ``address`` is the canonical ``local@domain`` (domain lower-case, IDNA A-labels) that is
    checked by policy and stored in the envelope; ``""`` for the null path ``<>``.
    """

    address: str
    local: str = ""
    domain: str = ""
    #: domains of an RFC 5321 §C source route ``<@a,@b:user@dom>`` (refused for RCPT)
    route: tuple[str, ...] = ()
    #: the unquoted local part contains %, ! or @ (sender-specified routing)
    routing_local: bool = False
    #: domain is an address literal like ``[192.0.2.1]``
    ip_literal: bool = False
    #: non-ASCII characters were used (requires SMTPUTF8)
    utf8: bool = False

    @property
    def is_null(self) -> bool:
        return self.address == ""

    @property
    def routing(self) -> bool:
        """The client asked us to route beyond the stated domain (never honoured)."""
        return bool(self.route) or self.routing_local


def split_argument(arg: str, keyword: str) -> tuple[str, str]:
    """Split ``FROM:<path> params`` into (path text inside <>, parameter text).

    Tolerates spaces after the colon (common client bug); requires angle brackets.
    """
    head = arg[: len(keyword) + 1]
    if head.upper() != keyword.upper() + ":":
        raise PathError("expected " + keyword + ":")
    rest = arg[len(keyword) + 1 :].lstrip(" ")
    if not rest.startswith("<"):
        raise PathError("path must be in angle brackets")
    i = 1
    quoted = False
    while i < len(rest):
        c = rest[i]
        if quoted:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            break
        elif c == "<":
            raise PathError("nested angle bracket")
        i += 1
    else:
        raise PathError("missing closing angle bracket")
    path_text = rest[1:i]
    params = rest[i + 1 :]
    if params and not params.startswith(" "):
        raise PathError("garbage after path")
    return path_text, params.strip(" ")


def _is_dot_string(text: str, utf8: bool) -> bool:
    if not text or text.startswith(".") or text.endswith(".") or ".." in text:
        return False
    for c in text:
        if c == "." or c in _ATEXT:
            continue
        if utf8 and ord(c) > 127:
            continue
        return False
    return True


def _parse_local(text: str, utf8: bool) -> tuple[str, str, int]:
    """Parse a local part at the start of ``text``; returns (canonical, unquoted, length used)."""
    if text.startswith('"'):
        out = []
        i = 1
        while i < len(text):
            c = text[i]
            if c == "\\":
                if i + 1 >= len(text):
                    raise PathError("bad quoted-pair")
                n = text[i + 1]
                if not (32 <= ord(n) <= 126):
                    raise PathError("bad quoted-pair")
                out.append(n)
                i += 2
                continue
            if c == '"':
                break
            if not (32 <= ord(c) <= 126) and not (utf8 and ord(c) > 127):
                raise PathError("bad character in quoted local part")
            out.append(c)
            i += 1
        else:
            raise PathError("unterminated quoted local part")
        unquoted = "".join(out)
        if _is_dot_string(unquoted, utf8):
            canonical = unquoted
        else:
            canonical = '"' + unquoted.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return canonical, unquoted, i + 1
    at = text.find("@")
    local = text if at < 0 else text[:at]
    if not _is_dot_string(local, utf8):
        raise PathError("bad local part")
    return local, local, len(local)


def normalize_domain(text: str, utf8: bool) -> str:
    """Lower-case ASCII domain, U-labels converted to A-labels (RFC 5890).

    Refuses trailing dots, empty labels, and non-ASCII labels that map to plain ASCII
    (full-width or other compatibility look-alikes of an ASCII name), so that what policy
    checks is exactly what the router will see.
    """
    if not text or text.endswith(".") or text.startswith("."):
        raise PathError("bad domain")
    labels = text.split(".")
    out = []
    for label in labels:
        if label.isascii():
            if not _LDH_LABEL.match(label):
                raise PathError("bad domain label")
            out.append(label.lower())
            continue
        if not utf8:
            raise PathError("non-ASCII domain without SMTPUTF8", utf8=True)
        try:
            alabel = idna.encode(label, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError) as e:
            raise PathError(f"bad internationalized domain label: {e}") from None
        if not alabel.startswith("xn--") or "." in alabel:
            raise PathError("look-alike domain label")
        out.append(alabel)
    domain = ".".join(out)
    if len(domain) > MAX_DOMAIN_OCTETS:
        raise PathError("domain too long")
    return domain


_BAD_LITERAL = "bad address literal"
_IPV4_LITERAL = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_HEX = re.compile(r"[0-9A-Fa-f]{1,4}")
#: General-address-literal: Standardized-tag ":" 1*dcontent, dcontent = %d33-90 / %d94-126
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[!-Z^-~]+")


def _is_ipv4(text: str) -> bool:
    """RFC 5321 §4.1.3 IPv4-address-literal: Snum 3("." Snum), Snum 1*3DIGIT in 0-255.

    ASCII digits only; leading zeros are allowed by the grammar (``ipaddress`` refuses them).
    """
    return bool(_IPV4_LITERAL.fullmatch(text)) and all(int(n) <= 255 for n in text.split("."))


def _hex_groups(text: str) -> int | None:
    """Number of ``IPv6-hex`` groups in ``a:b:c`` (0 for ""), None if malformed."""
    if text == "":
        return 0
    groups = text.split(":")
    return len(groups) if all(_IPV6_HEX.fullmatch(g) for g in groups) else None


def _is_ipv6(text: str) -> bool:
    """RFC 5321 §4.1.3 IPv6-addr: IPv6-full / IPv6-comp / IPv6v4-full / IPv6v4-comp.

    The IPv4 tail counts as two groups: 8 groups in the full forms, at most 6 beside "::"
    (IPv6-comp) and at most 4 beside "::" before an IPv4 tail (IPv6v4-comp).  No zone index
    (``%eth0``), no brackets, ASCII only -- which ``ipaddress.IPv6Address`` does not all refuse.
    """
    if "." in text:
        head, colon, ipv4 = text.rpartition(":")
        if not colon or not _is_ipv4(ipv4):
            return False
        text = head + ":0:0"
    if "::" in text:
        before, _, after = text.partition("::")
        n, m = _hex_groups(before), _hex_groups(after)
        return n is not None and m is not None and n + m <= 6
    return _hex_groups(text) == 8


def is_address_literal(text: str) -> bool:
    """RFC 5321 §4.1.3 address-literal: ``[`` IPv4 / ``IPv6:`` IPv6 / General-address-literal ``]``.

    The tag "IPv6" (case-insensitive, like every ABNF string) always means an IPv6 address;
    any other Standardized-tag is taken by the grammar (which address.py also accepts).
    """
    if not (text.startswith("[") and text.endswith("]")) or not text.isascii():
        return False
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        return _is_ipv6(inner[5:])
    return _is_ipv4(inner) or bool(_GENERAL_LITERAL.fullmatch(inner))


def parse_path(text: str, *, utf8: bool, allow_null: bool) -> Path:
    """Parse the text inside ``<...>`` (RFC 5321 §4.1.2).

    ``utf8``: the transaction uses SMTPUTF8, so UTF-8 local parts and U-labels are allowed.
    """
    has_non_ascii = not text.isascii()
    if has_non_ascii and not utf8:
        try:
            parse_path(text, utf8=True, allow_null=allow_null)
        except PathError as e:
            if e.reason == _BAD_LITERAL:
                raise  # an address literal is ASCII even with SMTPUTF8: a syntax error (501)
        raise PathError("non-ASCII address without SMTPUTF8", utf8=True)
    if len(text.encode("utf-8")) > MAX_PATH_OCTETS:
        raise PathError("path too long")
    if text == "":
        if not allow_null:
            raise PathError("null path not allowed here")
        return Path(address="")
    route: list[str] = []
    if text.startswith("@"):
        colon = text.find(":")
        if colon < 0:
            raise PathError("bad source route")
        for hop in text[:colon].split(","):
            if not hop.startswith("@"):
                raise PathError("bad source route")
            route.append(normalize_domain(hop[1:], utf8))
        text = text[colon + 1 :]
    canonical_local, unquoted, used = _parse_local(text, utf8)
    if used >= len(text) or text[used] != "@":
        raise PathError("missing domain")
    domain_text = text[used + 1 :]
    if len(unquoted.encode("utf-8")) > MAX_LOCAL_OCTETS:
        raise PathError("local part too long")
    ip_literal = False
    if domain_text.startswith("["):
        if not is_address_literal(domain_text):
            raise PathError(_BAD_LITERAL)
        ip_literal = True
        domain = domain_text.lower()
    else:
        domain = normalize_domain(domain_text, utf8)
    routing_local = any(c in ROUTING_CHARACTERS for c in unquoted)
    return Path(
        address=f"{canonical_local}@{domain}",
        local=canonical_local,
        domain=domain,
        route=tuple(route),
        routing_local=routing_local,
        ip_literal=ip_literal,
        utf8=has_non_ascii,
    )


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters ``KEY[=VALUE] ...`` (RFC 5321 §4.1.2); keys upper-cased, no duplicates.

    A malformed or repeated parameter raises :class:`ParamError` (a syntax error, 501 5.5.4).
    """
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key):
            raise ParamError(item)
        key = key.upper()
        if key in params:
            raise ParamError(key, duplicate=True)
        if eq:
            if not value or "=" in value or any(ord(c) < 33 or ord(c) == 127 for c in value):
                raise ParamError(key)
            params[key] = value
        else:
            params[key] = None
    return params


def _shown(text: str) -> str:
    """Client text as it may be named in a reply: printable ASCII, at most 40 characters."""
    return "".join(c if 33 <= ord(c) <= 126 else "?" for c in text[:40])


_XTEXT = re.compile(r"^(?:[!-*,-<>-~]|\+[0-9A-F]{2})*$")


def is_xtext(value: str) -> bool:
    """RFC 3461 §4 xtext: printable ASCII except '+' and '=', or '+' and two upper hex digits."""
    return bool(_XTEXT.match(value))


class ParamError(ValueError):
    """An ESMTP parameter is refused; ``param`` names it (printable ASCII).

    ``unknown``: a parameter this server does not implement, or one it did not advertise
    (RFC 5321 §4.1.1.11: 555 5.5.4).  Otherwise it is a syntax error in the parameters -- no
    value where one is needed, a malformed value, a repeated parameter -- which is 501 5.5.4
    (RFC 5321 §4.2.2 501, RFC 3463 X.5.4 "invalid command arguments"), not an address error
    (X.1.7 / X.1.3 are for the path itself).
    """

    def __init__(self, param: str, *, unknown: bool = False, duplicate: bool = False) -> None:
        super().__init__(param)
        self.param = _shown(param)
        self.unknown = unknown
        self.duplicate = duplicate


def _ascii_upper(value: str | None) -> str | None:
    """An ASCII value upper-cased; None for no value or a non-ASCII one, which str.upper()
    could turn into a keyword ("7B\u0131T" -> "7BIT", "HDR\u017f" -> "HDRS")."""
    return value.upper() if value is not None and value.isascii() else None


def check_mail_params(params: dict[str, str | None], *, auth_offered: bool) -> dict[str, str]:
    """Validate MAIL FROM parameters; returns them normalized for the envelope.

    SIZE (RFC 1870), BODY=7BIT|8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), RET/ENVID
    (RFC 3461 §4.3, §4.4), AUTH (RFC 4954 §5; accepted and recorded, never trusted).
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not _SIZE_VALUE.fullmatch(value):
                raise ParamError(key)
            out[key] = str(int(value))
        elif key == "BODY":
            word = _ascii_upper(value)
            if word == "BINARYMIME":
                raise ParamError("BODY=BINARYMIME", unknown=True)  # RFC 3030 §3, not offered
            if word not in ("7BIT", "8BITMIME"):
                raise ParamError(key)
            out[key] = word
        elif key == "SMTPUTF8":
            if value is not None:
                raise ParamError(key)
            out[key] = ""
        elif key == "RET":
            word = _ascii_upper(value)
            if word not in ("FULL", "HDRS"):
                raise ParamError(key)
            out[key] = word
        elif key == "ENVID":
            if value is None or len(value) > 100 or not is_xtext(value):
                raise ParamError(key)
            out[key] = value
        elif key == "AUTH" and auth_offered:
            if value is None or not (value == "<>" or is_xtext(value)):
                raise ParamError(key)
            out[key] = value
        else:
            raise ParamError(key, unknown=True)
    return out


_NOTIFY_WORDS = frozenset(("SUCCESS", "FAILURE", "DELAY"))


#: RFC 6533 §3 EmbeddedUnicodeChar "\x{" HEXPOINT "}": an xtext special or "\" in two digits,
#: else a code point beyond ASCII without leading zeros, never a surrogate
_HEXPOINT = (
    r"(?:[01][1-9]|10|20|2[Bb]|3[Dd]|7[Ff]|5[Cc]|[89A-Fa-f][0-9A-Fa-f]"
    r"|[1-9A-Fa-f][0-9A-Fa-f]{2}"
    r"|[1-9A-Ca-cE-Fe-f][0-9A-Fa-f]{3}|[Dd][0-7][0-9A-Fa-f]{2}"
    r"|[1-9A-Fa-f][0-9A-Fa-f]{4}|10[0-9A-Fa-f]{4})"
)
#: the value of ORCPT=utf-8;...: utf-8-addr-xtext (QCHAR / EmbeddedUnicodeChar), with the
#: RFC 3461 xtext "+HH" every ORCPT value may use; "\" only as the start of "\x{...}"
_UTF8_ADDR_XTEXT = re.compile(r"(?:[!-*,-<>-\[\]-~]|\\x\{" + _HEXPOINT + r"\}|\+[0-9A-F]{2})+")
#: utf-8-addr-unitext: the same plus UTF-8 beyond ASCII (QUCHAR), only under SMTPUTF8
_UTF8_ADDR_UNITEXT = re.compile(r"(?:[!-*,-<>-\[\]-~\u0080-\U0010ffff]|\\x\{" + _HEXPOINT + r"\}|\+[0-9A-F]{2})+")


def is_orcpt_value(addr_type: str, value: str, *, smtputf8: bool) -> bool:
    """RFC 3461 §4.2 ``ORCPT=addr-type;xtext`` for any addr-type, ASCII only; for the
    ``utf-8`` type the RFC 6533 §3 forms: utf-8-addr-xtext, and utf-8-addr-unitext (raw
    UTF-8) only when the transaction uses SMTPUTF8 (RFC 6533 §3, RFC 6531)."""
    if addr_type.lower() != "utf-8":
        return bool(value) and is_xtext(value)
    pattern = _UTF8_ADDR_UNITEXT if smtputf8 else _UTF8_ADDR_XTEXT
    return pattern.fullmatch(value) is not None


def check_rcpt_params(params: dict[str, str | None], *, smtputf8: bool = False) -> dict[str, str]:
    """Validate RCPT TO parameters: NOTIFY and ORCPT (RFC 3461 §4.1, §4.2; RFC 6533 §3).

    ``smtputf8``: the transaction's MAIL FROM had SMTPUTF8, so ``ORCPT=utf-8;`` may carry UTF-8.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        if key == "NOTIFY":
            word = _ascii_upper(value)
            if word is None:
                raise ParamError(key)
            words = word.split(",")
            if words == ["NEVER"]:
                out[key] = "NEVER"
            elif words and all(w in _NOTIFY_WORDS for w in words) and len(set(words)) == len(words):
                out[key] = ",".join(words)
            else:
                raise ParamError(key)
        elif key == "ORCPT":
            if value is None or len(value) > 500:
                raise ParamError(key)
            addr_type, semi, addr = value.partition(";")
            if not semi or not _KEYWORD.match(addr_type) or not addr:
                raise ParamError(key)
            if not is_orcpt_value(addr_type, addr, smtputf8=smtputf8):
                raise ParamError(key)
            out[key] = value
        else:
            raise ParamError(key, unknown=True)
    return out

"""Mail address syntax: RFC 5321 mailboxes and paths, internal addresses and address masks.

Pure logic, no I/O.  The grammar follows RFC 5321 §4.1.2 (``Mailbox``, ``Local-part``,
``Domain``, ``address-literal``) as extended by RFC 6531 §3.3 (SMTPUTF8: UTF-8 in atoms,
quoted strings and domain labels).  Domains are lower-cased and unicode domains are turned
into their IDNA A-label (RFC 5890) where possible, so ``Bücher.example`` and
``xn--bcher-kva.example`` are the same hosted domain.

Internal addresses are MailEnable-style routing targets: ``[SF:PO/MAILBOX]`` (post office
mailbox), ``[SMTP:user@domain]`` (an SMTP address or, as a map source, a mask such as
``[SMTP:*@example.com]``), ``[LS:PO/LIST]`` (list server).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

try:  # IDNA 2008 + UTS #46 mapping; comes with twisted[tls] via service-identity
    import idna as _idna
except ModuleNotFoundError:  # pragma: no cover - the stdlib IDNA 2003 codec is the fallback
    _idna = None  # type: ignore[assignment]

__all__ = [
    "Address",
    "AddressError",
    "SourceRouteError",
    "InternalAddress",
    "parse_mailbox",
    "parse_address",
    "parse_path",
    "normalize_domain",
    "is_valid_domain",
    "quote_local",
    "mask_matches",
    "is_mask",
    "MAX_LOCAL_PART",
    "MAX_DOMAIN",
    "MAX_PATH",
]

#: RFC 5321 §4.5.3.1.1-3: size limits in octets
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """The text is not a syntactically valid address (SMTP: 501 5.1.3 / 553 5.1.3)."""


class SourceRouteError(AddressError):
    """A path with an RFC 5321 §4.1.1.3 source route (``<@a,@b:user@c>``).

    Servers "SHOULD NOT" honour them (RFC 5321 Appendix C); tmmail treats them as a relay
    trick and refuses them, so callers can give a distinct reply (e.g. 553 5.7.1).
    """


# RFC 5322 §3.2.3 atext; RFC 6531 §3.3 adds UTF8-non-ascii.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
# qtextSMTP = %d32-33 / %d35-91 / %d93-126 / UTF8-non-ascii; quoted-pairSMTP = "\" %d32-126
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_QUOTED_PAIR = re.compile(r"\\([\x20-\x7e])")
# sub-domain = Let-dig [Ldh-str]; U-labels (RFC 6531) allowed, checked by IDNA afterwards.
_LABEL = re.compile(r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?")
_GENERAL_LITERAL = re.compile(r"([A-Za-z0-9-]*[A-Za-z0-9]):([\x21-\x5a\x5e-\x7e]+)")


@dataclass(frozen=True)
class Address:
    """An RFC 5321 mailbox: ``local`` is unquoted (escapes resolved), ``domain`` normalised.

    ``str()`` gives the canonical form (local part quoted only when it has to be), which is
    what the spool, the envelope and the tables store.
    """

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{quote_local(self.local)}@{self.domain}"

    @property
    def is_ascii(self) -> bool:
        """False if sending it needs the SMTPUTF8 extension (RFC 6531)."""
        return self.local.isascii() and self.domain.isascii()

    @property
    def key(self) -> str:
        """Lookup key: the canonical address lower-cased (tables are case-insensitive)."""
        return str(self).lower()


def quote_local(local: str) -> str:
    """The local part as written on the wire: a dot-string if possible, else quoted (§4.1.2)."""
    if _DOT_STRING.fullmatch(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parse_local(text: str) -> str | None:
    if _DOT_STRING.fullmatch(text):
        return text
    if _QUOTED_STRING.fullmatch(text):
        return _QUOTED_PAIR.sub(r"\1", text[1:-1])
    return None


def _address_literal(text: str) -> str | None:
    """Validate ``[1.2.3.4]``, ``[IPv6:...]`` or a general literal (RFC 5321 §4.1.3)."""
    inner = text[1:-1]
    if inner.lower().startswith("ipv6:"):
        # IPv6-addr of §4.1.3 has no zone index ("%eth0"), which ipaddress would accept
        # and which names an interface of the host, not a destination.
        if "%" in inner:
            return None
        try:
            ip6 = ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return None
        return f"[IPv6:{ip6.compressed}]"
    if re.fullmatch(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}", inner):
        try:
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            return None
    m = _GENERAL_LITERAL.fullmatch(inner)
    if m and m.group(1).lower() != "ipv6":
        return f"[{m.group(1)}:{m.group(2)}]"
    return None


@lru_cache(maxsize=4096)
def normalize_domain(text: str) -> str | None:
    """A lower-case domain (A-labels for unicode) or address literal; None if invalid.

    A trailing dot is not allowed (RFC 5321 domains are absolute without it).
    """
    if not text:
        return None
    if text.startswith("[") and text.endswith("]"):
        return _address_literal(text)
    if len(text.encode("utf-8")) > MAX_DOMAIN:
        return None
    labels = text.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if text.isascii():
        domain = text.lower()
    else:
        domain = _to_alabel(text)
        if domain is None:
            return None
    if len(domain) > MAX_DOMAIN or any(len(label) > 63 for label in domain.split(".")):
        return None
    return domain


def _to_alabel(text: str) -> str | None:
    if _idna is not None:
        try:
            return _idna.encode(text, uts46=True).decode("ascii").lower()
        except (_idna.IDNAError, UnicodeError, ValueError):
            pass
    try:  # IDNA 2003: accepts some names IDNA 2008 refuses (e.g. symbols)
        return text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


def is_valid_domain(text: str) -> bool:
    """True for a domain name (not an address literal) that ``normalize_domain`` accepts."""
    return not text.startswith("[") and normalize_domain(text) is not None


def parse_address(text: str) -> Address:
    """Parse an RFC 5321 ``Mailbox`` (``local@domain``, no angle brackets).

    Raises :class:`AddressError`.  ``%`` and ``!`` in the local part are kept literally;
    whether they are relay hacks is the policy's business.
    """
    if not isinstance(text, str) or not text:
        raise AddressError("empty address")
    if any(c in text for c in "\r\n\0"):
        raise AddressError("control character in address")
    at = text.rfind("@")
    if at <= 0:
        raise AddressError("address has no local part and domain")
    local_text, domain_text = text[:at], text[at + 1 :]
    local = _parse_local(local_text)
    if local is None:
        raise AddressError("malformed local part")
    if len(local_text.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    domain = normalize_domain(domain_text)
    if domain is None:
        raise AddressError("malformed domain")
    address = Address(local, domain)
    if len(str(address).encode("utf-8")) > MAX_PATH - 2:
        raise AddressError("address too long")
    return address


def parse_mailbox(text: str) -> Address | None:
    """Like :func:`parse_address` but returns None for anything malformed (contract API)."""
    try:
        return parse_address(text)
    except AddressError:
        return None


def parse_path(text: str, *, allow_postmaster: bool = False) -> str:
    """Parse a MAIL FROM / RCPT TO path (RFC 5321 §4.1.2 ``Path``) to a canonical address.

    Returns the canonical address string, ``""`` for the null path ``<>``; with
    ``allow_postmaster`` also the bare ``<Postmaster>`` recipient (§4.1.1.3), returned as
    ``"postmaster"``.  Raises :class:`SourceRouteError` for a source route
    (``<@a,@b:user@c>``) and :class:`AddressError` for anything else malformed.
    """
    if not text.startswith("<") or not text.endswith(">"):
        raise AddressError("path must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        return ""
    if inner.startswith("@"):
        raise SourceRouteError("source routes are not accepted")
    if allow_postmaster and inner.lower() == "postmaster":
        return "postmaster"
    return str(parse_address(inner))


@dataclass(frozen=True)
class InternalAddress:
    """A routing target or map source such as ``[SF:ACME/ADMIN]`` (scheme upper-case)."""

    scheme: str
    value: str

    _FORM = re.compile(r"\[([A-Za-z][A-Za-z0-9]*):([^\[\]\r\n\t]+)\]")

    @classmethod
    def parse(cls, text: str) -> InternalAddress:
        """Parse ``[SCHEME:value]``; raises :class:`AddressError`.

        ``SF`` and ``LS`` values must be ``PO/NAME``; ``SMTP`` values an address or a mask.
        Results are cached (the value is immutable): provider reloads re-parse whole tables.
        """
        if cls is InternalAddress:
            return _parse_internal(text)
        return cls._parse(text)

    @classmethod
    def _parse(cls, text: str) -> InternalAddress:
        m = cls._FORM.fullmatch(text.strip())
        if not m:
            raise AddressError(f"not an internal address: {text!r}")
        scheme, value = m.group(1).upper(), m.group(2).strip()
        if scheme in ("SF", "LS"):
            parts = value.split("/")
            if len(parts) != 2 or not all(p.strip() for p in parts):
                raise AddressError(f"[{scheme}:...] needs POSTOFFICE/NAME: {text!r}")
            value = "/".join(p.strip() for p in parts)
        elif scheme == "SMTP":
            if is_mask(value):
                if value != "*" and "@" not in value:
                    raise AddressError(f"mask needs an @: {text!r}")
            else:
                value = str(parse_address(value))
        return cls(scheme, value)

    @classmethod
    def smtp(cls, address: str | Address) -> InternalAddress:
        """``[SMTP:address]`` for an address (validated)."""
        return cls.parse(f"[SMTP:{address}]")

    def __str__(self) -> str:
        return f"[{self.scheme}:{self.value}]"

    @property
    def postoffice(self) -> str:
        """For ``SF``/``LS``: the post office part."""
        return self.value.split("/", 1)[0]

    @property
    def name(self) -> str:
        """For ``SF``/``LS``: the mailbox, group or list name."""
        return self.value.split("/", 1)[1] if "/" in self.value else self.value

    @property
    def is_mask(self) -> bool:
        return self.scheme == "SMTP" and is_mask(self.value)


@lru_cache(maxsize=65536)
def _parse_internal(text: str) -> InternalAddress:
    return InternalAddress._parse(text)


def is_mask(text: str) -> bool:
    """True if ``text`` has ``*`` or ``?`` wildcards."""
    return "*" in text or "?" in text


def _strip_smtp(text: str) -> str:
    if text.startswith("[") and text.endswith("]") and text[1:6].upper() == "SMTP:":
        return text[6:-1]
    return text


def _norm_for_match(text: str) -> str:
    """Normalise the domain of a mask or address so unicode and A-label forms compare equal."""
    at = text.rfind("@")
    if at >= 0 and not is_mask(text[at + 1 :]):
        domain = normalize_domain(text[at + 1 :])
        if domain is not None:
            text = text[: at + 1] + domain
    return text.casefold()


@lru_cache(maxsize=1024)
def _mask_regex(mask: str) -> re.Pattern[str]:
    parts = []
    for c in mask:
        if c == "*":
            parts.append(".*")
        elif c == "?":
            parts.append(".")
        else:
            parts.append(re.escape(c))
    return re.compile("".join(parts), re.DOTALL)


def mask_matches(mask: str, address: str | Address) -> bool:
    """Does ``address`` match ``mask`` (``*`` any run, ``?`` one character; case-insensitive)?

    Either may be given bare or as ``[SMTP:...]``.  ``*`` alone matches every address.
    """
    mask_text = _norm_for_match(_strip_smtp(mask.strip()))
    addr_text = _norm_for_match(_strip_smtp(str(address).strip()))
    return _mask_regex(mask_text).fullmatch(addr_text) is not None

"""Provider tables: MailEnable-style tab-delimited files -> immutable snapshots.

Pure logic apart from file reads and the atomic ``write``.  Each table is a UTF-8 text file in
the configuration folder: one row per line, columns separated by a TAB, ``#`` comment lines
and blank lines ignored, trailing empty columns may be left out.  A malformed line raises
:class:`~tmmail.errors.ConfigError` naming the file and line.  Names (domains, post offices,
mailboxes, logins) compare case-insensitively; they are stored as written.

:class:`ProviderStore` loads the tables at once (raising ConfigError if one is bad) and
re-reads changed files at most once per ``interval`` seconds; a file that became bad is
logged and the last good snapshot stays in use, so a half-edited table never takes a running
server down.  Tables are independent: cross-table references (a domain's post office, an
AUTH entry's mailbox) are checked by the admin command, not here, because it rewrites tables
one at a time while a server may be reading them.

Unknown ``*.tab`` files are loaded too, as raw rows (``Providers.rows(name)``), so later
features (groups, lists) can keep their tables in the same folder with the same rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from twisted.logger import Logger

from tmmail.address import AddressError, InternalAddress, is_mask, normalize_domain
from tmmail.errors import ConfigError
from tmmail.maildir import fsync_dir

__all__ = [
    "Domain",
    "PostOffice",
    "Mailbox",
    "AuthEntry",
    "MapEntry",
    "AccessEntry",
    "BlacklistEntry",
    "SenderEntry",
    "Providers",
    "ProviderStore",
    "TABLES",
    "HEADERS",
    "ip_mask_matches",
    "parse_options",
    "format_options",
    "LOCKED_PASSWORD",
]

log = Logger(namespace="tmmail.providers")

#: AUTH password hash meaning "no password set: nobody can log in"
LOCKED_PASSWORD = "!"

#: file name of every known table
TABLES = {
    "DOMAINS": "DOMAINS.tab",
    "POSTOFFICE": "POSTOFFICE.tab",
    "MAILBOX": "MAILBOX.tab",
    "AUTH": "AUTH.tab",
    "ADDRESS-MAP": "ADDRESS-MAP.tab",
    "SMTP-ACCESS": "SMTP-ACCESS.tab",
    "SMTP-DENY": "SMTP-DENY.tab",
    "SMTP-BLACKLIST": "SMTP-BLACKLIST.tab",
    "SENDERS": "SENDERS.tab",
}

#: the comment header naming the columns, written by ``tmmail init`` and kept by ``write``
HEADERS = {
    "DOMAINS": (
        "# DOMAINS: hosted domains.\n"
        "# DOMAIN\tPOSTOFFICE\tSTATUS(1/0)\tROUTE(host[:port] or empty)\tOPTIONS(k=v,k=v)\n"
    ),
    "POSTOFFICE": (
        "# POSTOFFICE: post offices (accounts holding mailboxes).\n"
        "# POSTOFFICE\tSTATUS(1/0)\tOPTIONS(k=v,k=v; sender_policy=refuse|rewrite)\n"
    ),
    "MAILBOX": (
        "# MAILBOX: mailboxes; Maildir at postoffices/PO/MAILBOX/Maildir.\n"
        "# POSTOFFICE\tMAILBOX\tSTATUS(1/0)\tQUOTA_BYTES(0=none)\tREDIRECT_STATUS(0=off,1=redirect,2=redirect+keep)"
        "\tREDIRECT_ADDRESSES(;-separated)\n"
    ),
    "AUTH": (
        "# AUTH: logins.  PASSWORD_HASH from tmmail.cred ('!' or empty = no login possible).\n"
        "# LOGIN(full address)\tPOSTOFFICE/MAILBOX\tPASSWORD_HASH\tRIGHTS\n"
    ),
    "ADDRESS-MAP": (
        "# ADDRESS-MAP: where mail for an address goes.  SOURCE may be a mask ([SMTP:*@example.com]).\n"
        "# SOURCE([SMTP:address])\tDESTINATION([SF:PO/MBX] [SMTP:addr] [LS:PO/LIST], ;-separated)\tSCOPE\n"
    ),
    "SMTP-ACCESS": (
        "# SMTP-ACCESS: client IPs allowed to relay without authentication.\n"
        "# MASK(CIDR, address or 192.168.*.*)\tSTATUS(1/0)\tCOMMENT\n"
    ),
    "SMTP-DENY": (
        "# SMTP-DENY: client IPs refused at connect.\n"
        "# MASK(CIDR, address or 192.168.*.*)\tSTATUS(1/0)\tCOMMENT\n"
    ),
    "SMTP-BLACKLIST": (
        "# SMTP-BLACKLIST: sender domains refused (per hosted target domain, * = all).\n"
        "# TARGET_DOMAIN(* = all)\tBANNED_DOMAIN\tSTATUS(1/0)\n"
    ),
    "SENDERS": (
        "# SENDERS: addresses a mailbox may send as (besides its own).\n"
        "# POSTOFFICE/MAILBOX\tADDRESS\tPRIMARY(1/0)\n"
    ),
}


def _frozen(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Domain:
    name: str
    postoffice: str
    status: int = 1
    route: str = ""
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def enabled(self) -> bool:
        return self.status == 1


@dataclass(frozen=True)
class PostOffice:
    name: str
    status: int = 1
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def enabled(self) -> bool:
        return self.status == 1


@dataclass(frozen=True)
class Mailbox:
    postoffice: str
    name: str
    status: int = 1
    #: bytes, 0 = no quota
    quota: int = 0
    #: 0 = off, 1 = redirect (do not keep), 2 = redirect and keep a copy
    redirect_status: int = 0
    redirect_addresses: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.status == 1


@dataclass(frozen=True)
class AuthEntry:
    login: str
    postoffice: str
    mailbox: str
    password_hash: str
    rights: str = "USER"

    @property
    def can_login(self) -> bool:
        """False when no password is set."""
        return self.password_hash not in ("", LOCKED_PASSWORD)


@dataclass(frozen=True)
class MapEntry:
    """One ADDRESS-MAP row; ``source`` and ``destination`` in ``[SCHEME:value]`` form."""

    source: str
    destination: str
    scope: str = ""

    @property
    def source_address(self) -> InternalAddress:
        return InternalAddress.parse(self.source)

    @property
    def destinations(self) -> tuple[InternalAddress, ...]:
        """The destination(s); a row may list several, separated by ``;``."""
        return tuple(InternalAddress.parse(d) for d in self.destination.split(";") if d.strip())

    @property
    def is_mask(self) -> bool:
        return is_mask(self.source)


@dataclass(frozen=True)
class AccessEntry:
    mask: str
    status: int = 1
    comment: str = ""

    def matches(self, ip: str) -> bool:
        return self.status == 1 and ip_mask_matches(self.mask, ip)


@dataclass(frozen=True)
class BlacklistEntry:
    target_domain: str
    banned_domain: str
    status: int = 1


@dataclass(frozen=True)
class SenderEntry:
    postoffice: str
    mailbox: str
    address: str
    primary: bool = False


@dataclass(frozen=True)
class Providers:
    """One immutable snapshot of all provider tables."""

    domains: Mapping[str, Domain] = field(default_factory=lambda: MappingProxyType({}))
    postoffices: Mapping[str, PostOffice] = field(default_factory=lambda: MappingProxyType({}))
    mailboxes: Mapping[tuple[str, str], Mailbox] = field(default_factory=lambda: MappingProxyType({}))
    auth: Mapping[str, AuthEntry] = field(default_factory=lambda: MappingProxyType({}))
    address_map: tuple[MapEntry, ...] = ()
    smtp_access: tuple[AccessEntry, ...] = ()
    smtp_deny: tuple[AccessEntry, ...] = ()
    smtp_blacklist: tuple[BlacklistEntry, ...] = ()
    senders: tuple[SenderEntry, ...] = ()
    #: raw rows of every table file, known or not: name (upper-case, no .tab) -> rows
    tables: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=lambda: MappingProxyType({}))
    _exact_map: Mapping[str, tuple[MapEntry, ...]] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    _mask_map: tuple[MapEntry, ...] = field(default=(), repr=False)

    def is_hosted_domain(self, domain: str) -> bool:
        """True if ``domain`` is in DOMAINS.tab and enabled."""
        d = self.domain(domain)
        return d is not None and d.enabled

    def domain(self, domain: str) -> Domain | None:
        key = normalize_domain(domain) or domain.lower()
        return self.domains.get(key)

    def postoffice(self, name: str) -> PostOffice | None:
        return self.postoffices.get(name.upper())

    def mailbox(self, po: str, name: str) -> Mailbox | None:
        return self.mailboxes.get((po.upper(), name.upper()))

    def mailboxes_of(self, po: str) -> tuple[Mailbox, ...]:
        key = po.upper()
        return tuple(m for (p, _), m in self.mailboxes.items() if p == key)

    def auth_entry(self, login: str) -> AuthEntry | None:
        return self.auth.get(login.lower())

    def senders_for(self, po: str, mailbox: str) -> tuple[str, ...]:
        """Extra addresses the mailbox may send as, primary ones first."""
        key = (po.upper(), mailbox.upper())
        rows = [s for s in self.senders if (s.postoffice.upper(), s.mailbox.upper()) == key]
        rows.sort(key=lambda s: not s.primary)
        return tuple(s.address for s in rows)

    def map_exact(self, address: str) -> tuple[MapEntry, ...]:
        """ADDRESS-MAP rows whose source is exactly ``[SMTP:address]`` (case-insensitive)."""
        return self._exact_map.get(address.lower(), ())

    def map_masks(self) -> tuple[MapEntry, ...]:
        """ADDRESS-MAP rows whose source is a mask, in file order."""
        return self._mask_map

    def rows(self, table: str) -> tuple[tuple[str, ...], ...]:
        """Raw rows (comment and blank lines dropped) of ``TABLE.tab``; empty if missing."""
        return self.tables.get(table.upper().removesuffix(".TAB"), ())


# ---------------------------------------------------------------------------------------
# parsing


def _read_rows(path: str) -> list[tuple[int, tuple[str, ...]]]:
    """(line number, fields) for every data line of a table file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError("not valid UTF-8", path, line) from None
    return _rows_from_text(text.removeprefix("\ufeff"))


def _rows_from_text(text: str) -> list[tuple[int, tuple[str, ...]]]:
    """(line number, fields) for every data line: comments and blank lines dropped, fields
    stripped, trailing empty fields removed."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = tuple(f.strip() for f in line.split("\t"))
        while fields and fields[-1] == "":
            fields = fields[:-1]
        rows.append((n, fields))
    return rows


class _Row:
    """Field access with file:line errors."""

    def __init__(self, path: str, line: int, fields: tuple[str, ...], names: Sequence[str], required: int):
        self.path, self.line, self.fields, self.names = path, line, fields, names
        if len(fields) > len(names):
            self.error(f"{len(fields)} columns, expected at most {len(names)} (tab-separated: {' '.join(names)})")
        if len(fields) < required:
            self.error(f"{len(fields)} columns, expected at least {required} (tab-separated: {' '.join(names)})")

    def error(self, message: str) -> None:
        raise ConfigError(message, self.path, self.line)

    def get(self, i: int, default: str = "") -> str:
        return self.fields[i] if i < len(self.fields) and self.fields[i] != "" else default

    def required(self, i: int) -> str:
        value = self.get(i)
        if not value:
            self.error(f"{self.names[i]} is empty")
        return value

    def integer(self, i: int, default: int, allowed: Iterable[int] | None = None) -> int:
        text = self.get(i, str(default))
        if not re.fullmatch(r"\d+", text):
            self.error(f"{self.names[i]} must be a number, not {text!r}")
        value = int(text)
        if allowed is not None and value not in allowed:
            self.error(f"{self.names[i]} must be one of {', '.join(map(str, allowed))}, not {value}")
        return value

    def name(self, i: int) -> str:
        """A post office or mailbox name: it becomes a folder name, so no ``/`` or leading dot."""
        value = self.required(i)
        if not NAME_RE.fullmatch(value) or len(value.encode("utf-8")) > 64:
            self.error(f"{self.names[i]} {value!r} is not a valid name (letters, digits, . _ + - and the like)")
        return value

    def options(self, i: int) -> Mapping[str, str]:
        try:
            return parse_options(self.get(i))
        except ValueError as e:
            self.error(f"{self.names[i]}: {e}")
            raise  # pragma: no cover - error() raises

    def internal(self, i: int) -> str:
        text = self.required(i)
        parts = [p.strip() for p in text.split(";") if p.strip()]
        try:
            return ";".join(str(InternalAddress.parse(p)) for p in parts)
        except AddressError as e:
            self.error(f"{self.names[i]}: {e}")
            raise  # pragma: no cover


def parse_options(text: str) -> Mapping[str, str]:
    """``k=v,k=v`` -> read-only mapping (keys lower-case); raises ValueError."""
    result: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_\-]*", key):
            raise ValueError(f"option {item!r} is not key=value")
        result[key] = value.strip()
    return MappingProxyType(result)


def format_options(options: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


def _check_route(row: _Row, i: int) -> str:
    route = row.get(i)
    if route:
        host, _, port = route.rpartition(":") if not route.endswith("]") else (route, "", "")
        if not host:
            host, port = route, ""
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            row.error(f"ROUTE port {port!r} is not a port number")
        if normalize_domain(host) is None:
            row.error(f"ROUTE host {host!r} is not a host name or [address]")
    return route


def ip_mask_matches(mask: str, ip: str) -> bool:
    """Does client address ``ip`` match ``mask`` (CIDR ``10.0.0.0/8``, an address, or
    MailEnable's wildcard form ``192.168.*.*``)?  IPv4-mapped IPv6 addresses match IPv4 masks."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    mask = mask.strip()
    if "*" in mask or "?" in mask:
        pattern = re.escape(mask.lower()).replace(r"\*", "[0-9a-f]*").replace(r"\?", "[0-9a-f]")
        return re.fullmatch(pattern, str(addr)) is not None
    try:
        net = ipaddress.ip_network(mask, strict=False)
    except ValueError:
        return False
    return addr.version == net.version and addr in net


def _check_ip_mask(row: _Row, i: int) -> str:
    mask = row.required(i)
    if "*" in mask or "?" in mask:
        if not re.fullmatch(r"[0-9A-Fa-f:.*?]+", mask):
            row.error(f"MASK {mask!r} is not an IP mask")
        return mask
    try:
        ipaddress.ip_network(mask, strict=False)
    except ValueError:
        row.error(f"MASK {mask!r} is not an IP address or CIDR network")
    return mask


def _domain(row: _Row, i: int, allow_star: bool = False, allow_mask: bool = False) -> str:
    text = row.required(i)
    if allow_star and text == "*":
        return "*"
    if allow_mask and is_mask(text):
        return text.lower()
    domain = normalize_domain(text)
    if domain is None or domain.startswith("["):
        row.error(f"{row.names[i]} {text!r} is not a domain name")
    return domain  # type: ignore[return-value]


def _po_mailbox(row: _Row, i: int) -> tuple[str, str]:
    text = row.required(i)
    po, sep, mbx = text.partition("/")
    if not sep or not po.strip() or not mbx.strip() or "/" in mbx:
        row.error(f"{row.names[i]} {text!r} must be POSTOFFICE/MAILBOX")
    return po.strip(), mbx.strip()


def _dup(row: _Row, seen: dict[Any, int], key: Any, what: str) -> None:
    if key in seen:
        row.error(f"duplicate {what} (first on line {seen[key]})")
    seen[key] = row.line


_STATUS = (0, 1)

#: post office / mailbox names: an RFC 5322 atom-ish text that is a safe folder name
NAME_RE = re.compile(r"[A-Za-z0-9_\u0080-\U0010ffff][A-Za-z0-9._+\-=!#$%&'^`{|}~\u0080-\U0010ffff]*")


def _parse_table(table: str, path: str, rows: list[tuple[int, tuple[str, ...]]]) -> Any:
    """Parse one known table into its typed value (dict or tuple)."""
    if table == "DOMAINS":
        names = ("DOMAIN", "POSTOFFICE", "STATUS", "ROUTE", "OPTIONS")
        out: dict[Any, Any] = {}
        seen: dict[Any, int] = {}
        for n, fields in rows:
            r = _Row(path, n, fields, names, 2)
            name = _domain(r, 0)
            _dup(r, seen, name, f"domain {name}")
            out[name] = Domain(name, r.name(1), r.integer(2, 1, _STATUS), _check_route(r, 3), r.options(4))
        return _frozen(out)
    if table == "POSTOFFICE":
        names = ("POSTOFFICE", "STATUS", "OPTIONS")
        out, seen = {}, {}
        for n, fields in rows:
            r = _Row(path, n, fields, names, 1)
            name = r.name(0)
            _dup(r, seen, name.upper(), f"post office {name}")
            out[name.upper()] = PostOffice(name, r.integer(1, 1, _STATUS), r.options(2))
        return _frozen(out)
    if table == "MAILBOX":
        names = ("POSTOFFICE", "MAILBOX", "STATUS", "QUOTA_BYTES", "REDIRECT_STATUS", "REDIRECT_ADDRESSES")
        out, seen = {}, {}
        for n, fields in rows:
            r = _Row(path, n, fields, names, 2)
            po, mbx = r.name(0), r.name(1)
            key = (po.upper(), mbx.upper())
            _dup(r, seen, key, f"mailbox {po}/{mbx}")
            redirects = tuple(a.strip() for a in r.get(5).split(";") if a.strip())
            for a in redirects:
                try:
                    if a.startswith("["):
                        InternalAddress.parse(a)
                    else:
                        InternalAddress.smtp(a)
                except AddressError as e:
                    r.error(f"REDIRECT_ADDRESSES: {e}")
            out[key] = Mailbox(po, mbx, r.integer(2, 1, _STATUS), r.integer(3, 0), r.integer(4, 0, (0, 1, 2)), redirects)
        return _frozen(out)
    if table == "AUTH":
        names = ("LOGIN", "POSTOFFICE/MAILBOX", "PASSWORD_HASH", "RIGHTS")
        out, seen = {}, {}
        for n, fields in rows:
            r = _Row(path, n, fields, names, 2)
            login = r.required(0)
            if any(c.isspace() for c in login):
                r.error(f"LOGIN {login!r} contains white space")
            _dup(r, seen, login.lower(), f"login {login}")
            po, mbx = _po_mailbox(r, 1)
            hashed = r.get(2, LOCKED_PASSWORD)
            if hashed != LOCKED_PASSWORD:
                from tmmail.cred import is_password_hash  # cred imports this module

                if not is_password_hash(hashed):
                    # never echo the field: it may be a password in clear
                    r.error("PASSWORD_HASH is not a password hash (set passwords with "
                            "`tmmail mailbox passwd ADDRESS --password-stdin`; '!' or empty = no login)")
            out[login.lower()] = AuthEntry(login, po, mbx, hashed, r.get(3, "USER"))
        return _frozen(out)
    if table == "ADDRESS-MAP":
        names = ("SOURCE", "DESTINATION", "SCOPE")
        entries = []
        seen = {}
        for n, fields in rows:
            r = _Row(path, n, fields, names, 2)
            source = r.internal(0)
            if ";" in source:
                r.error("SOURCE must be a single address")
            _dup(r, seen, source.lower(), f"source {source}")
            entries.append(MapEntry(source, r.internal(1), r.get(2)))
        return tuple(entries)
    if table in ("SMTP-ACCESS", "SMTP-DENY"):
        names = ("MASK", "STATUS", "COMMENT")
        return tuple(
            AccessEntry(_check_ip_mask(r, 0), r.integer(1, 1, _STATUS), r.get(2))
            for r in (_Row(path, n, f, names, 1) for n, f in rows)
        )
    if table == "SMTP-BLACKLIST":
        names = ("TARGET_DOMAIN", "BANNED_DOMAIN", "STATUS")
        return tuple(
            BlacklistEntry(_domain(r, 0, allow_star=True), _domain(r, 1, allow_mask=True), r.integer(2, 1, _STATUS))
            for r in (_Row(path, n, f, names, 2) for n, f in rows)
        )
    if table == "SENDERS":
        names = ("POSTOFFICE/MAILBOX", "ADDRESS", "PRIMARY")
        entries = []
        seen = {}
        for n, fields in rows:
            r = _Row(path, n, fields, names, 2)
            po, mbx = _po_mailbox(r, 0)
            try:
                address = str(InternalAddress.smtp(r.required(1)).value)
            except AddressError as e:
                r.error(f"ADDRESS: {e}")
            _dup(r, seen, (po.upper(), mbx.upper(), address.lower()), f"sender {address} for {po}/{mbx}")
            entries.append(SenderEntry(po, mbx, address, r.integer(2, 0, _STATUS) == 1))
        return tuple(entries)
    raise KeyError(table)  # pragma: no cover


_FIELD_NAMES = {
    "DOMAINS": "domains",
    "POSTOFFICE": "postoffices",
    "MAILBOX": "mailboxes",
    "AUTH": "auth",
    "ADDRESS-MAP": "address_map",
    "SMTP-ACCESS": "smtp_access",
    "SMTP-DENY": "smtp_deny",
    "SMTP-BLACKLIST": "smtp_blacklist",
    "SENDERS": "senders",
}


def _table_name(filename: str) -> str | None:
    if filename.lower().endswith(".tab") and not filename.startswith("."):
        return filename[:-4].upper()
    return None


def load_providers(config_dir: str) -> Providers:
    """Parse every table in ``config_dir`` into a snapshot; raises ConfigError."""
    return _Loader(config_dir).load()[0]


_Sig = tuple[int, int, int]


def _index_map(entries: tuple[MapEntry, ...]) -> tuple[Mapping[str, tuple[MapEntry, ...]], tuple[MapEntry, ...]]:
    """Exact-source index (lower-case address -> rows) and the mask rows, in file order."""
    exact: dict[str, list[MapEntry]] = {}
    masks = []
    for entry in entries:
        if entry.is_mask:
            masks.append(entry)
        else:
            addr = entry.source_address
            key = addr.value.lower() if addr.scheme == "SMTP" else str(addr).lower()
            exact.setdefault(key, []).append(entry)
    return MappingProxyType({k: tuple(v) for k, v in exact.items()}), tuple(masks)


class _Loader:
    """Parses table files, reusing the parse of files whose stat signature did not change."""

    def __init__(self, config_dir: str) -> None:
        self.config_dir = config_dir
        self.cache: dict[str, tuple[_Sig, Any, tuple[tuple[str, ...], ...]]] = {}
        #: (the address_map tuple it was built from, exact index, masks): rebuilt only when
        #: ADDRESS-MAP itself changed
        self._map_index: tuple[Any, Mapping[str, tuple[MapEntry, ...]], tuple[MapEntry, ...]] | None = None

    def signatures(self) -> dict[str, _Sig | None]:
        names: set[str] = set(TABLES.values())
        try:
            names.update(f for f in os.listdir(self.config_dir) if _table_name(f))
        except FileNotFoundError:
            raise ConfigError("configuration folder not found", self.config_dir) from None
        sigs: dict[str, _Sig | None] = {}
        for fname in sorted(names):
            try:
                st = os.stat(os.path.join(self.config_dir, fname))
            except FileNotFoundError:
                sigs[fname] = None
                continue
            sigs[fname] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return sigs

    def load(self, sigs: dict[str, _Sig | None] | None = None) -> tuple[Providers, dict[str, _Sig | None]]:
        if sigs is None:
            sigs = self.signatures()
        values: dict[str, Any] = {}
        raw: dict[str, tuple[tuple[str, ...], ...]] = {}
        new_cache = {}
        for fname, sig in sigs.items():
            table = _table_name(fname)
            assert table is not None
            if sig is None:
                continue
            cached = self.cache.get(fname)
            if cached is not None and cached[0] == sig:
                parsed, rows = cached[1], cached[2]
            else:
                path = os.path.join(self.config_dir, fname)
                numbered = _read_rows(path)
                rows = tuple(f for _, f in numbered)
                parsed = _parse_table(table, path, numbered) if table in _FIELD_NAMES else None
            new_cache[fname] = (sig, parsed, rows)
            raw[table] = rows
            if table in _FIELD_NAMES:
                values[_FIELD_NAMES[table]] = parsed
        self.cache = new_cache
        address_map: tuple[MapEntry, ...] = values.get("address_map", ())
        if self._map_index is None or self._map_index[0] is not address_map:
            self._map_index = (address_map, *_index_map(address_map))
        snap = Providers(
            **values,
            tables=MappingProxyType(raw),
            _exact_map=self._map_index[1],
            _mask_map=self._map_index[2],
        )
        return snap, sigs


class ProviderStore:
    """The current provider snapshot, reloaded when table files change.

    ``ProviderStore(config_dir)`` parses everything at once and raises ConfigError if a table
    is bad.  ``current()`` is cheap: it stats the files at most once per ``interval`` seconds
    (``clock`` is a monotonic seconds function, injectable for tests) and re-parses only
    changed files.  Safe to call from several threads.
    """

    def __init__(self, config_dir: str, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.config_dir = os.path.abspath(config_dir)
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._loader = _Loader(self.config_dir)
        self._snapshot, self._sigs = self._loader.load()
        self._checked = clock()
        #: the last reload error (None if the files are good), for status displays
        self.last_error: ConfigError | None = None

    def current(self) -> Providers:
        """The newest good snapshot (re-reads changed files if ``interval`` has passed)."""
        now = self._clock()
        if now - self._checked < self.interval:
            return self._snapshot
        with self._lock:
            if now - self._checked >= self.interval:
                self._checked = now
                self._refresh()
        return self._snapshot

    def check(self) -> Providers:
        """Check the files now, like ``current()`` without the interval; never raises.

        For big tables (tens of thousands of rows take a few hundred ms to parse) a server can
        construct the store with ``interval=math.inf`` and call ``check`` from a thread on a
        timer, so parsing never runs on the reactor thread.
        """
        with self._lock:
            self._checked = self._clock()
            self._refresh()
        return self._snapshot

    def reload(self) -> Providers:
        """Check the files now; raises ConfigError if a changed table is bad."""
        with self._lock:
            self._checked = self._clock()
            error = self._refresh()
        if error is not None:
            raise error
        return self._snapshot

    def _refresh(self) -> ConfigError | None:
        try:
            sigs = self._loader.signatures()
            if sigs == self._sigs:
                return None
            snapshot, sigs = self._loader.load(sigs)
        except ConfigError as e:
            if self.last_error is None or str(self.last_error) != str(e):
                log.error("provider tables not reloaded, keeping the previous ones: {error}", error=str(e))
            self.last_error = e
            return e
        self._snapshot, self._sigs = snapshot, sigs
        if self.last_error is not None:
            log.info("provider tables are valid again")
        self.last_error = None
        log.info("provider tables reloaded from {config_dir}", config_dir=self.config_dir)
        return None

    def path(self, table: str) -> str:
        """The file of ``table`` (``"MAILBOX"`` or ``"MAILBOX.tab"``)."""
        name = table.upper().removesuffix(".TAB")
        return os.path.join(self.config_dir, TABLES.get(name, name + ".tab"))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock for a read-modify-write of the tables by the admin command."""
        os.makedirs(self.config_dir, exist_ok=True)
        fd = os.open(os.path.join(self.config_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write(self, table: str, rows: Iterable[Sequence[str]]) -> None:
        """Rewrite ``table`` atomically with ``rows`` (BLOCKING: tmp, fsync, rename, fsync dir).

        The file's leading ``#`` comment header is kept (or the standard one written).  The
        rows are validated first; a bad row raises ConfigError and leaves the file alone.
        The next ``current()`` sees the change without waiting for ``interval``.
        """
        name = table.upper().removesuffix(".TAB")
        path = self.path(name)
        lines = []
        for row in rows:
            fields = ["" if f is None else str(f) for f in row]
            for f in fields:
                if any(c in f for c in "\t\r\n"):
                    raise ConfigError(f"field {f!r} contains a tab or line break", path)
            while fields and fields[-1] == "":
                fields.pop()
            lines.append("\t".join(fields) + "\n")
        header = _existing_header(path)
        if header is None:
            header = HEADERS.get(name, "")
        text = header + "".join(lines)
        if name in _FIELD_NAMES:  # validate before replacing the good file
            _parse_table(name, path, _rows_from_text(text))
        atomic_write(path, text.encode("utf-8"))
        with self._lock:
            self._checked = float("-inf")
        self.current()


def _existing_header(path: str) -> str | None:
    """The leading comment lines of an existing table file, or None if there is none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = []
            for line in f:
                if line.lstrip().startswith("#"):
                    header.append(line if line.endswith("\n") else line + "\n")
                else:
                    break
    except FileNotFoundError:
        return None
    return "".join(header) if header else None


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` durably (BLOCKING): tmp + fsync + rename + fsync dir."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)

"""``tmmail``: the admin command (init, post offices, domains, mailboxes, aliases, senders).

It edits the provider tables a running server reads (the ProviderStore notices the new files,
so no restart is needed).  Every change validates all input first and then rewrites the
affected tables atomically under a lock, so bad input changes nothing: it gets a one-line
error on stderr and exit status 2.  ``list`` subcommands print one entry per line, its key
first, fields separated by tabs (easy to ``cut``/``grep``).

Extending it
------------
Other modules add subcommands without editing this file.  For each name in
:data:`OPTIONAL_MODULES` (``tmmail.cli_queue``, ``tmmail.cli_badmail``, ``tmmail.cli_group``,
``tmmail.cli_list``) that exists, ``main`` imports it and calls its ``register(subparsers)``
with the top-level ``argparse`` subparsers object.  Each subcommand parser must
``set_defaults(func=handler)`` where ``handler(args, ctx) -> int`` returns the exit status.
``ctx`` is a :class:`Context`:

- ``ctx.settings``: the loaded :class:`tmmail.config.Settings` (loaded on first use);
- ``ctx.store``: a :class:`tmmail.providers.ProviderStore` over ``settings.config_dir``
  (``ctx.store.reload()`` for a fresh snapshot, ``ctx.store.write(table, rows)`` to save,
  ``with ctx.store.locked():`` around read-modify-write);
- ``ctx.out(*fields)``: print one tab-separated line; ``ctx.stdin``/``ctx.stdout``/``ctx.stderr``;
- ``raise CLIError("message")`` (or ``ctx.fail("message")``) for a one-line error and status 2.

A module that is missing is skipped; an ImportError inside an existing module is not hidden.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from tmmail import config, policy
from tmmail.address import AddressError, InternalAddress, is_mask, normalize_domain, parse_address
from tmmail.errors import ConfigError
from tmmail.providers import (
    LOCKED_PASSWORD,
    AuthEntry,
    NAME_RE,
    Mailbox,
    ProviderStore,
    Providers,
    format_options,
)

__all__ = ["main", "Context", "CLIError", "OPTIONAL_MODULES", "parse_size", "build_parser"]

#: modules that may add subcommands (see the module docstring)
OPTIONAL_MODULES = ("tmmail.cli_queue", "tmmail.cli_badmail", "tmmail.cli_group", "tmmail.cli_list")

EXIT_USAGE = 2

#: the mailbox ``tmmail init --domain`` creates, and the alias ``domain add`` gives new domains
POSTMASTER = "postmaster"


class CLIError(Exception):
    """Bad input: printed as one line on stderr, exit status 2, nothing changed."""


class Context:
    """What a subcommand handler gets besides its arguments (see the module docstring)."""

    def __init__(self, config_path: str, stdin: IO[str], stdout: IO[str], stderr: IO[str]) -> None:
        self.config_path = config_path
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self._settings: config.Settings | None = None
        self._store: ProviderStore | None = None

    @property
    def settings(self) -> config.Settings:
        if self._settings is None:
            try:
                self._settings = config.load(self.config_path)
            except ConfigError as e:
                hint = " (run `tmmail init DIR` or pass --config FILE)" if not os.path.exists(self.config_path) else ""
                raise CLIError(f"{e}{hint}") from None
        return self._settings

    @property
    def store(self) -> ProviderStore:
        if self._store is None:
            self._store = ProviderStore(self.settings.config_dir, interval=0.0)
        return self._store

    def out(self, *fields: Any) -> None:
        self.stdout.write("\t".join(str(f) for f in fields) + "\n")

    def out_trimmed(self, *fields: Any) -> None:
        """``out`` without trailing empty fields: columns keep their positions, but a line
        does not end in tabs nobody can see (``domain list`` without route or options)."""
        texts = [str(f) for f in fields]
        while texts and texts[-1] == "":
            texts.pop()
        self.out(*texts)

    def fail(self, message: str) -> NoReturn:
        raise CLIError(message)


# ---------------------------------------------------------------------------------------
# input helpers

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """``"2G"`` -> 2147483648; bytes or K/M/G/T (binary) suffixes; raises CLIError."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise CLIError(f"bad size {text!r} (use bytes or a K/M/G suffix, e.g. 500M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _address(text: str) -> Any:
    try:
        return parse_address(text.strip())
    except AddressError as e:
        raise CLIError(f"malformed address {text!r}: {e}") from None


def _read_password(ctx: Context) -> str:
    line = ctx.stdin.readline()
    password = line.rstrip("\r\n")
    if not password:
        raise CLIError("no password on stdin (expected one line)")
    return password


def _hash(password: str) -> str:
    from tmmail.cred import hash_password  # scrypt: only when needed

    return hash_password(password)


def _postoffice_of_domain(snap: Providers, domain: str) -> str:
    d = snap.domain(domain)
    if d is None:
        raise CLIError(f"domain {domain} is not hosted here (tmmail domain add {domain} --postoffice PO)")
    po = snap.postoffice(d.postoffice)
    if po is None:
        raise CLIError(f"domain {domain} belongs to post office {d.postoffice}, which does not exist")
    return po.name


def _rows(snap: Providers, table: str) -> list[tuple[str, ...]]:
    return list(snap.rows(table))


def _find_mailbox(snap: Providers, text: str) -> tuple[Any, Mailbox]:
    """The mailbox whose own address ``text`` is: its AUTH login, else the mailbox named like
    the local part in the domain's post office.  Aliases do not count, so ``mailbox remove
    sales@...`` cannot remove the mailbox an alias happens to point at."""
    address = _address(text)
    entry = snap.auth_entry(address.key)
    if entry is not None:
        mbx = snap.mailbox(entry.postoffice, entry.mailbox)
        if mbx is not None:
            return address, mbx
    domain = snap.domain(address.domain)
    if domain is not None:
        mbx = snap.mailbox(domain.postoffice, address.local)
        if mbx is not None:
            return address, mbx
    raise CLIError(f"no mailbox {address} (aliases are removed with: tmmail alias remove)")


def _sf(mbx: Mailbox) -> str:
    return f"[SF:{mbx.postoffice}/{mbx.name}]"


def _is_sf_of(text: str, mbx: Mailbox) -> bool:
    """Is ``text`` the internal address ``[SF:PO/MAILBOX]`` of ``mbx`` (any case)?"""
    try:
        dest = InternalAddress.parse(text)
    except AddressError:
        return False
    return dest.scheme == "SF" and dest.value.upper() == f"{mbx.postoffice}/{mbx.name}".upper()


# ---------------------------------------------------------------------------------------
# init


DEFAULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "defaults")
#: the spool folders (tmmail.spool creates them too; init makes the tree complete at once)
SPOOL_DIRS = ("tmp", "incoming", "active", "deferred", "badmail", "corrupt")


def render_settings(hostname: str) -> str:
    """The ``tmmail.toml`` that ``tmmail init`` writes for ``hostname``."""
    with open(os.path.join(DEFAULTS_DIR, "tmmail.toml"), encoding="utf-8") as f:
        return f.read().replace("@HOSTNAME@", hostname)


def default_tables() -> dict[str, str]:
    """File name -> contents of the provider tables ``tmmail init`` writes (headers only)."""
    folder = os.path.join(DEFAULTS_DIR, "config")
    tables = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tab"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                tables[name] = f.read()
    return tables


def postoffice_for_domain(domain: str) -> str:
    """``example.com`` -> ``EXAMPLE``: the post office ``init --domain`` creates."""
    return domain.split(".", 1)[0].upper()


def init_config(directory: str, hostname: str = "localhost", domain: str | None = None) -> str:
    """Write a complete configuration into ``directory``; returns a summary (BLOCKING).

    Refuses (CLIError) if ``directory`` already has a ``tmmail.toml`` or provider tables.
    ``tmmail.toml`` is written last, so its presence means the rest is complete.
    """
    from tmmail.providers import atomic_write
    from tmmail.tlsutil import generate_self_signed

    host = normalize_domain(hostname.strip()) if hostname else None
    if host is None or host.startswith("["):
        raise CLIError(f"malformed host name {hostname!r}")
    po_name = None
    if domain is not None:
        domain = _domain_arg(domain)
        po_name = postoffice_for_domain(domain)
        if not NAME_RE.fullmatch(po_name):
            raise CLIError(f"cannot name a post office after {domain}")
    directory = os.path.abspath(directory)
    toml_path = os.path.join(directory, "tmmail.toml")
    config_dir = os.path.join(directory, "config")
    if os.path.exists(toml_path):
        raise CLIError(f"{toml_path} already exists; refusing to overwrite a configuration")
    if os.path.isdir(config_dir) and any(n.lower().endswith(".tab") for n in os.listdir(config_dir)):
        raise CLIError(f"{config_dir} already has provider tables; refusing to overwrite a configuration")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CLIError(f"{directory} exists and is not a folder")

    os.makedirs(config_dir, exist_ok=True)
    for sub in SPOOL_DIRS:
        os.makedirs(os.path.join(directory, "spool", sub), exist_ok=True)
    os.makedirs(os.path.join(directory, "postoffices"), exist_ok=True)
    for name, text in default_tables().items():
        atomic_write(os.path.join(config_dir, name), text.encode("utf-8"))
    if domain is not None and po_name is not None:
        store = ProviderStore(config_dir, interval=0.0)
        store.write("POSTOFFICE", [(po_name, "1")])
        store.write("DOMAINS", [(domain, po_name, "1")])
        os.makedirs(os.path.join(directory, "postoffices", po_name), exist_ok=True)
        # RFC 5321 §4.5.1: postmaster@ every domain (and <Postmaster>) must reach someone
        _add_mailbox(store, store.reload(), os.path.join(directory, "postoffices"),
                     parse_address(f"{POSTMASTER}@{domain}"))
    tls_dir = os.path.join(directory, "tls")
    generate_self_signed(host, os.path.join(tls_dir, "server.crt"), os.path.join(tls_dir, "server.key"))
    atomic_write(toml_path, render_settings(host).encode("utf-8"))
    summary = [f"wrote a new configuration to {directory}", f"  settings:    {toml_path}",
               f"  tables:      {config_dir}", f"  certificate: {os.path.join(tls_dir, 'server.crt')} (self-signed for {host})"]
    if domain is not None:
        summary.append(f"  domain {domain} in post office {po_name}; add mailboxes with:")
        summary.append(f"    tmmail --config {toml_path} mailbox add USER@{domain} --password-stdin")
        summary.append(f"  mailbox {POSTMASTER}@{domain} gets mail for the postmaster and reports; to read it:")
        summary.append(f"    tmmail --config {toml_path} mailbox passwd {POSTMASTER}@{domain} --password-stdin")
    return "\n".join(summary) + "\n"


def cmd_init(args: argparse.Namespace, ctx: Context) -> int:
    ctx.stdout.write(init_config(args.dir, hostname=args.hostname, domain=args.domain))
    return 0


# ---------------------------------------------------------------------------------------
# post offices


def cmd_postoffice_add(args: argparse.Namespace, ctx: Context) -> int:
    name = args.name.strip()
    if not NAME_RE.fullmatch(name) or len(name.encode()) > 64:
        raise CLIError(f"bad post office name {name!r} (letters, digits, . _ + -)")
    with ctx.store.locked():
        snap = ctx.store.reload()
        if snap.postoffice(name) is not None:
            raise CLIError(f"post office {snap.postoffice(name).name} already exists")  # type: ignore[union-attr]
        ctx.store.write("POSTOFFICE", _rows(snap, "POSTOFFICE") + [(name, "1")])
        os.makedirs(os.path.join(ctx.settings.postoffices_dir, name), exist_ok=True)
    ctx.stdout.write(f"added post office {name}\n")
    return 0


def cmd_postoffice_remove(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.store.locked():
        snap = ctx.store.reload()
        po = snap.postoffice(args.name)
        if po is None:
            raise CLIError(f"no post office {args.name}")
        domains = [d.name for d in snap.domains.values() if d.postoffice.upper() == po.name.upper()]
        if domains:
            raise CLIError(f"post office {po.name} still has domains: {', '.join(sorted(domains))}")
        mailboxes = snap.mailboxes_of(po.name)
        if mailboxes:
            raise CLIError(f"post office {po.name} still has {len(mailboxes)} mailbox(es); remove them first")
        rows = [r for r in _rows(snap, "POSTOFFICE") if r[0].upper() != po.name.upper()]
        ctx.store.write("POSTOFFICE", rows)
    ctx.stdout.write(f"removed post office {po.name} (its folder under postoffices/ was kept)\n")
    return 0


def cmd_postoffice_list(args: argparse.Namespace, ctx: Context) -> int:
    snap = ctx.store.reload()
    for po in sorted(snap.postoffices.values(), key=lambda p: p.name.upper()):
        domains = sorted(d.name for d in snap.domains.values() if d.postoffice.upper() == po.name.upper())
        ctx.out_trimmed(
            po.name,
            "enabled" if po.enabled else "disabled",
            f"mailboxes={len(snap.mailboxes_of(po.name))}",
            "domains=" + ",".join(domains),
            format_options(po.options),
        )
    return 0


# ---------------------------------------------------------------------------------------
# domains


def _domain_arg(text: str) -> str:
    domain = normalize_domain(text.strip())
    if domain is None or domain.startswith("["):
        raise CLIError(f"malformed domain {text!r}")
    return domain


def cmd_domain_add(args: argparse.Namespace, ctx: Context) -> int:
    domain = _domain_arg(args.domain)
    with ctx.store.locked():
        snap = ctx.store.reload()
        po = snap.postoffice(args.postoffice)
        if po is None:
            raise CLIError(f"no post office {args.postoffice} (tmmail postoffice add {args.postoffice})")
        existing = snap.domain(domain)
        if existing is not None:
            raise CLIError(f"domain {domain} already exists (post office {existing.postoffice})")
        primary = policy.postmaster_address(snap, ctx.settings.server.hostname, ctx.settings.queue.postmaster)
        primary_is_local = _resolves_locally(snap, primary)
        ctx.store.write("DOMAINS", _rows(snap, "DOMAINS") + [(domain, po.name, "1")])
        postmaster = _give_postmaster(ctx, ctx.store.reload(), domain, primary if primary_is_local else None)
    ctx.stdout.write(f"added domain {domain} to post office {po.name}{postmaster}\n")
    return 0


def _resolves_locally(snap: Providers, address: str) -> bool:
    from tmmail.router import resolve

    return resolve(snap, address).kind == "local"


def _give_postmaster(ctx: Context, snap: Providers, domain: str, primary: str | None) -> str:
    """RFC 5321 §4.5.1: ``postmaster@domain`` must be accepted.  Unless it already resolves
    (a mask, say), it becomes an alias of the server's postmaster (``primary``, an address
    that resolves here), so one person gets every domain's postmaster mail; with no such
    postmaster yet it gets its own mailbox, as ``tmmail init --domain`` creates.  Returns a
    note for the command's output."""
    address = parse_address(f"{POSTMASTER}@{domain}")
    if _resolves_locally(snap, str(address)):
        return ""
    if primary is not None:
        dest = str(InternalAddress.smtp(primary))
        ctx.store.write("ADDRESS-MAP", _rows(snap, "ADDRESS-MAP") + [(str(InternalAddress.smtp(address)), dest, "0")])
        return f"; {address} is an alias of {primary}"
    existing = snap.mailbox(snap.domain(domain).postoffice, POSTMASTER)  # type: ignore[union-attr]
    if existing is not None:
        ctx.store.write("ADDRESS-MAP", _rows(snap, "ADDRESS-MAP") + [(str(InternalAddress.smtp(address)), _sf(existing), "0")])
        return f"; {address} goes to mailbox {existing.postoffice}/{existing.name}"
    po = _add_mailbox(ctx.store, snap, ctx.settings.postoffices_dir, address)
    return f"; created mailbox {address} ({po}/{POSTMASTER}, no password yet)"


def _in_domain(source: str, domain: str) -> bool:
    """Is the ADDRESS-MAP source ``[SMTP:x@domain]`` / ``[SMTP:*@domain]`` of ``domain``?
    Masks over several domains (``*``, ``*@*.example``) are not any one domain's."""
    try:
        src = InternalAddress.parse(source)
    except AddressError:
        return False
    if src.scheme != "SMTP":
        return False
    part = src.value.rpartition("@")[2]
    return bool(part) and not is_mask(part) and normalize_domain(part) == domain


def cmd_domain_remove(args: argparse.Namespace, ctx: Context) -> int:
    """Refuse while mailboxes have their login in the domain (their mail and passwords would
    be stranded: say how many, and how to remove them); otherwise remove the domain and the
    aliases whose source is in it, which would otherwise linger in `alias list`, pointing
    nowhere, and come back to life if the domain were added again."""
    domain = _domain_arg(args.domain)
    with ctx.store.locked():
        snap = ctx.store.reload()
        if snap.domain(domain) is None:
            raise CLIError(f"no domain {domain}")
        logins = sorted(a.login for a in snap.auth.values()
                        if a.login.rpartition("@")[2].lower() == domain and snap.mailbox(a.postoffice, a.mailbox))
        if logins:
            raise CLIError(f"domain {domain} still has {len(logins)} mailbox(es) ({', '.join(logins[:3])}"
                           f"{', ...' if len(logins) > 3 else ''}); remove them first: tmmail mailbox remove ADDRESS")
        aliases = [r for r in _rows(snap, "ADDRESS-MAP") if _in_domain(r[0], domain)]
        rows = [r for r in _rows(snap, "DOMAINS") if normalize_domain(r[0]) != domain]
        ctx.store.write("ADDRESS-MAP", [r for r in _rows(snap, "ADDRESS-MAP") if not _in_domain(r[0], domain)])
        ctx.store.write("DOMAINS", rows)
    ctx.stdout.write(f"removed domain {domain} and its {len(aliases)} alias(es); mail for it is no longer accepted\n")
    return 0


def cmd_domain_list(args: argparse.Namespace, ctx: Context) -> int:
    snap = ctx.store.reload()
    for d in sorted(snap.domains.values(), key=lambda d: d.name):
        ctx.out_trimmed(d.name, d.postoffice, "enabled" if d.enabled else "disabled", d.route, format_options(d.options))
    return 0


# ---------------------------------------------------------------------------------------
# mailboxes


def _add_mailbox(store: ProviderStore, snap: Providers, postoffices_dir: str, address: Any,
                 hashed: str = LOCKED_PASSWORD, quota: int = 0) -> str:
    """Create the mailbox named after ``address``'s local part in its domain's post office:
    Maildir, MAILBOX row, AUTH login, address map entry.  Returns the post office name.
    The caller holds ``store.locked()``; ``snap`` is its fresh snapshot."""
    from tmmail import maildir

    name = address.local
    if not NAME_RE.fullmatch(name) or len(name.encode()) > 64:
        raise CLIError(f"local part {name!r} cannot be a mailbox name (letters, digits, . _ + - and the like)")
    po = _postoffice_of_domain(snap, address.domain)
    existing = snap.mailbox(po, name)
    if existing is not None:
        raise CLIError(f"mailbox {existing.name} already exists in post office {po}")
    if snap.auth_entry(address.key) is not None:
        raise CLIError(f"login {address.key} already exists")
    if snap.map_exact(str(address)):
        raise CLIError(f"{address} is already in the address map (tmmail alias list)")
    maildir.create(maildir.mailbox_path(postoffices_dir, po, name))
    mbx = Mailbox(po, name, 1, quota)
    store.write("MAILBOX", _rows(snap, "MAILBOX") + [(po, name, "1", str(quota), "0")])
    store.write("AUTH", _rows(snap, "AUTH") + [(address.key, f"{po}/{name}", hashed, "USER")])
    store.write("ADDRESS-MAP", _rows(snap, "ADDRESS-MAP") + [(str(InternalAddress.smtp(address)), _sf(mbx), "0")])
    return po


def cmd_mailbox_add(args: argparse.Namespace, ctx: Context) -> int:
    address = _address(args.address)
    quota = parse_size(args.quota) if args.quota is not None else 0
    password = _read_password(ctx) if args.password_stdin else None
    name = address.local
    if not NAME_RE.fullmatch(name) or len(name.encode()) > 64:
        raise CLIError(f"local part {name!r} cannot be a mailbox name (letters, digits, . _ + - and the like)")
    hashed = _hash(password) if password is not None else LOCKED_PASSWORD
    with ctx.store.locked():
        snap = ctx.store.reload()
        po = _add_mailbox(ctx.store, snap, ctx.settings.postoffices_dir, address, hashed, quota)
    note = "" if password is not None else " (no password: it receives mail but nobody can log in)"
    ctx.stdout.write(f"added mailbox {address} as {po}/{name}{note}\n")
    return 0


def cmd_mailbox_remove(args: argparse.Namespace, ctx: Context) -> int:
    from tmmail import maildir

    with ctx.store.locked():
        snap = ctx.store.reload()
        address, mbx = _find_mailbox(snap, args.address)
        key = (mbx.postoffice.upper(), mbx.name.upper())
        map_rows = []
        for r in _rows(snap, "ADDRESS-MAP"):
            dests = [d for d in r[1].split(";") if d.strip() and not _is_sf_of(d, mbx)]
            if not dests:
                continue  # only pointed at this mailbox
            map_rows.append((r[0], ";".join(dests), *r[2:]))
        auth_rows = [r for r in _rows(snap, "AUTH") if r[1].upper().replace(" ", "") != "/".join(key)]
        sender_rows = [r for r in _rows(snap, "SENDERS") if r[0].upper().replace(" ", "") != "/".join(key)]
        mailbox_rows = [r for r in _rows(snap, "MAILBOX") if (r[0].upper(), r[1].upper()) != key]
        ctx.store.write("ADDRESS-MAP", map_rows)
        ctx.store.write("AUTH", auth_rows)
        ctx.store.write("SENDERS", sender_rows)
        ctx.store.write("MAILBOX", mailbox_rows)
    path = maildir.mailbox_path(ctx.settings.postoffices_dir, mbx.postoffice, mbx.name)
    ctx.stdout.write(f"removed mailbox {address} ({mbx.postoffice}/{mbx.name}); its Maildir {path} was kept\n")
    return 0


def _mailbox_addresses(snap: Providers) -> dict[tuple[str, str], list[str]]:
    """(PO, MAILBOX) upper-case -> the exact addresses mapped to it, own address first."""
    out: dict[tuple[str, str], list[str]] = {}
    for m in snap.address_map:
        if m.is_mask:
            continue
        source = m.source_address
        for dest in m.destinations:
            if dest.scheme == "SF":
                key = (dest.postoffice.upper(), dest.name.upper())
                own = source.scheme == "SMTP" and source.value.rpartition("@")[0].upper() == key[1]
                addresses = out.setdefault(key, [])
                if own:
                    addresses.insert(0, source.value)
                else:
                    addresses.append(source.value)
    return out


def cmd_mailbox_list(args: argparse.Namespace, ctx: Context) -> int:
    snap = ctx.store.reload()
    logins: dict[tuple[str, str], list[AuthEntry]] = {}
    for a in snap.auth.values():
        logins.setdefault((a.postoffice.upper(), a.mailbox.upper()), []).append(a)
    addresses = _mailbox_addresses(snap)
    for key, mbx in sorted(snap.mailboxes.items()):
        mine = logins.get(key, [])
        names = addresses.get(key) or [a.login for a in mine] or [f"{mbx.postoffice}/{mbx.name}"]
        ctx.out(
            names[0],
            f"{mbx.postoffice}/{mbx.name}",
            "enabled" if mbx.enabled else "disabled",
            f"quota={mbx.quota}",
            "password=" + ("set" if any(a.can_login for a in mine) else "none"),
        )
    return 0


def cmd_mailbox_passwd(args: argparse.Namespace, ctx: Context) -> int:
    if not args.password_stdin:
        raise CLIError("give the new password on stdin with --password-stdin")
    address = _address(args.address)
    password = _read_password(ctx)
    hashed = _hash(password)
    with ctx.store.locked():
        snap = ctx.store.reload()
        if snap.auth_entry(address.key) is None:
            raise CLIError(f"no login {address.key}")
        rows = [
            (r[0], r[1], hashed, *r[3:]) if r[0].lower() == address.key else r for r in _rows(snap, "AUTH")
        ]
        ctx.store.write("AUTH", rows)
    ctx.stdout.write(f"password changed for {address.key}\n")
    return 0


# ---------------------------------------------------------------------------------------
# aliases (ADDRESS-MAP)


def _alias_source(snap: Providers, text: str) -> str:
    text = text.strip()
    if is_mask(text):
        try:
            source = InternalAddress.parse(f"[SMTP:{text}]")
        except AddressError as e:
            raise CLIError(f"malformed mask {text!r}: {e}") from None
        domain = text.rpartition("@")[2]
        if domain and not is_mask(domain):
            normalized = normalize_domain(domain)
            if normalized is None:
                raise CLIError(f"malformed mask {text!r}")
            _postoffice_of_domain(snap, normalized)
        return str(source)
    address = _address(text)
    _postoffice_of_domain(snap, address.domain)
    return str(InternalAddress.smtp(address))


def _alias_destination(snap: Providers, text: str) -> str:
    text = text.strip()
    if text.startswith("["):
        try:
            dest = InternalAddress.parse(text)
        except AddressError as e:
            raise CLIError(str(e)) from None
        if dest.is_mask:
            raise CLIError("a destination cannot be a mask")
        if dest.scheme in ("SF", "LS"):
            # an alias to nothing would accept mail at RCPT and then bounce it: refuse it here
            po = snap.postoffice(dest.postoffice)
            if po is None:
                raise CLIError(f"no post office {dest.postoffice} (tmmail postoffice list)")
            if dest.scheme == "SF":
                from tmmail.groups import groups

                if dest.name == "*":  # the recipient's local part in that post office (router)
                    return str(InternalAddress("SF", f"{po.name}/*"))
                mbx = snap.mailbox(po.name, dest.name)
                if mbx is not None:
                    return str(InternalAddress("SF", f"{po.name}/{mbx.name}"))
                group = groups(snap).get(InternalAddress("SF", f"{po.name}/{dest.name}"))
                if group is None:
                    raise CLIError(f"no mailbox or group {po.name}/{dest.name} (tmmail mailbox list, tmmail group list)")
                return str(group.target)
            from tmmail.connectors.listserver_tables import lists

            canonical = InternalAddress(dest.scheme, f"{po.name}/{dest.name}")
            if lists(snap).get(canonical) is None:
                raise CLIError(f"no list {po.name}/{dest.name} (tmmail list list)")
            return str(canonical)
        return str(dest)
    if is_mask(text):
        raise CLIError("a destination cannot be a mask")
    return str(InternalAddress.smtp(_address(text)))


def cmd_alias_add(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.store.locked():
        snap = ctx.store.reload()
        source = _alias_source(snap, args.source)
        destination = _alias_destination(snap, args.destination)
        for m in snap.address_map:
            if m.source.lower() == source.lower():
                raise CLIError(f"{source} already maps to {m.destination} (remove it first)")
        if source.lower() == destination.lower():
            raise CLIError("an alias cannot point at itself")
        ctx.store.write("ADDRESS-MAP", _rows(snap, "ADDRESS-MAP") + [(source, destination, "0")])
    ctx.stdout.write(f"added alias {source} -> {destination}\n")
    return 0


def _source_key(text: str) -> str:
    text = text.strip()
    if not text.startswith("["):
        text = f"[SMTP:{text}]"
    try:
        return str(InternalAddress.parse(text)).lower()
    except AddressError as e:
        raise CLIError(f"malformed source {text!r}: {e}") from None


def cmd_alias_remove(args: argparse.Namespace, ctx: Context) -> int:
    key = _source_key(args.source)
    with ctx.store.locked():
        snap = ctx.store.reload()
        rows = _rows(snap, "ADDRESS-MAP")
        kept = [r for r in rows if _source_key(r[0]) != key]
        if len(kept) == len(rows):
            raise CLIError(f"no alias {args.source}")
        ctx.store.write("ADDRESS-MAP", kept)
    ctx.stdout.write(f"removed alias {args.source}\n")
    return 0


def cmd_alias_list(args: argparse.Namespace, ctx: Context) -> int:
    snap = ctx.store.reload()
    for m in snap.address_map:
        ctx.out(m.source_address.value if m.source_address.scheme == "SMTP" else m.source, m.destination, m.scope)
    return 0


# ---------------------------------------------------------------------------------------
# senders


def cmd_sender_add(args: argparse.Namespace, ctx: Context) -> int:
    sender = str(_address(args.address))
    with ctx.store.locked():
        snap = ctx.store.reload()
        _, mbx = _find_mailbox(snap, args.mailbox)
        key = (mbx.postoffice.upper(), mbx.name.upper())
        rows = []
        for r in _rows(snap, "SENDERS"):
            po, _, name = r[0].partition("/")
            mine = (po.strip().upper(), name.strip().upper()) == key
            if mine and r[1].lower() == sender.lower():
                raise CLIError(f"{sender} is already a sender address of {mbx.postoffice}/{mbx.name}")
            if mine and args.primary and len(r) > 2 and r[2] == "1":
                r = (r[0], r[1], "0")
            rows.append(r)
        rows.append((f"{mbx.postoffice}/{mbx.name}", sender, "1" if args.primary else "0"))
        ctx.store.write("SENDERS", rows)
    ctx.stdout.write(f"{mbx.postoffice}/{mbx.name} may now send as {sender}\n")
    return 0


def cmd_sender_remove(args: argparse.Namespace, ctx: Context) -> int:
    sender = str(_address(args.address))
    with ctx.store.locked():
        snap = ctx.store.reload()
        _, mbx = _find_mailbox(snap, args.mailbox)
        key = (mbx.postoffice.upper(), mbx.name.upper())
        rows = _rows(snap, "SENDERS")
        kept = []
        for r in rows:
            po, _, name = r[0].partition("/")
            if (po.strip().upper(), name.strip().upper()) == key and r[1].lower() == sender.lower():
                continue
            kept.append(r)
        if len(kept) == len(rows):
            raise CLIError(f"{sender} is not a sender address of {mbx.postoffice}/{mbx.name}")
        ctx.store.write("SENDERS", kept)
    ctx.stdout.write(f"{mbx.postoffice}/{mbx.name} may no longer send as {sender}\n")
    return 0


def cmd_sender_list(args: argparse.Namespace, ctx: Context) -> int:
    snap = ctx.store.reload()
    only = None
    if args.mailbox:
        _, mbx = _find_mailbox(snap, args.mailbox)
        only = (mbx.postoffice.upper(), mbx.name.upper())
    for s in snap.senders:
        if only is None or (s.postoffice.upper(), s.mailbox.upper()) == only:
            ctx.out(f"{s.postoffice}/{s.mailbox}", s.address, "primary" if s.primary else "")
    return 0


# ---------------------------------------------------------------------------------------
# the parser


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tmmail", description="TMmail administration: configuration and provider tables.")
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="tmmail.toml to use (default: $TMMAIL_CONFIG or ./var/tmmail.toml)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("init", help="write a new configuration into DIR")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--hostname", default="localhost", help="server host name (default: localhost)")
    p.add_argument("--domain", default=None, help="also create this domain and its post office")
    p.set_defaults(func=cmd_init)

    po = sub.add_parser("postoffice", help="post offices").add_subparsers(dest="action", metavar="ACTION")
    po.required = True
    p = po.add_parser("add", help="add a post office")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_postoffice_add)
    p = po.add_parser("remove", help="remove an empty post office")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_postoffice_remove)
    po.add_parser("list", help="list post offices").set_defaults(func=cmd_postoffice_list)

    dm = sub.add_parser("domain", help="hosted domains").add_subparsers(dest="action", metavar="ACTION")
    dm.required = True
    p = dm.add_parser("add", help="host a domain in a post office")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--postoffice", required=True, metavar="PO")
    p.set_defaults(func=cmd_domain_add)
    p = dm.add_parser("remove", help="stop hosting a domain")
    p.add_argument("domain", metavar="DOMAIN")
    p.set_defaults(func=cmd_domain_remove)
    dm.add_parser("list", help="list domains").set_defaults(func=cmd_domain_list)

    mb = sub.add_parser("mailbox", help="mailboxes and their logins").add_subparsers(dest="action", metavar="ACTION")
    mb.required = True
    p = mb.add_parser("add", help="add a mailbox (Maildir, login and address)")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("--password-stdin", action="store_true", help="read the password (one line) from stdin")
    p.add_argument("--quota", metavar="SIZE", help="size limit: bytes or K/M/G suffix (default: none)")
    p.set_defaults(func=cmd_mailbox_add)
    p = mb.add_parser("remove", help="remove a mailbox's table entries (the Maildir is kept)")
    p.add_argument("address", metavar="ADDRESS")
    p.set_defaults(func=cmd_mailbox_remove)
    mb.add_parser("list", help="list mailboxes").set_defaults(func=cmd_mailbox_list)
    p = mb.add_parser("passwd", help="set a mailbox's password")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("--password-stdin", action="store_true", help="read the password (one line) from stdin")
    p.set_defaults(func=cmd_mailbox_passwd)

    al = sub.add_parser("alias", help="address map entries").add_subparsers(dest="action", metavar="ACTION")
    al.required = True
    p = al.add_parser("add", help="deliver mail for SOURCE (address or mask) to DESTINATION")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("destination", metavar="DESTINATION")
    p.set_defaults(func=cmd_alias_add)
    p = al.add_parser("remove", help="remove the entry for SOURCE")
    p.add_argument("source", metavar="SOURCE")
    p.set_defaults(func=cmd_alias_remove)
    al.add_parser("list", help="list the address map").set_defaults(func=cmd_alias_list)

    sn = sub.add_parser("sender", help="addresses a mailbox may send as").add_subparsers(dest="action", metavar="ACTION")
    sn.required = True
    p = sn.add_parser("add", help="let a mailbox send as ADDRESS")
    p.add_argument("mailbox", metavar="MAILBOX-ADDRESS")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("--primary", action="store_true", help="make it the mailbox's primary sender address")
    p.set_defaults(func=cmd_sender_add)
    p = sn.add_parser("remove", help="remove a sender address")
    p.add_argument("mailbox", metavar="MAILBOX-ADDRESS")
    p.add_argument("address", metavar="ADDRESS")
    p.set_defaults(func=cmd_sender_remove)
    p = sn.add_parser("list", help="list sender addresses")
    p.add_argument("mailbox", metavar="MAILBOX-ADDRESS", nargs="?")
    p.set_defaults(func=cmd_sender_list)

    for name in OPTIONAL_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def _take_config(argv: list[str]) -> tuple[list[str], str | None]:
    """Accept ``--config FILE`` after the subcommand too (``tmmail mailbox list --config F``)."""
    rest: list[str] = []
    path = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg == "--config" and i + 1 < len(argv) and rest:
            path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config=") and rest:
            path = arg.split("=", 1)[1]
            i += 1
            continue
        rest.append(arg)
        i += 1
    return rest, path


def main(argv: Sequence[str] | None = None, stdin: IO[str] | None = None,
         stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """Run the admin command; returns the exit status (the console script exits with it)."""
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    try:
        parser = build_parser()
        if argv is None:
            argv = sys.argv[1:]
        argv, config_path = _take_config(list(argv))
        args = parser.parse_args(argv)
        config_path = config_path or args.config or config.default_path()
        ctx = Context(os.path.abspath(config_path), stdin, stdout, stderr)
        return int(args.func(args, ctx) or 0)
    except CLIError as e:
        stderr.write(f"tmmail: error: {e}\n")
        return EXIT_USAGE
    except ConfigError as e:
        stderr.write(f"tmmail: error: {e}\n")
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

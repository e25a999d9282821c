"""Address resolution: where mail for an address goes (the MTA's routing decision).

Pure logic over one immutable providers snapshot.  The order follows MailEnable's MTA:

1. exact ADDRESS-MAP entries (source ``[SMTP:addr]``),
2. hosted mailboxes: the domain's post office has a MAILBOX row named like the local part
   (case-insensitive), with its redirect setting (1 = redirect, 2 = redirect and keep a copy);
   then groups by their GROUP-MAP address (tmmail.groups), expanded to their members, and
   lists by any of their four addresses (tmmail.connectors.listserver_tables),
3. sub-addressing (RFC 5233): ``user+tag@d`` goes where ``user@d`` goes by 1-2,
4. SRS addresses (``SRS0=...@our.domain``, tmmail.srs) go back to the original sender;
   forged or expired ones resolve nowhere (a catch-all must not swallow them),
5. ADDRESS-MAP masks in file order, first match wins; a destination may reuse the address
   (``[SMTP:*@other.example]``: same local part elsewhere; ``[SMTP:*]``: relay it unchanged),
6. a domain with a ROUTE in DOMAINS.tab (one we relay for) is ``local`` with target
   ``[SMTP:addr]``: the SMTP connector sends it to the route host,
7. a domain we do not host is ``remote`` (``[SMTP:addr]``; relay rules decide elsewhere),
8. anything else in a hosted domain is ``unknown_local`` (SMTP 550 5.1.1, RFC 3463 §3.2).

Destinations that are addresses (``[SMTP:x@y]``) or groups (``[SF:PO/GROUP]``) are resolved
again, up to ``max_depth`` hops; a chain that comes back to an address already on it is a
loop.  A disabled domain, post office, mailbox, group or list (STATUS 0) resolves nowhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tmmail.address import AddressError, InternalAddress, mask_matches, parse_mailbox
from tmmail.errors import ConfigError
from tmmail.groups import groups as _group_index

LOCAL = "local"
REMOTE = "remote"
UNKNOWN_LOCAL = "unknown_local"

#: alias hops followed before giving up (a loop or a chain too long to be meant)
MAX_DEPTH = 10
#: Received: headers a message may carry before it is taken for a loop (RFC 5321 §6.3)
MAX_RECEIVED = 30


@dataclass(frozen=True)
class RouterOptions:
    """Settings of the address map (``[router]`` in tmmail.toml, see options_from_settings)."""

    #: RFC 5233 sub-address separator ("" = off)
    subaddress_separator: str = "+"
    #: deliver ``user+Folder@d`` into the mailbox folder ``Folder`` if it exists
    subaddress_folders: bool = False
    max_depth: int = MAX_DEPTH
    max_received: int = MAX_RECEIVED
    #: tmmail.srs.SRS to recognise bounces to our SRS addresses (None = off)
    srs: Any = None


DEFAULT_OPTIONS = RouterOptions()


#: RFC 3463 status of an address that resolves nowhere: no such user (X.1.1) ...
STATUS_UNKNOWN = "5.1.1"
#: ... or a routing loop / an alias chain too deep to be meant (X.4.6 "routing loop detected")
STATUS_LOOP = "5.4.6"


@dataclass(frozen=True)
class BranchFailure:
    """One destination of an alias, group or redirect that resolves nowhere while others do.

    ``destination`` is the member as the table names it (``[SMTP:ghost@example.com]``,
    ``[SF:ACME/OPS]``; a mask destination with the local part filled in), ``reason`` why
    (``mail loop: a -> b -> a``), ``status`` the RFC 3463 code (5.1.1 or 5.4.6).
    """

    destination: str
    reason: str
    status: str = STATUS_UNKNOWN


@dataclass(frozen=True)
class Resolution:
    """The routing decision for one address; ``reason`` and ``status`` explain an ``unknown_local``.

    ``failures``: branches of a ``local`` resolution that resolve nowhere (the runner keeps the
    message in badmail/ for them and tells the sender) while ``targets`` get the message.
    """

    kind: str
    targets: tuple[InternalAddress, ...] = ()
    reason: str = ""
    status: str = STATUS_UNKNOWN
    failures: tuple[BranchFailure, ...] = ()

    @property
    def ok(self) -> bool:
        return bool(self.targets)

    @property
    def loop(self) -> bool:
        """True when it resolves nowhere because of a routing loop or an over-deep chain."""
        return self.status == STATUS_LOOP


class _Unresolvable(Exception):
    def __init__(self, reason: str, status: str = STATUS_UNKNOWN) -> None:
        super().__init__(reason)
        self.status = status


class _GroupAgain(_Unresolvable):
    """A group reached again inside its own expansion: nesting, its members are covered."""


def split_subaddress(local: str, separator: str) -> tuple[str, str]:
    """``("user", "tag")`` for ``user+tag``; ``(local, "")`` without a separator (or at the start)."""
    if not separator:
        return local, ""
    i = local.find(separator)
    if i <= 0:
        return local, ""
    return local[:i], local[i + len(separator):]


_RECEIVED = re.compile(rb"^received:", re.IGNORECASE)


def count_received(head: bytes) -> int:
    """How many ``Received:`` fields a message header has (continuation lines not counted)."""
    n = 0
    for line in head.split(b"\n"):
        if not line.strip():
            break
        if _RECEIVED.match(line):
            n += 1
    return n


def options_from_settings(settings: Any) -> RouterOptions:
    """RouterOptions from ``[router]`` (settings.extra); SRS with the secret in the state folder.

    Keys: ``subaddress_separator`` (one character or ""), ``subaddress_folders`` (bool),
    ``max_depth`` and ``max_received`` (integers >= 1), ``srs`` (bool, default true).
    """
    section = (getattr(settings, "extra", None) or {}).get("router") or {}
    where = getattr(settings, "path", "") or None
    if not isinstance(section, dict):
        raise ConfigError("[router] must be a table", where)
    known = {"subaddress_separator", "subaddress_folders", "max_depth", "max_received", "srs"}
    for key in section:
        if key not in known:
            raise ConfigError(f"unknown setting router.{key}", where)
    sep = section.get("subaddress_separator", "+")
    if not isinstance(sep, str) or len(sep) > 1 or sep.isalnum() or sep in "@ \t\"\\":
        raise ConfigError("router.subaddress_separator must be one punctuation character or empty", where)
    folders = section.get("subaddress_folders", False)
    use_srs = section.get("srs", True)
    if not isinstance(folders, bool) or not isinstance(use_srs, bool):
        raise ConfigError("router.subaddress_folders and router.srs must be true or false", where)
    numbers = {}
    for key, default in (("max_depth", MAX_DEPTH), ("max_received", MAX_RECEIVED)):
        value = section.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"router.{key} must be an integer of at least 1", where)
        numbers[key] = value
    srs = None
    if use_srs:
        from tmmail.srs import SRS, load_secret

        srs = SRS(load_secret(settings.state_dir))
    return RouterOptions(sep, folders, numbers["max_depth"], numbers["max_received"], srs)


def resolve(providers: Any, address: str, options: RouterOptions | None = None) -> Resolution:
    """Resolve an RFC 5321 mailbox against a tmmail.providers.Providers snapshot."""
    opts = options or DEFAULT_OPTIONS
    resolver = _Resolver(providers, opts)
    try:
        kind, targets = resolver.resolve(address, ())
    except _Unresolvable as e:
        return Resolution(UNKNOWN_LOCAL, (), str(e), e.status)
    if not targets:
        return Resolution(UNKNOWN_LOCAL, (), "no such user here")
    return Resolution(kind, targets, failures=tuple(dict.fromkeys(resolver.failures)))


def resolve_destination(providers: Any, destination: str, options: RouterOptions | None = None) -> Resolution:
    """Resolve one table destination (a BranchFailure's ``destination``) as a member would be.

    Used when a bad branch is requeued (``tmmail badmail requeue``): only that branch is
    routed again, so the members that already got the message do not get it twice.
    """
    opts = options or DEFAULT_OPTIONS
    resolver = _Resolver(providers, opts)
    try:
        dest = InternalAddress.parse(destination) if destination.startswith("[") else InternalAddress.smtp(destination)
        targets = resolver._expand([dest], (), None)
    except AddressError as e:
        return Resolution(UNKNOWN_LOCAL, (), f"bad destination {destination!r}: {e}")
    except _Unresolvable as e:
        return Resolution(UNKNOWN_LOCAL, (), str(e), e.status)
    if not targets:
        return Resolution(UNKNOWN_LOCAL, (), "no such user here")
    return Resolution(LOCAL, targets, failures=tuple(dict.fromkeys(resolver.failures)))


class _Resolver:
    def __init__(self, providers: Any, opts: RouterOptions) -> None:
        self.p = providers
        self.opts = opts
        #: branches that resolved nowhere while their siblings did (see _expand)
        self.failures: list[BranchFailure] = []
        has_rows = hasattr(providers, "rows")
        self.groups = _group_index(providers) if has_rows else None
        self.lists = None
        if has_rows:
            from tmmail.connectors.listserver_tables import lists

            self.lists = lists(providers)

    def _enter(self, key: str, chain: tuple[str, ...]) -> tuple[str, ...]:
        if key in chain:
            cls = _GroupAgain if key.startswith("group:") else _Unresolvable
            raise cls("mail loop: " + " -> ".join(chain + (key,)), STATUS_LOOP)
        if len(chain) >= self.opts.max_depth:
            raise _Unresolvable(f"alias chain longer than {self.opts.max_depth}", STATUS_LOOP)
        return chain + (key,)

    def resolve(self, address: str, chain: tuple[str, ...]) -> tuple[str, tuple[InternalAddress, ...]]:
        parsed = parse_mailbox(address)
        if parsed is None:
            raise _Unresolvable(f"bad address {address!r}")
        chain = self._enter(parsed.key, chain)

        found = self._named(parsed, chain)
        if found is not None:
            return LOCAL, found

        base, tag = split_subaddress(parsed.local, self.opts.subaddress_separator)
        if tag:
            based = parse_mailbox(f"{base}@{parsed.domain}") if '"' not in base else None
            if based is not None:
                found = self._named(based, chain)
                if found is not None:
                    return LOCAL, found

        if self.opts.srs is not None:
            from tmmail.srs import SRSError, is_srs

            if is_srs(parsed.local) and self.p.is_hosted_domain(parsed.domain):
                try:
                    original = self.opts.srs.reverse(str(parsed))
                except SRSError as e:
                    raise _Unresolvable(f"SRS address not valid: {e}") from None
                _, targets = self.resolve(original, chain)
                return LOCAL, targets

        for row in self.p.map_masks():
            if mask_matches(row.source, parsed):
                return LOCAL, self._expand(list(row.destinations), chain, parsed)

        domain = self.p.domain(parsed.domain)
        if domain is not None:
            if domain.enabled and domain.route.strip():
                # a domain we relay for (backup MX, a server behind us): the SMTP connector
                # sends it to the ROUTE host (tmmail.routes); accepted from anyone
                return LOCAL, (InternalAddress("SMTP", str(parsed)),)
            raise _Unresolvable("no such user here" if domain.enabled else "domain disabled")
        return REMOTE, (InternalAddress("SMTP", str(parsed)),)

    def _named(self, parsed: Any, chain: tuple[str, ...]) -> tuple[InternalAddress, ...] | None:
        """Steps 1-2 for one address: exact map row, mailbox, group, list; None if none."""
        rows = self.p.map_exact(str(parsed))
        if rows:
            return self._expand([d for row in rows for d in row.destinations], chain, parsed)
        domain = self.p.domain(parsed.domain)
        if domain is not None and domain.enabled:
            mbx = self.p.mailbox(domain.postoffice, parsed.local)
            if mbx is not None:
                if not self._mailbox_enabled(mbx):
                    raise _Unresolvable("mailbox disabled")
                return self._mailbox_targets(mbx, chain)
        if self.groups is not None:
            group = self.groups.by_addr(parsed.key)
            if group is not None:
                return self._group_targets(group, chain)
        if self.lists is not None:
            found = self.lists.find(str(parsed))
            if found is not None:
                ml, role = found
                if not ml.enabled:
                    raise _Unresolvable("list disabled")
                return (ml.role_target(role),)
        return None

    def _mailbox_enabled(self, mbx: Any) -> bool:
        po = self.p.postoffice(mbx.postoffice)
        return mbx.enabled and (po is None or po.enabled)

    def _mailbox_targets(self, mbx: Any, chain: tuple[str, ...]) -> tuple[InternalAddress, ...]:
        own = InternalAddress("SF", f"{mbx.postoffice}/{mbx.name}")
        if mbx.redirect_status not in (1, 2) or not mbx.redirect_addresses:
            return (own,)
        chain = self._enter(str(own).lower(), chain)
        dests: list[InternalAddress] = []
        for text in mbx.redirect_addresses:
            try:
                dests.append(InternalAddress.parse(text) if text.startswith("[") else InternalAddress.smtp(text))
            except AddressError:
                continue
        keep = (own,) if mbx.redirect_status == 2 else ()
        mark = len(self.failures)
        try:
            redirected = self._expand([d for d in dests if d != own], chain, None)
        except _Unresolvable as e:
            if keep:
                # the copy is kept; the redirect itself failed: that branch goes to bad mail
                del self.failures[mark:]
                if not isinstance(e, _GroupAgain):
                    self.failures.extend(BranchFailure(str(d), str(e), e.status) for d in dests if d != own)
                return keep
            raise
        return tuple(dict.fromkeys(keep + redirected))

    def _group_targets(self, group: Any, chain: tuple[str, ...]) -> tuple[InternalAddress, ...]:
        """A group's members, each resolved (nested groups too); a disabled group resolves nowhere."""
        chain = self._enter("group:" + str(group.target).lower(), chain)
        if not group.enabled:
            raise _Unresolvable("group disabled")
        if not group.members:
            raise _Unresolvable("group without members")
        return self._expand(list(group.members), chain, None)

    def _expand(
        self, dests: list[InternalAddress], chain: tuple[str, ...], subject: Any
    ) -> tuple[InternalAddress, ...]:
        """Resolve address and group destinations again; keep others unless disabled.

        ``subject`` is the address a mask matched, for ``*`` in a destination.  A branch that
        resolves nowhere while others do is recorded in ``self.failures`` (bad mail and a
        notice to the sender), except a group reached again inside its own expansion (nested
        groups: its members are covered already).  If every branch fails, the reason of the
        last one is raised (so a loop is reported as a loop) and the parent decides.
        """
        out: list[InternalAddress] = []
        failure: _Unresolvable | None = None
        mark = len(self.failures)
        branch_failures: list[BranchFailure] = []
        for dest in dests:
            try:
                out.extend(self._expand_one(dest, chain, subject))
            except _Unresolvable as e:
                failure = e
                if not isinstance(e, _GroupAgain):
                    branch_failures.append(BranchFailure(self._concrete(dest, subject), str(e), e.status))
        unique = tuple(dict.fromkeys(out))
        if not unique and failure is not None:
            del self.failures[mark:]  # the whole branch fails: reported once, by the parent
            raise failure
        self.failures.extend(branch_failures)
        return unique

    @staticmethod
    def _concrete(dest: InternalAddress, subject: Any) -> str:
        """The destination as it was tried (a mask's ``*`` filled in)."""
        if subject is not None and "*" in dest.value and dest.scheme in ("SMTP", "SF"):
            value = dest.value
            if dest.scheme == "SF":
                return f"[SF:{value.replace('*', subject.local, 1)}]"
            if value == "*":
                return f"[SMTP:{subject}]"
            return f"[SMTP:{value.replace('*', subject.local if '@' in value else str(subject), 1)}]"
        return str(dest)

    def _expand_one(self, dest: InternalAddress, chain: tuple[str, ...], subject: Any) -> tuple[InternalAddress, ...]:
        if dest.scheme == "SMTP":
            value = dest.value
            if dest.is_mask:
                if subject is None:
                    return ()
                if value == "*":
                    # relay the address unchanged (resolving it again would match the mask again)
                    return (InternalAddress("SMTP", str(subject)),)
                value = value.replace("*", subject.local if "@" in value else str(subject), 1)
            return self.resolve(value, chain)[1]
        if dest.scheme == "SF":
            if "*" in dest.value:
                # [SMTP:*@x] -> [SF:PO/*]: the matched local part names the mailbox, which
                # must exist (no such mailbox: refused at RCPT like an unknown user)
                if subject is None:
                    return ()
                pattern = dest.value
                dest = InternalAddress("SF", pattern.replace("*", subject.local, 1))
                mbx = self.p.mailbox(dest.postoffice, dest.name)
                base, tag = split_subaddress(subject.local, self.opts.subaddress_separator)
                if mbx is None and tag:
                    # user+tag@alias.example -> the mailbox "user", as step 3 does for hosted names
                    based = InternalAddress("SF", pattern.replace("*", base, 1))
                    if self.p.mailbox(based.postoffice, based.name) is not None:
                        dest, mbx = based, self.p.mailbox(based.postoffice, based.name)
                if mbx is None:
                    group = self.groups.get(dest) if self.groups is not None else None
                    if group is not None:
                        return self._group_targets(group, chain)
                    raise _Unresolvable(f"no mailbox {dest.value}")
            mbx = self.p.mailbox(dest.postoffice, dest.name)
            if mbx is not None:
                if not self._mailbox_enabled(mbx):
                    raise _Unresolvable("mailbox disabled")
                return self._mailbox_targets(mbx, chain)
            group = self.groups.get(dest) if self.groups is not None else None
            if group is not None:
                return self._group_targets(group, chain)
            # neither mailbox nor group: the post office connector refuses it (5.1.1)
            po = self.p.postoffice(dest.postoffice)
            if po is not None and not po.enabled:
                raise _Unresolvable("post office disabled")
            return (dest,)
        if dest.scheme == "LS" and self.lists is not None:
            found = self.lists.get(dest)
            if found is not None and not found[0].enabled:
                raise _Unresolvable("list disabled")
        return (dest,)

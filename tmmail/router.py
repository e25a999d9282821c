"""Address resolution: where mail for an address goes (the MTA's routing decision).

Pure logic over one immutable providers snapshot.  The order follows MailEnable's MTA:

1. exact ADDRESS-MAP rows (source ``[SMTP:addr]``),
2. hosted mailboxes: the domain's post office has a MAILBOX row named like the local part
   (case-insensitive), with its redirect setting (1 = redirect, 2 = redirect and keep a copy);
   then groups by their GROUP-MAP address (tmmail.groups), expanded to their members,
3. ADDRESS-MAP masks in file order (``[SMTP:*@example.com]`` catch-alls), first match wins,
4. a domain with a ROUTE in DOMAINS.tab (one we relay for) is ``local`` with target
   ``[SMTP:addr]``: the SMTP connector sends it to the route host,
5. a domain we do not host is ``remote`` (``[SMTP:addr]``; relay rules decide elsewhere),
6. anything else in a hosted domain is ``unknown_local`` (SMTP 550 5.1.1, RFC 3463 §3.2).

Destinations that are addresses (``[SMTP:x@y]``) or groups (``[SF:PO/GROUP]``) are resolved
again, up to ``MAX_DEPTH`` hops;
a chain that comes back to an address already on it is a loop.  A disabled domain, post
office or mailbox (STATUS 0) resolves nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tmmail.address import AddressError, InternalAddress, mask_matches, parse_mailbox
from tmmail.groups import groups as _group_index

LOCAL = "local"
REMOTE = "remote"
UNKNOWN_LOCAL = "unknown_local"

#: alias hops followed before giving up (a loop or a chain too long to be meant)
MAX_DEPTH = 10


@dataclass(frozen=True)
class Resolution:
    """The routing decision for one address; ``reason`` explains an ``unknown_local``."""

    kind: str
    targets: tuple[InternalAddress, ...] = ()
    reason: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.targets)


class _Unresolvable(Exception):
    pass


def resolve(providers: Any, address: str) -> Resolution:
    """Resolve an RFC 5321 mailbox against a tmmail.providers.Providers snapshot."""
    try:
        kind, targets = _resolve(providers, address, ())
    except _Unresolvable as e:
        return Resolution(UNKNOWN_LOCAL, (), str(e))
    if not targets:
        return Resolution(UNKNOWN_LOCAL, (), "no such user here")
    return Resolution(kind, targets)


def _resolve(providers: Any, address: str, chain: tuple[str, ...]) -> tuple[str, tuple[InternalAddress, ...]]:
    parsed = parse_mailbox(address)
    if parsed is None:
        raise _Unresolvable(f"bad address {address!r}")
    key = parsed.key
    if key in chain:
        raise _Unresolvable("mail loop: " + " -> ".join(chain + (key,)))
    if len(chain) >= MAX_DEPTH:
        raise _Unresolvable(f"alias chain longer than {MAX_DEPTH}")
    chain = chain + (key,)

    rows = providers.map_exact(str(parsed))
    if rows:
        dests = [d for row in rows for d in row.destinations]
        return LOCAL, _expand(providers, dests, chain)

    domain = providers.domain(parsed.domain)
    if domain is not None and domain.enabled:
        mbx = providers.mailbox(domain.postoffice, parsed.local)
        if mbx is not None:
            if not _mailbox_enabled(providers, mbx):
                raise _Unresolvable("mailbox disabled")
            return LOCAL, _mailbox_targets(providers, mbx, chain)

    index = _groups(providers)
    group = index.by_addr(parsed.key) if index is not None else None
    if group is not None:
        return LOCAL, _group_targets(providers, group, chain)

    for row in providers.map_masks():
        if mask_matches(row.source, parsed):
            return LOCAL, _expand(providers, list(row.destinations), chain)

    if domain is not None:
        if domain.enabled and domain.route.strip():
            # a domain we relay for (backup MX, a server behind us): the SMTP connector sends
            # it to the ROUTE host (tmmail.routes); accepted from anyone, like our own mail
            return LOCAL, (InternalAddress("SMTP", str(parsed)),)
        raise _Unresolvable("no such user here" if domain.enabled else "domain disabled")
    return REMOTE, (InternalAddress("SMTP", str(parsed)),)


def _groups(providers: Any) -> Any:
    """The GROUP-MAP index of the snapshot (None for a snapshot without raw tables)."""
    return _group_index(providers) if hasattr(providers, "rows") else None


def _group_targets(providers: Any, group: Any, chain: tuple[str, ...]) -> tuple[InternalAddress, ...]:
    """A group's members, each resolved (nested groups too); a disabled group resolves nowhere."""
    key = "group:" + str(group.target).lower()
    if key in chain:
        raise _Unresolvable("mail loop: " + " -> ".join(chain + (key,)))
    if len(chain) >= MAX_DEPTH:
        raise _Unresolvable(f"alias chain longer than {MAX_DEPTH}")
    if not group.enabled:
        raise _Unresolvable("group disabled")
    if not group.members:
        raise _Unresolvable("group without members")
    return _expand(providers, list(group.members), chain + (key,))


def _mailbox_enabled(providers: Any, mbx: Any) -> bool:
    po = providers.postoffice(mbx.postoffice)
    return mbx.enabled and (po is None or po.enabled)


def _mailbox_targets(providers: Any, mbx: Any, chain: tuple[str, ...]) -> tuple[InternalAddress, ...]:
    own = InternalAddress("SF", f"{mbx.postoffice}/{mbx.name}")
    if mbx.redirect_status not in (1, 2) or not mbx.redirect_addresses:
        return (own,)
    key = str(own).lower()
    if key in chain:
        raise _Unresolvable("mail loop: " + " -> ".join(chain + (key,)))
    if len(chain) >= MAX_DEPTH:
        raise _Unresolvable(f"alias chain longer than {MAX_DEPTH}")
    chain = chain + (key,)
    dests: list[InternalAddress] = []
    for text in mbx.redirect_addresses:
        try:
            dests.append(InternalAddress.parse(text) if text.startswith("[") else InternalAddress.smtp(text))
        except AddressError:
            continue
    keep = (own,) if mbx.redirect_status == 2 else ()
    try:
        redirected = _expand(providers, [d for d in dests if d != own], chain)
    except _Unresolvable:
        if keep:
            return keep
        raise
    return tuple(dict.fromkeys(keep + redirected))


def _expand(providers: Any, dests: list[InternalAddress], chain: tuple[str, ...]) -> tuple[InternalAddress, ...]:
    """Resolve address destinations again; keep [SF:]/[LS:] ones unless disabled.

    A branch that resolves nowhere is dropped; if every branch does, the reason of the last
    one is raised (so a loop is reported as a loop).
    """
    out: list[InternalAddress] = []
    failure: _Unresolvable | None = None
    for dest in dests:
        if dest.scheme == "SMTP":
            if dest.is_mask:
                continue
            try:
                _, sub = _resolve(providers, dest.value, chain)
            except _Unresolvable as e:
                failure = e
                continue
            out.extend(sub)
        elif dest.scheme == "SF":
            mbx = providers.mailbox(dest.postoffice, dest.name)
            if mbx is not None:
                if not _mailbox_enabled(providers, mbx):
                    failure = _Unresolvable("mailbox disabled")
                    continue
                out.extend(_mailbox_targets(providers, mbx, chain))
            else:
                index = _groups(providers)
                group = index.get(dest) if index is not None else None
                if group is not None:
                    try:
                        out.extend(_group_targets(providers, group, chain))
                    except _Unresolvable as e:
                        failure = e
                    continue
                # neither mailbox nor group: the post office connector refuses it (5.1.1)
                po = providers.postoffice(dest.postoffice)
                if po is not None and not po.enabled:
                    failure = _Unresolvable("post office disabled")
                    continue
                out.append(dest)
        else:
            out.append(dest)
    unique = tuple(dict.fromkeys(out))
    if not unique and failure is not None:
        raise failure
    return unique

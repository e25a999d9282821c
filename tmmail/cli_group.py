"""``tmmail group`` (groups and their members) and ``tmmail mailbox redirect``.

``group add ADDRESS --postoffice PO [--name NAME] [--description TEXT]``, ``group remove
ADDRESS``, ``group list``, ``group member add|remove GROUP MEMBER``, ``group member list
GROUP``.  Tables: GROUP-MAP.tab and GROUP-MEMBERS.tab (tmmail.groups).  A member is an
address (stored as ``[SMTP:addr]`` and resolved like any recipient: a local mailbox, an
outside address, another group or list) or an internal address ``[SF:PO/NAME]``.

``mailbox redirect ADDRESS --to X [--to Y] [--keep-copy]`` / ``--off`` sets MAILBOX.tab's
REDIRECT_STATUS (1 = redirect, 2 = redirect and keep a copy, 0 = off) and
REDIRECT_ADDRESSES; it is registered into the ``mailbox`` command of tmmail.cli.

Every change is validated first and written atomically under the tables' lock
(ProviderStore.locked / write), as the rest of the admin command does.
"""

from __future__ import annotations

import argparse
from typing import Any

from tmmail.address import AddressError, InternalAddress, parse_address
from tmmail.cli import CLIError
from tmmail.groups import GROUP_MAP, GROUP_MEMBERS, HEADERS, groups, parse_member
from tmmail.providers import NAME_RE

__all__ = ["register", "sub_action"]


def _address(text: str) -> Any:
    try:
        return parse_address(text.strip())
    except AddressError as e:
        raise CLIError(f"malformed address {text!r}: {e}") from None


def _write(ctx: Any, table: str, rows: list[tuple[str, ...]]) -> None:
    import os

    path = ctx.store.path(table)
    if not os.path.exists(path):
        from tmmail.providers import atomic_write

        atomic_write(path, HEADERS.get(table, "").encode("utf-8"))
    ctx.store.write(table, rows)


def address_in_use(snap: Any, address: Any) -> str | None:
    """What already owns ``address`` (a mailbox, alias, group or list), or None."""
    from tmmail.connectors.listserver_tables import lists

    if snap.auth_entry(address.key) is not None:
        return "a mailbox login"
    d = snap.domain(address.domain)
    if d is not None and snap.mailbox(d.postoffice, address.local) is not None:
        return "a mailbox"
    if snap.map_exact(str(address)):
        return "an alias"
    if groups(snap).by_addr(address.key) is not None:
        return "a group"
    if lists(snap).find(address.key) is not None:
        return "a list (or one of its -request/-bounces/-owner addresses)"
    return None


def _find_group(snap: Any, text: str) -> Any:
    text = text.strip()
    index = groups(snap)
    g = index.get(text) if text.startswith("[") else index.by_addr(str(_address(text)))
    if g is None:
        raise CLIError(f"no group {text}")
    return g


def cmd_group_add(args: argparse.Namespace, ctx: Any) -> int:
    address = _address(args.address)
    with ctx.store.locked():
        snap = ctx.store.reload()
        domain = snap.domain(address.domain)
        if domain is None:
            raise CLIError(f"domain {address.domain} is not hosted here")
        po = snap.postoffice(args.postoffice)
        if po is None:
            raise CLIError(f"no post office {args.postoffice}")
        name = (args.name or address.local).strip()
        if not NAME_RE.fullmatch(name) or len(name.encode()) > 64:
            raise CLIError(f"bad group name {name!r} (letters, digits, . _ + -)")
        owner = address_in_use(snap, address)
        if owner:
            raise CLIError(f"{address} is already {owner}")
        if snap.mailbox(po.name, name) is not None:
            raise CLIError(f"{po.name}/{name} is a mailbox; choose another --name")
        if groups(snap).get(InternalAddress("SF", f"{po.name}/{name}")) is not None:
            raise CLIError(f"group {po.name}/{name} already exists")
        target = f"[SF:{po.name}/{name}]"
        rows = list(snap.rows(GROUP_MAP)) + [(target, str(address), "1", args.description or "")]
        _write(ctx, GROUP_MAP, rows)
    ctx.stdout.write(f"added group {address} ({target})\n")
    return 0


def cmd_group_remove(args: argparse.Namespace, ctx: Any) -> int:
    with ctx.store.locked():
        snap = ctx.store.reload()
        g = _find_group(snap, args.group)
        same = lambda row: row and row[0].strip().upper() == str(g.target).upper()  # noqa: E731
        _write(ctx, GROUP_MAP, [r for r in snap.rows(GROUP_MAP) if not same(r)])
        _write(ctx, GROUP_MEMBERS, [r for r in snap.rows(GROUP_MEMBERS) if not same(r)])
    ctx.stdout.write(f"removed group {g.address or g.target}\n")
    return 0


def cmd_group_list(args: argparse.Namespace, ctx: Any) -> int:
    snap = ctx.store.reload()
    for g in sorted(groups(snap), key=lambda g: g.address or str(g.target)):
        ctx.out(g.address, str(g.target), "enabled" if g.enabled else "disabled", f"members={len(g.members)}",
                g.description)
    return 0


def _member_arg(snap: Any, text: str) -> InternalAddress:
    try:
        member = parse_member(text)
    except AddressError as e:
        raise CLIError(f"bad member {text!r}: {e}") from None
    if member.scheme in ("SF", "LS"):
        po = snap.postoffice(member.postoffice)
        if po is None:
            raise CLIError(f"no post office {member.postoffice}")
        if member.scheme == "SF":
            mbx = snap.mailbox(po.name, member.name)
            if mbx is not None:
                return InternalAddress("SF", f"{mbx.postoffice}/{mbx.name}")  # the stored spelling
            group = groups(snap).get(member)
            if group is None:
                raise CLIError(f"{member} is neither a mailbox nor a group")
            return group.target
        return InternalAddress(member.scheme, f"{po.name}/{member.name}")
    return member


def cmd_member_add(args: argparse.Namespace, ctx: Any) -> int:
    with ctx.store.locked():
        snap = ctx.store.reload()
        g = _find_group(snap, args.group)
        member = _member_arg(snap, args.member)
        if str(member).lower() == str(g.target).lower() or (
            member.scheme == "SMTP" and member.value.lower() == g.address.lower()
        ):
            raise CLIError("a group cannot be a member of itself")
        if any(str(m).lower() == str(member).lower() for m in g.members):
            raise CLIError(f"{member} is already a member of {g.address or g.target}")
        _write(ctx, GROUP_MEMBERS, list(snap.rows(GROUP_MEMBERS)) + [(str(g.target), str(member))])
    ctx.stdout.write(f"added {member} to group {g.address or g.target}\n")
    return 0


def cmd_member_remove(args: argparse.Namespace, ctx: Any) -> int:
    with ctx.store.locked():
        snap = ctx.store.reload()
        g = _find_group(snap, args.group)
        try:
            member = parse_member(args.member)
        except AddressError as e:
            raise CLIError(f"bad member {args.member!r}: {e}") from None
        rows = list(snap.rows(GROUP_MEMBERS))
        kept = []
        for r in rows:
            try:
                mine = (len(r) > 1 and r[0].strip().upper() == str(g.target).upper()
                        and str(parse_member(r[1])).lower() == str(member).lower())
            except AddressError:
                mine = False
            if not mine:
                kept.append(r)
        if len(kept) == len(rows):
            raise CLIError(f"{member} is not a member of {g.address or g.target}")
        _write(ctx, GROUP_MEMBERS, kept)
    ctx.stdout.write(f"removed {member} from group {g.address or g.target}\n")
    return 0


def cmd_member_list(args: argparse.Namespace, ctx: Any) -> int:
    snap = ctx.store.reload()
    g = _find_group(snap, args.group)
    for m in g.members:
        ctx.out(m.value if m.scheme == "SMTP" else str(m))
    return 0


# -- mailbox redirect ------------------------------------------------------------------------


def _find_mailbox(snap: Any, text: str) -> Any:
    address = _address(text)
    entry = snap.auth_entry(address.key)
    if entry is not None and snap.mailbox(entry.postoffice, entry.mailbox) is not None:
        return snap.mailbox(entry.postoffice, entry.mailbox)
    d = snap.domain(address.domain)
    if d is not None and snap.mailbox(d.postoffice, address.local) is not None:
        return snap.mailbox(d.postoffice, address.local)
    raise CLIError(f"no mailbox {address}")


def cmd_mailbox_redirect(args: argparse.Namespace, ctx: Any) -> int:
    if args.off and (args.to or args.keep_copy):
        raise CLIError("--off cannot be combined with --to/--keep-copy")
    if not args.off and not args.to:
        raise CLIError("give --to ADDRESS (repeatable) or --off")
    targets: list[str] = []
    for text in args.to or ():
        for part in text.split(","):
            if part.strip():
                targets.append(str(_address(part)))
    with ctx.store.locked():
        snap = ctx.store.reload()
        mbx = _find_mailbox(snap, args.address)
        status = "0" if args.off else ("2" if args.keep_copy else "1")
        rows = []
        for r in snap.rows("MAILBOX"):
            if len(r) > 1 and (r[0].upper(), r[1].upper()) == (mbx.postoffice.upper(), mbx.name.upper()):
                r = tuple(r) + ("",) * (6 - len(r))
                r = (r[0], r[1], r[2] or "1", r[3] or "0", status, "" if args.off else ";".join(targets))
            rows.append(r)
        ctx.store.write("MAILBOX", rows)
    if args.off:
        ctx.stdout.write(f"redirect of {mbx.postoffice}/{mbx.name} turned off\n")
    else:
        copy = " (keeping a copy)" if args.keep_copy else ""
        ctx.stdout.write(f"{mbx.postoffice}/{mbx.name} redirected to {', '.join(targets)}{copy}\n")
    return 0


def sub_action(parser: argparse.ArgumentParser) -> Any:
    """The subparsers object (``_SubParsersAction``) of an existing command parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def register(subparsers: Any) -> None:
    gp = subparsers.add_parser("group", help="groups (one address, several recipients)")
    gs = gp.add_subparsers(dest="action", metavar="ACTION")
    gs.required = True
    p = gs.add_parser("add", help="add a group ADDRESS in a post office")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("--postoffice", required=True, metavar="PO")
    p.add_argument("--name", default=None, help="group name in the post office (default: the local part)")
    p.add_argument("--description", default="", metavar="TEXT")
    p.set_defaults(func=cmd_group_add)
    p = gs.add_parser("remove", help="remove a group and its member list")
    p.add_argument("group", metavar="GROUP")
    p.set_defaults(func=cmd_group_remove)
    gs.add_parser("list", help="list groups").set_defaults(func=cmd_group_list)
    mp = gs.add_parser("member", help="group members")
    ms = mp.add_subparsers(dest="member_action", metavar="ACTION")
    ms.required = True
    p = ms.add_parser("add", help="add MEMBER (address or [SF:PO/NAME]) to GROUP")
    p.add_argument("group", metavar="GROUP")
    p.add_argument("member", metavar="MEMBER")
    p.set_defaults(func=cmd_member_add)
    p = ms.add_parser("remove", help="remove MEMBER from GROUP")
    p.add_argument("group", metavar="GROUP")
    p.add_argument("member", metavar="MEMBER")
    p.set_defaults(func=cmd_member_remove)
    p = ms.add_parser("list", help="list the members of GROUP")
    p.add_argument("group", metavar="GROUP")
    p.set_defaults(func=cmd_member_list)

    mailbox = subparsers.choices.get("mailbox")
    actions = sub_action(mailbox) if mailbox is not None else None
    if actions is not None and "redirect" not in actions.choices:
        p = actions.add_parser("redirect", help="redirect (forward) a mailbox's mail, with or without a copy")
        p.add_argument("address", metavar="ADDRESS")
        p.add_argument("--to", action="append", metavar="ADDRESS", help="where to (repeatable or comma list)")
        p.add_argument("--keep-copy", action="store_true", help="also keep a copy in the mailbox")
        p.add_argument("--off", action="store_true", help="turn the redirect off")
        p.set_defaults(func=cmd_mailbox_redirect)

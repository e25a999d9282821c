"""``tmmail list``: mailing lists served by the list server connector ([LS:PO/LIST]).

``list add LIST@DOMAIN --postoffice PO [--moderated --moderator ADDRESS ...] [--members-only]
[--subject-prefix TEXT] [--header TEXT] [--footer TEXT] [--bounce-limit N]``, ``list remove
LIST``, ``list list``, ``list member add|remove LIST ADDRESS``, ``list member list LIST``.

Tables LISTS.tab and LIST-MEMBERS.tab (tmmail.connectors.listserver_tables); header and footer
texts in ``STATE/lists/PO/NAME/{header,footer}.txt``.  The list answers at LIST@, and
LIST-request@, LIST-bounces@, LIST-owner@ in the same domain.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from tmmail.address import AddressError, InternalAddress, parse_address
from tmmail.cli import CLIError
from tmmail.cli_group import _write, address_in_use
from tmmail.connectors.listserver_tables import LIST_MEMBERS, LISTS, ROLES, lists
from tmmail.providers import NAME_RE, atomic_write, format_options

__all__ = ["register"]


def _address(text: str) -> Any:
    try:
        return parse_address(text.strip())
    except AddressError as e:
        raise CLIError(f"malformed address {text!r}: {e}") from None


def _find_list(snap: Any, text: str) -> Any:
    found = lists(snap).find(str(_address(text)).lower())
    if found is None or found[1] != "post":
        raise CLIError(f"no list {text}")
    return found[0]


def _texts_dir(ctx: Any, po: str, name: str) -> str:
    return os.path.join(ctx.settings.state_dir, "lists", po, name)


def cmd_add(args: argparse.Namespace, ctx: Any) -> int:
    address = _address(args.address)
    if args.moderated and not args.moderator:
        raise CLIError("a moderated list needs --moderator ADDRESS")
    moderators = [str(_address(m)) for m in args.moderator or ()]
    if args.moderated and args.members_only:
        raise CLIError("choose --moderated or --members-only")
    posting = "moderated" if args.moderated else ("members" if args.members_only else "open")
    options = {}
    if args.subject_prefix:
        if any(c in args.subject_prefix for c in ",\t\n"):
            raise CLIError("the subject prefix cannot contain commas, tabs or line breaks")
        options["subject_prefix"] = args.subject_prefix
    if args.bounce_limit is not None:
        if args.bounce_limit < 1:
            raise CLIError("--bounce-limit must be at least 1")
        options["bounce_limit"] = str(args.bounce_limit)
    with ctx.store.locked():
        snap = ctx.store.reload()
        if snap.domain(address.domain) is None:
            raise CLIError(f"domain {address.domain} is not hosted here")
        po = snap.postoffice(args.postoffice)
        if po is None:
            raise CLIError(f"no post office {args.postoffice}")
        name = address.local
        if "+" in name or not NAME_RE.fullmatch(name) or len(name.encode()) > 64:
            raise CLIError(f"bad list name {name!r} (letters, digits, . _ -; no +)")
        for role in ROLES:
            a = address if role == "post" else _address(f"{address.local}-{role}@{address.domain}")
            owner = address_in_use(snap, a)
            if owner:
                raise CLIError(f"{a} is already {owner}")
        if any(ml.target.value.upper() == f"{po.name}/{name}".upper() for ml in lists(snap)):
            raise CLIError(f"list {po.name}/{name} already exists")
        target = str(InternalAddress("LS", f"{po.name}/{name}"))
        row = (target, str(address), "1", posting, ";".join(moderators), format_options(options))
        _write(ctx, LISTS, list(snap.rows(LISTS)) + [row])
        folder = _texts_dir(ctx, po.name, name)
        for fname, text in (("header.txt", args.header), ("footer.txt", args.footer)):
            if text:
                os.makedirs(folder, exist_ok=True)
                atomic_write(os.path.join(folder, fname), text.replace("\\n", "\n").encode("utf-8"))
    ctx.stdout.write(f"added list {address} ({target}, posting: {posting})\n")
    return 0


def cmd_remove(args: argparse.Namespace, ctx: Any) -> int:
    with ctx.store.locked():
        snap = ctx.store.reload()
        ml = _find_list(snap, args.list)
        key = str(ml.target).upper()
        same = lambda r: r and r[0].strip().upper() == key  # noqa: E731
        _write(ctx, LISTS, [r for r in snap.rows(LISTS) if not same(r)])
        _write(ctx, LIST_MEMBERS, [r for r in snap.rows(LIST_MEMBERS) if not same(r)])
    ctx.stdout.write(f"removed list {ml.address}\n")
    return 0


def cmd_list(args: argparse.Namespace, ctx: Any) -> int:
    snap = ctx.store.reload()
    for ml in sorted(lists(snap), key=lambda m: m.address):
        active = sum(1 for m in ml.members if m.active)
        ctx.out(ml.address, str(ml.target), "enabled" if ml.enabled else "disabled", f"posting={ml.posting}",
                f"members={active}/{len(ml.members)}", "moderators=" + ",".join(ml.moderators))
    return 0


def cmd_member_add(args: argparse.Namespace, ctx: Any) -> int:
    member = str(_address(args.address))
    with ctx.store.locked():
        snap = ctx.store.reload()
        ml = _find_list(snap, args.list)
        existing = ml.member(member)
        if existing is not None and existing.active:
            raise CLIError(f"{member} is already a member of {ml.address}")
        key = str(ml.target).upper()
        rows = [r for r in snap.rows(LIST_MEMBERS)
                if not (len(r) > 1 and r[0].strip().upper() == key and r[1].lower() == member.lower())]
        rows.append((str(ml.target), member, "1", "0"))
        _write(ctx, LIST_MEMBERS, rows)
    ctx.stdout.write(f"added {member} to {ml.address}\n")
    return 0


def cmd_member_remove(args: argparse.Namespace, ctx: Any) -> int:
    member = str(_address(args.address))
    with ctx.store.locked():
        snap = ctx.store.reload()
        ml = _find_list(snap, args.list)
        key = str(ml.target).upper()
        rows = list(snap.rows(LIST_MEMBERS))
        kept = [r for r in rows if not (len(r) > 1 and r[0].strip().upper() == key and r[1].lower() == member.lower())]
        if len(kept) == len(rows):
            raise CLIError(f"{member} is not a member of {ml.address}")
        _write(ctx, LIST_MEMBERS, kept)
    ctx.stdout.write(f"removed {member} from {ml.address}\n")
    return 0


def cmd_member_list(args: argparse.Namespace, ctx: Any) -> int:
    snap = ctx.store.reload()
    ml = _find_list(snap, args.list)
    from tmmail.connectors.listserver import bounce_count

    now = time.time()
    for m in ml.members:
        # the count as the next bounce sees it (it starts again after bounce_reset_days)
        count = bounce_count(str(m.bounces), str(m.last_bounce) if m.last_bounce else "", now, ml.bounce_reset)
        ctx.out(m.address, "active" if m.active else "disabled", f"bounces={count}")
    return 0


def register(subparsers: Any) -> None:
    lp = subparsers.add_parser("list", help="mailing lists (the list server)")
    ls = lp.add_subparsers(dest="action", metavar="ACTION")
    ls.required = True
    p = ls.add_parser("add", help="add a list LIST@DOMAIN")
    p.add_argument("address", metavar="LIST@DOMAIN")
    p.add_argument("--postoffice", required=True, metavar="PO")
    p.add_argument("--moderated", action="store_true", help="posts by non-moderators go to the moderators")
    p.add_argument("--moderator", action="append", metavar="ADDRESS", help="a moderator (repeatable)")
    p.add_argument("--members-only", action="store_true", help="only members may post")
    p.add_argument("--subject-prefix", default="", metavar="TEXT", help="e.g. [news]")
    p.add_argument("--header", default="", metavar="TEXT", help="text put before each post (\\n for new lines)")
    p.add_argument("--footer", default="", metavar="TEXT", help="text put after each post (\\n for new lines)")
    p.add_argument("--bounce-limit", type=int, default=None, metavar="N", help="bounces before a member is disabled")
    p.set_defaults(func=cmd_add)
    p = ls.add_parser("remove", help="remove a list and its members")
    p.add_argument("list", metavar="LIST")
    p.set_defaults(func=cmd_remove)
    ls.add_parser("list", help="list the lists").set_defaults(func=cmd_list)
    mp = ls.add_parser("member", help="list members")
    ms = mp.add_subparsers(dest="member_action", metavar="ACTION")
    ms.required = True
    for name, func, text in (("add", cmd_member_add, "subscribe ADDRESS (no confirmation)"),
                             ("remove", cmd_member_remove, "unsubscribe ADDRESS")):
        p = ms.add_parser(name, help=text)
        p.add_argument("list", metavar="LIST")
        p.add_argument("address", metavar="ADDRESS")
        p.set_defaults(func=func)
    p = ms.add_parser("list", help="list the members")
    p.add_argument("list", metavar="LIST")
    p.set_defaults(func=cmd_member_list)

"""Groups (MailEnable's GROUP-MAP and member lists): one address, many recipients.

Two provider tables in the configuration folder (read raw through ``Providers.rows``, so
the provider loader needs no change; ``tmmail group`` validates what it writes):

``GROUP-MAP.tab``      ``GROUP([SF:PO/NAME])  ADDRESS  STATUS(1/0)  DESCRIPTION``
``GROUP-MEMBERS.tab``  ``GROUP([SF:PO/NAME])  MEMBER([SMTP:addr] / [SF:PO/MBX] / [LS:PO/LIST])``

A group is reached by its address or by its internal address ``[SF:PO/NAME]`` (an alias or
another group may point at it).  The router (tmmail.router) expands it to its members:
local mailboxes, outside addresses and nested groups, each recipient once.  Rows that do
not parse are skipped (and logged once per table version), so one bad line written by hand
does not stop mail to the other groups.

Pure logic; the parsed index is cached per version of the two tables.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from tmmail.address import AddressError, InternalAddress, parse_mailbox

__all__ = ["Group", "GroupIndex", "groups", "parse_member", "GROUP_MAP", "GROUP_MEMBERS", "HEADERS"]

log = Logger(namespace="tmmail.groups")

GROUP_MAP = "GROUP-MAP"
GROUP_MEMBERS = "GROUP-MEMBERS"

HEADERS = {
    GROUP_MAP: (
        "# GROUP-MAP: groups (one address delivering to several members; tmmail group).\n"
        "# GROUP([SF:PO/NAME])\tADDRESS\tSTATUS(1/0)\tDESCRIPTION\n"
    ),
    GROUP_MEMBERS: (
        "# GROUP-MEMBERS: members of the groups in GROUP-MAP.\n"
        "# GROUP([SF:PO/NAME])\tMEMBER([SMTP:addr] [SF:PO/MBX] [LS:PO/LIST])\n"
    ),
}


@dataclass(frozen=True)
class Group:
    """One group: its internal address, public address, state and members (in table order)."""

    target: InternalAddress
    address: str
    status: int = 1
    description: str = ""
    members: tuple[InternalAddress, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.status == 1

    @property
    def key(self) -> str:
        return self.target.value.upper()


def parse_member(text: str) -> InternalAddress:
    """A member as written in GROUP-MEMBERS (``[SCHEME:..]`` or a bare address); AddressError."""
    text = text.strip()
    if text.startswith("["):
        member = InternalAddress.parse(text)
        if member.is_mask:
            raise AddressError("a group member cannot be a mask")
        return member
    return InternalAddress.smtp(text)


@dataclass(frozen=True)
class GroupIndex:
    by_target: dict[str, Group]
    by_address: dict[str, Group]

    def get(self, target: InternalAddress | str) -> Group | None:
        """The group ``[SF:PO/NAME]`` (any case), or None."""
        if isinstance(target, str):
            try:
                target = InternalAddress.parse(target)
            except AddressError:
                return None
        if target.scheme != "SF":
            return None
        return self.by_target.get(target.value.upper())

    def by_addr(self, address: str) -> Group | None:
        return self.by_address.get(address.lower())

    def __iter__(self):
        return iter(self.by_target.values())

    def __len__(self) -> int:
        return len(self.by_target)


def build_index(map_rows: Any, member_rows: Any) -> GroupIndex:
    members: dict[str, list[InternalAddress]] = {}
    bad = 0
    for row in member_rows:
        try:
            group = InternalAddress.parse(row[0])
            member = parse_member(row[1])
        except (AddressError, IndexError):
            bad += 1
            continue
        members.setdefault(group.value.upper(), []).append(member)
    by_target: dict[str, Group] = {}
    by_address: dict[str, Group] = {}
    for row in map_rows:
        try:
            target = InternalAddress.parse(row[0])
            if target.scheme != "SF":
                raise AddressError("group must be [SF:PO/NAME]")
            address = row[1] if len(row) > 1 else ""
            parsed = parse_mailbox(address) if address else None
            if address and parsed is None:
                raise AddressError(f"bad group address {address!r}")
            status = int(row[2]) if len(row) > 2 and row[2] else 1
        except (AddressError, ValueError):
            bad += 1
            continue
        key = target.value.upper()
        g = Group(
            target,
            str(parsed) if parsed else "",
            status,
            row[3] if len(row) > 3 else "",
            tuple(dict.fromkeys(members.get(key, ()))),
        )
        by_target[key] = g
        if parsed is not None:
            by_address[parsed.key] = g
    if bad:
        log.warn("{count} unusable row(s) in GROUP-MAP/GROUP-MEMBERS skipped", count=bad)
    return GroupIndex(by_target, by_address)


_cache_lock = threading.Lock()
_cache: tuple[Any, Any, GroupIndex] | None = None


def groups(snap: Any) -> GroupIndex:
    """The groups of a providers snapshot (parsed once per version of the two tables)."""
    global _cache
    map_rows = snap.rows(GROUP_MAP)
    member_rows = snap.rows(GROUP_MEMBERS)
    cached = _cache
    if cached is not None and cached[0] is map_rows and cached[1] is member_rows:
        return cached[2]
    index = build_index(map_rows, member_rows)
    with _cache_lock:
        _cache = (map_rows, member_rows, index)
    return index

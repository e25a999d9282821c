"""The list server's provider tables: lists and their members (pure parsing, cached per version).

``LISTS.tab``         ``LIST([LS:PO/NAME])  ADDRESS  STATUS(1/0)  POSTING(open|members|moderated)
                       MODERATORS(;-separated addresses)  OPTIONS(k=v,k=v)``
``LIST-MEMBERS.tab``  ``LIST([LS:PO/NAME])  ADDRESS  STATUS(1 active / 0 disabled)  BOUNCES``

OPTIONS: ``subject_prefix`` (e.g. ``[news]``), ``bounce_limit`` (bounces before a member is
disabled, default 5), ``dmarc`` (``1`` default: rewrite From for strict-DMARC posters).
Header and footer texts live in ``STATE/lists/PO/NAME/{header,footer}.txt``.

Each list answers at four addresses (RFC 2369/2919 conventions, as Mailman does):
``LIST@d`` (posts), ``LIST-request@d`` (subscribe/unsubscribe/confirm by mail),
``LIST-bounces@d`` (envelope sender of distributed copies) and ``LIST-owner@d`` (the
moderators).  The router targets them as ``[LS:PO/NAME]``, ``[LS:PO/NAME+request]``,
``[LS:PO/NAME+bounces]``, ``[LS:PO/NAME+owner]`` (list names cannot contain ``+``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

from tmmail.address import AddressError, InternalAddress, parse_mailbox
from tmmail.providers import parse_options

__all__ = ["MailingList", "ListIndex", "lists", "LISTS", "LIST_MEMBERS", "HEADERS", "ROLES", "POSTING_MODES"]

LISTS = "LISTS"
LIST_MEMBERS = "LIST-MEMBERS"
ROLES = ("post", "request", "bounces", "owner")
POSTING_MODES = ("open", "members", "moderated")

HEADERS = {
    LISTS: (
        "# LISTS: mailing lists served by the list server (tmmail list).\n"
        "# LIST([LS:PO/NAME])\tADDRESS\tSTATUS(1/0)\tPOSTING(open|members|moderated)\tMODERATORS(;-separated)"
        "\tOPTIONS(subject_prefix=..,bounce_limit=5,dmarc=1)\n"
    ),
    LIST_MEMBERS: (
        "# LIST-MEMBERS: list subscribers.\n"
        "# LIST([LS:PO/NAME])\tADDRESS\tSTATUS(1=active,0=disabled)\tBOUNCES\tLAST_BOUNCE(epoch s)\n"
    ),
}


@dataclass(frozen=True)
class Member:
    address: str
    status: int = 1
    bounces: int = 0
    #: epoch seconds of the last counted bounce (0 = none recorded)
    last_bounce: float = 0.0

    @property
    def active(self) -> bool:
        return self.status == 1


@dataclass(frozen=True)
class MailingList:
    target: InternalAddress
    address: str
    status: int = 1
    posting: str = "open"
    moderators: tuple[str, ...] = ()
    options: Mapping[str, str] = field(default_factory=dict)
    members: tuple[Member, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.status == 1

    @property
    def key(self) -> str:
        return self.target.value.upper()

    @property
    def local(self) -> str:
        return self.address.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    def role_address(self, role: str) -> str:
        return self.address if role == "post" else f"{self.local}-{role}@{self.domain}"

    def role_target(self, role: str) -> InternalAddress:
        return self.target if role == "post" else InternalAddress("LS", f"{self.target.value}+{role}")

    def member(self, address: str) -> Member | None:
        key = address.lower()
        for m in self.members:
            if m.address.lower() == key:
                return m
        return None

    def is_moderator(self, address: str) -> bool:
        return address.lower() in (m.lower() for m in self.moderators)

    @property
    def subject_prefix(self) -> str:
        return self.options.get("subject_prefix", "")

    @property
    def bounce_limit(self) -> int:
        try:
            return max(1, int(self.options.get("bounce_limit", "5")))
        except ValueError:
            return 5

    @property
    def bounce_reset(self) -> float:
        """Seconds without a bounce after which a member's count starts again (``bounce_reset_days``,
        default 30; 0 = never)."""
        try:
            return max(0.0, float(self.options.get("bounce_reset_days", "30"))) * 86400.0
        except ValueError:
            return 30 * 86400.0

    @property
    def dmarc_rewrite(self) -> bool:
        return self.options.get("dmarc", "1").strip().lower() not in ("0", "no", "false", "off")


def split_target(target: InternalAddress) -> tuple[str, str]:
    """``[LS:PO/NAME+role]`` -> (``PO/NAME`` upper-case, role)."""
    value, plus, role = target.value.partition("+")
    return value.upper(), (role.lower() if plus else "post")


@dataclass(frozen=True)
class ListIndex:
    by_key: dict[str, MailingList]
    by_address: dict[str, tuple[MailingList, str]]

    def find(self, address: str) -> tuple[MailingList, str] | None:
        """(list, role) for any of a list's four addresses, or None."""
        return self.by_address.get(address.lower())

    def get(self, target: InternalAddress | str) -> tuple[MailingList, str] | None:
        if isinstance(target, str):
            try:
                target = InternalAddress.parse(target)
            except AddressError:
                return None
        if target.scheme != "LS":
            return None
        key, role = split_target(target)
        ml = self.by_key.get(key)
        if ml is None or role not in ROLES:
            return None
        return ml, role

    def __iter__(self):
        return iter(self.by_key.values())


def build_index(list_rows: Any, member_rows: Any) -> ListIndex:
    members: dict[str, list[Member]] = {}
    for row in member_rows:
        try:
            key = InternalAddress.parse(row[0]).value.upper()
            addr = parse_mailbox(row[1])
            if addr is None:
                continue
            status = int(row[2]) if len(row) > 2 and row[2] else 1
            bounces = int(row[3]) if len(row) > 3 and row[3] else 0
            last = float(row[4]) if len(row) > 4 and row[4].strip() else 0.0
        except (AddressError, ValueError, IndexError):
            continue
        members.setdefault(key, []).append(Member(str(addr), status, bounces, last))
    by_key: dict[str, MailingList] = {}
    by_address: dict[str, tuple[MailingList, str]] = {}
    for row in list_rows:
        try:
            target = InternalAddress.parse(row[0])
            if target.scheme != "LS":
                continue
            addr = parse_mailbox(row[1])
            if addr is None:
                continue
            status = int(row[2]) if len(row) > 2 and row[2] else 1
            posting = (row[3] if len(row) > 3 and row[3] else "open").lower()
            if posting not in POSTING_MODES:
                posting = "moderated"  # unknown: the safe choice
            moderators = tuple(m.strip() for m in (row[4] if len(row) > 4 else "").split(";") if m.strip())
            options = parse_options(row[5]) if len(row) > 5 else {}
        except (AddressError, ValueError, IndexError):
            continue
        key = target.value.upper()
        ml = MailingList(target, str(addr), status, posting, moderators, dict(options),
                         tuple(members.get(key, ())))
        by_key[key] = ml
        for role in ROLES:
            by_address[ml.role_address(role).lower()] = (ml, role)
    return ListIndex(by_key, by_address)


_lock = threading.Lock()
_cache: tuple[Any, Any, ListIndex] | None = None


def lists(snap: Any) -> ListIndex:
    """The lists of a providers snapshot (parsed once per version of the two tables)."""
    global _cache
    list_rows, member_rows = snap.rows(LISTS), snap.rows(LIST_MEMBERS)
    cached = _cache
    if cached is not None and cached[0] is list_rows and cached[1] is member_rows:
        return cached[2]
    index = build_index(list_rows, member_rows)
    with _lock:
        _cache = (list_rows, member_rows, index)
    return index

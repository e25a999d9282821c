"""LIST as RFC 5258 (LIST-EXTENDED), RFC 6154 (SPECIAL-USE) and RFC 5819 (LIST-STATUS) define it.

One job: parse a LIST command's arguments and decide which mailboxes it returns, with which
attributes and extended data.  The session sends the lines (and, for ``RETURN (STATUS ...)``,
the STATUS responses).  Pure logic, unit-tested directly.

Clients use the extended forms to save round trips: Thunderbird and K-9 ask
``LIST (SUBSCRIBED) "" "*"`` instead of LSUB, Apple Mail ``RETURN (SPECIAL-USE)``, and a
client offered LIST-STATUS gets every folder's counts in one command instead of a STATUS per
folder.  ``\\HasChildren``/``\\HasNoChildren`` and the special-use attributes are always sent
(RFC 5258 §4 and RFC 6154 §2 allow that), so ``RETURN (CHILDREN)`` and ``RETURN (SPECIAL-USE)``
change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from tmmail.imap import names
from tmmail.imap.encoding import Atom, ParseError

#: the items STATUS (and LIST ... RETURN (STATUS (...))) can report
STATUS_ITEMS = (b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN", b"HIGHESTMODSEQ")
SPECIAL_USE_ATTRS = frozenset({"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"})
_SELECT_OPTIONS = frozenset({b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH", b"SPECIAL-USE"})
_RETURN_OPTIONS = frozenset({b"SUBSCRIBED", b"CHILDREN", b"SPECIAL-USE", b"STATUS"})


@dataclass
class ListRequest:
    """What one LIST command asks for."""

    reference: str
    patterns: list[str]
    subscribed: bool = False  # selection: subscribed names only (RFC 5258 §3.1)
    special_use: bool = False  # selection: special-use mailboxes only (RFC 6154 §3)
    recursive: bool = False  # RECURSIVEMATCH: parents of matches get CHILDINFO
    return_subscribed: bool = False  # mark subscribed names \Subscribed
    status_items: list[bytes] | None = None  # RETURN (STATUS (...)), RFC 5819


@dataclass
class ListEntry:
    """One ``* LIST`` line: the name, its attributes and CHILDINFO (RFC 5258 §3.5)."""

    name: str
    attributes: list[str]
    childinfo: list[str] = field(default_factory=list)

    @property
    def selectable(self) -> bool:
        return not any(a in ("\\Noselect", "\\NonExistent") for a in self.attributes)


def _atom(tok: Any, what: str) -> bytes:
    if isinstance(tok, list) or not isinstance(tok, Atom):
        raise ParseError(f"{what} must be an atom")
    return bytes(tok).upper()


def parse_list(args: list, string: Callable[[Any, str], bytes]) -> ListRequest:
    """``[(selection)] reference mailbox|(mailbox ...) [RETURN (options)]`` (RFC 5258 §6).

    Unknown options, RECURSIVEMATCH with nothing to modify, and a malformed RETURN are
    ``BAD`` (RFC 5258 §3: a server MUST reject what it does not understand rather than
    return a different list than the client asked for).  ``string`` reads an astring token.
    """
    req = ListRequest("", [])
    if args and isinstance(args[0], list):
        opts = [_atom(o, "A LIST selection option") for o in args[0]]
        unknown = [o for o in opts if o not in _SELECT_OPTIONS]
        if unknown:
            raise ParseError("Unknown LIST selection option " + unknown[0].decode("ascii", "replace"))
        req.subscribed = b"SUBSCRIBED" in opts
        req.special_use = b"SPECIAL-USE" in opts
        req.recursive = b"RECURSIVEMATCH" in opts
        if req.recursive and not (req.subscribed or req.special_use):
            raise ParseError("RECURSIVEMATCH needs another selection option")
        req.return_subscribed = req.subscribed
        args = args[1:]
    if len(args) > 2:
        if len(args) != 4 or isinstance(args[2], list) or not isinstance(args[2], Atom) \
                or args[2].upper() != b"RETURN" or not isinstance(args[3], list):
            raise ParseError("LIST expects [(options)] reference mailbox [RETURN (options)]")
        _parse_return(args[3], req)
        args = args[:2]
    if len(args) != 2:
        raise ParseError("LIST expects a reference and a mailbox pattern")
    raw_ref = string(args[0], "Reference")
    req.reference = names.decode_name(raw_ref) if raw_ref else ""
    pats = args[1] if isinstance(args[1], list) else [args[1]]
    if not pats:
        raise ParseError("LIST expects at least one mailbox pattern")
    for p in pats:
        raw = string(p, "Pattern")
        req.patterns.append(names.decode_name(raw) if raw else "")
    return req


def _parse_return(opts: list, req: ListRequest) -> None:
    i = 0
    while i < len(opts):
        opt = _atom(opts[i], "A LIST return option")
        if opt not in _RETURN_OPTIONS:
            raise ParseError("Unknown LIST return option " + opt.decode("ascii", "replace"))
        if opt == b"SUBSCRIBED":
            req.return_subscribed = True
        elif opt == b"STATUS":
            i += 1
            if i >= len(opts) or not isinstance(opts[i], list) or not opts[i] or req.status_items:
                raise ParseError("RETURN (STATUS ...) expects one list of STATUS items")
            req.status_items = parse_status_items(opts[i])
        i += 1


def parse_status_items(items: Iterable[Any]) -> list[bytes]:
    """The items of STATUS (RFC 3501 §6.3.10), upper-cased; unknown ones are ``BAD``."""
    out = []
    for it in items:
        if isinstance(it, list) or bytes(it).upper() not in STATUS_ITEMS:
            raise ParseError("Unknown STATUS item")
        out.append(bytes(it).upper())
    return out


def _ancestors(name: str) -> Iterable[str]:
    levels = name.split(names.SEP)
    for i in range(len(levels) - 1, 0, -1):
        yield names.SEP.join(levels[:i])


def select(req: ListRequest, folders: Iterable[Any], subscriptions: Iterable[str]) -> list[ListEntry]:
    """The LIST lines for ``req``: ``folders`` are the store's FolderInfo (INBOX first, implied
    parents ``\\Noselect``), ``subscriptions`` the subscribed names (they may not exist)."""
    matchers = [names.list_pattern(req.reference, p) for p in req.patterns]

    def matches(name: str) -> bool:
        return any(m.match(name) for m in matchers)

    existing = {f.name: f for f in folders}
    subs = {names.normalize(s) for s in subscriptions} if (req.subscribed or req.return_subscribed) else set()

    def special(name: str) -> bool:
        info = existing.get(name)
        return info is not None and any(a in SPECIAL_USE_ATTRS for a in info.attributes)

    def selected(name: str) -> bool:
        """Does ``name`` itself satisfy the selection options?"""
        if req.subscribed and name not in subs:
            return False
        if req.special_use and not special(name):
            return False
        return True

    if req.subscribed:
        candidates = set(subs)
    else:
        candidates = set(existing)
    # RECURSIVEMATCH: a parent of a selected name the pattern does not reach is listed (if it
    # matches the pattern itself) with CHILDINFO, even if it does not satisfy the options
    # (RFC 5258 §3.1, §3.5).  A selected child the pattern lists anyway tells the client
    # itself, so it adds nothing: "*" gets no CHILDINFO, as from Dovecot.
    parents_of_selected: set[str] = set()
    if req.recursive:
        for name in candidates:
            if selected(name) and not matches(name):
                parents_of_selected.update(_ancestors(name))
        candidates |= parents_of_selected
    childinfo = [o for o, on in (("SUBSCRIBED", req.subscribed), ("SPECIAL-USE", req.special_use)) if on]

    out = []
    for name in sorted(candidates, key=lambda n: (n != "INBOX", n)):
        if not matches(name):
            continue
        is_selected = selected(name)
        if not is_selected and name not in parents_of_selected:
            continue
        info = existing.get(name)
        if info is not None:
            attrs = list(info.attributes)
        else:
            # subscribed but gone (or only a parent of a subscribed name): RFC 5258 §3.4
            has_children = any(n.startswith(name + names.SEP) for n in existing)
            attrs = ["\\NonExistent", "\\HasChildren" if has_children else "\\HasNoChildren"]
        if req.return_subscribed and name in subs:
            attrs.append("\\Subscribed")
        entry = ListEntry(name, attrs)
        if name in parents_of_selected:
            entry.childinfo = childinfo
        out.append(entry)
    return out


__all__ = ["ListEntry", "ListRequest", "STATUS_ITEMS", "parse_list", "parse_status_items", "select"]

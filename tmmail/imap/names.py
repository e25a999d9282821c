"""Mailbox names as IMAP clients send them: modified UTF-7, INBOX, LIST patterns.

One job: the client-facing name space (RFC 3501 §5.1.3 and §6.3.8).  Names become text with
``/`` as the hierarchy separator; ``INBOX`` is case-insensitive, every other name is
case-sensitive.  Which names may exist on disk is the store's decision
(``Store.validate_name``).  Pure logic.
"""

from __future__ import annotations

import re
from functools import lru_cache

from tmmail.imap.encoding import ParseError, utf7_decode

SEP = "/"


class BadName(ParseError):
    """A malformed mailbox name or pattern; ``str(e)`` is the reason given to the client."""


def normalize(name: str) -> str:
    """``INBOX`` in any case becomes ``INBOX`` (also as the first level of a hierarchy)."""
    if name.upper() == "INBOX":
        return "INBOX"
    if name[:6].upper() == "INBOX" + SEP:
        return "INBOX" + name[5:]
    return name


def decode_name(raw: bytes) -> str:
    """Client bytes (modified UTF-7; 8-bit UTF-8 tolerated) to a normalised name."""
    if any(b > 0x7E for b in raw):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadName("Mailbox name is neither modified UTF-7 nor UTF-8") from None
    else:
        try:
            text = utf7_decode(raw)
        except ParseError as e:
            raise BadName(str(e)) from None
    return normalize(text)


#: a pattern with more wildcards than this is matched by the bit-parallel automaton below:
#: a backtracking regex costs O(len(name) ** wildcards) ("*a*a*a*a*a*a*a*b" against a name of
#: 60 a's took 7 s of the reactor thread)
_REGEX_WILDCARDS = 2


@lru_cache(maxsize=256)
def _compile(pattern: str) -> "re.Pattern[str] | _Glob":
    # runs of wildcards are one wildcard ("*" wins over "%")
    collapsed: list[str] = []
    for ch in pattern:
        if ch in "*%" and collapsed and collapsed[-1] in "*%":
            if ch == "*":
                collapsed[-1] = "*"
            continue
        collapsed.append(ch)
    if sum(1 for ch in collapsed if ch in "*%") > _REGEX_WILDCARDS:
        return _Glob(collapsed)
    out = []
    for ch in collapsed:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append("[^/]*")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out) + r"\Z", re.DOTALL)


class _Glob:
    """``*`` / ``%`` matching in O(len(name)) big-integer steps (an NFA whose state set is an
    int; bit i: the first i pattern characters matched), whatever the pattern."""

    def __init__(self, pattern: list[str]) -> None:
        self.size = len(pattern)
        self.literals = sum(1 for ch in pattern if ch not in "*%")
        self.masks: dict[str, int] = {}
        self.star = self.pct = 0
        for i, ch in enumerate(pattern):
            if ch == "*":
                self.star |= 1 << i
            elif ch == "%":
                self.pct |= 1 << i
            else:
                self.masks[ch] = self.masks.get(ch, 0) | (1 << i)
        self.wild = self.star | self.pct

    def _close(self, state: int) -> int:
        # a wildcard may match nothing; runs were collapsed, so one step suffices
        return state | ((state & self.wild) << 1)

    def match(self, name: str) -> bool:
        if len(name) < self.literals:
            return False
        state = self._close(1)
        masks, star, pct = self.masks, self.star, self.pct
        for ch in name:
            keep = state & (star if ch == "/" else self.wild)
            state = self._close(((state & masks.get(ch, 0)) << 1) | keep)
            if not state:
                return False
        return bool(state >> self.size & 1)


def list_pattern(reference: str, pattern: str) -> "re.Pattern[str] | _Glob":
    """The matcher (``.match(name)``) for LIST ``reference pattern`` (RFC 3501 §6.3.8:
    reference is a prefix)."""
    if reference and pattern.startswith(SEP):
        full = pattern
    else:
        full = reference + pattern
    if full[:5].upper() == "INBOX":  # INBOX is case-insensitive, also as a prefix
        full = "INBOX" + full[5:]
    return _compile(full)

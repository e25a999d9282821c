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


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append("[^/]*")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def list_pattern(reference: str, pattern: str) -> re.Pattern[str]:
    """The regex for LIST ``reference pattern`` (RFC 3501 §6.3.8: reference is a prefix)."""
    if reference and pattern.startswith(SEP):
        full = pattern
    else:
        full = reference + pattern
    if full[:5].upper() == "INBOX":  # INBOX is case-insensitive, also as a prefix
        full = "INBOX" + full[5:]
    return _compile(full)

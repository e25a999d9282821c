"""Errors and small helpers shared by the store modules (tmmail.store, tmmail.store_folder)."""

from __future__ import annotations

import errno
from typing import Iterable

from tmmail import maildir, uidlist
from tmmail.store_index import FolderIndex, keyword_letters
from tmmail.store_names import InvalidName as _InvalidName

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


class StoreError(Exception):
    """Base of the store's errors; ``str(e)`` is a short text for the client (IMAP ``NO``)."""


class InvalidName(StoreError, _InvalidName):
    pass


class NoSuchFolder(StoreError):
    pass


class FolderExists(StoreError):
    pass


class KeywordLimit(StoreError):
    pass


class NoSuchMessage(StoreError):
    pass


class StoreBusy(StoreError):
    pass


def _fsync_dir(path: str) -> None:
    try:
        maildir.fsync_dir(path)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise


def _busy(fn):
    """Turn a uidlist/keywords lock timeout into StoreBusy."""
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except uidlist.LockTimeout as e:
            raise StoreBusy("mailbox is locked by another process, try again") from e
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _flag_letters(flags: Iterable[str]) -> tuple[str, list[str]]:
    """(system flag letters, keywords) from IMAP flags; \\Recent is ignored."""
    letters = []
    keywords = []
    for flag in flags:
        if flag.startswith("\\"):
            letter = maildir.FLAG_LETTERS.get(flag.lower())
            if letter:
                letters.append(letter)
            elif flag.lower() != "\\recent":
                raise StoreError(f"invalid flag {flag}")
        else:
            if not flag or any(c in flag for c in ' ()[{%*"\\]') or any(ord(c) < 0x21 or ord(c) > 0x7E for c in flag):
                raise StoreError(f"invalid keyword {flag!r}")
            if flag.lower() not in (k.lower() for k in keywords):
                keywords.append(flag)
    return "".join(letters), keywords


def _ensure_keywords(index: FolderIndex, keywords: list[str]) -> dict[str, str]:
    """Letters for these keywords in this folder (adding them to dovecot-keywords)."""
    if not keywords:
        return {}
    letters = keyword_letters(index.keywords)
    if any(k.lower() not in letters for k in keywords):
        try:
            maildir.add_keywords(index.path, keywords)
        except OverflowError:
            raise KeywordLimit("too many keywords in this mailbox (26)") from None
        index.refresh_keywords()
        letters = keyword_letters(index.keywords)
    return {k.lower(): letters[k.lower()] for k in keywords}

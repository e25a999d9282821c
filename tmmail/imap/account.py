"""The mail store a login opens, and the mapping of store errors to IMAP replies.

One job: turn a successful login (``tmmail.cred`` AuthEntry) into the mailbox's
:class:`tmmail.store.Store`, and a ``StoreError`` into the ``NO [code] text`` of RFC 5530.
"""

from __future__ import annotations

import os
from typing import Any

from tmmail import maildir


def open_store(settings: Any, entry: Any) -> Any:
    """The Store of ``entry``'s Maildir, created if delivery never made it (blocking)."""
    from tmmail.store import Store

    path = maildir.mailbox_path(settings.postoffices_dir, entry.postoffice, entry.mailbox)
    if not os.path.isdir(os.path.join(path, "cur")):
        maildir.create(path)
    return Store(path)


#: StoreError subclass name -> IMAP response code (RFC 5530)
_CODES = {
    "NoSuchFolder": b"NONEXISTENT",
    "FolderExists": b"ALREADYEXISTS",
    "KeywordLimit": b"LIMIT",
    "NoSuchMessage": b"EXPUNGEISSUED",
    "StoreBusy": b"INUSE",
    "InvalidName": b"CANNOT",
    "QuotaExceeded": b"OVERQUOTA",
    "OverQuota": b"OVERQUOTA",
}


def is_store_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "StoreError" for cls in type(exc).__mro__)


def store_error_reply(exc: BaseException, trycreate: bool = False) -> bytes:
    """``NO [CODE] text`` for a StoreError; ``trycreate`` for APPEND/COPY/MOVE targets."""
    name = type(exc).__name__
    code = _CODES.get(name)
    if trycreate and name == "NoSuchFolder":
        code = b"TRYCREATE"
    text = (str(exc) or name).replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")[:300]
    if code:
        return b"NO [%s] %s" % (code, text)
    return b"NO " + text

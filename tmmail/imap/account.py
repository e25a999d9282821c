"""The mail store a login opens, its quota, and the mapping of store errors to IMAP replies.

One job: turn a successful login (``tmmail.cred`` AuthEntry) into the mailbox's
:class:`tmmail.store.Store`, check MAILBOX.tab's quota before APPEND/COPY add data (RFC 9208
``[OVERQUOTA]``, the same rule and sizer SMTP delivery uses), and turn a ``StoreError`` into
the ``NO [code] text`` of RFC 5530.
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


class OverQuota(Exception):
    """Adding the data would pass the mailbox's QUOTA_BYTES."""


def _sizer() -> Any:
    global _SIZER
    if _SIZER is None:
        from tmmail.connectors.postoffice import MaildirSizer

        _SIZER = MaildirSizer()
    return _SIZER


_SIZER: Any = None


def mailbox_quota(provider_store: Any, entry: Any) -> int:
    """QUOTA_BYTES of the login's mailbox (0 = none), from the current provider tables."""
    if provider_store is None or entry is None:
        return 0
    mbx = provider_store.current().mailbox(entry.postoffice, entry.mailbox)
    return mbx.quota if mbx is not None else 0


def mailbox_size(root: str) -> int:
    """Bytes in all folders of the Maildir++ at ``root`` (blocking; cached per directory)."""
    return _sizer().size(root)


def check_quota(root: str, quota: int, adding: int) -> None:
    """Raise OverQuota if ``adding`` bytes would pass ``quota`` (blocking: scans the Maildir)."""
    if quota > 0 and adding > 0 and mailbox_size(root) + adding > quota:
        raise OverQuota("Quota exceeded (mailbox is full)")


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
    """A StoreError (or OverQuota): answered with NO, not as a server bug."""
    return isinstance(exc, OverQuota) or any(cls.__name__ == "StoreError" for cls in type(exc).__mro__)


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

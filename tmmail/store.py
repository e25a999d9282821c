"""The mail store: one Maildir++ per mailbox, shared by POP3 and IMAP (and Dovecot).

``Store`` handles folders (list, create, delete, rename, subscriptions, status, append); a
``Folder`` is one session's view of a folder (SELECT/EXAMINE): sequence numbers, \\Recent,
flag changes, expunge, copy and move, and ``refresh()`` to learn what other sessions and
processes changed.  The contract is in docs/contracts.md ("Store"), the design in docs/store.md.

Blocking: metadata calls are fast (stat + cached index); calls that write message data fsync and
belong in a thread.  Message files hold LF line endings.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from tmmail import maildir, store_names, uidlist
from tmmail.store_common import (SYSTEM_FLAGS, FolderExists, InvalidName, KeywordLimit, NoSuchFolder,
                                 NoSuchMessage, StoreBusy, StoreError, _busy, _ensure_keywords,
                                 _flag_letters, _fsync_dir)
from tmmail.store_folder import Changes, Folder
from tmmail.store_index import FolderIndex, MessageInfo
from tmmail.store_names import InvalidName as _InvalidName

__all__ = [
    "Store", "Folder", "MessageInfo", "Changes", "FolderInfo", "FolderStatus", "StoreError",
    "InvalidName", "NoSuchFolder", "FolderExists", "KeywordLimit", "NoSuchMessage", "StoreBusy",
    "SYSTEM_FLAGS",
]

SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk",
               "Archive": "\\Archive"}


@dataclass(frozen=True)
class FolderInfo:
    name: str
    attributes: tuple[str, ...]
    subscribed: bool


@dataclass(frozen=True)
class FolderStatus:
    messages: int
    recent: int
    unseen: int
    uidnext: int
    uidvalidity: int
    highestmodseq: int = 0


_indexes: dict[str, FolderIndex] = {}
_indexes_lock = threading.Lock()


def _index_for(path: str, root: str) -> FolderIndex:
    key = os.path.realpath(path)
    with _indexes_lock:
        idx = _indexes.get(key)
        if idx is None:
            idx = _indexes[key] = FolderIndex(path, root)
        return idx


def _forget_indexes(prefix: str) -> None:
    prefix = os.path.realpath(prefix)
    with _indexes_lock:
        for key in [k for k in _indexes if k == prefix or k.startswith(prefix + ".")]:
            _indexes.pop(key).close()


class Store:
    """All folders of one mailbox (Maildir++ root).  Cheap to create; indexes are shared."""

    def __init__(self, root: str) -> None:
        self.root = root

    # -- names ----------------------------------------------------------------------------------

    def validate_name(self, name: str) -> str:
        try:
            return store_names.validate(name)
        except _InvalidName as e:
            raise InvalidName(str(e)) from None

    def path_of(self, name: str) -> str:
        name = self.validate_name(name)
        return self.root if name == "INBOX" else os.path.join(self.root, store_names.folder_to_dir(name))

    def exists(self, name: str) -> bool:
        """Is ``name`` a folder (not merely the parent of one)?"""
        return os.path.isdir(os.path.join(self.path_of(name), "cur"))

    def _index(self, name: str) -> FolderIndex:
        path = self.path_of(name)
        if not os.path.isdir(os.path.join(path, "cur")):
            raise NoSuchFolder(f"mailbox {name} does not exist")
        return _index_for(path, self.root)

    # -- folders --------------------------------------------------------------------------------

    def _folder_names(self) -> list[str]:
        names = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.name.startswith(".") or not entry.is_dir():
                continue
            name = store_names.dir_to_folder(entry.name)
            if name is None or name == "INBOX":
                continue
            if os.path.isdir(os.path.join(entry.path, "cur")):
                names.append(name)
        return names

    def list_folders(self) -> list[FolderInfo]:
        """Every folder, INBOX first; parents implied by children are listed \\Noselect."""
        real = set(self._folder_names())
        real.add("INBOX")
        every = set(real)
        for name in real:
            levels = name.split("/")
            for i in range(1, len(levels)):
                every.add("/".join(levels[:i]))
        has_children = {"/".join(n.split("/")[:-1]) for n in every if "/" in n}
        subscribed = set(store_names.read_subscriptions(self.root))
        out = []
        for name in sorted(every, key=lambda n: (n != "INBOX", n)):
            attrs = ["\\HasChildren" if name in has_children else "\\HasNoChildren"]
            if name not in real:
                attrs.insert(0, "\\Noselect")
            elif name in SPECIAL_USE:
                attrs.append(SPECIAL_USE[name])
            out.append(FolderInfo(name, tuple(attrs), name in subscribed))
        return out

    def create_folder(self, name: str) -> None:
        """Create ``name`` (and missing parents); FolderExists if it is there already."""
        name = self.validate_name(name)
        if name == "INBOX" or self.exists(name):
            raise FolderExists(f"mailbox {name} already exists")
        levels = name.split("/")
        for i in range(1, len(levels) + 1):
            part = "/".join(levels[:i])
            if part == "INBOX":
                continue
            path = self.path_of(part)
            if os.path.isdir(os.path.join(path, "cur")):
                continue
            self._make_folder_dir(path)

    def _make_folder_dir(self, path: str) -> None:
        tmp = os.path.join(self.root, "tmp", f".create.{maildir.unique_base()}")
        os.makedirs(tmp)
        for sub in ("cur", "new", "tmp"):
            os.mkdir(os.path.join(tmp, sub))
        open(os.path.join(tmp, "maildirfolder"), "wb").close()
        ul = uidlist.UidList(maildir.allocate_uidvalidity(self.root))
        with open(os.path.join(tmp, uidlist.UIDLIST), "wb") as f:
            f.write(uidlist.format(ul))
        try:
            os.rename(tmp, path)  # atomic: a folder appears complete or not at all
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FolderExists("mailbox already exists") from None
            raise
        _fsync_dir(self.root)
        _forget_indexes(path)

    def delete_folder(self, name: str) -> None:
        """Remove a folder and its messages; children stay (RFC 3501 §6.3.4)."""
        name = self.validate_name(name)
        if name == "INBOX":
            raise InvalidName("INBOX cannot be deleted")
        path = self.path_of(name)
        if not os.path.isdir(os.path.join(path, "cur")):
            raise NoSuchFolder(f"mailbox {name} does not exist")
        trash = os.path.join(self.root, "tmp", f".deleted.{maildir.unique_base()}")
        os.rename(path, trash)
        _fsync_dir(self.root)
        _forget_indexes(path)
        maildir.notify(path)
        shutil.rmtree(trash, ignore_errors=True)

    def rename_folder(self, old: str, new: str) -> None:
        """Rename a folder and its children; renaming INBOX moves its messages (RFC 3501 §6.3.5)."""
        old = self.validate_name(old)
        new = self.validate_name(new)
        if new == "INBOX" or self.exists(new):
            raise FolderExists(f"mailbox {new} already exists")
        if old == "INBOX":
            self.create_folder(new)
            inbox = self.open("INBOX", claim_recent=False)
            inbox.move([m.uid for m in inbox.messages], new)
            return
        if not self.exists(old):
            raise NoSuchFolder(f"mailbox {old} does not exist")
        if new.startswith(old + "/"):
            raise InvalidName("cannot rename a mailbox into itself")
        # parents of the new name
        parent = "/".join(new.split("/")[:-1])
        if parent and parent != "INBOX" and not self.exists(parent):
            self.create_folder(parent)
        moves = [(old, new)]
        for child in self._folder_names():
            if child.startswith(old + "/"):
                moves.append((child, new + child[len(old):]))
        for src, dst in moves:
            if os.path.exists(self.path_of(dst)):
                raise FolderExists(f"mailbox {dst} already exists")
        for src, dst in moves:
            os.rename(self.path_of(src), self.path_of(dst))
            _forget_indexes(self.path_of(src))
            maildir.notify(self.path_of(src))
        _fsync_dir(self.root)
        subs = store_names.read_subscriptions(self.root)
        renamed = [dict(moves).get(s, s) for s in subs]
        if renamed != subs:
            store_names.write_subscriptions(self.root, renamed)

    # -- subscriptions --------------------------------------------------------------------------

    _subs_lock = threading.Lock()

    def subscriptions(self) -> list[str]:
        return store_names.read_subscriptions(self.root)

    def subscribe(self, name: str) -> None:
        name = self.validate_name(name)
        with self._subs_lock:
            subs = store_names.read_subscriptions(self.root)
            if name not in subs:
                store_names.write_subscriptions(self.root, subs + [name])

    def unsubscribe(self, name: str) -> None:
        name = self.validate_name(name)
        with self._subs_lock:
            subs = store_names.read_subscriptions(self.root)
            if name in subs:
                store_names.write_subscriptions(self.root, [s for s in subs if s != name])

    # -- messages -------------------------------------------------------------------------------

    @_busy
    def status(self, name: str) -> FolderStatus:
        idx = self._index(name)
        with idx.lock:
            idx.sync()
            new, unseen = idx.counts()
            recent = new + idx.unclaimed_recent()
            return FolderStatus(len(idx.by_uid), recent, unseen, idx.nextuid, idx.uidvalidity,
                                idx.highestmodseq)

    @_busy
    def append(self, name: str, data: bytes, flags: Iterable[str] = (),
               internal_date: float | None = None) -> tuple[int, int]:
        """Store a message durably in ``name``; returns (uidvalidity, uid) for APPENDUID."""
        idx = self._index(name)
        letters, keywords = _flag_letters(flags)
        with idx.lock:
            idx.sync()
        # not under idx.lock: the keywords lock may be held by another writer for a while
        letters += "".join(_ensure_keywords(idx, keywords).values())
        data = maildir.to_lf(data)  # stored LF; served CRLF gives back exactly what came in
        base = f"{maildir.unique_base()},S={len(data)},W={maildir.wire_size(data)}"
        tmp = os.path.join(idx.path, "tmp", base)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        if internal_date is not None:
            os.utime(tmp, (internal_date, internal_date))
        # RFC 3501 §6.3.11: the appended message is \Recent (for the next session that selects the
        # folder read-write, or the one that has it selected).  Without flags it goes to new/, as
        # Dovecot's maildir-save.c does, and the view that moves it to cur/ gets \Recent (across
        # processes); with flags it must go to cur/ ("files in new/ can't have flags"), and the
        # shared index hands \Recent to the next read-write view of this process.
        if letters:
            subdir, final = "cur", maildir.make_name(base, letters)
            idx.expect_recent(base)
        else:
            subdir, final = "new", base

        def place() -> list[str]:
            os.rename(tmp, os.path.join(idx.path, subdir, final))
            _fsync_dir(os.path.join(idx.path, subdir))
            return [base]

        try:
            ul = uidlist.update(idx.path, place, uidvalidity=lambda: maildir.allocate_uidvalidity(self.root))
        except BaseException:
            idx.forget_recent(base)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        idx.adopt_uidlist(ul)
        maildir.notify(idx.path)
        return ul.uidvalidity, ul.records[base].uid

    def watch(self, name: str, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(name)`` after this process changes the folder (any thread)."""
        path = self.path_of(name)
        return maildir.watch(path, lambda _path: callback(name))

    @_busy
    def open(self, name: str, readonly: bool = False, claim_recent: bool | None = None) -> "Folder":
        name = self.validate_name(name)
        return Folder(self, name, self._index(name), readonly,
                      (not readonly) if claim_recent is None else claim_recent)

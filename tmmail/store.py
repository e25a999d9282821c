"""The mail store: one Maildir++ per mailbox, shared by POP3 and IMAP (and Dovecot).

``Store`` handles folders (list, create, delete, rename, subscriptions, status, append); a
``Folder`` is one session's view of a folder (SELECT/EXAMINE): sequence numbers, \\Recent,
flag changes, expunge, copy and move, and ``refresh()`` to learn what other sessions and
processes changed.  The contract is in docs/contracts.md ("Store"), the design in docs/store.md.

Blocking: metadata calls are fast (stat + cached index); calls that write message data fsync and
belong in a thread.  Message files hold LF line endings.
"""

from __future__ import annotations

import bisect
import errno
import os
import shutil
import threading
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable

from tmmail import maildir, store_names, uidlist
from tmmail.store_index import FolderGone, FolderIndex, MessageInfo, keyword_letters
from tmmail.store_names import InvalidName as _InvalidName

__all__ = [
    "Store", "Folder", "MessageInfo", "Changes", "FolderInfo", "FolderStatus", "StoreError",
    "InvalidName", "NoSuchFolder", "FolderExists", "KeywordLimit", "NoSuchMessage", "StoreBusy",
]

SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk",
               "Archive": "\\Archive"}
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


@dataclass
class Changes:
    #: (seq before this refresh, uid), descending seq: send EXPUNGE in this order
    expunged: list[tuple[int, int]] = field(default_factory=list)
    #: appended to folder.messages (send EXISTS)
    new: list[MessageInfo] = field(default_factory=list)
    #: (seq after expunges, info) of messages whose flags others changed (send FETCH FLAGS)
    flags: list[tuple[int, MessageInfo]] = field(default_factory=list)
    exists: int = 0
    recent: int = 0
    uidvalidity_changed: bool = False

    def __bool__(self) -> bool:
        return bool(self.expunged or self.new or self.flags or self.uidvalidity_changed)


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
            del _indexes[key]


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

    def _exists(self, name: str) -> bool:
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
        if name == "INBOX" or self._exists(name):
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
        if new == "INBOX" or self._exists(new):
            raise FolderExists(f"mailbox {new} already exists")
        if old == "INBOX":
            self.create_folder(new)
            inbox = self.open("INBOX", claim_recent=False)
            inbox.move([m.uid for m in inbox.messages], new)
            return
        if not self._exists(old):
            raise NoSuchFolder(f"mailbox {old} does not exist")
        if new.startswith(old + "/"):
            raise InvalidName("cannot rename a mailbox into itself")
        # parents of the new name
        parent = "/".join(new.split("/")[:-1])
        if parent and parent != "INBOX" and not self._exists(parent):
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
            return FolderStatus(len(idx.by_uid), new, unseen, idx.nextuid, idx.uidvalidity)

    @_busy
    def append(self, name: str, data: bytes, flags: Iterable[str] = (),
               internal_date: float | None = None) -> tuple[int, int]:
        """Store a message durably in ``name``; returns (uidvalidity, uid) for APPENDUID."""
        idx = self._index(name)
        letters, keywords = _flag_letters(flags)
        with idx.lock:
            idx.sync()
            letters += "".join(_ensure_keywords(idx, keywords).values())
        data = data.replace(b"\r\n", b"\n")
        lines = data.count(b"\n")
        base = f"{maildir.unique_base()},S={len(data)},W={len(data) + lines}"
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
        final = maildir.make_name(base, letters)

        def place() -> list[str]:
            os.rename(tmp, os.path.join(idx.path, "cur", final))
            _fsync_dir(os.path.join(idx.path, "cur"))
            return [base]

        try:
            ul = uidlist.update(idx.path, place, uidvalidity=lambda: maildir.allocate_uidvalidity(self.root))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
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


class Folder:
    """One session's view of a folder: sequence numbers, \\Recent, pending expunges."""

    def __init__(self, store: Store, name: str, index: FolderIndex, readonly: bool, claim_recent: bool) -> None:
        self.store = store
        self.name = name
        self.readonly = readonly
        self._index = index
        self._claim = claim_recent
        self.recent: set[int] = set()
        self._gone: set[int] = set()
        with index.lock:
            index.sync()
            if claim_recent:
                self._claim_recent()
            self.messages: list[MessageInfo] = list(index.messages())
            self._uids = [m.uid for m in self.messages]
            self._version = index.version
            self.uidvalidity = index.uidvalidity

    # -- properties -----------------------------------------------------------------------------

    @property
    def uidnext(self) -> int:
        return self._index.nextuid

    @property
    def path(self) -> str:
        return self._index.path

    @property
    def permanent_flags(self) -> list[str]:
        kws = [k for k in self._index.keywords if k]
        out = list(SYSTEM_FLAGS) + kws
        if len(kws) < len(maildir.KEYWORD_LETTERS):
            out.append("\\*")
        return out

    @property
    def flags(self) -> list[str]:
        """FLAGS response: system flags and the keywords defined in this folder."""
        return list(SYSTEM_FLAGS) + [k for k in self._index.keywords if k]

    def seq_of(self, uid: int) -> int | None:
        i = bisect.bisect_left(self._uids, uid)
        if i < len(self._uids) and self._uids[i] == uid:
            return i + 1
        return None

    def info(self, uid: int) -> MessageInfo | None:
        seq = self.seq_of(uid)
        return self.messages[seq - 1] if seq else None

    # -- refresh --------------------------------------------------------------------------------

    def _claim_recent(self) -> None:
        idx = self._index
        if not idx.counts()[0]:
            return
        for info in list(idx.messages()):
            if info.subdir != "new":
                continue
            name = maildir.make_name(info.base, info.letters)
            try:
                os.rename(info.filename, os.path.join(idx.path, "cur", name))
            except FileNotFoundError:
                continue  # another session (or Dovecot) claimed it
            idx.replace(info, name, "cur", info.letters)
            self.recent.add(info.uid)

    @_busy
    def refresh(self, expunges: bool = True) -> Changes:
        idx = self._index
        changes = Changes()
        with idx.lock:
            idx.sync()
            if self._claim:
                self._claim_recent()
            if idx.version == self._version and not (expunges and self._gone):
                changes.exists = len(self.messages)
                changes.recent = len(self.recent)
                return changes
            if idx.uidvalidity != self.uidvalidity and idx.exists and idx.by_uid:
                changes.uidvalidity_changed = True
                return changes
            current = idx.by_uid
            kept: list[MessageInfo] = []
            changed: list[MessageInfo] = []
            for i, info in enumerate(self.messages):
                cur = current.get(info.uid)
                if cur is None or cur.base != info.base:
                    if expunges:
                        changes.expunged.append((i + 1, info.uid))
                        self._gone.discard(info.uid)
                        self.recent.discard(info.uid)
                    else:
                        self._gone.add(info.uid)
                        kept.append(info)
                    continue
                if cur is not info and cur.flags != info.flags:
                    changed.append(cur)
                kept.append(cur)
            top = self._uids[-1] if self._uids else 0
            changes.new = [m for m in idx.messages() if m.uid > top]
            self.messages = kept + changes.new
            self._uids = [m.uid for m in self.messages]
            self._version = idx.version
            changes.expunged.reverse()
            changes.flags = [(self.seq_of(m.uid) or 0, m) for m in changed]
            changes.exists = len(self.messages)
            changes.recent = len(self.recent)
            return changes

    # -- content --------------------------------------------------------------------------------

    def _current(self, uid: int) -> MessageInfo:
        if uid in self._gone:
            raise NoSuchMessage("message has been expunged")
        info = self._index.by_uid.get(uid)
        if info is None:
            raise NoSuchMessage("message has been expunged")
        return info

    def open(self, uid: int) -> BinaryIO:
        """The message file (LF line endings), following renames by other sessions."""
        info = self._current(uid)
        try:
            return open(info.filename, "rb")
        except FileNotFoundError:
            fresh = self._index.locate(info)
            if fresh is None:
                raise NoSuchMessage("message has been expunged") from None
            try:
                return open(fresh.filename, "rb")
            except FileNotFoundError:
                raise NoSuchMessage("message has been expunged") from None

    def read(self, uid: int) -> bytes:
        with self.open(uid) as f:
            return f.read()

    # -- flags ----------------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError("mailbox is read-only")

    @_busy
    def store_flags(self, uids: Iterable[int], flags: Iterable[str], mode: str = "add") -> list[tuple[int, MessageInfo]]:
        """Set/add/remove flags; returns (seq, info) of the messages whose flags changed."""
        self._writable()
        if mode not in ("set", "add", "remove"):
            raise ValueError(mode)
        sys_letters, keywords = _flag_letters(flags)
        idx = self._index
        out: list[tuple[int, MessageInfo]] = []
        with idx.lock:
            idx.sync()
            if mode == "remove":
                known = keyword_letters(idx.keywords)
                kw_letters = "".join(known[k.lower()] for k in keywords if k.lower() in known)
            else:
                kw_letters = "".join(_ensure_keywords(idx, keywords).values())
            wanted = set(sys_letters + kw_letters)
            managed = set("DFRST") | set(maildir.KEYWORD_LETTERS)
            for uid in sorted(set(uids)):
                seq = self.seq_of(uid)
                if seq is None or uid in self._gone:
                    continue
                info = idx.by_uid.get(uid)
                if info is None:
                    continue
                have = set(info.letters)
                if mode == "add":
                    new = have | wanted
                elif mode == "remove":
                    new = have - wanted
                else:
                    new = (have - managed) | wanted
                letters = maildir.sort_letters("".join(new))
                if letters == info.letters and info.subdir == "cur":
                    if self.messages[seq - 1] is not info:
                        self.messages[seq - 1] = info
                    continue
                fresh = self._rename_flags(info, letters)
                if fresh is None:
                    continue
                if fresh.flags != self.messages[seq - 1].flags:
                    out.append((seq, fresh))
                self.messages[seq - 1] = fresh
        if out:
            maildir.notify(idx.path)
        return out

    def _rename_flags(self, info: MessageInfo, letters: str) -> MessageInfo | None:
        idx = self._index
        for _attempt in range(3):
            name = maildir.make_name(info.base, letters)
            try:
                os.rename(info.filename, os.path.join(idx.path, "cur", name))
            except FileNotFoundError:
                info = idx.locate(info)
                if info is None:
                    return None
                continue
            return idx.replace(info, name, "cur", letters)
        return None

    # -- expunge --------------------------------------------------------------------------------

    @_busy
    def expunge(self, uids: Iterable[int] | None = None) -> list[tuple[int, int]]:
        """Delete \\Deleted messages (only those in ``uids`` if given); (seq, uid) descending."""
        self._writable()
        wanted = None if uids is None else set(uids)
        return self._remove(lambda info: "T" in info.letters and (wanted is None or info.uid in wanted))

    @_busy
    def delete_messages(self, uids: Iterable[int]) -> list[tuple[int, int]]:
        """Delete these messages whatever their flags (POP3 UPDATE state, RFC 1939 §6)."""
        wanted = set(uids)
        return self._remove(lambda info: info.uid in wanted)

    def _remove(self, select: Callable[[MessageInfo], bool]) -> list[tuple[int, int]]:
        idx = self._index
        removed: list[MessageInfo] = []
        gone_uids: set[int] = set()
        with idx.lock:
            idx.sync()
            for m in self.messages:
                if m.uid in self._gone:
                    gone_uids.add(m.uid)
                    continue
                info = idx.by_uid.get(m.uid)
                if info is None or not select(info):
                    continue
                for _attempt in range(3):
                    try:
                        os.unlink(info.filename)
                    except FileNotFoundError:
                        info = idx.locate(info)
                        if info is None:
                            break
                        continue
                    break
                removed.append(m)
                gone_uids.add(m.uid)
            if removed:
                dirs = {os.path.join(idx.path, m.subdir) for m in removed}
                for d in dirs:
                    _fsync_dir(d)
                idx.remove(removed)
            result = self._drop(gone_uids)
        if removed:
            maildir.notify(idx.path)
        return result

    def _drop(self, uids: set[int]) -> list[tuple[int, int]]:
        """Remove ``uids`` from the view; (seq, uid) in descending seq order."""
        if not uids:
            return []
        result = [(i + 1, m.uid) for i, m in enumerate(self.messages) if m.uid in uids]
        result.reverse()
        self.messages = [m for m in self.messages if m.uid not in uids]
        self._uids = [m.uid for m in self.messages]
        self._gone -= uids
        self.recent -= uids
        return result

    # -- copy / move ----------------------------------------------------------------------------

    @_busy
    def copy(self, uids: Iterable[int], dest: str) -> tuple[int, list[tuple[int, int]]]:
        """Copy messages (hard links when possible); (dest uidvalidity, [(uid, dest uid)])."""
        uv, pairs, _ = self._transfer(uids, dest, move=False)
        return uv, pairs

    @_busy
    def move(self, uids: Iterable[int], dest: str) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
        """Move messages (renamed, never duplicated); also returns this view's expunges (RFC 6851)."""
        self._writable()
        return self._transfer(uids, dest, move=True)

    def _transfer(self, uids: Iterable[int], dest: str, move: bool):
        idx = self._index
        dest_idx = self.store._index(dest)
        if os.path.realpath(dest_idx.path) == os.path.realpath(idx.path) and move:
            raise StoreError("cannot move a message into the mailbox it is in")
        wanted = set(uids)
        with idx.lock:
            idx.sync()
            infos = [idx.by_uid[m.uid] for m in self.messages
                     if m.uid in wanted and m.uid not in self._gone and m.uid in idx.by_uid]
        if not infos:
            return dest_idx.uidvalidity or self.store.status(dest).uidvalidity, [], []
        names: set[str] = set()
        for info in infos:
            names |= {f for f in info.flags if not f.startswith("\\")}
        with dest_idx.lock:
            dest_idx.sync()
            kw_map = _ensure_keywords(dest_idx, sorted(names))
        plan = []  # (info, new base, dest name)
        for info in infos:
            s, w = maildir.sizes_from_base(info.base)
            if s is None:
                try:
                    s = os.path.getsize(info.filename)
                except OSError:
                    s = None
            suffix = (f",S={s}" if s is not None else "") + f",W={info.size}"
            base = maildir.unique_base() + suffix
            letters = "".join(ch for ch in info.letters if not ("a" <= ch <= "z"))
            letters += "".join(kw_map[f.lower()] for f in info.flags if not f.startswith("\\"))
            plan.append((info, base, maildir.make_name(base, letters)))
        done: list[tuple[MessageInfo, str]] = []

        def place() -> list[str]:
            cur = os.path.join(dest_idx.path, "cur")
            for info, base, name in plan:
                target = os.path.join(cur, name)
                src = info
                for _attempt in range(3):
                    try:
                        if move:
                            os.rename(src.filename, target)
                        else:
                            _link_or_copy(src.filename, target, os.path.join(dest_idx.path, "tmp", base))
                    except FileNotFoundError:
                        src = idx.locate(src)
                        if src is None:
                            break
                        continue
                    done.append((src, base))
                    break
            _fsync_dir(cur)
            if move:
                for d in {os.path.join(idx.path, s.subdir) for s, _ in done}:
                    _fsync_dir(d)
            return [base for _, base in done]

        ul = uidlist.update(dest_idx.path, place, uidvalidity=lambda: maildir.allocate_uidvalidity(self.store.root))
        pairs = [(src.uid, ul.records[base].uid) for src, base in done]
        expunged: list[tuple[int, int]] = []
        if move and done:
            with idx.lock:
                idx.remove([src for src, _ in done])
                expunged = self._drop({src.uid for src, _ in done})
            maildir.notify(idx.path)
        if done:
            maildir.notify(dest_idx.path)
        return ul.uidvalidity, pairs, expunged

    def close(self) -> None:
        self.messages = []
        self._uids = []


def _link_or_copy(src: str, target: str, tmp: str) -> None:
    """Hard-link ``src`` as ``target``; copy durably through ``tmp`` where links are impossible."""
    try:
        os.link(src, target)
        return
    except FileNotFoundError:
        raise
    except OSError:
        pass
    shutil.copyfile(src, tmp)
    shutil.copystat(src, tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, target)


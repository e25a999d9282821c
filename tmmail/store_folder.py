"""A session's view of one folder (IMAP SELECT/EXAMINE, the POP3 maildrop).

Sequence numbers, \\Recent, pending expunges, flag changes, expunge, copy and move over the
shared per-folder index (tmmail.store_index).  Blocking; see docs/contracts.md ("Store").
"""

from __future__ import annotations

import bisect
import os
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable

from tmmail import maildir, uidlist
from tmmail.store_common import (SYSTEM_FLAGS, NoSuchMessage, StoreError, _busy, _ensure_keywords,
                                 _flag_letters, _fsync_dir)
from tmmail.store_index import FolderIndex, MessageInfo, keyword_letters

if TYPE_CHECKING:
    from tmmail.store import Store

FLAG_BATCH = 256


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
    def highestmodseq(self) -> int:
        """CONDSTORE HIGHESTMODSEQ of the folder (tmmail.modseq)."""
        return self._index.highestmodseq

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

    @property
    def pending_expunges(self) -> set[int]:
        """UIDs gone from disk but kept in this view by ``refresh(expunges=False)``."""
        return set(self._gone)

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
        self.recent.update(idx.take_recent())  # appended with flags by this process (store.append)
        self.recent.update(idx.claim_new())  # moved new/ -> cur/ by this view

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
            if idx.exists and idx.uidvalidity and idx.uidvalidity != self.uidvalidity:
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
    def store_flags(self, uids: Iterable[int], flags: Iterable[str], mode: str = "add",
                    unchangedsince: int | None = None,
                    modified: list[int] | None = None) -> list[tuple[int, MessageInfo]]:
        """Set/add/remove flags; returns (seq, info) of the messages whose flags changed.

        ``unchangedsince`` (CONDSTORE): a message whose modseq is higher is not changed and
        its UID is appended to ``modified``; checked under the index and journal locks."""
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
            # not under idx.lock: waiting for another writer's keywords lock must not block
            # every other session's refresh()
            kw_letters = "".join(_ensure_keywords(idx, keywords).values())
        wanted = set(sys_letters + kw_letters)
        managed = set("DFRST") | set(maildir.KEYWORD_LETTERS)
        todo = sorted(set(uids))
        # in batches, so a large STORE in a worker thread does not hold the shared index lock
        # (and so every other session's refresh() on the reactor thread) for its whole duration
        for start in range(0, len(todo), FLAG_BATCH):
            with idx.lock, idx.begin_changes():
                for uid in todo[start:start + FLAG_BATCH]:
                    seq = self.seq_of(uid)
                    if seq is None or uid in self._gone:
                        continue
                    info = idx.by_uid.get(uid)
                    if info is None:
                        continue
                    if unchangedsince is not None and info.modseq > unchangedsince:
                        if modified is not None:
                            modified.append(uid)
                        continue
                    def apply(have_letters: str) -> str:
                        have = set(have_letters)
                        if mode == "add":
                            new = have | wanted
                        elif mode == "remove":
                            new = have - wanted
                        else:
                            new = (have - managed) | wanted
                        return maildir.sort_letters("".join(new))

                    if apply(info.letters) == info.letters and info.subdir == "cur":
                        fresh: MessageInfo | None = info
                    else:
                        fresh = self._rename_flags(info, apply)
                        if fresh is None:
                            continue
                    # report the resulting flags whenever they differ from what this session
                    # knew, also when another session had already made the change
                    if fresh.flags != self.messages[seq - 1].flags:
                        out.append((seq, fresh))
                    self.messages[seq - 1] = fresh
        if out:
            maildir.notify(idx.path)
        return out

    def _rename_flags(self, info: MessageInfo, apply: Callable[[str], str]) -> MessageInfo | None:
        """Rename the file to the letters ``apply`` makes of its current ones.  When someone
        else renamed it meanwhile (Dovecot, another process), the change is applied again to
        the letters of the name found, so their change is kept, not overwritten."""
        idx = self._index
        for _attempt in range(5):
            letters = apply(info.letters)
            if letters == info.letters and info.subdir == "cur":
                return info
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
        gone_uids: set[int] = set()
        with idx.lock:
            idx.sync()
            todo: list[MessageInfo] = []
            for m in self.messages:
                if m.uid in self._gone:
                    gone_uids.add(m.uid)
                    continue
                info = idx.by_uid.get(m.uid)
                if info is not None and select(info):
                    todo.append(m)
        # unlinked in batches, the fsyncs outside the lock: a large EXPUNGE in a worker thread
        # must not hold the shared index (every other session's refresh()) for its whole duration
        dirs: set[str] = set()
        for start in range(0, len(todo), FLAG_BATCH):
            with idx.lock:
                removed: list[MessageInfo] = []
                for m in todo[start:start + FLAG_BATCH]:
                    info = idx.by_uid.get(m.uid)
                    for _attempt in range(3):
                        if info is None:
                            break  # removed meanwhile by another session: gone all the same
                        try:
                            os.unlink(info.filename)
                        except FileNotFoundError:
                            info = idx.locate(info)
                            continue
                        dirs.add(os.path.join(idx.path, info.subdir))
                        break
                    removed.append(m)
                    gone_uids.add(m.uid)
                idx.remove(removed)
        for d in dirs:
            _fsync_dir(d)
        with idx.lock:
            result = self._drop(gone_uids)
        if todo:
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
        # RFC 3501 §6.4.7: the copy is \Recent (for the session that has the destination
        # selected, or the next one to select it), as for APPEND
        for _info, base, _name in plan:
            dest_idx.expect_recent(base)

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

        try:
            ul = uidlist.update(dest_idx.path, place,
                                uidvalidity=lambda: maildir.allocate_uidvalidity(self.store.root))
        finally:
            placed = {base for _, base in done}
            for _info, base, _name in plan:
                if base not in placed:
                    dest_idx.forget_recent(base)
        dest_idx.adopt_uidlist(ul)
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

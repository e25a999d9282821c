"""The per-folder message index shared by every session of one process.

One job: know, cheaply, which messages a Maildir folder holds (UID, base name, current file
name, flags) without reading or stat-ing message files.

* A refresh first ``stat()``s ``new/``, ``cur/``, ``dovecot-uidlist`` and ``dovecot-keywords``.
  If none changed (and the directories were not modified within the last two seconds, where
  the file system's coarse timestamps cannot be trusted), nothing else happens.
* Otherwise ``new/`` then ``cur/`` are listed (in that order, so a concurrent ``new/`` -> ``cur/``
  rename is never missed); unchanged names reuse their MessageInfo objects.  A known message
  missing from a listing is looked for in a second listing before it counts as gone (``readdir``
  may miss an entry renamed while it runs).
* Names without a UID get one under ``dovecot-uidlist.lock`` (tmmail.uidlist).
* Sizes come from ``,W=`` in the name (computed once by reading the file otherwise); the
  internal date is the file mtime, stat()ed on first use only.

Thread-safe (one RLock per folder); blocking file-system calls (fast: listdir, a few stats).
"""

from __future__ import annotations

import contextlib
import gc
import operator
import os
import threading
import time
import weakref
from typing import Iterable, Iterator

from tmmail import maildir, modseq, uidlist
from tmmail.maildir import KEYWORD_LETTERS, LETTER_FLAGS

#: directory mtimes younger than this may hide a later change in the same timestamp tick
UNTRUSTED_SECONDS = 1.5
#: how soon a sync tries again to give new files UIDs after finding the uidlist locked
RETRY_LOCKED_NS = 200_000_000
#: an appended message expected as \Recent but not seen by a listing within this time is forgotten
UNCLAIMED_SECONDS = 60.0
#: at most this many appended messages wait to be claimed as \Recent (the oldest are dropped)
MAX_UNCLAIMED = 4096


_uid_of = operator.attrgetter("uid")

_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a scan builds tens of thousands of objects.

    A cold scan of 20,000 names allocates ~60,000 objects (none in cycles) and so triggered
    ~140 collections (~40 ms, more in a server with a large heap).  Counted, so overlapping
    scans in several threads re-enable the collector once, after the last one, and only if it
    was enabled before the first.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


class FolderGone(Exception):
    """The folder directory no longer exists."""


class MessageInfo:
    """One message as the index knows it; immutable except for lazily cached size/date."""

    __slots__ = ("uid", "base", "name", "subdir", "letters", "flags", "folder", "_size", "_date", "modseq")

    def __init__(self, uid: int, base: str, name: str, subdir: str, letters: str,
                 flags: frozenset[str], folder: str, modseq: int = 0) -> None:
        #: CONDSTORE mod-sequence of the current flags (tmmail.modseq journal)
        self.modseq = modseq
        self.uid = uid
        self.base = base
        self.name = name
        self.subdir = subdir
        self.letters = letters
        self.flags = flags
        self.folder = folder
        self._size: int | None = None
        self._date: float | None = None

    @property
    def filename(self) -> str:
        """Full path as last seen (may go stale when another session renames it)."""
        return os.path.join(self.folder, self.subdir, self.name)

    @property
    def size(self) -> int:
        """RFC822.SIZE: octets with CRLF line endings (``,W=``; else read once)."""
        if self._size is None:
            _, w = maildir.sizes_from_base(self.base)
            if w is None:
                try:
                    w = maildir.crlf_size(self.filename)
                except OSError:
                    w = 0
            self._size = w
        return self._size

    @property
    def internal_date(self) -> float:
        """INTERNALDATE (epoch seconds): the file mtime, as Dovecot keeps it.

        Read when the index first sees the message (small scans) or on first use; a file
        renamed since (another writer's flag change) is looked up under its new name.  Only
        for a message gone from disk before its date was ever read is the time in its name
        given -- and not remembered, so a wrong date never sticks."""
        if self._date is None:
            try:
                self._date = os.stat(self.filename).st_mtime
            except OSError:
                date = _relocated_date(self)
                if date is None:
                    return maildir.name_time(self.base) or 0.0
                self._date = date
        return self._date

    @property
    def seen(self) -> bool:
        return "S" in self.letters

    def __repr__(self) -> str:
        return f"MessageInfo(uid={self.uid}, name={self.subdir}/{self.name!r})"


#: the live indexes by folder path, for MessageInfo to find a file renamed under it
_live: "weakref.WeakValueDictionary[str, FolderIndex]" = weakref.WeakValueDictionary()
#: a scan that finds at most this many new messages reads their dates at once (cheap), so a
#: message expunged or moved by someone else still shows its real INTERNALDATE
EAGER_DATES = 2000


def _relocated_date(info: MessageInfo) -> float | None:
    idx = _live.get(info.folder)
    if idx is None:
        return None
    fresh = idx.locate(info)
    if fresh is None or fresh is info:
        return None
    try:
        fresh._date = date = os.stat(fresh.filename).st_mtime
    except OSError:
        return None
    return date


_flags_cache: dict[tuple[str, tuple[str, ...]], frozenset[str]] = {}


def flags_of(letters: str, keywords: list[str]) -> frozenset[str]:
    """IMAP flags for ``:2,`` letters (memoised: a folder has few distinct combinations)."""
    key = (letters, tuple(keywords))
    got = _flags_cache.get(key)
    if got is None:
        if len(_flags_cache) > 4096:
            _flags_cache.clear()
        got = _flags_cache[key] = _flags_of(letters, keywords)
    return got


def _flags_of(letters: str, keywords: list[str]) -> frozenset[str]:
    out = []
    for ch in letters:
        flag = LETTER_FLAGS.get(ch)
        if flag:
            out.append(flag)
        elif "a" <= ch <= "z":
            i = ord(ch) - 97
            if i < len(keywords) and keywords[i]:
                out.append(keywords[i])
    return frozenset(out)


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class FolderIndex:
    """The shared, cached view of one folder directory (INBOX root or ``.Name``)."""

    def __init__(self, path: str, root: str) -> None:
        self.path = path
        self.root = root
        self.lock = threading.RLock()
        self.by_base: dict[str, MessageInfo] = {}
        self.by_uid: dict[int, MessageInfo] = {}
        self.keywords: list[str] = []
        self.uidvalidity = 0
        self.nextuid = 1
        #: bumped on every change; views compare it to skip work
        self.version = 0
        self.exists = True
        self._stamp: tuple | None = None
        self._ul: uidlist.UidList | None = None
        self._ul_stamp: tuple | None = None
        self._kw_stamp: tuple | None = None
        self._sorted: list[MessageInfo] | None = None
        self._counts: tuple[int, int] | None = None
        self._prev_listing: set[str] | None = None
        self._prev_nextuid = 1
        #: bases this process appended straight to cur/ (with flags) that are \Recent for the
        #: next read-write view to see them; base -> time.monotonic() when expected
        self._unclaimed: dict[str, float] = {}
        #: the last listing was made after the directories' mtimes had settled (see sync)
        self._settled = False
        #: when an unsettled listing must be confirmed by one more (time.time_ns())
        self._settle_ns = 0
        #: a change made by this process (maildir.notify) that the stamps may not show
        self._dirty = True
        #: new files waited for a UID because the uidlist lock was busy: look again after this
        self._retry_ns: int | None = None
        self._cancel_watch = maildir.watch(path, self._mark_dirty)
        _live[path] = self
        #: the modseq journal (tmmail-modseq) and the highest modseq this index has shown
        self.journal = modseq.Journal(path)
        self.highestmodseq = 0

    def _mark_dirty(self, _path: str) -> None:
        # runs in whichever thread changed the folder, maybe holding other locks: no locking here
        self._dirty = True

    def close(self) -> None:
        """Stop listening for this process's changes (the index is being dropped)."""
        self._cancel_watch()

    # -- reading --------------------------------------------------------------------------------

    def messages(self) -> list[MessageInfo]:
        """All messages in UID order (cached per version; do not modify)."""
        with self.lock:
            if self._sorted is None:
                self._sorted = sorted(self.by_uid.values(), key=_uid_of)
            return self._sorted

    def counts(self) -> tuple[int, int]:
        """(messages in new/, messages without \\Seen)."""
        with self.lock:
            if self._counts is None:
                new = unseen = 0
                for m in self.by_uid.values():
                    if m.subdir == "new":
                        new += 1
                    if "S" not in m.letters:
                        unseen += 1
                self._counts = (new, unseen)
            return self._counts

    def _stamps(self) -> tuple:
        new = _stat_key(os.path.join(self.path, "new"))
        cur = _stat_key(os.path.join(self.path, "cur"))
        if cur is None:
            raise FolderGone(self.path)
        return (new, cur, uidlist.stamp(self.path), _stat_key(os.path.join(self.path, maildir.KEYWORDS_FILE)))

    def sync(self, force: bool = False) -> bool:
        """Bring the index up to date with the disk; True if anything changed.

        Unchanged stamps of ``new/`` and ``cur/`` prove nothing changed only for a listing made
        UNTRUSTED_SECONDS after the directories' mtimes: file systems keep coarse timestamps, so
        a change in the same tick as the one before looks like no change.  A listing made earlier
        is confirmed by exactly one more listing once that time has passed (not by one on every
        call: every session of the process shares this index and refreshes it).  Changes made by
        this process are announced by ``maildir.notify`` and always trigger a listing.

        Never waits for the uidlist lock (this runs on the reactor thread for IMAP sessions):
        new files that need a UID while another writer holds it appear at a later sync.
        """
        with self.lock:
            now_ns = time.time_ns()
            try:
                stamp = self._stamps()
            except FolderGone:
                if self.by_uid or self.exists:
                    self.exists = False
                    self._set({})
                    return True
                return False
            self.exists = True
            if (not force and not self._dirty and stamp == self._stamp
                    and (self._settled or now_ns < self._settle_ns)):
                if self._retry_ns is None or now_ns < self._retry_ns:
                    return False
                if os.path.exists(os.path.join(self.path, uidlist.LOCK)):
                    self._retry_ns = now_ns + RETRY_LOCKED_NS  # still locked: one stat, no listing
                    return False
            self._dirty = False
            self._retry_ns = None
            mtimes = [part[0] for part in stamp[:2] if part is not None]
            self._settle_ns = max(mtimes, default=0) + int(UNTRUSTED_SECONDS * 1e9)
            self._settled = now_ns >= self._settle_ns
            with gc_paused():
                return self._scan(stamp)

    def _listing(self) -> dict[str, tuple[str, str]]:
        found: dict[str, tuple[str, str]] = {}
        for subdir in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(self.path, subdir))
            except FileNotFoundError:
                continue
            for name in names:
                if name[0] == ".":
                    continue
                i = name.find(":")
                found[name if i < 0 else name[:i]] = (subdir, name)
        return found

    def _scan(self, stamp: tuple) -> bool:
        listing = self._listing()
        missing_known = [b for b in self.by_base if b not in listing]
        if missing_known:
            # readdir() may miss an entry renamed while it runs: look again before calling it gone
            second = self._listing()
            for base in missing_known:
                if base not in second and base in listing:
                    second[base] = listing[base]
            listing = second
        if stamp[3] != self._kw_stamp:
            keywords = maildir.read_keywords(self.path)
            self._kw_stamp = stamp[3]
        else:
            keywords = self.keywords
        if self._ul is None or stamp[2] != self._ul_stamp:
            self._ul = uidlist.read(self.path)
            self._ul_stamp = stamp[2]
        ul = self._ul
        if ul is not None and self._prev_listing is not None:
            # a message that got its UID since the last scan but is missing from this listing
            # (readdir raced with its rename): look once more, or a later, higher UID would be
            # shown first and this one could never be appended in UID order
            late = []
            for base in reversed(list(ul.records)):
                if ul.records[base].uid < self._prev_nextuid:
                    break
                if base not in listing:
                    late.append(base)
            if late:
                again = self._listing()
                for base in late:
                    if base in again:
                        listing[base] = again[base]
        unassigned = [b for b in listing if ul is None or b not in ul.records]
        # records of messages gone in this listing AND the previous one (and already known then):
        # dropped from the uidlist at the next rewrite, so it does not grow forever
        forget: set[str] = set()
        if ul is not None and self._prev_listing is not None and len(ul.records) > len(listing):
            prev, limit = self._prev_listing, self._prev_nextuid
            forget = {b for b, r in ul.records.items() if r.uid < limit and b not in listing and b not in prev}
        if unassigned or ul is None or len(forget) > max(100, len(listing) // 4):
            unassigned = maildir.sort_delivery_order(unassigned)  # UIDs in delivery order
            try:
                ul = uidlist.update(self.path, unassigned, forget=forget, wait=False,
                                    uidvalidity=lambda: maildir.allocate_uidvalidity(self.root))
            except uidlist.LockTimeout:
                # another writer holds the uidlist: do not wait for it with the index lock held
                # (and maybe on the reactor thread); the new files stay invisible until a later sync
                self._retry_ns = time.time_ns() + RETRY_LOCKED_NS
                if ul is None:
                    self._stamp = None
                    return False
            else:
                self._ul = ul
                self._ul_stamp = ul.written_stamp or uidlist.stamp(self.path)
                stamp = (stamp[0], stamp[1], self._ul_stamp, stamp[3])
        self._prev_listing = set(listing)
        self._prev_nextuid = ul.nextuid
        self._stamp = stamp
        records = ul.records
        rebuild = keywords != self.keywords or ul.uidvalidity != self.uidvalidity
        self.keywords = keywords
        new_by_base: dict[str, MessageInfo] = {}
        old = self.by_base
        path = self.path
        flag_sets: dict[str, frozenset[str]] = {}  # letters -> flags, for this scan's keywords
        created: list[MessageInfo] = []
        fresh: list[MessageInfo] = []
        for base, (subdir, name) in listing.items():
            rec = records.get(base)
            if rec is None:
                continue  # appeared after the uidlist was read: next sync
            prev = old.get(base)
            if prev is not None and not rebuild and prev.name == name and prev.subdir == subdir and prev.uid == rec.uid:
                new_by_base[base] = prev
                continue
            # maildir.split_name inline: name is base, or base + ":" + info; letters follow ":2,"
            if subdir == "cur" and name.startswith("2,", len(base) + 1):
                letters = name[len(base) + 3:]
            else:
                letters = ""
            flags = flag_sets.get(letters)
            if flags is None:
                flags = flag_sets[letters] = flags_of(letters, keywords)
            info = MessageInfo(rec.uid, base, name, subdir, letters, flags, path)
            if prev is not None and prev.uid == rec.uid:
                info._size, info._date = prev._size, prev._date
            if info._date is None:
                created.append(info)
            new_by_base[base] = info
            fresh.append(info)
        if len(created) <= EAGER_DATES:
            _read_dates(path, created)
        changed = (rebuild or len(new_by_base) != len(old)
                   or any(old.get(b) is not m for b, m in new_by_base.items()))
        gone = [m.uid for b, m in old.items() if b not in new_by_base and ul.uidvalidity == self.uidvalidity]
        if fresh or gone or not self.highestmodseq:
            self._assign_modseqs(ul.uidvalidity, fresh, gone, cold=not old)
        self.uidvalidity = ul.uidvalidity
        self.nextuid = ul.nextuid
        if changed:
            self._set(new_by_base)
        return changed

    def _assign_modseqs(self, uidvalidity: int, fresh: list[MessageInfo], gone: list[int],
                        cold: bool = False) -> None:
        """Give new or changed messages their modseq from the journal (recorded there first by
        whichever process noticed the change), and record expunges."""
        top = self.highestmodseq
        try:
            with self.journal.locked(uidvalidity) as j:
                for info in fresh:
                    ms = info.modseq = j.modseq_for(info.uid, info.letters)
                    if ms > top:
                        top = ms
                for uid in gone:
                    ms = j.expunge(uid)
                    if ms > top:
                        top = ms
                if cold or not top:
                    top = max(top, j.highest)
        except OSError:
            # journal not writable (read-only store?): modseqs of this process only
            for info in fresh:
                top += 1
                info.modseq = top
            if gone:
                top += 1
        self.highestmodseq = max(top, 1)

    @contextlib.contextmanager
    def begin_changes(self) -> Iterator[None]:
        """Hold the journal for a batch of own changes (one lock and one write for the batch);
        a journal that cannot be opened is left to each change's own fallback."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.journal.locked(self.uidvalidity))
            except OSError:
                pass
            yield

    def _set(self, by_base: dict[str, MessageInfo]) -> None:
        self.by_base = by_base
        self.by_uid = {m.uid: m for m in by_base.values()}
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._sorted = None
        self._counts = None

    # -- patching after our own changes -----------------------------------------------------------

    def adopt_uidlist(self, ul: uidlist.UidList) -> None:
        """``ul`` was just written by this process (APPEND, COPY/MOVE target): the next scan uses
        it instead of reading and parsing the file again, as long as the file on disk still has
        the stamp of what was written (any later rewrite, by anyone, changes the stamp)."""
        if ul.written_stamp is None:
            return
        with self.lock:
            self._ul, self._ul_stamp = ul, ul.written_stamp

    def make_info(self, uid: int, base: str, name: str, subdir: str, letters: str) -> MessageInfo:
        return MessageInfo(uid, base, name, subdir, letters, flags_of(letters, self.keywords), self.path)

    def replace(self, info: MessageInfo, name: str, subdir: str, letters: str) -> MessageInfo:
        with self.lock:
            new = self.make_info(info.uid, info.base, name, subdir, letters)
            new._size, new._date = info._size, info._date
            if letters == info.letters and info.modseq:
                new.modseq = info.modseq
            else:
                self._assign_modseqs(self.uidvalidity, [new], [])
            if self.by_base.get(info.base) is not None:
                self.by_base[info.base] = new
                self.by_uid[info.uid] = new
                self._changed()
            return new

    def claim_new(self) -> list[int]:
        """Move every indexed message in ``new/`` to ``cur/`` (adding ``:2,``): \\Recent for the
        caller, who wins each rename (another session or Dovecot may claim a file first).

        A read-write SELECT of a large fresh folder renames thousands of files, so the loop
        does nothing but the renames (relative to directory descriptors) and the index is
        patched once afterwards.  Dovecot also moves ``new/`` to ``cur/`` when a folder is
        selected read-write (MAILBOX_FLAG_DROP_RECENT).
        """
        with self.lock:
            if not self.counts()[0]:
                return []
            # listing (readdir) order, not UID order: consecutive renames then touch the same
            # directory blocks (ext4: 10,000 renames ~80-120 ms this way, ~140 ms in UID order)
            fresh = [m for m in self.by_base.values() if m.subdir == "new"]
            moved: list[tuple[MessageInfo, str]] = []
            try:
                new_fd = os.open(os.path.join(self.path, "new"), os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                return []
            try:
                cur_fd = os.open(os.path.join(self.path, "cur"), os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                os.close(new_fd)
                return []
            try:
                rename = os.rename
                for info in fresh:
                    name = maildir.make_name(info.base, info.letters) if info.letters else info.base + ":2,"
                    try:
                        rename(info.name, name, src_dir_fd=new_fd, dst_dir_fd=cur_fd)
                    except FileNotFoundError:
                        continue  # claimed by another session (or Dovecot) meanwhile
                    moved.append((info, name))
            finally:
                os.close(new_fd)
                os.close(cur_fd)
                with gc_paused():
                    self._claimed(moved)  # also after an unexpected error: these did move
            return [info.uid for info, _ in moved]

    def _claimed(self, moved: list[tuple[MessageInfo, str]]) -> None:
        """Patch the index after ``claim_new`` renamed these (info, new name) to ``cur/``."""
        with self.lock:
            for info, name in moved:
                new = MessageInfo(info.uid, info.base, name, "cur", info.letters, info.flags, self.path,
                                  info.modseq)
                new._size, new._date = info._size, info._date
                if self.by_base.get(info.base) is info:
                    self.by_base[info.base] = new
                    self.by_uid[info.uid] = new
            if moved:
                self._changed()

    def remove(self, infos: Iterable[MessageInfo]) -> None:
        with self.lock:
            removed = []
            for info in infos:
                if self.by_base.pop(info.base, None) is not None:
                    self.by_uid.pop(info.uid, None)
                    removed.append(info.uid)
            if removed:
                self._assign_modseqs(self.uidvalidity, [], removed)
                self._changed()

    def refresh_keywords(self) -> None:
        with self.lock:
            self.keywords = maildir.read_keywords(self.path)
            self._kw_stamp = _stat_key(os.path.join(self.path, maildir.KEYWORDS_FILE))

    # -- \Recent of messages appended to cur/ ------------------------------------------------------

    def expect_recent(self, base: str) -> None:
        """``base`` is about to be placed in cur/: \\Recent for the next view that claims it."""
        with self.lock:
            if len(self._unclaimed) >= MAX_UNCLAIMED:  # nobody selects this folder: keep it bounded
                del self._unclaimed[next(iter(self._unclaimed))]
            self._unclaimed[base] = time.monotonic()

    def forget_recent(self, base: str) -> None:
        with self.lock:
            self._unclaimed.pop(base, None)

    def take_recent(self) -> list[int]:
        """UIDs of expected messages that are in the index now (each is handed out once)."""
        with self.lock:
            if not self._unclaimed:
                return []
            out = []
            now = time.monotonic()
            for base, since in list(self._unclaimed.items()):
                info = self.by_base.get(base)
                if info is not None:
                    out.append(info.uid)
                    del self._unclaimed[base]
                elif now - since > UNCLAIMED_SECONDS:
                    del self._unclaimed[base]  # never showed up (expunged meanwhile)
            return out

    def unclaimed_recent(self) -> int:
        """How many indexed messages still wait to be claimed as \\Recent (STATUS RECENT)."""
        with self.lock:
            return sum(1 for base in self._unclaimed if base in self.by_base)

    def locate(self, info: MessageInfo) -> MessageInfo | None:
        """The current entry for ``info``'s message after a rescan (it may have been renamed)."""
        with self.lock:
            self.sync(force=True)
            return self.by_base.get(info.base)


def _read_dates(path: str, infos: list[MessageInfo]) -> None:
    """Fill in the mtimes of ``infos`` (one stat each, relative to the directory)."""
    fds: dict[str, int] = {}
    try:
        for info in infos:
            fd = fds.get(info.subdir)
            if fd is None:
                try:
                    fd = fds[info.subdir] = os.open(os.path.join(path, info.subdir),
                                                    os.O_RDONLY | os.O_DIRECTORY)
                except OSError:
                    return
            try:
                info._date = os.stat(info.name, dir_fd=fd).st_mtime
            except OSError:
                pass  # renamed or gone meanwhile: read on first use
    finally:
        for fd in fds.values():
            os.close(fd)


def keyword_letters(keywords: list[str]) -> dict[str, str]:
    """lower-case keyword -> its letter."""
    return {kw.lower(): KEYWORD_LETTERS[i] for i, kw in enumerate(keywords) if kw}

"""Dovecot's ``dovecot-uidlist``: IMAP UIDs and UIDVALIDITY of one Maildir folder.

Pure file logic, compatible with Dovecot (src/lib-storage/index/maildir/maildir-uidlist.c), so
Dovecot and TMmail can serve the same Maildir with the same UIDs (RFC 3501 §2.3.1.1):

* version 3: header ``3 V<uidvalidity> N<nextuid> G<guid hex>`` (other ``<key><value>`` fields kept),
  records ``<uid> [<key><value> ...] :<filename>``; version 1 (``1 <uidvalidity> <nextuid>``,
  ``<uid> <filename>``, Courier's format) is read and rewritten as version 3.
* A record's key is the message's *base name*: the file name up to the first ``:`` (the ``:2,``
  flags change, the base never does, also when the file moves from ``new/`` to ``cur/``).
* Dovecot may append records without rewriting the header, so the next UID is
  ``max(N, last uid + 1)``.
* Locking: ``dovecot-uidlist.lock`` created with ``O_EXCL``; the new list is written into the
  lock file, fsynced and renamed over ``dovecot-uidlist`` (Dovecot's dotlock + rename).  A lock
  older than two minutes is stale (Dovecot's ``MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT``).

Blocking calls: use them from a thread, or inline when fast enough (reading is a single read).
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from twisted.python.threadable import isInIOThread

UIDLIST = "dovecot-uidlist"
LOCK = UIDLIST + ".lock"
STALE_SECONDS = 120.0
LOCK_TIMEOUT = 10.0
#: the wait on the reactor thread, where a long wait would stall every connection: fail fast
#: (StoreBusy, IMAP ``NO [INUSE]``) instead
REACTOR_LOCK_TIMEOUT = 0.2


class LockTimeout(Exception):
    """The uidlist (or keywords) lock was held by someone else for too long."""


@dataclass(slots=True)
class Record:
    uid: int
    #: Dovecot's per-record extension fields (e.g. ``W1234``, ``G<guid>``), kept verbatim
    ext: str = ""


@dataclass
class UidList:
    uidvalidity: int
    nextuid: int = 1
    guid: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: header fields other than V, N and G, kept verbatim (e.g. Dovecot's ``M`` modseq)
    extra: list[str] = field(default_factory=list)
    #: base name -> record, in file order (ascending UIDs)
    records: dict[str, Record] = field(default_factory=dict)
    #: (mtime_ns, size, inode) of the file this list was written as by ``update`` (fstat of the
    #: written file before its rename, so exactly this content), None if it was only read
    written_stamp: tuple[int, int, int] | None = field(default=None, compare=False, repr=False)

    def uid_of(self, base: str) -> int | None:
        rec = self.records.get(base)
        return rec.uid if rec else None

    def add(self, base: str) -> int:
        """Give ``base`` the next UID (no-op if it already has one); returns its UID."""
        rec = self.records.get(base)
        if rec is not None:
            return rec.uid
        uid = self.nextuid
        self.records[base] = Record(uid)
        self.nextuid = uid + 1
        return uid


def base_name(filename: str) -> str:
    """The part of a Maildir file name that never changes: everything before the first ``:``."""
    i = filename.find(":")
    return filename if i < 0 else filename[:i]


def parse(data: bytes) -> UidList:
    """Parse a uidlist file (version 3 or 1); raises ValueError if it is not one."""
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    header = lines[0].split()
    if not header:
        raise ValueError("empty uidlist header")
    version = header[0]
    records: dict[str, Record] = {}
    last = 0
    if version == "3":
        uidvalidity = nextuid = 0
        guid = ""
        extra: list[str] = []
        for item in header[1:]:
            key, value = item[:1], item[1:]
            if key == "V":
                uidvalidity = int(value)
            elif key == "N":
                nextuid = int(value)
            elif key == "G":
                guid = value
            else:
                extra.append(item)
        for line in lines[1:]:
            if not line:
                continue
            head, sep, filename = line.partition(":")
            if sep and head[-1:] == " " and head[:-1].isdigit():  # fast path: "<uid> :<name>"
                uid = int(head[:-1])
                i = filename.find(":")
                records[filename if i < 0 else filename[:i]] = Record(uid)
                if uid > last:
                    last = uid
                continue
            parts = head.split()
            if not sep or not parts or not parts[0].isdigit() or not filename:
                raise ValueError(f"bad uidlist record: {line[:80]!r}")
            uid = int(parts[0])
            records[base_name(filename)] = Record(uid, " ".join(parts[1:]))
            last = max(last, uid)
        ul = UidList(uidvalidity, max(nextuid, last + 1, 1), guid or uuid.uuid4().hex, extra, records)
    elif version == "1":
        if len(header) < 3:
            raise ValueError("bad version 1 uidlist header")
        for line in lines[1:]:
            if not line:
                continue
            uid_text, _, filename = line.partition(" ")
            if not uid_text.isdigit() or not filename:
                raise ValueError(f"bad uidlist record: {line[:80]!r}")
            uid = int(uid_text)
            records[base_name(filename)] = Record(uid)
            last = max(last, uid)
        ul = UidList(int(header[1]), max(int(header[2]), last + 1, 1), records=records)
    else:
        raise ValueError(f"unsupported uidlist version {version!r}")
    if ul.uidvalidity <= 0:
        raise ValueError("uidlist without UIDVALIDITY")
    return ul


def format(ul: UidList) -> bytes:  # noqa: A001 - the counterpart of parse()
    """Serialise as version 3, records in UID order."""
    head = ["3", f"V{ul.uidvalidity}", f"N{ul.nextuid}", f"G{ul.guid}", *ul.extra]
    out = [" ".join(head)]
    items = ul.records.items()
    last = 0
    for rec in ul.records.values():  # records are kept in UID order: sort only if they are not
        if rec.uid < last:
            items = sorted(items, key=lambda item: item[1].uid)  # type: ignore[assignment]
            break
        last = rec.uid
    out += [f"{rec.uid} {rec.ext} :{base}" if rec.ext else f"{rec.uid} :{base}" for base, rec in items]
    return ("\n".join(out) + "\n").encode("utf-8", "surrogateescape")


def stamp(folder: str) -> tuple[int, int, int] | None:
    """(mtime_ns, size, inode) of the uidlist, None if missing: changes on every rewrite."""
    try:
        st = os.stat(os.path.join(folder, UIDLIST))
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read(folder: str) -> UidList | None:
    """The folder's uidlist, or None if it is missing or unreadable (it is then rebuilt)."""
    try:
        with open(os.path.join(folder, UIDLIST), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        return parse(data)
    except (ValueError, IndexError):
        return None


class DotLock:
    """``<path>.lock`` created with O_EXCL; ``commit(data)`` renames it over ``<path>``.

    Used for ``dovecot-uidlist`` and ``dovecot-keywords`` exactly as Dovecot's file_dotlock does,
    so a Dovecot process and TMmail exclude each other.
    """

    def __init__(self, path: str, timeout: float | None = None, stale: float = STALE_SECONDS) -> None:
        self.path = path
        self.lock_path = path + ".lock"
        if timeout is None:
            timeout = REACTOR_LOCK_TIMEOUT if isInIOThread() else LOCK_TIMEOUT
        self.timeout = timeout
        self.stale = stale
        self.fd: int | None = None
        #: after commit: (mtime_ns, size, inode) of the file written (see ``stamp()``)
        self.stamp: tuple[int, int, int] | None = None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.002
        while True:
            try:
                self.fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                return
            except FileExistsError:
                pass
            try:
                age = time.time() - os.stat(self.lock_path).st_mtime
            except FileNotFoundError:
                continue
            if age > self.stale:
                try:
                    os.unlink(self.lock_path)
                except FileNotFoundError:
                    pass
                continue
            if time.monotonic() > deadline:
                raise LockTimeout(f"{self.lock_path} is held by another process")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def commit(self, data: bytes, durable: bool = True) -> None:
        """Write ``data`` as the new file content and release the lock (atomic rename)."""
        assert self.fd is not None
        fd, self.fd = self.fd, None
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if durable:
                os.fsync(fd)
            st = os.fstat(fd)  # rename keeps mtime, size and inode: the stamp of what we wrote
            self.stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except BaseException:
            os.close(fd)
            os.unlink(self.lock_path)
            raise
        os.close(fd)
        os.rename(self.lock_path, self.path)
        if durable:
            _fsync_dir(os.path.dirname(self.path) or ".")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DotLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def update(folder: str, bases: list[str] | Callable[[], list[str]],
           uidvalidity: int | Callable[[], int] | None = None,
           forget: set[str] | None = None, durable: bool = True, wait: bool = True) -> UidList:
    """Under the lock: re-read the uidlist, give each of ``bases`` (in order) a UID if it has none,
    drop the records of ``forget`` (messages confirmed gone) and write it back if anything changed.

    ``bases`` may be a function: it runs under the lock (e.g. renames files into ``cur/``) and
    returns the bases.  ``uidvalidity`` (a value or a function) is used when the uidlist does
    not exist yet (required then).  ``wait=False``: LockTimeout at once if another writer holds
    the lock (otherwise: up to LOCK_TIMEOUT, or REACTOR_LOCK_TIMEOUT on the reactor thread).
    """
    with DotLock(os.path.join(folder, UIDLIST), timeout=None if wait else 0.0) as lock:
        if callable(bases):
            bases = bases()
        ul = read(folder)
        changed = False
        if ul is None:
            if uidvalidity is None:
                raise ValueError("uidvalidity needed to create a uidlist")
            ul = UidList(uidvalidity() if callable(uidvalidity) else uidvalidity)
            changed = True
        records, uid = ul.records, ul.nextuid
        for base in bases:
            if base not in records:
                records[base] = Record(uid)
                uid += 1
        if uid != ul.nextuid:
            ul.nextuid = uid
            changed = True
        if forget:
            for base in forget:
                if ul.records.pop(base, None) is not None:
                    changed = True
        if changed:
            lock.commit(format(ul), durable)
            ul.written_stamp = lock.stamp
        return ul

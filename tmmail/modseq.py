"""Per-message MODSEQ and per-folder HIGHESTMODSEQ (IMAP CONDSTORE, RFC 7162) on disk.

One job: the append-only journal ``tmmail-modseq`` in a Maildir folder directory, shared by
every TMmail process serving that folder (Dovecot ignores files it does not know).

Format (text, one record a line)::

    TMMAIL-MODSEQ 1 <uidvalidity> <highest>     header: the first line
    f <modseq> <uid> <letters>                  uid now has these ":2," letters, since modseq
    x <modseq> <uid>                            uid was expunged at modseq

The state is the header's highest plus the records that follow, last record of a UID wins.
Every change is appended under an ``flock`` of the journal itself, after reading what other
processes appended since (so all processes hand out one sequence).  When the journal holds
many more records than live messages it is compacted: rewritten (header with the highest
value, one ``f`` record per live message) to a temporary file renamed over it; a process that
locked the old file notices the new inode and locks again.

Durability: appends are plain ``write()``s (no fsync): a crashed process loses nothing, an
operating-system crash may lose the tail.  A lost, unreadable or new journal starts from a
base derived from the clock (microseconds since the epoch), never lower than any value this
process already knew, so HIGHESTMODSEQ stays monotonic even then (as long as fewer than a
million changes a second were recorded and the clock does not jump back).  A UIDVALIDITY change
starts a new journal the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator

JOURNAL = "tmmail-modseq"
MAGIC = "TMMAIL-MODSEQ"
MAX_MODSEQ = 2 ** 63 - 1
#: compact once the journal holds this many records more than twice the live messages
COMPACT_SLACK = 4096


def clock_base() -> int:
    return time.time_ns() // 1000


class Journal:
    """In-memory state of one folder's journal; every method must run under :meth:`locked`."""

    def __init__(self, folder_path: str) -> None:
        self.dir = folder_path
        self.path = os.path.join(folder_path, JOURNAL)
        #: uid -> (modseq, letters) of live messages as recorded
        self.live: dict[int, tuple[int, str]] = {}
        #: uid -> modseq of its expunge
        self.expunged: dict[int, int] = {}
        self.highest = 0
        self.uidvalidity = 0
        self.records = 0
        self._ino: int | None = None
        self._offset = 0
        self._fd: int | None = None
        self._depth = 0
        self._buf: list[str] = []

    # -- locking and reading ------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, uidvalidity: int) -> Iterator["Journal"]:
        """Hold the journal's flock, caught up with every other writer; appends on exit.
        Re-entrant (within the caller's own serialisation, e.g. the folder index lock)."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        fd = self._open_locked()
        self._fd = fd
        self._depth = 1
        try:
            self._catch_up(fd, uidvalidity)
            yield self
        finally:
            try:
                self._flush()
            finally:
                self._depth = 0
                self._fd = None
                os.close(fd)

    def _open_locked(self) -> int:
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # compacted (replaced) or deleted meanwhile: lock the current file
        raise OSError(f"cannot lock {self.path}")

    def _reset(self) -> None:
        self.live = {}
        self.expunged = {}
        self.records = 0
        self._offset = 0

    def _catch_up(self, fd: int, uidvalidity: int) -> None:
        st = os.fstat(fd)
        if st.st_ino != self._ino or st.st_size < self._offset:
            self._reset()
            self._ino = st.st_ino
        if st.st_size > self._offset:
            data = os.pread(fd, st.st_size - self._offset, self._offset)
            end = data.rfind(b"\n") + 1
            if end < len(data):
                # a torn last line (a writer crashed mid-write): terminate it so appends stay whole
                os.write(fd, b"\n")
                data += b"\n"
                end = len(data)
            self._parse(data[:end], first=self._offset == 0)
            self._offset += end
        if self._offset == 0 or (uidvalidity and self.uidvalidity != uidvalidity):
            self._start(fd, uidvalidity)

    def _parse(self, data: bytes, first: bool) -> None:
        lines = data.decode("utf-8", "replace").split("\n")
        live, expunged = self.live, self.expunged
        highest = self.highest
        n = 0
        for line in lines:
            if not line:
                continue
            parts = line.split(" ")
            kind = parts[0]
            try:
                if kind == "f" and len(parts) == 4:
                    ms, uid = int(parts[1]), int(parts[2])
                    live[uid] = (ms, parts[3])
                    expunged.pop(uid, None)
                elif kind == "x" and len(parts) == 3:
                    ms, uid = int(parts[1]), int(parts[2])
                    live.pop(uid, None)
                    expunged[uid] = ms
                elif kind == MAGIC and len(parts) == 4 and first:
                    self.uidvalidity = int(parts[2])
                    ms = int(parts[3])
                else:
                    continue
            except ValueError:
                continue
            n += 1
            if ms > highest:
                highest = ms
        self.highest = min(highest, MAX_MODSEQ - 1)
        self.records += n

    def _start(self, fd: int, uidvalidity: int) -> None:
        """A new journal (none yet, lost, unreadable, or a new UIDVALIDITY): header only."""
        base = max(clock_base(), self.highest + 1)
        self._reset()
        self.highest = base
        self.uidvalidity = uidvalidity
        self._replace_file([f"{MAGIC} 1 {uidvalidity} {base}\n"])

    def _replace_file(self, lines: list[str]) -> None:
        """Write ``lines`` as the new journal, renamed over the old one while this process holds
        the flock of both: the new file is locked before anyone can open it, so no other
        process slips in between the rename and this lock's further appends."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        data = "".join(lines).encode("utf-8")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.rename(tmp, self.path)  # others waiting on the old inode see a new one and re-lock
            self._ino = os.fstat(fd).st_ino
            self._offset = len(data)
            self.records = len(lines)
            if self._fd is not None:
                os.dup2(fd, self._fd)  # this lock's further appends go to the new file
        finally:
            os.close(fd)

    # -- changes ------------------------------------------------------------------------------

    def _next(self) -> int:
        if self.highest >= MAX_MODSEQ - 1:
            raise OverflowError("mod-sequence space exhausted")
        self.highest += 1
        return self.highest

    def modseq_for(self, uid: int, letters: str) -> int:
        """The modseq of ``uid`` having ``letters``: the recorded one, or a new one recorded."""
        rec = self.live.get(uid)
        if rec is not None and rec[1] == letters:
            return rec[0]
        ms = self._next()
        self.live[uid] = (ms, letters)
        self.expunged.pop(uid, None)
        self._buf.append(f"f {ms} {uid} {letters}\n")
        return ms

    def expunge(self, uid: int) -> int:
        """The modseq of ``uid``'s expunge (recorded once, by whichever process sees it first)."""
        got = self.expunged.get(uid)
        if got is not None and uid not in self.live:
            return got
        ms = self._next()
        self.live.pop(uid, None)
        self.expunged[uid] = ms
        self._buf.append(f"x {ms} {uid}\n")
        return ms

    def _flush(self) -> None:
        if not self._buf or self._fd is None:
            return
        data = "".join(self._buf).encode("utf-8")
        n = len(self._buf)
        self._buf = []
        os.write(self._fd, data)
        self._offset += len(data)
        self.records += n
        if self.records > 2 * len(self.live) + COMPACT_SLACK:
            self.compact()

    def compact(self) -> None:
        """Rewrite the journal as header + one record per live message (under the lock)."""
        lines = [f"{MAGIC} 1 {self.uidvalidity} {self.highest}\n"]
        lines.extend(f"f {ms} {uid} {letters}\n" for uid, (ms, letters) in sorted(self.live.items()))
        self.expunged = {}
        self._replace_file(lines)

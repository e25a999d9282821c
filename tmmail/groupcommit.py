"""Group commit: many durable publishes share one file-system sync.

A durable publish is "write tmp files, make their data durable, rename them into place, make
the renames durable".  Done one by one that is two fsyncs (~3 ms) per message; here a single
committer thread takes *every* job queued while its previous cycle ran and does, per cycle:

1. ``prepare()`` of each job (flush/write its tmp files, no fsync);
2. one ``syncfs`` per file system (keyed by ``st_dev``) -- every earlier write on that file
   system is durable afterwards (Linux syncfs(2); it reports write-back errors since 5.8);
3. ``publish()`` of each job (the renames);
4. a second ``syncfs`` -- the renames are durable;
5. each job's Deferred fires on the reactor (``callFromThread``).

Two syncs per cycle keep the ordering rule without relying on a file system's ordering
guarantees (ext4 ``data=ordered`` with delayed allocation can commit a rename before the
data it names): a reader never finds a published file whose data was not yet durable.
A cycle whose jobs are all ``verified`` (their recovery checks the data against a size and
checksum recorded with it, as the spool's commits into ``active/`` do) publishes first and
syncs once: a crash before that sync can leave a published file with missing data, but
nobody was told it was durable, and recovery moves it aside instead of delivering it.
Without syncfs (not Linux, or a kernel that cannot report errors) step 2 fsyncs each job's
files and step 4 fsyncs each distinct directory once.  The fsyncs never run on the reactor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="tmmail.groupcommit")


class Job(Protocol):
    """One durable publish.  All methods run in the committer thread."""

    def prepare(self) -> Iterable[str]:
        """Write the tmp files (no fsync); return their paths (for the fsync fallback)."""

    def publish(self) -> Iterable[str]:
        """Rename the files into place; return the directories touched."""

    def rollback(self) -> None:
        """Undo after a failure (remove tmp and published files); must not raise."""

    #: optional: True when recovery verifies the published data itself (one sync per cycle)
    verified: bool


def _load_syncfs() -> Callable[[int], int] | None:
    """libc ``syncfs`` if it exists and reports errors (Linux >= 5.8), else None."""
    if platform.system() != "Linux":
        return None
    try:
        major, minor = (int(x) for x in platform.release().split(".")[:2])
    except ValueError:
        return None
    if (major, minor) < (5, 8):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


def syncfs(fd: int) -> None:
    """Make every earlier write on the file system of ``fd`` durable; raises OSError."""
    if _SYNCFS is None:
        raise OSError("syncfs is not available")
    if _SYNCFS(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class SharedSync:
    """One sync operation that concurrent callers share (group commit).

    A caller asks after its writes/renames; any call of ``fn`` that *starts* after it asked
    covers it, so it waits for such a call or makes one itself.  A failed call covers nobody:
    each waiter then tries again itself and sees its own error.
    """

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._running = False
        #: calls of ``fn`` that succeeded (tests and benchmarks read it)
        self.calls = 0

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            mine = self._requested
            while True:
                if self._done >= mine:
                    return
                if not self._running:
                    self._running = True
                    target = self._requested
                    break
                self._cond.wait()
        ok = False
        try:
            self._fn()
            self.calls += 1
            ok = True
        finally:
            with self._cond:
                self._running = False
                if ok:
                    self._done = max(self._done, target)
                self._cond.notify_all()


class SyncGroup(SharedSync):
    """Shared ``syncfs`` for one file system.

    One group per ``st_dev`` (:func:`sync_group`), used by the spool's directory syncs and the
    committer alike, so the runner's state changes and the SMTP commits share the journal
    commits.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        super().__init__(lambda: syncfs(self.fd))


_GROUPS: dict[int, SyncGroup] = {}
_GROUPS_LOCK = threading.Lock()


def sync_group(path: str) -> SyncGroup | None:
    """The process-wide SyncGroup of the file system holding ``path`` (None without syncfs)."""
    if _SYNCFS is None:
        return None
    dev = os.stat(path).st_dev
    with _GROUPS_LOCK:
        group = _GROUPS.get(dev)
        if group is None:
            group = _GROUPS[dev] = SyncGroup(path)
        return group


def fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupCommitter:
    """A thread that runs queued jobs in cycles sharing syncs (see the module docstring).

    ``roots``: directories whose file systems the jobs write to (a syncfs handle is kept open
    for each distinct ``st_dev``).  ``commit(job)`` may be called on the reactor; it returns
    a Deferred that fires (on the reactor) with None once the job is durable, or errbacks
    with the OSError after ``job.rollback()`` ran.
    """

    def __init__(self, reactor: Any, roots: Iterable[str], use_syncfs: bool | None = None) -> None:
        self.reactor = reactor
        self.use_syncfs = (_SYNCFS is not None) if use_syncfs is None else use_syncfs
        self._groups: dict[int, SyncGroup] = {}
        if self.use_syncfs:
            for root in roots:
                group = sync_group(root)
                if group is not None:
                    self._groups[os.stat(root).st_dev] = group
        self._queue: deque[tuple[Job, defer.Deferred[None]]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: cycles run and jobs committed (for tests and benchmarks)
        self.cycles = 0
        self.jobs = 0
        #: seconds spent in whole cycles and in the syncs alone
        self.cycle_seconds = 0.0
        self.sync_seconds = 0.0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tmmail-groupcommit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the queued jobs, then end the thread (blocking, at most a few cycles)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.cycles:
            log.info("group commit: {jobs} commits in {cycles} cycles, {cycle_ms:.2f} ms per cycle "
                     "({sync_ms:.2f} ms syncing)", jobs=self.jobs, cycles=self.cycles,
                     cycle_ms=1000 * self.cycle_seconds / self.cycles, sync_ms=1000 * self.sync_seconds / self.cycles)

    def commit(self, job: Job) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        with self._cond:
            if self._stopping:
                job.rollback()
                return defer.fail(OSError("group committer stopped"))
            self._queue.append((job, d))
            self._cond.notify()
        if self._thread is None:
            self.start()
        return d

    # -- the committer thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            t0 = time.perf_counter()
            results = self.run_batch([job for job, _ in batch])
            self.cycle_seconds += time.perf_counter() - t0
            self.cycles += 1
            self.jobs += len(batch)
            self.reactor.callFromThread(self._fire, [(d, r) for (_, d), r in zip(batch, results)])

    @staticmethod
    def _fire(pairs: list[tuple[defer.Deferred[None], BaseException | None]]) -> None:
        for d, err in pairs:
            if err is None:
                d.callback(None)
            else:
                d.errback(Failure(err))

    def _sync_all(self) -> None:
        t0 = time.perf_counter()
        for group in self._groups.values():
            group.sync()
        self.sync_seconds += time.perf_counter() - t0

    @staticmethod
    def _publish(jobs: list[Job], live: list[int], out: list[BaseException | None], dirs: set[str]) -> list[int]:
        published = []
        for i in live:
            try:
                dirs.update(jobs[i].publish())
                published.append(i)
            except BaseException as e:  # noqa: BLE001
                out[i] = e
        return published

    def _sync_published(self, published: list[int], out: list[BaseException | None], dirs: set[str]) -> None:
        try:
            if self.use_syncfs:
                self._sync_all()
            else:
                for d in dirs:
                    fsync_path(d, directory=True)
        except OSError as e:
            for i in published:
                out[i] = e

    def run_batch(self, jobs: list[Job]) -> list[BaseException | None]:
        """BLOCKING: one cycle; an outcome (None or the error) per job."""
        out: list[BaseException | None] = [None] * len(jobs)
        files: list[list[str]] = [[] for _ in jobs]
        for i, job in enumerate(jobs):
            try:
                files[i] = list(job.prepare())
            except BaseException as e:  # noqa: BLE001 - reported to that job's caller
                out[i] = e
        live = [i for i in range(len(jobs)) if out[i] is None]
        if self.use_syncfs and live and all(getattr(jobs[i], "verified", False) for i in live):
            # every job's recovery checks its own data (Job.verified): publish, then one sync
            published = self._publish(jobs, live, out, set())
            if published:
                self._sync_published(published, out, set())
        else:
            try:
                if self.use_syncfs:
                    self._sync_all()
                else:
                    for i in live:
                        for path in files[i]:
                            fsync_path(path)
            except OSError as e:
                # a write-back error: nobody in this batch can be told "durable"
                for i in live:
                    out[i] = e
                live = []
            dirs: set[str] = set()
            published = self._publish(jobs, live, out, dirs)
            if published:
                self._sync_published(published, out, dirs)
        for i, err in enumerate(out):
            if err is not None:
                try:
                    jobs[i].rollback()
                except BaseException:  # noqa: BLE001
                    log.failure("rollback failed")
        return out

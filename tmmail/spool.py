"""The spool on disk: queue directories, durable message files, one rename per state change.

Pure file-system logic (blocking: call from threads, never on the reactor).  Layout and the
crash-recovery rules are in docs/design-spool.md.  In short:

* ``spool/{tmp,incoming,active,deferred,badmail,corrupt}/``; a message is ``ID.eml`` (raw bytes,
  LF line endings) + ``ID.env`` (tmmail.envelope JSON).
* Files are written in ``tmp/``, fsynced, renamed into place, and the directory is fsynced
  (Postfix ``mail_queue_enter``).
* **The .eml moves first, the .env moves last; a message is in the state where its .env is.**
  A crash between the two renames leaves ``ID.eml`` in the target and ``ID.env`` in the source;
  ``recover()`` completes the move.  Removal unlinks the .eml first, then the .env.
* Nothing unreadable is deleted: it goes to ``corrupt/``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
import zlib
from typing import Any, Iterator

from twisted.logger import Logger

from tmmail.envelope import Envelope, EnvelopeError
from tmmail.groupcommit import SharedSync

TMP = "tmp"
INCOMING = "incoming"
ACTIVE = "active"
DEFERRED = "deferred"
BADMAIL = "badmail"
CORRUPT = "corrupt"
#: messages an administrator put on hold (tmmail.cli_queue); the runner never takes them
HOLD = "hold"
#: messages a transfer event (tmmail.events) put aside; nobody is told, the admin decides
QUARANTINE = "quarantine"
#: directories holding committed messages (everything but tmp/)
QUEUE_STATES = (INCOMING, ACTIVE, DEFERRED, BADMAIL, CORRUPT, HOLD, QUARANTINE)
ALL_DIRS = (TMP,) + QUEUE_STATES

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B36 = _ALPHABET[:36]
_counter = itertools.count()
_counter_lock = threading.Lock()
_random_pool = bytearray()

log = Logger(namespace="tmmail.spool")


def _base36(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 36)
        out.append(_B36[r])
    return "".join(reversed(out))


def new_queue_id(now: float | None = None) -> str:
    """A queue id: milliseconds (base36, 9 chars, sorts by time until 5188) + counter + random.

    Only [0-9A-Za-z]; unique within a process by the counter, across processes by the random
    part, and checked with O_EXCL when the file is created.
    """
    ms = int((time.time() if now is None else now) * 1000)
    with _counter_lock:
        n = next(_counter)
        if len(_random_pool) < 4:
            # one getrandom call per 256 ids, not one per id (each costs a system call)
            _random_pool[:] = os.urandom(1024)
        r = int.from_bytes(_random_pool[-4:], "big") % 62**4
        del _random_pool[-4:]
    rand = "".join(_ALPHABET[(r // 62**k) % 62] for k in range(4))
    return _base36(ms, 9) + _base36(n % 36**3, 3) + rand


def valid_queue_id(qid: str) -> bool:
    return bool(qid) and len(qid) <= 64 and all(c in _ALPHABET for c in qid)


def fsync_dir(path: str) -> None:
    """Make a rename, create or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirSync(SharedSync):
    """Group commit for directory fsyncs: concurrent renames in one directory share one fsync."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(lambda: fsync_dir(path))


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolWriter:
    """One message being received: bytes go to ``tmp/ID.eml``; ``commit`` puts it in incoming/."""

    #: messages up to this size stay in memory until the commit writes them (in a thread);
    #: a bigger one spills to ``tmp/ID.eml`` on the thread calling ``write``
    SPILL = 1 << 20

    def __init__(self, spool: Spool, queue_id: str) -> None:
        self.spool = spool
        self.id = queue_id
        self._buf = bytearray()
        self._file: Any = None
        self._closed = False
        self.size = 0
        #: CRC-32 of everything written (recorded in the envelope, checked by recovery)
        self.crc = 0

    def write(self, data: bytes) -> None:
        """Append bytes (LF-terminated lines); no fsync, so fine on the reactor."""
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)
        if self._file is None:
            self._buf += data
            if len(self._buf) > self.SPILL:
                self._spill()
        else:
            self._file.write(data)

    def _spill(self) -> None:
        """Create ``tmp/ID.eml`` (O_EXCL: a queue id is never reused) and move the buffer there."""
        fd = os.open(self.spool.path(TMP, self.id, ".eml"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=1 << 16)
        self._file.write(self._buf)
        self._buf = bytearray()

    def _close_data(self) -> None:
        """Everything written reaches ``tmp/ID.eml`` (not yet durable); the file is closed."""
        if self._file is None:
            self._spill()
        self._file.flush()
        self._file.close()

    def commit(self, envelope: Envelope) -> None:
        """BLOCKING: fsync data and envelope, rename both into incoming/, fsync incoming/.

        Only after this returns may the SMTP server say 250.  Raises OSError (the tmp files are
        then removed).  Thread-safe: concurrent commits share the directory fsync.
        """
        if self._closed:
            raise ValueError("writer already committed or aborted")
        if envelope.queue_id != self.id:
            raise ValueError("envelope queue id does not match the message")
        sp = self.spool
        moved = False
        try:
            self._close_data()
            fsync_path(sp.path(TMP, self.id, ".eml"))
            envelope.data_size, envelope.data_crc = self.size, self.crc
            _write_durably(sp.path(TMP, self.id, ".env"), envelope.to_bytes())
            # .eml first, .env last: the message exists in incoming/ once its .env is there
            moved = True
            os.rename(sp.path(TMP, self.id, ".eml"), sp.path(INCOMING, self.id, ".eml"))
            os.rename(sp.path(TMP, self.id, ".env"), sp.path(INCOMING, self.id, ".env"))
            sp._dirsync[INCOMING].sync()
        except BaseException:
            self._closed = True
            if moved:
                # the client hears 451 and keeps the message: take back what reached incoming/
                # (.env first, so the runner never sees an envelope without its data)
                for ext in (".env", ".eml"):
                    try:
                        os.unlink(sp.path(INCOMING, self.id, ext))
                    except OSError:
                        pass
            self._cleanup()
            raise
        self._closed = True

    def commit_job(self, envelope: Envelope, state: str = INCOMING) -> "_CommitJob":
        """The same commit as a tmmail.groupcommit job: ``GroupCommitter.commit(job)`` runs
        it with other sessions' commits, sharing the syncs (the writer is closed by it).

        ``state`` is where the message is published: ``incoming/`` (the runner finds it by
        scanning) or ``active/`` when the caller hands it to an in-process runner itself
        (``job.head`` / ``job.envelope_bytes`` then spare the runner a move and two reads; a
        message left in ``active/`` is recovered at the next start like any other).
        """
        if self._closed:
            raise ValueError("writer already committed or aborted")
        if envelope.queue_id != self.id:
            raise ValueError("envelope queue id does not match the message")
        if state not in (INCOMING, ACTIVE):
            raise ValueError(f"cannot commit into {state}/")
        self._closed = True
        return _CommitJob(self, envelope, state)

    def abort(self) -> None:
        """Drop the message (the client gave up or was refused)."""
        if self._closed:
            return
        self._closed = True
        self._cleanup()

    def _cleanup(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
        except OSError:
            pass
        self._buf = bytearray()
        for path in (
            self.spool.path(TMP, self.id, ".eml"),
            self.spool.path(TMP, self.id, ".env"),
        ):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:  # pragma: no cover - disk trouble
                log.warn("cannot remove {path}: {error}", path=path, error=e)


class _CommitJob:
    """``SpoolWriter.commit`` split into the phases of tmmail.groupcommit: prepare (flush the
    .eml, write tmp/ID.env, no fsync), publish (.eml then .env into incoming/), rollback.

    ``verified`` (a commit into active/, which nothing scans): the envelope records the
    message's size and CRC-32 and recovery checks them, so the committer may publish before
    its one sync (a crash before that sync leaves at most a message nobody was told about,
    which recovery finds whole or moves to corrupt/); see tmmail.groupcommit.  A commit
    into incoming/ keeps the two syncs: the runner's scan could pick the files up early.
    """

    #: bytes of the message kept for the runner's hop count (tmmail.router.count_received)
    HEAD = 1 << 16

    def __init__(self, writer: SpoolWriter, envelope: Envelope, state: str = INCOMING) -> None:
        self.writer = writer
        self.envelope = envelope
        self.state = state
        self.verified = state == ACTIVE
        self.moved = False
        #: set by prepare(): the start of the message (None if it was spilled to disk) and
        #: the envelope as written, for a caller that hands the message on in memory
        self.head: bytes | None = None
        self.envelope_bytes = b""

    def prepare(self) -> list[str]:
        w, sp = self.writer, self.writer.spool
        # a verified commit writes straight to its final names (recovery checks the data,
        # nothing looks at active/ meanwhile): no tmp files, no renames
        where = self.state if self.verified else TMP
        self.moved = self.verified
        eml = sp.path(TMP, w.id, ".eml")
        if w._file is None:
            self.head = bytes(w._buf[: self.HEAD])
            eml = sp.path(where, w.id, ".eml")
            _write_new(eml, w._buf)  # os.write straight from the buffer: no file object
            w._buf = bytearray()
        else:
            w._close_data()  # spilled to tmp/: renamed by publish
        self.envelope.data_size = w.size
        self.envelope.data_crc = w.crc
        self.envelope_bytes = self.envelope.to_bytes()
        env = sp.path(where, w.id, ".env")
        _write_new(env, self.envelope_bytes)
        return [eml, env]

    def publish(self) -> list[str]:
        w, sp = self.writer, self.writer.spool
        self.moved = True
        # .eml first, .env last: the message exists in its state once its .env is there
        spilled = sp.path(TMP, w.id, ".eml")
        if not self.verified or w._file is not None:
            os.rename(spilled, sp.path(self.state, w.id, ".eml"))
        if not self.verified:
            os.rename(sp.path(TMP, w.id, ".env"), sp.path(self.state, w.id, ".env"))
        return [os.path.join(sp.root, self.state)]

    def rollback(self) -> None:
        w, sp = self.writer, self.writer.spool
        if self.moved:
            for ext in (".env", ".eml"):
                try:
                    os.unlink(sp.path(self.state, w.id, ext))
                except OSError:
                    pass
        w._cleanup()


def _write_new(path: str, data: bytes | bytearray) -> None:
    """Create ``path`` (O_EXCL: a queue id is never reused) holding ``data``; no fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


class Spool:
    """The queue directories under ``root``; every method except ``open_message`` may block."""

    #: files whose mtime is within this of ``started`` may belong to this process (the kernel's
    #: file timestamps come from a coarse clock that lags time.time() by a few milliseconds)
    CLOCK_SLACK = 1.0

    def __init__(self, root: str) -> None:
        self.root = root
        #: recovery leaves alone whatever was written after this (an SMTP session of this
        #: process may be committing while the runner recovers)
        self.started = time.time()
        for d in ALL_DIRS:
            os.makedirs(os.path.join(root, d), exist_ok=True)
        self._dirsync: dict[str, Any] = {d: _DirSync(os.path.join(root, d)) for d in ALL_DIRS}
        # with syncfs, one shared call per file system serves every directory (and the SMTP
        # group commit): fewer journal commits than one fsync per directory per change
        from tmmail.groupcommit import sync_group

        for d in ALL_DIRS:
            group = sync_group(os.path.join(root, d))
            if group is not None:
                self._dirsync[d] = group

    # -- paths ------------------------------------------------------------------------------

    def path(self, state: str, queue_id: str, ext: str = ".eml") -> str:
        if state not in ALL_DIRS:
            raise ValueError(f"unknown spool state {state!r}")
        if not valid_queue_id(queue_id):
            raise ValueError(f"bad queue id {queue_id!r}")
        return os.path.join(self.root, state, queue_id + ext)

    def message_path(self, state: str, queue_id: str) -> str:
        return self.path(state, queue_id, ".eml")

    # -- receiving --------------------------------------------------------------------------

    def open_message(self) -> SpoolWriter:
        """A writer for a new message with a fresh queue id; no system call (fine on the reactor).

        ``tmp/ID.eml`` is created (O_EXCL) when the commit runs or the message passes
        ``SpoolWriter.SPILL``; ids are unique in this process (time + counter) and across
        processes by 4 random characters, and a clash fails that commit (the client retries)
        rather than overwriting anything.
        """
        return SpoolWriter(self, new_queue_id())

    def add(self, envelope_factory, data: bytes) -> Envelope:
        """BLOCKING: queue a generated message (a DSN); ``envelope_factory(queue_id) -> Envelope``."""
        w = self.open_message()
        try:
            w.write(data)
            env = envelope_factory(w.id)
            w.commit(env)
        except BaseException:
            w.abort()
            raise
        return env

    # -- the runner's operations ------------------------------------------------------------

    def list(self, state: str) -> list[str]:
        """Queue ids in ``state`` (those whose .env is there), oldest id first."""
        ids = []
        for name in os.listdir(os.path.join(self.root, state)):
            if name.endswith(".env"):
                qid = name[:-4]
                if valid_queue_id(qid):
                    ids.append(qid)
        ids.sort()
        return ids

    def iter_envelopes(self, state: str) -> Iterator[tuple[str, Envelope | None]]:
        """(id, envelope or None if unreadable) for every message in ``state``."""
        for qid in self.list(state):
            try:
                yield qid, self.load(state, qid)
            except FileNotFoundError:
                continue
            except EnvelopeError:
                yield qid, None

    def load(self, state: str, queue_id: str) -> Envelope:
        """Read an envelope; raises EnvelopeError if unreadable, FileNotFoundError if gone."""
        with open(self.path(state, queue_id, ".env"), "rb") as f:
            raw = f.read()
        env = Envelope.from_bytes(raw)
        if env.queue_id != queue_id:
            raise EnvelopeError(f"envelope names queue id {env.queue_id!r}")
        return env

    def save(self, state: str, envelope: Envelope) -> None:
        """Replace the envelope of a message atomically: tmp, fsync, rename, fsync dir."""
        self.save_bytes(state, envelope.queue_id, envelope.to_bytes())

    def save_bytes(self, state: str, qid: str, data: bytes) -> None:
        """``save`` for an envelope serialised elsewhere (the runner serialises on the reactor
        and writes in a thread, so the thread never sees an envelope being changed)."""
        tmp = os.path.join(self.root, TMP, f"{qid}.{secrets.token_hex(4)}.save")
        try:
            _write_durably(tmp, data)
            os.rename(tmp, self.path(state, qid, ".env"))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._dirsync[state].sync()

    def move(self, queue_id: str, src: str, dst: str, durable: bool = True) -> None:
        """Change state: rename the .eml, then the .env; fsync both directories.

        ``durable=False`` skips the syncs, for a move whose loss in a crash changes nothing
        (incoming/ -> active/: recovery takes a message from either, and the next durable
        change of the message, a save or a move, makes the rename durable with it).
        """
        if src == dst:
            return
        os.rename(self.path(src, queue_id, ".eml"), self.path(dst, queue_id, ".eml"))
        os.rename(self.path(src, queue_id, ".env"), self.path(dst, queue_id, ".env"))
        if not durable:
            return
        self._dirsync[dst].sync()
        if self._dirsync[src] is not self._dirsync[dst]:
            self._dirsync[src].sync()

    def remove(self, queue_id: str, state: str, durable: bool = True) -> None:
        """Forget a finished message: rename the .env to .done, unlink the .eml, the .done.

        The .done marker says "finished" whatever the envelope inside says (the runner does not
        save the envelope before removing), so recovery completes a half-done removal.
        ``durable=False`` skips the directory sync, for a message whose every outcome is
        recorded elsewhere (each recipient's Maildir copy, which recovery recognises): if the
        removal is lost in a crash, the message is processed again and nothing is re-sent.
        """
        done = self.path(state, queue_id, ".done")
        try:
            os.rename(self.path(state, queue_id, ".env"), done)
        except FileNotFoundError:
            pass
        for path in (self.path(state, queue_id, ".eml"), done):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if durable:
            self._dirsync[state].sync()

    def sync(self, state: str) -> None:
        """Make the renames and unlinks done so far in ``state`` durable."""
        self._dirsync[state].sync()

    def to_corrupt(self, queue_id: str, state: str) -> None:
        """Move whatever files of the message are in ``state`` to corrupt/ (never deleted)."""
        for ext in (".eml", ".env"):
            try:
                os.rename(self.path(state, queue_id, ext), self._free_corrupt_name(queue_id, ext))
            except FileNotFoundError:
                pass
        self._dirsync[CORRUPT].sync()
        self._dirsync[state].sync()
        log.error("message {queue_id} moved from {state} to corrupt/", queue_id=queue_id, state=state)

    def _data_problem(self, state: str, queue_id: str) -> str | None:
        """Why the message file does not match its envelope's size and CRC-32, or None (also
        for an unreadable envelope or one without them: the runner judges those)."""
        try:
            env = self.load(state, queue_id)
        except (EnvelopeError, FileNotFoundError):
            return None
        if env.data_size is None or env.data_crc is None:
            return None
        crc, size = 0, 0
        with open(self.path(state, queue_id, ".eml"), "rb") as f:
            while chunk := f.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
        if size != env.data_size:
            return f"message data has {size} bytes, the envelope says {env.data_size}"
        if crc != env.data_crc:
            return "message data does not match the envelope's checksum"
        return None

    def _free_corrupt_name(self, queue_id: str, ext: str) -> str:
        path = self.path(CORRUPT, queue_id, ext)
        n = 1
        while os.path.exists(path):
            path = os.path.join(self.root, CORRUPT, f"{queue_id}{ext}.{n}")
            n += 1
        return path

    # -- crash recovery ---------------------------------------------------------------------

    def recover(self, before: float | None = None) -> dict[str, list[str]]:
        """Repair what a crash left behind; call once at start, before the runner works.

        Only files last written before ``before`` (default: this Spool's creation minus
        ``CLOCK_SLACK``) are cleaned up or sent to corrupt/, so the SMTP server may already be
        receiving (its tmp files and half-done commits are newer).

        * ``tmp/`` holds only uncommitted work (no 250 was given): removed, including a .eml
          already renamed into incoming/ whose .env is still in tmp/.
        * ``ID.env`` in S without ``ID.eml`` in S: if the .eml is in another queue dir D, the
          move S -> D is completed; if the .eml is nowhere and every recipient is final, the
          removal is completed; otherwise the .env goes to corrupt/.
        * ``ID.eml`` with no ``ID.env`` anywhere goes to corrupt/.

        Returns the ids found in each queue state after repair.
        """
        if before is None:
            before = self.started - self.CLOCK_SLACK

        def old(path: str) -> bool:
            try:
                return os.stat(path).st_mtime < before
            except FileNotFoundError:
                return False

        tmpdir = os.path.join(self.root, TMP)
        eml_at: dict[str, str] = {}
        env_at: dict[str, str] = {}
        for state in QUEUE_STATES:
            names = os.listdir(os.path.join(self.root, state))
            for name in names:
                qid, ext = os.path.splitext(name)
                if ext == ".done" and valid_queue_id(qid):
                    log.info("completing removal of {queue_id}", queue_id=qid)
                    for path in (self.path(state, qid, ".eml"), self.path(state, qid, ".done")):
                        try:
                            os.unlink(path)
                        except FileNotFoundError:
                            pass
                    self._dirsync[state].sync()
            for name in os.listdir(os.path.join(self.root, state)):
                qid, ext = os.path.splitext(name)
                if not valid_queue_id(qid):
                    continue
                if ext == ".eml":
                    eml_at[qid] = state
                elif ext == ".env":
                    env_at[qid] = state
        for name in os.listdir(tmpdir):
            qid, ext = os.path.splitext(name)
            if not old(os.path.join(tmpdir, name)):
                if ext == ".env" and qid in eml_at:
                    eml_at.pop(qid)  # a commit in progress: not ours to judge
                continue
            if ext == ".env" and qid in eml_at and qid not in env_at:
                log.warn("removing uncommitted message {queue_id}", queue_id=qid)
                os.unlink(self.path(eml_at.pop(qid), qid, ".eml"))
            os.unlink(os.path.join(tmpdir, name))
        fsync_dir(tmpdir)
        for qid, state in sorted(env_at.items()):
            if eml_at.get(qid) == state:
                continue
            if qid in eml_at:
                dst = eml_at[qid]
                log.warn("completing move of {queue_id} from {src} to {dst}", queue_id=qid, src=state, dst=dst)
                os.rename(self.path(state, qid, ".env"), self.path(dst, qid, ".env"))
                self._dirsync[dst].sync()
                env_at[qid] = dst
                continue
            if state == CORRUPT or not old(self.path(state, qid, ".env")):
                continue
            try:
                finished = self.load(state, qid).done
            except EnvelopeError:
                finished = False
            if finished:
                log.info("completing removal of {queue_id}", queue_id=qid)
                os.unlink(self.path(state, qid, ".env"))
                self._dirsync[state].sync()
                del env_at[qid]
            else:
                self.to_corrupt(qid, state)
                env_at[qid] = CORRUPT
        for qid, state in sorted(env_at.items()):
            # an SMTP commit publishes before its sync (tmmail.groupcommit): after a crash its
            # files may be in place with data that never reached the disk; no 250 was sent
            # for such a message, and it must not be delivered as it is
            if state in (INCOMING, ACTIVE) and eml_at.get(qid) == state and old(self.path(state, qid, ".env")):
                problem = self._data_problem(state, qid)
                if problem is not None:
                    log.error("{queue_id}: {problem}; moved to corrupt/", queue_id=qid, problem=problem)
                    self.to_corrupt(qid, state)
                    env_at[qid] = eml_at[qid] = CORRUPT
        for qid, state in sorted(eml_at.items()):
            if qid not in env_at and state != CORRUPT and old(self.path(state, qid, ".eml")):
                log.error("message data {queue_id} without envelope", queue_id=qid)
                self.to_corrupt(qid, state)
        return {state: self.list(state) for state in QUEUE_STATES}

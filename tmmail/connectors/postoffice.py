"""The post office connector: ``[SF:PO/MAILBOX]`` delivery into Maildir++.

Each message gets ``Return-Path:`` (RFC 5321 §4.4: the final delivery MTA adds it) and
``Delivered-To:`` (the original recipient, as Postfix/qmail do for loop detection) in front;
the ``Received:`` header is already there (the SMTP server added it).  Delivery is
``tmmail.maildir.deliver`` (tmp, fsync, rename, fsync dir), run in a thread pool.

Quota (MAILBOX.tab QUOTA_BYTES): if the Maildir's size plus the message would pass it, the
recipient gets a transient 452 4.2.2 (RFC 3463 §3.3 "mailbox full") and stays queued; the
runner bounces it if that lasts until the queue lifetime.  The size is the sum of the
``,S=`` sizes in the file names of ``new/`` and ``cur/`` of every folder, cached per
directory by its mtime so a full rescan happens only when a directory changed.

Two delivery jobs run in threads at once, and both may hold messages for the same mailbox.
So the quota check is a reservation: under one lock, a message fits if the Maildir's size
plus the bytes already reserved for staged, not yet published copies leaves room; its bytes
are then reserved, and released (under the same lock) right after the rename into ``new/``
makes them count in the Maildir's size, or when the copy fails.  Without it, two parallel
messages both fitted into room for one.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any, Sequence

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tmmail import groupcommit, maildir
from tmmail.errors import DeliveryError, PermanentError, TransientError
from tmmail.interfaces import IConnector

log = Logger(namespace="tmmail.connectors.postoffice")

E_NO_MAILBOX = (550, "5.1.1", "Mailbox unavailable")
E_DISABLED = (550, "5.2.1", "Mailbox disabled")
E_FULL = (452, "4.2.2", "Mailbox full")
E_TOO_BIG = (552, "5.2.2", "Message larger than the mailbox quota")
E_LOCAL = (451, "4.3.0", "Local delivery error, will retry")

_SIZE = re.compile(r",S=(\d+)")


class MaildirSizer:
    """Maildir++ size in bytes, cached per directory by mtime (thread-safe)."""

    #: a directory changed this recently may change again within the same mtime tick
    SETTLE = 2.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[int, int]] = {}

    def size(self, root: str) -> int:
        dirs = [os.path.join(root, "new"), os.path.join(root, "cur")]
        try:
            with os.scandir(root) as it:
                for entry in it:
                    if entry.name.startswith(".") and entry.name not in (".", "..") and entry.is_dir():
                        dirs.append(os.path.join(entry.path, "new"))
                        dirs.append(os.path.join(entry.path, "cur"))
        except FileNotFoundError:
            return 0
        return sum(self._dir_size(d) for d in dirs)

    def _dir_size(self, path: str) -> int:
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return 0
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        total = 0
        try:
            with os.scandir(path) as it:
                for entry in it:
                    m = _SIZE.search(entry.name)
                    if m:
                        total += int(m.group(1))
                    else:
                        try:
                            total += entry.stat().st_size
                        except FileNotFoundError:
                            pass
        except FileNotFoundError:
            return 0
        if time.time() - mtime / 1e9 > self.SETTLE:
            with self._lock:
                self._cache[path] = (mtime, total)
        return total


def _same_content(path: str, prefix: bytes, message_path: str) -> bool:
    with open(path, "rb") as f, open(message_path, "rb") as src:
        if f.read(len(prefix)) != prefix:
            return False
        while True:
            a = f.read(1 << 16)
            b = src.read(1 << 16)
            if a != b:
                return False
            if not a:
                return True


def already_delivered(maildir_path: str, prefix: bytes, message_path: str, arrival: float) -> str | None:
    """The name of a file in ``new/`` or ``cur/`` holding exactly ``prefix`` + the message.

    Used only for messages that were being delivered when the server stopped (the Maildir
    rename happened, the spool never heard of it): every spooled message is unique (its
    Received: header names its queue id), so equal bytes mean this very delivery.  Only files
    named after the arrival time with the right ``,S=`` size are opened.
    """
    size = len(prefix) + os.path.getsize(message_path)
    since = int(arrival) - 1
    for sub in ("new", "cur"):
        folder = os.path.join(maildir_path, sub)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            head = name.split(".", 1)[0]
            m = _SIZE.search(name)
            if not head.isdigit() or int(head) < since or m is None or int(m.group(1)) != size:
                continue
            try:
                if _same_content(os.path.join(folder, name), prefix, message_path):
                    return name
            except FileNotFoundError:
                continue
    return None


class _Slot:
    """One staged Maildir file of a batch and its outcome (None until something fails)."""

    __slots__ = ("tmp", "root", "name", "qid", "mailbox", "recipient", "error", "reservation")

    def __init__(self, tmp: str, root: str, name: str, qid: str, mailbox: str, recipient: str,
                 reservation: "tuple[str, int] | None" = None) -> None:
        self.tmp, self.root, self.name = tmp, root, name
        self.qid, self.mailbox, self.recipient = qid, mailbox, recipient
        self.error: DeliveryError | None = None
        #: (Maildir path, bytes) held in the connector's quota reservations until published
        self.reservation = reservation

    def fail(self) -> None:
        self.error = TransientError(*E_LOCAL)
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def _header_value(text: str) -> str:
    return " ".join(text.split())


@implementer(IConnector)
class PostOfficeConnector:
    """Delivers ``[SF:PO/MAILBOX]`` targets; groups ([SF:] names that are not mailboxes) fail."""

    scheme = "SF"

    def __init__(self, settings: Any, provider_store: Any, reactor: Any = None, threadpool: Any = None) -> None:
        """``settings``: tmmail.config.Settings, or the post offices folder itself (a str).

        Blocking work runs in ``threadpool`` (default: the reactor's pool).
        """
        if reactor is None:
            from twisted.internet import reactor
        self.postoffices_dir = settings if isinstance(settings, str) else settings.postoffices_dir
        #: RFC 5233 sub-addresses as folders ([router] subaddress_folders)
        self.subaddress_separator = ""
        if not isinstance(settings, str):
            section = (getattr(settings, "extra", None) or {}).get("router") or {}
            if isinstance(section, dict) and section.get("subaddress_folders") is True:
                self.subaddress_separator = str(section.get("subaddress_separator", "+"))
        self.store = provider_store
        self.reactor = reactor
        self.threadpool = threadpool
        self.sizer = MaildirSizer()
        self._pending: list[Any] = []
        self._jobs = 0
        #: quota reservations: Maildir path -> bytes of staged copies not yet in new/
        self._reserved: dict[str, int] = {}
        self._quota_lock = threading.Lock()

    def batch_key(self, target: Any) -> str:
        """One batch per mailbox, so a message lands in a mailbox once."""
        return str(target.value).upper()

    #: batch jobs in threads at once; further deliveries wait and go together in the next job
    MAX_JOBS = 2

    def deliver(self, envelope: Any, items: Sequence[tuple[Any, Any]], message_path: str) -> Any:
        """Queue the delivery; concurrent deliveries share one thread job and its syncs."""
        d: defer.Deferred = defer.Deferred()
        self._pending.append((envelope, items, message_path, d))
        self._kick()
        return d

    def _kick(self) -> None:
        if not self._pending or self._jobs >= self.MAX_JOBS:
            return
        batch, self._pending = self._pending, []
        self._jobs += 1
        pool = self.threadpool or self.reactor.getThreadPool()
        job = deferToThreadPool(self.reactor, pool, self.deliver_many_blocking, [b[:3] for b in batch])

        def done(result: Any) -> None:
            self._jobs -= 1
            for i, (_, _, _, d) in enumerate(batch):
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result[i])
            self._kick()

        job.addBoth(done)

    def deliver_many_blocking(
        self, requests: Sequence[tuple[Any, Sequence[tuple[Any, Any]], str]]
    ) -> list[list[DeliveryError | None]]:
        """Deliver several messages in the calling thread with shared syncs: every tmp file is
        written, one sync (syncfs per file system, else fsync per file), every rename into
        ``new/``, one sync.  The data is durable before a rename publishes it, and an outcome
        of None is returned only after the rename itself is durable."""
        snap = self.store.current()
        staged: list[list[Any]] = []  # [tmp, root, name, outcome slot, log args]
        results: list[list[DeliveryError | None]] = []
        for envelope, items, message_path in requests:
            done: dict[str, Any] = {}
            row: list[Any] = []
            for recipient, target in items:
                key = self.batch_key(target)
                if key not in done:
                    done[key] = self._plan_one(snap, envelope, recipient, target, message_path, staged)
                row.append(done[key])
            results.append(row)
        if staged:
            self._commit_staged(staged)
        return [[o.error if isinstance(o, _Slot) else o for o in row] for row in results]

    def _reserve(self, path: str, size: int, quota: int) -> bool:
        """Reserve ``size`` bytes of ``path``'s quota if they fit (see the module docstring)."""
        with self._quota_lock:
            reserved = self._reserved.get(path, 0)
            if self.sizer.size(path) + reserved + size > quota:
                return False
            self._reserved[path] = reserved + size
            return True

    def _release(self, reservation: tuple[str, int] | None) -> None:
        """Drop a reservation made by _reserve; the caller holds ``_quota_lock``."""
        if reservation is None:
            return
        path, size = reservation
        left = self._reserved.get(path, 0) - size
        if left > 0:
            self._reserved[path] = left
        else:
            self._reserved.pop(path, None)

    def _commit_staged(self, staged: list[Any]) -> None:
        try:
            self._sync({s.root for s in staged}, [s.tmp for s in staged], [])
        except OSError as e:
            log.error("batch sync of {n} Maildir files failed: {error}", n=len(staged), error=e)
            with self._quota_lock:
                for s in staged:
                    s.fail()
                    self._release(s.reservation)
                    s.reservation = None
            return
        moved = []
        for s in staged:
            # the rename and the release happen together: a concurrent quota check sees the
            # bytes either reserved or in new/, never in both nor in neither
            with self._quota_lock:
                try:
                    maildir.publish(s.tmp, s.root, s.name)
                    moved.append(s)
                except OSError as e:
                    log.error("{queue_id}: delivery to {mailbox} failed: {error}", queue_id=s.qid,
                              mailbox=s.mailbox, error=e)
                    s.fail()
                self._release(s.reservation)
                s.reservation = None
        try:
            self._sync({s.root for s in moved}, [], sorted({os.path.join(s.root, "new") for s in moved}))
        except OSError as e:
            log.error("batch directory sync failed: {error}", error=e)
            for s in moved:
                s.error = TransientError(*E_LOCAL)
            return
        for root in sorted({s.root for s in moved}):
            maildir.notify(root)
        for s in moved:
            log.info("{queue_id}: delivered to {mailbox} for {recipient} as {name}",
                     queue_id=s.qid, mailbox=s.mailbox, recipient=s.recipient, name=s.name)

    @staticmethod
    def _sync(roots: set[str], files: list[str], dirs: list[str]) -> None:
        """One shared syncfs per file system of ``roots``; without syncfs, fsync each path."""
        groups: dict[int, Any] | None = {}
        for p in roots:
            g = groupcommit.sync_group(p)
            if g is None:
                groups = None
                break
            groups[id(g)] = g
        if groups is not None:
            for g in groups.values():
                g.sync()
            return
        for p in files:
            groupcommit.fsync_path(p)
        for p in dirs:
            groupcommit.fsync_path(p, directory=True)

    def _plan_one(
        self, snap: Any, envelope: Any, recipient: Any, target: Any, message_path: str,
        staged: list[Any],
    ) -> Any:
        """Check the mailbox and its quota, then stage the file: an error, None (already
        there) or a _Slot holding a quota reservation."""
        po_name, _, mbx_name = str(target.value).partition("/")
        mbx = snap.mailbox(po_name, mbx_name)
        if mbx is None:
            return PermanentError(*E_NO_MAILBOX)
        po = snap.postoffice(mbx.postoffice)
        if not mbx.enabled or (po is not None and not po.enabled):
            return PermanentError(*E_DISABLED)
        prefix = (
            f"Return-Path: <{_header_value(envelope.sender)}>\n"
            f"Delivered-To: {_header_value(recipient.address)}\n"
        ).encode("utf-8")
        reservation: tuple[str, int] | None = None
        try:
            path = maildir.mailbox_path(self.postoffices_dir, mbx.postoffice, mbx.name)
            size = os.path.getsize(message_path) + len(prefix)
            if mbx.quota > 0:
                if size > mbx.quota:
                    return PermanentError(*E_TOO_BIG)
                if not self._reserve(path, size, mbx.quota):
                    log.info(
                        "{queue_id}: {mailbox} over quota {quota}",
                        queue_id=envelope.queue_id, mailbox=str(target), quota=mbx.quota,
                    )
                    return TransientError(*E_FULL)
                reservation = (path, size)
            if not os.path.exists(os.path.join(path, "subscriptions")):
                maildir.create(path)
            folder = self._subaddress_folder(path, recipient.address)
            if getattr(envelope, "recovered", False):
                name = already_delivered(maildir.folder_dir(path, folder), prefix, message_path, envelope.arrival)
                if name is not None:
                    log.info(
                        "{queue_id}: already in {mailbox} as {name} (delivered before a restart)",
                        queue_id=envelope.queue_id, mailbox=str(target), name=name,
                    )
                    self._unreserve(reservation)
                    return None
            tmp, root, name = maildir.stage(path, message_path, prefix=prefix, folder=folder)
        except (OSError, ValueError) as e:
            log.error(
                "{queue_id}: delivery to {mailbox} failed: {error}",
                queue_id=envelope.queue_id, mailbox=str(target), error=e,
            )
            self._unreserve(reservation)
            return TransientError(*E_LOCAL)
        slot = _Slot(tmp, root, name, envelope.queue_id, str(target), recipient.address, reservation)
        staged.append(slot)
        return slot

    def _unreserve(self, reservation: tuple[str, int] | None) -> None:
        if reservation is not None:
            with self._quota_lock:
                self._release(reservation)

    def deliver_blocking(
        self, envelope: Any, items: Sequence[tuple[Any, Any]], message_path: str
    ) -> list[DeliveryError | None]:
        """Deliver in the calling thread; one outcome per item, in order (a batch of one)."""
        return self.deliver_many_blocking([(envelope, items, message_path)])[0]

    def _subaddress_folder(self, path: str, address: str) -> str | None:
        """``user+Folder@d`` -> the existing top-level folder named ``Folder`` (any case)."""
        if not self.subaddress_separator:
            return None
        from tmmail.router import split_subaddress

        _, tag = split_subaddress(address.rpartition("@")[0], self.subaddress_separator)
        if not tag or "/" in tag or tag.startswith("."):
            return None
        try:
            if os.path.isdir(os.path.join(maildir.folder_dir(path, tag), "new")):
                return tag
            wanted = "." + tag.lower()
            for entry in os.listdir(path):
                if entry.lower() == wanted and os.path.isdir(os.path.join(path, entry, "new")):
                    return entry[1:]
        except (OSError, ValueError):
            return None
        return None

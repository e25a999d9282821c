"""The queue runner: takes messages from the spool, routes them, hands them to connectors.

For each message: incoming/ (or a due deferred/ one) -> active/, every pending recipient is
resolved (tmmail.router), due recipients are grouped by connector and batch key, their next
attempt time is saved *before* the attempt (so a crash never hammers a peer), each batch is
delivered, each outcome is saved as it arrives, and then the message is either finished
(reports sent, removed or kept in badmail/) or moved to deferred/ with its next due time in
an in-memory heap, so deferred/ is read once at start and never rescanned.

Only the runner decides what a failure means (ARCHITECTURE convention 4): PermanentError ->
failed; TransientError -> deferred with back-off (tmmail.schedule) until the queue lifetime,
then failed.  Reports follow RFC 3461/3464 (tmmail.dsn); nothing is reported to ``<>``; a
report that cannot be delivered goes to the postmaster once, and a postmaster copy that fails
stays in badmail/.

Blocking work (renames, fsyncs, reading envelopes) runs in a dedicated thread pool of
``settings.queue.io_threads``; the reactor thread only routes and bookkeeps.
"""

from __future__ import annotations

import heapq
import os
from collections import deque
from dataclasses import replace
from typing import Any, Callable, Iterable

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from tmmail import dsn, events as transfer_events, policy, schedule
from tmmail.address import AddressError, InternalAddress
from tmmail.envelope import (
    DEFERRED as R_DEFERRED,
    DELIVERED as R_DELIVERED,
    FAILED as R_FAILED,
    ORIGIN_DSN,
    ORIGIN_POSTMASTER,
    ORIGIN_SMTP,
    Envelope,
    EnvelopeError,
    Recipient,
)
from tmmail.errors import Delivered, DeliveryError, PermanentError, TransientError
from tmmail.router import (
    UNKNOWN_LOCAL,
    RouterOptions,
    count_received,
    options_from_settings,
    resolve,
    resolve_destination,
)
from tmmail.spool import ACTIVE, BADMAIL, DEFERRED, INCOMING, QUARANTINE, Spool

log = Logger(namespace="tmmail.runner")

#: replies the runner itself produces (RFC 3463 enhanced codes)
R_DELIVERED_OK = "250 2.0.0 Delivered"
E_UNKNOWN_USER = (550, "5.1.1", "Recipient address unknown")
E_ROUTING_LOOP = (550, "5.4.6", "Routing loop in the address map")
E_TOO_MANY_HOPS = (554, "5.4.6", "Too many hops (Received: headers), probably a mail loop")
E_NO_CONNECTOR = (451, "4.4.0", "No connector for this destination yet, will retry")
E_INTERNAL = (451, "4.3.0", "Internal error during delivery, will retry")
E_BAD_TARGET = (550, "5.1.2", "Unusable routing target")
#: transfer events (tmmail.events) refusing or postponing a message
E_HOOK_REJECT = (550, "5.7.1", "Message refused")
E_HOOK_RETRY = (451, "4.7.1", "Message held for a content check, will retry")

#: schemes delivered on this machine: no peer to hammer, so no save before the attempt
LOCAL_SCHEMES = ("SF",)
#: seconds before a message whose processing hit an I/O error is tried again
ERROR_RETRY = 60.0
#: seconds before a message whose hand-over from SMTP failed is taken from its files (reclaim)
RECLAIM_DELAY = 1.0


class _Progress:
    """The batches of one message still out, and how many of them wait for a destination."""

    __slots__ = ("outstanding", "parked", "released", "quarantine")

    def __init__(self, outstanding: int) -> None:
        self.outstanding = outstanding
        self.parked = 0
        self.released = False
        #: a deliver event's quarantine outcome: the message goes to quarantine/ at the end
        self.quarantine: Any = None


def _as_dict(connectors: Any) -> dict[str, Any]:
    if isinstance(connectors, dict):
        return {k.upper(): v for k, v in connectors.items()}
    return {c.scheme.upper(): c for c in connectors}


class Runner:
    """Moves mail through the spool; ``start``/``stop`` from the service, ``wake`` from SMTP."""

    def __init__(
        self,
        settings: Any,
        spool: Spool,
        provider_store: Any,
        connectors: Iterable[Any] | dict[str, Any],
        reactor: Any,
        threadpool: ThreadPool | None = None,
        events: Any = None,
        router_options: RouterOptions | None = None,
    ) -> None:
        """``events``: tmmail.events.TransferEvents; by default loaded from ``settings``
        (``[[events.pickup]]`` / ``[[events.deliver]]``; a bad entry raises ConfigError)."""
        self.settings = settings
        self.queue = settings.queue
        self.hostname = settings.server.hostname
        self.spool = spool
        self.store = provider_store
        self.connectors = _as_dict(connectors)
        self.reactor = reactor
        self.events = events if events is not None else transfer_events.load_events(settings, reactor)
        #: sub-addressing, depth and hop limits, SRS ([router] in tmmail.toml)
        self.router_options = router_options if router_options is not None else options_from_settings(settings)
        self._own_pool = threadpool is None
        self.pool = threadpool or ThreadPool(1, max(1, self.queue.io_threads), name="tmmail-runner")
        #: messages handled at once; most of them wait on the network (the SMTP connector has its
        #: own connection limits), so this is large enough that one slow destination cannot take
        #: every slot; blocking I/O is bounded by the thread pools, not by this
        self.max_active = max(64, self.queue.io_threads * 32)
        self.error_retry = ERROR_RETRY
        #: seconds before a message whose in-memory hand-over failed is taken from active/
        self.reclaim_delay = RECLAIM_DELAY
        #: batches out to one destination (SMTP: per domain) at once; the SMTP connector opens at
        #: most relay.max_connections_per_domain connections and reuses them for the rest
        relay = getattr(settings, "relay", None)
        self.dest_limit = max(8, 8 * int(getattr(relay, "max_connections_per_domain", 4)))
        self._dest_busy: dict[str, int] = {}
        self._dest_wait: dict[str, deque[defer.Deferred]] = {}
        #: messages waiting only for destination places (they hold no slot)
        self._parked = 0
        #: messages that were being delivered when a process stopped or an I/O error hit:
        #: their connectors check for deliveries that happened but were not recorded
        self._resumed: set[str] = set()
        #: messages handed over in memory by the SMTP server (``take``): queue id ->
        #: (envelope as written, start of the message or None); they are already in active/
        self._handed: dict[str, tuple[bytes, bytes | None]] = {}
        #: finished messages waiting for the shared removal job (queue id, durable, Deferred)
        self._removals: list[tuple[str, bool, defer.Deferred]] = []

        self._ready: deque[tuple[str, str]] = deque()
        self._queued: set[str] = set()
        self._inflight = 0
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._running = False
        self._started: defer.Deferred | None = None
        self._scanning = False
        self._rescan = False
        self._wake_pending = False
        self._loop: task.LoopingCall | None = None
        self._idle_waiters: list[defer.Deferred] = []
        self._locks: dict[str, defer.DeferredLock] = {}

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Recover the spool, load deferred/ into the heap, start the clock."""
        if self._own_pool:
            self.pool.start()
        self._running = True
        self._started = self._io(self._recover)
        self._started.addCallback(self._recovered)
        self._started.addErrback(lambda f: log.failure("spool recovery failed", f))
        return self._started

    def _recover(self) -> tuple[dict[str, list[str]], list[tuple[float, str]]]:
        found = self.spool.recover()
        due = []
        for qid, env in self.spool.iter_envelopes(DEFERRED):
            if env is None:
                self.spool.to_corrupt(qid, DEFERRED)
                continue
            when = env.next_due()
            due.append((0.0 if when is None else when, qid))
        return found, due

    def _recovered(self, result: tuple[dict[str, list[str]], list[tuple[float, str]]]) -> None:
        found, due = result
        for qid in found[ACTIVE]:
            self._resumed.add(qid)
            self._enqueue(qid, ACTIVE)
        for qid in found[INCOMING]:
            # the move to active/ is not synced (Spool.move durable=False): a message found
            # here may have been delivered already, so its connectors check, as for active/
            self._resumed.add(qid)
            self._enqueue(qid, INCOMING)
        for when, qid in due:
            self._push(qid, when)
        log.info(
            "queue recovered: {active} active, {incoming} incoming, {deferred} deferred",
            active=len(found[ACTIVE]), incoming=len(found[INCOMING]), deferred=len(due),
        )
        if self._running:
            self._loop = task.LoopingCall(self._tick)
            self._loop.clock = self.reactor
            self._loop.start(self.queue.scan_interval, now=True).addErrback(
                lambda f: log.failure("runner clock stopped", f)
            )

    def stop(self, timeout: float = 30.0) -> defer.Deferred:
        """Stop taking work; wait (up to ``timeout``) for messages in flight, stop the pool.

        Whatever is still in active/ after that is recovered on the next start.
        """
        self._running = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        d = self.when_idle(timeout)

        def stopped(_: Any) -> None:
            if self._own_pool and self.pool.started:
                self.pool.stop()

        d.addBoth(stopped)
        return d

    def wake(self, queue_id: str | None = None) -> None:
        """New mail in incoming/ (``queue_id`` is informational): scan soon.  Any thread."""
        self.reactor.callFromThread(self._wake)

    def take(self, queue_id: str, envelope: bytes, head: bytes | None) -> None:
        """A message the SMTP server has just committed into active/ (reactor thread):
        processed without a directory scan, a move or reading its files back.  ``envelope``
        is the envelope file's bytes, ``head`` the start of the message (None: read it).

        Never raises: if taking the message in memory fails (a bug), the error is logged and
        the message is taken from its files in active/ shortly after (``reclaim``)."""
        try:
            self._handed[queue_id] = (envelope, head)
            self._enqueue(queue_id, ACTIVE)
            self._pump()
        except Exception:
            log.failure("{queue_id}: hand-over from SMTP failed; taking it from active/ in {delay} s",
                        queue_id=queue_id, delay=self.reclaim_delay)
            self.reclaim(queue_id)

    def reclaim(self, queue_id: str) -> None:
        """A message committed into active/ whose hand-over (``take``) failed (reactor thread):
        forget anything kept of it in memory and take it from its files on disk in
        ``reclaim_delay`` seconds, as recovery does at start-up (its connectors check for a
        delivery that may have happened unrecorded).  Harmless if the message was processed
        after all: the activation then finds no files and does nothing."""
        self._handed.pop(queue_id, None)
        self._resumed.add(queue_id)
        self._push(queue_id, self.reactor.seconds() + self.reclaim_delay)

    def _wake(self) -> None:
        if self._wake_pending or not self._running:
            return
        self._wake_pending = True

        def go() -> None:
            self._wake_pending = False
            self._scan_incoming()

        self.reactor.callLater(0, go)

    def when_idle(self, timeout: float | None = None) -> defer.Deferred:
        """A Deferred fired when nothing is being processed or waiting to be (tests, stop)."""
        d: defer.Deferred = defer.Deferred()
        if self._idle():
            d.callback(None)
            return d
        self._idle_waiters.append(d)
        if timeout is not None:
            call = self.reactor.callLater(timeout, lambda: d.called or d.callback(None))
            d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    def queue_size(self) -> int:
        """Messages deferred in the heap (cheap; for stats and the admin command)."""
        return len(self._due)

    # -- scheduling -------------------------------------------------------------------------

    def _idle(self) -> bool:
        return (
            self._inflight == 0
            and self._parked == 0
            and not self._scanning
            and (not self._ready or not self._running)
        )

    def _check_idle(self) -> None:
        if self._idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                if not d.called:
                    d.callback(None)

    def _io(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def _push(self, qid: str, when: float) -> None:
        self._due[qid] = when
        heapq.heappush(self._heap, (when, qid))
        if len(self._heap) > 2 * len(self._due) + 1024:
            # drop stale entries (a message pushed again before its old entry came up)
            self._heap = [(w, q) for q, w in self._due.items()]
            heapq.heapify(self._heap)

    def _enqueue(self, qid: str, state: str) -> None:
        if qid in self._queued:
            return
        self._queued.add(qid)
        self._ready.append((qid, state))

    def _tick(self) -> None:
        self._scan_incoming()
        now = self.reactor.seconds()
        while self._heap and self._heap[0][0] <= now:
            when, qid = heapq.heappop(self._heap)
            if self._due.get(qid) != when:
                continue  # stale entry (rescheduled since)
            if qid in self._queued:
                # a stale scan is looking at it right now; do not lose the schedule
                self._push(qid, now + self.queue.scan_interval)
                continue
            del self._due[qid]
            self._enqueue(qid, DEFERRED)
        self._pump()

    def _scan_incoming(self) -> None:
        if not self._running:
            return
        if self._scanning:
            self._rescan = True
            return
        self._scanning = True
        d = self._io(self.spool.list, INCOMING)

        def listed(ids: list[str]) -> None:
            for qid in ids:
                self._enqueue(qid, INCOMING)

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                log.failure("cannot list incoming/", result)
            self._scanning = False
            self._pump()
            if self._rescan:
                self._rescan = False
                self._scan_incoming()
            self._check_idle()

        d.addCallback(listed)
        d.addBoth(done)

    def _pump(self) -> None:
        while self._ready and self._inflight < self.max_active and self._running:
            qid, state = self._ready.popleft()
            self._inflight += 1
            d = self._process(qid, state)
            d.addErrback(self._failed_one, qid)
            d.addBoth(self._finished_one, qid)
        self._check_idle()

    def _failed_one(self, f: Failure, qid: str) -> None:
        """An I/O error (disk full, ...): the files stay where they are; try again later."""
        log.failure("{queue_id}: processing failed, retrying in {delay} s", f, queue_id=qid, delay=self.error_retry)
        self._resumed.add(qid)
        self._push(qid, self.reactor.seconds() + self.error_retry)

    def _finished_one(self, _: Any, qid: str) -> None:
        self._inflight -= 1
        self._queued.discard(qid)
        self._locks.pop(qid, None)
        self._pump()

    # -- one message ------------------------------------------------------------------------

    def _activate(self, qid: str, src: str) -> Envelope | None:
        try:
            self.spool.move(qid, src, ACTIVE, durable=False)
        except FileNotFoundError:
            if not os.path.exists(self.spool.path(ACTIVE, qid, ".env")):
                return None  # already handled (a stale scan saw it) or removed by an admin
            # left in active/ by an earlier attempt that hit an I/O error
        try:
            env = self.spool.load(ACTIVE, qid)
        except FileNotFoundError:
            return None
        except EnvelopeError as e:
            log.error("{queue_id}: unreadable envelope: {error}", queue_id=qid, error=e)
            self.spool.to_corrupt(qid, ACTIVE)
            return None
        if any(not r.target and not r.final for r in env.recipients):
            with open(self.spool.message_path(ACTIVE, qid), "rb") as f:
                self._count_hops(env, f.read(1 << 16))
        return env

    def _handed_envelope(self, qid: str, raw: bytes, head: bytes | None) -> Envelope | None:
        """``_activate`` for a message handed over by ``take`` (reactor thread, no I/O unless
        the message was too big to keep its start in memory)."""
        try:
            env = Envelope.from_bytes(raw)
        except EnvelopeError as e:  # pragma: no cover - we wrote it a moment ago
            log.error("{queue_id}: unreadable envelope: {error}", queue_id=qid, error=e)
            return None
        if head is None:
            return None  # read it back in a thread (_activate; the move is a no-op)
        if any(not r.target and not r.final for r in env.recipients):
            self._count_hops(env, head)
        return env

    def _count_hops(self, env: Envelope, head: bytes) -> None:
        """First routing pass: RFC 5321 §6.3 loop detection by counting Received: fields."""
        hops = count_received(head)
        if hops > self.router_options.max_received:
            for r in env.recipients:
                if not r.final:
                    r.state = R_FAILED
                    r.bad = True
                    code, enh, text = E_TOO_MANY_HOPS
                    r.last_reply = f"{code} {enh} {text}: {hops}"
            log.warn("{queue_id}: {hops} Received: headers, put in badmail/", queue_id=env.queue_id, hops=hops)

    @defer.inlineCallbacks
    def _process(self, qid: str, src: str) -> Any:
        handed = self._handed.pop(qid, None)
        env = self._handed_envelope(qid, *handed) if handed is not None else None
        if env is None:
            env = yield self._io(self._activate, qid, src)
        if env is None:
            self._resumed.discard(qid)
            return
        if qid in self._resumed:
            self._resumed.discard(qid)
            env.recovered = True
        if not env.checked and env.origin == ORIGIN_SMTP and self.events.active(transfer_events.PICKUP):
            outcome = yield self.events.run(transfer_events.PICKUP, env, self.spool.message_path(ACTIVE, qid))
            if outcome.action == transfer_events.QUARANTINE:
                yield self._quarantine(env, outcome)
                return
            if outcome.accepted:
                env.checked = True
            else:
                if outcome.action == transfer_events.REJECT:
                    env.mail_params["RET"] = "HDRS"  # never send refused content back out
                now = self.reactor.seconds()
                for r in env.recipients:
                    if not r.final:
                        r.attempts += 1
                        r.last_attempt = now
                        self._apply(env, r, self._hook_error(outcome), now)
                yield self._finish(env)
                return
        now = self.reactor.seconds()
        self._route(env)
        # `tmmail queue flush` (tmmail.cli_queue) makes recipients due by saving next_attempt
        due = [r for r in env.recipients if not r.final and r.next_attempt <= now]
        if due:
            batches: dict[tuple[str, str, str], list[tuple[Recipient, InternalAddress]]] = {}
            immediate: list[tuple[Recipient, DeliveryError]] = []
            snap = self.store.current()
            for r in due:
                try:
                    target = InternalAddress.parse(r.target)
                except AddressError:
                    immediate.append((r, PermanentError(*E_BAD_TARGET)))
                    continue
                conn = self.connectors.get(target.scheme)
                if conn is None:
                    immediate.append((r, TransientError(*E_NO_CONNECTOR)))
                    continue
                sender = self._outbound_sender(env, r, target, snap)
                batches.setdefault((target.scheme, conn.batch_key(target), sender), []).append((r, target))
            for r, err in immediate:
                r.attempts += 1
                r.last_attempt = now
                self._apply(env, r, err, now)
            path = self.spool.message_path(ACTIVE, qid)
            progress = _Progress(len(batches))
            work = [
                self._deliver_batch(env if sender == env.sender else replace(env, sender=sender),
                                    scheme, key, items, path, progress)
                for (scheme, key, sender), items in batches.items()
            ]
            results = yield defer.DeferredList(work, consumeErrors=True)
            for ok, failure in results:
                if not ok:
                    # an I/O error (the envelope could not be saved): leave the files as
                    # they are and retry later (see _failed_one)
                    failure.raiseException()
            if progress.quarantine is not None:
                yield self._quarantine(env, progress.quarantine)
                return
        yield self._finish(env)

    def _outbound_sender(self, env: Envelope, r: Recipient, target: InternalAddress, snap: Any) -> str:
        """The MAIL FROM for a target: SRS when we forward a hosted address to another domain.

        The receiving MTA checks SPF against our IP, so mail we forward (a redirect, an alias,
        a group member outside) leaves with an SRS address of the recipient's domain; bounces
        to it come back and the router returns them to the real sender (tmmail.srs).
        """
        srs = self.router_options.srs
        if srs is None or target.scheme != "SMTP" or not env.sender:
            return env.sender
        original = self._full_address(r.address)
        domain = original.rpartition("@")[2].lower()
        entry = snap.domain(domain)
        if entry is None or not entry.enabled or entry.route.strip():
            return env.sender  # relayed for a client or for a routed domain: not a forward
        if snap.is_hosted_domain(env.sender.rpartition("@")[2]):
            return env.sender  # our own sender: SPF passes as it is
        if target.value.lower() == original.lower():
            return env.sender
        try:
            return srs.forward(env.sender, domain)
        except ValueError:
            return env.sender

    @staticmethod
    def _hook_error(outcome: Any) -> DeliveryError:
        if outcome.action == transfer_events.REJECT:
            code, enh, text = E_HOOK_REJECT
            return PermanentError(code, enh, outcome.text or text)
        code, enh, text = E_HOOK_RETRY
        return TransientError(code, enh, outcome.text or text)

    def _quarantine(self, env: Envelope, outcome: Any) -> defer.Deferred:
        """Put the message aside in quarantine/ (the envelope as it is now); nobody is told."""
        log.warn("{queue_id}: quarantined by {hook}: {text}", queue_id=env.queue_id,
                 hook=outcome.hook or "a transfer event", text=outcome.text or "-")
        data = env.to_bytes()

        def move() -> None:
            self.spool.save_bytes(ACTIVE, env.queue_id, data)
            self.spool.move(env.queue_id, ACTIVE, QUARANTINE)

        return self._io(move)

    def _retry_time(self, env: Envelope, r: Recipient, now: float) -> float:
        return schedule.clamp_to_expiry(schedule.next_attempt(now, r.attempts, self.queue), env.arrival, self.queue)

    @property
    def postmaster(self) -> str:
        """Where reports about mail that cannot be bounced go ([queue] postmaster).

        A bare local part is taken in the primary domain (tmmail.policy.postmaster_address),
        not the host name: ``postmaster@mail.example.com`` is usually not hosted, so reports
        to it were relayed to DNS and failed.  Read from the current tables each time, so a
        domain added or removed later is followed.
        """
        return policy.postmaster_address(self.store.current(), self.hostname, self.queue.postmaster)

    def _full_address(self, address: str) -> str:
        """RFC 5321 §4.1.1.3: a bare ``<Postmaster>`` is this host's postmaster."""
        if "@" in address:
            return address
        if address.lower() == "postmaster":
            return self.postmaster
        return f"{address}@{self.hostname}"

    def _route(self, env: Envelope) -> None:
        """Resolve recipients without a target; a recipient with several targets is split."""
        if all(r.target or r.final for r in env.recipients):
            return
        snap = self.store.current()
        out: list[Recipient] = []
        for r in env.recipients:
            if r.target or r.final:
                out.append(r)
                continue
            address = self._full_address(r.address)
            if r.branch:
                # a failed branch requeued from badmail/: only that destination again
                res = resolve_destination(snap, r.branch, self.router_options)
            else:
                res = resolve(snap, address, self.router_options)
            if res.kind == UNKNOWN_LOCAL or not res.targets:
                r.state = R_FAILED
                r.bad = True
                code, enh, text = E_ROUTING_LOOP if res.loop else E_UNKNOWN_USER
                if r.branch:
                    text = f"Expansion of {r.branch} failed"
                r.last_reply = f"{code} {enh} <{r.address}>: {text}" + (f" ({res.reason})" if res.reason else "")
                log.info("{queue_id}: {recipient} resolves nowhere: {reason}",
                         queue_id=env.queue_id, recipient=r.address, reason=res.reason)
                out.append(r)
                continue
            for f in res.failures:
                # one branch of an alias/group resolves nowhere: the others get the message,
                # this one keeps it in badmail/ and the sender is told which member failed
                out.append(replace(r, target="", state=R_FAILED, bad=True, branch=f.destination,
                                   last_reply=f"550 {f.status} <{r.address}>: Expansion of {f.destination} "
                                              f"failed ({f.reason})"))
                log.info("{queue_id}: {recipient}: branch {branch} resolves nowhere: {reason}",
                         queue_id=env.queue_id, recipient=r.address, branch=f.destination, reason=f.reason)
            for i, target in enumerate(res.targets):
                rr = r if i == 0 else replace(r)
                rr.target = str(target)
                rr.branch = ""
                out.append(rr)
            if len(res.targets) > 1 or not str(res.targets[0]).startswith("[SF:"):
                # one local mailbox is named by its delivery line; log fan-outs and relays
                log.debug("{queue_id}: {recipient} -> {targets} ({kind})", queue_id=env.queue_id,
                          recipient=r.address, targets=" ".join(map(str, res.targets)), kind=res.kind)
        env.recipients = out

    @defer.inlineCallbacks
    def _deliver_batch(
        self,
        env: Envelope,
        scheme: str,
        key: str,
        items: list[tuple[Recipient, InternalAddress]],
        path: str,
        progress: _Progress,
    ) -> Any:
        """Deliver one batch; save its outcomes at once unless it is the last one out
        (then ``_finish`` writes them, or removes the message, right away).

        A batch for a peer first waits for a place among the ``dest_limit`` batches that may be
        out to one destination, and saves its next attempt time before it goes.
        """
        conn = self.connectors[scheme]
        remote = scheme not in LOCAL_SCHEMES
        dest = f"{scheme}:{key}"
        if self.events.active(transfer_events.DELIVER) and not env.released:
            outcome = yield self.events.run(
                transfer_events.DELIVER, env, path, [str(t) for _, t in items]
            )
            if not outcome.accepted:
                now = self.reactor.seconds()
                if outcome.action == transfer_events.QUARANTINE:
                    progress.quarantine = outcome  # the message is put aside when all are back
                else:
                    if outcome.action == transfer_events.REJECT:
                        env.mail_params["RET"] = "HDRS"  # never send refused content back out
                    for r, _ in items:
                        r.attempts += 1
                        r.last_attempt = now
                        self._apply(env, r, self._hook_error(outcome), now)
                progress.outstanding -= 1
                if progress.outstanding > 0:
                    yield self._save(env)
                return
        if remote:
            yield self._dest_acquire(dest, env.queue_id, progress)
        try:
            now = self.reactor.seconds()
            for r, _ in items:
                r.attempts += 1
                r.last_attempt = now
                if remote:
                    # saved before the attempt: a crash during it never makes us hammer a peer
                    # (local deliveries are simply tried again at restart)
                    r.next_attempt = self._retry_time(env, r, now)
            if remote:
                yield self._save(env)
            try:
                outcomes = yield defer.maybeDeferred(conn.deliver, env, items, path)
                outcomes = list(outcomes)
                if len(outcomes) != len(items):
                    raise ValueError(f"connector {scheme} gave {len(outcomes)} outcomes for {len(items)} items")
            except Exception as e:
                log.failure("{queue_id}: connector {scheme} failed", Failure(e), queue_id=env.queue_id, scheme=scheme)
                outcomes = [TransientError(*E_INTERNAL)] * len(items)
        finally:
            if remote:
                self._dest_release(dest)
        now = self.reactor.seconds()
        for (r, _), outcome in zip(items, outcomes):
            if outcome is not None and not isinstance(outcome, (DeliveryError, Delivered)):
                log.error("{queue_id}: connector {scheme} returned {outcome!r}", queue_id=env.queue_id,
                          scheme=scheme, outcome=outcome)
                outcome = TransientError(*E_INTERNAL)
            self._apply(env, r, outcome, now)
        progress.outstanding -= 1
        if progress.outstanding > 0:
            yield self._save(env)

    # -- per-destination limit ----------------------------------------------------------------

    def _dest_acquire(self, dest: str, qid: str, progress: _Progress) -> defer.Deferred:
        """A place for one batch to ``dest``; while a message waits for places for all its
        remaining batches it gives its slot among ``max_active`` to another message, so a slow
        destination's backlog does not hold up mail for everyone else."""
        if self._dest_busy.get(dest, 0) < self.dest_limit:
            self._dest_busy[dest] = self._dest_busy.get(dest, 0) + 1
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._dest_wait.setdefault(dest, deque()).append(d)
        progress.parked += 1
        if progress.parked == progress.outstanding and not progress.released:
            progress.released = True
            self._parked += 1
            self._inflight -= 1
            self.reactor.callLater(0, self._pump)

        def resumed(result: Any) -> Any:
            progress.parked -= 1
            if progress.released:
                progress.released = False
                self._parked -= 1
                self._inflight += 1
            return result

        d.addCallback(resumed)
        return d

    def _dest_release(self, dest: str) -> None:
        waiting = self._dest_wait.get(dest)
        if waiting:
            d = waiting.popleft()
            if not waiting:
                del self._dest_wait[dest]
            d.callback(None)  # the place passes on directly
            return
        self._dest_busy[dest] -= 1
        if not self._dest_busy[dest]:
            del self._dest_busy[dest]

    def _apply(self, env: Envelope, r: Recipient, outcome: DeliveryError | Delivered | None, now: float) -> None:
        # set only for a reply a peer sent (tmmail.connectors.smtp): the DSN's Remote-MTA
        r.remote_mta = str(getattr(outcome, "remote_mta", "") or "")
        if outcome is None or isinstance(outcome, Delivered):
            r.state = R_DELIVERED
            r.last_reply = R_DELIVERED_OK
            if outcome is not None and outcome.dsn_passed:
                # RFC 3461 §5.2.1: NOTIFY went on to a DSN-capable next hop, which
                # reports success itself; a "relayed" notice is only for one that cannot (§5.2.2)
                r.reported = True
        elif outcome.permanent:
            r.state = R_FAILED
            r.last_reply = outcome.reply()
        elif schedule.expired(env.arrival, now, self.queue):
            r.state = R_FAILED
            r.last_reply = outcome.reply()
        else:
            r.state = R_DEFERRED
            r.last_reply = outcome.reply()
            r.next_attempt = self._retry_time(env, r, now)
        if r.state != R_DELIVERED or not r.target.upper().startswith(("[SF:", "[SMTP:")):
            # a delivery is logged once, by its connector (the file name; the peer and its reply)
            log.info("{queue_id}: {recipient} via {target}: {state} ({reply})", queue_id=env.queue_id,
                     recipient=r.address, target=r.target, state=r.state, reply=r.last_reply)

    def _save(self, env: Envelope) -> defer.Deferred:
        """Save the envelope; saves of one message are serialised and take the newest state."""
        lock = self._locks.setdefault(env.queue_id, defer.DeferredLock())

        def write(_: Any) -> defer.Deferred:
            return self._io(self.spool.save_bytes, ACTIVE, env.queue_id, env.to_bytes())

        d = lock.acquire()
        d.addCallback(write)
        d.addBoth(lambda r: (lock.release(), r)[1])
        return d

    # -- finishing --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _finish(self, env: Envelope) -> Any:
        now = self.reactor.seconds()
        qid = env.queue_id
        reports: list[tuple[str, list[dsn.RecipientReport], bool]] = []
        delayed = [
            r for r in env.recipients
            if r.state == R_DEFERRED and env.sender and r.wants("DELAY")
            and schedule.delay_notice_due(env.arrival, now, r.delay_notified, self.queue)
        ]
        if delayed:
            until = schedule.expires_at(env.arrival, self.queue)
            reports.append((env.sender, [self._report(r, dsn.DELAYED, until) for r in delayed], False))
            for r in delayed:
                r.delay_notified = now
        # final outcomes are reported at once, not when the last recipient is done, so a hard
        # failure is not hidden behind another recipient's days of retries
        failed = [r for r in env.recipients if r.state == R_FAILED and not r.reported]
        succeeded = [r for r in env.recipients if r.state == R_DELIVERED and not r.reported and r.wants("SUCCESS")]
        if env.sender:
            rows = [self._report(r, dsn.FAILED) for r in failed if r.wants("FAILURE")]
            # RFC 3464 §2.3.3: "relayed" when it left us for an MTA that may not report
            rows += [
                self._report(r, dsn.DELIVERED if r.target.upper().startswith("[SF:") else dsn.RELAYED)
                for r in succeeded
            ]
            if rows:
                reports.append((env.sender, rows, False))
        elif failed and env.origin != ORIGIN_POSTMASTER:
            # a report (or other <> mail) that failed: the postmaster hears of it, once
            reports.append((self.postmaster, [self._report(r, dsn.FAILED) for r in failed], True))
        for r in failed + succeeded:
            r.reported = True
        keep = any(r.bad for r in env.recipients) or (
            not env.sender and env.origin == ORIGIN_POSTMASTER and any(r.state == R_FAILED for r in env.recipients)
        )
        done = env.done
        if done and not keep and not reports:
            # a plain removal records the outcome itself (no save before it), is not logged
            # (each recipient's outcome line says it) and shares a thread job with others
            yield self._remove(qid, durable=not self._recorded_in_maildirs(env))
            return
        data = env.to_bytes()
        when = env.next_due()
        yield self._io(self._finish_blocking, env, data, reports, done, keep)
        if done:
            log.info("{queue_id}: finished{where}", queue_id=qid, where=" (kept in badmail/)" if keep else "")
        else:
            self._push(qid, when if when is not None else now)

    @staticmethod
    def _recorded_in_maildirs(env: Envelope) -> bool:
        """Every recipient was delivered into a Maildir: each copy is its own record
        (recovery recognises it), so losing the removal in a crash re-sends nothing."""
        return all(r.state == R_DELIVERED and r.target.upper().startswith("[SF:") for r in env.recipients)

    def _remove(self, qid: str, durable: bool) -> defer.Deferred:
        """Remove a finished message from active/; removals queued in one reactor turn share
        one thread job (and, if any must be durable, one directory sync)."""
        d: defer.Deferred = defer.Deferred()
        self._removals.append((qid, durable, d))
        if len(self._removals) == 1:
            self.reactor.callLater(0, self._run_removals)
        return d

    def _run_removals(self) -> None:
        batch, self._removals = self._removals, []

        def work() -> list[BaseException | None]:
            out: list[BaseException | None] = []
            for qid, _, _ in batch:
                try:
                    self.spool.remove(qid, ACTIVE, durable=False)
                    out.append(None)
                except OSError as e:
                    out.append(e)
            if any(durable for _, durable, _ in batch):
                self.spool.sync(ACTIVE)
            return out

        def done(results: list[BaseException | None]) -> None:
            for (_, _, d), err in zip(batch, results):
                if err is None:
                    d.callback(None)
                else:
                    d.errback(Failure(err))

        def failed(f: Failure) -> None:
            for _, _, d in batch:
                d.errback(f)

        self._io(work).addCallbacks(done, failed)

    def _report(self, r: Recipient, action: str, until: float | None = None) -> dsn.RecipientReport:
        if action in (dsn.DELIVERED, dsn.RELAYED):
            status = "2.0.0"
        else:
            status = dsn.reply_status(r.last_reply, action == dsn.FAILED)
        address = self._full_address(r.address)
        return dsn.RecipientReport(
            final_recipient=address,
            action=action,
            status=status,
            original_recipient=dsn.xtext_decode(r.orcpt) if r.orcpt else None,
            diagnostic=r.last_reply if action not in (dsn.DELIVERED, dsn.RELAYED) else None,
            remote_mta=r.remote_mta or None,
            # RFC 3464 §2.3.6: "smtp" only for what a remote server said; our own replies
            # (refusals before sending, DNS, lost connections, local delivery) get an X- type
            diagnostic_type="smtp" if r.remote_mta else dsn.LOCAL_DIAGNOSTIC,
            last_attempt=r.last_attempt or None,
            will_retry_until=until,
        )

    def _finish_blocking(
        self,
        env: Envelope,
        data: bytes,
        reports: list[tuple[str, list[dsn.RecipientReport], bool]],
        done: bool,
        keep: bool,
    ) -> None:
        """Queue reports, save the envelope (marking them sent), then remove/keep/defer.

        A crash after a report is queued but before the envelope is saved sends that report
        again on recovery: a duplicate notice, never a lost one.
        """
        qid = env.queue_id
        for to, rows, postmaster in reports:
            try:
                self._queue_report(env, to, rows, postmaster)
            except OSError as e:
                log.error("{queue_id}: cannot queue report to {to}: {error}", queue_id=qid, to=to, error=e)
        if data:
            self.spool.save_bytes(ACTIVE, qid, data)
        if done:
            if keep:
                self.spool.move(qid, ACTIVE, BADMAIL)
            else:
                self.spool.remove(qid, ACTIVE)  # reports were queued: a durable removal
        else:
            self.spool.move(qid, ACTIVE, DEFERRED)
        if reports:
            self.reactor.callFromThread(self._wake)

    def _queue_report(self, env: Envelope, to: str, rows: list[dsn.RecipientReport], postmaster: bool) -> None:
        limit = self.queue.dsn_max_return
        with open(self.spool.message_path(ACTIVE, env.queue_id), "rb") as f:
            original = f.read(limit + 1)
        complete = len(original) <= limit
        now = self.reactor.seconds()
        report = dsn.build_report(
            hostname=self.hostname,
            to=to,
            recipients=rows,
            original=original,
            arrival=env.arrival,
            now=now,
            envid=env.envid,
            # a delay notice carries only the header: the message itself is still on its way
            ret="HDRS" if all(r.action == dsn.DELAYED for r in rows) else env.ret,
            max_return=limit,
            original_complete=complete,
            queue_id=env.queue_id,
            received_from=env.helo or None,
            postmaster=postmaster,
        )
        params: dict[str, Any] = {}
        if any(b > 127 for b in report):
            params["BODY"] = "8BITMIME"
        if not to.isascii():
            params["SMTPUTF8"] = True
        origin = ORIGIN_POSTMASTER if postmaster else ORIGIN_DSN
        new = self.spool.add(
            lambda new_id: Envelope.new(
                queue_id=new_id, sender="", recipients=[to], helo=self.hostname, client_ip="",
                protocol="LOCAL", mail_params=params, arrival=now, origin=origin,
            ),
            report,
        )
        log.info("{queue_id}: report ({actions}) to {to} queued as {report_id}", queue_id=env.queue_id,
                 actions=",".join(sorted({r.action for r in rows})), to=to, report_id=new.queue_id)


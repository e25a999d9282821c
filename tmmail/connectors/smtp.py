"""The SMTP connector: delivers ``[SMTP:user@domain]`` targets to other mail servers.

One call of :meth:`SMTPConnector.deliver` is one message to one destination domain (the
runner batches by :meth:`batch_key`, the lower-case domain), normally one mail transaction.
The route comes from tmmail.routes (domain route, smarthost or MX); MX hosts and every
address of each are tried in turn (RFC 5321 §5.1) until one takes the transaction.  Only
failures before any mail command (connect, greeting, EHLO, TLS, AUTH) or a connection lost
before the data was sent move on to the next host; a reply to MAIL/RCPT/DATA is the answer.

Connections are pooled per destination: a finished session is handed to the next delivery
waiting for the same destination or kept idle for ``IDLE_SECONDS`` (RSET before reuse), and
``relay.max_connections_per_domain`` / ``relay.max_connections`` bound the open connections
(an idle connection of another destination is closed when the global limit is reached).

Outcomes (tmmail.interfaces.IConnector): tmmail.errors.Delivered (the host that took it, and
whether it supports DSN and so takes over NOTIFY=SUCCESS reporting), or a TransientError /
PermanentError with the reply (code, enhanced code, text) and, only when the peer sent that
reply, ``remote_mta`` (the host name), so the DSN tells what a remote server said from what
TMmail decided itself.
"""

from __future__ import annotations

import collections
import os
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from tmmail import routes
from tmmail.errors import Delivered, DeliveryError, PermanentError, TransientError
from tmmail.interfaces import IConnector
from tmmail.mx import Hop, Resolver
from tmmail.smtpclient import (
    DEFERRED,
    DELIVERED,
    ClientConfig,
    OutboundMessage,
    OutboundRecipient,
    RecipientResult,
    ReplyError,
    Session,
    SMTPClientError,
    TLSFailed,
    open_session,
    xtext,
)

__all__ = ["SMTPConnector", "IDLE_SECONDS", "MAX_TRANSACTIONS", "MAX_RECIPIENTS", "message_size"]

log = Logger(namespace="tmmail.connectors.smtp")

#: how long a finished connection waits for another message to the same destination
IDLE_SECONDS = 5.0
#: transactions per connection before it is closed (servers limit this too)
MAX_TRANSACTIONS = 100
#: recipients per transaction (RFC 5321 §4.5.3.1.8: servers must take at least 100)
MAX_RECIPIENTS = 100
#: messages up to this size are measured on the reactor thread (one small read)
INLINE_SIZE = 64 * 1024
#: how long to skip STARTTLS with a host whose TLS handshake failed
NO_TLS_SECONDS = 3600.0


def message_size(path: str) -> int:
    """BLOCKING: octets of the message on the wire (LF -> CRLF), for SIZE= (RFC 1870)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            size += chunk.count(b"\n")
    return size


Share = tuple[Any, ...]
#: one recipient's outcome (None only before it has one)
Outcome = DeliveryError | Delivered | None


def share_key(session: Session) -> Share | None:
    """Which deliveries may reuse ``session`` across destinations: the same peer address and
    port with the same client settings (as Postfix's connection cache, keyed by the peer);
    None for verified TLS, whose check names one host."""
    c = session.config
    if c.verify:
        return None
    return (session.address, session.port, c.tls, c.user, c.source_address)


class _Pool:
    """Open connections per destination key: idle sessions, waiters, per-key and total limits.

    An idle session also serves another destination whose first hop is the same peer
    (:func:`share_key`): the connection moves to that destination's count, one transaction
    per destination still.
    """

    def __init__(self, reactor: Any, per_key: int, total: int, idle_seconds: float) -> None:
        self.reactor = reactor
        self.per_key = max(1, per_key)
        self.total = max(1, total)
        self.idle_seconds = idle_seconds
        self.open: collections.Counter[str] = collections.Counter()
        self.idle: dict[str, list[tuple[Session, Any]]] = {}
        #: share key -> {id(session): key} of idle sessions, oldest first
        self.shared: dict[Share, dict[int, str]] = {}
        self.waiters: collections.deque[tuple[str, Share | None, defer.Deferred]] = collections.deque()
        #: evicted idle connections still closing (they count until they are gone)
        self.closing = 0
        #: sum(open.values()), kept in step
        self._open_sum = 0
        self._idle_count = 0

    @property
    def open_total(self) -> int:
        return self._open_sum + self.closing

    def take_idle(self, key: str) -> Session | None:
        """An idle usable session of ``key`` right now, or None (then resolve and :meth:`acquire`)."""
        idle = self.idle.get(key)
        while idle:
            session = self._pop_idle(key, idle, -1)
            if session.usable:
                return session
            session.abort()
            self._forget(key)
        return None

    def acquire(self, key: str, share: Share | None = None) -> defer.Deferred:
        """Deferred[Session | None]: an idle session of ``key`` (or of another key on the same
        peer, ``share``), or None = a free slot to connect."""
        ok, session = self._take(key, share)
        if ok:
            return defer.succeed(session)
        d: defer.Deferred = defer.Deferred()
        self.waiters.append((key, share, d))
        return d

    def _pop_idle(self, key: str, idle: list[tuple[Session, Any]], index: int) -> Session:
        session, timer = idle.pop(index)
        self._idle_count -= 1
        if timer.active():
            timer.cancel()
        sk = share_key(session)
        if sk is not None:
            by = self.shared.get(sk)
            if by is not None:
                by.pop(id(session), None)
                if not by:
                    del self.shared[sk]
        return session

    def _add_idle(self, key: str, session: Session) -> None:
        timer = self.reactor.callLater(self.idle_seconds, self._expire, key, session)
        self.idle.setdefault(key, []).append((session, timer))
        self._idle_count += 1
        sk = share_key(session)
        if sk is not None:
            self.shared.setdefault(sk, {})[id(session)] = key

    def _count(self, key: str) -> None:
        self.open[key] += 1
        self._open_sum += 1

    def _take(self, key: str, share: Share | None = None) -> tuple[bool, Session | None]:
        """Claim an idle session or a slot for ``key`` if the limits allow (no callbacks run)."""
        session = self.take_idle(key)
        if session is not None:
            return True, session
        if self.open[key] >= self.per_key:
            return False, None
        while share is not None and share in self.shared:
            other = next(iter(self.shared[share].values()))
            idle = self.idle[other]
            i = next(i for i, (s, _) in enumerate(idle) if share_key(s) == share)
            session = self._pop_idle(other, idle, i)
            self._forget(other)
            if session.usable:
                self._count(key)
                return True, session
            session.abort()
        if self.open_total >= self.total:
            if not self.closing:
                self._evict_other(key)
            return False, None
        self._count(key)
        return True, None

    def _evict_other(self, key: str) -> None:
        """Close an idle connection of another destination; its slot frees once it is gone."""
        for other, sessions in self.idle.items():
            if other != key and sessions:
                session = self._pop_idle(other, sessions, 0)
                self._forget(other)
                if session.proto.closed:
                    return
                self.closing += 1
                self._quit(session)
                session.proto.when_closed().addCallback(self._evicted)
                return

    def _evicted(self, _: Any) -> None:
        self.closing -= 1
        self._dispatch()

    def release(self, key: str, session: Session | None) -> None:
        """Give back the slot; a usable session goes to the next waiter of ``key`` (or of the
        same peer) or idles."""
        if session is not None and session.usable and session.transactions < MAX_TRANSACTIONS:
            sk = share_key(session)
            for i, (k, share, d) in enumerate(self.waiters):
                if k == key:
                    del self.waiters[i]
                    d.callback(session)
                    return
                if sk is not None and share == sk and self.open[k] < self.per_key:
                    del self.waiters[i]
                    self._forget(key)
                    self._count(k)
                    d.callback(session)
                    return
            self._add_idle(key, session)
            if self.waiters:
                self._dispatch()  # others may be waiting for a global slot this one holds
            return
        if session is not None:
            self._quit(session)
        self._forget(key)
        self._dispatch()

    def _expire(self, key: str, session: Session) -> None:
        sessions = self.idle.get(key, [])
        for i, (s, _) in enumerate(sessions):
            if s is session:
                self._pop_idle(key, sessions, i)
                self._quit(session)
                self._forget(key)
                self._dispatch()
                return

    def _forget(self, key: str) -> None:
        self.open[key] -= 1
        self._open_sum -= 1
        if self.open[key] <= 0:
            del self.open[key]
        if key in self.idle and not self.idle[key]:
            del self.idle[key]

    def _dispatch(self) -> None:
        """Grant waiting deliveries in arrival order (a callback may re-enter: rescan)."""
        i = 0
        while i < len(self.waiters):
            if self.open_total >= self.total and not self._idle_count:
                return  # nothing to grant until a connection closes or idles
            key, share, d = self.waiters[i]
            ok, session = self._take(key, share)
            if not ok:
                i += 1
                continue
            del self.waiters[i]
            d.callback(session)
            i = 0

    @staticmethod
    def _quit(session: Session) -> None:
        if session.usable:
            defer.Deferred.fromCoroutine(session.quit()).addErrback(lambda f: None)
        else:
            session.abort()

    def close_idle(self) -> None:
        for key, sessions in list(self.idle.items()):
            while sessions:
                session = self._pop_idle(key, sessions, -1)
                self._quit(session)
                self._forget(key)
        self._dispatch()


@implementer(IConnector)
class SMTPConnector:
    """IConnector for [SMTP:...] targets (see the module docstring)."""

    scheme = "SMTP"

    def __init__(
        self,
        settings: Any,
        provider_store: Any = None,
        reactor: Any = None,
        resolver: Resolver | None = None,
        trust_root: Any = None,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # noqa: PLC0415 - tap.py passes the reactor in
        self.settings = settings
        self.relay = settings.relay
        self.store = provider_store
        self.reactor = reactor
        self.resolver = resolver or Resolver.from_settings(settings, reactor=reactor)
        #: IOpenSSLTrustRoot for verified (smarthost) TLS; None = the platform's CA store
        if trust_root is None and getattr(self.relay, "smarthost_ca_file", ""):
            from twisted.internet import ssl  # noqa: PLC0415

            with open(settings.resolve(self.relay.smarthost_ca_file), "rb") as f:
                pems = f.read()
            marker = b"-----BEGIN CERTIFICATE-----"
            certs = [ssl.Certificate.loadPEM(marker + p) for p in pems.split(marker)[1:]]
            trust_root = ssl.trustRootFromCertificates(certs)
        self.trust_root = trust_root
        self.helo_name = self.relay.helo_name or settings.server.hostname
        #: our own names: an MX list that names us is cut there (RFC 5321 §5.1)
        self.local_names = tuple({settings.server.hostname.lower(), self.helo_name.lower()})
        self.pool = _Pool(reactor, self.relay.max_connections_per_domain, self.relay.max_connections, idle_seconds)
        #: address -> until when STARTTLS is skipped (its handshake failed)
        self._no_tls: dict[str, float] = {}
        routes.smarthost_route(self.relay)  # a bad smarthost setting fails at start, not per message

    # -- IConnector -------------------------------------------------------------------------

    def batch_key(self, target: Any) -> str:
        return target.value.rpartition("@")[2].lower()

    def deliver(self, envelope: Any, items: list[tuple[Any, Any]], message_path: str) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._deliver(envelope, items, message_path))

    def close(self) -> None:
        """QUIT idle connections (the service calls this when stopping)."""
        self.pool.close_idle()

    # -- one batch --------------------------------------------------------------------------

    async def _deliver(self, envelope: Any, items: list[tuple[Any, Any]], path: str) -> list[Outcome]:
        domain = self.batch_key(items[0][1])
        try:
            route = routes.route_for(domain, self.store.current() if self.store is not None else None, self.relay)
        except Exception as e:  # a bad ROUTE cell: retry after the admin fixes it
            err = TransientError(451, "4.3.5", f"bad route for {domain}: {e}")
            return [err] * len(items)
        if os.path.getsize(path) <= INLINE_SIZE:
            size = message_size(path)  # a page-cache read: cheaper than a hand-off to a thread
        else:
            size = await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), message_size, path)
        params = {str(k).upper(): v for k, v in (envelope.mail_params or {}).items()}
        body = params.get("BODY")
        msg = OutboundMessage(
            sender=envelope.sender,
            recipients=tuple(
                OutboundRecipient(
                    address=target.value,
                    notify=r.notify,
                    orcpt=r.orcpt or ("rfc822;" + xtext(r.address) if "@" in r.address else None),
                )
                for r, target in items
            ),
            path=path,
            size=size,
            body=str(body).upper() if body and body is not True else None,
            smtputf8=bool(params.get("SMTPUTF8")),
            ret=envelope.ret,
            envid=envelope.envid,
        )
        session = self.pool.take_idle(route.key)
        hops: list[Hop] | None = None
        if session is None:
            hops = await self._hops(envelope.queue_id, route, domain)
            if isinstance(hops, DeliveryError):
                return [hops] * len(items)
            share = None
            config = self._config(route)
            if hops and not config.verify:
                share = (hops[0].address, hops[0].port, config.tls, config.user, config.source_address)
            session = await self.pool.acquire(route.key, share)
            if session is not None and hops and session.address == hops[0].address:
                session.host = hops[0].host  # a connection shared with another destination
        try:
            outcomes, session = await self._attempt(envelope.queue_id, route, domain, msg, session, hops)
        except BaseException:
            if session is not None:
                session.abort()
            self.pool.release(route.key, None)
            raise
        self.pool.release(route.key, session)
        return outcomes

    async def _attempt(
        self, qid: str, route: routes.Route, domain: str, msg: OutboundMessage, session: Session | None,
        hops: list[Hop] | None = None,
    ) -> tuple[list[Outcome], Session | None]:
        """Deliver to every recipient: ``MAX_RECIPIENTS`` per transaction on one connection, and
        recipients refused with "452 too many recipients" again in a further transaction
        (RFC 5321 §4.5.3.1.10)."""
        n = len(msg.recipients)
        outcomes: list[Outcome] = [None] * n
        chunks = collections.deque(list(range(i, min(n, i + MAX_RECIPIENTS))) for i in range(0, n, MAX_RECIPIENTS))
        todo = chunks.popleft()
        session, results = await self._first(qid, route, domain, msg, todo, outcomes, session, hops)
        if session is None:
            for chunk in chunks:
                for i in chunk:
                    outcomes[i] = outcomes[todo[0]]
            return outcomes, None
        while True:
            again = [i for i, r in zip(todo, results) if _too_many(r)]
            if again and len(again) < len(todo):
                chunks.appendleft(again)
            if not chunks:
                return outcomes, session
            todo = chunks.popleft()
            if not session.usable:
                err = TransientError(451, "4.4.2", f"connection to {session} lost before the next transaction")
                for chunk in (todo, *chunks):
                    for i in chunk:
                        outcomes[i] = err
                return outcomes, session
            results = await session.send(_subset(msg, todo))
            self._record(qid, session, msg, todo, results, outcomes)

    async def _first(
        self,
        qid: str,
        route: routes.Route,
        domain: str,
        msg: OutboundMessage,
        todo: list[int],
        outcomes: list[Outcome],
        session: Session | None,
        hops: list[Hop] | None = None,
    ) -> tuple[Session | None, list[RecipientResult]]:
        """The first transaction: on ``session`` (reused) or on the first hop that takes it.

        Returns the session and its results (recorded in ``outcomes``), or (None, []) with the
        error recorded for ``todo`` when no host took the transaction.
        """
        if session is not None:
            results = await session.send(_subset(msg, todo))
            if not _retry_elsewhere(session, results):
                self._record(qid, session, msg, todo, results, outcomes)
                return session, results
            log.info("{queue_id}: reused connection to {peer} was gone; reconnecting", queue_id=qid, peer=str(session))
            session.abort()
            session = None
        if hops is None:
            found = await self._hops(qid, route, domain)
            if isinstance(found, DeliveryError):
                for i in todo:
                    outcomes[i] = found
                return None, []
            hops = found
        config = self._config(route)
        last: SMTPClientError | None = None
        for hop in hops:
            try:
                session = await self._open(hop, config)
            except SMTPClientError as e:
                log.info("{queue_id}: {hop}: {error}", queue_id=qid, hop=str(hop), error=e.text)
                last = e
                continue
            results = await session.send(_subset(msg, todo))
            if _retry_elsewhere(session, results):
                last = SMTPClientError(f"{session}: {results[0].reply}")
                log.info("{queue_id}: {peer} dropped the connection before the data; next host",
                         queue_id=qid, peer=str(session))
                session.abort()
                session = None
                continue
            self._record(qid, session, msg, todo, results, outcomes)
            return session, results
        err = _connect_error(route, domain, hops, last)
        log.info("{queue_id}: {route}: {error}", queue_id=qid, route=str(route), error=str(err))
        for i in todo:
            outcomes[i] = err
        return None, []

    async def _hops(self, qid: str, route: routes.Route, domain: str) -> list[Hop] | DeliveryError:
        """The hosts to try for ``route`` (MX lookup or the route's host), or the lookup error."""
        try:
            if route.kind == routes.MX:
                return await self.resolver.resolve(domain, route.port, self.local_names)
            return await self.resolver.host_hops(route.host, route.port)
        except DeliveryError as e:
            log.info("{queue_id}: no route to {domain}: {error}", queue_id=qid, domain=domain, error=str(e))
            return e

    async def _open(self, hop: Hop, config: ClientConfig) -> Session:
        """A session with one hop; opportunistic TLS falls back to plain if the handshake fails."""
        use_tls = self._no_tls.get(hop.address, 0.0) < self.reactor.seconds()
        try:
            return await open_session(self.reactor, hop.host, hop.address, hop.port, config, use_tls)
        except TLSFailed as e:
            if config.tls != "opportunistic" or not use_tls:
                raise
            log.warn("STARTTLS with {hop} failed ({error}); retrying without TLS", hop=str(hop), error=e.text)
            self._no_tls[hop.address] = self.reactor.seconds() + NO_TLS_SECONDS
            return await open_session(self.reactor, hop.host, hop.address, hop.port, config, False)

    def _config(self, route: routes.Route) -> ClientConfig:
        relay = self.relay
        return ClientConfig(
            helo_name=self.helo_name,
            connect_timeout=relay.connect_timeout,
            command_timeout=relay.command_timeout,
            tls=route.tls,
            verify=route.verify,
            trust_root=self.trust_root,
            user=route.user,
            password=route.password,
            source_address=relay.source_address,
        )

    def _record(
        self,
        qid: str,
        session: Session,
        msg: OutboundMessage,
        todo: list[int],
        results: list[RecipientResult],
        outcomes: list[Outcome],
    ) -> None:
        for i, result in zip(todo, results):
            outcome = _outcome(session, result)
            outcomes[i] = outcome
            log.info("{queue_id}: <{recipient}> via {peer}{tls}: {status} ({reply})", queue_id=qid,
                     recipient=msg.recipients[i].address, peer=str(session), tls=" TLS" if session.tls else "",
                     status=result.status, reply=str(result.reply))


def _subset(msg: OutboundMessage, todo: list[int]) -> OutboundMessage:
    return replace(msg, recipients=tuple(msg.recipients[i] for i in todo))


def _too_many(result: RecipientResult) -> bool:
    """RFC 5321 §4.5.3.1.10: "452 too many recipients" asks for another transaction."""
    reply = result.reply
    return (
        result.status == DEFERRED and result.stage == "RCPT" and reply.code == 452
        and (reply.enhanced == "4.5.3" or "recipients" in reply.text.lower())
    )


def _retry_elsewhere(session: Session, results: list[RecipientResult]) -> bool:
    """The connection broke (or the server said 421) before any recipient got an answer of
    its own and before the data went out: another host (or a fresh connection) may do."""
    return (
        not session.data_sent
        and bool(results)
        and all(
            r.status == DEFERRED and (r.stage == "connection" or (r.stage == "MAIL" and r.reply.code == 421))
            for r in results
        )
    )


def _outcome(session: Session, result: RecipientResult) -> DeliveryError | Delivered:
    """The runner's outcome for one recipient.  ``remote_mta`` (DSN Remote-MTA, and
    Diagnostic-Code type "smtp") only for a reply the peer actually sent: a refusal made here
    (SIZE, SMTPUTF8) or a synthetic "421 4.4.2 connection lost" names no remote MTA."""
    if result.status == DELIVERED:
        # RFC 3461 §5.2.1: NOTIFY/ORCPT went on to a DSN-capable peer, which now reports
        return Delivered(session.host, dsn_passed=session.has("DSN"))
    reply = result.reply
    if result.status == DEFERRED:
        err: DeliveryError = TransientError(reply.code if 400 <= reply.code < 500 else 451, reply.enhanced or "4.0.0", reply.text)
    else:
        err = PermanentError(reply.code if 500 <= reply.code < 600 else 550, reply.enhanced or "5.0.0", reply.text)
    if result.remote:
        err.remote_mta = session.host  # type: ignore[attr-defined]
    return err


def _connect_error(route: routes.Route, domain: str, hops: list[Hop], last: SMTPClientError | None) -> DeliveryError:
    """Every host failed before a transaction: try again later (never a bounce for this)."""
    detail = last.text if last is not None else "no addresses"
    if isinstance(last, ReplyError) and last.stage == "AUTH":
        return TransientError(451, "4.7.0", f"authentication with {route} failed: {last.reply}")
    if isinstance(last, TLSFailed):
        return TransientError(451, "4.7.5", f"TLS with {route} failed: {detail}")
    where = f"any MX host of {domain}" if route.kind == routes.MX else str(route)
    return TransientError(451, "4.4.1", f"could not deliver to {where} ({len(hops)} addresses tried): {detail}")

"""The SMTP inbound agent: a factory per listener role (MX, submission, smtps).

``SMTPFactory`` holds what every connection of one listener shares (settings, providers,
spool, authenticator, TLS, connection counts, rate limiter); the per-connection state machine
is :class:`tmmail.smtpsession.SMTPSession` (input loop, basic commands, STARTTLS) with its
parts tmmail.smtpauth (AUTH) and tmmail.smtptransaction (MAIL/RCPT/DATA/BDAT, spool commit).
Decisions are in tmmail.policy; reply texts in tmmail.smtpreplies; argument parsing in
tmmail.smtppath; message content handling in tmmail.smtpdata.

Roles (RFC 5321 MX, RFC 6409 submission, RFC 8314 implicit TLS):

* ``smtp``: port 25; STARTTLS offered; AUTH only after TLS; unauthenticated mail accepted for
  hosted domains; relaying for authenticated sessions or SMTP-ACCESS clients.
* ``submission``: port 587; STARTTLS required before AUTH and MAIL; AUTH required before MAIL.
* ``smtps``: port 465; the listener wraps the connection in TLS (tmmail.tap); AUTH required.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.logger import Logger

from tmmail import policy
from tmmail.config import Settings
from tmmail.connlimit import ConnectionCounts
from tmmail.cred import ip_key
from tmmail.ratelimit import RateLimiter
from tmmail.smtppath import Path

ROLES = ("smtp", "submission", "smtps")

log = Logger(namespace="tmmail.smtpserver")


def client_ip_of(transport: Any) -> str:
    """The peer's IP as text; IPv4-mapped IPv6 addresses become plain IPv4."""
    host = getattr(transport.getPeer(), "host", "") or ""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def connection_key(client_ip: str) -> str:
    """What ``max_connections_per_ip`` counts: the IPv4 address, or the IPv6 /64.

    One IPv6 subscriber gets a whole /64 and can open each connection from another address
    in it, so counting single IPv6 addresses would not limit anyone.  The same key as the
    login throttle (tmmail.cred.ip_key), so both treat a client alike.
    """
    return ip_key(client_ip)


class SharedState:
    """What all SMTP listeners of one server share."""

    def __init__(self, settings: Settings, reactor: Any) -> None:
        self.settings = settings
        #: open connections of all SMTP listeners, in all and by connection_key
        self.counts = ConnectionCounts()
        self.ratelimit = RateLimiter(
            settings.smtp.rate_messages_per_hour, settings.smtp.rate_recipients_per_hour, reactor.seconds
        )


#: id(settings) -> SharedState (the state keeps its Settings alive, so the id stays unique)
_SHARED: dict[int, SharedState] = {}


def _shared_state(settings: Settings, reactor: Any) -> SharedState:
    state = _SHARED.get(id(settings))
    if state is None or state.settings is not settings:
        state = _SHARED[id(settings)] = SharedState(settings, reactor)
    return state


#: (id(reactor), id(spool)) -> (spool, GroupCommitter); the entry keeps its spool alive
_COMMITTERS: dict[tuple[int, int], tuple[Any, Any]] = {}


class SMTPFactory(protocol.Factory):
    """One per listener.

    ``SMTPFactory(settings, role, provider_store, spool, authenticator, tls_context_factory,
    on_queued, reactor=None, resolve=None, recipient_check=None)``

    * ``provider_store``: ``.current()`` gives the providers snapshot (tmmail.providers).
    * ``spool``: ``.open_message()`` -> SpoolWriter (tmmail.spool).
    * ``authenticator``: tmmail.cred.Authenticator, or None (AUTH not offered).
    * ``tls_context_factory``: for STARTTLS (``getContext()``), or None (STARTTLS not offered).
      For ``smtps`` the listener must already wrap connections in TLS.
    * ``on_queued(queue_id)``: called after a message is safely in the spool (runner.wake).
    * ``resolve(providers, address)``: defaults to tmmail.router.resolve.
    * ``recipient_check(session, path) -> Verdict | Deferred[Verdict]``: defaults to
      :meth:`check_recipient` (tests wrap it to make checks slow and asynchronous).
    """

    def __init__(
        self,
        settings: Settings,
        role: str,
        provider_store: Any,
        spool: Any,
        authenticator: Any,
        tls_context_factory: Any,
        on_queued: Callable[[str], Any] | None,
        reactor: Any = None,
        resolve: Callable[[Any, str], Any] | None = None,
        recipient_check: Callable[[Any, Path], Any] | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown SMTP role {role!r}; expected one of {ROLES}")
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.settings = settings
        self.smtp = settings.smtp
        self.hostname = settings.server.hostname
        self.role = role
        self.store = provider_store
        self.spool = spool
        self.authenticator = authenticator
        self.tls = tls_context_factory
        self.on_queued = on_queued
        #: ``hand_off(queue_id, envelope_bytes, head)``: an in-process runner's Runner.take; when
        #: set, commits go straight to active/ and the message is handed over in memory
        self.hand_off: Callable[[str, bytes, bytes | None], Any] | None = None
        #: ``reclaim(queue_id)``: called if ``hand_off`` raises, so the runner takes the message
        #: from its files in active/ (Runner.reclaim); None: the reclaim of the runner whose
        #: bound ``take`` is ``hand_off``, if any
        self.reclaim: Callable[[str], Any] | None = None
        self.reactor = reactor
        self._resolve = resolve
        self.recipient_check = recipient_check or self.check_recipient
        #: seconds a closing connection may take to send its last replies before it is cut
        self.close_grace = 10.0
        #: shared by every SMTP listener built from the same Settings: connection counts and
        #: sending rates are per server, not per port (or a client could multiply its limits)
        self.shared = _shared_state(settings, reactor)
        self.ratelimit = self.shared.ratelimit

    @property
    def committer(self) -> Any:
        """The tmmail.groupcommit.GroupCommitter of this spool (one per spool and reactor,
        shared by every listener, so concurrent sessions share syncs); None for a spool
        without ``root`` (test doubles), whose writers commit one by one in a thread."""
        root = getattr(self.spool, "root", None)
        if root is None:
            return None
        key = (id(self.reactor), id(self.spool))
        entry = _COMMITTERS.get(key)
        if entry is None or entry[0] is not self.spool:
            from tmmail.groupcommit import GroupCommitter

            committer = GroupCommitter(self.reactor, [root])
            entry = _COMMITTERS[key] = (self.spool, committer)

            def stop() -> None:
                committer.stop()
                if _COMMITTERS.get(key) is entry:
                    del _COMMITTERS[key]

            self.reactor.addSystemEventTrigger("after", "shutdown", stop)
        return entry[1]

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        from tmmail.smtpsession import SMTPSession

        p = SMTPSession(self)
        p.factory = self
        return p

    # -- shared state ------------------------------------------------------------------

    def resolve(self, snap: Any, address: str) -> Any:
        if self._resolve is None:
            from tmmail.router import resolve

            self._resolve = resolve
        return self._resolve(snap, address)

    @property
    def connections(self) -> int:
        """Open SMTP connections (all listeners of this server)."""
        return self.shared.counts.total

    @property
    def per_ip(self) -> dict[str, int]:
        return self.shared.counts.per_ip

    def admit(self, client_ip: str) -> str | None:
        """Count a new connection; None if admitted, else the reason it is over a limit."""
        return self.shared.counts.admit(client_ip, self.smtp.max_connections_per_ip, self.smtp.max_connections)

    def release(self, client_ip: str) -> None:
        self.shared.counts.release(client_ip)

    def check_recipient(self, session: Any, path: Path) -> policy.Verdict | defer.Deferred[policy.Verdict]:
        """The default RCPT decision: tmmail.policy.check_recipient on the current snapshot."""
        snap = self.store.current()
        relay_ok = session.auth is not None or policy.ip_relay_allowed(snap, session.client_ip)
        return policy.check_recipient(
            snap, path, sender_domain=session.sender_domain, relay_ok=relay_ok, resolve=self.resolve
        )

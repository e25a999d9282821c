"""Per-account sending rate limits: messages and recipients per sliding hour.

Pure logic with an injected clock.  A compromised account is the usual source of outbound
spam (RFC 6409 §8 leaves rate policy to the submission server), so authenticated senders are
limited by ``settings.smtp.rate_messages_per_hour`` / ``rate_recipients_per_hour`` (0 =
unlimited).  Counts are kept in one-minute buckets, at most 60 per account, so memory per
account is bounded however fast it sends; idle accounts are forgotten.

A limit must hold across parallel sessions of one account: if it were only checked against
messages already queued, N sessions that all reach RCPT before any of them commits would all
pass.  So a transaction *reserves* its message and recipients when RCPT is accepted
(:meth:`RateLimiter.reserve`); checks count queued plus reserved, and a reservation is
turned into a record when the message is queued or released on RSET, abort or failure.
All of this runs on the reactor thread, so check-and-reserve is atomic without locks.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

WINDOW = 3600.0
BUCKET = 60.0


class Reservation:
    """What one transaction holds against an account's limits until it is queued or dropped.

    ``grow`` adds to it (False, leaving it unchanged, if a limit would be exceeded: the
    name is in ``over``); ``commit`` records the message as sent; ``release`` gives the
    reservation back.  Both end it; calling either again does nothing, so every exit path
    (RSET, connection lost, commit failure) may simply call ``release``.
    """

    def __init__(self, limiter: "RateLimiter", account: str) -> None:
        self.limiter = limiter
        self.account = account.lower()
        self.messages = 0
        self.recipients = 0
        self.over: str | None = None
        self.done = False

    def grow(self, messages: int, recipients: int) -> bool:
        if self.done:
            raise RuntimeError("reservation already ended")
        self.over = self.limiter.check(self.account, messages, recipients)
        if self.over is not None:
            return False
        self.limiter._pending_add(self.account, messages, recipients)
        self.messages += messages
        self.recipients += recipients
        return True

    def shrink(self, messages: int, recipients: int) -> None:
        """Give back part of the reservation (a recipient refused after it was reserved)."""
        if self.done:
            return
        messages = min(messages, self.messages)
        recipients = min(recipients, self.recipients)
        self.messages -= messages
        self.recipients -= recipients
        self.limiter._pending_add(self.account, -messages, -recipients)

    def release(self) -> None:
        if not self.done:
            self.done = True
            self.limiter._pending_add(self.account, -self.messages, -self.recipients)

    def commit(self, recipients: int) -> None:
        """The message was queued with ``recipients`` recipients: record it, end the reservation."""
        if self.done:
            return
        self.release()
        self.limiter.record(self.account, recipients)


class RateLimiter:
    """``check`` before accepting, ``reserve`` while a transaction is in flight, ``record``
    (or ``Reservation.commit``) when a message was queued."""

    def __init__(self, messages_per_hour: int, recipients_per_hour: int, clock: Callable[[], float]) -> None:
        self.messages_per_hour = messages_per_hour
        self.recipients_per_hour = recipients_per_hour
        self.clock = clock
        #: account -> deque of [bucket start, messages, recipients]
        self._buckets: dict[str, deque[list[float]]] = {}
        self._last_prune = 0.0
        #: account -> [messages, recipients] reserved by transactions not yet queued
        self._pending: dict[str, list[int]] = {}

    def _pending_add(self, account: str, messages: int, recipients: int) -> None:
        p = self._pending.setdefault(account, [0, 0])
        p[0] += messages
        p[1] += recipients
        if p[0] <= 0 and p[1] <= 0:
            del self._pending[account]

    def pending(self, account: str) -> tuple[int, int]:
        """(messages, recipients) reserved by ``account``'s transactions in flight."""
        p = self._pending.get(account.lower())
        return (p[0], p[1]) if p else (0, 0)

    def reserve(self, account: str, messages: int = 1, recipients: int = 0) -> Reservation:
        """A new reservation, grown by (messages, recipients); check ``.over`` (None = held)."""
        r = Reservation(self, account)
        r.grow(messages, recipients)
        return r

    def _window(self, account: str, now: float) -> deque[list[float]] | None:
        q = self._buckets.get(account)
        if q is None:
            return None
        while q and q[0][0] <= now - WINDOW:
            q.popleft()
        if not q:
            del self._buckets[account]
            return None
        return q

    def usage(self, account: str) -> tuple[int, int]:
        """(messages, recipients) sent by ``account`` in the last hour."""
        q = self._window(account.lower(), self.clock())
        if q is None:
            return 0, 0
        return int(sum(b[1] for b in q)), int(sum(b[2] for b in q))

    def check(self, account: str, messages: int = 1, recipients: int = 0) -> str | None:
        """None if ``messages`` more messages with ``recipients`` more recipients fit beside
        what was sent and what is reserved, else the name of the exceeded limit ("messages"
        or "recipients")."""
        sent, rcpts = self.usage(account)
        held_m, held_r = self.pending(account)
        sent += held_m
        rcpts += held_r
        if self.messages_per_hour and sent + messages > self.messages_per_hour:
            return "messages"
        if self.recipients_per_hour and rcpts + recipients > self.recipients_per_hour:
            return "recipients"
        return None

    def record(self, account: str, recipients: int) -> None:
        """Count one queued message with ``recipients`` recipients."""
        now = self.clock()
        key = account.lower()
        q = self._window(key, now)
        if q is None:
            q = self._buckets[key] = deque()
        start = now - (now % BUCKET)
        if q and q[-1][0] == start:
            q[-1][1] += 1
            q[-1][2] += recipients
        else:
            q.append([start, 1, recipients])
        if now - self._last_prune > WINDOW:
            self._last_prune = now
            for k in list(self._buckets):
                self._window(k, now)

"""Per-account sending rate limits: messages and recipients per sliding hour.

Pure logic with an injected clock.  A compromised account is the usual source of outbound
spam (RFC 6409 §8 leaves rate policy to the submission server), so authenticated senders are
limited by ``settings.smtp.rate_messages_per_hour`` / ``rate_recipients_per_hour`` (0 =
unlimited).  Counts are kept in one-minute buckets, at most 60 per account, so memory per
account is bounded however fast it sends; idle accounts are forgotten.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

WINDOW = 3600.0
BUCKET = 60.0


class RateLimiter:
    """``check`` before accepting, ``record`` when a message was queued."""

    def __init__(self, messages_per_hour: int, recipients_per_hour: int, clock: Callable[[], float]) -> None:
        self.messages_per_hour = messages_per_hour
        self.recipients_per_hour = recipients_per_hour
        self.clock = clock
        #: account -> deque of [bucket start, messages, recipients]
        self._buckets: dict[str, deque[list[float]]] = {}
        self._last_prune = 0.0

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
        """None if ``messages`` more messages with ``recipients`` more recipients fit,
        else the name of the exceeded limit ("messages" or "recipients")."""
        sent, rcpts = self.usage(account)
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

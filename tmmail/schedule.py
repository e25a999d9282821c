"""When to try again, when to give up, when to warn the sender.

Pure arithmetic on epoch seconds and tmmail.config.QueueSettings.  RFC 5321 §4.5.4.1: the
retry interval SHOULD be at least 30 minutes and the give-up time at least 4-5 days; the
defaults (5 minutes doubling to 3 hours, 3 days) follow what Postfix ships, and the settings
let an administrator choose.  Delay notices follow RFC 3464 (Action: delayed).
"""

from __future__ import annotations

from typing import Any


def retry_delay(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: initial, doubling, capped."""
    if attempts <= 1:
        return min(initial, maximum)
    # cap the exponent so huge attempt counts do not overflow
    return min(maximum, initial * (2 ** min(attempts - 1, 60)))


def next_attempt(now: float, attempts: int, queue: Any) -> float:
    """When to try a recipient again after its ``attempts``-th attempt (never past expiry+)."""
    return now + retry_delay(attempts, queue.retry_initial, queue.retry_max)


def expires_at(arrival: float, queue: Any) -> float:
    return arrival + queue.lifetime


def expired(arrival: float, now: float, queue: Any) -> bool:
    """The message has been queued for longer than ``lifetime``: bounce what is left."""
    return now >= expires_at(arrival, queue)


def clamp_to_expiry(when: float, arrival: float, queue: Any) -> float:
    """A retry time not later than the expiry, so the last attempt happens at the deadline."""
    return min(when, expires_at(arrival, queue))


def delay_notice_due(arrival: float, now: float, last_notice: float, queue: Any) -> bool:
    """Whether a delay notice should go out now for a recipient still queued.

    First after ``delay_notice_after`` seconds in the queue; again every
    ``delay_notice_repeat`` seconds if that is set; never if ``delay_notice_after`` is 0.
    """
    after = queue.delay_notice_after
    if after <= 0 or now < arrival + after:
        return False
    if not last_notice:
        return True
    repeat = queue.delay_notice_repeat
    return repeat > 0 and now >= last_notice + repeat

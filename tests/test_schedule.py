"""Back-off, expiry and delay-notice times."""

from __future__ import annotations

from tmmail.config import QueueSettings
from tmmail.schedule import (
    clamp_to_expiry,
    delay_notice_due,
    expired,
    next_attempt,
    retry_delay,
)

Q = QueueSettings(retry_initial=300.0, retry_max=3600.0, lifetime=86400.0, delay_notice_after=4 * 3600.0)


def test_backoff_doubles_to_max() -> None:
    assert [retry_delay(n, 300, 3600) for n in range(1, 7)] == [300, 600, 1200, 2400, 3600, 3600]
    assert retry_delay(0, 300, 3600) == 300
    assert retry_delay(10_000, 300, 3600) == 3600  # no overflow


def test_next_attempt_is_relative_to_now() -> None:
    assert next_attempt(1000.0, 1, Q) == 1300.0
    assert next_attempt(1000.0, 3, Q) == 2200.0


def test_expiry() -> None:
    assert not expired(0.0, 86399.0, Q)
    assert expired(0.0, 86400.0, Q)
    assert clamp_to_expiry(100000.0, 0.0, Q) == 86400.0
    assert clamp_to_expiry(500.0, 0.0, Q) == 500.0


def test_delay_notice_once_by_default() -> None:
    assert not delay_notice_due(0.0, 3 * 3600.0, 0.0, Q)
    assert delay_notice_due(0.0, 4 * 3600.0, 0.0, Q)
    assert not delay_notice_due(0.0, 20 * 3600.0, 4 * 3600.0, Q)


def test_delay_notice_repeat_and_off() -> None:
    rep = QueueSettings(delay_notice_after=3600.0, delay_notice_repeat=7200.0)
    assert not delay_notice_due(0.0, 5000.0, 3600.0, rep)
    assert delay_notice_due(0.0, 10800.0, 3600.0, rep)
    off = QueueSettings(delay_notice_after=0.0)
    assert not delay_notice_due(0.0, 10**9, 0.0, off)

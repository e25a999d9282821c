"""tmmail.cred: scrypt hashes and the throttled Authenticator (task.Clock and a real thread pool)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from tmmail.config import AuthSettings
from tmmail.cred import (
    Authenticator,
    LoginBlocked,
    LoginFailed,
    ProviderChecker,
    hash_password,
    needs_rehash,
    verify_password,
)
from tmmail.providers import AuthEntry, ProviderStore

# cheap parameters for throttling tests; the format carries them, so verify accepts them
FAST = {"n": 2**8, "r": 8, "p": 1}


def test_hash_format_and_verify() -> None:
    h = hash_password("correct horse")
    assert h.startswith("$scrypt$n=16384,r=8,p=1$")
    assert len(h.split("$")) == 5
    assert verify_password("correct horse", h)
    assert not verify_password("correct horsE", h)
    assert not verify_password("", h)
    assert hash_password("correct horse") != h  # salted
    assert not needs_rehash(h)


def test_unicode_passwords() -> None:
    h = hash_password("pässwörd-✓", **FAST)
    assert verify_password("pässwörd-✓", h)
    assert not verify_password("passwort-✓", h)


def test_other_parameters_still_verify() -> None:
    """Hashes made with other cost parameters (older or future) keep working."""
    for params in ({"n": 2**10, "r": 4, "p": 1}, {"n": 2**12, "r": 8, "p": 2}):
        h = hash_password("pw", **params)
        assert verify_password("pw", h) and not verify_password("px", h)
        assert needs_rehash(h)


@pytest.mark.parametrize(
    "hashed",
    ["", "!", "*", "plain-text-password", "$scrypt$n=16384,r=8,p=1$$", "$scrypt$n=3,r=8,p=1$c2FsdA$aGFzaA",
     "$scrypt$n=1073741824,r=8,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA"],
)
def test_locked_or_malformed_hashes_never_match(hashed: str) -> None:
    started = time.monotonic()
    assert not verify_password(hashed, hashed)
    assert not verify_password("plain-text-password", hashed)
    assert time.monotonic() - started < 5  # an absurd n in a tampered file is refused, not run


def make_store(tmp_path: Path, rows: str) -> ProviderStore:
    (tmp_path / "POSTOFFICE.tab").write_text("ACME\t1\nOFF\t0\n")
    (tmp_path / "MAILBOX.tab").write_text("ACME\tjoe\t1\nACME\tann\t1\nACME\toff\t0\nOFF\tx\t1\n")
    (tmp_path / "AUTH.tab").write_text(rows)
    return ProviderStore(str(tmp_path))


@pytest.fixture
def store(tmp_path: Path) -> ProviderStore:
    joe = hash_password("joe-pw", **FAST)
    ann = hash_password("ann-pw", **FAST)
    return make_store(
        tmp_path,
        f"Joe@Example.com\tACME/joe\t{joe}\tUSER\n"
        f"ann@example.com\tACME/ann\t{ann}\n"
        f"locked@example.com\tACME/joe\t!\n"
        f"off@example.com\tACME/off\t{joe}\n"
        f"x@off.example\tOFF/x\t{joe}\n"
        f"ghost@example.com\tACME/ghost\t{joe}\n",
    )


SETTINGS = AuthSettings(free_failures=3, base_delay=1.0, max_delay=4.0, block_after=6, block_seconds=60.0, window=600.0)


class Outcome:
    def __init__(self, d: Any) -> None:
        self.result: Any = None
        self.done = False
        d.addBoth(self._set)

    def _set(self, r: Any) -> None:
        self.result, self.done = r, True

    def failed_with(self, exc: type[Exception]) -> bool:
        return self.done and isinstance(self.result, Failure) and self.result.check(exc) is not None


def test_successful_login(store: ProviderStore) -> None:
    clock = task.Clock()
    auth = Authenticator(store, SETTINGS, clock)
    o = Outcome(auth.authenticate("JOE@example.COM", "joe-pw", "192.0.2.1"))
    assert o.done and isinstance(o.result, AuthEntry)
    assert (o.result.postoffice, o.result.mailbox) == ("ACME", "joe")


@pytest.mark.parametrize(
    "login, password",
    [
        ("joe@example.com", "wrong"),
        ("nobody@example.com", "joe-pw"),
        ("locked@example.com", "!"),  # no password set: nobody can log in
        ("off@example.com", "joe-pw"),  # mailbox disabled
        ("x@off.example", "joe-pw"),  # post office disabled
        ("ghost@example.com", "joe-pw"),  # AUTH entry without a mailbox
    ],
)
def test_failed_logins(store: ProviderStore, login: str, password: str) -> None:
    auth = Authenticator(store, SETTINGS, task.Clock())
    o = Outcome(auth.authenticate(login, password, "192.0.2.1"))
    assert o.failed_with(LoginFailed) and not o.failed_with(LoginBlocked)
    assert o.result.check(UnauthorizedLogin)


def test_delays_grow_after_free_failures_and_are_capped(store: ProviderStore) -> None:
    clock = task.Clock()
    auth = Authenticator(store, SETTINGS, clock)
    waited = []
    for _ in range(5):
        o = Outcome(auth.authenticate("joe@example.com", "wrong", "192.0.2.1"))
        start = clock.seconds()
        while not o.done:
            assert clock.seconds() - start < 100
            clock.advance(0.25)
        waited.append(clock.seconds() - start)
        assert o.failed_with(LoginFailed)
    # three free failures, then 1 s, 2 s (doubling); base 1 s, max 4 s
    assert waited == [0, 0, 0, 1.0, 2.0]
    assert [auth.delay_for(n) for n in range(1, 9)] == [0, 0, 0, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_block_after_too_many_failures_then_expiry(store: ProviderStore) -> None:
    clock = task.Clock()
    auth = Authenticator(store, SETTINGS, clock)
    for i in range(6):
        Outcome(auth.authenticate("joe@example.com", f"wrong{i}", "192.0.2.1"))
        clock.advance(10)
    o = Outcome(auth.authenticate("joe@example.com", "joe-pw", "192.0.2.1"))
    assert o.failed_with(LoginBlocked)  # even the right password, during the block
    o = Outcome(auth.authenticate("joe@example.com", "joe-pw", "198.51.100.9"))
    assert o.failed_with(LoginBlocked)  # the account is blocked from other IPs too
    o = Outcome(auth.authenticate("ann@example.com", "ann-pw", "192.0.2.1"))
    assert o.failed_with(LoginBlocked)  # and the IP for other accounts
    o = Outcome(auth.authenticate("ann@example.com", "ann-pw", "198.51.100.9"))
    assert isinstance(o.result, AuthEntry)  # other IP + other account: fine
    clock.advance(61)
    o = Outcome(auth.authenticate("joe@example.com", "joe-pw", "192.0.2.1"))
    assert isinstance(o.result, AuthEntry)
    assert auth.failures(login="joe@example.com") == 0


def test_per_account_throttling_across_many_ips(store: ProviderStore) -> None:
    clock = task.Clock()
    auth = Authenticator(store, SETTINGS, clock)
    for i in range(6):
        Outcome(auth.authenticate("joe@example.com", "wrong", f"203.0.113.{i}"))
        clock.advance(5)
    assert auth.failures(login="joe@example.com") == 6
    assert Outcome(auth.authenticate("joe@example.com", "joe-pw", "203.0.113.200")).failed_with(LoginBlocked)


def test_success_does_not_clear_the_ip_counter_of_other_accounts(store: ProviderStore) -> None:
    clock = task.Clock()
    auth = Authenticator(store, SETTINGS, clock)
    ip = "192.0.2.7"
    for _ in range(3):
        Outcome(auth.authenticate("ann@example.com", "guess", ip))
    for _ in range(2):
        Outcome(auth.authenticate("joe@example.com", "guess", ip))
    clock.advance(10)
    assert auth.failures(client_ip=ip) == 5
    assert isinstance(Outcome(auth.authenticate("joe@example.com", "joe-pw", ip)).result, AuthEntry)
    assert auth.failures(client_ip=ip) == 3  # joe's own failures are forgiven, ann's are not
    assert auth.failures(login="ann@example.com") == 3
    o = Outcome(auth.authenticate("ann@example.com", "guess", ip))
    assert not o.done  # 4th failure from this IP: delayed
    clock.advance(1)
    assert o.failed_with(LoginFailed)


def test_failures_are_forgotten_after_the_window(store: ProviderStore) -> None:
    clock = task.Clock()
    auth = Authenticator(store, SETTINGS, clock)
    for _ in range(3):
        Outcome(auth.authenticate("joe@example.com", "x", "192.0.2.1"))
    clock.advance(601)
    assert auth.failures(login="joe@example.com") == 0
    assert Outcome(auth.authenticate("joe@example.com", "x", "192.0.2.1")).done  # no delay again


def test_failures_are_logged_with_peer_address(store: ProviderStore) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        auth = Authenticator(store, SETTINGS, task.Clock())
        Outcome(auth.authenticate("mallory\r\nfake line@example.com", "x", "192.0.2.66"))
        Outcome(auth.authenticate("joe@example.com", "bad", "192.0.2.66"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) for e in events]
    assert any(t.startswith("authentication failure for joe@example.com from 192.0.2.66") for t in texts)
    forged = [t for t in texts if "mallory" in t]
    assert forged and all("\n" not in t and "\r" not in t for t in forged)


def test_credentials_checker(store: ProviderStore) -> None:
    auth = Authenticator(store, SETTINGS, task.Clock())
    checker = ProviderChecker(auth, "192.0.2.1")
    assert verifyObject(ICredentialsChecker, checker)
    o = Outcome(checker.requestAvatarId(UsernamePassword(b"joe@example.com", b"joe-pw")))
    assert o.result == "Joe@Example.com"
    o = Outcome(checker.requestAvatarId(UsernamePassword(b"joe@example.com", b"\xff")))
    assert o.failed_with(UnauthorizedLogin)


def test_verification_runs_in_the_reactor_thread_pool(tmp_path: Path, reactor_thread: Any) -> None:
    from twisted.internet import reactor

    h = hash_password("real-pw")  # default cost
    store = make_store(tmp_path, f"joe@example.com\tACME/joe\t{h}\n")
    auth = Authenticator(store, SETTINGS, reactor)
    entry = reactor_thread.call(auth.authenticate, "joe@example.com", "real-pw", "127.0.0.1")
    assert entry.login == "joe@example.com"
    with pytest.raises(LoginFailed):
        reactor_thread.call(auth.authenticate, "joe@example.com", "nope", "127.0.0.1")


class ManualRunner:
    """run_blocking whose checks finish only when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, Any, tuple[Any, ...]]] = []

    def __call__(self, f: Any, *args: Any) -> Any:
        from twisted.internet import defer

        d: Any = defer.Deferred()
        self.pending.append((d, f, args))
        return d

    def finish(self, i: int = 0) -> None:
        d, f, args = self.pending.pop(i)
        d.callback(f(*args))


def test_at_most_two_password_checks_run_at_once(store: ProviderStore) -> None:
    runner = ManualRunner()
    auth = Authenticator(store, SETTINGS, task.Clock(), run_blocking=runner)
    outcomes = [Outcome(auth.authenticate("joe@example.com", "joe-pw", f"192.0.2.{i}")) for i in range(5)]
    assert len(runner.pending) == 2
    for _ in range(5):
        runner.finish()
    assert not runner.pending
    assert all(isinstance(o.result, AuthEntry) for o in outcomes)


def test_a_right_guess_finishing_after_a_block_is_refused(store: ProviderStore) -> None:
    runner = ManualRunner()
    clock = task.Clock()
    auth = Authenticator(store, SETTINGS, clock, run_blocking=runner)
    right = Outcome(auth.authenticate("joe@example.com", "joe-pw", "192.0.2.1"))
    wrong = [Outcome(auth.authenticate("joe@example.com", f"w{i}", "192.0.2.1")) for i in range(6)]
    for _ in range(6):
        runner.finish(len(runner.pending) - 1 if len(runner.pending) > 1 else 0)
        clock.advance(10)
    # the right guess (still pending above) completes last, after the block was set
    runner.finish()
    clock.advance(10)
    assert all(o.done for o in wrong)
    assert right.failed_with(LoginBlocked)


def test_ipv6_clients_are_throttled_per_64_network(store: ProviderStore) -> None:
    clock = task.Clock()
    auth = Authenticator(store, SETTINGS, clock)
    for i in range(6):  # rotating through addresses of one /64 does not help
        Outcome(auth.authenticate(f"user{i}@example.com", "x", f"2001:db8:1:2::{i + 1:x}"))
        clock.advance(10)
    assert Outcome(auth.authenticate("ann@example.com", "ann-pw", "2001:db8:1:2:ffff::1")).failed_with(LoginBlocked)
    assert isinstance(Outcome(auth.authenticate("ann@example.com", "ann-pw", "2001:db8:1:3::1")).result, AuthEntry)
    assert auth.failures(client_ip="::ffff:192.0.2.1") == 0
    Outcome(auth.authenticate("joe@example.com", "x", "::ffff:192.0.2.1"))
    assert auth.failures(client_ip="192.0.2.1") == 1  # IPv4-mapped is the same client


def test_successful_checks_are_cached_until_expiry_or_password_change(store: ProviderStore, tmp_path: Path) -> None:
    runner = ManualRunner()
    clock = task.Clock()
    auth = Authenticator(store, SETTINGS, clock, run_blocking=runner, cache_seconds=300)
    first = Outcome(auth.authenticate("joe@example.com", "joe-pw", "192.0.2.1"))
    runner.finish()
    assert isinstance(first.result, AuthEntry)
    again = Outcome(auth.authenticate("JOE@example.com", "joe-pw", "192.0.2.2"))
    assert isinstance(again.result, AuthEntry) and not runner.pending  # no second scrypt run
    wrong = Outcome(auth.authenticate("joe@example.com", "joe-pw ", "192.0.2.1"))
    assert len(runner.pending) == 1  # a different password is really checked
    runner.finish()
    assert wrong.failed_with(LoginFailed)
    clock.advance(301)
    Outcome(auth.authenticate("joe@example.com", "joe-pw", "192.0.2.1"))
    assert len(runner.pending) == 1  # expired
    runner.finish()
    # a new password in AUTH.tab: the old one is not accepted from the cache
    (tmp_path / "AUTH.tab").write_text(f"joe@example.com\tACME/joe\t{hash_password('new-pw', **FAST)}\n")
    store.reload()
    old = Outcome(auth.authenticate("joe@example.com", "joe-pw", "192.0.2.1"))
    assert len(runner.pending) == 1
    runner.finish()
    assert old.failed_with(LoginFailed)


def test_known_client_of_the_owner_is_exempt_from_the_account_block(store: ProviderStore) -> None:
    """Ten guesses from an attacker must not lock the owner out of his usual network; the
    attacker's IP and any client new to the account stay blocked."""
    clock = task.Clock()
    auth = Authenticator(store, SETTINGS, clock)
    owner_v4, owner_v6 = "198.51.100.20", "2001:db8:5:6::1"
    for ip in (owner_v4, owner_v6):
        assert isinstance(Outcome(auth.authenticate("joe@example.com", "joe-pw", ip)).result, AuthEntry)
    clock.advance(20 * 86400)  # known for 30 days by default
    for i in range(6):
        o = Outcome(auth.authenticate("joe@example.com", f"guess{i}", "192.0.2.66"))
        clock.advance(10)
        assert o.done
    assert Outcome(auth.authenticate("joe@example.com", "joe-pw", "192.0.2.66")).failed_with(LoginBlocked)
    assert Outcome(auth.authenticate("joe@example.com", "joe-pw", "203.0.113.5")).failed_with(LoginBlocked)
    assert isinstance(Outcome(auth.authenticate("joe@example.com", "joe-pw", owner_v4)).result, AuthEntry)
    # another address in the owner's IPv6 /64 counts as the same client
    assert isinstance(Outcome(auth.authenticate("joe@example.com", "joe-pw", "2001:db8:5:6::99")).result, AuthEntry)
    # the owner's success does not lift the block for clients new to the account
    assert Outcome(auth.authenticate("joe@example.com", "joe-pw", "203.0.113.5")).failed_with(LoginBlocked)
    # the owner's wrong password from a known client is a plain (delayed) failure, not a block
    o = Outcome(auth.authenticate("joe@example.com", "typo", owner_v4))
    clock.advance(10)
    assert o.failed_with(LoginFailed) and not o.failed_with(LoginBlocked)


def test_known_clients_are_forgotten_after_success_memory(store: ProviderStore) -> None:
    clock = task.Clock()
    settings = AuthSettings(free_failures=3, base_delay=0.0, max_delay=0.0, block_after=6, block_seconds=600.0,
                            window=600.0, success_memory=3600.0)
    auth = Authenticator(store, settings, clock)
    assert isinstance(Outcome(auth.authenticate("joe@example.com", "joe-pw", "198.51.100.20")).result, AuthEntry)
    clock.advance(3601)
    for i in range(6):
        Outcome(auth.authenticate("joe@example.com", f"guess{i}", "192.0.2.66"))
    assert Outcome(auth.authenticate("joe@example.com", "joe-pw", "198.51.100.20")).failed_with(LoginBlocked)
    # success_memory = 0 turns the exemption off
    off = Authenticator(store, AuthSettings(block_after=2, base_delay=0.0, success_memory=0.0), clock)
    assert isinstance(Outcome(off.authenticate("joe@example.com", "joe-pw", "198.51.100.20")).result, AuthEntry)
    for i in range(2):
        Outcome(off.authenticate("joe@example.com", f"guess{i}", "192.0.2.66"))
    assert Outcome(off.authenticate("joe@example.com", "joe-pw", "198.51.100.20")).failed_with(LoginBlocked)

"""Passwords and login: scrypt hashes and a throttled authenticator shared by SMTP, POP3, IMAP.

Hashes are ``$scrypt$n=16384,r=8,p=1$<salt>$<hash>`` (standard base64 without padding).  The
parameters are read from each hash, so stronger ones can be introduced later without breaking
stored passwords; absurd parameters in a tampered file are refused rather than run.

:class:`Authenticator` slows down password guessing: per client IP and per account, after
``free_failures`` failures each further failure is answered only after a delay that doubles
from ``base_delay`` up to ``max_delay``; after ``block_after`` failures logins from that IP /
for that account are refused outright for ``block_seconds``.  So that guesses from elsewhere
cannot lock the real owner out (a denial of service), the account block does not apply to a
client (IP, or IPv6 /64) that logged in to that account successfully within ``success_memory``
seconds (30 days by default; kept in memory, bounded) -- the way large mail providers treat
known devices.  The client's own IP throttle still applies.  Failures are logged with the
peer address (``authentication failure for {login} from {client_ip}``) so fail2ban can act.
The reactor (clock) is a parameter, so the policy is tested with ``task.Clock``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from tmmail.config import AuthSettings
from tmmail.providers import AuthEntry, ProviderStore

__all__ = [
    "hash_password",
    "verify_password",
    "needs_rehash",
    "Authenticator",
    "LoginFailed",
    "LoginBlocked",
    "ProviderChecker",
    "SCRYPT_N",
    "SCRYPT_R",
    "SCRYPT_P",
]

log = Logger(namespace="tmmail.cred")

#: scrypt cost (RFC 7914): n=2**14, r=8 needs 16 MiB and ~50 ms per check
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32
#: refuse hashes that would need more than this much memory / work (a tampered AUTH file)
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16
_MAX_MEM = 1 << 30

_FORMAT = re.compile(r"\$scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    text = text.rstrip("=")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=min(_MAX_MEM, 256 * n * r * p + (1 << 20))
    )


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A salted scrypt hash of ``password`` (blocking, slow by design)."""
    salt = os.urandom(_SALT_BYTES)
    digest = _scrypt(password, salt, n, r, p, _HASH_BYTES)
    return f"$scrypt$n={n},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def _parse(hashed: str) -> tuple[int, int, int, bytes, bytes] | None:
    m = _FORMAT.fullmatch(hashed or "")
    if not m:
        return None
    n, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if n < 2 or n & (n - 1) or n > _MAX_N or not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
        return None
    try:
        salt, digest = _unb64(m.group(4)), _unb64(m.group(5))
    except ValueError:
        return None
    if not salt or not 16 <= len(digest) <= 64:
        return None
    return n, r, p, salt, digest


def is_password_hash(text: str) -> bool:
    """Is ``text`` a hash :func:`verify_password` can check (``$scrypt$`` with sane parameters)?

    The provider loader uses it to refuse an AUTH.tab line whose hash field is anything else
    (a plain-text password, a hash from another system): such a login could never succeed,
    and a password in clear in a table is worth an error at load, not a silent failure.
    """
    return _parse(text) is not None


#: a hash checked for unknown logins and locked accounts, so they take as long as real ones
_DUMMY_SALT = b"tmmail-dummy-slt"


def verify_password(password: str, hashed: str) -> bool:
    """Does ``password`` match ``hashed``?  Blocking; constant-time comparison.

    A malformed or locked hash (``!``, empty) never matches, but still costs one scrypt run
    so the answer time does not tell whether an account exists.
    """
    parsed = _parse(hashed)
    if parsed is None:
        _scrypt(password, _DUMMY_SALT, SCRYPT_N, SCRYPT_R, SCRYPT_P, _HASH_BYTES)
        return False
    n, r, p, salt, digest = parsed
    try:
        candidate = _scrypt(password, salt, n, r, p, len(digest))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, digest)


def needs_rehash(hashed: str) -> bool:
    """True if ``hashed`` uses other parameters than the current defaults."""
    parsed = _parse(hashed)
    return parsed is None or parsed[:3] != (SCRYPT_N, SCRYPT_R, SCRYPT_P)


class LoginFailed(UnauthorizedLogin):
    """Unknown login, wrong password or disabled account (SMTP 535 5.7.8, IMAP NO)."""


class LoginBlocked(LoginFailed):
    """Too many failures from this IP or for this account: refused for a while (SMTP 454 4.7.0)."""


@dataclass
class _Counter:
    #: failures by login (per IP) or just one bucket (per account)
    failures: dict[str, int] = field(default_factory=dict)
    last: float = 0.0
    blocked_until: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.failures.values())


def ip_key(client_ip: str) -> str:
    """Throttling key for a client: the IPv4 address, or the IPv6 /64 (one subscriber's
    network: rotating through its addresses must not reset the counter)."""
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return client_ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def _printable(text: str, limit: int = 256) -> str:
    """Log-safe form of user input: no control characters (no forged log lines)."""
    text = text[:limit]
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class Authenticator:
    """Checks logins against AUTH.tab with failure throttling (see module docstring).

    ``reactor`` must provide ``IReactorTime`` (``callLater``, ``seconds``); if it also provides
    ``IReactorThreads`` password checks run in its thread pool, else inline (``task.Clock``).
    ``run_blocking(f, *args) -> Deferred`` overrides how the check is run.

    Successful checks are remembered for ``cache_seconds`` (as Dovecot's auth cache does), so a
    client that opens several connections or polls every minute costs one scrypt run, not one
    per login.  The cache holds an HMAC (per-process random key) of the password and the
    stored hash, never the password; a changed password or AUTH row misses it.
    """

    #: at most this many IPs / accounts are tracked; the oldest are forgotten first
    MAX_TRACKED = 100_000
    #: password checks running at once (scrypt is CPU- and memory-bound; a login flood must
    #: not occupy every thread of the pool that spool commits and deliveries also use)
    MAX_CONCURRENT = 2

    def __init__(
        self,
        store: ProviderStore,
        settings: AuthSettings,
        reactor: Any,
        run_blocking: Callable[..., defer.Deferred[Any]] | None = None,
        cache_seconds: float = 300.0,
    ) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self._cache_key = os.urandom(32)
        self._cache: dict[str, tuple[float, bytes]] = {}
        self.settings = settings
        self.reactor = reactor
        if run_blocking is None:
            if IReactorThreads.providedBy(reactor):
                def run_blocking(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
                    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
            else:
                def run_blocking(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
                    return defer.maybeDeferred(f, *args)
        self._run = run_blocking
        self._semaphore = defer.DeferredSemaphore(self.MAX_CONCURRENT)
        self._by_ip: dict[str, _Counter] = {}
        self._by_account: dict[str, _Counter] = {}
        #: account -> {ip_key: time of the last successful login from there}
        self._known: dict[str, dict[str, float]] = {}

    # -- throttling state -------------------------------------------------------------

    def _counter(self, table: dict[str, _Counter], key: str, now: float) -> _Counter | None:
        c = table.get(key)
        if c is not None and now - c.last > self.settings.window and now >= c.blocked_until:
            del table[key]
            return None
        return c

    def _is_blocked(self, login: str, client_ip: str, now: float) -> str | None:
        for what, table, key in (("ip", self._by_ip, client_ip), ("account", self._by_account, login)):
            c = self._counter(table, key, now)
            if c is not None and now < c.blocked_until:
                if what == "account" and self.is_known_client(login, client_ip, now):
                    continue
                return what
        return None

    #: clients remembered per account (the most recent are kept)
    MAX_KNOWN_PER_ACCOUNT = 32

    def is_known_client(self, login: str, client_ip: str, now: float | None = None) -> bool:
        """Did ``client_ip`` (its throttle key) log in to ``login`` within ``success_memory``?"""
        memory = getattr(self.settings, "success_memory", 0.0)
        seen = self._known.get(login.lower(), {}).get(ip_key(client_ip))
        if now is None:
            now = self.reactor.seconds()
        return memory > 0 and seen is not None and now - seen <= memory

    def _remember_client(self, login: str, ip: str, now: float) -> None:
        if getattr(self.settings, "success_memory", 0.0) <= 0:
            return
        if login not in self._known and len(self._known) >= self.MAX_TRACKED:
            memory = self.settings.success_memory
            for k in [k for k, ips in self._known.items() if all(now - t > memory for t in ips.values())]:
                del self._known[k]
            if len(self._known) >= self.MAX_TRACKED:
                for k in sorted(self._known, key=lambda k: max(self._known[k].values()))[: len(self._known) // 10 + 1]:
                    del self._known[k]
        ips = self._known.setdefault(login, {})
        ips.pop(ip, None)
        ips[ip] = now  # insertion order = age
        while len(ips) > self.MAX_KNOWN_PER_ACCOUNT:
            del ips[next(iter(ips))]

    def _record_failure(self, login: str, client_ip: str, now: float) -> int:
        """Count a failure; return the failure count that decides the delay."""
        worst = 0
        for table, key in ((self._by_ip, client_ip), (self._by_account, login)):
            c = self._counter(table, key, now)
            if c is None:
                if len(table) >= self.MAX_TRACKED:
                    self._prune(table, now)
                c = table[key] = _Counter()
            c.failures[login] = c.failures.get(login, 0) + 1
            c.last = now
            total = c.total
            if total >= self.settings.block_after and now >= c.blocked_until:
                c.blocked_until = now + self.settings.block_seconds
                log.warn(
                    "login blocked for {seconds} s: {what} {key} after {failures} failures",
                    seconds=self.settings.block_seconds,
                    what="ip" if table is self._by_ip else "account",
                    key=_printable(key),
                    failures=total,
                )
            worst = max(worst, total)
        return worst

    def _record_success(self, login: str, client_ip: str) -> None:
        now = self.reactor.seconds()
        self._remember_client(login, client_ip, now)
        acct = self._by_account.get(login)
        if acct is not None and now >= acct.blocked_until:
            del self._by_account[login]
        # a block stays while it lasts: the owner got in from a known client, but whoever
        # caused it must not be let in from a new address because of that
        c = self._by_ip.get(client_ip)
        if c is not None:
            c.failures.pop(login, None)  # other accounts' failures from this IP still count
            if not c.failures and c.blocked_until <= self.reactor.seconds():
                del self._by_ip[client_ip]

    def _prune(self, table: dict[str, _Counter], now: float) -> None:
        for key in [k for k, c in table.items() if now - c.last > self.settings.window and now >= c.blocked_until]:
            del table[key]
        if len(table) >= self.MAX_TRACKED:
            oldest = sorted(table, key=lambda k: table[k].last)[: len(table) // 10 + 1]
            for key in oldest:
                del table[key]

    def delay_for(self, failures: int) -> float:
        """Seconds to wait before answering the ``failures``-th failure."""
        s = self.settings
        extra = failures - s.free_failures
        if extra <= 0:
            return 0.0
        return min(s.base_delay * 2 ** min(extra - 1, 62), s.max_delay)

    def failures(self, login: str | None = None, client_ip: str | None = None) -> int:
        """Current failure count for an account or an IP (for tests and status)."""
        now = self.reactor.seconds()
        if login is not None:
            c = self._counter(self._by_account, login.lower(), now)
        else:
            c = self._counter(self._by_ip, ip_key(client_ip or ""), now)
        return c.total if c is not None else 0

    # -- the check ---------------------------------------------------------------------

    def authenticate(self, login: str, password: str, client_ip: str) -> defer.Deferred[AuthEntry]:
        """Deferred firing with the AuthEntry, or failing with LoginFailed / LoginBlocked."""
        key = login.strip().lower()
        ip = ip_key(client_ip)
        now = self.reactor.seconds()
        blocked = self._is_blocked(key, ip, now)
        if blocked is not None:
            log.warn(
                "authentication refused for {login} from {client_ip}: {what} temporarily blocked",
                login=_printable(login),
                client_ip=client_ip,
                what=blocked,
            )
            return defer.fail(LoginBlocked("too many failed logins, try again later"))
        snap = self.store.current()
        entry = snap.auth_entry(key)
        reason = None
        if entry is None:
            reason = "unknown login"
        elif not entry.can_login:
            reason = "no password set"
        else:
            mbx = snap.mailbox(entry.postoffice, entry.mailbox)
            po = snap.postoffice(entry.postoffice)
            if mbx is None:
                reason = "mailbox does not exist"
            elif not mbx.enabled or (po is not None and not po.enabled):
                reason = "account disabled"
        hashed = entry.password_hash if entry is not None and reason is None else LOCKED_HASH
        token = self._cache_token(key, password, hashed)
        cached = self._cache.get(key)
        if reason is None and cached is not None and now < cached[0] and hmac.compare_digest(cached[1], token):
            d: defer.Deferred[bool] = defer.succeed(True)
        else:
            d = self._semaphore.run(self._run, verify_password, password, hashed)

        def checked(ok: bool) -> Any:
            if ok and reason is None:
                assert entry is not None
                if self._is_blocked(key, ip, self.reactor.seconds()) is not None:
                    # a parallel guess triggered the block while this check ran
                    return defer.fail(LoginBlocked("too many failed logins, try again later"))
                self._record_success(key, ip)
                self._remember(key, token)
                log.info("authenticated {login} from {client_ip}", login=entry.login, client_ip=client_ip)
                return entry
            return self._fail(key, login, ip, client_ip, reason or "wrong password")

        d.addCallback(checked)
        return d

    def _cache_token(self, key: str, password: str, hashed: str) -> bytes:
        data = "\0".join((key, hashed, password)).encode("utf-8", "surrogatepass")
        return hmac.new(self._cache_key, data, hashlib.sha256).digest()

    def _remember(self, key: str, token: bytes) -> None:
        if self.cache_seconds <= 0:
            return
        now = self.reactor.seconds()
        if len(self._cache) >= 10_000:
            for k in [k for k, (until, _) in self._cache.items() if until <= now]:
                del self._cache[k]
            if len(self._cache) >= 10_000:
                self._cache.clear()
        self._cache[key] = (now + self.cache_seconds, token)

    def _fail(self, key: str, login: str, ip: str, client_ip: str, reason: str) -> defer.Deferred[AuthEntry]:
        now = self.reactor.seconds()
        failures = self._record_failure(key, ip, now)
        delay = self.delay_for(failures)
        log.warn(
            "authentication failure for {login} from {client_ip}: {reason} (failure {failures}, delay {delay} s)",
            login=_printable(login),
            client_ip=client_ip,
            reason=reason,
            failures=failures,
            delay=delay,
        )
        d: defer.Deferred[AuthEntry] = defer.Deferred()
        if delay > 0:
            self.reactor.callLater(delay, d.errback, LoginFailed("authentication failed"))
        else:
            d.errback(LoginFailed("authentication failed"))
        return d


#: not a valid hash: verify_password runs a dummy scrypt and returns False
LOCKED_HASH = "!"


@implementer(ICredentialsChecker)
class ProviderChecker:
    """twisted.cred checker over an :class:`Authenticator` for one connection's peer.

    The avatar id is the AUTH login as stored (``str``).  Failures are ``LoginFailed`` /
    ``LoginBlocked``, both ``UnauthorizedLogin``.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, authenticator: Authenticator, client_ip: str) -> None:
        self.authenticator = authenticator
        self.client_ip = client_ip

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[str]:
        username = credentials.username
        password = credentials.password
        try:
            if isinstance(username, bytes):
                username = username.decode("utf-8")
            if isinstance(password, bytes):
                password = password.decode("utf-8")
        except UnicodeDecodeError:
            return defer.fail(LoginFailed("credentials are not UTF-8"))
        d = self.authenticator.authenticate(username, password, self.client_ip)
        d.addCallback(lambda entry: entry.login)
        return d

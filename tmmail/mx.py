"""Where to send mail for a domain: MX hosts in order and every address of each (RFC 5321 §5.1).

* MX records sorted by preference, equal preferences shuffled (§5.1: "randomize among MX
  records of equal preference"); every A and AAAA address of every MX is tried in turn.
* No MX records: the domain's own A/AAAA records are an implicit MX of preference 0 (§5.1).
* Null MX (RFC 7505 §3: a single MX "0 .") and NXDOMAIN are permanent failures (RFC 7505 §4.1
  556 5.1.10; RFC 3463 5.1.2 bad destination system); DNS timeouts and SERVFAIL are transient
  (4.4.3 directory server failure).
* Lookups use dnspython's blocking resolver in a thread (never on the reactor) against
  ``settings.dns.nameservers`` ("HOST:PORT") or the system configuration (/etc/resolv.conf),
  for MX records and for the A/AAAA records of MX hosts alike, and answers (including NXDOMAIN
  / no-data answers, told apart) are cached for their TTL.  The system's getaddrinfo (which
  honours /etc/hosts) is used only for the configured host names of routes and the smarthost
  when no nameservers are set, and for every address lookup when there is no resolver
  configuration at all.

The blocking core (:meth:`Resolver.resolve_sync`) is pure apart from the DNS queries, so it is
tested directly; :meth:`Resolver.resolve` is the reactor-friendly wrapper the connector uses.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from tmmail.errors import DeliveryError, PermanentError, TransientError

__all__ = [
    "Hop",
    "Resolver",
    "parse_nameserver",
    "gai_error",
    "order_mx",
    "domain_literal",
    "NEGATIVE_TTL",
]

log = Logger(namespace="tmmail.mx")

#: seconds to cache a negative answer whose response carries no SOA (RFC 2308 §5 default-ish)
NEGATIVE_TTL = 60.0
#: never cache longer than a day, whatever the zone says
MAX_TTL = 86400.0


@dataclass(frozen=True)
class Hop:
    """One place to try: the host name (for logs, TLS SNI and DSN Remote-MTA) and one address."""

    host: str
    address: str
    port: int
    preference: int = 0

    def __str__(self) -> str:
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.host}[{addr}]:{self.port}"


def parse_nameserver(text: str) -> tuple[str, int]:
    """"127.0.0.1:5353" / "[::1]:53" / "::1" / "10.0.0.1" -> (host, port); default port 53."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
        return host, port
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, 53


def order_mx(records: Sequence[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """MX (preference, host) in preference order, equal preferences shuffled (RFC 5321 §5.1)."""
    groups: dict[int, list[str]] = {}
    for pref, host in records:
        groups.setdefault(pref, []).append(host)
    out: list[tuple[int, str]] = []
    for pref in sorted(groups):
        hosts = list(dict.fromkeys(groups[pref]))
        rng.shuffle(hosts)
        out.extend((pref, h) for h in hosts)
    return out


def domain_literal(domain: str) -> str | None:
    """The address in a domain literal ("[192.0.2.1]", "[IPv6:2001:db8::1]"), else None (§4.1.3)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    if "%" in inner:  # a zone index names a local interface, never a mail destination
        return None
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class _Negative(Exception):
    """A cached negative answer: ``nxdomain`` True for NXDOMAIN, False for NOERROR/no data."""

    def __init__(self, nxdomain: bool) -> None:
        super().__init__("NXDOMAIN" if nxdomain else "NODATA")
        self.nxdomain = nxdomain


class _Failure(Exception):
    """The lookup could not be completed (timeout, SERVFAIL, no reachable server): transient."""


def _negative_ttl(exc: Exception) -> float:
    """RFC 2308 §5: negative answers live for min(SOA TTL, SOA MINIMUM) from the authority."""
    try:
        responses = exc.responses() if isinstance(exc, dns.resolver.NXDOMAIN) else {}
        if isinstance(exc, dns.resolver.NoAnswer):
            responses = {None: exc.response()}
    except Exception:  # pragma: no cover - dnspython internals vary
        responses = {}
    for response in responses.values():
        for rrset in getattr(response, "authority", []):
            if rrset.rdtype == dns.rdatatype.SOA:
                return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL


def gai_error(host: str, e: socket.gaierror) -> DeliveryError:
    """The delivery error for a failed getaddrinfo: the name does not exist (5.1.2), exists
    without addresses (5.4.4, as a DNS no-data answer) or could not be looked up now (4.4.3)."""
    if e.errno == socket.EAI_NONAME:
        return PermanentError(550, "5.1.2", f"host {host} not found")
    if e.errno == getattr(socket, "EAI_NODATA", -5):
        return PermanentError(550, "5.4.4", f"host {host} has no addresses")
    return TransientError(451, "4.4.3", f"lookup of {host} failed: {e}")


class Resolver:
    """MX / address lookups with a TTL cache; thread-safe; ``resolve`` never blocks the reactor.

    ``clock`` gives the time for cache expiry (tests pass a fake); ``rng`` shuffles equal MX
    preferences.  ``nameservers`` empty means the system configuration (``resolv_conf``) for
    DNS, and the system's getaddrinfo (which honours /etc/hosts) for route and smarthost names;
    without a usable ``resolv_conf``, getaddrinfo for MX hosts' addresses too (``no_config``).
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        timeout: float = 10.0,
        reactor: Any = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        resolv_conf: str = "/etc/resolv.conf",
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.rng = rng or random.Random()
        self.system = not nameservers
        #: no resolver configuration (no resolv.conf or no nameserver in it): addresses come
        #: from getaddrinfo, MX records from 127.0.0.1 (what the C library would ask too)
        self.no_config = False
        if nameservers:
            r = dns.resolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers]
        else:
            try:
                r = dns.resolver.Resolver(filename=resolv_conf)
            except dns.resolver.NoResolverConfiguration:
                r = dns.resolver.Resolver(configure=False)
                r.nameservers = ["127.0.0.1"]
                self.no_config = True
        r.lifetime = timeout
        r.timeout = max(0.5, timeout / 3)
        r.retry_servfail = False
        r.cache = None
        self._dns = r
        self._cache: dict[tuple[str, int], tuple[float, Any]] = {}
        self._lock = threading.Lock()
        #: queries actually sent (not answered from the cache), for logs and tests
        self.queries = 0

    @classmethod
    def from_settings(cls, settings: Any, reactor: Any = None, **kw: Any) -> Resolver:
        return cls(settings.dns.nameservers, settings.dns.timeout, reactor=reactor, **kw)

    # -- the cache around one query ----------------------------------------------------------

    def _query(self, name: str, rdtype: int) -> list[Any]:
        """Records of ``rdtype`` at ``name`` (CNAMEs followed); raises _Negative or _Failure."""
        key = (name.lower().rstrip(".") + ".", rdtype)
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                if hit[0] > now:
                    if isinstance(hit[1], _Negative):
                        raise hit[1]
                    return list(hit[1])
                del self._cache[key]
        self.queries += 1
        try:
            answer = self._dns.resolve(key[0], rdtype, search=False, raise_on_no_answer=True)
        except dns.resolver.NXDOMAIN as e:
            self._store(key, _Negative(True), _negative_ttl(e))
            raise _Negative(True) from None
        except dns.resolver.NoAnswer as e:
            self._store(key, _Negative(False), _negative_ttl(e))
            raise _Negative(False) from None
        except dns.resolver.NoNameservers as e:
            raise _Failure(f"SERVFAIL or refused ({e.__class__.__name__})") from None
        except dns.exception.Timeout:
            raise _Failure("timed out") from None
        except (dns.exception.DNSException, OSError) as e:
            raise _Failure(f"{e.__class__.__name__}: {e}") from None
        records = list(answer)
        # the smallest TTL along a CNAME chain (dnspython's expiration is in real time)
        ttl = min(float(answer.rrset.ttl), answer.expiration - time.time()) if answer.rrset is not None else 0.0
        self._store(key, records, ttl)
        return records

    def _store(self, key: tuple[str, int], value: Any, ttl: float) -> None:
        ttl = min(max(ttl, 0.0), MAX_TTL)
        if ttl <= 0:
            return
        with self._lock:
            self._cache[key] = (self.clock() + ttl, value)

    # -- host addresses ----------------------------------------------------------------------

    def addresses_sync(self, host: str, configured: bool = False) -> list[str]:
        """BLOCKING: A then AAAA addresses of ``host``; raises PermanentError / TransientError.

        IPv4 first: hosts with broken IPv6 routes are still common, and every address is tried
        in turn anyway (an unreachable IPv6 network fails at once).  ``configured``: a name
        from the configuration (route, smarthost), which the system resolves (/etc/hosts)
        unless nameservers are set; MX hosts always come from DNS while there is a resolver
        configuration (:meth:`uses_getaddrinfo`).
        """
        if _is_ip(host):
            return [str(ipaddress.ip_address(host))]
        if self.uses_getaddrinfo(configured):
            return self._getaddrinfo(host)
        found: list[str] = []
        nxdomain = 0
        failure: str | None = None
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                found.extend(r.address for r in self._query(host, rdtype))
            except _Negative as e:
                nxdomain += e.nxdomain
            except _Failure as e:
                failure = str(e)
        if found:
            return list(dict.fromkeys(found))
        if failure is not None:
            raise TransientError(451, "4.4.3", f"DNS lookup of {host} failed: {failure}")
        if nxdomain:
            raise PermanentError(550, "5.1.2", f"host {host} does not exist (NXDOMAIN)")
        raise PermanentError(550, "5.4.4", f"host {host} has no A or AAAA records")

    def uses_getaddrinfo(self, configured: bool = False) -> bool:
        """Whether addresses come from the system's getaddrinfo instead of DNS queries (which
        are cached by TTL): only without nameservers, for configured names or when there is
        no resolver configuration."""
        return self.system and (configured or self.no_config)

    def _getaddrinfo(self, host: str) -> list[str]:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise gai_error(host, e) from None
        v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
        v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
        return list(dict.fromkeys(v4 + v6))

    def host_hops_sync(self, host: str, port: int) -> list[Hop]:
        """BLOCKING: hops for a named host (routes, smarthost): no MX lookup, just addresses."""
        return [Hop(host, a, port) for a in self.addresses_sync(host, configured=True)]

    # -- MX ----------------------------------------------------------------------------------

    def resolve_sync(self, domain: str, port: int, local_names: Sequence[str] = ()) -> list[Hop]:
        """BLOCKING: every hop for mail to ``domain`` in the order to try them.

        ``local_names``: this server's own names; MX hosts with a preference at or above ours
        are dropped (RFC 5321 §5.1), so a backup MX never sends mail back to itself.
        Raises PermanentError (NXDOMAIN 5.1.2, null MX 5.1.10, no usable host 5.4.4, only
        ourselves left 5.4.6) or TransientError (4.4.3) when the answer cannot be had now.
        """
        literal = domain_literal(domain)
        if literal is not None:
            return [Hop(domain, literal, port)]
        domain = domain.lower().rstrip(".")
        try:
            answer = self._query(domain, dns.rdatatype.MX)
        except _Negative as e:
            if e.nxdomain:
                raise PermanentError(550, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)") from None
            # §5.1: no MX -> the domain itself is the implicit MX, preference 0
            return [Hop(domain, a, port, 0) for a in self.addresses_sync(domain)]
        except _Failure as e:
            raise TransientError(451, "4.4.3", f"MX lookup for {domain} failed: {e}") from None
        real = [
            (int(r.preference), r.exchange.to_text(omit_final_dot=True))
            for r in answer
            if r.exchange != dns.name.root
        ]
        if not real:
            # RFC 7505 §3: "0 ." says the domain accepts no mail
            raise PermanentError(556, "5.1.10", f"domain {domain} does not accept mail (null MX)")
        mine = {n.lower().rstrip(".") for n in local_names if n}
        own = [p for p, h in real if h.lower().rstrip(".") in mine]
        if own:
            real = [(p, h) for p, h in real if p < min(own)]
            if not real:
                raise PermanentError(554, "5.4.6", f"mail for {domain} loops back to myself (I am its best MX)")
        hops: list[Hop] = []
        errors: list[DeliveryError] = []
        for pref, host in order_mx(real, self.rng):
            try:
                addrs = self.addresses_sync(host)
            except DeliveryError as e:
                log.info("MX {host} of {domain} unusable: {error}", host=host, domain=domain, error=e)
                errors.append(e)
                continue
            hops.extend(Hop(host, a, port, pref) for a in addrs)
        if hops:
            return hops
        transient = [e for e in errors if not e.permanent]
        if transient:
            raise TransientError(451, "4.4.3", f"no MX host of {domain} could be resolved: {transient[0].text}")
        raise PermanentError(550, "5.4.4", f"no MX host of {domain} has an address")

    # -- reactor-facing ----------------------------------------------------------------------

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor  # noqa: PLC0415 - only when none was passed in
        return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)

    def resolve(self, domain: str, port: int, local_names: Sequence[str] = ()) -> Any:
        """Deferred[list[Hop]] for ``domain`` (see resolve_sync); the lookup runs in a thread."""
        return self._in_thread(self.resolve_sync, domain, port, tuple(local_names))

    def host_hops(self, host: str, port: int) -> Any:
        """Deferred[list[Hop]] for a named host (no MX lookup)."""
        return self._in_thread(self.host_hops_sync, host, port)

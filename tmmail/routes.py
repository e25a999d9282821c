"""The mailertable: how mail for a remote domain leaves (Postfix ``transport_maps``, Sendmail
``mailertable``).

In order of precedence:

1. the domain's own route: the ROUTE column of DOMAINS.tab (``host[:port]`` or ``[host]:port``)
   for domains TMmail relays for (backup MX, an internal server behind us); TLS is
   opportunistic unless the domain's OPTIONS say ``route_tls=starttls|implicit|none``;
2. the smarthost (``settings.relay.smarthost``): every other domain goes through one relay
   host, TLS required by default (``smarthost_tls``) and its certificate verified
   (``smarthost_verify``), with AUTH if a user is set; default port 587 for STARTTLS, 465 for
   implicit TLS (RFC 8314 §3.3), 25 without TLS;
3. otherwise DNS: the domain's MX hosts on ``settings.relay.mx_port`` (25), opportunistic TLS.

Pure logic: no I/O, no reactor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tmmail.errors import ConfigError

__all__ = ["Route", "parse_hostport", "smarthost_route", "route_for", "MX", "ROUTE", "SMARTHOST"]

MX = "mx"
ROUTE = "route"
SMARTHOST = "smarthost"

SMARTHOST_PORTS = {"starttls": 587, "implicit": 465, "none": 25}
ROUTE_TLS_MODES = ("opportunistic", "starttls", "implicit", "none")


@dataclass(frozen=True)
class Route:
    """Where one destination domain's mail goes and how to talk to it."""

    kind: str  # MX, ROUTE or SMARTHOST
    #: the relay host (ROUTE, SMARTHOST) or the destination domain (MX)
    host: str
    port: int
    tls: str = "opportunistic"
    verify: bool = False
    user: str = ""
    password: str = ""

    @property
    def key(self) -> str:
        """The destination for connection reuse and concurrency limits."""
        return f"mx:{self.host}" if self.kind == MX else f"{self.kind}:{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"MX of {self.host}" if self.kind == MX else f"{self.kind} {self.host}:{self.port}"


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:2525``, ``[host]:25``, ``[2001:db8::1]:25``, ``2001:db8::1`` -> (host, port).

    Raises ConfigError for an empty host or a bad port.
    """
    text = text.strip()
    port = default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad route {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, text)
    else:
        host = text
    host = host.strip().rstrip(".").lower()
    if not host:
        raise ConfigError(f"route without a host: {text!r}")
    return host, port


def _port(text: str, whole: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"bad port in {whole!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"bad port in {whole!r}")
    return port


def smarthost_route(relay: Any) -> Route | None:
    """The smarthost from ``settings.relay``, or None when mail goes by MX."""
    if not relay.smarthost.strip():
        return None
    tls = relay.smarthost_tls
    if tls not in SMARTHOST_PORTS:
        raise ConfigError(f"relay.smarthost_tls must be starttls, implicit or none, not {tls!r}")
    host, port = parse_hostport(relay.smarthost, SMARTHOST_PORTS[tls])
    return Route(
        SMARTHOST, host, port, tls=tls, verify=bool(relay.smarthost_verify),
        user=relay.smarthost_user, password=relay.smarthost_password,
    )


def route_for(domain: str, providers: Any, relay: Any) -> Route:
    """The route for ``domain`` (lower-case): its DOMAINS.tab route, the smarthost, or MX."""
    domain = domain.lower().rstrip(".")
    entry = providers.domains.get(domain) if providers is not None else None
    if entry is not None and entry.route.strip():
        host, port = parse_hostport(entry.route, relay.mx_port)
        tls = (entry.options.get("route_tls") or "opportunistic").lower()
        if tls not in ROUTE_TLS_MODES:
            tls = "opportunistic"
        return Route(ROUTE, host, port, tls=tls, verify=False)
    smarthost = smarthost_route(relay)
    if smarthost is not None:
        return smarthost
    return Route(MX, domain, relay.mx_port)

"""Open connections per client, shared by the listeners of one service.

A client reaching both the plain and the TLS port of POP3 (or IMAP, or the three SMTP ports)
is one client: its ``max_connections_per_ip`` counts all of them, or a second listener would
double the limit.  Clients are counted by :func:`tmmail.cred.ip_key` (the IPv4 address, the
IPv6 /64), the same key as the login throttle, because one IPv6 subscriber owns a whole /64.
"""

from __future__ import annotations

from typing import Any

from tmmail.cred import ip_key


class ConnectionCounts:
    """Connections open now, in all and per client key."""

    def __init__(self) -> None:
        self.total = 0
        #: client key -> open connections (keys at zero are removed)
        self.per_ip: dict[str, int] = {}

    def admit(self, client_ip: str, per_ip_limit: int, total_limit: int = 0) -> str | None:
        """Count a new connection; None if admitted, else which limit it is over ("total",
        "per_ip").  A limit of 0 means none."""
        key = ip_key(client_ip)
        if total_limit and self.total >= total_limit:
            return "total"
        n = self.per_ip.get(key, 0)
        if per_ip_limit and n >= per_ip_limit:
            return "per_ip"
        self.total += 1
        self.per_ip[key] = n + 1
        return None

    def release(self, client_ip: str) -> None:
        """Forget one admitted connection of ``client_ip``."""
        key = ip_key(client_ip)
        self.total = max(0, self.total - 1)
        n = self.per_ip.get(key, 0) - 1
        if n > 0:
            self.per_ip[key] = n
        else:
            self.per_ip.pop(key, None)


#: (id(settings), service) -> (settings, counts); the entry keeps its Settings alive, so the
#: id is not reused while the entry exists
_SHARED: dict[tuple[int, str], tuple[Any, ConnectionCounts]] = {}


def shared_counts(settings: Any, service: str) -> ConnectionCounts:
    """The counts of ``service`` ("pop3", "imap") of the server built from ``settings``:
    each listener's factory asks with the same pair and gets the same object."""
    entry = _SHARED.get((id(settings), service))
    if entry is None or entry[0] is not settings:
        entry = _SHARED[(id(settings), service)] = (settings, ConnectionCounts())
    return entry[1]


__all__ = ["ConnectionCounts", "shared_counts"]

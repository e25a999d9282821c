"""A small authoritative DNS server on 127.0.0.1 for tests (UDP and TCP, twisted.names wire format).

Runs in the reactor thread (tests/conftest.py ``reactor_thread``).  Zone data is a plain dict
edited from the test thread; special behaviours per name: ``servfail`` (answer SERVFAIL),
``silent`` (never answer: the client times out).  Every query is recorded in ``queries`` so
tests can check caching.

    zone = TestDNS()
    zone.mx("example.test", [(10, "mx1.example.test"), (20, "mx2.example.test")])
    zone.a("mx1.example.test", "127.0.0.1")
    zone.null_mx("nomail.test"); zone.servfail.add("broken.test")
    server = zone.start(reactor_thread)       # -> "127.0.0.1:PORT" for settings.dns.nameservers
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import protocol
from twisted.names import dns


class TestDNS:
    __test__ = False  # not a pytest class

    def __init__(self, ttl: int = 300) -> None:
        self.ttl = ttl
        #: lower-case name without final dot -> list of (type, ttl, payload)
        self.records: dict[str, list[tuple[int, int, Any]]] = {}
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.udp: Any = None
        self.tcp: Any = None

    # -- zone editing --------------------------------------------------------------------------

    def _add(self, name: str, rtype: int, payload: Any, ttl: int | None) -> None:
        with self._lock:
            self.records.setdefault(name.lower().rstrip("."), []).append(
                (rtype, self.ttl if ttl is None else ttl, payload)
            )

    def a(self, name: str, *addresses: str, ttl: int | None = None) -> None:
        for addr in addresses:
            self._add(name, dns.A, dns.Record_A(addr), ttl)

    def aaaa(self, name: str, *addresses: str, ttl: int | None = None) -> None:
        for addr in addresses:
            self._add(name, dns.AAAA, dns.Record_AAAA(addr), ttl)

    def mx(self, name: str, exchanges: list[tuple[int, str]], ttl: int | None = None) -> None:
        for pref, host in exchanges:
            self._add(name, dns.MX, dns.Record_MX(pref, host.encode()), ttl)

    def null_mx(self, name: str) -> None:
        """RFC 7505: ``name. MX 0 .``"""
        self._add(name, dns.MX, dns.Record_MX(0, b""), None)

    def cname(self, name: str, target: str) -> None:
        self._add(name, dns.CNAME, dns.Record_CNAME(target.encode()), None)

    def txt(self, name: str, text: str) -> None:
        """Makes the name exist (NOERROR/no data for other types)."""
        self._add(name, dns.TXT, dns.Record_TXT(text.encode()), None)

    def clear(self) -> None:
        with self._lock:
            self.records.clear()
            self.servfail.clear()
            self.silent.clear()
            self.queries.clear()

    def count(self, name: str, qtype: str) -> int:
        with self._lock:
            return sum(1 for q in self.queries if q == (name.lower().rstrip("."), qtype))

    # -- answering -----------------------------------------------------------------------------

    def answer(self, message: dns.Message) -> dns.Message | None:
        """The response to a query message, or None to stay silent."""
        response = dns.Message(id=message.id, answer=1, opCode=message.opCode, recDes=message.recDes)
        response.queries = message.queries
        response.auth = 1
        response.recAv = 0
        if not message.queries:
            response.rCode = dns.EFORMAT
            return response
        q = message.queries[0]
        name = q.name.name.decode().lower().rstrip(".")
        with self._lock:
            self.queries.append((name, dns.QUERY_TYPES.get(q.type, str(q.type))))
            if name in self.silent:
                return None
            if name in self.servfail:
                response.rCode = dns.ESERVER
                return response
            seen = 0
            current = name
            while seen < 8:
                seen += 1
                records = self.records.get(current)
                if records is None:
                    if current == name:
                        response.rCode = dns.ENAME
                        response.authority = [self._soa(name)]
                    return response
                matches = [r for r in records if r[0] == q.type]
                cnames = [r for r in records if r[0] == dns.CNAME]
                if matches or not cnames:
                    for rtype, ttl, payload in matches:
                        response.answers.append(dns.RRHeader(current.encode(), rtype, dns.IN, ttl, payload, auth=True))
                    if not matches:
                        response.authority = [self._soa(current)]
                    return response
                rtype, ttl, payload = cnames[0]
                response.answers.append(dns.RRHeader(current.encode(), rtype, dns.IN, ttl, payload, auth=True))
                current = payload.name.name.decode().lower().rstrip(".")
            return response

    def _soa(self, name: str) -> dns.RRHeader:
        zone = ".".join(name.split(".")[-2:]) or "test"
        soa = dns.Record_SOA(
            mname=b"ns." + zone.encode(), rname=b"hostmaster." + zone.encode(), serial=1,
            refresh=3600, retry=600, expire=86400, minimum=30, ttl=30,
        )
        return dns.RRHeader(zone.encode(), dns.SOA, dns.IN, 30, soa, auth=True)

    # -- server --------------------------------------------------------------------------------

    def start(self, reactor_thread: Any) -> str:
        """Listen on UDP and TCP (same port) on 127.0.0.1; returns "127.0.0.1:PORT"."""
        from twisted.internet import reactor

        def listen() -> str:
            self.udp = reactor.listenUDP(0, _UDP(self), interface="127.0.0.1")
            port = self.udp.getHost().port
            try:
                self.tcp = reactor.listenTCP(port, _TCPFactory(self), interface="127.0.0.1")
            except Exception:  # the TCP port may be taken; UDP is enough for small answers
                self.tcp = None
            return f"127.0.0.1:{port}"

        return reactor_thread.call(listen)

    def stop(self, reactor_thread: Any) -> None:
        def close() -> Any:
            from twisted.internet import defer

            ds = [p.stopListening() for p in (self.udp, self.tcp) if p is not None]
            return defer.gatherResults([d for d in ds if d is not None])

        reactor_thread.call(close)


class _UDP(protocol.DatagramProtocol):
    def __init__(self, zone: TestDNS) -> None:
        self.zone = zone

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        message = dns.Message()
        try:
            message.fromStr(data)
        except Exception:
            return
        response = self.zone.answer(message)
        if response is not None:
            self.transport.write(response.toStr(), addr)


class _TCP(protocol.Protocol):
    def __init__(self, zone: TestDNS) -> None:
        self.zone = zone
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            n = int.from_bytes(self.buffer[:2], "big")
            if len(self.buffer) < 2 + n:
                return
            raw, self.buffer = self.buffer[2 : 2 + n], self.buffer[2 + n :]
            message = dns.Message()
            message.fromStr(raw)
            response = self.zone.answer(message)
            if response is not None:
                out = response.toStr()
                self.transport.write(len(out).to_bytes(2, "big") + out)


class _TCPFactory(protocol.Factory):
    def __init__(self, zone: TestDNS) -> None:
        self.zone = zone

    def buildProtocol(self, addr: Any) -> _TCP:
        return _TCP(self.zone)

"""Destination lookup against a real DNS server on 127.0.0.1 (tests/dnsserver.py)."""

from __future__ import annotations

import random
import socket

import dns.nameserver

import pytest

from tests.dnsserver import TestDNS
from tmmail.errors import PermanentError, TransientError
from tmmail.mx import Hop, Resolver, domain_literal, gai_error, order_mx, parse_nameserver


@pytest.fixture(scope="module")
def zone(reactor_thread):
    z = TestDNS(ttl=300)
    z.address = z.start(reactor_thread)
    yield z
    z.stop(reactor_thread)


@pytest.fixture()
def dnsz(zone):
    zone.clear()
    return zone


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make(zone, seed=0, clock=None, timeout=2.0) -> Resolver:
    return Resolver([zone.address], timeout=timeout, clock=clock or FakeClock(), rng=random.Random(seed))


def test_parse_nameserver():
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:53") == ("::1", 53)
    assert parse_nameserver("::1") == ("::1", 53)
    assert parse_nameserver("10.0.0.1") == ("10.0.0.1", 53)


def test_order_mx_keeps_preference_and_shuffles_equals():
    records = [(20, "c"), (10, "a"), (10, "b"), (30, "d")]
    seen = set()
    for seed in range(40):
        out = order_mx(records, random.Random(seed))
        assert [p for p, _ in out] == [10, 10, 20, 30]
        assert out[2:] == [(20, "c"), (30, "d")]
        seen.add(tuple(h for _, h in out[:2]))
    assert seen == {("a", "b"), ("b", "a")}


def test_domain_literal():
    assert domain_literal("[192.0.2.1]") == "192.0.2.1"
    assert domain_literal("[IPv6:2001:db8::1]") == "2001:db8::1"
    assert domain_literal("example.com") is None
    assert domain_literal("[not-an-ip]") is None
    assert domain_literal("[IPv6:fe80::1%eth0]") is None
    assert domain_literal("[fe80::1%1]") is None


def test_mx_in_preference_order_with_every_address(dnsz):
    dnsz.mx("example.test", [(20, "mx2.example.test"), (10, "mx1.example.test")])
    dnsz.a("mx1.example.test", "127.0.0.11", "127.0.0.12")
    dnsz.aaaa("mx1.example.test", "::1")
    dnsz.a("mx2.example.test", "127.0.0.21")
    hops = make(dnsz).resolve_sync("Example.TEST", 2525)
    assert [(h.host, h.address, h.port, h.preference) for h in hops] == [
        ("mx1.example.test", "127.0.0.11", 2525, 10),
        ("mx1.example.test", "127.0.0.12", 2525, 10),
        ("mx1.example.test", "::1", 2525, 10),
        ("mx2.example.test", "127.0.0.21", 2525, 20),
    ]
    assert str(hops[2]) == "mx1.example.test[[::1]]:2525"


def test_equal_preference_hosts_are_shuffled_between_lookups(dnsz):
    dnsz.mx("even.test", [(10, "a.even.test"), (10, "b.even.test")])
    dnsz.a("a.even.test", "127.0.0.1")
    dnsz.a("b.even.test", "127.0.0.2")
    firsts = {make(dnsz, seed=s).resolve_sync("even.test", 25)[0].host for s in range(20)}
    assert firsts == {"a.even.test", "b.even.test"}


def test_no_mx_falls_back_to_the_domains_own_addresses(dnsz):
    dnsz.a("plain.test", "127.0.0.5")
    dnsz.aaaa("plain.test", "::1")
    hops = make(dnsz).resolve_sync("plain.test", 25)
    assert hops == [Hop("plain.test", "127.0.0.5", 25, 0), Hop("plain.test", "::1", 25, 0)]


def test_cname_is_followed(dnsz):
    dnsz.mx("alias.test", [(5, "mail.alias.test")])
    dnsz.cname("mail.alias.test", "real.alias.test")
    dnsz.a("real.alias.test", "127.0.0.9")
    assert [h.address for h in make(dnsz).resolve_sync("alias.test", 25)] == ["127.0.0.9"]


def test_null_mx_is_permanent(dnsz):
    dnsz.null_mx("nomail.test")
    dnsz.a("nomail.test", "127.0.0.1")  # the A record must not be used as implicit MX
    with pytest.raises(PermanentError) as e:
        make(dnsz).resolve_sync("nomail.test", 25)
    assert (e.value.code, e.value.enhanced) == (556, "5.1.10")


def test_nxdomain_is_permanent(dnsz):
    with pytest.raises(PermanentError) as e:
        make(dnsz).resolve_sync("missing.test", 25)
    assert e.value.enhanced == "5.1.2"
    assert "missing.test" in e.value.text


def test_servfail_is_transient(dnsz):
    dnsz.servfail.add("broken.test")
    with pytest.raises(TransientError) as e:
        make(dnsz).resolve_sync("broken.test", 25)
    assert e.value.enhanced == "4.4.3"


def test_timeout_is_transient(dnsz):
    dnsz.silent.add("slow.test")
    with pytest.raises(TransientError) as e:
        make(dnsz, timeout=1.0).resolve_sync("slow.test", 25)
    assert e.value.enhanced == "4.4.3"
    assert "timed out" in e.value.text


def test_unresolvable_mx_hosts_are_skipped(dnsz):
    dnsz.mx("half.test", [(10, "gone.half.test"), (20, "ok.half.test")])
    dnsz.a("ok.half.test", "127.0.0.3")
    assert [h.host for h in make(dnsz).resolve_sync("half.test", 25)] == ["ok.half.test"]


def test_mx_hosts_without_any_address(dnsz):
    dnsz.mx("hollow.test", [(10, "gone1.hollow.test"), (20, "gone2.hollow.test")])
    with pytest.raises(PermanentError) as e:
        make(dnsz).resolve_sync("hollow.test", 25)
    assert e.value.enhanced == "5.4.4"
    # one of them only failing for now: the domain is retried later, not bounced
    dnsz.servfail.add("gone2.hollow.test")
    with pytest.raises(TransientError):
        make(dnsz).resolve_sync("hollow.test", 25)


def test_answers_are_cached_for_their_ttl(dnsz):
    dnsz.mx("cached.test", [(10, "mx.cached.test")], ttl=60)
    dnsz.a("mx.cached.test", "127.0.0.7", ttl=60)
    clock = FakeClock()
    r = make(dnsz, clock=clock)
    first = r.resolve_sync("cached.test", 25)
    assert dnsz.count("cached.test", "MX") == 1
    clock.now += 59
    assert r.resolve_sync("cached.test", 25) == first
    assert dnsz.count("cached.test", "MX") == 1
    assert dnsz.count("mx.cached.test", "A") == 1
    clock.now += 2
    r.resolve_sync("cached.test", 25)
    assert dnsz.count("cached.test", "MX") == 2


def test_nxdomain_is_cached_and_servfail_is_not(dnsz):
    clock = FakeClock()
    r = make(dnsz, clock=clock)
    for _ in range(2):
        with pytest.raises(PermanentError):
            r.resolve_sync("nx-cached.test", 25)
    assert dnsz.count("nx-cached.test", "MX") == 1
    clock.now += 31  # the test server's SOA minimum is 30 s (RFC 2308 negative TTL)
    with pytest.raises(PermanentError):
        r.resolve_sync("nx-cached.test", 25)
    assert dnsz.count("nx-cached.test", "MX") == 2

    dnsz.servfail.add("flaky.test")
    for _ in range(2):
        with pytest.raises(TransientError):
            r.resolve_sync("flaky.test", 25)
    assert dnsz.count("flaky.test", "MX") == 2
    # the failure is over: the next lookup sees the records at once
    dnsz.servfail.discard("flaky.test")
    dnsz.mx("flaky.test", [(10, "mx.flaky.test")])
    dnsz.a("mx.flaky.test", "127.0.0.8")
    assert [h.address for h in r.resolve_sync("flaky.test", 25)] == ["127.0.0.8"]


def test_domain_literal_needs_no_dns(dnsz):
    hops = make(dnsz).resolve_sync("[127.0.0.1]", 2525)
    assert hops == [Hop("[127.0.0.1]", "127.0.0.1", 2525)]
    assert dnsz.queries == []


def test_resolve_runs_off_the_reactor_thread(dnsz, reactor_thread):
    import threading

    from twisted.internet import reactor

    dnsz.mx("async.test", [(10, "mx.async.test")])
    dnsz.a("mx.async.test", "127.0.0.4")
    r = Resolver([dnsz.address], timeout=2.0, reactor=reactor)
    threads = []
    orig = r.resolve_sync

    def spy(*a):
        threads.append(threading.current_thread().name)
        return orig(*a)

    r.resolve_sync = spy
    hops = reactor_thread.call(r.resolve, "async.test", 25)
    assert [h.address for h in hops] == ["127.0.0.4"]
    assert threads and threads[0] != "reactor"
    hops = reactor_thread.call(r.host_hops, "mx.async.test", 587)
    assert hops == [Hop("mx.async.test", "127.0.0.4", 587)]


def test_host_hops_for_ip_and_system_resolver():
    r = Resolver([], timeout=1.0)
    assert r.host_hops_sync("127.0.0.1", 25) == [Hop("127.0.0.1", "127.0.0.1", 25)]
    # system mode resolves route/smarthost names with getaddrinfo, so /etc/hosts works
    assert "127.0.0.1" in [h.address for h in r.host_hops_sync("localhost", 25)]


def test_where_addresses_come_from(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# local resolver\nnameserver 127.0.0.1\n")
    system = Resolver([], resolv_conf=str(conf))
    # MX hosts' addresses: DNS (TTL cache, NXDOMAIN told from no data); configured names: the system
    assert not system.no_config
    assert not system.uses_getaddrinfo() and system.uses_getaddrinfo(configured=True)
    # no resolver configuration at all: getaddrinfo is all there is
    for missing in (tmp_path / "none", tmp_path / "empty"):
        if missing.name == "empty":
            missing.write_text("search example.test\n")  # no nameserver line
        bare = Resolver([], resolv_conf=str(missing))
        assert bare.no_config and bare.uses_getaddrinfo() and bare.uses_getaddrinfo(configured=True)
    # explicit nameservers: DNS for everything
    explicit = Resolver(["127.0.0.1:5353"])
    assert not explicit.uses_getaddrinfo() and not explicit.uses_getaddrinfo(configured=True)


def test_getaddrinfo_errors_keep_nxdomain_and_no_data_apart():
    gone = gai_error("gone.test", socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert isinstance(gone, PermanentError) and gone.enhanced == "5.1.2"
    if hasattr(socket, "EAI_NODATA"):
        empty = gai_error("empty.test", socket.gaierror(socket.EAI_NODATA, "No address associated with hostname"))
        assert isinstance(empty, PermanentError) and empty.enhanced == "5.4.4"
    later = gai_error("slow.test", socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    assert isinstance(later, TransientError) and later.enhanced == "4.4.3"


def test_system_configuration_asks_dns_for_mx_host_addresses_and_caches_them(dnsz, tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\n")
    clock = FakeClock()
    r = Resolver([], timeout=2.0, clock=clock, resolv_conf=str(conf))
    # resolv.conf has no port syntax: aim the configured resolver at the test server's port
    host, port = parse_nameserver(dnsz.address)
    r._dns.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
    dnsz.mx("sys.test", [(10, "mx.sys.test")])
    dnsz.a("mx.sys.test", "127.0.0.9", ttl=60)
    assert [h.address for h in r.resolve_sync("sys.test", 25)] == ["127.0.0.9"]
    assert [h.address for h in r.resolve_sync("sys.test", 25)] == ["127.0.0.9"]
    assert dnsz.count("mx.sys.test", "A") == 1  # the second time from the cache
    clock.now += 61
    r.resolve_sync("sys.test", 25)
    assert dnsz.count("mx.sys.test", "A") == 2  # the TTL ran out
    with pytest.raises(PermanentError) as nx:
        r.addresses_sync("gone.sys.test")
    dnsz.txt("bare.sys.test", "exists, no address")
    with pytest.raises(PermanentError) as nodata:
        r.addresses_sync("bare.sys.test")
    assert (nx.value.enhanced, nodata.value.enhanced) == ("5.1.2", "5.4.4")


def test_mx_list_is_cut_at_our_own_name(dnsz):
    dnsz.mx("backup.test", [(10, "primary.backup.test"), (20, "Me.Relay.test"), (30, "tertiary.backup.test")])
    dnsz.a("primary.backup.test", "127.0.0.1")
    dnsz.a("tertiary.backup.test", "127.0.0.3")
    hops = make(dnsz).resolve_sync("backup.test", 25, local_names=("me.relay.test",))
    assert [h.host for h in hops] == ["primary.backup.test"]
    # we are the best MX ourselves: delivering would loop
    dnsz.mx("loop.test", [(10, "me.relay.test"), (20, "other.loop.test")])
    with pytest.raises(PermanentError) as e:
        make(dnsz).resolve_sync("loop.test", 25, local_names=("me.relay.test",))
    assert e.value.enhanced == "5.4.6"

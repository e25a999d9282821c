"""The SMTP connector: DNS on a loopback test server, receiving servers are aiosmtpd on 127.0.0.x."""

from __future__ import annotations

import time

import pytest
from twisted.internet import defer, reactor
from twisted.internet.ssl import Certificate
from zope.interface.verify import verifyObject

from tests.dnsserver import TestDNS
from tests.smtpsink import Sink, Tracker, free_port, make_pki
from tmmail import config
from tmmail.address import InternalAddress
from tmmail.connectors.smtp import SMTPConnector, message_size
from tmmail.envelope import Envelope
from tmmail.errors import Delivered, PermanentError, TransientError
from tmmail.interfaces import IConnector
from tmmail.providers import ProviderStore

BODY = b"From: alice@src.test\nSubject: test\n\nhello\n.dot line\n"


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


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")), "smarthost.test")


@pytest.fixture()
def mx_port():
    return free_port()


def settings(zone, mx_port, **relay):
    relay.setdefault("mx_port", mx_port)
    relay.setdefault("connect_timeout", 3.0)
    relay.setdefault("command_timeout", 5.0)
    return config.parse({
        "server": {"hostname": "relay.tmmail.test"},
        "dns": {"nameservers": [zone.address], "timeout": 2.0},
        "relay": relay,
    })


def envelope(*rcpts, sender="alice@src.test", mail_params=None, rcpt_params=None, qid="Q1"):
    return Envelope.new(queue_id=qid, sender=sender, recipients=list(rcpts), mail_params=mail_params,
                        rcpt_params=rcpt_params)


def plain(outcomes):
    """Outcomes with each Delivered as None (most tests only care that it got through)."""
    return [None if isinstance(o, Delivered) else o for o in outcomes]


def deliver(reactor_thread, conn, env, path):
    items = [(r, InternalAddress("SMTP", r.address)) for r in env.recipients]
    return plain(reactor_thread.call(conn.deliver, env, items, str(path)))


@pytest.fixture()
def msg(tmp_path):
    p = tmp_path / "Q1.eml"
    p.write_bytes(BODY)
    return p


def make(reactor_thread, s, store=None, **kw):
    conn = SMTPConnector(s, store, reactor, **kw)
    yield_conn.append(conn)
    return conn


yield_conn: list[SMTPConnector] = []


@pytest.fixture(autouse=True)
def _close_connectors(reactor_thread):
    yield
    while yield_conn:
        reactor_thread.call(yield_conn.pop().close)


def test_interface_and_batch_key(dnsz, mx_port, reactor_thread):
    conn = make(reactor_thread, settings(dnsz, mx_port))
    assert verifyObject(IConnector, conn)
    assert conn.scheme == "SMTP"
    assert conn.batch_key(InternalAddress("SMTP", "Bob@Example.TEST")) == "example.test"


def test_message_size_counts_crlf(msg):
    assert message_size(str(msg)) == len(BODY) + BODY.count(b"\n")


def test_first_mx_down_second_mx_gets_it(dnsz, mx_port, msg, reactor_thread):
    dnsz.mx("two.test", [(10, "mx1.two.test"), (20, "mx2.two.test")])
    dnsz.a("mx1.two.test", "127.0.0.2")  # nothing listens there: connection refused
    dnsz.a("mx2.two.test", "127.0.0.3")
    with Sink(address="127.0.0.3", port=mx_port) as sink:
        conn = make(reactor_thread, settings(dnsz, mx_port))
        outcomes = deliver(reactor_thread, conn, envelope("bob@two.test"), msg)
    assert outcomes == [None]
    assert sink.messages[0].rcpt_tos == ["bob@two.test"]
    assert sink.messages[0].content == BODY.replace(b"\n", b"\r\n")
    assert sink.messages[0].helo == "relay.tmmail.test"


def test_every_address_of_an_mx_is_tried(dnsz, mx_port, msg, reactor_thread):
    dnsz.mx("multi.test", [(10, "mx.multi.test")])
    dnsz.a("mx.multi.test", "127.0.0.2", "127.0.0.4")
    with Sink(address="127.0.0.4", port=mx_port) as sink:
        outcomes = deliver(reactor_thread, make(reactor_thread, settings(dnsz, mx_port)), envelope("x@multi.test"), msg)
    assert outcomes == [None] and len(sink.messages) == 1


def test_mixed_recipient_outcomes_carry_the_remote_reply(dnsz, mx_port, msg, reactor_thread):
    dnsz.mx("mixed.test", [(10, "mx.mixed.test")])
    dnsz.a("mx.mixed.test", "127.0.0.5")
    with Sink(address="127.0.0.5", port=mx_port) as sink:
        sink.script.rcpt["later@mixed.test"] = "450 4.2.1 mailbox busy"
        sink.script.rcpt["gone@mixed.test"] = "550 5.1.1 <gone@mixed.test>: no such user"
        env = envelope("ok@mixed.test", "later@mixed.test", "gone@mixed.test")
        outcomes = deliver(reactor_thread, make(reactor_thread, settings(dnsz, mx_port)), env, msg)
    ok, later, gone = outcomes
    assert ok is None
    assert isinstance(later, TransientError) and later.reply() == "450 4.2.1 mailbox busy"
    assert isinstance(gone, PermanentError) and gone.reply() == "550 5.1.1 <gone@mixed.test>: no such user"
    assert later.remote_mta == gone.remote_mta == "mx.mixed.test"
    assert sink.messages[0].rcpt_tos == ["ok@mixed.test"]


def test_all_hosts_down_is_transient(dnsz, mx_port, msg, reactor_thread):
    dnsz.mx("down.test", [(10, "mx1.down.test"), (20, "mx2.down.test")])
    dnsz.a("mx1.down.test", "127.0.0.2")
    dnsz.a("mx2.down.test", "127.0.0.6")
    (err,) = deliver(reactor_thread, make(reactor_thread, settings(dnsz, mx_port)), envelope("a@down.test"), msg)
    assert isinstance(err, TransientError) and err.enhanced == "4.4.1"
    assert "2 addresses tried" in err.text


@pytest.mark.parametrize("setup,kind,enhanced", [
    (lambda z: z.null_mx("nullmx.test"), PermanentError, "5.1.10"),
    (lambda z: None, PermanentError, "5.1.2"),
    (lambda z: z.servfail.add("nullmx.test"), TransientError, "4.4.3"),
])
def test_dns_outcomes(dnsz, mx_port, msg, reactor_thread, setup, kind, enhanced):
    setup(dnsz)
    env = envelope("a@nullmx.test", "b@nullmx.test")
    outcomes = deliver(reactor_thread, make(reactor_thread, settings(dnsz, mx_port)), env, msg)
    assert [type(o) for o in outcomes] == [kind, kind]
    assert outcomes[0].enhanced == enhanced


def test_dsn_and_size_parameters_are_relayed(dnsz, mx_port, msg, reactor_thread):
    dnsz.mx("dsn.test", [(10, "mx.dsn.test")])
    dnsz.a("mx.dsn.test", "127.0.0.7")
    env = envelope("bob@dsn.test", "carol@dsn.test", mail_params={"RET": "HDRS", "ENVID": "abc", "BODY": "8BITMIME"},
                   rcpt_params={"bob@dsn.test": {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;bob@dsn.test"}})
    with Sink(address="127.0.0.7", port=mx_port) as sink:
        assert deliver(reactor_thread, make(reactor_thread, settings(dnsz, mx_port)), env, msg) == [None, None]
    got = sink.messages[0]
    assert got.mail_dsn == {"RET": "HDRS", "ENVID": "abc"}  # as sent: ENVID is case-sensitive
    assert got.rcpt_dsn[0] == {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;bob@dsn.test"}
    # without ORCPT from the client the original address is added (RFC 3461 §4.2)
    assert got.rcpt_dsn[1] == {"ORCPT": "rfc822;carol@dsn.test"}
    assert f"SIZE={message_size(str(msg))}" in got.mail_options and "BODY=8BITMIME" in got.mail_options


def test_connection_dropped_mid_data_defers_without_trying_the_next_mx(dnsz, mx_port, tmp_path, reactor_thread):
    big = tmp_path / "big.eml"
    big.write_bytes(b"Subject: big\n\n" + (b"y" * 76 + b"\n") * 2000)
    dnsz.mx("drop.test", [(10, "mx1.drop.test"), (20, "mx2.drop.test")])
    dnsz.a("mx1.drop.test", "127.0.0.8")
    dnsz.a("mx2.drop.test", "127.0.0.9")
    with Sink(address="127.0.0.8", port=mx_port) as first, Sink(address="127.0.0.9", port=mx_port) as second:
        first.script.data = "drop-mid"
        (err,) = deliver(reactor_thread, make(reactor_thread, settings(dnsz, mx_port)), envelope("a@drop.test"), big)
    assert isinstance(err, TransientError) and err.enhanced == "4.4.2"
    # the "421 4.4.2" is ours, not the peer's: no Remote-MTA, but the text names the host
    assert not hasattr(err, "remote_mta") and "mx1.drop.test[127.0.0.8]" in err.text
    assert first.messages == [] and second.messages == [] and second.connections == 0


def test_opportunistic_starttls_and_fallback_to_plain(dnsz, mx_port, msg, reactor_thread, pki):
    dnsz.mx("tls.test", [(10, "mx.tls.test")])
    dnsz.a("mx.tls.test", "127.0.0.10")
    dnsz.mx("notls.test", [(10, "mx.notls.test")])
    dnsz.a("mx.notls.test", "127.0.0.11")
    conn = make(reactor_thread, settings(dnsz, mx_port), idle_seconds=0.01)
    with Sink(address="127.0.0.10", port=mx_port, tls=pki.server_context()) as good:
        assert deliver(reactor_thread, conn, envelope("a@tls.test"), msg) == [None]
    assert good.messages[0].tls
    with Sink(address="127.0.0.11", port=mx_port, tls=pki.server_context(broken=True)) as broken:
        assert deliver(reactor_thread, conn, envelope("a@notls.test"), msg) == [None]
        assert broken.connections == 2  # the failed handshake, then plain
        assert not broken.messages[0].tls
        # the host is remembered: the next message goes plain at once
        time.sleep(0.2)  # let the idle connection expire (idle_seconds=0.01)
        assert deliver(reactor_thread, conn, envelope("b@notls.test", qid="Q2"), msg) == [None]
        assert broken.connections == 3
    assert len(broken.messages) == 2


def test_smarthost_with_auth_over_verified_tls(dnsz, mx_port, msg, reactor_thread, pki):
    port = free_port()
    dnsz.a("smarthost.test", "127.0.0.12")
    s = settings(dnsz, mx_port, smarthost=f"smarthost.test:{port}", smarthost_tls="starttls",
                 smarthost_user="relayuser", smarthost_password="pw123")
    conn = make(reactor_thread, s, trust_root=Certificate.loadPEM(pki.ca_pem))
    with Sink(address="127.0.0.12", port=port, tls=pki.server_context(), auth={"relayuser": "pw123"}) as sink:
        # no MX records exist for these domains: only the smarthost is used
        assert deliver(reactor_thread, conn, envelope("x@one.example", "y@one.example"), msg) == [None, None]
        assert deliver(reactor_thread, conn, envelope("z@two.example", qid="Q2"), msg) == [None]
    assert [m.rcpt_tos for m in sink.messages] == [["x@one.example", "y@one.example"], ["z@two.example"]]
    assert all(m.tls and m.login == "relayuser" for m in sink.messages)
    assert dnsz.count("one.example", "MX") == 0


def test_smarthost_private_ca_from_settings(dnsz, mx_port, msg, reactor_thread, pki, tmp_path):
    """relay.smarthost_ca_file names the CA that signs the smarthost: verified TLS without code."""
    port = free_port()
    dnsz.a("smarthost.test", "127.0.0.14")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca_pem)
    s = settings(dnsz, mx_port, smarthost=f"smarthost.test:{port}", smarthost_ca_file=str(ca))
    conn = make(reactor_thread, s)
    with Sink(address="127.0.0.14", port=port, tls=pki.server_context()) as sink:
        assert deliver(reactor_thread, conn, envelope("x@one.example"), msg) == [None]
    assert sink.messages[0].tls


def test_smarthost_certificate_not_trusted(dnsz, mx_port, msg, reactor_thread, pki, tmp_path):
    port = free_port()
    dnsz.a("smarthost.test", "127.0.0.13")
    s = settings(dnsz, mx_port, smarthost=f"smarthost.test:{port}")
    other = make_pki(str(tmp_path / "other"), "smarthost.test")
    conn = make(reactor_thread, s, trust_root=Certificate.loadPEM(other.ca_pem))
    with Sink(address="127.0.0.13", port=port, tls=pki.server_context()) as sink:
        (err,) = deliver(reactor_thread, conn, envelope("x@one.example"), msg)
    assert isinstance(err, TransientError) and err.enhanced == "4.7.5"
    assert sink.messages == []


def test_smarthost_verification_off_and_implicit_tls(dnsz, mx_port, msg, reactor_thread, pki):
    port = free_port()
    s = settings(dnsz, mx_port, smarthost=f"[127.0.0.14]:{port}", smarthost_tls="implicit", smarthost_verify=False,
                 smarthost_user="u", smarthost_password="p")
    with Sink(address="127.0.0.14", port=port, implicit_tls=pki.server_context(), auth={"u": "p"}) as sink:
        assert deliver(reactor_thread, make(reactor_thread, s), envelope("x@one.example"), msg) == [None]
    assert sink.messages[0].login == "u"


def test_smarthost_bad_password_is_transient(dnsz, mx_port, msg, reactor_thread, pki):
    port = free_port()
    s = settings(dnsz, mx_port, smarthost=f"127.0.0.15:{port}", smarthost_verify=False,
                 smarthost_user="u", smarthost_password="wrong")
    with Sink(address="127.0.0.15", port=port, tls=pki.server_context(), auth={"u": "p"}) as sink:
        (err,) = deliver(reactor_thread, make(reactor_thread, s), envelope("x@one.example"), msg)
    assert isinstance(err, TransientError) and err.enhanced == "4.7.0" and "535" in err.text
    assert sink.messages == []


def test_domain_route_overrides_dns_and_smarthost(dnsz, mx_port, msg, reactor_thread, tmp_path):
    port = free_port()
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "POSTOFFICE.tab").write_text("ACME\t1\n")
    (cfg / "DOMAINS.tab").write_text(f"backup.test\tACME\t1\t127.0.0.16:{port}\t\n")
    store = ProviderStore(str(cfg))
    dnsz.mx("backup.test", [(10, "mx.elsewhere.test")])
    s = settings(dnsz, mx_port, smarthost="127.0.0.99:1")
    with Sink(address="127.0.0.16", port=port) as sink:
        assert deliver(reactor_thread, make(reactor_thread, s, store), envelope("bob@Backup.test"), msg) == [None]
    assert sink.messages[0].rcpt_tos == ["bob@Backup.test"]
    assert dnsz.count("backup.test", "MX") == 0


def test_per_destination_limit_reuses_one_connection(dnsz, mx_port, tmp_path, reactor_thread):
    dnsz.mx("reuse.test", [(10, "mx.reuse.test")])
    dnsz.a("mx.reuse.test", "127.0.0.17")
    s = settings(dnsz, mx_port, max_connections_per_domain=1)
    conn = make(reactor_thread, s)
    paths = []
    for i in range(4):
        p = tmp_path / f"m{i}.eml"
        p.write_bytes(b"Subject: %d\n\nbody\n" % i)
        paths.append(p)
    with Sink(address="127.0.0.17", port=mx_port) as sink:
        def all_at_once():
            ds = []
            for i, p in enumerate(paths):
                env = envelope(f"r{i}@reuse.test", qid=f"Q{i}")
                ds.append(conn.deliver(env, [(env.recipients[0], InternalAddress("SMTP", f"r{i}@reuse.test"))], str(p)))
            return defer.gatherResults(ds)

        assert [plain(o) for o in reactor_thread.call(all_at_once)] == [[None]] * 4
        assert sink.connections == 1
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == [f"r{i}@reuse.test" for i in range(4)]


def test_global_limit_bounds_open_connections(dnsz, mx_port, tmp_path, reactor_thread):
    tracker = Tracker()
    for i, addr in enumerate(["127.0.0.18", "127.0.0.19", "127.0.0.20"]):
        dnsz.mx(f"g{i}.test", [(10, f"mx.g{i}.test")])
        dnsz.a(f"mx.g{i}.test", addr)
    s = settings(dnsz, mx_port, max_connections=1)
    conn = make(reactor_thread, s)
    p = tmp_path / "g.eml"
    p.write_bytes(BODY)
    sinks = [Sink(address=a, port=mx_port, tracker=tracker).start() for a in ["127.0.0.18", "127.0.0.19", "127.0.0.20"]]
    try:
        tracker.reset()

        def all_at_once():
            ds = []
            for i in range(3):
                env = envelope(f"r@g{i}.test", qid=f"G{i}")
                ds.append(conn.deliver(env, [(env.recipients[0], InternalAddress("SMTP", f"r@g{i}.test"))], str(p)))
            return defer.gatherResults(ds)

        assert [plain(o) for o in reactor_thread.call(all_at_once)] == [[None]] * 3
        assert [len(x.messages) for x in sinks] == [1, 1, 1]
        assert tracker.peak == 1
    finally:
        for x in sinks:
            x.stop()


def test_idle_connection_closed_by_the_server_is_replaced(dnsz, mx_port, msg, reactor_thread):
    dnsz.mx("stale.test", [(10, "mx.stale.test")])
    dnsz.a("mx.stale.test", "127.0.0.21")
    conn = make(reactor_thread, settings(dnsz, mx_port), idle_seconds=30)
    with Sink(address="127.0.0.21", port=mx_port) as sink:
        assert deliver(reactor_thread, conn, envelope("a@stale.test"), msg) == [None]
    # the server went away (restart) while our connection idled; a new one comes up
    with Sink(address="127.0.0.21", port=mx_port) as sink2:
        assert deliver(reactor_thread, conn, envelope("b@stale.test", qid="Q2"), msg) == [None]
    assert sink.messages[0].rcpt_tos == ["a@stale.test"]
    assert sink2.messages[0].rcpt_tos == ["b@stale.test"]


def test_bounce_has_null_sender(dnsz, mx_port, msg, reactor_thread):
    dnsz.mx("null.test", [(10, "mx.null.test")])
    dnsz.a("mx.null.test", "127.0.0.22")
    with Sink(address="127.0.0.22", port=mx_port) as sink:
        assert deliver(reactor_thread, make(reactor_thread, settings(dnsz, mx_port)), envelope("a@null.test", sender=""), msg) == [None]
    assert sink.messages[0].mail_from == "<>"  # aiosmtpd records MAIL FROM:<> like this


def test_bad_smarthost_setting_fails_at_start(dnsz, mx_port):
    from tmmail.errors import ConfigError

    with pytest.raises(ConfigError):
        SMTPConnector(settings(dnsz, mx_port, smarthost="host:notaport"), None, reactor)


def test_ipv6_only_mx_and_source_address(dnsz, mx_port, msg, reactor_thread):
    dnsz.mx("six.test", [(10, "mx.six.test")])
    dnsz.aaaa("mx.six.test", "::1")
    dnsz.mx("src.test", [(10, "mx.src.test")])
    dnsz.a("mx.src.test", "127.0.0.23")
    with Sink(address="::1", port=mx_port) as six:
        assert deliver(reactor_thread, make(reactor_thread, settings(dnsz, mx_port)), envelope("a@six.test"), msg) == [None]
    assert six.messages[0].peer[0] == "::1"
    # the configured source address is used for IPv4 peers
    conn = make(reactor_thread, settings(dnsz, mx_port, source_address="127.0.0.50", helo_name="out.tmmail.test"))
    with Sink(address="127.0.0.23", port=mx_port) as src:
        assert deliver(reactor_thread, conn, envelope("a@src.test"), msg) == [None]
    assert src.messages[0].peer[0] == "127.0.0.50"
    assert src.messages[0].helo == "out.tmmail.test"


def test_421_defers_the_rest(dnsz, mx_port, msg, reactor_thread):
    dnsz.mx("busy.test", [(10, "mx.busy.test")])
    dnsz.a("mx.busy.test", "127.0.0.24")
    with Sink(address="127.0.0.24", port=mx_port, pipelining=False) as sink:
        sink.script.rcpt["b@busy.test"] = "421 4.7.0 too many connections, closing"
        env = envelope("a@busy.test", "b@busy.test", "c@busy.test")
        outcomes = deliver(reactor_thread, make(reactor_thread, settings(dnsz, mx_port)), env, msg)
    assert all(isinstance(o, TransientError) for o in outcomes)
    assert [o.reply() for o in outcomes] == ["421 4.7.0 too many connections, closing"] * 3
    assert sink.messages == []


@pytest.mark.parametrize("pipelining", [True, False])
def test_too_many_recipients_get_another_transaction(dnsz, mx_port, msg, reactor_thread, pipelining):
    dnsz.mx("many.test", [(10, "mx.many.test")])
    dnsz.a("mx.many.test", "127.0.0.25")
    rcpts = [f"r{i}@many.test" for i in range(5)]
    with Sink(address="127.0.0.25", port=mx_port, pipelining=pipelining) as sink:
        sink.script.max_rcpts = 2
        sink.script.rcpt["r1@many.test"] = "550 5.1.1 unknown"
        outcomes = deliver(reactor_thread, make(reactor_thread, settings(dnsz, mx_port)), envelope(*rcpts), msg)
    assert [o is None for o in outcomes] == [True, False, True, True, True]
    assert isinstance(outcomes[1], PermanentError)
    assert [m.rcpt_tos for m in sink.messages] == [["r0@many.test", "r2@many.test"], ["r3@many.test", "r4@many.test"]]
    assert sink.connections == 1


def test_recipients_are_split_into_transactions(dnsz, mx_port, msg, reactor_thread, monkeypatch):
    from tmmail.connectors import smtp as smtp_connector

    monkeypatch.setattr(smtp_connector, "MAX_RECIPIENTS", 2)
    dnsz.mx("split.test", [(10, "mx.split.test")])
    dnsz.a("mx.split.test", "127.0.0.26")
    rcpts = [f"r{i}@split.test" for i in range(5)]
    with Sink(address="127.0.0.26", port=mx_port) as sink:
        outcomes = deliver(reactor_thread, make(reactor_thread, settings(dnsz, mx_port)), envelope(*rcpts), msg)
    assert outcomes == [None] * 5
    assert [m.rcpt_tos for m in sink.messages] == [rcpts[0:2], rcpts[2:4], rcpts[4:]]
    assert sink.connections == 1


def test_domains_on_the_same_mx_share_a_connection(dnsz, mx_port, msg, reactor_thread):
    # two destination domains whose MX hosts have the same address: one connection serves both
    # (one transaction per domain), and the second is logged under its own MX name
    dnsz.mx("one.shared.test", [(10, "mx.one.shared.test")])
    dnsz.a("mx.one.shared.test", "127.0.0.61")
    dnsz.mx("two.shared.test", [(10, "mx.two.shared.test")])
    dnsz.a("mx.two.shared.test", "127.0.0.61")
    dnsz.mx("other.shared.test", [(10, "mx.other.shared.test")])
    dnsz.a("mx.other.shared.test", "127.0.0.62")
    conn = make(reactor_thread, settings(dnsz, mx_port), idle_seconds=30)
    with Sink(address="127.0.0.61", port=mx_port) as sink, Sink(address="127.0.0.62", port=mx_port) as other:
        assert deliver(reactor_thread, conn, envelope("a@one.shared.test"), msg) == [None]
        assert deliver(reactor_thread, conn, envelope("b@two.shared.test", qid="Q2"), msg) == [None]
        assert deliver(reactor_thread, conn, envelope("c@other.shared.test", qid="Q3"), msg) == [None]
        assert sink.connections == 1
        assert other.connections == 1
        assert [m.rcpt_tos for m in sink.messages] == [["a@one.shared.test"], ["b@two.shared.test"]]
        assert [m.rcpt_tos for m in other.messages] == [["c@other.shared.test"]]
        # a refusal on the shared connection names the second domain's MX host
        sink.script.rcpt["x@two.shared.test"] = "550 5.1.1 no such user"
        [err] = deliver(reactor_thread, conn, envelope("x@two.shared.test", qid="Q4"), msg)
        assert err.remote_mta == "mx.two.shared.test"
        assert sink.connections == 1
        reactor_thread.call(conn.close)

"""The mailertable: domain routes, smarthost, MX (pure logic over real provider tables)."""

from __future__ import annotations

import pytest

from tmmail import config
from tmmail.errors import ConfigError
from tmmail.providers import load_providers
from tmmail.routes import MX, ROUTE, SMARTHOST, Route, parse_hostport, route_for, smarthost_route


def relay(**kw):
    return config.parse({"relay": kw}).relay


@pytest.fixture
def providers(tmp_path):
    (tmp_path / "POSTOFFICE.tab").write_text("ACME\t1\n")
    (tmp_path / "DOMAINS.tab").write_text(
        "example.com\tACME\t1\t\t\n"
        "backup.test\tACME\t1\tmx.inside.test:2525\t\n"
        "secure.test\tACME\t1\t[10.0.0.5]\troute_tls=starttls\n"
    )
    return load_providers(str(tmp_path))


@pytest.mark.parametrize("text,expected", [
    ("mail.example.com", ("mail.example.com", 25)),
    ("Mail.Example.com.:2525", ("mail.example.com", 2525)),
    ("[mail.example.com]:587", ("mail.example.com", 587)),
    ("[2001:db8::1]:25", ("2001:db8::1", 25)),
    ("[192.0.2.1]", ("192.0.2.1", 25)),
])
def test_parse_hostport(text, expected):
    assert parse_hostport(text, 25) == expected


@pytest.mark.parametrize("text", ["", ":25", "host:0", "host:70000", "host:x", "[host]x"])
def test_parse_hostport_refuses(text):
    with pytest.raises(ConfigError):
        parse_hostport(text, 25)


def test_mx_by_default(providers):
    r = route_for("Far.Example.ORG", providers, relay(mx_port=2525))
    assert r == Route(MX, "far.example.org", 2525)
    assert r.tls == "opportunistic" and not r.verify
    assert r.key == "mx:far.example.org"


def test_domain_route_wins(providers):
    r = route_for("backup.test", providers, relay(smarthost="smart.test"))
    assert (r.kind, r.host, r.port, r.tls) == (ROUTE, "mx.inside.test", 2525, "opportunistic")
    r = route_for("secure.test", providers, relay(mx_port=26))
    assert (r.host, r.port, r.tls) == ("10.0.0.5", 26, "starttls")


def test_hosted_domain_without_route_uses_smarthost_or_mx(providers):
    assert route_for("example.com", providers, relay()).kind == MX


def test_smarthost_defaults_by_tls_mode():
    r = smarthost_route(relay(smarthost="smtp.provider.test", smarthost_user="me", smarthost_password="pw"))
    assert (r.kind, r.host, r.port, r.tls, r.verify, r.user, r.password) == (
        SMARTHOST, "smtp.provider.test", 587, "starttls", True, "me", "pw")
    assert smarthost_route(relay(smarthost="s.test", smarthost_tls="implicit")).port == 465
    assert smarthost_route(relay(smarthost="s.test", smarthost_tls="none")).port == 25
    assert smarthost_route(relay(smarthost="s.test:2525", smarthost_verify=False)).port == 2525
    assert smarthost_route(relay()) is None
    with pytest.raises(ConfigError):
        smarthost_route(relay(smarthost="s.test", smarthost_tls="sometimes"))


def test_smarthost_for_every_other_domain(providers):
    r = route_for("anywhere.example", providers, relay(smarthost="smart.test:2525"))
    assert (r.kind, r.host, r.port) == (SMARTHOST, "smart.test", 2525)
    assert r.key == "smarthost:smart.test:2525"
    assert route_for("other.example", None, relay(smarthost="smart.test")).key == r.key.replace("2525", "587")

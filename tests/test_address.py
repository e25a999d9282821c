"""tmmail.address: RFC 5321 mailbox/path syntax, internal addresses and masks."""

from __future__ import annotations

import pytest

from tmmail.address import (
    Address,
    AddressError,
    InternalAddress,
    SourceRouteError,
    is_mask,
    mask_matches,
    normalize_domain,
    parse_address,
    parse_mailbox,
    parse_path,
    quote_local,
)


@pytest.mark.parametrize(
    "text, local, domain",
    [
        ("john@example.com", "john", "example.com"),
        ("John.Doe@EXAMPLE.Com", "John.Doe", "example.com"),  # local part case kept
        ("a+tag@sub.example.org", "a+tag", "sub.example.org"),
        ("o'brien@example.com", "o'brien", "example.com"),
        ("!#$%&'*+/=?^_`{|}~-@example.com", "!#$%&'*+/=?^_`{|}~-", "example.com"),
        ('"john doe"@example.com', "john doe", "example.com"),
        ('"a\\"b"@example.com', 'a"b', "example.com"),
        ('"a@b"@example.com', "a@b", "example.com"),
        ("user@[192.0.2.1]", "user", "[192.0.2.1]"),
        ("user@[IPv6:2001:DB8::1]", "user", "[IPv6:2001:db8::1]"),
        ("user%other@example.com", "user%other", "example.com"),  # kept literally; policy decides
        ("postmaster@localhost", "postmaster", "localhost"),
        ("1@2.3", "1", "2.3"),
    ],
)
def test_valid_mailboxes(text: str, local: str, domain: str) -> None:
    a = parse_mailbox(text)
    assert a == Address(local, domain)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "john",
        "@example.com",
        "john@",
        "john..doe@example.com",
        ".john@example.com",
        "john.@example.com",
        "jo hn@example.com",
        "john@exa mple.com",
        "john@-example.com",
        "john@example-.com",
        "john@example..com",
        "john@example.com.",
        "john@[300.1.1.1]",
        "john@[IPv6:zz::1]",
        "john@[IPv6:fe80::1%eth0]",  # a zone index is no IPv6-addr (RFC 5321 §4.1.3)
        "john@[IPv6:fe80::1%25]",
        "john@[\u0661.2.3.4]",  # Arabic-Indic digit: only ASCII digits make a Snum
        '"unterminated@example.com',
        "a\r\nRCPT TO:<x@y>@example.com",
        "a@b@example.com",
        "x" * 65 + "@example.com",  # local part > 64 octets (RFC 5321 §4.5.3.1.1)
        "x@" + ".".join(["a" * 63] * 4) + ".com",  # domain > 255 octets
        "x@" + "a" * 64 + ".com",  # label > 63 octets
    ],
)
def test_malformed_mailboxes(text: str) -> None:
    assert parse_mailbox(text) is None
    with pytest.raises(AddressError):
        parse_address(text)


def test_utf8_local_and_domain_are_accepted_and_domain_becomes_a_label() -> None:
    a = parse_address("jürgen@Bücher.Example")
    assert a.local == "jürgen"
    assert a.domain == "xn--bcher-kva.example"
    assert not a.is_ascii
    assert parse_address("x@xn--bcher-kva.example").domain == "xn--bcher-kva.example"
    assert normalize_domain("BÜCHER.example") == "xn--bcher-kva.example"


def test_canonical_string_quotes_only_when_needed() -> None:
    assert str(parse_address('"abc"@Example.com')) == "abc@example.com"
    assert str(parse_address('"a b"@example.com')) == '"a b"@example.com'
    assert str(parse_address('"a\\\\b"@example.com')) == '"a\\\\b"@example.com'
    assert quote_local('a"b') == '"a\\"b"'
    assert parse_address("Joe@Example.com").key == "joe@example.com"


def test_parse_path() -> None:
    assert parse_path("<>") == ""
    assert parse_path("<Joe@EXAMPLE.com>") == "Joe@example.com"
    assert parse_path("<Postmaster>", allow_postmaster=True) == "postmaster"
    with pytest.raises(AddressError):
        parse_path("<Postmaster>")
    for bad in ("joe@example.com", "<joe@example.com", "<<joe@example.com>>", "<joe>", "< joe@example.com>"):
        with pytest.raises(AddressError):
            parse_path(bad)


@pytest.mark.parametrize("route", ["<@a.example,@b.example:user@c.example>", "<@relay.example:user@c.example>"])
def test_source_routes_are_refused_with_a_distinct_error(route: str) -> None:
    with pytest.raises(SourceRouteError):
        parse_path(route)
    assert parse_mailbox(route[1:-1]) is None


def test_internal_addresses() -> None:
    sf = InternalAddress.parse("[sf:ACME/ADMIN]")
    assert sf == InternalAddress("SF", "ACME/ADMIN")
    assert str(sf) == "[SF:ACME/ADMIN]"
    assert (sf.postoffice, sf.name) == ("ACME", "ADMIN")
    assert str(InternalAddress.parse("[LS:ACME/news]")) == "[LS:ACME/news]"
    smtp = InternalAddress.parse("[SMTP:Joe@Example.COM]")
    assert smtp.value == "Joe@example.com" and not smtp.is_mask
    mask = InternalAddress.parse("[SMTP:*@Example.com]")
    assert mask.is_mask and str(mask) == "[SMTP:*@Example.com]"
    assert str(InternalAddress.smtp("a@B.com")) == "[SMTP:a@b.com]"
    for bad in ("SF:ACME/ADMIN", "[SF:ACME]", "[SF:/x]", "[SMTP:not an address]", "[SMTP:foo*]", "[:x]", "[SF:A/B/C]"):
        with pytest.raises(AddressError):
            InternalAddress.parse(bad)


@pytest.mark.parametrize(
    "mask, address, expected",
    [
        ("*@example.com", "joe@example.com", True),
        ("*@example.com", "Joe@EXAMPLE.COM", True),
        ("*@example.com", "joe@example.org", False),
        ("*@example.com", "joe@sub.example.com", False),
        ("*@*.example.com", "joe@sub.example.com", True),
        ("j*@example.com", "jane@example.com", True),
        ("j*@example.com", "bob@example.com", False),
        ("j?e@example.com", "joe@example.com", True),
        ("j?e@example.com", "jooe@example.com", False),
        ("*", "anyone@anywhere.example", True),
        ("[SMTP:*@example.com]", "[SMTP:joe@example.com]", True),
        ("*@bücher.example", "x@xn--bcher-kva.example", True),
        ("a.b@example.com", "aXb@example.com", False),  # dots are literal, not regex
        ("[a]@example.com", "a@example.com", False),  # brackets are literal, not classes
    ],
)
def test_mask_matches(mask: str, address: str, expected: bool) -> None:
    assert mask_matches(mask, address) is expected


def test_is_mask() -> None:
    assert is_mask("*@example.com") and is_mask("j?e@x.com") and not is_mask("joe@example.com")

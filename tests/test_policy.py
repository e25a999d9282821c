"""tmmail.policy: relay, access, blacklist, anti-spoofing and sender identity, on real tables."""

from __future__ import annotations

import pytest

from tests.smtpharness import write_tables
from tmmail import policy
from tmmail.providers import ProviderStore
from tmmail.router import resolve
from tmmail.smtppath import PathError, parse_path


@pytest.fixture
def snap(tmp_path):
    write_tables(str(tmp_path))
    return ProviderStore(str(tmp_path)).current()


def snap_with(tmp_path, **tables):
    write_tables(str(tmp_path), {k.replace("_", "-") + ".tab": v for k, v in tables.items()})
    return ProviderStore(str(tmp_path)).current()


def rcpt(snap, text, relay_ok=False, utf8=False, sender_domain="remote.test"):
    path = parse_path(text, utf8=utf8, allow_null=False)
    return policy.check_recipient(snap, path, sender_domain=sender_domain, relay_ok=relay_ok, resolve=resolve)


def auth(snap, login):
    return snap.auth_entry(login)


# -- connections and IP masks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "mask,ip,expected",
    [
        ("192.168.*.*", "192.168.4.7", True),
        ("192.168.*.*", "192.169.4.7", False),
        ("10.0.0.0/8", "10.200.1.1", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("203.0.113.5", "203.0.113.5", True),
        ("203.0.113.5", "203.0.113.6", False),
        ("2001:db8::/32", "2001:db8:1::25", True),
        ("2001:db8::/32", "2001:db9::25", False),
        ("10.0.0.0/8", "::ffff:10.1.2.3", True),  # IPv4-mapped IPv6 client
        ("10.0.0.0/8", "2001:db8::1", False),
    ],
)
def test_access_masks_decide_relay_by_ip(tmp_path, mask, ip, expected):
    snap = snap_with(tmp_path, SMTP_ACCESS=f"{mask}\t1\n")
    assert policy.ip_relay_allowed(snap, ip) is expected


def test_disabled_access_entry_does_not_allow_relay(tmp_path):
    snap = snap_with(tmp_path, SMTP_ACCESS="192.168.*.*\t0\n")
    assert not policy.ip_relay_allowed(snap, "192.168.1.1")


def test_deny_refuses_connection_and_wins_over_access(tmp_path):
    snap = snap_with(tmp_path, SMTP_ACCESS="192.168.*.*\t1\n", SMTP_DENY="192.168.66.0/24\t1\n")
    v = policy.check_connection(snap, "192.168.66.9")
    assert not v.ok and v.reply.startswith("554 5.7.1")
    assert not policy.ip_relay_allowed(snap, "192.168.66.9")
    assert policy.check_connection(snap, "192.168.1.9").ok
    assert policy.ip_relay_allowed(snap, "192.168.1.9")


def test_deny_with_ipv6_and_wildcard(tmp_path):
    snap = snap_with(tmp_path, SMTP_DENY="2001:db8:bad::/48\t1\n198.51.*.*\t1\n")
    assert not policy.check_connection(snap, "2001:db8:bad::1").ok
    assert not policy.check_connection(snap, "198.51.100.1").ok
    assert policy.check_connection(snap, "2001:db8:600d::1").ok
    assert policy.check_connection(snap, "127.0.0.1").ok


# -- recipients ---------------------------------------------------------------------------


def test_local_recipients_accepted(snap):
    assert rcpt(snap, "alice@example.com").ok
    assert rcpt(snap, "info@example.com").ok  # alias
    assert rcpt(snap, "sales@example.com").ok  # alias chain
    assert rcpt(snap, "anyone@other.test").ok  # catch-all mask


def test_case_of_hosted_domain_and_local_part_does_not_matter(snap):
    assert rcpt(snap, "Alice@EXAMPLE.COM").ok
    assert rcpt(snap, "ALICE@Example.Com").ok


def test_unknown_local_user_is_550_511(snap):
    v = rcpt(snap, "nobody@example.com")
    assert v.reply == "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown"
    # also for a relay-allowed client: a hosted domain never relays
    assert rcpt(snap, "nobody@example.com", relay_ok=True).reply.startswith("550 5.1.1")


def test_alias_that_only_loops_is_550_546(tmp_path):
    snap = snap_with(tmp_path, ADDRESS_MAP="[SMTP:a@example.com]\t[SMTP:b@example.com]\n"
                                           "[SMTP:b@example.com]\t[SMTP:a@example.com]\n")
    v = rcpt(snap, "a@example.com")
    assert v.reply == "550 5.4.6 <a@example.com>: Recipient address rejected: routing loop in the address map"


def test_remote_recipient_needs_relay_permission(snap):
    v = rcpt(snap, "someone@remote.test")
    assert v.reply == "554 5.7.1 <someone@remote.test>: Relay access denied"
    assert rcpt(snap, "someone@remote.test", relay_ok=True).ok


RELAY_TRICKS = [
    "user%remote.test@example.com",
    "alice%remote.test@example.com",
    "@example.com:user@remote.test",
    "@example.com,@mx.example.com:user@remote.test",
    '"user@remote.test"@example.com',
    '"user%remote.test"@example.com',
    "remote.test!user@example.com",
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
]


@pytest.mark.parametrize("trick", RELAY_TRICKS)
def test_relay_tricks_never_relay(snap, trick):
    v = rcpt(snap, trick)
    assert v.reply.startswith("554 5.7.1") and "Relay access denied" in v.reply
    # an authenticated client gets a clear refusal, not a relay either
    v = rcpt(snap, trick, relay_ok=True)
    assert v.reply.startswith("553 5.1.3")


@pytest.mark.parametrize(
    "bad",
    [
        "user@remote.test@example.com",
        "alice@example.com.",
        "alice@example.com..",
        "alice@.example.com",
        "alice@",
        "@example.com",
        "alice",
        "al ice@example.com",
        "alice@exa mple.com",
        "alice@-example.com",
        "a" * 65 + "@example.com",
    ],
)
def test_malformed_recipients_are_syntax_errors(bad):
    with pytest.raises(PathError):
        parse_path(bad, utf8=True, allow_null=False)


def test_unicode_lookalike_of_hosted_domain_never_relays(snap):
    cyrillic_a = "alice@ex\u0430mple.com"  # Cyrillic a: a different (remote) domain
    v = rcpt(snap, cyrillic_a, utf8=True)
    assert v.reply.startswith("554 5.7.1")
    assert "xn--" in v.reply  # what was checked is the A-label the router would use
    # full-width letters map to ASCII under IDNA: refused outright, never "local" or "remote"
    with pytest.raises(PathError):
        parse_path("alice@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com", utf8=True, allow_null=False)
    # non-ASCII without SMTPUTF8 is a 553 5.6.7 case
    with pytest.raises(PathError) as e:
        parse_path(cyrillic_a, utf8=False, allow_null=False)
    assert e.value.utf8


def test_idn_hosted_domain_in_u_label_form_is_local(tmp_path):
    snap = snap_with(tmp_path, DOMAINS="xn--bcher-kva.example\tACME\t1\n")
    assert rcpt(snap, "alice@b\u00fccher.example", utf8=True).ok
    assert rcpt(snap, "alice@xn--bcher-kva.example").ok


def test_disabled_hosted_domain_is_refused_not_relayed(tmp_path):
    snap = snap_with(tmp_path, DOMAINS="example.com\tACME\t0\n")
    assert rcpt(snap, "alice@example.com").reply.startswith("550 5.1.1")
    assert rcpt(snap, "alice@example.com", relay_ok=True).reply.startswith("550 5.1.1")


# -- blacklist ----------------------------------------------------------------------------


def test_globally_banned_sender_refused_at_mail(snap):
    path = parse_path("bad@spam.example", utf8=False, allow_null=True)
    d = policy.check_sender(snap, path, role="smtp", client_ip="127.0.0.1", auth=None, anti_spoofing=True,
                            resolve=resolve)
    assert d.verdict.reply.startswith("554 5.7.1") and "blacklisted" in d.verdict.reply


def test_sender_banned_for_one_target_domain(snap):
    v = rcpt(snap, "alice@example.com", sender_domain="banned-for-acme.example")
    assert v.reply.startswith("554 5.7.1") and "example.com" in v.reply
    assert rcpt(snap, "anyone@other.test", sender_domain="banned-for-acme.example").ok
    assert rcpt(snap, "alice@example.com", sender_domain="fine.example").ok


def test_blacklist_masks_and_status(tmp_path):
    snap = snap_with(tmp_path, SMTP_BLACKLIST="*\t*.spam.example\t1\n*\toff.example\t0\n")
    assert policy.sender_banned(snap, "mx.spam.example", None)
    assert not policy.sender_banned(snap, "off.example", None)
    assert not policy.sender_banned(snap, "", None)


# -- sender identity ----------------------------------------------------------------------


def sender(snap, address, login=None, role="submission", ip="127.0.0.1", anti_spoofing=True):
    path = parse_path(address, utf8=False, allow_null=True)
    return policy.check_sender(snap, path, role=role, client_ip=ip, auth=auth(snap, login) if login else None,
                               anti_spoofing=anti_spoofing, resolve=resolve)


@pytest.mark.parametrize(
    "address,stored",
    [("alice@example.com", "alice@example.com"), ("ALICE@Example.com", "ALICE@example.com"),
     ("info@example.com", "info@example.com"), ("sales@example.com", "sales@example.com"),
     ("alice.smith@example.com", "alice.smith@example.com"), ("", "")],
)
def test_authenticated_sender_may_use_own_aliases_and_senders(snap, address, stored):
    d = sender(snap, address, "alice@example.com")
    assert d.verdict.ok and not d.rewritten
    assert d.sender == stored  # domain lower-cased, local part as given


@pytest.mark.parametrize("address", ["bob@example.com", "ceo@remote.test", "carol@other.test"])
def test_authenticated_sender_refused_for_foreign_address(snap, address):
    d = sender(snap, address, "alice@example.com")
    assert d.verdict.reply.startswith("553 5.7.1")
    # the reply names the addresses that are allowed
    for allowed in ("alice@example.com", "alice.smith@example.com", "info@example.com", "sales@example.com"):
        assert allowed in d.verdict.reply


def test_catch_all_mask_does_not_grant_addresses(snap):
    # *@other.test goes to CAROL, but that does not let CAROL send as anyone@other.test
    assert not policy.may_send_as(snap, auth(snap, "carol@other.test"), "ceo@other.test", resolve)
    assert policy.may_send_as(snap, auth(snap, "carol@other.test"), "carol@other.test", resolve)


def test_rewrite_policy_uses_primary_address(snap):
    d = sender(snap, "bob@example.com", "carol@other.test")
    assert d.verdict.ok and d.rewritten and d.sender == "carol@other.test"
    assert d.from_policy.mode == "rewrite" and d.from_policy.rewrite_to == "carol@other.test"


def test_primary_sender_from_senders_table(snap):
    assert policy.primary_sender(snap, auth(snap, "alice@example.com")) == "alice.smith@example.com"
    assert policy.primary_sender(snap, auth(snap, "bob@example.com")) == "bob@example.com"


def test_from_policy_checks_header_addresses(snap):
    d = sender(snap, "alice@example.com", "alice@example.com")
    assert d.from_policy.allowed("info@example.com")
    assert not d.from_policy.allowed("bob@example.com")


def test_anti_spoofing_for_unauthenticated_hosted_sender(snap):
    d = sender(snap, "alice@example.com", role="smtp")
    assert d.verdict.reply.startswith("550 5.7.1")
    assert sender(snap, "alice@example.com", role="smtp", ip="10.9.3.4").verdict.ok  # SMTP-ACCESS
    assert sender(snap, "x@example.org", role="smtp").verdict.ok  # domain opted out
    assert sender(snap, "alice@example.com", role="smtp", anti_spoofing=False).verdict.ok
    assert sender(snap, "someone@remote.test", role="smtp").verdict.ok
    assert sender(snap, "", role="smtp").verdict.ok  # bounces


def test_unknown_sender_policy_value_means_refuse(tmp_path):
    snap = snap_with(tmp_path, POSTOFFICE="ACME\t1\tsender_policy=whatever\nOTHER\t1\n")
    assert policy.sender_policy_of(snap, snap.auth_entry("alice@example.com")) == "refuse"


# -- postmaster (RFC 5321 §4.5.1) --------------------------------------------------------------


def test_postmaster_goes_to_the_primary_domain_not_an_unhosted_host_name(tmp_path):
    snap = snap_with(tmp_path, DOMAINS="example.com\tACME\t1\nother.test\tACME\t1\n",
                     ADDRESS_MAP="[SMTP:postmaster@example.com]\t[SF:ACME/ALICE]\n")
    # mail.example.com is the host name but not hosted: postmaster@ it would be relayed
    assert policy.postmaster_address(snap, "mail.example.com") == "postmaster@example.com"
    assert policy.postmaster_address(snap, "mail.example.com", "hostmaster") == "hostmaster@example.com"
    # a full address is the admin's choice, used as written
    assert policy.postmaster_address(snap, "mail.example.com", "admin@remote.test") == "admin@remote.test"
    # a hosted host name is the primary domain
    assert policy.primary_domain(snap, "OTHER.test") == "other.test"
    path = policy.bare_postmaster_path(snap, "mail.example.com")
    assert (path.address, path.local, path.domain) == ("postmaster@example.com", "postmaster", "example.com")
    verdict = policy.check_recipient(snap, path, sender_domain="remote.test", relay_ok=False, resolve=resolve)
    assert verdict.ok


def test_postmaster_skips_disabled_domains_and_falls_back_to_the_host_name(tmp_path):
    snap = snap_with(tmp_path, DOMAINS="old.test\tACME\t0\nexample.com\tACME\t1\n")
    assert policy.primary_domain(snap, "mx.test") == "example.com"
    empty = snap_with(tmp_path / "none", DOMAINS="")
    assert policy.primary_domain(empty, "mx.test") is None
    assert policy.postmaster_address(empty, "MX.test") == "postmaster@mx.test"

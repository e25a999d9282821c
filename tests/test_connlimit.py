"""Per-client connection counting shared by the listeners of a service (tmmail.connlimit)."""

from tmmail import config
from tmmail.connlimit import ConnectionCounts, shared_counts


def test_per_ip_limit_counts_ipv4_and_ipv6_64():
    c = ConnectionCounts()
    assert c.admit("192.0.2.1", 2) is None
    assert c.admit("192.0.2.1", 2) is None
    assert c.admit("192.0.2.1", 2) == "per_ip"
    assert c.admit("::ffff:192.0.2.1", 2) == "per_ip"  # the same client, IPv4-mapped
    assert c.admit("2001:db8:0:1::1", 1) is None
    assert c.admit("2001:db8:0:1:ffff::2", 1) == "per_ip"  # same /64
    assert c.total == 3 and c.per_ip == {"192.0.2.1": 2, "2001:db8:0:1::/64": 1}


def test_total_limit_and_zero_means_none():
    c = ConnectionCounts()
    for i in range(5):
        assert c.admit(f"192.0.2.{i}", 0, 5) is None
    assert c.admit("192.0.2.99", 0, 5) == "total"
    c.release("192.0.2.3")
    assert c.admit("192.0.2.99", 0, 5) is None
    assert c.total == 5


def test_release_frees_the_slot_and_forgets_the_client():
    c = ConnectionCounts()
    c.admit("198.51.100.7", 1)
    c.release("198.51.100.7")
    assert c.per_ip == {} and c.total == 0
    c.release("198.51.100.7")  # an extra release never goes negative
    assert c.per_ip == {} and c.total == 0
    assert c.admit("198.51.100.7", 1) is None


def test_listeners_of_one_server_share_and_other_servers_do_not():
    a = config.parse({}, "/nonexistent/tmmail.toml")
    b = config.parse({}, "/nonexistent/tmmail.toml")
    assert shared_counts(a, "pop3") is shared_counts(a, "pop3")
    assert shared_counts(a, "pop3") is not shared_counts(a, "imap")
    assert shared_counts(a, "imap") is not shared_counts(b, "imap")

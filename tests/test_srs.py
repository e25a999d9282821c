"""SRS forward/reverse: round trips, SRS1 re-forwarding, forged and expired addresses, the secret file."""

from __future__ import annotations

import os
import stat

import pytest

from tmmail.address import parse_address
from tmmail.srs import SRS, SRSError, is_srs, load_secret

DAY = 86400.0


def make(now: float = 1_800_000_000.0, secret: bytes = b"k" * 32) -> SRS:
    return SRS(secret, clock=lambda: now)


def test_srs0_round_trip_and_syntax() -> None:
    srs = make()
    fwd = srs.forward("Alice.Smith@origin.example", "fwd.example")
    assert fwd.startswith("SRS0=") and fwd.endswith("@fwd.example")
    assert str(parse_address(fwd)) == fwd  # a valid RFC 5321 address
    assert srs.reverse(fwd) == "Alice.Smith@origin.example"
    # local parts may come back case-folded
    assert srs.reverse(fwd.lower()).lower() == "alice.smith@origin.example"
    assert srs.reverse(fwd.upper()).lower() == "alice.smith@origin.example"


def test_null_sender_and_own_domain_not_rewritten() -> None:
    srs = make()
    assert srs.forward("", "fwd.example") == ""
    assert srs.forward("me@fwd.example", "fwd.example") == "me@fwd.example"


def test_forged_hash_refused() -> None:
    srs = make()
    fwd = srs.forward("alice@origin.example", "fwd.example")
    forged = fwd.replace("=alice@", "=mallory@")
    with pytest.raises(SRSError):
        srs.reverse(forged)
    other = make(secret=b"other-secret")
    with pytest.raises(SRSError):
        other.reverse(fwd)
    with pytest.raises(SRSError):
        srs.reverse("SRS0=abc@fwd.example")


def test_expired_refused_fresh_accepted() -> None:
    fwd = make(now=1_800_000_000.0).forward("alice@origin.example", "fwd.example")
    assert make(now=1_800_000_000.0 + 20 * DAY).reverse(fwd) == "alice@origin.example"
    with pytest.raises(SRSError, match="expired"):
        make(now=1_800_000_000.0 + 30 * DAY).reverse(fwd)


def test_srs1_when_forwarding_someone_elses_srs0() -> None:
    first = SRS(b"first-hop-secret", clock=lambda: 1_800_000_000.0)
    second = make()
    hop1 = first.forward("alice@origin.example", "hop1.example")
    hop2 = second.forward(hop1, "hop2.example")
    assert hop2.startswith("SRS1=") and hop2.endswith("@hop2.example")
    # we return the bounce to the first forwarder, which checks its own part
    back = second.reverse(hop2)
    assert back == hop1
    assert first.reverse(back) == "alice@origin.example"
    # a third forwarder re-signs but keeps the first hop
    third = SRS(b"third", clock=lambda: 1_800_000_000.0)
    hop3 = third.forward(hop2, "hop3.example")
    assert hop3.startswith("SRS1=") and "=hop1.example==" in hop3
    assert third.reverse(hop3) == hop1
    with pytest.raises(SRSError):
        second.reverse(hop3)


def test_is_srs() -> None:
    assert is_srs("SRS0=x=y=z=w") and is_srs("srs1=a") and not is_srs("srsly") and not is_srs("alice")


def test_secret_created_once_0600(tmp_path) -> None:
    a = load_secret(str(tmp_path))
    assert len(a) == 64
    mode = stat.S_IMODE(os.stat(tmp_path / "srs.secret").st_mode)
    assert mode == 0o600
    assert load_secret(str(tmp_path)) == a
    assert [n for n in os.listdir(tmp_path)] == ["srs.secret"]

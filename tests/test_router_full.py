"""The full address map: resolution order, sub-addressing, mask substitution, groups, lists,
SRS bounce addresses, loop and depth limits (tmmail.router with real tables in tmp_path)."""

from __future__ import annotations

import pytest

from tmmail import config
from tmmail.address import InternalAddress
from tmmail.errors import ConfigError
from tmmail.providers import load_providers
from tmmail.router import (
    LOCAL,
    REMOTE,
    UNKNOWN_LOCAL,
    RouterOptions,
    count_received,
    options_from_settings,
    resolve,
    split_subaddress,
)
from tmmail.srs import SRS

SF = lambda v: InternalAddress("SF", v)  # noqa: E731
SMTP = lambda v: InternalAddress("SMTP", v)  # noqa: E731
LS = lambda v: InternalAddress("LS", v)  # noqa: E731


def tables(tmp_path, **tabs: list[str]):
    for name, rows in tabs.items():
        (tmp_path / f"{name.replace('_', '-')}.tab").write_text("".join(r + "\n" for r in rows))
    return load_providers(str(tmp_path))


BASE = dict(
    DOMAINS=["example.com\tACME\t1", "example.org\tACME\t1", "other.test\tOTHER\t1"],
    POSTOFFICE=["ACME\t1", "OTHER\t1"],
    MAILBOX=["ACME\tADMIN\t1\t0", "ACME\tbob\t1\t0", "ACME\tcarol\t1\t0", "OTHER\tdan\t1\t0",
             "ACME\tfwd\t1\t0\t1\tfar@remote.example", "ACME\toff\t0\t0"],
)


def snap_with(tmp_path, **extra):
    return tables(tmp_path, **{**BASE, "ADDRESS_MAP": [], **extra})


# -- resolution order ----------------------------------------------------------------------


def test_order_exact_then_mailbox_then_subaddress_then_mask(tmp_path) -> None:
    snap = snap_with(tmp_path, ADDRESS_MAP=[
        "[SMTP:*@example.com]\t[SF:ACME/ADMIN]",
        "[SMTP:bob@example.com]\t[SF:ACME/carol]",
        "[SMTP:sales@example.com]\t[SMTP:carol@example.com]",
    ])
    # 1. exact row beats the mailbox of the same name
    assert resolve(snap, "bob@example.com").targets == (SF("ACME/carol"),)
    # 2. hosted mailbox (no row)
    assert resolve(snap, "Carol@Example.com").targets == (SF("ACME/carol"),)
    # 3. sub-address: the base address's exact row / mailbox, before the catch-all
    assert resolve(snap, "carol+news@example.com").targets == (SF("ACME/carol"),)
    assert resolve(snap, "sales+q3@example.com").targets == (SF("ACME/carol"),)
    # 4. catch-all mask for everything else
    assert resolve(snap, "nobody@example.com").targets == (SF("ACME/ADMIN"),)
    assert resolve(snap, "nobody+x@example.com").targets == (SF("ACME/ADMIN"),)


def test_subaddress_separator_configurable_and_off(tmp_path) -> None:
    snap = snap_with(tmp_path)
    dash = RouterOptions(subaddress_separator="-")
    assert resolve(snap, "carol-lists@example.com", dash).targets == (SF("ACME/carol"),)
    assert resolve(snap, "carol+lists@example.com", dash).kind == UNKNOWN_LOCAL
    off = RouterOptions(subaddress_separator="")
    assert resolve(snap, "carol+lists@example.com", off).kind == UNKNOWN_LOCAL
    assert split_subaddress("carol+a+b", "+") == ("carol", "a+b")
    assert split_subaddress("+tag", "+") == ("+tag", "")


def test_masks_file_order_and_local_part_reuse(tmp_path) -> None:
    snap = snap_with(tmp_path, ADDRESS_MAP=[
        "[SMTP:j*@example.org]\t[SF:ACME/bob]",
        "[SMTP:*@example.org]\t[SMTP:*@other.test]",
        "[SMTP:*@relay.test]\t[SMTP:*]",
    ])
    assert resolve(snap, "jim@example.org").targets == (SF("ACME/bob"),)  # first match wins
    # the same local part at another domain, resolved again there
    assert resolve(snap, "dan@example.org").targets == (SF("OTHER/dan"),)
    assert resolve(snap, "eve@example.org").kind == UNKNOWN_LOCAL
    # [SMTP:*]: the whole domain relayed onward unchanged (backup MX), accepted as local
    r = resolve(snap, "anyone@relay.test")
    assert (r.kind, r.targets) == (LOCAL, (SMTP("anyone@relay.test"),))
    assert resolve(snap, "anyone@unrelated.test").kind == REMOTE


# -- groups ----------------------------------------------------------------------------------


GROUPS = dict(
    GROUP_MAP=[
        "[SF:ACME/STAFF]\tstaff@example.com\t1\tEveryone",
        "[SF:ACME/OPS]\tops@example.com\t1",
        "[SF:ACME/ALL]\tall@example.com\t1",
        "[SF:ACME/QUIET]\tquiet@example.com\t0",
    ],
    GROUP_MEMBERS=[
        "[SF:ACME/STAFF]\t[SMTP:bob@example.com]",
        "[SF:ACME/STAFF]\t[SF:ACME/carol]",
        "[SF:ACME/STAFF]\tfriend@remote.example",
        "[SF:ACME/OPS]\t[SMTP:Bob@example.com]",
        "[SF:ACME/OPS]\t[SMTP:dan@other.test]",
        "[SF:ACME/OPS]\t[SMTP:all@example.com]",
        "[SF:ACME/ALL]\t[SF:ACME/STAFF]",
        "[SF:ACME/ALL]\t[SMTP:ops@example.com]",
        "[SF:ACME/QUIET]\t[SMTP:bob@example.com]",
    ],
)


def test_group_expands_members_once_nested_and_looping(tmp_path) -> None:
    snap = snap_with(tmp_path, **GROUPS)
    r = resolve(snap, "staff@example.com")
    assert r.kind == LOCAL
    assert r.targets == (SF("ACME/bob"), SF("ACME/carol"), SMTP("friend@remote.example"))
    # ALL = STAFF + OPS, and OPS names ALL again: every recipient exactly once, no endless loop
    r = resolve(snap, "all@example.com")
    assert sorted(map(str, r.targets)) == sorted(
        ["[SF:ACME/bob]", "[SF:ACME/carol]", "[SMTP:friend@remote.example]", "[SF:OTHER/dan]"]
    )
    assert len(r.targets) == len(set(r.targets))
    # a disabled group resolves nowhere
    assert resolve(snap, "quiet@example.com").kind == UNKNOWN_LOCAL


def test_alias_to_group_internal_address(tmp_path) -> None:
    snap = snap_with(tmp_path, **GROUPS, ADDRESS_MAP=["[SMTP:team@example.org]\t[SF:ACME/OPS]"])
    assert set(resolve(snap, "team@example.org").targets) == {SF("ACME/bob"), SF("OTHER/dan"), SF("ACME/carol"),
                                                               SMTP("friend@remote.example")}


def test_group_of_only_itself_is_a_loop(tmp_path) -> None:
    snap = snap_with(tmp_path, GROUP_MAP=["[SF:ACME/SELF]\tself@example.com"],
                     GROUP_MEMBERS=["[SF:ACME/SELF]\t[SMTP:self@example.com]"])
    r = resolve(snap, "self@example.com")
    assert r.kind == UNKNOWN_LOCAL and "mail loop" in r.reason


# -- lists -----------------------------------------------------------------------------------


def test_list_addresses(tmp_path) -> None:
    snap = snap_with(tmp_path, LISTS=["[LS:ACME/NEWS]\tnews@example.com\t1\topen",
                                      "[LS:ACME/OLD]\told@example.com\t0"])
    assert resolve(snap, "news@example.com").targets == (LS("ACME/NEWS"),)
    assert resolve(snap, "News-Request@example.com").targets == (LS("ACME/NEWS+request"),)
    assert resolve(snap, "news-bounces@example.com").targets == (LS("ACME/NEWS+bounces"),)
    assert resolve(snap, "news-owner@example.com").targets == (LS("ACME/NEWS+owner"),)
    assert resolve(snap, "old@example.com").kind == UNKNOWN_LOCAL


# -- loops and limits ------------------------------------------------------------------------


def test_alias_loop_reason_names_the_chain(tmp_path) -> None:
    snap = snap_with(tmp_path, ADDRESS_MAP=["[SMTP:a@example.com]\t[SMTP:b@example.com]",
                                            "[SMTP:b@example.com]\t[SMTP:a@example.com]"])
    r = resolve(snap, "a@example.com")
    assert r.kind == UNKNOWN_LOCAL
    assert r.reason == "mail loop: a@example.com -> b@example.com -> a@example.com"


def test_depth_limit_configurable(tmp_path) -> None:
    rows = [f"[SMTP:h{i}@example.com]\t[SMTP:h{i + 1}@example.com]" for i in range(5)]
    rows.append("[SMTP:h5@example.com]\t[SF:ACME/bob]")
    snap = snap_with(tmp_path, ADDRESS_MAP=rows)
    assert resolve(snap, "h0@example.com").targets == (SF("ACME/bob"),)
    r = resolve(snap, "h0@example.com", RouterOptions(max_depth=3))
    assert r.kind == UNKNOWN_LOCAL and "longer than 3" in r.reason


def test_count_received() -> None:
    head = b"Received: a\nX: y\nreceived: b\n c\nReceived-SPF: pass\n"
    assert count_received(head) == 2


# -- SRS -------------------------------------------------------------------------------------


def test_srs_bounce_address_resolves_to_original_sender(tmp_path) -> None:
    snap = snap_with(tmp_path, ADDRESS_MAP=["[SMTP:*@example.com]\t[SF:ACME/ADMIN]"])
    srs = SRS(b"secret")
    opts = RouterOptions(srs=srs)
    fwd = srs.forward("alice@remote.example", "example.com")
    r = resolve(snap, fwd, opts)
    assert (r.kind, r.targets) == (LOCAL, (SMTP("alice@remote.example"),))
    # a forged one is unknown even with a catch-all (the catch-all must not swallow it)
    forged = fwd.replace("alice@", "mallory@")
    r = resolve(snap, forged, opts)
    assert r.kind == UNKNOWN_LOCAL and "SRS" in r.reason
    # bounce back to one of our own mailboxes
    back = srs.forward("carol@example.org", "example.com")
    assert resolve(snap, back, opts).targets == (SF("ACME/carol"),)


def test_options_from_settings(tmp_path) -> None:
    s = config.parse({"server": {"state_dir": str(tmp_path)},
                      "router": {"subaddress_separator": "-", "subaddress_folders": True, "max_received": 20}})
    opts = options_from_settings(s)
    assert (opts.subaddress_separator, opts.subaddress_folders, opts.max_received) == ("-", True, 20)
    assert opts.srs is not None and (tmp_path / "srs.secret").exists()
    for bad in ({"subaddress_separator": "ab"}, {"max_depth": 0}, {"nonsense": 1}):
        with pytest.raises(ConfigError):
            options_from_settings(config.parse({"server": {"state_dir": str(tmp_path)}, "router": bad}))

"""Address resolution against real provider tables written to tmp_path."""

from __future__ import annotations

import pytest

from tmmail.address import InternalAddress
from tmmail.providers import load_providers
from tmmail.router import LOCAL, MAX_DEPTH, REMOTE, UNKNOWN_LOCAL, resolve

SF = lambda v: InternalAddress("SF", v)  # noqa: E731
SMTP = lambda v: InternalAddress("SMTP", v)  # noqa: E731


def tables(tmp_path, **tabs: list[str]):
    for name, rows in tabs.items():
        (tmp_path / f"{name.replace('_', '-')}.tab").write_text("".join(r + "\n" for r in rows))
    return load_providers(str(tmp_path))


BASE = dict(
    DOMAINS=["example.com\tACME\t1", "acme.test\tACME\t1", "off.test\tACME\t0"],
    POSTOFFICE=["ACME\t1", "SLEEP\t0"],
    MAILBOX=[
        "ACME\tADMIN\t1\t0",
        "ACME\tBob\t1\t1000",
        "ACME\tGONE\t0\t0",
        "SLEEP\tDOZY\t1\t0",
        "ACME\tFWD\t1\t0\t1\tfar@remote.example",
        "ACME\tCOPY\t1\t0\t2\tfar@remote.example;admin@example.com",
    ],
)


@pytest.fixture
def snap(tmp_path):
    return tables(tmp_path, **BASE, ADDRESS_MAP=[])


def test_hosted_mailbox_case_insensitive(snap) -> None:
    r = resolve(snap, "ADMIN@Example.COM")
    assert (r.kind, r.targets) == (LOCAL, (SF("ACME/ADMIN"),))
    assert resolve(snap, "bob@acme.test").targets == (SF("ACME/Bob"),)


def test_unknown_user_in_hosted_domain(snap) -> None:
    r = resolve(snap, "nobody@example.com")
    assert r.kind == UNKNOWN_LOCAL and r.targets == ()


def test_remote_domain(snap) -> None:
    r = resolve(snap, "someone@elsewhere.example")
    assert (r.kind, r.targets) == (REMOTE, (SMTP("someone@elsewhere.example"),))


def test_disabled_mailbox_domain_postoffice_do_not_resolve(tmp_path) -> None:
    snap = tables(tmp_path, **{**BASE, "DOMAINS": BASE["DOMAINS"] + ["sleep.test\tSLEEP\t1"]}, ADDRESS_MAP=[])
    assert resolve(snap, "gone@example.com").kind == UNKNOWN_LOCAL
    assert resolve(snap, "admin@off.test").kind == UNKNOWN_LOCAL  # disabled domain is not relayed
    assert resolve(snap, "dozy@sleep.test").kind == UNKNOWN_LOCAL  # disabled post office


def test_redirects(snap) -> None:
    assert resolve(snap, "fwd@example.com").targets == (SMTP("far@remote.example"),)
    assert resolve(snap, "copy@example.com").targets == (
        SF("ACME/COPY"),
        SMTP("far@remote.example"),
        SF("ACME/ADMIN"),
    )


def test_exact_map_wins_over_mailbox_and_masks(tmp_path) -> None:
    snap = tables(
        tmp_path,
        **BASE,
        ADDRESS_MAP=[
            "[SMTP:*@example.com]\t[SF:ACME/ADMIN]",
            "[SMTP:bob@example.com]\t[SF:ACME/FWD]",
            "[SMTP:Sales@Example.com]\t[SF:ACME/ADMIN];[SF:ACME/Bob]",
        ],
    )
    # exact row beats the mailbox of the same name; FWD's redirect is followed
    assert resolve(snap, "bob@example.com").targets == (SMTP("far@remote.example"),)
    assert resolve(snap, "sales@example.com").targets == (SF("ACME/ADMIN"), SF("ACME/Bob"))
    # the hosted mailbox beats the catch-all
    assert resolve(snap, "copy@example.com").targets[0] == SF("ACME/COPY")
    # the catch-all takes the rest of the domain, not other domains
    r = resolve(snap, "whoever@example.com")
    assert (r.kind, r.targets) == (LOCAL, (SF("ACME/ADMIN"),))
    assert resolve(snap, "whoever@acme.test").kind == UNKNOWN_LOCAL


def test_masks_in_file_order(tmp_path) -> None:
    snap = tables(
        tmp_path,
        **BASE,
        ADDRESS_MAP=["[SMTP:j*@example.com]\t[SF:ACME/Bob]", "[SMTP:*@example.com]\t[SF:ACME/ADMIN]"],
    )
    assert resolve(snap, "jane@example.com").targets == (SF("ACME/Bob"),)
    assert resolve(snap, "kate@example.com").targets == (SF("ACME/ADMIN"),)


def test_address_destinations_chain(tmp_path) -> None:
    snap = tables(
        tmp_path,
        **BASE,
        ADDRESS_MAP=[
            "[SMTP:a@example.com]\t[SMTP:b@example.com]",
            "[SMTP:b@example.com]\t[SMTP:admin@acme.test];[SMTP:out@remote.example]",
        ],
    )
    r = resolve(snap, "a@example.com")
    assert r.kind == LOCAL
    assert r.targets == (SF("ACME/ADMIN"), SMTP("out@remote.example"))


def test_loop_resolves_nowhere(tmp_path) -> None:
    snap = tables(
        tmp_path,
        **BASE,
        ADDRESS_MAP=[
            "[SMTP:a@example.com]\t[SMTP:b@example.com]",
            "[SMTP:b@example.com]\t[SMTP:A@example.com]",
        ],
    )
    r = resolve(snap, "a@example.com")
    assert r.kind == UNKNOWN_LOCAL and r.targets == () and "loop" in r.reason


def test_mailbox_redirect_loop(tmp_path) -> None:
    snap = tables(
        tmp_path,
        DOMAINS=["example.com\tACME\t1"],
        POSTOFFICE=["ACME\t1"],
        MAILBOX=["ACME\tA\t1\t0\t1\t[SF:ACME/B]", "ACME\tB\t1\t0\t1\t[SF:ACME/A]"],
        ADDRESS_MAP=[],
    )
    r = resolve(snap, "a@example.com")
    assert r.kind == UNKNOWN_LOCAL and "loop" in r.reason


def test_depth_limit(tmp_path) -> None:
    rows = [f"[SMTP:a{i}@example.com]\t[SMTP:a{i + 1}@example.com]" for i in range(MAX_DEPTH + 2)]
    rows.append(f"[SMTP:a{MAX_DEPTH + 2}@example.com]\t[SF:ACME/ADMIN]")
    snap = tables(tmp_path, **BASE, ADDRESS_MAP=rows)
    assert resolve(snap, "a0@example.com").kind == UNKNOWN_LOCAL
    assert resolve(snap, "a5@example.com").targets == (SF("ACME/ADMIN"),)


def test_partial_failure_keeps_good_branches(tmp_path) -> None:
    snap = tables(
        tmp_path,
        **BASE,
        ADDRESS_MAP=["[SMTP:team@example.com]\t[SMTP:nobody@example.com];[SF:ACME/GONE];[SMTP:bob@example.com]"],
    )
    r = resolve(snap, "team@example.com")
    assert r.targets == (SF("ACME/Bob"),)
    # the bad branches are not silently dropped: the runner puts them into bad mail
    assert [(f.destination, f.status) for f in r.failures] == [
        ("[SMTP:nobody@example.com]", "5.1.1"), ("[SF:ACME/GONE]", "5.1.1")]
    assert "mailbox disabled" in r.failures[1].reason


def test_loop_and_depth_as_one_branch_are_failures(tmp_path) -> None:
    rows = ["[SMTP:team@example.com]\t[SMTP:a@example.com];[SMTP:bob@example.com]",
            "[SMTP:a@example.com]\t[SMTP:b@example.com]", "[SMTP:b@example.com]\t[SMTP:a@example.com]"]
    rows += [f"[SMTP:d{i}@example.com]\t[SMTP:d{i + 1}@example.com]" for i in range(MAX_DEPTH + 2)]
    rows.append("[SMTP:deep@example.com]\t[SMTP:d0@example.com];[SF:ACME/ADMIN]")
    snap = tables(tmp_path, **BASE, ADDRESS_MAP=rows)
    r = resolve(snap, "team@example.com")
    assert r.targets == (SF("ACME/Bob"),)
    assert len(r.failures) == 1
    f = r.failures[0]
    assert (f.destination, f.status) == ("[SMTP:a@example.com]", "5.4.6")
    assert f.reason == "mail loop: team@example.com -> a@example.com -> b@example.com -> a@example.com"
    r = resolve(snap, "deep@example.com")
    assert r.targets == (SF("ACME/ADMIN"),)
    assert [(f.destination, f.status) for f in r.failures] == [("[SMTP:d0@example.com]", "5.4.6")]
    assert "longer than" in r.failures[0].reason
    # a loop that only loops resolves nowhere, with the loop status (RCPT: 550 5.4.6)
    r = resolve(snap, "a@example.com")
    assert (r.kind, r.status, r.loop) == (UNKNOWN_LOCAL, "5.4.6", True)
    assert resolve(snap, "nobody@example.com").status == "5.1.1"


def test_nested_groups_are_not_failures(tmp_path) -> None:
    snap = tables(tmp_path, **BASE, ADDRESS_MAP=[],
                  GROUP_MAP=["[SF:ACME/STAFF]\tstaff@example.com", "[SF:ACME/OPS]\tops@example.com"],
                  GROUP_MEMBERS=["[SF:ACME/STAFF]\t[SMTP:bob@example.com]", "[SF:ACME/STAFF]\t[SF:ACME/OPS]",
                                 "[SF:ACME/OPS]\t[SMTP:admin@example.com]", "[SF:ACME/OPS]\t[SF:ACME/STAFF]"])
    r = resolve(snap, "staff@example.com")
    assert set(r.targets) == {SF("ACME/Bob"), SF("ACME/ADMIN")} and r.failures == ()


def test_requeued_branch_resolves_alone(tmp_path) -> None:
    from tmmail.router import resolve_destination

    snap = tables(tmp_path, **BASE, ADDRESS_MAP=[])
    assert resolve_destination(snap, "[SMTP:bob@example.com]").targets == (SF("ACME/Bob"),)
    assert resolve_destination(snap, "[SMTP:nobody@example.com]").kind == UNKNOWN_LOCAL


def test_mask_local_part_in_mailbox_destination(tmp_path) -> None:
    snap = tables(tmp_path, **{**BASE, "DOMAINS": BASE["DOMAINS"] + ["alias.test\tOTHER\t1"]},
                  ADDRESS_MAP=["[SMTP:*@alias.test]\t[SF:ACME/*]"])
    assert resolve(snap, "bob@alias.test").targets == (SF("ACME/Bob"),)
    assert resolve(snap, "admin@alias.test").targets == (SF("ACME/ADMIN"),)
    assert resolve(snap, "bob+lists@alias.test").targets == (SF("ACME/Bob"),)  # sub-address
    r = resolve(snap, "nobody@alias.test")
    assert r.kind == UNKNOWN_LOCAL and "no mailbox ACME/nobody" in r.reason
    assert resolve(snap, "gone@alias.test").kind == UNKNOWN_LOCAL  # disabled mailbox


def test_map_to_list_or_group_kept(tmp_path) -> None:
    snap = tables(
        tmp_path,
        **BASE,
        ADDRESS_MAP=["[SMTP:list@example.com]\t[LS:ACME/NEWS]", "[SMTP:grp@example.com]\t[SF:ACME/STAFF]"],
    )
    assert resolve(snap, "list@example.com").targets == (InternalAddress("LS", "ACME/NEWS"),)
    assert resolve(snap, "grp@example.com").targets == (SF("ACME/STAFF"),)


def test_garbage_address(snap) -> None:
    assert resolve(snap, "not an address").kind == UNKNOWN_LOCAL


def test_routed_domain_is_relayed_to_its_route(tmp_path) -> None:
    snap = tables(
        tmp_path,
        **{**BASE, "DOMAINS": BASE["DOMAINS"] + ["backup.example\tACME\t1\tmail.lan:2525", "dead.example\tACME\t0\tx:25"]},
        ADDRESS_MAP=["[SMTP:boss@backup.example]\t[SF:ACME/ADMIN]"],
    )
    # accepted from anyone (local) and handed to the SMTP connector, which uses the route
    r = resolve(snap, "anyone@backup.example")
    assert (r.kind, r.targets) == (LOCAL, (SMTP("anyone@backup.example"),))
    # map entries still come first
    assert resolve(snap, "boss@backup.example").targets == (SF("ACME/ADMIN"),)
    assert resolve(snap, "anyone@dead.example").kind == UNKNOWN_LOCAL


def test_groups(tmp_path) -> None:
    snap = tables(
        tmp_path,
        **BASE,
        ADDRESS_MAP=["[SMTP:all@example.com]\t[SF:ACME/STAFF]"],
        GROUP_MAP=[
            "[SF:ACME/STAFF]\tstaff@example.com\t1\tEveryone",
            "[SF:ACME/OPS]\tops@example.com\t1",
            "[SF:ACME/OLD]\told@example.com\t0",
            "[SF:ACME/LOOP]\tloop@example.com\t1",
        ],
        GROUP_MEMBERS=[
            "[SF:ACME/STAFF]\t[SF:ACME/ADMIN]",
            "[SF:ACME/STAFF]\t[SF:ACME/OPS]",
            "[SF:ACME/STAFF]\tout@remote.example",
            "[SF:ACME/OPS]\t[SMTP:bob@example.com]",
            "[SF:ACME/OPS]\t[SF:ACME/ADMIN]",
            "[SF:ACME/OLD]\t[SF:ACME/ADMIN]",
            "[SF:ACME/LOOP]\t[SF:ACME/LOOP]",
        ],
    )
    expected = (SF("ACME/ADMIN"), SF("ACME/Bob"), SMTP("out@remote.example"))
    r = resolve(snap, "Staff@example.com")
    assert r.kind == LOCAL and r.targets == expected  # nested, each member once
    assert resolve(snap, "all@example.com").targets == expected  # a map row pointing at the group
    assert resolve(snap, "old@example.com").kind == UNKNOWN_LOCAL  # disabled
    r = resolve(snap, "loop@example.com")
    assert r.kind == UNKNOWN_LOCAL and "loop" in r.reason


def test_srs_only_for_our_domains(tmp_path) -> None:
    from tmmail.router import RouterOptions
    from tmmail.srs import SRS

    snap = tables(tmp_path, **BASE, ADDRESS_MAP=[])
    srs = SRS(b"k")
    theirs = SRS(b"other").forward("x@y.example", "forwarder.example")
    r = resolve(snap, theirs, RouterOptions(srs=srs))  # another forwarder's SRS address: plain remote
    assert (r.kind, r.targets) == (REMOTE, (SMTP(theirs),))
    ours = srs.forward("x@y.example", "example.com")
    assert resolve(snap, ours, RouterOptions(srs=srs)).targets == (SMTP("x@y.example"),)


def test_failed_redirect_with_copy_keeps_the_copy_and_reports_the_redirect(tmp_path) -> None:
    snap = tables(tmp_path, **{**BASE, "MAILBOX": BASE["MAILBOX"] + ["ACME\tKEEP\t1\t0\t2\tnobody@example.com"]},
                  ADDRESS_MAP=[])
    r = resolve(snap, "keep@example.com")
    assert r.targets == (SF("ACME/KEEP"),)
    assert [(f.destination, f.status) for f in r.failures] == [("[SMTP:nobody@example.com]", "5.1.1")]

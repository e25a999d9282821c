"""``tmmail group`` and ``tmmail mailbox redirect`` on a real configuration, and what the router
makes of the tables they write."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from tmmail import cli
from tmmail.address import InternalAddress
from tmmail.groups import build_index
from tmmail.providers import load_providers
from tmmail.router import LOCAL, UNKNOWN_LOCAL, resolve

SF = lambda v: InternalAddress("SF", v)  # noqa: E731
SMTP = lambda v: InternalAddress("SMTP", v)  # noqa: E731


def run(conf: Path, *args: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["--config", str(conf), *args], stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def ok(conf: Path, *args: str) -> str:
    rc, out, err = run(conf, *args)
    assert rc == 0, err
    return out


def refused(conf: Path, *args: str) -> str:
    rc, out, err = run(conf, *args)
    assert rc == 2, (out, err)
    assert err.startswith("tmmail: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tpl") / "var"
    rc = cli.main(["init", str(d), "--domain", "example.com"], stdout=io.StringIO(), stderr=io.StringIO())
    assert rc == 0
    conf = d / "tmmail.toml"
    for user in ("alice", "bob"):
        ok(conf, "mailbox", "add", f"{user}@example.com")
    return d


@pytest.fixture
def conf(template, tmp_path) -> Path:
    d = tmp_path / "var"
    shutil.copytree(template, d)
    return d / "tmmail.toml"


def snap(conf: Path):
    return load_providers(str(conf.parent / "config"))


def test_group_lifecycle(conf) -> None:
    assert "added group staff@example.com ([SF:EXAMPLE/staff])" in ok(conf, "group", "add", "staff@example.com",
                                                                       "--postoffice", "EXAMPLE")
    ok(conf, "group", "member", "add", "staff@example.com", "alice@example.com")
    ok(conf, "group", "member", "add", "staff@example.com", "[SF:EXAMPLE/BOB]")
    ok(conf, "group", "member", "add", "staff@example.com", "partner@remote.example")
    assert ok(conf, "group", "member", "list", "staff@example.com").splitlines() == [
        "alice@example.com", "[SF:EXAMPLE/bob]", "partner@remote.example"]
    assert ok(conf, "group", "list").splitlines() == [
        "staff@example.com\t[SF:EXAMPLE/staff]\tenabled\tmembers=3\t"]
    r = resolve(snap(conf), "staff@example.com")
    assert (r.kind, r.targets) == (LOCAL, (SF("EXAMPLE/alice"), SF("EXAMPLE/bob"), SMTP("partner@remote.example")))

    ok(conf, "group", "member", "remove", "staff@example.com", "ALICE@example.com")
    assert resolve(snap(conf), "staff@example.com").targets == (SF("EXAMPLE/bob"), SMTP("partner@remote.example"))
    ok(conf, "group", "remove", "staff@example.com")
    assert ok(conf, "group", "list") == ""
    assert resolve(snap(conf), "staff@example.com").kind == UNKNOWN_LOCAL
    # the member rows went with the group
    assert snap(conf).rows("GROUP-MEMBERS") == ()


def test_nested_groups_one_copy_each(conf) -> None:
    ok(conf, "group", "add", "a@example.com", "--postoffice", "EXAMPLE")
    ok(conf, "group", "add", "b@example.com", "--postoffice", "EXAMPLE")
    ok(conf, "group", "member", "add", "a@example.com", "alice@example.com")
    ok(conf, "group", "member", "add", "a@example.com", "b@example.com")
    ok(conf, "group", "member", "add", "b@example.com", "alice@example.com")
    ok(conf, "group", "member", "add", "b@example.com", "bob@example.com")
    ok(conf, "group", "member", "add", "b@example.com", "a@example.com")  # a loop back: harmless
    assert resolve(snap(conf), "a@example.com").targets == (SF("EXAMPLE/alice"), SF("EXAMPLE/bob"))


def test_group_refusals_change_nothing(conf) -> None:
    ok(conf, "group", "add", "staff@example.com", "--postoffice", "EXAMPLE")
    before = {p.name: p.read_bytes() for p in (conf.parent / "config").glob("*.tab")}
    assert "already a group" in refused(conf, "group", "add", "staff@example.com", "--postoffice", "EXAMPLE")
    assert "mailbox" in refused(conf, "group", "add", "alice@example.com", "--postoffice", "EXAMPLE")
    assert "not hosted" in refused(conf, "group", "add", "x@nowhere.example", "--postoffice", "EXAMPLE")
    assert "no post office" in refused(conf, "group", "add", "y@example.com", "--postoffice", "NOPE")
    assert "no group" in refused(conf, "group", "member", "add", "nogroup@example.com", "alice@example.com")
    assert "itself" in refused(conf, "group", "member", "add", "staff@example.com", "staff@example.com")
    assert "neither a mailbox nor a group" in refused(conf, "group", "member", "add", "staff@example.com",
                                                      "[SF:EXAMPLE/NOBODY]")
    assert "malformed" in refused(conf, "group", "add", "not-an-address", "--postoffice", "EXAMPLE")
    ok(conf, "group", "member", "add", "staff@example.com", "alice@example.com")
    assert "already a member" in refused(conf, "group", "member", "add", "staff@example.com", "Alice@example.com")
    assert "not a member" in refused(conf, "group", "member", "remove", "staff@example.com", "bob@example.com")
    after = {p.name: p.read_bytes() for p in (conf.parent / "config").glob("*.tab")}
    assert set(after) - set(before) == {"GROUP-MEMBERS.tab"}
    assert {k: v for k, v in after.items() if k != "GROUP-MEMBERS.tab"} == before


def test_bad_hand_written_rows_skipped() -> None:
    index = build_index(
        [("[SF:A/G]", "g@example.com"), ("garbage",), ("[SMTP:x@y]", "h@example.com"), ("[SF:A/H]", "bad address")],
        [("[SF:A/G]", "m@example.com"), ("[SF:A/G]", "[SMTP:*@x]"), ("nonsense", "x")],
    )
    assert [g.address for g in index] == ["g@example.com"]
    assert index.by_addr("G@EXAMPLE.COM").members == (SMTP("m@example.com"),)


def test_mailbox_redirect(conf) -> None:
    out = ok(conf, "mailbox", "redirect", "alice@example.com", "--to", "far@remote.example", "--to",
             "bob@example.com")
    assert "redirected to far@remote.example, bob@example.com" in out
    mbx = snap(conf).mailbox("EXAMPLE", "alice")
    assert (mbx.redirect_status, mbx.redirect_addresses) == (1, ("far@remote.example", "bob@example.com"))
    assert resolve(snap(conf), "alice@example.com").targets == (SMTP("far@remote.example"), SF("EXAMPLE/bob"))
    ok(conf, "mailbox", "redirect", "alice@example.com", "--to", "far@remote.example", "--keep-copy")
    assert resolve(snap(conf), "alice@example.com").targets == (SF("EXAMPLE/alice"), SMTP("far@remote.example"))
    ok(conf, "mailbox", "redirect", "alice@example.com", "--off")
    mbx = snap(conf).mailbox("EXAMPLE", "alice")
    assert (mbx.redirect_status, mbx.redirect_addresses) == (0, ())
    assert resolve(snap(conf), "alice@example.com").targets == (SF("EXAMPLE/alice"),)
    refused(conf, "mailbox", "redirect", "alice@example.com")
    refused(conf, "mailbox", "redirect", "alice@example.com", "--off", "--to", "x@y.example")
    refused(conf, "mailbox", "redirect", "nobody@example.com", "--to", "x@y.example")
    refused(conf, "mailbox", "redirect", "alice@example.com", "--to", "not an address")

"""tmmail.providers: tab-delimited tables, validation with file:line, hot reload, atomic write."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tmmail.cred import hash_password
from tmmail.errors import ConfigError
from tmmail.providers import (
    HEADERS,
    TABLES,
    ProviderStore,
    ip_mask_matches,
    load_providers,
)


def write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text, encoding="utf-8")


#: a real (cheap) hash: AUTH.tab refuses anything else in PASSWORD_HASH
HASH = hash_password("pw", n=2, r=1, p=1)


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    d = tmp_path / "config"
    d.mkdir()
    write(d, "DOMAINS.tab", HEADERS["DOMAINS"] + "Example.COM\tACME\t1\n\nother.example\tACME\t0\tsmart.example:2525\tx=1,y=two\n")
    write(d, "POSTOFFICE.tab", "ACME\t1\tsender_policy=refuse\n")
    write(d, "MAILBOX.tab", "# comment\nACME\tjoe\t1\t1048576\t0\nACME\tann\t1\t0\t2\tjoe@example.com;[SF:ACME/joe]\n")
    write(d, "AUTH.tab", f"Joe@Example.com\tACME/joe\t{HASH}\tUSER\nann@example.com\tACME/ann\n")
    write(
        d,
        "ADDRESS-MAP.tab",
        "[SMTP:joe@example.com]\t[SF:ACME/joe]\t0\n"
        "[SMTP:Sales@Example.com]\t[SF:ACME/joe];[SMTP:boss@remote.example]\n"
        "[SMTP:*@example.com]\t[SF:ACME/ann]\n",
    )
    write(d, "SMTP-ACCESS.tab", "192.168.*.*\t1\toffice\n10.0.0.0/8\t0\tdisabled\n")
    write(d, "SMTP-BLACKLIST.tab", "*\tspam.example\t1\nexample.com\t*.bad.example\n")
    write(d, "SENDERS.tab", "ACME/joe\tinfo@example.com\t0\nACME/joe\tjoe.smith@example.com\t1\n")
    write(d, "GROUP-MAP.tab", "[SF:ACME/team]\tTeam\t1\n")
    return d


def test_tables_load_into_immutable_snapshot(conf: Path) -> None:
    snap = ProviderStore(str(conf)).current()
    assert set(snap.domains) == {"example.com", "other.example"}
    assert snap.is_hosted_domain("EXAMPLE.com")
    assert not snap.is_hosted_domain("other.example")  # status 0
    assert not snap.is_hosted_domain("nowhere.example")
    other = snap.domain("other.example")
    assert other is not None and other.route == "smart.example:2525" and dict(other.options) == {"x": "1", "y": "two"}
    assert snap.postoffice("acme").options["sender_policy"] == "refuse"  # type: ignore[union-attr]
    joe = snap.mailbox("acme", "JOE")
    assert joe is not None and (joe.postoffice, joe.name, joe.quota) == ("ACME", "joe", 1048576)
    ann = snap.mailbox("ACME", "ann")
    assert ann is not None and ann.redirect_status == 2
    assert ann.redirect_addresses == ("joe@example.com", "[SF:ACME/joe]")
    entry = snap.auth["joe@example.com"]
    assert (entry.login, entry.postoffice, entry.mailbox, entry.rights) == ("Joe@Example.com", "ACME", "joe", "USER")
    assert entry.can_login and not snap.auth_entry("ANN@example.com").can_login  # type: ignore[union-attr]
    assert [m.source for m in snap.address_map] == [
        "[SMTP:joe@example.com]",
        "[SMTP:Sales@example.com]",
        "[SMTP:*@example.com]",
    ]
    sales = snap.map_exact("sales@EXAMPLE.com")
    assert [str(d) for d in sales[0].destinations] == ["[SF:ACME/joe]", "[SMTP:boss@remote.example]"]
    assert [m.source for m in snap.map_masks()] == ["[SMTP:*@example.com]"]
    assert snap.senders_for("acme", "joe") == ("joe.smith@example.com", "info@example.com")  # primary first
    assert [e.matches("192.168.7.9") for e in snap.smtp_access] == [True, False]
    assert [(b.target_domain, b.banned_domain) for b in snap.smtp_blacklist] == [
        ("*", "spam.example"),
        ("example.com", "*.bad.example"),
    ]
    assert snap.smtp_deny == ()  # missing optional table = empty
    assert snap.rows("GROUP-MAP") == (("[SF:ACME/team]", "Team", "1"),)  # unknown tables: raw rows
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.address_map = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.domains["x"] = other  # type: ignore[index]


@pytest.mark.parametrize(
    "table, text, line, fragment",
    [
        ("DOMAINS.tab", "# h\nexample.com\tACME\t1\nbad domain\tACME\n", 3, "not a domain"),
        ("DOMAINS.tab", "example.com\tACME\t7\n", 1, "STATUS"),
        ("DOMAINS.tab", "example.com\tACME\t1\nEXAMPLE.com\tOTHER\n", 2, "duplicate"),
        ("DOMAINS.tab", "example.com\n", 1, "at least 2"),
        ("DOMAINS.tab", "example.com\tACME\t1\thost:99999\n", 1, "port"),
        ("DOMAINS.tab", "example.com\tACME\t1\t\tnovalue\n", 1, "key=value"),
        ("DOMAINS.tab", "example.com ACME 1\n", 1, "columns"),  # spaces instead of tabs
        ("MAILBOX.tab", "ACME\t../etc\n", 1, "not a valid name"),
        ("MAILBOX.tab", "ACME\tjoe\t1\tlots\n", 1, "QUOTA_BYTES"),
        ("MAILBOX.tab", "ACME\tjoe\t1\t0\t0\tnot an address\n", 1, "REDIRECT"),
        ("AUTH.tab", "joe@example.com\tACMEjoe\thash\n", 1, "POSTOFFICE/MAILBOX"),
        ("AUTH.tab", f"a@x.com\tA/a\t{HASH}\nA@X.COM\tA/b\t!\n", 2, "duplicate login"),
        # a password in clear (or any foreign hash) could never log in: an error at load
        ("AUTH.tab", f"a@x.com\tA/a\t{HASH}\nb@x.com\tA/b\tsecret123\tUSER\n", 2, "not a password hash"),
        ("AUTH.tab", "a@x.com\tA/a\t$scrypt$n=3,r=1,p=1$c2FsdA$AAAAAAAAAAAAAAAAAAAAAA\n", 1, "not a password hash"),
        ("ADDRESS-MAP.tab", "joe@example.com\t[SF:ACME/joe]\n", 1, "internal address"),
        ("ADDRESS-MAP.tab", "[SMTP:joe@example.com]\t[SF:ACME]\n", 1, "POSTOFFICE/NAME"),
        ("SMTP-ACCESS.tab", "192.168.1.300\t1\n", 1, "MASK"),
        ("SENDERS.tab", "ACME/joe\tnot-an-address\n", 1, "ADDRESS"),
        ("POSTOFFICE.tab", "ACME\t1\tx=1\tsurplus\n", 1, "at most 3"),
        ("POSTOFFICE.tab", "ok\n\xff\n", 2, "UTF-8"),
    ],
)
def test_malformed_lines_are_reported_with_file_and_line(
    tmp_path: Path, table: str, text: str, line: int, fragment: str
) -> None:
    (tmp_path / table).write_bytes(text.encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    with pytest.raises(ConfigError) as e:
        ProviderStore(str(tmp_path))
    assert e.value.path == str(tmp_path / table)
    assert e.value.line == line
    assert f"{table}:{line}:" in str(e.value)
    assert fragment in str(e.value)


def test_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        ProviderStore(str(tmp_path / "nope"))


def test_empty_folder_gives_empty_tables(tmp_path: Path) -> None:
    snap = load_providers(str(tmp_path))
    assert not snap.domains and not snap.auth and snap.address_map == () and snap.senders_for("A", "b") == ()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_current_rereads_changed_files_at_most_once_per_interval(conf: Path) -> None:
    clock = FakeClock()
    store = ProviderStore(str(conf), interval=1.0, clock=clock)
    first = store.current()
    with open(conf / "DOMAINS.tab", "a") as f:
        f.write("new.example\tACME\t1\n")
    clock.now += 0.5
    assert store.current() is first  # not re-checked yet
    clock.now += 0.6
    snap = store.current()
    assert snap.is_hosted_domain("new.example")
    assert snap.mailboxes is first.mailboxes  # unchanged tables are not re-parsed
    clock.now += 5
    assert store.current() is snap  # nothing changed: same snapshot


def test_a_broken_file_keeps_the_last_good_snapshot(conf: Path) -> None:
    clock = FakeClock()
    store = ProviderStore(str(conf), interval=1.0, clock=clock)
    good = store.current()
    write(conf, "AUTH.tab", "broken line without tabs\n")
    clock.now += 2
    assert store.current() is good
    assert store.last_error is not None and "AUTH.tab:1:" in str(store.last_error)
    with pytest.raises(ConfigError):
        store.reload()
    write(conf, "AUTH.tab", "new@example.com\tACME/joe\t!\n")
    clock.now += 2
    fixed = store.current()
    assert list(fixed.auth) == ["new@example.com"]
    assert store.last_error is None


def test_new_and_removed_tables_are_noticed(conf: Path) -> None:
    clock = FakeClock()
    store = ProviderStore(str(conf), interval=1.0, clock=clock)
    write(conf, "SMTP-DENY.tab", "203.0.113.0/24\t1\tbad net\n")
    os.unlink(conf / "SENDERS.tab")
    clock.now += 2
    snap = store.current()
    assert snap.smtp_deny[0].matches("203.0.113.5")
    assert snap.senders == ()


def test_write_is_atomic_keeps_header_and_validates(conf: Path) -> None:
    store = ProviderStore(str(conf), interval=3600)
    store.write("DOMAINS", [("example.com", "ACME", "1"), ("b.example", "ACME", "1", "", "")])
    text = (conf / "DOMAINS.tab").read_text()
    assert text == HEADERS["DOMAINS"] + "example.com\tACME\t1\nb.example\tACME\t1\n"
    assert store.current().is_hosted_domain("b.example")  # visible at once despite the interval
    with pytest.raises(ConfigError):
        store.write("DOMAINS", [("not a domain", "ACME")])
    with pytest.raises(ConfigError):
        store.write("DOMAINS", [("a.example", "AC\tME")])
    assert (conf / "DOMAINS.tab").read_text() == text  # unchanged after refused writes
    assert not [n for n in os.listdir(conf) if n.endswith(".tmp")]
    store.write("SMTP-DENY", [("198.51.100.7", "1", "test")])  # new file gets the standard header
    assert (conf / "SMTP-DENY.tab").read_text().startswith(HEADERS["SMTP-DENY"])


def test_every_known_table_has_a_header_naming_its_columns() -> None:
    assert set(HEADERS) == set(TABLES)
    for text in HEADERS.values():
        assert all(line.startswith("# ") for line in text.splitlines())
        assert "\t" in text.splitlines()[-1]  # the column line is tab-separated like the data


@pytest.mark.parametrize(
    "mask, ip, expected",
    [
        ("192.168.*.*", "192.168.1.20", True),
        ("192.168.*.*", "192.169.1.20", False),
        ("192.168.1.*", "192.168.10.1", False),
        ("10.0.0.0/8", "10.200.3.4", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "::ffff:127.0.0.1", True),
        ("2001:db8::/32", "2001:db8::5", True),
        ("2001:db8::/32", "10.0.0.1", False),
        ("10.0.0.0/8", "not-an-ip", False),
    ],
)
def test_ip_mask_matches(mask: str, ip: str, expected: bool) -> None:
    assert ip_mask_matches(mask, ip) is expected


def test_check_reloads_now_and_never_raises(conf: Path) -> None:
    store = ProviderStore(str(conf), interval=float("inf"))
    first = store.current()
    write(conf, "POSTOFFICE.tab", "ACME\t1\nNEW\t1\n")
    assert store.current() is first  # interval=inf: current() never looks
    assert store.check().postoffice("new") is not None
    write(conf, "POSTOFFICE.tab", "bad\tstatus\n")
    assert store.check().postoffice("new") is not None  # the last good tables stay
    assert store.last_error is not None


def test_plain_text_password_in_auth_is_reported_without_echoing_it(tmp_path: Path) -> None:
    (tmp_path / "AUTH.tab").write_text("joe@example.com\tACME/joe\thunter2\tUSER\n")
    with pytest.raises(ConfigError) as e:
        ProviderStore(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'AUTH.tab'}:1: PASSWORD_HASH")
    assert "hunter2" not in str(e.value)

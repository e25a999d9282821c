"""The ``tmmail`` admin command and ``tmmail init``: real files in tmp_path, in-process and as a process."""

from __future__ import annotations

import datetime
import io
import os
import re
import ssl
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tmmail import cli, config, maildir
from tmmail.cred import verify_password
from tmmail.providers import HEADERS, TABLES, ProviderStore

REPO = Path(__file__).resolve().parent.parent
TMMAIL = Path(sys.executable).parent / "tmmail"


def run(conf: Path | None, *args: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    argv = (["--config", str(conf)] if conf is not None else []) + list(args)
    rc = cli.main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def ok(conf: Path | None, *args: str, stdin: str = "") -> str:
    rc, out, err = run(conf, *args, stdin=stdin)
    assert rc == 0, err
    return out


def refused(conf: Path | None, *args: str, stdin: str = "") -> str:
    """Run a command that must fail with status 2 and one line on stderr."""
    rc, out, err = run(conf, *args, stdin=stdin)
    assert rc == 2, (out, err)
    assert err.startswith("tmmail: error: ") and err.count("\n") == 1, err
    return err


def snapshot_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tpl") / "var"
    ok(None, "init", str(d), "--hostname", "mail.example.com", "--domain", "example.com")
    return d


@pytest.fixture
def site(template_dir: Path, tmp_path: Path) -> Path:
    """A fresh copy of an initialised configuration (init is not re-run for every test)."""
    import shutil

    d = tmp_path / "var"
    shutil.copytree(template_dir, d)
    return d / "tmmail.toml"


#: what `tmmail init --domain example.com` puts in the address map, and its `mailbox list` line
PM_ROW = ("[SMTP:postmaster@example.com]", "[SF:EXAMPLE/postmaster]")
PM_LIST = "postmaster@example.com\tEXAMPLE/postmaster\tenabled\tquota=0\tpassword=none\n"


def tables(conf: Path) -> dict[str, bytes]:
    return snapshot_files(conf.parent / "config")


# -- init --------------------------------------------------------------------------------


def test_init_writes_a_complete_working_configuration(template_dir: Path) -> None:
    settings = config.load(str(template_dir / "tmmail.toml"))
    assert settings.server.hostname == "mail.example.com"
    assert settings.config_dir == str(template_dir / "config")
    assert settings.spool_dir == str(template_dir / "spool")
    assert settings.postoffices_dir == str(template_dir / "postoffices")
    for role, port in config.DEFAULT_PORTS.items():
        assert settings.listen[role] == (f"tcp:{port}:interface=127.0.0.1",)
    for sub in ("tmp", "incoming", "active", "deferred", "badmail", "corrupt"):
        assert (template_dir / "spool" / sub).is_dir()
    for fname in TABLES.values():
        text = (template_dir / "config" / fname).read_text()
        assert text.startswith("# ") and "\t" in text.splitlines()[1]
    snap = ProviderStore(settings.config_dir).current()
    assert snap.is_hosted_domain("example.com")
    assert snap.domain("example.com").postoffice == "EXAMPLE"  # type: ignore[union-attr]
    assert list(snap.postoffices) == ["EXAMPLE"]
    assert snap.smtp_access == ()  # nothing trusted
    # the only mailbox is the postmaster's (RFC 5321 §4.5.1), and nobody can log in to it yet
    assert list(snap.mailboxes) == [("EXAMPLE", "POSTMASTER")]
    assert [(a.login, a.can_login) for a in snap.auth.values()] == [("postmaster@example.com", False)]
    assert [(m.source, m.destination) for m in snap.address_map] == [PM_ROW]
    assert os.path.isdir(maildir.mailbox_path(settings.postoffices_dir, "EXAMPLE", "postmaster") + "/new")


def test_init_certificate_is_self_signed_for_the_hostname(template_dir: Path) -> None:
    cert_path, key_path = template_dir / "tls" / "server.crt", template_dir / "tls" / "server.key"
    assert os.stat(key_path).st_mode & 0o077 == 0  # the key is private
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.com"]
    years = (cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).days / 365
    assert 9.9 < years < 10.1
    # a TLS client that trusts this certificate verifies the host name (in-memory handshake)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_path, key_path)
    client_ctx = ssl.create_default_context(cafile=str(cert_path))
    assert handshake(server_ctx, client_ctx, "mail.example.com") is None
    assert "mismatch" in str(handshake(server_ctx, client_ctx, "other.example.com")).lower()


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> Exception | None:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, side, out_bio, peer_in in (("c", client, c_out, s_in), ("s", server, s_out, c_in)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except ssl.SSLError as e:
                    if name == "c":
                        return e
            data = out_bio.read()
            if data:
                peer_in.write(data)
        if all(done.values()):
            return None
    raise AssertionError("handshake did not finish")


def test_init_refuses_to_overwrite(template_dir: Path) -> None:
    before = snapshot_files(template_dir)
    err = refused(None, "init", str(template_dir), "--domain", "other.example")
    assert "refusing to overwrite" in err
    assert snapshot_files(template_dir) == before


def test_init_refuses_a_folder_that_has_tables(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "AUTH.tab").write_text("x@y.z\tA/b\t!\n")
    refused(None, "init", str(tmp_path))
    assert not (tmp_path / "tmmail.toml").exists()


def test_init_rejects_bad_hostname_or_domain(tmp_path: Path) -> None:
    refused(None, "init", str(tmp_path / "a"), "--hostname", "bad host")
    refused(None, "init", str(tmp_path / "b"), "--domain", "not a domain")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_etc_is_what_init_writes(tmp_path: Path) -> None:
    """etc/ (the embedded default configuration) must stay identical to `tmmail init` output."""
    ok(None, "init", str(tmp_path / "fresh"))
    written = tmp_path / "fresh"
    assert (written / "tmmail.toml").read_bytes() == (REPO / "etc" / "tmmail.toml").read_bytes()
    etc_tables = sorted(p.name for p in (REPO / "etc" / "config").glob("*.tab"))
    assert etc_tables == sorted(p.name for p in (written / "config").glob("*.tab"))
    for name in etc_tables:
        assert (written / "config" / name).read_bytes() == (REPO / "etc" / "config" / name).read_bytes(), name
    for name, fname in TABLES.items():  # and the templates carry the headers providers.write uses
        assert (written / "config" / fname).read_text() == HEADERS[name]


def test_settings_template_lists_every_setting_with_its_default() -> None:
    """Every `# key = value` line in the template is a real setting showing the real default."""
    text = (REPO / "tmmail" / "defaults" / "tmmail.toml").read_text()
    section = None
    documented: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            section = m.group(1)
            continue
        m = re.fullmatch(r"#? ?(\w+) = (.*)", line)
        if m and section in config._SECTIONS:
            key, value = m.group(1), tomllib.loads(f"v = {m.group(2)}")["v"]
            cls = config._SECTIONS[section]
            assert key in {f.name for f in fields(cls)}, f"{section}.{key} is not a setting"
            default = getattr(cls(), key)
            if line.startswith("#"):
                assert value == (list(default) if isinstance(default, tuple) else default), f"{section}.{key}"
            documented.setdefault(section, set()).add(key)
    for name, cls in config._SECTIONS.items():
        missing = {f.name for f in fields(cls)} - documented.get(name, set())
        assert not missing, f"tmmail.toml template does not mention [{name}] {sorted(missing)}"


def test_configuration_reference_documents_every_setting() -> None:
    """docs/configuration.md has a table row for every setting, under its section."""
    text = (REPO / "docs" / "configuration.md").read_text()
    for name, cls in config._SECTIONS.items():
        m = re.search(rf"^### \[{name}\]\n(.*?)(?=^#)", text, re.S | re.M)
        assert m, f"docs/configuration.md has no [{name}] section"
        for f in fields(cls):
            assert f"| `{f.name}` |" in m.group(1), f"docs/configuration.md does not document {name}.{f.name}"
    for fname in TABLES.values():
        assert f"### {fname}" in text


# -- post offices and domains ------------------------------------------------------------


def test_postoffice_and_domain_commands(site: Path) -> None:
    ok(site, "postoffice", "add", "ACME")
    refused(site, "postoffice", "add", "acme")  # case-insensitive duplicate
    refused(site, "postoffice", "add", "../evil")
    ok(site, "domain", "add", "Acme.Test", "--postoffice", "acme")
    refused(site, "domain", "add", "acme.test", "--postoffice", "ACME")
    refused(site, "domain", "add", "new.test", "--postoffice", "NOPE")
    refused(site, "domain", "add", "bad_domain!", "--postoffice", "ACME")
    # no trailing empty fields (no route, no options); a route keeps its column
    assert ok(site, "domain", "list").splitlines() == [
        "acme.test\tACME\tenabled",
        "example.com\tEXAMPLE\tenabled",
    ]
    assert ok(site, "postoffice", "list").splitlines() == [
        "ACME\tenabled\tmailboxes=0\tdomains=acme.test",
        "EXAMPLE\tenabled\tmailboxes=1\tdomains=example.com",
    ]
    conf = site.parent / "config" / "DOMAINS.tab"
    conf.write_text(conf.read_text() + "routed.test\tACME\t1\t\tanti_spoofing=0\n")
    assert "routed.test\tACME\tenabled\t\tanti_spoofing=0" in ok(site, "domain", "list").splitlines()
    conf.write_text(conf.read_text().replace("routed.test\tACME\t1\t\tanti_spoofing=0\n", ""))
    refused(site, "postoffice", "remove", "ACME")  # still has a domain
    ok(site, "domain", "remove", "ACME.test")
    ok(site, "postoffice", "remove", "acme")
    refused(site, "postoffice", "remove", "ACME")
    refused(site, "domain", "remove", "acme.test")
    assert [l.split("\t")[0] for l in ok(site, "postoffice", "list").splitlines()] == ["EXAMPLE"]


def test_postmaster_of_init_can_be_given_a_password(site: Path) -> None:
    # init's postmaster mailbox receives mail at once; its owner sets a password to read it
    ok(site, "mailbox", "passwd", "postmaster@example.com", "--password-stdin", stdin="pm pw\n")
    snap = ProviderStore(str(site.parent / "config")).current()
    entry = snap.auth_entry("postmaster@example.com")
    assert entry is not None and entry.can_login and verify_password("pm pw", entry.password_hash)
    # it is a mailbox like any other: a second one is refused with one line
    assert "already exists" in refused(site, "mailbox", "add", "postmaster@example.com")


def test_new_domain_gets_a_postmaster_alias_to_the_same_place(site: Path) -> None:
    from tmmail.router import resolve

    ok(site, "postoffice", "add", "ACME")
    out = ok(site, "domain", "add", "acme.test", "--postoffice", "ACME")
    assert "postmaster@acme.test is an alias of postmaster@example.com" in out
    snap = ProviderStore(str(site.parent / "config")).current()
    assert [t.value for t in resolve(snap, "postmaster@acme.test").targets] == ["EXAMPLE/postmaster"]
    assert [t.value for t in resolve(snap, "PostMaster@ACME.test").targets] == ["EXAMPLE/postmaster"]
    # a domain whose postmaster already resolves (here through a catch-all mask) keeps it
    ok(site, "mailbox", "add", "boss@acme.test")
    ok(site, "alias", "add", "*", "[SF:ACME/boss]")
    out = ok(site, "domain", "add", "other.test", "--postoffice", "ACME")
    assert "postmaster" not in out
    assert not ProviderStore(str(site.parent / "config")).current().map_exact("postmaster@other.test")


def test_first_domain_without_init_domain_gets_a_postmaster_mailbox(tmp_path: Path) -> None:
    ok(None, "init", str(tmp_path / "var"))
    conf = tmp_path / "var" / "tmmail.toml"
    ok(conf, "postoffice", "add", "ACME")
    out = ok(conf, "domain", "add", "acme.test", "--postoffice", "ACME")
    assert "created mailbox postmaster@acme.test" in out
    assert ok(conf, "mailbox", "list") == "postmaster@acme.test\tACME/postmaster\tenabled\tquota=0\tpassword=none\n"
    # a second domain of that post office reaches it by the local part alone: nothing to add
    from tmmail.router import resolve

    ok(conf, "domain", "add", "two.test", "--postoffice", "ACME")
    snap = ProviderStore(str(tmp_path / "var" / "config")).current()
    assert [t.value for t in resolve(snap, "postmaster@two.test").targets] == ["ACME/postmaster"]
    # a domain of another post office gets an alias to it
    ok(conf, "postoffice", "add", "OTHER")
    assert "alias of postmaster@acme.test" in ok(conf, "domain", "add", "three.test", "--postoffice", "OTHER")


def test_alias_to_a_group_or_list_that_exists(site: Path) -> None:
    ok(site, "group", "add", "staff@example.com", "--postoffice", "EXAMPLE")
    ok(site, "alias", "add", "all@example.com", "[sf:example/STAFF]")
    ok(site, "list", "add", "news@example.com", "--postoffice", "EXAMPLE")
    ok(site, "alias", "add", "announce@example.com", "[LS:EXAMPLE/news]")
    ok(site, "alias", "add", "news-owner@example.com", "[LS:EXAMPLE/news+owner]")  # a list role
    ok(site, "alias", "add", "*@example.com", "[SF:example/*]")  # the local part, as a mailbox name
    rows = ok(site, "alias", "list").splitlines()
    assert "all@example.com\t[SF:EXAMPLE/staff]\t0" in rows
    assert "*@example.com\t[SF:EXAMPLE/*]\t0" in rows
    assert "announce@example.com\t[LS:EXAMPLE/news]\t0" in rows


def test_domain_remove_refuses_mailboxes_then_drops_its_aliases(site: Path) -> None:
    ok(site, "postoffice", "add", "ACME")
    ok(site, "domain", "add", "acme.test", "--postoffice", "ACME")
    ok(site, "mailbox", "add", "joe@acme.test")
    ok(site, "alias", "add", "sales@acme.test", "joe@acme.test")
    ok(site, "alias", "add", "*@acme.test", "[SF:ACME/joe]")
    ok(site, "alias", "add", "*", "[SF:EXAMPLE/postmaster]")  # every domain's: stays
    ok(site, "alias", "add", "acme@example.com", "sales@acme.test")  # another domain's: stays
    before = tables(site)
    err = refused(site, "domain", "remove", "acme.test")
    assert "1 mailbox(es) (joe@acme.test)" in err and "tmmail mailbox remove" in err
    assert tables(site) == before
    ok(site, "mailbox", "remove", "joe@acme.test")
    out = ok(site, "domain", "remove", "ACME.test")
    # postmaster@ (from domain add) and sales@; *@acme.test went with the mailbox it pointed at
    assert "2 alias(es)" in out
    assert [l.split("\t")[0] for l in ok(site, "alias", "list").splitlines()] == [
        "postmaster@example.com", "*", "acme@example.com"]
    assert [l.split("\t")[0] for l in ok(site, "domain", "list").splitlines()] == ["example.com"]


def test_unicode_domain_is_stored_as_a_label(site: Path) -> None:
    ok(site, "domain", "add", "bücher.example", "--postoffice", "EXAMPLE")
    assert "xn--bcher-kva.example\tEXAMPLE" in ok(site, "domain", "list")


# -- mailboxes ---------------------------------------------------------------------------


def test_mailbox_add_creates_maildir_login_and_address(site: Path) -> None:
    out = ok(site, "mailbox", "add", "Alice@Example.COM", "--password-stdin", "--quota", "2G", stdin="s3cret pw\n")
    assert "Alice@example.com" in out
    settings = config.load(str(site))
    path = maildir.mailbox_path(settings.postoffices_dir, "EXAMPLE", "Alice")
    assert all(os.path.isdir(os.path.join(path, sub)) for sub in ("cur", "new", "tmp"))
    snap = ProviderStore(settings.config_dir).current()
    mbx = snap.mailbox("example", "alice")
    assert mbx is not None and (mbx.postoffice, mbx.name, mbx.quota) == ("EXAMPLE", "Alice", 2 * 1024**3)
    entry = snap.auth["alice@example.com"]
    assert entry.login == "alice@example.com" and (entry.postoffice, entry.mailbox) == ("EXAMPLE", "Alice")
    assert entry.password_hash.startswith("$scrypt$") and verify_password("s3cret pw", entry.password_hash)
    assert [(m.source, m.destination) for m in snap.address_map] == [
        PM_ROW, ("[SMTP:Alice@example.com]", "[SF:EXAMPLE/Alice]")]
    assert ok(site, "mailbox", "list") == (
        "Alice@example.com\tEXAMPLE/Alice\tenabled\tquota=2147483648\tpassword=set\n" + PM_LIST)


def test_mailbox_without_password_cannot_log_in(site: Path) -> None:
    out = ok(site, "mailbox", "add", "bob@example.com")
    assert "nobody can log in" in out
    snap = ProviderStore(str(site.parent / "config")).current()
    assert not snap.auth["bob@example.com"].can_login
    assert "password=none" in ok(site, "mailbox", "list")
    ok(site, "mailbox", "passwd", "bob@example.com", "--password-stdin", stdin="now-set\n")
    snap = ProviderStore(str(site.parent / "config")).current()
    assert verify_password("now-set", snap.auth["bob@example.com"].password_hash)


@pytest.mark.parametrize(
    "args, stdin, fragment",
    [
        (("mailbox", "add", "joe@unknown.example"), "", "not hosted"),
        (("mailbox", "add", "not-an-address"), "", "malformed address"),
        (("mailbox", "add", "joe@@example.com"), "", "malformed address"),
        (("mailbox", "add", "JOE@example.com"), "", "already exists"),  # joe exists (case-insensitive)
        (("mailbox", "add", "new@example.com", "--password-stdin"), "", "no password"),
        (("mailbox", "add", "new@example.com", "--password-stdin"), "\n", "no password"),
        (("mailbox", "add", "new@example.com", "--quota", "lots"), "", "bad size"),
        (("mailbox", "add", '"a b"@example.com'), "", "cannot be a mailbox name"),
        (("mailbox", "passwd", "nobody@example.com", "--password-stdin"), "pw\n", "no login"),
        (("mailbox", "passwd", "joe@example.com"), "pw\n", "--password-stdin"),
        (("mailbox", "remove", "nobody@example.com"), "", "no mailbox"),
        (("mailbox", "remove", "alias@example.com"), "", "alias remove"),  # an alias is not the mailbox
        (("mailbox", "frobnicate"), "", "invalid choice"),
        (("alias", "add", "x@unknown.example", "joe@example.com"), "", "not hosted"),
        (("alias", "add", "x@example.com", "[SF:NOPE/joe]"), "", "no post office"),
        # an alias to nothing would accept mail at RCPT and bounce it later
        (("alias", "add", "a@example.com", "[SF:EXAMPLE/nobody]"), "", "no mailbox or group EXAMPLE/nobody"),
        (("alias", "add", "a@example.com", "[LS:EXAMPLE/nolist]"), "", "no list EXAMPLE/nolist"),
        (("alias", "add", "a@example.com", "[LS:NOPE/news]"), "", "no post office NOPE"),
        (("domain", "remove", "example.com"), "", "still has 2 mailbox(es)"),  # joe, postmaster
        (("alias", "add", "x@example.com", "*@example.com"), "", "mask"),
        (("alias", "add", "joe@example.com", "other@remote.example"), "", "already maps"),
        (("alias", "remove", "nothing@example.com"), "", "no alias"),
        (("sender", "add", "nobody@example.com", "x@example.com"), "", "no mailbox"),
        (("sender", "add", "joe@example.com", "bad address"), "", "malformed"),
    ],
)
def test_bad_input_changes_nothing(site: Path, args: tuple[str, ...], stdin: str, fragment: str) -> None:
    ok(site, "mailbox", "add", "joe@example.com", "--password-stdin", stdin="pw\n")
    ok(site, "alias", "add", "alias@example.com", "[SF:EXAMPLE/joe]")
    before = snapshot_files(site.parent)
    err = refused(site, *args, stdin=stdin)
    assert fragment in err
    assert snapshot_files(site.parent) == before


def test_mailbox_names_are_unique_per_postoffice_across_domains(site: Path) -> None:
    ok(site, "domain", "add", "second.example", "--postoffice", "EXAMPLE")
    ok(site, "mailbox", "add", "joe@example.com")
    assert "already exists" in refused(site, "mailbox", "add", "Joe@second.example")
    ok(site, "alias", "add", "joe@second.example", "joe@example.com")  # the way to do it


def test_mailbox_remove_keeps_the_maildir(site: Path) -> None:
    ok(site, "mailbox", "add", "carol@example.com", "--password-stdin", stdin="pw\n")
    ok(site, "mailbox", "add", "dave@example.com")
    ok(site, "alias", "add", "sales@example.com", "[SF:EXAMPLE/carol]")
    ok(site, "sender", "add", "carol@example.com", "boss@example.com")
    settings = config.load(str(site))
    path = maildir.mailbox_path(settings.postoffices_dir, "EXAMPLE", "carol")
    (Path(path) / "new" / "1.msg").write_text("Subject: keep me\n\nhi\n")
    out = ok(site, "mailbox", "remove", "Carol@Example.com")
    assert "kept" in out and path in out
    assert (Path(path) / "new" / "1.msg").exists()
    snap = ProviderStore(settings.config_dir).current()
    assert snap.mailbox("EXAMPLE", "carol") is None and "carol@example.com" not in snap.auth
    assert [m.source for m in snap.address_map] == [PM_ROW[0], "[SMTP:dave@example.com]"]  # alias to carol went too
    assert snap.senders == ()
    assert snap.mailbox("EXAMPLE", "dave") is not None


def test_quota_sizes() -> None:
    assert cli.parse_size("1048576") == 1048576
    assert cli.parse_size("500K") == 500 * 1024
    assert cli.parse_size("25m") == 25 * 1024**2
    assert cli.parse_size("2G") == 2 * 1024**3
    assert cli.parse_size("1.5GB") == int(1.5 * 1024**3)
    assert cli.parse_size("0") == 0
    for bad in ("", "-1", "G", "1X", "1 2"):
        with pytest.raises(cli.CLIError):
            cli.parse_size(bad)


# -- aliases and senders -----------------------------------------------------------------


def test_alias_commands(site: Path) -> None:
    ok(site, "mailbox", "add", "joe@example.com")
    ok(site, "list", "add", "team@example.com", "--postoffice", "EXAMPLE")
    ok(site, "alias", "add", "Sales@Example.com", "joe@example.com")
    ok(site, "alias", "add", "*@example.com", "[sf:example/JOE]")  # canonical spelling stored
    ok(site, "alias", "add", "crew@example.com", "[LS:EXAMPLE/team]")
    ok(site, "alias", "add", "ext@example.com", "someone@remote.example")
    assert ok(site, "alias", "list").splitlines() == [
        "postmaster@example.com\t[SF:EXAMPLE/postmaster]\t0",
        "joe@example.com\t[SF:EXAMPLE/joe]\t0",
        "Sales@example.com\t[SMTP:joe@example.com]\t0",
        "*@example.com\t[SF:EXAMPLE/joe]\t0",
        "crew@example.com\t[LS:EXAMPLE/team]\t0",
        "ext@example.com\t[SMTP:someone@remote.example]\t0",
    ]
    refused(site, "alias", "add", "*@EXAMPLE.com", "joe@example.com")  # duplicate mask
    ok(site, "alias", "remove", "sales@example.com")
    ok(site, "alias", "remove", "[SMTP:*@example.com]")
    assert [l.split("\t")[0] for l in ok(site, "alias", "list").splitlines()] == [
        "postmaster@example.com", "joe@example.com", "crew@example.com", "ext@example.com"
    ]


def test_sender_commands(site: Path) -> None:
    ok(site, "mailbox", "add", "joe@example.com")
    ok(site, "mailbox", "add", "ann@example.com")
    ok(site, "sender", "add", "joe@example.com", "info@example.com")
    ok(site, "sender", "add", "joe@example.com", "Joe.Smith@Example.com", "--primary")
    ok(site, "sender", "add", "ann@example.com", "ann.b@example.com", "--primary")
    refused(site, "sender", "add", "joe@example.com", "INFO@example.com")
    assert ok(site, "sender", "list", "joe@example.com").splitlines() == [
        "EXAMPLE/joe\tinfo@example.com\t",
        "EXAMPLE/joe\tJoe.Smith@example.com\tprimary",
    ]
    ok(site, "sender", "add", "joe@example.com", "new@example.com", "--primary")  # only one primary
    snap = ProviderStore(str(site.parent / "config")).current()
    assert snap.senders_for("EXAMPLE", "joe")[0] == "new@example.com"
    assert [s.address for s in snap.senders if s.primary] == ["ann.b@example.com", "new@example.com"]
    ok(site, "sender", "remove", "joe@example.com", "info@example.com")
    refused(site, "sender", "remove", "joe@example.com", "info@example.com")
    assert len(ok(site, "sender", "list").splitlines()) == 3


# -- running server, config path, plugins --------------------------------------------------


def test_running_store_picks_up_changes(site: Path) -> None:
    store = ProviderStore(str(site.parent / "config"), interval=0.0)  # what the server holds
    assert store.current().auth_entry("eve@example.com") is None
    ok(site, "mailbox", "add", "eve@example.com", "--password-stdin", stdin="pw\n")
    assert store.current().auth_entry("eve@example.com") is not None


def test_console_script_uses_tmmail_config_and_default_path(site: Path, tmp_path: Path) -> None:
    env = dict(os.environ, TMMAIL_CONFIG=str(site))
    p = subprocess.run([str(TMMAIL), "mailbox", "add", "zed@example.com", "--password-stdin"], input="pw\n",
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    env.pop("TMMAIL_CONFIG")
    p = subprocess.run([str(TMMAIL), "mailbox", "list"], cwd=site.parent.parent, capture_output=True,
                       text=True, env=env, timeout=60)  # ./var/tmmail.toml
    assert p.returncode == 0 and "\nzed@example.com\t" in p.stdout, p.stderr
    p = subprocess.run([str(TMMAIL), "domain", "list"], cwd=tmp_path / "var" / "config", capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 2 and "not found" in p.stderr and p.stderr.count("\n") == 1


def test_concurrent_admin_commands_lose_no_update(site: Path) -> None:
    """Read-modify-write of a table is serialised (flock), so parallel commands lose nothing."""
    import threading

    ok(site, "mailbox", "add", "joe@example.com")
    errors: list[str] = []

    def worker(n: int) -> None:
        for i in range(5):
            rc, _, err = run(site, "alias", "add", f"a{n}-{i}@example.com", "joe@example.com")
            if rc:
                errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    snap = ProviderStore(str(site.parent / "config")).current()
    assert len(snap.address_map) == 2 + 6 * 5  # postmaster, joe, the aliases


def test_init_with_an_ip_address_as_hostname(tmp_path: Path) -> None:
    ok(None, "init", str(tmp_path / "ip"), "--hostname", "127.0.0.1")
    cert = x509.load_pem_x509_certificate((tmp_path / "ip" / "tls" / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_optional_command_modules(tmp_path: Path, site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "plugins"
    pkg.mkdir()
    (pkg / "cli_demo.py").write_text(textwrap.dedent("""
        def register(subparsers):
            p = subparsers.add_parser("demo")
            p.set_defaults(func=run)

        def run(args, ctx):
            ctx.out("domains", *sorted(ctx.store.reload().domains))
            ctx.out("hostname", ctx.settings.server.hostname)
            return 0
    """))
    (pkg / "cli_broken.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setattr(cli, "OPTIONAL_MODULES", ("cli_missing_abc", "cli_demo"))
    assert ok(site, "demo") == "domains\texample.com\nhostname\tmail.example.com\n"
    monkeypatch.setattr(cli, "OPTIONAL_MODULES", ("cli_broken",))
    with pytest.raises(ModuleNotFoundError):  # a real import error inside a module is not hidden
        cli.main(["--config", str(site), "domain", "list"])


def test_config_option_is_accepted_after_the_subcommand(site: Path) -> None:
    rc, out, err = run(None, "domain", "list", "--config", str(site))
    assert rc == 0 and out.startswith("example.com\t"), err
    rc, out, err = run(None, "domain", "list", f"--config={site}")
    assert rc == 0 and out.startswith("example.com\t"), err


def test_missing_configuration_is_a_one_line_error(tmp_path: Path) -> None:
    err = refused(tmp_path / "nope.toml", "domain", "list")
    assert "tmmail init" in err

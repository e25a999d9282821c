"""The list server: CLI, posting modes, distribution headers/footers, DMARC, requests, bounces.

The connector runs against a real configuration made by ``tmmail init`` + ``tmmail list``, a
real spool in tmp_path, and (for DMARC) the test DNS server on 127.0.0.1.
"""

from __future__ import annotations

import email
import email.policy
import io
import shutil
import time
from pathlib import Path

import pytest

from tmmail import cli, config
from tmmail.address import InternalAddress
from tmmail.connectors import listserver_message as M
from tmmail.connectors.listserver import DMARCLookup, ListServerConnector
from tmmail.envelope import Envelope, Recipient
from tmmail.errors import PermanentError
from tmmail.providers import ProviderStore
from tmmail.spool import INCOMING, Spool


def run(conf: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["--config", str(conf), *args], stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def ok(conf: Path, *args: str) -> str:
    rc, out, err = run(conf, *args)
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tpl") / "var"
    assert cli.main(["init", str(d), "--domain", "example.com"], stdout=io.StringIO(), stderr=io.StringIO()) == 0
    return d


class FakeDMARC:
    def __init__(self, policies: dict[str, str] | None = None) -> None:
        self.policies = policies or {}
        self.asked: list[str] = []

    def policy(self, domain: str) -> str | None:
        self.asked.append(domain)
        return self.policies.get(domain)


class World:
    def __init__(self, root: Path, dmarc: FakeDMARC | None = None) -> None:
        self.conf = root / "tmmail.toml"
        self.settings = config.load(str(self.conf))
        self.store = ProviderStore(self.settings.config_dir, interval=0.0)
        self.spool = Spool(self.settings.spool_dir)
        self.dmarc = dmarc or FakeDMARC()
        self.conn = ListServerConnector(self.settings, self.store, self.spool, dmarc=self.dmarc)

    def cli(self, *args: str) -> str:
        return ok(self.conf, *args)

    def send(self, to_target: str, raw: bytes, sender: str = "poster@remote.example") -> PermanentError | None:
        path = self.settings.spool_dir + "/in.eml"
        with open(path, "wb") as f:
            f.write(raw)
        env = Envelope.new(queue_id="Q1", sender=sender, recipients=["x@example.com"])
        outcome = self.conn.deliver_blocking(env, [(Recipient("x@example.com"), InternalAddress.parse(to_target))],
                                             path)
        return outcome[0]

    def queued(self) -> list[tuple[Envelope, bytes]]:
        out = []
        for qid, env in self.spool.iter_envelopes(INCOMING):
            with open(self.spool.message_path(INCOMING, qid), "rb") as f:
                out.append((env, f.read()))
        return out

    def clear(self) -> None:
        for qid in self.spool.list(INCOMING):
            self.spool.remove(qid, INCOMING)


@pytest.fixture
def world(template, tmp_path) -> World:
    d = tmp_path / "var"
    shutil.copytree(template, d)
    return World(d)


POST = (b"From: Poster <poster@remote.example>\nTo: news@example.com\nSubject: Hello list\n"
        b"Message-ID: <p1@remote.example>\n\nfirst post\n")


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_open_list_distribution(world) -> None:
    world.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE", "--subject-prefix", "[news]",
              "--footer", "--\\nLeave: {request}")
    for m in ("a@remote.example", "b@other.example"):
        world.cli("list", "member", "add", "news@example.com", m)
    assert world.send("[LS:EXAMPLE/news]", POST) is None
    [(env, raw)] = world.queued()
    assert env.sender == "news-bounces@example.com"
    assert [r.address for r in env.recipients] == ["a@remote.example", "b@other.example"]
    msg = parse(raw)
    assert msg["List-Id"] == "<news.example.com>"
    assert msg["List-Post"] == "<mailto:news@example.com>"
    assert msg["List-Unsubscribe"] == "<mailto:news-request@example.com?subject=unsubscribe>"
    assert msg["List-Help"] == "<mailto:news-request@example.com?subject=help>"
    assert msg["Subject"] == "[news] Hello list"
    assert msg["From"] == "Poster <poster@remote.example>"  # no DMARC policy: From kept
    assert msg.get_content().endswith("first post\n\n--\nLeave: news-request@example.com\n")
    assert world.dmarc.asked == ["remote.example"]
    # a reply keeps a single prefix
    world.clear()
    world.send("[LS:EXAMPLE/news]", POST.replace(b"Subject: Hello list", b"Subject: Re: [news] Hello list"))
    [(_, raw)] = world.queued()
    assert parse(raw)["Subject"] == "Re: [news] Hello list"


def test_members_only(world) -> None:
    world.cli("list", "add", "club@example.com", "--postoffice", "EXAMPLE", "--members-only")
    world.cli("list", "member", "add", "club@example.com", "member@remote.example")
    err = world.send("[LS:EXAMPLE/club]", POST)
    assert isinstance(err, PermanentError) and err.reply().startswith("550 5.7.1")
    assert world.queued() == []
    ok_post = POST.replace(b"poster@remote.example", b"member@remote.example")
    assert world.send("[LS:EXAMPLE/club]", ok_post, sender="member@remote.example") is None
    [(env, _)] = world.queued()
    assert [r.address for r in env.recipients] == ["member@remote.example"]


def test_moderated(world) -> None:
    world.cli("list", "add", "ann@example.com", "--postoffice", "EXAMPLE", "--moderated", "--moderator",
              "boss@example.com")
    world.cli("list", "member", "add", "ann@example.com", "a@remote.example")
    # a non-moderator's post goes to the moderator, unchanged
    assert world.send("[LS:EXAMPLE/ann]", POST) is None
    [(env, raw)] = world.queued()
    assert [r.address for r in env.recipients] == ["boss@example.com"] and raw == POST
    world.clear()
    # the moderator's post (e.g. the approved one sent on) goes to all members
    mod = POST.replace(b"From: Poster <poster@remote.example>", b"From: boss@example.com")
    assert world.send("[LS:EXAMPLE/ann]", mod, sender="boss@example.com") is None
    [(env, raw)] = world.queued()
    assert [r.address for r in env.recipients] == ["a@remote.example"] and b"List-Id: <ann.example.com>" in raw


def test_loops_and_auto_mail_dropped(world) -> None:
    world.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE")
    world.cli("list", "member", "add", "news@example.com", "a@remote.example")
    world.send("[LS:EXAMPLE/news]", POST)
    [(_, copy)] = world.queued()
    world.clear()
    assert world.send("[LS:EXAMPLE/news]", copy, sender="news-bounces@example.com") is None  # came back
    assert world.send("[LS:EXAMPLE/news]", b"Auto-Submitted: auto-replied\n" + POST) is None
    assert world.send("[LS:EXAMPLE/news]", POST, sender="") is None
    assert world.queued() == []


def test_dmarc_rewrite_for_strict_domains(template, tmp_path) -> None:
    d = tmp_path / "var"
    shutil.copytree(template, d)
    w = World(d, FakeDMARC({"strict.example": "reject", "soft.example": "none"}))
    w.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE")
    w.cli("list", "member", "add", "news@example.com", "a@remote.example")
    w.send("[LS:EXAMPLE/news]", POST.replace(b"poster@remote.example", b"ann@strict.example"))
    [(_, raw)] = w.queued()
    msg = parse(raw)
    assert msg["From"].addresses[0].addr_spec == "news@example.com"
    assert msg["From"].addresses[0].display_name == "Poster via news"
    assert msg["Reply-To"] == "Poster <ann@strict.example>"
    w.clear()
    w.send("[LS:EXAMPLE/news]", POST.replace(b"poster@remote.example", b"bo@soft.example"))
    [(_, raw)] = w.queued()
    assert parse(raw)["From"] == "Poster <bo@soft.example>" and parse(raw)["Reply-To"] is None


def test_dmarc_lookup_against_dns(reactor_thread) -> None:
    from tests.dnsserver import TestDNS

    zone = TestDNS()
    zone.txt("_dmarc.strict.test", "v=DMARC1; p=reject; rua=mailto:x@strict.test")
    zone.txt("_dmarc.org.test", "v=DMARC1; p=none; sp=quarantine")
    zone.txt("_dmarc.none.test", "not a dmarc record")
    ns = zone.start(reactor_thread)
    look = DMARCLookup([ns], timeout=3.0)
    assert look.policy("strict.test") == "reject"
    assert look.policy("org.test") == "none"
    assert look.policy("mail.org.test") == "quarantine"  # organisational domain, sp=
    assert look.policy("none.test") is None
    assert look.policy("missing.test") is None


def test_subscribe_confirm_unsubscribe_by_mail(world) -> None:
    world.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE")
    req = b"From: New <new@remote.example>\nTo: news-request@example.com\nSubject: subscribe\n\n"
    assert world.send("[LS:EXAMPLE/news+request]", req, sender="new@remote.example") is None
    [(env, raw)] = world.queued()
    assert [r.address for r in env.recipients] == ["new@remote.example"]
    msg = parse(raw)
    subject = msg["Subject"]
    assert subject.startswith("confirm ") and msg["Reply-To"] == "news-request@example.com"
    assert ok(world.conf, "list", "member", "list", "news@example.com") == ""  # nothing until confirmed
    world.clear()
    # a forged confirmation from another address does nothing
    forged = f"From: evil@remote.example\nSubject: Re: {subject}\n\n".encode()
    world.send("[LS:EXAMPLE/news+request]", forged, sender="evil@remote.example")
    assert ok(world.conf, "list", "member", "list", "news@example.com") == ""
    world.clear()
    reply = f"From: new@remote.example\nSubject: Re: {subject}\n\n> quoted\n".encode()
    world.send("[LS:EXAMPLE/news+request]", reply, sender="new@remote.example")
    assert ok(world.conf, "list", "member", "list", "news@example.com") == "new@remote.example\tactive\tbounces=0\n"
    [(_, raw)] = world.queued()
    assert parse(raw)["Subject"] == "Welcome to news@example.com"
    world.clear()
    world.send("[LS:EXAMPLE/news+request]", b"From: new@remote.example\nSubject: unsubscribe\n\n",
               sender="new@remote.example")
    [(_, raw)] = world.queued()
    token = parse(raw)["Subject"]
    world.clear()
    world.send("[LS:EXAMPLE/news+request]", f"From: new@remote.example\nSubject: {token}\n\n".encode(),
               sender="new@remote.example")
    assert ok(world.conf, "list", "member", "list", "news@example.com") == ""


def test_expired_token_refused(world) -> None:
    world.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE")
    from tmmail.connectors.listserver_tables import lists

    ml = lists(world.store.reload()).find("news@example.com")[0]
    old = world.conn.token("subscribe", ml, "a@b.example", day=int(time.time() // 86400) - 30)
    assert world.conn.check_token(old, ml, "a@b.example") is None
    fresh = world.conn.token("subscribe", ml, "a@b.example")
    assert world.conn.check_token(fresh, ml, "a@b.example") == "subscribe"
    assert world.conn.check_token(fresh, ml, "c@b.example") is None


DSN = (b"From: MAILER-DAEMON@mx.remote.example\nTo: news-bounces@example.com\nSubject: failure\n"
       b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\n\n--B\n"
       b"Content-Type: text/plain\n\nfailed\n--B\nContent-Type: message/delivery-status\n\n"
       b"Reporting-MTA: dns; mx.remote.example\n\nFinal-Recipient: rfc822; Gone@remote.example\nAction: failed\n"
       b"Status: 5.1.1\n\nFinal-Recipient: rfc822; slow@remote.example\nAction: delayed\nStatus: 4.4.1\n--B--\n")


def test_bounces_counted_and_member_disabled(world) -> None:
    world.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE", "--bounce-limit", "2")
    for m in ("gone@remote.example", "slow@remote.example"):
        world.cli("list", "member", "add", "news@example.com", m)
    world.send("[LS:EXAMPLE/news+bounces]", DSN, sender="")
    members = ok(world.conf, "list", "member", "list", "news@example.com")
    assert "gone@remote.example\tactive\tbounces=1" in members and "slow@remote.example\tactive\tbounces=0" in members
    world.send("[LS:EXAMPLE/news+bounces]", DSN, sender="")
    assert "gone@remote.example\tdisabled\tbounces=2" in ok(world.conf, "list", "member", "list", "news@example.com")
    world.send("[LS:EXAMPLE/news]", POST)
    [(env, _)] = world.queued()
    assert [r.address for r in env.recipients] == ["slow@remote.example"]


def test_cli_refusals_and_listing(world) -> None:
    world.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE", "--moderated", "--moderator",
              "boss@example.com")
    assert run(world.conf, "list", "add", "news@example.com", "--postoffice", "EXAMPLE")[0] == 2
    assert run(world.conf, "list", "add", "x@example.com", "--postoffice", "EXAMPLE", "--moderated")[0] == 2
    assert run(world.conf, "list", "add", "a+b@example.com", "--postoffice", "EXAMPLE")[0] == 2
    assert run(world.conf, "list", "add", "news-request@example.com", "--postoffice", "EXAMPLE")[0] == 2
    assert run(world.conf, "group", "add", "news-owner@example.com", "--postoffice", "EXAMPLE")[0] == 2
    assert run(world.conf, "list", "member", "remove", "news@example.com", "nobody@x.example")[0] == 2
    assert ok(world.conf, "list", "list") == (
        "news@example.com\t[LS:EXAMPLE/news]\tenabled\tposting=moderated\tmembers=0/0\tmoderators=boss@example.com\n")
    ok(world.conf, "list", "remove", "news@example.com")
    assert ok(world.conf, "list", "list") == ""


# -- pure message functions ------------------------------------------------------------------


def test_footer_multipart_mixed_gets_new_part() -> None:
    raw = (b"From: a@b.example\nSubject: s\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"XX\"\n\n"
           b"preamble\n--XX\nContent-Type: text/plain\n\nbody\n--XX\nContent-Type: application/pdf\n"
           b"Content-Transfer-Encoding: base64\n\nJVBERi0=\n--XX--\n")
    out = M.add_header_footer(raw, "Top text", "Bottom text")
    msg = parse(out)
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/plain", "application/pdf", "text/plain"]
    assert parts[0].get_content().strip() == "Top text" and parts[-1].get_content().strip() == "Bottom text"
    assert parts[2].get_content() == b"%PDF-"  # the attachment's bytes untouched


def test_footer_wraps_signed_alternative_and_base64() -> None:
    for ctype, body in (
        (b"multipart/signed; protocol=\"application/pgp-signature\"; boundary=\"S\"",
         b"--S\nContent-Type: text/plain\n\nsigned text\n--S\nContent-Type: application/pgp-signature\n\nSIG\n--S--\n"),
        (b"text/plain; charset=utf-8\nContent-Transfer-Encoding: base64", b"aMOpbGxv\n"),
    ):
        raw = b"From: a@b.example\nSubject: s\nMIME-Version: 1.0\nContent-Type: " + ctype + b"\n\n" + body
        out = M.add_header_footer(raw, "", "Pied de page: café")
        msg = parse(out)
        assert msg.get_content_type() == "multipart/mixed"
        parts = list(msg.iter_parts())
        assert len(parts) == 2 and parts[1].get_content().strip() == "Pied de page: café"
        assert body in out  # the original part's bytes unchanged (a signature stays valid)


def test_command_parsing() -> None:
    assert M.parse_command(b"Subject: Re: confirm s4f2.abc123\n\n") == ("confirm", "s4f2.abc123")
    assert M.parse_command(b"Subject: \n\nunsubscribe\n") == ("unsubscribe", "")
    assert M.parse_command(b"Subject: SUBSCRIBE\n\n") == ("subscribe", "")
    assert M.parse_command(b"Subject: what is this\n\n") == ("help", "")
    assert M.failed_recipients(DSN) == ["gone@remote.example"]


def test_one_click_unsubscribe(template, tmp_path, reactor_thread) -> None:
    import urllib.error
    import urllib.request

    from twisted.web.server import Site

    from tmmail.connectors.listserver_web import UnsubscribeResource

    d = tmp_path / "var"
    shutil.copytree(template, d)
    with open(d / "tmmail.toml", "a") as f:
        f.write('\n[lists]\nunsubscribe_url = "https://lists.example.com/unsubscribe"\n')
    w = World(d)
    w.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE")
    for m in ("a@remote.example", "b@remote.example"):
        w.cli("list", "member", "add", "news@example.com", m)
    w.send("[LS:EXAMPLE/news]", POST)
    copies = {env.recipients[0].address: parse(raw) for env, raw in w.queued()}
    assert set(copies) == {"a@remote.example", "b@remote.example"}  # one copy per member
    msg = copies["a@remote.example"]
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = msg["List-Unsubscribe"].split(">")[0].lstrip("<")
    assert url.startswith("https://lists.example.com/unsubscribe?") and "member=a%40remote.example" in url

    port = reactor_thread.listen(Site(UnsubscribeResource(w.conn)))
    local = url.replace("https://lists.example.com", f"http://127.0.0.1:{port.getHost().port}")
    try:
        # GET shows a button and changes nothing (link checkers follow links)
        with urllib.request.urlopen(local, timeout=10) as r:
            assert r.status == 200 and b"<form method=\"post\">" in r.read()
        assert "a@remote.example" in ok(w.conf, "list", "member", "list", "news@example.com")
        # a tampered token is refused
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(local.replace("member=a", "member=b"),
                                                          data=b"List-Unsubscribe=One-Click"), timeout=10)
        assert e.value.code == 404
        req = urllib.request.Request(local, data=b"List-Unsubscribe=One-Click",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        assert ok(w.conf, "list", "member", "list", "news@example.com") == "b@remote.example\tactive\tbounces=0\n"
    finally:
        reactor_thread.call(port.stopListening)


def test_through_the_runner_into_maildirs(template, tmp_path, reactor_thread) -> None:
    """Spool -> runner -> list server -> spool -> runner -> post office, with the real reactor."""
    import os

    from twisted.internet import reactor

    from tmmail.connectors.postoffice import PostOfficeConnector
    from tmmail.runner import Runner
    from tmmail.spool import ACTIVE

    d = tmp_path / "var"
    shutil.copytree(template, d)
    toml = (d / "tmmail.toml").read_text().replace("[queue]\n", "[queue]\nscan_interval = 0.05\n", 1)
    (d / "tmmail.toml").write_text(toml)
    w = World(d)
    for user in ("alice", "bob"):  # postmaster@: made by tmmail init
        w.cli("mailbox", "add", f"{user}@example.com")
    w.cli("list", "add", "team@example.com", "--postoffice", "EXAMPLE", "--members-only", "--footer", "-- team")
    w.cli("list", "member", "add", "team@example.com", "alice@example.com")
    w.cli("list", "member", "add", "team@example.com", "bob@example.com")
    conns = [PostOfficeConnector(w.settings, w.store, reactor)]
    runner = Runner(w.settings, w.spool, w.store, conns, reactor)
    ls = ListServerConnector(w.settings, w.store, w.spool, reactor, on_queued=runner.wake, dmarc=w.dmarc)
    runner.connectors["LS"] = ls
    reactor_thread.call(runner.start)
    try:
        post = b"From: alice@example.com\nTo: team@example.com\nSubject: standup\n\nat ten\n"
        wr = w.spool.open_message()
        wr.write(post)
        wr.commit(Envelope.new(queue_id=wr.id, sender="alice@example.com", recipients=["team@example.com"]))
        runner.wake(wr.id)

        def inbox(user: str) -> list[bytes]:
            new = os.path.join(w.settings.postoffices_dir, "EXAMPLE", user, "Maildir", "new")
            return [open(os.path.join(new, n), "rb").read() for n in sorted(os.listdir(new))] if os.path.isdir(new) else []

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (inbox("alice") and inbox("bob")):
            time.sleep(0.05)
        for user in ("alice", "bob"):
            [raw] = inbox(user)
            msg = parse(raw)
            assert msg["List-Id"] == "<team.example.com>" and msg["Return-Path"] == "<team-bounces@example.com>"
            assert msg.get_content().endswith("at ten\n\n-- team\n")
        # a stranger's post is refused: the sender (a local mailbox here) gets the DSN
        wr = w.spool.open_message()
        wr.write(post.replace(b"alice@", b"postmaster@"))
        wr.commit(Envelope.new(queue_id=wr.id, sender="postmaster@example.com", recipients=["team@example.com"]))
        runner.wake(wr.id)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not inbox("postmaster"):
            time.sleep(0.05)
        [dsn] = inbox("postmaster")
        assert b"5.7.1" in dsn and b"Only members may post" in dsn
        assert len(inbox("alice")) == 1 and not w.spool.list(ACTIVE)
    finally:
        reactor_thread.call(runner.stop, 10.0)


def test_poster_is_the_envelope_sender_for_moderation_and_members(world) -> None:
    world.cli("list", "add", "club@example.com", "--postoffice", "EXAMPLE", "--members-only")
    world.cli("list", "member", "add", "club@example.com", "member@remote.example")
    # a From: naming a member does not make a stranger's post a member's
    forged = POST.replace(b"poster@remote.example", b"member@remote.example")
    err = world.send("[LS:EXAMPLE/club]", forged, sender="stranger@remote.example")
    assert isinstance(err, PermanentError) and err.reply().startswith("550 5.7.1")
    # the member's own post with another From: (an alias of theirs) is theirs
    assert world.send("[LS:EXAMPLE/club]", POST, sender="member@remote.example") is None
    world.clear()
    world.cli("list", "add", "ann@example.com", "--postoffice", "EXAMPLE", "--moderated", "--moderator",
              "boss@example.com")
    world.cli("list", "member", "add", "ann@example.com", "a@remote.example")
    as_boss = POST.replace(b"From: Poster <poster@remote.example>", b"From: boss@example.com")
    assert world.send("[LS:EXAMPLE/ann]", as_boss, sender="poster@remote.example") is None
    [(env, _)] = world.queued()
    assert [r.address for r in env.recipients] == ["boss@example.com"]  # held, From: approves nothing
    world.clear()
    # approval: the moderator sends the held post on unchanged (the poster's From: stays)
    assert world.send("[LS:EXAMPLE/ann]", POST, sender="boss@example.com") is None
    [(env, _)] = world.queued()
    assert [r.address for r in env.recipients] == ["a@remote.example"]


def test_bounce_count_starts_again_after_a_quiet_month(world) -> None:
    world.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE", "--bounce-limit", "2")
    world.cli("list", "member", "add", "news@example.com", "gone@remote.example")
    now = [time.time() - 31 * 86400]
    world.conn.clock = lambda: now[0]
    world.send("[LS:EXAMPLE/news+bounces]", DSN, sender="")
    # a month without a bounce since: the old one no longer counts (the listing says so too)
    assert "gone@remote.example\tactive\tbounces=0" in world.cli("list", "member", "list", "news@example.com")
    now[0] = time.time()
    world.send("[LS:EXAMPLE/news+bounces]", DSN, sender="")
    assert "gone@remote.example\tactive\tbounces=1" in world.cli("list", "member", "list", "news@example.com")
    now[0] += 60  # a second bounce soon after reaches the limit
    world.send("[LS:EXAMPLE/news+bounces]", DSN, sender="")
    assert "gone@remote.example\tdisabled\tbounces=2" in world.cli("list", "member", "list", "news@example.com")


def test_owner_mail_without_moderators_goes_to_the_postmaster_address(world) -> None:
    """LIST-owner@ of a list without moderators reaches the postmaster where tmmail init made it:
    a bare ``[queue] postmaster`` is taken in the primary domain (policy.postmaster_address), not
    in the host name (``localhost`` here, where no postmaster mailbox exists)."""
    import dataclasses

    world.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE")
    assert world.conn.hostname == "localhost"
    owner_mail = POST.replace(b"To: news@example.com", b"To: news-owner@example.com")
    assert world.send("[LS:EXAMPLE/news+owner]", owner_mail) is None
    [(env, raw)] = world.queued()
    assert [r.address for r in env.recipients] == ["postmaster@example.com"]
    assert env.sender == "poster@remote.example" and raw == owner_mail
    world.clear()
    for configured, expected in [("listmaster", "listmaster@example.com"),
                                 ("admin@elsewhere.example", "admin@elsewhere.example")]:
        settings = dataclasses.replace(world.settings,
                                       queue=dataclasses.replace(world.settings.queue, postmaster=configured))
        world.conn = ListServerConnector(settings, world.store, world.spool, dmarc=world.dmarc)
        assert world.send("[LS:EXAMPLE/news+owner]", owner_mail) is None
        [(env, _)] = world.queued()
        assert [r.address for r in env.recipients] == [expected], configured
        world.clear()
    # moderators, when the list has them, get the owner mail instead
    world.cli("list", "add", "ann@example.com", "--postoffice", "EXAMPLE", "--moderated", "--moderator",
              "boss@example.com")
    assert world.send("[LS:EXAMPLE/ann+owner]", owner_mail) is None
    [(env, _)] = world.queued()
    assert [r.address for r in env.recipients] == ["boss@example.com"]

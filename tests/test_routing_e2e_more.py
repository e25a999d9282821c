"""More routing end to end on one real server (``twistd tmmail``), SMTP in, real DNS on loopback,
a real receiving server (aiosmtpd) for every outside address:

* address map: a redirect without a copy, an alias that only loops refused at RCPT (5.4.6),
  a group with a looping and an unknown member (good branch delivered, bad branches in bad
  mail, the sender told, requeue routes only the fixed branch), ``[SF:PO/*]`` masks;
* transfer events on pickup and deliver: accept, reject with a DSN, quarantine (and release),
  tempfail and timeout (tried again, delivered once the hook accepts), and an in-process
  plug-in found through ``twisted/plugins``;
* lists: members-only, moderated, footer on plain and multipart posts, the DMARC From rewrite
  for ``p=reject`` (and none for ``p=none``), a member disabled after repeated bounces,
  unsubscribe by mail with confirmation;
* the bad-mail NDR for too many Received: headers arriving at the outside sender.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import stat
import sys
import time
import uuid

import pytest

from tests.dnsserver import TestDNS
from tests.server import Server
from tests.smtpsink import Sink, free_port

HOOK = """#!{python}
import os, re, sys, time
data = sys.stdin.buffer.read()
event = os.environ["TMMAIL_EVENT"].upper()
def done(code, text=""):
    with open(os.path.join({flags!r}, "hook.log"), "a") as f:
        f.write(f"{{event}} {{os.environ['TMMAIL_QUEUE_ID']}} {{code}}\\n")
    if text:
        print(text)
    sys.exit(code)
for m in re.finditer(rb"HOOK-(PICKUP|DELIVER)-(REJECT|QUARANTINE|TEMPFAIL|SLEEP)-(\\w+)", data):
    ev, action, token = (g.decode() for g in m.groups())
    if ev != event or os.path.exists(os.path.join({flags!r}, token)):
        continue
    if action == "REJECT":
        done(1, "refused by the test hook")
    if action == "QUARANTINE":
        done(3, "held by the test hook")
    if action == "TEMPFAIL":
        done(75, "scanner busy")
    time.sleep(30)
done(0)
"""

MAILBOXES = ("alice", "bob", "away", "ghostly", "boss") + tuple(f"h{i}" for i in range(1, 9))


def message(to: str, subject: str, body: str = "hello\r\n", sender: str = "carol@remote.test",
            extra: str = "") -> bytes:
    return (f"From: Carol <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}"
            f"Message-ID: <{uuid.uuid4().hex}@remote.test>\r\n\r\n{body}").encode()


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


@pytest.fixture(scope="module")
def zone(reactor_thread):
    z = TestDNS()
    z.address = z.start(reactor_thread)
    yield z
    z.stop(reactor_thread)


@pytest.fixture(scope="module")
def env(tmp_path_factory, zone):
    """One server for the module; every test uses its own addresses and subjects."""
    root = tmp_path_factory.mktemp("routing_more")
    port = free_port()
    for domain in ("remote.test", "strict.test", "relaxed.test"):
        zone.mx(domain, [(10, "mx.remote.test")])
    zone.a("mx.remote.test", "127.0.0.52")
    zone.txt("_dmarc.strict.test", "v=DMARC1; p=reject; rua=mailto:d@strict.test")
    zone.txt("_dmarc.relaxed.test", "v=DMARC1; p=none")
    flags = root / "flags"
    flags.mkdir()
    hook = root / "hook"
    hook.write_text(HOOK.format(python=sys.executable, flags=str(flags)))
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    # the in-process plug-in: a drop-in module in a twisted/plugins folder on the Python path
    plugpath = root / "plugpath"
    (plugpath / "twisted" / "plugins").mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(__file__), "plugins_fixture", "tmmail_testguard.py"),
                plugpath / "twisted" / "plugins")
    srv = Server(root / "srv").init(
        f'[relay]\nmx_port = {port}\nconnect_timeout = 3.0\ncommand_timeout = 10.0\n'
        f'[dns]\nnameservers = ["{zone.address}"]\ntimeout = 2.0\n'
        '[queue]\nretry_initial = 1.0\nretry_max = 1.0\nscan_interval = 0.1\n'
    )
    with open(srv.config, "a") as f:
        f.write(f'\n[[events.pickup]]\ncommand = ["{hook}"]\ntimeout = 3\n'
                f'\n[[events.deliver]]\ncommand = ["{hook}"]\ntimeout = 3\n'
                '\n[[events.deliver]]\nplugin = "testguard"\noptions = { word = "FORBIDDEN-WORD" }\n')
    for user in MAILBOXES:
        srv.add_mailbox(f"{user}@example.com", password=None)
    srv.cli("mailbox", "redirect", "away@example.com", "--to", "far2@remote.test")
    # loops and bad branches
    srv.cli("alias", "add", "loopa@example.com", "loopb@example.com")
    srv.cli("alias", "add", "loopb@example.com", "loopa@example.com")
    srv.cli("group", "add", "team@example.com", "--postoffice", "EXAMPLE")
    for m in ("bob@example.com", "loopa@example.com", "ghost@example.com"):
        srv.cli("group", "member", "add", "team@example.com", m)
    # [SF:PO/*]: another domain whose local parts are EXAMPLE's mailboxes
    srv.cli("postoffice", "add", "OTHER")
    srv.cli("domain", "add", "alias.test", "--postoffice", "OTHER")
    srv.cli("alias", "add", "*@alias.test", "[SF:EXAMPLE/*]")
    # lists
    srv.cli("list", "add", "club@example.com", "--postoffice", "EXAMPLE", "--members-only")
    srv.cli("list", "add", "ann@example.com", "--postoffice", "EXAMPLE", "--moderated", "--moderator",
            "boss@remote.test")
    srv.cli("list", "add", "foot@example.com", "--postoffice", "EXAMPLE", "--footer", "--\\nTo leave: mail {request}")
    srv.cli("list", "add", "dm@example.com", "--postoffice", "EXAMPLE")
    srv.cli("list", "add", "bl@example.com", "--postoffice", "EXAMPLE", "--bounce-limit", "2")
    srv.cli("list", "add", "leave@example.com", "--postoffice", "EXAMPLE")
    for ml, m in (("club", "alice@example.com"), ("club", "dave@remote.test"), ("ann", "alice@example.com"),
                  ("ann", "bob@example.com"), ("foot", "alice@example.com"), ("dm", "h8@example.com"),
                  ("bl", "h7@example.com"), ("bl", "gone@remote.test"), ("leave", "quitter@remote.test"),
                  ("leave", "h7@example.com")):
        srv.cli("list", "member", "add", f"{ml}@example.com", m)
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(plugpath), old_path) if p)
    with Sink(address="127.0.0.52", port=port) as sink:
        sink.script.rcpt["gone@remote.test"] = "550 5.1.1 <gone@remote.test>: no such user"
        try:
            srv.start(roles=["smtp"])
        finally:
            if old_path is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old_path
        try:
            yield srv, sink, flags
        finally:
            srv.stop()


def send(srv: Server, rcpts: list[str], data: bytes, sender: str = "carol@remote.test") -> dict:
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        return s.sendmail(sender, rcpts, data)


def subjects(srv: Server, address: str) -> list[str]:
    return [parse(m)["Subject"] for m in srv.messages(address)]


def wait_subject(srv: Server, address: str, subject: str, timeout: float = 15.0) -> bytes:
    return srv.wait_for(lambda: [m for m in srv.messages(address) if parse(m)["Subject"] == subject],
                        timeout=timeout)[0]


def at_sink(sink: Sink, rcpt: str, needle: bytes) -> list:
    return [m for m in list(sink.messages) if rcpt in m.rcpt_tos and needle in m.content]


def wait_sink(srv: Server, sink: Sink, rcpt: str, needle: bytes, timeout: float = 15.0):
    return srv.wait_for(lambda: at_sink(sink, rcpt, needle), timeout=timeout)[0]


def lines(srv: Server, *args: str) -> list[str]:
    return srv.cli(*args).stdout.splitlines()


def quiet(seconds: float = 1.0) -> None:
    """Give the server time to do what it must not do (deliver twice, deliver at all)."""
    time.sleep(seconds)


# -- address map -------------------------------------------------------------------------------


def test_redirect_without_copy(env) -> None:
    srv, sink, _ = env
    send(srv, ["away@example.com"], message("away@example.com", "redirected only"))
    got = wait_sink(srv, sink, "far2@remote.test", b"redirected only")
    assert got.mail_from.startswith("SRS0=") and got.mail_from.endswith("@example.com")
    quiet()
    assert srv.messages("away@example.com") == []  # no copy kept


def test_alias_that_only_loops_refused_with_a_clear_reply(env) -> None:
    srv, _, _ = env
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        s.ehlo("client.test")
        s.mail("carol@remote.test")
        code, text = s.rcpt("loopa@example.com")
        assert code == 550
        assert text.decode() == "5.4.6 <loopa@example.com>: Recipient address rejected: routing loop in the address map"
        code, text = s.rcpt("nobody@example.com")
        assert code == 550 and text.startswith(b"5.1.1")


def test_group_with_a_looping_and_an_unknown_member(env) -> None:
    srv, sink, _ = env
    send(srv, ["team@example.com"], message("team@example.com", "team news"))
    wait_subject(srv, "bob@example.com", "team news")
    bad = srv.wait_for(lambda: [ln for ln in lines(srv, "badmail", "list") if "team@example.com" in ln])
    srv.wait_for(lambda: len([ln for ln in lines(srv, "badmail", "list") if "team@example.com" in ln]) == 2)
    bad = [ln for ln in lines(srv, "badmail", "list") if "team@example.com" in ln]
    text = "\n".join(bad)
    assert "550 5.4.6 <team@example.com>: Expansion of [SMTP:loopa@example.com] failed (mail loop:" in text
    assert "550 5.1.1 <team@example.com>: Expansion of [SMTP:ghost@example.com] failed" in text
    # the sender learns which members failed, and why
    ndr = wait_sink(srv, sink, "carol@remote.test", b"Expansion of [SMTP:ghost@example.com]")
    assert b"Expansion of [SMTP:loopa@example.com]" in ndr.content and b"5.4.6" in ndr.content
    assert ndr.mail_from in ("", "<>")
    # fix the table (ghost becomes an alias of a mailbox), requeue: only that branch again
    srv.cli("alias", "add", "ghost@example.com", "ghostly@example.com")
    qid = bad[0].split("\t")[0]
    srv.cli("badmail", "requeue", qid)
    wait_subject(srv, "ghostly@example.com", "team news")
    quiet()
    assert subjects(srv, "bob@example.com").count("team news") == 1
    # the loop is still a loop: back in bad mail with its notice
    srv.wait_for(lambda: any("Expansion of [SMTP:loopa@example.com]" in ln and ln.startswith(qid)
                             for ln in lines(srv, "badmail", "list")))


def test_mask_into_mailbox_of_the_same_name(env) -> None:
    srv, _, _ = env
    send(srv, ["bob@alias.test"], message("bob@alias.test", "via the alias domain"))
    wait_subject(srv, "bob@example.com", "via the alias domain")
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        s.ehlo("client.test")
        s.mail("carol@remote.test")
        code, text = s.rcpt("nobody@alias.test")
        assert code == 550 and text.startswith(b"5.1.1")


def test_too_many_hops_ndr_reaches_the_sender(env) -> None:
    srv, sink, _ = env
    hops = "".join(f"Received: from hop{i}.test by hop{i + 1}.test; Sun, 22 Nov 2026 07:00:00 +0000\r\n"
                   for i in range(31))
    send(srv, ["h1@example.com"], message("h1@example.com", "hop hop hop", extra=hops))
    ndr = wait_sink(srv, sink, "carol@remote.test", b"Subject: hop hop hop")
    assert b"5.4.6" in ndr.content and b"Too many hops" in ndr.content
    assert ndr.mail_from in ("", "<>")
    assert "hop hop hop" not in subjects(srv, "h1@example.com")


# -- transfer events ------------------------------------------------------------------------------


def test_hooks_accept_clean_mail(env) -> None:
    srv, _, flags = env
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        s.ehlo("client.test")
        s.mail("carol@remote.test")
        s.rcpt("h2@example.com")
        code, reply = s.data(message("h2@example.com", "accepted by both hooks"))
    qid = reply.decode().rsplit(" ", 1)[-1]
    wait_subject(srv, "h2@example.com", "accepted by both hooks")
    # both events asked the program about this very message, and it said accept
    log = (flags / "hook.log").read_text().splitlines()
    assert f"PICKUP {qid} 0" in log and f"DELIVER {qid} 0" in log


@pytest.mark.parametrize("event", ["pickup", "deliver"])
def test_hook_rejects_with_dsn(env, event) -> None:
    srv, sink, _ = env
    subject = f"refused at {event}"
    send(srv, ["h3@example.com"], message("h3@example.com", subject, body=f"HOOK-{event.upper()}-REJECT-x\r\n"))
    dsn = wait_sink(srv, sink, "carol@remote.test", f"Subject: {subject}".encode())
    assert b"refused by the test hook" in dsn.content and b"5.7.1" in dsn.content
    assert b"HOOK-" not in dsn.content  # headers only: refused content is never sent back out
    quiet()
    assert subject not in subjects(srv, "h3@example.com")


@pytest.mark.parametrize("event", ["pickup", "deliver"])
def test_hook_quarantines_and_release_delivers(env, event) -> None:
    srv, _, _ = env
    subject = f"held at {event}"
    send(srv, ["h4@example.com"], message("h4@example.com", subject, body=f"HOOK-{event.upper()}-QUARANTINE-x\r\n"))
    line = srv.wait_for(lambda: [ln for ln in lines(srv, "quarantine", "list") if "h4@example.com" in ln
                                 and ln.split("\t")[0] not in released])
    quiet()
    assert subject not in subjects(srv, "h4@example.com")
    qid = line[0].split("\t")[0]
    released.add(qid)
    srv.cli("quarantine", "release", qid)
    # delivered after all: the hook that quarantined it is not asked again
    wait_subject(srv, "h4@example.com", subject)
    assert not [ln for ln in lines(srv, "quarantine", "list") if ln.startswith(qid)]


released: set[str] = set()


@pytest.mark.parametrize("event", ["pickup", "deliver"])
@pytest.mark.parametrize("action", ["TEMPFAIL", "SLEEP"])
def test_hook_tempfail_or_timeout_retries(env, event, action) -> None:
    srv, _, flags = env
    token = f"t{uuid.uuid4().hex[:12]}"
    subject = f"{action.lower()} at {event}"
    send(srv, ["h5@example.com"], message("h5@example.com", subject, body=f"HOOK-{event.upper()}-{action}-{token}\r\n"))
    expected = "content check timed out" if action == "SLEEP" else "scanner busy"
    srv.wait_for(lambda: [ln for ln in lines(srv, "queue", "list") if "h5@example.com" in ln
                          and "4.7.1" in ln and expected in ln], timeout=20)
    assert subject not in subjects(srv, "h5@example.com")
    (flags / token).write_text("")  # the scanner is back
    wait_subject(srv, "h5@example.com", subject, timeout=20)


def test_plugin_from_twisted_plugins_rejects(env) -> None:
    srv, sink, _ = env
    send(srv, ["h6@example.com"], message("h6@example.com", "plugin refuses", body="FORBIDDEN-WORD\r\n"))
    send(srv, ["h6@example.com"], message("h6@example.com", "plugin passes", body="fine words\r\n"))
    wait_subject(srv, "h6@example.com", "plugin passes")
    dsn = wait_sink(srv, sink, "carol@remote.test", b"Subject: plugin refuses")
    assert b"Refused by testguard at deliver" in dsn.content
    assert "plugin refuses" not in subjects(srv, "h6@example.com")


# -- lists ---------------------------------------------------------------------------------------


def test_members_only_list(env) -> None:
    srv, sink, _ = env
    send(srv, ["club@example.com"], message("club@example.com", "from a stranger"))
    dsn = wait_sink(srv, sink, "carol@remote.test", b"Subject: from a stranger")
    assert b"5.7.1" in dsn.content
    send(srv, ["club@example.com"], message("club@example.com", "from a member", sender="dave@remote.test"),
         sender="dave@remote.test")
    got = parse(wait_subject(srv, "alice@example.com", "from a member"))
    assert got["List-Id"] == "<club.example.com>"
    assert "from a stranger" not in subjects(srv, "alice@example.com")


def test_moderated_list(env) -> None:
    srv, sink, _ = env
    post = message("ann@example.com", "please announce")
    send(srv, ["ann@example.com"], post)
    held = wait_sink(srv, sink, "boss@remote.test", b"Subject: please announce")
    assert b"List-Id" not in held.content and post.replace(b"\r\n", b"\n").split(b"\n\n")[1] in \
        held.content.replace(b"\r\n", b"\n")
    quiet()
    assert "please announce" not in subjects(srv, "alice@example.com")
    # the moderator sends it on unchanged: everybody gets it
    send(srv, ["ann@example.com"], post, sender="boss@remote.test")
    for member in ("alice@example.com", "bob@example.com"):
        got = parse(wait_subject(srv, member, "please announce"))
        assert got["List-Id"] == "<ann.example.com>" and got["From"] == "Carol <carol@remote.test>"


def test_footer_on_plain_and_multipart(env) -> None:
    srv, _, _ = env
    send(srv, ["foot@example.com"], message("foot@example.com", "plain post", body="just text\r\n"))
    plain = parse(wait_subject(srv, "alice@example.com", "plain post"))
    assert plain.get_content_type() == "text/plain"
    assert plain.get_content().rstrip().endswith("just text\n\n--\nTo leave: mail foot-request@example.com")
    mixed = ("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n", (
        "--XX\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
        "--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        "Content-Disposition: attachment; filename=\"a.bin\"\r\n\r\nAAECAwQF\r\n--XX--\r\n"))
    send(srv, ["foot@example.com"], message("foot@example.com", "multipart post", body=mixed[1], extra=mixed[0]))
    msg = parse(wait_subject(srv, "alice@example.com", "multipart post"))
    parts = list(msg.iter_parts())
    assert msg.get_content_type() == "multipart/mixed" and len(parts) == 3
    assert parts[0].get_content().strip() == "see attachment"
    assert parts[1].get_content() == bytes(range(6)) and parts[1].get_filename() == "a.bin"
    assert "To leave: mail foot-request@example.com" in parts[2].get_content()


@pytest.mark.parametrize("domain,rewritten", [("strict.test", True), ("relaxed.test", False)])
def test_dmarc_from_rewrite(env, domain, rewritten) -> None:
    srv, _, _ = env
    poster = f"pat@{domain}"
    send(srv, ["dm@example.com"], message("dm@example.com", f"post from {domain}", sender=poster), sender=poster)
    got = parse(wait_subject(srv, "h8@example.com", f"post from {domain}"))
    if rewritten:
        assert got["From"].addresses[0].addr_spec == "dm@example.com"
        assert "via dm" in got["From"].addresses[0].display_name
        assert poster in str(got["Reply-To"])
    else:
        assert got["From"] == f"Carol <{poster}>" and got["Reply-To"] is None


def test_member_disabled_after_repeated_bounces(env) -> None:
    srv, sink, _ = env

    def member_line() -> str:
        return next(ln for ln in lines(srv, "list", "member", "list", "bl@example.com") if ln.startswith("gone@"))

    for i in (1, 2):
        # gone@remote.test is refused by its server; our report goes to bl-bounces@ and counts
        send(srv, ["bl@example.com"], message("bl@example.com", f"bounce me {i}"))
        wait_subject(srv, "h7@example.com", f"bounce me {i}")
        srv.wait_for(lambda: f"bounces={i}" in member_line())
    assert member_line() == "gone@remote.test\tdisabled\tbounces=2"
    before = len(sink.messages)
    send(srv, ["bl@example.com"], message("bl@example.com", "after disabling"))
    wait_subject(srv, "h7@example.com", "after disabling")
    quiet()
    assert not [m for m in list(sink.messages)[before:] if b"after disabling" in m.content]


def test_unsubscribe_by_mail_with_confirmation(env) -> None:
    srv, sink, _ = env
    who = "quitter@remote.test"
    send(srv, ["leave-request@example.com"], message("leave-request@example.com", "unsubscribe", sender=who),
         sender=who)
    confirm = wait_sink(srv, sink, who, b"Subject: confirm ")
    assert f"{who}\tactive" in srv.cli("list", "member", "list", "leave@example.com").stdout  # not yet
    subject = parse(confirm.content)["Subject"]
    send(srv, ["leave-request@example.com"], message("leave-request@example.com", f"Re: {subject}", sender=who),
         sender=who)
    srv.wait_for(lambda: who not in srv.cli("list", "member", "list", "leave@example.com").stdout)
    wait_sink(srv, sink, who, b"Subject: You have left leave@example.com")
    send(srv, ["leave@example.com"], message("leave@example.com", "after leaving"))
    wait_subject(srv, "h7@example.com", "after leaving")
    quiet()
    assert not at_sink(sink, who, b"after leaving")

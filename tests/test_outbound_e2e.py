"""Outbound mail end to end: spool -> runner -> SMTP connector -> receiving servers on 127.0.0.x.

In-process: the real Runner, Spool, post office connector (for the DSNs back to the local
sender) and SMTP connector, a loopback DNS server and aiosmtpd receivers.  The last test runs
the real server (``twistd tmmail``), kills it with SIGKILL in the middle of a delivery and
restarts it.
"""

from __future__ import annotations

import email
import email.policy
import io
import os
import smtplib
import threading
import time
from typing import Any, Callable

import pytest
from twisted.internet import reactor

from tests.dnsserver import TestDNS
from tests.server import Server
from tests.smtpsink import Sink, free_port
from tmmail import cli, config
from tmmail.cli_queue import BOUNCE_REPLY, HOLD
from tmmail.connectors.postoffice import PostOfficeConnector
from tmmail.connectors.smtp import SMTPConnector
from tmmail.envelope import DELIVERED, Envelope
from tmmail.providers import ProviderStore
from tmmail.runner import Runner
from tmmail.spool import ACTIVE, DEFERRED, INCOMING, Spool

MSG = b"From: alice@example.com\nTo: bob@far.test\nSubject: outbound\n\n.dot first\nbody\n"


def wait_for(pred: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s")
        time.sleep(0.02)


def report_fields(raw: bytes) -> tuple[str, list[dict[str, str]]]:
    """(human-readable text, per-recipient fields) of an RFC 3464 report."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    parts = msg.get_payload()
    text = parts[0].get_content()
    status = parts[1].get_payload()
    if parts[1].get_content_type() == "message/global-delivery-status":
        # RFC 6533: the email package takes it for one message: its header is the first group
        first = status[0]
        rest = first.get_payload()
        status = [first] + [email.message_from_string(g) for g in rest.strip("\n").split("\n\n") if g.strip()]
    # "type; value" or "type;value": both are RFC 3464; compare without the optional space
    return text, [{k: v.replace("; ", ";", 1) for k, v in g.items()} for g in status[1:]]


def report_head(raw: bytes) -> dict[str, str]:
    """The per-message fields of a report (Reporting-MTA, Original-Envelope-Id, ...)."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return dict(msg.get_payload()[1].get_payload()[0].items())


def returned_part(raw: bytes) -> tuple[str, bytes]:
    """(content type, bytes) of the third part: the message or its header sent back."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    part = msg.get_payload()[2]
    inner = part.get_payload()
    if isinstance(inner, list):  # message/rfc822
        inner = inner[0].as_bytes()
    elif isinstance(inner, str):
        inner = inner.encode()
    return part.get_content_type(), inner


@pytest.fixture(scope="module")
def zone(reactor_thread):
    z = TestDNS()
    z.address = z.start(reactor_thread)
    yield z
    z.stop(reactor_thread)


class World:
    """Spool + runner + connectors in tmp_path; ``alice@example.com`` is a local mailbox."""

    def __init__(self, tmp_path, reactor_thread, zone, mx_port: int, **queue: Any) -> None:
        cfg = tmp_path / "config"
        cfg.mkdir(exist_ok=True)
        (cfg / "DOMAINS.tab").write_text("example.com\tACME\t1\n")
        (cfg / "POSTOFFICE.tab").write_text("ACME\t1\n")
        (cfg / "MAILBOX.tab").write_text("ACME\tALICE\t1\t0\nACME\tPOSTMASTER\t1\t0\n")
        q = {"scan_interval": 0.05, "retry_initial": 0.3, "retry_max": 0.6, "io_threads": 2,
             "postmaster": "postmaster@example.com"}
        q.update(queue)
        data = {
            "server": {"hostname": "mx.example.com", "state_dir": str(tmp_path), "config_dir": str(cfg)},
            "queue": q,
            "relay": {"mx_port": mx_port, "connect_timeout": 3.0, "command_timeout": 5.0},
            "dns": {"nameservers": [zone.address], "timeout": 2.0},
        }
        self.settings = config.parse(data)
        # the same settings as a file, for `tmmail queue ...`
        self.conf = tmp_path / "tmmail.toml"
        self.conf.write_text(
            f'[server]\nhostname = "mx.example.com"\nstate_dir = "{tmp_path}"\nconfig_dir = "{cfg}"\n'
        )
        self.rt = reactor_thread
        self.store = ProviderStore(str(cfg))
        self.spool = Spool(self.settings.spool_dir)
        self.smtp = SMTPConnector(self.settings, self.store, reactor, idle_seconds=0.2)
        conns = [PostOfficeConnector(self.settings, self.store, reactor), self.smtp]
        self.runner = Runner(self.settings, self.spool, self.store, conns, reactor)
        self.rt.call(self.runner.start)

    def stop(self) -> None:
        self.rt.call(self.runner.stop, 10.0)
        self.rt.call(self.smtp.close)

    def send(self, rcpts: list[str], data: bytes = MSG, **kw: Any) -> str:
        w = self.spool.open_message()
        w.write(data)
        w.commit(Envelope.new(queue_id=w.id, sender=kw.pop("sender", "alice@example.com"), recipients=rcpts, **kw))
        self.runner.wake(w.id)
        return w.id

    def reports(self) -> list[bytes]:
        new = os.path.join(self.settings.postoffices_dir, "ACME", "ALICE", "Maildir", "new")
        if not os.path.isdir(new):
            return []
        return [open(os.path.join(new, n), "rb").read() for n in sorted(os.listdir(new))]

    def gone(self, qid: str) -> bool:
        return not any(
            os.path.exists(os.path.join(self.spool.root, s, qid + ".env")) for s in (INCOMING, ACTIVE, DEFERRED, HOLD)
        )

    def envelope(self, qid: str) -> Envelope | None:
        for state in (DEFERRED, ACTIVE, INCOMING):
            try:
                return self.spool.load(state, qid)
            except (FileNotFoundError, ValueError):
                continue
        return None

    def queue(self, *argv: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--config", str(self.conf), "queue", *argv], stdin=io.StringIO(), stdout=out, stderr=err)
        return status, out.getvalue() + err.getvalue()


@pytest.fixture
def world(tmp_path, reactor_thread, zone):
    zone.clear()
    port = free_port()
    worlds = []

    def make(**queue: Any) -> World:
        w = World(tmp_path, reactor_thread, zone, port, **queue)
        worlds.append(w)
        return w

    make.port = port
    yield make
    for w in worlds:
        w.stop()


def mx(zone, domain: str, address: str) -> None:
    zone.mx(domain, [(10, f"mx.{domain}")])
    zone.a(f"mx.{domain}", address)


def test_remote_delivery_byte_identical_and_spool_emptied(world, zone):
    w = world()
    mx(zone, "far.test", "127.0.0.31")
    body = MSG + b"".join(b"." * (i % 7) + b"line %d\n" % i for i in range(5000))
    with Sink(address="127.0.0.31", port=world.port) as sink:
        qid = w.send(["bob@far.test"], data=body)
        wait_for(lambda: w.gone(qid), what="message delivered")
    assert len(sink.messages) == 1
    assert sink.messages[0].content == body.replace(b"\n", b"\r\n")
    assert sink.messages[0].mail_from == "alice@example.com"
    assert w.reports() == []


def test_4xx_then_success_after_retry(world, zone):
    w = world()
    mx(zone, "far.test", "127.0.0.32")
    with Sink(address="127.0.0.32", port=world.port) as sink:
        sink.script.rcpt["bob@far.test"] = "450 4.2.0 greylisted, come back later"
        qid = w.send(["bob@far.test"])
        env = wait_for(lambda: (e := w.envelope(qid)) and e.recipients[0].attempts >= 1
                       and e.recipients[0].state == "deferred" and e, what="first attempt deferred")
        assert env.recipients[0].last_reply == "450 4.2.0 greylisted, come back later"
        assert env.recipients[0].remote_mta == "mx.far.test"
        del sink.script.rcpt["bob@far.test"]
        wait_for(lambda: w.gone(qid), what="delivered on retry")
    assert [m.rcpt_tos for m in sink.messages] == [["bob@far.test"]]
    assert w.reports() == []


def test_5xx_sends_dsn_with_the_remote_reply(world, zone):
    w = world()
    mx(zone, "far.test", "127.0.0.33")
    with Sink(address="127.0.0.33", port=world.port) as sink:
        sink.script.rcpt["nobody@far.test"] = "550 5.1.1 <nobody@far.test>: Recipient address rejected"
        qid = w.send(["bob@far.test", "nobody@far.test"])
        wait_for(lambda: w.gone(qid) and w.reports(), what="bounce")
    assert [m.rcpt_tos for m in sink.messages] == [["bob@far.test"]]
    (report,) = w.reports()
    assert b"Return-Path: <>" in report
    text, fields = report_fields(report)
    assert len(fields) == 1
    f = fields[0]
    assert f["Final-Recipient"] == "rfc822;nobody@far.test"
    assert f["Action"] == "failed" and f["Status"] == "5.1.1"
    assert f["Remote-MTA"] == "dns;mx.far.test"
    assert f["Diagnostic-Code"] == "smtp;550 5.1.1 <nobody@far.test>: Recipient address rejected"
    assert "Recipient address rejected" in text


def test_4xx_until_lifetime_expires_delay_notice_then_final_dsn(world, zone):
    w = world(lifetime=2.0, delay_notice_after=0.6, retry_initial=0.25, retry_max=0.25)
    mx(zone, "far.test", "127.0.0.34")
    with Sink(address="127.0.0.34", port=world.port) as sink:
        sink.script.rcpt["bob@far.test"] = "452 4.2.2 mailbox full"
        qid = w.send(["bob@far.test"])
        wait_for(lambda: len(w.reports()) >= 2 and w.gone(qid), timeout=20, what="delay notice and bounce")
    assert sink.messages == []
    reports = [report_fields(r)[1][0] for r in w.reports()]
    assert [r["Action"] for r in reports] == ["delayed", "failed"]
    assert reports[0]["Status"].startswith("4.") and "Will-Retry-Until" in reports[0]
    assert reports[1]["Status"] == "4.2.2" or reports[1]["Status"].startswith("5.")
    assert reports[1]["Diagnostic-Code"] == "smtp;452 4.2.2 mailbox full"
    assert reports[1]["Remote-MTA"] == "dns;mx.far.test"


def test_two_domains_in_one_message_two_transactions(world, zone):
    w = world()
    mx(zone, "one.test", "127.0.0.35")
    mx(zone, "two.test", "127.0.0.36")
    with Sink(address="127.0.0.35", port=world.port) as one, Sink(address="127.0.0.36", port=world.port) as two:
        qid = w.send(["a@one.test", "c@two.test", "b@ONE.test"])
        wait_for(lambda: w.gone(qid), what="both domains delivered")
    assert [m.rcpt_tos for m in one.messages] == [["a@one.test", "b@one.test"]]  # domains are lower-cased
    assert [m.rcpt_tos for m in two.messages] == [["c@two.test"]]


def test_bounce_of_a_bounce_is_not_bounced(world, zone):
    w = world()
    mx(zone, "far.test", "127.0.0.37")
    with Sink(address="127.0.0.37", port=world.port) as sink:
        sink.script.rcpt["x@far.test"] = "550 5.1.1 no such user"
        qid = w.send(["x@far.test"], sender="")
        wait_for(lambda: w.gone(qid), what="failed report finished")
        time.sleep(0.3)
    # nothing goes back to <>: the postmaster hears of it instead
    assert w.reports() == []
    pm = os.path.join(w.settings.postoffices_dir, "ACME", "POSTMASTER", "Maildir", "new")
    assert len(os.listdir(pm)) == 1


def test_queue_commands_while_the_runner_runs(world, zone):
    w = world(retry_initial=3600.0, retry_max=3600.0)
    mx(zone, "far.test", "127.0.0.38")
    with Sink(address="127.0.0.38", port=world.port) as sink:
        sink.script.rcpt["bob@far.test"] = "451 4.3.0 try later"
        ids = [w.send(["bob@far.test"], data=MSG + b"%d\n" % i) for i in range(4)]
        wait_for(lambda: all(w.envelope(q) and w.envelope(q).recipients[0].attempts == 1
                             and q in w.spool.list(DEFERRED) for q in ids), what="all deferred")
        status, out = w.queue("list")
        assert status == 0 and out.count("451 4.3.0 try later") == 4
        del sink.script.rcpt["bob@far.test"]
        held, flushed, bounced, deleted = ids

        assert w.queue("hold", held)[0] == 0
        assert w.queue("flush", flushed)[0] == 0
        wait_for(lambda: w.gone(flushed), what="flushed message delivered")
        assert w.queue("bounce", bounced)[0] == 0
        wait_for(lambda: w.gone(bounced) and w.reports(), what="administrator's bounce")
        assert w.queue("delete", deleted)[0] == 0
        time.sleep(0.5)
        assert not w.gone(held)  # still held: nothing tried
        assert len(sink.messages) == 1
        assert w.queue("release", held)[0] == 0
        wait_for(lambda: w.gone(held), what="released message delivered")
    assert len(sink.messages) == 2
    assert {m.content.rstrip(b"\r\n")[-1:] for m in sink.messages} == {b"0", b"1"}
    (report,) = w.reports()
    _, fields = report_fields(report)
    assert fields[0]["Diagnostic-Code"] == "X-TMmail;" + BOUNCE_REPLY  # the administrator, not a peer
    assert "Remote-MTA" not in fields[0]
    assert w.queue("list")[1] == "0 messages in the queue\n"


# -- RFC 3461 parameters end to end ---------------------------------------------------------


def settled(w: World, qid: str, reports: int) -> list[bytes]:
    """Wait for the message to leave the queue with ``reports`` reports, and for no more."""
    wait_for(lambda: w.gone(qid) and len(w.reports()) >= reports, what=f"{reports} reports")
    time.sleep(0.4)  # a report queued late would show up by now
    got = w.reports()
    assert len(got) == reports, [report_fields(r)[1] for r in got]
    return got


@pytest.mark.parametrize("dsn", [True, False])
def test_notify_success_relayed_notice_only_when_the_next_hop_has_no_dsn(world, zone, dsn):
    """RFC 3461 §5.2.1 / §5.2.2: a DSN-capable next hop gets NOTIFY and ORCPT and reports
    the success itself; to one without DSN we say "relayed" (RFC 3464 §2.3.3)."""
    w = world()
    mx(zone, "far.test", "127.0.0.43")
    with Sink(address="127.0.0.43", port=world.port, dsn=dsn) as sink:
        qid = w.send(["bob@far.test"], rcpt_params={"bob@far.test": {"NOTIFY": "SUCCESS,FAILURE",
                                                                      "ORCPT": "rfc822;Bob@far.test"}})
        got = settled(w, qid, 0 if dsn else 1)
    assert [m.rcpt_tos for m in sink.messages] == [["bob@far.test"]]
    if dsn:
        assert sink.messages[0].rcpt_dsn == [{"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;Bob@far.test"}]
        return
    assert sink.messages[0].rcpt_options == [[]]  # no NOTIFY/ORCPT to a server without DSN
    text, (f,) = report_fields(got[0])
    assert f["Action"] == "relayed" and f["Status"] == "2.0.0"
    assert f["Final-Recipient"] == "rfc822;bob@far.test" and f["Original-Recipient"] == "rfc822;Bob@far.test"
    assert f["Remote-MTA"] == "dns;mx.far.test" and "Diagnostic-Code" not in f
    assert "relayed" in text


def test_notify_failure_gets_no_delay_notice_delay_failure_does(world, zone):
    w = world(lifetime=1.6, delay_notice_after=0.4, retry_initial=0.25, retry_max=0.25)
    mx(zone, "far.test", "127.0.0.44")
    with Sink(address="127.0.0.44", port=world.port) as sink:
        sink.script.rcpt["quiet@far.test"] = "452 4.2.2 mailbox full"
        sink.script.rcpt["eager@far.test"] = "452 4.2.2 mailbox full"
        qid = w.send(["quiet@far.test", "eager@far.test"],
                     rcpt_params={"quiet@far.test": {"NOTIFY": "FAILURE"}, "eager@far.test": {"NOTIFY": "DELAY,FAILURE"}})
        got = settled(w, qid, 2)
    delayed, failed = (report_fields(r)[1] for r in got)
    # the delay notice names only the recipient that asked for one
    assert [(f["Final-Recipient"], f["Action"]) for f in delayed] == [("rfc822;eager@far.test", "delayed")]
    assert sorted((f["Final-Recipient"], f["Action"]) for f in failed) == [
        ("rfc822;eager@far.test", "failed"), ("rfc822;quiet@far.test", "failed")]


def test_notify_never_with_a_remote_5xx_sends_nothing(world, zone):
    w = world()
    mx(zone, "far.test", "127.0.0.45")
    with Sink(address="127.0.0.45", port=world.port) as sink:
        sink.script.rcpt["gone@far.test"] = "550 5.1.1 no such user"
        qid = w.send(["gone@far.test"], rcpt_params={"gone@far.test": {"NOTIFY": "NEVER"}})
        settled(w, qid, 0)
    assert sink.messages == []
    pm = os.path.join(w.settings.postoffices_dir, "ACME", "POSTMASTER", "Maildir", "new")
    assert not os.path.isdir(pm) or os.listdir(pm) == []


@pytest.mark.parametrize("ret", ["HDRS", "FULL"])
def test_ret_chooses_headers_or_full_message_in_the_failure_report(world, zone, ret):
    w = world()
    mx(zone, "far.test", "127.0.0.46")
    with Sink(address="127.0.0.46", port=world.port) as sink:
        sink.script.rcpt["gone@far.test"] = "550 5.1.1 no such user"
        qid = w.send(["gone@far.test"], mail_params={"RET": ret})
        (report,) = settled(w, qid, 1)
    ctype, returned = returned_part(report)
    assert b"Subject: outbound" in returned
    if ret == "HDRS":
        assert ctype == "text/rfc822-headers" and b"body" not in returned
    else:
        assert ctype == "message/rfc822" and returned.replace(b"\r\n", b"\n").endswith(b"\n\n.dot first\nbody\n")


def test_envid_and_orcpt_are_reported_decoded_and_passed_on_as_xtext(world, zone):
    """RFC 3461 §4.4 / §4.2 carry ENVID and ORCPT as xtext; RFC 3464 §2.2.1 / §2.3.1 report
    the values themselves: "+2B" is "+", "+3D" is "=", while a control character stays
    encoded (no field injection)."""
    w = world()
    mx(zone, "far.test", "127.0.0.47")
    envid = "QQ+2B1+3Dx+0D+0AX-Evil:+20y"
    with Sink(address="127.0.0.47", port=world.port) as sink:
        sink.script.rcpt["gone@far.test"] = "550 5.1.1 no such user"
        qid = w.send(["bob@far.test", "gone@far.test"], mail_params={"ENVID": envid}, rcpt_params={
            "bob@far.test": {"ORCPT": "rfc822;Bob+2Bold@far.test"},
            "gone@far.test": {"ORCPT": "rfc822;Gone+2Bold@far.test"}})
        (report,) = settled(w, qid, 1)
    # the next hop gets the xtext as the client sent it
    (m,) = sink.messages
    assert m.mail_dsn["ENVID"] == envid and m.rcpt_dsn == [{"ORCPT": "rfc822;Bob+2Bold@far.test"}]
    head = report_head(report)
    assert head["Original-Envelope-Id"] == "QQ+1=x+0D+0AX-Evil: y"
    assert "X-Evil" not in report_head(report).keys()
    _, (f,) = report_fields(report)
    assert f["Original-Recipient"] == "rfc822;Gone+old@far.test" and f["Final-Recipient"] == "rfc822;gone@far.test"


# -- errors TMmail makes up itself are not the remote server's -------------------------------


def local_failure(report: bytes) -> dict[str, str]:
    text, (f,) = report_fields(report)
    assert "Remote-MTA" not in f, f
    assert f["Diagnostic-Code"].startswith("X-TMmail;"), f
    assert " said:" not in text  # the human part does not put it in a peer's mouth
    return f


def test_size_refused_before_sending_is_our_reply_not_the_peers(world, zone):
    w = world()
    mx(zone, "far.test", "127.0.0.48")
    with Sink(address="127.0.0.48", port=world.port, size_limit=200) as sink:
        qid = w.send(["bob@far.test"], data=MSG + b"x" * 300 + b"\n")
        (report,) = settled(w, qid, 1)
    assert sink.messages == []
    f = local_failure(report)
    assert f["Status"] == "5.3.4" and "exceeds the fixed maximum of mx.far.test[127.0.0.48]" in f["Diagnostic-Code"]


def test_smtputf8_refusal_is_our_reply_not_the_peers(world, zone):
    w = world()
    mx(zone, "far.test", "127.0.0.49")
    with Sink(address="127.0.0.49", port=world.port, smtputf8=False) as sink:
        qid = w.send(["jos\u00e9@far.test"])
        (report,) = settled(w, qid, 1)
    assert sink.messages == []
    f = local_failure(report)
    assert f["Status"] == "5.6.7" and f["Final-Recipient"].startswith("utf-8;jos")  # RFC 6533 type


def test_dns_failure_is_reported_without_a_remote_mta(world, zone):
    w = world()  # nothing in the zone: far.test does not exist
    qid = w.send(["bob@nowhere.test"])
    (report,) = settled(w, qid, 1)
    f = local_failure(report)
    assert f["Status"] == "5.1.2" and "NXDOMAIN" in f["Diagnostic-Code"]


def test_lost_connection_is_our_reply_and_names_the_host_in_its_text(world, zone):
    w = world(delay_notice_after=0.01, retry_initial=3600.0, retry_max=3600.0)
    mx(zone, "far.test", "127.0.0.50")
    with Sink(address="127.0.0.50", port=world.port) as sink:
        sink.script.data = "drop"  # close after the data, without a reply
        # queued a minute ago: the delay notice is due at the first deferral, however fast
        qid = w.send(["bob@far.test"], arrival=time.time() - 60)
        wait_for(lambda: w.reports(), what="delay notice")
    env = w.envelope(qid)
    assert env.recipients[0].state == "deferred" and env.recipients[0].remote_mta == ""
    f = local_failure(w.reports()[0])
    assert f["Action"] == "delayed" and f["Status"] == "4.4.2"
    assert "mx.far.test[127.0.0.50]" in f["Diagnostic-Code"]


# -- the real server, killed in the middle of a delivery ---------------------------------------


def test_server_killed_during_delivery_delivers_each_recipient_exactly_once(tmp_path, reactor_thread, zone):
    zone.clear()
    port = free_port()
    mx(zone, "one.test", "127.0.0.41")
    mx(zone, "two.test", "127.0.0.42")
    srv = Server(tmp_path / "srv").init(
        f'[relay]\nmx_port = {port}\nconnect_timeout = 3.0\ncommand_timeout = 30.0\n'
        f'[dns]\nnameservers = ["{zone.address}"]\ntimeout = 2.0\n'
        '[queue]\nretry_initial = 1.0\nretry_max = 1.0\nscan_interval = 0.1\n'
    )
    with open(os.path.join(srv.root, "config", "SMTP-ACCESS.tab"), "a") as f:
        f.write("127.0.0.1\t1\ttests relay from loopback\n")
    gate = threading.Event()
    with Sink(address="127.0.0.41", port=port) as one, Sink(address="127.0.0.42", port=port) as two:
        two.script.gate["c@two.test"] = gate
        srv.start(roles=["smtp"])
        try:
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
                s.sendmail("sender@elsewhere.test", ["a@one.test", "b@one.test", "c@two.test"], MSG.replace(b"\n", b"\r\n"))
            wait_for(lambda: one.messages, what="first domain delivered")
            active = os.path.join(srv.root, "spool", "active")

            def one_saved() -> bool:
                for name in os.listdir(active):
                    if name.endswith(".env"):
                        env = Envelope.from_bytes(open(os.path.join(active, name), "rb").read())
                        states = {r.address: r.state for r in env.recipients}
                        return states.get("a@one.test") == DELIVERED and states.get("b@one.test") == DELIVERED
                return False

            wait_for(one_saved, what="first domain's outcome saved")
            assert wait_for(two.script.waiting.is_set, what="second domain in RCPT")
            srv.kill()
        finally:
            gate.set()  # the dead session's RCPT completes; its DATA never comes
            srv.stop()
        assert two.messages == []
        srv.start(roles=["smtp"])
        try:
            wait_for(lambda: two.messages, timeout=20, what="second domain delivered after restart")
            wait_for(lambda: not any(os.listdir(os.path.join(srv.root, "spool", d))
                                     for d in ("incoming", "active", "deferred")), what="queue empty")
            time.sleep(0.5)
        finally:
            srv.stop()
    assert [m.rcpt_tos for m in one.messages] == [["a@one.test", "b@one.test"]]
    assert [m.rcpt_tos for m in two.messages] == [["c@two.test"]]
    # the server added its Received: header; the rest is the message as sent
    assert two.messages[0].content.endswith(MSG.replace(b"\n", b"\r\n"))
    assert two.messages[0].content.startswith(b"Received: ")


def test_mx_without_starttls_logs_the_plaintext_fallback(tmp_path, reactor_thread, zone):
    """The real server relays to an MX that offers no STARTTLS: the mail goes in clear text
    and twistd.log says so at warning level, naming the peer (as the other TLS fallbacks)."""
    zone.clear()
    port = free_port()
    mx(zone, "plain.test", "127.0.0.52")
    srv = Server(tmp_path / "srv").init(
        f'[relay]\nmx_port = {port}\nconnect_timeout = 3.0\ncommand_timeout = 10.0\n'
        f'[dns]\nnameservers = ["{zone.address}"]\ntimeout = 2.0\n'
        '[queue]\nscan_interval = 0.1\n'
    )
    with open(os.path.join(srv.root, "config", "SMTP-ACCESS.tab"), "a") as f:
        f.write("127.0.0.1\t1\ttests relay from loopback\n")
    with Sink(address="127.0.0.52", port=port) as sink:  # no tls= : no STARTTLS in its EHLO
        srv.start(roles=["smtp"])
        try:
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
                s.sendmail("sender@elsewhere.test", ["bob@plain.test"], MSG.replace(b"\n", b"\r\n"))
            wait_for(lambda: sink.messages, what="relayed")
            peer = f"mx.plain.test[127.0.0.52]:{port}"
            line = srv.wait_for(lambda: next((ln for ln in open(srv.logfile).read().splitlines()
                                               if "does not offer STARTTLS" in ln), None))
        finally:
            srv.stop()
    assert sink.messages[0].tls is False
    assert "#warn]" in line and f"{peer} does not offer STARTTLS; sending without TLS" in line

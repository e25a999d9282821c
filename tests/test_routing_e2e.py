"""Routing end to end on the real server (``twistd tmmail``): SMTP in, groups, sub-addressing,
redirect with SRS to a receiving server on 127.0.0.x, SRS bounces back, forged SRS refused at
RCPT, a list, the hop limit into bad mail, and a scanner hook refusing the EICAR test string."""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
import stat
import sys
import time
import uuid

import pytest

from tests.dnsserver import TestDNS
from tests.server import Server
from tests.smtpsink import Sink, free_port

EICAR = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

SCANNER = f"""#!{sys.executable}
import sys
data = sys.stdin.buffer.read()
if b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE" in data:
    print("stream: Eicar-Signature FOUND")
    sys.exit(1)
sys.exit(0)
"""


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
    """One server for the module (starting twistd is the slow part); tests use distinct addresses."""
    root = tmp_path_factory.mktemp("routing")
    port = free_port()
    zone.mx("remote.test", [(10, "mx.remote.test")])
    zone.a("mx.remote.test", "127.0.0.51")
    scanner = root / "scanner"
    scanner.write_text(SCANNER)
    scanner.chmod(scanner.stat().st_mode | stat.S_IXUSR)
    srv = Server(root / "srv").init(
        f'[relay]\nmx_port = {port}\nconnect_timeout = 3.0\ncommand_timeout = 10.0\n'
        f'[dns]\nnameservers = ["{zone.address}"]\ntimeout = 2.0\n'
        '[queue]\nretry_initial = 1.0\nretry_max = 1.0\nscan_interval = 0.1\n'
        '[router]\nsubaddress_folders = true\n'
    )
    with open(srv.config, "a") as f:
        f.write(f'\n[[events.pickup]]\ncommand = ["{scanner}"]\ntimeout = 30\n'
                'reject_text = "Message refused: virus found"\n')
    for user in ("alice", "bob", "fwd"):  # postmaster@: made by tmmail init
        srv.add_mailbox(f"{user}@example.com")
    srv.cli("group", "add", "staff@example.com", "--postoffice", "EXAMPLE")
    srv.cli("group", "add", "ops@example.com", "--postoffice", "EXAMPLE")
    for g, m in (("staff", "alice@example.com"), ("staff", "bob@example.com"), ("staff", "ops@example.com"),
                 ("ops", "bob@example.com"), ("ops", "staff@example.com")):
        srv.cli("group", "member", "add", f"{g}@example.com", m)
    srv.cli("mailbox", "redirect", "fwd@example.com", "--to", "far@remote.test", "--keep-copy")
    srv.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE", "--subject-prefix", "[news]")
    srv.cli("list", "member", "add", "news@example.com", "alice@example.com")
    srv.cli("list", "member", "add", "news@example.com", "reader@remote.test")
    os.makedirs(os.path.join(srv.maildir("alice@example.com"), ".Lists", "cur"), exist_ok=True)
    for sub in ("new", "tmp"):
        os.makedirs(os.path.join(srv.maildir("alice@example.com"), ".Lists", sub), exist_ok=True)
    with Sink(address="127.0.0.51", port=port) as sink:
        srv.start(roles=["smtp"])
        try:
            yield srv, sink
        finally:
            srv.stop()


def send(srv: Server, rcpts: list[str], data: bytes, sender: str = "carol@remote.test") -> dict:
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        return s.sendmail(sender, rcpts, data)


def subjects(srv: Server, address: str) -> list[str]:
    return [parse(m)["Subject"] for m in srv.messages(address)]


def wait_subject(srv: Server, address: str, subject: str, count: int = 1) -> None:
    srv.wait_for(lambda: sum(1 for s in subjects(srv, address) if s == subject) >= count)


def test_group_each_member_once(env) -> None:
    srv, _ = env
    send(srv, ["staff@example.com", "ops@example.com"], message("staff@example.com", "for the staff"))
    wait_subject(srv, "alice@example.com", "for the staff")
    wait_subject(srv, "bob@example.com", "for the staff")
    time.sleep(0.5)
    assert subjects(srv, "alice@example.com").count("for the staff") == 1
    assert subjects(srv, "bob@example.com").count("for the staff") == 1


def test_subaddress_into_folder(env) -> None:
    srv, _ = env
    send(srv, ["alice+Lists@example.com", "bob+whatever@example.com"], message("x", "tagged"))
    folder = os.path.join(srv.maildir("alice@example.com"), ".Lists", "new")
    srv.wait_for(lambda: os.listdir(folder))
    wait_subject(srv, "bob@example.com", "tagged")
    assert "tagged" not in subjects(srv, "alice@example.com")  # INBOX untouched


def test_redirect_with_srs_and_bounce_back(env) -> None:
    srv, sink = env
    send(srv, ["fwd@example.com"], message("fwd@example.com", "forward me"))
    wait_subject(srv, "fwd@example.com", "forward me")  # the copy kept
    got = srv.wait_for(lambda: [m for m in sink.messages if b"forward me" in m.content])
    srs_sender = got[0].mail_from
    assert got[0].rcpt_tos == ["far@remote.test"]
    assert srs_sender.startswith("SRS0=") and srs_sender.endswith("@example.com")
    assert "remote.test=carol" in srs_sender
    # the bounce of the forward comes back to the SRS address and is returned to carol
    # (remote.test: it leaves through the MX again, with <> as sender)
    bounce = message(srs_sender, "Undelivered Mail Returned to Sender", sender="MAILER-DAEMON@remote.test")
    assert send(srv, [srs_sender], bounce, sender="") == {}
    back = srv.wait_for(lambda: [m for m in sink.messages if b"Undelivered Mail Returned" in m.content])
    assert back[0].rcpt_tos == ["carol@remote.test"] and back[0].mail_from in ("", "<>")
    # forged SRS refused at RCPT
    forged = srs_sender.replace("=carol@", "=mallory@")
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        s.ehlo("client.test")
        s.mail("")
        code, _ = s.rcpt(forged)
        assert code == 550


def test_list_distribution(env) -> None:
    srv, sink = env
    send(srv, ["news@example.com"], message("news@example.com", "List news"))
    wait_subject(srv, "alice@example.com", "[news] List news")
    msg = parse(srv.messages("alice@example.com")[-1])
    assert msg["List-Id"] == "<news.example.com>"
    assert msg["Return-Path"] == "<news-bounces@example.com>"
    remote = srv.wait_for(lambda: [m for m in sink.messages if b"[news] List news" in m.content])
    assert remote[0].mail_from == "news-bounces@example.com"


def test_too_many_hops_go_to_badmail(env) -> None:
    srv, _ = env
    hops = "".join(f"Received: from hop{i}.test by hop{i + 1}.test; Sun, 22 Nov 2026 07:00:00 +0000\r\n"
                   for i in range(31))
    send(srv, ["bob@example.com"], message("bob@example.com", "looping", extra=hops))
    line = srv.wait_for(lambda: [ln for ln in srv.cli("badmail", "list").stdout.splitlines()
                                 if "bob@example.com" in ln])
    assert "5.4.6" in line[0]
    assert "looping" not in subjects(srv, "bob@example.com")


def test_scanner_hook_refuses_eicar(env) -> None:
    srv, sink = env
    send(srv, ["alice@example.com"], message("alice@example.com", "infected", body=EICAR + "\r\n"))
    send(srv, ["alice@example.com"], message("alice@example.com", "clean", body="nothing here\r\n"))
    wait_subject(srv, "alice@example.com", "clean")
    # the sender gets the report (through the MX of remote.test); alice never sees the virus
    report = srv.wait_for(lambda: [m for m in sink.messages if b"virus found" in m.content])
    assert report[0].rcpt_tos == ["carol@remote.test"]
    assert "infected" not in subjects(srv, "alice@example.com")


def test_list_subscribe_round_trip_by_mail(env) -> None:
    srv, sink = env
    req = message("news-request@example.com", "subscribe", sender="joiner@remote.test")
    send(srv, ["news-request@example.com"], req, sender="joiner@remote.test")
    confirm = srv.wait_for(lambda: [m for m in sink.messages
                                    if m.rcpt_tos == ["joiner@remote.test"] and b"Subject: confirm " in m.content])
    subject = parse(confirm[0].content)["Subject"]
    assert "joiner@remote.test" not in srv.cli("list", "member", "list", "news@example.com").stdout
    reply = message("news-request@example.com", f"Re: {subject}", sender="joiner@remote.test")
    send(srv, ["news-request@example.com"], reply, sender="joiner@remote.test")
    srv.wait_for(lambda: "joiner@remote.test\tactive" in srv.cli("list", "member", "list", "news@example.com").stdout)
    srv.wait_for(lambda: [m for m in sink.messages if m.rcpt_tos == ["joiner@remote.test"]
                          and b"Subject: Welcome to news@example.com" in m.content])

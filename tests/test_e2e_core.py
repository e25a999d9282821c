"""The core path end to end: tmmail init + CLI, twistd tmmail, SMTP in, Maildir, POP3 out.

Real server process, real sockets on 127.0.0.1, real clients (smtplib, swaks, poplib, fetchmail).
"""

from __future__ import annotations

import os
import poplib
import smtplib
import socket
import subprocess
import threading
import time
import uuid

import pytest

from tests.conftest import require_tool
from tests.server import Server, client_tls

ALICE = "alice@example.com"
BOB = "bob@example.com"


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "tm").init()
    srv.add_mailbox(ALICE, "alice-pw")
    srv.add_mailbox(BOB, "bob-pw")
    srv.start()
    yield srv
    srv.stop()


def make_message(subject: str, body: str) -> bytes:
    return (
        f"From: Carol <carol@remote.example>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@remote.example>\r\n\r\n{body}"
    ).encode()


def pop3_messages(server: Server, user: str, password: str, delete: bool = False) -> list[bytes]:
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    pop.stls(client_tls())
    pop.user(user)
    pop.pass_(password)
    count, _ = pop.stat()
    out = []
    for i in range(1, count + 1):
        _, lines, _ = pop.retr(i)
        out.append(b"\r\n".join(lines) + b"\r\n")
        if delete:
            pop.dele(i)
    pop.quit()
    return out


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def test_smtplib_to_pop3_byte_exact(server):
    body = "Hello Alice,\r\n.leading dot\r\n..two dots\r\nend\r\n"
    msg = make_message("first", body)
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.ehlo("client.example")
        refused = s.sendmail("carol@remote.example", [ALICE], msg)
        assert refused == {}
    server.wait_for(lambda: server.messages(ALICE))
    got = pop3_messages(server, ALICE, "alice-pw")
    assert len(got) == 1
    raw = got[0]
    headers = raw.split(b"\r\n\r\n", 1)[0]
    assert headers.startswith(b"Return-Path: <carol@remote.example>\r\n")
    assert b"\r\nDelivered-To: alice@example.com\r\n" in headers
    assert b"\r\nReceived: from client.example" in headers
    # everything the client sent arrives unchanged after our trace headers
    assert raw.endswith(msg)
    assert body_of(raw) == body.encode()
    # and on disk: LF line endings, durable in new/
    assert server.messages(BOB) == []


def test_unknown_local_user_refused_at_rcpt(server):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.ehlo("client.example")
        s.mail("carol@remote.example")
        code, text = s.rcpt("nobody@example.com")
        assert code == 550 and text.startswith(b"5.1.1")
        code, text = s.rcpt("someone@elsewhere.example")
        assert code == 554 and b"5.7.1" in text
        code, _ = s.rcpt(BOB)
        assert code == 250


def test_swaks_delivery(server):
    swaks = require_tool("swaks")
    r = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(server.ports["smtp"]), "--from", "dave@remote.example",
         "--to", BOB, "--header", "Subject: via swaks", "--body", "swaks body line", "--pipeline"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 Ok: queued as" in r.stdout
    server.wait_for(lambda: server.messages(BOB))
    got = pop3_messages(server, BOB, "bob-pw")
    assert len(got) == 1 and b"Subject: via swaks" in got[0] and b"swaks body line" in got[0]


def test_fetchmail_retrieves_and_deletes(server, tmp_path):
    fetchmail = require_tool("fetchmail")
    msgs = [make_message(f"fm {i}", f"fetchmail body {i}\r\n.dot line {i}\r\n") for i in range(3)]
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        for m in msgs:
            s.sendmail("carol@remote.example", [ALICE], m)
    server.wait_for(lambda: len(server.messages(ALICE)) == 3)
    outdir = tmp_path / "fetched"
    outdir.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f'poll 127.0.0.1 service {server.ports["pop3"]} protocol pop3 auth password\n'
        f'  user "{ALICE}" there with password "alice-pw" is "{os.environ.get("USER", "root")}" here\n'
        f'  sslproto "TLS1.2+" no sslcertck\n'
        f'  mda "/bin/sh -c \'cat > {outdir}/msg.$$$$\'"\n'
    )
    rc.chmod(0o600)
    env = dict(os.environ, FETCHMAILHOME=str(tmp_path), HOME=str(tmp_path))
    r = subprocess.run([fetchmail, "-f", str(rc), "--nodetach", "--nosyslog"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    fetched = [p.read_bytes() for p in outdir.iterdir()]
    assert len(fetched) == 3
    for m in msgs:
        # fetchmail hands the MDA LF line endings; compare the original in that form
        assert sum(1 for f in fetched if f.endswith(m.replace(b"\r\n", b"\n"))) == 1
    # fetchmail deletes by default: the mailbox is empty now, and a second run finds nothing
    assert server.messages(ALICE) == []


def test_hostile_smuggling_stores_nothing_extra_and_keeps_serving(server):
    """A bare-LF end-of-data and a long line must not smuggle a second message."""
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            line = f.readline()
            while line[3:4] == b"-":
                line = f.readline()
            return line

        assert reply().startswith(b"220")
        s.sendall(b"EHLO x\r\n")
        assert reply().startswith(b"250")
        s.sendall(b"MAIL FROM:<a@remote.example>\r\n")
        assert reply().startswith(b"250")
        s.sendall(b"RCPT TO:<alice@example.com>\r\n")
        assert reply().startswith(b"250")
        s.sendall(b"DATA\r\n")
        assert reply().startswith(b"354")
        s.sendall(b"Subject: one\r\n\r\nbody\n.\nMAIL FROM:<evil@remote.example>\r\n"
                  b"RCPT TO:<bob@example.com>\r\nDATA\r\nSubject: SMUGGLED\r\n\r\nx\r\n.\r\n")
        r = reply()
        assert r[:1] == b"5", r
        s.sendall(b"QUIT\r\n")
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO x\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
        lines = [f.readline() for _ in range(4)]
        while not lines[-1].startswith(b"354"):
            lines.append(f.readline())
        s.sendall(b"Subject: long\r\n\r\n" + b"x" * 20000 + b"\r\nMAIL FROM:<e@remote.example>\r\n"
                  b"RCPT TO:<bob@example.com>\r\nDATA\r\nSubject: SMUGGLED2\r\n\r\n.\r\n")
        r = f.readline()
        assert r[:1] == b"5", r
    # the server still serves the next client and nothing was smuggled
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.sendmail("carol@remote.example", [BOB], make_message("after", "fine\r\n"))
    server.wait_for(lambda: server.messages(BOB))
    time.sleep(0.5)
    stored = server.messages(ALICE) + server.messages(BOB)
    assert not any(b"SMUGGLED" in m for m in stored)
    assert len(server.messages(BOB)) == 1
    assert server.messages(ALICE) == []


def test_crash_loses_no_acknowledged_message(tmp_path):
    srv = Server(tmp_path / "tm").init()
    srv.add_mailbox(ALICE, "pw")
    srv.start(roles=("smtp",))
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(n: int) -> None:
        for i in range(200):
            if stop.is_set():
                return
            tag = f"crash-{n}-{i}-{uuid.uuid4().hex}"
            try:
                with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=5) as s:
                    s.sendmail("c@remote.example", [ALICE], f"Subject: {tag}\r\n\r\n{tag}\r\n".encode())
            except (OSError, smtplib.SMTPException):
                return
            with lock:
                acked.append(tag)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with lock:
            if len(acked) >= 60:
                break
        time.sleep(0.02)
    srv.kill()
    stop.set()
    for t in threads:
        t.join(15)
    assert len(acked) >= 20, "the load never got going"
    srv.start(roles=("smtp",))
    try:
        def all_there():
            msgs = srv.messages(ALICE)
            return len(msgs) >= len(acked) and msgs

        srv.wait_for(all_there, timeout=60)
        time.sleep(1.0)
        msgs = srv.messages(ALICE)
        for tag in acked:
            count = sum(1 for m in msgs if f"Subject: {tag}\n".encode() in m)
            assert count == 1, f"{tag} delivered {count} times"
        subjects = [m.split(b"Subject: ", 1)[1].split(b"\n", 1)[0] for m in msgs]
        assert len(subjects) == len(set(subjects)), "a message was delivered twice"
    finally:
        srv.stop()


def test_admin_changes_reach_the_running_server(server):
    """postoffice/domain/mailbox/alias added with the CLI work without a restart."""
    from imapclient import IMAPClient

    server.cli("postoffice", "add", "ACME")
    server.cli("domain", "add", "acme.test", "--postoffice", "ACME")
    server.add_mailbox("joe@acme.test", "joe-pw")
    server.cli("alias", "add", "*@acme.test", "[SF:ACME/joe]")

    def accepted():
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
            s.ehlo("client.example")
            s.mail("carol@remote.example")
            return s.rcpt("anything@acme.test")[0] == 250

    server.wait_for(accepted, timeout=10, interval=0.2)
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.sendmail("carol@remote.example", ["joe@acme.test", "sales@acme.test"],
                   b"Subject: to acme\r\n\r\nhello joe\r\n")
    # one message for two recipients that resolve to the same mailbox: one copy
    server.wait_for(lambda: server.messages("joe@acme.test"))
    time.sleep(0.5)
    assert len(server.messages("joe@acme.test")) == 1
    with IMAPClient("127.0.0.1", port=server.ports["imap"], ssl=False, timeout=10) as c:
        c.starttls(client_tls())
        c.login("joe@acme.test", "joe-pw")
        c.select_folder("INBOX")
        uids = c.search(["SUBJECT", "to acme"])
        assert len(uids) == 1
        body = c.fetch(uids, ["BODY[TEXT]"])[uids[0]][b"BODY[TEXT]"]
        assert body == b"hello joe\r\n"
    # a duplicate mailbox is refused with one line and exit status 2
    r = server.cli("mailbox", "add", "joe@acme.test", check=False)
    assert r.returncode == 2 and r.stderr.strip() and "\n" not in r.stderr.strip()


def test_parallel_deliveries_never_pass_the_quota(tmp_path):
    """Six SMTP sessions at once to a mailbox with room for two: two land, four wait.

    The post office runs two delivery jobs in threads at once; each used to check the quota
    on its own, so two parallel messages both fitted into room for one.
    """
    srv = Server(tmp_path / "tm").init()
    body = "x" * 76 + "\r\n"
    messages = [f"Subject: quota {i}\r\n\r\n".encode() + (body * 25).encode() for i in range(6)]
    # each stored copy is ~2.1K (message + Received/Return-Path/Delivered-To); room for two
    srv.add_mailbox(ALICE, "pw", quota="5000")
    srv.start(roles=("smtp",))
    try:
        barrier = threading.Barrier(len(messages))
        errors: list[BaseException] = []

        def send(msg: bytes) -> None:
            try:
                with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
                    s.ehlo("client.example")
                    s.mail("carol@remote.example")
                    s.rcpt(ALICE)
                    barrier.wait(10)  # every session ends its DATA at the same moment
                    code, _ = s.data(msg)
                    assert code == 250
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=send, args=(m,)) for m in messages]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors

        def settled():
            rows = [line.split("\t") for line in srv.cli("queue", "list").stdout.splitlines()]
            deferred = [r for r in rows if r[1] == "deferred" and int(r[6]) >= 1]
            return len(deferred) == 4 and deferred

        deferred = srv.wait_for(settled, timeout=20)
        stored = srv.messages(ALICE)
        assert len(stored) == 2
        assert sum(len(m) for m in stored) <= 5000
        assert all(r[8].startswith("452 4.2.2") for r in deferred), deferred
        # the queued ones are the other four messages, none was lost or stored twice
        subjects = {m.split(b"Subject: ", 1)[1].split(b"\n", 1)[0] for m in stored}
        assert len(subjects) == 2
    finally:
        srv.stop()


def test_postmaster_of_a_fresh_init(tmp_path):
    """RFC 5321 §4.5.1 on a server made by `tmmail init --hostname H --domain D` alone.

    <Postmaster> (any case, no domain), postmaster@D and postmaster@ a domain added later all
    reach init's postmaster mailbox, and a report about <> mail that failed goes there too
    instead of to postmaster@H (not hosted: it used to be relayed and fail on DNS).
    """
    srv = Server(tmp_path / "tm", hostname="mail.example.com", domain="example.com").init(
        "[queue]\nscan_interval = 0.1\n")
    srv.add_mailbox(ALICE, "alice-pw", quota="1K")
    srv.cli("postoffice", "add", "ACME")
    srv.cli("domain", "add", "acme.test", "--postoffice", "ACME")
    srv.cli("mailbox", "passwd", "postmaster@example.com", "--password-stdin", input="pm-pw\n")
    srv.start(roles=("smtp", "pop3"))
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            s.ehlo("client.example")
            for i, rcpt in enumerate(("<postmaster>", "<PostMaster>", "<postmaster@example.com>",
                                      "<POSTMASTER@acme.test>")):
                assert s.docmd("MAIL FROM:<carol@remote.example>")[0] == 250
                code, text = s.docmd(f"RCPT TO:{rcpt}")
                assert code == 250, (rcpt, text)
                assert s.data(f"Subject: pm {i}\r\n\r\nto {rcpt}\r\n".encode())[0] == 250
            # <> mail that cannot be delivered (larger than the mailbox quota: 552 5.2.2)
            s.sendmail("", [ALICE], b"Subject: too big bounce\r\n\r\n" + (b"y" * 76 + b"\r\n") * 30)
        got = srv.wait_for(lambda: len(pop3_messages(srv, "postmaster@example.com", "pm-pw")) == 5
                           and pop3_messages(srv, "postmaster@example.com", "pm-pw"), timeout=20)
        subjects = sorted(m.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in got)
        assert [x for x in subjects if x.startswith(b"pm ")] == [b"pm 0", b"pm 1", b"pm 2", b"pm 3"]
        assert [x for x in subjects if x.startswith(b"Postmaster Copy:")] == [subjects[0]]
        report = next(m for m in got if b"Postmaster Copy:" in m)
        assert b"5.2.2" in report and b"too big bounce" in report
        delivered_to = [m.split(b"Delivered-To: ", 1)[1].split(b"\r\n", 1)[0] for m in got]
        assert delivered_to.count(b"postmaster@example.com") == 4  # <postmaster> twice, postmaster@example.com, the report
        assert b"POSTMASTER@acme.test" in delivered_to
        assert srv.messages(ALICE) == []
        assert "postmaster@mail.example.com" not in srv.log()
    finally:
        srv.stop()


def test_malformed_table_stops_twistd_with_one_line(tmp_path):
    """A bad provider table at start: `FILE:LINE: reason` on stderr, status 1, no traceback."""
    srv = Server(tmp_path / "tm").init()
    auth = os.path.join(srv.root, "config", "AUTH.tab")
    with open(auth) as f:
        lines = f.read().count("\n")
    with open(auth, "a") as f:
        f.write("joe@example.com\tEXAMPLE/joe\tplain-password\tUSER\n")  # a password in clear
    from tests.server import BIN

    r = subprocess.run([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logfile", srv.logfile, "tmmail",
                        "--config", srv.config, "--smtp", "tcp:0:interface=127.0.0.1"],
                       cwd=srv.root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith(f"{auth}:{lines + 1}: PASSWORD_HASH is not a password hash"), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "plain-password" not in r.stderr

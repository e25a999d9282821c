"""The real server (``twistd tmmail``) end to end: mail accepted by SMTP is pushed to an IDLEing
IMAP client over STARTTLS, and read over IMAPS; the production default refuses login before
STARTTLS."""

from __future__ import annotations

import imaplib
import smtplib
import time

import pytest

from tests.server import Server, client_tls


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("imap-e2e")).init()
    srv.add_mailbox("carol@example.com", "carol pass")
    srv.start(roles=("smtp", "imap", "imaps"))
    yield srv
    srv.stop()


def send(server: Server, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=20) as s:
        s.sendmail("someone@example.org", ["carol@example.com"],
                   f"From: someone@example.org\r\nTo: carol@example.com\r\nSubject: {subject}\r\n\r\nhi\r\n")


def test_smtp_delivery_is_pushed_to_idle_over_starttls(server):
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=20)
    assert "LOGINDISABLED" in m.capabilities and "STARTTLS" in m.capabilities
    with pytest.raises(imaplib.IMAP4.error):
        m.login("carol@example.com", "carol pass")
    m.starttls(client_tls())
    m.login("carol@example.com", "carol pass")
    typ, data = m.select("INBOX")
    before = int(data[0])
    tag = m._new_tag()
    m.send(tag + b" IDLE\r\n")
    assert m.readline().startswith(b"+")
    send(server, "pushed")
    t0 = time.monotonic()  # SMTP has accepted the message (250 after DATA)
    line = b""
    for _ in range(20):  # bounded: the push arrives as one of the next lines
        line = m.readline()
        if line.endswith(b"EXISTS\r\n"):
            break
    assert line == b"* %d EXISTS\r\n" % (before + 1)
    pushed_after = time.monotonic() - t0
    # the router wakes at once and delivery notifies the idling session: well within 2 s
    assert pushed_after < 2.0, pushed_after
    m.send(b"DONE\r\n")
    for _ in range(20):
        if m.readline().startswith(tag + b" OK"):
            break
    else:
        raise AssertionError("IDLE not completed")
    typ, data = m.fetch(str(before + 1), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: pushed" in data[0][1]
    m.logout()


def test_imaps_reads_the_same_mailbox(server):
    send(server, "over imaps")
    server.wait_for(lambda: any(b"over imaps" in msg for msg in server.messages("carol@example.com")))
    m = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=client_tls(), timeout=20)
    assert "AUTH=PLAIN" in m.capabilities
    m.login("carol@example.com", "carol pass")
    m.select("INBOX", readonly=True)
    typ, data = m.search(None, "SUBJECT", '"over imaps"')
    assert typ == "OK" and data[0]
    m.logout()

"""Failed-login throttling shared by SMTP, POP3 and IMAP, on the real server.

Repeated bad passwords from one IP are delayed, then that IP is blocked in every protocol;
a good client from another IP (127.0.0.2) is unaffected.
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import smtplib
import socket
import time

import pytest

from tests.server import Server, client_tls

ALICE, ALICE_PW = "alice@example.com", "alice-pw"
BOB = "bob@example.com"


class IMAPFrom(imaplib.IMAP4):
    """imaplib with a chosen source address."""

    def __init__(self, host, port, source):
        self._source = source
        super().__init__(host, port, timeout=10)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


class POP3From(poplib.POP3):
    def __init__(self, host, port, source):
        self._source = source
        super().__init__(host, port, timeout=10)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "tm").init(
        "[auth]\nfree_failures = 1\nbase_delay = 0.3\nmax_delay = 0.6\nblock_after = 4\nblock_seconds = 300\n")
    srv.add_mailbox(ALICE, ALICE_PW)
    srv.add_mailbox(BOB, "bob-pw")
    srv.start(roles=("submission", "pop3", "imap"))
    yield srv
    srv.stop()


def smtp_auth(server, source, user, password):
    s = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10, source_address=(source, 0))
    try:
        s.starttls(context=client_tls())
        s.ehlo("client.example")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return s.docmd("AUTH", "PLAIN " + token)
    finally:
        s.close()


def imap_login(server, source, user, password):
    m = IMAPFrom("127.0.0.1", server.ports["imap"], source)
    try:
        m.starttls(client_tls())
        try:
            typ, _ = m.login(user, password)
            return typ, b""
        except imaplib.IMAP4.error as e:
            return "NO", str(e).encode()
    finally:
        try:
            m.shutdown()
        except OSError:
            pass


def pop3_login(server, source, user, password):
    p = POP3From("127.0.0.1", server.ports["pop3"], source)
    try:
        p.stls(client_tls())
        p.user(user)
        try:
            return p.pass_(password)
        except poplib.error_proto as e:
            return e.args[0]
    finally:
        p.close()


def test_bad_passwords_are_delayed_then_blocked_in_every_protocol(server):
    replies, durations = [], []
    for _ in range(6):
        t0 = time.monotonic()
        replies.append(smtp_auth(server, "127.0.0.1", BOB, "wrong"))
        durations.append(time.monotonic() - t0)
    codes = [code for code, _ in replies]
    assert codes[0] == 535
    # after the free failures the answers are slowed down (a lower bound only: never an upper one)
    assert max(durations[1:4]) >= 0.25
    # then the IP is blocked: a temporary refusal, even with the right password and another account
    assert 454 in codes and codes[-1] == 454
    code, text = smtp_auth(server, "127.0.0.1", ALICE, ALICE_PW)
    assert code == 454 and text.startswith(b"4.7.0")
    typ, text = imap_login(server, "127.0.0.1", ALICE, ALICE_PW)
    assert typ == "NO" and b"UNAVAILABLE" in text
    resp = pop3_login(server, "127.0.0.1", ALICE, ALICE_PW)
    assert resp.startswith(b"-ERR")
    # a good client from another address is unaffected, in all three protocols
    code, text = smtp_auth(server, "127.0.0.2", ALICE, ALICE_PW)
    assert code == 235, text
    assert imap_login(server, "127.0.0.2", ALICE, ALICE_PW)[0] == "OK"
    assert pop3_login(server, "127.0.0.2", ALICE, ALICE_PW).startswith(b"+OK")
    # and the failures are logged with the peer address, for fail2ban
    assert "authentication failure for bob@example.com from 127.0.0.1" in server.log()

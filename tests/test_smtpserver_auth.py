"""Submission, smtps and AUTH: TLS before AUTH, SASL PLAIN/LOGIN, sender identity, rate limits, swaks."""

from __future__ import annotations

import base64
import smtplib
import subprocess

import pytest
from twisted.logger import globalLogPublisher

from tests.conftest import require_tool
from tests.smtpharness import PASSWORD, Harness, Raw, client_tls


@pytest.fixture
def h(tmp_path, reactor_thread):
    harness = Harness(tmp_path, reactor_thread)
    yield harness
    harness.stop()


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def submit(port, login="alice@example.com", password=PASSWORD):
    s = smtplib.SMTP("127.0.0.1", port, timeout=10)
    s.ehlo("client.test")
    s.starttls(context=client_tls())
    s.ehlo("client.test")
    s.login(login, password)
    return s


def tls_raw(port):
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nSTARTTLS\r\n")
    r.replies(2)
    r.starttls()
    r.send(b"EHLO c\r\n")
    r.reply()
    return r


# -- TLS before AUTH -----------------------------------------------------------------------


def test_mx_refuses_auth_before_tls(h):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nAUTH PLAIN " + b64(f"\0alice@example.com\0{PASSWORD}") + b"\r\n")
    ehlo, auth = r.replies(2)
    assert b"AUTH" not in ehlo and b"STARTTLS" in ehlo
    assert auth == b"530 5.7.0 Must issue a STARTTLS command first"
    r.close()


def test_mx_auth_after_starttls_allows_relay(h):
    port = h.start("smtp")
    with submit(port) as s:
        s.mail("alice@example.com")
        assert s.rcpt("friend@remote.test")[0] == 250
        assert s.data(b"From: alice@example.com\r\nSubject: out\r\n\r\nx\r\n")[0] == 250
    [(env, eml)] = h.incoming()
    assert env.auth_login == "alice@example.com" and env.protocol == "ESMTPSA"
    assert b"with ESMTPSA id" in eml


def test_submission_requires_starttls_then_auth(h):
    port = h.start("submission")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<alice@example.com>\r\nAUTH LOGIN\r\n")
    ehlo, mail, auth = r.replies(3)
    assert b"STARTTLS" in ehlo and b"AUTH" not in ehlo
    assert mail == b"530 5.7.0 Must issue a STARTTLS command first"
    assert auth == b"530 5.7.0 Must issue a STARTTLS command first"
    r.send(b"STARTTLS\r\n")
    assert r.reply().startswith(b"220")
    r.starttls()
    r.send(b"EHLO c\r\nMAIL FROM:<alice@example.com>\r\n")
    ehlo, mail = r.replies(2)
    assert b"AUTH PLAIN LOGIN" in ehlo
    assert mail == b"530 5.7.0 Authentication required"
    # AUTH LOGIN without initial response: Username:/Password: challenges
    r.send(b"AUTH LOGIN\r\n")
    assert r.reply() == b"334 VXNlcm5hbWU6"
    r.send(b64("alice@example.com") + b"\r\n")
    assert r.reply() == b"334 UGFzc3dvcmQ6"
    r.send(b64(PASSWORD) + b"\r\n")
    assert r.reply() == b"235 2.7.0 Authentication successful"
    r.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@remote.test>\r\nDATA\r\n")
    assert [x[:3] for x in r.replies(3)] == [b"250", b"250", b"354"]
    r.send(b"Subject: sub\r\n\r\nx\r\n.\r\n")
    assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
    r.close()
    [(env, _)] = h.incoming()
    assert env.sender == "alice@example.com" and env.recipients[0].address == "x@remote.test"


def test_smtps_implicit_tls(h):
    port = h.start("smtps")
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=client_tls()) as s:
        s.ehlo("c")
        assert "starttls" not in s.esmtp_features
        assert "PLAIN" in s.esmtp_features["auth"]
        assert s.mail("alice@example.com") == (530, b"5.7.0 Authentication required")
        s.login("alice@example.com", PASSWORD)
        s.mail("alice@example.com")
        s.rcpt("x@remote.test")
        assert s.data(b"Subject: smtps\r\n\r\nx\r\n")[0] == 250
    [(env, _)] = h.incoming()
    assert env.protocol == "ESMTPSA"


def test_plaintext_auth_when_allowed_by_settings(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread, smtp={"allow_plaintext_auth": True})
    port = h.start("submission", tls=False)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("c")
        assert s.mail("alice@example.com")[0] == 530  # still authentication required
        s.rset()
        s.login("alice@example.com", PASSWORD)
        assert s.mail("alice@example.com")[0] == 250
    h.stop()


# -- SASL details ---------------------------------------------------------------------------


def test_auth_plain_initial_response_and_errors(h):
    port = h.start("submission")
    r = tls_raw(port)
    r.send(b"AUTH PLAIN Zm9v\r\n")  # "foo": no NULs
    assert r.reply() == b"501 5.5.2 Malformed authentication data"
    r.send(b"AUTH PLAIN !!!notbase64\r\n")
    assert r.reply() == b"501 5.5.2 Malformed authentication data"
    r.send(b"AUTH PLAIN\r\n")
    assert r.reply() == b"334 "
    r.send(b"*\r\n")
    assert r.reply() == b"501 5.0.0 Authentication cancelled"
    r.send(b"AUTH LOGIN\r\n")
    assert r.reply() == b"334 VXNlcm5hbWU6"
    r.send(b"*\r\n")
    assert r.reply() == b"501 5.0.0 Authentication cancelled"
    r.send(b"AUTH CRAM-MD5\r\n")
    assert r.reply() == b"504 5.5.4 Unrecognized authentication mechanism"
    r.send(b"AUTH PLAIN " + b64(f"\0alice@example.com\0wrong") + b"\r\n")
    assert r.reply() == b"535 5.7.8 Authentication credentials invalid"
    r.send(b"AUTH PLAIN " + b64(f"bob@example.com\0alice@example.com\0{PASSWORD}") + b"\r\n")
    assert r.reply().startswith(b"535")  # may not act for another user
    r.send(b"NOOP\r\n")
    assert r.reply() == b"250 2.0.0 Ok"  # the session continues
    r.send(b"AUTH LOGIN " + b64("alice@example.com") + b"\r\n")
    assert r.reply() == b"334 UGFzc3dvcmQ6"
    r.send(b64(PASSWORD) + b"\r\n")
    assert r.reply() == b"235 2.7.0 Authentication successful"
    r.send(b"AUTH PLAIN " + b64(f"\0alice@example.com\0{PASSWORD}") + b"\r\n")
    assert r.reply() == b"503 5.5.1 Error: already authenticated"
    r.close()


def test_auth_in_transaction_refused(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread)
    port = h.start("smtp")
    r = tls_raw(port)
    r.send(b"MAIL FROM:<x@remote.test>\r\nAUTH PLAIN " + b64(f"\0alice@example.com\0{PASSWORD}") + b"\r\n")
    assert r.replies(2)[1] == b"503 5.5.1 Error: AUTH not allowed during a mail transaction"
    r.close()
    h.stop()


def test_blocked_login_is_454(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread, auth={"block_after": 2, "base_delay": 0.0})
    port = h.start("submission")
    r = tls_raw(port)
    for _ in range(2):
        r.send(b"AUTH PLAIN " + b64("\0alice@example.com\0wrong") + b"\r\n")
        assert r.reply().startswith(b"535 5.7.8")
    r.send(b"AUTH PLAIN " + b64(f"\0alice@example.com\0{PASSWORD}") + b"\r\n")
    assert r.reply() == b"454 4.7.0 Too many failed logins, try again later"
    r.close()
    h.stop()


# -- sender identity ------------------------------------------------------------------------


def test_sender_not_owned_is_refused(h):
    port = h.start("submission")
    with submit(port) as s:
        code, text = s.mail("bob@example.com")
        assert code == 553 and text.startswith(b"5.7.1 <bob@example.com>: Sender address not owned by "
                                               b"alice@example.com; allowed: alice.smith@example.com")
        assert b"info@example.com" in text and b"sales@example.com" in text
        assert s.mail("info@example.com")[0] == 250  # an alias of her mailbox
    assert h.incoming() == []


def test_header_from_not_owned_is_refused(h):
    port = h.start("submission")
    with submit(port) as s:
        s.mail("alice@example.com")
        s.rcpt("x@remote.test")
        code, text = s.data(b"From: The Boss <bob@example.com>\r\nSubject: x\r\n\r\nx\r\n")
        assert code == 553 and text.startswith(b"5.7.1 From: header address not owned by alice@example.com")
        s.mail("alice@example.com")
        s.rcpt("x@remote.test")
        assert s.data(b"From: Info <info@example.com>\r\nSubject: ok\r\n\r\nx\r\n")[0] == 250
    [(env, eml)] = h.incoming()
    assert b"From: Info <info@example.com>\n" in eml


def test_rewrite_policy_rewrites_envelope_and_header(h):
    port = h.start("submission")
    with submit(port, "carol@other.test") as s:
        assert s.mail("bob@example.com")[0] == 250
        s.rcpt("x@remote.test")
        assert s.data(b"From: Bob <bob@example.com>\r\nSubject: rw\r\n\r\nbody\r\n")[0] == 250
    [(env, eml)] = h.incoming()
    assert env.sender == "carol@other.test"
    assert b"\nFrom: <carol@other.test>\nSubject: rw\n\nbody\n" in eml
    assert b"bob@example.com" not in eml


def test_rate_limits(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread, smtp={"rate_messages_per_hour": 2, "rate_recipients_per_hour": 3})
    port = h.start("submission")
    events = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        with submit(port) as s:
            s.mail("alice@example.com")
            s.rcpt("a@remote.test")
            s.rcpt("b@remote.test")
            assert s.data(b"Subject: 1\r\n\r\nx\r\n")[0] == 250
            s.mail("alice@example.com")
            s.rcpt("c@remote.test")
            code, text = s.rcpt("d@remote.test")
            assert (code, text) == (451, b"4.7.1 Sending rate limit exceeded for alice@example.com, try again later")
            assert s.data(b"Subject: 2\r\n\r\nx\r\n")[0] == 250
            code, _ = s.mail("alice@example.com")
            assert code == 451
        with submit(port, "bob@example.com") as s:  # other accounts are not affected
            assert s.mail("bob@example.com")[0] == 250
    finally:
        globalLogPublisher.removeObserver(observer)
    h.stop()
    assert len(h.incoming()) == 2
    assert any("rate limit" in e.get("log_format", "") and e.get("login") == "alice@example.com" for e in events)


# -- real clients: swaks --------------------------------------------------------------------


def swaks(*args):
    exe = require_tool("swaks")
    return subprocess.run([exe, "--server", "127.0.0.1", "--helo", "client.test", *args],
                          capture_output=True, text=True, timeout=60)


def test_swaks_starttls_auth_on_submission(h):
    port = h.start("submission")
    r = swaks("--port", str(port), "-tls", "--auth", "LOGIN", "--auth-user", "alice@example.com",
              "--auth-password", PASSWORD, "--from", "alice@example.com", "--to", "friend@remote.test",
              "--header", "Subject: swaks")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 Ok: queued as" in r.stdout
    [(env, eml)] = h.incoming()
    assert env.auth_login == "alice@example.com" and b"Subject: swaks" in eml


def test_swaks_pipelining_on_mx(h):
    port = h.start("smtp")
    r = swaks("--port", str(port), "--pipeline", "--from", "x@remote.test",
              "--to", "alice@example.com,nobody@example.com,bob@example.com", "--header", "Subject: piped")
    assert "250 2.0.0 Ok: queued as" in r.stdout, r.stdout + r.stderr
    assert "550 5.1.1 <nobody@example.com>" in r.stdout
    [(env, _)] = h.incoming()
    assert [x.address for x in env.recipients] == ["alice@example.com", "bob@example.com"]


def test_swaks_auth_plain_on_smtps(h):
    port = h.start("smtps")
    r = swaks("--port", str(port), "--tlsc", "--auth", "PLAIN", "--auth-user", "alice@example.com",
              "--auth-password", PASSWORD, "--from", "alice@example.com", "--to", "friend@remote.test")
    assert "250 2.0.0 Ok: queued as" in r.stdout, r.stdout + r.stderr
    assert len(h.incoming()) == 1


def _parallel_sends(port, n, recipients):
    """``n`` authenticated sessions that all reach MAIL, then RCPT, then DATA at the same time
    (a barrier between the steps), as a spammer with a stolen password would run them."""
    import threading

    barrier = threading.Barrier(n, timeout=30)
    results = [None] * n

    def one(i):
        with submit(port) as s:
            barrier.wait()
            assert s.mail("alice@example.com")[0] == 250
            barrier.wait()
            replies = [s.rcpt(f"r{i}-{j}@remote.test") for j in range(recipients)]
            barrier.wait()
            data = s.data(b"Subject: burst\r\n\r\nx\r\n") if any(c == 250 for c, _ in replies) else None
            results[i] = (replies, data)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results), results
    return results


RATE_451 = (451, b"4.7.1 Sending rate limit exceeded for alice@example.com, try again later")


def test_message_rate_limit_holds_across_parallel_sessions(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread, smtp={"rate_messages_per_hour": 3})
    port = h.start("submission")
    results = _parallel_sends(port, 6, 1)
    queued = [r for r in results if r[1] is not None and r[1][0] == 250]
    refused = [r for r in results if r[1] is None]
    assert len(queued) == 3 and len(h.incoming()) == 3
    assert len(refused) == 3 and all(r[0] == [RATE_451] for r in refused)
    # the limit is used up: a later session is refused at MAIL
    with submit(port) as s:
        assert s.mail("alice@example.com") == RATE_451
    h.stop()


def test_recipient_rate_limit_holds_across_parallel_sessions(tmp_path, reactor_thread):
    h = Harness(tmp_path, reactor_thread, smtp={"rate_recipients_per_hour": 4})
    port = h.start("submission")
    results = _parallel_sends(port, 4, 3)
    h.stop()
    accepted = sum(1 for replies, _ in results for c, _ in replies if c == 250)
    refused = [x for replies, _ in results for x in replies if x[0] != 250]
    assert accepted == 4 and len(refused) == 8 and all(x == RATE_451 for x in refused)
    assert sum(len(env.recipients) for env, _ in h.incoming()) == 4


def test_rate_limit_reservation_is_released_on_rset_and_disconnect(tmp_path, reactor_thread):
    """A transaction that never finishes must not keep its share of the limit."""
    h = Harness(tmp_path, reactor_thread, smtp={"rate_messages_per_hour": 1})
    port = h.start("submission")
    with submit(port) as s:
        s.mail("alice@example.com")
        assert s.rcpt("a@remote.test")[0] == 250
        s.rset()
        s.mail("alice@example.com")
        assert s.rcpt("b@remote.test")[0] == 250
    # QUIT mid-transaction (the with block): the reservation goes with the session
    with submit(port) as s:
        assert s.mail("alice@example.com")[0] == 250
        assert s.rcpt("c@remote.test")[0] == 250
        assert s.data(b"Subject: one\r\n\r\nx\r\n")[0] == 250
        assert s.mail("alice@example.com") == RATE_451
    h.stop()
    assert len(h.incoming()) == 1


# -- header From:/Sender: parsing (obsolete syntax) -----------------------------------------

FROM_553 = b"5.7.1 From: header address not owned by alice@example.com"


@pytest.mark.parametrize("header", [
    b"From : The Boss <bob@example.com>",
    b"From\t: bob@example.com",
    b"FROM \t: bob@example.com",
    b"From: Alice <alice@example.com>,\r\n\tThe Boss\r\n <bob@example.com>",
    b"From: alice@example.com\r\nTo: x@remote.test\r\nFrom : bob@example.com",
    b"From: alice@example.com\r\nSender : bob@example.com",
])
def test_header_from_variants_not_owned_are_refused(h, header):
    """Mail readers show ``From : x`` (RFC 5322 §4.5.3) as the author: it must be checked too."""
    port = h.start("submission")
    with submit(port) as s:
        s.mail("alice@example.com")
        s.rcpt("x@remote.test")
        code, text = s.data(header + b"\r\nSubject: x\r\n\r\nx\r\n")
        assert code == 553 and text.startswith(FROM_553), text
        assert s.noop()[0] == 250
    assert h.incoming() == []


def test_owned_from_and_sender_with_obsolete_syntax_pass_unchanged(h):
    port = h.start("submission")
    with submit(port) as s:
        s.mail("alice@example.com")
        s.rcpt("x@remote.test")
        body = b"From : Info\r\n <info@example.com>\r\nSender:\talice@example.com\r\nSubject: ok\r\n\r\nx\r\n"
        assert s.data(body)[0] == 250
    [(_, eml)] = h.incoming()
    assert b"\nFrom : Info\n <info@example.com>\nSender:\talice@example.com\nSubject: ok\n" in eml


def test_rewrite_policy_rewrites_obsolete_from_and_sender(h):
    port = h.start("submission")
    with submit(port, "carol@other.test") as s:
        assert s.mail("carol@other.test")[0] == 250
        s.rcpt("x@remote.test")
        body = b"From\t: Bob <bob@example.com>\r\nFrom : bob@example.com\r\nSender : bob@example.com\r\n\r\nb\r\n"
        assert s.data(body)[0] == 250
    [(_, eml)] = h.incoming()
    assert b"\nFrom: <carol@other.test>\nSender: <carol@other.test>\n\nb\n" in eml
    assert b"bob@example.com" not in eml


# -- an exception in a check while the content is read --------------------------------------


def _raising_header_check(monkeypatch):
    """policy.may_send_as raising for one address: the header check (not MAIL FROM) hits it."""
    from tmmail import policy

    real = policy.may_send_as

    def may_send_as(snap, auth, address, resolve):
        if address == "boom@example.com":
            raise RuntimeError("injected check failure")
        return real(snap, auth, address, resolve)

    monkeypatch.setattr(policy, "may_send_as", may_send_as)


def _capture_failures():
    events = []
    globalLogPublisher.addObserver(events.append)
    return events


def test_check_raising_during_data_answers_451_and_keeps_serving(h, monkeypatch):
    _raising_header_check(monkeypatch)
    events = _capture_failures()
    try:
        port = h.start("submission")
        with submit(port) as s:
            s.mail("alice@example.com")
            s.rcpt("x@remote.test")
            code, text = s.data(b"From: boom@example.com\r\nSubject: x\r\n\r\nx\r\n")
            assert (code, text[:5]) == (451, b"4.3.0")
            # the session goes on: a new transaction on the same connection is queued
            s.mail("alice@example.com")
            s.rcpt("x@remote.test")
            assert s.data(b"From: alice@example.com\r\n\r\nok\r\n")[0] == 250
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(h.incoming()) == 1 and h.tmp_files() == []
    failures = [e for e in events if "log_failure" in e and "injected check failure" in str(e["log_failure"].value)]
    assert failures and failures[0]["log_failure"].getTracebackObject() is not None


def test_check_raising_during_bdat_answers_451(h, monkeypatch):
    _raising_header_check(monkeypatch)
    port = h.start("submission")
    r = tls_raw(port)
    r.send(b"AUTH PLAIN " + b64(f"\0alice@example.com\0{PASSWORD}") + b"\r\n")
    assert r.reply().startswith(b"235")
    msg = b"From: boom@example.com\r\n\r\nx\r\n"
    r.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@remote.test>\r\nBDAT %d LAST\r\n" % len(msg) + msg)
    mail, rcpt, bdat = r.replies(3)
    assert bdat.startswith(b"451 4.3.0")
    r.send(b"NOOP\r\n")
    assert r.reply().startswith(b"250")
    r.close()
    assert h.incoming() == [] and h.tmp_files() == []


def test_unexpected_error_mid_data_is_421_and_server_keeps_serving(h, monkeypatch):
    """An exception the content path does not expect: 421 (the data's end is unknown), not a
    silent drop, and other sessions are unaffected."""
    from tmmail.smtpdata import MessageSink

    real = MessageSink.line

    def line(self, content):
        if content == b"explode":
            raise ValueError("injected reader failure")
        return real(self, content)

    monkeypatch.setattr(MessageSink, "line", line)
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    r.replies(4)
    r.send(b"Subject: x\r\n\r\nexplode\r\n.\r\n")
    assert r.reply().startswith(b"421 4.3.0")
    assert r.closed()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        assert s.sendmail("x@remote.test", ["alice@example.com"], b"Subject: y\r\n\r\nfine\r\n") == {}
    assert len(h.incoming()) == 1 and h.tmp_files() == []


def test_guesses_from_elsewhere_do_not_lock_out_the_owner(tmp_path, reactor_thread):
    """Real sockets from three loopback addresses: the owner (logged in before, 127.0.0.1),
    an attacker (127.0.0.2) who triggers the account block, and a client new to the account."""
    h = Harness(tmp_path, reactor_thread, auth={"block_after": 3, "base_delay": 0.0})
    port = h.start("submission")

    def login(source, password):
        s = smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0))
        s.ehlo("client.test")
        s.starttls(context=client_tls())
        s.ehlo("client.test")
        s.user, s.password = "alice@example.com", password
        try:
            return s.auth("PLAIN", s.auth_plain)[0]  # one attempt (login() would also try LOGIN)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code
        finally:
            s.close()

    assert login("127.0.0.1", PASSWORD) == 235
    assert [login("127.0.0.2", f"guess{i}") for i in range(3)] == [535, 535, 535]
    assert login("127.0.0.2", PASSWORD) == 454  # the attacker's IP (and the account) are blocked
    assert login("127.0.0.3", PASSWORD) == 454  # a client new to the account is blocked too
    assert login("127.0.0.1", PASSWORD) == 235  # the owner's known client still gets in
    assert login("127.0.0.3", PASSWORD) == 454  # and that did not lift the block for others
    h.stop()


def test_help_lists_only_what_the_session_can_use(h):
    base = b"214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT"
    r = Raw(h.start("smtp"))
    r.reply()
    r.send(b"EHLO c\r\nHELP\r\n")
    assert r.replies(2)[1] == base + b" STARTTLS"  # MX before TLS: AUTH is not offered
    r.send(b"STARTTLS\r\n")
    r.reply()
    r.starttls()
    r.send(b"EHLO c\r\nHELP\r\n")
    assert r.replies(2)[1] == base + b" AUTH"
    r.send(b"AUTH PLAIN " + b64(f"\0alice@example.com\0{PASSWORD}") + b"\r\nHELP\r\n")
    assert r.replies(2) == [b"235 2.7.0 Authentication successful", base]
    r.close()
    r = Raw(h.start("smtps"), tls=True)
    r.reply()
    r.send(b"HELP\r\n")
    assert r.reply() == base + b" AUTH"
    r.close()

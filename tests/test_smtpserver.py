"""The SMTP server over real sockets: extensions, the transaction, the spool, limits.

Each test runs a listener on 127.0.0.1 in the reactor thread and talks to it with smtplib or a
raw socket, asserting the replies and what landed in spool/incoming.
"""

from __future__ import annotations

import smtplib
import time

import pytest
from twisted.internet import defer, reactor, task

from tests.smtpharness import HOSTNAME, Harness, Raw


@pytest.fixture
def h(tmp_path, reactor_thread):
    harness = Harness(tmp_path, reactor_thread)
    yield harness
    harness.stop()


def make(tmp_path, reactor_thread, **kwargs):
    return Harness(tmp_path, reactor_thread, **kwargs)


def client(port):
    s = smtplib.SMTP("127.0.0.1", port, timeout=10)
    s.ehlo("client.test")
    return s


def send(port, sender, rcpts, body, **kw):
    with client(port) as s:
        return s.sendmail(sender, rcpts, body, **kw)


# -- greeting and extensions ----------------------------------------------------------------


def test_ehlo_advertises_extensions_on_mx(h):
    port = h.start("smtp")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        code, banner = s.docmd("NOOP")
        code, text = s.ehlo("client.test")
        assert code == 250
        lines = text.decode().split("\n")
        assert lines[0] == f"{HOSTNAME} Hello [127.0.0.1]"
        for ext in ("PIPELINING", "SIZE 26214400", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN",
                    "CHUNKING", "STARTTLS", "HELP"):
            assert ext in lines
        assert not any(line.startswith("AUTH") for line in lines)  # never before TLS


def test_basic_commands(h):
    port = h.start("smtp")
    r = Raw(port)
    assert r.reply().startswith(b"220 mx.example.com ESMTP")
    r.send(b"HELO client.test\r\nNOOP\r\nVRFY alice\r\nHELP\r\nRSET\r\nEXPN x\r\nFOO bar\r\nQUIT\r\n")
    assert r.replies(8) == [
        b"250 mx.example.com",
        b"250 2.0.0 Ok",
        b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery",
        b"214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT STARTTLS",  # no AUTH
        b"250 2.0.0 Reset",
        b"502 5.5.1 Command not implemented",
        b"500 5.5.2 Error: command not recognized",
        b"221 2.0.0 Bye",
    ]
    assert r.closed()


def test_sequence_errors(h):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"MAIL FROM:<a@remote.test>\r\n")
    assert r.reply() == b"503 5.5.1 Error: send HELO/EHLO first"
    r.send(b"EHLO c\r\nRCPT TO:<alice@example.com>\r\nDATA\r\nMAIL FROM:<a@remote.test>\r\n"
           b"MAIL FROM:<a@remote.test>\r\nDATA\r\n")
    replies = r.replies(6)
    assert replies[1:] == [
        b"503 5.5.1 Error: need MAIL command",
        b"503 5.5.1 Error: need MAIL command",
        b"250 2.1.0 Ok",
        b"503 5.5.1 Error: nested MAIL command",
        b"554 5.5.1 Error: no valid recipients",
    ]


# -- accepting mail into the spool -------------------------------------------------------------


def test_message_lands_in_spool_with_received_header(h):
    port = h.start("smtp")
    body = b"Subject: hello\r\n\r\nfirst line\r\n.starts with dot\r\nlast\r\n"
    with client(port) as s:
        s.mail("sender@remote.test")
        s.rcpt("alice@example.com")
        code, text = s.data(body)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    qid = text.decode().rsplit(" ", 1)[1]
    [(env, eml)] = h.incoming()
    assert env.queue_id == qid and h.queued == [qid]
    assert env.sender == "sender@remote.test"
    assert [r.address for r in env.recipients] == ["alice@example.com"]
    assert env.helo == "client.test" and env.client_ip == "127.0.0.1" and env.protocol == "ESMTP"
    assert env.auth_login is None
    head, _, rest = eml.partition(b"Subject: hello\n")
    assert head.startswith(b"Received: from client.test ([127.0.0.1])\n\tby mx.example.com with ESMTP id "
                           + qid.encode() + b"\n\tfor <alice@example.com>; ")
    assert rest == b"\nfirst line\n.starts with dot\nlast\n"
    assert b"\r" not in eml
    assert h.tmp_files() == []


def test_one_data_file_for_all_recipients(h):
    port = h.start("smtp")
    refused = send(port, "x@remote.test", ["alice@example.com", "info@example.com", "zed@other.test"],
                   b"Subject: many\r\n\r\nhi\r\n")
    assert refused == {}
    [(env, eml)] = h.incoming()
    assert [r.address for r in env.recipients] == ["alice@example.com", "info@example.com", "zed@other.test"]
    assert eml.count(b"Received:") == 1 and b"\tfor <" not in eml  # no single "for" with many recipients


def test_refused_recipients_and_accepted_ones(h):
    port = h.start("smtp")
    with client(port) as s:
        s.mail("x@remote.test")
        assert s.rcpt("nobody@example.com") == (550, b"5.1.1 <nobody@example.com>: Recipient address rejected: "
                                                      b"User unknown")
        assert s.rcpt("y@remote.test") == (554, b"5.7.1 <y@remote.test>: Relay access denied")
        assert s.rcpt("Bob@EXAMPLE.com")[0] == 250
        assert s.data(b"Subject: x\r\n\r\nx\r\n")[0] == 250
    [(env, _)] = h.incoming()
    assert [r.address for r in env.recipients] == ["Bob@example.com"]


def test_several_messages_per_session_and_rset(h):
    port = h.start("smtp")
    with client(port) as s:
        for i in range(3):
            s.mail("x@remote.test")
            s.rcpt("alice@example.com")
            assert s.data(b"Subject: %d\r\n\r\nx\r\n" % i)[0] == 250
        s.mail("x@remote.test")
        s.rcpt("alice@example.com")
        s.rset()
    assert len(h.incoming()) == 3 and len(h.queued) == 3


def test_null_sender_accepted(h):
    port = h.start("smtp")
    with client(port) as s:
        assert s.docmd("MAIL FROM:<>")[0] == 250
        s.rcpt("alice@example.com")
        assert s.data(b"Subject: bounce\r\n\r\nx\r\n")[0] == 250
    [(env, _)] = h.incoming()
    assert env.sender == ""


def test_postmaster_without_domain(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, tables={
        "ADDRESS-MAP.tab": "[SMTP:postmaster@mx.example.com]\t[SF:ACME/ALICE]\n",
        "DOMAINS.tab": "example.com\tACME\t1\nmx.example.com\tACME\t1\n"})
    port = h.start("smtp")
    with client(port) as s:
        s.mail("x@remote.test")
        assert s.docmd("RCPT TO:<Postmaster>")[0] == 250
        assert s.data(b"Subject: pm\r\n\r\nx\r\n")[0] == 250
    h.stop()
    [(env, _)] = h.incoming()
    assert env.recipients[0].address == "postmaster@mx.example.com"


def test_dsn_parameters_are_stored(h):
    port = h.start("smtp")
    with client(port) as s:
        assert s.docmd("MAIL FROM:<x@remote.test> RET=HDRS ENVID=QQ+2B1 BODY=8BITMIME")[0] == 250
        assert s.docmd("RCPT TO:<alice@example.com> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;alice@example.com")[0] == 250
        assert s.docmd("RCPT TO:<bob@example.com> NOTIFY=NEVER")[0] == 250
        assert s.docmd("RCPT TO:<info@example.com> NOTIFY=MAYBE") == (501, b"5.5.4 Syntax error in parameter NOTIFY")
        assert s.docmd("RCPT TO:<info@example.com> FOO=1") == (555, b"5.5.4 Unsupported parameter FOO")
        assert s.data(b"Subject: dsn\r\n\r\nx\r\n")[0] == 250
    [(env, _)] = h.incoming()
    assert env.mail_params == {"RET": "HDRS", "ENVID": "QQ+2B1", "BODY": "8BITMIME"}
    assert env.ret == "HDRS" and env.envid == "QQ+2B1"
    alice, bob = env.recipients
    assert alice.notify == ("SUCCESS", "DELAY") and alice.orcpt == "rfc822;alice@example.com"
    assert bob.notify == ("NEVER",)


def test_smtputf8(h):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\n")
    r.reply()
    r.send("MAIL FROM:<jöe@bücher.example>\r\n".encode())
    assert r.reply() == b"553 5.6.7 Non-ASCII address requires SMTPUTF8"
    r.send("MAIL FROM:<jöe@bücher.example> SMTPUTF8\r\nRCPT TO:<alice@example.com>\r\n"
           "RCPT TO:<ålice@example.com>\r\nDATA\r\n".encode())
    assert r.replies(4) == [b"250 2.1.0 Ok", b"250 2.1.5 Ok",
                            "550 5.1.1 <ålice@example.com>: Recipient address rejected: User unknown".encode(),
                            b"354 End data with <CR><LF>.<CR><LF>"]
    r.send("Subject: grüße\r\n\r\nüber\r\n.\r\n".encode())
    assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
    r.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<\xc3\xa5lice@example.com>\r\n")
    assert r.replies(2) == [b"250 2.1.0 Ok", b"553 5.6.7 Non-ASCII address requires SMTPUTF8"]
    r.send(b"NOOP \xff\xfe\r\n")
    assert r.reply() == b"500 5.5.2 Invalid UTF-8 in command"
    r.close()
    [(env, eml)] = h.incoming()
    assert env.sender == "jöe@xn--bcher-kva.example" and env.protocol == "UTF8SMTP"
    assert env.mail_params == {"SMTPUTF8": ""}
    assert "grüße\n\nüber\n".encode() in eml


# -- SIZE and limits ----------------------------------------------------------------------


def test_size_declared_up_front_and_enforced(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"max_message_size": 10000})
    port = h.start("smtp")
    with client(port) as s:
        assert s.esmtp_features["size"] == "10000"
        assert s.docmd("MAIL FROM:<x@remote.test> SIZE=10001") == (
            552, b"5.3.4 Message size exceeds fixed limit of 10000 bytes")
        assert s.docmd("MAIL FROM:<x@remote.test> SIZE=9000")[0] == 250
        s.rcpt("alice@example.com")
        code, text = s.data(b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 200)
        assert (code, text) == (552, b"5.3.4 Message size exceeds fixed limit of 10000 bytes")
        # the session goes on
        s.mail("x@remote.test")
        s.rcpt("alice@example.com")
        assert s.data(b"Subject: small\r\n\r\nx\r\n")[0] == 250
    h.stop()
    [(env, eml)] = h.incoming()
    assert b"Subject: small" in eml and h.tmp_files() == []


def test_too_many_recipients_452(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"max_recipients": 2})
    port = h.start("smtp")
    with client(port) as s:
        s.mail("x@remote.test")
        assert s.rcpt("alice@example.com")[0] == 250
        assert s.rcpt("bob@example.com")[0] == 250
        assert s.rcpt("info@example.com") == (452, b"4.5.3 Too many recipients")
        assert s.data(b"Subject: x\r\n\r\nx\r\n")[0] == 250
    h.stop()
    [(env, _)] = h.incoming()
    assert len(env.recipients) == 2


def test_messages_per_session_limit(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"max_messages_per_session": 1})
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    r.replies(4)
    r.send(b"Subject: 1\r\n\r\n.\r\nMAIL FROM:<x@remote.test>\r\n")
    assert r.reply().startswith(b"250 2.0.0 Ok: queued")
    assert r.reply() == b"421 4.7.0 mx.example.com Too many messages in this session, closing connection"
    assert r.closed()
    h.stop()
    assert len(h.incoming()) == 1


def test_commands_before_mail_limit(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"max_commands_before_mail": 3})
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
    replies = r.replies(4)
    assert replies[3].startswith(b"421 4.7.0")
    assert r.closed()
    h.stop()


def test_error_limit(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"max_errors": 2})
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\n")
    r.replies(2)
    r.send(b"RCPT TO:<a@remote.test>\r\nRCPT TO:<b@remote.test>\r\nRCPT TO:<c@remote.test>\r\n")
    replies = r.replies(4)
    assert [x[:3] for x in replies] == [b"554", b"554", b"554", b"421"]
    assert r.closed()
    h.stop()


def test_connection_limit_per_ip(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"max_connections_per_ip": 2})
    port = h.start("smtp")
    a, b = Raw(port), Raw(port)
    assert a.reply().startswith(b"220") and b.reply().startswith(b"220")
    c = Raw(port)
    assert c.reply() == b"421 4.7.0 mx.example.com Too many connections from your address, try again later"
    assert c.closed()
    a.send(b"QUIT\r\n")
    assert a.reply().startswith(b"221") and a.closed()
    for _ in range(50):  # the server notices the close asynchronously
        if h.factories["smtp"].connections < 2:
            break
        time.sleep(0.05)
    d = Raw(port)
    assert d.reply().startswith(b"220")
    for x in (b, d):
        x.close()
    h.stop()


def test_total_connection_limit(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"max_connections": 1})
    port = h.start("smtp")
    a = Raw(port)
    assert a.reply().startswith(b"220")
    b = Raw(port)
    assert b.reply().startswith(b"421 4.7.0") and b.closed()
    a.close()
    h.stop()


def test_denied_client_gets_554_at_greeting(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, tables={"SMTP-DENY.tab": "127.0.0.0/8\t1\n",
                                               "SMTP-ACCESS.tab": "127.0.0.1\t1\n"})
    port = h.start("smtp")
    r = Raw(port)
    assert r.reply() == b"554 5.7.1 Access denied"
    assert r.closed()
    h.stop()


def test_idle_timeout(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"idle_timeout": 0.3})
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    assert r.reply() == b"421 4.4.2 mx.example.com Idle timeout, closing connection"
    assert r.closed()
    h.stop()


def test_session_timeout_despite_activity(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"idle_timeout": 5.0, "session_timeout": 0.6})
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    got = b""
    for _ in range(40):
        r.send(b"NOOP\r\n")
        got = r.reply()
        if not got.startswith(b"250"):
            break
        time.sleep(0.05)
    assert got == b"421 4.4.2 mx.example.com Session time limit exceeded, closing connection"
    h.stop()


# -- pipelining with slow, asynchronous checks ------------------------------------------------


def slow_check(factory, delays):
    """Wrap the factory's recipient check: each call waits the next delay (seconds) first."""
    inner = factory.check_recipient
    queue = list(delays)

    def check(session, path):
        delay = queue.pop(0) if queue else 0.0
        return task.deferLater(reactor, delay, inner, session, path)

    return check


def test_pipelined_replies_in_order_with_slow_checks(h):
    port = h.start("smtp")
    factory = h.factories["smtp"]
    factory.recipient_check = slow_check(factory, [0.3, 0.0, 0.2, 0.0])
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\n")
    r.reply()
    # a client that does not even wait for 354: the body must still be data, never commands
    r.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<nobody@example.com>\r\n"
           b"RCPT TO:<y@remote.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
           b"Subject: pipelined\r\n\r\nRSET\r\nMAIL FROM:<evil@remote.test>\r\nQUIT\r\n.\r\nNOOP\r\n")
    replies = r.replies(8)
    assert [x[:9] for x in replies] == [b"250 2.1.0", b"250 2.1.5", b"550 5.1.1", b"554 5.7.1", b"250 2.1.5",
                                        b"354 End d", b"250 2.0.0", b"250 2.0.0"]
    assert replies[6].startswith(b"250 2.0.0 Ok: queued as")
    r.send(b"QUIT\r\n")
    assert r.reply().startswith(b"221")
    [(env, eml)] = h.incoming()
    assert [x.address for x in env.recipients] == ["alice@example.com", "bob@example.com"]
    assert eml.endswith(b"Subject: pipelined\n\nRSET\nMAIL FROM:<evil@remote.test>\nQUIT\n")


def test_check_that_raises_still_gets_a_reply(h):
    port = h.start("smtp")
    factory = h.factories["smtp"]
    calls = []

    def broken(session, path):
        calls.append(path.address)
        if len(calls) == 1:
            raise RuntimeError("policy bug")
        return defer.fail(RuntimeError("async policy bug"))

    factory.recipient_check = broken
    with client(port) as s:
        s.mail("x@remote.test")
        assert s.rcpt("alice@example.com") == (451, b"4.3.0 Error: internal server error, try again later")
        assert s.rcpt("bob@example.com")[0] == 451
        assert s.noop()[0] == 250


# -- storage failures -----------------------------------------------------------------------


class FailingSpool:
    """A spool whose writers fail at ``fail_at`` ("open", "write" or "commit")."""

    def __init__(self, spool, fail_at):
        self.spool = spool
        self.fail_at = fail_at

    def open_message(self):
        if self.fail_at == "open":
            raise OSError(28, "No space left on device")
        w = self.spool.open_message()
        fail_at = self.fail_at

        class Writer:
            id = w.id

            def write(self, data):
                if fail_at == "write":
                    raise OSError(5, "I/O error")
                w.write(data)

            def commit(self, env):
                if fail_at == "commit":
                    w.abort()
                    raise OSError(28, "No space left on device")
                w.commit(env)

            def abort(self):
                w.abort()

        return Writer()


@pytest.mark.parametrize("fail_at", ["open", "write", "commit"])
def test_storage_failure_is_451_never_5xx(h, fail_at):
    port = h.start("smtp")
    h.factories["smtp"].spool = FailingSpool(h.spool, fail_at)
    with client(port) as s:
        s.mail("x@remote.test")
        s.rcpt("alice@example.com")
        try:
            code, text = s.data(b"Subject: x\r\n\r\nx\r\n")  # the reply after the data
        except smtplib.SMTPDataError as e:  # the reply to DATA itself
            assert fail_at == "open"
            code, text = e.smtp_code, e.smtp_error
        assert (code, text) == (451, b"4.3.0 Error: queue file write error, try again later")
        assert s.noop()[0] == 250
        # the next attempt works once storage is back
        h.factories["smtp"].spool = h.spool
        s.mail("x@remote.test")
        s.rcpt("alice@example.com")
        assert s.data(b"Subject: y\r\n\r\ny\r\n")[0] == 250
    assert len(h.incoming()) == 1 and h.tmp_files() == []


# -- CHUNKING / BDAT ------------------------------------------------------------------------


def test_bdat_chunks(h):
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    part1 = b"Subject: chunked\r\n\r\nQUIT\r\nRSET\r"
    part2 = b"\n.\r\nend\r\n"
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.com>\r\n")
    r.replies(3)
    r.send(b"BDAT %d\r\n" % len(part1) + part1 + b"BDAT %d LAST\r\n" % len(part2) + part2)
    assert r.reply() == b"250 2.0.0 %d octets received" % len(part1)
    assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
    r.send(b"BDAT 0 LAST\r\n")
    assert r.reply() == b"503 5.5.1 Error: no valid transaction, chunk discarded"
    r.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")  # the chunk is read and dropped, never run
    assert r.replies(2) == [b"503 5.5.1 Error: no valid transaction, chunk discarded", b"250 2.0.0 Ok"]
    r.send(b"BDAT x\r\n")
    assert r.reply().startswith(b"501 5.5.4") and r.closed()
    [(env, eml)] = h.incoming()
    assert eml.split(b"\n", 3)[3] == b"Subject: chunked\n\nQUIT\nRSET\n.\nend\n"
    assert "BDAT" not in env.protocol


def test_bdat_too_big_fails_the_transaction(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"max_message_size": 1000})
    port = h.start("smtp")
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.com>\r\n")
    r.replies(3)
    chunk = (b"x" * 98 + b"\r\n") * 11
    r.send(b"BDAT %d\r\n" % len(chunk) + chunk + b"BDAT 3 LAST\r\nab\n")
    assert r.reply().startswith(b"552 5.3.4")
    assert r.reply() == b"503 5.5.1 Error: no valid transaction, chunk discarded"
    r.send(b"NOOP\r\n")
    assert r.reply() == b"250 2.0.0 Ok"
    r.close()
    h.stop()
    assert h.incoming() == [] and h.tmp_files() == []


def test_pipelined_flood_while_a_check_is_slow(h):
    port = h.start("smtp")
    factory = h.factories["smtp"]
    factory.recipient_check = slow_check(factory, [0.5])
    r = Raw(port)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\n")
    r.replies(2)
    n = 20000  # 120 kB queued behind the slow RCPT: reading pauses and resumes, nothing is lost
    r.send(b"RCPT TO:<alice@example.com>\r\n" + b"NOOP\r\n" * n + b"RSET\r\n")
    assert r.reply() == b"250 2.1.5 Ok"
    replies = r.replies(n + 1)
    assert replies[:-1] == [b"250 2.0.0 Ok"] * n and replies[-1] == b"250 2.0.0 Reset"
    r.close()


def test_client_that_never_reads_replies_is_throttled(h):
    port = h.start("smtp")
    r = Raw(port, timeout=1.0)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\n")
    r.replies(2)
    chunk = b"NOOP\r\n" * 10000
    sent = 0
    limit = 200 * len(chunk)  # 12 MB of commands = 32 MB of replies if nobody pushed back
    with pytest.raises(OSError):  # socket.timeout: the server stopped reading
        while sent < limit:
            r.sock.sendall(chunk)
            sent += len(chunk)
    assert sent < limit
    r.close()
    assert still_serves(port)


def still_serves(port):
    with client(port) as s:
        return s.noop()[0] == 250


def test_client_that_never_reads_is_cut_off_after_timeout(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"idle_timeout": 2.0})
    port = h.start("smtp")
    factory = h.factories["smtp"]
    factory.close_grace = 0.5
    r = Raw(port, timeout=0.5)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\n")
    chunk = b"NOOP\r\n" * 10000
    with pytest.raises(OSError):
        for _ in range(200):
            r.sock.sendall(chunk)
    assert factory.connections == 1  # blocked, but not yet idle for 2 s
    for _ in range(100):  # without reading anything: the server must let go of the connection
        if factory.connections == 0:
            break
        time.sleep(0.05)
    assert factory.connections == 0
    r.close()
    h.stop()


def test_interfaces_and_roles(h):
    from twisted.internet.interfaces import IProtocolFactory, IPushProducer
    from zope.interface.verify import verifyObject

    from tmmail.smtpserver import SMTPFactory

    h.start("smtp")
    factory = h.factories["smtp"]
    assert verifyObject(IProtocolFactory, factory)
    assert verifyObject(IPushProducer, factory.buildProtocol(None))
    with pytest.raises(ValueError):
        SMTPFactory(h.settings, "pop3", h.store, h.spool, None, None, None, reactor=reactor)



def test_ipv6_peer_addresses():
    from twisted.internet.address import IPv4Address, IPv6Address
    from twisted.internet.testing import StringTransport

    from tmmail.smtpserver import client_ip_of
    from tmmail.smtptransaction import _address_literal

    assert client_ip_of(StringTransport(peerAddress=IPv6Address("TCP", "::ffff:10.1.2.3", 25))) == "10.1.2.3"
    assert client_ip_of(StringTransport(peerAddress=IPv6Address("TCP", "2001:DB8::1", 25))) == "2001:db8::1"
    assert client_ip_of(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 25))) == "192.0.2.7"
    assert _address_literal("2001:db8::1") == "[IPv6:2001:db8::1]"
    assert _address_literal("192.0.2.7") == "[192.0.2.7]"


def test_limits_are_shared_by_all_smtp_listeners(tmp_path, reactor_thread):
    h = make(tmp_path, reactor_thread, smtp={"max_connections_per_ip": 1})
    mx, submission = h.start("smtp"), h.start("submission")
    assert h.factories["smtp"].ratelimit is h.factories["submission"].ratelimit
    a = Raw(mx)
    assert a.reply().startswith(b"220")
    b = Raw(submission)
    assert b.reply().startswith(b"421 4.7.0") and b.closed()
    a.close()
    h.stop()


def test_session_sent_one_byte_at_a_time(h):
    import socket as _socket

    port = h.start("smtp")
    r = Raw(port)
    r.sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    r.reply()
    wire = (b"EHLO c\r\nMAIL FROM:<x@remote.test> BODY=8BITMIME\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
            b"Subject: slow\r\n\r\n..dot\r\nend\r\n.\r\nBDAT 9 LAST\r\nSubject\r\nQUIT\r\n")
    for i in range(len(wire)):
        r.send(wire[i : i + 1])
    replies = r.replies(7)
    assert [x[:3] for x in replies] == [b"250", b"250", b"250", b"354", b"250", b"503", b"221"]
    assert r.closed()
    [(env, eml)] = h.incoming()
    assert eml.endswith(b"\nSubject: slow\n\n.dot\nend\n")

"""The runner end to end on a real spool and real Maildirs, with the real reactor in a thread.

Crash tests leave the spool in the state a crash would and start a fresh runner on it.
"""

from __future__ import annotations

import email
import email.policy
import os
import time
from typing import Any, Callable

import pytest
from twisted.internet import defer, reactor

from tmmail import cli_queue, config
from tmmail.connectors.postoffice import PostOfficeConnector
from tmmail.envelope import DELIVERED, Envelope
from tmmail.errors import PermanentError, TransientError
from tmmail.providers import ProviderStore
from tmmail.runner import Runner
from tmmail.spool import ACTIVE, BADMAIL, CORRUPT, DEFERRED, INCOMING, Spool

MSG = b"From: alice@example.com\nSubject: test\nMessage-ID: <t1@example.com>\n\nhello\n"

MAILBOXES = [
    "ACME\tALICE\t1\t0",
    "ACME\tADMIN\t1\t0",
    "ACME\tBOB\t1\t0",
    "ACME\tPOSTMASTER\t1\t0",
]


class FakeSMTP:
    """Stands in for the outbound connector: records calls, answers from ``answer``."""

    scheme = "SMTP"

    def __init__(self, answer: Callable[[str], Any] = lambda rcpt: None) -> None:
        self.answer = answer
        self.calls: list[list[str]] = []

    def batch_key(self, target: Any) -> str:
        return target.value.rsplit("@", 1)[1]

    def deliver(self, envelope: Any, items: Any, message_path: str) -> Any:
        assert open(message_path, "rb").read() == MSG
        self.calls.append([t.value for _, t in items])
        return defer.succeed([self.answer(t.value) for _, t in items])


class World:
    def __init__(self, tmp_path, reactor_thread, mailboxes=MAILBOXES, maps=(), smtp=None, events=None,
                 **queue: Any) -> None:
        cfg = tmp_path / "config"
        cfg.mkdir(exist_ok=True)
        (cfg / "DOMAINS.tab").write_text("example.com\tACME\t1\n")
        (cfg / "POSTOFFICE.tab").write_text("ACME\t1\n")
        (cfg / "MAILBOX.tab").write_text("".join(r + "\n" for r in mailboxes))
        (cfg / "ADDRESS-MAP.tab").write_text("".join(r + "\n" for r in maps))
        q = {"scan_interval": 0.05, "retry_initial": 60.0, "retry_max": 600.0, "io_threads": 2,
             "postmaster": "postmaster@example.com"}
        q.update(queue)
        self.settings = config.parse(
            {"server": {"hostname": "mx.example.com", "state_dir": str(tmp_path), "config_dir": str(cfg)},
             "queue": q}
        )
        self.rt = reactor_thread
        self.store = ProviderStore(str(cfg))
        self.spool = Spool(self.settings.spool_dir)
        self.po = self.settings.postoffices_dir
        self.smtp = smtp
        self.events = events
        self.runner: Runner | None = None

    def start(self) -> Runner:
        # as after a restart: everything already on disk was left by an earlier process
        self.spool.started = time.time() + 2 * Spool.CLOCK_SLACK
        conns: list[Any] = [PostOfficeConnector(self.settings, self.store, reactor)]
        if self.smtp is not None:
            conns.append(self.smtp)
        self.runner = Runner(self.settings, self.spool, self.store, conns, reactor, events=self.events)
        self.rt.call(self.runner.start)
        return self.runner

    def stop(self) -> None:
        if self.runner is not None:
            self.rt.call(self.runner.stop, 10.0)
            self.runner = None

    def send(self, rcpts: list[str], sender: str = "alice@example.com", data: bytes = MSG, **kw: Any) -> str:
        w = self.spool.open_message()
        w.write(data)
        w.commit(Envelope.new(queue_id=w.id, sender=sender, recipients=rcpts, **kw))
        if self.runner is not None:
            self.runner.wake(w.id)
        return w.id

    def mails(self, mbx: str) -> list[bytes]:
        new = os.path.join(self.po, "ACME", mbx, "Maildir", "new")
        if not os.path.isdir(new):
            return []
        return [open(os.path.join(new, n), "rb").read() for n in sorted(os.listdir(new))]

    def ids(self, state: str) -> list[str]:
        return self.spool.list(state)

    def flush(self) -> None:
        """What `tmmail queue flush` does beside the running runner: every deferred message
        is claimed, made due now and put back into incoming/ (tmmail.cli_queue)."""
        for qid in self.ids(DEFERRED):
            cli_queue.release(self.settings.spool_dir, qid)

    def settled(self) -> bool:
        return not self.ids(INCOMING) and not self.ids(ACTIVE)

    def idle(self) -> None:
        """Wait until nothing is in incoming/ or active/ and the runner is idle (bounded)."""
        wait_for(lambda: self.settled() and self.rt.call(self.runner.when_idle, 5.0) is None and self.settled())


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def parse(raw: bytes) -> Any:
    return email.message_from_bytes(raw, policy=email.policy.default)


def dsn_fields(raw: bytes) -> list[dict[str, str]]:
    msg = parse(raw)
    status = msg.get_payload()[1]
    return [dict(g.items()) for g in status.get_payload()]


@pytest.fixture
def make(tmp_path, reactor_thread):
    worlds: list[World] = []

    def factory(**kw: Any) -> World:
        w = World(tmp_path, reactor_thread, **kw)
        worlds.append(w)
        return w

    yield factory
    for w in worlds:
        w.stop()


# -- plain delivery --------------------------------------------------------------------------


def test_local_delivery_and_message_removed(make) -> None:
    w = make(maps=["[SMTP:sales@example.com]\t[SF:ACME/BOB]"])
    w.start()
    w.send(["admin@example.com", "Sales@example.com", "bob@example.com"])
    wait_for(lambda: w.mails("ADMIN") and w.mails("BOB"))
    w.idle()
    assert w.mails("ADMIN")[0].endswith(MSG)
    # the alias and the mailbox itself land in the same mailbox: one copy, not two
    (bob,) = w.mails("BOB")
    assert bob.split(b"\n")[1] in (b"Delivered-To: Sales@example.com", b"Delivered-To: bob@example.com")
    for state in (INCOMING, ACTIVE, DEFERRED, BADMAIL, CORRUPT):
        assert w.ids(state) == []
    assert w.mails("ALICE") == []  # no report without NOTIFY=SUCCESS


def test_success_notice_when_asked(make) -> None:
    w = make()
    w.start()
    w.send(["bob@example.com"], rcpt_params={"bob@example.com": {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;bob@example.com"}},
           mail_params={"ENVID": "E1"})
    wait_for(lambda: w.mails("ALICE"))
    w.idle()
    (report,) = w.mails("ALICE")
    assert b"Return-Path: <>" in report
    per_msg, rcpt = dsn_fields(report)
    assert per_msg["Original-Envelope-Id"] == "E1"
    assert rcpt["Action"] == "delivered" and rcpt["Original-Recipient"] == "rfc822; bob@example.com"


# -- bad mail ----------------------------------------------------------------------------


def test_unknown_recipient_goes_to_badmail_with_ndr(make) -> None:
    w = make()
    w.start()
    qid = w.send(["nobody@example.com", "bob@example.com"])
    wait_for(lambda: w.mails("ALICE") and w.ids(BADMAIL))
    w.idle()
    assert len(w.mails("BOB")) == 1
    assert w.ids(BADMAIL) == [qid]
    assert open(w.spool.message_path(BADMAIL, qid), "rb").read() == MSG
    (ndr,) = w.mails("ALICE")
    msg = parse(ndr)
    assert msg["Auto-Submitted"] == "auto-replied" and "Undelivered" in msg["Subject"]
    _, rcpt = dsn_fields(ndr)
    assert rcpt["Final-Recipient"] == "rfc822;nobody@example.com"
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.1.1"
    assert rcpt["Diagnostic-Code"].startswith("X-TMmail; 550 5.1.1")  # our own reply: no smtp type


def test_notify_never_suppresses_ndr(make) -> None:
    w = make()
    w.start()
    w.send(["nobody@example.com"], rcpt_params={"nobody@example.com": {"NOTIFY": "NEVER"}})
    wait_for(lambda: w.ids(BADMAIL))
    w.idle()
    assert w.mails("ALICE") == [] and w.ids(INCOMING) == []


def test_null_sender_never_notified_postmaster_once(make) -> None:
    w = make()
    w.start()
    w.send(["nobody@example.com"], sender="")
    wait_for(lambda: w.mails("POSTMASTER"))
    w.idle()
    (copy,) = w.mails("POSTMASTER")
    assert parse(copy)["Subject"].startswith("Postmaster Copy")
    assert w.mails("ALICE") == []
    assert len(w.ids(BADMAIL)) == 1


def test_failing_report_does_not_loop(make) -> None:
    # no postmaster mailbox: the NDR to an unknown sender fails, the postmaster copy fails too
    w = make(mailboxes=["ACME\tBOB\t1\t0"])
    w.start()
    w.send(["nobody@example.com"], sender="ghost@example.com")
    wait_for(lambda: len(w.ids(BADMAIL)) == 3)
    w.idle()
    time.sleep(0.3)  # several more scans: nothing new appears
    w.idle()
    assert len(w.ids(BADMAIL)) == 3  # original, the NDR, the postmaster copy of the NDR
    origins = sorted(w.spool.load(BADMAIL, q).origin for q in w.ids(BADMAIL))
    assert origins == ["dsn", "postmaster", "smtp"]
    assert w.ids(DEFERRED) == [] and w.ids(INCOMING) == []


# -- deferral, retry, expiry ---------------------------------------------------------------


def test_quota_defers_then_delivers_after_space_is_freed(make) -> None:
    w = make(mailboxes=MAILBOXES + ["ACME\tSMALL\t1\t200"])
    w.start()
    filler = b"Subject: big\n\n" + b"x" * 100 + b"\n"
    w.send(["small@example.com"], data=filler)
    wait_for(lambda: w.mails("SMALL"))
    w.idle()
    qid = w.send(["small@example.com"])
    wait_for(lambda: w.ids(DEFERRED) == [qid])
    env = w.spool.load(DEFERRED, qid)
    r = env.recipients[0]
    assert r.state == "deferred" and r.last_reply.startswith("452 4.2.2") and r.attempts == 1
    assert r.next_attempt >= time.time() + 30  # back-off saved: retry_initial 60 s
    wait_for(lambda: w.runner.queue_size() == 1)  # pushed on the heap once the move is done
    # the user makes room; an admin flushes the queue
    new = os.path.join(w.po, "ACME", "SMALL", "Maildir", "new")
    for n in os.listdir(new):
        os.unlink(os.path.join(new, n))
    w.flush()
    wait_for(lambda: len(w.mails("SMALL")) == 1 and not w.ids(DEFERRED))
    w.idle()
    assert w.mails("SMALL")[0].endswith(MSG)
    assert w.mails("ALICE") == []


def test_over_quota_until_lifetime_bounces(make) -> None:
    w = make(mailboxes=MAILBOXES + ["ACME\tSMALL\t1\t200"], retry_initial=0.1, retry_max=0.2, lifetime=0.6,
             delay_notice_after=0.0)
    w.start()
    small = b"Subject: s\n\n" + b"y" * 20 + b"\n"
    w.send(["small@example.com"], data=small)
    wait_for(lambda: w.mails("SMALL"))
    w.idle()
    w.send(["small@example.com"])
    wait_for(lambda: w.mails("ALICE"), timeout=15)
    w.idle()
    (ndr,) = w.mails("ALICE")
    _, rcpt = dsn_fields(ndr)
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "4.2.2"
    assert "452 4.2.2" in rcpt["Diagnostic-Code"]
    assert w.ids(DEFERRED) == [] and w.ids(BADMAIL) == []
    assert len(w.mails("SMALL")) == 1


def test_remote_without_connector_deferred_local_delivered(make) -> None:
    w = make()
    w.start()
    qid = w.send(["bob@example.com", "far@remote.example"])
    wait_for(lambda: w.ids(DEFERRED) == [qid])
    w.idle()
    assert len(w.mails("BOB")) == 1
    env = w.spool.load(DEFERRED, qid)
    bob, far = env.recipients
    assert bob.state == DELIVERED and bob.target == "[SF:ACME/BOB]"
    assert far.state == "deferred" and far.target == "[SMTP:far@remote.example]"
    assert far.last_reply.startswith("451 4.4.0")


def test_remote_batches_and_outcomes(make) -> None:
    answers = {"a@one.example": None, "b@one.example": PermanentError(550, "5.1.1", "no"),
               "c@two.example": TransientError(421, "4.4.2", "later")}
    smtp = FakeSMTP(lambda rcpt: answers[rcpt])
    w = make(smtp=smtp)
    w.start()
    qid = w.send(["a@one.example", "b@one.example", "c@two.example"])
    wait_for(lambda: w.ids(DEFERRED) == [qid])
    w.idle()
    assert sorted(map(sorted, smtp.calls)) == [["a@one.example", "b@one.example"], ["c@two.example"]]
    states = {r.address: r.state for r in w.spool.load(DEFERRED, qid).recipients}
    assert states == {"a@one.example": "delivered", "b@one.example": "failed", "c@two.example": "deferred"}
    # the hard failure is reported at once, while c is still being retried
    wait_for(lambda: w.mails("ALICE"))
    (ndr,) = w.mails("ALICE")
    rcpts = dsn_fields(ndr)[1:]
    assert [(f["Final-Recipient"], f["Action"]) for f in rcpts] == [("rfc822;b@one.example", "failed")]
    # the last recipient gets through on the next try: a and b are not tried or reported again
    answers["c@two.example"] = None
    w.flush()
    wait_for(lambda: not w.ids(DEFERRED) and len(smtp.calls) == 3)
    w.idle()
    assert smtp.calls[2] == ["c@two.example"]
    assert len(w.mails("ALICE")) == 1


def test_broken_connector_defers(make) -> None:
    class Broken(FakeSMTP):
        def deliver(self, envelope: Any, items: Any, message_path: str) -> Any:
            raise RuntimeError("bug")

    w = make(smtp=Broken())
    w.start()
    qid = w.send(["x@remote.example"])
    wait_for(lambda: w.ids(DEFERRED) == [qid])
    assert w.spool.load(DEFERRED, qid).recipients[0].last_reply.startswith("451 4.3.0")


def test_delay_notice_sent_once(make) -> None:
    smtp = FakeSMTP(lambda rcpt: TransientError(451, "4.4.1", "no answer"))
    w = make(smtp=smtp, retry_initial=0.1, retry_max=0.1, delay_notice_after=0.2)
    w.start()
    qid = w.send(["x@remote.example"])
    wait_for(lambda: w.mails("ALICE"), timeout=10)
    wait_for(lambda: len(smtp.calls) >= 6, timeout=10)
    w.idle()
    (notice,) = w.mails("ALICE")
    assert "Delayed" in parse(notice)["Subject"]
    _, rcpt = dsn_fields(notice)
    assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.4.1" and "Will-Retry-Until" in rcpt
    assert parse(notice).get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert qid in w.ids(DEFERRED) + w.ids(ACTIVE)


# -- crash recovery ----------------------------------------------------------------------------


def queued(w: World, rcpts: list[str], state: str = INCOMING, prepare: Callable[[Envelope], None] | None = None) -> str:
    qid = w.send(rcpts)
    if state != INCOMING:
        w.spool.move(qid, INCOMING, state)
    if prepare is not None:
        env = w.spool.load(state, qid)
        prepare(env)
        w.spool.save(state, env)
    return qid


def test_recovers_partial_multi_recipient_delivery(make) -> None:
    w = make()

    def half_done(env: Envelope) -> None:
        # crash after ADMIN's outcome was saved, while BOB was still to be tried
        env.recipients[0].target = "[SF:ACME/ADMIN]"
        env.recipients[0].state = DELIVERED
        env.recipients[0].attempts = 1
        env.recipients[1].target = "[SF:ACME/BOB]"

    queued(w, ["admin@example.com", "bob@example.com"], ACTIVE, half_done)
    w.start()
    wait_for(lambda: w.mails("BOB"))
    w.idle()
    assert w.mails("ADMIN") == []  # not delivered a second time
    assert len(w.mails("BOB")) == 1
    assert w.ids(ACTIVE) == [] and w.ids(DEFERRED) == []


def test_attempt_in_progress_at_crash_is_not_retried_at_once(make) -> None:
    smtp = FakeSMTP()
    w = make(smtp=smtp)

    def attempting(env: Envelope) -> None:
        r = env.recipients[0]
        r.target, r.attempts, r.last_attempt, r.next_attempt = "[SMTP:x@remote.example]", 1, time.time(), time.time() + 60

    qid = queued(w, ["x@remote.example"], ACTIVE, attempting)
    w.start()
    wait_for(lambda: w.ids(DEFERRED) == [qid])
    w.idle()
    assert smtp.calls == []


@pytest.mark.parametrize("src,dst", [(INCOMING, ACTIVE), (ACTIVE, DEFERRED), (DEFERRED, ACTIVE)])
def test_half_moves_delivered_exactly_once(make, src: str, dst: str) -> None:
    w = make()
    qid = queued(w, ["admin@example.com"], src)
    os.rename(w.spool.path(src, qid, ".eml"), w.spool.path(dst, qid, ".eml"))  # crash between renames
    w.start()
    wait_for(lambda: w.mails("ADMIN"))
    w.idle()
    time.sleep(0.2)
    assert len(w.mails("ADMIN")) == 1
    assert all(w.ids(s) == [] for s in (INCOMING, ACTIVE, DEFERRED, CORRUPT))


def test_crash_before_removal_does_not_redeliver(make) -> None:
    w = make()

    def all_done(env: Envelope) -> None:
        env.recipients[0].target, env.recipients[0].state = "[SF:ACME/ADMIN]", DELIVERED

    qid = queued(w, ["admin@example.com"], ACTIVE, all_done)
    w.start()
    wait_for(lambda: not w.ids(ACTIVE))
    w.idle()
    assert w.mails("ADMIN") == [] and w.ids(qid and DEFERRED) == [] and w.ids(BADMAIL) == []


def test_deferred_loaded_once_into_heap(make) -> None:
    smtp = FakeSMTP()
    w = make(smtp=smtp)
    later = []
    for _ in range(5):
        later.append(queued(w, ["x@remote.example"], DEFERRED, lambda env: setattr(env.recipients[0], "next_attempt", time.time() + 3600)))
    due = queued(w, ["y@remote.example"], DEFERRED)
    listed: list[str] = []
    orig = w.spool.list

    def spy(state: str) -> list[str]:
        listed.append(state)
        return orig(state)

    w.spool.list = spy  # type: ignore[method-assign]
    runner = w.start()
    wait_for(lambda: smtp.calls == [["y@remote.example"]])
    w.idle()
    assert DEFERRED in listed  # read at start
    listed.clear()
    time.sleep(0.3)  # a few ticks
    assert DEFERRED not in listed  # never rescanned
    assert listed.count(INCOMING) > 2
    assert runner.queue_size() == 5
    assert due not in orig(DEFERRED) and sorted(orig(DEFERRED)) == sorted(later)


def test_unreadable_envelope_goes_to_corrupt(make) -> None:
    w = make()
    qid = w.send(["admin@example.com"])
    with open(w.spool.path(INCOMING, qid, ".env"), "wb") as f:
        f.write(b"{not json")
    w.start()
    wait_for(lambda: w.ids(CORRUPT) == [qid])
    w.idle()
    assert w.mails("ADMIN") == []
    assert sorted(os.listdir(os.path.join(w.spool.root, CORRUPT))) == [qid + ".eml", qid + ".env"]


def test_success_notice_for_remote_is_relayed(make) -> None:
    w = make(smtp=FakeSMTP())
    w.start()
    w.send(["x@remote.example"], rcpt_params={"x@remote.example": {"NOTIFY": "SUCCESS,FAILURE"}})
    wait_for(lambda: w.mails("ALICE"))
    w.idle()
    (report,) = w.mails("ALICE")
    _, rcpt = dsn_fields(report)
    assert rcpt["Action"] == "relayed" and rcpt["Final-Recipient"] == "rfc822;x@remote.example"


def test_io_error_keeps_message_and_retries(make) -> None:
    smtp = FakeSMTP()
    w = make(smtp=smtp)
    real = w.spool.save_bytes
    calls = []

    def flaky(state: str, qid: str, data: bytes) -> None:
        calls.append(qid)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real(state, qid, data)

    w.spool.save_bytes = flaky  # type: ignore[method-assign]
    runner = w.start()
    runner.error_retry = 0.2
    qid = w.send(["x@remote.example"])
    wait_for(lambda: calls)
    assert smtp.calls == []  # no attempt without the next-attempt time saved
    assert w.ids(ACTIVE) == [qid]  # left where it was, not lost
    wait_for(lambda: smtp.calls == [["x@remote.example"]] and w.settled())
    w.idle()
    assert w.ids(DEFERRED) == [] and w.ids(CORRUPT) == []


def test_bare_postmaster_goes_to_configured_postmaster(make) -> None:
    w = make()
    w.start()
    w.send(["postmaster"], sender="someone@remote.example")
    wait_for(lambda: w.mails("POSTMASTER"))
    w.idle()
    assert w.mails("POSTMASTER")[0].endswith(MSG)


CHILD = r"""
import sys
from twisted.internet import reactor
from tmmail import config
from tmmail.connectors.postoffice import PostOfficeConnector
from tmmail.providers import ProviderStore
from tmmail.runner import Runner
from tmmail.spool import Spool
state, cfg = sys.argv[1], sys.argv[2]
settings = config.parse({"server": {"hostname": "mx.example.com", "state_dir": state, "config_dir": cfg},
                         "queue": {"scan_interval": 0.05, "io_threads": 2}})
store = ProviderStore(cfg)
spool = Spool(settings.spool_dir)
runner = Runner(settings, spool, store, [PostOfficeConnector(settings, store, reactor)], reactor)
reactor.callWhenRunning(runner.start)
reactor.run()
"""


def test_kill_9_during_delivery_loses_nothing(make, tmp_path) -> None:
    import signal
    import subprocess
    import sys

    w = make()
    n = 120
    for i in range(n):
        w.send(["bob@example.com", "admin@example.com"], data=b"Subject: m%d\n\nbody\n" % i)
    new = os.path.join(w.po, "ACME", "BOB", "Maildir", "new")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(tmp_path / "config")],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        wait_for(lambda: os.path.isdir(new) and len(os.listdir(new)) >= n // 3, timeout=30)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert len(os.listdir(new)) < n  # killed in the middle
    w.start()  # the restarted server
    try:
        wait_for(lambda: w.settled() and not w.ids(DEFERRED), timeout=30)
    except AssertionError:
        for st in (INCOMING, ACTIVE, DEFERRED):
            for q in w.ids(st)[:3]:
                print(st, q, open(w.spool.path(st, q, ".env")).read())
        raise
    w.idle()
    for mbx in ("BOB", "ADMIN"):
        subjects = [m.split(b"Subject: ")[1].split(b"\n")[0] for m in w.mails(mbx)]
        assert set(subjects) == {b"m%d" % i for i in range(n)}  # nothing lost
        assert len(subjects) == n  # nothing twice: a delivery the spool missed is recognised
    assert w.ids(CORRUPT) == [] and w.ids(BADMAIL) == []


CHILD_REMOTE = r"""
import os, sys
from twisted.internet import defer, reactor, task
from tmmail import config
from tmmail.providers import ProviderStore
from tmmail.runner import Runner
from tmmail.spool import Spool
state, cfg, log = sys.argv[1], sys.argv[2], sys.argv[3]
out = open(log, "a")

class SlowPeer:
    scheme = "SMTP"
    def batch_key(self, target):
        return target.value.rsplit("@", 1)[1]
    def deliver(self, envelope, items, path):
        def done():
            for _, t in items:  # the peer has it: log before answering, like a remote 250
                out.write(f"{envelope.queue_id} {t.value}\n")
            out.flush()
            os.fsync(out.fileno())
            return [None] * len(items)
        return task.deferLater(reactor, 0.01, done)

settings = config.parse({"server": {"hostname": "mx.example.com", "state_dir": state, "config_dir": cfg},
                         "queue": {"scan_interval": 0.05, "io_threads": 2, "retry_initial": 600}})
store = ProviderStore(cfg)
runner = Runner(settings, Spool(settings.spool_dir), store, [SlowPeer()], reactor)
reactor.callWhenRunning(runner.start)
reactor.run()
"""


def test_kill_9_during_remote_delivery_no_hammering(make, tmp_path) -> None:
    import signal
    import subprocess
    import sys

    class Recorder(FakeSMTP):
        def deliver(self, envelope: Any, items: Any, message_path: str) -> Any:
            self.calls.append([(envelope.queue_id, t.value) for _, t in items])
            return defer.succeed([None] * len(items))

    peer = Recorder()
    w = make(smtp=peer)
    n = 80
    sent: set[tuple[str, str]] = set()
    for _ in range(n):
        qid = w.send(["a@one.example", "b@two.example"])
        sent |= {(qid, "a@one.example"), (qid, "b@two.example")}
    log_path = tmp_path / "peer.log"
    log_path.write_text("")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_REMOTE, str(tmp_path), str(tmp_path / "config"), str(log_path)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        wait_for(lambda: len(log_path.read_text().splitlines()) >= n // 2, timeout=30)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    before = {tuple(line.split()) for line in log_path.read_text().splitlines()}
    assert len(before) < 2 * n  # killed in the middle
    w.start()
    wait_for(lambda: w.settled(), timeout=30)
    w.idle()
    # what was being tried at the kill waits for its saved back-off (600 s): whatever the peer
    # already had is not sent again at once (what was never tried goes out at once)
    in_flight = set(w.ids(DEFERRED))
    assert len(in_flight) <= 64  # the child's max_active
    early = {pair for call in peer.calls for pair in call}
    assert not early & before
    # the administrator flushes the queue: they go out too
    w.flush()
    wait_for(lambda: not w.ids(DEFERRED) and w.settled(), timeout=30)
    w.idle()
    after = [pair for call in peer.calls for pair in call]
    assert sent <= before | set(after)  # nothing lost
    assert len(after) == len(set(after))  # the restarted runner sent nothing twice
    duplicates = before & set(after)
    assert {q for q, _ in duplicates} <= in_flight  # only what was on the wire at the kill
    assert w.ids(CORRUPT) == [] and w.ids(BADMAIL) == []


def test_slow_destination_does_not_hold_up_others(make) -> None:
    class Peer(FakeSMTP):
        def __init__(self) -> None:
            super().__init__()
            self.held: list[tuple[defer.Deferred, int]] = []
            self.open = 0
            self.most = 0
            self.done: list[str] = []

        def deliver(self, envelope: Any, items: Any, message_path: str) -> Any:
            rcpts = [t.value for _, t in items]
            if rcpts[0].endswith("@slow.example"):
                self.open += 1
                self.most = max(self.most, self.open)
                d: defer.Deferred = defer.Deferred()
                self.held.append((d, len(items)))
                return d
            self.done += rcpts
            return defer.succeed([None] * len(items))

        def release(self) -> None:
            held, self.held = self.held, []
            for d, n in held:
                self.open -= 1
                d.callback([None] * n)

    peer = Peer()
    w = make(smtp=peer)
    runner = w.start()
    runner.max_active = 4
    runner.dest_limit = 2
    for i in range(10):
        w.send([f"u{i}@slow.example"])
    wait_for(lambda: len(peer.held) == 2)
    for i in range(3):
        w.send([f"v{i}@fast.example"])
    # the fast destination goes through while ten messages wait for the slow one
    wait_for(lambda: len(peer.done) == 3)
    assert peer.most == 2 and len(w.ids(ACTIVE)) == 10
    for _ in range(10):
        w.rt.call(peer.release)
        if not w.ids(ACTIVE) and not peer.held:
            break
        time.sleep(0.1)
    wait_for(lambda: w.settled() and not w.ids(DEFERRED))
    w.idle()
    assert peer.most == 2


# -- transfer events (tmmail.events) ---------------------------------------------------------


class Hook:
    """A transfer-event hook answering from a script of actions (the last one repeats)."""

    name = "test-hook"

    def __init__(self, *actions: Any) -> None:
        self.actions = list(actions)
        self.calls: list[tuple[str, str, tuple[str, ...]]] = []

    def run(self, reactor: Any, event: str, envelope: Any, path: str, targets: Any = ()) -> Any:
        from tmmail.events import Outcome

        if envelope.origin != "smtp":  # a report of ours (deliver events see those too)
            from tmmail.events import Outcome

            return defer.succeed(Outcome())
        assert open(path, "rb").read() == MSG
        self.calls.append((event, envelope.queue_id, tuple(targets)))
        action = self.actions.pop(0) if len(self.actions) > 1 else self.actions[0]
        return defer.succeed(Outcome(*action) if isinstance(action, tuple) else Outcome(action))


def hooks(**by_event: Hook) -> Any:
    from tmmail.events import TransferEvents

    return TransferEvents({e: [h] for e, h in by_event.items()}, reactor)


def test_pickup_reject_bounces(make) -> None:
    hook = Hook(("reject", "Virus found: Eicar-Test"))
    w = make(events=hooks(pickup=hook))
    w.start()
    w.send(["bob@example.com"])
    wait_for(lambda: w.mails("ALICE"))
    w.idle()
    assert w.mails("BOB") == []
    report = w.mails("ALICE")[0]
    _, rcpt = dsn_fields(report)
    assert rcpt["Action"] == "failed" and rcpt["Diagnostic-Code"] == "X-TMmail; 550 5.7.1 Virus found: Eicar-Test"
    # the refused content is not sent back: headers only
    assert parse(report).get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert hook.calls[0][0] == "pickup"
    assert all(w.ids(s) == [] for s in (ACTIVE, DEFERRED, BADMAIL, "quarantine"))


def test_pickup_retry_then_accept_runs_once_accepted(make) -> None:
    hook = Hook("retry", "accept")
    w = make(events=hooks(pickup=hook))
    w.start()
    qid = w.send(["bob@example.com", "far@remote.example"])
    wait_for(lambda: w.ids(DEFERRED) == [qid])
    r = w.spool.load(DEFERRED, qid).recipients[0]
    assert r.state == "deferred" and r.last_reply.startswith("451 4.7.1") and w.mails("BOB") == []
    wait_for(lambda: w.runner.queue_size() == 1)
    w.flush()
    wait_for(lambda: w.mails("BOB"))
    w.idle()
    env = w.spool.load(DEFERRED, qid)  # far@remote.example waits for an SMTP connector
    assert env.checked
    w.flush()

    def third_attempt() -> bool:
        try:
            return w.spool.load(DEFERRED, qid).recipients[1].attempts == 3
        except FileNotFoundError:  # in active/ right now
            return False

    wait_for(third_attempt)
    assert len(hook.calls) == 2  # not asked again once it accepted


def test_pickup_quarantine_puts_message_aside(make) -> None:
    w = make(events=hooks(pickup=Hook(("quarantine", "suspicious"))))
    w.start()
    qid = w.send(["bob@example.com"])
    wait_for(lambda: w.ids("quarantine") == [qid])
    w.idle()
    assert w.mails("BOB") == [] and w.mails("ALICE") == []
    assert open(w.spool.message_path("quarantine", qid), "rb").read() == MSG


def test_deliver_event_per_batch(make) -> None:
    hook = Hook("accept")

    def decide(reactor: Any, event: str, envelope: Any, path: str, targets: Any = ()) -> Any:
        from tmmail.events import Outcome

        if envelope.origin == "smtp":
            hook.calls.append((event, envelope.queue_id, tuple(targets)))
        refuse = "[SF:ACME/ADMIN]" in targets
        return defer.succeed(Outcome("reject", "Archive policy") if refuse else Outcome())

    hook.run = decide  # type: ignore[method-assign]
    w = make(events=hooks(deliver=hook))
    w.start()
    w.send(["bob@example.com", "admin@example.com"])
    wait_for(lambda: w.mails("BOB") and w.mails("ALICE"))
    w.idle()
    assert w.mails("ADMIN") == []
    assert sorted(c[2] for c in hook.calls) == [("[SF:ACME/ADMIN]",), ("[SF:ACME/BOB]",)]
    _, rcpt = dsn_fields(w.mails("ALICE")[0])
    assert rcpt["Final-Recipient"] == "rfc822;admin@example.com" and "5.7.1 Archive policy" in rcpt["Diagnostic-Code"]


def test_deliver_event_quarantine(make) -> None:
    w = make(events=hooks(deliver=Hook("quarantine")))
    w.start()
    qid = w.send(["bob@example.com"])
    wait_for(lambda: w.ids("quarantine") == [qid])
    w.idle()
    assert w.mails("BOB") == [] and w.mails("ALICE") == []


def test_events_loaded_from_settings(make, tmp_path) -> None:
    w = make()
    settings = config.parse(
        {"server": {"hostname": "h", "state_dir": str(tmp_path)},
         "events": {"pickup": [{"command": ["/bin/true"]}]}}
    )
    runner = Runner(settings, w.spool, w.store, [], reactor)
    assert runner.events.active("pickup") and not runner.events.active("deliver")


def test_too_many_hops_go_to_badmail(make) -> None:
    w = make()
    w.start()
    hops = b"".join(b"Received: from hop%d.test by hop%d.test; Sun, 22 Nov 2026 07:00:00 +0000\n" % (i, i + 1)
                    for i in range(31))
    qid = w.send(["bob@example.com"], data=hops + MSG)
    wait_for(lambda: w.ids(BADMAIL) == [qid] and w.mails("ALICE"))
    w.idle()
    assert w.mails("BOB") == []
    _, rcpt = dsn_fields(w.mails("ALICE")[0])
    assert rcpt["Status"] == "5.4.6"
    # 30 hops are still fine
    w.send(["bob@example.com"], data=hops.split(b"\n", 1)[1] + MSG)
    wait_for(lambda: w.mails("BOB"))


def test_forwarded_mail_leaves_with_srs_sender(make) -> None:
    class Peer(FakeSMTP):
        def deliver(self, envelope: Any, items: Any, message_path: str) -> Any:
            self.calls.append([(envelope.sender, t.value) for _, t in items])
            return defer.succeed([None] * len(items))

    peer = Peer()
    w = make(smtp=peer, mailboxes=MAILBOXES + ["ACME\tFWD\t1\t0\t2\tfar@remote.example"])
    w.start()
    w.send(["fwd@example.com"], sender="carol@remote.test")  # forwarded: SRS
    w.send(["far@remote.example"], sender="alice@example.com")  # our own user relaying: as is
    wait_for(lambda: len(peer.calls) == 2)
    w.idle()
    senders = [sender for call in peer.calls for sender, _ in call]
    assert "alice@example.com" in senders
    (srs_sender,) = [s for s in senders if s != "alice@example.com"]
    assert srs_sender.startswith("SRS0=") and srs_sender.endswith("=remote.test=carol@example.com")
    assert len(w.mails("FWD")) == 1  # the kept copy
    # a bounce to the SRS address goes back to carol
    from tmmail.router import resolve

    r = resolve(w.store.current(), srs_sender, w.runner.router_options)
    assert [str(t) for t in r.targets] == ["[SMTP:carol@remote.test]"]


# -- messages handed over in memory by the SMTP server (Runner.take) ---------------------------


def handed(w: World, rcpts: list[str], data: bytes = MSG) -> str:
    """Commit as the SMTP server does with an in-process runner: into active/, then take()."""
    from tmmail.groupcommit import GroupCommitter

    wr = w.spool.open_message()
    wr.write(data)
    job = wr.commit_job(Envelope.new(queue_id=wr.id, sender="alice@example.com", recipients=rcpts), ACTIVE)
    committer = GroupCommitter(reactor, [w.spool.root])
    try:
        assert committer.run_batch([job]) == [None]
    finally:
        committer.stop()
    assert w.ids(ACTIVE) == [wr.id] and w.ids(INCOMING) == []
    assert job.head == data and job.envelope_bytes == open(w.spool.path(ACTIVE, wr.id, ".env"), "rb").read()
    w.rt.call(w.runner.take, wr.id, job.envelope_bytes, job.head)
    return wr.id


def test_handed_over_message_is_delivered_and_removed(make) -> None:
    w = make()
    w.start()
    handed(w, ["admin@example.com", "bob@example.com"])
    wait_for(lambda: w.mails("ADMIN") and w.mails("BOB"))
    w.idle()
    assert w.mails("ADMIN")[0].endswith(MSG) and len(w.mails("BOB")) == 1
    assert all(w.ids(s) == [] for s in (INCOMING, ACTIVE, DEFERRED, BADMAIL, CORRUPT))


def test_handed_over_message_counts_hops_from_memory(make) -> None:
    w = make()
    w.start()
    hops = b"".join(b"Received: from hop%d.test by hop%d.test; Sun, 22 Nov 2026 07:00:00 +0000\n" % (i, i + 1)
                    for i in range(31))
    qid = handed(w, ["bob@example.com"], hops + MSG)
    wait_for(lambda: w.ids(BADMAIL) == [qid] and w.mails("ALICE"))
    assert w.mails("BOB") == []


def test_lost_move_and_removal_do_not_redeliver(make) -> None:
    """The move to active/ and the removal of a message delivered only to Maildirs are not
    synced: after a crash that lost both, the message is back in incoming/ although its copy
    is in the Maildir; recovery must recognise the copy, not deliver it twice."""
    w = make()
    qid = w.send(["admin@example.com"])
    files = {ext: open(w.spool.path(INCOMING, qid, ext), "rb").read() for ext in (".eml", ".env")}
    w.start()
    wait_for(lambda: w.mails("ADMIN"))
    w.idle()
    w.stop()
    assert w.ids(INCOMING) == [] and w.ids(ACTIVE) == []
    for ext, data in files.items():  # what the disk may hold after such a crash
        with open(w.spool.path(INCOMING, qid, ext), "wb") as f:
            f.write(data)
    w.start()
    wait_for(lambda: w.ids(INCOMING) == [])
    w.idle()
    time.sleep(0.2)
    assert len(w.mails("ADMIN")) == 1
    assert all(w.ids(s) == [] for s in (INCOMING, ACTIVE, DEFERRED, CORRUPT))


# -- a hand-over that fails (a bug in take): the message is taken from active/ all the same ----


class LogCapture:
    """twisted.logger events of one namespace prefix while the test runs."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if str(event.get("log_namespace", "")).startswith(self.prefix):
            self.events.append(event)

    def failures(self) -> list[dict]:
        return [e for e in self.events if "log_failure" in e]


@pytest.fixture
def logged():
    from twisted.logger import globalLogPublisher

    captures: list[LogCapture] = []

    def capture(prefix: str) -> LogCapture:
        c = LogCapture(prefix)
        globalLogPublisher.addObserver(c)
        captures.append(c)
        return c

    yield capture
    for c in captures:
        globalLogPublisher.removeObserver(c)


def test_failing_take_logs_and_reclaims_the_message_from_active(make, monkeypatch, logged) -> None:
    """A bug inside take (here: the in-memory queue raising once) must not leave the message
    in active/ until the next start: take logs the error and the runner takes the message
    from its files shortly after."""
    w = make()
    runner = w.start()
    runner.reclaim_delay = 0.1
    real_enqueue = runner._enqueue
    broken: list[str] = []

    def enqueue(qid: str, state: str) -> None:
        if state == ACTIVE and not broken:
            broken.append(qid)
            raise RuntimeError("simulated bug in the hand-over")
        real_enqueue(qid, state)

    monkeypatch.setattr(runner, "_enqueue", enqueue)
    errors = logged("tmmail.runner")
    qid = handed(w, ["admin@example.com", "bob@example.com"])  # take() did not raise
    assert broken == [qid]
    wait_for(lambda: w.mails("ADMIN") and w.mails("BOB"))
    w.idle()
    assert len(w.mails("ADMIN")) == 1 and len(w.mails("BOB")) == 1
    assert all(w.ids(s) == [] for s in (INCOMING, ACTIVE, DEFERRED, BADMAIL, CORRUPT))
    (event,) = errors.failures()
    assert event["queue_id"] == qid and "simulated bug" in str(event["log_failure"].value)
    assert runner._handed == {}


def test_reclaim_of_a_message_processed_after_all_does_nothing(make) -> None:
    w = make()
    runner = w.start()
    runner.reclaim_delay = 0.05
    qid = handed(w, ["admin@example.com"])
    w.rt.call(runner.reclaim, qid)
    wait_for(lambda: w.mails("ADMIN"))
    time.sleep(0.3)
    w.idle()
    assert len(w.mails("ADMIN")) == 1
    assert all(w.ids(s) == [] for s in (INCOMING, ACTIVE, DEFERRED, BADMAIL, CORRUPT))
    assert qid not in runner._due and qid not in runner._resumed


def test_smtp_answers_250_and_message_is_delivered_when_take_raises(make, monkeypatch, logged) -> None:
    """The in-process SMTP server hands a committed message to Runner.take; if take raises
    (as service.py wires it: factory.hand_off = runner.take), the client still gets 250 (the
    message is durable in active/) and the runner takes it from disk soon after."""
    import smtplib

    from tmmail.smtpserver import SMTPFactory

    w = make()
    runner = w.start()
    runner.reclaim_delay = 0.1
    calls: list[str] = []

    def broken_take(self: Runner, queue_id: str, envelope: bytes, head: bytes | None) -> None:
        calls.append(queue_id)
        raise ValueError("simulated bug in take")

    monkeypatch.setattr(Runner, "take", broken_take)
    factory = SMTPFactory(w.settings, "smtp", w.store, w.spool, None, None, runner.wake, reactor=reactor)
    factory.hand_off = runner.take  # as tmmail.service does
    errors = logged("tmmail.smtp")
    port = w.rt.listen(factory)
    try:
        with smtplib.SMTP("127.0.0.1", port.getHost().port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.mail("carol@remote.test")[0] == 250  # (a hosted sender needs AUTH)
            assert c.rcpt("bob@example.com")[0] == 250
            code, text = c.data(MSG.replace(b"\n", b"\r\n"))
        assert code == 250, (code, text)
        assert len(calls) == 1 and calls[0].encode() in text
        wait_for(lambda: w.mails("BOB"))
        w.idle()
    finally:
        w.rt.call(port.stopListening)
    assert len(w.mails("BOB")) == 1
    assert all(w.ids(s) == [] for s in (INCOMING, ACTIVE, DEFERRED, BADMAIL, CORRUPT))
    failures = errors.failures()
    assert failures and all(e.get("queue_id") == calls[0] for e in failures)
    assert any("simulated bug in take" in str(e["log_failure"].value) for e in failures)

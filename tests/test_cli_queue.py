"""``tmmail queue ...`` on a real spool in tmp_path (the server-running case is in test_outbound_e2e)."""

from __future__ import annotations

import io
import os
import time

import pytest

from tmmail import cli
from tmmail.cli_queue import BOUNCE_REPLY, HOLD
from tmmail.envelope import DELIVERED, FAILED, PENDING, Envelope
from tmmail.spool import ACTIVE, DEFERRED, INCOMING, Spool


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "tmmail.toml").write_text('[server]\nhostname = "mx.local.test"\nstate_dir = "var"\n')
    spool = Spool(str(tmp_path / "var" / "spool"))
    return tmp_path / "tmmail.toml", spool


def run(conf, *argv):
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["--config", str(conf), "queue", *argv], stdin=io.StringIO(), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def add(spool, state=DEFERRED, sender="alice@src.test", rcpts=("bob@far.test",), body=b"Subject: hi there\n\nbody\n",
        next_attempt=None, arrival=None):
    env = spool.add(lambda qid: Envelope.new(queue_id=qid, sender=sender, recipients=list(rcpts),
                                             arrival=arrival or time.time() - 3700), body)
    for r in env.recipients:
        r.target = f"[SMTP:{r.address}]"
        if next_attempt is not None:
            r.state, r.attempts, r.next_attempt = "deferred", 2, next_attempt
            r.last_reply = "451 4.4.1 could not connect"
    spool.save(INCOMING, env)
    if state != INCOMING:
        spool.move(env.queue_id, INCOMING, state)
    return env.queue_id


def load(spool, state, qid):
    return spool.load(state, qid)


def test_list_shows_one_line_per_recipient(setup):
    conf, spool = setup
    later = time.time() + 600
    a = add(spool, rcpts=("bob@far.test", "carol@other.test"), next_attempt=later)
    b = add(spool, state=INCOMING, sender="")
    status, out, _ = run(conf, "list")
    assert status == 0
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(x[0], x[1], x[4]) for x in lines] == [
        (b, INCOMING, "bob@far.test"), (a, DEFERRED, "bob@far.test"), (a, DEFERRED, "carol@other.test")]
    row = lines[1]
    assert row[2] == "1h01m" and row[3] == "alice@src.test" and row[5] == "deferred" and row[6] == "2"
    assert row[7].startswith("in 9m") or row[7].startswith("in 10m")
    assert row[8] == "451 4.4.1 could not connect"
    assert lines[0][3] == "<>" and lines[0][7] == "now"
    status, out, _ = run(conf, "list", "--domain", "OTHER.test")
    assert {x.split("\t")[0] for x in out.splitlines()} == {a}


def test_list_empty_queue(setup):
    conf, _ = setup
    assert run(conf, "list") == (0, "", "0 messages in the queue\n")


def test_show(setup):
    conf, spool = setup
    qid = add(spool, next_attempt=time.time() + 60)
    status, out, _ = run(conf, "show", qid)
    assert status == 0
    assert f"Queue-ID: {qid}\n" in out and "Queue: deferred\n" in out
    assert "Sender: <alice@src.test>\n" in out and "Header-Subject: hi there\n" in out
    assert "Recipient: bob@far.test\n" in out and "Last-Reply: 451 4.4.1 could not connect" in out
    assert run(conf, "show", "NOSUCHID")[0] == 2


def test_hold_and_release(setup):
    conf, spool = setup
    qid = add(spool, next_attempt=time.time() + 3600)
    status, out, _ = run(conf, "hold", qid)
    assert status == 0 and "held" in out
    root = spool.root
    assert os.path.exists(os.path.join(root, HOLD, qid + ".env")) and os.path.exists(os.path.join(root, HOLD, qid + ".eml"))
    assert spool.list(DEFERRED) == []
    _, out, _ = run(conf, "list")
    assert out.split("\t")[1] == HOLD and out.rstrip("\n").split("\t")[7] == "held"
    status, out, _ = run(conf, "release", qid)
    assert status == 0
    assert spool.list(INCOMING) == [qid]
    env = load(spool, INCOMING, qid)
    assert env.recipients[0].next_attempt == 0.0 and env.recipients[0].attempts == 2
    assert not os.listdir(os.path.join(root, HOLD))


def test_flush_by_id_and_domain(setup):
    conf, spool = setup
    later = time.time() + 3600
    a = add(spool, rcpts=("x@one.test",), next_attempt=later)
    b = add(spool, rcpts=("y@two.test",), next_attempt=later)
    c = add(spool, rcpts=("z@two.test",), next_attempt=later)
    status, out, _ = run(conf, "flush", "--domain", "two.test")
    assert status == 0 and out == "2 messages queued for immediate delivery\n"
    assert sorted(spool.list(INCOMING)) == sorted([b, c]) and spool.list(DEFERRED) == [a]
    assert run(conf, "flush", a)[0] == 0
    assert spool.list(DEFERRED) == []
    assert all(load(spool, INCOMING, q).recipients[0].next_attempt == 0 for q in (a, b, c))


def test_flush_all_skips_final_recipients(setup):
    conf, spool = setup
    qid = add(spool, rcpts=("a@x.test", "b@x.test"), next_attempt=time.time() + 100)
    env = load(spool, DEFERRED, qid)
    env.recipients[0].state = DELIVERED
    env.recipients[0].next_attempt = 5.0
    spool.save(DEFERRED, env)
    assert run(conf, "flush")[0] == 0
    env = load(spool, INCOMING, qid)
    assert env.recipients[0].state == DELIVERED and env.recipients[0].next_attempt == 5.0
    assert env.recipients[1].next_attempt == 0.0


def test_delete_without_report(setup):
    conf, spool = setup
    qid = add(spool)
    status, out, _ = run(conf, "delete", qid)
    assert status == 0 and "no report sent" in out
    for state in (DEFERRED, INCOMING, HOLD):
        d = os.path.join(spool.root, state)
        assert not any(n.startswith(qid) for n in os.listdir(d))
    assert run(conf, "delete", qid)[0] == 2


def test_bounce_fails_pending_recipients_and_hands_over_to_the_runner(setup):
    conf, spool = setup
    qid = add(spool, rcpts=("a@x.test", "b@x.test"), next_attempt=time.time() + 100)
    env = load(spool, DEFERRED, qid)
    env.recipients[0].state = DELIVERED
    spool.save(DEFERRED, env)
    status, out, _ = run(conf, "bounce", qid)
    assert status == 0 and "1 recipient returned; report to <alice@src.test>" in out
    env = load(spool, INCOMING, qid)
    assert [r.state for r in env.recipients] == [DELIVERED, FAILED]
    assert env.recipients[1].last_reply == BOUNCE_REPLY and not env.recipients[1].reported


def test_message_being_delivered_is_left_alone(setup):
    conf, spool = setup
    qid = add(spool, state=ACTIVE)
    for cmd in ("hold", "delete", "bounce", "flush"):
        status, _, err = run(conf, cmd, qid)
        assert status == 1 and "being delivered right now" in err
    assert spool.list(ACTIVE) == [qid]
    assert load(spool, ACTIVE, qid).recipients[0].state == PENDING


def test_bad_ids(setup):
    conf, _ = setup
    assert run(conf, "hold", "../etc")[0] == 2
    assert run(conf, "release", "NOPE")[0] == 2


def test_half_committed_message_is_not_taken(setup):
    conf, spool = setup
    # the SMTP server renames .eml into incoming/ first and .env last
    eml = os.path.join(spool.root, INCOMING, "HALF1.eml")
    with open(eml, "wb") as f:
        f.write(b"x\n")
    status, _, err = run(conf, "hold", "HALF1")
    assert status == 1 and "being queued right now" in err
    assert os.path.exists(eml) and not os.listdir(os.path.join(spool.root, HOLD))

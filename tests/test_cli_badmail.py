"""``tmmail badmail``: list, show, requeue, delete on a real spool."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from tmmail import cli, config
from tmmail.envelope import DELIVERED, FAILED, PENDING, Envelope
from tmmail.spool import BADMAIL, INCOMING, Spool


def run(conf: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["--config", str(conf), *args], stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tpl") / "var"
    assert cli.main(["init", str(d), "--domain", "example.com"], stdout=io.StringIO(), stderr=io.StringIO()) == 0
    return d


@pytest.fixture
def conf(template, tmp_path) -> Path:
    d = tmp_path / "var"
    shutil.copytree(template, d)
    return d / "tmmail.toml"


def bad_message(conf: Path) -> tuple[Spool, str]:
    spool = Spool(config.load(str(conf)).spool_dir)

    def env(qid: str) -> Envelope:
        e = Envelope.new(queue_id=qid, sender="carol@remote.example",
                         recipients=["ghost@example.com", "bob@example.com"])
        ghost, bob = e.recipients
        ghost.state, ghost.bad, ghost.reported = FAILED, True, True
        ghost.last_reply = "550 5.1.1 <ghost@example.com>: Recipient address unknown (mail loop: a -> b -> a)"
        bob.state, bob.target, bob.last_reply = DELIVERED, "[SF:EXAMPLE/bob]", "250 2.0.0 Delivered"
        return e

    e = spool.add(env, b"From: carol@remote.example\nSubject: lost\n\nbody\n")
    spool.move(e.queue_id, INCOMING, BADMAIL)
    return spool, e.queue_id


def test_list_show_delete(conf) -> None:
    spool, qid = bad_message(conf)
    rc, out, _ = run(conf, "badmail", "list")
    assert rc == 0
    [line] = out.splitlines()
    fields = line.split("\t")
    assert fields[0] == qid and fields[2:4] == ["carol@remote.example", "ghost@example.com"]
    assert "mail loop" in fields[4]
    rc, out, _ = run(conf, "badmail", "show", qid)
    assert rc == 0 and '"queue_id": "' + qid in out and "Subject: lost" in out and "body" not in out
    assert run(conf, "badmail", "delete", qid)[0] == 0
    assert spool.list(BADMAIL) == [] and os.listdir(os.path.join(spool.root, BADMAIL)) == []
    rc, _, err = run(conf, "badmail", "show", qid)
    assert rc == 2 and "no message" in err
    assert run(conf, "badmail", "delete", "../etc")[0] == 2


def test_requeue_resets_only_bad_recipients(conf) -> None:
    spool, qid = bad_message(conf)
    rc, out, _ = run(conf, "badmail", "requeue", qid)
    assert rc == 0 and "1 recipient(s)" in out
    assert spool.list(BADMAIL) == [] and spool.list(INCOMING) == [qid]
    env = spool.load(INCOMING, qid)
    ghost, bob = env.recipients
    assert (ghost.state, ghost.bad, ghost.target, ghost.reported, ghost.attempts) == (PENDING, False, "", False, 0)
    assert (bob.state, bob.target) == (DELIVERED, "[SF:EXAMPLE/bob]")  # not delivered twice


def test_quarantine_list_release_delete(conf) -> None:
    from tmmail.spool import QUARANTINE

    spool = Spool(config.load(str(conf)).spool_dir)
    ids = []
    for subject in ("held one", "held two"):
        e = spool.add(lambda qid: Envelope.new(queue_id=qid, sender="carol@remote.example",
                                               recipients=["bob@example.com"]),
                      f"From: carol@remote.example\nSubject: {subject}\n\nbody\n".encode())
        spool.move(e.queue_id, INCOMING, QUARANTINE)
        ids.append(e.queue_id)
    rc, out, _ = run(conf, "quarantine", "list")
    assert rc == 0 and [ln.split("\t")[0] for ln in out.splitlines()] == ids
    assert "Subject: held one" in run(conf, "quarantine", "show", ids[0])[1]
    assert run(conf, "quarantine", "release", ids[0])[0] == 0
    env = spool.load(INCOMING, ids[0])
    assert env.checked and env.recipients[0].state == PENDING  # the pickup hooks will not hold it again
    assert env.released  # nor the deliver hooks
    assert run(conf, "quarantine", "delete", ids[1])[0] == 0
    assert spool.list(QUARANTINE) == []
    assert run(conf, "badmail", "show", ids[0])[0] == 2  # not in badmail/

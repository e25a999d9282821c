"""tmmail.groupcommit: spool commits through the committer thread, shared syncs, failures."""

from __future__ import annotations

import os
import threading
import zlib

import pytest
from twisted.internet import defer

from tmmail.envelope import Envelope
from tmmail.groupcommit import GroupCommitter
from tmmail.spool import ACTIVE, INCOMING, TMP, Spool


class _Reactor:
    """callFromThread runs at once (the Deferreds are only inspected after a blocking wait)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def callFromThread(self, fn, *args):  # noqa: N802 - Twisted's name
        with self.lock:
            fn(*args)


def _writer(spool: Spool, body: bytes = b"Subject: x\n\nhello\n"):
    w = spool.open_message()
    w.write(body)
    env = Envelope.new(queue_id=w.id, sender="a@b.test", recipients=["c@d.test"], helo="h",
                       client_ip="127.0.0.1", auth_login=None, protocol="ESMTP", mail_params={},
                       rcpt_params={"c@d.test": {}})
    return w, env


def _wait(ds: list[defer.Deferred], timeout: float = 10.0) -> list:
    done = threading.Event()
    results: list = [None] * len(ds)
    left = [len(ds)]

    def got(r, i):
        results[i] = r
        left[0] -= 1
        if not left[0]:
            done.set()

    for i, d in enumerate(ds):
        d.addBoth(got, i)
    assert done.wait(timeout), "commits never finished"
    return results


@pytest.mark.parametrize("use_syncfs", [True, False])
def test_many_commits_land_in_incoming_and_share_cycles(tmp_path, use_syncfs):
    spool = Spool(str(tmp_path / "spool"))
    gc = GroupCommitter(_Reactor(), [spool.root], use_syncfs=use_syncfs)
    try:
        jobs = []
        ids = []
        for i in range(50):
            w, env = _writer(spool, f"Subject: {i}\n\nbody {i}\n".encode())
            ids.append(w.id)
            jobs.append(w.commit_job(env))
        ds = [gc.commit(j) for j in jobs]
        results = _wait(ds)
    finally:
        gc.stop()
    assert results == [None] * 50
    assert sorted(spool.list(INCOMING)) == sorted(ids)
    assert os.listdir(os.path.join(spool.root, TMP)) == []
    for i, qid in enumerate(ids):
        with open(spool.message_path(INCOMING, qid), "rb") as f:
            assert f.read() == f"Subject: {i}\n\nbody {i}\n".encode()
        assert spool.load(INCOMING, qid).recipients[0].address == "c@d.test"
    # queued before the thread could start: far fewer cycles than jobs
    assert gc.jobs == 50 and gc.cycles < 50


def test_failed_publish_rolls_back_and_reports(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    gc = GroupCommitter(_Reactor(), [spool.root])
    good_w, good_env = _writer(spool)
    bad_w, bad_env = _writer(spool)
    bad_job = bad_w.commit_job(bad_env)
    original = bad_job.publish

    def broken_publish():
        original()
        raise OSError("disk trouble")

    bad_job.publish = broken_publish
    try:
        results = _wait([gc.commit(good_w.commit_job(good_env)), gc.commit(bad_job)])
    finally:
        gc.stop()
    assert results[0] is None
    assert results[1].check(OSError)
    # the failed one is gone everywhere (the client heard 451 and keeps the message)
    assert spool.list(INCOMING) == [good_w.id]
    assert not os.path.exists(spool.message_path(INCOMING, bad_w.id))
    assert os.listdir(os.path.join(spool.root, TMP)) == []


def test_commit_after_stop_fails(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    gc = GroupCommitter(_Reactor(), [spool.root])
    gc.stop()
    w, env = _writer(spool)
    results = _wait([gc.commit(w.commit_job(env))])
    assert results[0].check(OSError)
    assert os.listdir(os.path.join(spool.root, TMP)) == []


def _count_syncs(gc: GroupCommitter, order: list[str]):
    """Record each sync in ``order`` (as "sync") beside the publishes ("publish ID")."""
    real = gc._sync_all

    def counted():
        order.append("sync")
        real()

    gc._sync_all = counted


@pytest.mark.skipif(GroupCommitter(_Reactor(), ["/"]).use_syncfs is False and os.environ.get("CI") != "true",
                    reason="syncfs(2) is not available on this kernel")
def test_commits_into_active_publish_first_and_sync_once(tmp_path):
    """A verified job (a commit into active/) is published before the cycle's only sync; a
    commit into incoming/ keeps data-sync, publish, rename-sync."""
    spool = Spool(str(tmp_path / "spool"))
    gc = GroupCommitter(_Reactor(), [spool.root])
    assert gc.use_syncfs
    order: list[str] = []
    _count_syncs(gc, order)

    def job(state):
        w, env = _writer(spool)
        j = w.commit_job(env, state)
        real = j.publish
        j.publish = lambda: (order.append("publish " + state), real())[1]
        return w, j

    try:
        w1, j1 = job(ACTIVE)
        assert gc.run_batch([j1]) == [None]
        assert order == ["publish active", "sync"]
        del order[:]
        w2, j2 = job(INCOMING)
        assert gc.run_batch([j2]) == [None]
        assert order == ["sync", "publish incoming", "sync"]
    finally:
        gc.stop()
    env = spool.load(ACTIVE, w1.id)
    data = open(spool.message_path(ACTIVE, w1.id), "rb").read()
    assert env.data_size == len(data) and env.data_crc == zlib.crc32(data)
    assert spool.list(INCOMING) == [w2.id]


def test_failed_sync_after_early_publish_takes_the_files_back(tmp_path):
    """The one sync of a verified cycle fails: nobody is told "durable", and the files that
    were already published are removed again (the client hears 451 and keeps the message)."""
    spool = Spool(str(tmp_path / "spool"))
    gc = GroupCommitter(_Reactor(), [spool.root], use_syncfs=True)

    def broken():
        raise OSError(5, "write-back error")

    gc._sync_all = broken
    w, env = _writer(spool)
    try:
        results = gc.run_batch([w.commit_job(env, ACTIVE)])
    finally:
        gc.stop()
    assert isinstance(results[0], OSError)
    assert spool.list(ACTIVE) == [] and os.listdir(os.path.join(spool.root, ACTIVE)) == []
    assert os.listdir(os.path.join(spool.root, TMP)) == []


def test_shared_sync_coalesces_concurrent_callers_and_a_failure_covers_nobody():
    """Callers that ask while a sync runs share the next one; a failed sync makes every
    waiter try again and see its own error, never a false "durable"."""
    import threading

    from tmmail.groupcommit import SharedSync

    started = threading.Event()
    release = threading.Event()
    runs: list[int] = []
    fail = {"next": False}

    def fn() -> None:
        runs.append(1)
        if len(runs) == 1:  # hold the first call so the others queue behind it
            started.set()
            release.wait(10)
        if fail["next"]:
            fail["next"] = False
            raise OSError(5, "Input/output error")

    s = SharedSync(fn)
    first = threading.Thread(target=s.sync)
    first.start()
    assert started.wait(10)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            s.sync()
        except OSError as e:
            errors.append(e)

    waiters = [threading.Thread(target=call) for _ in range(8)]
    for t in waiters:
        t.start()
    import time

    deadline = time.monotonic() + 10
    while s._requested < 9 and time.monotonic() < deadline:  # all eight queued behind the first
        time.sleep(0.01)
    release.set()
    first.join(10)
    for t in waiters:
        t.join(10)
    assert not errors
    assert len(runs) == 2 and s.calls == 2  # the first call, then one for all eight waiters

    fail["next"] = True
    with pytest.raises(OSError):
        s.sync()
    assert s.calls == 2
    s.sync()  # the next caller syncs again: the failed call covered nobody
    assert s.calls == 3

"""The spool: committed messages are durable and every crash half-state is repaired."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tmmail.envelope import DELIVERED, Envelope
from tmmail.spool import (
    ACTIVE,
    BADMAIL,
    CORRUPT,
    DEFERRED,
    HOLD,
    INCOMING,
    TMP,
    Spool,
    new_queue_id,
    valid_queue_id,
)

DATA = b"Subject: hi\n\nbody\n"


def restarted(spool: Spool) -> Spool:
    """The spool as a process started after a crash sees it: everything on disk is older."""
    again = Spool(spool.root)
    again.started = time.time() + 2 * Spool.CLOCK_SLACK
    return again


def receive(spool: Spool, data: bytes = DATA, rcpts: tuple[str, ...] = ("x@example.com",)) -> str:
    w = spool.open_message()
    w.write(data)
    w.commit(Envelope.new(queue_id=w.id, sender="a@example.org", recipients=list(rcpts)))
    return w.id


def files(spool: Spool, state: str) -> list[str]:
    return sorted(os.listdir(os.path.join(spool.root, state)))


def test_creates_directories(tmp_path) -> None:
    Spool(str(tmp_path / "spool"))
    assert sorted(os.listdir(tmp_path / "spool")) == sorted(
        ["tmp", "incoming", "active", "deferred", "badmail", "corrupt", "hold", "quarantine"]
    )


def test_queue_ids_unique_alnum_and_time_sorted() -> None:
    ids = [new_queue_id(1700000000.0 + i) for i in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(valid_queue_id(i) and i.isalnum() and i.isascii() for i in ids)
    assert [i[:9] for i in ids] == sorted(i[:9] for i in ids)
    assert not valid_queue_id("../x") and not valid_queue_id("")


def test_commit_puts_message_in_incoming(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    w = spool.open_message()
    w.write(b"Subject: hi\n")
    assert files(spool, TMP) == []  # small messages stay in memory until the commit
    w.write(b"\nbody\n")
    w.commit(Envelope.new(queue_id=w.id, sender="a@b", recipients=["x@y"]))
    assert files(spool, TMP) == []
    assert files(spool, INCOMING) == [w.id + ".eml", w.id + ".env"]
    assert open(spool.message_path(INCOMING, w.id), "rb").read() == DATA
    assert spool.load(INCOMING, w.id).recipients[0].address == "x@y"
    assert spool.list(INCOMING) == [w.id]


def test_big_message_spills_to_tmp_and_commits_whole(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    w = spool.open_message()
    w.SPILL = 100
    chunk = b"x" * 70 + b"\n"
    w.write(chunk)
    assert files(spool, TMP) == []
    w.write(chunk)
    assert files(spool, TMP) == [w.id + ".eml"]
    w.write(chunk)
    w.commit(Envelope.new(queue_id=w.id, sender="a@b", recipients=["x@y"]))
    assert open(spool.message_path(INCOMING, w.id), "rb").read() == chunk * 3
    assert files(spool, TMP) == []


def test_abort_leaves_nothing(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    w = spool.open_message()
    w.write(DATA)
    w.abort()
    assert all(files(spool, d) == [] for d in (TMP, INCOMING))


def test_commit_with_wrong_envelope_refused(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    w = spool.open_message()
    with pytest.raises(ValueError):
        w.commit(Envelope.new(queue_id="other", sender="", recipients=["x@y"]))
    assert files(spool, INCOMING) == []


def test_concurrent_commits_from_threads(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    ids: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(10):
            qid = receive(spool)
            with lock:
                ids.append(qid)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(ids)) == 60
    assert spool.list(INCOMING) == sorted(ids)


def test_move_save_remove(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    qid = receive(spool)
    spool.move(qid, INCOMING, ACTIVE)
    env = spool.load(ACTIVE, qid)
    env.recipients[0].attempts = 3
    spool.save(ACTIVE, env)
    assert spool.load(ACTIVE, qid).recipients[0].attempts == 3
    assert files(spool, TMP) == []
    spool.move(qid, ACTIVE, DEFERRED)
    assert files(spool, ACTIVE) == [] and spool.list(DEFERRED) == [qid]
    spool.remove(qid, DEFERRED)
    assert files(spool, DEFERRED) == []


# -- crash recovery: each half-state --------------------------------------------------------


def test_recover_half_move_completes_it(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    qid = receive(spool)
    # crash after the .eml rename of incoming -> active, before the .env rename
    os.rename(spool.path(INCOMING, qid, ".eml"), spool.path(ACTIVE, qid, ".eml"))
    found = restarted(spool).recover()
    assert found[ACTIVE] == [qid] and found[INCOMING] == []
    assert open(spool.message_path(ACTIVE, qid), "rb").read() == DATA


@pytest.mark.parametrize("src,dst", [(ACTIVE, DEFERRED), (DEFERRED, ACTIVE), (ACTIVE, BADMAIL)])
def test_recover_every_half_move(tmp_path, src: str, dst: str) -> None:
    spool = Spool(str(tmp_path))
    qid = receive(spool)
    spool.move(qid, INCOMING, src)
    os.rename(spool.path(src, qid, ".eml"), spool.path(dst, qid, ".eml"))
    found = restarted(spool).recover()
    assert found[dst] == [qid] and found[src] == []
    assert sorted(files(spool, dst)) == [qid + ".eml", qid + ".env"]


def test_recover_half_commit_drops_unacknowledged(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    w = spool.open_message()
    w.write(DATA)
    w._close_data()
    # crash inside commit(): .eml renamed into incoming/, .env still in tmp/ (no 250 was sent)
    with open(spool.path(TMP, w.id, ".env"), "wb") as f:
        f.write(Envelope.new(queue_id=w.id, sender="", recipients=["x@y"]).to_bytes())
    os.rename(spool.path(TMP, w.id, ".eml"), spool.path(INCOMING, w.id, ".eml"))
    other = receive(spool)
    found = restarted(spool).recover()
    assert found[INCOMING] == [other]
    assert files(spool, TMP) == [] and files(spool, CORRUPT) == []


def test_recover_cleans_tmp_leftovers(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    w = spool.open_message()
    w.write(DATA)
    (tmp_path / "tmp" / "Q1.1234.save").write_bytes(b"partial")
    restarted(spool).recover()
    assert files(spool, TMP) == []


def test_recover_half_removal_completes_it(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    qid = receive(spool)
    spool.move(qid, INCOMING, ACTIVE)
    env = spool.load(ACTIVE, qid)
    env.recipients[0].state = DELIVERED
    spool.save(ACTIVE, env)
    os.unlink(spool.message_path(ACTIVE, qid))  # crash between the two unlinks
    found = restarted(spool).recover()
    assert found[ACTIVE] == [] and files(spool, ACTIVE) == [] and files(spool, CORRUPT) == []


def test_recover_envelope_without_data_pending_goes_to_corrupt(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    qid = receive(spool)
    os.unlink(spool.message_path(INCOMING, qid))
    found = restarted(spool).recover()
    assert found[INCOMING] == [] and found[CORRUPT] == [qid]


def test_recover_data_without_envelope_goes_to_corrupt(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    qid = receive(spool)
    os.unlink(spool.path(INCOMING, qid, ".env"))
    restarted(spool).recover()
    assert files(spool, INCOMING) == []
    assert files(spool, CORRUPT) == [qid + ".eml"]
    assert open(spool.path(CORRUPT, qid), "rb").read() == DATA


def test_unreadable_envelope_is_kept_in_corrupt(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    qid = receive(spool)
    with open(spool.path(INCOMING, qid, ".env"), "wb") as f:
        f.write(b"{garbage")
    assert [(i, e) for i, e in spool.iter_envelopes(INCOMING)] == [(qid, None)]
    spool.to_corrupt(qid, INCOMING)
    assert files(spool, CORRUPT) == [qid + ".eml", qid + ".env"]
    # a second corrupt message with the same id does not overwrite the first
    qid2 = receive(spool)
    os.rename(spool.path(INCOMING, qid2, ".env"), spool.path(INCOMING, qid, ".env"))
    os.rename(spool.path(INCOMING, qid2, ".eml"), spool.path(INCOMING, qid, ".eml"))
    spool.to_corrupt(qid, INCOMING)
    assert len(files(spool, CORRUPT)) == 4


def test_add_queues_generated_message(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    env = spool.add(lambda qid: Envelope.new(queue_id=qid, sender="", recipients=["a@b"], origin="dsn"), DATA)
    assert spool.list(INCOMING) == [env.queue_id]
    assert spool.load(INCOMING, env.queue_id).origin == "dsn"


def test_recover_leaves_work_of_this_process_alone(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    receiving = spool.open_message()  # an SMTP session in the middle of DATA
    receiving.write(DATA)
    committing = spool.open_message()  # a commit between its two renames
    committing.write(DATA)
    committing._close_data()
    with open(spool.path(TMP, committing.id, ".env"), "wb") as f:
        f.write(Envelope.new(queue_id=committing.id, sender="", recipients=["x@y"]).to_bytes())
    os.rename(spool.path(TMP, committing.id, ".eml"), spool.path(INCOMING, committing.id, ".eml"))
    spool.recover()
    assert files(spool, CORRUPT) == []
    os.rename(spool.path(TMP, committing.id, ".env"), spool.path(INCOMING, committing.id, ".env"))
    assert spool.list(INCOMING) == [committing.id]
    receiving.commit(Envelope.new(queue_id=receiving.id, sender="", recipients=["x@y"]))
    assert spool.list(INCOMING) == sorted([committing.id, receiving.id])


@pytest.mark.parametrize("step", [1, 2])
def test_recover_half_removal_with_stale_envelope(tmp_path, step: int) -> None:
    # the runner removes a finished message without saving its last outcomes first
    spool = Spool(str(tmp_path))
    qid = receive(spool)
    spool.move(qid, INCOMING, ACTIVE)
    os.rename(spool.path(ACTIVE, qid, ".env"), spool.path(ACTIVE, qid, ".done"))
    if step == 2:
        os.unlink(spool.message_path(ACTIVE, qid))
    found = restarted(spool).recover()
    assert found[ACTIVE] == [] and files(spool, ACTIVE) == [] and files(spool, CORRUPT) == []


def test_recover_completes_half_claim_into_hold(tmp_path) -> None:
    # `tmmail queue hold` moves .eml then .env from deferred/ to hold/, as the runner does
    spool = Spool(str(tmp_path))
    qid = receive(spool)
    spool.move(qid, INCOMING, DEFERRED)
    os.rename(spool.path(DEFERRED, qid, ".eml"), spool.path(HOLD, qid, ".eml"))
    found = restarted(spool).recover()
    assert found[HOLD] == [qid] and found[DEFERRED] == [] and found[CORRUPT] == []


def test_failed_commit_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    spool = Spool(str(tmp_path))
    w = spool.open_message()
    w.write(DATA)

    def broken_sync() -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool._dirsync[INCOMING], "sync", broken_sync)
    with pytest.raises(OSError):
        w.commit(Envelope.new(queue_id=w.id, sender="", recipients=["x@y"]))
    # the SMTP server answers 451: the message must not be delivered behind the client's back
    assert files(spool, INCOMING) == [] and files(spool, TMP) == []


# -- commits published before their sync (tmmail.groupcommit, verified jobs) -----------------


def committed_to_active(spool: Spool, data: bytes = DATA) -> str:
    from tmmail.groupcommit import GroupCommitter

    w = spool.open_message()
    w.write(data)
    job = w.commit_job(Envelope.new(queue_id=w.id, sender="a@example.org", recipients=["x@example.com"]), ACTIVE)

    class Now:
        def callFromThread(self, fn, *a):  # noqa: N802
            fn(*a)

    gc = GroupCommitter(Now(), [spool.root])
    try:
        assert gc.run_batch([job]) == [None]
    finally:
        gc.stop()
    return w.id


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "empty"])
def test_recover_moves_a_commit_whose_data_never_reached_the_disk_to_corrupt(tmp_path, damage: str) -> None:
    """A crash between publishing and the sync: the names are durable, the data is not.  No
    250 was sent; the message must not be delivered as it is (nor deleted: corrupt/)."""
    spool = Spool(str(tmp_path))
    data = DATA * 100
    qid = committed_to_active(spool, data)
    good = committed_to_active(spool, data)
    path = spool.message_path(ACTIVE, qid)
    with open(path, "r+b") as f:
        if damage == "truncated":
            f.truncate(len(data) // 2)
        elif damage == "zeroed":
            f.seek(4096 if len(data) > 4096 else 0)
            f.write(b"\0" * 512)
        else:
            f.truncate(0)
    found = restarted(spool).recover()
    assert found[ACTIVE] == [good]
    assert sorted(files(spool, CORRUPT)) == [qid + ".eml", qid + ".env"]
    assert open(spool.message_path(ACTIVE, good), "rb").read() == data


def test_recover_keeps_envelopes_without_a_checksum(tmp_path) -> None:
    """Envelopes written before the size/CRC fields existed are not judged by them."""
    spool = Spool(str(tmp_path))
    qid = receive(spool)
    env = spool.load(INCOMING, qid)
    env.data_size = env.data_crc = None
    spool.save(INCOMING, env)
    with open(spool.message_path(INCOMING, qid), "ab") as f:
        f.write(b"more\n")
    assert restarted(spool).recover()[INCOMING] == [qid]


def test_commit_into_active_of_a_spilled_message(tmp_path) -> None:
    """A message too big to keep in memory was spilled to tmp/; its commit into active/
    renames it there and the recorded size and checksum match what recovery reads."""
    spool = Spool(str(tmp_path))
    data = b"Subject: big\n\n" + b"y" * 72 + b"\n"
    data = data * ((3 << 19) // len(data))  # ~1.5 MiB, over SpoolWriter.SPILL
    qid = committed_to_active(spool, data)
    assert files(spool, TMP) == []
    assert open(spool.message_path(ACTIVE, qid), "rb").read() == data
    assert restarted(spool).recover()[ACTIVE] == [qid]

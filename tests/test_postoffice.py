"""Post office delivery into real Maildirs: headers, quota, disabled and missing mailboxes."""

from __future__ import annotations

import os

from zope.interface.verify import verifyObject

from tmmail.address import InternalAddress
from tmmail.connectors.postoffice import MaildirSizer, PostOfficeConnector
from tmmail.envelope import Envelope
from tmmail.errors import PermanentError, TransientError
from tmmail.interfaces import IConnector
from tmmail.providers import ProviderStore

MSG = b"Received: from x\nSubject: hi\n\nhello\n"


def setup(tmp_path, mailbox_rows: list[str]):
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "DOMAINS.tab").write_text("example.com\tACME\t1\n")
    (cfg / "POSTOFFICE.tab").write_text("ACME\t1\nOFF\t0\n")
    (cfg / "MAILBOX.tab").write_text("".join(r + "\n" for r in mailbox_rows))
    store = ProviderStore(str(cfg))
    po_dir = tmp_path / "postoffices"
    msg = tmp_path / "msg.eml"
    msg.write_bytes(MSG)
    return PostOfficeConnector(str(po_dir), store, reactor=object()), str(po_dir), str(msg)


def env(*rcpts: str) -> Envelope:
    return Envelope.new(queue_id="Q1", sender="alice@example.org", recipients=list(rcpts))


def new_files(po_dir: str, po: str, mbx: str) -> list[bytes]:
    new = os.path.join(po_dir, po, mbx, "Maildir", "new")
    return [open(os.path.join(new, n), "rb").read() for n in sorted(os.listdir(new))]


def test_provides_interface(tmp_path) -> None:
    conn, _, _ = setup(tmp_path, ["ACME\tADMIN\t1\t0"])
    verifyObject(IConnector, conn)
    assert conn.scheme == "SF"
    assert conn.batch_key(InternalAddress("SF", "acme/admin")) == conn.batch_key(InternalAddress("SF", "ACME/ADMIN"))


def test_delivers_with_return_path_and_delivered_to(tmp_path) -> None:
    conn, po_dir, msg = setup(tmp_path, ["ACME\tADMIN\t1\t0"])
    e = env("Admin@example.com")
    out = conn.deliver_blocking(e, [(e.recipients[0], InternalAddress("SF", "ACME/ADMIN"))], msg)
    assert out == [None]
    (stored,) = new_files(po_dir, "ACME", "ADMIN")
    assert stored == b"Return-Path: <alice@example.org>\nDelivered-To: Admin@example.com\n" + MSG
    # a Maildir++ with the special folders was created
    assert os.path.isdir(os.path.join(po_dir, "ACME", "ADMIN", "Maildir", ".Sent", "cur"))


def test_same_mailbox_twice_in_a_batch_gets_one_copy(tmp_path) -> None:
    conn, po_dir, msg = setup(tmp_path, ["ACME\tADMIN\t1\t0"])
    e = env("a@example.com", "b@example.com")
    t = InternalAddress("SF", "ACME/ADMIN")
    assert conn.deliver_blocking(e, [(e.recipients[0], t), (e.recipients[1], t)], msg) == [None, None]
    assert len(new_files(po_dir, "ACME", "ADMIN")) == 1


def test_null_sender_return_path(tmp_path) -> None:
    conn, po_dir, msg = setup(tmp_path, ["ACME\tADMIN\t1\t0"])
    e = Envelope.new(queue_id="Q2", sender="", recipients=["admin@example.com"])
    conn.deliver_blocking(e, [(e.recipients[0], InternalAddress("SF", "ACME/ADMIN"))], msg)
    assert new_files(po_dir, "ACME", "ADMIN")[0].startswith(b"Return-Path: <>\n")


def test_missing_and_disabled_mailboxes_fail_permanently(tmp_path) -> None:
    conn, _, msg = setup(tmp_path, ["ACME\tGONE\t0\t0", "OFF\tX\t1\t0"])
    e = env("a@example.com", "b@example.com", "c@example.com")
    out = conn.deliver_blocking(
        e,
        [
            (e.recipients[0], InternalAddress("SF", "ACME/NOBODY")),
            (e.recipients[1], InternalAddress("SF", "ACME/GONE")),
            (e.recipients[2], InternalAddress("SF", "OFF/X")),
        ],
        msg,
    )
    assert all(isinstance(o, PermanentError) for o in out)
    assert [o.enhanced for o in out] == ["5.1.1", "5.2.1", "5.2.1"]


def test_quota(tmp_path) -> None:
    per_copy = len(MSG) + len(b"Return-Path: <alice@example.org>\nDelivered-To: a@example.com\n")
    conn, po_dir, msg = setup(tmp_path, [f"ACME\tSMALL\t1\t{per_copy * 2}", "ACME\tTINY\t1\t10"])
    e = env("a@example.com")
    t = InternalAddress("SF", "ACME/SMALL")
    items = [(e.recipients[0], t)]
    assert conn.deliver_blocking(e, items, msg) == [None]
    assert conn.deliver_blocking(e, items, msg) == [None]
    (full,) = conn.deliver_blocking(e, items, msg)
    assert isinstance(full, TransientError) and (full.code, full.enhanced) == (452, "4.2.2")
    assert len(new_files(po_dir, "ACME", "SMALL")) == 2
    # the user deletes a message: there is room again
    new = os.path.join(po_dir, "ACME", "SMALL", "Maildir", "new")
    os.unlink(os.path.join(new, sorted(os.listdir(new))[0]))
    assert conn.deliver_blocking(e, items, msg) == [None]
    # bigger than the whole quota: no point retrying
    (big,) = conn.deliver_blocking(e, [(e.recipients[0], InternalAddress("SF", "ACME/TINY"))], msg)
    assert isinstance(big, PermanentError) and big.enhanced == "5.2.2"


def test_sizer_counts_folders_and_follows_changes(tmp_path) -> None:
    from tmmail import maildir

    root = str(tmp_path / "Maildir")
    maildir.create(root)
    src = tmp_path / "m"
    src.write_bytes(b"x" * 100)
    sizer = MaildirSizer()
    assert sizer.size(root) == 0
    maildir.deliver(root, str(src))
    maildir.deliver(root, str(src), folder="Sent")
    assert sizer.size(root) == 200
    # a file in cur/ without ,S= is stat'ed
    (tmp_path / "Maildir" / "cur" / "odd:2,S").write_bytes(b"y" * 7)
    assert sizer.size(root) == 207
    assert sizer.size(str(tmp_path / "missing")) == 0


def test_deliver_runs_in_a_thread(tmp_path, reactor_thread) -> None:
    from twisted.internet import reactor

    conn, po_dir, msg = setup(tmp_path, ["ACME\tADMIN\t1\t0"])
    conn.reactor = reactor
    e = env("admin@example.com")
    out = reactor_thread.call(conn.deliver, e, [(e.recipients[0], InternalAddress("SF", "ACME/ADMIN"))], msg)
    assert out == [None] and len(new_files(po_dir, "ACME", "ADMIN")) == 1


def test_half_created_maildir_is_completed(tmp_path) -> None:
    conn, po_dir, msg = setup(tmp_path, ["ACME\tADMIN\t1\t0"])
    # a crash inside maildir.create left new/ but no tmp/
    os.makedirs(os.path.join(po_dir, "ACME", "ADMIN", "Maildir", "new"))
    e = env("admin@example.com")
    assert conn.deliver_blocking(e, [(e.recipients[0], InternalAddress("SF", "ACME/ADMIN"))], msg) == [None]
    assert len(new_files(po_dir, "ACME", "ADMIN")) == 1


def test_recovered_message_not_delivered_twice(tmp_path) -> None:
    conn, po_dir, msg = setup(tmp_path, ["ACME\tADMIN\t1\t0", "ACME\tBOB\t1\t0"])
    e = env("admin@example.com", "bob@example.com")
    admin, bob = [(r, InternalAddress("SF", "ACME/" + n)) for r, n in zip(e.recipients, ("ADMIN", "BOB"))]
    assert conn.deliver_blocking(e, [admin], msg) == [None]
    # the server died before the spool recorded it; after the restart the runner tries again
    e.recovered = True
    assert conn.deliver_blocking(e, [admin], msg) == [None]
    assert conn.deliver_blocking(e, [bob], msg) == [None]
    assert len(new_files(po_dir, "ACME", "ADMIN")) == 1  # recognised, not delivered again
    assert len(new_files(po_dir, "ACME", "BOB")) == 1  # never delivered: delivered now
    # the user already read it (moved to cur/ with flags): still recognised
    new = os.path.join(po_dir, "ACME", "ADMIN", "Maildir", "new")
    (name,) = os.listdir(new)
    os.rename(os.path.join(new, name), os.path.join(po_dir, "ACME", "ADMIN", "Maildir", "cur", name + ":2,S"))
    assert conn.deliver_blocking(e, [admin], msg) == [None]
    assert new_files(po_dir, "ACME", "ADMIN") == []
    # a different message of the same size is not mistaken for it
    other = tmp_path / "other.eml"
    other.write_bytes(MSG.replace(b"hello", b"HELLO"))
    assert conn.deliver_blocking(e, [admin], str(other)) == [None]
    assert len(new_files(po_dir, "ACME", "ADMIN")) == 1


def test_subaddress_folder(tmp_path) -> None:
    from tmmail import config

    conn, po_dir, msg = setup(tmp_path, ["ACME\tADMIN\t1\t0"])
    settings = config.parse({"server": {"state_dir": str(tmp_path)}, "router": {"subaddress_folders": True}})
    conn = PostOfficeConnector(settings, conn.store, reactor=object())
    conn.postoffices_dir = po_dir
    root = os.path.join(po_dir, "ACME", "ADMIN", "Maildir")
    e = env("admin+lists@example.com", "admin+nosuch@example.com")
    t = InternalAddress("SF", "ACME/ADMIN")
    conn.deliver_blocking(e, [(e.recipients[0], t)], msg)  # creates the Maildir; no Lists folder yet
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(root, ".Lists", sub))
    conn.deliver_blocking(e, [(e.recipients[0], t)], msg)
    conn.deliver_blocking(e, [(e.recipients[1], t)], msg)
    assert len(os.listdir(os.path.join(root, ".Lists", "new"))) == 1  # case-insensitive match
    assert len(os.listdir(os.path.join(root, "new"))) == 2  # no folder yet / no such folder: INBOX


def test_batch_delivers_several_messages_and_counts_quota_within_the_batch(tmp_path) -> None:
    # several queue entries in one thread job (shared syncs); a quota for two messages lets
    # exactly two of the three in, even though none is in new/ when the batch is planned
    conn, po_dir, msg = setup(tmp_path, ["ACME\tADMIN\t1\t250"])
    envs = [env("admin@example.com") for _ in range(3)]
    out = conn.deliver_many_blocking(
        [(e, [(e.recipients[0], InternalAddress("SF", "ACME/ADMIN"))], msg) for e in envs]
    )
    assert out[:2] == [[None], [None]]
    assert out[2][0] is not None and out[2][0].code == 452
    files = new_files(po_dir, "ACME", "ADMIN")
    assert len(files) == 2 and all(f.startswith(b"Return-Path: <") for f in files)
    tmp = os.path.join(po_dir, "ACME", "ADMIN", "Maildir", "tmp")
    assert os.listdir(tmp) == []


def test_two_parallel_jobs_share_the_quota(tmp_path) -> None:
    # the connector runs two thread jobs at once; both hold a message for the same mailbox
    # with room for one. Both jobs plan before either publishes (the barrier in the first
    # sync), which is the order that used to let both copies in.
    import threading

    per_copy = len(MSG) + len(b"Return-Path: <alice@example.org>\nDelivered-To: admin@example.com\n")
    conn, po_dir, msg = setup(tmp_path, [f"ACME\tADMIN\t1\t{per_copy + per_copy // 2}"])
    barrier = threading.Barrier(2, timeout=1)
    real_sync = conn._sync

    def sync_after_both_planned(roots, files, dirs):
        if files:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass  # the other job had nothing to stage
        real_sync(roots, files, dirs)

    conn._sync = sync_after_both_planned
    results: list = []

    def job() -> None:
        e = env("admin@example.com")
        results.append(conn.deliver_many_blocking([(e, [(e.recipients[0], InternalAddress("SF", "ACME/ADMIN"))], msg)]))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    outcomes = sorted((r[0][0] is None for r in results), reverse=True)
    assert outcomes == [True, False]
    full = next(r[0][0] for r in results if r[0][0] is not None)
    assert (full.code, full.enhanced) == (452, "4.2.2")
    assert len(new_files(po_dir, "ACME", "ADMIN")) == 1
    # nothing stays reserved: after the user deletes the message there is room again
    assert conn._reserved == {}
    new = os.path.join(po_dir, "ACME", "ADMIN", "Maildir", "new")
    for name in os.listdir(new):
        os.unlink(os.path.join(new, name))
    e = env("admin@example.com")
    assert conn.deliver_blocking(e, [(e.recipients[0], InternalAddress("SF", "ACME/ADMIN"))], msg) == [None]

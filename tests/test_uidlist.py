"""dovecot-uidlist: Dovecot's format read and written byte-compatibly, locking, concurrent writers."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from tmmail import uidlist

# written by Dovecot 2.3.19 (doveadm/imap APPEND into a fresh Maildir)
DOVECOT_SAMPLE = (
    b"3 V1795329246 N3 G5075a625de8c026b722a000083ecc375\n"
    b"1 :1795329246.M631666P10866.vm,S=19,W=22\n"
    b"2 :1795329246.M636059P10866.vm,S=20,W=23\n"
)

# records with extension fields and a header with an extra key, as Dovecot writes after POP3
# migration (P = POP3 UIDL, W = virtual size) and with appended records (N left behind)
DOVECOT_EXT_SAMPLE = (
    b"3 V1234 N5 G0123456789abcdef0123456789abcdef M42\n"
    b"3 W1000 P0000abcd :1700000000.M1P1.host,S=990:2,S\n"
    b"7 W20 :1700000001.M2P1.host\n"
)


def test_parse_dovecot_sample():
    ul = uidlist.parse(DOVECOT_SAMPLE)
    assert ul.uidvalidity == 1795329246
    assert ul.nextuid == 3
    assert ul.guid == "5075a625de8c026b722a000083ecc375"
    assert ul.uid_of("1795329246.M631666P10866.vm,S=19,W=22") == 1
    assert ul.uid_of("1795329246.M636059P10866.vm,S=20,W=23") == 2


def test_round_trip_is_byte_identical():
    assert uidlist.format(uidlist.parse(DOVECOT_SAMPLE)) == DOVECOT_SAMPLE


def test_extensions_kept_and_nextuid_follows_appended_records():
    ul = uidlist.parse(DOVECOT_EXT_SAMPLE)
    # the file name with flags is keyed by its base
    assert ul.uid_of("1700000000.M1P1.host,S=990") == 3
    # Dovecot appended uid 7 without rewriting N5: the next UID must be 8
    assert ul.nextuid == 8
    out = uidlist.format(ul)
    assert out.startswith(b"3 V1234 N8 G0123456789abcdef0123456789abcdef M42\n")
    assert b"3 W1000 P0000abcd :1700000000.M1P1.host,S=990\n" in out
    assert ul.add("new-base") == 8
    assert ul.add("new-base") == 8


def test_version1_courier_format_is_read():
    ul = uidlist.parse(b"1 1111 3\n1 1700000000.M1P1.host:2,S\n2 1700000001.M2P1.host\n")
    assert (ul.uidvalidity, ul.nextuid) == (1111, 3)
    assert ul.uid_of("1700000000.M1P1.host") == 1
    assert uidlist.format(ul).startswith(b"3 V1111 N3 G")


@pytest.mark.parametrize("data", [b"", b"9 V1 N1\n", b"3 N4\n", b"3 V1 N2\nx :name\n", b"3 V1 N2\n1 name\n"])
def test_garbage_is_refused(data):
    with pytest.raises(ValueError):
        uidlist.parse(data)


def test_read_returns_none_for_missing_or_broken(tmp_path):
    assert uidlist.read(str(tmp_path)) is None
    (tmp_path / "dovecot-uidlist").write_bytes(b"garbage\n")
    assert uidlist.read(str(tmp_path)) is None


def test_update_creates_and_assigns_in_order(tmp_path):
    ul = uidlist.update(str(tmp_path), ["a", "b"], uidvalidity=77)
    assert (ul.uid_of("a"), ul.uid_of("b"), ul.nextuid, ul.uidvalidity) == (1, 2, 3, 77)
    ul = uidlist.update(str(tmp_path), ["b", "c"], forget={"a"})
    assert (ul.uid_of("a"), ul.uid_of("b"), ul.uid_of("c")) == (None, 2, 3)
    on_disk = uidlist.read(str(tmp_path))
    assert on_disk.uid_of("c") == 3 and on_disk.uidvalidity == 77
    assert not os.path.exists(tmp_path / "dovecot-uidlist.lock")


def test_lock_held_by_other_times_out(tmp_path):
    lock_path = tmp_path / "dovecot-uidlist.lock"
    lock_path.write_bytes(b"")
    lock = uidlist.DotLock(str(tmp_path / "dovecot-uidlist"), timeout=0.2)
    started = time.monotonic()
    with pytest.raises(uidlist.LockTimeout):
        lock.acquire()
    assert time.monotonic() - started >= 0.2
    assert lock_path.exists()  # someone else's lock is not removed


def test_stale_lock_is_broken(tmp_path):
    lock_path = tmp_path / "dovecot-uidlist.lock"
    lock_path.write_bytes(b"")
    old = time.time() - uidlist.STALE_SECONDS - 5
    os.utime(lock_path, (old, old))
    ul = uidlist.update(str(tmp_path), ["x"], uidvalidity=5)
    assert ul.uid_of("x") == 1
    assert not lock_path.exists()


def _writer(folder: str, prefix: str, count: int) -> None:
    for i in range(count):
        uidlist.update(folder, [f"{prefix}-{i}"], uidvalidity=9, durable=False)


def test_concurrent_processes_never_share_a_uid(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), f"p{n}", 40)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ul = uidlist.read(str(tmp_path))
    uids = [r.uid for r in ul.records.values()]
    assert len(uids) == 160
    assert sorted(uids) == list(range(1, 161))
    assert ul.nextuid == 161


def test_records_out_of_uid_order_are_written_in_uid_order():
    """A list Dovecot appended out of order (or edited by hand) is rewritten sorted by UID."""
    ul = uidlist.parse(b"3 V7 N10 Gabc\n5 :b.host\n2 :a.host:2,S\n9 W12 :c.host\n")
    lines = uidlist.format(ul).decode().splitlines()
    assert lines[1:] == ["2 :a.host", "5 :b.host", "9 W12 :c.host"]
    assert uidlist.parse(uidlist.format(ul)).records == ul.records


def test_update_stamps_what_it_wrote(tmp_path):
    """update() returns the stamp of the file it wrote (fstat before the rename), equal to
    stamp() of the file in place; a no-op update wrote nothing and has no stamp."""
    folder = str(tmp_path)
    ul = uidlist.update(folder, ["a", "b"], uidvalidity=7)
    assert ul.written_stamp is not None and ul.written_stamp == uidlist.stamp(folder)
    again = uidlist.update(folder, ["a"])
    assert again.written_stamp is None
    assert uidlist.read(folder).written_stamp is None

"""IMAP CONDSTORE (RFC 7162 §3) on the real Maildir++ store: the modseq journal (unit tests) and
imaplib/imapclient sessions over real sockets (MODSEQ, CHANGEDSINCE, UNCHANGEDSINCE/[MODIFIED],
SEARCH MODSEQ, STATUS/SELECT HIGHESTMODSEQ, two sessions, changes on disk, restart, bad syntax)."""

from __future__ import annotations

import os
import re
import threading

import pytest
from imapclient import IMAPClient

from tests.imap_fixtures import PASSWORD, client, cmd, login_raw, raw_session, read_until_tag, start_imap, stop_imap
from tmmail import maildir, modseq
from tmmail.store import Store


# -- the journal --------------------------------------------------------------------------------

def _journal_dir(tmp_path) -> str:
    d = str(tmp_path / "folder")
    os.makedirs(d, exist_ok=True)
    return d


def test_journal_assigns_increasing_modseqs_and_reuses_recorded_ones(tmp_path):
    d = _journal_dir(tmp_path)
    j = modseq.Journal(d)
    with j.locked(7):
        base = j.highest
        a = j.modseq_for(1, "")
        b = j.modseq_for(2, "S")
        assert (a, b) == (base + 1, base + 2)
        assert j.modseq_for(1, "") == a  # same letters: same modseq
        c = j.modseq_for(1, "F")
        assert c == base + 3
        x = j.expunge(2)
        assert x == base + 4 and j.expunge(2) == x  # recorded once
    # another process (a fresh Journal) reads the same state
    k = modseq.Journal(d)
    with k.locked(7):
        assert k.highest == base + 4
        assert k.live == {1: (c, "F")}
        assert k.expunged == {2: x}
        assert k.modseq_for(1, "F") == c
    text = open(os.path.join(d, modseq.JOURNAL)).read()
    assert text.splitlines()[0] == f"TMMAIL-MODSEQ 1 7 {base}"
    assert f"x {x} 2" in text


def test_journal_base_comes_from_the_clock_and_survives_loss(tmp_path):
    d = _journal_dir(tmp_path)
    j = modseq.Journal(d)
    with j.locked(1):
        first = j.highest
        assert abs(first - modseq.clock_base()) < 60_000_000  # microseconds since the epoch
        for uid in range(1, 50):
            j.modseq_for(uid, "")
        high = j.highest
    os.unlink(os.path.join(d, modseq.JOURNAL))
    # this process: never lower than what it knew; a new process: the clock is later anyway
    with j.locked(1):
        assert j.highest > high and j.live == {}
    k = modseq.Journal(d)
    os.unlink(os.path.join(d, modseq.JOURNAL))
    with k.locked(1):
        assert k.highest > high


def test_journal_new_uidvalidity_starts_over_higher(tmp_path):
    d = _journal_dir(tmp_path)
    j = modseq.Journal(d)
    with j.locked(1):
        j.modseq_for(1, "S")
        high = j.highest
    k = modseq.Journal(d)
    with k.locked(2):
        assert k.uidvalidity == 2 and k.live == {} and k.highest > high


def test_journal_compaction_keeps_state_and_highest(tmp_path, monkeypatch):
    monkeypatch.setattr(modseq, "COMPACT_SLACK", 10)
    d = _journal_dir(tmp_path)
    j = modseq.Journal(d)
    other = modseq.Journal(d)
    with other.locked(3):
        pass
    for round_ in range(20):
        with j.locked(3):
            for uid in (1, 2, 3):
                j.modseq_for(uid, "S" if round_ % 2 else "")
            j.expunge(100 + round_)
    lines = open(os.path.join(d, modseq.JOURNAL)).read().splitlines()
    assert len(lines) < 40  # compacted along the way
    with other.locked(3):  # had the old inode: notices the new file and catches up
        assert other.highest == j.highest
        assert other.live == j.live
        ms = other.modseq_for(4, "")
    with j.locked(3):
        assert j.live[4] == (ms, "") and j.highest == ms


def test_journal_torn_last_line_is_skipped(tmp_path):
    d = _journal_dir(tmp_path)
    j = modseq.Journal(d)
    with j.locked(5):
        a = j.modseq_for(1, "")
    with open(os.path.join(d, modseq.JOURNAL), "a") as f:
        f.write(f"f {a + 5} 2 S")  # a writer died mid-line
    k = modseq.Journal(d)
    with k.locked(5):
        b = k.modseq_for(3, "")
    k2 = modseq.Journal(d)
    with k2.locked(5):
        assert k2.live[3] == (b, "") and k2.live[1] == (a, "")


def test_journal_concurrent_writers_hand_out_one_sequence(tmp_path):
    d = _journal_dir(tmp_path)
    got: list[int] = []
    lock = threading.Lock()

    def writer(base_uid: int) -> None:
        j = modseq.Journal(d)  # its own open file description: flock serialises them
        for i in range(200):
            with j.locked(9):
                ms = j.modseq_for(base_uid + i, "")
            with lock:
                got.append(ms)

    threads = [threading.Thread(target=writer, args=(n * 1000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 800
    assert max(got) - min(got) == 799


def test_store_gives_modseqs_and_bumps_on_change(tmp_path):
    root = str(tmp_path / "mbox")
    maildir.create(root)
    src = str(tmp_path / "m.eml")
    with open(src, "wb") as f:
        f.write(b"Subject: x\n\nhello\n")
    for _ in range(3):
        maildir.deliver(root, src)
    st = Store(root)
    h0 = st.status("INBOX").highestmodseq
    folder = st.open("INBOX")
    ms = [m.modseq for m in folder.messages]
    assert len(set(ms)) == 3 and max(ms) <= folder.highestmodseq
    folder.store_flags([folder.messages[0].uid], ["\\Flagged"], "add")
    assert folder.messages[0].modseq > max(ms)
    assert folder.highestmodseq == folder.messages[0].modseq >= h0
    folder.store_flags([folder.messages[1].uid], ["\\Deleted"], "add")
    high = folder.highestmodseq
    folder.expunge()
    assert folder.highestmodseq > high
    folder.close()


def test_two_processes_agree_on_modseqs(tmp_path):
    """A second process (its own FolderIndex and journal file description) sees the first one's
    flag change with the modseq the first one recorded, and records a change it notices first
    (a rename on disk) so that the first process then uses the same value."""
    from tmmail.store_index import FolderIndex

    root = str(tmp_path / "mbox")
    maildir.create(root)
    src = str(tmp_path / "m.eml")
    with open(src, "wb") as f:
        f.write(b"Subject: x\n\nhello\n")
    for _ in range(2):
        maildir.deliver(root, src)
    folder = Store(root).open("INBOX")
    other = FolderIndex(root, root)  # what another TMmail process holds
    try:
        other.sync(force=True)
        assert {m.uid: m.modseq for m in other.messages()} == {m.uid: m.modseq for m in folder.messages}
        folder.store_flags([1], ["\\Answered"], "add")
        other.sync(force=True)
        assert other.by_uid[1].modseq == folder.messages[0].modseq
        assert other.highestmodseq == folder.highestmodseq
        # the other process notices a rename first and records it
        info = other.by_uid[2]
        os.rename(info.filename, os.path.join(root, "cur", info.base + ":2,F"))
        other.sync(force=True)
        ms = other.by_uid[2].modseq
        assert ms > folder.highestmodseq
        folder.refresh()
        assert folder.messages[1].modseq == ms and folder.highestmodseq == ms
    finally:
        other.close()
        folder.close()


# -- IMAP sessions ------------------------------------------------------------------------------

@pytest.fixture
def env(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path)
    yield e
    stop_imap(reactor_thread, e)


def deliver(env, n: int, folder: str | None = None) -> None:
    src = os.path.join(env.root, "msg.eml")
    for i in range(n):
        with open(src, "wb") as f:
            f.write(b"From: a@example.org\nSubject: message %d\n\nbody %d\n" % (i, i))
        maildir.deliver(env.maildir(), src, folder=folder)
        Store(env.maildir()).status(folder or "INBOX")





def search_line(lines: list[bytes]) -> bytes:
    return next(l for l in lines if l.startswith(b"* SEARCH"))


def status_highest(lines: list[bytes]) -> int:
    for line in lines:
        m = re.match(rb"\* STATUS \S+ \(HIGHESTMODSEQ (\d+)\)", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"no STATUS HIGHESTMODSEQ in {lines!r}")


def highest_of(lines: list[bytes]) -> int:
    for line in lines:
        m = re.search(rb"\[HIGHESTMODSEQ (\d+)\]", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"no HIGHESTMODSEQ in {lines!r}")


def modseqs(lines: list[bytes]) -> dict[int, int]:
    """uid -> modseq from FETCH lines that carry both."""
    out = {}
    for line in lines:
        u = re.search(rb"UID (\d+)", line)
        m = re.search(rb"MODSEQ \((\d+)\)", line)
        if u and m:
            out[int(u.group(1))] = int(m.group(1))
    return out


def test_capability_before_and_after_login_and_enable(env):
    s, f = raw_session(env)
    caps = cmd(s, f, b"a", b"CAPABILITY")[0]
    assert b" CONDSTORE" in caps
    s.sendall(b'L LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
    assert b"CONDSTORE" in read_until_tag(f, b"L")[-1]
    lines = cmd(s, f, b"b", b"ENABLE CONDSTORE X-UNKNOWN")
    assert lines[0] == b"* ENABLED CONDSTORE\r\n" and lines[-1].startswith(b"b OK")
    lines = cmd(s, f, b"c", b"SELECT INBOX")  # enabled: SELECT reports HIGHESTMODSEQ
    assert highest_of(lines) > 0
    s.close()


def test_select_without_condstore_has_no_highestmodseq_then_enable_reports_it(env):
    deliver(env, 2)
    s, f = login_raw(env)
    lines = cmd(s, f, b"a", b"SELECT INBOX")
    assert not any(b"HIGHESTMODSEQ" in l for l in lines)
    lines = cmd(s, f, b"b", b"ENABLE CONDSTORE")
    assert highest_of(lines) > 0 and lines[-1].startswith(b"b OK")
    lines = cmd(s, f, b"c", b"EXAMINE INBOX (CONDSTORE)")
    assert highest_of(lines) > 0 and lines[-1].startswith(b"c OK [READ-ONLY]")
    s.close()


def test_fetch_modseq_changedsince_and_store_responses(env):
    deliver(env, 3)
    s, f = login_raw(env)
    lines = cmd(s, f, b"a", b"SELECT INBOX (CONDSTORE)")
    high = highest_of(lines)
    lines = cmd(s, f, b"b", b"UID FETCH 1:* (FLAGS MODSEQ)")
    ms = modseqs(lines)
    assert sorted(ms) == [1, 2, 3] and max(ms.values()) <= high
    assert all(v > 0 for v in ms.values())
    # nothing changed since HIGHESTMODSEQ
    lines = cmd(s, f, b"c", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % high)
    assert len(lines) == 1 and lines[0].startswith(b"c OK")
    lines = cmd(s, f, b"d", b"UID STORE 2 +FLAGS (\\Flagged)")
    assert re.match(rb"\* 2 FETCH \(UID 2 FLAGS \([^)]*\\Flagged[^)]*\) MODSEQ \((\d+)\)\)", lines[0]), lines
    new = modseqs(lines)[2]
    assert new > high
    lines = cmd(s, f, b"e", b"FETCH 1:* (UID FLAGS) (CHANGEDSINCE %d)" % high)
    assert len(lines) == 2 and modseqs(lines) == {2: new} and lines[-1].startswith(b"e OK")
    # .SILENT still reports the new MODSEQ of what it changed, without FLAGS
    lines = cmd(s, f, b"g", b"STORE 3 +FLAGS.SILENT (\\Seen)")
    assert re.match(rb"\* 3 FETCH \(MODSEQ \(\d+\)\)\r\n", lines[0]), lines
    # a STORE that changes nothing keeps the modseq
    lines = cmd(s, f, b"h", b"UID STORE 2 +FLAGS (\\Flagged)")
    assert modseqs(lines) == {2: new}
    lines = cmd(s, f, b"i", b"SELECT INBOX")
    assert highest_of(lines) > new
    s.close()


def test_fetch_body_setting_seen_reports_modseq(env):
    deliver(env, 1)
    s, f = login_raw(env)
    cmd(s, f, b"a", b"ENABLE CONDSTORE")
    cmd(s, f, b"b", b"SELECT INBOX")
    lines = cmd(s, f, b"c", b"FETCH 1 (BODY[TEXT])")
    whole = b"".join(lines)
    assert b"\\Seen" in whole and re.search(rb"MODSEQ \(\d+\)\)\r\nc OK", whole), whole
    s.close()


def test_unchangedsince_conflicts_are_listed_in_modified(env):
    deliver(env, 4)
    c = client(env)
    c.select_folder("INBOX")
    got = c.fetch(c.search("ALL"), ["MODSEQ"])
    ms = {uid: d[b"MODSEQ"][0] for uid, d in got.items()}
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    # the other session changes message 2 meanwhile
    c.add_flags([2], ["\\Answered"])
    limit = max(ms.values())
    lines = cmd(s, f, b"b", b"UID STORE 1:4 (UNCHANGEDSINCE %d) +FLAGS (\\Deleted)" % limit)
    assert lines[-1].startswith(b"b OK [MODIFIED 2]"), lines
    # the other session's change arrives first (with MODSEQ: the STORE enabled CONDSTORE)
    assert lines[0].startswith(b"* OK [HIGHESTMODSEQ ")
    assert re.match(rb"\* 2 FETCH \(UID 2 FLAGS \([^)]*\\Answered[^)]*\) MODSEQ", lines[1]), lines
    changed = modseqs(lines[2:])
    assert sorted(changed) == [1, 3, 4] and all(v > limit for v in changed.values())
    flags = c.get_flags([1, 2, 3, 4])
    c.noop()
    flags = c.get_flags([1, 2, 3, 4])
    assert b"\\Deleted" not in flags[2] and all(b"\\Deleted" in flags[u] for u in (1, 3, 4))
    # sequence-number form: the MODIFIED set has sequence numbers; UNCHANGEDSINCE 0 always fails
    lines = cmd(s, f, b"c", b"STORE 2:3 (UNCHANGEDSINCE 0) -FLAGS (\\Deleted)")
    assert lines[-1].startswith(b"c OK [MODIFIED 2:3]"), lines
    assert not any(b"FETCH" in l for l in lines)
    # imapclient's helper form
    hi = max(modseqs(cmd(s, f, b"d", b"UID FETCH 1:* (MODSEQ)")).values())
    lines = cmd(s, f, b"e", b"UID STORE 1 (UNCHANGEDSINCE %d) FLAGS.SILENT (\\Seen)" % hi)
    assert lines[-1].startswith(b"e OK") and b"MODIFIED" not in lines[-1]
    assert re.match(rb"\* 1 FETCH \(UID 1 MODSEQ \(\d+\)\)", lines[0]), lines
    c.logout()
    s.close()


def test_search_modseq_and_status_highestmodseq(env):
    deliver(env, 3)
    c = client(env)
    st = c.folder_status("INBOX", ["HIGHESTMODSEQ", "MESSAGES"])
    high = st[b"HIGHESTMODSEQ"]
    assert high > 0 and st[b"MESSAGES"] == 3
    c.select_folder("INBOX")
    c.add_flags([3], ["$Work"])
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    lines = cmd(s, f, b"b", b"UID SEARCH MODSEQ %d" % (high + 1))
    m3 = modseqs(cmd(s, f, b"x", b"UID FETCH 3 (MODSEQ)"))[3]
    assert highest_of(lines) == m3  # SEARCH MODSEQ enabled CONDSTORE (RFC 7162 §3.1)
    assert search_line(lines) == b"* SEARCH 3 (MODSEQ %d)\r\n" % m3
    lines = cmd(s, f, b"c", b'SEARCH MODSEQ "/flags/\\\\draft" all 0')
    assert lines[0] == b"* SEARCH 1 2 3 (MODSEQ %d)\r\n" % m3
    lines = cmd(s, f, b"d", b"SEARCH MODSEQ %d UNSEEN" % (m3 + 1))
    assert lines[0] == b"* SEARCH\r\n"
    lines = cmd(s, f, b"e", b"STATUS INBOX (HIGHESTMODSEQ)")
    assert any(l == b"* STATUS INBOX (HIGHESTMODSEQ %d)\r\n" % m3 for l in lines), lines
    assert c.search(["MODSEQ", str(high + 1)]) == [3]
    c.logout()
    s.close()


def test_two_sessions_see_modseq_in_unsolicited_fetch(env):
    deliver(env, 2)
    s, f = login_raw(env)
    high = highest_of(cmd(s, f, b"a", b"SELECT INBOX (CONDSTORE)"))
    other = client(env)
    other.select_folder("INBOX")
    other.add_flags([1], ["\\Seen"])
    lines = cmd(s, f, b"b", b"NOOP")
    assert re.match(rb"\* 1 FETCH \(UID 1 FLAGS \([^)]*\\Seen[^)]*\) MODSEQ \((\d+)\)\)", lines[0]), lines
    ms = modseqs(lines)[1]
    assert ms > high
    # IDLE: pushed at once, with MODSEQ
    s.sendall(b"c IDLE\r\n")
    assert f.readline().startswith(b"+")
    other.add_flags([2], ["\\Flagged"])
    line = f.readline()
    assert re.match(rb"\* 2 FETCH \(UID 2 FLAGS \([^)]*\\Flagged[^)]*\) MODSEQ \((\d+)\)\)", line), line
    assert modseqs([line])[2] > ms
    s.sendall(b"DONE\r\n")
    assert read_until_tag(f, b"c")[-1].startswith(b"c OK")
    # expunge by the other session bumps HIGHESTMODSEQ
    before = status_highest(cmd(s, f, b"d", b"STATUS INBOX (HIGHESTMODSEQ)"))
    other.add_flags([1], ["\\Deleted"])
    other.expunge()
    lines = cmd(s, f, b"e", b"NOOP")
    assert b"* 1 EXPUNGE\r\n" in lines
    after = highest_of(cmd(s, f, b"f", b"SELECT INBOX"))
    assert after > before
    other.logout()
    s.close()


def test_change_on_disk_gets_a_new_modseq(env):
    deliver(env, 2)
    c = client(env)
    c.select_folder("INBOX")
    before = {u: d[b"MODSEQ"][0] for u, d in c.fetch(c.search("ALL"), ["MODSEQ"]).items()}
    high = c.folder_status("INBOX", ["HIGHESTMODSEQ"])[b"HIGHESTMODSEQ"]
    # rename the file as Dovecot or a mail client would (new/ -> cur/ with flags)
    box = env.maildir()
    for sub in ("new", "cur"):
        for name in os.listdir(os.path.join(box, sub)):
            base = name.split(":")[0]
            break
        else:
            continue
        break
    uidlist = open(os.path.join(box, "dovecot-uidlist")).read()
    uid = next(int(line.split()[0]) for line in uidlist.splitlines()[1:] if base in line)
    src = os.path.join(box, sub, name)
    os.rename(src, os.path.join(box, "cur", base + ":2,FS"))
    c.noop()
    got = c.fetch(c.search("ALL"), ["MODSEQ", "FLAGS"])
    assert set(got[uid][b"FLAGS"]) - {b"\\Recent"} == {b"\\Flagged", b"\\Seen"}
    assert got[uid][b"MODSEQ"][0] > high
    other = [u for u in got if u != uid][0]
    assert got[other][b"MODSEQ"][0] == before[other]
    assert c.folder_status("INBOX", ["HIGHESTMODSEQ"])[b"HIGHESTMODSEQ"] == got[uid][b"MODSEQ"][0]
    c.logout()


def test_append_and_copy_get_new_modseqs(env):
    c = client(env)
    h0 = c.folder_status("Archive", ["HIGHESTMODSEQ"])[b"HIGHESTMODSEQ"]
    c.append("INBOX", b"Subject: a\r\n\r\nx\r\n")
    c.select_folder("INBOX")
    c.copy([1], "Archive")
    h1 = c.folder_status("Archive", ["HIGHESTMODSEQ"])[b"HIGHESTMODSEQ"]
    assert h1 > h0
    c.move([1], "Archive")
    h2 = c.folder_status("Archive", ["HIGHESTMODSEQ"])[b"HIGHESTMODSEQ"]
    assert h2 > h1
    c.logout()


@pytest.mark.parametrize("text", [
    b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE)",
    b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE -1)",
    b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 9223372036854775808)",
    b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 99999999999999999999999)",
    b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE abc)",
    b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 CHANGEDSINCE 2)",
    b"UID FETCH 1:* (FLAGS) (VANISHED)",
    b"UID FETCH 1:* (FLAGS) ()",
    b"UID FETCH 1:* (FLAGS) CHANGEDSINCE 1",
    b"UID STORE 1 (UNCHANGEDSINCE) +FLAGS (\\Seen)",
    b"UID STORE 1 (UNCHANGEDSINCE x) +FLAGS (\\Seen)",
    b"UID STORE 1 (UNCHANGEDSINCE 9223372036854775808) +FLAGS (\\Seen)",
    b"UID STORE 1 (FOO 1) +FLAGS (\\Seen)",
    b"UID STORE 1 (UNCHANGEDSINCE 1)",
    b"SEARCH MODSEQ",
    b"SEARCH MODSEQ x",
    b"SEARCH MODSEQ 9223372036854775808",
    b'SEARCH MODSEQ "/flags/\\\\seen" nobody 1',
    b'SEARCH MODSEQ "/other" all 1',
    b"SELECT INBOX (FOO)",
    b"SELECT INBOX ()",
    b"STATUS INBOX (HIGHESTMODSEQ FOO)",
])
def test_malformed_condstore_syntax_is_bad(env, text):
    deliver(env, 1)
    s, f = login_raw(env)
    cmd(s, f, b"a", b"SELECT INBOX")
    lines = cmd(s, f, b"b", text)
    assert lines[-1].startswith(b"b BAD"), lines
    assert cmd(s, f, b"c", b"NOOP")[-1].startswith(b"c OK")  # the session goes on
    s.close()


# -- the real server process: restart ---------------------------------------------------------

def _imaps(server, password: str = "carol pass") -> IMAPClient:
    from tests.server import client_tls as server_tls

    c = IMAPClient("127.0.0.1", port=server.ports["imaps"], ssl=True, ssl_context=server_tls(),
                   timeout=20)
    c.login("carol@example.com", password)
    return c


def test_modseqs_survive_restart_and_a_lost_journal_never_goes_lower(tmp_path):
    from tests.server import Server

    srv = Server(tmp_path / "srv").init()
    srv.add_mailbox("carol@example.com", "carol pass")
    srv.start(roles=("imaps",))
    try:
        c = _imaps(srv)
        for n in range(3):
            c.append("INBOX", b"Subject: m%d\r\n\r\nbody\r\n" % n)
        c.select_folder("INBOX")
        c.add_flags([2], ["\\Flagged"])
        c.add_flags([3], ["\\Deleted"])
        c.expunge()
        before = {u: d[b"MODSEQ"][0] for u, d in c.fetch([1, 2], ["MODSEQ"]).items()}
        high = c.folder_status("INBOX", ["HIGHESTMODSEQ"])[b"HIGHESTMODSEQ"]
        assert high > max(before.values())  # the expunge came last
        c.logout()
        journal = os.path.join(srv.maildir("carol@example.com"), modseq.JOURNAL)
        assert os.path.exists(journal)

        srv.stop()
        srv.start(roles=("imaps",))
        c = _imaps(srv)
        assert c.enable("CONDSTORE") == [b"CONDSTORE"]
        info = c.select_folder("INBOX", readonly=True)
        assert info[b"HIGHESTMODSEQ"] == high
        after = {u: d[b"MODSEQ"][0] for u, d in c.fetch([1, 2], ["MODSEQ"]).items()}
        assert after == before
        c.logout()

        srv.stop()
        os.unlink(journal)  # lost: the new base still lies above everything reported
        srv.start(roles=("imaps",))
        c = _imaps(srv)
        c.enable("CONDSTORE")
        info = c.select_folder("INBOX")
        assert info[b"HIGHESTMODSEQ"] > high
        got = c.fetch([1, 2], ["MODSEQ"])
        assert all(d[b"MODSEQ"][0] > high for d in got.values())
        c.logout()
    finally:
        srv.stop()


# -- QRESYNC (RFC 7162 §3.2) --------------------------------------------------------------------

def test_missing_uids_helper():
    from tmmail.imap.session import missing_uids, range_set

    assert missing_uids([(1, 10)], [2, 3, 7]) == [(1, 1), (4, 6), (8, 10)]
    assert missing_uids([(1, 3)], [1, 2, 3]) == []
    assert missing_uids([(5, 6), (9, 12)], [1, 6, 10, 20]) == [(5, 5), (9, 9), (11, 12)]
    assert range_set([(1, 1), (4, 6)]) == b"1,4:6"


def _uidvalidity(lines: list[bytes]) -> int:
    return int(next(re.search(rb"UIDVALIDITY (\d+)", l).group(1) for l in lines if b"UIDVALIDITY" in l))


def test_qresync_enable_select_vanished_and_fetch(env):
    deliver(env, 5)
    s, f = login_raw(env)
    first = cmd(s, f, b"a", b"SELECT INBOX (CONDSTORE)")
    uv, high = _uidvalidity(first), highest_of(first)
    cmd(s, f, b"a2", b"UNSELECT")
    # QRESYNC select parameter before ENABLE QRESYNC: BAD
    assert cmd(s, f, b"b", b"SELECT INBOX (QRESYNC (%d %d))" % (uv, high))[-1].startswith(b"b BAD")
    lines = cmd(s, f, b"c", b"ENABLE QRESYNC")
    assert lines[0] == b"* ENABLED QRESYNC\r\n"
    # meanwhile another session flags 2 and expunges 4
    other = client(env)
    other.select_folder("INBOX")
    other.add_flags([2], ["\\Flagged"])
    other.add_flags([4], ["\\Deleted"])
    other.expunge()
    lines = cmd(s, f, b"d", b"SELECT INBOX (QRESYNC (%d %d 1:5))" % (uv, high))
    assert b"* VANISHED (EARLIER) 4\r\n" in lines, lines
    changed = [l for l in lines if b"FETCH" in l]
    assert len(changed) == 1 and re.match(rb"\* 2 FETCH \(UID 2 FLAGS \([^)]*\\Flagged[^)]*\) MODSEQ", changed[0])
    assert highest_of(lines) > high and lines[-1].startswith(b"d OK")
    # a wrong UIDVALIDITY: a plain select, no resync data
    lines = cmd(s, f, b"e", b"EXAMINE INBOX (QRESYNC (%d %d))" % (uv + 1, high))
    assert not any(b"VANISHED" in l or b"FETCH" in l for l in lines)
    cmd(s, f, b"f", b"SELECT INBOX")
    # expunges are VANISHED now: own EXPUNGE, another session's, MOVE
    cmd(s, f, b"g", b"UID STORE 1 +FLAGS.SILENT (\\Deleted)")
    lines = cmd(s, f, b"h", b"EXPUNGE")
    assert lines[0] == b"* VANISHED 1\r\n" and not any(b"EXPUNGE\r\n" in l for l in lines[:-1])
    other.noop()
    other.add_flags([3], ["\\Deleted"])
    other.expunge()
    lines = cmd(s, f, b"i", b"NOOP")
    assert b"* VANISHED 3\r\n" in lines, lines
    lines = cmd(s, f, b"j", b"UID MOVE 5 Archive")
    assert b"* VANISHED 5\r\n" in lines, lines
    # UID FETCH (CHANGEDSINCE n VANISHED)
    lines = cmd(s, f, b"k", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % high)
    assert lines[0] == b"* VANISHED (EARLIER) 1,3:5\r\n", lines
    assert modseqs(lines).keys() == {2}
    # VANISHED without CHANGEDSINCE, or in a non-UID FETCH: BAD
    assert cmd(s, f, b"l", b"UID FETCH 1:* (FLAGS) (VANISHED)")[-1].startswith(b"l BAD")
    assert cmd(s, f, b"m", b"FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")[-1].startswith(b"m BAD")
    other.logout()
    s.close()


@pytest.mark.parametrize("params", [
    b"(QRESYNC)", b"(QRESYNC ())", b"(QRESYNC (1))", b"(QRESYNC (0 1))", b"(QRESYNC (1 0))",
    b"(QRESYNC (x 1))", b"(QRESYNC (1 1 1:*))", b"(QRESYNC (1 1 1:5 (1:2)))",
    b"(QRESYNC (1 1 1:5 (1:2 1:2) extra))", b"(QRESYNC (1 1) QRESYNC (1 1))",
])
def test_qresync_select_syntax_errors_are_bad(env, params):
    s, f = login_raw(env)
    cmd(s, f, b"a", b"ENABLE QRESYNC")
    assert cmd(s, f, b"b", b"SELECT INBOX " + params)[-1].startswith(b"b BAD")
    assert cmd(s, f, b"c", b"NOOP")[-1].startswith(b"c OK")
    s.close()


def test_without_qresync_expunge_is_still_expunge(env):
    deliver(env, 2)
    s, f = login_raw(env)
    cmd(s, f, b"a", b"ENABLE CONDSTORE")
    cmd(s, f, b"b", b"SELECT INBOX")
    cmd(s, f, b"c", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert cmd(s, f, b"d", b"EXPUNGE")[0] == b"* 1 EXPUNGE\r\n"
    s.close()

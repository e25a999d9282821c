"""refresh() and the other metadata calls stay cheap and never wait long on the reactor thread.

* After a change, a folder's directory listing is confirmed once after the settling window
  (coarse file-system timestamps), not re-done on every refresh() of every session meanwhile.
* Changes made by this process are seen at once even when the directory stamps do not show them.
* A uidlist or keywords lock held by another writer (Dovecot, a COPY in a worker thread) never
  makes refresh() wait; on the reactor thread a flag change fails fast with StoreBusy.
* A large EXPUNGE in a worker thread does not hold the shared index lock while it fsyncs.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tmmail import maildir, store_folder, store_index
from tmmail.store import Store, StoreBusy

MSG = b"Subject: x\n\nbody\n"


@pytest.fixture
def md(tmp_path):
    root = str(tmp_path / "Maildir")
    maildir.create(root, folders=())
    return root


@pytest.fixture
def listings(monkeypatch):
    """Counts directory listings made by the shared index."""
    calls = []
    real = store_index.FolderIndex._listing

    def counting(self):
        calls.append(self.path)
        return real(self)

    monkeypatch.setattr(store_index.FolderIndex, "_listing", counting)
    return calls


def _put(md: str, name: str, sub: str = "new") -> None:
    with open(os.path.join(md, sub, name), "wb") as f:
        f.write(MSG)


def _age_dirs(md: str, seconds: float) -> None:
    for sub in ("new", "cur"):
        t = time.time() - seconds
        os.utime(os.path.join(md, sub), (t, t))


def test_refreshes_inside_the_settling_window_do_not_relist(md, listings, monkeypatch):
    monkeypatch.setattr(store_index, "UNTRUSTED_SECONDS", 0.4)
    st = Store(md)
    for i in range(3):
        st.append("INBOX", MSG, ["\\Seen"])
    view = st.open("INBOX", claim_recent=False)
    # another process delivers: a new stamp, so one listing finds it
    _put(md, "1700000000.M1P99Q1.other,S=17,W=20")
    assert [m.uid for m in view.refresh().new] == [4]
    before = len(listings)
    # many refreshes (one per session and command) right after the change: no listing at all
    for _ in range(20):
        assert not view.refresh()
        assert not st.open("INBOX", readonly=True).refresh()
    assert len(listings) == before
    # another process renames a file in the same timestamp tick: the stamps look unchanged ...
    cur = os.path.join(md, "cur")
    st_before = os.stat(cur)
    name = sorted(os.listdir(cur))[0]
    os.rename(os.path.join(cur, name), os.path.join(cur, name.split(":")[0] + ":2,FS"))
    os.utime(cur, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    # ... so the listing that confirms the settled directory finds it, once
    deadline = time.monotonic() + 5
    changes = view.refresh()
    while not changes and time.monotonic() < deadline:
        time.sleep(0.05)
        changes = view.refresh()
    assert [(seq, m.flags) for seq, m in changes.flags] == [(1, frozenset({"\\Seen", "\\Flagged"}))]
    settled = len(listings)
    assert settled - before <= 2  # the confirming listing (plus the second look for a renamed name)
    for _ in range(20):
        assert not view.refresh()
    assert len(listings) == settled


def test_a_change_by_this_process_is_seen_even_with_unchanged_stamps(md, tmp_path):
    st = Store(md)
    _age_dirs(md, 10)
    view = st.open("INBOX")
    assert view.messages == []
    new = os.path.join(md, "new")
    old = os.stat(new)
    src = tmp_path / "m.eml"
    src.write_bytes(MSG)
    maildir.deliver(md, str(src))  # announces the change (maildir.notify)
    os.utime(new, ns=(old.st_atime_ns, old.st_mtime_ns))  # same tick as before, as far as stat shows
    assert len(view.refresh().new) == 1


def test_refresh_does_not_wait_for_a_uidlist_lock_held_by_another_writer(md, listings):
    st = Store(md)
    st.append("INBOX", MSG)
    view = st.open("INBOX")
    lock = os.path.join(md, "dovecot-uidlist.lock")
    open(lock, "wb").close()  # Dovecot (or a long COPY) holds the uidlist
    _put(md, "1700000000.M1P99Q1.other,S=17,W=20")
    started = time.monotonic()
    changes = view.refresh()  # the new file needs a UID: it waits for a later refresh
    assert time.monotonic() - started < 2
    assert not changes.new and len(view.messages) == 1
    assert st.status("INBOX").messages == 1
    # while the lock stays, retries cost a stat, not a listing
    before = len(listings)
    for _ in range(5):
        time.sleep(0.1)
        assert not view.refresh()
    assert len(listings) == before
    os.unlink(lock)
    deadline = time.monotonic() + 5
    while not changes.new and time.monotonic() < deadline:
        time.sleep(0.05)
        changes = view.refresh()
    assert [m.uid for m in changes.new] == [2]


def test_flag_change_on_the_reactor_fails_fast_while_the_keywords_lock_is_held(md, reactor_thread):
    st = Store(md)
    _, uid = st.append("INBOX", MSG)
    view = st.open("INBOX")
    open(os.path.join(md, "dovecot-keywords.lock"), "wb").close()

    def on_reactor():
        started = time.monotonic()
        try:
            view.store_flags([uid], ["NewKeyword"], "add")
        except StoreBusy:
            return time.monotonic() - started
        return None

    waited = reactor_thread.call(on_reactor)
    assert waited is not None and waited < 2
    os.unlink(os.path.join(md, "dovecot-keywords.lock"))
    assert reactor_thread.call(view.store_flags, [uid], ["NewKeyword"], "add")[0][1].flags == {"NewKeyword"}


def test_large_expunge_does_not_hold_the_index_lock_while_it_fsyncs(md, monkeypatch):
    st = Store(md)
    for _ in range(300):
        st.append("INBOX", MSG, ["\\Deleted"])
    view = st.open("INBOX")
    idx = view._index
    free_during_fsync = []
    real_fsync = store_folder._fsync_dir

    def try_lock(got):
        if idx.lock.acquire(timeout=0.5):
            idx.lock.release()
            got.append(True)

    def fsync(path):
        got = []
        probe = threading.Thread(target=try_lock, args=(got,))
        probe.start()
        probe.join(5)
        free_during_fsync.append(bool(got))
        return real_fsync(path)

    monkeypatch.setattr(store_folder, "_fsync_dir", fsync)
    result = view.expunge()
    assert len(result) == 300 and os.listdir(os.path.join(md, "cur")) == []
    assert free_during_fsync and all(free_during_fsync)


def test_own_uidlist_write_is_not_read_back_but_a_foreign_rewrite_is(md, monkeypatch):
    """APPEND hands the uidlist it wrote to the index (stamped by fstat of the written file), so
    the next refresh does not read and parse dovecot-uidlist again; a rewrite by anyone else
    changes the stamp and is read."""
    from tmmail import uidlist

    st = Store(md)
    view = st.open("INBOX")
    _, uid1 = st.append("INBOX", MSG)
    _, uid2 = st.append("INBOX", MSG)  # (the writer re-reads the list under its lock)
    reads = []
    real_read = uidlist.read
    monkeypatch.setattr(uidlist, "read", lambda folder: reads.append(folder) or real_read(folder))
    view.refresh()
    assert [m.uid for m in view.messages] == [uid1, uid2]
    assert reads == []
    ul = real_read(md)
    assert ul.written_stamp is None and uidlist.stamp(md) is not None
    # another writer (a forked process, Dovecot) rewrites the list: the stamp changes, it is read
    with uidlist.DotLock(os.path.join(md, uidlist.UIDLIST)) as lock:
        ul.extra.append("Xforeign")
        lock.commit(uidlist.format(ul))
    maildir.notify(md)
    view.refresh()
    assert reads == [md]
    assert [m.uid for m in view.messages] == [uid1, uid2]

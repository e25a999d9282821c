"""The Maildir++ store: folders, UIDs, flags and keywords, views and refresh, copy/move, append."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from tmmail import maildir, store, uidlist
from tmmail.store import (FolderExists, InvalidName, KeywordLimit, NoSuchFolder, NoSuchMessage,
                          Store, StoreError)

MSG = b"From: a@example.com\nSubject: hi\n\nline one\nline two\n"


@pytest.fixture
def md(tmp_path):
    root = str(tmp_path / "Maildir")
    maildir.create(root)
    return root


def deliver(root: str, data: bytes = MSG, folder: str | None = None) -> str:
    src = os.path.join(os.path.dirname(root), "src.eml")
    with open(src, "wb") as f:
        f.write(data)
    return maildir.deliver(root, src, folder=folder)


def names(st: Store) -> dict[str, tuple[str, ...]]:
    return {f.name: f.attributes for f in st.list_folders()}


# -- folders --------------------------------------------------------------------------------------


def test_new_mailbox_has_special_use_folders(md):
    listed = names(Store(md))
    assert list(listed)[0] == "INBOX"
    for name, attr in [("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"),
                       ("Junk", "\\Junk"), ("Archive", "\\Archive")]:
        assert attr in listed[name]
    assert Store(md).subscriptions() == ["Sent", "Drafts", "Trash", "Junk", "Archive"]


def test_create_nested_and_unicode_folders_on_disk_as_dovecot(md):
    st = Store(md)
    st.create_folder("Work/Projects")
    st.create_folder("Café")
    assert os.path.isdir(os.path.join(md, ".Work.Projects", "cur"))
    assert os.path.isdir(os.path.join(md, ".Work", "cur"))  # parent created too
    assert os.path.isdir(os.path.join(md, ".Caf&AOk-", "new"))
    assert os.path.exists(os.path.join(md, ".Caf&AOk-", "maildirfolder"))
    listed = names(st)
    assert "\\HasChildren" in listed["Work"]
    assert "\\HasNoChildren" in listed["Work/Projects"]
    assert "Café" in listed
    with pytest.raises(FolderExists):
        st.create_folder("Work/Projects")
    with pytest.raises(FolderExists):
        st.create_folder("inbox")


def test_implied_parent_is_noselect(md):
    # Dovecot (or a user) may create only the child directory
    os.makedirs(os.path.join(md, ".A.B", "cur"))
    listed = names(Store(md))
    assert listed["A"] == ("\\Noselect", "\\HasChildren")
    with pytest.raises(NoSuchFolder):
        Store(md).open("A")


@pytest.mark.parametrize("bad", [
    "", "a//b", "/a", "a/", "..", "a/../b", "../../etc", "a.b", ".hidden", "x\x00y", "tab\there",
    "new\nline", "del\x7f", "star*", "per%cent", "back\\slash", "a/" * 20 + "a", "x" * 300,
])
def test_name_validation_refuses_attacks(md, bad):
    st = Store(md)
    with pytest.raises(InvalidName):
        st.create_folder(bad)
    # nothing was created outside the Maildir, nothing odd inside it
    assert sorted(os.listdir(os.path.dirname(md))) == ["Maildir"]


def test_delete_folder_keeps_children_and_refuses_inbox(md):
    st = Store(md)
    st.create_folder("A/B")
    deliver(md, folder="A")
    st.delete_folder("A")
    assert not os.path.exists(os.path.join(md, ".A"))
    assert os.path.isdir(os.path.join(md, ".A.B", "cur"))
    assert names(st)["A"][0] == "\\Noselect"
    with pytest.raises(NoSuchFolder):
        st.delete_folder("A")
    with pytest.raises(InvalidName):
        st.delete_folder("INBOX")
    # re-created folder gets a new UIDVALIDITY
    st.create_folder("A")
    assert st.status("A").messages == 0


def test_recreated_folder_has_new_uidvalidity(md):
    st = Store(md)
    st.create_folder("X")
    first = st.status("X").uidvalidity
    st.delete_folder("X")
    st.create_folder("X")
    assert st.status("X").uidvalidity > first


def test_rename_moves_children_and_subscriptions(md):
    st = Store(md)
    st.create_folder("Work/Projects")
    st.subscribe("Work/Projects")
    uv, uid = st.append("Work/Projects", MSG)
    st.rename_folder("Work", "Job/Old")
    listed = names(st)
    assert "Work" not in listed and "Work/Projects" not in listed
    assert "Job/Old/Projects" in listed
    assert "Job/Old/Projects" in st.subscriptions()
    status = st.status("Job/Old/Projects")
    assert (status.messages, status.uidvalidity) == (1, uv)  # UIDs survive a rename
    with pytest.raises(FolderExists):
        st.rename_folder("Sent", "Trash")
    with pytest.raises(NoSuchFolder):
        st.rename_folder("Nope", "Other")


def test_rename_inbox_moves_messages_and_keeps_inbox(md):
    st = Store(md)
    deliver(md)
    deliver(md)
    st.rename_folder("INBOX", "Saved")
    assert st.status("INBOX").messages == 0
    saved = st.open("Saved")
    assert len(saved.messages) == 2
    assert saved.read(saved.messages[0].uid) == MSG


def test_subscriptions_file_is_dovecot_v2(md):
    st = Store(md)
    st.create_folder("Work/Projects")
    st.subscribe("Work/Projects")
    st.subscribe("Café")  # allowed for names that do not exist
    st.unsubscribe("Junk")
    with open(os.path.join(md, "subscriptions"), "rb") as f:
        data = f.read()
    assert data.startswith(b"V\t2\n\n")
    assert b"Work\tProjects\n" in data and b"Caf&AOk-\n" in data and b"Junk" not in data
    assert st.subscriptions() == ["Sent", "Drafts", "Trash", "Archive", "Work/Projects", "Café"]


# -- UIDs, flags, keywords ----------------------------------------------------------------------


def test_uids_are_stable_across_new_to_cur_and_flag_renames(md):
    deliver(md)
    deliver(md)
    st = Store(md)
    pop_view = st.open("INBOX", readonly=True)
    before = {m.base: m.uid for m in pop_view.messages}
    assert all(m.subdir == "new" for m in pop_view.messages)
    imap = st.open("INBOX")  # moves new -> cur
    assert all(m.subdir == "cur" for m in imap.messages)
    imap.store_flags([1, 2], ["\\Seen"], "add")
    store._indexes.clear()  # a fresh process
    again = Store(md).open("INBOX", readonly=True)
    assert {m.base: m.uid for m in again.messages} == before
    assert all(m.flags == {"\\Seen"} for m in again.messages)


def test_flags_and_keywords_are_dovecot_compatible_file_names(md):
    st = Store(md)
    uv, uid = st.append("INBOX", MSG)
    f = st.open("INBOX")
    changed = f.store_flags([uid], ["\\Seen", "\\Answered", "$Junk", "NonJunk"], "add")
    assert [seq for seq, _ in changed] == [1]
    assert changed[0][1].flags == {"\\Seen", "\\Answered", "$Junk", "NonJunk"}
    [name] = os.listdir(os.path.join(md, "cur"))
    assert name.endswith(":2,RSab")
    with open(os.path.join(md, "dovecot-keywords")) as kf:
        assert kf.read() == "0 $Junk\n1 NonJunk\n"
    f.store_flags([uid], ["$junk", "\\Answered"], "remove")  # keywords are case-insensitive
    assert f.messages[0].flags == {"\\Seen", "NonJunk"}
    assert os.listdir(os.path.join(md, "cur"))[0].endswith(":2,Sb")
    f.store_flags([uid], ["\\Flagged", "\\Draft"], "set")
    assert f.messages[0].flags == {"\\Flagged", "\\Draft"}
    assert os.listdir(os.path.join(md, "cur"))[0].endswith(":2,DF")
    assert f.store_flags([uid], ["\\Flagged"], "add") == []  # no change, nothing reported
    with pytest.raises(StoreError):
        f.store_flags([uid], ["\\Bogus"], "add")


def test_unknown_letters_like_passed_are_kept(md):
    st = Store(md)
    st.append("INBOX", MSG, ["\\Seen"])  # with a flag: straight to cur/
    cur = os.path.join(md, "cur")
    [name] = os.listdir(cur)
    os.rename(os.path.join(cur, name), os.path.join(cur, name.split(":")[0] + ":2,PS"))
    f = st.open("INBOX")
    assert f.messages[0].flags == {"\\Seen"}
    f.store_flags([f.messages[0].uid], [], "set")
    assert os.listdir(cur)[0].endswith(":2,P")


@pytest.mark.parametrize("mode,flags,want", [
    ("add", ["\\Seen"], {"\\Answered", "\\Flagged", "\\Seen"}),
    ("remove", ["\\Answered"], {"\\Flagged"}),
    ("set", ["\\Seen"], {"\\Seen"}),
])
def test_a_flag_change_racing_another_writers_rename_keeps_both(md, monkeypatch, mode, flags, want):
    """Another process (Dovecot, a second TMmail) renamed the file after this one last looked:
    the rename fails, the file is found under its new name, and the change is applied to the
    letters found there -- the other writer's \\Flagged survives (it was overwritten)."""
    st = Store(md)
    _, uid = st.append("INBOX", MSG, ["\\Answered"])
    mine = st.open("INBOX")
    cur = os.path.join(md, "cur")
    [name] = os.listdir(cur)
    assert name.endswith(":2,R")
    os.rename(os.path.join(cur, name), os.path.join(cur, name[:-1] + "FR"))  # the other writer
    real = mine._index.sync
    # this process has not looked yet: only the forced re-read after the failed rename sees it
    monkeypatch.setattr(mine._index, "sync", lambda force=False: real(force=True) if force else False)
    mine.store_flags([uid], flags, mode)
    monkeypatch.undo()
    [name] = os.listdir(cur)
    assert mine.info(uid).flags == want and maildir.split_name(name)[1] == "".join(sorted(
        {"\\Answered": "R", "\\Flagged": "F", "\\Seen": "S"}[f] for f in want))


def test_keyword_limit(md):
    st = Store(md)
    uv, uid = st.append("INBOX", MSG)
    f = st.open("INBOX")
    f.store_flags([uid], [f"kw{i}" for i in range(26)], "add")
    assert "\\*" not in f.permanent_flags
    with pytest.raises(KeywordLimit):
        f.store_flags([uid], ["one-too-many"], "add")


def test_size_and_internal_date(md):
    st = Store(md)
    uv, uid = st.append("Sent", MSG.replace(b"\n", b"\r\n"), ["\\Seen"], internal_date=1_000_000_000)
    f = st.open("Sent")
    info = f.messages[0]
    assert info.size == len(MSG) + MSG.count(b"\n")  # RFC822.SIZE of the CRLF form
    assert info.internal_date == 1_000_000_000
    assert f.read(uid) == MSG  # stored with LF
    assert info.flags == {"\\Seen"}


def test_internal_date_survives_renames_and_removal_by_others(md, monkeypatch):
    """INTERNALDATE never changes for a UID: not when another writer renamed the file before
    the date was read (it was taken from the name and kept), nor for a view that still shows
    a message someone else expunged or moved (the date is read when the index first sees it)."""
    from tmmail import store_index

    st = Store(md)
    _, uid = st.append("INBOX", MSG, [], internal_date=1_577_836_800)  # new/, no flags
    mine = st.open("INBOX", readonly=True)
    info = mine.messages[0]
    assert info._date == 1_577_836_800  # read with the scan that found it
    info._date = None  # as for a message of a large folder, dated lazily
    path = os.path.join(md, "new", info.name)
    os.rename(path, os.path.join(md, "cur", info.name + ":2,S"))  # another writer
    assert info.internal_date == 1_577_836_800
    os.unlink(os.path.join(md, "cur", info.name + ":2,S"))  # and gone for good
    assert mine.messages[0].internal_date == 1_577_836_800
    # never read before it vanished: the time in its name, but not remembered
    _, uid2 = st.append("INBOX", MSG, ["\\Seen"], internal_date=1_000_000_000)
    late = st.open("INBOX", readonly=True).info(uid2)
    late._date = None
    os.unlink(late.filename)
    monkeypatch.setattr(store_index.maildir, "name_time", lambda base: 42.0)
    assert late.internal_date == 42.0 and late._date is None


def test_size_computed_when_name_has_no_w(md):
    name = "1700000000.M1P1.otherhost"
    with open(os.path.join(md, "new", name), "wb") as out:
        out.write(b"a\nb\r\nc\n")
    f = Store(md).open("INBOX", readonly=True)
    assert f.messages[0].size == 9


# -- views and refresh ----------------------------------------------------------------------------


def test_refresh_reports_new_flags_and_expunges_of_other_sessions(md):
    st = Store(md)
    for _ in range(3):
        st.append("INBOX", MSG)
    a = st.open("INBOX")
    b = st.open("INBOX")
    assert not b.refresh()
    a.store_flags([2], ["\\Deleted", "\\Seen"], "add")
    a.store_flags([3], ["\\Deleted"], "add")
    deliver(md)
    assert a.expunge() == [(3, 3), (2, 2)]  # descending: send EXPUNGE 3, then EXPUNGE 2
    changes = b.refresh()
    assert changes.expunged == [(3, 3), (2, 2)]
    assert [m.uid for m in changes.new] == [4]
    assert changes.exists == 2
    assert [m.uid for m in b.messages] == [1, 4]
    assert not b.refresh()
    assert [m.uid for m in a.refresh().new] == [4]  # a learns of the delivery only now
    a.store_flags([1], ["\\Flagged"], "add")
    changes = b.refresh()
    assert [(seq, m.uid, m.flags) for seq, m in changes.flags] == [(1, 1, frozenset({"\\Flagged"}))]
    # a's own change is not reported back to a
    assert not a.refresh()


def test_refresh_without_expunges_keeps_sequence_numbers(md):
    st = Store(md)
    for _ in range(2):
        st.append("INBOX", MSG)
    a, b = st.open("INBOX"), st.open("INBOX")
    a.store_flags([1], ["\\Deleted"], "add")
    a.expunge()
    changes = b.refresh(expunges=False)
    assert changes.expunged == [] and len(b.messages) == 2
    assert b.pending_expunges == {1}
    with pytest.raises(NoSuchMessage):
        b.read(1)
    assert b.read(2) == MSG
    assert b.refresh().expunged == [(1, 1)]
    assert [m.uid for m in b.messages] == [2] and b.pending_expunges == set()


def test_changes_by_other_process_are_seen(md):
    st = Store(md)
    st.append("INBOX", MSG)
    view = st.open("INBOX")

    def other() -> None:
        store._indexes.clear()
        o = Store(md).open("INBOX")
        o.store_flags([1], ["\\Seen"], "add")
        Store(md).append("INBOX", MSG)

    p = multiprocessing.get_context("fork").Process(target=other)
    p.start()
    p.join(30)
    assert p.exitcode == 0
    changes = view.refresh()
    assert [m.uid for m in changes.new] == [2]
    assert [(s, m.flags) for s, m in changes.flags] == [(1, frozenset({"\\Seen"}))]


def test_recent_belongs_to_one_session(md):
    deliver(md)
    st = Store(md)
    assert st.status("INBOX").recent == 1
    ro = st.open("INBOX", readonly=True)
    assert ro.recent == set()
    first = st.open("INBOX")
    second = st.open("INBOX")
    assert first.recent == {1} and second.recent == set()
    deliver(md)
    c = second.refresh()
    assert c.recent == 1 and second.recent == {2}
    assert first.refresh().recent == 1 and first.recent == {1}
    assert st.status("INBOX").recent == 0


def test_watch_is_called_on_delivery_and_changes(md):
    st = Store(md)
    seen: list[str] = []
    cancel = st.watch("INBOX", seen.append)
    deliver(md)
    f = st.open("INBOX")
    f.store_flags([1], ["\\Seen"])
    assert seen == ["INBOX", "INBOX"]
    cancel()
    deliver(md)
    assert len(seen) == 2


# -- copy, move, append ---------------------------------------------------------------------------


def test_copy_and_move_return_new_uids(md):
    st = Store(md)
    for _ in range(3):
        st.append("INBOX", MSG, ["$Work"])
    f = st.open("INBOX")
    uv, pairs = f.copy([1, 3], "Archive")
    assert uv == st.status("Archive").uidvalidity
    assert pairs == [(1, 1), (3, 2)]
    arch = st.open("Archive")
    assert [m.flags for m in arch.messages] == [frozenset({"$Work"})] * 2
    assert arch.read(1) == MSG
    assert len(f.messages) == 3
    uv, pairs, expunged = f.move([2, 3], "Trash")
    assert pairs == [(2, 1), (3, 2)]
    assert expunged == [(3, 3), (2, 2)]
    assert [m.uid for m in f.messages] == [1]
    assert st.status("Trash").messages == 2 and st.status("INBOX").messages == 1
    with pytest.raises(NoSuchFolder):
        f.copy([1], "Nope")


def test_append_is_durable_with_uid_and_visible_to_open_views(md):
    st = Store(md)
    view = st.open("Drafts")
    uv, uid = st.append("Drafts", b"Subject: draft\r\n\r\nx\r\n", ["\\Draft"])
    assert (uv, uid) == (view.uidvalidity, 1)
    assert uidlist.read(os.path.join(md, ".Drafts")).nextuid == 2
    assert not os.listdir(os.path.join(md, ".Drafts", "tmp"))
    c = view.refresh()
    assert [(m.uid, m.flags) for m in c.new] == [(1, frozenset({"\\Draft"}))]


def _appender(root: str, n: int) -> None:
    store._indexes.clear()
    st = Store(root)
    for _ in range(n):
        st.append("INBOX", MSG)


def test_concurrent_processes_appending_get_distinct_uids(md):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(md, 15)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store._indexes.clear()
    f = Store(md).open("INBOX", readonly=True)
    assert [m.uid for m in f.messages] == list(range(1, 61))
    assert len({m.base for m in f.messages}) == 60


def test_uidlist_forgets_expunged_messages_but_never_reuses_uids(md):
    st = Store(md)
    for _ in range(150):
        st.append("INBOX", MSG)
    f = st.open("INBOX")
    f.store_flags(range(1, 150), ["\\Deleted"], "add")
    f.expunge()
    # later scans (and the next UID assignment) drop the stale records from dovecot-uidlist
    st.status("INBOX")
    st.append("INBOX", MSG)
    st.status("INBOX")
    ul = uidlist.read(md)
    assert sorted(r.uid for r in ul.records.values()) == [150, 151]
    assert ul.nextuid == 152
    assert [m.uid for m in f.refresh().new] == [151]


def test_inotify_reports_changes_by_other_writers(md, reactor_thread):
    import threading
    import time

    from tmmail.store_inotify import FolderNotifier

    notifier = reactor_thread.call(FolderNotifier)
    assert notifier.available  # Linux
    fired = threading.Event()
    cancel = reactor_thread.call(notifier.watch, md, lambda path: fired.set())
    try:
        # another process's delivery: a plain rename into new/
        tmp = os.path.join(md, "tmp", "1700000000.M1P99.other")
        with open(tmp, "wb") as f:
            f.write(MSG)
        os.rename(tmp, os.path.join(md, "new", "1700000000.M1P99.other"))
        assert fired.wait(5)
        assert [m.base for m in Store(md).open("INBOX").messages] == ["1700000000.M1P99.other"]
        reactor_thread.call(cancel)
        fired.clear()
        deliver(md)
        time.sleep(0.3)
        assert not fired.is_set()
    finally:
        reactor_thread.call(notifier.stop)


def test_store_reports_resulting_flags_changed_by_others(md):
    st = Store(md)
    st.append("INBOX", MSG)
    a, b = st.open("INBOX"), st.open("INBOX")
    a.store_flags([1], ["\\Seen", "\\Flagged"], "add")
    # b did not refresh yet; its +FLAGS \Seen changes nothing on disk but b learns the result
    changed = b.store_flags([1], ["\\Seen"], "add")
    assert [(seq, m.flags) for seq, m in changed] == [(1, frozenset({"\\Seen", "\\Flagged"}))]
    assert not b.refresh()


def test_large_store_in_batches(md):
    st = Store(md)
    cur = os.path.join(md, ".Archive", "cur")
    for i in range(600):  # existing mail (written directly: no fsync, fast)
        with open(os.path.join(cur, f"{1700000000 + i}.M{i}P1.host,S=51,W=56:2,"), "wb") as f:
            f.write(MSG)
    f = st.open("Archive")
    changed = f.store_flags(range(1, 601), ["\\Seen"], "add")
    assert [seq for seq, _ in changed] == list(range(1, 601))
    assert st.status("Archive").unseen == 0


def test_corrupt_uidlist_gives_new_uidvalidity(md):
    st = Store(md)
    st.append("INBOX", MSG)
    view = st.open("INBOX")
    old = view.uidvalidity
    with open(os.path.join(md, "dovecot-uidlist"), "wb") as f:
        f.write(b"garbage\n")
    assert view.refresh().uidvalidity_changed
    fresh = st.open("INBOX")
    assert fresh.uidvalidity > old and [m.uid for m in fresh.messages] == [1]


def test_open_view_learns_that_its_folder_was_recreated(md):
    st = Store(md)
    st.create_folder("Tmp")
    st.append("Tmp", MSG)
    view = st.open("Tmp")
    st.delete_folder("Tmp")
    assert view.refresh().expunged == [(1, 1)]
    st.create_folder("Tmp")
    assert view.refresh().uidvalidity_changed

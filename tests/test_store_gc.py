"""The store pauses the cyclic garbage collector while it builds a large index, and always
restores it: a collector left disabled would leak every reference cycle of the server."""

from __future__ import annotations

import gc
import threading

from tmmail import maildir
from tmmail.store import Store
from tmmail.store_index import gc_paused


def _fill(root: str, count: int) -> None:
    for i in range(count):
        sub, suffix = ("cur", ":2,S") if i % 2 else ("new", "")
        with open(f"{root}/{sub}/{1700000000 + i}.M{i}P1Q{i}.h,S=2,W=3{suffix}", "wb") as f:
            f.write(b"x\n")


def test_collector_is_enabled_again_after_a_cold_select(tmp_path):
    root = str(tmp_path / "Maildir")
    maildir.create(root, folders=())
    _fill(root, 300)
    assert gc.isenabled()
    folder = Store(root).open("INBOX")
    assert len(folder.messages) == 300 and len(folder.recent) == 150
    assert gc.isenabled()


def test_overlapping_pauses_in_threads_restore_the_collector_once_all_end():
    assert gc.isenabled()
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with gc_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread still builds its index
    release.set()
    t.join(10)
    assert gc.isenabled()


def test_a_collector_disabled_by_the_application_stays_disabled():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()

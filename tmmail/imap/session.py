"""A session's selected mailbox: sequence sets, message adapters and untagged updates.

One job: bridge one IMAP session and its :class:`tmmail.store.Folder` view.  The view keeps
this session's own sequence numbers (RFC 3501 §2.3.1.2); changes by other sessions, Dovecot or
SMTP delivery reach it only through :meth:`SelectedMailbox.updates`, which the protocol calls
where RFC 3501 §7.4.1 allows them (``EXPUNGE`` never while answering FETCH, STORE or SEARCH by
sequence number).  UID ranges are resolved by bisection, never by walking ``1:4294967295``.
Pure logic (the folder's metadata calls are cheap stats).
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from operator import attrgetter
from typing import Any, Callable, Iterable

from tmmail.imap.fetch import format_flags
from tmmail.imap.search import MessageGone
from tmmail.store_common import NoSuchMessage

_uid = attrgetter("uid")
#: seconds between re-reads of the selected folder when nothing in this process changed it
REFRESH_INTERVAL = 1.0


_get_letters = attrgetter("letters")
_get_flags = attrgetter("flags")


def uid_set(uids: Iterable[int]) -> bytes:
    """``1:3,7`` for sorted UIDs (COPYUID, MODIFIED, VANISHED)."""
    out: list[bytes] = []
    start = prev = None
    for u in uids:
        if start is None:
            start = prev = u
        elif u == prev + 1:
            prev = u
        else:
            out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
            start = prev = u
    if start is not None:
        out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
    return b",".join(out)


def missing_uids(ranges: Iterable[tuple[int, int]], present: list[int]) -> list[tuple[int, int]]:
    """The parts of inclusive UID ``ranges`` that hold no UID of sorted ``present`` (VANISHED
    (EARLIER) without an expunge history: every UID the client may know that is not here)."""
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        i = bisect_left(present, lo)
        cur = lo
        while cur <= hi:
            if i < len(present) and present[i] <= hi:
                if present[i] > cur:
                    out.append((cur, present[i] - 1))
                cur = present[i] + 1
                i += 1
            else:
                out.append((cur, hi))
                break
    return out


def range_set(ranges: list[tuple[int, int]]) -> bytes:
    return b",".join(b"%d" % lo if lo == hi else b"%d:%d" % (lo, hi) for lo, hi in ranges)


def _letters_getter(msgs: list[Any]) -> Any:
    """A cheap key for a message's flag set: the Maildir ``:2,`` letters when the store has them."""
    return _get_letters if msgs and hasattr(msgs[0], "letters") else _get_flags


def _letters(info: Any) -> Any:
    letters = getattr(info, "letters", None)
    return letters if letters is not None else info.flags


class Expunged(NoSuchMessage, MessageGone):
    """The message was expunged by someone else and this session has not been told yet:
    FETCH answers ``[EXPUNGEISSUED]`` (a store error), SEARCH leaves it out (MessageGone)."""


class Msg:
    """One message as FETCH and SEARCH see it (``fetch.StoredMessage``)."""

    __slots__ = ("seq", "info", "_read", "recent")

    def __init__(self, seq: int, info: Any, read: Callable[[int], bytes], recent: bool) -> None:
        self.seq = seq
        self.info = info
        self._read = read
        self.recent = recent

    @property
    def uid(self) -> int:
        return self.info.uid

    @property
    def flags(self) -> set[str]:
        f = set(self.info.flags)
        if self.recent:
            f.add("\\Recent")
        return f

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def modseq(self) -> int:
        return self.info.modseq

    @property
    def internal_date(self) -> float:
        return self.info.internal_date

    def load(self) -> bytes:
        try:
            return self._read(self.info.uid)
        except NoSuchMessage as e:
            raise Expunged(str(e) or "message has been expunged") from None


class SelectedMailbox:
    """The selected (or examined) folder of one session."""

    def __init__(self, folder: Any, name: str, cancel_watch: Callable[[], None] | None) -> None:
        self.folder = folder
        self.name = name
        self.read_only = bool(folder.readonly)
        self._cancel_watch = cancel_watch
        self.dirty = False
        self._refreshed = time.monotonic()
        self._flag_cache: dict[tuple[frozenset[str], bool], bytes] = {}
        self._flag_list = tuple(folder.permanent_flags)  # as the SELECT response announced it
        #: the folder was deleted or renamed under this session (updates() then answers invalid)
        self.gone = False
        #: CONDSTORE enabled: flag updates carry MODSEQ (RFC 7162 §3.2)
        self.condstore = False
        #: QRESYNC enabled: expunges are reported as VANISHED (RFC 7162 §3.2.10)
        self.qresync = False

    def close(self) -> None:
        if self._cancel_watch is not None:
            self._cancel_watch()
            self._cancel_watch = None
        self.folder.close()

    # -- lookups ---------------------------------------------------------------------------
    @property
    def messages(self) -> list[Any]:
        return self.folder.messages

    @property
    def exists(self) -> int:
        return len(self.folder.messages)

    def max_uid(self) -> int:
        msgs = self.folder.messages
        return msgs[-1].uid if msgs else 0

    def seqs(self, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """Sequence numbers in resolved inclusive ``ranges`` (clipped to the mailbox)."""
        out: list[int] = []
        n = len(self.folder.messages)
        for lo, hi in ranges:
            lo, hi = max(lo, 1), min(hi, n)
            if lo <= hi:
                out.extend(range(lo, hi + 1))
        return out

    def seqs_for_uids(self, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """Sequence numbers of the UIDs inside ``ranges``: one bisection per range."""
        msgs = self.folder.messages
        out: list[int] = []
        for lo, hi in ranges:
            i = bisect_left(msgs, lo, key=_uid)
            j = bisect_left(msgs, hi + 1, key=_uid)
            out.extend(range(i + 1, j + 1))
        return out  # ranges come merged and sorted from SequenceSet.resolve

    def msg(self, seq: int) -> Msg:
        info = self.folder.messages[seq - 1]
        return Msg(seq, info, self.folder.read, info.uid in self.folder.recent)

    def msgs(self, seqs: Iterable[int]) -> list[Msg]:
        messages = self.folder.messages
        recent = self.folder.recent
        read = self.folder.read
        return [Msg(s, messages[s - 1], read, messages[s - 1].uid in recent) for s in seqs]

    def all_msgs(self) -> list[Msg]:
        recent = self.folder.recent
        read = self.folder.read
        return [Msg(i, info, read, info.uid in recent) for i, info in enumerate(self.folder.messages, 1)]

    def search_by_flags(self, program: Any, uid: bool) -> list[int]:
        """Run a flags-only SEARCH program once per distinct (flags, \\Recent) combination.

        A mailbox has a handful of distinct flag sets, so 20,000 messages cost one pass of
        dictionary lookups instead of 20,000 program evaluations.
        """
        folder = self.folder
        msgs = folder.messages
        recent = folder.recent
        read = folder.read
        max_seq = len(msgs)
        max_uid = msgs[-1].uid if msgs else 0
        # the Maildir flag letters stand for the flag set and compare much faster (str)
        key_of = _letters_getter(msgs)
        keys: list[Any] = list(map(key_of, msgs))
        if recent:
            keys = [(k, m.uid in recent) for k, m in zip(keys, msgs)]
        distinct = set(keys)
        if len(distinct) > 64:  # unusually many flag combinations: plain evaluation
            return [m.uid if uid else m.seq for m in
                    (Msg(i, info, read, info.uid in recent) for i, info in enumerate(msgs, 1))
                    if program.matches(m, max_seq, max_uid)]
        verdict: dict[Any, bool] = {}
        for key in distinct:
            i = keys.index(key)
            info = msgs[i]
            verdict[key] = program.matches(Msg(i + 1, info, read, info.uid in recent), max_seq, max_uid)
        good = {k for k, v in verdict.items() if v}
        if not good:
            return []
        if uid:
            return [m.uid for m, k in zip(msgs, keys) if k in good]
        return [i for i, k in enumerate(keys, 1) if k in good]

    def flags_table(self) -> Any:
        """A function info -> ``(flags)`` bytes, memoised per flag set for one response."""
        recent = self.folder.recent
        cache: dict[Any, bytes] = {}
        flags_bytes = self.flags_bytes
        msgs = self.folder.messages

        if not recent and msgs and hasattr(msgs[0], "letters"):
            def get_letters(info: Any) -> bytes:
                try:
                    return cache[info.letters]
                except KeyError:
                    out = cache[info.letters] = flags_bytes(info)
                    return out

            return get_letters

        def get(info: Any) -> bytes:
            key = _letters(info) if not recent else (_letters(info), info.uid in recent)
            out = cache.get(key)
            if out is None:
                out = cache[key] = flags_bytes(info)
            return out

        return get

    def flags_bytes(self, info: Any) -> bytes:
        """``(\\Seen ...)`` for a message, \\Recent added for this session; cached per flag set."""
        recent = info.uid in self.folder.recent
        key = (info.flags, recent)
        out = self._flag_cache.get(key)
        if out is None:
            flags = set(info.flags)
            if recent:
                flags.add("\\Recent")
            out = format_flags(flags)
            if len(self._flag_cache) < 4096:
                self._flag_cache[key] = out
        return out

    # -- updates ---------------------------------------------------------------------------
    def expunge_lines(self, gone: list[tuple[int, int]]) -> list[bytes]:
        """``* n EXPUNGE`` for (seq, uid) pairs in descending seq order, or one ``* VANISHED``."""
        if not gone:
            return []
        if self.qresync:
            return [b"* VANISHED " + uid_set(sorted(uid for _seq, uid in gone)) + b"\r\n"]
        return [b"* %d EXPUNGE\r\n" % seq for seq, _uid in gone]

    def mark_dirty(self) -> None:
        """The folder changed in this process (store.watch; may run in any thread)."""
        self.dirty = True

    def _holds_expunges(self) -> bool:
        """EXPUNGEs held back by ``refresh(expunges=False)`` wait for the next allowed point."""
        return bool(self.folder.pending_expunges)

    def flag_list_updates(self) -> list[bytes]:
        """``* FLAGS`` and ``* OK [PERMANENTFLAGS]`` when the folder's keywords changed since
        this session last heard (a STORE or APPEND introduced one, RFC 3501 §7.2.6): to be sent
        before the responses that use the new keyword."""
        perm = tuple(self.folder.permanent_flags)
        if perm == self._flag_list:
            return []
        self._flag_list = perm
        flags = " ".join(f for f in perm if f != "\\*").encode("utf-8", "replace")
        out = [b"* FLAGS (" + flags + b")\r\n"]
        if not self.read_only:
            out.append(b"* OK [PERMANENTFLAGS (" + " ".join(perm).encode("utf-8", "replace")
                       + b")] Flags permitted\r\n")
        return out

    def updates(self, expunges: bool, force: bool = False) -> tuple[list[bytes], bool]:
        """Untagged responses for what changed since the last call; ``(lines, invalid)``: invalid
        when UIDVALIDITY changed or the folder is gone (:attr:`gone`), the session must end.

        The folder is re-read when this process changed it (:meth:`mark_dirty`), when the
        client asks (``force``: NOOP, CHECK, IDLE) and otherwise at most every
        REFRESH_INTERVAL seconds: changes by other processes arrive within that time, and a
        burst of commands does not re-check the directories for each one.
        """
        now = time.monotonic()
        if not (force or self.dirty or now - self._refreshed >= REFRESH_INTERVAL):
            return [], False
        self.dirty = False
        self._refreshed = now
        path = getattr(self.folder, "path", None)
        if path is not None and not os.path.isdir(path):
            # DELETEd or RENAMEd by another session: never serve the stale view (Dovecot: BYE)
            self.gone = True
            return [], True
        ch = self.folder.refresh(expunges)
        if not expunges and self._holds_expunges():
            self.dirty = True  # deliver the held EXPUNGEs at the next allowed point
        if ch and ch.uidvalidity_changed:
            return [], True
        out = self.flag_list_updates()
        if not ch:
            return out, False
        out.extend(self.expunge_lines(ch.expunged))
        if self.condstore:
            for seq, info in ch.flags:
                out.append(b"* %d FETCH (UID %d FLAGS %s MODSEQ (%d))\r\n"
                           % (seq, info.uid, self.flags_bytes(info), info.modseq))
        else:
            for seq, info in ch.flags:
                out.append(b"* %d FETCH (UID %d FLAGS %s)\r\n" % (seq, info.uid, self.flags_bytes(info)))
        if ch.new:
            out.append(b"* %d EXISTS\r\n" % ch.exists)
            out.append(b"* %d RECENT\r\n" % ch.recent)
        return out, False

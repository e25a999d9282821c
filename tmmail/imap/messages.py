"""IMAP commands on the messages of the selected mailbox (RFC 3501 §6.4): CHECK, CLOSE,
UNSELECT (RFC 3691), EXPUNGE, UID EXPUNGE (RFC 4315), SEARCH, FETCH, STORE, COPY (COPYUID,
RFC 4315), MOVE (RFC 6851) and their UID forms.

One job: selected-state commands, as a mixin of :class:`tmmail.imap.server.IMAPServer`.
Responses for many messages are joined and written in large batches; FETCH of message
content is streamed in slices so a slow client or a huge mailbox never blocks the reactor
or fills memory.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from twisted.internet import defer, threads

from tmmail.imap import responses as R
from tmmail.imap.account import check_quota, is_store_error, mailbox_quota, store_error_reply
from tmmail.imap.encoding import Atom, ParseError
from tmmail.imap.fetch import (fetch_data, format_internal_date, parse_fetch_items, with_flags,
                               with_modseq)
from tmmail.imap.mailboxes import parse_flags
from tmmail.imap.search import parse_modseq

_FAST_ITEMS = frozenset({"UID", "FLAGS", "RFC822.SIZE", "INTERNALDATE", "MODSEQ"})
#: FETCH lines formatted and sent per slice in a large UID/FLAGS answer
_FAST_SLICE = 2000
#: search keys that look at nothing but flags (and \\Recent): evaluated once per distinct flag set
_FLAG_KEYS = frozenset({b"ALL", b"ANSWERED", b"DELETED", b"DRAFT", b"FLAGGED", b"NEW", b"OLD",
                        b"RECENT", b"SEEN", b"UNANSWERED", b"UNDELETED", b"UNDRAFT", b"UNFLAGGED",
                        b"UNSEEN", b"NOT", b"OR"})
_BATCH_BYTES = 256 * 1024
#: flag changes on more messages than this run in a thread (each one is a rename)
_INLINE_FLAG_CHANGES = 200
_SLICE_SECONDS = 0.02
#: content FETCHes of more octets than this (sum of RFC822.SIZEs) are made in the thread pool
_INLINE_CONTENT_BYTES = 1024 * 1024


from tmmail.imap.session import missing_uids, range_set, uid_set  # noqa: E402  (uid_set re-exported)


_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")
_DAY_PREFIX: dict[int, bytes] = {}


def internal_date_bytes(value: Any) -> bytes:
    """``"17-Jul-1996 02:44:25 +0000"`` for epoch seconds, ~20x faster than the general
    formatter (one calendar computation per day); other values go to fetch's formatter."""
    if not isinstance(value, (int, float)) or value < 0:
        return format_internal_date(value)
    t = int(value)
    day, sec = divmod(t, 86400)
    prefix = _DAY_PREFIX.get(day)
    if prefix is None:
        tm = time.gmtime(day * 86400)
        prefix = b'"%02d-%s-%04d ' % (tm.tm_mday, _MONTHS[tm.tm_mon - 1], tm.tm_year)
        if len(_DAY_PREFIX) < 100_000:
            _DAY_PREFIX[day] = prefix
    hours, rest = divmod(sec, 3600)
    return prefix + b'%02d:%02d:%02d +0000"' % (hours, rest // 60, rest % 60)


def _expected_flags(old: Any, flags: list[str], mode: str) -> set[str]:
    """The flags a STORE of ``flags`` in ``mode`` makes of ``old`` (\\Recent is not stored)."""
    if mode == "add":
        return set(old) | set(flags)
    if mode == "remove":
        return set(old) - set(flags)
    return set(flags)


def _folded(flags: Any) -> frozenset[str]:
    return frozenset(f.lower() for f in flags)


def flags_only(tokens: list) -> bool:
    """True when a SEARCH program depends only on flags (``UNSEEN``, ``NOT DELETED``, ...)."""
    if tokens and isinstance(tokens[0], Atom) and tokens[0].upper() == b"CHARSET":
        tokens = tokens[2:]
    it = iter(tokens)
    for t in it:
        if isinstance(t, list):
            if not flags_only(t):
                return False
            continue
        if not isinstance(t, Atom):
            return False
        word = t.upper()
        if word in (b"KEYWORD", b"UNKEYWORD"):
            arg = next(it, None)
            if arg is None or isinstance(arg, list):
                return False
            continue
        if word not in _FLAG_KEYS:
            return False
    return bool(tokens)


def _modifiers(tok: Any, allowed: tuple[bytes, ...], what: str,
               flags: tuple[bytes, ...] = ()) -> dict[bytes, Any]:
    """A parenthesised modifier list ``(NAME value ...)`` (RFC 4466): each name once; names in
    ``flags`` take no value."""
    if not isinstance(tok, list) or not tok:
        raise ParseError(f"{what} modifiers must be a non-empty parenthesised list")
    out: dict[bytes, Any] = {}
    i = 0
    while i < len(tok):
        name = tok[i]
        if isinstance(name, list) or not isinstance(name, Atom):
            raise ParseError(f"Invalid {what} modifier")
        up = bytes(name).upper()
        if up not in allowed:
            raise ParseError(f"Unknown {what} modifier {up[:30].decode('ascii', 'replace')}")
        if up in out:
            raise ParseError(f"{what} modifier given twice")
        if up in flags:
            out[up] = True
            i += 1
            continue
        if i + 1 >= len(tok):
            raise ParseError(f"{what} modifier {up.decode()} needs a value")
        out[up] = tok[i + 1]
        i += 2
    return out


def _seq_set(tok: Any) -> Any:
    from tmmail.imap.search import SequenceSet

    if not isinstance(tok, Atom):
        raise ParseError("Expected a sequence set")
    return SequenceSet.parse(bytes(tok))


class MessageCommands:
    """Selected-state commands; mixed into IMAPServer."""

    # -- simple ----------------------------------------------------------------------------
    def do_CHECK(self, tag: bytes, args: list) -> None:
        self.with_updates(tag, b"CHECK", force=True)

    def do_UNSELECT(self, tag: bytes, args: list) -> None:
        self.close_mailbox()
        self.tagged(tag, R.OK_COMPLETED % b"UNSELECT")

    def do_CLOSE(self, tag: bytes, args: list) -> Any:
        sel = self.selected
        if sel.read_only:
            self.close_mailbox()
            self.tagged(tag, R.OK_COMPLETED % b"CLOSE")
            return None
        # RFC 3501 §6.4.2: expunge silently, then deselect (even if the expunge failed)
        d = self.blocking(sel.folder.expunge, None)

        def done(_: Any) -> None:
            self.close_mailbox()
            self.tagged(tag, R.OK_COMPLETED % b"CLOSE")

        def failed(f: Any) -> None:
            self.log.failure("IMAP CLOSE expunge failed for {login}", f, login=self.login)
            self.close_mailbox()
            self.tagged(tag, R.OK_COMPLETED % b"CLOSE")

        d.addCallbacks(done, failed)
        return d

    # -- EXPUNGE ---------------------------------------------------------------------------
    def do_EXPUNGE(self, tag: bytes, args: list) -> Any:
        if args:
            raise ParseError("EXPUNGE takes no arguments")
        return self._expunge(tag, None, b"EXPUNGE")

    def do_UID_EXPUNGE(self, tag: bytes, args: list) -> Any:
        if len(args) != 1:
            raise ParseError("UID EXPUNGE expects a UID set")
        ss = _seq_set(args[0])
        sel = self.selected
        seqs = sel.seqs_for_uids(ss.resolve(sel.max_uid()))
        uids = [sel.messages[s - 1].uid for s in seqs]
        return self._expunge(tag, uids, b"UID EXPUNGE")

    def _expunge(self, tag: bytes, uids: list[int] | None, name: bytes) -> Any:
        sel = self.selected
        if sel.read_only:
            self.tagged(tag, R.NO_READ_ONLY)
            return None
        self.sync_updates(True)
        d = self.blocking(sel.folder.expunge, uids)

        def done(gone: list[tuple[int, int]]) -> None:
            sel.qresync = self.qresync
            self._out.extend(sel.expunge_lines(gone))
            self.sync_updates(True)
            self.tagged(tag, R.OK_COMPLETED % name)

        d.addCallback(done)
        return self.store_call(tag, d)

    # -- SEARCH ----------------------------------------------------------------------------
    def do_SEARCH(self, tag: bytes, args: list) -> Any:
        return self._search(tag, args, False)

    def do_UID_SEARCH(self, tag: bytes, args: list) -> Any:
        return self._search(tag, args, True)

    def _search(self, tag: bytes, args: list, uid: bool) -> Any:
        from tmmail.imap.search import BadCharset, parse_search, search

        if not args:
            raise ParseError("SEARCH needs search criteria")
        try:
            program = parse_search(args)
        except BadCharset:
            self.tagged(tag, R.BAD_CHARSET)
            return None
        self.sync_updates(uid)
        sel = self.selected
        max_uid = sel.max_uid()
        name = b"UID SEARCH" if uid else b"SEARCH"

        gone: list[Any] = []  # expunged by another session, not reported yet: they do not match

        if program.uses_modseq:
            self.enable_condstore()
            sel = self.selected

        def answer(found: list[Any]) -> None:
            nums = [m.uid for m in found] if uid else [m.seq for m in found]
            tail = b""
            if program.uses_modseq and found:  # RFC 7162 §3.1.5: the highest modseq found
                tail = b" (MODSEQ %d)" % max(m.modseq for m in found)
            self.send(b"* SEARCH" + b"".join(b" %d" % n for n in nums) + tail + b"\r\n")
            self.tagged(tag, (R.OK_EXPUNGED_SEARCH if gone else R.OK_COMPLETED) % name)

        if flags_only(args):
            nums = sel.search_by_flags(program, uid)
            self.send(b"* SEARCH" + b"".join(b" %d" % n for n in nums) + b"\r\n")
            self.tagged(tag, R.OK_COMPLETED % name)
            return None
        msgs = sel.all_msgs()
        max_seq = len(msgs)

        if program.needs_content:
            # reading and decoding every message: off the reactor
            d = self.blocking(search, program, msgs, max_seq, max_uid, gone)
            d.addCallback(answer)
            return self.store_call(tag, d)
        answer(search(program, msgs, max_seq, max_uid, gone))
        return None

    # -- FETCH -----------------------------------------------------------------------------
    def do_FETCH(self, tag: bytes, args: list) -> Any:
        return self._fetch(tag, args, False)

    def do_UID_FETCH(self, tag: bytes, args: list) -> Any:
        return self._fetch(tag, args, True)

    def _targets(self, tok: Any, uid: bool) -> list[int]:
        ss = _seq_set(tok)
        sel = self.selected
        if uid:
            return sel.seqs_for_uids(ss.resolve(sel.max_uid()))
        exists = sel.exists
        ranges = ss.resolve(exists)
        if not exists or ranges[-1][1] > exists:
            # RFC 3501 §9 (seq-number): a sequence number above EXISTS, or "*" in an empty
            # mailbox, gets a tagged BAD (as Dovecot: "Invalid messageset")
            raise ParseError("Invalid messageset: no such message sequence number")
        return sel.seqs(ranges)

    def _fetch(self, tag: bytes, args: list, uid: bool) -> Any:
        changedsince = None
        vanished = False
        if len(args) == 3:
            # fetch-modifiers (RFC 4466): CHANGEDSINCE (RFC 7162 §3.1.4.1); 0 is taken as "all";
            # VANISHED (§3.2.6): UID FETCH with CHANGEDSINCE, QRESYNC enabled
            mods = _modifiers(args[2], (b"CHANGEDSINCE", b"VANISHED"), "FETCH", flags=(b"VANISHED",))
            if b"CHANGEDSINCE" not in mods:
                raise ParseError("FETCH VANISHED needs CHANGEDSINCE")
            changedsince = parse_modseq(mods[b"CHANGEDSINCE"], "CHANGEDSINCE", zero=True)
            if b"VANISHED" in mods:
                if not uid or not self.qresync:
                    raise ParseError("VANISHED needs UID FETCH and ENABLE QRESYNC")
                vanished = True
        elif len(args) != 2:
            raise ParseError("FETCH expects a sequence set and fetch items")
        items = parse_fetch_items(args[1], uid_command=uid)
        if changedsince is not None:
            items = with_modseq(items)
        if any(i.name == "MODSEQ" for i in items):
            self.enable_condstore()
        self.sync_updates(uid)
        seqs = self._targets(args[0], uid)
        sel = self.selected
        if vanished:
            # no expunge history is kept: every UID of the set that is not here (a superset of
            # those expunged since CHANGEDSINCE, as RFC 7162 §3.2.6 allows)
            top = max(sel.folder.uidnext - 1, 0)
            gaps = missing_uids(_seq_set(args[0]).resolve(top), [m.uid for m in sel.messages])
            if gaps:
                self._out.append(b"* VANISHED (EARLIER) " + range_set(gaps) + b"\r\n")
        if changedsince is not None:
            msgs = sel.messages
            seqs = [s for s in seqs if msgs[s - 1].modseq > changedsince]
        name = b"UID FETCH" if uid else b"FETCH"
        seen_done: Any = None
        if any(i.sets_seen for i in items):
            items = with_flags(items)
            if self.condstore:
                items = with_modseq(items)  # a flag change: MODSEQ too (RFC 7162 §3.2)
            if not sel.read_only:
                msgs = sel.messages
                unseen = [msgs[s - 1].uid for s in seqs if "\\Seen" not in msgs[s - 1].flags]
                if unseen:
                    seen_done = self.set_flags(unseen, ["\\Seen"], "add")
        if isinstance(seen_done, defer.Deferred):
            # many renames ran in a thread; a failure (expunged meanwhile) still answers the FETCH
            seen_done.addErrback(self._seen_failed)
            seen_done.addCallback(lambda _: self._fetch_answer(tag, seqs, items, name))
            return seen_done
        if isinstance(seen_done, Exception):
            self._seen_failed(seen_done)
        return self._fetch_answer(tag, seqs, items, name)

    def _seen_failed(self, error: Any) -> None:
        value = getattr(error, "value", error)
        if not is_store_error(value):
            if hasattr(error, "raiseException"):
                error.raiseException()
            raise value
        self.log.info("IMAP implicit \\Seen failed for {login}: {error}", login=self.login, error=value)

    def set_flags(self, uids: list[int], flags: list[str], mode: str,
                  unchangedsince: int | None = None, modified: list[int] | None = None) -> Any:
        """Change flags: inline for a few messages (renames are cheap), in a thread for many.

        Returns None, a Deferred (thread), or the StoreError raised inline.  With
        ``unchangedsince``, messages whose modseq is higher are left alone and their UIDs
        appended to ``modified`` (RFC 7162 §3.1.3).
        """
        folder = self.selected.folder
        if len(uids) > _INLINE_FLAG_CHANGES:
            return self.blocking(folder.store_flags, uids, flags, mode, unchangedsince, modified)
        try:
            folder.store_flags(uids, flags, mode, unchangedsince, modified)
        except Exception as e:
            if is_store_error(e):
                return e
            raise
        return None

    def _fetch_answer(self, tag: bytes, seqs: list[int], items: list[Any], name: bytes) -> Any:
        if self.selected is None:
            self.tagged(tag, R.NO_SERVERBUG)
            return None
        if all(i.name in _FAST_ITEMS for i in items):
            self._fetch_fast(seqs, items)
            self.tagged(tag, R.OK_COMPLETED % name)
            return None
        missing: list[int] = []
        failed: list[int] = []
        chunks = self._fetch_chunks(seqs, items, missing, failed)

        def done(_: Any) -> None:
            if failed:
                self.tagged(tag, R.NO_SERVERBUG)
            elif missing:  # the live messages were answered (RFC 2180 §4.1.3, as Dovecot)
                self.tagged(tag, R.OK_EXPUNGED_FETCH)
            else:
                self.tagged(tag, R.OK_COMPLETED % name)

        if any(i.needs_content for i in items):
            msgs = self.selected.messages
            if sum(msgs[s - 1].size for s in seqs) > _INLINE_CONTENT_BYTES:
                # reading and parsing large messages (a header folded over 35,000 lines, a
                # 25 MiB BODYSTRUCTURE) must not stall every other session: made in a thread
                d = self.stream(chunks, threaded=True)
                d.addCallback(done)
                return d

        # the usual answer (one message, a few headers) is made at once and leaves with the
        # tagged reply in one write; only a big or slow one is streamed with flow control
        size = 0
        deadline = time.monotonic() + _SLICE_SECONDS
        for chunk in chunks:
            self._out.append(chunk)
            size += len(chunk)
            if size >= _BATCH_BYTES or time.monotonic() > deadline:
                break
        else:
            done(None)
            return None
        d = self.stream(chunks)
        d.addCallback(done)
        return d

    def _fetch_fast(self, seqs: list[int], items: list[Any]) -> None:
        """UID/FLAGS/RFC822.SIZE/INTERNALDATE only: formatted straight from the index, one write."""
        sel = self.selected
        msgs = sel.messages
        fb = sel.flags_table()
        names = [i.name for i in items]
        out: list[bytes] = []
        if not set(names) <= {"UID", "FLAGS"}:
            fmt = {
                "UID": lambda info: b"UID %d" % info.uid,
                "FLAGS": lambda info: b"FLAGS " + fb(info),
                "RFC822.SIZE": lambda info: b"RFC822.SIZE %d" % info.size,
                "INTERNALDATE": lambda info: b"INTERNALDATE " + internal_date_bytes(info.internal_date),
                "MODSEQ": lambda info: b"MODSEQ (%d)" % info.modseq,
            }
            parts = [fmt[n] for n in names]
            for s in seqs:
                info = msgs[s - 1]
                out.append(b"* %d FETCH (%s)\r\n" % (s, b" ".join([p(info) for p in parts])))
            self._out.extend(out)
            return
        if names == ["FLAGS", "UID"] or names == ["UID", "FLAGS"]:
            line = b"* %d FETCH (UID %d FLAGS %s)\r\n" if names[0] == "UID" else None
            # sent in slices as they are formatted: the client parses the first lines while
            # the rest are being made (20,000 lines take several ms to format)
            for start in range(0, len(seqs), _FAST_SLICE):
                part = seqs[start:start + _FAST_SLICE]
                if line is not None:
                    out = [line % (s, info.uid, fb(info)) for s, info in zip(part, map(msgs.__getitem__, [s - 1 for s in part]))]
                else:
                    out = [b"* %d FETCH (FLAGS %s UID %d)\r\n" % (s, fb(info), info.uid)
                           for s, info in zip(part, map(msgs.__getitem__, [s - 1 for s in part]))]
                self._out.extend(out)
                if len(seqs) > _FAST_SLICE:
                    self.flush()
            return
        for s in seqs:
            info = msgs[s - 1]
            parts = [b"UID %d" % info.uid if n == "UID" else b"FLAGS " + fb(info) for n in names]
            out.append(b"* %d FETCH (%s)\r\n" % (s, b" ".join(parts)))
        self._out.extend(out)

    def _fetch_chunks(self, seqs: list[int], items: list[Any], missing: list[int],
                      failed: list[int]) -> Iterator[bytes]:
        sel = self.selected
        batch: list[bytes] = []
        size = 0
        for s in seqs:
            if self.selected is not sel:
                return
            m = sel.msg(s)
            try:
                data = fetch_data(items, m)
            except Exception as e:  # one bad message must not end the session
                if is_store_error(e):
                    missing.append(s)
                else:
                    self.log.failure("IMAP FETCH of UID {uid} failed for {login}", uid=m.uid,
                                     login=self.login)
                    failed.append(s)
                continue
            line = b"* %d FETCH (%s)\r\n" % (s, data)
            batch.append(line)
            size += len(line)
            if size >= _BATCH_BYTES:
                yield b"".join(batch)
                batch = []
                size = 0
        if batch:
            yield b"".join(batch)

    def stream(self, chunks: Iterator[bytes], threaded: bool = False) -> defer.Deferred:
        """Write ``chunks`` in reactor-friendly slices, waiting while the transport's buffer
        is full (the session is its producer); ``threaded``: each chunk is made in the thread
        pool (large messages)."""
        self.flush()
        d: defer.Deferred = defer.Deferred()
        transport = self.transport
        reactor = self.factory.reactor

        def finish(error: Any = None) -> None:
            self._on_writable = None
            if error is None:
                d.callback(None)
            else:
                d.errback(error)

        def got(chunk: bytes | None) -> None:
            if chunk is None:
                finish()
                return
            if not (self._closing or self.transport is None):
                transport.write(chunk)
            step()

        def step() -> None:
            if self._closing or self.transport is None:
                finish()
                return
            if self._pause_writes:
                self._on_writable = step  # resumeProducing / stopProducing call it
                return
            if threaded:
                t = threads.deferToThreadPool(reactor, reactor.getThreadPool(), next, chunks, None)
                t.addCallbacks(got, finish)
                return
            deadline = time.monotonic() + _SLICE_SECONDS
            try:
                for chunk in chunks:
                    transport.write(chunk)
                    if self._pause_writes or time.monotonic() > deadline:
                        reactor.callLater(0, step)
                        return
            except Exception:
                finish(defer.Failure())
                return
            finish()

        step()
        return d

    # -- STORE -----------------------------------------------------------------------------
    def do_STORE(self, tag: bytes, args: list) -> Any:
        return self._store(tag, args, False)

    def do_UID_STORE(self, tag: bytes, args: list) -> Any:
        return self._store(tag, args, True)

    def _store(self, tag: bytes, args: list, uid: bool) -> Any:
        unchangedsince = None
        if len(args) >= 2 and isinstance(args[1], list):
            # store-modifiers (RFC 4466): UNCHANGEDSINCE (RFC 7162 §3.1.3), 0 allowed
            mods = _modifiers(args[1], (b"UNCHANGEDSINCE",), "STORE")
            unchangedsince = parse_modseq(mods[b"UNCHANGEDSINCE"], "UNCHANGEDSINCE", zero=True)
            args = [args[0]] + list(args[2:])
        if len(args) < 3 or not isinstance(args[1], Atom):
            raise ParseError("STORE expects a sequence set, an item and flags")
        item = bytes(args[1]).upper()
        silent = item.endswith(b".SILENT")
        if silent:
            item = item[: -len(b".SILENT")]
        modes = {b"FLAGS": "set", b"+FLAGS": "add", b"-FLAGS": "remove"}
        if item not in modes:
            raise ParseError("STORE item must be FLAGS, +FLAGS or -FLAGS (optionally .SILENT)")
        flag_tok = args[2] if len(args) == 3 else list(args[2:])
        flags = parse_flags(flag_tok, allow_recent=True)
        sel = self.selected
        if unchangedsince is not None:
            self.enable_condstore()
        if sel.read_only:
            self.tagged(tag, R.NO_READ_ONLY)
            return None
        self.sync_updates(uid)
        seqs = self._targets(args[0], uid)
        msgs = sel.messages
        uids = [msgs[s - 1].uid for s in seqs]
        name = b"UID STORE" if uid else b"STORE"
        mode = modes[item]
        before = [msgs[s - 1].flags for s in seqs] if silent else []
        before_ms = [msgs[s - 1].modseq for s in seqs]
        modified: list[int] = []
        result = self.set_flags(uids, flags, mode, unchangedsince, modified) if uids else None
        if isinstance(result, Exception):
            self.tagged(tag, store_error_reply(result))
            return None

        def answer(_: Any = None) -> None:
            if self.selected is sel:  # a new keyword: FLAGS/PERMANENTFLAGS first (RFC 3501 §7.2.6)
                self._out.extend(sel.flag_list_updates())
            if self.selected is sel:
                msgs = sel.messages
                fb = sel.flags_table()
                out = []
                # .SILENT still reports a message whose flags came out other than this STORE
                # made them: someone else changed them meanwhile (RFC 3501 §6.4.6)
                failed = set(modified)
                condstore = self.condstore
                for s, old, old_ms in zip(seqs, before or [None] * len(seqs), before_ms):
                    info = msgs[s - 1]
                    if info.uid in failed:
                        continue  # not changed: reported in [MODIFIED] (RFC 7162 §3.1.3)
                    show_flags = not silent or (_folded(info.flags)
                                                != _folded(_expected_flags(old, flags, mode)))
                    # with CONDSTORE, .SILENT still reports the new MODSEQ of what it changed
                    show_modseq = condstore and (not silent or info.modseq != old_ms)
                    if not (show_flags or show_modseq):
                        continue
                    parts = [b"UID %d" % info.uid] if uid else []
                    if show_flags:
                        parts.append(b"FLAGS " + fb(info))
                    if show_modseq:
                        parts.append(b"MODSEQ (%d)" % info.modseq)
                    out.append(b"* %d FETCH (%s)\r\n" % (s, b" ".join(parts)))
                self._out.extend(out)
            if modified:
                if uid:
                    nums = sorted(modified)
                else:
                    nums = sorted(s for s, u in zip(seqs, uids) if u in set(modified))
                self.tagged(tag, b"OK [MODIFIED %s] Conditional STORE failed" % uid_set(nums))
                return
            self.tagged(tag, R.OK_COMPLETED % name)

        if isinstance(result, defer.Deferred):
            result.addCallback(answer)
            return self.store_call(tag, result)
        answer()
        return None

    # -- COPY / MOVE -----------------------------------------------------------------------
    def do_COPY(self, tag: bytes, args: list) -> Any:
        return self._copy(tag, args, False, False)

    def do_UID_COPY(self, tag: bytes, args: list) -> Any:
        return self._copy(tag, args, True, False)

    def do_MOVE(self, tag: bytes, args: list) -> Any:
        return self._copy(tag, args, False, True)

    def do_UID_MOVE(self, tag: bytes, args: list) -> Any:
        return self._copy(tag, args, True, True)

    def _copy(self, tag: bytes, args: list, uid: bool, move: bool) -> Any:
        if len(args) != 2:
            raise ParseError("COPY/MOVE expect a sequence set and a mailbox name")
        dest = self.mailbox_arg(args[1])
        sel = self.selected
        name = (b"UID " if uid else b"") + (b"MOVE" if move else b"COPY")
        if move and sel.read_only:
            self.tagged(tag, R.NO_READ_ONLY)
            return None
        self.sync_updates(uid)
        seqs = self._targets(args[0], uid)
        msgs = sel.messages
        uids = [msgs[s - 1].uid for s in seqs]
        if not uids:
            self.tagged(tag, R.OK_COMPLETED % name)
            return None
        if move:
            d = self.blocking(sel.folder.move, uids, dest)
        else:
            adding = sum(msgs[s - 1].size for s in seqs)
            quota = mailbox_quota(self.factory.provider_store, self.entry)

            def copy_checked() -> Any:
                check_quota(self.account.root, quota, adding)
                return sel.folder.copy(uids, dest)

            d = self.blocking(copy_checked)

        def done(result: Any) -> None:
            uidvalidity, pairs = result[0], result[1]
            code = b""
            if pairs:
                src = uid_set([p[0] for p in pairs])
                dst = uid_set([p[1] for p in pairs])
                code = b"[COPYUID %d %s %s] " % (uidvalidity, src, dst)
            if move:
                if code:
                    self.untagged(b"OK " + code + b"Moved")
                sel.qresync = self.qresync
                self._out.extend(sel.expunge_lines(result[2]))
                self.sync_updates(True)
                self.tagged(tag, b"OK " + name + b" completed")
            else:
                self.sync_updates(uid)
                self.tagged(tag, b"OK " + code + name + b" completed")

        d.addCallback(done)
        return self.store_call(tag, d, trycreate=True)

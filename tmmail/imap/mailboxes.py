"""IMAP commands on mailboxes (RFC 3501 §6.3): SELECT, EXAMINE, CREATE, DELETE, RENAME,
SUBSCRIBE, UNSUBSCRIBE, LIST, LSUB, STATUS, APPEND, NAMESPACE (RFC 2342), ENABLE (RFC 5161),
and the untagged-update plumbing every selected-state command uses.

One job: the mailbox-level commands of a session, as a mixin of
:class:`tmmail.imap.server.IMAPServer` (``self.account`` is the login's Store).
"""

from __future__ import annotations

import re
from calendar import timegm
from datetime import datetime
from typing import Any

from twisted.internet import defer, task, threads

from tmmail.imap import listing, names
from tmmail.imap import responses as R
from tmmail.imap.account import (check_quota, is_store_error, mailbox_quota, mailbox_size as _mailbox_size,
                                 store_error_reply)
from tmmail.imap.encoding import Atom, ParseError, astring, utf7_encode
from tmmail.imap.session import SelectedMailbox
from tmmail.store_common import NoSuchFolder

SYSTEM_FLAGS = {f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")}
_KEYWORD = re.compile(r"^[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|~]+$")
#: capabilities ENABLE turns on (RFC 5161); others are ignored, as the RFC asks
_ENABLEABLE = (b"CONDSTORE", b"QRESYNC")
_DATE = re.compile(
    rb"^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})$")
#: INTERNALDATE is the message file's mtime: years a Linux file system keeps exactly
_MIN_YEAR, _MAX_YEAR = 1970, 2400
_MONTHS = {m: i for i, m in enumerate(
    [b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov", b"dec"], 1)}


def arg_string(tok: Any, what: str) -> bytes:
    """An astring argument (atom, quoted or literal), not a list."""
    if isinstance(tok, list):
        raise ParseError(f"{what} must be a string, not a list")
    return bytes(tok)


def parse_flags(tok: Any, allow_recent: bool = False) -> list[str]:
    """A flag or a parenthesised flag list (RFC 3501 §9 flag-list); system flags normalised."""
    items = tok if isinstance(tok, list) else [tok]
    out: list[str] = []
    for item in items:
        if isinstance(item, list) or not isinstance(item, Atom):
            raise ParseError("Flags must be atoms")
        text = bytes(item).decode("ascii", "replace")
        if text.startswith("\\"):
            norm = SYSTEM_FLAGS.get(text.lower())
            if norm is None:
                if text.lower() == "\\recent":
                    if allow_recent:
                        continue
                    raise ParseError("\\Recent cannot be set by clients")
                raise ParseError(f"Invalid system flag {text}")
            out.append(norm)
        else:
            if not _KEYWORD.match(text) or "]" in text:
                raise ParseError("Invalid keyword")
            out.append(text)
    return out


def parse_date_time(raw: bytes) -> float:
    """RFC 3501 date-time (``"17-Jul-1996 02:44:25 -0700"``) to epoch seconds."""
    m = _DATE.match(raw)
    if not m:
        raise ParseError("Invalid date-time, expected \"dd-Mon-yyyy hh:mm:ss +zzzz\"")
    day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
    month = _MONTHS.get(mon.lower())
    if month is None:
        raise ParseError("Invalid month in date-time")
    try:
        # datetime refuses 31-Feb and 25:61:61, which timegm would roll over silently
        when = datetime(int(year), month, int(day), int(hh), int(mm), min(int(ss), 59))
    except ValueError:
        raise ParseError("Invalid date-time") from None
    if int(ss) > 60 or int(zh) > 23 or int(zm) > 59:
        raise ParseError("Invalid date-time")
    if not _MIN_YEAR <= when.year <= _MAX_YEAR:
        # kept as the file's mtime: outside this range it would come back altered
        raise ParseError("Invalid date-time: year out of range")
    t = timegm(when.timetuple()) + (int(ss) - when.second)
    offset = (int(zh) * 60 + int(zm)) * 60
    return float(t - offset if sign == b"+" else t + offset)


def _qresync_params(tok: Any) -> tuple:
    """``(uidvalidity modseq [known-uids [(seqs uids)]])`` (RFC 7162 §3.2.5)."""
    from tmmail.imap.search import SequenceSet, parse_modseq

    if not isinstance(tok, list) or not 2 <= len(tok) <= 4:
        raise ParseError("QRESYNC expects (uidvalidity modseq [known-uids [seq-match-data]])")
    raw = tok[0]
    if isinstance(raw, list) or not bytes(raw).isdigit() or not 0 < int(bytes(raw)) <= 4294967295:
        raise ParseError("Invalid UIDVALIDITY in QRESYNC")
    modseq = parse_modseq(tok[1], "QRESYNC", zero=False)
    known = None
    if len(tok) >= 3:
        if isinstance(tok[2], list) or b"*" in bytes(tok[2]):
            raise ParseError("Invalid known-uids in QRESYNC")
        known = SequenceSet.parse(bytes(tok[2]))
    if len(tok) == 4:  # seq-match-data: checked for syntax, not needed without expunge history
        sm = tok[3]
        if (not isinstance(sm, list) or len(sm) != 2 or any(isinstance(x, list) for x in sm)):
            raise ParseError("Invalid seq-match-data in QRESYNC")
        SequenceSet.parse(bytes(sm[0]))
        SequenceSet.parse(bytes(sm[1]))
    return int(bytes(raw)), modseq, known


def resync_lines(sel: Any, params: tuple) -> list[bytes]:
    """SELECT (QRESYNC ...): ``* VANISHED (EARLIER)`` for the known UIDs that are not here (no
    expunge history is kept: a superset of those expunged since the modseq), then a FETCH of
    UID, FLAGS and MODSEQ for every message changed since it (RFC 7162 §3.2.5.1)."""
    from tmmail.imap.session import missing_uids, range_set

    _uv, modseq, known = params
    msgs = sel.messages
    top = max(sel.folder.uidnext - 1, 0)
    ranges = known.resolve(top) if known is not None else ([(1, top)] if top else [])
    out: list[bytes] = []
    gaps = missing_uids(ranges, [m.uid for m in msgs])
    if gaps:
        out.append(b"* VANISHED (EARLIER) " + range_set(gaps) + b"\r\n")
    for seq, info in enumerate(msgs, 1):
        if info.modseq > modseq and (known is None or known.contains(info.uid, top)):
            out.append(b"* %d FETCH (UID %d FLAGS %s MODSEQ (%d))\r\n"
                       % (seq, info.uid, sel.flags_bytes(info), info.modseq))
    return out


def encode_name(name: str) -> bytes:
    return astring(utf7_encode(name))


class MailboxCommands:
    """Mailbox commands; mixed into IMAPServer."""

    account: Any
    selected: SelectedMailbox | None

    # -- helpers ---------------------------------------------------------------------------
    def mailbox_arg(self, tok: Any) -> str:
        try:
            return names.decode_name(arg_string(tok, "Mailbox name"))
        except names.BadName as e:
            raise MailboxNameError(str(e)) from None

    def blocking(self, fn: Any, *args: Any) -> defer.Deferred:
        """Run a store call that writes or fsyncs in a thread (never on the reactor)."""
        return threads.deferToThreadPool(self.factory.reactor, self.factory.reactor.getThreadPool(),
                                         fn, *args)

    def store_call(self, tag: bytes, d: defer.Deferred, trycreate: bool = False) -> defer.Deferred:
        """Turn a StoreError from ``d`` into the tagged NO; other errors stay failures."""

        def eb(f: Any) -> None:
            if is_store_error(f.value):
                self.tagged(tag, store_error_reply(f.value, trycreate))
                return None
            return f

        d.addErrback(eb)
        return d

    def sync_updates(self, expunges: bool = True, force: bool = False) -> None:
        """Queue untagged EXPUNGE/EXISTS/FETCH for changes by others (RFC 3501 §7.4.1)."""
        if self.selected is None:
            return
        self.selected.condstore = self.condstore
        self.selected.qresync = self.qresync
        lines, invalid = self.selected.updates(expunges, force)
        if invalid:
            if self.selected.gone:
                self.log.info("IMAP mailbox {mailbox} of {login} was deleted or renamed elsewhere; "
                              "closing session", mailbox=self.selected.name, login=self.login)
                self.send(R.BYE_MAILBOX_GONE)
            else:
                self.log.warn("IMAP UIDVALIDITY of {mailbox} changed under {login}; closing session",
                              mailbox=self.selected.name, login=self.login)
                self.send(b"* BYE [UNAVAILABLE] Mailbox UIDVALIDITY changed, please reconnect\r\n")
            self.flush()
            self.close_connection()
            self._out = _Discard()  # the running command must not answer after the BYE
            return
        self._out.extend(lines)

    def push_updates(self) -> None:
        """Send updates now (IDLE)."""
        if self._closing or self.selected is None:
            return
        try:
            self.sync_updates(True, force=True)
        except Exception:
            self.log.failure("IMAP update of {login} failed", login=self.login)
        self.flush()

    def folder_changed(self) -> None:
        """A change was made in this process (store.watch): push it to an idling client."""
        if self.idling and self.selected is not None:
            self.push_updates()

    def with_updates(self, tag: bytes, name: bytes, expunges: bool = True, force: bool = False) -> None:
        self.sync_updates(expunges, force)
        self.tagged(tag, R.OK_COMPLETED % name)

    def close_mailbox(self) -> None:
        self._stop_idle_poll()
        if self.selected is not None:
            sel, self.selected = self.selected, None
            try:
                sel.close()
            except Exception:
                self.log.failure("IMAP closing {mailbox} failed", mailbox=sel.name)
        if self.state == "selected":
            self.state = "authenticated"

    def _start_idle_poll(self) -> None:
        """While idling, re-read the folder about once a second (Dovecot, other processes)."""
        self._stop_idle_poll()
        if self.selected is None:
            return
        loop = task.LoopingCall(self.push_updates)
        loop.clock = self.factory.reactor
        self._poll = loop
        loop.start(1.0, now=False)

    def _stop_idle_poll(self) -> None:
        loop = getattr(self, "_poll", None)
        if loop is not None:
            self._poll = None
            if loop.running:
                loop.stop()

    # -- ENABLE / NAMESPACE ----------------------------------------------------------------
    def do_ENABLE(self, tag: bytes, args: list) -> None:
        """RFC 5161: CONDSTORE (RFC 7162) can be enabled; unknown names are ignored."""
        if not args:
            raise ParseError("ENABLE needs capability names")
        enabled: list[bytes] = []
        for tok in args:
            if isinstance(tok, list):
                raise ParseError("ENABLE expects capability names")
            name = bytes(tok).upper()
            if name in _ENABLEABLE and name not in enabled:
                if name == b"QRESYNC":
                    if not self.qresync:
                        enabled.append(name)
                    self.qresync = True  # implies CONDSTORE (RFC 7162 §3.2.3)
                elif not self.condstore:
                    enabled.append(name)
                self.enable_condstore()
        self.untagged(b"ENABLED" + b"".join(b" " + n for n in enabled))
        self.tagged(tag, R.OK_COMPLETED % b"ENABLE")

    def enable_condstore(self) -> None:
        """A CONDSTORE enabling command (RFC 7162 §3.1): with a mailbox selected, the first one
        also reports its HIGHESTMODSEQ."""
        if self.condstore:
            return
        self.condstore = True
        if self.selected is not None:
            self.untagged(b"OK [HIGHESTMODSEQ %d] Highest" % self.selected.folder.highestmodseq)

    def do_NAMESPACE(self, tag: bytes, args: list) -> None:
        self.untagged(b'NAMESPACE (("" "/")) NIL NIL')
        self.with_updates(tag, b"NAMESPACE")

    # -- QUOTA (RFC 2087 / RFC 9208, read-only) --------------------------------------------
    # The mailbox's QUOTA_BYTES (AUTH.tab / MAILBOX.tab) covers all its folders, so there is
    # one quota root, "", and every folder is under it; a mailbox without a quota has none.
    # Clients show the fill level and warn before APPEND/COPY fail with [OVERQUOTA].
    def _quota(self) -> int:
        return mailbox_quota(self.factory.provider_store, self.entry)

    def _quota_line(self, used: int, quota: int) -> bytes:
        # STORAGE is in units of 1024 octets (RFC 9208 §5.1)
        return b'QUOTA "" (STORAGE %d %d)' % (-(-used // 1024), quota // 1024)

    def do_GETQUOTAROOT(self, tag: bytes, args: list) -> Any:
        if len(args) != 1:
            raise ParseError("GETQUOTAROOT expects one mailbox name")
        name = self.mailbox_arg(args[0])
        quota = self._quota()
        account = self.account

        def look() -> int:
            if not account.exists(name):
                raise NoSuchFolder(f"mailbox {name} does not exist")
            return _mailbox_size(account.root) if quota > 0 else 0

        def answer(used: int) -> None:
            if quota > 0:
                self.untagged(b"QUOTAROOT " + encode_name(name) + b' ""')
                self.untagged(self._quota_line(used, quota))
            else:
                self.untagged(b"QUOTAROOT " + encode_name(name))
            self.with_updates(tag, b"GETQUOTAROOT")

        d = self.blocking(look)
        d.addCallback(answer)
        return self.store_call(tag, d)

    def do_GETQUOTA(self, tag: bytes, args: list) -> Any:
        if len(args) != 1 or isinstance(args[0], list):
            raise ParseError("GETQUOTA expects one quota root")
        quota = self._quota()
        if bytes(args[0]) != b"" or quota <= 0:
            self.tagged(tag, b"NO [NONEXISTENT] No such quota root")
            return None
        d = self.blocking(_mailbox_size, self.account.root)

        def answer(used: int) -> None:
            self.untagged(self._quota_line(used, quota))
            self.with_updates(tag, b"GETQUOTA")

        d.addCallback(answer)
        return self.store_call(tag, d)

    def do_SETQUOTA(self, tag: bytes, args: list) -> None:
        if len(args) != 2 or isinstance(args[0], list) or not isinstance(args[1], list):
            raise ParseError("SETQUOTA expects a quota root and a list of limits")
        self.tagged(tag, b"NO [NOPERM] Quotas are set by the administrator")

    # -- SELECT / EXAMINE ------------------------------------------------------------------
    def do_SELECT(self, tag: bytes, args: list) -> Any:
        return self._select(tag, args, False)

    def do_EXAMINE(self, tag: bytes, args: list) -> Any:
        return self._select(tag, args, True)

    def _select(self, tag: bytes, args: list, readonly: bool) -> Any:
        qresync: tuple | None = None
        if len(args) == 2 and isinstance(args[1], list):
            # select-params (RFC 4466): CONDSTORE (RFC 7162 §3.1.8), QRESYNC (...) (§3.2.5)
            params = args[1]
            if not params:
                raise ParseError("Empty SELECT parameter list")
            i = 0
            condstore = False
            while i < len(params):
                p = params[i]
                word = b"" if isinstance(p, list) else bytes(p).upper()
                if word == b"CONDSTORE" and not condstore:
                    condstore = True
                    i += 1
                elif word == b"QRESYNC" and qresync is None:
                    if not self.qresync:
                        raise ParseError("QRESYNC parameter without ENABLE QRESYNC")
                    if i + 1 >= len(params):
                        raise ParseError("QRESYNC needs its parameters")
                    qresync = _qresync_params(params[i + 1])
                    condstore = True
                    i += 2
                else:
                    raise ParseError("Unknown SELECT parameter")
        elif len(args) != 1:
            raise ParseError("SELECT/EXAMINE expect one mailbox name")
        else:
            condstore = False
        name = self.mailbox_arg(args[0])
        self.close_mailbox()
        if condstore:
            self.condstore = True  # reported below, with the new mailbox
        d = self.blocking(self.account.open, name, readonly)

        def opened(folder: Any) -> None:
            if self._closing:
                folder.close()
                return
            reactor = self.factory.reactor
            sel = SelectedMailbox(folder, name, None)

            def changed(_name: str) -> None:  # in the thread that changed the folder
                sel.mark_dirty()
                reactor.callFromThread(self.folder_changed)

            try:
                sel._cancel_watch = self.account.watch(name, changed)
            except Exception:
                self.log.failure("IMAP watch of {mailbox} failed", mailbox=name)
            self.selected = sel
            self.state = "selected"
            perm = list(folder.permanent_flags)
            flags = [f for f in perm if f != "\\*"]
            msgs = folder.messages
            self.untagged(b"FLAGS (" + " ".join(flags).encode("utf-8", "replace") + b")")
            if readonly:
                self.untagged(b"OK [PERMANENTFLAGS ()] Read-only mailbox")
            else:
                self.untagged(b"OK [PERMANENTFLAGS (" + " ".join(perm).encode("utf-8", "replace")
                              + b")] Flags permitted")
            self.untagged(b"%d EXISTS" % len(msgs))
            self.untagged(b"%d RECENT" % len(folder.recent))
            for seq, info in enumerate(msgs, 1):
                if "\\Seen" not in info.flags:
                    self.untagged(b"OK [UNSEEN %d] First unseen" % seq)
                    break
            self.untagged(b"OK [UIDVALIDITY %d] UIDs valid" % folder.uidvalidity)
            self.untagged(b"OK [UIDNEXT %d] Predicted next UID" % folder.uidnext)
            if self.condstore:
                self.untagged(b"OK [HIGHESTMODSEQ %d] Highest" % folder.highestmodseq)
            if qresync is not None and qresync[0] == folder.uidvalidity:
                self._out.extend(resync_lines(sel, qresync))
            word = b"EXAMINE" if readonly else b"SELECT"
            code = b"READ-ONLY" if readonly else b"READ-WRITE"
            self.tagged(tag, b"OK [%s] %s completed" % (code, word))

        d.addCallback(opened)
        return self.store_call(tag, d)

    # -- CREATE / DELETE / RENAME ----------------------------------------------------------
    def do_CREATE(self, tag: bytes, args: list) -> Any:
        if len(args) != 1:
            raise ParseError("CREATE expects one mailbox name")
        name = self.mailbox_arg(args[0])
        if name.endswith(names.SEP) and len(name) > 1:
            name = name.rstrip(names.SEP)  # RFC 3501 §6.3.3: trailing separator = hierarchy intent
        if name == "INBOX":
            self.tagged(tag, R.NO_ALREADYEXISTS)
            return None
        d = self.blocking(self.account.create_folder, name)
        d.addCallback(lambda _: self.with_updates(tag, b"CREATE"))
        return self.store_call(tag, d)

    def do_DELETE(self, tag: bytes, args: list) -> Any:
        if len(args) != 1:
            raise ParseError("DELETE expects one mailbox name")
        name = self.mailbox_arg(args[0])
        if name == "INBOX":
            self.tagged(tag, R.NO_INBOX_DELETE)
            return None
        if self.selected is not None and self.selected.name == name:
            self.close_mailbox()  # RFC 3501 leaves this open; Dovecot deselects too
        d = self.blocking(self.account.delete_folder, name)
        d.addCallback(lambda _: self._folders_moved(tag, b"DELETE", [name]))
        return self.store_call(tag, d)

    def _folders_moved(self, tag: bytes, command: bytes, affected: list[str]) -> None:
        """After DELETE/RENAME: every session of this process with one of the ``affected``
        folders selected re-reads it at once (store watchers: an idling one gets its BYE now,
        others at their next command), then answer."""
        from tmmail import maildir

        for name in affected:
            try:
                maildir.notify(self.account.path_of(name))
            except Exception:
                self.log.failure("IMAP notify of {mailbox} failed", mailbox=name)
        self.with_updates(tag, command)

    def do_RENAME(self, tag: bytes, args: list) -> Any:
        if len(args) != 2:
            raise ParseError("RENAME expects two mailbox names")
        old = self.mailbox_arg(args[0])
        new = self.mailbox_arg(args[1])
        if new == "INBOX":
            self.tagged(tag, R.NO_ALREADYEXISTS)
            return None
        if old == "INBOX":
            affected = ["INBOX"]  # its messages move; INBOX and its children stay
        else:
            affected = [f.name for f in self.account.list_folders()
                        if f.name == old or f.name.startswith(old + names.SEP)]
        sel = self.selected
        if sel is not None and old != "INBOX" and sel.name in affected:
            self.close_mailbox()  # as for DELETE: the selected name no longer exists
        d = self.blocking(self.account.rename_folder, old, new)
        d.addCallback(lambda _: self._folders_moved(tag, b"RENAME", affected))
        return self.store_call(tag, d)

    # -- SUBSCRIBE / UNSUBSCRIBE -----------------------------------------------------------
    def do_SUBSCRIBE(self, tag: bytes, args: list) -> Any:
        if len(args) != 1:
            raise ParseError("SUBSCRIBE expects one mailbox name")
        name = self.mailbox_arg(args[0])
        d = self.blocking(self.account.subscribe, name)
        d.addCallback(lambda _: self.with_updates(tag, b"SUBSCRIBE"))
        return self.store_call(tag, d)

    def do_UNSUBSCRIBE(self, tag: bytes, args: list) -> Any:
        if len(args) != 1:
            raise ParseError("UNSUBSCRIBE expects one mailbox name")
        name = self.mailbox_arg(args[0])
        d = self.blocking(self.account.unsubscribe, name)
        d.addCallback(lambda _: self.with_updates(tag, b"UNSUBSCRIBE"))
        return self.store_call(tag, d)

    # -- LIST / LSUB -----------------------------------------------------------------------
    def do_LIST(self, tag: bytes, args: list) -> Any:
        try:
            req = listing.parse_list(args, arg_string)
        except names.BadName as e:
            raise ParseError(str(e)) from None
        if req.patterns == [""]:
            # RFC 3501 §6.3.8: the hierarchy delimiter and root name
            self.untagged(b'LIST (\\Noselect) "/" ""')
            self.with_updates(tag, b"LIST")
            return None
        entries = listing.select(req, self.account.list_folders(), self.account.subscriptions())
        items = req.status_items
        if items and b"HIGHESTMODSEQ" in items:
            self.enable_condstore()  # as STATUS (HIGHESTMODSEQ) does (RFC 7162 §3.1)
        if not items:
            for entry in entries:
                self.untagged(self._list_line(entry))
            self.with_updates(tag, b"LIST")
            return None
        # LIST-STATUS (RFC 5819): each selectable mailbox's STATUS follows its LIST line; a
        # mailbox whose status cannot be read (removed meanwhile) gets none, the rest go on
        account = self.account

        def statuses() -> dict[str, Any]:
            out = {}
            for entry in entries:
                if entry.selectable:
                    try:
                        out[entry.name] = account.status(entry.name)
                    except Exception as e:
                        if not is_store_error(e):
                            raise
            return out

        def answer(found: dict[str, Any]) -> None:
            for entry in entries:
                self.untagged(self._list_line(entry))
                st = found.get(entry.name)
                if st is not None:
                    self.untagged(self._status_line(entry.name, st, items))
            self.with_updates(tag, b"LIST")

        d = self.blocking(statuses)
        d.addCallback(answer)
        return self.store_call(tag, d)

    @staticmethod
    def _list_line(entry: listing.ListEntry) -> bytes:
        line = b"LIST (" + " ".join(entry.attributes).encode() + b') "/" ' + encode_name(entry.name)
        if entry.childinfo:
            line += b' ("CHILDINFO" (' + b" ".join(b'"%s"' % o.encode() for o in entry.childinfo) + b"))"
        return line

    @staticmethod
    def _status_line(name: str, st: Any, items: list[bytes]) -> bytes:
        values = {b"MESSAGES": st.messages, b"RECENT": st.recent, b"UIDNEXT": st.uidnext,
                  b"UIDVALIDITY": st.uidvalidity, b"UNSEEN": st.unseen,
                  b"HIGHESTMODSEQ": st.highestmodseq}
        body = b" ".join(b"%s %d" % (k, values[k]) for k in items)
        return b"STATUS " + encode_name(name) + b" (" + body + b")"

    def do_LSUB(self, tag: bytes, args: list) -> Any:
        if len(args) != 2:
            raise ParseError("LSUB expects a reference and a mailbox pattern")
        ref = names.decode_name(arg_string(args[0], "Reference")) if args[0] else ""
        raw = arg_string(args[1], "Pattern")
        pattern = names.decode_name(raw) if raw else ""
        regex = names.list_pattern(ref, pattern)
        existing = {f.name: f for f in self.account.list_folders()}
        subscribed = [names.normalize(n) for n in self.account.subscriptions()]
        listed: set[str] = set()
        for name in subscribed:
            if not regex.match(name) or name in listed:
                continue
            listed.add(name)
            info = existing.get(name)
            attrs = [] if info is not None and "\\Noselect" not in info.attributes else ["\\Noselect"]
            self.untagged(b"LSUB (" + " ".join(attrs).encode() + b') "/" ' + encode_name(name))
        if "%" in pattern:
            # RFC 3501 §6.3.9: "foo/bar" subscribed, "foo" not: LSUB "" "%" returns "foo"
            # flagged \Noselect
            for name in subscribed:
                levels = name.split(names.SEP)
                for i in range(len(levels) - 1, 0, -1):
                    parent = names.SEP.join(levels[:i])
                    if parent not in listed and regex.match(parent):
                        listed.add(parent)
                        self.untagged(b'LSUB (\\Noselect) "/" ' + encode_name(parent))
        self.with_updates(tag, b"LSUB")
        return None

    # -- STATUS ----------------------------------------------------------------------------
    def do_STATUS(self, tag: bytes, args: list) -> Any:
        if len(args) != 2 or not isinstance(args[1], list) or not args[1]:
            raise ParseError("STATUS expects a mailbox name and a list of items")
        name = self.mailbox_arg(args[0])
        items = listing.parse_status_items(args[1])
        if b"HIGHESTMODSEQ" in items:
            self.enable_condstore()
        d = self.blocking(self.account.status, name)  # a first look may index the whole folder

        def answer(st: Any) -> None:
            self.untagged(self._status_line(name, st, items))
            self.with_updates(tag, b"STATUS")

        d.addCallback(answer)
        return self.store_call(tag, d)

    # -- APPEND ----------------------------------------------------------------------------
    def do_APPEND(self, tag: bytes, args: list) -> Any:
        if len(args) < 2:
            raise ParseError("APPEND expects a mailbox name and a message literal")
        name = self.mailbox_arg(args[0])
        rest = args[1:]
        flags: list[str] = []
        date: float | None = None
        if rest and isinstance(rest[0], list):
            flags = parse_flags(rest[0], allow_recent=True)
            rest = rest[1:]
        if len(rest) == 2:
            if isinstance(rest[0], list):
                raise ParseError("APPEND date-time must be a quoted string")
            date = parse_date_time(bytes(rest[0]))
            rest = rest[1:]
        if len(rest) != 1 or isinstance(rest[0], list):
            raise ParseError("APPEND expects one message literal (MULTIAPPEND is not supported)")
        if not getattr(rest[0], "literal", False):
            raise ParseError("APPEND message must be a literal")  # RFC 3501 §9 append
        data = bytes(rest[0])
        if not data:
            self.tagged(tag, b"NO Cannot append an empty message")
            return None
        if len(data) > self.settings.max_literal_size:
            self.tagged(tag, R.NO_TOO_BIG)
            return None
        d = self.blocking(self._append_checked, mailbox_quota(self.factory.provider_store, self.entry),
                          name, data, flags, date)

        def done(result: tuple[int, int]) -> None:
            uidvalidity, uid = result
            self.sync_updates(True)
            self.tagged(tag, b"OK [APPENDUID %d %d] APPEND completed" % (uidvalidity, uid))

        d.addCallback(done)
        return self.store_call(tag, d, trycreate=True)


    def _append_checked(self, quota: int, name: str, data: bytes, flags: list[str],
                        date: float | None) -> tuple[int, int]:
        """In a thread: the quota check, then the durable append."""
        check_quota(self.account.root, quota, len(data))
        return self.account.append(name, data, flags, date)


class _Discard(list):
    """Output buffer of a session that said BYE: whatever the command still adds is dropped."""

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class MailboxNameError(ParseError):
    """A mailbox name that is not valid modified UTF-7: answered with BAD and the reason."""


__all__ = ["MailboxCommands", "MailboxNameError", "parse_flags", "parse_date_time", "encode_name"]

"""POP3 service over the Maildir store (RFC 1939; RFC 2449 CAPA; RFC 2595 STLS; RFC 5034 SASL; RFC 3206).

Written fresh on a bounded line splitter instead of subclassing ``twisted.mail.pop3.POP3`` (see
the survey, §3/§4: no STLS, joke CAPA entries, deletions before QUIT, chunk-boundary stuffing).

* One command at a time, in order: pipelined commands (RFC 2449 PIPELINING, §6.6) wait in the
  input buffer while a command runs (login, opening the maildrop, streaming a message, QUIT) or
  while the client does not read our replies (the session is the transport's push producer);
  if more than ``MAX_PENDING_INPUT`` waits, reading from the socket pauses until the backlog is
  handled.  Neither input nor output grows without bound, and no pipeline is refused.
* The maildrop is a snapshot of INBOX taken at login (RFC 1939 §5: message numbers are fixed for
  the session); UIDL is what Dovecot's default ``%08Xu%08Xv`` prints (lower-case hex of UID and
  UIDVALIDITY; a ``P`` field in the uidlist record, Dovecot's migrated UIDL, wins), stable across new/ -> cur/
  moves and flag renames by other clients.
* DELE only marks; files are removed in the UPDATE state after QUIT (RFC 1939 §6); a dropped
  connection deletes nothing.  One session per maildrop (``-ERR [IN-USE]``, RFC 2449 §8.1.2),
  also across processes through an flock on ``tmmail-pop3.lock``.
* At most ``[pop3] max_connections_per_ip`` simultaneous connections per client (IPv4 address or
  IPv6 /64, ``tmmail.cred.ip_key`` as for SMTP and the login throttle), counted over every POP3
  listener built from the same Settings; more are refused at the greeting.
* RETR/TOP stream the file through a producer with a stateful LF->CRLF + dot-stuffing
  transformer (RFC 1939 §3), so chunk boundaries never matter.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import os
from typing import Any

from twisted.internet import defer, protocol, threads
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from tmmail import maildir, uidlist
from tmmail.connlimit import shared_counts
from tmmail.pop3_stream import DotStuffer, MessageProducer, TopLimiter
from tmmail.store import Store, StoreError

__all__ = ["POP3Factory", "POP3Server", "DotStuffer", "TopLimiter", "MessageProducer", "open_maildrop"]

log = Logger()

MAX_LINE = 4096
#: unhandled input (pipelined commands) above which reading from the socket pauses
MAX_PENDING_INPUT = 64 * 1024
#: a safety net only: with reading paused the buffer stays far below this
MAX_INPUT_BUFFER = 1024 * 1024
#: -ERR replies in a row (before login: in the session) after which the connection is closed
MAX_ERRORS = 20
LOCK_FILE = "tmmail-pop3.lock"
#: seconds a closing connection may take to flush its last replies before it is aborted
#: (a client that does not read, or never finishes the TLS handshake, would hold it forever)
CLOSE_GRACE = 10.0
IMPLEMENTATION = b"TMmail"

# -- replies (RFC 1939, RFC 2449 §8 response codes, RFC 3206) ----------------------------------------
GREETING = b"+OK TMmail POP3 server ready"
ERR_TOO_MANY_CONNECTIONS = b"-ERR [SYS/TEMP] Too many connections from your address, try again later"
OK_BYE = b"+OK Bye"
OK_BEGIN_TLS = b"+OK Begin TLS negotiation"
OK_USER = b"+OK Send your password"
OK_RSET = b"+OK Maildrop reset"
OK_NOOP = b"+OK"
OK_DELE = b"+OK Message deleted"
OK_CAPA = b"+OK Capability list follows"
ERR_UNKNOWN = b"-ERR Unknown command"
ERR_SYNTAX = b"-ERR Syntax error"
ERR_MSG_NUMBER = b"-ERR Syntax error: invalid message number"
ERR_LINE_COUNT = b"-ERR Syntax error: invalid line count"
ERR_STATE = b"-ERR Command not valid in this state"
ERR_LINE = b"-ERR Line too long"
ERR_TOO_MANY = b"-ERR Too many errors, closing connection"
ERR_INPUT_OVERFLOW = b"-ERR Too much unread input, closing connection"
ERR_NEED_TLS = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connection, use STLS"
ERR_AUTH_FAILED = b"-ERR [AUTH] Authentication failed"
#: the issue's "temporary block (454 4.7.0 / -ERR [AUTH] / NO [UNAVAILABLE])": [AUTH] (RFC 3206)
#: tells the client the credentials were not accepted, the text that retrying later may work
ERR_AUTH_BLOCKED = b"-ERR [AUTH] Too many failed logins, try again later"
ERR_AUTH_MECH = b"-ERR [AUTH] Unsupported authentication mechanism"
ERR_AUTH_CANCEL = b"-ERR Authentication cancelled"
ERR_AUTH_B64 = b"-ERR [AUTH] Invalid base64 data"
ERR_NO_USER = b"-ERR USER first"
ERR_IN_USE = b"-ERR [IN-USE] Maildrop is locked by another session"
ERR_MAILDROP = b"-ERR [SYS/TEMP] Unable to open the maildrop, try again later"
ERR_NO_MSG = b"-ERR No such message"
ERR_DELETED = b"-ERR Message already deleted"
ERR_GONE = b"-ERR Message was removed by another session"
ERR_UPDATE = b"-ERR [SYS/TEMP] Some deleted messages could not be removed"
ERR_TLS_ACTIVE = b"-ERR TLS already active"
ERR_TLS_UNAVAILABLE = b"-ERR TLS not available"
ERR_TIMEOUT = b"-ERR Idle timeout, closing connection"
ERR_INTERNAL = b"-ERR [SYS/TEMP] Internal error"

AUTHORIZATION, TRANSACTION, UPDATE = "AUTHORIZATION", "TRANSACTION", "UPDATE"


def _ascii_number(arg: str) -> int | None:
    """A decimal number of ASCII digits 0-9 (RFC 1939 §3), or None.

    ``str.isdigit()`` alone also accepts other Unicode digits ("²", Arabic-Indic "١", ...),
    which ``int()`` then rejects or silently converts.  Numbers longer than 9 significant digits
    come back as 10**9, which is beyond any message number or line count.
    """
    if not arg or not arg.isascii() or not arg.isdigit():
        return None
    digits = arg.lstrip("0")
    return int(digits or "0") if len(digits) <= 9 else 10 ** 9


#: maildrops locked by sessions of this process (realpath of the Maildir)
_locked: set[str] = set()


class Maildrop:
    """The session's snapshot of INBOX: numbering, sizes, UIDLs, deletion marks."""

    def __init__(self, folder: Any, lock_fd: int, key: str) -> None:
        self.folder = folder
        self.messages = list(folder.messages)
        self.deleted: set[int] = set()
        self.lock_fd = lock_fd
        self.key = key
        uv = folder.uidvalidity
        migrated = _migrated_uidls(folder.path)
        self.uidls = [migrated.get(m.base) or b"%08x%08x" % (m.uid, uv) for m in self.messages]

    def release(self) -> None:
        if self.lock_fd >= 0:
            try:
                os.close(self.lock_fd)  # closing drops the flock
            finally:
                self.lock_fd = -1
                _locked.discard(self.key)


def _migrated_uidls(folder: str) -> dict[str, bytes]:
    """base -> UIDL from the ``P<uidl>`` extension Dovecot keeps for migrated POP3 UIDLs."""
    ul = uidlist.read(folder)
    out: dict[str, bytes] = {}
    if ul is None:
        return out
    for base, rec in ul.records.items():
        if "P" in rec.ext:
            for field in rec.ext.split():
                if field.startswith("P") and len(field) > 1:
                    value = field[1:].encode("ascii", "replace")
                    if len(value) <= 70 and all(0x21 <= c <= 0x7E for c in value):  # RFC 1939 §7
                        out[base] = value
    return out


def open_maildrop(path: str) -> Maildrop:
    """Lock and snapshot a maildrop (blocking: run in a thread).  Raises BlockingIOError if in use."""
    maildir.create(path)
    key = os.path.realpath(path)
    if key in _locked:
        raise BlockingIOError(errno.EWOULDBLOCK, "maildrop in use")
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise BlockingIOError(errno.EWOULDBLOCK, "maildrop in use") from None
    if key in _locked:  # raced with another thread of this process
        os.close(fd)
        raise BlockingIOError(errno.EWOULDBLOCK, "maildrop in use")
    _locked.add(key)
    try:
        folder = Store(path).open("INBOX", readonly=True, claim_recent=False)
        return Maildrop(folder, fd, key)
    except BaseException:
        _locked.discard(key)
        os.close(fd)
        raise


@implementer(IPushProducer)
class POP3Server(protocol.Protocol, TimeoutMixin):
    """One POP3 session."""

    def __init__(self, factory: "POP3Factory") -> None:
        self.factory = factory
        self.settings = factory.settings
        self.state = AUTHORIZATION
        self.secure = factory.role == "pop3s"
        self._buf = bytearray()  # received, not yet handled
        self._pos = 0  # start of the first unhandled line in _buf
        self.busy = False  # a command waits for a Deferred
        self._in_process = False
        self._pause_writes = False  # the transport's write buffer is full (IPushProducer)
        self._reading_paused = False
        self._registered = False  # this session is the transport's producer
        self._streaming: MessageProducer | None = None  # RETR/TOP in progress
        #: errors in a row (since the last successful command, once logged in; see _dispatch)
        self.errors = 0
        self._failed = False  # the command being run has failed
        self.user: str | None = None
        self.sasl: str | None = None  # waiting for a SASL continuation line
        self.maildrop: Maildrop | None = None
        self.closing = False
        self.login: str | None = None
        self._last_line = ""
        self._counted = False
        self._abort_call: Any = None
        self.callLater = factory.reactor.callLater  # TimeoutMixin uses it

    # -- connection -----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        if not self.factory.connection_opened(self.peer):
            log.warn("POP3 connection refused from {peer}: too many connections", peer=self.peer)
            self.reply(ERR_TOO_MANY_CONNECTIONS)
            self.close()
            return
        self._counted = True
        self._register()
        self.setTimeout(self.settings.pop3.idle_timeout)
        self.reply(GREETING)

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        self.closing = True
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        if self._counted:
            self._counted = False
            self.factory.connection_closed(self.peer)
        if self.maildrop is not None:
            self.maildrop.release()  # nothing is deleted: UPDATE only follows QUIT
            self.maildrop = None

    def timeoutConnection(self) -> None:
        log.info("POP3 idle timeout for {peer}", peer=self.peer)
        if self._streaming is None:  # not in the middle of a multi-line response
            self.reply(ERR_TIMEOUT)
        self.close()

    def reply(self, line: bytes) -> None:
        if not self.closing:
            self.transport.write(line + b"\r\n")

    def multiline(self, first: bytes, lines: list[bytes]) -> None:
        body = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
        self.transport.write(first + b"\r\n" + body + b".\r\n")

    def close(self) -> None:
        if self._abort_call is not None:
            return
        self.closing = True
        self._buf.clear()
        self._pos = 0
        # a registered producer would hold the connection open (ITransport.loseConnection)
        if self._streaming is not None:
            self._streaming.stopProducing()  # unregisters itself
        self._unregister()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self.transport.loseConnection()
        self._abort_call = self.callLater(CLOSE_GRACE, self.transport.abortConnection)

    # -- input ----------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self._buf += data
        if len(self._buf) - self._pos > MAX_INPUT_BUFFER:  # reading did not stop: never expected
            log.warn("POP3 input from {peer} overflowed while paused", peer=self.peer)
            self.reply(ERR_INPUT_OVERFLOW)
            return self.close()
        self._process()

    def _line_too_long(self) -> None:
        self.reply(ERR_LINE)
        self.close()

    def _process(self) -> None:
        """Handle complete lines, one command at a time, while nothing holds the session."""
        if self._in_process:
            return  # a command finished synchronously inside the loop below: it goes on
        self._in_process = True
        try:
            while not self.busy and not self._pause_writes and not self.closing:
                nl = self._buf.find(b"\n", self._pos)
                if nl < 0:
                    if len(self._buf) - self._pos > MAX_LINE + 1:
                        self._line_too_long()
                    break
                line = bytes(self._buf[self._pos:nl])
                self._pos = nl + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > MAX_LINE:
                    self._line_too_long()
                    break
                self.resetTimeout()
                result = self._dispatch(line)
                if isinstance(result, defer.Deferred):
                    self.busy = True
                    result.addErrback(self._internal_error)
                    result.addBoth(self._done)
        finally:
            self._in_process = False
            if self._pos:
                del self._buf[:self._pos]
                self._pos = 0
        if self.closing:
            return
        # flow control: input that cannot be handled now (a command is running, the client is
        # not reading our replies) waits in _buf; once too much waits, stop reading the socket.
        # Pausing only for a backlog keeps a TLS handshake (which pauses us) receiving.
        held = self.busy or self._pause_writes
        if held and len(self._buf) > MAX_PENDING_INPUT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif self._reading_paused and not held:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _done(self, _: Any) -> None:
        self.busy = False
        self.resetTimeout()
        if not self.closing:
            self._process()

    # -- output flow control: the transport's push producer ------------------------------------

    def _register(self) -> None:
        if not self._registered and not self.closing:
            self._registered = True
            self._pause_writes = False
            self.transport.registerProducer(self, True)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._pause_writes = False
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: handle no further command until it drains."""
        self._pause_writes = True

    def resumeProducing(self) -> None:
        self._pause_writes = False
        if not self.closing:
            self._process()

    def stopProducing(self) -> None:
        pass

    def _internal_error(self, failure: Any) -> None:
        log.failure("POP3 command failed for {peer}", failure, peer=self.peer)
        self.reply(ERR_INTERNAL)

    def _dispatch(self, line: bytes) -> Any:
        """Run one command line.  A command that succeeds in the TRANSACTION state (the login
        that entered it included) resets the error count, so MAX_ERRORS counts consecutive
        errors there, like the IMAP server's BAD count: a long pipeline with many refused
        commands (DELE of messages that are gone) goes on, a client that sends nothing but
        bad commands is still closed.  Before login, errors add up for the whole session:
        USER and CAPA answer +OK (AUTH its "+ " prompt) to anyone, so alternating them with
        bad commands must not keep an unauthenticated connection open."""
        self._failed = False
        result = self._command(line)
        if isinstance(result, defer.Deferred):
            return result.addCallback(self._succeeded)
        self._succeeded(None)
        return result

    def _succeeded(self, result: Any) -> Any:
        if not self._failed and self.state == TRANSACTION:
            self.errors = 0
        return result

    def _command(self, line: bytes) -> Any:
        self._last_line = line.decode("utf-8", "replace")
        if self.sasl is not None:
            return self._sasl_continue(line)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(ERR_SYNTAX)
        parts = text.split(" ")
        # ASCII letters only: str.upper() maps some non-ASCII letters onto ASCII ones
        # ("\u017ftat".upper() == "STAT")
        cmd = parts[0] if parts[0].isascii() and parts[0].isalpha() else ""
        args = [p for p in parts[1:] if p != ""]
        handler = getattr(self, "do_" + cmd.upper(), None) if cmd else None
        if handler is None:
            return self._error(ERR_UNKNOWN)
        allowed = getattr(handler, "states", (AUTHORIZATION, TRANSACTION))
        if self.state not in allowed:
            return self._error(ERR_STATE)
        try:
            return handler(args)
        except Exception:  # a bug must cost one command, never the connection
            log.failure("POP3 command {command} failed for {peer}", command=cmd.upper(), peer=self.peer)
            self._failed = True  # not the client's error, not a success either
            self.reply(ERR_INTERNAL)
            return None

    def _error(self, line: bytes) -> None:
        self._failed = True
        self.errors += 1
        self.reply(line)
        if self.errors >= MAX_ERRORS:
            self.reply(ERR_TOO_MANY)
            self.close()

    # -- AUTHORIZATION ----------------------------------------------------------------------------

    def _auth_allowed(self) -> bool:
        return self.secure or self.settings.pop3.allow_plaintext_auth

    def capabilities(self) -> list[bytes]:
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.state == AUTHORIZATION:
            if self._auth_allowed():
                caps += [b"USER", b"SASL PLAIN"]
            if not self.secure and self.factory.tls is not None:
                caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION " + IMPLEMENTATION)
        return caps

    def do_CAPA(self, args: list[str]) -> None:
        self.multiline(OK_CAPA, self.capabilities())

    def do_STLS(self, args: list[str]) -> None:
        if self.secure:
            return self._error(ERR_TLS_ACTIVE)
        if self.factory.tls is None:
            return self._error(ERR_TLS_UNAVAILABLE)
        self.reply(OK_BEGIN_TLS)
        # RFC 2595 §3.1 / RFC 3207-style: anything the client sent after STLS is discarded
        self._buf.clear()
        self._pos = 0
        self.user = None
        self.transport.startTLS(self.factory.tls)
        self.secure = True

    do_STLS.states = (AUTHORIZATION,)  # type: ignore[attr-defined]

    def do_USER(self, args: list[str]) -> None:
        if not self._auth_allowed():
            return self._error(ERR_NEED_TLS)
        if len(args) != 1:
            return self._error(ERR_SYNTAX)
        self.user = args[0]
        self.reply(OK_USER)

    do_USER.states = (AUTHORIZATION,)  # type: ignore[attr-defined]

    def do_PASS(self, args: list[str]) -> Any:
        if not self._auth_allowed():
            return self._error(ERR_NEED_TLS)
        if self.user is None:
            return self._error(ERR_NO_USER)
        user, self.user = self.user, None
        # RFC 1939 §7: the password may contain spaces
        password = self._raw_args
        return self._login(user, password)

    do_PASS.states = (AUTHORIZATION,)  # type: ignore[attr-defined]

    @property
    def _raw_args(self) -> str:
        return self._last_line.split(" ", 1)[1] if " " in self._last_line else ""

    def do_AUTH(self, args: list[str]) -> Any:
        if not args:
            self.multiline(b"+OK Supported mechanisms follow", [b"PLAIN"] if self._auth_allowed() else [])
            return None
        if not self._auth_allowed():
            return self._error(ERR_NEED_TLS)
        if not args[0].isascii() or args[0].upper() != "PLAIN" or len(args) > 2:
            return self._error(ERR_AUTH_MECH)
        if len(args) == 2:
            return self._sasl_plain(args[1])
        self.sasl = "PLAIN"
        self.reply(b"+ ")
        return None

    do_AUTH.states = (AUTHORIZATION,)  # type: ignore[attr-defined]

    def _sasl_continue(self, line: bytes) -> Any:
        self.sasl = None
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            return self._error(ERR_AUTH_CANCEL)
        return self._sasl_plain(text)

    def _sasl_plain(self, response: str) -> Any:
        """RFC 4616: ``[authzid] NUL authcid NUL passwd``; "=" is an empty initial response."""
        if response == "=":
            response = ""
        try:
            raw = base64.b64decode(response, validate=True)
            authzid, authcid, password = raw.decode("utf-8").split("\0")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return self._error(ERR_AUTH_B64)
        if authzid and authzid.lower() != authcid.lower():
            return self._error(ERR_AUTH_FAILED)
        return self._login(authcid, password)

    def _login(self, login: str, password: str) -> defer.Deferred[None]:
        from tmmail.cred import LoginBlocked, LoginFailed

        d = self.factory.authenticator.authenticate(login, password, self.peer)

        def ok(entry: Any) -> Any:
            if self.closing:
                return None
            path = maildir.mailbox_path(self.settings.postoffices_dir, entry.postoffice, entry.mailbox)
            self.login = entry.login
            return threads.deferToThreadPool(self.factory.reactor, self.factory.reactor.getThreadPool(),
                                             open_maildrop, path).addCallbacks(opened, not_opened)

        def opened(drop: Maildrop) -> None:
            if self.closing:
                drop.release()
                return
            self.maildrop = drop
            self.state = TRANSACTION
            log.info("POP3 login {login} from {peer}: {count} messages", login=self.login,
                     peer=self.peer, count=len(drop.messages))
            self.reply(b"+OK Maildrop has %d messages" % len(drop.messages))

        def not_opened(failure: Any) -> None:
            if failure.check(BlockingIOError):
                log.info("POP3 maildrop of {login} in use ({peer})", login=self.login, peer=self.peer)
                self.reply(ERR_IN_USE)
            else:
                log.failure("POP3 cannot open maildrop of {login}", failure, login=self.login)
                self.reply(ERR_MAILDROP)

        def failed(failure: Any) -> None:
            if failure.check(LoginBlocked):
                self._error(ERR_AUTH_BLOCKED)
            elif failure.check(LoginFailed):
                self._error(ERR_AUTH_FAILED)
            else:
                log.failure("POP3 authentication error", failure)
                self.reply(b"-ERR [SYS/TEMP] Authentication unavailable")

        d.addCallbacks(ok, failed)
        return d

    def do_QUIT(self, args: list[str]) -> Any:
        if self.state == AUTHORIZATION:
            self.reply(OK_BYE)
            return self.close()
        self.state = UPDATE
        drop = self.maildrop
        assert drop is not None
        uids = [drop.messages[i].uid for i in sorted(drop.deleted)]

        def update() -> int:
            if uids:
                drop.folder.delete_messages(uids)
            return len(uids)

        def done(count: int) -> None:
            log.info("POP3 {login} quit, {count} deleted", login=self.login, count=count)
            self.reply(b"+OK Bye, %d messages deleted" % count)

        def failed(failure: Any) -> None:
            log.failure("POP3 update failed for {login}", failure, login=self.login)
            self.reply(ERR_UPDATE)

        def finish(_: Any) -> None:
            drop.release()
            self.maildrop = None
            self.close()

        d = threads.deferToThreadPool(self.factory.reactor, self.factory.reactor.getThreadPool(), update)
        d.addCallbacks(done, failed)
        d.addBoth(finish)
        return d

    do_QUIT.states = (AUTHORIZATION, TRANSACTION)  # type: ignore[attr-defined]

    # -- TRANSACTION ----------------------------------------------------------------------------

    def _msg(self, arg: str) -> int | None:
        """0-based index for a message-number argument, or None after replying -ERR."""
        drop = self.maildrop
        assert drop is not None
        n = _ascii_number(arg)
        if n is None:
            self._error(ERR_MSG_NUMBER)
            return None
        if not 1 <= n <= len(drop.messages):
            self._error(ERR_NO_MSG)
            return None
        if n - 1 in drop.deleted:
            self._error(ERR_DELETED)
            return None
        return n - 1

    def do_STAT(self, args: list[str]) -> None:
        drop = self.maildrop
        live = [m for i, m in enumerate(drop.messages) if i not in drop.deleted]
        self.reply(b"+OK %d %d" % (len(live), sum(m.size for m in live)))

    do_STAT.states = (TRANSACTION,)  # type: ignore[attr-defined]

    def do_LIST(self, args: list[str]) -> None:
        drop = self.maildrop
        if args:
            i = self._msg(args[0])
            if i is not None:
                self.reply(b"+OK %d %d" % (i + 1, drop.messages[i].size))
            return
        lines = [b"%d %d" % (i + 1, m.size) for i, m in enumerate(drop.messages) if i not in drop.deleted]
        self.multiline(b"+OK %d messages" % len(lines), lines)

    do_LIST.states = (TRANSACTION,)  # type: ignore[attr-defined]

    def do_UIDL(self, args: list[str]) -> None:
        drop = self.maildrop
        if args:
            i = self._msg(args[0])
            if i is not None:
                self.reply(b"+OK %d %s" % (i + 1, drop.uidls[i]))
            return
        lines = [b"%d %s" % (i + 1, u) for i, u in enumerate(drop.uidls) if i not in drop.deleted]
        self.multiline(b"+OK", lines)

    do_UIDL.states = (TRANSACTION,)  # type: ignore[attr-defined]

    def do_DELE(self, args: list[str]) -> None:
        if len(args) != 1:
            return self._error(ERR_SYNTAX)
        i = self._msg(args[0])
        if i is not None:
            self.maildrop.deleted.add(i)
            self.reply(OK_DELE)

    do_DELE.states = (TRANSACTION,)  # type: ignore[attr-defined]

    def do_RSET(self, args: list[str]) -> None:
        self.maildrop.deleted.clear()
        self.reply(OK_RSET)

    do_RSET.states = (TRANSACTION,)  # type: ignore[attr-defined]

    def do_NOOP(self, args: list[str]) -> None:
        self.reply(OK_NOOP)

    do_NOOP.states = (TRANSACTION,)  # type: ignore[attr-defined]

    def do_RETR(self, args: list[str]) -> Any:
        if len(args) != 1:
            return self._error(ERR_SYNTAX)
        i = self._msg(args[0])
        if i is None:
            return None
        return self._send(i, None, b"+OK %d octets" % self.maildrop.messages[i].size)

    do_RETR.states = (TRANSACTION,)  # type: ignore[attr-defined]

    def do_TOP(self, args: list[str]) -> Any:
        if len(args) != 2:
            return self._error(ERR_SYNTAX)
        lines = _ascii_number(args[1])
        if lines is None:
            return self._error(ERR_LINE_COUNT)
        i = self._msg(args[0])
        if i is None:
            return None
        return self._send(i, lines, b"+OK Top of message follows")

    do_TOP.states = (TRANSACTION,)  # type: ignore[attr-defined]

    def _send(self, i: int, top: int | None, first: bytes) -> Any:
        drop = self.maildrop
        try:
            f = drop.folder.open(drop.messages[i].uid)
        except (StoreError, OSError):
            return self._error(ERR_GONE)
        producer = MessageProducer(self.transport, f, top, self.resetTimeout, first + b"\r\n")
        # the transport takes one producer: the message's (pull) producer replaces the session
        # while it streams, and the session takes over again when it is done
        self._unregister()
        self._streaming = producer
        return producer.start().addBoth(self._streamed)

    def _streamed(self, result: Any) -> Any:
        self._streaming = None
        if not self.closing and getattr(self.transport, "connected", True):
            self._register()
        return result

    # APOP and the survey's "joke" commands are not implemented: unknown command -> -ERR


class POP3Factory(protocol.ServerFactory):
    """``POP3Factory(settings, role, provider_store, authenticator, tls_context_factory, reactor=None)``.

    ``role`` is "pop3" (STLS offered) or "pop3s" (the listener wraps the connection in TLS).
    """

    protocol = POP3Server

    def __init__(self, settings: Any, role: str, provider_store: Any, authenticator: Any,
                 tls_context_factory: Any, reactor: Any = None) -> None:
        if role not in ("pop3", "pop3s"):
            raise ValueError(f"bad POP3 role {role!r}")
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.settings = settings
        self.role = role
        self.providers = provider_store
        self.authenticator = authenticator
        self.tls = tls_context_factory
        self.reactor = reactor
        #: open connections, shared by every POP3Factory of the same Settings (pop3 and pop3s)
        self.counts = shared_counts(settings, "pop3")

    def buildProtocol(self, addr: Any) -> POP3Server:
        p = POP3Server(self)
        p.factory = self
        return p

    @property
    def per_ip(self) -> dict[str, int]:
        return self.counts.per_ip

    def connection_opened(self, ip: str) -> bool:
        """Count a new connection from ``ip``; False (not counted) if it is over the limit."""
        return self.counts.admit(ip, self.settings.pop3.max_connections_per_ip) is None

    def connection_closed(self, ip: str) -> None:
        self.counts.release(ip)

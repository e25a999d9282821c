"""IMAP4rev1 server protocol and factory (RFC 3501 plus LITERAL+, SASL-IR, ID, ENABLE, IDLE, ...).

One job: the connection — reading commands (bounded lines and literals, :mod:`reader`),
the session states of RFC 3501 §3, STARTTLS (§6.2.1, discarding pipelined plaintext), login
(LOGIN, AUTHENTICATE PLAIN with SASL-IR, RFC 4959), IDLE (RFC 2177: only ``DONE`` ends it),
timeouts and per-IP connection limits.  Mailbox commands live in :mod:`mailboxes` and
:mod:`messages`; the view a session has of its selected mailbox in :mod:`session`.  Written fresh on
``twisted.internet.protocol.Protocol`` instead of ``twisted.mail.imap4.IMAP4Server``: see
docs/imap.md for why.
"""

from __future__ import annotations

import base64
import binascii
import socket
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from tmmail import sendnow
from tmmail.connlimit import shared_counts
from tmmail.imap import responses as R
from tmmail.imap.encoding import Atom, ParseError, tokenize
from tmmail.imap.mailboxes import MailboxCommands, MailboxNameError
from tmmail.imap.messages import MessageCommands
from tmmail.imap.reader import (
    Command,
    CommandReader,
    Line,
    LiteralTooBig,
    NeedContinuation,
    TooLong,
)

NOT_AUTH, AUTH, SELECTED, LOGOUT = "not-authenticated", "authenticated", "selected", "logout"
_ANY = (NOT_AUTH, AUTH, SELECTED)
_AUTHED = (AUTH, SELECTED)

#: pause reading from a client that sends faster than we answer
_MAX_BUFFERED = 256 * 1024
#: consecutive BAD commands before the connection is closed
_MAX_ERRORS = 50
#: seconds a closing connection may take to flush before it is aborted (a client not reading)
_CLOSE_GRACE = 30.0
#: RFC 3501 tag = 1*<any ASTRING-CHAR except "+">; ASTRING-CHAR includes resp-specials "]"
_TAG_BAD = frozenset(b'(){ %*"\\+')

#: Linux's TCP_QUICKACK (12); the socket module defines it only on Linux
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)


def _valid_tag(tag: bytes) -> bool:
    return bool(tag) and len(tag) <= 64 and all(0x20 < b < 0x7F and b not in _TAG_BAD for b in tag)


@implementer(IPushProducer)
class IMAPServer(MailboxCommands, MessageCommands, protocol.Protocol, TimeoutMixin):
    """One client connection.

    Also the transport's streaming producer: while the client does not read what we write
    (the transport's buffer is full), no further command is handled and, once its input
    piles up, reading stops too -- a client that pipelines without reading cannot make the
    server hold unbounded output."""

    log = Logger()

    def __init__(self, factory: "IMAPFactory") -> None:
        self.factory = factory
        self.settings = factory.settings.imap
        self.callLater = factory.reactor.callLater  # TimeoutMixin: the injected reactor's clock
        self.state = NOT_AUTH
        self.secure = factory.role == "imaps"
        self.peer = "?"
        self.login: str | None = None
        self.entry: Any = None  # the AuthEntry of the login
        self.account: Any = None  # the login's tmmail.store.Store
        self.selected: Any = None  # tmmail.imap.session.SelectedMailbox
        #: CONDSTORE (RFC 7162) enabled for this session (ENABLE or a CONDSTORE enabling command)
        self.condstore = False
        #: QRESYNC (RFC 7162 §3.2) enabled: VANISHED instead of EXPUNGE, SELECT (QRESYNC ...)
        self.qresync = False
        self._poll: Any = None
        self.reader = CommandReader(self.settings.max_line_length, self._literal_limit)
        self._out: list[bytes] = []
        self._busy = False  # a command is waiting for a Deferred
        self._pumping = False
        self._paused = False
        self._errors = 0
        self._idle_tag: bytes | None = None
        self._idle_done: defer.Deferred | None = None
        self._sasl: tuple[bytes, Callable[[bytes], Any]] | None = None
        self._closing = False
        self._counted = False
        self._producing = False  # registered as the transport's producer
        self._pause_writes = False  # the transport's write buffer is full
        self._on_writable: Callable[[], None] | None = None  # a stream waiting for it to drain
        self._abort_call: Any = None

    # -- connection ------------------------------------------------------------------------
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", "?")
        if not self.factory.connection_opened(self.peer):
            self.log.warn("IMAP connection refused from {peer}: too many connections", peer=self.peer)
            self.transport.write(R.BYE_TOO_MANY)
            self.close_connection()
            return
        self._counted = True
        self.factory.protocols.add(self)
        self.transport.registerProducer(self, True)
        self._producing = True
        self.setTimeout(self.settings.idle_timeout_unauthenticated)
        self.transport.write(b"* OK [CAPABILITY %s] %s\r\n" % (self.capabilities(), R.GREETING))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.setTimeout(None)
        self._closing = True
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        if self._counted:
            self._counted = False
            self.factory.connection_closed(self.peer)
            self.factory.protocols.discard(self)
        if self._idle_done is not None:
            self._idle_tag = None
        self.close_mailbox()
        self.account = None

    def timeoutConnection(self) -> None:
        self.log.info("IMAP idle timeout for {peer} ({login})", peer=self.peer, login=self.login)
        self.flush()
        self.transport.write(R.BYE_TIMEOUT)
        self.close_connection()

    def close_connection(self) -> None:
        """Close after what was written is flushed; abort if the client does not read it."""
        self._closing = True
        t = self.transport
        if t is None:
            return
        if self._producing:
            self._producing = False
            t.unregisterProducer()  # or loseConnection waits for the producer forever
        if self._paused:
            self._paused = False
            t.resumeProducing()
        t.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.factory.reactor.callLater(_CLOSE_GRACE, self._abort_if_open)

    def _abort_if_open(self) -> None:
        self._abort_call = None
        t = self.transport
        if t is not None and getattr(t, "connected", False):
            t.abortConnection()

    # -- IPushProducer: the transport's write buffer ---------------------------------------
    def pauseProducing(self) -> None:
        self._pause_writes = True

    def resumeProducing(self) -> None:
        self._pause_writes = False
        waiter, self._on_writable = self._on_writable, None
        if waiter is not None:
            waiter()
        if not self._closing and self.transport is not None:
            self.pump()

    def stopProducing(self) -> None:
        self._closing = True
        waiter, self._on_writable = self._on_writable, None
        if waiter is not None:
            waiter()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self.reader.feed(data)
        self.pump()

    # -- output ----------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue response bytes; :meth:`flush` writes them in one transport write."""
        self._out.append(data)

    def untagged(self, text: bytes) -> None:
        self._out.append(b"* " + text + b"\r\n")

    def tagged(self, tag: bytes, text: bytes) -> None:
        self._out.append(tag + b" " + text + b"\r\n")

    def flush(self) -> None:
        if self._out and self.transport is not None:
            data = b"".join(self._out)
            self._out = []
            # one send(2) now instead of on the reactor's next turn (plain TCP, empty buffer)
            sendnow.write(self.transport, data)

    # -- command loop ----------------------------------------------------------------------
    def pump(self) -> None:
        """Handle buffered events until a command has to wait or more input is needed."""
        if self._pumping:
            return  # a command finished synchronously inside the loop below: it goes on
        self._pumping = True
        try:
            while not self._busy and not self._closing and not self._pause_writes:
                event = self.reader.next_event()
                if event is None:
                    break
                try:
                    self._event(event)
                except Exception:  # a bug must cost one command, never the connection
                    self.log.failure("IMAP event handling failed for {peer}", peer=self.peer)
                    self.send(b"* BAD [SERVERBUG] Internal server error\r\n")
                out = self._out
                if len(out) > 64 or (out and len(out[-1]) > 16384):
                    # hand big answers to the transport now: a full buffer pauses this loop
                    # (pauseProducing) before the next pipelined command is answered
                    self.flush()
        finally:
            self._pumping = False
            self.flush()
        if self._closing or self.transport is None:
            return
        # Input that cannot be handled yet (a command is waiting for a thread or a Deferred)
        # stops reading from the socket; a literal being received is never the reason, or a
        # large APPEND would wait for itself.
        waiting = self._busy or self._pause_writes
        if waiting and self.reader.pending > _MAX_BUFFERED and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and (not waiting or self.reader.pending <= _MAX_BUFFERED):
            self._paused = False
            self.transport.resumeProducing()
        if not self._busy and self.reader.buffered:
            self._quickack()  # waiting for the rest of a command (a literal, its final CRLF)

    def _event(self, event: Any) -> None:
        if isinstance(event, Line):
            if self._idle_tag is not None:
                self._idle_line(event.data)
            elif self._sasl is not None:
                tag, cont = self._sasl
                self._sasl = None
                self.reader.raw_lines = False
                self._run(tag, b"AUTHENTICATE", lambda: cont(event.data))
            return
        if isinstance(event, NeedContinuation):
            self.send(R.CONTINUE_READY)
            return
        if isinstance(event, TooLong):
            if self._idle_tag is not None:
                self._bad(None, b"* BAD [TOOBIG] Line too long, expected DONE\r\n")
            elif self._sasl is not None:  # the response to "+ " was too long: abort the exchange
                tag = self._sasl[0]
                self._sasl = None
                self.reader.raw_lines = False
                self._bad(tag, R.BAD_AUTH_DATA)
            else:
                self._bad(event.tag or b"*", R.BAD_TOO_LONG)
            return
        if isinstance(event, LiteralTooBig):
            tag = event.tag if _valid_tag(event.tag) else b"*"
            self.tagged(tag, R.NO_TOO_BIG)
            return
        assert isinstance(event, Command)
        self._command(event.data)

    def _quickack(self) -> None:
        """ACK what was received at once (Linux TCP_QUICKACK) while a command is incomplete.

        Clients often send a literal and the CRLF that ends the command in two writes (imaplib's
        APPEND, many libraries); with Nagle on their side the CRLF waits until the literal is
        ACKed, and the kernel delays that ACK by ~40 ms in an interactive connection (the server
        has nothing to send yet to piggyback it on).  strace showed the CRLF of every such
        APPEND arriving 42 ms after the literal (bench/imap_load.py: APPEND 67 ms, Dovecot 6 ms).
        Setting TCP_QUICKACK sends the pending ACK now; it costs one setsockopt per read, and
        only while a command is incomplete."""
        t = self.transport
        while t is not None:
            sock = getattr(t, "socket", None)
            if sock is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                except (OSError, AttributeError):
                    pass
                return
            t = getattr(t, "transport", None)

    def _bad(self, tag: bytes | None, text: bytes) -> None:
        """A BAD (``tag`` None: ``text`` is a whole untagged line); after _MAX_ERRORS of them
        in a row (invalid tags and IDLE garbage included) the connection is closed."""
        if tag is None:
            self.send(text)
        else:
            self.tagged(tag, text)
        self._errors += 1
        if self._errors >= _MAX_ERRORS:
            self.send(R.BYE_TOO_MANY_ERRORS)
            self.flush()
            self.close_connection()

    def _command(self, data: bytes) -> None:
        tag, _, rest = data.partition(b" ")
        if not data.strip():
            return  # tolerate empty lines
        if not _valid_tag(tag):
            self._bad(None, R.BAD_INVALID_TAG)
            return
        if not rest:
            self._bad(tag, R.BAD_SYNTAX % b"Missing command")
            return
        try:
            tokens = tokenize(rest)
        except ParseError as e:
            self._bad(tag, R.BAD_SYNTAX % str(e).encode())
            return
        if not tokens or not isinstance(tokens[0], Atom):
            self._bad(tag, R.BAD_SYNTAX % b"Missing command")
            return
        name = tokens[0].upper()
        args = tokens[1:]
        if name == b"UID":
            if not args or not isinstance(args[0], Atom):
                self._bad(tag, R.BAD_SYNTAX % b"UID needs a command")
                return
            name = b"UID " + args[0].upper()
            args = args[1:]
        entry = self.COMMANDS.get(name)
        if entry is None:
            self._bad(tag, R.BAD_UNKNOWN)
            return
        method, states = entry
        if self.state not in states:
            if self.state == NOT_AUTH:
                self._bad(tag, R.BAD_STATE_NOAUTH)
            elif self.state == SELECTED or NOT_AUTH in states:
                self._bad(tag, R.BAD_STATE_AUTH)
            else:
                self._bad(tag, R.BAD_STATE_SELECTED)
            return
        self._run(tag, name, lambda: getattr(self, method)(tag, args))

    def _run(self, tag: bytes, name: bytes, call: Callable[[], Any]) -> None:
        """Run a handler; a Deferred result holds later commands until it fires."""
        try:
            result = call()
        except MailboxNameError as e:
            self.tagged(tag, b"NO [CANNOT] " + str(e).encode("utf-8", "replace"))
            return
        except ParseError as e:
            self._bad(tag, R.BAD_SYNTAX % str(e).encode())
            return
        except RecursionError:  # absurdly nested lists or NOT/OR chains
            self._bad(tag, R.BAD_TOO_DEEP)
            return
        except Exception:
            self.log.failure("IMAP command {command} failed for {login}", command=name, login=self.login)
            self.tagged(tag, R.NO_SERVERBUG)
            return
        self._errors = 0
        if isinstance(result, defer.Deferred):
            # IDLE keeps reading lines (DONE must reach it); every other command holds the queue
            self._busy = self._idle_tag is None

            def failed(f: Failure) -> None:
                if f.check(MailboxNameError):
                    self.tagged(tag, b"NO [CANNOT] " + str(f.value).encode("utf-8", "replace"))
                    return
                if f.check(ParseError):
                    self._bad(tag, R.BAD_SYNTAX % str(f.value).encode())
                    return
                if f.check(RecursionError):
                    self._bad(tag, R.BAD_TOO_DEEP)
                    return
                self.log.failure("IMAP command {command} failed for {login}", f, command=name,
                                 login=self.login)
                self.tagged(tag, R.NO_SERVERBUG)

            def done(_: Any) -> None:
                self._busy = False
                if self.transport is not None and not self._closing:
                    self.pump()

            result.addErrback(failed)
            result.addBoth(done)

    # -- capabilities ----------------------------------------------------------------------
    def capabilities(self) -> bytes:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID", b"ENABLE", b"IDLE", b"NAMESPACE",
                b"UIDPLUS", b"MOVE", b"UNSELECT", b"CHILDREN", b"LIST-EXTENDED", b"LIST-STATUS",
                b"SPECIAL-USE", b"QUOTA", b"CONDSTORE", b"QRESYNC",
                b"APPENDLIMIT=%d" % self.settings.max_literal_size]
        if self.state == NOT_AUTH:
            if not self.secure and self.factory.tls is not None:
                caps.append(b"STARTTLS")
            if self.plaintext_allowed():
                caps.append(b"AUTH=PLAIN")
            else:
                caps.append(b"LOGINDISABLED")
        return b" ".join(caps)

    def plaintext_allowed(self) -> bool:
        return self.secure or self.settings.allow_plaintext_auth

    # -- any state -------------------------------------------------------------------------
    def do_CAPABILITY(self, tag: bytes, args: list) -> None:
        self.untagged(b"CAPABILITY " + self.capabilities())
        self.tagged(tag, R.OK_COMPLETED % b"CAPABILITY")

    def do_NOOP(self, tag: bytes, args: list) -> Any:
        return self.with_updates(tag, b"NOOP", expunges=True, force=True)

    def do_LOGOUT(self, tag: bytes, args: list) -> None:
        self.send(R.BYE_LOGOUT)
        self.tagged(tag, R.OK_COMPLETED % b"LOGOUT")
        self.state = LOGOUT
        self.flush()
        self.close_connection()

    def do_ID(self, tag: bytes, args: list) -> None:
        """RFC 2971: log what the client says about itself; answer with our name."""
        if len(args) != 1 or not (isinstance(args[0], list) or args[0].upper() == b"NIL"):
            raise ParseError("ID expects a parenthesised list or NIL")
        if isinstance(args[0], list):
            fields = args[0]
            # id-params-list = "(" *(string SP nstring) ")": at most 30 pairs (§3.3)
            if len(fields) % 2 or len(fields) > 60:
                raise ParseError("ID list must hold field/value pairs")
            if any(isinstance(f, list) or isinstance(f, Atom) for f in fields[::2]) or \
                    any(isinstance(v, list) or (isinstance(v, Atom) and v.upper() != b"NIL")
                        for v in fields[1::2]):
                raise ParseError("ID fields must be strings and values strings or NIL")
            info = {bytes(fields[i]).decode("utf-8", "replace")[:30]:
                    bytes(fields[i + 1]).decode("utf-8", "replace")[:100]
                    for i in range(0, len(fields), 2)}
            self.log.info("IMAP client {peer} ID {info}", peer=self.peer, info=info)
        self.untagged(b'ID ("name" "TMmail" "vendor" "TMmail")')
        self.tagged(tag, R.OK_COMPLETED % b"ID")

    # -- not authenticated -----------------------------------------------------------------
    def do_STARTTLS(self, tag: bytes, args: list) -> None:
        if self.secure:
            self._bad(tag, R.NO_TLS_ACTIVE)
            return
        if self.factory.tls is None:
            self.tagged(tag, R.NO_TLS_UNAVAILABLE)
            return
        self.tagged(tag, R.OK_BEGIN_TLS)
        self.flush()
        dropped = self.reader.discard_buffer()
        if dropped:
            self.log.warn("IMAP STARTTLS from {peer}: discarded {n} bytes of pipelined plaintext",
                          peer=self.peer, n=dropped)
        self.transport.startTLS(self.factory.tls)
        self.secure = True

    def do_LOGIN(self, tag: bytes, args: list) -> Any:
        if len(args) != 2 or any(isinstance(a, list) for a in args):
            raise ParseError("LOGIN expects a user name and a password")
        if not self.plaintext_allowed():
            self.tagged(tag, R.NO_LOGIN_DISABLED)
            return None
        return self._authenticate(tag, bytes(args[0]), bytes(args[1]), b"LOGIN")

    def do_AUTHENTICATE(self, tag: bytes, args: list) -> Any:
        if not args or isinstance(args[0], list) or len(args) > 2:
            raise ParseError("AUTHENTICATE expects a mechanism and an optional initial response")
        mechanism = args[0].upper()
        if mechanism != b"PLAIN":
            self.tagged(tag, R.NO_MECHANISM)
            return None
        if not self.plaintext_allowed():
            self.tagged(tag, R.NO_LOGIN_DISABLED)
            return None
        if len(args) == 2:  # SASL-IR, RFC 4959: "=" is an empty initial response
            return self._sasl_plain(tag, bytes(args[1]))
        self.send(b"+ \r\n")
        self._sasl = (tag, lambda line: self._sasl_plain(tag, line))
        self.reader.raw_lines = True
        return None

    def _sasl_plain(self, tag: bytes, response: bytes) -> Any:
        response = response.strip()
        if response == b"*":
            self._bad(tag, R.BAD_AUTH_CANCELLED)
            return None
        try:
            raw = b"" if response == b"=" else base64.b64decode(response, validate=True)
            authzid, authcid, password = raw.split(b"\0")
        except (binascii.Error, ValueError):
            self._bad(tag, R.BAD_AUTH_DATA)
            return None
        if authzid and authzid.lower() != authcid.lower():  # no proxy logins; logins ignore case
            self.tagged(tag, R.NO_AUTH_FAILED)
            return None
        return self._authenticate(tag, authcid, password, b"AUTHENTICATE")

    def _authenticate(self, tag: bytes, login_b: bytes, password_b: bytes, name: bytes) -> Any:
        login = login_b.decode("utf-8", "replace")
        password = password_b.decode("utf-8", "replace")
        d = defer.maybeDeferred(self.factory.authenticator.authenticate, login, password, self.peer)

        def ok(entry: Any) -> Any:
            d2 = defer.maybeDeferred(self.factory.open_account, entry)
            d2.addCallback(opened, entry)
            return d2

        def opened(account: Any, entry: Any) -> None:
            if self._closing:
                return
            self.account = account
            self.entry = entry
            self.login = entry.login
            self.state = AUTH
            self.setTimeout(self.settings.idle_timeout_authenticated)
            self.log.info("IMAP login {login} from {peer}", login=entry.login, peer=self.peer)
            self.tagged(tag, b"OK [CAPABILITY %s] Logged in" % self.capabilities())

        def failed(f: Failure) -> None:
            kind = type(f.value).__name__
            if kind == "LoginFailed":
                self.tagged(tag, R.NO_AUTH_FAILED)
            elif kind == "LoginBlocked":
                self.tagged(tag, R.NO_AUTH_BLOCKED)
            else:
                self.log.failure("IMAP login of {login} failed", f, login=login)
                self.tagged(tag, R.NO_AUTH_UNAVAILABLE)

        d.addCallbacks(ok, failed)
        return d

    # -- IDLE (RFC 2177) -------------------------------------------------------------------
    def do_IDLE(self, tag: bytes, args: list) -> defer.Deferred:
        if args:
            raise ParseError("IDLE takes no arguments")
        self.send(R.CONTINUE_IDLE)
        self._idle_tag = tag
        self._idle_done = defer.Deferred()
        self.reader.raw_lines = True
        self.push_updates()
        self._start_idle_poll()
        d = self._idle_done

        def finished(_: Any) -> None:
            self._stop_idle_poll()
            self._idle_tag = None
            self._idle_done = None
            self.reader.raw_lines = False
            self.sync_updates(True, force=True)
            self.tagged(tag, R.OK_COMPLETED % b"IDLE")

        d.addCallback(finished)
        return d

    def _idle_line(self, line: bytes) -> None:
        if line.strip().upper() == b"DONE":
            d = self._idle_done
            if d is not None:
                d.callback(None)
        else:
            self._bad(None, b"* BAD Expected DONE\r\n")

    @property
    def idling(self) -> bool:
        return self._idle_tag is not None

    # -- limits ----------------------------------------------------------------------------
    def _literal_limit(self, head: bytes, received: int) -> int:
        """Largest literal accepted next in a command (first line ``head``, ``received``
        octets so far): only APPEND after login may carry a message (one: no MULTIAPPEND);
        everything else, and anything before login, shares the line limit (RFC 7888 §4), so
        an unauthenticated client cannot make the server buffer megabytes."""
        line = self.settings.max_line_length
        parts = head.split(None, 2)
        if (len(parts) > 1 and parts[1].upper() == b"APPEND" and self.state in _AUTHED):
            size = self.settings.max_literal_size
            return max(0, min(size, size + line - received))
        return max(0, line - received)

    # -- state table -----------------------------------------------------------------------
    COMMANDS: dict[bytes, tuple[str, tuple[str, ...]]] = {
        b"CAPABILITY": ("do_CAPABILITY", _ANY),
        b"NOOP": ("do_NOOP", _ANY),
        b"LOGOUT": ("do_LOGOUT", _ANY),
        b"ID": ("do_ID", _ANY),
        b"STARTTLS": ("do_STARTTLS", (NOT_AUTH,)),
        b"LOGIN": ("do_LOGIN", (NOT_AUTH,)),
        b"AUTHENTICATE": ("do_AUTHENTICATE", (NOT_AUTH,)),
        b"ENABLE": ("do_ENABLE", _AUTHED),
        b"IDLE": ("do_IDLE", _AUTHED),
        b"SELECT": ("do_SELECT", _AUTHED),
        b"EXAMINE": ("do_EXAMINE", _AUTHED),
        b"CREATE": ("do_CREATE", _AUTHED),
        b"DELETE": ("do_DELETE", _AUTHED),
        b"RENAME": ("do_RENAME", _AUTHED),
        b"SUBSCRIBE": ("do_SUBSCRIBE", _AUTHED),
        b"UNSUBSCRIBE": ("do_UNSUBSCRIBE", _AUTHED),
        b"LIST": ("do_LIST", _AUTHED),
        b"LSUB": ("do_LSUB", _AUTHED),
        b"STATUS": ("do_STATUS", _AUTHED),
        b"APPEND": ("do_APPEND", _AUTHED),
        b"NAMESPACE": ("do_NAMESPACE", _AUTHED),
        b"GETQUOTAROOT": ("do_GETQUOTAROOT", _AUTHED),
        b"GETQUOTA": ("do_GETQUOTA", _AUTHED),
        b"SETQUOTA": ("do_SETQUOTA", _AUTHED),
        b"CHECK": ("do_CHECK", (SELECTED,)),
        b"CLOSE": ("do_CLOSE", (SELECTED,)),
        b"UNSELECT": ("do_UNSELECT", (SELECTED,)),
        b"EXPUNGE": ("do_EXPUNGE", (SELECTED,)),
        b"SEARCH": ("do_SEARCH", (SELECTED,)),
        b"FETCH": ("do_FETCH", (SELECTED,)),
        b"STORE": ("do_STORE", (SELECTED,)),
        b"COPY": ("do_COPY", (SELECTED,)),
        b"MOVE": ("do_MOVE", (SELECTED,)),
        b"UID SEARCH": ("do_UID_SEARCH", (SELECTED,)),
        b"UID FETCH": ("do_UID_FETCH", (SELECTED,)),
        b"UID STORE": ("do_UID_STORE", (SELECTED,)),
        b"UID COPY": ("do_UID_COPY", (SELECTED,)),
        b"UID MOVE": ("do_UID_MOVE", (SELECTED,)),
        b"UID EXPUNGE": ("do_UID_EXPUNGE", (SELECTED,)),
    }


class IMAPFactory(protocol.Factory):
    """Builds IMAPServer connections for one listener role ("imap": STARTTLS; "imaps": implicit TLS).

    ``tls_context_factory`` is used for STARTTLS on "imap" (None: no STARTTLS offered); for
    "imaps" the listener itself wraps the connection in TLS (tmmail.tap.listener_service).
    """

    protocol = IMAPServer  # type: ignore[assignment]

    def __init__(self, settings: Any, role: str, provider_store: Any, authenticator: Any,
                 tls_context_factory: Any, reactor: Any = None) -> None:
        if role not in ("imap", "imaps"):
            raise ValueError(f"IMAP role must be 'imap' or 'imaps', not {role!r}")
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.settings = settings
        self.role = role
        self.provider_store = provider_store
        self.authenticator = authenticator
        self.tls = tls_context_factory
        self.reactor = reactor
        self.protocols: set[IMAPServer] = set()
        #: open connections, shared with the other IMAP listener (imap and imaps) of the server
        self.counts = shared_counts(settings, "imap")

    def buildProtocol(self, addr: Any) -> IMAPServer:
        p = IMAPServer(self)
        p.factory = self
        return p

    def connection_opened(self, ip: str) -> bool:
        """Count a connection from ``ip``; False (not counted) if it is over the limit."""
        return self.counts.admit(ip, self.settings.imap.max_connections_per_ip) is None

    def connection_closed(self, ip: str) -> None:
        self.counts.release(ip)

    def open_account(self, entry: Any) -> Any:
        """Deferred Store of the mailbox of a successful login (created if missing)."""
        from twisted.internet import threads

        from tmmail.imap.account import open_store

        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         open_store, self.settings, entry)

    def doStop(self) -> None:
        for p in list(self.protocols):
            if p.transport is not None:
                p.transport.write(R.BYE_SHUTDOWN)
                p.close_connection()
        super().doStop()


__all__ = ["IMAPFactory", "IMAPServer"]

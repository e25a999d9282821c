"""One ESMTP connection: a bounded line splitter and the RFC 5321 state machine.

Built on ``Protocol`` with its own buffer (not ``LineOnlyReceiver``, whose buffer grows
without bound).  Input is handled strictly one command at a time: while a reply depends on
a Deferred (a recipient check, AUTH, the spool commit) further input waits in the buffer,
and the transport is paused when that buffer is full, so pipelined replies (RFC 2920) come
out in order and message bodies never run as commands.

Extensions: SIZE (RFC 1870), 8BITMIME (RFC 6152), PIPELINING (RFC 2920),
ENHANCEDSTATUSCODES (RFC 2034), SMTPUTF8 (RFC 6531), DSN (RFC 3461), CHUNKING (RFC 3030),
STARTTLS (RFC 3207), AUTH PLAIN/LOGIN with initial response (RFC 4954, RFC 4616).
The reply ``250 ... queued as ID`` is sent only after the message and its envelope are
durably in the spool (the commit runs in a thread; RFC 5321 §6.1).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tmmail import policy, sendnow
from tmmail import smtpreplies as R
from tmmail.smtpauth import AuthCommands
from tmmail.smtptransaction import Transaction, TransactionCommands

log = Logger(namespace="tmmail.smtpserver")

#: bytes discarded from a command line that never ends before the connection is closed
_MAX_DISCARD = 1024 * 1024
#: an error left the session in a state it cannot continue from (RFC 5321 §4.2.5 4.3.0)
S421_INTERNAL = "421 4.3.0 {host} Internal server error, closing connection"
#: verbs that do not count as "commands before MAIL"
_TRANSACTION_VERBS = frozenset(("MAIL", "RCPT", "DATA", "BDAT", "QUIT"))


def _helo_name(text: str) -> str:
    """The HELO/EHLO argument as it may appear in a Received: header: printable ASCII, no
    parentheses or semicolons (which would change the header's structure), at most 255."""
    word = text.split(" ", 1)[0][:255]
    return "".join(c if 33 <= ord(c) <= 126 and c not in "();" else "?" for c in word)


@implementer(IPushProducer)
class SMTPSession(TransactionCommands, AuthCommands, Protocol):
    """The ESMTP server side of one connection; see the module docstring."""

    factory: Any

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.smtp = factory.smtp
        self.reactor = factory.reactor
        self.role = factory.role
        self.client_ip = ""
        self.tls = factory.role == "smtps"
        self.helo: str | None = None
        self.esmtp = False
        self.auth: Any = None
        self.tx: Transaction | None = None
        self.messages = 0
        self.errors = 0
        self.idle_commands = 0
        self.closing = False
        self._buf = bytearray()
        self._mode = "command"  # command | data | bdat | auth
        self._busy = False
        self._in_process = False
        # input is not handled while a reply waits for a Deferred or while the client does not
        # read our replies (we are the transport's push producer); if input piles up meanwhile,
        # reading from the socket stops, so neither buffer grows without bound
        self._pause_writes = False
        self._reading_paused = False
        self._discarding = 0  # >0: discarding the rest of an over-long command line
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_size = 0
        self._bdat_error: str | None = None
        self._sasl: tuple[str, str] | None = None  # (mechanism, step)
        self._counted = False
        self._idle_call: Any = None
        self._session_call: Any = None
        self._abort_call: Any = None

    # -- connection ----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.factory.hostname

    @property
    def sender_domain(self) -> str:
        return self.tx.sender_domain if self.tx is not None else ""

    def connectionMade(self) -> None:
        self.client_ip = _client_ip(self.transport)
        over = self.factory.admit(self.client_ip)
        if over is not None:
            log.warn("connection from {client_ip} refused: too many connections ({limit})",
                     client_ip=self.client_ip, limit=over)
            reply = R.S421_TOO_MANY_CONNECTIONS if over == "total" else R.S421_TOO_MANY_FROM_IP
            self._close(reply.format(host=self.host))
            return
        self._counted = True
        self.transport.registerProducer(self, True)
        self._idle_call = self.reactor.callLater(self.smtp.idle_timeout, self._timeout, R.S421_IDLE_TIMEOUT)
        self._session_call = self.reactor.callLater(
            self.smtp.session_timeout, self._timeout, R.S421_SESSION_TIMEOUT
        )
        try:
            verdict = policy.check_connection(self.factory.store.current(), self.client_ip)
        except Exception:
            log.failure("connection check failed for {client_ip}", client_ip=self.client_ip)
            self._close(R.S421_SHUTDOWN.format(host=self.host))
            return
        if not verdict.ok:
            log.info("connection from {client_ip} refused: {reason}", client_ip=self.client_ip,
                     reason=verdict.reason)
            self._close(verdict.reply)
            return
        self._reply(R.S220_GREETING.format(host=self.host))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closing = True
        for call in (self._idle_call, self._session_call, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        if self._counted:
            self._counted = False
            self.factory.release(self.client_ip)
        if self.tx is not None and not self._busy:
            self.tx.abort()
            self.tx = None

    def _timeout(self, reply: str) -> None:
        log.info("closing connection from {client_ip}: {reply}", client_ip=self.client_ip, reply=reply)
        self._close(reply.format(host=self.host))

    def _close(self, reply: str | None) -> None:
        if self.closing:
            return
        if reply:
            self.transport.write(reply.encode("utf-8") + b"\r\n")
        self.closing = True
        del self._buf[:]
        if self.tx is not None and not self._busy:
            self.tx.abort()
            self.tx = None
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        if self._counted:
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        # a client that does not read would keep the connection (and our buffer) forever
        self._abort_call = self.reactor.callLater(self.factory.close_grace, self.transport.abortConnection)

    def _send(self, data: bytes) -> None:
        """Replies go out at once (tmmail.sendnow) unless more pipelined commands are waiting
        in the input buffer: then the reactor sends the replies of the batch together."""
        if self._buf:
            self.transport.write(data)
        else:
            sendnow.write(self.transport, data)

    def _reply(self, line: str) -> None:
        if self.closing:
            return
        self._send(line.encode("utf-8") + b"\r\n")
        code = line[:3]
        if code[:1] in ("4", "5") and code != "421":
            self.errors += 1
            if self.smtp.max_errors and self.errors > self.smtp.max_errors:
                log.info("closing connection from {client_ip}: too many errors", client_ip=self.client_ip)
                self._close(R.S421_TOO_MANY_ERRORS.format(host=self.host))

    def _reply_lines(self, lines: list[str]) -> None:
        if self.closing:
            return
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{line[:3]}{sep}{line[4:]}".encode("utf-8") + b"\r\n")
        self._send(b"".join(out))

    # -- input ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.smtp.idle_timeout)
        self._buf += data
        limit = max(64 * 1024, 4 * self.smtp.max_command_length)
        if (self._busy or self._pause_writes) and len(self._buf) > limit and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        self._process()

    def _process(self) -> None:
        if self._in_process:
            return
        self._in_process = True
        try:
            while not self._busy and not self._pause_writes and not self.closing:
                try:
                    if self._mode == "data":
                        progressed = self._step_data()
                    elif self._mode == "bdat":
                        progressed = self._step_bdat()
                    else:
                        progressed = self._step_line()
                except Exception:
                    # an exception escaping to Twisted would drop the connection without a
                    # word; mid-content we no longer know where the data ends, so say 421
                    log.failure("error reading input from {client_ip} ({mode} mode)",
                                client_ip=self.client_ip, mode=self._mode)
                    self._close(S421_INTERNAL.format(host=self.host))
                    break
                if not progressed:
                    break
        finally:
            self._in_process = False
        if self._reading_paused and not self._busy and not self._pause_writes and not self.closing:
            self._reading_paused = False
            self.transport.resumeProducing()

    # IPushProducer: the transport's write buffer is full / drained again.  Only command
    # handling stops here; reading stops only if input then piles up (see dataReceived), so a
    # TLS layer that pauses its producer during the handshake still gets the handshake bytes.
    def pauseProducing(self) -> None:
        self._pause_writes = True

    def resumeProducing(self) -> None:
        self._pause_writes = False
        if not self.closing:
            self._process()

    def stopProducing(self) -> None:
        pass

    def _step_line(self) -> bool:
        """One command (or SASL response) line; strict CRLF, bounded length."""
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            if self._discarding:
                self._discarding += len(buf)
                del buf[:]
                if self._discarding > _MAX_DISCARD:
                    self._close(R.S421_LINE_NEVER_ENDS.format(host=self.host))
            elif len(buf) > self.smtp.max_command_length:
                self._discarding = len(buf)
                del buf[:]
                self._line_too_long()
            return False
        line = bytes(buf[: nl + 1])
        del buf[: nl + 1]
        if self._discarding:
            self._discarding = 0
            return True
        if len(line) > self.smtp.max_command_length:
            self._line_too_long()
            return True
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            self._sasl = None
            self._mode = "command"
            self._reply(R.S500_BARE_NEWLINE_COMMAND)
            return True
        content = line[:-2]
        if self._mode == "auth":
            self._dispatch(self._sasl_response, content)
        else:
            self._dispatch(self._command, content)
        return True

    def _line_too_long(self) -> None:
        if self._mode == "auth":
            self._mode = "command"
            self._sasl = None
        self._reply(R.S500_LINE_TOO_LONG)

    def _dispatch(self, handler: Any, arg: Any) -> None:
        """Run a handler; it returns a reply, None, or a Deferred of either.  Always replies."""
        try:
            result = handler(arg)
        except Exception:
            log.failure("error handling a command from {client_ip}", client_ip=self.client_ip)
            self._drop_broken_message()
            self._reply(R.S451_INTERNAL)
            return
        if isinstance(result, defer.Deferred):
            self._wait(result)
        elif result is not None:
            self._reply(result)

    def _wait(self, d: defer.Deferred[Any]) -> None:
        self._busy = True

        def done(result: Any) -> None:
            if isinstance(result, str):
                self._reply(result)
            elif isinstance(result, list):
                self._reply_lines(result)

        def failed(f: Failure) -> None:
            log.failure("error completing a command from {client_ip}", f, client_ip=self.client_ip)
            self._drop_broken_message()
            self._reply(R.S451_INTERNAL)

        def unbusy(_: Any) -> None:
            self._busy = False
            if self.closing and self.tx is not None:
                # the connection went while we waited: connectionLost left the transaction
                # to us, and its spool file and rate-limit reservation must not leak
                self.tx.abort()
                self.tx = None
            self._process()

        d.addCallbacks(done, failed)
        d.addErrback(lambda f: log.failure("reply failed", f))
        d.addBoth(unbusy)

    def _drop_broken_message(self) -> None:
        """After an error at the end of a message, forget it: its spool file and rate-limit
        reservation go, and the client may start a new transaction (a 451 means "retry")."""
        if self.tx is not None and self.tx.writer is not None:
            self._reset_transaction()

    # -- commands ------------------------------------------------------------------------

    def _command(self, raw: bytes) -> Any:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return R.S500_BAD_UTF8
        verb, _, arg = text.partition(" ")
        # ASCII before upper(): "MA\u0131L" (dotless i), "\ufb06ARTTLS" (st ligature) or
        # "R\u017fET" (long s) upper-case to MAIL, STARTTLS, RSET, and must not run as them
        handler = getattr(self, "do_" + verb.upper(), None) if verb.isascii() and verb.isalpha() else None
        verb = verb.upper()
        if handler is None:
            return R.S500_UNKNOWN
        if self.tx is None and verb not in _TRANSACTION_VERBS:
            self.idle_commands += 1
            if self.smtp.max_commands_before_mail and self.idle_commands > self.smtp.max_commands_before_mail:
                self._close(R.S421_TOO_MANY_COMMANDS.format(host=self.host))
                return None
        return handler(arg.strip(" "))

    def _extensions(self) -> list[str]:
        ext = [
            "PIPELINING",
            f"SIZE {self.smtp.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "DSN",
            "CHUNKING",
        ]
        if self._starttls_available():
            ext.append("STARTTLS")
        if self._auth_available():
            ext.append("AUTH PLAIN LOGIN")
        ext.append("HELP")
        return ext

    def _starttls_available(self) -> bool:
        return self.factory.tls is not None and not self.tls

    def _auth_available(self) -> bool:
        return self.factory.authenticator is not None and (self.tls or self.smtp.allow_plaintext_auth)

    def _needs_tls_first(self) -> bool:
        """Submission needs STARTTLS before AUTH and MAIL (RFC 8314 §3.3, RFC 3207 §4)."""
        return not self.tls and not self.smtp.allow_plaintext_auth

    def do_EHLO(self, arg: str) -> Any:
        if not arg:
            return R.S501_SYNTAX.format(usage="EHLO hostname")
        self._reset_transaction()
        self.helo = _helo_name(arg)
        self.esmtp = True
        lines = [f"250 {self.host} Hello [{self.client_ip}]"] + ["250 " + e for e in self._extensions()]
        self._reply_lines(lines)
        return None

    def do_HELO(self, arg: str) -> Any:
        if not arg:
            return R.S501_SYNTAX.format(usage="HELO hostname")
        self._reset_transaction()
        self.helo = _helo_name(arg)
        self.esmtp = False
        return f"250 {self.host}"

    def do_NOOP(self, arg: str) -> Any:
        return R.S250_OK

    def do_RSET(self, arg: str) -> Any:
        if arg:
            return R.S501_SYNTAX.format(usage="RSET")
        self._reset_transaction()
        return R.S250_RESET

    def do_VRFY(self, arg: str) -> Any:
        if not arg:
            return R.S501_SYNTAX.format(usage="VRFY address")
        return R.S252_VRFY

    def do_EXPN(self, arg: str) -> Any:
        return R.S502_NOT_IMPLEMENTED

    def do_HELP(self, arg: str) -> Any:
        """The commands this session can use now: STARTTLS only before TLS (and if offered),
        AUTH only where EHLO would advertise it and not once logged in -- a client (or a
        scanner) must not be told about a command that would only be refused."""
        commands = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "VRFY", "HELP", "QUIT"]
        if self._starttls_available():
            commands.append("STARTTLS")
        if self._auth_available() and self.auth is None:
            commands.append("AUTH")
        return "214 2.0.0 Commands: " + " ".join(commands)

    def _reset_transaction(self) -> None:
        if self.tx is not None:
            self.tx.abort()
            self.tx = None

    def do_QUIT(self, arg: str) -> Any:
        self._close(R.S221_BYE)
        return None

    def do_STARTTLS(self, arg: str) -> Any:
        if self.tls:
            return R.S503_ALREADY_TLS
        if self.factory.tls is None:
            return R.S454_TLS_UNAVAILABLE
        if arg:
            return R.S501_SYNTAX.format(usage="STARTTLS")
        if self._buf:
            # RFC 3207 §5 / CVE-2011-0411: nothing sent before the handshake may count
            log.warn("discarding {n} bytes pipelined after STARTTLS from {client_ip}",
                     n=len(self._buf), client_ip=self.client_ip)
            del self._buf[:]
        self._reply(R.S220_TLS_READY)
        self.transport.startTLS(self.factory.tls)
        self.tls = True
        # RFC 3207 §4.2: forget everything learned before TLS
        self._reset_transaction()
        self.helo = None
        self.esmtp = False
        self.auth = None
        self.idle_commands = 0
        return None



def _client_ip(transport: Any) -> str:
    from tmmail.smtpserver import client_ip_of

    return client_ip_of(transport)

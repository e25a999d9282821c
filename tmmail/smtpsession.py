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

import base64
import binascii
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from tmmail import policy
from tmmail import smtpreplies as R
from tmmail.smtpdata import (
    BARE_NEWLINE,
    FROM_NOT_OWNED,
    LINE_TOO_LONG,
    STORAGE,
    TOO_BIG,
    ContentReader,
    FromPolicy,
    MessageSink,
)
from tmmail.smtppath import (
    ParamError,
    Path,
    PathError,
    check_mail_params,
    check_rcpt_params,
    parse_params,
    parse_path,
    split_argument,
)

log = Logger(namespace="tmmail.smtpserver")

S554_NO_VALID_RECIPIENTS = "554 5.5.1 Error: no valid recipients"

#: bytes discarded from a command line that never ends before the connection is closed
_MAX_DISCARD = 1024 * 1024
#: verbs that do not count as "commands before MAIL"
_TRANSACTION_VERBS = frozenset(("MAIL", "RCPT", "DATA", "BDAT", "QUIT"))


def _printable(text: str, limit: int = 200) -> str:
    """Log-safe form of client input: no control characters (no forged log lines)."""
    text = text[:limit]
    return "".join(c if c.isprintable() else "?" for c in text)


def _helo_name(text: str) -> str:
    """The HELO/EHLO argument as it may appear in a Received: header: printable ASCII, no
    parentheses or semicolons (which would change the header's structure), at most 255."""
    word = text.split(" ", 1)[0][:255]
    return "".join(c if 33 <= ord(c) <= 126 and c not in "();" else "?" for c in word)


@dataclass
class Transaction:
    """The state of one MAIL ... DATA/BDAT transaction (RFC 5321 §3.3)."""

    sender: str
    sender_domain: str
    mail_params: dict[str, str]
    smtputf8: bool
    from_policy: FromPolicy | None
    recipients: list[str] = field(default_factory=list)
    rcpt_params: dict[str, dict[str, str]] = field(default_factory=dict)
    writer: Any = None
    sink: MessageSink | None = None
    reader: ContentReader | None = None
    bdat: bool = False
    #: pending bytes of a BDAT line split between chunks
    pending: bytearray = field(default_factory=bytearray)

    def abort(self) -> None:
        if self.writer is not None:
            w, self.writer = self.writer, None
            try:
                w.abort()
            except OSError as e:
                log.warn("could not drop spool file {queue_id}: {error}", queue_id=w.id, error=e)


class SMTPSession(Protocol):
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
        self._paused = False
        self._discarding = 0  # >0: discarding the rest of an over-long command line
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_size = 0
        self._bdat_error: str | None = None
        self._sasl: tuple[str, str] | None = None  # (mechanism, step)
        self._counted = False
        self._idle_call: Any = None
        self._session_call: Any = None

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
        for call in (self._idle_call, self._session_call):
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
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self.transport.loseConnection()

    def _reply(self, line: str) -> None:
        if self.closing:
            return
        self.transport.write(line.encode("utf-8") + b"\r\n")
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
        self.transport.write(b"".join(out))

    # -- input ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.smtp.idle_timeout)
        self._buf += data
        limit = max(64 * 1024, 4 * self.smtp.max_command_length)
        if self._busy and len(self._buf) > limit and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        self._process()

    def _process(self) -> None:
        if self._in_process:
            return
        self._in_process = True
        try:
            while not self._busy and not self.closing:
                if self._mode == "data":
                    progressed = self._step_data()
                elif self._mode == "bdat":
                    progressed = self._step_bdat()
                else:
                    progressed = self._step_line()
                if not progressed:
                    break
        finally:
            self._in_process = False
        if self._paused and not self._busy and not self.closing:
            self._paused = False
            self.transport.resumeProducing()

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
            self._reply(R.S451_INTERNAL)

        def unbusy(_: Any) -> None:
            self._busy = False
            self._process()

        d.addCallbacks(done, failed)
        d.addErrback(lambda f: log.failure("reply failed", f))
        d.addBoth(unbusy)

    # -- commands ------------------------------------------------------------------------

    def _command(self, raw: bytes) -> Any:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return R.S500_BAD_UTF8
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = getattr(self, "do_" + verb, None) if verb.isascii() and verb.isalpha() else None
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
        return R.S214_HELP

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

    # -- AUTH (RFC 4954) -----------------------------------------------------------------

    def do_AUTH(self, arg: str) -> Any:
        if self.helo is None:
            return R.S503_HELO_FIRST
        if self.auth is not None:
            return R.S503_ALREADY_AUTHENTICATED
        if self.tx is not None:
            return R.S503_AUTH_IN_TRANSACTION
        if self.factory.authenticator is None:
            return R.S502_NOT_IMPLEMENTED
        if not self._auth_available():
            return R.S530_STARTTLS_FIRST
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        initial = initial.strip(" ")
        if mech not in ("PLAIN", "LOGIN"):
            return R.S504_BAD_MECHANISM
        if not initial:
            self._sasl = (mech, "user" if mech == "LOGIN" else "plain")
            self._mode = "auth"
            return R.S334_USERNAME if mech == "LOGIN" else R.S334_EMPTY
        if mech == "PLAIN":
            return self._auth_plain(initial)
        user = _b64(initial)
        if user is None:
            return R.S501_AUTH_MALFORMED
        self._sasl = ("LOGIN", "password:" + user)
        self._mode = "auth"
        return R.S334_PASSWORD

    def _sasl_response(self, raw: bytes) -> Any:
        mech, step = self._sasl or ("", "")
        self._sasl = None
        self._mode = "command"
        try:
            text = raw.decode("ascii").strip(" ")
        except UnicodeDecodeError:
            return R.S501_AUTH_MALFORMED
        if text == "*":
            return R.S501_AUTH_CANCELLED
        if mech == "PLAIN":
            return self._auth_plain(text)
        if step == "user":
            user = _b64(text)
            if user is None:
                return R.S501_AUTH_MALFORMED
            self._sasl = ("LOGIN", "password:" + user)
            self._mode = "auth"
            return R.S334_PASSWORD
        password = _b64(text)
        if password is None or not step.startswith("password:"):
            return R.S501_AUTH_MALFORMED
        return self._authenticate(step[len("password:") :], password)

    def _auth_plain(self, text: str) -> Any:
        decoded = _b64(text)
        if decoded is None:
            return R.S501_AUTH_MALFORMED
        parts = decoded.split("\0")
        if len(parts) != 3 or not parts[1]:
            return R.S501_AUTH_MALFORMED
        authzid, login, password = parts
        if authzid and authzid.lower() != login.lower():
            log.warn("AUTH PLAIN with foreign authorization id from {client_ip}", client_ip=self.client_ip)
            return R.S535_AUTH_FAILED
        return self._authenticate(login, password)

    def _authenticate(self, login: str, password: str) -> Any:
        from tmmail.cred import LoginBlocked, LoginFailed

        d = self.factory.authenticator.authenticate(login, password, self.client_ip)

        def ok(entry: Any) -> str:
            if self.closing:
                return R.S235_AUTH_OK
            self.auth = entry
            log.info("AUTH {login} from {client_ip}", login=entry.login, client_ip=self.client_ip)
            return R.S235_AUTH_OK

        def failed(f: Failure) -> str:
            if f.check(LoginBlocked):
                return R.S454_AUTH_BLOCKED
            if f.check(LoginFailed):
                return R.S535_AUTH_FAILED
            log.failure("authenticator error for {client_ip}", f, client_ip=self.client_ip)
            return R.S454_AUTH_TEMPORARY

        d.addCallbacks(ok, failed)
        return d

    # -- the transaction -----------------------------------------------------------------

    def _reset_transaction(self) -> None:
        if self.tx is not None:
            self.tx.abort()
            self.tx = None

    def do_MAIL(self, arg: str) -> Any:
        if self.helo is None:
            return R.S503_HELO_FIRST
        if self.tx is not None:
            return R.S503_NESTED_MAIL
        if self.role in ("submission", "smtps"):
            if self._needs_tls_first():
                return R.S530_STARTTLS_FIRST
            if self.auth is None:
                return R.S530_AUTH_REQUIRED
        if self.smtp.max_messages_per_session and self.messages >= self.smtp.max_messages_per_session:
            self._close(R.S421_TOO_MANY_MESSAGES.format(host=self.host))
            return None
        try:
            path_text, param_text = split_argument(arg, "FROM")
            params = parse_params(param_text)
            if params and not self.esmtp:
                raise ParamError(next(iter(params)))
            mail_params = check_mail_params(params, auth_offered=self._auth_available())
            smtputf8 = "SMTPUTF8" in mail_params
            path = parse_path(path_text, utf8=smtputf8, allow_null=True)
        except ParamError as e:
            return R.S555_BAD_PARAMETER.format(param=e.param)
        except PathError as e:
            return R.S553_UTF8_NEEDS_SMTPUTF8 if e.utf8 else R.S501_BAD_SENDER
        if "SIZE" in mail_params and int(mail_params["SIZE"]) > self.smtp.max_message_size:
            return R.S552_TOO_BIG.format(limit=self.smtp.max_message_size)
        if self.auth is not None and self.factory.ratelimit.check(self.auth.login) is not None:
            log.warn("rate limit: {login} from {client_ip} over {limit} messages per hour",
                     login=self.auth.login, client_ip=self.client_ip, limit=self.smtp.rate_messages_per_hour)
            return R.S451_RATE_LIMIT.format(login=self.auth.login)
        snap = self.factory.store.current()
        decision = policy.check_sender(
            snap,
            path,
            role=self.role,
            client_ip=self.client_ip,
            auth=self.auth,
            anti_spoofing=self.smtp.anti_spoofing,
            resolve=self.factory.resolve,
        )
        if not decision.verdict.ok:
            log.info("MAIL FROM <{sender}> refused for {client_ip}: {reason}", sender=_printable(path.address),
                     client_ip=self.client_ip, reason=decision.verdict.reason)
            return decision.verdict.reply
        if decision.rewritten:
            log.info("MAIL FROM <{sender}> rewritten to <{primary}> for {login}", sender=_printable(path.address),
                     primary=decision.sender, login=self.auth.login)
        sender = decision.sender
        self.tx = Transaction(
            sender=sender,
            sender_domain=sender.rpartition("@")[2] if sender else "",
            mail_params=mail_params,
            smtputf8=smtputf8,
            from_policy=decision.from_policy,
        )
        self.idle_commands = 0
        return R.S250_SENDER_OK

    def do_RCPT(self, arg: str) -> Any:
        tx = self.tx
        if tx is None:
            return R.S503_NEED_MAIL
        if tx.writer is not None:
            return R.S503_BDAT_AFTER_DATA
        if len(tx.recipients) >= self.smtp.max_recipients:
            return R.S452_TOO_MANY_RECIPIENTS
        try:
            path_text, param_text = split_argument(arg, "TO")
            params = parse_params(param_text)
            if params and not self.esmtp:
                raise ParamError(next(iter(params)))
            rcpt_params = check_rcpt_params(params)
            if path_text.lower() == "postmaster":
                # RFC 5321 §4.1.1.3: <Postmaster> without a domain must be accepted
                path = Path(address=f"postmaster@{self.host.lower()}", local="postmaster", domain=self.host.lower())
            else:
                path = parse_path(path_text, utf8=tx.smtputf8, allow_null=False)
        except ParamError as e:
            return R.S555_BAD_PARAMETER.format(param=e.param)
        except PathError as e:
            return R.S553_UTF8_NEEDS_SMTPUTF8 if e.utf8 else R.S501_BAD_RECIPIENT
        if self.auth is not None:
            over = self.factory.ratelimit.check(self.auth.login, 1, len(tx.recipients) + 1)
            if over is not None:
                log.warn("rate limit: {login} from {client_ip} over the {limit} limit",
                         login=self.auth.login, client_ip=self.client_ip, limit=over)
                return R.S451_RATE_LIMIT.format(login=self.auth.login)
        result = defer.maybeDeferred(self.factory.recipient_check, self, path)

        def decided(verdict: policy.Verdict) -> str:
            if verdict.ok:
                if self.tx is tx and path.address not in tx.rcpt_params:
                    tx.recipients.append(path.address)
                    tx.rcpt_params[path.address] = rcpt_params
                return R.S250_RECIPIENT_OK
            log.info("RCPT TO <{rcpt}> refused for {client_ip}: {reason}", rcpt=_printable(path.address),
                     client_ip=self.client_ip, reason=verdict.reason)
            return verdict.reply

        result.addCallback(decided)
        return result

    def _protocol_name(self) -> str:
        """RFC 3848 / RFC 6531 §3.7.3 "with" protocol names."""
        base = "SMTP" if not self.esmtp else "ESMTP"
        if self.tx is not None and self.tx.smtputf8:
            base = "UTF8SMTP"
        suffix = ("S" if self.tls else "") + ("A" if self.auth is not None else "")
        return base + suffix

    def _open_message(self, tx: Transaction, dot_mode: bool) -> str | None:
        """Open the spool file and write the Received: header; a reply on failure."""
        try:
            writer = self.factory.spool.open_message()
        except OSError as e:
            log.error("cannot open a spool file: {error}", error=e)
            return R.S451_STORAGE
        tx.writer = writer
        tx.sink = MessageSink(writer.write, self.smtp.max_message_size, tx.from_policy)
        tx.reader = ContentReader(tx.sink, self.smtp.max_line_length, dot_mode)
        tx.bdat = not dot_mode
        tx.sink.raw(self._received_header(writer.id, tx))
        return None

    def _received_header(self, queue_id: str, tx: Transaction) -> bytes:
        """RFC 5321 §4.4 trace header (no reverse DNS: the client IP as an address literal)."""
        lines = [
            f"Received: from {self.helo or 'unknown'} ([{self.client_ip}])",
            f"\tby {self.host} with {self._protocol_name()} id {queue_id}",
        ]
        if len(tx.recipients) == 1:
            lines.append(f"\tfor <{tx.recipients[0]}>; {formatdate(localtime=True)}")
        else:
            lines[-1] += f"; {formatdate(localtime=True)}"
        return ("\n".join(lines) + "\n").encode("utf-8")

    def do_DATA(self, arg: str) -> Any:
        tx = self.tx
        if tx is None:
            return R.S503_NEED_MAIL
        if tx.writer is not None:
            return R.S503_BDAT_AFTER_DATA
        if not tx.recipients:
            return S554_NO_VALID_RECIPIENTS
        if arg:
            return R.S501_SYNTAX.format(usage="DATA")
        failure = self._open_message(tx, dot_mode=True)
        if failure is not None:
            self._reset_transaction()
            return failure
        self._mode = "data"
        return R.S354_DATA

    def _step_data(self) -> bool:
        tx = self.tx
        assert tx is not None and tx.reader is not None
        done = tx.reader.feed(self._buf)
        if not done:
            if tx.reader.total > 2 * self.smtp.max_message_size + self.smtp.max_line_length:
                self._close(R.S421_DATA_NEVER_ENDS.format(host=self.host))
            return False
        self._mode = "command"
        self._dispatch(lambda _: self._end_message(), None)
        return True

    def do_BDAT(self, arg: str) -> Any:
        words = arg.split(" ")
        if not (1 <= len(words) <= 2) or not words[0].isdigit() or len(words[0]) > 15 or (
            len(words) == 2 and words[1].upper() != "LAST"
        ):
            # the chunk length is unknown, so its bytes cannot be skipped: stop here
            self._close(R.S501_SYNTAX.format(usage="BDAT size [LAST]"))
            return None
        self._bdat_remaining = int(words[0])
        self._bdat_size = self._bdat_remaining
        self._bdat_last = len(words) == 2
        self._bdat_error = None
        self._mode = "bdat"
        tx = self.tx
        # RFC 3030 §3: the chunk is always read, then answered
        if self.helo is None:
            self._bdat_error = R.S503_HELO_FIRST
        elif tx is None:
            self._bdat_error = R.S503_NO_VALID_TRANSACTION
        elif not tx.recipients:
            self._bdat_error = S554_NO_VALID_RECIPIENTS
        elif tx.writer is None:
            self._bdat_error = self._open_message(tx, dot_mode=False)
        if self._bdat_error is not None:
            self._reset_transaction()
        return None

    def _step_bdat(self) -> bool:
        buf = self._buf
        take = min(len(buf), self._bdat_remaining)
        if take:
            tx = self.tx
            if self._bdat_error is None and tx is not None and tx.reader is not None:
                tx.pending += buf[:take]
                tx.reader.feed(tx.pending)
            del buf[:take]
            self._bdat_remaining -= take
        if self._bdat_remaining:
            return False
        self._mode = "command"
        if self._bdat_error is not None:
            self._reply(self._bdat_error)
            return True
        tx = self.tx
        assert tx is not None and tx.reader is not None and tx.sink is not None
        if self._bdat_last:
            tx.reader.finish_chunks(tx.pending)
            self._dispatch(lambda _: self._end_message(), None)
            return True
        if tx.sink.error is not None:
            reply = self._content_error_reply(tx)
            self._reset_transaction()
            self._reply(reply)
            return True
        self._reply(R.S250_CHUNK_OK.format(size=self._bdat_size))
        return True

    def _content_error_reply(self, tx: Transaction) -> str:
        sink = tx.sink
        assert sink is not None
        if sink.error == TOO_BIG:
            return R.S552_TOO_BIG.format(limit=self.smtp.max_message_size)
        if sink.error == LINE_TOO_LONG:
            return R.S500_DATA_LINE_TOO_LONG
        if sink.error == BARE_NEWLINE:
            return R.S550_BARE_NEWLINE
        if sink.error == FROM_NOT_OWNED and self.auth is not None:
            snap = self.factory.store.current()
            allowed = ", ".join(policy.allowed_senders(snap, self.auth, self.factory.resolve))
            return R.S553_FROM_NOT_OWNED.format(login=self.auth.login, allowed=allowed)
        if sink.error == STORAGE:
            log.error("spool write failed: {error}", error=sink.error_detail)
            return R.S451_STORAGE
        return R.S451_INTERNAL

    def _end_message(self) -> Any:
        """End of data: commit to the spool in a thread, then reply (RFC 5321 §4.1.1.4)."""
        tx = self.tx
        assert tx is not None and tx.sink is not None and tx.writer is not None
        tx.sink.finish()
        if tx.sink.error is not None:
            reply = self._content_error_reply(tx)
            log.info("message from {client_ip} refused: {error}", client_ip=self.client_ip, error=tx.sink.error)
            self._reset_transaction()
            return reply
        from tmmail.envelope import Envelope

        writer = tx.writer
        env = Envelope.new(
            queue_id=writer.id,
            sender=tx.sender,
            recipients=list(tx.recipients),
            helo=self.helo or "",
            client_ip=self.client_ip,
            auth_login=self.auth.login if self.auth is not None else None,
            protocol=self._protocol_name(),
            mail_params=dict(tx.mail_params),
            rcpt_params={k: dict(v) for k, v in tx.rcpt_params.items()},
        )
        size = tx.sink.size
        login = self.auth.login if self.auth is not None else None
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), writer.commit, env)

        def committed(_: Any) -> str:
            tx.writer = None
            self.messages += 1
            if login is not None:
                self.factory.ratelimit.record(login, len(tx.recipients))
            log.info(
                "queued {queue_id} from=<{sender}> rcpts={rcpts} size={size} client={client_ip} auth={login}",
                queue_id=writer.id, sender=tx.sender, rcpts=len(tx.recipients), size=size,
                client_ip=self.client_ip, login=login or "-",
            )
            if self.factory.on_queued is not None:
                try:
                    self.factory.on_queued(writer.id)
                except Exception:
                    log.failure("on_queued failed for {queue_id}", queue_id=writer.id)
            return R.S250_QUEUED.format(queue_id=writer.id)

        def failed(f: Failure) -> str:
            log.failure("spool commit failed for {queue_id}", f, queue_id=writer.id)
            tx.abort()
            return R.S451_STORAGE

        def finished(result: str) -> str:
            if self.tx is tx:
                self.tx = None
            return result

        d.addCallbacks(committed, failed)
        d.addBoth(finished)
        return d


def _b64(text: str) -> str | None:
    """Decode a SASL base64 string to UTF-8 text; "=" is the empty response (RFC 4954 §4)."""
    if text == "=":
        return ""
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


def _client_ip(transport: Any) -> str:
    from tmmail.smtpserver import client_ip_of

    return client_ip_of(transport)

"""The mail transaction of the SMTP server: MAIL, RCPT, DATA, BDAT and the spool commit.

A mixin of tmmail.smtpsession.SMTPSession.  RFC 5321 §3.3 (transaction), §4.4 (Received:),
RFC 1870 (SIZE), RFC 3461 (DSN parameters), RFC 6531 (SMTPUTF8), RFC 3030 (BDAT: the chunk is
always read, then answered, so its bytes never become commands).  Decisions come from
tmmail.policy; content rules from tmmail.smtpdata.  ``250 ... queued as`` only after
``SpoolWriter.commit`` returned in a thread (RFC 5321 §6.1: the message is then our problem).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from tmmail import policy
from tmmail import smtpreplies as R
from tmmail.ratelimit import Reservation
from tmmail.smtpdata import (
    BARE_NEWLINE,
    FROM_NOT_OWNED,
    INTERNAL,
    LINE_TOO_LONG,
    STORAGE,
    TOO_BIG,
    ContentReader,
    FromPolicy,
    MessageSink,
)
from tmmail.smtppath import (
    ParamError,
    PathError,
    check_mail_params,
    check_rcpt_params,
    parse_params,
    parse_path,
    split_argument,
)

log = Logger(namespace="tmmail.smtpserver")

S554_NO_VALID_RECIPIENTS = "554 5.5.1 Error: no valid recipients"

#: RFC 3030 §4 ``bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ]``, chunk-size = 1*DIGIT:
#: ASCII digits only (str.isdigit() and int() also take "²", "١٢" or "１"); re.ASCII so that
#: IGNORECASE does not let "LAſT" (long s) or "LAST" with a Kelvin sign stand for LAST
_BDAT_ARGUMENT = re.compile(r"([0-9]{1,15})(?: (LAST))?", re.ASCII | re.IGNORECASE)


def _printable(text: str, limit: int = 200) -> str:
    """Log-safe form of client input: no control characters (no forged log lines)."""
    text = text[:limit]
    return "".join(c if c.isprintable() else "?" for c in text)


def _param_reply(e: ParamError) -> str:
    """555 5.5.4 for a parameter not implemented, 501 5.5.4 for a syntax error in one."""
    if e.unknown:
        return R.S555_UNSUPPORTED_PARAMETER.format(param=e.param)
    if e.duplicate:
        return R.S501_DUPLICATE_PARAMETER.format(param=e.param)
    return R.S501_BAD_PARAMETER.format(param=e.param)


def _address_literal(ip: str) -> str:
    """RFC 5321 §4.1.3 address literal: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


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
    #: this transaction's hold on the account's rate limits (authenticated sessions only);
    #: taken at RCPT so parallel sessions cannot all pass before any of them is queued
    reservation: Reservation | None = None

    def abort(self) -> None:
        if self.reservation is not None:
            self.reservation.release()
        if self.writer is not None:
            w, self.writer = self.writer, None
            try:
                w.abort()
            except OSError as e:
                log.warn("could not drop spool file {queue_id}: {error}", queue_id=w.id, error=e)

class TransactionCommands:
    """MAIL, RCPT, DATA, BDAT; the content modes ``_step_data`` / ``_step_bdat``."""

    tx: Transaction | None
    auth: Any
    factory: Any
    smtp: Any
    client_ip: str

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
                raise ParamError(next(iter(params)), unknown=True)  # no extensions after HELO
            mail_params = check_mail_params(params, auth_offered=self._auth_available())
            smtputf8 = "SMTPUTF8" in mail_params
            path = parse_path(path_text, utf8=smtputf8, allow_null=True)
        except ParamError as e:
            return _param_reply(e)
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
                raise ParamError(next(iter(params)), unknown=True)  # no extensions after HELO
            rcpt_params = check_rcpt_params(params, smtputf8=tx.smtputf8)
            if path_text.lower() == "postmaster":
                # RFC 5321 §4.1.1.3: <Postmaster> without a domain must be accepted; policy
                # says which hosted address that is (the host name is often not hosted)
                path = policy.bare_postmaster_path(self.factory.store.current(), self.host)
            else:
                path = parse_path(path_text, utf8=tx.smtputf8, allow_null=False)
        except ParamError as e:
            return _param_reply(e)
        except PathError as e:
            return R.S553_UTF8_NEEDS_SMTPUTF8 if e.utf8 else R.S501_BAD_RECIPIENT
        held = (0, 0)
        if self.auth is not None:
            # reserve first (atomic on the reactor thread), give it back if RCPT is refused
            if tx.reservation is None:
                tx.reservation = Reservation(self.factory.ratelimit, self.auth.login)
            held = (0 if tx.reservation.messages else 1, 1)
            if not tx.reservation.grow(*held):
                log.warn("rate limit: {login} from {client_ip} over the {limit} limit",
                         login=self.auth.login, client_ip=self.client_ip, limit=tx.reservation.over)
                return R.S451_RATE_LIMIT.format(login=self.auth.login)
        result = defer.maybeDeferred(self.factory.recipient_check, self, path)

        def decided(verdict: policy.Verdict) -> str:
            added = False
            if verdict.ok and self.tx is tx and path.address not in tx.rcpt_params:
                tx.recipients.append(path.address)
                tx.rcpt_params[path.address] = rcpt_params
                added = True
            if not added and tx.reservation is not None:
                tx.reservation.shrink(*held)
            if verdict.ok:
                return R.S250_RECIPIENT_OK
            log.info("RCPT TO <{rcpt}> refused for {client_ip}: {reason}", rcpt=_printable(path.address),
                     client_ip=self.client_ip, reason=verdict.reason)
            return verdict.reply

        def check_failed(f: Failure) -> Failure:
            if tx.reservation is not None:
                tx.reservation.shrink(*held)
            return f

        result.addCallbacks(decided, check_failed)
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
            f"Received: from {self.helo or 'unknown'} ({_address_literal(self.client_ip)})",
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
        m = _BDAT_ARGUMENT.fullmatch(arg)
        if m is None:
            # the chunk length is unknown, so its bytes cannot be skipped: stop here
            self._close(R.S501_SYNTAX.format(usage="BDAT size [LAST]"))
            return None
        self._bdat_remaining = int(m.group(1))
        self._bdat_size = self._bdat_remaining
        self._bdat_last = m.group(2) is not None
        self._bdat_error = None
        # from here on the chunk's length is known: it is always read, then answered (RFC 3030
        # §3), even if something below raises -- a 451 from _dispatch would leave its bytes to
        # be run as commands
        self._mode = "bdat"
        try:
            self._bdat_error = self._chunk_refusal()
        except Exception:
            log.failure("error starting a BDAT chunk from {client_ip}", client_ip=self.client_ip)
            self._bdat_error = R.S451_INTERNAL
        if self._bdat_error is not None:
            self._reset_transaction()
        return None

    def _chunk_refusal(self) -> str | None:
        """Why the BDAT chunk that follows cannot be taken (its reply), or None."""
        tx = self.tx
        if self.helo is None:
            return R.S503_HELO_FIRST
        if tx is None:
            return R.S503_NO_VALID_TRANSACTION
        if not tx.recipients:
            return S554_NO_VALID_RECIPIENTS
        if tx.writer is None:
            return self._open_message(tx, dot_mode=False)
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
        if sink.error == INTERNAL and sink.exception is not None:
            e = sink.exception
            log.failure("content check failed for a message from {client_ip}: {detail}",
                        Failure(e, type(e), e.__traceback__), client_ip=self.client_ip,
                        detail=sink.error_detail)
        return R.S451_INTERNAL

    def _reclaim(self, hand_off: Any, queue_id: str) -> None:
        """The hand-over of a message committed into active/ raised: have the runner take it
        from its files soon (Runner.reclaim: the factory's ``reclaim``, else the one of the
        runner whose ``take`` is the hand-off), not only at its next start."""
        reclaim = getattr(self.factory, "reclaim", None) or getattr(getattr(hand_off, "__self__", None), "reclaim", None)
        if reclaim is None:
            log.error("{queue_id} stays in active/ until the queue runner's next start", queue_id=queue_id)
            return
        try:
            reclaim(queue_id)
        except Exception:
            log.failure("{queue_id}: reclaim failed; it stays in active/ until the queue runner's next start",
                        queue_id=queue_id)

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
        committer = self.factory.committer if hasattr(writer, "commit_job") else None
        hand_off = self.factory.hand_off if committer is not None else None
        job = None
        if committer is not None:
            # shares its syncs with every other session's commit (tmmail.groupcommit); with an
            # in-process runner the message goes straight to active/ and is handed over in memory
            job = writer.commit_job(env, "active" if hand_off is not None else "incoming")
            d = committer.commit(job)
        else:
            d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), writer.commit, env)

        def committed(_: Any) -> str:
            tx.writer = None
            self.messages += 1
            if tx.reservation is not None:
                tx.reservation.commit(len(tx.recipients))
            elif login is not None:
                self.factory.ratelimit.record(login, len(tx.recipients))
            log.info(
                "queued {queue_id} from=<{sender}> rcpts={rcpts} size={size} client={client_ip} auth={login}",
                queue_id=writer.id, sender=tx.sender, rcpts=len(tx.recipients), size=size,
                client_ip=self.client_ip, login=login or "-",
            )
            try:
                if hand_off is not None and job is not None:
                    hand_off(writer.id, job.envelope_bytes, job.head)
                elif self.factory.on_queued is not None:
                    self.factory.on_queued(writer.id)
            except Exception:
                # the message is safe in the spool, so the client is told 250 all the same
                log.failure("handing over {queue_id} failed", queue_id=writer.id)
                if hand_off is not None:
                    self._reclaim(hand_off, writer.id)
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

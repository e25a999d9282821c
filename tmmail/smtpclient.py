"""The outbound ESMTP client: one connection, one or more mail transactions (RFC 5321).

A small client on the bounded reply reader of tmmail.smtpwire instead of
twisted.mail.smtp.ESMTPClient (broken dot-stuffing, no timeouts: docs/survey §1.5, §1.7):

* EHLO with HELO fallback (§4.1.1.1, §3.2); STARTTLS (RFC 3207) opportunistic or required, and
  implicit TLS (RFC 8314); plaintext received after the 220 to STARTTLS is refused (response
  injection, the client side of CVE-2011-0411); AUTH PLAIN / LOGIN (RFC 4954) only under TLS
  unless TLS is explicitly off.
* MAIL FROM with SIZE (RFC 1870), BODY=8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531) and the RFC 3461
  DSN parameters RET/ENVID and per-RCPT NOTIFY/ORCPT, only when the peer advertises them;
  PIPELINING (RFC 2920) when offered.
* DATA streamed from the spool file through the stateful dot-stuffer (LF -> CRLF, a "." at the
  start of any line doubled wherever it falls in a read chunk, §4.5.2), RSET between messages,
  QUIT.
* A timeout for the connection, the TLS handshake, every reply and every stalled write
  (§4.5.3.2); a peer that goes silent is dropped, never waited on forever.
* Per-recipient results: the RCPT reply (2xx accepted, 4xx deferred, 5xx failed) and then the
  DATA reply for the accepted ones; a 421 or a lost connection defers whatever is left.

Blocking work: none; the message file is read in chunks as the transport asks for more.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS, platformTrust
from twisted.logger import Logger

from tmmail.smtpwire import (
    CHUNK_SIZE,
    ClientProtocol,
    ConnectFailed,
    ConnectionDropped,
    DotStuffer,
    ProtocolError,
    Reply,
    ReplyError,
    SMTPClientError,
    Timeout,
    TLSFailed,
    xtext,
    xtext_safe,
)

__all__ = [
    "Reply",
    "DotStuffer",
    "ClientConfig",
    "OutboundRecipient",
    "OutboundMessage",
    "RecipientResult",
    "Session",
    "open_session",
    "SMTPClientError",
    "ConnectFailed",
    "ReplyError",
    "TLSFailed",
    "Timeout",
    "ConnectionDropped",
    "ProtocolError",
    "xtext",
    "ascii_address",
    "CHUNK_SIZE",
    "DELIVERED",
    "DEFERRED",
    "FAILED",
]

log = Logger(namespace="tmmail.smtpclient")

DELIVERED = "delivered"
DEFERRED = "deferred"
FAILED = "failed"

TLS_MODES = ("opportunistic", "starttls", "implicit", "none")


# -- configuration and message descriptions ----------------------------------------------------


@dataclass(frozen=True)
class ClientConfig:
    """How to talk to one kind of destination (MX, route, smarthost)."""

    helo_name: str
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    #: "opportunistic" (MX: STARTTLS if offered, plain if not or if it fails), "starttls"
    #: (required), "implicit" (TLS from the first byte, port 465), "none"
    tls: str = "opportunistic"
    #: verify the certificate (service-identity against the host name); required modes only
    verify: bool = False
    #: IOpenSSLTrustRoot for verification; None = the platform's CA store
    trust_root: Any = None
    user: str = ""
    password: str = ""
    source_address: str = ""

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"unknown TLS mode {self.tls!r}")


@dataclass(frozen=True)
class OutboundRecipient:
    address: str
    notify: tuple[str, ...] | None = None
    #: "rfc822;addr" (as stored in the envelope: already xtext from a client, or plain)
    orcpt: str | None = None


@dataclass(frozen=True)
class OutboundMessage:
    sender: str
    recipients: tuple[OutboundRecipient, ...]
    #: the spool file (LF line endings)
    path: str
    #: octets on the wire (CRLF form) for SIZE=
    size: int = 0
    #: "8BITMIME", "7BIT" or None (from the client's MAIL FROM BODY=)
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


@dataclass
class RecipientResult:
    """What happened to one recipient in one transaction."""

    status: str  # DELIVERED, DEFERRED, FAILED
    reply: Reply
    #: "MAIL", "RCPT", "DATA", "SIZE", "SMTPUTF8" or "connection"
    stage: str
    #: True when ``reply`` came from the peer (DSN Diagnostic-Code "smtp; ...")
    remote: bool = True


# -- the session -------------------------------------------------------------------------------


class Session:
    """An open, greeted (and maybe TLS-protected, authenticated) connection to one hop."""

    def __init__(self, proto: ClientProtocol, host: str, address: str, port: int, config: ClientConfig) -> None:
        self.proto = proto
        self.host = host
        self.address = address
        self.port = port
        self.config = config
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.greeting_name = ""
        self.transactions = 0
        self.broken = False
        #: the current/last transaction got as far as sending message data
        self.data_sent = False

    @property
    def tls(self) -> bool:
        return self.proto.tls

    @property
    def usable(self) -> bool:
        return not self.proto.closed and not self.broken

    @property
    def remote_mta(self) -> str:
        """RFC 3464 §2.3.5 Remote-MTA value: the host name we connected to."""
        return f"dns; {self.host}"

    def __str__(self) -> str:
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.host}[{addr}]:{self.port}"

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    # -- session setup ----------------------------------------------------------------------

    async def _hello(self) -> None:
        name = self.config.helo_name.encode("idna") if not self.config.helo_name.isascii() else self.config.helo_name.encode()
        reply = await self.proto.command(b"EHLO " + name)
        if reply.transient:
            raise ReplyError("EHLO", reply)
        if reply.positive:
            self.esmtp = True
            self.extensions = _parse_ehlo(reply)
            return
        # §4.1.4 / §3.2: servers that do not know EHLO get HELO
        reply = await self.proto.command(b"HELO " + name)
        if not reply.positive:
            raise ReplyError("HELO", reply)
        self.esmtp = False
        self.extensions = {}

    async def _starttls(self, context: Any) -> None:
        reply = await self.proto.command(b"STARTTLS")
        if reply.code != 220:
            raise ReplyError("STARTTLS", reply)
        await self.proto.start_tls(context)
        # RFC 3207 §4.2: forget everything learnt before TLS and say EHLO again
        self.extensions = {}
        await self._hello()

    async def _auth(self) -> None:
        cfg = self.config
        mechanisms = _auth_mechanisms(self.extensions.get("AUTH", ""))
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + cfg.user.encode() + b"\0" + cfg.password.encode())
            reply = await self.proto.command(b"AUTH PLAIN " + token)
            if reply.code == 334:
                reply = await self.proto.command(token)
        elif "LOGIN" in mechanisms:
            reply = await self.proto.command(b"AUTH LOGIN")
            if reply.code == 334:
                reply = await self.proto.command(base64.b64encode(cfg.user.encode()))
            if reply.code == 334:
                reply = await self.proto.command(base64.b64encode(cfg.password.encode()))
        else:
            raise ReplyError("AUTH", Reply(504, ("5.7.4 no supported AUTH mechanism offered (need PLAIN or LOGIN)",)))
        if reply.code != 235:
            if reply.code == 334:  # the server wants more than we have: cancel (RFC 4954 §4)
                reply = await self.proto.command(b"*")
            raise ReplyError("AUTH", reply)

    # -- transactions -----------------------------------------------------------------------

    async def send(self, msg: OutboundMessage) -> list[RecipientResult]:
        """Run one mail transaction; one RecipientResult per ``msg.recipients`` entry."""
        n = len(msg.recipients)
        if not n:
            return []
        results: list[RecipientResult | None] = [None] * n
        try:
            await self._send(msg, results)
        except SMTPClientError as e:
            self.broken = True
            # a reply we make up names the peer in its text: it has no Remote-MTA in a DSN
            reply = self.proto.closing_reply or Reply(421, (f"4.4.2 {e.text} with {self}",))
            remote = self.proto.closing_reply is not None
            for i in range(n):
                if results[i] is None or (results[i].status == DELIVERED and results[i].stage == "RCPT"):
                    results[i] = RecipientResult(DEFERRED, reply, "connection", remote=remote)
        self.transactions += 1
        return [r for r in results if r is not None]

    async def _send(self, msg: OutboundMessage, results: list[RecipientResult | None]) -> None:
        self.data_sent = False
        # RFC 2920 §3.1: RSET may open the pipelined group (no round trip of its own)
        pipelined_rset = bool(self.transactions) and self.has("PIPELINING")
        if self.transactions and not pipelined_rset:
            reply = await self.proto.command(b"RSET")
            if not reply.positive:
                raise ReplyError("RSET", reply)
        utf8_needed = not (msg.sender.isascii() and all(r.address.isascii() for r in msg.recipients))
        if utf8_needed and not self.has("SMTPUTF8"):
            # internationalised domains have an ASCII form (IDNA A-labels); local parts do not
            converted = _ascii_message(msg)
            if converted is not None:
                msg, utf8_needed = converted, False
        if utf8_needed and not self.has("SMTPUTF8"):
            # RFC 6531 §3.2: an address that needs SMTPUTF8 cannot go to a server without it
            refusal = Reply(553, ("5.6.7 the receiving server does not support SMTPUTF8 (non-ASCII address)",))
            for i in range(len(results)):
                results[i] = RecipientResult(FAILED, refusal, "SMTPUTF8", remote=False)
            return
        limit = _size_limit(self.extensions.get("SIZE"))
        if limit and msg.size > limit:
            refusal = Reply(552, (f"5.3.4 message size {msg.size} exceeds the fixed maximum of {self} ({limit})",))
            for i in range(len(results)):
                results[i] = RecipientResult(FAILED, refusal, "SIZE", remote=False)
            return

        mail = self._mail_command(msg, utf8_needed)
        rcpts = [self._rcpt_command(r, utf8_needed) for r in msg.recipients]
        data_reply: Reply | None = None
        if self.has("PIPELINING"):
            # RFC 2920 §3.1: MAIL, every RCPT and DATA in one group; replies come in order
            group = [b"RSET", mail, *rcpts, b"DATA"] if pipelined_rset else [mail, *rcpts, b"DATA"]
            outcome = await defer.DeferredList(self.proto.pipeline(group), consumeErrors=True)
            if pipelined_rset:
                ok, rset = outcome[0]
                if not ok:
                    rset.raiseException()
                if not rset.positive:
                    raise ReplyError("RSET", rset)  # the session is dropped, whatever came after
                outcome = outcome[1:]
            replies = []
            for ok, value in outcome:
                if not ok:
                    break
                replies.append(value)
            mail_reply = replies[0] if replies else None
            rcpt_replies = replies[1 : 1 + len(rcpts)]
            if len(replies) == len(outcome):
                data_reply = replies[-1]
            if mail_reply is None:
                outcome[0][1].raiseException()
        else:
            mail_reply = await self.proto.command(mail)
            rcpt_replies = []
            if mail_reply.positive:
                for line in rcpts:
                    reply = await self.proto.command(line)
                    rcpt_replies.append(reply)
                    if reply.code == 421:
                        break
        if not mail_reply.positive:
            for i in range(len(results)):
                results[i] = _result_for(mail_reply, "MAIL")
            if mail_reply.code == 421:
                self.proto.closing_reply = mail_reply
                raise ReplyError("MAIL", mail_reply)
            if data_reply is not None and data_reply.code == 354:
                await self.proto.send_body(_Empty())
            return
        accepted = []
        for i, reply in enumerate(rcpt_replies):
            results[i] = _result_for(reply, "RCPT")
            if reply.positive:
                accepted.append(i)
            if reply.code == 421:
                self.proto.closing_reply = reply
                raise ReplyError("RCPT", reply)
        if len(rcpt_replies) < len(rcpts):
            # the pipelined group broke off: the connection is gone
            raise ConnectionDropped("connection lost during RCPT")
        if data_reply is None:
            if self.has("PIPELINING"):
                raise ConnectionDropped("connection lost before the reply to DATA")
            if not accepted:
                return
            data_reply = await self.proto.command(b"DATA")
        if data_reply.code != 354:
            if accepted:
                for i in accepted:
                    results[i] = _result_for(data_reply, "DATA")
            if data_reply.code == 421:
                self.proto.closing_reply = data_reply
                raise ReplyError("DATA", data_reply)
            return
        if not accepted:
            # RFC 2920 §3.1: DATA was accepted anyway; end an empty message and forget it
            await self.proto.send_body(_Empty())
            await self.proto.command(b"RSET")
            return
        with open(msg.path, "rb") as f:
            self.data_sent = True
            final = await self.proto.send_body(f)
        for i in accepted:
            results[i] = _result_for(final, "DATA")
        if final.code == 421:
            self.broken = True

    def _mail_command(self, msg: OutboundMessage, utf8: bool) -> bytes:
        parts = [f"MAIL FROM:<{msg.sender}>"]
        if self.has("SIZE") and msg.size:
            parts.append(f"SIZE={msg.size}")
        if msg.body and msg.body.upper() == "8BITMIME" and self.has("8BITMIME"):
            parts.append("BODY=8BITMIME")
        if utf8 or (msg.smtputf8 and self.has("SMTPUTF8")):
            parts.append("SMTPUTF8")
        if self.has("DSN"):
            if msg.ret:
                parts.append(f"RET={msg.ret.upper()}")
            if msg.envid:
                parts.append(f"ENVID={xtext_safe(msg.envid)}")
        return " ".join(parts).encode("utf-8")

    def _rcpt_command(self, r: OutboundRecipient, utf8: bool) -> bytes:
        parts = [f"RCPT TO:<{r.address}>"]
        if self.has("DSN"):
            if r.notify:
                parts.append("NOTIFY=" + ",".join(n.upper() for n in r.notify))
            if r.orcpt:
                kind, _, value = r.orcpt.partition(";")
                if kind.lower() == "utf-8":
                    value = utf8_addr_xtext(value)
                parts.append(f"ORCPT={kind};{xtext_safe(value)}")
        return " ".join(parts).encode("utf-8")

    async def quit(self) -> None:
        """Say QUIT and close (errors ignored: the mail is already delivered or not)."""
        if self.proto.closed:
            return
        try:
            await self.proto.command(b"QUIT")
        except SMTPClientError:
            pass
        if not self.proto.closed:
            self.proto.transport.loseConnection()

    def abort(self) -> None:
        self.broken = True
        self.proto.abort()


class _Empty:
    def read(self, n: int = -1) -> bytes:
        return b""


def ascii_address(address: str) -> str | None:
    """``user@bücher.example`` -> ``user@xn--bcher-kva.example``; None if the local part is not
    ASCII (RFC 6531 §3.2: such an address cannot be sent without SMTPUTF8)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address if address.isascii() else None
    if not local.isascii():
        return None
    if domain.isascii():
        return address
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return None


def _ascii_message(msg: OutboundMessage) -> OutboundMessage | None:
    sender = ascii_address(msg.sender) if msg.sender else ""
    rcpts = []
    for r in msg.recipients:
        a = ascii_address(r.address)
        if a is None or sender is None:
            return None
        rcpts.append(replace(r, address=a))
    return replace(msg, sender=sender, recipients=tuple(rcpts))


def _result_for(reply: Reply, stage: str) -> RecipientResult:
    if reply.positive:
        status = DELIVERED
    elif reply.transient:
        status = DEFERRED
    else:
        status = FAILED
    return RecipientResult(status, reply, stage)


def _parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-case) -> parameters; "AUTH=PLAIN" (pre-RFC 4954 form) counts as AUTH.

    An ehlo-keyword is ASCII (RFC 5321 §4.1.1.1): a line whose keyword is not is ignored, never
    upper-cased into an ASCII one ("\u017fmtputf8".upper() == "SMTPUTF8", "d\u017fn" -> "DSN").
    """
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        word, _, params = line.strip(" \t").partition(" ")
        if not word or not word.isascii():
            continue
        word = word.upper()
        if word.startswith("AUTH="):
            params = word[5:] + " " + params
            word = "AUTH"
            if "AUTH" in ext:
                continue
        ext[word] = params.strip(" \t")
    return ext


def utf8_addr_xtext(value: str) -> str:
    """An ``ORCPT=utf-8;`` value in the RFC 6533 §3 utf-8-addr-xtext form: a character beyond
    ASCII (accepted raw, as utf-8-addr-unitext, in an SMTPUTF8 transaction) becomes
    ``\\x{HEX}``, which every next hop takes with or without SMTPUTF8.  The "+C3+B6" that
    plain xtext encoding made of it is no utf-8-addr-xtext ("+" is not a QCHAR)."""
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in value)


def _auth_mechanisms(params: str) -> list[str]:
    """The SASL mechanisms of an EHLO AUTH line, upper-cased; ASCII names only (RFC 4422 §3.1),
    so "PLA\u0131N" (dotless i) is not taken for PLAIN."""
    return [m.upper() for m in params.split(" ") if m and m.isascii()]


#: RFC 1870 size-param = 1*DIGIT, ASCII digits only (int() also reads "\u0661\u0662" as 12,
#: "\uff11" as 1 and "1_000" as 1000); more than 20 digits is no useful limit
_SIZE_PARAM = re.compile(r"[0-9]{1,20}")


def _size_limit(params: str | None) -> int:
    """The peer's fixed message size limit from its EHLO ``SIZE`` line; 0 for none (no
    number, 0 itself, or anything that is not ASCII digits)."""
    word = params.split(" ", 1)[0] if params else ""
    return int(word) if _SIZE_PARAM.fullmatch(word) else 0


# -- opening a session -------------------------------------------------------------------------


def _tls_context(config: ClientConfig, host: str) -> Any:
    if config.verify and config.tls in ("starttls", "implicit"):
        trust = config.trust_root if config.trust_root is not None else platformTrust()
        return optionsForClientTLS(host, trustRoot=trust)
    return CertificateOptions()


def _endpoint(reactor: Any, address: str, port: int, config: ClientConfig) -> Any:
    v6 = ipaddress.ip_address(address).version == 6
    bind = None
    if config.source_address:
        src_v6 = ipaddress.ip_address(config.source_address).version == 6
        if src_v6 == v6:
            bind = (config.source_address, 0)
    cls = endpoints.TCP6ClientEndpoint if v6 else endpoints.TCP4ClientEndpoint
    return cls(reactor, address, port, timeout=config.connect_timeout, bindAddress=bind)


async def _open(reactor: Any, host: str, address: str, port: int, config: ClientConfig, use_tls: bool) -> Session:
    proto = ClientProtocol(reactor, config.command_timeout)
    endpoint = _endpoint(reactor, address, port, config)
    if config.tls == "implicit":
        endpoint = endpoints.wrapClientTLS(_tls_context(config, host), endpoint)
    try:
        await endpoints.connectProtocol(endpoint, proto)
    except Exception as e:  # ConnectError, TimeoutError, ...
        raise ConnectFailed(f"connect to {host}[{address}]:{port} failed: {e.__class__.__name__}") from None
    session = Session(proto, host, address, port, config)
    try:
        greeting = await proto.greeting
        if greeting.code != 220:
            # §3.1: 554 (or 4xx) greeting: no service here; try elsewhere
            raise ReplyError("greeting", greeting)
        session.greeting_name = (greeting.lines[0].split() or [""])[0]
        await session._hello()
        tls = config.tls
        if tls == "starttls" or (tls == "opportunistic" and use_tls and session.has("STARTTLS")):
            if not session.has("STARTTLS") and tls == "starttls":
                raise TLSFailed(f"{session} does not offer STARTTLS, which is required")
            try:
                await session._starttls(_tls_context(config, host))
            except ReplyError as e:
                if tls == "starttls":
                    raise TLSFailed(f"STARTTLS refused: {e.reply}") from None
                log.warn("STARTTLS refused by {peer} ({reply}); continuing without TLS", peer=str(session), reply=str(e.reply))
        elif tls == "opportunistic" and use_tls:
            # a plaintext fallback is logged like the others (refused, handshake failed)
            log.warn("{peer} does not offer STARTTLS; sending without TLS", peer=str(session))
        if config.user:
            if not session.tls and tls != "none":
                raise TLSFailed(f"not sending credentials to {session} without TLS")
            if not session.has("AUTH"):
                raise ReplyError("AUTH", Reply(530, (f"5.7.0 {session} does not offer AUTH",)))
            await session._auth()
    except BaseException:
        session.abort()
        raise
    return session


def open_session(reactor: Any, host: str, address: str, port: int, config: ClientConfig, use_tls: bool = True) -> defer.Deferred:
    """Connect, read the greeting, EHLO, STARTTLS/AUTH as configured: Deferred[Session].

    Fails with ConnectFailed, ReplyError (greeting/EHLO/AUTH refused), TLSFailed (handshake
    failed or TLS required and unavailable: with opportunistic TLS the caller reconnects with
    ``use_tls=False``), Timeout, ConnectionDropped or ProtocolError.
    """
    return defer.Deferred.fromCoroutine(_open(reactor, host, address, port, config, use_tls))

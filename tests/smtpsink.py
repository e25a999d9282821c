"""Scriptable receiving SMTP servers for outbound tests: real aiosmtpd on 127.0.0.1.

    sink = Sink(tls=server_ctx, pipelining=True, dsn=True)   # STARTTLS offered with that context
    sink.script.rcpt["bad@x.test"] = "550 5.1.1 no such user"
    sink.script.data = "452 4.3.1 try later"       # or "drop" (close after the data, no reply)
    sink.start(); ... sink.messages[0].content; sink.stop()

Each accepted message is recorded with its envelope, DSN parameters, whether it came over TLS
and who authenticated.  ``Sink(implicit_tls=ctx)`` wraps the listener in TLS (port 465 style);
``Sink(auth={"user": "pw"})`` offers AUTH PLAIN/LOGIN (only under TLS).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DSN_KEYS = ("RET", "ENVID", "NOTIFY", "ORCPT")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    rcpt_options: list[list[str]]
    mail_dsn: dict[str, Any]
    rcpt_dsn: list[dict[str, Any]]
    tls: bool
    login: str | None
    helo: str
    peer: Any = None


@dataclass
class Script:
    """What the server answers; addresses are matched lower-case."""

    #: address -> reply line for RCPT (default 250)
    rcpt: dict[str, str] = field(default_factory=dict)
    #: recipients per transaction before "452 4.5.3 Too many recipients" (0 = no limit)
    max_rcpts: int = 0
    #: reply to MAIL FROM (None = accept)
    mail: str | None = None
    #: reply after the data: None = "250 OK", a reply line, "drop" (close without reply) or
    #: "drop-mid" (close after reading the first 4 KiB of the data)
    data: str | None = None
    #: replies to use for successive transactions (pops from the front), overrides ``data``
    data_sequence: list[str | None] = field(default_factory=list)
    #: greeting code/text override (e.g. "554 no service")
    greeting: str | None = None
    #: address -> Event: RCPT for it waits (up to 30 s) until the event is set; ``waiting``
    #: is set once such a RCPT arrived (tests kill the sending server meanwhile)
    gate: dict[str, threading.Event] = field(default_factory=dict)
    waiting: threading.Event = field(default_factory=threading.Event)


class Tracker:
    """Connections open at once across the sinks that share it (for concurrency limits)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0

    def opened(self) -> None:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)

    def closed(self) -> None:
        with self.lock:
            self.active -= 1

    def reset(self) -> None:
        """Forget the peak (after aiosmtpd's start-up probe has gone, up to a second)."""
        for _ in range(100):
            with self.lock:
                if self.active <= 0:
                    break
            time.sleep(0.01)
        with self.lock:
            self.peak = self.active


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        extra = []
        if self.sink.pipelining:
            extra.append("250-PIPELINING")
        if self.sink.dsn:
            extra.append("250-DSN")
        return responses[:-1] + extra + responses[-1:]

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if self.sink.script.mail:
            return self.sink.script.mail
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        server._tm_mail_dsn = dict(getattr(server, "_tm_last_dsn", {}))
        server._tm_rcpt_dsn = []
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        gate = self.sink.script.gate.get(address.lower())
        if gate is not None:
            self.sink.script.waiting.set()
            for _ in range(600):
                if gate.is_set():
                    break
                await asyncio.sleep(0.05)
        if self.sink.script.max_rcpts and len(envelope.rcpt_tos) >= self.sink.script.max_rcpts:
            return "452 4.5.3 Too many recipients"
        reply = self.sink.script.rcpt.get(address.lower())
        if reply and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)
        server._tm_rcpt_dsn.append(dict(getattr(server, "_tm_last_dsn", {})))
        return reply or "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        script = self.sink.script
        with self.sink.lock:
            action = script.data_sequence.pop(0) if script.data_sequence else script.data
        if action == "drop":
            server.transport.close()
            return "250 OK (never sent)"
        if action and not action.startswith("2"):
            return action
        login = None
        if session.auth_data is not None:
            ld = session.auth_data
            login = ld.login.decode() if isinstance(ld, LoginPassword) else str(ld)
        with self.sink.lock:
            self.sink.messages.append(
                Received(
                    mail_from=envelope.mail_from,
                    rcpt_tos=list(envelope.rcpt_tos),
                    content=envelope.original_content or envelope.content,
                    mail_options=list(envelope.mail_options),
                    rcpt_options=[list(o) for o in envelope.rcpt_options],
                    mail_dsn=getattr(server, "_tm_mail_dsn", {}),
                    rcpt_dsn=list(getattr(server, "_tm_rcpt_dsn", [])),
                    tls=session.ssl is not None,
                    login=login,
                    helo=session.host_name or "",
                    peer=session.peer,
                )
            )
        return action or "250 2.0.0 OK queued"


class _SMTP(SMTP):
    """aiosmtpd's server, taught the RFC 3461 parameters (recorded, not acted on)."""

    sink: Sink

    def _getparams(self, params: Any) -> Any:
        result = super()._getparams(params)
        if result is not None and self.sink.dsn:
            # aiosmtpd upper-cases the parameters; ENVID and ORCPT are recorded as sent
            raw = {}
            for word in getattr(self, "_tm_raw", "").rpartition(">")[2].split():
                key, _, value = word.partition("=")
                raw[key.upper()] = value
            self._tm_last_dsn = {k: raw.get(k, result[k]) for k in DSN_KEYS if k in result}
            for k in DSN_KEYS:
                result.pop(k, None)
        return result

    async def smtp_MAIL(self, arg: str) -> None:
        self._tm_raw = arg or ""
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        self._tm_raw = arg or ""
        await super().smtp_RCPT(arg)

    def connection_made(self, transport: Any) -> None:
        with self.sink.lock:
            self.sink.connections += 1
        self.sink.tracker.opened()
        super().connection_made(transport)

    def connection_lost(self, exc: Any) -> None:
        self.sink.tracker.closed()
        super().connection_lost(exc)

    async def smtp_DATA(self, arg: str) -> None:
        script = self.sink.script
        if script.data == "drop-mid" and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._reader.readexactly(4096)
            self.transport.close()
            return
        await super().smtp_DATA(arg)


class _Controller(Controller):
    def __init__(self, sink: Sink, **kw: Any) -> None:
        self.sink = sink
        super().__init__(_Handler(sink), **kw)

    def factory(self) -> SMTP:
        proto = _SMTP(self.handler, **self.SMTP_kwargs)
        proto.sink = self.sink
        if self.sink.script.greeting:
            greeting = self.sink.script.greeting

            async def _greet(*a: Any, **k: Any) -> None:  # replace the 220 banner
                await proto.push(greeting)
                proto.transport.close()

            proto._handle_client = _greet  # type: ignore[method-assign]
        return proto


class Sink:
    """One scripted receiving server on 127.0.0.1 (a thread with its own asyncio loop)."""

    def __init__(
        self,
        tls: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        auth: dict[str, str] | None = None,
        pipelining: bool = True,
        dsn: bool = True,
        name: str = "sink.test",
        port: int | None = None,
        smtputf8: bool = True,
        address: str = "127.0.0.1",
        tracker: Tracker | None = None,
        size_limit: int = 10 * 1024 * 1024,
    ) -> None:
        self.script = Script()
        self.messages: list[Received] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.pipelining = pipelining
        self.dsn = dsn
        self.port = port or free_port()
        self.address = address
        self.tracker = tracker or Tracker()
        kw: dict[str, Any] = dict(
            hostname=address, port=self.port, server_hostname=name, enable_SMTPUTF8=smtputf8,
            data_size_limit=size_limit,  # advertised as SIZE
        )
        if tls is not None:
            kw["tls_context"] = tls
        if implicit_tls is not None:
            kw["ssl_context"] = implicit_tls
        if auth is not None:
            creds = dict(auth)

            def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
                ok = isinstance(data, LoginPassword) and creds.get(data.login.decode()) == data.password.decode()
                return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

            kw["authenticator"] = authenticator
            # aiosmtpd only counts STARTTLS as TLS; an implicit-TLS listener is TLS anyway
            kw["auth_require_tls"] = implicit_tls is None
        self._kw = kw
        self.controller: _Controller | None = None

    def start(self) -> Sink:
        self.controller = _Controller(self, **self._kw)
        if "ssl_context" in self._kw:
            # aiosmtpd's start-up probe would wrap its socket with the *server* context
            port, address = self.port, self.address

            def trigger() -> None:
                client = ssl.create_default_context()
                client.check_hostname = False
                client.verify_mode = ssl.CERT_NONE
                with socket.create_connection((address, port), 2) as raw:
                    with client.wrap_socket(raw) as conn:
                        conn.recv(1024)

            self.controller._trigger_server = trigger  # type: ignore[method-assign]
        self.controller.start()
        with self.lock:
            self.connections = 0  # aiosmtpd's start-up probe is not a client
        self.tracker.reset()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            try:
                self.controller.stop()
            except (AssertionError, RuntimeError):
                pass
            self.controller = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# -- certificates ------------------------------------------------------------------------------


@dataclass
class TestPKI:
    __test__ = False
    ca_pem: bytes
    cert_path: str
    key_path: str

    def server_context(self, broken: bool = False) -> ssl.SSLContext:
        """The server side; ``broken``: no cipher a client can use, so every handshake fails."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        if broken:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("PSK")  # pre-shared-key suites only, and no key configured
        return ctx


def make_pki(directory: str, hostname: str) -> TestPKI:
    """A throw-away CA and a server certificate for ``hostname`` signed by it (PEM files)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TMmail test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    cert_path = os.path.join(directory, f"{hostname}.crt")
    key_path = os.path.join(directory, f"{hostname}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return TestPKI(ca.public_bytes(serialization.Encoding.PEM), cert_path, key_path)


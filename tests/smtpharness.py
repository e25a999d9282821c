"""Test harness for the SMTP server tests: provider tables, spool, TLS and a listener on 127.0.0.1.

Used by tests/test_smtpserver*.py with the ``reactor_thread`` fixture; the server runs in the
reactor thread, the tests use blocking clients (smtplib, ssl, raw sockets, swaks).
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from functools import lru_cache
from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from tmmail import config
from tmmail.cred import Authenticator, hash_password
from tmmail.envelope import Envelope
from tmmail.providers import ProviderStore
from tmmail.smtpserver import SMTPFactory
from tmmail.spool import Spool
from tmmail.tlsutil import generate_self_signed

HOSTNAME = "mx.example.com"
PASSWORD = "s3cret-Passw0rd"

TABLES = {
    "DOMAINS.tab": "example.com\tACME\t1\nexample.org\tACME\t1\t\tanti_spoofing=0\nother.test\tOTHER\t1\n",
    "POSTOFFICE.tab": "ACME\t1\nOTHER\t1\tsender_policy=rewrite\n",
    "MAILBOX.tab": "ACME\tALICE\t1\nACME\tBOB\t1\nOTHER\tCAROL\t1\n",
    "ADDRESS-MAP.tab": (
        "[SMTP:info@example.com]\t[SF:ACME/ALICE]\n"
        "[SMTP:sales@example.com]\t[SMTP:info@example.com]\n"
        "[SMTP:*@other.test]\t[SF:OTHER/CAROL]\n"
    ),
    "SENDERS.tab": "ACME/ALICE\talice.smith@example.com\t1\nOTHER/CAROL\tcarol@other.test\t1\n",
    "SMTP-ACCESS.tab": "10.9.*.*\t1\n",
    "SMTP-DENY.tab": "",
    "SMTP-BLACKLIST.tab": "*\tspam.example\t1\nexample.com\tbanned-for-acme.example\t1\n",
}


@lru_cache(maxsize=1)
def password_hash() -> str:
    return hash_password(PASSWORD, n=1024)


def auth_table() -> str:
    h = password_hash()
    return f"alice@example.com\tACME/ALICE\t{h}\nbob@example.com\tACME/BOB\t{h}\ncarol@other.test\tOTHER/CAROL\t{h}\n"


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@implementer(IOpenSSLContextFactory)
class FileContextFactory:
    """A server TLS context from PEM files (what STARTTLS and TLSMemoryBIOFactory need)."""

    def __init__(self, cert: str, key: str) -> None:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate_chain_file(cert)
        ctx.use_privatekey_file(key)
        self._ctx = ctx

    def getContext(self) -> SSL.Context:
        return self._ctx


def write_tables(config_dir: str, tables: dict | None = None) -> None:
    """The standard test tables (plus overrides) into ``config_dir``."""
    os.makedirs(config_dir, exist_ok=True)
    files = dict(TABLES)
    files["AUTH.tab"] = auth_table()
    files.update(tables or {})
    for name, text in files.items():
        with open(os.path.join(config_dir, name), "w", encoding="utf-8") as f:
            f.write(text)


class Harness:
    """Providers in ``root/config``, a spool in ``root/spool``, TLS files, SMTP listeners."""

    def __init__(self, root: Any, runner: Any, smtp: dict | None = None, tables: dict | None = None,
                 auth: dict | None = None) -> None:
        self.root = str(root)
        self.runner = runner
        self.config_dir = os.path.join(self.root, "config")
        write_tables(self.config_dir, tables)
        smtp_settings = {"allow_plaintext_auth": False, "idle_timeout": 20.0}
        smtp_settings.update(smtp or {})
        auth_settings = {"free_failures": 100, "block_after": 1000}
        auth_settings.update(auth or {})
        self.settings = config.parse(
            {
                "server": {"hostname": HOSTNAME, "state_dir": self.root, "config_dir": self.config_dir},
                "smtp": smtp_settings,
                "auth": auth_settings,
            },
            os.path.join(self.root, "tmmail.toml"),
        )
        self.store = ProviderStore(self.config_dir, interval=0.0)
        self.spool = Spool(self.settings.spool_dir)
        cert, key = os.path.join(self.root, "server.crt"), os.path.join(self.root, "server.key")
        generate_self_signed(HOSTNAME, cert, key)
        self.tls = FileContextFactory(cert, key)
        self.authenticator = Authenticator(self.store, self.settings.auth, reactor)
        self.queued: list[str] = []
        self.ports: list[Any] = []
        self.factories: dict[str, SMTPFactory] = {}

    def start(self, role: str = "smtp", tls: bool = True, **kwargs: Any) -> int:
        factory = SMTPFactory(self.settings, role, self.store, self.spool, self.authenticator,
                              self.tls if tls else None, self.queued.append, reactor=reactor, **kwargs)
        self.factories[role] = factory
        wrapped: Any = factory
        if role == "smtps":
            wrapped = TLSMemoryBIOFactory(self.tls, False, factory)
        port = self.runner.listen(wrapped)
        self.ports.append(port)
        return port.getHost().port

    def stop(self) -> None:
        for port in self.ports:
            self.runner.call(port.stopListening)
        self.ports = []

    def incoming(self) -> list[tuple[Envelope, bytes]]:
        """Messages in spool/incoming, oldest first."""
        d = os.path.join(self.settings.spool_dir, "incoming")
        out = []
        for name in sorted(os.listdir(d)):
            if name.endswith(".env"):
                qid = name[:-4]
                with open(os.path.join(d, name), "rb") as f:
                    env = Envelope.from_bytes(f.read())
                with open(os.path.join(d, qid + ".eml"), "rb") as f:
                    out.append((env, f.read()))
        out.sort(key=lambda item: item[0].arrival)
        return out

    def tmp_files(self) -> list[str]:
        return os.listdir(os.path.join(self.settings.spool_dir, "tmp"))


class Raw:
    """A raw socket client with bounded waits, for hostile input."""

    def __init__(self, port: int, timeout: float = 10.0, tls: bool = False) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls:
            s = client_tls().wrap_socket(s)
        self.sock = s
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """One reply line (without CRLF); b"" at EOF."""
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> bytes:
        """A complete (possibly multi-line) reply, lines joined with LF."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"\n".join(lines)

    def replies(self, n: int) -> list[bytes]:
        return [self.reply() for _ in range(n)]

    def starttls(self) -> None:
        self.sock = client_tls().wrap_socket(self.sock)

    def closed(self, timeout: float = 10.0) -> bool:
        """True if the server closes the connection within ``timeout`` (reading what is left)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

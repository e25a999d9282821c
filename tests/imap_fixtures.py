"""Shared set-up for the IMAP tests: provider tables, settings, a TLS certificate and a
listening IMAPFactory on 127.0.0.1 (real sockets, the reactor_thread fixture's reactor)."""

from __future__ import annotations

import imaplib
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from tmmail import config, maildir
from tmmail.cred import hash_password

PASSWORD = "s3cret pass"
USERS = {
    "alice@example.com": ("ACME", "ALICE"),
    "bob@example.com": ("ACME", "BOB"),
}

_HASH_CACHE: dict[str, str] = {}


def fast_hash(password: str) -> str:
    """A cheap scrypt hash (tests only; verify_password reads the cost from the hash)."""
    if password not in _HASH_CACHE:
        _HASH_CACHE[password] = hash_password(password, n=1024)
    return _HASH_CACHE[password]


def write_tables(config_dir: str, users: dict[str, tuple[str, str]],
                 quotas: dict[str, int] | None = None) -> None:
    quotas = quotas or {}
    os.makedirs(config_dir, exist_ok=True)
    pos = sorted({po for po, _ in users.values()})
    tables = {
        "DOMAINS.tab": "".join(f"example.com\t{po}\t1\t\t\n" for po in pos[:1]),
        "POSTOFFICE.tab": "".join(f"{po}\t1\t\n" for po in pos),
        "MAILBOX.tab": "".join(f"{po}\t{mb}\t1\t{quotas.get(login, 0)}\t0\t\n"
                               for login, (po, mb) in users.items()),
        "AUTH.tab": "".join(f"{login}\t{po}/{mb}\t{fast_hash(PASSWORD)}\tUSER\n"
                            for login, (po, mb) in users.items()),
    }
    for name, text in tables.items():
        with open(os.path.join(config_dir, name), "w") as f:
            f.write(text)


@dataclass
class IMAPEnv:
    root: str
    settings: Any
    factory: Any
    port: int
    listener: Any
    tls: Any
    extra: dict = field(default_factory=dict)

    def maildir(self, login: str = "alice@example.com") -> str:
        po, mb = USERS[login]
        return maildir.mailbox_path(self.settings.postoffices_dir, po, mb)

    def connect(self, login: str | None = None, starttls: bool = False) -> imaplib.IMAP4:
        m = imaplib.IMAP4("127.0.0.1", self.port, timeout=20)
        if starttls:
            m.starttls(client_tls())
        if login:
            m.login(login, PASSWORD)
        return m


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_CERT: dict[str, tuple[str, str]] = {}


def certificate(tmp_root: str) -> tuple[str, str]:
    from tmmail.tlsutil import generate_self_signed

    cert = os.path.join(tmp_root, "server.crt")
    key = os.path.join(tmp_root, "server.key")
    generate_self_signed("localhost", cert, key)
    return cert, key


def start_imap(reactor_thread: Any, tmp_path: Any, role: str = "imap", imap: dict | None = None,
               users: dict | None = None, with_tls: bool = True, auth: dict | None = None,
               quotas: dict | None = None, smtp: dict | None = None) -> IMAPEnv:
    """Tables, settings, Maildirs and a listening IMAPFactory; stopped by ``stop_imap``."""
    from twisted.internet import reactor

    from tmmail.cred import Authenticator
    from tmmail.imap.server import IMAPFactory
    from tmmail.providers import ProviderStore
    from twisted.internet import ssl as tssl

    root = str(tmp_path)
    users = users or USERS
    write_tables(os.path.join(root, "config"), users, quotas)
    imap_settings = {"allow_plaintext_auth": True}
    imap_settings.update(imap or {})
    auth_settings = {"free_failures": 100, "base_delay": 0.0}
    auth_settings.update(auth or {})
    settings = config.parse({"server": {"state_dir": root, "config_dir": os.path.join(root, "config")},
                             "imap": imap_settings, "auth": auth_settings, "smtp": smtp or {}})
    for po, mb in users.values():
        maildir.create(maildir.mailbox_path(settings.postoffices_dir, po, mb))
    providers = ProviderStore(settings.config_dir)
    authenticator = Authenticator(providers, settings.auth, reactor)
    tls = None
    if with_tls:
        cert, key = certificate(root)
        with open(cert, "rb") as fc, open(key, "rb") as fk:
            tls = tssl.PrivateCertificate.loadPEM(fc.read() + fk.read()).options()
    factory = IMAPFactory(settings, role, providers, authenticator, tls, reactor=reactor)
    if role == "imaps":
        from twisted.protocols.tls import TLSMemoryBIOFactory

        listen_factory: Any = TLSMemoryBIOFactory(tls, False, factory)
    else:
        listen_factory = factory
    port = reactor_thread.listen(listen_factory)
    return IMAPEnv(root, settings, factory, port.getHost().port, port, tls)


def stop_imap(reactor_thread: Any, env: IMAPEnv) -> None:
    reactor_thread.call(env.listener.stopListening)


def raw_session(env: IMAPEnv) -> Any:
    """A plain socket to the server with the greeting read (for byte-level tests)."""
    import socket

    s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    f = s.makefile("rb")
    greeting = f.readline()
    assert greeting.startswith(b"* OK"), greeting
    return s, f


def read_until_tag(f: Any, tag: bytes, limit: int = 100000) -> list[bytes]:
    """Lines up to and including the tagged response of ``tag`` (bounded)."""
    lines = []
    for _ in range(limit):
        line = f.readline()
        if not line:
            raise AssertionError(f"connection closed; got {lines!r}")
        lines.append(line)
        if line.startswith(tag + b" "):
            return lines
    raise AssertionError("no tagged response")


def client(env: IMAPEnv) -> Any:
    """An imapclient session logged in as alice over the plain port."""
    from imapclient import IMAPClient

    c = IMAPClient("127.0.0.1", port=env.port, ssl=False, timeout=20)
    c.login("alice@example.com", PASSWORD)
    return c


def login_raw(env: IMAPEnv) -> Any:
    """A raw socket and its reader, logged in as alice."""
    s, f = raw_session(env)
    s.sendall(b'L LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
    assert read_until_tag(f, b"L")[-1].startswith(b"L OK")
    return s, f


def cmd(s: Any, f: Any, tag: bytes, line: bytes) -> list[bytes]:
    """Send one tagged command; the lines up to and including its tagged answer."""
    s.sendall(tag + b" " + line + b"\r\n")
    return read_until_tag(f, tag)

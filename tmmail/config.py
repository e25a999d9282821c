"""Server settings: one TOML file (``tmmail.toml``), relative paths resolved against its folder.

Pure logic: reading and validating settings, no reactor.  Every section has defaults so a
minimal file works; unknown keys are errors so typos do not silently do nothing.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tmmail.errors import ConfigError

#: Listener roles and the ports ``tmmail init`` writes (unprivileged, loopback).
LISTENER_ROLES = ("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps", "https")
#: ``https`` serves the lists' one-click unsubscribe links (RFC 8058); not written by ``tmmail init``
IMPLICIT_TLS_ROLES = ("smtps", "pop3s", "imaps", "https")
DEFAULT_PORTS = {
    "smtp": 2525,
    "submission": 2587,
    "smtps": 2465,
    "pop3": 2110,
    "pop3s": 2995,
    "imap": 2143,
    "imaps": 2993,
}


@dataclass(frozen=True)
class ServerSettings:
    hostname: str = "localhost"
    #: where spool/ and postoffices/ live
    state_dir: str = "."
    #: where the tab-delimited provider tables live
    config_dir: str = "config"
    #: seconds between checks of the provider files for changes
    reload_interval: float = 1.0


@dataclass(frozen=True)
class TLSSettings:
    certificate: str = "tls/server.crt"
    key: str = "tls/server.key"
    #: "1.2" or "1.3"
    min_version: str = "1.2"
    #: seconds between checks of the certificate files for changes
    reload_interval: float = 5.0


@dataclass(frozen=True)
class SMTPSettings:
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    #: RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF
    max_line_length: int = 1000
    #: command lines (MAIL/RCPT with parameters): RFC 5321 §4.5.3.1.4 plus extensions
    max_command_length: int = 2048
    idle_timeout: float = 300.0
    session_timeout: float = 1800.0
    max_connections: int = 500
    max_connections_per_ip: int = 20
    max_messages_per_session: int = 1000
    #: commands before MAIL that are tolerated (EHLO/NOOP/RSET storms)
    max_commands_before_mail: int = 50
    max_errors: int = 20
    #: per authenticated account, per hour (0 = unlimited)
    rate_messages_per_hour: int = 1000
    rate_recipients_per_hour: int = 5000
    #: allow AUTH without TLS (tests only)
    allow_plaintext_auth: bool = False
    #: refuse unauthenticated port-25 mail that claims a hosted sender domain from a non-allowed IP
    anti_spoofing: bool = True


@dataclass(frozen=True)
class POP3Settings:
    idle_timeout: float = 600.0
    allow_plaintext_auth: bool = False
    max_connections_per_ip: int = 20


@dataclass(frozen=True)
class IMAPSettings:
    idle_timeout_authenticated: float = 1800.0
    idle_timeout_unauthenticated: float = 60.0
    max_line_length: int = 65536
    #: APPEND limit (advertised as APPENDLIMIT); when not set, parse() makes it
    #: smtp.max_message_size, so whatever SMTP accepted can be appended (Sent, moves)
    max_literal_size: int = 25 * 1024 * 1024
    allow_plaintext_auth: bool = False
    max_connections_per_ip: int = 50


@dataclass(frozen=True)
class AuthSettings:
    #: failures (per IP or per account) before delays start
    free_failures: int = 3
    #: first delay in seconds, doubled per further failure
    base_delay: float = 1.0
    max_delay: float = 15.0
    #: failures that trigger a temporary block
    block_after: int = 10
    block_seconds: float = 900.0
    #: failures are forgotten after this many seconds without a new one
    window: float = 3600.0
    #: a client (IPv4 address / IPv6 /64) that logged in to an account within this many
    #: seconds is exempt from that account's block (not from its own IP's): guesses from
    #: elsewhere cannot lock the owner out.  0 = no exemption
    success_memory: float = 30 * 86400.0


@dataclass(frozen=True)
class QueueSettings:
    #: seconds between router passes over the spool (new mail also wakes it at once)
    scan_interval: float = 1.0
    #: first retry delay, then doubled up to retry_max
    retry_initial: float = 300.0
    retry_max: float = 3 * 3600.0
    #: give up after this many seconds (3 days)
    lifetime: float = 3 * 24 * 3600.0
    #: send a delay notice after this many seconds (0 = never)
    delay_notice_after: float = 4 * 3600.0
    #: repeat the delay notice every this many seconds (0 = only once)
    delay_notice_repeat: float = 0.0
    #: how much of the original to return in a DSN (bytes; beyond it only headers)
    dsn_max_return: int = 256 * 1024
    #: threads used for fsync and delivery I/O
    io_threads: int = 8
    postmaster: str = "postmaster"


@dataclass(frozen=True)
class RelaySettings:
    #: port used for MX delivery (tests run receivers on other ports)
    mx_port: int = 25
    helo_name: str = ""
    source_address: str = ""
    #: "host[:port]" used for every domain without its own route; empty = MX
    smarthost: str = ""
    smarthost_tls: str = "starttls"  # "starttls" | "implicit" | "none"
    smarthost_verify: bool = True
    #: PEM file of the CA(s) that sign the smarthost certificate; empty = the system CA store
    smarthost_ca_file: str = ""
    smarthost_user: str = ""
    smarthost_password: str = ""
    max_connections: int = 20
    max_connections_per_domain: int = 4
    connect_timeout: float = 30.0
    command_timeout: float = 300.0


@dataclass(frozen=True)
class DNSSettings:
    #: "HOST:PORT" strings; empty = system resolver
    nameservers: tuple[str, ...] = ()
    timeout: float = 10.0


@dataclass(frozen=True)
class Settings:
    """All server settings; ``path`` is the TOML file, ``base`` its folder."""

    path: str = ""
    base: str = "."
    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    listen: dict[str, tuple[str, ...]] = field(default_factory=dict)
    smtp: SMTPSettings = field(default_factory=SMTPSettings)
    pop3: POP3Settings = field(default_factory=POP3Settings)
    imap: IMAPSettings = field(default_factory=IMAPSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    dns: DNSSettings = field(default_factory=DNSSettings)
    #: free-form sections that later features read (hooks, lists, ...)
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve(self, path: str) -> str:
        """An absolute path for a setting that may be relative to the config file's folder."""
        return os.path.normpath(os.path.join(self.base, os.path.expanduser(path)))

    @property
    def state_dir(self) -> str:
        return self.resolve(self.server.state_dir)

    @property
    def config_dir(self) -> str:
        return self.resolve(self.server.config_dir)

    @property
    def spool_dir(self) -> str:
        return os.path.join(self.state_dir, "spool")

    @property
    def postoffices_dir(self) -> str:
        return os.path.join(self.state_dir, "postoffices")

    @property
    def certificate_path(self) -> str:
        return self.resolve(self.tls.certificate)

    @property
    def key_path(self) -> str:
        return self.resolve(self.tls.key)


_SECTIONS = {
    "server": ServerSettings,
    "tls": TLSSettings,
    "smtp": SMTPSettings,
    "pop3": POP3Settings,
    "imap": IMAPSettings,
    "auth": AuthSettings,
    "queue": QueueSettings,
    "relay": RelaySettings,
    "dns": DNSSettings,
}


def _section(cls: type, data: Any, path: str, name: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table", path)
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown setting {name}.{key}", path)
        default = getattr(cls(), key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{name}.{key} must be true or false", path)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name}.{key} must be a number", path)
            value = float(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}.{key} must be an integer", path)
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{name}.{key} must be a string", path)
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}.{key} must be a list of strings", path)
            value = tuple(value)
        values[key] = value
    return cls(**values)


def parse(data: dict[str, Any], path: str = "<settings>") -> Settings:
    """Build Settings from an already-parsed TOML document."""
    base = os.path.dirname(os.path.abspath(path)) if path != "<settings>" else os.getcwd()
    kwargs: dict[str, Any] = {"path": os.path.abspath(path) if path != "<settings>" else "", "base": base}
    extra: dict[str, Any] = {}
    for name, value in data.items():
        if name in _SECTIONS:
            kwargs[name] = _section(_SECTIONS[name], value, path, name)
        elif name == "listen":
            if not isinstance(value, dict):
                raise ConfigError("[listen] must be a table", path)
            listen: dict[str, tuple[str, ...]] = {}
            for role, endpoints in value.items():
                if role not in LISTENER_ROLES:
                    raise ConfigError(f"unknown listener role listen.{role}", path)
                if isinstance(endpoints, str):
                    endpoints = [endpoints]
                if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
                    raise ConfigError(f"listen.{role} must be a list of endpoint strings", path)
                listen[role] = tuple(endpoints)
            kwargs["listen"] = listen
        else:
            extra[name] = value
    imap_data = data.get("imap")
    if not (isinstance(imap_data, dict) and "max_literal_size" in imap_data):
        smtp = kwargs.get("smtp", SMTPSettings())
        kwargs["imap"] = replace(kwargs.get("imap", IMAPSettings()),
                                 max_literal_size=smtp.max_message_size)
    kwargs["extra"] = extra
    return Settings(**kwargs)


def load(path: str) -> Settings:
    """Read and validate ``tmmail.toml``; errors name the file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("configuration file not found", path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", path) from None
    return parse(data, path)


def with_listeners(settings: Settings, overrides: dict[str, list[str]]) -> Settings:
    """Settings whose listeners come from the command line, if any listener option was given.

    As with ``twistd web --listen``, listeners named on the command line replace the configured
    ones *entirely*: ``--smtp tcp:2525`` alone runs only that listener, so a test or a second
    instance never binds ports it did not ask for.
    """
    given = {role: tuple(endpoints) for role, endpoints in overrides.items() if endpoints}
    if not given:
        return settings
    return replace(settings, listen=given)


def default_path() -> str:
    """The configuration ``make run`` uses: ``$TMMAIL_CONFIG`` or ``./var/tmmail.toml``."""
    return os.environ.get("TMMAIL_CONFIG") or os.path.join(os.getcwd(), "var", "tmmail.toml")

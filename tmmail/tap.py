"""``twistd tmmail`` options and service wiring: the one place that touches listeners and TLS.

Listener options take Twisted endpoint strings and may be repeated, as ``twistd web --listen``
does; when any is given on the command line, they replace all configured listeners.  For the
implicit-TLS roles a ``tcp:`` endpoint is wrapped in TLS by the server with the configured (and
reloadable) certificate; an ``ssl:`` endpoint is used as given.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service, strports
from twisted.python import usage

from tmmail import config

ROLE_HELP = {
    "smtp": "SMTP MX listener (STARTTLS offered, no AUTH before TLS)",
    "submission": "SMTP submission listener (STARTTLS and AUTH required)",
    "smtps": "SMTP submission over implicit TLS",
    "pop3": "POP3 listener (STLS)",
    "pop3s": "POP3 over implicit TLS",
    "imap": "IMAP4 listener (STARTTLS)",
    "imaps": "IMAP4 over implicit TLS",
    "https": "HTTPS for the lists' one-click unsubscribe links (RFC 8058)",
}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run TMmail. Settings come from --config (default: $TMMAIL_CONFIG or ./var/tmmail.toml); "
        "listener options take Twisted endpoint strings and may be repeated; when any is given, "
        "the command line defines all listeners and [listen] in the file is ignored "
        "(e.g. --smtp tcp:2525:interface=127.0.0.1 --pop3 tcp:2110:interface=127.0.0.1)."
    )
    optParameters = [["config", "c", None, "path to tmmail.toml"]]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = {role: [] for role in config.LISTENER_ROLES}

    def postOptions(self) -> None:
        if self["config"] is None:
            self["config"] = config.default_path()


def _make_listener_opt(role: str):
    def opt(self: Options, endpoint: str) -> None:
        self["listen"][role].append(endpoint)

    opt.__doc__ = ROLE_HELP[role] + " (endpoint string, repeatable)"
    return opt


for _role in config.LISTENER_ROLES:
    setattr(Options, "opt_" + _role, _make_listener_opt(_role))


def makeService(options: Any) -> service.IService:
    """The MailService; a bad setting or table ends twistd with the one line
    ``FILE:LINE: reason`` on stderr and status 1, which is what the admin must fix (the
    traceback twistd would print buries it and says nothing more)."""
    from tmmail.errors import ConfigError
    from tmmail.service import MailService

    try:
        settings = config.with_listeners(config.load(options["config"]), options["listen"])
        return MailService(settings, handle_signals=True)  # we are twistd: SIGHUP reloads
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def listener_service(description: str, factory: Any, implicit_tls: bool, tls: Any) -> service.IService:
    """A listening service; ``tcp:`` endpoints of implicit-TLS roles get our reloadable TLS."""
    from twisted.internet import reactor
    from twisted.protocols.tls import TLSMemoryBIOFactory

    kind = description.split(":", 1)[0].strip().lower()
    if implicit_tls and kind in ("tcp", "tcp6", "unix"):
        factory = TLSMemoryBIOFactory(tls, False, factory)
    endpoint = strports.endpoints.serverFromString(reactor, description)
    from twisted.application.internet import StreamServerEndpointService

    svc = StreamServerEndpointService(endpoint, factory)
    svc._raiseSynchronously = True
    return svc

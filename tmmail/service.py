"""MailService: owns the providers, spool, runner, TLS and every listener of one TMmail process."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger

from tmmail import config
from tmmail.config import Settings


class MailService(MultiService):
    """Everything ``twistd tmmail`` runs; built from Settings, started and stopped by twistd."""

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any = None, handle_signals: bool = False) -> None:
        super().__init__()
        #: install the SIGHUP handler (``twistd tmmail`` only: signal handlers can only be set
        #: from the main thread, and an in-process test's service must not take the signal)
        self.handle_signals = handle_signals
        self._old_sighup: Any = None
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.settings = settings

        from tmmail.cred import Authenticator
        from tmmail.providers import ProviderStore
        from tmmail.runner import Runner
        from tmmail.spool import Spool
        from tmmail.tls import ReloadingContextFactory

        self.store = ProviderStore(settings.config_dir, interval=settings.server.reload_interval)
        self.spool = Spool(settings.spool_dir)
        self.tls = ReloadingContextFactory(
            settings.certificate_path,
            settings.key_path,
            settings.tls.min_version,
            settings.tls.reload_interval,
        )
        self.authenticator = Authenticator(self.store, settings.auth, reactor)
        from tmmail.router import options_from_settings

        #: one set of router options (sub-addressing, SRS secret, limits) for SMTP RCPT and the runner
        self.router_options = options_from_settings(settings)
        self.connectors = self._connectors()
        self.runner = Runner(settings, self.spool, self.store, self.connectors, reactor,
                             router_options=self.router_options)
        for connector in self.connectors:
            if getattr(connector, "scheme", None) == "LS":
                connector.on_queued = self.runner.wake
        for role in config.LISTENER_ROLES:
            for description in settings.listen.get(role, ()):
                self._listen(role, description)

    def _connectors(self) -> list[Any]:
        from tmmail.connectors.postoffice import PostOfficeConnector

        from tmmail.connectors.listserver import ListServerConnector

        connectors: list[Any] = [
            PostOfficeConnector(self.settings, self.store),
            ListServerConnector(self.settings, self.store, self.spool, reactor=self.reactor),
        ]
        try:
            from tmmail.connectors.smtp import SMTPConnector
        except ImportError:
            self.log.warn("outbound SMTP connector not available; remote mail stays queued")
        else:
            connectors.append(SMTPConnector(self.settings, self.store, self.reactor))
        return connectors

    def _factory(self, role: str) -> Any:
        s = self.settings
        if role in ("smtp", "submission", "smtps"):
            from tmmail.smtpserver import SMTPFactory

            from tmmail.router import resolve

            options = self.router_options
            factory = SMTPFactory(s, role, self.store, self.spool, self.authenticator, self.tls,
                                  self.runner.wake, reactor=self.reactor,
                                  resolve=lambda snap, address: resolve(snap, address, options))
            factory.hand_off = self.runner.take
            return factory
        if role in ("pop3", "pop3s"):
            from tmmail.pop3 import POP3Factory

            return POP3Factory(s, role, self.store, self.authenticator, self.tls, reactor=self.reactor)
        if role == "https":
            from twisted.web.server import Site

            from tmmail.connectors.listserver_web import UnsubscribeResource

            lists = next(c for c in self.connectors if getattr(c, "scheme", None) == "LS")
            return Site(UnsubscribeResource(lists))
        from tmmail.imap.server import IMAPFactory

        return IMAPFactory(s, role, self.store, self.authenticator, self.tls, reactor=self.reactor)

    def _listen(self, role: str, description: str) -> None:
        from tmmail.tap import listener_service

        svc = listener_service(description, self._factory(role), role in config.IMPLICIT_TLS_ROLES, self.tls)
        svc.setName(f"{role} {description}")
        svc.setServiceParent(self)

    def startService(self) -> None:
        self.reactor.suggestThreadPoolSize(max(10, self.settings.queue.io_threads * 2))
        super().startService()
        self.runner.start()
        if self.handle_signals:
            self._install_sighup()
            # twistd's own log file (not under tests that log elsewhere)
            from tmmail import logformat

            logformat.install()
        self.log.info("TMmail started as {hostname}", hostname=self.settings.server.hostname)

    # -- SIGHUP: reload the certificate and the provider tables now --------------------

    def _install_sighup(self) -> None:
        """``kill -HUP`` re-reads the TLS files and the provider tables at once (the usual
        daemon convention; without a handler SIGHUP would terminate the process).  The
        handler only schedules :meth:`reload` on the reactor."""
        import signal

        if not hasattr(signal, "SIGHUP"):
            return

        def on_sighup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)

        self._old_sighup = signal.signal(signal.SIGHUP, on_sighup)

    def _restore_sighup(self) -> None:
        if self._old_sighup is not None:
            import signal

            signal.signal(signal.SIGHUP, self._old_sighup)
            self._old_sighup = None

    def reload(self) -> Any:
        """Reload TLS (small files: on the reactor) and the provider tables (in a thread:
        20k-row tables take ~0.3 s to parse).  Bad new files keep the last good ones."""
        from twisted.internet.threads import deferToThreadPool

        self.log.info("reloading TLS certificate and provider tables (SIGHUP)")
        self.tls.reload()
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.store.check)

        def done(_: Any) -> None:
            error = getattr(self.store, "last_error", None)
            if error:
                self.log.error("provider tables not reloaded, keeping the last good ones: {error}", error=error)
            else:
                self.log.info("provider tables reloaded")

        d.addCallback(done)
        d.addErrback(lambda f: self.log.failure("provider table reload failed", f))
        return d

    def stopService(self) -> Any:
        from twisted.internet import defer

        self._restore_sighup()
        d = defer.maybeDeferred(self.runner.stop)

        def close_connectors(_: Any) -> None:
            for connector in self.connectors:
                close = getattr(connector, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception as e:  # noqa: BLE001 - stopping must go on
                        self.log.error("closing {connector} failed: {error}", connector=connector, error=e)

        d.addBoth(close_connectors)
        d.addBoth(lambda _: MultiService.stopService(self))
        return d

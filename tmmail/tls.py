"""Server TLS: a context factory that re-reads the certificate and key when they change.

Both STARTTLS (``transport.startTLS(factory)``) and implicit TLS (``TLSMemoryBIOFactory``) call
``getContext()`` for every new TLS session, so a renewed certificate is used by the next
connection without a restart.  A broken new certificate keeps the last good one (and logs).
"""

from __future__ import annotations

import os
import time

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer
from twisted.logger import Logger

_MIN_VERSION = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
#: forward-secret AEAD suites only (TLS 1.3 suites are always on)
_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!MD5:!DSS"


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@implementer(IOpenSSLContextFactory)
class ReloadingContextFactory:
    """An old-style Twisted context factory (``getContext``) that follows the files on disk."""

    log = Logger()

    def __init__(self, certificate: str, key: str, min_version: str = "1.2",
                 check_interval: float = 5.0, clock=time.monotonic) -> None:
        if min_version not in _MIN_VERSION:
            raise ValueError(f"tls.min_version must be one of {sorted(_MIN_VERSION)}")
        self.certificate = certificate
        self.key = key
        self.min_version = min_version
        self.check_interval = check_interval
        self._clock = clock
        self._stamps: tuple | None = None
        self._checked = float("-inf")
        self._context: SSL.Context | None = None
        self._load()  # fail loudly at start-up if the files are unusable

    def _load(self) -> None:
        stamps = (_stamp(self.certificate), _stamp(self.key))
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(_MIN_VERSION[self.min_version])
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
        ctx.set_cipher_list(_CIPHERS)
        ctx.use_certificate_chain_file(self.certificate)  # the chain may follow the certificate
        ctx.use_privatekey_file(self.key)
        ctx.check_privatekey()
        self._context = ctx
        self._stamps = stamps
        self.log.info("TLS certificate loaded from {path}", path=self.certificate)

    def reload(self) -> None:
        """Re-read the files now (called by tmmail.service.MailService.reload on SIGHUP);
        keep the old context on error."""
        try:
            self._load()
        except Exception as e:  # noqa: BLE001 - any bad file must not take TLS down
            self.log.error("TLS certificate reload failed, keeping the old one: {error}", error=e)

    def getContext(self) -> SSL.Context:
        now = self._clock()
        if now - self._checked >= self.check_interval:
            self._checked = now
            try:
                stamps = (_stamp(self.certificate), _stamp(self.key))
            except OSError as e:
                self.log.error("TLS certificate files unreadable: {error}", error=e)
            else:
                if stamps != self._stamps:
                    self.reload()
        assert self._context is not None
        return self._context

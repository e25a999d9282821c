"""Server TLS: a context factory that re-reads the certificate and key when they change.

Both STARTTLS (``transport.startTLS(factory)``) and implicit TLS (``TLSMemoryBIOFactory``) call
``getContext()`` for every new TLS session, so a renewed certificate is used by the next
connection without a restart.  A broken new certificate keeps the last good one (and logs).
"""

from __future__ import annotations

import os
import time

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.logger import Logger

_MIN_VERSION = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


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
        with open(self.certificate, "rb") as f:
            cert_pem = f.read()
        with open(self.key, "rb") as f:
            key_pem = f.read()
        cert = ssl.Certificate.loadPEM(cert_pem)
        key = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
        chain = [ssl.Certificate.loadPEM(p).original for p in _extra_pems(cert_pem)]
        options = ssl.CertificateOptions(
            privateKey=key.original,
            certificate=cert.original,
            extraCertChain=chain or None,
            raiseMinimumTo=_MIN_VERSION[self.min_version],
        )
        self._context = options.getContext()
        self._stamps = stamps
        self.log.info("TLS certificate loaded from {path}", path=self.certificate)

    def reload(self) -> None:
        """Re-read the files now (SIGHUP / admin reload); keep the old context on error."""
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


def _extra_pems(pem: bytes) -> list[bytes]:
    """The intermediate certificates that follow the first one in a PEM bundle."""
    marker = b"-----BEGIN CERTIFICATE-----"
    parts = pem.split(marker)
    return [marker + p for p in parts[2:]] if len(parts) > 2 else []

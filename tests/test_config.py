"""Settings: parsing, validation errors that name the file, listener overrides, TLS reload."""

from __future__ import annotations

import os
import shutil
import ssl
import socket
import threading

import pytest

from tmmail import config
from tmmail.errors import ConfigError
from tmmail.tap import Options


def test_defaults_and_relative_paths(tmp_path):
    p = tmp_path / "tmmail.toml"
    p.write_text('[server]\nhostname = "mx.example.com"\nstate_dir = "state"\n[queue]\nlifetime = 60\n')
    s = config.load(str(p))
    assert s.server.hostname == "mx.example.com"
    assert s.spool_dir == str(tmp_path / "state" / "spool")
    assert s.queue.lifetime == 60.0 and isinstance(s.queue.lifetime, float)
    assert s.smtp.max_line_length == 1000


@pytest.mark.parametrize("text, fragment", [
    ('[smtp]\nmax_recipients = "ten"\n', "smtp.max_recipients must be an integer"),
    ('[smtp]\nmax_recipientz = 10\n', "unknown setting smtp.max_recipientz"),
    ('[listen]\nftp = ["tcp:21"]\n', "unknown listener role"),
    ('[server\nhostname="x"\n', "not valid TOML"),
    ('[smtp]\nallow_plaintext_auth = 1\n', "must be true or false"),
])
def test_errors_name_the_file(tmp_path, text, fragment):
    p = tmp_path / "tmmail.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(str(p))
    assert str(p) in str(e.value) and fragment in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path / "nope.toml"))


def test_command_line_listeners_replace_all_configured():
    s = config.parse({"listen": {"smtp": ["tcp:25"], "imap": ["tcp:143"]}})
    opts = Options()
    opts.parseOptions(["--config", "x.toml", "--smtp", "tcp:2525", "--smtp", "tcp:2526", "--pop3s", "tcp:2995"])
    s2 = config.with_listeners(s, opts["listen"])
    assert s2.listen == {"smtp": ("tcp:2525", "tcp:2526"), "pop3s": ("tcp:2995",)}
    assert config.with_listeners(s, {"smtp": []}).listen == s.listen


def _make_cert(path_crt, path_key, cn):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    path_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def test_tls_context_follows_certificate_on_disk(tmp_path, reactor_thread):
    """A renewed certificate is served to the next connection, without a restart."""
    from twisted.internet import protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from tmmail.tls import ReloadingContextFactory

    crt, key = tmp_path / "server.crt", tmp_path / "server.key"
    _make_cert(crt, key, "first.example")
    cf = ReloadingContextFactory(str(crt), str(key), check_interval=0)

    class Echo(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(data)

    port = reactor_thread.listen(TLSMemoryBIOFactory(cf, False, protocol.Factory.forProtocol(Echo)))

    def peer_cn() -> str:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"ping")
                assert s.recv(4) == b"ping"
                der = s.getpeercert(binary_form=True)
                assert s.version() in ("TLSv1.2", "TLSv1.3")
        from cryptography import x509

        return x509.load_der_x509_certificate(der).subject.rfc4514_string()

    try:
        assert peer_cn() == "CN=first.example"
        _make_cert(crt, key, "second.example")
        assert peer_cn() == "CN=second.example"
        crt.write_text("garbage")  # a broken renewal keeps the last good certificate
        assert peer_cn() == "CN=second.example"
        # TLS 1.1 and older are refused
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) as raw:
            with pytest.raises((ssl.SSLError, OSError)):
                ctx.wrap_socket(raw).do_handshake()
    finally:
        reactor_thread.call(port.stopListening)

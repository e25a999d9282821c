"""SIGHUP on the real ``twistd tmmail``: the TLS certificate and the provider tables are
re-read at once (both are otherwise only polled), and the process keeps running."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl

from tests.server import Server, client_tls
from tmmail.tlsutil import generate_self_signed


def served_certificate(port: int) -> bytes:
    """The DER certificate the smtps listener presents to a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_tls().wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def replace_certificate(root: str, hostname: str) -> bytes:
    """Write a new key and certificate over the server's, each by an atomic rename (as a
    deploy hook does); return the new certificate in DER form."""
    tls_dir = os.path.join(root, "tls")
    new_crt, new_key = os.path.join(tls_dir, "new.crt"), os.path.join(tls_dir, "new.key")
    generate_self_signed(hostname, new_crt, new_key)
    os.replace(new_key, os.path.join(tls_dir, "server.key"))
    os.replace(new_crt, os.path.join(tls_dir, "server.crt"))
    with open(os.path.join(tls_dir, "server.crt")) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def test_sighup_reloads_certificate_and_provider_tables(tmp_path):
    # polling so slow it cannot be what picks the changes up during the test
    srv = Server(tmp_path / "tm").init("[server]\nreload_interval = 3600\n[tls]\nreload_interval = 3600\n")
    srv.add_mailbox("alice@example.com", "alice-pw")
    srv.start(roles=("smtp", "smtps"))
    try:
        old = served_certificate(srv.ports["smtps"])
        new = replace_certificate(srv.root, "renewed.example.com")
        assert new != old
        srv.add_mailbox("newbie@example.com", "newbie-pw")  # written while the server runs
        assert served_certificate(srv.ports["smtps"]) == old
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            s.ehlo("client.test")
            s.mail("someone@remote.test")
            assert s.rcpt("newbie@example.com")[0] == 550  # tables not re-read yet

        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for(lambda: served_certificate(srv.ports["smtps"]) == new)
        assert srv.proc.poll() is None  # SIGHUP no longer terminates the server

        def newbie_known():
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
                s.ehlo("client.test")
                s.mail("someone@remote.test")
                return s.rcpt("newbie@example.com")[0] == 250

        srv.wait_for(newbie_known)
        # STARTTLS on the MX uses the same, reloaded certificate
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            s.starttls(context=client_tls())
            assert s.sock.getpeercert(binary_form=True) == new
        assert "reloading TLS certificate and provider tables (SIGHUP)" in srv.log()

        # a broken certificate on SIGHUP: the last good one stays in service
        with open(os.path.join(srv.root, "tls", "server.crt"), "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for(lambda: "TLS certificate reload failed, keeping the old one" in srv.log())
        assert served_certificate(srv.ports["smtps"]) == new and srv.proc.poll() is None
    finally:
        srv.stop()

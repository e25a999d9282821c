"""RFC 8058 one-click unsubscribe on the real server: the link in List-Unsubscribe works over HTTPS."""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import urllib.error
import urllib.request

from tests.server import Server, client_tls


def members(srv: Server) -> str:
    return srv.cli("list", "member", "list", "news@example.com").stdout


def test_one_click_unsubscribe(tmp_path):
    srv = Server(tmp_path / "tm")
    srv.init(f'[lists]\nunsubscribe_url = "https://127.0.0.1:{srv.ports["https"]}/unsubscribe"\n')
    srv.add_mailbox("alice@example.com")
    srv.cli("list", "add", "news@example.com", "--postoffice", "EXAMPLE")
    srv.cli("list", "member", "add", "news@example.com", "alice@example.com")
    srv.start(roles=("smtp", "https"))
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            s.sendmail("carol@remote.example", ["news@example.com"],
                       b"From: carol@remote.example\r\nTo: news@example.com\r\nSubject: issue 1\r\n\r\nnews\r\n")
        raw = srv.wait_for(lambda: srv.messages("alice@example.com"))[0]
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url = re.search(r"<(https://[^>]+)>", msg["List-Unsubscribe"]).group(1)
        assert "alice%40example.com" in url or "alice@example.com" in url
        ctx = client_tls()
        # a GET (a link scanner) shows a page and unsubscribes nobody
        with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
            assert r.status == 200 and b"Unsubscribe" in r.read()
        assert "alice@example.com\tactive" in members(srv)
        # a forged token is refused
        forged = re.sub(r"token=[^&]+", "token=AAAA", url)
        try:
            urllib.request.urlopen(urllib.request.Request(forged, data=b"List-Unsubscribe=One-Click"),
                                   context=ctx, timeout=10)
            raise AssertionError("forged token accepted")
        except urllib.error.HTTPError as e:
            assert e.code in (400, 403, 404)
        assert "alice@example.com\tactive" in members(srv)
        # the one-click POST (RFC 8058 §3.1) removes the member at once
        req = urllib.request.Request(url, data=b"List-Unsubscribe=One-Click", method="POST")
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            assert r.status == 200
        srv.wait_for(lambda: "alice@example.com\tactive" not in members(srv))
    finally:
        srv.stop()

"""swaks against the real server's three SMTP ports: relay denied/allowed, every relay trick,
sender identity refused and rewritten, and the per-account rate limit."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import require_tool
from tests.server import Server

TRICKS = [
    "user%remote.example@example.com",
    "@example.com:user@remote.example",
    '"user@remote.example"@example.com',
    "user@remote.example@example.com",
    "remote.example!user@example.com",
    "alice@example.com.",
    "user@[192.0.2.1]",
    "user@[127.0.0.1]",
    "alice@exаmple.com",  # Cyrillic а: a look-alike of the hosted domain
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("swaks") / "tm").init("[smtp]\nrate_messages_per_hour = 3\n")
    srv.add_mailbox("alice@example.com", "alice-pw")
    srv.add_mailbox("rita@example.com", "rita-pw")
    srv.cli("postoffice", "add", "REWRITE")
    srv.cli("domain", "add", "rewrite.test", "--postoffice", "REWRITE")
    srv.add_mailbox("rob@rewrite.test", "rob-pw")
    srv.cli("sender", "add", "rob@rewrite.test", "robert@old-provider.example", "--primary")
    # the REWRITE post office rewrites senders instead of refusing them
    path = os.path.join(srv.root, "config", "POSTOFFICE.tab")
    with open(path) as f:
        text = f.read()
    text = re.sub(r"^REWRITE\t1.*$", "REWRITE\t1\tsender_policy=rewrite", text, flags=re.M)
    with open(path, "w") as f:
        f.write(text)
    srv.start(roles=("smtp", "submission", "smtps"))
    yield srv
    srv.stop()


def swaks(server, role, *args):
    exe = require_tool("swaks")
    tls = {"smtp": [], "submission": ["-tls"], "smtps": ["--tlsc"]}[role]
    r = subprocess.run([exe, "--server", "127.0.0.1", "--port", str(server.ports[role]), "--timeout", "20",
                        "--helo", "client.example", *tls, *args], capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def replies(out: str) -> list[str]:
    """The server's reply lines as swaks shows them ('<-' and '<~' for TLS, '<**' for errors)."""
    return [re.sub(r"^<[~*-]+\s*", "", ln) for ln in out.splitlines() if re.match(r"^<[~*-]+\s*\d{3}", ln)]


def last_rcpt_reply(out: str) -> str:
    lines = out.splitlines()
    for i, ln in enumerate(lines):
        if re.match(r"^\s*[~-]> RCPT TO:", ln):
            for nxt in lines[i + 1:]:
                if re.match(r"^<[~*-]+\s*\d{3}", nxt):
                    return re.sub(r"^<[~*-]+\s*", "", nxt)
    raise AssertionError(out)


def test_relay_denied_to_strangers_on_port_25(server):
    out = swaks(server, "smtp", "--from", "carol@remote.example", "--to", "someone@elsewhere.example")
    assert last_rcpt_reply(out).startswith("554 5.7.1 <someone@elsewhere.example>: Relay access denied")


def test_relay_allowed_for_authenticated_users(server):
    out = swaks(server, "submission", "--auth", "PLAIN", "--auth-user", "alice@example.com",
                "--auth-password", "alice-pw", "--from", "alice@example.com", "--to", "friend@elsewhere.example")
    assert any(r.startswith("235 ") for r in replies(out)), out
    assert any("250 2.0.0 Ok: queued as" in r for r in replies(out)), out


def test_auth_not_offered_before_tls_on_port_25_and_required_on_submission(server):
    out = swaks(server, "smtp", "--quit-after", "EHLO")
    assert "AUTH" not in "".join(replies(out)) and "STARTTLS" in out
    exe = require_tool("swaks")
    r = subprocess.run([exe, "--server", "127.0.0.1", "--port", str(server.ports["submission"]),
                        "--from", "alice@example.com", "--to", "bob@example.com", "--timeout", "20"],
                       capture_output=True, text=True, timeout=60)
    assert "530 5.7.0 Must issue a STARTTLS command first" in r.stdout


@pytest.mark.parametrize("trick", TRICKS)
def test_relay_tricks_never_relay(server, trick):
    out = swaks(server, "smtp", "--from", "carol@remote.example", "--to", trick)
    reply = last_rcpt_reply(out)
    assert reply[:1] == "5", f"{trick}: {reply}"
    assert "queued as" not in out


def test_sender_mismatch_refused_naming_allowed_addresses(server):
    out = swaks(server, "submission", "--auth", "LOGIN", "--auth-user", "alice@example.com",
                "--auth-password", "alice-pw", "--from", "rita@example.com", "--to", "bob@example.com")
    mail = [r for r in replies(out) if r.startswith("553")]
    assert mail and "5.7.1" in mail[0] and "alice@example.com" in mail[0], out
    assert "queued as" not in out


def test_sender_rewritten_to_primary_address(server):
    out = swaks(server, "smtps", "--auth", "PLAIN", "--auth-user", "rob@rewrite.test", "--auth-password", "rob-pw",
                "--from", "someone@else.example", "--to", "alice@example.com",
                "--header", "From: Someone <someone@else.example>", "--header", "Subject: rewritten")
    assert any("queued as" in r for r in replies(out)), out
    msg = server.wait_for(lambda: [m for m in server.messages("alice@example.com") if b"Subject: rewritten" in m])[0]
    assert msg.startswith(b"Return-Path: <robert@old-provider.example>")
    from_line = msg.split(b"\nFrom: ", 1)[1].split(b"\n", 1)[0]
    assert b"robert@old-provider.example" in from_line and b"someone@else.example" not in from_line, msg


def test_rate_limit_hit(server):
    outs = [swaks(server, "submission", "--auth", "PLAIN", "--auth-user", "rita@example.com",
                  "--auth-password", "rita-pw", "--from", "rita@example.com", "--to", "alice@example.com")
            for _ in range(5)]
    queued = sum(1 for o in outs if "queued as" in o)
    assert queued == 3
    assert any("451 4.7.1" in o for o in outs[3:])
    assert "rita@example.com" in server.log() and "rate" in server.log().lower()

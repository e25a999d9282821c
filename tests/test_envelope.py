"""The envelope file: what the SMTP transaction recorded survives a round trip through disk."""

from __future__ import annotations

import json

import pytest

from tmmail.envelope import DELIVERED, FAILED, Envelope, EnvelopeError


def make() -> Envelope:
    return Envelope.new(
        queue_id="Q1abc",
        sender="alice@example.org",
        recipients=["bob@example.com", "Carol@Example.com"],
        helo="client.example.org",
        client_ip="192.0.2.7",
        auth_login="alice@example.org",
        protocol="ESMTPSA",
        mail_params={"size": "1234", "BODY": "8BITMIME", "RET": "hdrs", "ENVID": "env-1", "SMTPUTF8": True},
        rcpt_params={
            "bob@example.com": {"ORCPT": "rfc822;bob@example.com", "NOTIFY": "SUCCESS,FAILURE"},
            "carol@example.com": {"notify": "NEVER", "orcpt": "carol@example.com"},
        },
        arrival=1700000000.5,
    )


def test_round_trip_keeps_everything() -> None:
    env = make()
    env.recipients[0].state = DELIVERED
    env.recipients[0].attempts = 1
    env.recipients[0].last_reply = "250 2.0.0 OK"
    env.recipients[1].target = "[SF:ACME/CAROL]"
    env.recipients[1].next_attempt = 1700000300.0
    again = Envelope.from_bytes(env.to_bytes())
    assert again == env
    assert again.mail_params["SIZE"] == "1234"
    assert again.ret == "HDRS"
    assert again.envid == "env-1"


def test_rcpt_params_are_normalised() -> None:
    env = make()
    bob, carol = env.recipients
    assert bob.orcpt == "rfc822;bob@example.com"
    assert bob.notify == ("SUCCESS", "FAILURE")
    assert bob.wants("SUCCESS") and bob.wants("FAILURE") and not bob.wants("DELAY")
    # looked up case-insensitively, ORCPT gets its address type
    assert carol.orcpt == "rfc822;carol@example.com"
    assert not carol.wants("FAILURE")


def test_default_notify_is_failure_and_delay() -> None:
    env = Envelope.new(queue_id="Q2", sender="a@b", recipients=["x@y"])
    assert env.recipients[0].notify is None
    assert env.recipients[0].wants("FAILURE") and env.recipients[0].wants("DELAY")
    assert not env.recipients[0].wants("SUCCESS")


def test_file_is_readable_json() -> None:
    text = make().to_bytes().decode()
    assert "\n  " in text  # indented for people
    data = json.loads(text)
    assert data["sender"] == "alice@example.org"
    assert data["recipients"][0]["state"] == "pending"


def test_done_and_next_due() -> None:
    env = make()
    env.recipients[0].next_attempt = 50.0
    env.recipients[1].next_attempt = 20.0
    assert not env.done and env.next_due() == 20.0
    env.recipients[1].state = FAILED
    assert env.next_due() == 50.0
    env.recipients[0].state = DELIVERED
    assert env.done and env.next_due() is None


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"version": 99}',
        b'{"version": 1, "queue_id": "Q", "sender": "", "arrival": 1, "recipients": []}',
        b'{"version": 1, "queue_id": "Q", "sender": "", "arrival": 1, "recipients": [{"address": "a", "state": "odd"}]}',
        b'{"version": 1, "queue_id": "Q", "sender": "", "arrival": 1, "recipients": [{"bogus": 1}]}',
        b'{"version": 1, "queue_id": "Q", "sender": "", "arrival": "x", "recipients": [{"address": "a"}]}',
    ],
)
def test_garbage_is_refused(raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        Envelope.from_bytes(raw)

"""RFC 3464 delivery reports, checked by parsing them with the standard email package."""

from __future__ import annotations

import email
import email.policy

import pytest

from tmmail.dsn import (
    DELAYED,
    DELIVERED,
    FAILED,
    LOCAL_DIAGNOSTIC,
    RecipientReport,
    build_report,
    header_part,
    reply_status,
    xtext_decode,
)

ORIGINAL = b"From: alice@example.org\nTo: bob@example.com\nSubject: hello\nMessage-ID: <m1@example.org>\n\nBody line\n"


def parse(raw: bytes):
    assert b"\r" not in raw  # spool format: LF only
    return email.message_from_bytes(raw, policy=email.policy.default)


def report(**kw):
    args = dict(
        hostname="mx.example.net",
        to="alice@example.org",
        recipients=[
            RecipientReport(
                "bob@example.com",
                FAILED,
                "5.1.1",
                original_recipient="rfc822;Bob@Example.com",
                diagnostic="550 5.1.1 No such user",
                remote_mta="mx.example.com",
                last_attempt=1700000100.0,
            )
        ],
        original=ORIGINAL,
        arrival=1700000000.0,
        now=1700000200.0,
        envid="ENV-42",
        queue_id="QID1",
    )
    args.update(kw)
    return parse(build_report(**args))


def status_groups(msg):
    part = msg.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    return [dict(g.items()) for g in part.get_payload()]


def test_failure_report_structure() -> None:
    msg = report()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.net>"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"] and msg["Message-ID"].endswith("@mx.example.net>")
    assert "Undelivered" in msg["Subject"]
    text, _, orig = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert "bob@example.com" in text.get_content() and "No such user" in text.get_content()
    assert orig.get_content_type() == "message/rfc822"
    inner = orig.get_payload()[0]
    assert inner["Subject"] == "hello" and "Body line" in inner.get_content()


def test_delivery_status_fields() -> None:
    per_msg, per_rcpt = status_groups(report())
    assert per_msg["Reporting-MTA"] == "dns; mx.example.net"
    assert per_msg["Original-Envelope-Id"] == "ENV-42"
    assert per_msg["Arrival-Date"].startswith("Tue, 14 Nov 2023")
    assert per_rcpt["Final-Recipient"] == "rfc822;bob@example.com"
    assert per_rcpt["Original-Recipient"] == "rfc822; Bob@Example.com"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.com"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert "Last-Attempt-Date" in per_rcpt


def test_ret_hdrs_returns_only_headers() -> None:
    orig = report(ret="HDRS").get_payload()[2]
    assert orig.get_content_type() == "text/rfc822-headers"
    body = orig.get_payload()
    assert "Subject: hello" in body and "Body line" not in body


def test_large_original_returns_only_headers() -> None:
    big = ORIGINAL + b"x" * 5000 + b"\n"
    orig = report(original=big, max_return=1000).get_payload()[2]
    assert orig.get_content_type() == "text/rfc822-headers"
    assert "xxxx" not in orig.get_payload()
    orig = report(original=ORIGINAL, original_complete=False).get_payload()[2]
    assert orig.get_content_type() == "text/rfc822-headers"


def test_delay_and_success_reports() -> None:
    msg = report(
        recipients=[
            RecipientReport("a@x.example", DELAYED, "4.2.2", diagnostic="452 4.2.2 Mailbox full",
                            will_retry_until=1700300000.0),
            RecipientReport("b@x.example", DELIVERED, "2.0.0"),
        ]
    )
    assert "Delayed" in msg["Subject"]
    _, delayed, delivered = status_groups(msg)
    assert delayed["Action"] == "delayed" and "Will-Retry-Until" in delayed
    assert delivered["Action"] == "delivered" and delivered["Status"] == "2.0.0"
    assert "will be retried" in msg.get_payload()[0].get_content()
    ok = report(recipients=[RecipientReport("b@x.example", DELIVERED, "2.0.0")])
    assert "Successful" in ok["Subject"]


def test_never_to_null_sender() -> None:
    with pytest.raises(ValueError):
        report(to="")


def test_postmaster_copy_subject() -> None:
    assert report(postmaster=True)["Subject"].startswith("Postmaster Copy:")


def test_utf8_addresses_use_global_types() -> None:
    msg = report(recipients=[RecipientReport("jörg@exämple.de", FAILED, "5.1.1")])
    assert msg.get_payload()[1].get_content_type() == "message/global-delivery-status"
    raw = build_report(hostname="h", to="a@b", recipients=[RecipientReport("jörg@x.de", FAILED, "5.1.1")],
                       original=ORIGINAL, arrival=0.0, now=0.0)
    assert "Final-Recipient: utf-8;jörg@x.de".encode() in raw


def test_eight_bit_original_declared() -> None:
    raw = build_report(hostname="h", to="a@b", recipients=[RecipientReport("c@d", FAILED, "5.0.0")],
                       original="Subject: é\n\nçà\n".encode(), arrival=0.0, now=0.0)
    assert b"Content-Transfer-Encoding: 8bit" in raw
    assert "çà".encode() in raw


def test_helpers() -> None:
    assert header_part(b"A: 1\nB: 2\n\nbody\n") == b"A: 1\nB: 2\n"
    assert header_part(b"A: 1") == b"A: 1\n"
    assert reply_status("550 5.1.1 No such user", True) == "5.1.1"
    assert reply_status("451 try later", False) == "4.0.0"
    assert reply_status("", True) == "5.0.0"


def test_reply_status_takes_ascii_digits_only() -> None:
    # str.isdigit() is true for "\u0665\u0665\u0660" (Arabic-Indic 550), "\u00b2", "\uff15"
    assert reply_status("550 5.\u0661.\u0661 no such user", True) == "5.0.0"
    assert reply_status("451 4.\uff14.1 busy", False) == "4.0.0"
    assert reply_status("\u0665\u0665\u0660 no", False) == "4.0.0"
    assert reply_status("5\u00b2\u00b2 no", True) == "5.0.0"
    assert reply_status("550 5.x.y odd", False) == "5.0.0"
    assert reply_status("550 5.1.1.1 odd", True) == "5.0.0"
    assert reply_status("123 odd", False) == "4.0.0"  # no status class 1 (RFC 3463)
    assert reply_status("552 5.3.4 too big", True) == "5.3.4"
    assert reply_status("452 4.5.3 too many", False) == "4.5.3"


def test_local_diagnostic_type_and_no_remote_mta() -> None:
    """A reply this server made up itself is not shown as a remote server's (RFC 3464 §2.3.5,
    §2.3.6); a ";" inside a reply is text, not a type separator."""
    msg = report(recipients=[RecipientReport("a@x.example", FAILED, "5.3.4",
                                             diagnostic="552 5.3.4 too big; limit 1000",
                                             diagnostic_type=LOCAL_DIAGNOSTIC)])
    _, rcpt = status_groups(msg)
    assert rcpt["Diagnostic-Code"] == "X-TMmail; 552 5.3.4 too big; limit 1000"
    assert "Remote-MTA" not in rcpt
    assert "said" not in msg.get_payload()[0].get_content()
    _, remote = status_groups(report(recipients=[RecipientReport("a@x.example", FAILED, "5.1.1",
                                                                 diagnostic="550 5.1.1 gone; sorry",
                                                                 remote_mta="mx.x.example")]))
    assert remote["Diagnostic-Code"] == "smtp; 550 5.1.1 gone; sorry"


def test_envid_is_reported_xtext_decoded_without_field_injection() -> None:
    per_msg, _ = status_groups(report(envid="a+2Bb+3Dc+0D+0AX-Injected:+20yes+00"))
    assert per_msg["Original-Envelope-Id"] == "a+b=c+0D+0AX-Injected: yes+00"
    assert "X-Injected" not in per_msg
    assert xtext_decode("rfc822;Bob+2Bx@example.com") == "rfc822;Bob+x@example.com"
    assert xtext_decode("+e9+7F") == "+e9+7F"  # non-ASCII octet, DEL: kept encoded

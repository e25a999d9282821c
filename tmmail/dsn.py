"""Delivery status notifications: RFC 3464 reports for bounces, delays and successes.

Pure: plain parameters in, the report's bytes (LF line endings, as everything in the spool)
out.  The report is ``multipart/report; report-type=delivery-status`` (RFC 6522) with

1. a human-readable text/plain part,
2. ``message/delivery-status`` (RFC 3464 §2.2 per-message fields, §2.3 per-recipient fields),
3. the original as ``message/rfc822``, or only its header as ``text/rfc822-headers`` when the
   sender asked for RET=HDRS (RFC 3461 §4.3) or the original is larger than ``max_return``.

It comes from ``MAILER-DAEMON@hostname`` and must be sent with the null reverse-path
(RFC 3464 §2, RFC 5321 §4.5.5), carries ``Auto-Submitted: auto-replied`` (RFC 3834 §5), and is
never produced for a message whose sender was ``<>`` (that would loop).  Addresses that are
not ASCII use the ``utf-8`` address type of RFC 6533 §3.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from dataclasses import dataclass
from typing import Sequence

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"
EXPANDED = "expanded"
ACTIONS = (FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED)


@dataclass(frozen=True)
class RecipientReport:
    """What happened to one recipient (RFC 3464 §2.3)."""

    #: the address we tried (Final-Recipient), bare ``user@domain``
    final_recipient: str
    action: str
    #: enhanced status code (RFC 3463), e.g. "5.1.1"
    status: str
    #: the RCPT ORCPT parameter as given, e.g. "rfc822;user@example.com"
    original_recipient: str | None = None
    #: the reply, e.g. "550 5.1.1 No such user" (written as "smtp; 550 ...")
    diagnostic: str | None = None
    #: the MTA that gave the reply, e.g. "mx.example.com" (written as "dns; mx.example.com");
    #: None when the reply is this server's own (RFC 3464 §2.3.5: Remote-MTA names a peer)
    remote_mta: str | None = None
    last_attempt: float | None = None
    #: for delayed: when we give up
    will_retry_until: float | None = None
    #: RFC 3464 §2.3.6 diagnostic-type: "smtp" for a reply a remote SMTP server sent,
    #: LOCAL_DIAGNOSTIC (an "X-" type, §2.1) for one this server made up itself
    diagnostic_type: str = "smtp"


#: the diagnostic-type of replies TMmail itself generated (size or SMTPUTF8 refusals, DNS
#: failures, lost connections, local delivery errors), as Postfix writes "X-Postfix"
LOCAL_DIAGNOSTIC = "X-TMmail"


def xtext_decode(text: str) -> str:
    """Undo RFC 3461 §4 xtext (``+2B`` -> ``+``): ORCPT and ENVID values are reported decoded
    (RFC 3461 §6.3; RFC 3464 §2.2.1, §2.3.1).  A hex pair that would decode to something a
    header cannot carry (a control character, CR/LF, a non-ASCII octet) stays encoded, so a
    client cannot inject fields into the report."""

    def one(m: re.Match[str]) -> str:
        code = int(m.group(1), 16)
        return chr(code) if 0x20 <= code < 0x7F else m.group(0)

    return re.sub(r"\+([0-9A-Fa-f]{2})", one, text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _addr_type(address: str) -> str:
    return ("rfc822;" if address.isascii() else "utf-8;") + address


def _typed(value: str, default_type: str) -> str:
    """``type; value`` as RFC 3464 writes it; keep a type already given."""
    value = _one_line(value)
    if ";" in value:
        kind, _, rest = value.partition(";")
        return f"{kind.strip()}; {rest.strip()}"
    return f"{default_type}; {value}"


def _date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def header_part(message: bytes) -> bytes:
    """The header section of a message (up to, not including, the empty line)."""
    end = message.find(b"\n\n")
    if message.startswith(b"\n"):
        return b""
    head = message if end < 0 else message[: end + 1]
    return head if head.endswith(b"\n") else head + b"\n"


def _subject(recipients: Sequence[RecipientReport], postmaster: bool) -> str:
    actions = {r.action for r in recipients}
    if FAILED in actions:
        subject = "Undelivered Mail Returned to Sender"
    elif DELAYED in actions:
        subject = "Delayed Mail (still being retried)"
    else:
        subject = "Successful Mail Delivery Report"
    return ("Postmaster Copy: " if postmaster else "") + subject


def _human_text(
    hostname: str,
    recipients: Sequence[RecipientReport],
    queue_id: str | None,
    arrival: float,
    will_retry_until: float | None,
    postmaster: bool,
) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if postmaster:
        lines += [
            "A delivery status notification could not be delivered to its recipient.",
            "It is attached for the postmaster; its sender will not be notified again.",
            "",
        ]
    groups = [
        (FAILED, "Your message could not be delivered to the following recipients.\n"
                 "This is a permanent error; the message will not be retried."),
        (DELAYED, "Your message has not been delivered yet to the following recipients.\n"
                  "It is still in the queue and will be retried"
                  + (f" until {_date(will_retry_until)}." if will_retry_until else ".")
                  + "\nYou do not need to send it again."),
        (DELIVERED, "Your message was delivered to the following recipients."),
        (RELAYED, "Your message was relayed to the following recipients; you may not get\n"
                  "further notices about them."),
        (EXPANDED, "Your message was forwarded to the members of the following lists."),
    ]
    for action, intro in groups:
        rows = [r for r in recipients if r.action == action]
        if not rows:
            continue
        lines += intro.split("\n") + [""]
        for r in rows:
            lines.append(f"  <{r.final_recipient}>")
            if r.diagnostic:
                where = f"{r.remote_mta} said" if r.remote_mta else "reason"
                lines.append(f"    {where}: {_one_line(r.diagnostic)}")
        lines.append("")
    lines.append(f"Queue id {queue_id}, received {_date(arrival)}." if queue_id else f"Received {_date(arrival)}.")
    return "\n".join(lines) + "\n"


def delivery_status(
    hostname: str,
    recipients: Sequence[RecipientReport],
    arrival: float,
    envid: str | None = None,
    received_from: str | None = None,
) -> bytes:
    """The ``message/delivery-status`` body (RFC 3464 §2.1: groups separated by empty lines)."""
    head = []
    if envid:
        # RFC 3464 §2.2.1: the envelope id itself, not its xtext transport form (RFC 3461 §4.4)
        head.append(f"Original-Envelope-Id: {_one_line(xtext_decode(envid))}")
    head.append(f"Reporting-MTA: dns; {hostname}")
    if received_from:
        head.append(f"Received-From-MTA: dns; {_one_line(received_from)}")
    head.append(f"Arrival-Date: {_date(arrival)}")
    groups = ["\n".join(head)]
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {r.action!r}")
        fields = []
        if r.original_recipient:
            fields.append(f"Original-Recipient: {_typed(r.original_recipient, 'rfc822')}")
        fields.append(f"Final-Recipient: {_addr_type(r.final_recipient)}")
        fields.append(f"Action: {r.action}")
        fields.append(f"Status: {r.status}")
        if r.remote_mta:
            fields.append(f"Remote-MTA: {_typed(r.remote_mta, 'dns')}")
        if r.diagnostic:
            # the type is never parsed out of the text: a reply may contain ";" itself
            fields.append(f"Diagnostic-Code: {r.diagnostic_type}; {_one_line(r.diagnostic)}")
        if r.last_attempt:
            fields.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if r.will_retry_until and r.action == DELAYED:
            fields.append(f"Will-Retry-Until: {_date(r.will_retry_until)}")
        groups.append("\n".join(fields))
    return ("\n\n".join(groups) + "\n").encode("utf-8")


def build_report(
    *,
    hostname: str,
    to: str,
    recipients: Sequence[RecipientReport],
    original: bytes,
    arrival: float,
    now: float,
    envid: str | None = None,
    ret: str | None = None,
    max_return: int = 256 * 1024,
    original_complete: bool = True,
    queue_id: str | None = None,
    received_from: str | None = None,
    postmaster: bool = False,
) -> bytes:
    """A complete RFC 3464 report addressed to ``to`` (the original sender, or the postmaster).

    ``envid`` is the ENVID parameter as the client sent it (xtext; the report has it decoded).
    ``original`` is the original message with LF line endings; pass ``original_complete=False``
    if it was cut short (only its header is then returned).  Raises ValueError for ``to == ""``:
    nothing is ever reported to the null sender.
    """
    if not to:
        raise ValueError("never send a delivery report to the null sender")
    if not recipients:
        raise ValueError("a delivery report needs at least one recipient")
    boundary = f"=_tmmail_{secrets.token_hex(12)}"
    retry_until = max((r.will_retry_until or 0 for r in recipients), default=0) or None
    utf8 = not (to.isascii() and all(r.final_recipient.isascii() for r in recipients))
    headers_only = (ret or "").upper() == "HDRS" or not original_complete or len(original) > max_return
    returned = header_part(original) if headers_only else original
    if not returned.endswith(b"\n") and returned:
        returned += b"\n"

    status = delivery_status(hostname, recipients, arrival, envid, received_from)
    if headers_only:
        ctype = "text/rfc822-headers"
    else:
        ctype = "message/global" if utf8 else "message/rfc822"
    eight_bit = any(b > 127 for b in returned)
    human = _human_text(hostname, recipients, queue_id, arrival, retry_until, postmaster).encode("utf-8")
    human_8bit = not human.isascii()
    date = _date(now)
    msgid = f"<{int(now)}.{secrets.token_hex(6)}{'.' + queue_id if queue_id else ''}@{hostname}>"
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{to}>",
        f"Subject: {_subject(recipients, postmaster)}",
        f"Date: {date}",
        f"Message-ID: {msgid}",
        "MIME-Version: 1.0",
        "Auto-Submitted: auto-replied",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: " + ("8bit" if (eight_bit or utf8 or human_8bit) else "7bit"),
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "Content-Transfer-Encoding: " + ("8bit" if human_8bit else "7bit"),
        "",
    ]
    out = "\n".join(head).encode("utf-8") + b"\n"
    out += human
    out += (
        f"\n--{boundary}\n"
        f"Content-Type: {'message/global-delivery-status' if utf8 else 'message/delivery-status'}\n"
        "Content-Description: Delivery report\n"
        "\n"
    ).encode("ascii")
    out += status
    out += (
        f"\n--{boundary}\n"
        f"Content-Type: {ctype}\n"
        f"Content-Description: {'Undelivered message headers' if headers_only else 'Undelivered message'}\n"
        + ("Content-Transfer-Encoding: 8bit\n" if eight_bit else "")
        + "\n"
    ).encode("ascii")
    out += returned
    out += f"\n--{boundary}--\n".encode("ascii")
    return out


#: RFC 3463 status-code and RFC 5321 reply code, ASCII digits only (str.isdigit() and \d
#: also take "\u0661", "\uff15" or "\u00b2": a remote reply must not put them in Status:)
_STATUS_CODE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_REPLY_CODE = re.compile(r"[245][0-9]{2}")


def reply_status(reply: str, permanent: bool) -> str:
    """The enhanced status code of an SMTP reply text (``"550 5.1.1 ..."``), or a default."""
    parts = [p for p in re.split(r"[ \t]+", reply) if p]
    if len(parts) >= 2 and _STATUS_CODE.fullmatch(parts[1]):
        return parts[1]
    if parts and _REPLY_CODE.fullmatch(parts[0]):
        return f"{parts[0][0]}.0.0"
    return "5.0.0" if permanent else "4.0.0"

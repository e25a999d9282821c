"""The envelope (command) file of a spooled message: who sent it, to whom, and how far delivery got.

Pure logic: building, serialising and parsing envelopes; no I/O beyond bytes in and out
(``tmmail.spool`` writes them durably).  The file is indented JSON so an administrator can read
it with ``cat``.  It records the RFC 5321 transaction (MAIL FROM, RCPT TO, HELO, client) with
the DSN parameters of RFC 3461 (§4.1 NOTIFY, §4.2 ORCPT, §4.3 RET, §4.4 ENVID) and, per
recipient, the delivery state the runner saves before every attempt and after every outcome, so
a crash in the middle of a multi-recipient delivery neither loses nor repeats a recipient.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

#: recipient states; ``delivered`` and ``failed`` are final
PENDING = "pending"
DEFERRED = "deferred"
DELIVERED = "delivered"
FAILED = "failed"
STATES = (PENDING, DEFERRED, DELIVERED, FAILED)
FINAL_STATES = (DELIVERED, FAILED)

#: where a message came from: SMTP (or another client), a generated report, or a failed report
#: forwarded to the postmaster (which is never reported on again, so reports never loop)
ORIGIN_SMTP = "smtp"
ORIGIN_DSN = "dsn"
ORIGIN_POSTMASTER = "postmaster"

FORMAT_VERSION = 1


class EnvelopeError(ValueError):
    """The envelope file cannot be understood (the spool moves the message to corrupt/)."""


def _upper_keys(params: Mapping[str, Any] | None) -> dict[str, Any]:
    return {str(k).upper(): v for k, v in (params or {}).items()}


def _notify(value: Any) -> tuple[str, ...] | None:
    """RFC 3461 §4.1: NOTIFY=NEVER or a comma list of SUCCESS, FAILURE, DELAY; None = not given."""
    if value is None or value is True:
        return None
    if isinstance(value, str):
        parts = [p.strip().upper() for p in value.split(",") if p.strip()]
    else:
        parts = [str(p).strip().upper() for p in value]
    return tuple(parts) or None


def _orcpt(value: Any) -> str | None:
    """RFC 3461 §4.2: ORCPT=addr-type;xtext; kept as given, with ``rfc822;`` added if missing."""
    if not value or value is True:
        return None
    value = str(value)
    return value if ";" in value else "rfc822;" + value


@dataclass
class Recipient:
    """One recipient (or one resolved target of a recipient) and its delivery state."""

    #: the address as given in RCPT TO (what the sender asked for)
    address: str
    orcpt: str | None = None
    notify: tuple[str, ...] | None = None
    state: str = PENDING
    attempts: int = 0
    #: the last reply, e.g. "452 4.2.2 Mailbox full"
    last_reply: str = ""
    #: epoch seconds; 0 = as soon as possible
    next_attempt: float = 0.0
    last_attempt: float = 0.0
    #: the resolved internal address ("[SF:ACME/ADMIN]", "[SMTP:x@y]"); "" = not resolved yet
    target: str = ""
    #: the MTA that gave the last reply (for DSN Remote-MTA), e.g. "dns; mx.example.com"
    remote_mta: str = ""
    #: True when the address resolved nowhere (the message is kept in badmail/)
    bad: bool = False
    #: when the last delay notice was sent (0 = never)
    delay_notified: float = 0.0
    #: a report (DSN) about the final state was already queued
    reported: bool = False
    #: for one failed branch of an alias/group/redirect (tmmail.router.BranchFailure): the
    #: destination that resolved nowhere; a requeue routes only this branch again
    branch: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def wants(self, event: str) -> bool:
        """Whether the sender asked to hear about ``event`` (SUCCESS, FAILURE or DELAY).

        Without NOTIFY, RFC 3461 §4.1 leaves it to us: FAILURE and DELAY, as Postfix does.
        """
        if self.notify is None:
            return event in ("FAILURE", "DELAY")
        if "NEVER" in self.notify:
            return False
        return event in self.notify


@dataclass
class Envelope:
    """Everything about a spooled message except its bytes."""

    queue_id: str
    sender: str
    recipients: list[Recipient]
    arrival: float
    helo: str = ""
    client_ip: str = ""
    auth_login: str | None = None
    protocol: str = "ESMTP"
    #: MAIL FROM parameters, upper-case keys: SIZE, BODY, SMTPUTF8, RET, ENVID
    mail_params: dict[str, Any] = field(default_factory=dict)
    origin: str = ORIGIN_SMTP
    #: the pickup transfer events (tmmail.events) accepted it; they are not run again
    checked: bool = False
    #: released from quarantine/ by an admin (tmmail quarantine release): no transfer event
    #: (pickup or deliver) is asked again, so the hook that quarantined it cannot stop it again
    released: bool = False
    #: size and CRC-32 of the message file as committed (None for older envelopes): the SMTP
    #: commit publishes its files before the one sync that makes them durable, so recovery
    #: checks the data of a message it finds against these (tmmail.spool.Spool.recover)
    data_size: int | None = None
    data_crc: int | None = None
    #: not saved: set by the runner when the message was in the middle of delivery when the
    #: process stopped, so connectors check whether a delivery already happened
    recovered: bool = field(default=False, compare=False)

    @classmethod
    def new(
        cls,
        queue_id: str,
        sender: str,
        recipients: Iterable[str],
        helo: str = "",
        client_ip: str = "",
        auth_login: str | None = None,
        protocol: str = "ESMTP",
        mail_params: Mapping[str, Any] | None = None,
        rcpt_params: Mapping[str, Mapping[str, Any]] | None = None,
        arrival: float | None = None,
        origin: str = ORIGIN_SMTP,
    ) -> Envelope:
        """An envelope for a message just received; ``rcpt_params`` maps address -> RCPT params."""
        rcpt_params = rcpt_params or {}
        lowered = {k.lower(): v for k, v in rcpt_params.items()}
        rcpts = []
        for address in recipients:
            params = _upper_keys(rcpt_params.get(address, lowered.get(address.lower())))
            rcpts.append(
                Recipient(address=address, orcpt=_orcpt(params.get("ORCPT")), notify=_notify(params.get("NOTIFY")))
            )
        return cls(
            queue_id=queue_id,
            sender=sender,
            recipients=rcpts,
            arrival=time.time() if arrival is None else arrival,
            helo=helo,
            client_ip=client_ip,
            auth_login=auth_login,
            protocol=protocol,
            mail_params=_upper_keys(mail_params),
            origin=origin,
        )

    # -- questions the runner and the DSN code ask -------------------------------------------

    @property
    def done(self) -> bool:
        """Every recipient delivered or failed."""
        return all(r.final for r in self.recipients)

    @property
    def ret(self) -> str | None:
        """RFC 3461 §4.3 RET: "FULL", "HDRS" or None."""
        value = self.mail_params.get("RET")
        return str(value).upper() if value else None

    @property
    def envid(self) -> str | None:
        value = self.mail_params.get("ENVID")
        return str(value) if value and value is not True else None

    def next_due(self) -> float | None:
        """The earliest next-attempt time of a recipient that is not final (None if all are)."""
        times = [r.next_attempt for r in self.recipients if not r.final]
        return min(times) if times else None

    # -- file format -------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """JSON, one message field per line and one recipient object per line.

        Readable with ``cat`` and ~10x cheaper than ``json.dumps(indent=...)`` (which runs the
        pure-Python encoder): every value goes through the C encoder, no dataclass deep copy.
        """
        dumps = _DUMPS
        lines = [f'  "version": {FORMAT_VERSION}']
        for name in _ENVELOPE_FIELDS:
            lines.append(f'  "{name}": {dumps(getattr(self, name))}')
        rcpts = []
        for r in self.recipients:
            d = {name: getattr(r, name) for name in _RECIPIENT_FIELDS}
            if d["notify"] is not None:
                d["notify"] = list(d["notify"])
            rcpts.append("    " + dumps(d))
        lines.append('  "recipients": [\n' + ",\n".join(rcpts) + "\n  ]")
        return ("{\n" + ",\n".join(lines) + "\n}\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        """Parse an envelope file; raises EnvelopeError for anything that is not one."""
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
                raise EnvelopeError("unknown envelope format version")
            rcpts = []
            for r in data["recipients"]:
                if not isinstance(r, dict):
                    raise EnvelopeError("recipient is not an object")
                r = dict(r)
                if r.get("notify") is not None:
                    r["notify"] = tuple(r["notify"])
                rcpt = Recipient(**r)
                if rcpt.state not in STATES:
                    raise EnvelopeError(f"unknown recipient state {rcpt.state!r}")
                rcpts.append(rcpt)
            env = cls(
                queue_id=str(data["queue_id"]),
                sender=str(data["sender"]),
                recipients=rcpts,
                arrival=float(data["arrival"]),
                helo=str(data.get("helo", "")),
                client_ip=str(data.get("client_ip", "")),
                auth_login=data.get("auth_login"),
                protocol=str(data.get("protocol", "ESMTP")),
                mail_params=dict(data.get("mail_params") or {}),
                origin=str(data.get("origin", ORIGIN_SMTP)),
                checked=bool(data.get("checked", False)),
                released=bool(data.get("released", False)),
                data_size=_optional_int(data.get("data_size")),
                data_crc=_optional_int(data.get("data_crc")),
            )
        except EnvelopeError:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as e:
            raise EnvelopeError(f"unreadable envelope: {e}") from None
        if not env.recipients:
            raise EnvelopeError("envelope without recipients")
        return env


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EnvelopeError(f"not a size or checksum: {value!r}")
    return value


_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode
_RECIPIENT_FIELDS = tuple(f.name for f in fields(Recipient))
#: saved message fields in file order (``recipients`` last, ``recovered`` is never saved)
_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope) if f.name not in ("recipients", "recovered"))

"""Delivery outcomes that carry an SMTP reply, so only the runner decides defer vs bounce.

Connectors raise these; the SMTP server turns them into replies (RFC 5321 §4.2, RFC 3463).
"""

from __future__ import annotations


class DeliveryError(Exception):
    """A failure with an SMTP basic code, an enhanced status code and a text."""

    permanent = False

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


class TransientError(DeliveryError):
    """4xx: try again later."""


class PermanentError(DeliveryError):
    """5xx: give up on this recipient and tell the sender."""

    permanent = True


class Delivered:
    """A successful outcome with details the runner needs (a connector may return ``None`` instead).

    ``remote_mta``: the host that took the message (DSN Remote-MTA of a "relayed" report);
    ``dsn_passed``: the next hop supports DSN (RFC 3461) and got NOTIFY/ORCPT, so it takes over
    the reporting: no "relayed" notice is sent for NOTIFY=SUCCESS (RFC 3461 §5.2.1; "relayed" is for a next hop without DSN, §5.2.2).
    """

    permanent = False

    def __init__(self, remote_mta: str = "", dsn_passed: bool = False) -> None:
        self.remote_mta = remote_mta
        self.dsn_passed = dsn_passed

    def __repr__(self) -> str:
        return f"Delivered(remote_mta={self.remote_mta!r}, dsn_passed={self.dsn_passed!r})"


class ConfigError(Exception):
    """A configuration or provider file is malformed; the message names file and line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line

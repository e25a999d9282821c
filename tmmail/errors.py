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


class ConfigError(Exception):
    """A configuration or provider file is malformed; the message names file and line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line

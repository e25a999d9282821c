"""Sender Rewriting Scheme: forwarded mail keeps passing SPF, bounces still find the sender.

When a hosted address forwards mail to another domain (a redirect, an alias or a group
member outside), the receiving MTA checks SPF (RFC 7208) against *our* IP, so the envelope
sender must be an address of ours.  SRS (Shevek, "Sender Rewriting Scheme", 2004; the
scheme of libsrs2 and postsrsd) encodes the original sender in it, signed, so a bounce
coming back to that address can be returned to the original sender and nothing else:

* ``SRS0=HHHHHH=TT=orig.domain=orig-local@forwarder.domain`` for an ordinary sender,
* ``SRS1=HHHHHH=first.hop==HHHH=TT=orig.domain=orig-local@forwarder.domain`` when the sender
  already is an SRS0 address of another forwarder (only that forwarder can check the inner
  part, so we sign the hop and hand the bounce back to it).

``HHHHHH`` is a truncated HMAC-SHA256 (base32, lower-case: local parts may be case-folded on
the way back) over the rest, ``TT`` the day number modulo 1024 in two base32 characters.
Reversing checks the hash and, for SRS0, that the timestamp is at most ``max_age_days``
old; anything else is forged or expired and the address does not exist (RCPT: 550 5.1.1).

Pure logic, apart from :func:`load_secret` (the secret file in the state folder, created
0600 on first use).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from typing import Callable

__all__ = ["SRS", "SRSError", "is_srs", "load_secret", "SECRET_FILE"]

SECRET_FILE = "srs.secret"
_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_DAY = 24 * 3600
_TS_RANGE = 1024  # two base32 characters


class SRSError(ValueError):
    """An SRS address that is forged, expired or malformed."""


def is_srs(local: str) -> bool:
    """Does a local part look like an SRS address (``SRS0=`` / ``SRS1=``, any case)?"""
    head = local[:5].upper()
    return head in ("SRS0=", "SRS1=", "SRS0+", "SRS1+", "SRS0-", "SRS1-")


class SRS:
    """Forward and reverse SRS addresses with one secret."""

    def __init__(
        self,
        secret: bytes,
        max_age_days: int = 21,
        hash_length: int = 6,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ValueError("SRS needs a secret")
        self.secret = secret
        self.max_age_days = max_age_days
        self.hash_length = hash_length
        self.clock = clock

    # -- pieces ------------------------------------------------------------------------------

    def _hash(self, *parts: str) -> str:
        mac = hmac.new(self.secret, "\0".join(p.lower() for p in parts).encode("utf-8"), hashlib.sha256)
        return base64.b32encode(mac.digest()).decode("ascii").lower()[: self.hash_length]

    def _check_hash(self, given: str, *parts: str) -> None:
        if len(given) != self.hash_length or not hmac.compare_digest(given.lower(), self._hash(*parts)):
            raise SRSError("SRS hash does not match (forged address)")

    def _timestamp(self) -> str:
        day = int(self.clock() // _DAY) % _TS_RANGE
        return _B32[day >> 5] + _B32[day & 31]

    def _check_timestamp(self, ts: str) -> None:
        ts = ts.lower()
        if len(ts) != 2 or any(c not in _B32 for c in ts):
            raise SRSError("malformed SRS timestamp")
        then = (_B32.index(ts[0]) << 5) | _B32.index(ts[1])
        today = int(self.clock() // _DAY) % _TS_RANGE
        age = (today - then) % _TS_RANGE
        if age > self.max_age_days:
            raise SRSError(f"SRS address expired ({age} days old)")

    # -- API ---------------------------------------------------------------------------------

    def forward(self, sender: str, domain: str) -> str:
        """The envelope sender to use when forwarding mail from ``sender`` via ``domain``.

        ``<>`` stays ``<>`` (a bounce is never rewritten), an address already in ``domain``
        is kept, an SRS0/SRS1 address of someone else becomes SRS1.
        """
        if not sender:
            return sender
        local, at, orig_domain = sender.rpartition("@")
        if not at or not local:
            raise SRSError(f"cannot rewrite {sender!r}")
        if orig_domain.lower() == domain.lower():
            return sender
        head = local[:4].upper()
        if head == "SRS0" and len(local) > 5:
            # someone else's SRS0: sign their hop and keep their part for them to check
            rest = local[4:]  # "=HHHH=TT=domain=local"
            h = self._hash(orig_domain, rest)
            return f"SRS1={h}={orig_domain}={rest}@{domain}"
        if head == "SRS1" and len(local) > 5:
            # SRS1=HHHH=firsthop==...: keep the first hop, re-sign
            parts = local[5:].split("=", 2)
            if len(parts) == 3:
                _, first_hop, rest = parts
                h = self._hash(first_hop, rest)
                return f"SRS1={h}={first_hop}={rest}@{domain}"
        ts = self._timestamp()
        h = self._hash(ts, orig_domain, local)
        return f"SRS0={h}={ts}={orig_domain}={local}@{domain}"

    def reverse(self, address: str) -> str:
        """The address a bounce to ``address`` must go to; raises SRSError if forged/expired."""
        local, at, _ = address.rpartition("@")
        if not at or not is_srs(local):
            raise SRSError("not an SRS address")
        kind = local[:4].upper()
        body = local[5:]
        if kind == "SRS0":
            parts = body.split("=", 3)
            if len(parts) != 4 or not all(parts):
                raise SRSError("malformed SRS0 address")
            h, ts, orig_domain, orig_local = parts
            self._check_hash(h, ts, orig_domain, orig_local)
            self._check_timestamp(ts)
            return f"{orig_local}@{orig_domain}"
        parts = body.split("=", 2)
        if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].startswith("="):
            raise SRSError("malformed SRS1 address")
        h, first_hop, rest = parts
        self._check_hash(h, first_hop, rest)
        # the first forwarder checks its own SRS0 part (we cannot)
        return f"SRS0{rest}@{first_hop}"


def load_secret(state_dir: str) -> bytes:
    """The SRS secret in ``state_dir/srs.secret``; created (0600, 32 random bytes, hex) on
    first use.  BLOCKING (a small file; call at start-up)."""
    path = os.path.join(state_dir, SECRET_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read().strip()
        if data:
            return data
    except FileNotFoundError:
        pass
    os.makedirs(state_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if another process created it meanwhile: theirs wins, both agree
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path, "rb") as f:
        return f.read().strip()

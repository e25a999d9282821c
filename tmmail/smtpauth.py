"""AUTH for the SMTP server (RFC 4954): PLAIN (RFC 4616) and LOGIN, with initial response.

A mixin of tmmail.smtpsession.SMTPSession: it uses the session's state (``auth``, ``tx``,
``helo``, ``_mode``, ``_sasl``) and the shared tmmail.cred.Authenticator of the factory, which
throttles failures.  Only offered over TLS unless ``settings.smtp.allow_plaintext_auth``.
Malformed SASL data is ``501 5.5.2`` and the session goes on; ``*`` cancels (``501 5.0.0``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from tmmail import smtpreplies as R
from tmmail.cred import LoginBlocked, LoginFailed

log = Logger(namespace="tmmail.smtpserver")


class AuthCommands:
    """``AUTH`` and the SASL exchange that follows it."""

    auth: Any
    factory: Any
    client_ip: str

    def do_AUTH(self, arg: str) -> Any:
        if self.helo is None:
            return R.S503_HELO_FIRST
        if self.auth is not None:
            return R.S503_ALREADY_AUTHENTICATED
        if self.tx is not None:
            return R.S503_AUTH_IN_TRANSACTION
        if self.factory.authenticator is None:
            return R.S502_NOT_IMPLEMENTED
        if not self._auth_available():
            return R.S530_STARTTLS_FIRST
        mech, _, initial = arg.partition(" ")
        mech = mech.upper() if mech.isascii() else ""  # "PLA\u0131N".upper() == "PLAIN"
        initial = initial.strip(" ")
        if mech not in ("PLAIN", "LOGIN"):
            return R.S504_BAD_MECHANISM
        if not initial:
            self._sasl = (mech, "user" if mech == "LOGIN" else "plain")
            self._mode = "auth"
            return R.S334_USERNAME if mech == "LOGIN" else R.S334_EMPTY
        if mech == "PLAIN":
            return self._auth_plain(initial)
        user = _b64(initial)
        if user is None:
            return R.S501_AUTH_MALFORMED
        self._sasl = ("LOGIN", "password:" + user)
        self._mode = "auth"
        return R.S334_PASSWORD

    def _sasl_response(self, raw: bytes) -> Any:
        mech, step = self._sasl or ("", "")
        self._sasl = None
        self._mode = "command"
        try:
            text = raw.decode("ascii").strip(" ")
        except UnicodeDecodeError:
            return R.S501_AUTH_MALFORMED
        if text == "*":
            return R.S501_AUTH_CANCELLED
        if mech == "PLAIN":
            return self._auth_plain(text)
        if step == "user":
            user = _b64(text)
            if user is None:
                return R.S501_AUTH_MALFORMED
            self._sasl = ("LOGIN", "password:" + user)
            self._mode = "auth"
            return R.S334_PASSWORD
        password = _b64(text)
        if password is None or not step.startswith("password:"):
            return R.S501_AUTH_MALFORMED
        return self._authenticate(step[len("password:") :], password)

    def _auth_plain(self, text: str) -> Any:
        decoded = _b64(text)
        if decoded is None:
            return R.S501_AUTH_MALFORMED
        parts = decoded.split("\0")
        if len(parts) != 3 or not parts[1]:
            return R.S501_AUTH_MALFORMED
        authzid, login, password = parts
        if authzid and authzid.lower() != login.lower():
            log.warn("AUTH PLAIN with foreign authorization id from {client_ip}", client_ip=self.client_ip)
            return R.S535_AUTH_FAILED
        return self._authenticate(login, password)

    def _authenticate(self, login: str, password: str) -> Any:
        d = self.factory.authenticator.authenticate(login, password, self.client_ip)

        def ok(entry: Any) -> str:
            if self.closing:
                return R.S235_AUTH_OK
            self.auth = entry
            log.info("AUTH {login} from {client_ip}", login=entry.login, client_ip=self.client_ip)
            return R.S235_AUTH_OK

        def failed(f: Failure) -> str:
            if f.check(LoginBlocked):
                return R.S454_AUTH_BLOCKED
            if f.check(LoginFailed):
                return R.S535_AUTH_FAILED
            log.failure("authenticator error for {client_ip}", f, client_ip=self.client_ip)
            return R.S454_AUTH_TEMPORARY

        d.addCallbacks(ok, failed)
        return d

def _b64(text: str) -> str | None:
    """Decode a SASL base64 string to UTF-8 text; "=" is the empty response (RFC 4954 §4)."""
    if text == "=":
        return ""
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None

"""Relay, access and sender-identity decisions for the SMTP server.

Pure logic over one provider snapshot (tmmail.providers.Providers) and the parsed paths of
tmmail.smtppath; no reactor, no I/O.  Every "may this client do that?" of the SMTP server is
answered here and nowhere else, so it can be tested exhaustively:

* connection: SMTP-DENY masks refuse the client at the greeting; deny wins over SMTP-ACCESS.
* relaying (RFC 5321 §3.6.2, RFC 2505 §2): only authenticated sessions or clients matching
  SMTP-ACCESS may send to non-hosted domains.  Sender-specified routing (source routes,
  ``%``/``!`` local parts, quoted ``@``) and IP-literal recipients are never honoured.
* banned senders: SMTP-BLACKLIST, globally (``*``) or per hosted target domain.
* sender identity (RFC 6409 §6.1): an authenticated mailbox may use only its own address,
  aliases resolving to it and its SENDERS.tab entries; the post office option
  ``sender_policy`` chooses refuse (553 5.7.1) or rewrite to the primary address.
* anti-spoofing: unauthenticated port-25 mail claiming a hosted sender domain from a client
  not in SMTP-ACCESS is refused, unless the domain has ``anti_spoofing=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tmmail import smtpreplies as R
from tmmail.address import mask_matches
from tmmail.smtpdata import FromPolicy
from tmmail.smtppath import Path

#: resolve(providers, address) -> object with ``kind`` and ``targets`` (tmmail.router.resolve)
Resolver = Callable[[Any, str], Any]

SENDER_POLICIES = ("refuse", "rewrite")


@dataclass(frozen=True)
class Verdict:
    """Accept (``reply == ""``) or refuse with a full reply line; ``reason`` is for the log."""

    reply: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.reply == ""


ACCEPT = Verdict()


def _refuse(reply: str, reason: str) -> Verdict:
    return Verdict(reply, reason)


# -- connections and relaying -------------------------------------------------------------


def ip_denied(snap: Any, client_ip: str) -> bool:
    """Does an enabled SMTP-DENY mask match the client?"""
    return any(e.matches(client_ip) for e in snap.smtp_deny)


def ip_relay_allowed(snap: Any, client_ip: str) -> bool:
    """May the client relay without authentication (SMTP-ACCESS, and not denied)?"""
    if ip_denied(snap, client_ip):
        return False
    return any(e.matches(client_ip) for e in snap.smtp_access)


def check_connection(snap: Any, client_ip: str) -> Verdict:
    """SMTP-DENY refuses at the greeting (RFC 5321 §3.1: 554); deny wins over access."""
    if ip_denied(snap, client_ip):
        return _refuse(R.S554_DENIED_CONNECTION, "client address in SMTP-DENY")
    return ACCEPT


# -- banned sender domains ----------------------------------------------------------------


def _domain_banned(banned: str, domain: str) -> bool:
    if "*" in banned or "?" in banned:
        return mask_matches(banned, domain)
    return banned.lower() == domain.lower()


def sender_banned(snap: Any, sender_domain: str, target_domain: str | None) -> bool:
    """SMTP-BLACKLIST: is the sender domain banned for ``target_domain`` (None = globally)?"""
    if not sender_domain:
        return False
    for e in snap.smtp_blacklist:
        if e.status != 1 or not _domain_banned(e.banned_domain, sender_domain):
            continue
        if e.target_domain == "*":
            if target_domain is None:
                return True
        elif target_domain is not None and e.target_domain.lower() == target_domain.lower():
            return True
    return False


# -- sender identity ----------------------------------------------------------------------


def _mailbox_target(po: str, mailbox: str) -> str:
    return f"[SF:{po}/{mailbox}]".upper()


def explicit_senders(snap: Any, auth: Any) -> tuple[str, ...]:
    """Addresses listed for a login: its own, SENDERS.tab entries, exact aliases; lower-case.

    Order: primary first (SENDERS.tab primary, else the login), for messages and rewriting.
    """
    out: list[str] = []

    def add(address: str) -> None:
        a = address.lower()
        if a and a not in out:
            out.append(a)

    primary = primary_sender(snap, auth)
    add(primary)
    add(auth.login)
    for address in snap.senders_for(auth.postoffice, auth.mailbox):
        add(address)
    target = _mailbox_target(auth.postoffice, auth.mailbox)
    for entry in snap.address_map:
        if entry.is_mask or not entry.source.upper().startswith("[SMTP:"):
            continue
        if any(str(d).upper() == target for d in entry.destinations):
            add(entry.source[6:-1])
    return tuple(out)


def allowed_senders(snap: Any, auth: Any, resolve: Resolver, limit: int = 20) -> tuple[str, ...]:
    """The addresses to name in a refusal: the listed ones plus aliases reaching the mailbox
    through other aliases (resolved), at most ``limit``."""
    out = list(explicit_senders(snap, auth))
    for entry in snap.address_map:
        if len(out) >= limit:
            break
        if entry.is_mask or not entry.source.upper().startswith("[SMTP:"):
            continue
        address = entry.source[6:-1].lower()
        if address not in out and any(d.scheme == "SMTP" for d in entry.destinations):
            if may_send_as(snap, auth, address, resolve):
                out.append(address)
    return tuple(out[:limit])


def primary_sender(snap: Any, auth: Any) -> str:
    """The primary outgoing address: the SENDERS.tab primary entry, else the login."""
    key = (auth.postoffice.upper(), auth.mailbox.upper())
    for s in snap.senders:
        if s.primary and (s.postoffice.upper(), s.mailbox.upper()) == key:
            return s.address
    return auth.login


def may_send_as(snap: Any, auth: Any, address: str, resolve: Resolver) -> bool:
    """May the authenticated mailbox use ``address`` (MAIL FROM or header From:)?

    Listed addresses, or an address with an exact ADDRESS-MAP entry that resolves (through
    any chain of aliases) to this mailbox.  A catch-all mask alone never grants an address.
    """
    if address == "":
        return True
    address = address.lower()
    if address in explicit_senders(snap, auth):
        return True
    if not snap.map_exact(address):
        return False
    resolution = resolve(snap, address)
    if getattr(resolution, "kind", "") != "local":
        return False
    target = _mailbox_target(auth.postoffice, auth.mailbox)
    return any(str(t).upper() == target for t in resolution.targets)


def sender_policy_of(snap: Any, auth: Any) -> str:
    """The post office option sender_policy: "refuse" (default) or "rewrite"."""
    po = snap.postoffice(auth.postoffice)
    value = (po.options.get("sender_policy", "") if po is not None else "").strip().lower()
    return value if value in SENDER_POLICIES else "refuse"


def anti_spoofing_applies(snap: Any, domain: str) -> bool:
    """Is ``domain`` hosted and not opted out with DOMAINS option ``anti_spoofing=0``?"""
    if not snap.is_hosted_domain(domain):
        return False
    d = snap.domain(domain)
    opt = d.options.get("anti_spoofing", "1").strip().lower() if d is not None else "1"
    return opt not in ("0", "no", "false", "off")


@dataclass(frozen=True)
class SenderDecision:
    """The outcome of MAIL FROM: a verdict, the sender to store, and the From: header rule."""

    verdict: Verdict
    sender: str = ""
    #: header From: check for authenticated sessions (None: no check)
    from_policy: FromPolicy | None = None
    rewritten: bool = False


def check_sender(
    snap: Any,
    path: Path,
    *,
    role: str,
    client_ip: str,
    auth: Any | None,
    anti_spoofing: bool,
    resolve: Resolver,
) -> SenderDecision:
    """Decide MAIL FROM (RFC 5321 §4.1.1.2) for this session."""
    sender = path.address
    if sender_banned(snap, path.domain, None):
        return SenderDecision(
            _refuse(R.S554_SENDER_BLACKLISTED.format(address=sender), "sender domain blacklisted")
        )
    if auth is not None:
        mode = sender_policy_of(snap, auth)
        primary = primary_sender(snap, auth)
        from_policy = FromPolicy(
            allowed=lambda address: bool(address) and may_send_as(snap, auth, address, resolve),
            mode=mode,
            rewrite_to=primary,
        )
        if may_send_as(snap, auth, sender, resolve):
            return SenderDecision(ACCEPT, sender, from_policy)
        if mode == "rewrite":
            return SenderDecision(ACCEPT, primary, from_policy, rewritten=True)
        return SenderDecision(
            _refuse(
                R.S553_SENDER_NOT_OWNED.format(
                    address=sender, login=auth.login, allowed=", ".join(allowed_senders(snap, auth, resolve))
                ),
                "sender address not owned",
            )
        )
    if (
        anti_spoofing
        and role == "smtp"
        and sender
        and anti_spoofing_applies(snap, path.domain)
        and not ip_relay_allowed(snap, client_ip)
    ):
        return SenderDecision(
            _refuse(R.S550_SPOOFED_SENDER.format(address=sender), "unauthenticated hosted sender")
        )
    return SenderDecision(ACCEPT, sender)


# -- recipients ---------------------------------------------------------------------------


def check_recipient(
    snap: Any,
    path: Path,
    *,
    sender_domain: str,
    relay_ok: bool,
    resolve: Resolver,
) -> Verdict:
    """Decide RCPT TO (RFC 5321 §4.1.1.3): local, unknown local (550 5.1.1), relay or refuse.

    ``relay_ok``: the session is authenticated or the client matches SMTP-ACCESS.
    """
    address = path.address
    if path.routing or path.ip_literal:
        if relay_ok:
            return _refuse(R.S553_ROUTING_NOT_SUPPORTED.format(address=address), "sender-specified routing")
        return _refuse(R.S554_RELAY_DENIED.format(address=address), "relay trick refused")
    if sender_banned(snap, sender_domain, path.domain):
        return _refuse(
            R.S554_SENDER_BLACKLISTED_FOR.format(address=address, domain=path.domain),
            "sender domain blacklisted for target",
        )
    resolution = resolve(snap, address)
    kind = getattr(resolution, "kind", "unknown_local")
    if kind == "local":
        return ACCEPT
    if kind == "unknown_local":
        if getattr(resolution, "loop", False):
            return _refuse(R.S550_ROUTING_LOOP.format(address=address),
                           f"routing loop: {getattr(resolution, 'reason', '')}")
        return _refuse(R.S550_UNKNOWN_USER.format(address=address), "unknown local user")
    if snap.is_hosted_domain(path.domain):
        # the router disagrees with the domain table: never relay a hosted domain
        return _refuse(R.S550_UNKNOWN_USER.format(address=address), "hosted domain not resolved")
    if relay_ok:
        return ACCEPT
    return _refuse(R.S554_RELAY_DENIED.format(address=address), "relay access denied")


# -- postmaster ----------------------------------------------------------------------------

POSTMASTER = "postmaster"


def primary_domain(snap: Any, hostname: str) -> str | None:
    """The domain a bare local part (``<Postmaster>``, ``[queue] postmaster``) belongs to.

    The host name if it is a hosted domain, else the first enabled domain in DOMAINS.tab
    (the one ``tmmail init --domain`` wrote), else None.  The host name is often a name
    like ``mail.example.com`` that is not hosted itself, and ``postmaster@mail.example.com``
    would then be relayed, i.e. refused or sent to DNS, instead of reaching anyone here.
    """
    host = (hostname or "").lower()
    if host and snap.is_hosted_domain(host):
        return host
    for name, domain in snap.domains.items():
        if domain.enabled:
            return name
    return None


def postmaster_address(snap: Any, hostname: str, configured: str = POSTMASTER) -> str:
    """The address that reaches this server's postmaster (RFC 5321 §4.5.1).

    ``configured`` is ``[queue] postmaster``: a full address is used as written (the admin
    chose it); a bare local part is taken in :func:`primary_domain` (the host name when no
    domain is hosted at all).  Used for ``RCPT TO:<Postmaster>`` and for the reports about
    mail that cannot be bounced, so both land where ``tmmail init`` put the postmaster.
    """
    configured = (configured or POSTMASTER).strip()
    if "@" in configured:
        return configured
    domain = primary_domain(snap, hostname) or (hostname or "localhost").lower()
    return f"{configured}@{domain}"


def bare_postmaster_path(snap: Any, hostname: str) -> Path:
    """The forward-path ``RCPT TO:<Postmaster>`` (no domain, any case) stands for.

    RFC 5321 §4.1.1.3 requires accepting it; it goes to ``postmaster@`` the primary domain,
    where ``tmmail init`` created the postmaster mailbox.  The recipient is then checked
    like any other, so it is accepted whenever the postmaster address resolves locally.
    """
    local, _, domain = postmaster_address(snap, hostname).rpartition("@")
    return Path(address=f"{local}@{domain}", local=local, domain=domain)

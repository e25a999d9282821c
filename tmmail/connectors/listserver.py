"""The list server connector: ``[LS:PO/LIST]`` targets (posts, -request, -bounces, -owner).

A post is checked against the list's posting mode (tmmail.connectors.listserver_tables):

* ``open``: anyone may post;
* ``members``: only active members (or moderators) -> others get 550 5.7.1 (a DSN);
* ``moderated``: a moderator's post is distributed; anybody else's goes *unchanged* to the
  moderators, who approve it by sending it on to the list themselves.

Distribution writes one new message into the spool (incoming/) for the active members, with
envelope sender ``LIST-bounces@domain`` (so bounces come back to the list, not the poster),
the list headers (RFC 2369, RFC 2919), the subject prefix, header and footer
(tmmail.connectors.listserver_message) and, when the poster's domain publishes a strict
DMARC policy (``p=quarantine`` or ``p=reject``, RFC 7489 §6.3), From rewritten to the list
with the poster in Reply-To.  Auto-generated mail (Auto-Submitted, Precedence: bulk/list)
and our own copies coming back (X-Loop) are dropped silently: lists must never loop.

``LIST-request``: ``subscribe`` / ``unsubscribe`` by mail with a confirmation round trip (the
token is an HMAC over action, list, address and day, so nothing is stored until confirmed),
``help``.  ``LIST-bounces``: RFC 3464 reports; each failed member's bounce count goes up, and
at ``bounce_limit`` the member is disabled.  ``LIST-owner``: forwarded to the moderators.

Everything per message (reading it, the DMARC lookup with dnspython honouring
``settings.dns.nameservers``, writing the spool and the member table) runs in a thread pool;
``deliver`` returns a Deferred at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from typing import Any, Callable, Sequence

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from tmmail.address import parse_mailbox
from tmmail.connectors import listserver_message as M
from tmmail.connectors.listserver_tables import HEADERS, LIST_MEMBERS, lists
from tmmail.envelope import Envelope
from tmmail.errors import DeliveryError, PermanentError, TransientError
from tmmail.interfaces import IConnector
from tmmail.policy import postmaster_address

log = Logger(namespace="tmmail.connectors.listserver")

E_NO_LIST = (550, "5.1.1", "No such list")
E_LIST_DISABLED = (550, "5.2.1", "List disabled")
E_MEMBERS_ONLY = (550, "5.7.1", "Only members may post to this list")
E_LIST_LOCAL = (451, "4.3.0", "List server error, will retry")

#: confirmation tokens stay valid this many days
TOKEN_DAYS = 7
DAY = 86400


class DMARCLookup:
    """``policy(domain) -> "none" | "quarantine" | "reject" | None`` via dnspython (blocking).

    Looks up ``_dmarc.DOMAIN`` TXT, then the organisational domain (the last two labels,
    ``sp=`` applying) when the domain has none (RFC 7489 §6.6.3, without the public suffix
    list).  DNS errors count as "no policy": the list then leaves From alone.
    """

    def __init__(self, nameservers: Sequence[str] = (), timeout: float = 5.0) -> None:
        import dns.nameserver
        import dns.resolver

        from tmmail.mx import parse_nameserver

        if nameservers:
            r = dns.resolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers]
        else:
            try:
                r = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration:  # pragma: no cover
                r = dns.resolver.Resolver(configure=False)
                r.nameservers = ["127.0.0.1"]
        r.lifetime = timeout
        r.timeout = max(0.5, timeout / 3)
        self._dns = r

    def _record(self, name: str) -> dict[str, str] | None:
        import dns.exception
        import dns.resolver

        try:
            answer = self._dns.resolve(f"_dmarc.{name}", "TXT")
        except (dns.exception.DNSException, OSError):
            return None
        for rr in answer:
            text = b"".join(rr.strings).decode("ascii", "replace").strip()
            if text.lower().startswith("v=dmarc1"):
                tags = {}
                for part in text.split(";"):
                    k, _, v = part.strip().partition("=")
                    tags[k.strip().lower()] = v.strip().lower()
                return tags
        return None

    def policy(self, domain: str) -> str | None:
        domain = domain.lower().rstrip(".")
        tags = self._record(domain)
        if tags is not None:
            return tags.get("p")
        labels = domain.split(".")
        if len(labels) > 2:
            tags = self._record(".".join(labels[-2:]))
            if tags is not None:
                return tags.get("sp") or tags.get("p")
        return None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@implementer(IConnector)
class ListServerConnector:
    """Serves ``[LS:PO/LIST(+role)]``; writes distributions and notices into the spool."""

    scheme = "LS"

    def __init__(
        self,
        settings: Any,
        provider_store: Any,
        spool: Any,
        reactor: Any = None,
        threadpool: Any = None,
        on_queued: Callable[[str], None] | None = None,
        dmarc: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.settings = settings
        self.hostname = settings.server.hostname
        self.store = provider_store
        self.spool = spool
        self.reactor = reactor
        self.threadpool = threadpool
        self.on_queued = on_queued
        self.clock = clock
        section = (getattr(settings, "extra", None) or {}).get("lists") or {}
        #: base URL of the one-click unsubscribe service (RFC 8058), "" = mailto only
        self.unsubscribe_url = str(section.get("unsubscribe_url", "")).rstrip("/")
        self.dmarc = dmarc if dmarc is not None else DMARCLookup(settings.dns.nameservers, settings.dns.timeout)
        self._secret: bytes | None = None

    # -- IConnector --------------------------------------------------------------------------

    def batch_key(self, target: Any) -> str:
        return str(target.value).upper()

    def deliver(self, envelope: Any, items: Sequence[tuple[Any, Any]], message_path: str) -> Any:
        pool = self.threadpool or self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, self.deliver_blocking, envelope, items, message_path)

    def deliver_blocking(self, envelope: Any, items: Sequence[tuple[Any, Any]],
                         message_path: str) -> list[DeliveryError | None]:
        done: dict[str, DeliveryError | None] = {}
        out: list[DeliveryError | None] = []
        for recipient, target in items:
            key = self.batch_key(target)
            if key not in done:
                try:
                    done[key] = self._one(envelope, target, message_path)
                except OSError as e:
                    log.error("{queue_id}: list {target}: {error}", queue_id=envelope.queue_id, target=str(target),
                              error=e)
                    done[key] = TransientError(*E_LIST_LOCAL)
            out.append(done[key])
        return out

    # -- dispatch ----------------------------------------------------------------------------

    def _one(self, env: Any, target: Any, path: str) -> DeliveryError | None:
        snap = self.store.current()
        found = lists(snap).get(target)
        if found is None:
            return PermanentError(*E_NO_LIST)
        ml, role = found
        if not ml.enabled:
            return PermanentError(*E_LIST_DISABLED)
        raw = _read(path)
        if role == "post":
            return self._post(env, ml, raw)
        if role == "request":
            return self._request(env, ml, raw)
        if role == "bounces":
            return self._bounce(env, ml, raw)
        return self._owner(env, ml, raw)

    def _queue(self, sender: str, recipients: list[str], data: bytes) -> str:
        params: dict[str, Any] = {}
        if any(b > 127 for b in data):
            params["BODY"] = "8BITMIME"
        if not all(r.isascii() for r in recipients):
            params["SMTPUTF8"] = ""
        env = self.spool.add(
            lambda qid: Envelope.new(queue_id=qid, sender=sender, recipients=recipients, helo=self.hostname,
                                     client_ip="", protocol="LOCAL", mail_params=params),
            data,
        )
        if self.on_queued is not None:
            self.reactor.callFromThread(self.on_queued, env.queue_id)
        return env.queue_id

    def _notice(self, ml: Any, to: str, subject: str, text: str, reply_to: str = "") -> None:
        """A short text mail from LIST-request (envelope sender LIST-bounces)."""
        import email.utils

        request = ml.role_address("request")
        headers = [
            f"From: {request}",
            f"To: {to}",
            f"Subject: {subject}",
            f"Date: {email.utils.formatdate(self.clock(), localtime=False, usegmt=True)}",
            f"Message-ID: {email.utils.make_msgid(domain=ml.domain)}",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ]
        if reply_to:
            headers.append(f"Reply-To: {reply_to}")
        data = ("\n".join(headers) + "\n\n" + text.rstrip("\n") + "\n").encode("utf-8")
        data = M.add_list_headers(data, address=ml.address)
        self._queue(ml.role_address("bounces"), [to], data)

    # -- posts -------------------------------------------------------------------------------

    def _poster(self, env: Any, raw: bytes) -> str:
        _, addr = M.from_address(raw)
        parsed = parse_mailbox(addr) if addr else None
        return str(parsed) if parsed is not None else env.sender

    def _post(self, env: Any, ml: Any, raw: bytes) -> DeliveryError | None:
        fields, _ = M.split_message(raw)
        if any(v.lower() == ml.address.lower() for v in M.header_values(fields, "x-loop")):
            log.info("{queue_id}: {list}: our own copy came back, dropped", queue_id=env.queue_id, list=ml.address)
            return None
        if not env.sender or M.is_auto(raw):
            log.info("{queue_id}: {list}: automatic message not distributed", queue_id=env.queue_id, list=ml.address)
            return None
        poster = self._poster(env, raw)
        # who posts is decided by the envelope sender alone (the address SPF checks and bounces
        # go to), for moderation and members-only alike: a From: header, which anyone copies,
        # never makes a post a member's or a moderator's.  A moderator approves a held post by
        # sending it on unchanged (its From: stays the poster's, MAIL FROM is the moderator's).
        candidates = {env.sender.lower()}
        is_mod = any(ml.is_moderator(a) for a in candidates)
        if ml.posting == "moderated" and not is_mod:
            moderators = list(ml.moderators)
            if not moderators:
                return PermanentError(550, "5.7.1", "This list is moderated and has no moderator")
            qid = self._queue(ml.role_address("bounces"), moderators, raw)
            log.info("{queue_id}: {list}: post by {poster} sent to the moderators as {new}", queue_id=env.queue_id,
                     list=ml.address, poster=poster, new=qid)
            return None
        if ml.posting == "members" and not is_mod:
            if not any((m := ml.member(a)) is not None and m.active for a in candidates):
                return PermanentError(*E_MEMBERS_ONLY)
        members = [m.address for m in ml.members if m.active]
        if not members:
            log.info("{queue_id}: {list}: no active members", queue_id=env.queue_id, list=ml.address)
            return None
        data = self.distribution(ml, raw, poster)
        if self.unsubscribe_url:
            # RFC 8058 one-click: the URI must name the recipient, so each member gets a copy
            for member in members:
                copy = M.add_list_headers(data, address=ml.address, one_click_url=self.one_click_url(ml, member))
                self._queue(ml.role_address("bounces"), [member], copy)
            log.info("{queue_id}: {list}: distributed to {count} member(s), one copy each", queue_id=env.queue_id,
                     list=ml.address, count=len(members))
            return None
        qid = self._queue(ml.role_address("bounces"), members, data)
        log.info("{queue_id}: {list}: distributed to {count} member(s) as {new}", queue_id=env.queue_id,
                 list=ml.address, count=len(members), new=qid)
        return None

    def one_click_token(self, ml: Any, member: str) -> str:
        """A token for the one-click URL (no expiry: old messages keep working)."""
        return hmac.new(self.secret(), f"oneclick\0{ml.address.lower()}\0{member.lower()}".encode(),
                        hashlib.sha256).hexdigest()[:32]

    def one_click_url(self, ml: Any, member: str) -> str:
        from urllib.parse import urlencode

        query = urlencode({"list": ml.address, "member": member, "token": self.one_click_token(ml, member)})
        return f"{self.unsubscribe_url}?{query}"

    def _texts(self, ml: Any) -> tuple[str, str]:
        folder = os.path.join(self.settings.state_dir, "lists", ml.target.postoffice, ml.target.name)
        out = []
        for name in ("header.txt", "footer.txt"):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    text = f.read()
            except FileNotFoundError:
                text = ""
            out.append(text.replace("{list}", ml.address).replace("{request}", ml.role_address("request")))
        return out[0], out[1]

    def distribution(self, ml: Any, raw: bytes, poster: str) -> bytes:
        """The copy the members get (list headers, prefix, texts, DMARC rewrite)."""
        data = raw
        domain = poster.rpartition("@")[2]
        if ml.dmarc_rewrite and domain and domain.lower() != ml.domain.lower():
            policy = self.dmarc.policy(domain)
            if policy in ("quarantine", "reject"):
                data = M.dmarc_rewrite(data, ml.address, ml.local)
        data = M.prefix_subject(data, ml.subject_prefix)
        header, footer = self._texts(ml)
        data = M.add_header_footer(data, header, footer)
        return M.add_list_headers(data, address=ml.address, post_allowed=True)

    # -- requests ----------------------------------------------------------------------------

    def secret(self) -> bytes:
        if self._secret is None:
            from tmmail.srs import load_secret

            self._secret = hmac.new(load_secret(self.settings.state_dir), b"tmmail-lists", hashlib.sha256).digest()
        return self._secret

    def token(self, action: str, ml: Any, address: str, day: int | None = None) -> str:
        day = int(self.clock() // DAY) if day is None else day
        mac = hmac.new(self.secret(), f"{action}\0{ml.address.lower()}\0{address.lower()}\0{day}".encode(),
                       hashlib.sha256).hexdigest()[:20]
        return f"{action[0]}{day:x}.{mac}"

    def check_token(self, token: str, ml: Any, address: str) -> str | None:
        """The confirmed action ("subscribe"/"unsubscribe") or None if invalid/expired."""
        action = {"s": "subscribe", "u": "unsubscribe"}.get(token[:1])
        head, _, _ = token[1:].partition(".")
        try:
            day = int(head, 16)
        except ValueError:
            return None
        if action is None or int(self.clock() // DAY) - day > TOKEN_DAYS:
            return None
        if hmac.compare_digest(self.token(action, ml, address, day), token):
            return action
        return None

    def _request(self, env: Any, ml: Any, raw: bytes) -> DeliveryError | None:
        if not env.sender or M.is_auto(raw):
            return None  # never answer automatic mail (RFC 3834 §2)
        who = self._poster(env, raw)
        command, arg = M.parse_command(raw)
        request = ml.role_address("request")
        if command in ("subscribe", "unsubscribe"):
            member = ml.member(who)
            if command == "subscribe" and member is not None and member.active:
                self._notice(ml, who, f"You are already subscribed to {ml.address}", "Nothing to do.")
                return None
            if command == "unsubscribe" and member is None:
                self._notice(ml, who, f"You are not subscribed to {ml.address}", "Nothing to do.")
                return None
            token = self.token(command, ml, who)
            self._notice(
                ml, who, f"confirm {token}",
                f"Someone (hopefully you) asked to {command} {who} {'to' if command == 'subscribe' else 'from'} "
                f"{ml.address}.\n\nTo confirm, reply to this message, keeping the subject, or send a message to\n"
                f"{request} with the subject: confirm {token}\n\nIf you did not ask for this, ignore this message.",
                reply_to=request,
            )
            log.info("{list}: {command} of {who} waits for confirmation", list=ml.address, command=command, who=who)
            return None
        if command == "confirm":
            action = self.check_token(arg, ml, who)
            if action is None:
                self._notice(ml, who, f"Confirmation for {ml.address} failed",
                             "The confirmation code is invalid or expired, or was sent from another address.")
                return None
            self.set_member(ml, who, action == "subscribe")
            if action == "subscribe":
                self._notice(ml, who, f"Welcome to {ml.address}",
                             f"You are now subscribed to {ml.address}.\nTo leave, send 'unsubscribe' to {request}.")
            else:
                self._notice(ml, who, f"You have left {ml.address}", f"You are no longer subscribed to {ml.address}.")
            log.info("{list}: {who} {action}d (confirmed)", list=ml.address, who=who, action=action)
            return None
        self._notice(ml, who, f"Help for {ml.address}",
                     f"Send a message to {request} with the subject\n  subscribe     to join\n"
                     f"  unsubscribe   to leave\nPosts go to {ml.address}.")
        return None

    def set_member(self, ml: Any, address: str, subscribed: bool) -> None:
        """Add (active) or remove a member in LIST-MEMBERS.tab (BLOCKING, under the tables' lock)."""
        self._edit_members(ml, lambda rows: _set_member_rows(rows, str(ml.target), address, subscribed))

    def _edit_members(self, ml: Any, change: Callable[[list[tuple[str, ...]]], list[tuple[str, ...]]]) -> None:
        from tmmail.providers import atomic_write

        with self.store.locked():
            snap = self.store.reload()
            path = self.store.path(LIST_MEMBERS)
            if not os.path.exists(path):
                atomic_write(path, HEADERS[LIST_MEMBERS].encode("utf-8"))
            self.store.write(LIST_MEMBERS, change(list(snap.rows(LIST_MEMBERS))))

    # -- bounces and owner -------------------------------------------------------------------

    def _bounce(self, env: Any, ml: Any, raw: bytes) -> DeliveryError | None:
        failed = [a for a in M.failed_recipients(raw) if ml.member(a) is not None]
        if not failed:
            log.info("{queue_id}: {list}: bounce without a member in it", queue_id=env.queue_id, list=ml.address)
            return None
        limit = ml.bounce_limit
        target = str(ml.target).upper()
        now = self.clock()

        def change(rows: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
            out = []
            for r in rows:
                if len(r) > 1 and r[0].strip().upper() == target and r[1].lower() in failed:
                    r = tuple(r) + ("",) * (5 - len(r))
                    count = bounce_count(r[3], r[4], now, ml.bounce_reset) + 1
                    status = "0" if count >= limit else (r[2] or "1")
                    if status == "0" and r[2] != "0":
                        log.info("{list}: {member} disabled after {count} bounces", list=ml.address, member=r[1],
                                 count=count)
                    r = (r[0], r[1], status, str(count), str(int(now)))
                out.append(r)
            return out

        self._edit_members(ml, change)
        return None

    def _owner(self, env: Any, ml: Any, raw: bytes) -> DeliveryError | None:
        to = list(ml.moderators) or [postmaster_address(self.store.current(), self.hostname,
                                                        self.settings.queue.postmaster)]
        self._queue(env.sender, to, raw)
        return None


def bounce_count(count: str, last: str, now: float, reset: float) -> int:
    """A member's bounce count as it stands at ``now``: 0 again once ``reset`` seconds passed
    since the last bounce (a mailbox that was full for a day is not disabled a year later)."""
    n = int(count) if count.strip().isdigit() else 0
    try:
        then = float(last) if last.strip() else None
    except ValueError:
        then = None
    if n and reset > 0 and then is not None and now - then >= reset:
        return 0
    return n


def _set_member_rows(rows: list[tuple[str, ...]], target: str, address: str, subscribed: bool) -> list[tuple[str, ...]]:
    key = target.upper()
    out = [r for r in rows if not (len(r) > 1 and r[0].strip().upper() == key and r[1].lower() == address.lower())]
    if subscribed:
        out.append((target, address, "1", "0"))
    return out

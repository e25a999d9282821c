"""``tmmail queue``: look at and act on the mail queue, also while the server runs.

Subcommands: ``list``, ``show ID``, ``flush [ID | --domain DOMAIN]``, ``hold ID``,
``release ID``, ``delete ID`` (no report) and ``bounce ID`` (a failure report to the sender).

How it works beside a running server (tmmail.runner), without a control channel:

* A message is *claimed* by renaming its ``.eml`` out of ``incoming/`` or ``deferred/`` into
  ``spool/hold/`` (then its ``.env``).  The runner moves messages the same way (``.eml``
  first), so exactly one of the two renames wins; a runner that loses finds the message gone
  and forgets it.  A message in ``active/`` is being delivered right now and is left alone
  (exit status 1: try again in a moment).
* ``hold`` leaves it in ``hold/``, where the runner never looks.
* ``release``, ``flush`` and ``bounce`` edit the claimed envelope (due now; or every pending
  recipient failed with an administrator's reply) and move the message to ``incoming/``,
  which the runner scans every ``queue.scan_interval``: it is tried (or reported on) at once.
* ``delete`` removes the claimed files (``.eml`` first, as tmmail.spool does).

Envelope edits are durable (tmp, fsync, rename, fsync dir).  Output of ``list``: one line per
recipient, tab-separated: id, queue, age, sender, recipient, state, attempts, next attempt,
last reply.
"""

from __future__ import annotations

import argparse
import datetime
import os
import secrets
import time
from typing import Any, Iterator

from tmmail.envelope import FAILED as R_FAILED
from tmmail.envelope import Envelope, EnvelopeError
from tmmail.spool import ACTIVE, BADMAIL, CORRUPT, DEFERRED, INCOMING, fsync_dir, valid_queue_id

__all__ = ["register", "HOLD", "BOUNCE_REPLY", "claim", "list_messages"]

#: held messages (not a tmmail.spool state: the runner never looks here)
HOLD = "hold"
#: the reply recorded for recipients bounced by ``tmmail queue bounce`` (RFC 3463 5.0.0)
BOUNCE_REPLY = "550 5.0.0 Returned to the sender by the mail administrator"
#: where ``list`` and ``show`` look, in this order
LISTED = (INCOMING, ACTIVE, DEFERRED, HOLD)
#: where flush/hold/release/delete/bounce may take a message from
CLAIMABLE = (INCOMING, DEFERRED)

EXIT_BUSY = 1


class QueueError(Exception):
    """A one-line error for the admin (exit status 2 unless ``status`` says otherwise)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


# -- spool access (blocking, small) -----------------------------------------------------------


def _path(root: str, state: str, qid: str, ext: str) -> str:
    return os.path.join(root, state, qid + ext)


def _load(root: str, state: str, qid: str) -> Envelope:
    with open(_path(root, state, qid, ".env"), "rb") as f:
        return Envelope.from_bytes(f.read())


def list_messages(root: str, states: tuple[str, ...] = LISTED) -> Iterator[tuple[str, str, Envelope | None]]:
    """(state, id, envelope or None if unreadable) for every message, oldest id first per state."""
    for state in states:
        try:
            names = sorted(os.listdir(os.path.join(root, state)))
        except FileNotFoundError:
            continue
        for name in names:
            if not name.endswith(".env") or not valid_queue_id(name[:-4]):
                continue
            qid = name[:-4]
            try:
                yield state, qid, _load(root, state, qid)
            except FileNotFoundError:
                continue  # moved meanwhile
            except EnvelopeError:
                yield state, qid, None


def _find(root: str, qid: str) -> str | None:
    for state in LISTED + (BADMAIL, CORRUPT):
        if os.path.exists(_path(root, state, qid, ".env")):
            return state
    return None


def _move(root: str, qid: str, src: str, dst: str) -> None:
    """``.eml`` first, then ``.env`` (the spool's rule); fsync both directories."""
    os.rename(_path(root, src, qid, ".eml"), _path(root, dst, qid, ".eml"))
    os.rename(_path(root, src, qid, ".env"), _path(root, dst, qid, ".env"))
    fsync_dir(os.path.join(root, dst))
    fsync_dir(os.path.join(root, src))


def claim(root: str, qid: str) -> Envelope:
    """Take a message out of the runner's reach into hold/; returns its envelope.

    Raises QueueError: unknown id, being delivered now (status 1), or unreadable.
    """
    if not valid_queue_id(qid):
        raise QueueError(f"bad queue id {qid!r}")
    os.makedirs(os.path.join(root, HOLD), exist_ok=True)
    if os.path.exists(_path(root, HOLD, qid, ".env")):
        return _load(root, HOLD, qid)
    for state in CLAIMABLE:
        try:
            os.rename(_path(root, state, qid, ".eml"), _path(root, HOLD, qid, ".eml"))
        except FileNotFoundError:
            continue
        # the .eml is ours: the runner can no longer take this message
        try:
            os.rename(_path(root, state, qid, ".env"), _path(root, HOLD, qid, ".env"))
        except FileNotFoundError:
            # not a complete message there (still being committed): put the data back
            os.rename(_path(root, HOLD, qid, ".eml"), _path(root, state, qid, ".eml"))
            raise QueueError(f"message {qid} is being queued right now; try again in a moment", EXIT_BUSY) from None
        fsync_dir(os.path.join(root, HOLD))
        fsync_dir(os.path.join(root, state))
        try:
            return _load(root, HOLD, qid)
        except EnvelopeError as e:
            raise QueueError(f"message {qid} has an unreadable envelope ({e}); it is in {HOLD}/") from None
    where = _find(root, qid)
    if where == ACTIVE:
        raise QueueError(f"message {qid} is being delivered right now; try again in a moment", EXIT_BUSY)
    if where is None:
        raise QueueError(f"no message {qid} in the queue")
    raise QueueError(f"message {qid} is in {where}/, not in the queue")


def _save(root: str, state: str, env: Envelope) -> None:
    """Replace an envelope durably: tmp (same directory), fsync, rename, fsync dir."""
    directory = os.path.join(root, state)
    tmp = os.path.join(directory, f".{env.queue_id}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, env.to_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, _path(root, state, env.queue_id, ".env"))
    fsync_dir(directory)


def _requeue(root: str, env: Envelope) -> None:
    """Make every pending recipient due now and hand the message to the runner (incoming/)."""
    for r in env.recipients:
        if not r.final:
            r.next_attempt = 0.0
    _save(root, HOLD, env)
    _move(root, env.queue_id, HOLD, INCOMING)


def release(root: str, qid: str) -> Envelope:
    env = claim(root, qid)
    _requeue(root, env)
    return env


def bounce(root: str, qid: str, now: float | None = None) -> tuple[Envelope, int]:
    """Fail every pending recipient; the runner sends the failure report (RFC 3464) and
    removes the message.  Returns the envelope and how many recipients were bounced."""
    env = claim(root, qid)
    now = time.time() if now is None else now
    n = 0
    for r in env.recipients:
        if not r.final:
            r.state = R_FAILED
            r.last_reply = BOUNCE_REPLY
            r.last_attempt = now
            r.remote_mta = ""
            n += 1
    _requeue(root, env)
    return env, n


def delete(root: str, qid: str) -> Envelope:
    env = claim(root, qid)
    for ext in (".eml", ".env"):
        try:
            os.unlink(_path(root, HOLD, qid, ext))
        except FileNotFoundError:
            pass
    fsync_dir(os.path.join(root, HOLD))
    return env


def _domains(env: Envelope) -> set[str]:
    out = set()
    for r in env.recipients:
        if r.final:
            continue
        address = r.target[6:-1] if r.target.upper().startswith("[SMTP:") else r.address
        out.add(address.rpartition("@")[2].lower())
    return out


# -- formatting --------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _next(r: Any, state: str, now: float) -> str:
    if r.final:
        return "-"
    if state == HOLD:
        return "held"
    if r.next_attempt <= now:
        return "now"
    return "in " + _age(r.next_attempt - now)


def _cell(text: str) -> str:
    """One tab-separated field: no tabs or line breaks inside."""
    return " ".join(str(text).split()) if any(c in str(text) for c in "\t\r\n") else str(text)


def _when(t: float) -> str:
    if not t:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _headers(path: str, limit: int = 65536) -> dict[str, str]:
    """From, To, Subject, Message-ID of a spooled message (first occurrence, unfolded)."""
    wanted = {"from", "to", "subject", "message-id", "date"}
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            head = f.read(limit)
    except OSError:
        return out
    head = head.split(b"\n\n", 1)[0]
    current = None
    for raw in head.split(b"\n"):
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if line[:1] in (" ", "\t") and current:
            out[current] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        current = None
        if sep and name.strip().lower() in wanted and name.strip().lower() not in out:
            current = name.strip().lower()
            out[current] = value.strip()
    return out


# -- commands ----------------------------------------------------------------------------------


def _root(ctx: Any) -> str:
    return ctx.settings.spool_dir


def _fail(ctx: Any, e: QueueError) -> int:
    ctx.stderr.write(f"tmmail: {e}\n")
    return e.status


def cmd_list(args: argparse.Namespace, ctx: Any) -> int:
    root = _root(ctx)
    now = time.time()
    states = LISTED + ((BADMAIL,) if args.all else ())
    count = 0
    for state, qid, env in list_messages(root, states):
        if env is None:
            ctx.out(qid, state, "-", "-", "-", "unreadable", "-", "-", "envelope cannot be read")
            count += 1
            continue
        if args.domain and args.domain.lower() not in _domains(env):
            continue
        count += 1
        sender = env.sender or "<>"
        for r in env.recipients:
            if args.pending and r.final:
                continue
            ctx.out(qid, state, _age(now - env.arrival), _cell(sender), _cell(r.address), r.state, r.attempts,
                    _next(r, state, now), _cell(r.last_reply) or "-")
    if args.summary or not count:
        ctx.stderr.write(f"{count} message{'s' if count != 1 else ''} in the queue\n")
    return 0


def cmd_show(args: argparse.Namespace, ctx: Any) -> int:
    root = _root(ctx)
    qid = args.id
    if not valid_queue_id(qid):
        return _fail(ctx, QueueError(f"bad queue id {qid!r}"))
    state = _find(root, qid)
    if state is None:
        return _fail(ctx, QueueError(f"no message {qid} in the queue"))
    try:
        env = _load(root, state, qid)
    except (EnvelopeError, FileNotFoundError) as e:
        return _fail(ctx, QueueError(f"cannot read message {qid}: {e}"))
    eml = _path(root, state, qid, ".eml")
    now = time.time()
    w = ctx.stdout.write
    w(f"Queue-ID: {qid}\n")
    w(f"Queue: {state}\n")
    w(f"Arrival: {_when(env.arrival)} ({_age(now - env.arrival)} ago)\n")
    w(f"Sender: <{env.sender}>\n")
    w(f"Origin: {env.origin}\n")
    if env.client_ip or env.helo:
        w(f"Received-From: {env.helo or '-'} [{env.client_ip or '-'}] {env.protocol}"
          + (f" as {env.auth_login}" if env.auth_login else "") + "\n")
    try:
        w(f"Size: {os.path.getsize(eml)}\n")
    except OSError:
        w("Size: (message file missing)\n")
    if env.mail_params:
        w("Parameters: " + " ".join(f"{k}={v}" if v is not True else k for k, v in env.mail_params.items()) + "\n")
    for name, value in _headers(eml).items():
        w(f"Header-{name.title()}: {value}\n")
    for r in env.recipients:
        w(f"\nRecipient: {r.address}\n")
        if r.target and r.target != r.address:
            w(f"  Target: {r.target}\n")
        w(f"  State: {r.state}\n  Attempts: {r.attempts}\n")
        w(f"  Last-Attempt: {_when(r.last_attempt)}\n")
        w(f"  Next-Attempt: {_next(r, state, now)}\n")
        if r.last_reply:
            w(f"  Last-Reply: {r.last_reply}\n")
        if r.remote_mta:
            w(f"  Remote-MTA: {r.remote_mta}\n")
        if r.notify or r.orcpt:
            w(f"  DSN: NOTIFY={','.join(r.notify or ()) or '-'} ORCPT={r.orcpt or '-'}\n")
    return 0


def cmd_flush(args: argparse.Namespace, ctx: Any) -> int:
    root = _root(ctx)
    if args.id and args.domain:
        return _fail(ctx, QueueError("give a queue id or --domain, not both"))
    if args.id:
        ids = [args.id]
    else:
        ids = [
            qid for state, qid, env in list_messages(root, (DEFERRED,))
            if env is not None and (not args.domain or args.domain.lower() in _domains(env))
        ]
    status = 0
    flushed = 0
    for qid in ids:
        try:
            release(root, qid)
            flushed += 1
        except QueueError as e:
            if args.id:
                return _fail(ctx, e)
            ctx.stderr.write(f"tmmail: {e}\n")  # busy or gone meanwhile: the rest still go
            status = max(status, 1)
    ctx.stdout.write(f"{flushed} message{'s' if flushed != 1 else ''} queued for immediate delivery\n")
    return status


def cmd_hold(args: argparse.Namespace, ctx: Any) -> int:
    try:
        claim(_root(ctx), args.id)
    except QueueError as e:
        return _fail(ctx, e)
    ctx.stdout.write(f"message {args.id} held (release it with `tmmail queue release {args.id}`)\n")
    return 0


def cmd_release(args: argparse.Namespace, ctx: Any) -> int:
    root = _root(ctx)
    if not os.path.exists(_path(root, HOLD, args.id, ".env")) and valid_queue_id(args.id):
        where = _find(root, args.id)
        if where is None:
            return _fail(ctx, QueueError(f"no message {args.id} in the queue"))
        if where != HOLD:
            ctx.stdout.write(f"message {args.id} is not held (it is in {where}/); use `tmmail queue flush` to retry now\n")
            return 0
    try:
        release(root, args.id)
    except QueueError as e:
        return _fail(ctx, e)
    ctx.stdout.write(f"message {args.id} released for immediate delivery\n")
    return 0


def cmd_delete(args: argparse.Namespace, ctx: Any) -> int:
    try:
        env = delete(_root(ctx), args.id)
    except QueueError as e:
        return _fail(ctx, e)
    pending = sum(1 for r in env.recipients if not r.final)
    ctx.stdout.write(f"message {args.id} deleted ({pending} undelivered recipient{'s' if pending != 1 else ''}; "
                     "no report sent)\n")
    return 0


def cmd_bounce(args: argparse.Namespace, ctx: Any) -> int:
    try:
        env, n = bounce(_root(ctx), args.id)
    except QueueError as e:
        return _fail(ctx, e)
    to = f"<{env.sender}>" if env.sender else "nobody (the sender is <>, so only the postmaster is told)"
    ctx.stdout.write(f"message {args.id}: {n} recipient{'s' if n != 1 else ''} returned; report to {to}\n")
    return 0


def register(subparsers: Any) -> None:
    """Add ``queue`` and its subcommands to the ``tmmail`` parser (tmmail.cli)."""
    q = subparsers.add_parser("queue", help="inspect and manage the mail queue",
                              description="Inspect and manage the mail queue (safe while the server runs).")
    sub = q.add_subparsers(dest="queue_command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", help="one line per recipient: id, queue, age, sender, recipient, "
                                    "state, attempts, next attempt, last reply")
    p.add_argument("--domain", help="only messages with pending recipients at DOMAIN")
    p.add_argument("--pending", action="store_true", help="only recipients not delivered or failed yet")
    p.add_argument("--all", action="store_true", help="include badmail/")
    p.add_argument("--summary", action="store_true", help="print the message count on stderr")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="everything about one message")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("flush", help="try deferred messages now (all, one ID, or one --domain)")
    p.add_argument("id", metavar="ID", nargs="?")
    p.add_argument("--domain", help="only messages with pending recipients at DOMAIN")
    p.set_defaults(func=cmd_flush)

    p = sub.add_parser("hold", help="stop delivery attempts for a message")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_hold)

    p = sub.add_parser("release", help="resume delivery of a held message, at once")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("delete", help="remove a message without telling the sender")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("bounce", help="give up on a message and send the sender a failure report")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_bounce)

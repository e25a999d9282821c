"""``tmmail badmail`` and ``tmmail quarantine``: messages put aside in spool/badmail/ (a recipient
resolved nowhere, a mail loop, too many hops) and spool/quarantine/ (a transfer event said so).

``list`` (one line per bad recipient: id, age, sender, recipient, last reply), ``show ID``
(the envelope and the message header), ``requeue ID`` (the bad recipients become pending
again and are routed afresh: after fixing the address map, say) and ``delete ID``.

``quarantine list|show|release|delete``: ``release`` sends the message on as it is (its
recipients keep their state) and marks it released: no transfer event (pickup or deliver)
is asked about it again, so the hook that quarantined it cannot put it back.

The runner never looks into badmail/ or quarantine/, so these commands need no claim: ``requeue`` saves the
edited envelope durably in badmail/ and then moves the message to incoming/ (``.eml`` first,
``.env`` last, as tmmail.spool does), where the running server picks it up within
``queue.scan_interval``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from tmmail.cli import CLIError
from tmmail.envelope import FAILED, PENDING, EnvelopeError
from tmmail.spool import BADMAIL, INCOMING, QUARANTINE, Spool, valid_queue_id

__all__ = ["register", "requeue"]


def _spool(ctx: Any) -> Spool:
    return Spool(ctx.settings.spool_dir)


def _load(spool: Spool, qid: str, state: str = BADMAIL) -> Any:
    if not valid_queue_id(qid):
        raise CLIError(f"bad queue id {qid!r}")
    try:
        return spool.load(state, qid)
    except FileNotFoundError:
        raise CLIError(f"no message {qid} in {state}/") from None
    except EnvelopeError as e:
        raise CLIError(f"{qid}: unreadable envelope: {e}") from None


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def cmd_list(args: argparse.Namespace, ctx: Any) -> int:
    spool = _spool(ctx)
    now = time.time()
    state = getattr(args, "state", BADMAIL)
    for qid, env in spool.iter_envelopes(state):
        if env is None:
            ctx.out(qid, "?", "?", "?", "unreadable envelope")
            continue
        bad = [r for r in env.recipients if r.bad] or [r for r in env.recipients if r.state == FAILED]
        if state == QUARANTINE:
            bad = [r for r in env.recipients if not r.final]
        for r in bad or env.recipients:
            ctx.out(qid, _age(now - env.arrival), env.sender or "<>", r.address, r.last_reply)
    return 0


def cmd_show(args: argparse.Namespace, ctx: Any) -> int:
    spool = _spool(ctx)
    state = getattr(args, "state", BADMAIL)
    env = _load(spool, args.id, state)
    ctx.stdout.write(env.to_bytes().decode("utf-8"))
    ctx.stdout.write("\n")
    try:
        with open(spool.message_path(state, env.queue_id), "rb") as f:
            head = f.read(64 * 1024).split(b"\n\n", 1)[0]
    except FileNotFoundError:
        raise CLIError(f"{args.id}: message data missing") from None
    ctx.stdout.write(head.decode("utf-8", "replace") + "\n")
    return 0


def requeue(spool: Spool, qid: str) -> int:
    """BLOCKING: make the bad recipients pending (routed again), move to incoming/; returns
    how many recipients were reset."""
    env = spool.load(BADMAIL, qid)
    n = 0
    for r in env.recipients:
        if r.bad or (r.state == FAILED and not r.target):
            r.state = PENDING
            r.bad = False
            r.target = ""
            r.attempts = 0
            r.next_attempt = 0.0
            r.last_reply = ""
            r.reported = False
            n += 1
    spool.save(BADMAIL, env)
    spool.move(qid, BADMAIL, INCOMING)
    return n


def cmd_requeue(args: argparse.Namespace, ctx: Any) -> int:
    spool = _spool(ctx)
    _load(spool, args.id)
    n = requeue(spool, args.id)
    if n == 0:
        ctx.stdout.write(f"{args.id}: no bad recipients; moved to incoming/ anyway\n")
    else:
        ctx.stdout.write(f"{args.id}: {n} recipient(s) queued again for routing\n")
    return 0


def cmd_delete(args: argparse.Namespace, ctx: Any) -> int:
    spool = _spool(ctx)
    state = getattr(args, "state", BADMAIL)
    _load(spool, args.id, state)
    spool.remove(args.id, state)
    ctx.stdout.write(f"{args.id}: deleted\n")
    return 0


def release(spool: Spool, qid: str) -> None:
    """BLOCKING: mark a quarantined message released (no hooks again), move it to incoming/."""
    env = spool.load(QUARANTINE, qid)
    env.checked = True
    env.released = True
    now = time.time()
    for r in env.recipients:
        if not r.final:
            r.next_attempt = min(r.next_attempt, now)
    spool.save(QUARANTINE, env)
    spool.move(qid, QUARANTINE, INCOMING)


def cmd_release(args: argparse.Namespace, ctx: Any) -> int:
    spool = _spool(ctx)
    _load(spool, args.id, QUARANTINE)
    release(spool, args.id)
    ctx.stdout.write(f"{args.id}: released (the server delivers it within a moment)\n")
    return 0


def register(subparsers: Any) -> None:
    bp = subparsers.add_parser("badmail", help="messages kept in spool/badmail/")
    bs = bp.add_subparsers(dest="action", metavar="ACTION")
    bs.required = True
    bs.add_parser("list", help="list bad mail (one line per bad recipient)").set_defaults(func=cmd_list)
    for name, func, text in (
        ("show", cmd_show, "show a message's envelope and header"),
        ("requeue", cmd_requeue, "route the bad recipients again (after fixing the tables)"),
        ("delete", cmd_delete, "delete a message"),
    ):
        p = bs.add_parser(name, help=text)
        p.add_argument("id", metavar="ID")
        p.set_defaults(func=func)

    qp = subparsers.add_parser("quarantine", help="messages put aside by a transfer event (spool/quarantine/)")
    qs = qp.add_subparsers(dest="action", metavar="ACTION")
    qs.required = True
    qs.add_parser("list", help="list quarantined messages").set_defaults(func=cmd_list, state=QUARANTINE)
    for name, func, text in (
        ("show", cmd_show, "show a message's envelope and header"),
        ("release", cmd_release, "deliver it after all (no transfer event is asked again)"),
        ("delete", cmd_delete, "delete a message"),
    ):
        p = qs.add_parser(name, help=text)
        p.add_argument("id", metavar="ID")
        p.set_defaults(func=func, state=QUARANTINE)

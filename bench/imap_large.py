#!/usr/bin/env python3
"""Large-mailbox IMAP latencies: a 20,000-message INBOX.

Times LOGIN+SELECT (first and second session), `UID FETCH 1:* (FLAGS)`, `SEARCH UNSEEN`, one
`BODY[]`, and the server's RSS.  Each command is timed raw (sent with imaplib's send/readline,
no response parsing: close to pure server time).  Same method as ../shared/peers/bench_imap_large.py
so the figures sit beside Dovecot's from the same run.

  bench/imap_large.py --spawn [-n 20000]           # throw-away TMmail, Maildir filled directly
  bench/imap_large.py --spawn --peer-dovecot --reps 7   # and the peer Dovecot (user large), alternating
  bench/imap_large.py --host H --port P --user U --password PW [--pid PID]
"""

from __future__ import annotations

import argparse
import imaplib
import os
import random
import ssl
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def populate(maildir: str, count: int, seen_fraction: float = 0.5, seed: int = 1) -> None:
    """Write messages straight into the Maildir (as an MDA would), half of them seen."""
    rnd = random.Random(seed)
    host = "bench"
    now = int(time.time()) - count
    for i in range(1, count + 1):
        body = " ".join(rnd.choice(WORDS) for _ in range(100)) + "\n"
        data = (f"From: sender{i % 50}@example.test\nTo: large@example.com\nSubject: probe message {i}\n"
                f"Message-ID: <probe-{i}@example.test>\nDate: Mon, 2 Nov 2026 10:00:00 +0000\n\n{body}").encode()
        base = f"{now + i}.M{i}P1Q{i}.{host}"
        seen = rnd.random() < seen_fraction
        sub, suffix = ("cur", ":2,S") if seen else ("new", "")
        vsize = len(data) + data.count(b"\n")
        name = f"{base},S={len(data)},W={vsize}{suffix}"
        tmp = os.path.join(maildir, "tmp", base)
        with open(tmp, "wb") as f:
            f.write(data)
        os.utime(tmp, (now + i, now + i))
        os.rename(tmp, os.path.join(maildir, sub, name))


_tag = [0]


def raw(m: imaplib.IMAP4, command: str) -> float:
    _tag[0] += 1
    tag = b"R%04d" % _tag[0]
    t0 = time.perf_counter()
    m.send(tag + b" " + command.encode() + b"\r\n")
    while True:
        line = m.readline()
        if not line:
            raise RuntimeError("connection closed")
        if line.startswith(tag + b" "):
            if not line[len(tag) + 1:].upper().startswith(b"OK"):
                raise RuntimeError(f"{command}: {line!r}")
            return time.perf_counter() - t0
        s = line.rstrip(b"\r\n")
        if s.endswith(b"}") and b"{" in s:
            m.read(int(s[s.rindex(b"{") + 1:-1]))


def session(host: str, port: int, user: str, password: str) -> dict[str, float]:
    out: dict[str, float] = {}
    m = imaplib.IMAP4(host, port, timeout=300)
    if "LOGINDISABLED" in m.capabilities:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        m.starttls(ctx)
    t0 = time.perf_counter()
    m.login(user, password)
    typ, data = m.select("INBOX")
    out["login_select"] = time.perf_counter() - t0
    exists = int(data[0])
    out["uid_fetch_flags"] = raw(m, "UID FETCH 1:* (FLAGS)")
    out["search_unseen"] = raw(m, "SEARCH UNSEEN")
    out["body"] = raw(m, f"FETCH {max(1, exists // 2)} BODY.PEEK[]")
    m.logout()
    out["exists"] = exists
    return out


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def peer_populate(count: int, maildir: str = "/tmp/peer/mail/large/Maildir", owner: int = 5000) -> None:
    """The same messages into the peer Dovecot's Maildir, its index files removed (cold start)."""
    import shutil

    for sub in ("new", "cur", "tmp"):
        shutil.rmtree(os.path.join(maildir, sub), ignore_errors=True)
        os.makedirs(os.path.join(maildir, sub))
    for name in os.listdir(maildir):
        if name.startswith("dovecot"):
            path = os.path.join(maildir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    populate(maildir, count)
    for top, dirs, files in os.walk(os.path.dirname(maildir)):
        for name in dirs + files:
            os.chown(os.path.join(top, name), owner, owner)
    os.chown(os.path.dirname(maildir), owner, owner)


KEYS = ("login_select", "uid_fetch_flags", "search_unseen", "body")


def line(label: str, first: dict[str, float], second: dict[str, float]) -> str:
    return (f"{label:8s} exists={first['exists']} first: login+select={first['login_select'] * 1000:.1f}ms "
            f"second: login+select={second['login_select'] * 1000:.1f}ms "
            f"uid_fetch_flags={second['uid_fetch_flags'] * 1000:.1f}ms "
            f"search_unseen={second['search_unseen'] * 1000:.1f}ms body={second['body'] * 1000:.2f}ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2143)
    ap.add_argument("--user", default="large@example.com")
    ap.add_argument("--password", default="pass")
    ap.add_argument("--pid", type=int)
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--spawn", action="store_true")
    ap.add_argument("--peer-dovecot", action="store_true",
                    help="also measure the peer Dovecot (127.0.0.1:10143, user large, pass), alternating")
    args = ap.parse_args()
    imaplib._MAXLINE = 10_000_000
    srv = None
    if args.spawn:
        from tests.server import Server

        srv = Server(tempfile.mkdtemp(prefix="tmmail-bench-")).init("[imap]\nallow_plaintext_auth = true\n")
        srv.add_mailbox(args.user, args.password)
        populate(srv.maildir(args.user), args.n)
        srv.start(roles=("imap",))
        args.port = srv.ports["imap"]
        args.pid = srv.proc.pid
    targets = [("tmmail" if srv else "server", args.host, args.port, args.user, args.password)]
    if args.peer_dovecot:
        peer_populate(args.n)
        targets.append(("dovecot", "127.0.0.1", 10143, "large", "pass"))
    try:
        rows: dict[str, list[tuple[dict, dict]]] = {t[0]: [] for t in targets}
        for rep in range(args.reps):
            for label, host, port, user, password in targets:
                first = session(host, port, user, password)
                second = session(host, port, user, password)
                rows[label].append((first, second))
                print(f"rep={rep + 1} " + line(label, first, second), flush=True)
        for label, got in rows.items():
            med = lambda k, i: statistics.median(r[i][k] for r in got) * 1000  # noqa: E731
            print(f"MEDIAN {label:8s} cold_first_login_select={got[0][0]['login_select'] * 1000:.1f}ms "
                  f"first_login_select={med('login_select', 0):.1f}ms "
                  f"second_login_select={med('login_select', 1):.1f}ms uid_fetch_flags={med('uid_fetch_flags', 1):.1f}ms "
                  f"search_unseen={med('search_unseen', 1):.1f}ms body={med('body', 1):.2f}ms"
                  + (f" rss={rss_kib(args.pid) / 1024:.1f}MiB" if args.pid and label != "dovecot" else ""))
        if len(rows) == 2:
            a, b = (rows[t[0]] for t in targets)
            ratios = []
            for k in KEYS:
                ma = statistics.median(r[1][k] for r in a)
                mb = statistics.median(r[1][k] for r in b)
                ratios.append(f"{k}={ma / mb:.2f}x")
            print("RATIO tmmail/dovecot (second session): " + " ".join(ratios))
    finally:
        if srv:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

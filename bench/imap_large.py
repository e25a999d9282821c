#!/usr/bin/env python3
"""Large-mailbox IMAP latencies: a 20,000-message INBOX.

Times LOGIN+SELECT (first and second session), `UID FETCH 1:* (FLAGS)`, `SEARCH UNSEEN`, one
`BODY[]`, and the server's RSS.  Each command is timed raw (sent with imaplib's send/readline,
no response parsing: close to pure server time).  Same method as ../shared/peers/bench_imap_large.py
so the figures sit beside Dovecot's from the same run.

  bench/imap_large.py --spawn [-n 20000]           # throw-away TMmail, Maildir filled directly
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
    try:
        rows = []
        for rep in range(args.reps):
            first = session(args.host, args.port, args.user, args.password)
            second = session(args.host, args.port, args.user, args.password)
            rows.append((first, second))
            print(f"rep={rep + 1} exists={first['exists']} first: login+select={first['login_select'] * 1000:.1f}ms "
                  f"second: login+select={second['login_select'] * 1000:.1f}ms "
                  f"uid_fetch_flags={second['uid_fetch_flags'] * 1000:.1f}ms "
                  f"search_unseen={second['search_unseen'] * 1000:.1f}ms body={second['body'] * 1000:.2f}ms",
                  flush=True)
        med = lambda k, i: statistics.median(r[i][k] for r in rows) * 1000  # noqa: E731
        print(f"MEDIAN first_login_select={med('login_select', 0):.1f}ms "
              f"second_login_select={med('login_select', 1):.1f}ms uid_fetch_flags={med('uid_fetch_flags', 1):.1f}ms "
              f"search_unseen={med('search_unseen', 1):.1f}ms body={med('body', 1):.2f}ms"
              + (f" rss={rss_kib(args.pid) / 1024:.1f}MiB" if args.pid else ""))
    finally:
        if srv:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

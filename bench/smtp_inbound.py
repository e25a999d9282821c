#!/usr/bin/env python3
"""Inbound SMTP throughput and latency: N messages of S bytes over C concurrent sessions.

Reports accepted msgs/s (all 250s received), delivered msgs/s (all files in the Maildir) and
p50/p99 time-to-250 (from MAIL FROM to the 250 after the final dot).  Every session reuses its
connection for its share of the messages, as Postfix's smtp-source -d does not (it reconnects);
pass --reconnect to open a connection per message like smtp-source's default.

  bench/smtp_inbound.py --port 2525 --rcpt bench@example.com --maildir var/postoffices/EXAMPLE/bench/Maildir
  bench/smtp_inbound.py --spawn            # init a throw-away server in a temp dir and measure it
"""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def count(maildir: str) -> int:
    n = 0
    for sub in ("new", "cur"):
        try:
            n += len(os.listdir(os.path.join(maildir, sub)))
        except FileNotFoundError:
            pass
    return n


def run(host: str, port: int, rcpt: str, maildir: str | None, n: int, size: int, sessions: int,
        reconnect: bool, timeout: float) -> dict:
    body = ("x" * 72 + "\r\n") * max(1, size // 74)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    per = [n // sessions + (1 if i < n % sessions else 0) for i in range(sessions)]
    base = count(maildir) if maildir else 0
    deadline = time.monotonic() + timeout

    def worker(k: int, m: int) -> None:
        s = None
        for i in range(m):
            if time.monotonic() > deadline:
                return
            msg = f"From: bench@client.test\r\nTo: {rcpt}\r\nSubject: bench {k}-{i}\r\n\r\n{body}"
            try:
                if s is None:
                    s = smtplib.SMTP(host, port, timeout=60)
                    s.ehlo("bench.client.test")
                t0 = time.perf_counter()
                try:
                    s.sendmail("bench@client.test", [rcpt], msg)
                except (smtplib.SMTPSenderRefused, smtplib.SMTPServerDisconnected) as e:
                    # the server's messages-per-session limit (421 at MAIL): a new session
                    # sends it, as a real client does; anything else is an error
                    if getattr(e, "smtp_code", 421) != 421:
                        raise
                    s = smtplib.SMTP(host, port, timeout=60)
                    s.ehlo("bench.client.test")
                    t0 = time.perf_counter()
                    s.sendmail("bench@client.test", [rcpt], msg)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                if reconnect:
                    s.quit()
                    s = None
            except (OSError, smtplib.SMTPException):
                with lock:
                    errors[0] += 1
                s = None
        if s is not None:
            s.quit()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k, m)) for k, m in enumerate(per)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_accept = time.perf_counter() - t0
    delivered = None
    t_done = None
    if maildir:
        while count(maildir) - base < len(latencies) and time.monotonic() < deadline:
            time.sleep(0.05)
        t_done = time.perf_counter() - t0
        delivered = count(maildir) - base
    lat = sorted(latencies)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {
        "n": n, "size": size, "sessions": sessions, "accepted": len(lat), "errors": errors[0],
        "accept_mps": len(lat) / t_accept if t_accept else 0.0,
        "done_mps": (delivered / t_done) if delivered else None,
        "p50_ms": q(0.50), "p99_ms": q(0.99),
        "mean_ms": statistics.mean(lat) * 1000 if lat else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2525)
    ap.add_argument("--rcpt", default="bench@example.com")
    ap.add_argument("--maildir", help="count deliveries here (optional)")
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("-s", "--size", type=int, default=2048)
    ap.add_argument("-c", "--sessions", type=int, nargs="+", default=[1, 10, 20])
    ap.add_argument("--reconnect", action="store_true")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--spawn", action="store_true", help="start a throw-away TMmail and measure it")
    args = ap.parse_args()
    srv = None
    if args.spawn:
        from tests.server import Server

        srv = Server(tempfile.mkdtemp(prefix="tmmail-bench-")).init()
        srv.add_mailbox(args.rcpt, "bench")
        srv.start(roles=("smtp",))
        args.port = srv.ports["smtp"]
        args.maildir = srv.maildir(args.rcpt)
    try:
        for c in args.sessions:
            r = run(args.host, args.port, args.rcpt, args.maildir, args.n, args.size, c, args.reconnect,
                    args.timeout)
            done = f"{r['done_mps']:.0f}" if r["done_mps"] else "-"
            print(f"sessions={c:3d} n={r['n']} size={r['size']} accepted={r['accepted']} errors={r['errors']} "
                  f"accept_mps={r['accept_mps']:.0f} delivered_mps={done} "
                  f"p50={r['p50_ms']:.1f}ms p99={r['p99_ms']:.1f}ms", flush=True)
    finally:
        if srv:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

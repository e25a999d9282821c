#!/usr/bin/env python3
"""POP3 retrieval rate: RETR every message of a mailbox (1,000 by default), 5 rounds; msgs/s.

  bench/pop3_retrieve.py --port 2110 --user bench@example.com --password pw [--stls]
  bench/pop3_retrieve.py --spawn     # throw-away TMmail with 1,000 messages delivered over SMTP
"""

from __future__ import annotations

import argparse
import os
import poplib
import smtplib
import ssl
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def retrieve_all(host: str, port: int, user: str, password: str, stls: bool) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    pop = poplib.POP3(host, port, timeout=60)
    if stls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        pop.stls(ctx)
    pop.user(user)
    pop.pass_(password)
    count, _ = pop.stat()
    nbytes = 0
    for i in range(1, count + 1):
        _, lines, octets = pop.retr(i)
        nbytes += octets
    pop.quit()
    return count, nbytes, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2110)
    ap.add_argument("--user", default="pop@example.com")
    ap.add_argument("--password", default="pass")
    ap.add_argument("--stls", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--spawn", action="store_true")
    args = ap.parse_args()
    srv = None
    if args.spawn:
        from tests.server import Server

        srv = Server(tempfile.mkdtemp(prefix="tmmail-bench-")).init("[pop3]\nallow_plaintext_auth = true")
        srv.add_mailbox(args.user, args.password)
        srv.start(roles=("smtp", "pop3"))
        args.port = srv.ports["pop3"]
        body = ("y" * 72 + "\r\n") * 28
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=60) as s:
            for i in range(args.messages):
                s.sendmail("b@client.test", [args.user], f"Subject: pop {i}\r\n\r\n{body}")
        maildir = srv.maildir(args.user)
        srv.wait_for(lambda: len(os.listdir(os.path.join(maildir, "new"))) >= args.messages, timeout=300)
    try:
        rates = []
        for r in range(args.rounds):
            n, nbytes, dt = retrieve_all(args.host, args.port, args.user, args.password, args.stls)
            rates.append(n / dt)
            print(f"round={r + 1} messages={n} bytes={nbytes} seconds={dt:.3f} msgs_per_s={n / dt:.0f}", flush=True)
        rates.sort()
        print(f"median msgs_per_s={rates[len(rates) // 2]:.0f}")
    finally:
        if srv:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

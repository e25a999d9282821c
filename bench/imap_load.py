#!/usr/bin/env python3
"""IMAP under load: C concurrent clients for T seconds doing a realistic mix; ops/s and errors.

The mix per client loop: LOGIN, SELECT INBOX, FETCH headers of the last 20, FETCH two bodies,
STORE +FLAGS \\Seen, APPEND a message, SEARCH UNSEEN, EXPUNGE of a flagged-deleted message,
LOGOUT.  Each IMAP command counts as one op.  Then the RSS of N idle IDLEing connections.
With --spawn the server allows plaintext login, as the Dovecot peer does, so both are measured
without a TLS handshake per loop (with STARTTLS each loop the handshake dominates).

  bench/imap_load.py --spawn [-c 10] [-t 30] [--idle 500]
  bench/imap_load.py --port P --user-format 'test{n}@example.com' --password pass --users 10
"""

from __future__ import annotations

import argparse
import imaplib
import os
import socket
import ssl
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def tls_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(host: str, port: int) -> imaplib.IMAP4:
    m = imaplib.IMAP4(host, port, timeout=60)
    if "LOGINDISABLED" in m.capabilities:
        m.starttls(tls_ctx())
    return m


MSG = (b"From: load@client.test\r\nTo: user@example.com\r\nSubject: load test\r\n\r\n"
       + b"line of text for the load test\r\n" * 40)


def client(host: str, port: int, user: str, password: str, until: float, counts: list[int], k: int) -> None:
    ops = errs = 0
    while time.monotonic() < until:
        try:
            m = connect(host, port)
            m.login(user, password); ops += 1
            typ, data = m.select("INBOX"); ops += 1
            n = int(data[0])
            if n:
                lo = max(1, n - 19)
                m.fetch(f"{lo}:{n}", "(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])"); ops += 1
                m.fetch(str(n), "(BODY[])"); ops += 1
                m.fetch(str(lo), "(BODY.PEEK[TEXT])"); ops += 1
                m.store(str(lo), "+FLAGS", "(\\Seen)"); ops += 1
            m.append("INBOX", None, None, MSG); ops += 1
            m.search(None, "UNSEEN"); ops += 1
            if n > 50:
                m.store("1", "+FLAGS", "(\\Deleted)"); ops += 1
                m.expunge(); ops += 1
            m.logout(); ops += 1
        except (imaplib.IMAP4.error, OSError):
            errs += 1
    counts[2 * k] = ops
    counts[2 * k + 1] = errs


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def idle_rss(host: str, port: int, user: str, password: str, n: int, pid: int) -> None:
    before = rss_kib(pid)
    conns = []
    for i in range(n):
        m = connect(host, port)
        m.login(user, password)
        m.select("INBOX")
        tag = m._new_tag()
        m.send(tag + b" IDLE\r\n")
        m.readline()  # "+ idling"
        conns.append(m)
    time.sleep(2)
    after = rss_kib(pid)
    print(f"idle_connections={n} rss_before={before / 1024:.1f}MiB rss_after={after / 1024:.1f}MiB "
          f"per_connection={(after - before) / n:.1f}KiB", flush=True)
    for m in conns:
        try:
            m.sock.shutdown(socket.SHUT_RDWR)
            m.sock.close()
        except OSError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2143)
    ap.add_argument("--user-format", default="test{n}@example.com")
    ap.add_argument("--password", default="pass")
    ap.add_argument("-c", "--clients", type=int, default=10)
    ap.add_argument("-t", "--seconds", type=float, default=30)
    ap.add_argument("--idle", type=int, default=500)
    ap.add_argument("--pid", type=int)
    ap.add_argument("--spawn", action="store_true")
    args = ap.parse_args()
    srv = None
    if args.spawn:
        from tests.server import Server

        srv = Server(tempfile.mkdtemp(prefix="tmmail-bench-")).init(
            "[imap]\nmax_connections_per_ip = 2000\nallow_plaintext_auth = true\n")
        for n in range(1, args.clients + 1):
            srv.add_mailbox(args.user_format.format(n=n), args.password)
        srv.start(roles=("imap",))
        args.port = srv.ports["imap"]
        args.pid = srv.proc.pid
    try:
        counts = [0] * (2 * args.clients)
        until = time.monotonic() + args.seconds
        threads = [threading.Thread(target=client, args=(args.host, args.port, args.user_format.format(n=k + 1),
                                                         args.password, until, counts, k))
                   for k in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        ops, errs = sum(counts[0::2]), sum(counts[1::2])
        print(f"clients={args.clients} seconds={dt:.1f} ops={ops} ops_per_s={ops / dt:.0f} errors={errs}", flush=True)
        if args.idle and args.pid:
            idle_rss(args.host, args.port, args.user_format.format(n=1), args.password, args.idle, args.pid)
    finally:
        if srv:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The cost of a big deferred queue: start-up recovery, idle ticking, delivering fresh mail.

A throw-away TMmail (as bench/outbound.py --spawn: loopback DNS for remote1..50.test, smtp-sink,
relaying for 127.0.0.1) gets M deferred messages (default 100,000) written straight into its
stopped spool's ``deferred/`` with tmmail.envelope (the runner's own file format, one recipient
each, already routed, next attempts spread uniformly over the next ``--spread`` hours, starting
15 minutes out, so none is due while we measure).  The files are written plainly, without
fsync: this is test data.  Then it measures:

* empty-queue start: seconds from spawning twistd until the runner logs "queue recovered"
  (the fixed cost), and its idle CPU per second;
* big-queue start: the same with M deferred messages (recover() + reading every envelope once
  into the heap), the CPU seconds that took, and the RSS afterwards;
* idle ticking: the server's CPU seconds per second over ``--idle`` seconds (the runner must
  not rescan deferred/ on every tick: this should be near the empty-queue figure);
* a fresh message while the big queue exists: seconds from the start of SMTP submission to the
  sink counting it (``--singles`` one at a time, median/max), then a burst of ``--burst``
  messages over 10 sessions (delivered msgs/s, to compare with bench/outbound.py).

  bench/queue_scale.py                       # 100,000 deferred messages
  bench/queue_scale.py -m 20000 --idle 10    # quicker
  bench/queue_scale.py --profile /tmp/q.prof # the big-queue server under cProfile
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import smtplib
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from outbound import (  # noqa: E402
    SENDER,
    BenchDNS,
    SmtpSink,
    cpu_seconds,
    domain,
    free_port,
    make_server,
    message,
    print_profile,
    rss_kib,
    start_server,
    submit_python,
)

RECOVERED = "queue recovered:"


def fill_deferred(spool_root: str, m: int, domains: int, spread_h: float, size: int) -> float:
    """Write ``m`` deferred single-recipient messages into ``spool_root/deferred``; seconds taken."""
    from tmmail.envelope import DEFERRED, Envelope
    from tmmail.spool import new_queue_id

    rng = random.Random(1)
    out = os.path.join(spool_root, "deferred")
    os.makedirs(out, exist_ok=True)
    now = time.time()
    t0 = time.perf_counter()
    for i in range(m):
        rcpt = f"rcpt{i}@{domain(i % domains + 1)}"
        arrival = now - rng.uniform(600, 3 * 3600)
        qid = new_queue_id(arrival)
        data = message(0, i, rcpt, size).replace("\r\n", "\n").encode()
        env = Envelope.new(queue_id=qid, sender=SENDER, recipients=[rcpt], helo="bench.client.test",
                           client_ip="127.0.0.1", mail_params={"SIZE": len(data)}, arrival=arrival)
        r = env.recipients[0]
        r.state = DEFERRED
        r.target = f"[SMTP:{rcpt}]"
        r.attempts = 3
        r.last_attempt = now - rng.uniform(0, 600)
        r.last_reply = f"451 4.4.1 could not deliver to any MX host of {domain(i % domains + 1)}"
        r.next_attempt = now + 900 + rng.uniform(0, spread_h * 3600)
        # .eml first, .env last, as the spool does: the message is where its .env is
        with open(os.path.join(out, qid + ".eml"), "wb") as f:
            f.write(data)
        with open(os.path.join(out, qid + ".env"), "wb") as f:
            f.write(env.to_bytes())
    return time.perf_counter() - t0


def log_size(srv) -> int:
    try:
        return os.path.getsize(srv.logfile)
    except FileNotFoundError:
        return 0


def recovered_line(srv, offset: int) -> str:
    """The runner's "queue recovered" log line written after ``offset``, or ""."""
    try:
        with open(srv.logfile, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return next((ln.strip() for ln in text.splitlines() if RECOVERED in ln), "")


def wait_recovered(srv, t_spawn: float, offset: int, timeout: float) -> float:
    """Seconds from ``t_spawn`` until the runner logged (after ``offset``) that the queue was recovered."""
    deadline = time.monotonic() + timeout
    while True:
        if recovered_line(srv, offset):
            return time.perf_counter() - t_spawn
        if time.monotonic() > deadline:
            raise RuntimeError(f"no '{RECOVERED}' within {timeout} s\n{srv.log()[-2000:]}")
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited\n{srv.log()[-2000:]}")
        time.sleep(0.05)


def idle_cpu(pid: int, seconds: float) -> tuple[float, float]:
    """(mean, max) CPU seconds per second over ``seconds`` of 1 s samples."""
    samples = []
    c = cpu_seconds(pid)
    t = time.perf_counter()
    for _ in range(int(seconds)):
        time.sleep(1.0)
        c2, t2 = cpu_seconds(pid), time.perf_counter()
        samples.append((c2 - c) / (t2 - t))
        c, t = c2, t2
    return statistics.mean(samples), max(samples)


def start_timed(srv, profile: str | None, timeout: float) -> tuple[float, float, str]:
    """Start; (seconds until recovered, CPU seconds the process used until then, the log line)."""
    srv.proc = None
    offset = log_size(srv)
    t0 = time.perf_counter()
    start_server(srv, profile, timeout=timeout)
    took = wait_recovered(srv, t0, offset, timeout)
    return took, cpu_seconds(srv.proc.pid), recovered_line(srv, offset)


def one_fresh(port: int, sink: SmtpSink, k: int, timeout: float) -> float:
    base = sink.count
    rcpt = f"fresh{k}@{domain(k % 50 + 1)}"
    t0 = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(SENDER, [rcpt], message(9, k, rcpt, 2048))
    if not sink.wait_for(base + 1, time.monotonic() + timeout):
        return float("inf")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--messages", type=int, default=100_000)
    ap.add_argument("-d", "--domains", type=int, default=50)
    ap.add_argument("--spread", type=float, default=6.0, help="hours over which next attempts are spread")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU sampling")
    ap.add_argument("--singles", type=int, default=5)
    ap.add_argument("--burst", type=int, default=500)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound for start-up and each wait")
    ap.add_argument("--profile", metavar="FILE", help="run the big-queue server under cProfile")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    sink_port = free_port()
    dns = BenchDNS(args.domains)
    sink = SmtpSink(sink_port)
    root = tempfile.mkdtemp(prefix="tmmail-qscale-")
    srv = make_server(root, dns.address, sink_port)
    try:
        # 1. the fixed cost: an empty queue
        took, cpu, _ = start_timed(srv, None, args.timeout)
        time.sleep(1.0)
        mean0, max0 = idle_cpu(srv.proc.pid, min(10.0, args.idle))
        lat0 = [one_fresh(srv.ports["smtp"], sink, 100 + k, args.timeout) for k in range(args.singles)]
        print(f"empty queue: start_to_recovered_s={took:.2f} start_cpu_s={cpu:.2f} "
              f"idle_cpu_per_s={mean0:.4f} (max {max0:.4f}) rss_mib={rss_kib(srv.proc.pid) / 1024:.0f} "
              f"fresh_single_median_s={statistics.median(lat0):.3f}", flush=True)
        srv.stop()

        # 2. the big queue, written into the stopped server's spool
        spool_root = os.path.join(root, "spool")
        made = fill_deferred(spool_root, args.messages, args.domains, args.spread, args.size)
        print(f"wrote {args.messages} deferred messages in {made:.1f} s", flush=True)
        took, cpu, line = start_timed(srv, args.profile, args.timeout)
        pid = srv.proc.pid
        print(f"big queue: start_to_recovered_s={took:.2f} start_cpu_s={cpu:.2f} "
              f"rss_mib={rss_kib(pid) / 1024:.0f}\n  log: {line}", flush=True)
        time.sleep(1.0)
        mean1, max1 = idle_cpu(pid, args.idle)
        print(f"big queue idle {args.idle:.0f} s: cpu_per_s={mean1:.4f} (max {max1:.4f}) "
              f"[empty queue: {mean0:.4f}]", flush=True)

        # 3. fresh mail while the big queue exists
        port = srv.ports["smtp"]
        lat = [one_fresh(port, sink, k, args.timeout) for k in range(args.singles)]
        print(f"fresh single message to the sink: median_s={statistics.median(lat):.3f} "
              f"max_s={max(lat):.3f} ({', '.join(f'{x:.3f}' for x in lat)})", flush=True)
        if args.burst:
            base = sink.count
            c0 = cpu_seconds(pid)
            t0 = time.perf_counter()
            deadline = time.monotonic() + args.timeout
            accepted, errors = submit_python("127.0.0.1", port, args.burst, args.size, 10, args.domains, deadline)
            t_acc = time.perf_counter() - t0
            sink.wait_for(base + accepted, deadline)
            t_done = time.perf_counter() - t0
            got = sink.count - base
            c1 = cpu_seconds(pid)
            print(f"burst of {args.burst} over 10 sessions with the big queue: accepted={accepted} errors={errors} "
                  f"relayed={got} accept_mps={accepted / t_acc:.0f} delivered_mps={got / t_done:.0f} "
                  f"cpu_s_per_1000={(c1 - c0) * 1000 / max(1, got):.2f}", flush=True)
        left = len(os.listdir(os.path.join(spool_root, "deferred"))) // 2
        print(f"deferred/ still holds {left} messages; rss_mib={rss_kib(pid) / 1024:.0f}", flush=True)
        t0 = time.perf_counter()
        srv.stop()
        print(f"stop_s={time.perf_counter() - t0:.2f}", flush=True)
    finally:
        srv.stop()
        sink.stop()
        dns.stop()
        if args.profile:
            print_profile(args.profile)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

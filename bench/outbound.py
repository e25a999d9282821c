#!/usr/bin/env python3
"""Outbound relay throughput: N messages for 50 remote domains, relayed to a local smtp-sink.

A client submits N messages of S bytes (one recipient each, rcpt@remote1.test ..
rcpt@remote50.test, spread evenly) over C sessions to the MTA's MX port; the MTA relays them by
SMTP to Postfix's ``smtp-sink`` on 127.0.0.1:SINKPORT.  Reported: accepted msgs/s (every DATA
answered 250), delivered msgs/s (timed from the first submission until the sink has counted N)
and the server's CPU seconds per 1000 messages (utime+stime from /proc/PID/stat, before/after).

  bench/outbound.py --spawn                 # throw-away TMmail: DNS, sink, server in a temp dir
  bench/outbound.py --spawn --client smtp-source   # the same client as the Postfix peer script
  bench/outbound.py --peer-postfix          # the peer Postfix on 127.0.0.1:10025 (start_peers.sh)

With ``--spawn`` a loopback DNS server (tests/dnsserver.py, in this process) gives every
remoteK.test an MX mx.remoteK.test with an A record 127.0.0.1; the server gets
``[dns] nameservers``, ``[relay] mx_port = SINKPORT`` and relays for 127.0.0.1 through a row in
config/SMTP-ACCESS.tab (the admin way).  The sender is bench-sender@example.test (not a hosted
domain, so anti-spoofing has nothing to refuse).

``--client python`` (default): C smtplib sessions, each reusing its connection.
``--client smtp-source``: /work/shared/peers/bench_outbound.sh (smtp-source, a new connection per
message, its own smtp-sink), REPS=1: the exact load the Postfix figure comes from.
``--peer-postfix`` runs ``peer_outbound.sh on SINKPORT``, that script, and ``peer_outbound.sh
off``; Postfix's CPU is the master's own + reaped children's (cutime/cstime) + live children's.

``--drain`` measures the relay alone: N messages are written (tmmail.envelope, no fsync) into the
stopped server's ``spool/deferred/``, due now, and the rate is counted from the first message the
sink sees until it has all N (no SMTP submission competing for the CPU).

``--profile FILE`` runs the spawned twistd under cProfile (``--profile=FILE --profiler=cprofile
--savestats``) and prints the top functions by tottime after it stops.

Queue scale (the cost of a big deferred queue) is bench/queue_scale.py, which shares the pieces.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

PEERS = os.environ.get("PEERS_DIR", os.path.join(HERE, "..", "..", "shared", "peers"))
SENDER = "bench-sender@example.test"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def domain(k: int) -> str:
    return f"remote{k}.test"


# -- CPU accounting --------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of a process (all its threads), plus reaped children's with ``children``."""
    f = _stat_fields(pid)
    ticks = int(f[11]) + int(f[12])  # fields 14, 15
    if children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime
    return ticks / CLK_TCK


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU of a process, its reaped children and its live children (Postfix: master + daemons).

    A daemon alive at the first sample and reaped before the second moves from "live" to the
    master's cutime: the difference of two samples stays right."""
    total = cpu_seconds(root_pid, children=True)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            f = _stat_fields(int(name))
        except (OSError, ValueError):
            continue
        if int(f[1]) == root_pid:  # field 4: ppid
            total += (int(f[11]) + int(f[12])) / CLK_TCK
    return total


def thread_cpu(pid: int) -> dict[str, float]:
    """utime/stime of the main (reactor) thread and of all other threads together, seconds."""
    out = {"main_user": 0.0, "main_sys": 0.0, "threads_user": 0.0, "threads_sys": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = _task_fields(pid, int(tid))
        except (OSError, ValueError):
            continue
        who = "main" if int(tid) == pid else "threads"
        out[who + "_user"] += int(f[11]) / CLK_TCK
        out[who + "_sys"] += int(f[12]) / CLK_TCK
    return out


def _task_fields(pid: int, tid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        raw = f.read()
    return raw[raw.rindex(")") + 2 :].split()


def cpu_split(before: dict[str, float], after: dict[str, float], n: int) -> str:
    """Per-1000-message CPU by thread kind; threads that ended in between are not counted."""
    return " ".join(f"{k}={(after[k] - before.get(k, 0.0)) * 1000 / max(1, n):.2f}" for k in after)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- the receiving side: smtp-sink -----------------------------------------------------------------


class SmtpSink:
    """``smtp-sink -c 127.0.0.1:PORT 256`` in a subprocess; ``count`` is its message counter."""

    def __init__(self, port: int, lifetime: float = 1800.0) -> None:
        self.port = port
        self.count = 0
        #: SMTP sessions the sink has seen (connections made to it)
        self.sessions = 0
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        # `timeout` bounds the sink's life even if this script dies without cleaning up
        self.proc = subprocess.Popen(
            ["timeout", str(int(lifetime)), binary, "-c", *user, f"127.0.0.1:{port}", "256"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        import socket

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("smtp-sink did not start")
                time.sleep(0.05)

    def _read(self) -> None:
        buf = b""
        assert self.proc.stdout is not None
        while True:
            chunk = self.proc.stdout.read1(4096)
            if not chunk:
                return
            buf += chunk
            *records, buf = re.split(rb"[\r\n]", buf)
            for rec in reversed(records):
                m = re.search(rb"sess=(\d+).*?mesg=(\d+)", rec)
                if m:
                    self.sessions = int(m.group(1))
                    self.count = int(m.group(2))
                    break

    def wait_for(self, target: int, deadline: float) -> bool:
        while self.count < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- DNS: tests/dnsserver.TestDNS on a reactor in a background thread ------------------------------


class _ReactorThread:
    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                                       daemon=True, name="reactor")
        self.thread.start()

    def call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        from twisted.internet.threads import blockingCallFromThread

        return blockingCallFromThread(self.reactor, fn, *args, **kw)

    def stop(self) -> None:
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(5)


class BenchDNS:
    """remote1.test .. remoteD.test, each ``MX 10 mx.remoteK.test``, ``A 127.0.0.1``."""

    def __init__(self, domains: int) -> None:
        from tests.dnsserver import TestDNS

        self.rt = _ReactorThread()
        self.zone = TestDNS(ttl=3600)
        for k in range(1, domains + 1):
            self.zone.mx(domain(k), [(10, f"mx.{domain(k)}")])
            self.zone.a(f"mx.{domain(k)}", "127.0.0.1")
        self.address = self.zone.start(self.rt)

    def stop(self) -> None:
        try:
            self.zone.stop(self.rt)
        finally:
            self.rt.stop()


# -- a throw-away TMmail ---------------------------------------------------------------------------


def make_server(root: str, dns_address: str, sink_port: int, extra_toml: str = "") -> Any:
    """``tmmail init`` in ``root``, configured to relay for 127.0.0.1 via the loopback DNS."""
    from tests.server import Server

    srv = Server(root).init(
        f'[dns]\nnameservers = ["{dns_address}"]\ntimeout = 5.0\n'
        f"[relay]\nmx_port = {sink_port}\n" + extra_toml
    )
    # the admin way: relaying is granted per client address in SMTP-ACCESS.tab
    with open(os.path.join(srv.root, "config", "SMTP-ACCESS.tab"), "a") as f:
        f.write("127.0.0.1\t1\tbench: relay from loopback\n")
    return srv


def start_server(srv: Any, profile: str | None = None, timeout: float = 120.0) -> None:
    """``Server.start(roles=("smtp",))``, or the same command line under twistd's cProfile."""
    if not profile:
        srv.start(roles=("smtp",), timeout=timeout)
        return
    import socket

    args = [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
            "--logfile", srv.logfile, f"--profile={profile}", "--profiler=cprofile", "--savestats",
            "tmmail", "--config", srv.config, "--smtp", f"tcp:{srv.ports['smtp']}:interface=127.0.0.1"]
    srv._out = open(os.path.join(srv.root, "twistd.out"), "ab")
    srv.proc = subprocess.Popen(args, cwd=srv.root, stdout=srv._out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited: {srv.proc.returncode}\n{srv.log()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", srv.ports["smtp"]), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("smtp port never opened")
            time.sleep(0.05)


def print_profile(path: str, top: int = 25) -> None:
    import pstats

    if not os.path.exists(path):
        print(f"no profile written at {path}")
        return
    print(f"--- top {top} by tottime ({path}) ---")
    pstats.Stats(path).sort_stats("tottime").print_stats(top)


# -- the client ------------------------------------------------------------------------------------


def message(k: int, i: int, rcpt: str, size: int) -> str:
    head = f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: outbound bench {k}-{i}\r\nMessage-ID: <{k}.{i}@bench>\r\n\r\n"
    line = "x" * 72 + "\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def submit_python(host: str, port: int, n: int, size: int, sessions: int, domains: int,
                  deadline: float) -> tuple[int, int]:
    """N messages over ``sessions`` reused smtplib connections; (accepted, errors)."""
    counts = [0] * sessions
    errors = [0] * sessions
    per = [n // sessions + (1 if i < n % sessions else 0) for i in range(sessions)]
    start = [sum(per[:i]) for i in range(sessions)]

    def worker(k: int) -> None:
        s = None
        for i in range(per[k]):
            if time.monotonic() > deadline:
                break
            rcpt = f"rcpt@{domain((start[k] + i) % domains + 1)}"
            try:
                if s is None:
                    s = smtplib.SMTP(host, port, timeout=60)
                    s.ehlo("bench.client.test")
                s.sendmail(SENDER, [rcpt], message(k, i, rcpt, size))
                counts[k] += 1
            except (OSError, smtplib.SMTPException):
                errors[k] += 1
                s = None
        if s is not None:
            try:
                s.quit()
            except (OSError, smtplib.SMTPException):
                pass

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    return sum(counts), sum(errors)


def run_python(host: str, port: int, sink: SmtpSink, cpu: Any, n: int, size: int, sessions: int,
               domains: int, timeout: float) -> dict:
    base, sess0 = sink.count, sink.sessions
    deadline = time.monotonic() + timeout
    c0 = cpu()
    t0 = time.perf_counter()
    accepted, errors = submit_python(host, port, n, size, sessions, domains, deadline)
    t_accept = time.perf_counter() - t0
    sink.wait_for(base + accepted, deadline)
    t_done = time.perf_counter() - t0
    relayed = sink.count - base
    c1 = cpu()
    return {"accepted": accepted, "errors": errors, "relayed": relayed,
            "accept_s": t_accept, "accept_mps": accepted / t_accept,
            "done_s": t_done, "done_mps": relayed / t_done,
            "cpu_s": c1 - c0, "cpu_per_1000": (c1 - c0) * 1000 / max(1, relayed),
            "sink_sessions": sink.sessions - sess0}


def run_script(host: str, port: int, sink_port: int, cpu: Any, n: int, size: int, sessions: int,
               domains: int, timeout: float) -> dict:
    """bench_outbound.sh (smtp-source, its own smtp-sink), REPS=1; CPU sampled around it."""
    env = dict(os.environ, REPS="1", SESSIONS=str(sessions), SIZE=str(size), DOMAINS=str(domains),
               TIMEOUT=str(int(timeout)), FROM=SENDER)
    c0 = cpu()
    r = subprocess.run(["bash", os.path.join(PEERS, "bench_outbound.sh"), host, str(port), str(sink_port), str(n)],
                       capture_output=True, text=True, env=env, timeout=timeout + 180)
    c1 = cpu()
    out = r.stdout + r.stderr
    m = re.search(r"rep=1 .*?accept_s=([\d.]+) accept_mps=([\d.]+) done_s=([\d.]+) done_mps=([\d.]+) relayed=(\d+)", out)
    if not m:
        raise RuntimeError(f"bench_outbound.sh gave no result (rc={r.returncode}):\n{out[-3000:]}")
    relayed = int(m.group(5))
    # the CPU window includes the script's 2 s settle wait before submission (idle for both MTAs)
    return {"accepted": n, "errors": 0 if "failed" not in out else -1, "relayed": relayed,
            "accept_s": float(m.group(1)), "accept_mps": float(m.group(2)),
            "done_s": float(m.group(3)), "done_mps": float(m.group(4)),
            "cpu_s": c1 - c0, "cpu_per_1000": (c1 - c0) * 1000 / max(1, relayed), "raw": out.strip()}


def fill_due(spool_root: str, n: int, domains: int, size: int) -> None:
    """Write ``n`` single-recipient messages into ``spool_root/deferred``, due now (test data: no fsync)."""
    from tmmail.envelope import DEFERRED, Envelope
    from tmmail.spool import new_queue_id

    out = os.path.join(spool_root, "deferred")
    os.makedirs(out, exist_ok=True)
    now = time.time()
    for i in range(n):
        rcpt = f"rcpt{i}@{domain(i % domains + 1)}"
        qid = new_queue_id(now)
        data = message(0, i, rcpt, size).replace("\r\n", "\n").encode()
        env = Envelope.new(queue_id=qid, sender=SENDER, recipients=[rcpt], helo="bench.client.test",
                           client_ip="127.0.0.1", mail_params={"SIZE": len(data)}, arrival=now)
        r = env.recipients[0]
        r.state = DEFERRED
        r.target = f"[SMTP:{rcpt}]"
        r.attempts = 1
        r.last_attempt = now - 60
        r.last_reply = "451 4.4.1 bench"
        r.next_attempt = now - 1
        with open(os.path.join(out, qid + ".eml"), "wb") as f:
            f.write(data)
        with open(os.path.join(out, qid + ".env"), "wb") as f:
            f.write(env.to_bytes())


def run_drain(srv: Any, sink: "SmtpSink", n: int, timeout: float, profile: str | None) -> dict:
    """Start the server on a full queue; time from the first relayed message to the last."""
    start_server(srv, profile)
    pid = srv.proc.pid
    c0 = cpu_seconds(pid)
    deadline = time.monotonic() + timeout
    while sink.count == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    t0, base = time.perf_counter(), sink.count
    sink.wait_for(n, deadline)
    t_done = time.perf_counter() - t0
    relayed = sink.count
    c1 = cpu_seconds(pid)
    return {"accepted": n, "errors": 0, "relayed": relayed, "accept_s": 0.0, "accept_mps": 0.0,
            "done_s": t_done, "done_mps": (relayed - base) / max(t_done, 1e-9),
            "cpu_s": c1 - c0, "cpu_per_1000": (c1 - c0) * 1000 / max(1, relayed - base),
            "sink_sessions": sink.sessions}


def report(label: str, r: dict) -> None:
    print(f"{label}: n={r['accepted']} errors={r['errors']} relayed={r['relayed']} "
          f"accept_s={r['accept_s']:.2f} accept_mps={r['accept_mps']:.0f} "
          f"done_s={r['done_s']:.2f} delivered_mps={r['done_mps']:.0f} "
          f"cpu_s={r['cpu_s']:.2f} cpu_s_per_1000={r['cpu_per_1000']:.2f}"
          + (f" sink_sessions={r['sink_sessions']}" if "sink_sessions" in r else ""), flush=True)


def free_port() -> int:
    from tests.server import free_port as fp

    return fp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spawn", action="store_true", help="start a throw-away TMmail and measure it")
    ap.add_argument("--peer-postfix", action="store_true", help="measure the peer Postfix on 127.0.0.1:10025")
    ap.add_argument("--client", choices=("python", "smtp-source"), default="python")
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("-s", "--size", type=int, default=2048)
    ap.add_argument("-c", "--sessions", type=int, default=10)
    ap.add_argument("-d", "--domains", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=300.0, help="per run: submission + relay")
    ap.add_argument("--profile", metavar="FILE", help="run the spawned twistd under cProfile")
    ap.add_argument("--drain", action="store_true", help="relay a pre-filled queue (no submission); with --spawn")
    ap.add_argument("--keep", action="store_true", help="keep the spawned server's directory")
    ap.add_argument("--toml", default="", help='extra settings for the spawned server, e.g. "[relay]\\nmax_connections = 60"')
    args = ap.parse_args()
    if args.spawn == args.peer_postfix:
        ap.error("give --spawn or --peer-postfix")
    sink_port = free_port()

    if args.peer_postfix:
        pidfile = os.environ.get("PEER_ROOT", "/tmp/peer") + "/pids/postfix.pid"
        master = int(open(pidfile).read().strip())
        subprocess.run(["bash", os.path.join(PEERS, "peer_outbound.sh"), "on", str(sink_port), str(args.domains)],
                       check=True, timeout=60, stdout=subprocess.DEVNULL)
        try:
            r = run_script("127.0.0.1", 10025, sink_port, lambda: tree_cpu_seconds(master), args.n, args.size,
                           args.sessions, args.domains, args.timeout)
        finally:
            subprocess.run(["bash", os.path.join(PEERS, "peer_outbound.sh"), "off"], timeout=60,
                           stdout=subprocess.DEVNULL)
        report(f"postfix smtp-source sessions={args.sessions} domains={args.domains} size={args.size}", r)
        return 0

    dns = BenchDNS(args.domains)
    root = tempfile.mkdtemp(prefix="tmmail-outbound-")
    sink = None
    srv = make_server(root, dns.address, sink_port, args.toml.replace("\\n", "\n"))
    try:
        if args.drain:
            fill_due(os.path.join(root, "spool"), args.n, args.domains, args.size)
            sink = SmtpSink(sink_port)
            r = run_drain(srv, sink, args.n, args.timeout, args.profile)
            report(f"tmmail drain domains={args.domains} size={args.size}", r)
            return 0
        start_server(srv, args.profile)
        pid = srv.proc.pid
        cpu = lambda: cpu_seconds(pid)  # noqa: E731
        split0 = thread_cpu(pid)
        label = f"tmmail {args.client} sessions={args.sessions} domains={args.domains} size={args.size}"
        if args.client == "python":
            sink = SmtpSink(sink_port)
            r = run_python("127.0.0.1", srv.ports["smtp"], sink, cpu, args.n, args.size, args.sessions,
                           args.domains, args.timeout)
        else:
            r = run_script("127.0.0.1", srv.ports["smtp"], sink_port, cpu, args.n, args.size, args.sessions,
                           args.domains, args.timeout)
        report(label, r)
        print(f"tmmail cpu_s_per_1000 by thread: {cpu_split(split0, thread_cpu(pid), r['relayed'])}", flush=True)
        print(f"tmmail rss_mib={rss_kib(pid) / 1024:.0f}", flush=True)
        if r["relayed"] < r["accepted"]:
            left = {d: len(os.listdir(os.path.join(root, "spool", d))) // 2 for d in ("incoming", "active", "deferred")}
            print(f"WARNING: only {r['relayed']}/{r['accepted']} relayed; spool: {left}")
            print(srv.log()[-2000:])
    finally:
        srv.stop()
        if sink:
            sink.stop()
        dns.stop()
        if args.profile:
            print_profile(args.profile)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

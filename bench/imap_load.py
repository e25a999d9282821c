#!/usr/bin/env python3
"""IMAP under load: C concurrent clients for T seconds doing a realistic mix; ops/s and errors.

The mix per client loop: LOGIN, SELECT INBOX, FETCH headers of the last 20, FETCH two bodies,
STORE +FLAGS \\Seen, APPEND a message, SEARCH UNSEEN, EXPUNGE of a flagged-deleted message,
LOGOUT.  Each IMAP command counts as one op.  Then the RSS of N idle IDLEing connections.
With --spawn the server allows plaintext login, as the Dovecot peer does, so both are measured
without a TLS handshake per loop (with STARTTLS each loop the handshake dominates).

Before the timed part every INBOX is filled by APPEND to --prefill messages (untimed), so both
servers run the mix in the same steady state (the mix keeps a folder at about 51 messages).
Besides ops/s it reports the server's CPU seconds per 1000 ops: utime+stime of the process from
/proc (twistd: all threads; with --pid-tree, a master plus its reaped and live children, which is
how Dovecot's per-connection processes are counted), and the client's own CPU (the client is
Python too: if it nears one core, ops/s measures the client).

  bench/imap_load.py --spawn [-c 10] [-t 30] [--idle 500]
  bench/imap_load.py --spawn --peer-dovecot --rounds 2 --idle 0   # TMmail and Dovecot, alternating
  bench/imap_load.py --port P --user-format 'test{n}@example.com' --password pass --pid PID
  bench/imap_load.py --port 10143 --user-format 'test{n}' --no-tls --pid-tree $(cat /tmp/peer/pids/dovecot.pid)
  bench/imap_load.py --spawn --profile /tmp/imap.prof   # twistd --profile (cProfile, reactor thread)
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


MSG = (b"From: load@client.test\r\nTo: user@example.com\r\nSubject: load test\r\n\r\n"
       + b"line of text for the load test\r\n" * 40)


NO_TLS = False


def connect(host: str, port: int) -> imaplib.IMAP4:
    m = imaplib.IMAP4(host, port, timeout=60)
    if "LOGINDISABLED" in m.capabilities and not NO_TLS:
        m.starttls(tls_ctx())
    return m


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """utime+stime of a process (all threads); with ``tree`` also its reaped children (cutime,
    cstime) and its live descendants: a child alive at one sample and reaped before the next
    moves into its parent's cutime, so the difference of two samples stays right."""
    f = _stat_fields(pid)
    ticks = int(f[11]) + int(f[12])
    if tree:
        ticks += int(f[13]) + int(f[14])
        parent: dict[int, int] = {}
        own: dict[int, int] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                g = _stat_fields(int(name))
            except (OSError, ValueError):
                continue
            parent[int(name)] = int(g[1])
            own[int(name)] = int(g[11]) + int(g[12]) + int(g[13]) + int(g[14])
        for p, pp in parent.items():
            while pp not in (0, 1, pid) and pp in parent:
                pp = parent[pp]
            if pp == pid and p != pid:
                ticks += own[p]
    return ticks / CLK_TCK


def prefill(host: str, port: int, user: str, password: str, n: int) -> None:
    m = connect(host, port)
    m.login(user, password)
    typ, data = m.select("INBOX")
    have = int(data[0])
    for _ in range(max(0, n - have)):
        m.append("INBOX", None, None, MSG)
    m.logout()


OPS = ("connect", "login", "select", "fetch_headers", "fetch_body", "fetch_text", "store_seen", "append",
       "search_unseen", "store_deleted", "expunge", "logout")


def client(host: str, port: int, user: str, password: str, until: float, counts: list[int], k: int,
           times: dict[str, list[float]]) -> None:
    """One client's loop.  A command answered NO/BAD counts as an error too (imaplib only raises
    for some of them), and its time per command kind goes into ``times`` (seconds, count)."""
    ops = errs = 0
    clock = time.perf_counter

    def op(name: str, f, *a):
        nonlocal ops
        t = clock()
        r = f(*a)
        acc = times.setdefault(name, [0.0, 0])
        acc[0] += clock() - t
        acc[1] += 1
        if name != "connect":
            if r[0] not in ("OK", "BYE"):
                raise imaplib.IMAP4.error(f"{name}: {r!r}")
            ops += 1
        return r

    while time.monotonic() < until:
        try:
            m = op("connect", connect, host, port)
            op("login", m.login, user, password)
            typ, data = op("select", m.select, "INBOX")
            n = int(data[0])
            if n:
                lo = max(1, n - 19)
                op("fetch_headers", m.fetch, f"{lo}:{n}",
                   "(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])")
                op("fetch_body", m.fetch, str(n), "(BODY[])")
                op("fetch_text", m.fetch, str(lo), "(BODY.PEEK[TEXT])")
                op("store_seen", m.store, str(lo), "+FLAGS", "(\\Seen)")
            op("append", m.append, "INBOX", None, None, MSG)
            op("search_unseen", m.search, None, "UNSEEN")
            if n > 50:
                op("store_deleted", m.store, "1", "+FLAGS", "(\\Deleted)")
                op("expunge", m.expunge)
            op("logout", m.logout)
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


def run_mix(host: str, port: int, user_format: str, password: str, clients: int, seconds: float,
            pid: int | None, tree: bool, fill: int, label: str) -> dict:
    fillers = [threading.Thread(target=prefill, args=(host, port, user_format.format(n=k + 1), password, fill))
               for k in range(clients)]
    for t in fillers:
        t.start()
    for t in fillers:
        t.join()
    counts = [0] * (2 * clients)
    until = time.monotonic() + seconds
    times: list[dict[str, list[float]]] = [{} for _ in range(clients)]
    threads = [threading.Thread(target=client, args=(host, port, user_format.format(n=k + 1),
                                                     password, until, counts, k, times[k]))
               for k in range(clients)]
    cpu0 = cpu_seconds(pid, tree) if pid else 0.0
    me0 = os.times()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    me1 = os.times()
    cpu = (cpu_seconds(pid, tree) - cpu0) if pid else float("nan")
    me = (me1.user - me0.user) + (me1.system - me0.system)
    ops, errs = sum(counts[0::2]), sum(counts[1::2])
    r = {"label": label, "ops": ops, "errors": errs, "seconds": dt, "ops_per_s": ops / dt, "server_cpu": cpu,
         "client_cpu": me}
    print(f"{label}: clients={clients} seconds={dt:.1f} ops={ops} ops_per_s={ops / dt:.0f} errors={errs} "
          f"server_cpu_s={cpu:.1f} ({cpu / dt:.2f}/s, {cpu * 1000 / max(1, ops):.2f} s per 1000 ops) "
          f"client_cpu_s={me:.1f} ({me / dt:.2f}/s)", flush=True)
    per = []
    for name in OPS:
        total = sum(t.get(name, [0.0, 0])[0] for t in times)
        count = sum(t.get(name, [0.0, 0])[1] for t in times)
        if count:
            per.append(f"{name}={total * 1000 / count:.1f}")
    print(f"{label}: mean ms per command: " + " ".join(per), flush=True)
    r["ms"] = per
    return r


def main() -> int:
    global NO_TLS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2143)
    ap.add_argument("--user-format", default="test{n}@example.com")
    ap.add_argument("--password", default="pass")
    ap.add_argument("--no-tls", action="store_true", help="never STARTTLS (log in in plaintext)")
    ap.add_argument("-c", "--clients", type=int, default=10)
    ap.add_argument("-t", "--seconds", type=float, default=30)
    ap.add_argument("--idle", type=int, default=500)
    ap.add_argument("--prefill", type=int, default=50, help="messages in each INBOX before timing")
    ap.add_argument("--pid", type=int, help="server process for CPU and RSS")
    ap.add_argument("--pid-tree", type=int, metavar="PID", help="server master: count its children's CPU too")
    ap.add_argument("--spawn", action="store_true")
    ap.add_argument("--profile", metavar="FILE", help="run the spawned twistd under cProfile")
    ap.add_argument("--peer-dovecot", action="store_true",
                    help="also run the mix against the peer Dovecot (127.0.0.1:10143, test{n}, pass)")
    ap.add_argument("--dovecot-pidfile", default="/tmp/peer/pids/dovecot.pid")
    ap.add_argument("--rounds", type=int, default=1, help="with --peer-dovecot: alternate this many times")
    args = ap.parse_args()
    NO_TLS = args.no_tls
    srv = None
    tree = False
    if args.pid_tree:
        args.pid, tree = args.pid_tree, True
    if args.spawn:
        from tests.server import Server

        srv = Server(tempfile.mkdtemp(prefix="tmmail-bench-")).init(
            "[imap]\nmax_connections_per_ip = 2000\nallow_plaintext_auth = true\n")
        for n in range(1, args.clients + 1):
            srv.add_mailbox(args.user_format.format(n=n), args.password)
        if args.profile:
            start_profiled(srv, args.profile)
        else:
            srv.start(roles=("imap",))
        args.port = srv.ports["imap"]
        args.pid = srv.proc.pid
    dovecot_pid = None
    if args.peer_dovecot:
        with open(args.dovecot_pidfile) as f:
            dovecot_pid = int(f.read().strip())
    try:
        results = []
        for _ in range(args.rounds if args.peer_dovecot else 1):
            results.append(run_mix(args.host, args.port, args.user_format, args.password, args.clients,
                                   args.seconds, args.pid, tree, args.prefill, "tmmail" if srv else "server"))
            if dovecot_pid:
                results.append(run_mix("127.0.0.1", 10143, "test{n}", "pass", args.clients, args.seconds,
                                       dovecot_pid, True, args.prefill, "dovecot"))
        if args.idle and args.pid:
            idle_rss(args.host, args.port, args.user_format.format(n=1), args.password, args.idle, args.pid)
    finally:
        if srv:
            srv.stop()
    if args.profile:
        import pstats

        if os.path.exists(args.profile):
            pstats.Stats(args.profile).sort_stats("tottime").print_stats(30)
    return 0


def start_profiled(srv, profile: str, timeout: float = 60.0) -> None:
    """``Server.start(roles=("imap",))`` under twistd's cProfile (reactor thread only)."""
    import subprocess

    argv = [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
            "--logfile", srv.logfile, f"--profile={profile}", "--profiler=cprofile", "--savestats",
            "tmmail", "--config", srv.config, "--imap", f"tcp:{srv.ports['imap']}:interface=127.0.0.1"]
    srv._out = open(os.path.join(srv.root, "twistd.out"), "ab")
    srv.proc = subprocess.Popen(argv, cwd=srv.root, stdout=srv._out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited: {srv.proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("imap port never opened")
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())

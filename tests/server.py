"""Run the real server for end-to-end tests: ``tmmail init``, the admin CLI, ``twistd -n tmmail``.

The server is a subprocess on free loopback ports; tests talk to it with real clients.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from typing import Iterable

from tmmail.config import LISTENER_ROLES

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_tls() -> ssl.SSLContext:
    """A client context for the self-signed test certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Server:
    """One TMmail instance in ``root``: configuration, CLI and the running process."""

    def __init__(self, root: str, hostname: str = "localhost", domain: str = "example.com") -> None:
        self.root = str(root)
        self.config = os.path.join(self.root, "tmmail.toml")
        self.hostname = hostname
        self.domain = domain
        self.ports = {role: free_port() for role in LISTENER_ROLES}
        self.proc: subprocess.Popen | None = None
        self.logfile = os.path.join(self.root, "twistd.log")

    # -- configuration -------------------------------------------------------------------
    def init(self, extra_toml: str = "") -> "Server":
        r = subprocess.run(
            [os.path.join(BIN, "tmmail"), "init", self.root, "--hostname", self.hostname,
             "--domain", self.domain],
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, r.stderr
        if extra_toml:
            self.add_settings(extra_toml)
        return self

    def add_settings(self, toml_text: str) -> None:
        """Merge settings by appending keys under their [section] headers."""
        import re

        with open(self.config) as f:
            text = f.read()
        section = None
        for line in toml_text.strip().splitlines():
            line = line.strip()
            m = re.match(r"^\[(.+)\]$", line)
            if m:
                section = m.group(1)
                continue
            if not line:
                continue
            key = line.split("=", 1)[0].strip()
            header = f"[{section}]"
            if header in text:
                start = text.index(header) + len(header)
                nxt = re.search(r"^\[", text[start:], re.M)
                end = start + nxt.start() if nxt else len(text)
                body = text[start:end]
                body = re.sub(rf"^\s*{re.escape(key)}\s*=.*\n", "", body, flags=re.M)
                body = body.rstrip("\n") + "\n" + line + "\n\n"
                text = text[:start] + body + text[end:]
            else:
                text += f"\n{header}\n{line}\n"
        with open(self.config, "w") as f:
            f.write(text)

    def cli(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [os.path.join(BIN, "tmmail"), "--config", self.config, *args],
            capture_output=True, text=True, input=input, timeout=60,
        )
        if check:
            assert r.returncode == 0, f"tmmail {' '.join(args)}: {r.returncode} {r.stderr}"
        return r

    def add_mailbox(self, address: str, password: str | None = "secret", quota: str | None = None) -> None:
        args = ["mailbox", "add", address]
        if password is not None:
            args.append("--password-stdin")
        if quota:
            args += ["--quota", quota]
        self.cli(*args, input=(password + "\n") if password is not None else None)

    def maildir(self, address: str) -> str:
        """The INBOX Maildir of a mailbox created by add_mailbox (post office from the CLI)."""
        r = self.cli("mailbox", "list")
        local, domain = address.split("@")
        for line in r.stdout.splitlines():
            fields = line.split("\t")
            if fields and fields[0].lower() == address.lower():
                break
        else:
            raise AssertionError(f"{address} not in mailbox list: {r.stdout}")
        po = self.postoffice_of(domain)
        return os.path.join(self.root, "postoffices", po, local, "Maildir")

    def postoffice_of(self, domain: str) -> str:
        for line in self.cli("domain", "list").stdout.splitlines():
            fields = line.split("\t")
            if fields[0].lower() == domain.lower():
                return fields[1]
        raise AssertionError(f"{domain} not hosted")

    def messages(self, address: str) -> list[bytes]:
        md = self.maildir(address)
        out = []
        for sub in ("new", "cur"):
            for name in sorted(os.listdir(os.path.join(md, sub))):
                with open(os.path.join(md, sub, name), "rb") as f:
                    out.append(f.read())
        return out

    # -- process ---------------------------------------------------------------------------
    def start(self, roles: Iterable[str] = LISTENER_ROLES, timeout: float = 30.0) -> "Server":
        args = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logfile", self.logfile,
                "tmmail", "--config", self.config]
        for role in roles:
            args += [f"--{role}", f"tcp:{self.ports[role]}:interface=127.0.0.1"]
        self._out = open(os.path.join(self.root, "twistd.out"), "ab")
        self.proc = subprocess.Popen(args, cwd=self.root, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        for role in roles:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited: {self.proc.returncode}\n{self.log()}")
                try:
                    socket.create_connection(("127.0.0.1", self.ports[role]), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{role} port never opened\n{self.log()}")
                    time.sleep(0.05)
        return self

    def log(self) -> str:
        text = ""
        for path in (os.path.join(self.root, "twistd.out"), self.logfile):
            try:
                with open(path, errors="replace") as f:
                    text += f.read()[-20000:]
            except OSError:
                pass
        return text

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """kill -9: the crash a durable server must survive."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def wait_for(self, predicate, timeout: float = 15.0, interval: float = 0.05):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting\n{self.log()[-4000:]}")
            time.sleep(interval)

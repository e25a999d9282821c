"""Transfer event hooks: external programs (exit status, timeout, environment) and plug-ins."""

from __future__ import annotations

import os
import stat
import sys
import time

import pytest
from twisted.internet import defer, reactor
from zope.interface import implementer

from tmmail import config
from tmmail.envelope import Envelope
from tmmail.errors import ConfigError
from tmmail.events import ACCEPT, QUARANTINE, REJECT, RETRY, load_events
from tmmail.interfaces import ITransferEvent

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

#: stands in for clamdscan: exit 1 and "stream: Eicar FOUND" if the message has the test string
SCANNER = f"""#!{sys.executable}
import os, sys
data = sys.stdin.buffer.read()
with open(os.environ["SCAN_LOG"], "a") as f:
    f.write(os.environ["TMMAIL_EVENT"] + " " + os.environ["TMMAIL_QUEUE_ID"] + " " + os.environ["TMMAIL_SENDER"]
            + " " + os.environ["TMMAIL_RECIPIENTS"] + " " + str(len(data)) + "\\n")
if b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE" in data:
    print("stream: Eicar-Signature FOUND")
    sys.exit(1)
print("stream: OK")
"""


def write_script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def envelope_and_file(tmp_path, body: bytes) -> tuple[Envelope, str]:
    path = tmp_path / "m.eml"
    path.write_bytes(b"From: a@remote.example\nSubject: x\n\n" + body)
    env = Envelope.new(queue_id="Q1", sender="a@remote.example", recipients=["bob@example.com"],
                       client_ip="192.0.2.1", helo="client.example")
    return env, str(path)


def settings_with(events: dict) -> config.Settings:
    return config.parse({"events": events})


def test_scanner_program_rejects_eicar_accepts_clean(tmp_path, reactor_thread, monkeypatch) -> None:
    scanner = write_script(tmp_path, "scan", SCANNER)
    log = tmp_path / "scan.log"
    monkeypatch.setenv("SCAN_LOG", str(log))
    ev = load_events(settings_with({"pickup": [{"command": [scanner], "timeout": 20}]}), reactor)
    env, path = envelope_and_file(tmp_path, b"hello\n")
    out = reactor_thread.call(ev.run, "pickup", env, path)
    assert out.action == ACCEPT
    env, path = envelope_and_file(tmp_path, EICAR + b"\n")
    out = reactor_thread.call(ev.run, "pickup", env, path)
    assert out.action == REJECT
    assert "Eicar" in out.text
    lines = log.read_text().splitlines()
    assert lines[0].startswith("pickup Q1 a@remote.example bob@example.com ")
    assert int(lines[1].split()[-1]) == os.path.getsize(path)  # the whole message on stdin


def test_exit_map_and_reject_text(tmp_path, reactor_thread) -> None:
    prog = write_script(tmp_path, "q", "#!/bin/sh\nexit 4\n")
    ev = load_events(settings_with({"deliver": [{"command": [prog], "exit": {"4": "quarantine"},
                                                  "reject_text": "held for review"}]}), reactor)
    env, path = envelope_and_file(tmp_path, b"x\n")
    out = reactor_thread.call(ev.run, "deliver", env, path, ["[SF:ACME/BOB]"])
    assert (out.action, out.text) == (QUARANTINE, "held for review")
    # unknown exit status: retry (fail closed, never let mail through unchecked)
    prog = write_script(tmp_path, "r", "#!/bin/sh\nexit 9\n")
    ev = load_events(settings_with({"pickup": {"command": prog}}), reactor)
    assert reactor_thread.call(ev.run, "pickup", env, path).action == RETRY


def test_timeout_kills_and_retries(tmp_path, reactor_thread) -> None:
    prog = write_script(tmp_path, "slow", "#!/bin/sh\nexec sleep 30\n")
    ev = load_events(settings_with({"pickup": [{"command": [prog], "timeout": 0.5}]}), reactor)
    env, path = envelope_and_file(tmp_path, b"x\n")
    start = time.monotonic()
    out = reactor_thread.call(ev.run, "pickup", env, path)
    assert out.action == RETRY and "timed out" in out.text
    assert time.monotonic() - start < 10


def test_missing_program_is_retry(tmp_path, reactor_thread) -> None:
    ev = load_events(settings_with({"pickup": [{"command": [str(tmp_path / "nope")]}]}), reactor)
    env, path = envelope_and_file(tmp_path, b"x\n")
    assert reactor_thread.call(ev.run, "pickup", env, path).action == RETRY


@implementer(ITransferEvent)
class Tagger:
    """A plug-in: rejects mail from a configured sender; others pass."""

    seen: list = []

    def __init__(self, refuse: str = "") -> None:
        self.refuse = refuse

    def onTransfer(self, event, envelope, message_path):
        Tagger.seen.append((event, envelope.queue_id))
        if envelope.sender == self.refuse:
            return defer.succeed(("reject", "sender refused by policy"))
        return "accept"


def test_plugin_by_dotted_name_first_refusal_wins(tmp_path, reactor_thread) -> None:
    never = write_script(tmp_path, "never", f"#!/bin/sh\necho ran >> {tmp_path}/ran\nexit 0\n")
    ev = load_events(settings_with({"pickup": [
        {"plugin": "tests.test_events.Tagger", "options": {"refuse": "a@remote.example"}},
        {"command": [never]},
    ]}), reactor)
    env, path = envelope_and_file(tmp_path, b"x\n")
    out = reactor_thread.call(ev.run, "pickup", env, path)
    assert (out.action, out.text) == (REJECT, "sender refused by policy")
    assert not (tmp_path / "ran").exists()
    assert ("pickup", "Q1") in Tagger.seen


def test_bad_configuration_named() -> None:
    with pytest.raises(ConfigError, match="unknown event"):
        load_events(settings_with({"arrival": []}))
    with pytest.raises(ConfigError, match="exactly one"):
        load_events(settings_with({"pickup": [{"timeout": 3}]}))
    with pytest.raises(ConfigError, match="cannot load plugin"):
        load_events(settings_with({"pickup": [{"plugin": "tests.nothing.Here"}]}))
    with pytest.raises(ConfigError, match="exit"):
        load_events(settings_with({"pickup": [{"command": ["x"], "exit": {"1": "explode"}}]}))


def plugin_dir(tmp_path) -> str:
    """A folder with twisted/plugins/tmmail_testguard.py (no __init__.py, as Twisted wants)."""
    import shutil

    plugins = tmp_path / "plugpath" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(__file__), "plugins_fixture", "tmmail_testguard.py"), plugins)
    return str(plugins)


def test_plugin_found_through_twisted_plugins(tmp_path, monkeypatch) -> None:
    import twisted.plugins

    monkeypatch.setattr(twisted.plugins, "__path__", list(twisted.plugins.__path__) + [plugin_dir(tmp_path)])
    settings = config.parse({"server": {"state_dir": str(tmp_path)},
                             "events": {"deliver": [{"plugin": "TestGuard", "options": {"word": "SECRET"}}]}})
    events = load_events(settings, reactor)
    env, path = envelope_and_file(tmp_path, b"the SECRET plans\n")
    outcome = events.run("deliver", env, path).result
    assert (outcome.action, outcome.text) == (REJECT, "Refused by testguard at deliver")
    env, path = envelope_and_file(tmp_path, b"nothing to see\n")
    assert events.run("deliver", env, path).result.action == ACCEPT
    with pytest.raises(ConfigError, match="no transfer-event plug-in named 'nosuch'.*testguard"):
        load_events(config.parse({"server": {"state_dir": str(tmp_path)},
                                  "events": {"pickup": [{"plugin": "nosuch"}]}}), reactor)

"""Shared fixtures.

``reactor_thread``: the global Twisted reactor runs in a background thread for the whole test
session, so tests can start real listeners on 127.0.0.1 and talk to them with blocking clients
(smtplib, poplib, imaplib, imapclient) from the test thread.  Use ``reactor_thread.call(fn, ...)``
to run ``fn`` in the reactor thread and wait for its result (a Deferred is waited for too).
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Any, Callable

import pytest
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread


class ReactorRunner:
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` in the reactor thread; return its result (waiting for a Deferred)."""
        return blockingCallFromThread(reactor, fn, *args, **kwargs)

    def listen(self, factory: Any, interface: str = "127.0.0.1") -> Any:
        """Listen on a free TCP port on loopback; returns the port (``.getHost().port``)."""
        return self.call(reactor.listenTCP, 0, factory, interface=interface)


@pytest.fixture(scope="session")
def reactor_thread() -> Any:
    thread = threading.Thread(
        target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True, name="reactor"
    )
    thread.start()
    yield ReactorRunner()
    reactor.callFromThread(reactor.stop)
    thread.join(10)


def require_tool(name: str) -> str:
    """Path of an external tool; a missing tool fails in CI (CI=true) and skips elsewhere."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is required in CI (scripts/install-test-deps.sh installs it)")
    pytest.skip(f"{name} not installed (not CI)")
    raise AssertionError("unreachable")


@pytest.fixture
def logged_failures() -> Any:
    """Failures (``log.failure``: tracebacks) logged by in-process servers during the test."""
    from twisted.logger import globalLogPublisher

    failures: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)

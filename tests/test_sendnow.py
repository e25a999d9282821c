"""tmmail.sendnow: replies sent at once on plain TCP, in order, and never around TLS."""

from __future__ import annotations

import socket
import time

from twisted.internet import protocol, reactor

from tmmail import sendnow


class _Recorder:
    """A transport that is not a TCP connection (a TLS wrapper, a test double)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_other_transports_use_their_own_write() -> None:
    t = _Recorder()
    sendnow.write(t, b"250 ok\r\n")
    assert t.written == [b"250 ok\r\n"]


class _Writer(protocol.Protocol):
    """Queues one write the ordinary way, then sends another through sendnow."""

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self.transport.write(b"first\r\n")  # queued until the reactor's next turn
        sendnow.write(self.transport, b"second\r\n")  # must not overtake it
        sendnow_ok = not self.transport.dataBuffer and not self.transport._tempDataBuffer
        self.factory.queued_second = not sendnow_ok
        self.factory.proto = self

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        # nothing is queued now: this reply leaves in this very call, before the reactor turns
        sendnow.write(self.transport, b"third\r\n")
        self.factory.third_queued = bool(self.transport._tempDataBuffer or self.transport.dataBuffer)


def test_plain_tcp_sends_at_once_and_keeps_order(reactor_thread) -> None:
    factory = protocol.ServerFactory()
    factory.protocol = _Writer
    port = reactor_thread.call(reactor.listenTCP, 0, factory, interface="127.0.0.1")
    try:
        c = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        got = b""
        while got.count(b"\r\n") < 2:
            got += c.recv(100)
        assert got == b"first\r\nsecond\r\n"
        assert factory.queued_second  # it went behind the queued write, not around it
        c.sendall(b"x")
        got = b""
        while not got.endswith(b"\r\n"):
            got += c.recv(100)
        assert got == b"third\r\n"
        deadline = time.monotonic() + 5  # set just after the send that the client already saw
        while not hasattr(factory, "third_queued") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert factory.third_queued is False
        c.close()
    finally:
        reactor_thread.call(port.stopListening)

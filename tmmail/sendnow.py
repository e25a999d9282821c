"""Send a protocol reply at once instead of on the reactor's next turn.

Twisted's TCP transport queues every ``write`` and sends it from ``doWrite`` on the next
reactor iteration, after registering the socket for writability (``epoll_ctl``) and before
unregistering it again: two extra system calls and a loop turn per reply.  A command/reply
protocol sends one short reply per command and nearly always has nothing queued, so the reply
can go out with one ``send(2)`` right away; anything the kernel does not take is queued the
usual way (so ordering, flow control and the registered producer behave as before).

Used only on plain TCP transports with an empty send buffer; TLS transports and anything else
take the ordinary path.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def write(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent at once when that is safe."""
    # exactly a TCP connection: a wrapper (TLSMemoryBIOProtocol for implicit TLS) forwards
    # attribute look-ups to the TCP transport beneath it, so its "socket" is not ours to use
    if not isinstance(transport, tcp.Connection) or transport.TLS:
        transport.write(data)
        return
    sock = transport.socket
    if (
        not transport.connected
        or getattr(transport, "disconnecting", True)
        or getattr(transport, "_writeDisconnected", True)
        or getattr(transport, "dataBuffer", b"x")
        or getattr(transport, "_tempDataBuffer", True)
    ):
        transport.write(data)
        return
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        # let the transport see (and report) the error the usual way
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])

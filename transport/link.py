"""Plain one-way ZeroMQ links (PUSH -> PULL) and endpoint checks.

The pipeline's edge and server no longer use these: they talk over DEALER/ROUTER with credits, acks, heartbeats
and CurveZMQ (:mod:`transport.session`, :mod:`transport.security`), which replay across server restarts needs.
:class:`PushLink`/:class:`PullLink` stay for benchmarks and tools that only need raw one-way throughput:
PUSH blocks at its high-water mark (back-pressure), a live sender uses NOBLOCK and counts refusals as drops.

Each message is one ZeroMQ frame holding one :mod:`transport.wire` message; ``len(frame)`` is the data size.
"""
from __future__ import annotations

import re
import time

import zmq

from core.errors import UsageError

_ENDPOINT = re.compile(r"^(tcp://(\*|[A-Za-z0-9_.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5}|\*)|ipc://.+|inproc://.+)$")


def check_endpoint(endpoint: str, what: str = "endpoint") -> str:
    """Validate a ZeroMQ endpoint string, raising UsageError naming it and the accepted forms."""
    if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
        raise UsageError(f"{what} {endpoint!r} is not a ZeroMQ endpoint; use tcp://HOST:PORT "
                         f"(e.g. tcp://127.0.0.1:5555), tcp://*:PORT to bind, or ipc:///tmp/NAME")
    m = re.match(r"^tcp://.*:(\d+)$", endpoint)
    if m and not 0 < int(m.group(1)) < 65536:
        raise UsageError(f"{what} {endpoint!r}: port {m.group(1)} is outside 1..65535")
    return endpoint


class LinkTimeout(RuntimeError):
    """Nothing could be sent (no peer accepted the message) within the link timeout."""


class PushLink:
    """Edge side: connect (default) or bind a PUSH socket and send wire messages."""

    def __init__(self, endpoint: str, bind: bool = False, hwm: int = 64, send_timeout_s: float = 30.0,
                 context: zmq.Context | None = None):
        check_endpoint(endpoint)
        self.endpoint = endpoint
        self.send_timeout_s = send_timeout_s
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, int(send_timeout_s * 1000))
        # queue only on completed connections: with no server up, send waits (and times out) instead of
        # piling frames into a pipe nobody reads
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        attach(self.sock, endpoint, bind)
        self.bytes_sent = 0
        self.sent = 0
        self.dropped = 0

    def send(self, message: bytes, live: bool = False, timeout_s: float | None = None) -> bool:
        """Send one message. Live: never wait, return False (and count a drop) when ZeroMQ's queue is full.
        Replay: wait for the peer, up to ``send_timeout_s`` without progress, then raise LinkTimeout."""
        if live:
            try:
                self.sock.send(message, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.dropped += 1
                return False
        else:
            wait_s = self.send_timeout_s if timeout_s is None else timeout_s
            deadline = time.monotonic() + wait_s
            while True:
                if self.sock.poll(100, zmq.POLLOUT):
                    self.sock.send(message, copy=False)
                    break
                if time.monotonic() > deadline:
                    raise LinkTimeout(f"no server took a frame at {self.endpoint} within {wait_s:.0f} s; "
                                      f"is `run_pipeline.py server --bind ...` running and reachable?")
        self.sent += 1
        self.bytes_sent += len(message)
        return True

    def close(self, linger_s: float | None = None) -> None:
        self.sock.close(int((self.send_timeout_s if linger_s is None else linger_s) * 1000))


def attach(sock: zmq.Socket, endpoint: str, bind: bool) -> str:
    """Bind or connect ``sock``; returns the actual endpoint (the port chosen for ``tcp://*:0``). A failure
    closes the socket and raises a UsageError naming the endpoint."""
    try:
        (sock.bind if bind else sock.connect)(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise UsageError(f"cannot {'bind' if bind else 'connect'} {endpoint!r}: {exc} "
                         f"(port in use or address not on this machine?)") from exc
    return sock.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint


class PullLink:
    """Server side: bind (default) or connect a PULL socket and receive wire messages with a poll timeout."""

    def __init__(self, endpoint: str, bind: bool = True, hwm: int = 64, context: zmq.Context | None = None):
        check_endpoint(endpoint)
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = attach(self.sock, endpoint, bind)

    def recv(self, timeout_ms: int = 100) -> bytes | None:
        if self.sock.poll(timeout_ms, zmq.POLLIN):
            return self.sock.recv(copy=True)
        return None

    def close(self) -> None:
        self.sock.close(0)

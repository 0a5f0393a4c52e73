"""The edge's end of the link (:mod:`transport.protocol`): a DEALER that sends frames within its credits, keeps
every unacknowledged replay frame until the server finished it, resends after a server restart, heartbeats."""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict, deque
from typing import Callable

import zmq

from transport import control, wire
from transport.control import ControlError

from transport.protocol import (PROTO, K_HELLO, K_DATA, K_WELCOME, K_ACK, K_NACK, K_ERROR, K_BYE, BUSY, MAX_ERROR_TEXT, ACK_FORMAT, NACK_FORMAT, POLICIES, MODES, LinkTimeout, Refused, tune)


class EdgeClient:
    """The edge's end of the link, with its own I/O thread owning the DEALER socket.

    ``submit(index, data)``: replay blocks while ``backlog`` frames are unacknowledged (never drops); live never
    blocks and keeps the newest frames. ``finish(count)`` sends the end-of-stream message and, in replay, waits
    until the server has acknowledged everything."""

    def __init__(self, endpoint: str, stream: int, fingerprint: bytes, mode: str = "replay", security=None,
                 backlog: int = 32, live_queue: int = 2, policy: str = "drop-oldest", timeout_s: float = 30.0,
                 heartbeat_s: float = 0.5, log: Callable[[str], None] = print, context: zmq.Context | None = None,
                 session: str | None = None, name: str = "edge", busy_wait_s: float = 5.0,
                 source: str | None = None):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {MODES}")
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: use one of {POLICIES}")
        self.endpoint, self.stream, self.fingerprint, self.mode = endpoint, int(stream), fingerprint, mode
        self.security, self.backlog, self.policy = security, max(1, int(backlog)), policy
        self.live_queue = max(1, int(live_queue))
        self.timeout_s, self.heartbeat_s, self.log, self.name = float(timeout_s), float(heartbeat_s), log, name
        self.session = session or os.urandom(8).hex()
        if not re.fullmatch(control.SESSION, self.session):
            raise ValueError(f"session {self.session!r}: use 1 to 64 of A-Z a-z 0-9 _ . : - (or none: a random one)")
        if not 0 <= self.stream <= control.U32_MAX:
            raise ValueError(f"stream {stream!r}: a stream id is an integer in 0..{control.U32_MAX}")
        if source is not None and not re.fullmatch(control.SOURCE, source):
            raise ValueError(f"source {source!r}: a replay source's identity is 16 to 64 lowercase hex digits")
        self.source = source if mode == "replay" else None  # lets a restarted edge continue its run
        self.busy_wait_s = float(busy_wait_s)
        self.busy_since: float | None = None
        self.refused = 0  # server messages that failed their checks (ignored)
        self._ctx = context or zmq.Context.instance()
        self.cond = threading.Condition()
        self.unacked: OrderedDict[int, bytes] = OrderedDict()  # replay: index -> message (eos at index=count)
        self.cursor = 0  # replay: the next index to send
        self.live_q: deque[tuple[int, bytes]] = deque()
        self.live_inflight: dict[int, float] = {}
        self.instance: str | None = None
        self.window = 0
        self.next_index = 0
        self.floor = 0  # replay: frames below this are committed (by this session or an earlier one of its run)
        self.last_heard = 0.0
        self.last_progress = time.monotonic()
        self.last_rewind = 0.0
        self.resend_s = 5.0
        self.error: str | None = None
        self.closing = False
        self.eos_count: int | None = None
        self.eos_sent = False
        self.stats = {"sent": 0, "resent": 0, "acked": 0, "dropped": 0, "bytes": 0, "restarts_seen": 0,
                      "skipped": 0}
        self._sent_once: set[int] = set()
        self.connected = False
        # the I/O thread sleeps in poll(); a frame queued by the graph wakes it through this pipe, so a live frame
        # is sent at once instead of after up to one poll period (10 ms)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.thread = threading.Thread(target=self._io, name=f"{name}-link", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ API (graph thread)
    def submit(self, index: int, data: bytes) -> bool:
        """Queue one frame. Replay: waits (bounded by ``backlog``) and raises LinkTimeout when the server makes
        no progress for ``timeout_s``; a frame the server already committed (below :attr:`resume_at`, e.g. sent
        by an earlier edge session of the same run) is skipped. Live: returns False when a frame was dropped to
        make room."""
        with self.cond:
            self._raise_if_failed()
            if self.mode == "replay" and index < self.floor:
                self.stats["skipped"] += 1
                return True
            if self.mode == "live":
                dropped = False
                if len(self.live_q) >= self.live_queue:
                    dropped = True
                    self.stats["dropped"] += 1
                    if self.policy == "drop-newest":
                        return False
                    self.live_q.popleft()
                self.live_q.append((index, data))
                self._wake()
                return not dropped
            while len(self.unacked) >= self.backlog:
                self._wait_progress()
            self.unacked[index] = data
            self.cond.notify_all()
            self._wake()
            return True

    def _wake(self) -> None:
        """Wake the I/O thread from its poll (a byte on the wake pipe; a full pipe is already a wake-up)."""
        with self.cond:  # the I/O thread closes the pipe under it: never write to a closed (reused) descriptor
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"w")
            except BlockingIOError:
                pass

    def finish(self, count: int, timeout_s: float | None = None) -> bool:
        """Send end-of-stream after ``count`` frames; replay: wait until all is acknowledged. True when done."""
        msg = wire.end_of_stream(self.stream, count, self.fingerprint, time.time_ns())
        wait = self.timeout_s if timeout_s is None else timeout_s
        with self.cond:
            self.eos_count = count
            if self.mode == "replay":
                self.unacked[count] = msg
            else:
                self.live_q.append((count, msg))
            self.cond.notify_all()
            self._wake()
            deadline = time.monotonic() + wait
            while self.error is None:
                if self.mode == "replay" and not self.unacked:
                    return True
                if self.mode == "live" and self.eos_sent:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.1))
        return False

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self._wake()
        self.thread.join(5)

    @property
    def resume_at(self) -> int:
        """Replay: the first frame index the server has not committed yet (0 until it said); a source may skip
        the frames below it (they would only be skipped here)."""
        return self.floor

    def status(self) -> str:
        st = "connected" if self.connected else "waiting for server"
        return (f"{self.name} stream {self.stream} ({self.mode}) -> {self.endpoint}: {st}, instance "
                f"{self.instance or '-'}, unacked {len(self.unacked)}, sent {self.stats['sent']}, "
                f"acked {self.stats['acked']}, dropped {self.stats['dropped']}")

    def _raise_if_failed(self):
        if self.error is not None:
            raise Refused(self.error)

    def _wait_progress(self) -> None:
        self.cond.wait(0.1)
        self._raise_if_failed()
        if time.monotonic() - self.last_progress > self.timeout_s:
            hint = (" (with keys: is this edge's public key in the server's --allowed-keys folder, and is "
                    "--server-key the server's public key?)" if self.security is not None and self.security.on
                    else "")
            raise LinkTimeout(f"no server took a frame at {self.endpoint} within {self.timeout_s:.0f} s; is "
                              f"`run_pipeline.py server --bind ...` running and reachable?{hint}")

    # ------------------------------------------------------------------ I/O thread
    def _hello(self) -> list[bytes]:
        h = {"proto": PROTO, "stream": self.stream, "session": self.session, "mode": self.mode,
             "fingerprint": self.fingerprint.hex()}
        if self.source is not None:
            h["source"] = self.source
        return [K_HELLO, json.dumps(h).encode()]

    def _io(self) -> None:
        """The I/O thread: a failure ends the link with an error the graph thread raises (never a silent hang)."""
        try:
            self._io_loop()
        except BaseException as exc:  # noqa: BLE001 - reported to the graph thread, which fails the stage
            with self.cond:
                self.error = f"the link thread of stream {self.stream} failed: {type(exc).__name__}: {exc}"
                self.cond.notify_all()
            self.log(f"[{self.name}] {self.error}")

    def _io_loop(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        tune(sock)
        if self.security is not None:
            self.security.apply(sock)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        last_hello = 0.0
        try:
            while True:
                with self.cond:
                    if self.closing:
                        break
                    # a refused edge stays quiet, and so does one whose run has ended (its end-of-stream taken):
                    # its hellos would only stand in the way of the stream's next run
                    quiet = self.error is not None or (self.eos_count is not None and (
                        not self.unacked if self.mode == "replay" else self.eos_sent))
                now = time.monotonic()
                if now - last_hello >= self.heartbeat_s and not quiet:
                    last_hello = now
                    try:
                        sock.send_multipart(self._hello(), zmq.NOBLOCK)
                    except zmq.Again:  # no connection yet (IMMEDIATE): try again in 20 ms, not a heartbeat later,
                        last_hello = now - self.heartbeat_s + 0.02  # or a live camera drops its first frames
                    if self.connected and now - self.last_heard > max(3.0, 6 * self.heartbeat_s):
                        self.connected = False
                        self.log(f"[{self.name}] server {self.endpoint} silent for "
                                 f"{now - self.last_heard:.1f} s; reconnecting (back-off up to 2 s)")
                ready = dict(poller.poll(10))
                if self._wake_r in ready:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                if sock in ready:
                    while True:
                        try:
                            parts, extra, _ = control.recv_parts(sock, 3)
                        except zmq.Again:
                            break
                        if extra:
                            self.refused += 1
                            continue
                        try:
                            self._on_message([p.bytes for p in parts])
                        except Exception as exc:  # noqa: BLE001 - one bad message must not end the link
                            self.refused += 1
                            if self.refused == 1:
                                self.log(f"[{self.name}] ignored a server message: {type(exc).__name__}: {exc}")
                self._maybe_rewind()
                self._send_ready(sock)
            with self.cond:
                bye = self.eos_count is not None and (not self.unacked if self.mode == "replay" else self.eos_sent)
            if bye and self.instance is not None:
                try:
                    sock.send_multipart([K_BYE, json.dumps({"stream": self.stream}).encode()], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                sock.close(500)
        finally:
            if not sock.closed:
                sock.close(0)
            with self.cond:
                fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            for fd in fds:
                os.close(fd)

    def _on_message(self, parts: list[bytes]) -> None:
        if not parts:
            return
        kind = parts[0]
        with self.cond:
            self.last_heard = time.monotonic()
            if not self.connected:
                self.connected = True
            if kind == K_WELCOME and len(parts) == 2:
                try:
                    w = control.parse(parts[1], control.WELCOME)
                except ControlError:
                    self.refused += 1
                    return
                inst, nxt, window = w["instance"], w["next"], w["window"]
                if w["stream"] != self.stream:
                    self.refused += 1
                    return
                run = w.get("session", self.session)
                if run != self.session and (self.source is None or self.mode != "replay"):
                    self.refused += 1  # only a replay edge that named its source may be told to continue a run
                    return
                self.busy_since = None
                self.window = window
                continued = run != self.session
                if continued:  # an earlier edge session on this source (this edge before a restart) left off here
                    self.log(f"[{self.name}] stream {self.stream}: continuing run {run} (an earlier edge session "
                             f"on the same source) at frame {nxt}; the frames before it are committed and skipped")
                    self.session = run
                if inst != self.instance or continued:
                    restarted = self.instance is not None and inst != self.instance
                    self.instance = inst
                    self.last_progress = time.monotonic()
                    if self.mode == "replay":
                        gone = [i for i in self.unacked if i < nxt]
                        for i in gone:
                            del self.unacked[i]
                        self.stats["acked" if restarted else "skipped"] += len(gone)
                        self.floor = max(self.floor, nxt)
                        self.cursor = next(iter(self.unacked)) if self.unacked else nxt
                    self.live_inflight.clear()
                    if restarted:
                        self.stats["restarts_seen"] += 1
                        self.log(f"[{self.name}] new server instance {inst} (restart): it has frames < {nxt}; "
                                 f"resending {len(self.unacked)} unacknowledged")
                    else:
                        self.log(f"[{self.name}] connected to server {self.endpoint} (instance {inst}, "
                                 f"stream {self.stream}, {self.mode}, window {self.window}, next frame {nxt})")
                    self.cond.notify_all()
            elif kind == K_ACK and len(parts) == 2 and len(parts[1]) == ACK_FORMAT.size:
                stream, idx, nxt = ACK_FORMAT.unpack(parts[1])
                if stream != self.stream:
                    return
                self.last_progress = time.monotonic()
                if self.mode == "replay":
                    gone = [i for i in self.unacked if i < nxt or i == idx]
                    for i in gone:
                        del self.unacked[i]
                    self.stats["acked"] += len(gone)
                    self.floor = max(self.floor, nxt)
                else:
                    if self.live_inflight.pop(idx, None) is not None:
                        self.stats["acked"] += 1
                self.cond.notify_all()
            elif kind == K_NACK and len(parts) == 2 and len(parts[1]) == NACK_FORMAT.size:
                stream, nxt = NACK_FORMAT.unpack(parts[1])
                if stream == self.stream and self.mode == "replay" and nxt < self.cursor:
                    self.cursor = nxt
            elif kind == K_ERROR and len(parts) in (2, 3):
                text = parts[-1][:MAX_ERROR_TEXT].decode("utf-8", "replace")
                if len(parts) == 3 and parts[1] == BUSY:  # the stream's owner is alive: maybe our own old session
                    now = time.monotonic()
                    if self.busy_since is None:
                        self.busy_since = now
                        self.log(f"[{self.name}] server {self.endpoint}: {text} (retrying for "
                                 f"{self.busy_wait_s:.0f} s in case that edge has just stopped)")
                    if now - self.busy_since < self.busy_wait_s:
                        return
                self.error = f"server {self.endpoint} refused this edge: {text}"
                self.log(f"[{self.name}] {self.error}")
                self.cond.notify_all()
            else:
                self.refused += 1

    def _maybe_rewind(self) -> None:
        """Replay: no ack for ``resend_s`` while the server is alive -> resend from the oldest unacked frame
        (a frame or an ack lost on a reconnect); the server drops what it already has."""
        with self.cond:
            if self.mode != "replay" or not self.unacked or self.instance is None:
                return
            now = time.monotonic()
            first = next(iter(self.unacked))
            if first < self.cursor and now - self.last_progress > self.resend_s and now - self.last_heard < 2.0 \
                    and now - self.last_rewind > self.resend_s:
                self.last_rewind = now
                self.cursor = first

    def _send_ready(self, sock: zmq.Socket) -> None:
        while True:
            with self.cond:
                if self.instance is None or self.error is not None:
                    return
                if self.mode == "replay":
                    inflight = sum(1 for i in self.unacked if i < self.cursor)
                    if inflight >= self.window:
                        return
                    nxt = next((i for i in self.unacked if i >= self.cursor), None)
                    if nxt is None:
                        return
                    data = self.unacked[nxt]
                    is_eos = nxt == self.eos_count
                else:
                    now = time.monotonic()
                    for i, t in list(self.live_inflight.items()):  # a lost ack must not eat credit forever
                        if now - t > 10.0:
                            del self.live_inflight[i]
                    if not self.live_q or len(self.live_inflight) >= self.window:
                        return
                    nxt, data = self.live_q[0]
                    is_eos = nxt == self.eos_count and len(data) == wire.HEADER_SIZE
            try:
                sock.send_multipart([K_DATA, data], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            with self.cond:
                if self.mode == "replay":
                    self.cursor = nxt + 1
                    if nxt in self._sent_once:
                        self.stats["resent"] += 1
                    else:
                        self._sent_once.add(nxt)
                        if len(self._sent_once) > 4 * self.backlog:
                            self._sent_once = {i for i in self._sent_once if i >= nxt - 2 * self.backlog}
                else:
                    if self.live_q and self.live_q[0][0] == nxt:
                        self.live_q.popleft()
                    if is_eos:
                        self.eos_sent = True
                    else:
                        self.live_inflight[nxt] = time.monotonic()
                if not is_eos:
                    self.stats["sent"] += 1
                    self.stats["bytes"] += len(data)
                self.cond.notify_all()

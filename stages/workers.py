"""Topology (b): the server hands each frame's bitstream to worker processes over ZeroMQ.

``server.dispatch`` (in the server graph, after ``server.receive``) binds a ROUTER socket for workers; each
worker is a graph of its own (``configs/pipelines/worker.yaml``: ``worker.jobs`` -> decode -> consumers ->
merge -> ``worker.reply``) that connects with a DEALER, announces how many frames it takes at once
(``capacity``, its credits) and heartbeats. The dispatcher hands frames out round-robin over streams (no stream
starves) to the worker with the most free credit, puts each stream's results back in arrival order and emits
them (:class:`pipeline.stage.ResultRecord`) to the sinks. Adding a worker adds throughput. A worker silent for
``worker_timeout_s`` is dropped: its replay frames go to another worker (nothing lost), its live frames are
counted as lost and acknowledged so the edge's credit comes back.

worker -> dispatcher: ``R`` json ``{"capacity": n}`` (hello and heartbeat); ``O`` <IQ stream, index + JSON
(``null``: the frame could not be decoded). dispatcher -> worker: ``J`` wire message.
"""
from __future__ import annotations

import json
import queue
import struct
import threading
import time
from collections import OrderedDict, deque
from typing import Iterator

import zmq

from pipeline.codecs import get_codec
from pipeline.errors import UsageError
from pipeline.stage import FrameResult, Packet, ResultRecord, Source, Stage, register_stage
from transport import wire

K_READY, K_RESULT, K_JOB = b"R", b"O", b"J"
_KEY = struct.Struct("<IQ")


class _Worker:
    def __init__(self, rid: bytes, capacity: int, sender: str):
        self.rid, self.capacity, self.sender = rid, capacity, sender
        self.jobs: OrderedDict[tuple[int, int], Packet] = OrderedDict()
        self.last_seen = time.monotonic()
        self.done = 0


@register_stage
class Dispatch(Stage):
    """Packet -> worker processes over ZeroMQ (topology b) -> ResultRecord, each stream in order."""
    key = "server.dispatch"
    accepts = (Packet,)
    emits = (ResultRecord,)

    def __init__(self, endpoint: str = "tcp://*:5557", secret_key: str | None = None, allowed_keys: str | None = None,
                 insecure: bool = False, worker_timeout_s: float = 2.0, max_queued: int = 64, drain_s: float = 60.0):
        from transport.link import check_endpoint
        from transport.security import server_security
        self.endpoint = check_endpoint(endpoint, "server.dispatch endpoint")
        self.security = server_security(endpoint, secret_key, allowed_keys, bool(insecure), who="dispatch")
        self.worker_timeout_s, self.max_queued, self.drain_s = float(worker_timeout_s), int(max_queued), float(drain_s)
        if self.max_queued < 1:
            raise UsageError("server.dispatch max_queued must be >= 1")

    def open(self, ctx) -> None:
        super().open(ctx)
        self.cond = threading.Condition()
        self.queues: OrderedDict[int, deque] = OrderedDict()  # stream -> packets waiting for a worker
        self.order: dict[int, deque] = {}  # stream -> indices in arrival order (results leave in this order)
        self.results: dict[tuple[int, int], dict | None] = {}
        self.workers: dict[bytes, _Worker] = {}
        self.queued = 0
        self.inflight = 0
        self.closing = False
        self.lost_live = self.handed_over = 0
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)
        self.security.apply(self.sock)
        try:
            self.sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            self.sock.close(0)
            raise UsageError(f"server.dispatch cannot bind {self.endpoint!r}: {exc}") from exc
        ctx.shared["workers_endpoint"] = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        prev = ctx.shared.get("link_status")
        ctx.shared["link_status"] = lambda: (f"{prev()}; " if callable(prev) else "") + self.status()
        self.thread = threading.Thread(target=self._io, name=f"{ctx.name}-io", daemon=True)
        self.thread.start()

    def status(self) -> str:
        ws = list(self.workers.values())
        return f"{len(ws)} worker(s): " + (", ".join(f"{w.sender} busy {len(w.jobs)}/{w.capacity} done {w.done}"
                                                   for w in ws) or "none connected")

    # ------------------------------------------------------------------ graph thread
    def process(self, p: Packet):
        with self.cond:
            while self.queued + self.inflight >= self.max_queued and not self.ctx.stop.is_set():
                self.cond.wait(0.1)
            self.queues.setdefault(p.stream, deque()).append(p)
            self.order.setdefault(p.stream, deque()).append(p.index)
            self.queued += 1
            self.cond.notify_all()
        return None

    def close(self):
        if getattr(self, "thread", None) is None:
            return None
        deadline = time.monotonic() + self.drain_s
        with self.cond:
            while (self.queued or self.inflight or any(self.order.values())) and time.monotonic() < deadline:
                if self.ctx.stop.is_set() and time.monotonic() > deadline - self.drain_s + 5:
                    break
                self.cond.wait(0.1)
            left = self.queued + self.inflight
            self.closing = True
        self.thread.join(5)
        self.thread = None
        self.sock.close(0)
        if left:
            self.ctx.log(f"[{self.ctx.name}] {left} frame(s) had no result from a worker at shutdown")
        self.ctx.stats.extra.update(self._extra())
        return None

    def _extra(self) -> dict:
        return {"workers": len(self.workers), "handed_over": self.handed_over, "lost_live": self.lost_live}

    # ------------------------------------------------------------------ I/O thread
    def _io(self) -> None:
        last_check = time.monotonic()
        while True:
            with self.cond:
                if self.closing:
                    return
            if self.sock.poll(10, zmq.POLLIN):
                for _ in range(256):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_message(frames)
            now = time.monotonic()
            if now - last_check > 0.2:
                last_check = now
                self._reap(now)
                self.ctx.stats.extra.update(self._extra())
            self._assign()
            self._emit_ready()

    def _on_message(self, frames) -> None:
        from transport.session import ServerSession
        rid = frames[0].bytes
        kind = frames[1].bytes if len(frames) > 1 else b""
        with self.cond:
            w = self.workers.get(rid)
            if kind == K_READY and len(frames) == 3:
                try:
                    cap = max(1, min(64, int(json.loads(frames[2].bytes)["capacity"])))
                except (ValueError, KeyError, TypeError):
                    return
                if w is None:
                    w = self.workers[rid] = _Worker(rid, cap, ServerSession._sender(frames))
                    self.ctx.log(f"[{self.ctx.name}] worker {w.sender} joined (capacity {cap}); {len(self.workers)} "
                                 f"worker(s)")
                w.last_seen = time.monotonic()
            elif kind == K_RESULT and len(frames) == 4 and w is not None and len(frames[2].bytes) == _KEY.size:
                key = _KEY.unpack(frames[2].bytes)
                w.last_seen = time.monotonic()
                if w.jobs.pop(key, None) is None:
                    return  # a result for a frame already handed to someone else
                w.done += 1
                self.inflight -= 1
                try:
                    rec = json.loads(frames[3].bytes)
                except ValueError:
                    rec = None
                self.results[key] = rec if isinstance(rec, dict) else None
                self.cond.notify_all()

    def _reap(self, now: float) -> None:
        with self.cond:
            for rid, w in list(self.workers.items()):
                if now - w.last_seen <= self.worker_timeout_s:
                    continue
                del self.workers[rid]
                redo = lost = 0
                for key, p in reversed(list(w.jobs.items())):
                    self.inflight -= 1
                    if p.header is not None and p.header.live:
                        lost += 1
                        self.results[key] = None  # counted and acknowledged, not retried
                    else:
                        redo += 1
                        self.queues.setdefault(p.stream, deque()).appendleft(p)  # to another worker, first
                        self.queued += 1
                self.lost_live += lost
                self.handed_over += redo
                self.ctx.stats.dropped += lost
                self.ctx.log(f"[{self.ctx.name}] worker {w.sender} silent for {now - w.last_seen:.1f} s: gone; "
                             f"{redo} frame(s) handed to other workers, {lost} live frame(s) lost; "
                             f"{len(self.workers)} worker(s) left")
                self.cond.notify_all()

    def _assign(self) -> None:
        sends = []
        with self.cond:
            while self.queued:
                w = max(self.workers.values(), key=lambda x: x.capacity - len(x.jobs), default=None)
                if w is None or len(w.jobs) >= w.capacity:
                    break
                stream = next((s for s, q in self.queues.items() if q), None)
                if stream is None:
                    break
                p = self.queues[stream].popleft()
                self.queues.move_to_end(stream)  # round robin over streams
                self.queued -= 1
                self.inflight += 1
                w.jobs[(p.stream, p.index)] = p
                sends.append((w.rid, p.data))
            if sends:
                self.cond.notify_all()
        for rid, data in sends:
            try:
                self.sock.send_multipart([rid, K_JOB, data], zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:
                pass  # the worker is gone: the reaper hands the frame to another

    def _emit_ready(self) -> None:
        out = []
        with self.cond:
            for stream, idxs in self.order.items():
                while idxs and (stream, idxs[0]) in self.results:
                    i = idxs.popleft()
                    out.append((stream, i, self.results.pop((stream, i))))
            if out:
                self.cond.notify_all()
        commit = self.ctx.shared.get("commit")
        for stream, i, rec in out:
            if rec is None:
                if commit is not None:
                    commit.done(stream, i)  # finished without a result (lost live frame, undecodable)
                continue
            self.ctx.emit(ResultRecord(stream, i, rec))


class _WorkerCommit:
    """In a worker, 'finished without a result' (a frame that cannot be decoded) goes back to the dispatcher."""

    def __init__(self, replies: queue.SimpleQueue):
        self.replies = replies

    def done(self, stream: int, index: int) -> None:
        self.replies.put((stream, index, b"null"))


@register_stage
class WorkerJobs(Source):
    """A worker's input: connect to a server's ``server.dispatch`` endpoint, take frames (``capacity`` at a
    time) and emit them as Packets; ``worker.reply`` sends the results back through this stage's socket."""
    key = "worker.jobs"
    live = False

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5557", checkpoint=None, capacity: int = 2,
                 secret_key: str | None = None, server_key: str | None = None, insecure: bool = False,
                 heartbeat_s: float = 0.5, idle_exit_s: float | None = None):
        from transport.link import check_endpoint
        from transport.security import client_security
        self.endpoint = check_endpoint(endpoint, "worker.jobs endpoint")
        self.security = client_security(endpoint, secret_key, server_key, bool(insecure), who="worker")
        self.checkpoint, self.capacity, self.heartbeat_s = checkpoint, int(capacity), float(heartbeat_s)
        self.idle_exit_s = float(idle_exit_s) if idle_exit_s else None

    def open(self, ctx) -> None:
        import numpy as np
        super().open(ctx)
        self.codec = get_codec(self.checkpoint, edge_only=True)
        size = int(self.codec.input_size)
        self.latent_shape = tuple(self.codec.encode(np.zeros((1, size, size, 3), np.uint8))[0].latent_shape)
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        ctx.shared["worker_replies"] = self.replies
        ctx.shared["commit"] = _WorkerCommit(self.replies)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        from transport.session import _tune
        _tune(self.sock)
        self.security.apply(self.sock)
        self.sock.connect(self.endpoint)

    def _ready(self) -> None:
        try:
            self.sock.send_multipart([K_READY, json.dumps({"capacity": self.capacity}).encode()], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _flush(self) -> None:
        while True:
            try:
                stream, index, body = self.replies.get_nowait()
            except queue.Empty:
                return
            try:
                self.sock.send_multipart([K_RESULT, _KEY.pack(stream, index), body])
            except zmq.ZMQError:
                pass

    def frames(self) -> Iterator[Packet]:
        last_ready = 0.0
        last_job = time.monotonic()
        while not self.ctx.stop.is_set():
            now = time.monotonic()
            if now - last_ready >= self.heartbeat_s:
                last_ready = now
                self._ready()
            if self.idle_exit_s and now - last_job > self.idle_exit_s:
                self.ctx.log(f"[{self.ctx.name}] no frame for {self.idle_exit_s:.0f} s; ending")
                break
            self._flush()
            if not self.sock.poll(10, zmq.POLLIN):
                continue
            parts = self.sock.recv_multipart()
            if len(parts) != 2 or parts[0] != K_JOB:
                continue
            last_job = time.monotonic()
            rx = time.time_ns()
            try:
                h, payload = wire.unpack(parts[1], self.codec.fingerprint, expected_latent_shape=self.latent_shape)
            except wire.WireError as exc:
                self.ctx.stats.errors += 1
                self.ctx.log(f"[{self.ctx.name}] refused a job: {exc}")
                continue
            self.ctx.stats.extra["jobs"] = self.ctx.stats.extra.get("jobs", 0) + 1
            yield Packet(h.stream_id, h.frame_index, h.capture_ns, parts[1], False, header=h, payload=payload,
                         received_ns=rx, timings={"edge": h.edge_us / 1000.0,
                                                  "link": max(0.0, (rx - h.sent_ns) / 1e6)})
        # finish what is in the graph, send the last results
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            self._flush()
            time.sleep(0.02)

    def close(self):
        s = getattr(self, "sock", None)
        if s is not None:
            self._flush()
            s.close(1000)
            self.sock = None


@register_stage
class WorkerReply(Stage):
    """A worker's output: each finished frame's JSON object back to the dispatcher (via ``worker.jobs``)."""
    key = "worker.reply"
    accepts = (FrameResult, ResultRecord)

    def process(self, fr):
        from stages.sinks import frame_to_json
        obj = fr.record if isinstance(fr, ResultRecord) else frame_to_json(fr, self.ctx.shared)
        replies = self.ctx.shared.get("worker_replies")
        if replies is None:
            raise RuntimeError("worker.reply needs a worker.jobs source in the same graph")
        replies.put((int(obj["stream"]), int(obj["frame"]), json.dumps(obj, separators=(",", ":")).encode()))

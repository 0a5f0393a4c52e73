"""Topology (b): the server hands each frame's bitstream to worker processes over ZeroMQ.

``server.dispatch`` (in the server graph, after ``server.receive``) binds a ROUTER socket for workers; each
worker is a graph of its own (``configs/pipelines/worker.yaml``: ``worker.jobs`` -> decode -> consumers ->
merge -> ``worker.reply``) that connects with a DEALER, announces how many frames it takes at once
(``capacity``, its credits) and heartbeats. The dispatcher hands frames out round-robin over streams (no stream
starves) to the worker with the most free credit, puts each stream's results back in arrival order and emits
them (:class:`pipeline.stage.ResultRecord`, with the ``session`` of the edge run each frame belongs to) to the
sinks. Adding a worker adds throughput. A worker silent for
``worker_timeout_s`` is dropped: its replay frames go to another worker (nothing lost), its live frames are
counted as lost and acknowledged so the edge's credit comes back.

worker -> dispatcher: ``R`` json ``{"capacity": n}`` (hello and heartbeat); ``O`` <IQ stream, index + JSON
(``null``: the frame could not be decoded). dispatcher -> worker: ``J`` wire message.

Every worker message passes the checks of :mod:`transport.control` (part count, size, nesting depth, exact types
and ranges, finite numbers) before it is used; what fails is refused and counted (``refused`` in the summary),
logged at most once per kind per worker per interval. A failure inside the dispatcher's I/O thread stops the
server with exit 1 and a message naming it (after ``fatal_exit_s`` at the latest), never a silent hang.
"""
from __future__ import annotations

import json
import os
import queue
import struct
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from typing import Iterator

import zmq

from pipeline.codecs import get_codec
from core.errors import UsageError
from pipeline.stage import FrameResult, Packet, ResultRecord, Source, Stage, register_stage
from transport import control, wire
from transport.control import ControlError

K_READY, K_RESULT, K_JOB = b"R", b"O", b"J"
_KEY = struct.Struct("<IQ")
MAX_PARTS = 4  # routing id, kind, key, result


class PartsError(ControlError):
    """A worker message with more parts than any message of the protocol (dropped part by part)."""


class ResultError(ControlError):
    """A worker result that is not the JSON object of the frame it answers (the frame is then finished without
    a result, as if it could not be decoded)."""


class InternalError(ControlError):
    """Handling one worker message raised an unexpected exception (a bug): that message is dropped."""


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
                 insecure: bool = False, worker_timeout_s: float = 2.0, max_queued: int = 64, drain_s: float = 60.0,
                 fatal_exit_s: float = 30.0):
        from transport.link import check_endpoint
        from transport.security import server_security
        self.endpoint = check_endpoint(endpoint, "server.dispatch endpoint")
        self.security = server_security(endpoint, secret_key, allowed_keys, bool(insecure), who="dispatch")
        self.worker_timeout_s, self.max_queued, self.drain_s = float(worker_timeout_s), int(max_queued), float(drain_s)
        self.fatal_exit_s = float(fatal_exit_s or 0)
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
        self.failed: str | None = None
        self._watchdog: threading.Timer | None = None
        self.refusals = control.RefusalLog(ctx.log, ctx.name)
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, control.RESULT.max_bytes + 64)  # per part: the largest is a result
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
            while self.queued + self.inflight >= self.max_queued and not self.ctx.stop.is_set() \
                    and self.failed is None:
                self.cond.wait(0.1)
            if self.failed is not None:
                raise RuntimeError(self.failed)
            self.queues.setdefault(p.stream, deque()).append(p)
            self.order.setdefault(p.stream, deque()).append(p.index)
            self.queued += 1
            self.cond.notify_all()
        return None

    def close(self):
        if getattr(self, "thread", None) is None:
            return None
        if self.failed is not None:  # the I/O thread is gone: nothing more will come back from a worker
            if self._watchdog is not None:
                self._watchdog.cancel()
            self.thread = None
            self.sock.close(0)
            self.ctx.stats.extra.update(self._extra())
            raise RuntimeError(self.failed)
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
        return {"workers": len(self.workers), "handed_over": self.handed_over, "lost_live": self.lost_live,
                "refused": dict(self.refusals.counts)}

    def _refuse(self, exc: Exception, frames) -> None:
        from transport.session import ServerSession
        self.refusals.refuse(exc, ServerSession._sender(frames), ServerSession._peer(frames))
        self.ctx.stats.errors += 1

    # ------------------------------------------------------------------ I/O thread
    def _io(self) -> None:
        """The I/O thread. Whatever kills it stops the server with exit 1 and says why (:meth:`_die`)."""
        try:
            self._io_loop()
        except BaseException as exc:  # noqa: BLE001 - reported, then the process goes down
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        msg = (f"[{self.ctx.name}] the dispatch I/O thread failed: {type(exc).__name__}: {exc}; no frame can "
               f"reach a worker any more: stopping the server (exit 1)")
        with self.cond:
            self.failed = msg
            self.cond.notify_all()
        self.ctx.log(msg)
        self.ctx.log(traceback.format_exc().rstrip())
        self.ctx.stop.set()
        if self.fatal_exit_s > 0:  # the graph should end by itself; if anything keeps it up, end the process
            self._watchdog = threading.Timer(self.fatal_exit_s, self._hard_exit)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _hard_exit(self) -> None:
        sys.stderr.write(f"{self.failed}\n[{self.ctx.name}] the server did not stop within {self.fatal_exit_s:.0f} s "
                         f"of that failure: exiting now (1)\n")
        sys.stderr.flush()
        os._exit(1)

    def _io_loop(self) -> None:
        last_check = time.monotonic()
        while True:
            with self.cond:
                if self.closing:
                    return
            if self.sock.poll(10, zmq.POLLIN):
                for _ in range(256):
                    try:
                        frames, extra, extra_bytes = control.recv_parts(self.sock, MAX_PARTS)
                    except zmq.Again:
                        break
                    try:
                        self._on_message(frames, extra, extra_bytes)
                    except Exception as exc:  # noqa: BLE001 - one message must never stop the dispatcher
                        first = "InternalError" not in self.refusals.counts
                        self._refuse(InternalError(f"{type(exc).__name__}: {exc} while handling a worker message; "
                                                   f"dropped it (a bug: please report this line)"), frames)
                        if first:
                            self.ctx.log(traceback.format_exc().rstrip())
            now = time.monotonic()
            if now - last_check > 0.2:
                last_check = now
                control.trim_pending()
                self._reap(now)
                self.ctx.stats.extra.update(self._extra())
            self._assign()
            self._emit_ready()

    def _on_message(self, frames, extra: int = 0, extra_bytes: int = 0) -> None:
        from transport.session import ServerSession
        rid = frames[0].bytes
        kind = frames[1].bytes if len(frames) > 1 else b""
        if extra:
            total = sum(len(f) for f in frames) + extra_bytes
            self._refuse(PartsError(f"a message of {len(frames) - 1 + extra} parts ({total / 2 ** 20:.1f} MiB); "
                                    f"worker messages have at most {MAX_PARTS - 1}: dropped part by part"), frames)
            control.release_memory(extra_bytes)
            return
        if kind == K_READY and len(frames) == 3:
            try:
                cap = control.parse(frames[2].bytes, control.READY)["capacity"]
            except ControlError as exc:
                self._refuse(exc, frames)
                return
            with self.cond:
                w = self.workers.get(rid)
                if w is None:
                    w = self.workers[rid] = _Worker(rid, cap, ServerSession._sender(frames))
                    self.ctx.log(f"[{self.ctx.name}] worker {w.sender} joined (capacity {cap}); {len(self.workers)} "
                                 f"worker(s)")
                w.capacity = cap
                w.last_seen = time.monotonic()
            return
        if not (kind == K_RESULT and len(frames) == 4 and len(frames[2].bytes) == _KEY.size):
            self._refuse(ControlError(f"a {len(frames) - 1}-part message of kind {kind[:8]!r} that is not a worker "
                                      f"ready or result message"), frames)
            return
        key = _KEY.unpack(frames[2].bytes)
        with self.cond:
            w = self.workers.get(rid)
            if w is None:
                self._refuse(ControlError(f"a result for stream {key[0]} frame {key[1]} from a peer that is not a "
                                          f"joined worker (no ready message)"), frames)
                return
            w.last_seen = time.monotonic()
            if key not in w.jobs:
                return  # a result for a frame already handed to someone else
        try:
            rec = control.parse(frames[3].bytes, control.RESULT)
            if rec is not None and (type(rec.get("stream")) is not int or type(rec.get("frame")) is not int
                                    or (rec["stream"], rec["frame"]) != key):
                raise ResultError(f"worker result for stream {key[0]} frame {key[1]} holds stream "
                                  f"{str(rec.get('stream'))[:20]} frame {str(rec.get('frame'))[:20]}")
        except ControlError as exc:
            self._refuse(exc if isinstance(exc, ResultError) else ResultError(str(exc)), frames)
            rec = None  # finished without a result, like a frame that could not be decoded
        with self.cond:
            if w.jobs.pop(key, None) is None:
                return
            w.done += 1
            self.inflight -= 1
            self.results[key] = rec
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
        session_of = getattr(commit, "session_of", None)
        for stream, i, rec in out:
            if rec is None:
                if commit is not None:
                    commit.done(stream, i)  # finished without a result (lost live frame, undecodable)
                continue
            run = session_of(stream, i) if session_of is not None and "session" not in rec else None
            if run is not None:  # the edge run this row belongs to (a reader tells runs apart by it)
                rec = {"stream": rec["stream"], "frame": rec["frame"], "session": run, **rec}
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
        if not 1 <= self.capacity <= control.MAX_CAPACITY:
            raise UsageError(f"worker.jobs capacity {capacity!r}: give the frames this worker holds at once, "
                             f"1..{control.MAX_CAPACITY}")
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
            try:
                kept, extra, _ = control.recv_parts(self.sock, 2)
            except zmq.Again:
                continue
            parts = [f.bytes for f in kept]
            if extra or len(parts) != 2 or parts[0] != K_JOB:
                self.ctx.stats.errors += 1
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

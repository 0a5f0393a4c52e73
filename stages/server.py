"""Server half: ZeroMQ PULL -> wire checks -> entropy decode + decoder + shared body once per frame."""
from __future__ import annotations

import math
import time
from typing import Iterator

from pipeline.codecs import get_codec, warm_up
from pipeline.envelope import Completion, FrameMeta
from pipeline.stage import Features, FrameResult, Packet, Source, Stage, register_stage
from core.geometry import letterbox_params
from transport import wire


MAX_BATCH = 256  # frames per server.decode batch: far above what pays on a CPU, a guard against typos
MAX_WAIT_MS = 1000.0  # a batch waits at most this long for more frames (every frame in it waits as long)


def _number(value, name: str, kind: type, lo: float, what: str):
    """``value`` as ``kind`` (int or float), at least ``lo``; a UsageError naming the parameter otherwise."""
    from core.errors import UsageError
    try:
        x = kind(value)
    except (TypeError, ValueError):
        x = None
    if x is None or isinstance(value, bool) or not math.isfinite(x) or x < lo:
        raise UsageError(f"server.receive {name} {value!r}: give the {what}, >= {lo:g}")
    return x


@register_stage
class ServerReceive(Source):
    """Receive frames over ZeroMQ ROUTER (transport.server_session): wire checks, model fingerprint and latent shape,
    replay/duplicate checks, credits; emit Packets in arrival order (each stream in order).

    Refused messages are counted per kind and each kind logged once with its sender. Each Packet carries its
    frame's completion handle (``meta.completion``), bound to this session's acknowledgements: a frame is
    acknowledged when finished, i.e. written by every committing stage downstream (the JSONL sink, whose journal
    this session then resumes from), or lost on the way (counted as ``lost``); on emission when no stage
    downstream commits (decided from the graph when it is wired). ``exit_on_eos``: end once every stream has
    sent end-of-stream and all its frames are finished (on SIGINT/SIGTERM it still waits up to ``drain_s``);
    otherwise run until stopped. tcp:// needs the server key pair (``secret_key``) and a folder of allowed edge
    public keys (``allowed_keys``) unless ``insecure``.

    Limits (transport.server_session.ServerSession): ``max_payload`` bytes per frame, ``max_frame_side`` pixels for the
    original frame's width and height a frame may declare (default 4096: the video sink and the result mapping
    work at that size), ``window`` frames in flight per stream; a stream belongs to the key that opened it
    (``owner_timeout_s``: how long its owner may be silent before another key can take it over).

    Per peer (its CURVE key, without keys its address): ``max_streams_per_peer`` streams held at once, new
    sessions at ``session_rate`` per second (after a burst of ``max_streams_per_peer``), ``peer_rate`` costly
    messages per second (hellos, goodbyes, refused or repeated frames; beyond, its messages are dropped unread);
    of ``max_streams`` slots, those of streams silent for ``reclaim_s`` (default ``owner_timeout_s``) go to new
    streams that need them. Messages are served in turns across peers (fair queuing)."""
    key = "server.receive"
    live = False

    def __init__(self, endpoint: str = "tcp://*:5555", bind: bool = True, checkpoint=None, exit_on_eos: bool = True,
                 max_frames=None, hwm: int = 16, drain_s: float = 10.0, idle_timeout_s: float | None = None,
                 window: int = 8, secret_key: str | None = None, allowed_keys: str | None = None,
                 insecure: bool = False, max_payload: int = 4 * 1024 * 1024, status_s: float = 0.0,
                 bye_grace_s: float = 8.0, max_frame_side: int = 4096, owner_timeout_s: float = 3.0,
                 max_streams: int = 256, max_streams_per_peer: int = 32, session_rate: float = 2.0,
                 reclaim_s: float | None = None, peer_rate: float = 1000.0, live_window: int = 2):
        from core.errors import UsageError
        from transport.link import check_endpoint
        from transport.security import server_security
        self.endpoint = check_endpoint(endpoint, "server.receive endpoint")
        self.bind, self.checkpoint, self.exit_on_eos = bool(bind), checkpoint, bool(exit_on_eos)
        self.max_frames = int(max_frames) if max_frames not in (None, "", 0) else None
        self.drain_s = float(drain_s)
        self.idle_timeout_s = float(idle_timeout_s) if idle_timeout_s else None
        self.window, self.max_payload, self.status_s = int(window), int(max_payload), float(status_s or 0)
        self.bye_grace_s = float(bye_grace_s)
        if self.window < 1:
            raise UsageError(f"server.receive window {window!r}: give the frames in flight per stream, >= 1")
        self.live_window = int(live_window)
        if self.live_window < 1:
            raise UsageError(f"server.receive live_window {live_window!r}: give the frames in flight per live "
                             f"stream, >= 1 (default 2: each frame in flight is a frame of latency)")
        try:
            self.max_frame_side = int(max_frame_side)
        except (TypeError, ValueError):
            self.max_frame_side = 0
        if not 1 <= self.max_frame_side <= wire.MAX_SIDE:
            raise UsageError(f"server.receive max_frame_side {max_frame_side!r}: give the largest original frame "
                             f"width/height to accept, 1..{wire.MAX_SIDE} pixels (default 4096)")
        self.owner_timeout_s = float(owner_timeout_s)
        if self.owner_timeout_s <= 0:
            raise UsageError(f"server.receive owner_timeout_s {owner_timeout_s!r}: give seconds > 0 (default 3)")
        self.limits = {"max_streams": _number(max_streams, "max_streams", int, 1, "streams held at once (256)"),
                       "max_streams_per_peer": _number(max_streams_per_peer, "max_streams_per_peer", int, 1,
                                                       "streams one peer may hold (32)"),
                       "session_rate": _number(session_rate, "session_rate", float, 1e-3,
                                               "new sessions per second per peer (2)"),
                       "reclaim_s": _number(reclaim_s if reclaim_s not in (None, "") else self.owner_timeout_s,
                                            "reclaim_s", float, 1e-3,
                                            "seconds of silence before a stream's slot may be reused (3)"),
                       "peer_rate": _number(peer_rate, "peer_rate", float, 1.0,
                                            "costly messages per second per peer (1000)")}
        self.security = server_security(endpoint, secret_key, allowed_keys, bool(insecure), who="server")

    def open(self, ctx) -> None:
        import numpy as np

        from transport.runs import RunLedger
        from transport.server_session import ServerSession
        super().open(ctx)
        self.codec = get_codec(self.checkpoint, edge_only=True)  # the fingerprint and latent shape suffice
        size = int(self.codec.input_size)
        self.latent_shape = tuple(self.codec.encode(np.zeros((1, size, size, 3), np.uint8))[0].latent_shape)
        # who finishes frames comes from the graph's wiring (ctx.committers), not from which stage opened first
        self.committers = len(ctx.committers)
        self.auto_commit = self.committers == 0
        journals = [j for j in (s.journal() for s in ctx.committers) if j is not None]
        self.commit = journals[0] if journals else RunLedger()
        self.lost = 0
        self.session = ServerSession(self.endpoint, self.codec.fingerprint, self.latent_shape, self.commit,
                                     security=self.security, window=self.window, max_payload=self.max_payload,
                                     live_window=self.live_window,
                                     log=ctx.log, bind=self.bind, name=ctx.name,
                                     max_frame_side=self.max_frame_side, owner_timeout_s=self.owner_timeout_s,
                                     **self.limits)
        self.refused = self.session.refused

    def link_status(self) -> str | None:
        ses = getattr(self, "session", None)
        return ses.status() if ses is not None else None

    def edge_links(self) -> dict[int, dict] | None:
        """{stream: {connected, mode, peer}} of the edge streams this session holds (linestate, the web view)."""
        ses = getattr(self, "session", None)
        if ses is None:
            return None
        return {st.stream: {"connected": bool(st.connected) and not bool(st.bye), "mode": str(st.mode),
                            "peer": str(st.sender)} for st in list(ses.streams.values())}

    def _completion(self, stream: int, index: int, live: bool) -> Completion:
        """The handle of one received frame: finishing it queues the frame's ack on this session's ledger."""
        def ack(lost: bool) -> None:
            if lost:
                self.lost += 1
            self.commit.done(stream, index)

        return Completion(ack, needed=self.committers, resend=not live)

    def _stats(self) -> None:
        ex = self.ctx.stats.extra
        ex["refused"] = dict(self.session.refused)
        ex["bytes"] = self.session.bytes
        ex["reclaimed"] = self.session.reclaimed
        ex["lost"] = self.lost
        self.ctx.stats.errors = sum(self.session.refused.values())

    def frames(self) -> Iterator[Packet]:
        stop, ses = self.ctx.stop, self.session
        stop_at = None
        last_msg = last_status = last_house = time.monotonic()
        total = 0
        done_at = None
        while True:
            now = time.monotonic()
            if stop.is_set() and stop_at is None:
                stop_at = now
            if stop_at is not None:
                # replay: wait up to drain_s for the edges' end-of-stream; a standalone server stops taking new
                # frames at once (frames already inside the graph still finish)
                drain = self.drain_s if self.exit_on_eos else min(self.drain_s, 0.5)
                if now - stop_at > drain:
                    break
            if self.max_frames is not None and total >= self.max_frames:
                break
            if self.idle_timeout_s and now - last_msg > self.idle_timeout_s:
                self.ctx.log(f"[{self.ctx.name}] no message for {self.idle_timeout_s:.0f} s; ending")
                break
            if now - last_house > 1.0:
                last_house = now
                ses.housekeeping()
                self._stats()
            if self.status_s and now - last_status > self.status_s:
                last_status = now
                self.ctx.log(f"[{self.ctx.name}] {ses.status()}")
            got = ses.poll(10)
            if got:
                last_msg = time.monotonic()
            for header, payload, data, rx in got:
                if stop_at is not None and not self.exit_on_eos:
                    continue  # stopping: take nothing new (the edge resends it to the next server)
                total += 1
                s, i = header.stream_id, header.frame_index
                # not ``live`` inside the graph: the credit window is this server's back-pressure, a received frame
                # is never dropped on a full queue here
                meta = FrameMeta(s, i, header.capture_ns, False,
                                 {"edge": header.edge_us / 1000.0, "link": max(0.0, (rx - header.sent_ns) / 1e6)},
                                 sent_ns=header.sent_ns, received_ns=rx, session=self.commit.session_of(s, i),
                                 completion=self._completion(s, i, header.live))
                yield Packet(meta, data, header=header, payload=payload)
                if self.auto_commit:
                    meta.commit()
            ses.flush_acks()
            if self.exit_on_eos and ses.all_done():
                # every stream ended and is finished: stay until each edge says it has its last acks (a lost
                # ack is resent on the edge's retry), at most ``bye_grace_s``
                if done_at is None:
                    done_at = time.monotonic()
                if ses.all_gone() or time.monotonic() - done_at > self.bye_grace_s:
                    self._stats()
                    return
        # leaving early: acknowledge what finishes within a moment, the rest is resent to the next server
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(st.pending for st in ses.streams.values()):
            ses.flush_acks()
            time.sleep(0.02)
        ses.flush_acks()
        self._stats()

    def close(self):
        ses = getattr(self, "session", None)
        if ses is not None:
            ses.flush_acks()
            ses.close()
            self.session = None


@register_stage
class RecordHeader(Stage):
    """Packet -> FrameResult without decoding: stream, frame, timestamps, bytes, shapes (no task results).
    For archiving or auditing what arrives, and for fast plumbing tests of the transport."""
    key = "server.record"
    accepts = (Packet,)
    emits = (FrameResult,)

    def process(self, p: Packet):
        h = p.header if p.header is not None else wire.unpack(p.data)[0]
        meta = p.meta.derive(sent_ns=h.sent_ns, received_ns=p.received_ns or time.time_ns())
        return FrameResult(meta, time.time_ns(), len(p.data), tuple(h.latent_shape), tuple(h.orig_size), {}, {},
                           p.image)


@register_stage
class Delay(Stage):
    """Pass every message through after sleeping ``ms`` milliseconds (a stand-in for a slow consumer);
    ``after: N, then_ms: X`` changes the delay after N messages (an overload that ends)."""
    key = "util.delay"

    def __init__(self, ms: float = 100.0, after: int | None = None, then_ms: float | None = None):
        self.ms, self.after = float(ms), after
        self.then_ms = float(then_ms) if then_ms is not None else self.ms
        self.n = 0

    def process(self, msg):
        self.n += 1
        ms = self.then_ms if self.after is not None and self.n > int(self.after) else self.ms
        if ms > 0:
            time.sleep(ms / 1000.0)
        return msg


@register_stage
class ServerDecode(Stage):
    """Packet -> Features: entropy decode, decoder and shared body, once per frame (codec.decode).

    Dynamic batching across streams: ``max_batch`` > 1 decodes up to that many frames (from any streams) in one
    ``codec.decode`` call, waiting at most ``max_wait_ms`` after the first for more to arrive (the runtime gathers
    them, :mod:`pipeline.graph`), then emits one Features per frame in the order received, so each stream keeps
    its order, and each frame keeps its own envelope and completion handle. A frame that fails the codec's checks
    or does not entropy-decode is lost alone, as without batching. A batched frame's ``decode`` timing is its share
    of the batch, the call's time divided by the frames in it (not the time it waited for the batch to fill).
    ``max_batch`` 1 (the default) decodes each frame alone, as soon as it arrives."""
    key = "server.decode"
    accepts = (Packet,)
    emits = (Features,)
    runs_model = True
    provides_codec = True  # ctx.codec() of the graph's other stages: the class names of its results

    def __init__(self, checkpoint=None, max_batch=1, max_wait_ms=5.0):
        from core.errors import UsageError
        self.checkpoint = checkpoint
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
            raise UsageError(f"server.decode max_batch {max_batch!r}: give the most frames to decode at once, an "
                             f"integer 1..{MAX_BATCH} (1: no batching; e.g. --max-batch 8)")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) \
                or not (math.isfinite(max_wait_ms) and 0 <= max_wait_ms <= MAX_WAIT_MS):
            raise UsageError(f"server.decode max_wait_ms {max_wait_ms!r}: give the milliseconds to wait for more "
                             f"frames after the first of a batch, 0..{MAX_WAIT_MS:g} (e.g. --max-wait-ms 5)")
        self.max_batch, self.max_wait_ms = max_batch, float(max_wait_ms)

    def open(self, ctx) -> None:
        super().open(ctx)
        self.codec = get_codec(self.checkpoint)
        self._lb: dict[tuple[int, int], object] = {}
        warm_up(self.codec, decode=True)

    def _encoded(self, p: Packet):
        """The packet's wire header and its payload as the codec takes it."""
        from codec.api import EncodedFrame
        h = p.header if p.header is not None else wire.unpack(p.data, self.codec.fingerprint)[0]
        payload = p.payload if p.payload is not None else wire.unpack(p.data)[1]
        return h, EncodedFrame(bytes(payload), tuple(h.latent_shape), h.fingerprint)

    def _undecodable(self, p: Packet, exc: Exception) -> None:
        self.ctx.stats.errors += 1
        self.ctx.log(f"[{self.ctx.name}] stream {p.stream} frame {p.index}: cannot decode: {exc}")
        p.meta.lose(f"cannot decode: {exc}")  # finished without a result: acknowledged, not resent forever

    def _features(self, p: Packet, h, feats) -> Features:
        key = h.orig_size
        lb = self._lb.get(key)
        if lb is None:
            lb = self._lb[key] = letterbox_params(h.orig_size[0], h.orig_size[1], self.codec.input_size)
        meta = p.meta.derive(sent_ns=h.sent_ns, received_ns=p.received_ns or time.time_ns())
        return Features(meta, len(p.data), tuple(h.latent_shape), lb, feats, p.image)

    def process(self, p: Packet):
        from codec.api import CodecError
        h, enc = self._encoded(p)
        try:
            feats = self.codec.decode([enc])
        except CodecError as exc:
            self._undecodable(p, exc)
            return None
        return self._features(p, h, feats)

    def process_batch(self, packets: list[Packet]) -> list:
        """Frames of any streams -> one Features each (None for a frame lost here), in order: one codec.decode
        for the frames that pass the codec's checks, split per frame. When the batch does not entropy-decode
        (a corrupt payload), each of its frames is decoded alone, so only the bad one is lost."""
        from codec.api import CodecError
        items = [self._encoded(p) for p in packets]  # a wire error raises: the runtime redoes them one by one
        good, bad = [], []
        for i, (_, enc) in enumerate(items):
            try:
                self.codec.check_encoded(enc)
                good.append(i)
            except CodecError as exc:
                bad.append((i, exc))
        out: list = [None] * len(packets)
        if good:
            try:
                feats = self.codec.decode([items[i][1] for i in good]).split()
            except CodecError:
                feats = None
            if feats is None:
                for i in good:
                    out[i] = self.process(packets[i])
            else:
                for i, f in zip(good, feats):
                    out[i] = self._features(packets[i], items[i][0], f)
        for i, exc in bad:  # side effects last: nothing above raised, the runtime will not redo these frames
            self._undecodable(packets[i], exc)
        return out

"""Edge half: letterbox -> encoder -> entropy coder -> wire message (`edge.encode`), then ZeroMQ (`edge.send`)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

import core.offline  # noqa: F401  (before ultralytics, which only letterbox_params imports)
from core.errors import UsageError
from core.geometry import Letterbox, letterbox_image, letterbox_params  # noqa: F401 - re-exported (former home)
from pipeline.codecs import get_codec, warm_up
from pipeline.stage import Frame, Packet, Source, Stage, register_stage
from transport import wire


@register_stage
class EdgeEncode(Stage):
    """Frame -> Packet: letterbox to codec.input_size, codec.encode, wire.pack (header with the fingerprint)."""
    key = "edge.encode"
    accepts = (Frame,)
    emits = (Packet,)
    runs_model = True

    def __init__(self, checkpoint=None, keep_image: bool = False):
        self.checkpoint = checkpoint
        self.keep_image = bool(keep_image)

    def open(self, ctx) -> None:
        super().open(ctx)
        self.codec = get_codec(self.checkpoint, edge_only=True)
        self.size = int(self.codec.input_size)
        warm_up(self.codec)
        # the senders downstream that know where their server stands (EdgeSend.resume_at): frames every one of
        # them would skip as already committed are not encoded either
        rt = ctx.runtime
        self.senders = [s for s in (rt.downstream(ctx.name) if rt is not None else [])
                        if callable(getattr(s, "resume_at", None))]

    def _committed(self, f: Frame) -> bool:
        """Whether every sender downstream says the server committed this replay frame in an earlier run."""
        return not f.live and bool(self.senders) and all(f.index < s.resume_at(f.stream) for s in self.senders)

    def process(self, f: Frame) -> Packet | None:
        if self._committed(f):
            return None  # committed by the server in an earlier run of this edge: not encoded again
        t0 = time.perf_counter()
        h, w = f.image.shape[:2]
        if f.image.ndim != 3 or f.image.shape[2] != 3 or f.image.dtype != np.uint8:
            raise ValueError(f"frame {f.index} must be (H, W, 3) uint8 RGB, got {f.image.shape} {f.image.dtype}")
        lb = letterbox_image(f.image, self.size)
        enc = self.codec.encode(lb[None])[0]
        edge_us = int((time.perf_counter() - t0) * 1e6)
        header = wire.WireHeader(f.stream, f.index, f.capture_ns, time.time_ns(), self.codec.fingerprint,
                                 tuple(enc.latent_shape), (w, h), edge_us, wire.FLAG_LIVE if f.live else 0)
        data = wire.pack(header, enc.payload)
        return Packet(f.meta.derive(), data, image=f.image if self.keep_image else None)


def source_identity(stage) -> str | None:
    """A digest naming what a replay source reads: its kind, its file or folder (resolved path; size and
    modification time of the file, or of each file in the folder) and its stream id. The same unchanged input
    gives the same identity, so that an edge restarted on it continues the server's unfinished run instead of
    starting again at frame 0; an edited or replaced file gives another. A source may name its input itself
    with an ``identity()`` method. None (a source without a path, e.g. a plugin): a restart starts a new run."""
    inner = getattr(stage, "inner", None)
    if isinstance(inner, Source):
        stage = inner
    ident = getattr(stage, "identity", None)
    if callable(ident):
        value = ident()
        if value is None:
            return None
        desc: list = ["custom", str(getattr(stage, "key", "")), str(value)]
    else:
        path = getattr(stage, "path", None)
        if path is None:
            return None
        p = Path(str(path)).resolve()
        try:
            if p.is_file():
                st = p.stat()
                items = [[p.name, st.st_size, st.st_mtime_ns]]
            elif p.is_dir():
                items = sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in p.iterdir() if f.is_file())
            else:
                return None
        except OSError:
            return None
        desc = [str(getattr(stage, "key", "")), str(p), items]
    desc.append(int(getattr(stage, "stream", 0)))
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:32]


@register_stage
class EdgeSend(Stage):
    """Packet -> ZeroMQ DEALER with credits and acks (transport.edge_session.EdgeClient), one link per stream.

    Replay packets are kept until the server acknowledges them (resent after a server restart); live packets go
    through a short queue of the newest frames (``policy`` drop-oldest / drop-newest, drops counted). tcp://
    needs CurveZMQ keys (``secret_key`` + ``server_key``) unless ``insecure: true``.

    ``resume`` (replay): the hello names the source (:func:`source_identity` of the graph's source for that
    stream), so that after an edge restart the server continues the unfinished run: the frames it already
    committed are skipped here (``skipped`` in the summary), the rest delivered once. :meth:`resume_at` says
    where the server stands, for a stage upstream that can skip the work for those frames (edge.encode does).
    ``resume: false``: every edge start is a new run."""
    key = "edge.send"
    accepts = (Packet,)

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", bind: bool = False, hwm: int = 16,
                 timeout_s: float = 30.0, secret_key: str | None = None, server_key: str | None = None,
                 insecure: bool = False, policy: str = "drop-oldest", live_queue: int = 2, backlog: int = 32,
                 heartbeat_s: float = 0.5, resume: bool = True):
        from transport.link import check_endpoint
        from transport.security import client_security
        from transport.protocol import POLICIES
        check_endpoint(endpoint, "edge.send endpoint")
        if bind:
            raise UsageError("edge.send: `bind: true` is not supported (the edge connects; the server binds)")
        if policy not in POLICIES:
            raise UsageError(f"edge.send policy {policy!r}: use one of {', '.join(POLICIES)}")
        self.endpoint, self.timeout_s = endpoint, float(timeout_s)
        self.policy, self.live_queue, self.backlog = policy, int(live_queue), int(backlog)
        self.heartbeat_s = float(heartbeat_s)
        if not isinstance(resume, bool):
            raise UsageError(f"edge.send resume {resume!r}: true (continue an unfinished run of the same source) or "
                             f"false (every start is a new run)")
        self.resume = resume
        if self.live_queue < 1 or self.backlog < 1:
            raise UsageError("edge.send: live_queue and backlog must be >= 1")
        self.security = client_security(endpoint, secret_key, server_key, bool(insecure), who="edge")

    def open(self, ctx) -> None:
        super().open(ctx)
        self.clients: dict = {}
        self.counts: dict[int, int] = {}

    def link_status(self) -> str | None:
        return self.status()

    def status(self) -> str:
        return "; ".join(c.status() for c in list(getattr(self, "clients", {}).values())) or "no frame sent yet"

    def resume_at(self, stream: int) -> int:
        """The first frame of ``stream`` the server has not committed (0 before it said): frames below it are
        skipped here, so a stage upstream may skip encoding them."""
        cl = getattr(self, "clients", {}).get(stream)
        return cl.resume_at if cl is not None else 0

    def _source_id(self, stream: int) -> str | None:
        """The identity of the replay source feeding ``stream`` (the graph's Source stages upstream of this one
        whose stream id matches: exactly one, else None)."""
        rt = self.ctx.runtime
        found = []
        for stage in (rt.upstream(self.ctx.name) if rt is not None else []):
            if isinstance(stage, Source):
                inner = getattr(stage, "inner", stage)
                if int(getattr(inner, "stream", getattr(stage, "stream", -1))) == stream:
                    found.append(stage)
        return source_identity(found[0]) if len(found) == 1 else None

    def _client(self, p: Packet):
        from transport.edge_session import EdgeClient
        cl = self.clients.get(p.stream)
        if cl is None:
            fp = wire.unpack(p.data)[0].fingerprint
            source = self._source_id(p.stream) if self.resume and not p.live else None
            cl = EdgeClient(self.endpoint, p.stream, fp, mode="live" if p.live else "replay", security=self.security,
                            backlog=self.backlog, live_queue=self.live_queue, policy=self.policy,
                            timeout_s=self.timeout_s, heartbeat_s=self.heartbeat_s, log=self.ctx.log,
                            name=self.ctx.name, source=source)
            self.clients[p.stream] = cl
        return cl

    def process(self, p: Packet):
        from transport.protocol import LinkTimeout, Refused
        cl = self._client(p)
        try:
            ok = cl.submit(p.index, p.data)
        except (LinkTimeout, Refused) as exc:
            raise RuntimeError(str(exc)) from None
        if not ok:
            self.ctx.stats.dropped += 1
        self.counts[p.stream] = max(self.counts.get(p.stream, 0), p.index + 1)
        self._stats()
        return None

    def _stats(self) -> None:
        ex = self.ctx.stats.extra
        for k in ("bytes", "sent", "resent", "acked", "restarts_seen", "skipped"):
            ex[k] = sum(c.stats[k] for c in self.clients.values())
        ex["link_dropped"] = sum(c.stats["dropped"] for c in self.clients.values())

    def close(self):
        clients = getattr(self, "clients", None)
        if not clients:
            return None
        # on shutdown by signal the server may already be gone: do not hold the exit for long
        wait = min(self.timeout_s, 3.0) if self.ctx.stop.is_set() else self.timeout_s
        try:
            for stream, cl in clients.items():
                # the frame count: the highest index seen, or where the server stands if that is further (a stage
                # upstream may have skipped the committed frames up to the end, see resume_at)
                count = max(self.counts.get(stream, 0), cl.resume_at if cl.mode == "replay" else 0)
                if cl.error is None and not cl.finish(count, timeout_s=wait):
                    left = len(cl.unacked)
                    if cl.instance is None:
                        msg = (f"[{self.ctx.name}] no server took a frame at {self.endpoint} within {wait:.0f} s; "
                               f"is `run_pipeline.py server --bind ...` running and reachable"
                               + ("? (with keys: is this edge's public key in the server's --allowed-keys folder?)"
                                  if self.security.on else "?"))
                        self.ctx.log(msg)
                        if not self.ctx.stop.is_set():
                            raise RuntimeError(msg.split("] ", 1)[1])
                        continue
                    msg = (f"[{self.ctx.name}] stream {stream}: {left} frame(s) not acknowledged by the server "
                           f"within {wait:.0f} s" if cl.mode == "replay" else
                           f"[{self.ctx.name}] stream {stream}: could not send end-of-stream within {wait:.0f} s")
                    self.ctx.log(msg)
                    if cl.mode == "replay" and not self.ctx.stop.is_set():
                        raise RuntimeError(msg.split("] ", 1)[1])
        finally:
            self._stats()
            for cl in clients.values():
                cl.close()
            self.clients = {}
        return None


def check_checkpoint_arg(value) -> None:
    if value is not None and not isinstance(value, str):
        raise UsageError(f"checkpoint {value!r} must be a path, 'default' or random:SIZE")

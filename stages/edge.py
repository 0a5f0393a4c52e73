"""Edge half: letterbox -> encoder -> entropy coder -> wire message (`edge.encode`), then ZeroMQ (`edge.send`)."""
from __future__ import annotations

import time

import numpy as np

import pipeline.offline  # noqa: F401  (before ultralytics, which only letterbox_params imports)
from pipeline.codecs import get_codec
from pipeline.errors import UsageError
from pipeline.stage import Frame, Letterbox, Packet, Stage, register_stage
from transport import wire


def letterbox_params(orig_w: int, orig_h: int, size: int) -> Letterbox:
    """The letterbox Ultralytics' LetterBox applies (its own get_params), as plain numbers the server reuses."""
    from ultralytics.data.augment import LetterBox
    dummy = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (orig_h, orig_w, 3))
    p = LetterBox(new_shape=(size, size), auto=False, scaleup=True, center=True).get_params({"img": dummy})
    return Letterbox(orig_w, orig_h, size, float(p["ratio"][0]), int(p["left"]), int(p["top"]),
                     int(p["new_unpad"][0]), int(p["new_unpad"][1]))


def letterbox_image(image: np.ndarray, size: int) -> np.ndarray:
    """Fit an (H, W, 3) frame into the square model input exactly as Ultralytics' ``LetterBox(auto=False,
    scaleup=True, center=True)`` does (bilinear resize, pad value 114), in OpenCV alone: the device imports no
    PyTorch or Ultralytics (tested equal to Ultralytics' own)."""
    import cv2

    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    if (w, h) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))


@register_stage
class EdgeEncode(Stage):
    """Frame -> Packet: letterbox to codec.input_size, codec.encode, wire.pack (header with the fingerprint)."""
    key = "edge.encode"
    accepts = (Frame,)
    emits = (Packet,)

    def __init__(self, checkpoint=None, keep_image: bool = False):
        self.checkpoint = checkpoint
        self.keep_image = bool(keep_image)

    def open(self, ctx) -> None:
        super().open(ctx)
        self.codec = get_codec(self.checkpoint, edge_only=True)
        self.size = int(self.codec.input_size)

    def process(self, f: Frame) -> Packet:
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
        timings = dict(f.timings)
        return Packet(f.stream, f.index, f.capture_ns, data, f.live, timings=timings,
                      image=f.image if self.keep_image else None)


@register_stage
class EdgeSend(Stage):
    """Packet -> ZeroMQ DEALER with credits and acks (transport.session.EdgeClient), one link per stream.

    Replay packets are kept until the server acknowledges them (resent after a server restart); live packets go
    through a short queue of the newest frames (``policy`` drop-oldest / drop-newest, drops counted). tcp://
    needs CurveZMQ keys (``secret_key`` + ``server_key``) unless ``insecure: true``."""
    key = "edge.send"
    accepts = (Packet,)

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", bind: bool = False, hwm: int = 16,
                 timeout_s: float = 30.0, secret_key: str | None = None, server_key: str | None = None,
                 insecure: bool = False, policy: str = "drop-oldest", live_queue: int = 2, backlog: int = 32,
                 heartbeat_s: float = 0.5):
        from transport.link import check_endpoint
        from transport.security import client_security
        from transport.session import POLICIES
        check_endpoint(endpoint, "edge.send endpoint")
        if bind:
            raise UsageError("edge.send: `bind: true` is not supported (the edge connects; the server binds)")
        if policy not in POLICIES:
            raise UsageError(f"edge.send policy {policy!r}: use one of {', '.join(POLICIES)}")
        self.endpoint, self.timeout_s = endpoint, float(timeout_s)
        self.policy, self.live_queue, self.backlog = policy, int(live_queue), int(backlog)
        self.heartbeat_s = float(heartbeat_s)
        if self.live_queue < 1 or self.backlog < 1:
            raise UsageError("edge.send: live_queue and backlog must be >= 1")
        self.security = client_security(endpoint, secret_key, server_key, bool(insecure), who="edge")

    def open(self, ctx) -> None:
        super().open(ctx)
        self.clients: dict = {}
        self.counts: dict[int, int] = {}
        ctx.shared["link_status"] = self.status

    def status(self) -> str:
        return "; ".join(c.status() for c in list(getattr(self, "clients", {}).values())) or "no frame sent yet"

    def _client(self, p: Packet):
        from transport.session import EdgeClient
        cl = self.clients.get(p.stream)
        if cl is None:
            fp = wire.unpack(p.data)[0].fingerprint
            cl = EdgeClient(self.endpoint, p.stream, fp, mode="live" if p.live else "replay", security=self.security,
                            backlog=self.backlog, live_queue=self.live_queue, policy=self.policy,
                            timeout_s=self.timeout_s, heartbeat_s=self.heartbeat_s, log=self.ctx.log,
                            name=self.ctx.name)
            self.clients[p.stream] = cl
        return cl

    def process(self, p: Packet):
        from transport.session import LinkTimeout, Refused
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
        for k in ("bytes", "sent", "resent", "acked", "restarts_seen"):
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
                if cl.error is None and not cl.finish(self.counts.get(stream, 0), timeout_s=wait):
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

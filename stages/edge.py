"""Edge half: letterbox -> encoder -> entropy coder -> wire message (`edge.encode`), then ZeroMQ (`edge.send`)."""
from __future__ import annotations

import time

import numpy as np

import pipeline.offline  # noqa: F401  (before ultralytics)
from pipeline.codecs import get_codec
from pipeline.errors import UsageError
from pipeline.stage import Frame, Letterbox, Packet, Stage, register_stage
from transport import wire
from transport.link import LinkTimeout, PushLink


def letterbox_params(orig_w: int, orig_h: int, size: int) -> Letterbox:
    """The letterbox Ultralytics' LetterBox applies (its own get_params), as plain numbers the server reuses."""
    from ultralytics.data.augment import LetterBox
    dummy = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (orig_h, orig_w, 3))
    p = LetterBox(new_shape=(size, size), auto=False, scaleup=True, center=True).get_params({"img": dummy})
    return Letterbox(orig_w, orig_h, size, float(p["ratio"][0]), int(p["left"]), int(p["top"]),
                     int(p["new_unpad"][0]), int(p["new_unpad"][1]))


def letterbox_image(image: np.ndarray, size: int) -> np.ndarray:
    """Fit an (H, W, 3) frame into the square model input with Ultralytics' LetterBox (pad value 114)."""
    from ultralytics.data.augment import LetterBox
    return LetterBox(new_shape=(size, size), auto=False, scaleup=True, center=True)(image=image)


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
    """Packet -> ZeroMQ PUSH (see transport.link for why PUSH/PULL). Sends an end-of-stream message on close."""
    key = "edge.send"
    accepts = (Packet,)

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", bind: bool = False, hwm: int = 16,
                 timeout_s: float = 30.0):
        self.endpoint, self.bind, self.hwm, self.timeout_s = endpoint, bool(bind), int(hwm), float(timeout_s)
        from transport.link import check_endpoint
        check_endpoint(endpoint, "edge.send endpoint")

    def open(self, ctx) -> None:
        super().open(ctx)
        self.link = PushLink(self.endpoint, bind=self.bind, hwm=self.hwm, send_timeout_s=self.timeout_s)
        self.counts: dict[int, int] = {}
        self.fingerprint = None

    def process(self, p: Packet):
        if self.fingerprint is None:
            self.fingerprint = wire.unpack(p.data)[0].fingerprint
        try:
            ok = self.link.send(p.data, live=p.live)
        except LinkTimeout as exc:
            raise RuntimeError(str(exc)) from None
        if not ok:
            self.ctx.stats.dropped += 1
        self.counts[p.stream] = max(self.counts.get(p.stream, 0), p.index + 1)
        self.ctx.stats.extra["bytes"] = self.link.bytes_sent
        return None

    def close(self):
        link = getattr(self, "link", None)
        if link is None:
            return None
        try:
            fp = self.fingerprint or b"\0" * wire.FINGERPRINT_SIZE
            for stream, n in self.counts.items():
                # on shutdown the server may already be gone: do not hold the exit for long
                link.send(wire.end_of_stream(stream, n, fp, time.time_ns()), live=False,
                          timeout_s=min(self.timeout_s, 3.0) if self.ctx.stop.is_set() else None)
        except LinkTimeout as exc:
            self.ctx.log(f"[{self.ctx.name}] could not send end-of-stream: {exc}")
        finally:
            link.close(linger_s=min(self.timeout_s, 3.0 if self.ctx.stop.is_set() else 10.0))
            self.link = None
        return None


def check_checkpoint_arg(value) -> None:
    if value is not None and not isinstance(value, str):
        raise UsageError(f"checkpoint {value!r} must be a path, 'default' or random:SIZE")

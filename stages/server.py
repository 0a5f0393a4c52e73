"""Server half: ZeroMQ PULL -> wire checks -> entropy decode + decoder + shared body once per frame."""
from __future__ import annotations

import time
from typing import Iterator

from pipeline.codecs import get_codec
from pipeline.stage import Features, Packet, Source, Stage, register_stage
from stages.edge import letterbox_params
from transport import wire
from transport.link import PullLink


@register_stage
class ServerReceive(Source):
    """Receive wire messages, check them (wire.unpack + model fingerprint) and emit Packets in arrival order.

    Bad messages are refused and counted, each kind of error logged once. ``exit_on_eos``: end once every
    stream seen has sent its end-of-stream message (replay; on SIGINT/SIGTERM it still waits up to ``drain_s``
    for the edges' end-of-stream); otherwise run until stopped, then stop taking frames at once."""
    key = "server.receive"
    live = False

    def __init__(self, endpoint: str = "tcp://*:5555", bind: bool = True, checkpoint=None, exit_on_eos: bool = True,
                 max_frames=None, hwm: int = 16, drain_s: float = 10.0, idle_timeout_s: float | None = None):
        from transport.link import check_endpoint
        self.endpoint = check_endpoint(endpoint, "server.receive endpoint")
        self.bind, self.checkpoint, self.exit_on_eos = bool(bind), checkpoint, bool(exit_on_eos)
        self.max_frames = int(max_frames) if max_frames not in (None, "", 0) else None
        self.hwm, self.drain_s = int(hwm), float(drain_s)
        self.idle_timeout_s = float(idle_timeout_s) if idle_timeout_s else None

    def open(self, ctx) -> None:
        super().open(ctx)
        self.codec = get_codec(self.checkpoint)
        self.link = PullLink(self.endpoint, bind=self.bind, hwm=self.hwm)
        ctx.shared["server_endpoint"] = self.link.endpoint
        self.refused: dict[str, int] = {}
        self.expected: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.last_index: dict[int, int] = {}

    def _refuse(self, exc: Exception) -> None:
        kind = type(exc).__name__
        n = self.refused.get(kind, 0)
        self.refused[kind] = n + 1
        self.ctx.stats.errors += 1
        self.ctx.stats.extra["refused"] = dict(self.refused)
        if n == 0:
            self.ctx.log(f"[{self.ctx.name}] refused a message ({kind}): {exc} (further {kind} are counted, "
                         f"not logged)")

    def _done(self) -> bool:
        """Every stream that sent frames has also sent its end-of-stream message."""
        return self.exit_on_eos and bool(self.expected) and set(self.expected) >= set(self.received)

    def frames(self) -> Iterator[Packet]:
        stop = self.ctx.stop
        stop_at = None
        last_msg = time.monotonic()
        idle = 0.0
        total = 0
        while True:
            if stop.is_set() and stop_at is None:
                stop_at = time.monotonic()
            if stop_at is not None:
                # waiting for end-of-stream (replay): drain up to drain_s; a standalone server whose edges keep
                # sending stops taking new frames at once (frames already inside the graph still finish)
                drain = self.drain_s if self.exit_on_eos else min(self.drain_s, 0.2)
                if time.monotonic() - stop_at > drain or idle > 1.0:
                    return
                if self.expected and set(self.expected) >= set(self.received):
                    return
            if self.max_frames is not None and total >= self.max_frames:
                return
            if self.idle_timeout_s and time.monotonic() - last_msg > self.idle_timeout_s:
                self.ctx.log(f"[{self.ctx.name}] no message for {self.idle_timeout_s:.0f} s; ending")
                return
            t_poll = time.monotonic()
            data = self.link.recv(100)
            if data is None:
                idle += time.monotonic() - t_poll  # time spent waiting on the socket, not on downstream queues
                continue
            idle = 0.0
            last_msg = time.monotonic()
            rx = time.time_ns()
            try:
                header, payload = wire.unpack(data, self.codec.fingerprint)
            except wire.WireError as exc:
                self._refuse(exc)
                continue
            s = header.stream_id
            if header.eos:
                self.expected[s] = header.frame_index
                got = self.received.get(s, 0)
                if got < header.frame_index:
                    self.ctx.log(f"[{self.ctx.name}] stream {s} ended: {got} of {header.frame_index} frames arrived "
                                 f"({header.frame_index - got} dropped on the way)")
                if self._done():
                    return
                continue
            prev = self.last_index.get(s)
            if prev is not None and header.frame_index <= prev and not header.live:
                self.ctx.log(f"[{self.ctx.name}] stream {s}: frame {header.frame_index} after {prev} (restart or "
                             f"duplicate)")
            self.last_index[s] = header.frame_index
            self.received[s] = self.received.get(s, 0) + 1
            self.expected.pop(s, None)  # a stream that ended and sends again has restarted
            total += 1
            self.ctx.stats.extra["bytes"] = self.ctx.stats.extra.get("bytes", 0) + len(data)
            yield Packet(s, header.frame_index, header.capture_ns, data, header.live, header=header,
                         payload=payload, received_ns=rx,
                         timings={"edge": header.edge_us / 1000.0,
                                  "link": max(0.0, (rx - header.sent_ns) / 1e6)})

    def close(self):
        link = getattr(self, "link", None)
        if link is not None:
            link.close()
            self.link = None


@register_stage
class ServerDecode(Stage):
    """Packet -> Features: entropy decode, decoder and shared body, once per frame (codec.decode)."""
    key = "server.decode"
    accepts = (Packet,)
    emits = (Features,)

    def __init__(self, checkpoint=None):
        self.checkpoint = checkpoint

    def open(self, ctx) -> None:
        super().open(ctx)
        self.codec = get_codec(self.checkpoint)
        ctx.shared["codec"] = self.codec
        self._lb: dict[tuple[int, int], object] = {}

    def process(self, p: Packet):
        from codec.api import CodecError, EncodedFrame
        h = p.header if p.header is not None else wire.unpack(p.data, self.codec.fingerprint)[0]
        payload = p.payload if p.payload is not None else wire.unpack(p.data)[1]
        try:
            feats = self.codec.decode([EncodedFrame(bytes(payload), tuple(h.latent_shape), h.fingerprint)])
        except CodecError as exc:
            self.ctx.stats.errors += 1
            self.ctx.log(f"[{self.ctx.name}] stream {p.stream} frame {p.index}: cannot decode: {exc}")
            return None
        key = h.orig_size
        lb = self._lb.get(key)
        if lb is None:
            lb = self._lb[key] = letterbox_params(h.orig_size[0], h.orig_size[1], self.codec.input_size)
        return Features(p.stream, p.index, p.capture_ns, h.sent_ns, p.received_ns or time.time_ns(), len(p.data),
                        tuple(h.latent_shape), lb, feats, dict(p.timings), p.image)

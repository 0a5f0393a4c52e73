"""Prometheus metrics (`sink.metrics`): an HTTP ``/metrics`` endpoint with prometheus-client.

From every frame that reaches it (put it after ``events.items``, or after ``results.merge`` for the frame
metrics only):

* ``ladon_frames_total{stream}``, ``ladon_wire_bytes_total{stream}``, ``ladon_task_errors_total{task}``;
* ``ladon_stage_latency_seconds{stage}`` (histogram of each frame's per-stage times: edge, link, decode, each
  task, merge, track, ...) and ``ladon_frame_latency_seconds`` (capture to done);
* ``ladon_items_counted_total{stream,class}``, ``ladon_items_per_minute{stream}``,
  ``ladon_events_total{stream,type}``, ``ladon_line_idle{stream}`` (1 while idle).

At every scrape, from the graph runtime of this process (``ctx.runtime.stages()``, what the console line
reads too): ``ladon_stage_queue_depth{stage}`` (messages waiting at the stage's input), ``ladon_stage_
processed_total``, ``ladon_stage_dropped_total`` (live messages dropped on a full queue, and MQTT events dropped
on a full buffer), ``ladon_stage_errors_total``, ``ladon_stage_busy_seconds_total`` and
``ladon_stage_stat{stage,name}`` for the stages' own numeric counters (``refused``, ``mqtt_buffered``, ...).
Each stage instance has its own registry, so two graphs in one process do not collide.
"""
from __future__ import annotations

import time
from typing import Any

from core.errors import UsageError
from pipeline.stage import FrameResult, Packet, Stage, register_stage

DEFAULT_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class _GraphCollector:
    """Reads queue depths and stage counters of the running graph at scrape time."""

    def __init__(self, runtime, ns: str):
        self.runtime, self.ns = runtime, ns  # a pipeline.stage.GraphView, or None outside a graph

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        ns = self.ns
        depth = GaugeMetricFamily(f"{ns}_stage_queue_depth", "Messages waiting at the stage's input", labels=["stage"])
        proc = CounterMetricFamily(f"{ns}_stage_processed", "Messages the stage has processed", labels=["stage"])
        drop = CounterMetricFamily(f"{ns}_stage_dropped", "Messages the stage dropped", labels=["stage"])
        errs = CounterMetricFamily(f"{ns}_stage_errors", "Errors in the stage", labels=["stage"])
        busy = CounterMetricFamily(f"{ns}_stage_busy_seconds", "Time the stage spent processing", labels=["stage"])
        extra = GaugeMetricFamily(f"{ns}_stage_stat", "A stage's own numeric counters", labels=["stage", "name"])
        for status in (self.runtime.stages() if self.runtime is not None else []):
            name, st = status.name, status.stats
            depth.add_metric([name], status.queue_depth)
            proc.add_metric([name], st.processed)
            drop.add_metric([name], st.dropped)
            errs.add_metric([name], st.errors)
            busy.add_metric([name], st.busy_s)
            for k, v in list(st.extra.items()):
                if isinstance(v, (int, float)):
                    extra.add_metric([name, str(k)], float(v))
        return [depth, proc, drop, errs, busy, extra]


class MetricsSink(Stage):
    """Prometheus /metrics: frames, bytes, per-stage latency, counts per class, events, queue depths, drops.
    On the server after results (FrameResults); on the edge after ``edge.encode`` (Packets: frames encoded, bytes
    sent, encode time, capture-to-encoded latency; drops and queues of the link from the runtime)."""
    key = "sink.metrics"
    accepts = (FrameResult, Packet)

    def __init__(self, port: int = 9108, host: str = "127.0.0.1", namespace: str = "ladon",
                 buckets_ms: list[float] | None = None):
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise UsageError(f"sink.metrics: port {port!r} must be a TCP port 0-65535 (0: any free port), "
                             f"e.g. port: 9108")
        if not isinstance(host, str) or not host:
            raise UsageError(f"sink.metrics: host {host!r} must be an address to listen on, e.g. 127.0.0.1 "
                             f"(this machine) or 0.0.0.0 (every interface)")
        if not isinstance(namespace, str) or not namespace.replace("_", "").isalnum() or namespace[0].isdigit():
            raise UsageError(f"sink.metrics: namespace {namespace!r} must be a word of letters, digits and _, "
                             f"e.g. ladon")
        b = DEFAULT_BUCKETS_MS if buckets_ms is None else buckets_ms
        if not (isinstance(b, (list, tuple)) and b and all(isinstance(x, (int, float)) and x > 0 for x in b)
                and list(b) == sorted(set(b))):
            raise UsageError(f"sink.metrics: buckets_ms {buckets_ms!r} must be increasing positive milliseconds, "
                             f"e.g. [5, 25, 100, 500]")
        self.port, self.host, self.ns = port, host, namespace
        self.buckets = tuple(x / 1000.0 for x in b)

    def open(self, ctx) -> None:
        super().open(ctx)
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
        except ImportError as exc:
            raise UsageError(f"sink.metrics needs prometheus-client: {exc}; install it with "
                             f"`.venv/bin/pip install -r requirements.txt`") from exc
        ns, reg = self.ns, CollectorRegistry()
        self.registry = reg
        self.frames = Counter(f"{ns}_frames", "Frames finished", ["stream"], registry=reg)
        self.bytes = Counter(f"{ns}_wire_bytes", "Bytes received on the wire (header included)", ["stream"],
                             registry=reg)
        self.task_errors = Counter(f"{ns}_task_errors", "Frames that lost a task's result", ["task"], registry=reg)
        self.stage_latency = Histogram(f"{ns}_stage_latency_seconds", "Per-stage time of each frame", ["stage"],
                                       buckets=self.buckets, registry=reg)
        self.frame_latency = Histogram(f"{ns}_frame_latency_seconds", "Capture to done, per frame",
                                       buckets=self.buckets, registry=reg)
        self.counted = Counter(f"{ns}_items_counted", "Items counted at the station", ["stream", "class"],
                               registry=reg)
        self.rate = Gauge(f"{ns}_items_per_minute", "Items counted per minute (sliding window)", ["stream"],
                          registry=reg)
        self.events = Counter(f"{ns}_events", "Events emitted", ["stream", "type"], registry=reg)
        self.idle = Gauge(f"{ns}_line_idle", "1 while the line is idle", ["stream"], registry=reg)
        reg.register(_GraphCollector(ctx.runtime, ns))
        try:
            self.server, self.thread = start_http_server(self.port, addr=self.host, registry=reg)
        except OSError as exc:
            raise UsageError(f"sink.metrics cannot listen on {self.host}:{self.port}: {exc.strerror or exc}; "
                             f"choose another port (port: 0 picks a free one)") from exc
        self.bound_port = self.server.server_port
        ctx.stats.extra["port"] = self.bound_port
        ctx.log(f"[{ctx.name}] Prometheus metrics on http://{self.host}:{self.bound_port}/metrics")

    def process(self, fr: FrameResult | Packet) -> None:
        if isinstance(fr, Packet):
            return self._edge_frame(fr)
        s = str(fr.stream)
        self.frames.labels(s).inc()
        self.bytes.labels(s).inc(fr.wire_bytes)
        for stage, ms in fr.timings.items():
            if isinstance(ms, (int, float)):
                self.stage_latency.labels(stage).observe(float(ms) / 1000.0)
        if fr.capture_ns and fr.done_ns >= fr.capture_ns:
            self.frame_latency.observe((fr.done_ns - fr.capture_ns) / 1e9)
        for task in fr.errors:
            self.task_errors.labels(task).inc()
        counts: dict[str, Any] | None = fr.results.get("counts")
        if counts is not None:
            for c in counts.get("counted", []):
                self.counted.labels(s, str(c.get("name", c.get("class")))).inc()
            self.rate.labels(s).set(float(counts.get("items_per_min", 0.0)))
        for ev in fr.results.get("events") or []:
            self.events.labels(s, str(ev.get("type"))).inc()
            if ev.get("type") == "line.idle":
                self.idle.labels(s).set(1)
            elif ev.get("type") == "line.running":
                self.idle.labels(s).set(0)

    def _edge_frame(self, p: Packet) -> None:
        """An encoded frame on the edge: counted, its wire bytes, its stages' times, capture to encoded."""
        if p.eos:
            return
        s = str(p.stream)
        self.frames.labels(s).inc()
        self.bytes.labels(s).inc(len(p.data))
        for stage, ms in p.timings.items():
            if isinstance(ms, (int, float)):
                self.stage_latency.labels(stage).observe(float(ms) / 1000.0)
        if p.capture_ns:
            self.frame_latency.observe(max(0.0, (time.time_ns() - p.capture_ns) / 1e9))

    def close(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
            self.server = None
        return None


register_stage(MetricsSink)

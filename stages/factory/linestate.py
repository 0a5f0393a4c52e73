"""What a line looks like right now, for the live outputs (``sink.opcua`` tags, ``sink.view`` page).

:class:`LineState` folds each frame's ``results`` (``counts`` from ``count.items``, ``events`` from
``events.items``) and timing into per-stream and whole-line figures: counts per class, the last item counted,
running / idle, and health (frames, last frame time, frame rate, latency, the edge link when this process runs
``server.receive``). Sinks call :meth:`LineState.update` from their ``process`` (cheap, under a lock) and read
:meth:`LineState.snapshot` (a JSON-able dict) from their own threads, so no output ever holds the pipeline up.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pipeline.stage import FrameResult

STATES = ("waiting", "running", "idle", "stopped")  # waiting: no frame yet; stopped: the stage closed


@dataclass
class StreamState:
    """One edge stream's figures (see :meth:`LineState.snapshot` for their meaning)."""

    stream: int
    state: str = "running"
    total: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    items_per_min: float = 0.0
    last_item: dict[str, Any] | None = None
    frames: int = 0
    last_frame: int = -1
    last_frame_ns: int = 0  # wall clock (server) when the last frame was done
    last_seen: float = 0.0  # monotonic, for `receiving`
    latency_ms: float | None = None
    has_counts: bool = False
    done_times: deque = field(default_factory=lambda: deque(maxlen=64))  # monotonic times of recent frames


def edge_links(runtime) -> tuple[int | None, dict[int, dict[str, Any]]]:
    """Edges connected to this process's ``server.receive``: (number up, {stream: {connected, mode, peer}}).

    ``(None, {})`` when this process receives no edges (in-process test graphs, worker topologies) or
    ``runtime`` (the stage's ``ctx.runtime``, a GraphView) is None, so outputs can say "unknown" instead of a
    false 0. Asks the graph's stages that receive edges (``GraphView.edge_links``)."""
    links = runtime.edge_links() if runtime is not None else None
    if links is None:
        return None, {}
    out = {int(sid): dict(info) for sid, info in links.items()}
    return sum(1 for v in out.values() if v["connected"]), out


class LineState:
    """Per-stream and whole-line state of one production line, fed frame by frame (thread-safe)."""

    def __init__(self, line: str, classes: list[str] | None = None, stale_s: float = 5.0):
        self.line = line
        self.classes = list(classes or [])  # class names shown with 0 before their first count
        self.stale_s = float(stale_s)
        self.lock = threading.Lock()
        self.streams: dict[int, StreamState] = {}
        self.stopped = False
        self.missing_counts_noted = False

    def set_classes(self, names: list[str]) -> None:
        with self.lock:
            for n in names:
                if n not in self.classes:
                    self.classes.append(n)

    def update(self, fr: FrameResult) -> bool:
        """Fold one frame in. Returns False when the frame carries no ``counts`` (no count.items upstream)."""
        r = fr.results
        counts = r.get("counts")
        now = time.monotonic()
        with self.lock:
            st = self.streams.get(fr.stream)
            if st is None:
                st = self.streams[fr.stream] = StreamState(fr.stream)
            st.frames += 1
            st.last_frame = fr.index
            st.last_frame_ns = fr.done_ns or time.time_ns()
            st.last_seen = now
            st.done_times.append(now)
            if fr.capture_ns and fr.done_ns >= fr.capture_ns:
                st.latency_ms = (fr.done_ns - fr.capture_ns) / 1e6
            for ev in r.get("events") or []:
                if ev.get("type") == "line.idle":
                    st.state = "idle"
                elif ev.get("type") == "line.running":
                    st.state = "running"
            if counts is None:
                return False
            st.has_counts = True
            st.total = int(counts.get("total", st.total))
            st.by_class = {str(k): int(v) for k, v in (counts.get("by_class") or {}).items()}
            st.items_per_min = float(counts.get("items_per_min", 0.0))
            for name in st.by_class:
                if name not in self.classes:
                    self.classes.append(name)
            counted = counts.get("counted") or []
            if counted:
                c = counted[-1]
                st.last_item = {"track_id": int(c.get("id", -1)), "class": str(c.get("name", c.get("class"))),
                                "class_id": int(c.get("class", -1)), "score": float(c.get("score", 0.0)),
                                "stream": fr.stream, "frame": int(c.get("frame", fr.index)),
                                "crossing_frame": int(c.get("crossing_frame", fr.index)),
                                "time_ns": fr.capture_ns or fr.done_ns}
            return True

    def stop(self) -> None:
        with self.lock:
            self.stopped = True

    def snapshot(self, runtime=None) -> dict[str, Any]:
        """The line now, JSON-able: ``line``, ``state`` (waiting / running / idle / stopped: running while any
        stream runs), ``running``, ``total``, ``by_class`` (every known class, 0 included), ``items_per_min``,
        ``last_item`` (the latest count over all streams: ``track_id``, ``class``, ``class_id``, ``score``,
        ``stream``, ``frame``, ``time_ns``), ``health`` (``frames``, ``last_frame_ns``, ``receiving``: a frame
        within ``stale_s``, ``connected_edges``: None when unknown, ``counting``: counts present) and
        ``streams`` ({id: the same per stream, plus ``fps``, ``latency_ms``, ``last_frame``, ``edge``})."""
        connected, links = edge_links(runtime)
        now = time.monotonic()
        with self.lock:
            streams: dict[str, Any] = {}
            for sid in sorted(self.streams):
                st = self.streams[sid]
                recent = [t for t in st.done_times if now - t <= 5.0]
                fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] \
                    else 0.0
                state = "stopped" if self.stopped else st.state
                streams[str(sid)] = {
                    "state": state, "running": state == "running", "total": st.total,
                    "by_class": {c: st.by_class.get(c, 0) for c in self.classes},
                    "items_per_min": round(st.items_per_min, 3), "last_item": st.last_item,
                    "health": {"frames": st.frames, "last_frame": st.last_frame, "last_frame_ns": st.last_frame_ns,
                               "receiving": now - st.last_seen <= self.stale_s and not self.stopped,
                               "fps": round(fps, 2), "latency_ms": None if st.latency_ms is None
                               else round(st.latency_ms, 1), "counting": st.has_counts,
                               "edge": links.get(sid)}}
            states = [s["state"] for s in streams.values()]
            state = ("stopped" if self.stopped else "waiting" if not states
                     else "running" if "running" in states else "idle")
            items = [s["last_item"] for s in streams.values() if s["last_item"] is not None]
            last = max(items, key=lambda d: d["time_ns"]) if items else None
            by_class = {c: sum(s["by_class"].get(c, 0) for s in streams.values()) for c in self.classes}
            return {
                "line": self.line, "state": state, "running": state == "running",
                "total": sum(s["total"] for s in streams.values()), "by_class": by_class,
                "items_per_min": round(sum(s["items_per_min"] for s in streams.values()), 3), "last_item": last,
                "health": {"frames": sum(s["health"]["frames"] for s in streams.values()),
                           "last_frame_ns": max((s["health"]["last_frame_ns"] for s in streams.values()), default=0),
                           "receiving": any(s["health"]["receiving"] for s in streams.values()),
                           "connected_edges": connected, "streams": len(streams),
                           "counting": any(s["health"]["counting"] for s in streams.values())},
                "streams": streams, "time_ns": time.time_ns()}

"""Counting at the inspection station (`count.items`): each item once per stream and class, on its crossing.

The station is the central band of the model input's width (``conveyor.classes.STATION``, 0.375-0.625 of the
letterboxed square); an item is counted when its tracked box centre crosses the band's centre line, which is the
frame's centre column ``x = W / 2`` for any frame size (the edge letterboxes centred). Robust to:

* **flicker / false detections**: only items seen on at least ``min_hits`` frames count (an item that crossed
  earlier is counted as soon as it reaches ``min_hits``; one that ends below it never is);
* **late confirmation** (missed detections as an item nears the line): an item whose track is first confirmed
  already past the line, less than ``late_frames`` frames of belt travel beyond it, counts as crossing there
  (unless it is a fragment, below);
* **occlusion**: the crossing is judged between an item's last sighting and its next one, so an item hidden
  while it passes the line still counts when it reappears on the other side (the tracker keeps its id);
* **track fragmentation**: counting is per item, and ``track.items`` stitches fragments to one item; on top of
  that a new item that is *born inside the band* within ``refractory_frames`` of the last sighting of a counted
  item whose predicted centre is within ``refractory_dist`` x its box side is treated as that item again and
  never counted.

Per frame it adds a JSON-able ``results["counts"]``: ``total``, ``by_class`` ({name: n}), ``counted`` (items
counted on this frame: id, class, name, score, ``crossing_frame``, ``crossing_t``), ``items_per_min`` over the
last ``rate_window_s`` seconds (and ``items_per_min_total`` since the first frame).
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from conveyor.classes import STATION
from core.errors import UsageError
from pipeline.stage import FrameResult, Stage, register_stage

DIRECTIONS = ("any", "ltr", "rtl")


def station_band(width: int, height: int, station: tuple[float, float] = STATION) -> tuple[float, float]:
    """The station's columns ``[lo, hi)`` in an original ``width`` x ``height`` frame (centred letterbox)."""
    side = max(width, height)
    return width / 2 + (station[0] - 0.5) * side, width / 2 + (station[1] - 0.5) * side


@dataclass
class _Seen:
    """What the counter remembers of one item."""

    id: int
    first_frame: int
    last_frame: int
    last_cx: float
    last_cy: float
    side: float
    first_cx: float = 0.0
    first_cy: float = 0.0
    seen_from: int = 0  # the frame the counter first saw it
    vx: float = 0.0
    vy: float = 0.0
    crossed_frame: int | None = None
    crossed_t: float | None = None
    counted: bool = False
    suppressed_by: int | None = None  # a counted item this one is taken to be again (fragment)
    ended: bool = False


@dataclass
class Counted:
    """One count: the item, its voted class at counting time, when it crossed."""

    id: int
    cls: int
    name: str
    score: float
    frame: int
    crossing_frame: int
    crossing_t: float

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "class": self.cls, "name": self.name, "score": self.score, "frame": self.frame,
                "crossing_frame": self.crossing_frame, "crossing_t": round(self.crossing_t, 6)}


class LineCounter:
    """Counting logic for one stream; feed it the ``results["tracks"]`` of each frame in order."""

    def __init__(self, line_x: float | None = None, direction: str = "any", min_hits: int = 3,
                 refractory_frames: int = 15, refractory_dist: float = 0.75, rate_window_s: float = 60.0,
                 late_frames: int = 3):
        self.line_x = line_x
        self.late_frames = int(late_frames)
        self.direction = direction
        self.min_hits = int(min_hits)
        self.refractory_frames = int(refractory_frames)
        self.refractory_dist = float(refractory_dist)
        self.rate_window_s = float(rate_window_s)
        self.seen: dict[int, _Seen] = {}
        self.recent_counted: deque[_Seen] = deque()  # counted items no longer alive, kept for refractory checks
        self.total = 0
        self.by_class: dict[str, int] = {}
        self.times: deque[float] = deque()  # times of counts in the rate window
        self.t0: float | None = None
        self.suppressed = 0

    def _crossed(self, a: float, b: float, line: float) -> bool:
        ltr, rtl = a < line <= b, a >= line > b
        return ltr if self.direction == "ltr" else rtl if self.direction == "rtl" else (ltr or rtl)

    def _fragment_of(self, index: int, cx: float, cy: float, band: tuple[float, float]) -> _Seen | None:
        if not band[0] <= cx < band[1]:
            return None
        for s in list(self.recent_counted) + [s for s in self.seen.values() if s.counted]:
            gap = index - s.last_frame
            if gap <= 0 or gap > self.refractory_frames:
                continue
            px, py = s.last_cx + s.vx * gap, s.last_cy + s.vy * gap
            if math.hypot(cx - px, cy - py) <= self.refractory_dist * s.side:
                return s
        return None

    def update(self, index: int, t: float, width: int, height: int, active: list[dict], ended: list[dict],
               velocity: list[float] | None = None) -> list[Counted]:
        """One frame: items matched on it (``active``), items that ended on it and the belt's motion (pixels per
        frame, or None while unknown). Returns the items counted on this frame."""
        if self.t0 is None:
            self.t0 = t
        line = width / 2 if self.line_x is None else self.line_x * width
        band = station_band(width, height)
        counted: list[Counted] = []
        for a in active:
            b = a["box"]
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            s = self.seen.get(a["id"])
            if s is None:
                s = self.seen[a["id"]] = _Seen(a["id"], a["first_frame"], index, cx, cy,
                                               max(b[2] - b[0], b[3] - b[1], 1.0), first_cx=cx, first_cy=cy,
                                               seen_from=index)
                frag = self._fragment_of(index, cx, cy, band)
                if frag is not None:
                    s.suppressed_by = frag.id
                    self.suppressed += 1
                elif velocity is not None and self.late_frames > 0 and self._crossed(
                        cx - velocity[0] * self.late_frames, cx, line):
                    s.crossed_frame, s.crossed_t = index, t  # confirmed late, just past the line
            else:
                if s.crossed_frame is None and self._crossed(s.last_cx, cx, line):
                    s.crossed_frame, s.crossed_t = index, t
                n = index - s.seen_from
                if n > 0:  # mean motion since first seen (constant belt speed)
                    s.vx, s.vy = (cx - s.first_cx) / n, (cy - s.first_cy) / n
                s.last_cx, s.last_cy, s.last_frame = cx, cy, index
                s.side = max(b[2] - b[0], b[3] - b[1], 1.0)
            if (s.crossed_frame is not None and not s.counted and s.suppressed_by is None
                    and a["hits"] >= self.min_hits):
                s.counted = True
                c = Counted(a["id"], int(a["class"]), str(a["name"]), float(a["score"]), index, s.crossed_frame,
                            float(s.crossed_t))
                counted.append(c)
                self.total += 1
                self.by_class[c.name] = self.by_class.get(c.name, 0) + 1
                self.times.append(t)
        for e in ended:
            s = self.seen.pop(e["id"], None)
            if s is not None and s.counted:
                s.ended = True
                self.recent_counted.append(s)
        while self.recent_counted and index - self.recent_counted[0].last_frame > self.refractory_frames:
            self.recent_counted.popleft()
        while self.times and t - self.times[0] > self.rate_window_s:
            self.times.popleft()
        return counted

    def rate_per_min(self, t: float) -> tuple[float, float]:
        """Items per minute over the rate window (or since the start, if shorter), and since the start."""
        span = t - (self.t0 if self.t0 is not None else t)
        window = min(self.rate_window_s, span)
        recent = len(self.times) * 60.0 / window if window > 0 else 0.0
        overall = self.total * 60.0 / span if span > 0 else 0.0
        return recent, overall


@register_stage
class CountItems(Stage):
    """Counts each tracked item once per stream and class when its centre crosses the station's centre line."""
    key = "count.items"
    accepts = (FrameResult,)
    emits = (FrameResult,)

    def __init__(self, line_x: float | None = None, direction: str = "any", min_hits: int = 3,
                 refractory_frames: int = 15, refractory_dist: float = 0.75, rate_window_s: float = 60.0,
                 late_frames: int = 3):
        if line_x is not None:
            try:
                ok = 0.0 < float(line_x) < 1.0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise UsageError(f"count.items: line_x {line_x!r} must be a fraction of the frame width in (0, 1), "
                                 f"or null for the station's centre line (0.5)")
        if direction not in DIRECTIONS:
            raise UsageError(f"count.items: direction {direction!r} is not one of {', '.join(DIRECTIONS)}; "
                             f"ltr = belt moving left to right")
        for name, v in (("min_hits", min_hits), ("refractory_frames", refractory_frames),
                        ("late_frames", late_frames)):
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "min_hits" else 0):
                raise UsageError(f"count.items: {name} {v!r} must be a whole number of frames "
                                 f"({'>= 1' if name == 'min_hits' else '>= 0'}), e.g. {name}: 3")
        for name, v in (("refractory_dist", refractory_dist), ("rate_window_s", rate_window_s)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise UsageError(f"count.items: {name} {v!r} must be a positive number")
        self.cfg = dict(line_x=None if line_x is None else float(line_x), direction=direction, min_hits=min_hits,
                        refractory_frames=refractory_frames, refractory_dist=float(refractory_dist),
                        rate_window_s=float(rate_window_s), late_frames=late_frames)
        self.counters: dict[int, LineCounter] = {}

    def process(self, fr: FrameResult) -> FrameResult:
        tracks = fr.results.get("tracks")
        if tracks is None:
            raise UsageError(f"count.items {self.ctx.name!r}: frame {fr.index} of stream {fr.stream} has no "
                             f"`tracks`; put a track.items stage before it (inputs: [track])")
        c = self.counters.get(fr.stream)
        if c is None:
            c = self.counters[fr.stream] = LineCounter(**self.cfg)
        new = c.update(fr.index, tracks["t"], tracks["width"], tracks["height"], tracks["active"], tracks["ended"],
                       tracks.get("velocity"))
        recent, overall = c.rate_per_min(tracks["t"])
        results = dict(fr.results)
        results["counts"] = {"total": c.total, "by_class": dict(c.by_class), "counted": [x.as_dict() for x in new],
                             "items_per_min": round(recent, 3), "items_per_min_total": round(overall, 3)}
        self.ctx.stats.extra["counted"] = sum(x.total for x in self.counters.values())
        by_class: dict[str, int] = {}
        for counter in self.counters.values():
            for name, n in counter.by_class.items():
                by_class[name] = by_class.get(name, 0) + n
        self.ctx.stats.extra["counted_by_class"] = dict(sorted(by_class.items(), key=lambda kv: -kv[1]))
        return dataclasses.replace(fr, results=results)

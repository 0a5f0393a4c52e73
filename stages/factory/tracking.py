"""Item tracking (`track.items`): stable ids per stream with Ultralytics' ByteTrack, class by vote, lifecycle.

Why a tracker from a library: ByteTrack (Kalman filter + two-stage IoU association, low-score detections used to
keep tracks alive through flicker) is well kept and tested; this module only wraps it
(``ultralytics.trackers.byte_tracker.BYTETracker``) and adds what a production line needs on top:

* **Belt-motion compensation** (``belt_motion: auto``): ByteTrack gets detections in belt coordinates (image
  position minus the belt's travel, estimated from the confirmed items), the way BoT-SORT compensates camera
  motion, so an item stands almost still for its Kalman filter and IoU matching: small items moving more than
  half their width per frame keep their ids (measured: without it a clean 124-item line loses 10 counts).
* **Items, not raw tracks.** A raw track that ByteTrack starts anew where an item it lost is expected to be (the
  belt's motion applied to the item's last box, within ``stitch_dist`` x the item's box side, within its
  ``track_buffer``) is stitched to that item: ids stay stable through occlusion and track fragmentation.
* **Class by vote**: the score-weighted vote of every detection over the item's life (``class``, ``class_share``).
* **Lifecycle**: an item ends when it has not been seen for ``track_buffer`` frames (ByteTrack drops the track at
  the same moment) or, sooner, when its predicted centre has left the frame.
* **Frame gaps** (live frames dropped upstream): the tracker is stepped once per missing index, so its motion model
  and the frame numbers stay in step with the belt.

Per frame it adds ``track_ids`` (item id per detection, -1 where no confirmed track holds it) to
``results["detection"]`` and a JSON-able ``results["tracks"]``: ``t`` (seconds, see ``clock``), ``width``,
``height``, ``velocity`` (the belt's motion in pixels per frame, null until known), ``active`` (items matched on
this frame) and ``ended`` (items that ended on it), each item a dict
(:meth:`Item.as_dict`). ``count.items`` and ``events.items`` read that.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from core.errors import UsageError
from pipeline.stage import FrameResult, Stage, register_stage

CLOCKS = ("capture", "frames")


@dataclass
class Item:
    """One physical item on the belt as tracked so far (one or more raw ByteTrack tracks)."""

    id: int
    first_frame: int
    last_frame: int
    box: list[float]  # last tracker box, xyxy, original-frame pixels
    first_centre: tuple[float, float]
    hits: int = 0
    score_sum: float = 0.0
    votes: dict[int, float] = field(default_factory=dict)  # class -> summed detection score
    raw_ids: list[int] = field(default_factory=list)
    ended: str | None = None  # None while alive; then "lost" or "exit"

    @property
    def centre(self) -> tuple[float, float]:
        b = self.box
        return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2

    @property
    def velocity(self) -> tuple[float, float]:
        """Mean centre motion in pixels per frame over the item's life (a belt moves at constant speed)."""
        n = self.last_frame - self.first_frame
        if n <= 0:
            return 0.0, 0.0
        cx, cy = self.centre
        return (cx - self.first_centre[0]) / n, (cy - self.first_centre[1]) / n

    @property
    def cls(self) -> int:
        return max(self.votes.items(), key=lambda kv: (kv[1], -kv[0]))[0] if self.votes else -1

    @property
    def class_share(self) -> float:
        total = sum(self.votes.values())
        return self.votes.get(self.cls, 0.0) / total if total > 0 else 0.0

    @property
    def score(self) -> float:
        return self.score_sum / self.hits if self.hits else 0.0

    def as_dict(self, names: list[str]) -> dict[str, Any]:
        c = self.cls
        d = {"id": self.id, "class": c, "name": names[c] if 0 <= c < len(names) else str(c),
             "score": round(self.score, 4), "class_share": round(self.class_share, 4), "hits": self.hits,
             "first_frame": self.first_frame, "last_frame": self.last_frame,
             "box": [round(float(v), 2) for v in self.box]}
        if self.ended is not None:
            d["reason"] = self.ended
        return d


@dataclass
class TrackUpdate:
    """What one frame changed: the item id per detection, the items matched, the items that ended."""

    track_ids: np.ndarray  # (N,) int64, -1 = no confirmed track
    active: list[Item]
    ended: list[Item]


class _Detections:
    """The results-like object ByteTrack reads: ``xyxy``, ``xywh``, ``conf``, ``cls``, boolean indexing."""

    def __init__(self, xyxy: np.ndarray, conf: np.ndarray, cls: np.ndarray):
        self.xyxy, self.conf, self.cls = xyxy, conf, cls

    @property
    def xywh(self) -> np.ndarray:
        b = self.xyxy
        return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]],
                        axis=1)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, idx) -> "_Detections":
        return _Detections(self.xyxy[idx], self.conf[idx], self.cls[idx])


def _check_range(name: str, v: Any, lo: float, hi: float, example: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UsageError(f"track.items: {name} {v!r} is not a number; use e.g. {name}: {example}") from None
    if not lo <= f <= hi:
        raise UsageError(f"track.items: {name} {v!r} is out of range [{lo}, {hi}]; use e.g. {name}: {example}")
    return f


class ItemTracker:
    """ByteTrack for one stream plus item bookkeeping (see the module doc). Feed frames in index order.

    ``belt_motion``: ``"auto"`` (default) estimates the belt's motion in pixels per frame from the confirmed
    items (median of their frame-to-frame motion away from the frame edges, smoothed) and hands ByteTrack
    detections in belt coordinates (image position minus the belt's travel so far), the way BoT-SORT compensates
    camera motion: items then stand almost still for the tracker, so even small items that move more than half
    their width per frame keep their ids. ``"off"`` tracks in image coordinates; ``[vx, vy]`` fixes the motion."""

    def __init__(self, high_thresh: float = 0.25, low_thresh: float = 0.1, new_track_thresh: float = 0.25,
                 track_buffer: int = 30, match_thresh: float = 0.8, fuse_score: bool = True,
                 stitch_dist: float = 0.5, max_gap: int = 30, belt_motion: Any = "auto", motion_smoothing: float = 0.2):
        import core.offline  # noqa: F401 - Ultralytics never reaches for the network
        try:
            from ultralytics.trackers.byte_tracker import BYTETracker
        except ImportError as exc:
            raise UsageError(f"track.items needs ultralytics with its tracker extras (lap): {exc}; "
                             f"install them with `.venv/bin/pip install -r requirements.txt`") from exc
        self.args = SimpleNamespace(tracker_type="bytetrack", track_high_thresh=high_thresh,
                                    track_low_thresh=low_thresh, new_track_thresh=new_track_thresh,
                                    track_buffer=int(track_buffer), match_thresh=match_thresh, fuse_score=fuse_score)
        self.tracker = BYTETracker(self.args)
        self.buffer = int(track_buffer)
        self.stitch_dist = float(stitch_dist)
        self.max_gap = int(max_gap)
        self.auto_motion = belt_motion == "auto"
        self.compensate = belt_motion != "off"
        self.velocity = np.zeros(2) if isinstance(belt_motion, str) else np.asarray(belt_motion, np.float64)
        self.calibrated = not self.auto_motion and self.compensate
        self.smoothing = float(motion_smoothing)
        self.travel = np.zeros(2)  # belt travel so far (pixels): belt coordinates = image - travel
        self.items: dict[int, Item] = {}  # alive items by item id
        self.owner: dict[int, int] = {}  # raw track id -> item id
        self.last_index: int | None = None
        self.next_id = 0  # item ids: 1, 2, ... per stream (raw track ids are ByteTrack's)

    def _advance(self) -> None:
        if self.compensate:
            self.travel = self.travel + self.velocity

    def _step(self, index: int, det: _Detections) -> np.ndarray:
        if self.last_index is not None and index > self.last_index + 1:
            for _ in range(min(index - self.last_index - 1, self.max_gap)):  # missing frames: predict, match nothing
                self._advance()
                self.tracker.update(_Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                                np.zeros(0, np.float32)))
        if self.last_index is not None:
            self._advance()
        self.last_index = index
        shift = np.tile(self.travel, 2).astype(np.float32)
        out = self.tracker.update(_Detections(det.xyxy - shift, det.conf, det.cls))
        if len(out):
            out = out.copy()
            out[:, :4] += shift
        return out

    def _motion(self, it: Item) -> tuple[float, float]:
        return (float(self.velocity[0]), float(self.velocity[1])) if self.calibrated else it.velocity

    def _predicted(self, it: Item, frame: int) -> tuple[float, float]:
        vx, vy = self._motion(it)
        cx, cy = it.centre
        return cx + vx * (frame - it.last_frame), cy + vy * (frame - it.last_frame)

    def _stitch_target(self, index: int, box: np.ndarray) -> Item | None:
        """A lost (alive, unmatched) item whose predicted centre lies within ``stitch_dist`` x its side of ``box``."""
        if self.stitch_dist <= 0:
            return None
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        best, best_d = None, math.inf
        for it in self.items.values():
            if it.last_frame >= index:
                continue
            px, py = self._predicted(it, index)
            side = max(it.box[2] - it.box[0], it.box[3] - it.box[1], 1.0)
            d = math.hypot(cx - px, cy - py) / side
            if d < self.stitch_dist and d < best_d:
                best, best_d = it, d
        return best

    def update(self, index: int, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
               width: int, height: int) -> TrackUpdate:
        """Track one frame's detections (original-frame xyxy pixels); returns ids per detection and changes."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(scores, np.float32).reshape(-1)
        classes = np.asarray(classes, np.int64).reshape(-1)
        out = self._step(index, _Detections(boxes, scores, classes.astype(np.float32)))
        ids = np.full(len(boxes), -1, np.int64)
        active: list[Item] = []
        motions: list[tuple[float, float]] = []
        known = [r for r in out if self.owner.get(int(r[4])) in self.items]
        fresh = [r for r in out if self.owner.get(int(r[4])) not in self.items]
        for row in known + fresh:  # known raw tracks first, so a fresh one cannot take their item
            raw, det_i = int(row[4]), int(row[7])
            box = row[:4].astype(np.float64)
            it = self.items.get(self.owner.get(raw, -1))
            if it is not None and it.last_frame == index and it.hits:
                it = None  # another raw track already holds this item on this frame: this one is another item
            if it is None:
                it = self._stitch_target(index, box)
                if it is None:
                    c = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
                    self.next_id += 1
                    it = Item(self.next_id, index, index, box.tolist(), c)
                    self.items[it.id] = it
                self.owner[raw] = it.id
                it.raw_ids.append(raw)
            if det_i >= 0 and it.hits >= 3 and it.last_frame == index - 1:  # a clean frame-to-frame motion sample
                inner = lambda b: b[0] > 1 and b[2] < width - 1 and b[1] > 1 and b[3] < height - 1  # noqa: E731
                d = boxes[det_i]
                if inner(it.box) and inner(d):
                    motions.append((float(d[0] + d[2] - it.box[0] - it.box[2]) / 2,
                                    float(d[1] + d[3] - it.box[1] - it.box[3]) / 2))
            it.box = box.tolist()
            it.last_frame = index
            it.hits += 1
            if 0 <= det_i < len(scores):
                s = float(scores[det_i])
                it.score_sum += s
                it.votes[int(classes[det_i])] = it.votes.get(int(classes[det_i]), 0.0) + s
                ids[det_i] = it.id
            active.append(it)
        if self.auto_motion and motions:
            m = np.median(np.asarray(motions), axis=0)
            self.velocity = m if not self.calibrated else (1 - self.smoothing) * self.velocity + self.smoothing * m
            self.calibrated = True
        ended: list[Item] = []
        for it in list(self.items.values()):
            if it.last_frame == index:
                continue
            px, py = self._predicted(it, index)
            if index - it.last_frame > self.buffer:
                it.ended = "lost"
            elif not (0 <= px < width and 0 <= py < height):
                it.ended = "exit"
            else:
                continue
            ended.append(it)
            del self.items[it.id]
            for raw in it.raw_ids:
                if self.owner.get(raw) == it.id:
                    del self.owner[raw]
        return TrackUpdate(ids, active, ended)


def frame_time_s(fr: FrameResult, clock: str, fps: float) -> float:
    """A frame's time in seconds: its capture wall clock (``capture``, what a line operator means by "idle for 30
    s"), or ``index / fps`` (``frames``: deterministic for replays run faster than real time)."""
    if clock == "capture" and fr.capture_ns:
        return fr.capture_ns / 1e9
    return fr.index / fps


def detection_names(codec, names: list[str] | None) -> list[str]:
    """Class names: the ``names`` parameter, else the loaded codec's detection names (``codec``: ``ctx.codec()``),
    else none (ids as text)."""
    if names:
        return list(names)
    return list(getattr(codec, "class_names", {}).get("detection", [])) if codec is not None else []


@register_stage
class TrackItems(Stage):
    """ByteTrack item tracking per stream after results.merge: item ids, class by vote, lifecycle."""
    key = "track.items"
    accepts = (FrameResult,)
    emits = (FrameResult,)

    def __init__(self, high_thresh: float = 0.25, low_thresh: float = 0.1, new_track_thresh: float = 0.25,
                 track_buffer: int = 30, match_thresh: float = 0.8, fuse_score: bool = True,
                 stitch_dist: float = 0.5, belt_motion: Any = "auto", clock: str = "capture", fps: float = 15.0,
                 names: list[str] | None = None):
        if not (belt_motion in ("auto", "off") or (
                isinstance(belt_motion, list) and len(belt_motion) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in belt_motion))):
            raise UsageError(f"track.items: belt_motion {belt_motion!r} must be auto (estimate it), off (track in "
                             f"image coordinates) or [vx, vy] in pixels per frame, e.g. [8.5, 0]")
        hi = _check_range("high_thresh", high_thresh, 0.0, 1.0, "0.25")
        lo = _check_range("low_thresh", low_thresh, 0.0, 1.0, "0.1")
        if lo > hi:
            raise UsageError(f"track.items: low_thresh {low_thresh!r} is above high_thresh {high_thresh!r}; "
                             f"low-score detections must score below the high ones (e.g. 0.1 and 0.25)")
        if not isinstance(track_buffer, int) or isinstance(track_buffer, bool) or track_buffer < 1:
            raise UsageError(f"track.items: track_buffer {track_buffer!r} must be a whole number of frames >= 1, "
                             f"e.g. track_buffer: 30")
        if clock not in CLOCKS:
            raise UsageError(f"track.items: clock {clock!r} is not one of {', '.join(CLOCKS)}; use `capture` for "
                             f"live lines or `frames` (index / fps) for replays")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise UsageError(f"track.items: names {names!r} must be a list of class names, e.g. [tshirt, trouser]")
        self.cfg = dict(high_thresh=hi, low_thresh=lo,
                        new_track_thresh=_check_range("new_track_thresh", new_track_thresh, 0.0, 1.0, "0.25"),
                        track_buffer=track_buffer,
                        match_thresh=_check_range("match_thresh", match_thresh, 0.0, 1.0, "0.8"),
                        fuse_score=bool(fuse_score), stitch_dist=_check_range("stitch_dist", stitch_dist, 0.0, 10.0,
                                                                              "0.5"),
                        belt_motion=belt_motion)
        self.clock, self.fps = clock, _check_range("fps", fps, 1e-3, 1e4, "15")
        self.names_param = names
        self.trackers: dict[int, ItemTracker] = {}

    def open(self, ctx) -> None:
        super().open(ctx)
        self.names = detection_names(ctx.codec(), self.names_param)
        ItemTracker(**self.cfg)  # fail at open (missing tracker package), not on the first frame

    def process(self, fr: FrameResult) -> FrameResult:
        if not self.names:  # the decode stage loads the codec (and its class names) when it opens, after this
            self.names = detection_names(self.ctx.codec(), self.names_param)  # stage (sinks open first)
        w, h = fr.size
        det = fr.results.get("detection")
        tr = self.trackers.get(fr.stream)
        restarted: list[Item] = []
        if tr is not None and tr.last_index is not None and fr.index <= tr.last_index:
            # a new edge session for this stream starts again at frame 0: end its items, keep ids unique
            self.ctx.log(f"[{self.ctx.name}] stream {fr.stream} went back from frame {tr.last_index} to {fr.index} "
                         f"(a new edge session): tracking starts afresh, {len(tr.items)} item(s) end")
            restarted = list(tr.items.values())
            for it in restarted:
                it.ended = "restart"
            fresh = ItemTracker(**self.cfg)
            fresh.next_id = tr.next_id
            tr = None
            self.trackers[fr.stream] = fresh
        if tr is None:
            tr = self.trackers.get(fr.stream) or ItemTracker(**self.cfg)
            self.trackers[fr.stream] = tr
        if det is not None:
            up = tr.update(fr.index, det["boxes"], det["scores"], det["classes"], w, h)
        else:  # this frame lost its detection (see `errors`): a gap for the tracker
            up = tr.update(fr.index, np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                           w, h)
        results = dict(fr.results)
        if det is not None:
            results["detection"] = {**det, "track_ids": up.track_ids}
        v = [round(float(x), 4) for x in tr.velocity] if tr.calibrated else None
        results["tracks"] = {"t": round(frame_time_s(fr, self.clock, self.fps), 6), "width": int(w),
                             "height": int(h), "velocity": v, "active": [it.as_dict(self.names) for it in up.active],
                             "ended": [it.as_dict(self.names) for it in restarted + up.ended]}
        self.ctx.stats.extra["items_alive"] = sum(len(t.items) for t in self.trackers.values())
        return dataclasses.replace(fr, results=results)

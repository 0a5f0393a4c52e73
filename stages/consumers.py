"""Task consumers (detection, segmentation, classification) and `results.merge`, which joins them per frame.

A consumer turns Features into a TaskResult in original-frame coordinates. If its head raises on a frame,
that frame loses this task's result only: the TaskResult carries the error text, the merge puts it into the
frame's ``errors`` field, and the pipeline goes on. Subclass :class:`Consumer` and override ``compute`` to
add a task (register it with ``@register_stage`` or through the ``ladon.stages`` entry-point group).
"""
from __future__ import annotations

import time

import cv2
import numpy as np

from pipeline.codecs import get_codec
from pipeline.stage import Features, FrameResult, Letterbox, Stage, TaskResult, register_stage


def map_boxes(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """xyxy boxes in model-input pixels -> original-frame pixels (undo pad, undo scale, clip)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] -= lb.left
    b[:, [1, 3]] -= lb.top
    b /= lb.ratio
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, lb.orig_w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, lb.orig_h)
    return b


def map_class_map(cmap: np.ndarray, lb: Letterbox) -> np.ndarray:
    """(S, S) class map in model-input pixels -> (H, W) of the original frame (crop the pad, resize nearest)."""
    crop = np.ascontiguousarray(cmap[lb.top:lb.top + lb.unpad_h, lb.left:lb.left + lb.unpad_w])
    if crop.shape[:2] == (lb.orig_h, lb.orig_w):
        return crop.astype(np.uint8)
    return cv2.resize(crop.astype(np.uint8), (lb.orig_w, lb.orig_h), interpolation=cv2.INTER_NEAREST)


def map_result(task: str, result, lb: Letterbox):
    if task == "detection":
        return {"boxes": map_boxes(result["boxes"], lb), "scores": np.asarray(result["scores"], np.float32),
                "classes": np.asarray(result["classes"], np.int64)}
    if task == "segmentation":
        return map_class_map(np.asarray(result), lb)
    return result


class Consumer(Stage):
    task = ""
    accepts = (Features,)
    emits = (TaskResult,)

    def __init__(self, checkpoint=None, conf: float | None = None):
        self.checkpoint = checkpoint
        self.conf = conf

    def open(self, ctx) -> None:
        super().open(ctx)
        self.codec = None

    def _codec(self):
        if self.codec is None:
            self.codec = self.ctx.shared.get("codec") if self.checkpoint is None else None
            if self.codec is None:
                self.codec = get_codec(self.checkpoint)
        return self.codec

    def compute(self, f: Features):
        """This task's result for one frame, in original-frame coordinates."""
        codec = self._codec()
        kw = {} if self.conf is None else {"conf": float(self.conf)}
        raw = codec.head(self.task, f.features, **kw)[0]
        return map_result(self.task, raw, f.letterbox)

    def process(self, f: Features) -> TaskResult:
        t0 = time.perf_counter()
        try:
            res, err = self.compute(f), None
        except Exception as exc:  # noqa: BLE001 - lose this frame's result for this task only
            res, err = None, f"{type(exc).__name__}: {exc}"
            self.ctx.stats.errors += 1
            if self.ctx.stats.errors == 1:
                self.ctx.log(f"[{self.ctx.name}] {self.task} failed on stream {f.stream} frame {f.index}: {err} "
                             f"(that frame loses its {self.task} result; see the JSONL `errors` field)")
        return TaskResult(self.task or self.ctx.name, f, res, err, (time.perf_counter() - t0) * 1000.0)


@register_stage
class DetectionConsumer(Consumer):
    key = "task.detection"
    task = "detection"


@register_stage
class SegmentationConsumer(Consumer):
    key = "task.segmentation"
    task = "segmentation"


@register_stage
class ClassificationConsumer(Consumer):
    key = "task.classification"
    task = "classification"


@register_stage
class MergeResults(Stage):
    """Join one TaskResult per input per frame into a FrameResult (in frame order: consumers keep order).

    An input that sends Features (no consumer in between) counts as a task with no result."""
    key = "results.merge"
    emits = (FrameResult,)

    def open(self, ctx) -> None:
        super().open(ctx)
        self.n = len(ctx.inputs)
        self.pending: dict[tuple[int, int], list] = {}

    def process(self, msg):
        f = msg.source if isinstance(msg, TaskResult) else msg
        k = (f.stream, f.index)
        got = self.pending.setdefault(k, [])
        got.append(msg)
        if len(got) < self.n:
            return None
        del self.pending[k]
        timings = dict(f.timings)
        results, errors = {}, {}
        for m in got:
            if isinstance(m, TaskResult):
                timings[m.task] = round(m.ms, 3)
                if m.error is not None:
                    errors[m.task] = m.error
                else:
                    results[m.task] = m.result
        lb = f.letterbox
        return FrameResult(f.stream, f.index, f.capture_ns, f.sent_ns, f.received_ns, time.time_ns(), f.wire_bytes,
                           f.latent_shape, (lb.orig_w, lb.orig_h), timings, results, errors, f.image)

    def close(self):
        if getattr(self, "pending", None):
            self.ctx.log(f"[{self.ctx.name}] {len(self.pending)} frame(s) incomplete at shutdown (an input ended early)")
        return None

"""Exact per-item ground truth of a generated conveyor line, to measure tracking and counting.

``conveyor.line.LineFrame`` gives exact boxes and classes per frame but no item identity across frames. An
:class:`IdentifiedLine` renders the very same line (same seed, same bytes) and also says which item each truth box
belongs to: it tags every garment sprite's class with the item's spawn number (``cls | id << 4``; classes are
0..9, so the low four bits keep the class and every derived value, semantic map and frame label included, decodes
exactly), and decodes the tag again in each frame. :func:`true_crossings` then gives the exact count: the distinct
items whose box centre crosses the line. :func:`detections_from_truth` turns a truth frame into what a detector of
a given quality would report (jitter, dropped detections, class flips, one-frame false positives), so tracking
and counting can be tested independently of the model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from conveyor.classes import NUM_ITEMS
from conveyor.line import ConveyorLine, LineFrame

_SHIFT = 4  # class bits; NUM_ITEMS <= 16
assert NUM_ITEMS <= 1 << _SHIFT


@dataclass
class TruthFrame:
    """A line frame (classes, semantic map and label as the plain line gives them) and each box's item id."""

    frame: LineFrame
    ids: np.ndarray  # (N,) int64, item spawn number (from 1), one per truth box


class IdentifiedLine(ConveyorLine):
    """A :class:`ConveyorLine` whose frames also carry each truth box's item identity (see the module doc)."""

    def __init__(self, cfg=None) -> None:
        super().__init__(cfg)
        self._spawned = 0

    def _next_item(self, rng, prev):  # same random draws as the plain line: only the class value is tagged
        item = super()._next_item(rng, prev)
        if item.sprite.cls >= 0:
            self._spawned += 1
            item.sprite = dataclasses.replace(item.sprite, cls=item.sprite.cls | (self._spawned << _SHIFT))
        return item

    def __iter__(self) -> Iterator[TruthFrame]:  # type: ignore[override]
        self._spawned = 0
        mask = (1 << _SHIFT) - 1
        for lf in super().__iter__():
            ids = (lf.classes >> _SHIFT).astype(np.int64)
            sem = np.where(lf.semantic > 0, lf.semantic & mask, 0).astype(np.uint8)  # (tag + 1) & 15 = class + 1
            label = ((lf.label - 1) & mask) + 1 if lf.label > 0 else 0
            yield TruthFrame(dataclasses.replace(lf, classes=(lf.classes & mask).astype(np.int64), semantic=sem,
                                                 label=int(label)), ids)

    def frames(self, n: int) -> Iterator[TruthFrame]:  # type: ignore[override]
        it = iter(self)
        for _ in range(n):
            yield next(it)


@dataclass
class TrueCount:
    """The exact count over a run of frames: items whose box centre crossed ``line_x`` (left to right)."""

    total: int
    by_class: dict[int, int]
    crossing_frame: dict[int, int]  # item id -> first frame its centre was at or past the line
    item_class: dict[int, int]  # every item seen -> class


def true_crossings(frames: list[TruthFrame], line_x: float) -> TrueCount:
    """Count distinct items whose box centre goes from ``< line_x`` in one frame to ``>= line_x`` in a later one."""
    last: dict[int, float] = {}
    crossed: dict[int, int] = {}
    cls_of: dict[int, int] = {}
    for tf in frames:
        cx = (tf.frame.boxes[:, 0] + tf.frame.boxes[:, 2]) / 2
        for i, c, x in zip(tf.ids.tolist(), tf.frame.classes.tolist(), cx.tolist()):
            cls_of[i] = c
            if i in last and i not in crossed and last[i] < line_x <= x:
                crossed[i] = tf.frame.index
            last[i] = x
    by_class: dict[int, int] = {}
    for i in crossed:
        by_class[cls_of[i]] = by_class.get(cls_of[i], 0) + 1
    return TrueCount(len(crossed), by_class, crossed, cls_of)


def detections_from_truth(tf: TruthFrame, rng: np.random.Generator, jitter: float = 0.0, drop: float = 0.0,
                          flip: float = 0.0, false_pos: float = 0.0, score: tuple[float, float] = (0.5, 0.95),
                          num_classes: int = NUM_ITEMS, with_ids: bool = False) -> dict[str, np.ndarray]:
    """What a detector of a given quality reports for one truth frame, in the detection consumer's format.

    ``jitter``: each box edge moves by a normal draw with sigma ``jitter`` x the box side; ``drop``: chance a
    box is missed; ``flip``: chance its class is replaced by a random other class; ``false_pos``: chance of one
    spurious box (random place, size and class) in the frame; ``score``: uniform score range. ``with_ids`` adds
    ``truth_ids``: the item id behind each box (0 for a false positive), to score a tracker."""
    lf = tf.frame
    h, w = lf.image.shape[:2]
    keep = rng.random(len(lf.boxes)) >= drop
    boxes = lf.boxes[keep].astype(np.float32).copy()
    classes = lf.classes[keep].astype(np.int64).copy()
    ids = tf.ids[keep].copy()
    if jitter > 0 and len(boxes):
        side = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
        boxes += rng.normal(0.0, jitter, boxes.shape).astype(np.float32) * side
    flips = rng.random(len(classes)) < flip
    if flips.any():
        classes[flips] = (classes[flips] + rng.integers(1, num_classes, int(flips.sum()))) % num_classes
    scores = rng.uniform(*score, len(boxes)).astype(np.float32)
    if false_pos > 0 and rng.random() < false_pos:
        s = rng.uniform(0.1, 0.3) * w
        x, y = rng.uniform(0, w - s), rng.uniform(0, h - s)
        boxes = np.concatenate([boxes, np.array([[x, y, x + s, y + s]], np.float32)])
        classes = np.concatenate([classes, rng.integers(0, num_classes, 1)])
        scores = np.concatenate([scores, np.array([rng.uniform(score[0], score[1])], np.float32)])
        ids = np.concatenate([ids, np.zeros(1, np.int64)])
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    out = {"boxes": boxes.reshape(-1, 4), "scores": scores, "classes": classes}
    if with_ids:
        out["truth_ids"] = ids
    return out

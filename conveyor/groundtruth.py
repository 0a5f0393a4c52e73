"""The ground-truth sidecar of a conveyor-line video, and loading it back for evaluation.

``line.mp4`` gets ``line.gt.jsonl`` beside it: one JSON object per frame, in frame order::

    {"frame": 0, "size": [H, W], "label": 3, "label_name": "pullover",
     "objects": [{"box": [x1, y1, x2, y2], "class": 2, "name": "pullover"}, ...],
     "semantic_rle": [value, run, value, run, ...]}

Boxes are pixel-edge ``xyxy`` (``x2`` = last column + 1). ``semantic_rle`` run-length encodes the ``(H, W)``
uint8 semantic map in row-major order (0 = background, item class + 1). Frame-label rule: see ``conveyor.line``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conveyor.classes import FRAME_LABELS, ITEM_NAMES
from core.rle import rle_decode_pairs as rle_decode, rle_encode_pairs as rle_encode  # noqa: F401 - the sidecar format; old names kept


@dataclass
class FrameTruth:
    """A frame's truth without its image (as read back from the sidecar)."""

    index: int
    boxes: np.ndarray  # (N, 4) float32 xyxy
    classes: np.ndarray  # (N,) int64
    semantic: np.ndarray  # (H, W) uint8
    label: int

    @property
    def label_name(self) -> str:
        return FRAME_LABELS[self.label]


def sidecar_path(video_path: str | Path) -> Path:
    p = Path(video_path)
    return p.with_name(p.stem + ".gt.jsonl")


def frame_record(frame) -> dict:
    """The sidecar object for one frame (a LineFrame or FrameTruth)."""
    h, w = frame.semantic.shape
    objects = [{"box": [round(float(v), 2) for v in box], "class": int(c), "name": ITEM_NAMES[int(c)]}
               for box, c in zip(frame.boxes, frame.classes)]
    return {"frame": int(frame.index), "size": [int(h), int(w)], "label": int(frame.label),
            "label_name": FRAME_LABELS[int(frame.label)], "objects": objects,
            "semantic_rle": rle_encode(frame.semantic)}


def record_line(frame) -> str:
    return json.dumps(frame_record(frame), separators=(",", ":")) + "\n"


def parse_record(obj: dict) -> FrameTruth:
    boxes = np.asarray([o["box"] for o in obj["objects"]], np.float32).reshape(-1, 4)
    classes = np.asarray([o["class"] for o in obj["objects"]], np.int64)
    semantic = rle_decode(obj["semantic_rle"], tuple(obj["size"]))
    return FrameTruth(int(obj["frame"]), boxes, classes, semantic, int(obj["label"]))


def load_ground_truth(video_path: str | Path) -> list[FrameTruth]:
    """Read ``<video>.gt.jsonl`` (given the video path, or any ``.jsonl`` truth file itself) into per-frame truth."""
    p = Path(video_path)
    side = p if p.name.endswith(".jsonl") else sidecar_path(p)
    if not side.is_file():
        raise FileNotFoundError(f"no ground-truth sidecar {side} for {video_path}; make one with "
                                f"`run_pipeline.py data`")
    with open(side, encoding="utf-8") as f:
        return [parse_record(json.loads(line)) for line in f if line.strip()]

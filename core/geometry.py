"""Letterbox geometry: fitting a frame into the square model input, and mapping results back to the frame.

NumPy and OpenCV only; :func:`letterbox_params` alone imports Ultralytics, lazily, to use its own arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Letterbox:
    """How the edge fitted the original frame into the square model input."""
    orig_w: int
    orig_h: int
    size: int
    ratio: float
    left: int
    top: int
    unpad_w: int
    unpad_h: int


def letterbox_params(orig_w: int, orig_h: int, size: int) -> Letterbox:
    """The letterbox Ultralytics' LetterBox applies (its own get_params), as plain numbers the server reuses."""
    import core.offline  # noqa: F401 - before Ultralytics
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
    import cv2

    crop = np.ascontiguousarray(cmap[lb.top:lb.top + lb.unpad_h, lb.left:lb.left + lb.unpad_w])
    if crop.shape[:2] == (lb.orig_h, lb.orig_w):
        return crop.astype(np.uint8)
    return cv2.resize(crop.astype(np.uint8), (lb.orig_w, lb.orig_h), interpolation=cv2.INTER_NEAREST)

"""Run-length encoding of (H, W) uint8 class maps, row-major, in the project's two serialised formats.

* :func:`rle_encode` / :func:`rle_decode`: the JSONL result sink's ``{"size": [H, W], "values": [...],
  "counts": [...]}`` (values[i] repeated counts[i] times).
* :func:`rle_encode_pairs` / :func:`rle_decode_pairs`: the conveyor ground-truth sidecar's flat
  ``[value, run, value, run, ...]`` (the shape is stored beside it).
"""
from __future__ import annotations

import numpy as np


def rle_encode(cmap: np.ndarray) -> dict:
    """Run-length encoding of a class map, row-major: values[i] repeated counts[i] times."""
    flat = np.asarray(cmap).reshape(-1)
    if flat.size == 0:
        return {"size": list(cmap.shape), "values": [], "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    counts = np.diff(np.concatenate((starts, [flat.size])))
    return {"size": [int(cmap.shape[0]), int(cmap.shape[1])], "values": flat[starts].astype(int).tolist(),
            "counts": counts.astype(int).tolist()}


def rle_decode(rle: dict) -> np.ndarray:
    """The class map of :func:`rle_encode`'s output."""
    h, w = rle["size"]
    return np.repeat(np.asarray(rle["values"], np.uint8), np.asarray(rle["counts"], np.int64)).reshape(h, w)


def rle_encode_pairs(a: np.ndarray) -> list[int]:
    """Flat ``[value, run, value, run, ...]`` of an array, row-major (the ground-truth sidecar's format)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    if flat.size == 0:
        return []
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
    runs = np.diff(np.concatenate([starts, [flat.size]]))
    return np.stack([flat[starts].astype(np.int64), runs], axis=1).reshape(-1).tolist()


def rle_decode_pairs(rle: list[int], shape: tuple[int, int]) -> np.ndarray:
    """The (H, W) uint8 map of :func:`rle_encode_pairs`' output; ValueError when the runs do not cover it."""
    pairs = np.asarray(rle, np.int64).reshape(-1, 2)
    out = np.repeat(pairs[:, 0], pairs[:, 1]).astype(np.uint8)
    if out.size != shape[0] * shape[1]:
        raise ValueError(f"semantic RLE covers {out.size} pixels, expected {shape[0]}x{shape[1]}")
    return out.reshape(shape)

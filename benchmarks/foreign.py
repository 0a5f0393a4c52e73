"""A second, independent conveyor renderer: footage the project's generator never made, for generalisation checks.

It shares no rendering code with ``conveyor/`` (belts, sprites, camera are its own): a landscape 320x240 frame
(so the pipeline letterboxes it), a belt of its own (wooden slats, canvas or tread plate, drawn with different
maths), garments from Fashion-MNIST's *test* split alpha-blended by intensity (no hard threshold), moving right
to left, with its own lighting. Only the output format is shared: an H.264 video and a ``.gt.jsonl`` sidecar in
the format ``data`` writes, with the project's label rules (station band, visible-pixel truth), so

    python -m benchmarks.foreign --out out/foreign --frames 300 --seed 0
    python run_pipeline.py eval --video out/foreign/foreign.mp4

scores any model on it.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from conveyor.classes import STATION
from conveyor.export import write_video
from conveyor.line import DEFAULT_FASHION_DIR, load_fashion_mnist

WIDTH, HEIGHT = 320, 240


@dataclass
class ForeignFrame:
    index: int
    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    semantic: np.ndarray
    label: int


def _belt(kind: str, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "wood":
        base = np.array([150, 105, 70], np.float32)
        grain = np.sin(yy / 3.0 + 4 * np.sin(xx / 40.0)) * 0.1 + rng.normal(0, 0.03, (h, w))
        seams = ((xx % 64) < 2).astype(np.float32) * -0.4
        pat = 1.0 + grain + seams
    elif kind == "canvas":
        base = np.array([180, 175, 160], np.float32)
        pat = 1.0 + 0.06 * np.sin(xx * 1.7) * np.sin(yy * 1.7) + rng.normal(0, 0.04, (h, w))
    else:  # tread
        base = np.array([70, 72, 76], np.float32)
        pat = 1.0 + 0.25 * ((np.abs(((xx + yy) % 24) - 12) < 2) | (np.abs(((xx - yy) % 24) - 12) < 2))
    return np.clip(base[None, None, :] * pat[..., None], 0, 255).astype(np.float32)


def render(frames: int, seed: int = 0, fashion_dir: str = DEFAULT_FASHION_DIR) -> list[ForeignFrame]:
    rng = np.random.default_rng([seed, 0xF0])
    images, labels = load_fashion_mnist(fashion_dir, "test")
    kind = ("wood", "canvas", "tread")[seed % 3]
    belt = _belt(kind, rng, 2 * WIDTH, HEIGHT)
    speed = 7.0  # px per frame, right to left
    items = []  # (class, rgb patch, alpha, x at frame 0, y)
    x = 40.0
    while x < WIDTH + speed * frames + 200:
        i = int(rng.integers(len(labels)))
        side = int(rng.uniform(60, 100))
        g = cv2.resize(images[i], (side, side), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
        g = cv2.warpAffine(g, cv2.getRotationMatrix2D((side / 2, side / 2), float(rng.uniform(-30, 30)), 1.0),
                           (side, side))
        colour = rng.uniform(0.2, 1.0, 3).astype(np.float32) * 255
        alpha = np.clip(g * 1.6, 0, 1)
        items.append((int(labels[i]), g[..., None] * colour, alpha, x, int(rng.integers(10, HEIGHT - side - 10))))
        x += side * rng.uniform(0.9, 1.8)
    out = []
    lo, hi = STATION[0] * WIDTH, STATION[1] * WIDTH
    for t in range(frames):
        off = int(t * speed) % WIDTH
        img = np.ascontiguousarray(np.roll(belt, -off, axis=1)[:, :WIDTH])
        owner = np.full((HEIGHT, WIDTH), -1, np.int32)
        classes = []
        for cls, patch, alpha, x0, y0 in items:
            xi = int(round(x0 - t * speed))
            h, w = alpha.shape
            a, b = max(0, xi), min(WIDTH, xi + w)
            if a >= b:
                continue
            al = alpha[:, a - xi:b - xi, None]
            img[y0:y0 + h, a:b] = img[y0:y0 + h, a:b] * (1 - al) + patch[:, a - xi:b - xi] * al
            owner[y0:y0 + h, a:b][al[..., 0] > 0.3] = len(classes)
            classes.append(cls)
        light = 0.85 + 0.25 * np.cos(np.linspace(-math.pi / 2, math.pi / 2, WIDTH, dtype=np.float32))
        img = np.clip(img * light[None, :, None], 0, 255).astype(np.uint8)
        semantic = np.zeros((HEIGHT, WIDTH), np.uint8)
        boxes, kept, best, label = [], [], -1, 0
        for k, cls in enumerate(classes):
            m = owner == k
            n = int(m.sum())
            if n < 0.0015 * WIDTH * HEIGHT:
                semantic[m] = cls + 1
                continue
            semantic[m] = cls + 1
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            kept.append(cls)
            inside = int(m[:, int(round(lo)):int(round(hi))].sum())
            if round(lo) <= xs.mean() < round(hi) and inside >= best:
                best, label = inside, cls + 1
        out.append(ForeignFrame(t, img, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(kept, np.int64),
                                semantic, label))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render conveyor footage with an independent renderer (video + truth).")
    p.add_argument("--out", default="out/foreign", help="output folder (default: %(default)s)")
    p.add_argument("--frames", type=int, default=300, help="frames (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed; its remainder mod 3 picks the belt (default: 0)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "foreign.mp4"
    n = write_video(render(args.frames, args.seed), path, 15)
    print(f"wrote {path} ({n} frames, {WIDTH}x{HEIGHT}) and its truth {path.with_name('foreign.gt.jsonl')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

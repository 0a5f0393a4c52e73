"""The conveyor line: garments on a textured belt, with exact ground truth for every frame.

What a frame shows
    A belt drawn from a family of ``conveyor.belts`` (``belts``: a set or one family; the seed picks it, with its
    colour and pattern), mirrored so it tiles seamlessly, between two rails, moves left to right at ``belt_speed``
    frame widths per second. Items ride on it at belt speed: Fashion-MNIST garments (real 28x28 images, scaled
    to ``min_item``-``max_item`` px at 256 px frames, rotated, with a randomised appearance) or, where
    Fashion-MNIST is absent or ``items='drawn'``, procedurally drawn parts; now and then a non-garment distractor
    (background in every task). They enter at the left edge and leave at the right; gaps vary, some items
    overlap and now and then an empty stretch passes. Each line has its own camera (``conveyor.render.Camera``:
    gain, contrast, gamma, white balance, gradients, mild perspective) plus slow lighting drift, motion blur
    along the belt and sensor noise. ``look='plain'`` keeps the original uniform look.

Ground truth (exact, computed from the render, never estimated)
    * Item mask: the pixels where the garment dominates (alpha >= 0.5 after resize and rotate; ``conveyor.render``),
      so the mask *is* the visible garment.
    * Occlusion: items are painted in spawn order, a later item over an earlier one. An instance mask is the
      item's *visible* pixels; its box is the bounding box of that mask, in pixel-edge ``xyxy`` coordinates
      (``x2 = last column + 1``), so boxes are clipped at the frame border by construction.
    * Items with fewer than ``min_visible`` visible pixels (default 0.15 % of the frame) are left out of the
      detection / instance truth; the semantic map still paints them (it is the exact per-pixel class).
    * Semantic map: ``(H, W) uint8``, 0 = background, an item of class ``c`` is ``c + 1`` (``SEMANTIC_NAMES``).
    * Frame label (classification), the **station rule** (``conveyor.classes.STATION``): among the items in the
      detection truth, those whose visible-pixel centroid lies in the station band (the central quarter of the
      width) are at the station; the one with the most visible pixels inside the band gives ``class + 1`` (ties:
      the front-most); none gives ``0 = empty`` (``FRAME_LABELS``).
    * Truth is taken before blur and noise (the blur is a few pixels along the belt direction).

Determinism: everything derives from ``seed``; iterating a line twice gives identical frames, and two seeds give
two different lines (items, texture tint, lighting phases, noise).
"""
from __future__ import annotations

import functools
import gzip
import math
import struct
import sys
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from conveyor.belts import ALL_FAMILIES, BELT_SETS, draw_family, make_belt
from conveyor.classes import FRAME_LABELS, ITEM_NAMES, NUM_ITEMS, STATION
from conveyor.render import Camera, Sprite, distractor_sprite, garment_sprite, paste
from core.errors import UsageError

ITEM_SOURCES = ("auto", "fashion", "drawn")
DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
BELT_CHOICES = tuple(BELT_SETS) + ALL_FAMILIES


@dataclass
class LineConfig:
    """Everything that defines a line. Sizes in pixels refer to a 256 px frame and scale with ``size``."""

    size: int = 256  # frame height = width (the model input size); even (H.264 yuv420p)
    fps: int = 15
    seed: int = 0
    items: str = "auto"  # 'auto' (Fashion-MNIST if installed, else drawn) | 'fashion' | 'drawn'
    belts: str = "all"  # belt family or set (conveyor.belts): 'train', 'heldout', 'all' or one family name
    look: str = "wide"  # 'wide': randomised garments, distractors, camera (per line); 'plain': the original look
    belt_speed: float = 0.5  # frame widths per second
    density: float = 1.0  # >1 packs items closer
    min_item: float = 50.0  # item side before rotation, px at 256
    max_item: float = 110.0
    max_rotation: float = 45.0  # degrees, uniform in [-max, max]
    overlap_prob: float = 0.2  # chance an item is placed overlapping its predecessor
    empty_prob: float = 0.06  # chance of an empty stretch before an item
    lighting: float = 0.15  # amplitude of the global gain drift
    blur: float = 0.5  # exposure as a fraction of the frame time: motion-blur length = blur * px per frame
    noise: float = 3.0  # sensor noise sigma on 0..255
    min_visible: float = 0.0015  # fraction of the frame: smaller visible items leave the detection truth
    fashion_dir: str = DEFAULT_FASHION_DIR
    fashion_split: str = "train"  # 'train' (60k) | 'test' (10k): use 'test' for a line with unseen garments
    belt_seed: int | None = None  # the belt's look (family, colour, pattern) from this seed instead of ``seed``:
    # new items on the *same* belt, i.e. fresh footage from a camera whose line the model was trained on
    distractors: float = 0.15  # chance that a non-garment object (background in every task) rides between items

    def validate(self) -> None:
        if not isinstance(self.size, int) or self.size < 64 or self.size % 2:
            raise UsageError(f"size {self.size!r} is not an even number of pixels >= 64; use e.g. --size 256")
        if not isinstance(self.fps, int) or not 1 <= self.fps <= 240:
            raise UsageError(f"fps {self.fps!r} is out of range; use a whole number from 1 to 240, e.g. --fps 15")
        if self.items not in ITEM_SOURCES:
            raise UsageError(f"items {self.items!r} is not one of {', '.join(ITEM_SOURCES)}; use e.g. --items auto")
        if self.belts not in BELT_CHOICES:
            raise UsageError(f"belts {self.belts!r} is not a belt set or family; choose one of "
                             f"{', '.join(BELT_CHOICES)}, e.g. --belts all")
        if self.look not in ("wide", "plain"):
            raise UsageError(f"look {self.look!r} must be 'wide' or 'plain'")
        if self.fashion_split not in ("train", "test"):
            raise UsageError(f"fashion_split {self.fashion_split!r} must be 'train' or 'test'")
        if not self.belt_speed > 0 or not self.density > 0:
            raise UsageError(f"belt_speed {self.belt_speed!r} and density {self.density!r} must be > 0")
        if not 4 <= self.min_item <= self.max_item:
            raise UsageError(f"item sizes min {self.min_item!r} / max {self.max_item!r} need 4 <= min <= max")


@dataclass
class LineFrame:
    """One rendered frame and its exact truth (see the module docstring for the rules)."""

    index: int
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (N, 4) float32 xyxy pixel edges
    classes: np.ndarray  # (N,) int64, 0..9 (ITEM_NAMES)
    instance_masks: np.ndarray  # (N, H, W) bool, visible pixels
    semantic: np.ndarray  # (H, W) uint8, 0 background, class + 1
    label: int  # index into FRAME_LABELS
    belt: str = ""  # the belt family (conveyor.belts) the frame shows

    @property
    def label_name(self) -> str:
        return FRAME_LABELS[self.label]


# ---------------------------------------------------------------------------------------------------- sources
def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    head = struct.unpack(">" + "I" * (1 + ndim), data[: 4 * (1 + ndim)])
    if head[0] != magic:
        raise ValueError(f"{path}: not an idx file with magic {magic} (got {head[0]})")
    return np.frombuffer(data, np.uint8, offset=4 * (1 + ndim)).reshape(head[1:])


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(root: str = DEFAULT_FASHION_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``(N, 28, 28) uint8`` and labels ``(N,) uint8`` from the Debian idx .gz files."""
    prefix = "train" if split == "train" else "t10k"
    root_p = Path(root)
    images = _read_idx(root_p / f"{prefix}-images-idx3-ubyte.gz", 2051)
    labels = _read_idx(root_p / f"{prefix}-labels-idx1-ubyte.gz", 2049)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels


def fashion_available(root: str = DEFAULT_FASHION_DIR, split: str = "train") -> bool:
    prefix = "train" if split == "train" else "t10k"
    return all((Path(root) / f"{prefix}-{k}-idx{n}-ubyte.gz").is_file() for k, n in (("images", 3), ("labels", 1)))


def _poly(canvas: np.ndarray, pts, rng, value: int, s: float) -> None:
    p = (np.asarray(pts, np.float32) + rng.normal(0, 0.5, (len(pts), 2))) * s
    cv2.fillPoly(canvas, [np.round(p).astype(np.int32)], int(value), lineType=cv2.LINE_AA)


def _line(canvas, a, b, rng, value: int, s: float, thick: float = 1.0) -> None:
    a = tuple(int(round((v + rng.normal(0, 0.3)) * s)) for v in a)
    b = tuple(int(round((v + rng.normal(0, 0.3)) * s)) for v in b)
    cv2.line(canvas, a, b, int(value), max(1, int(round(thick * s))), lineType=cv2.LINE_AA)


def draw_part(cls: int, rng: np.random.Generator) -> np.ndarray:
    """A procedurally drawn 28x28 uint8 stand-in for Fashion-MNIST class ``cls`` (dark background)."""
    s = 4.0
    c = np.zeros((112, 112), np.uint8)
    v = int(rng.integers(150, 256))
    dark = int(v * 0.45)
    long_sleeves = [(10, 4), (18, 4), (23, 7), (26, 24), (22, 24), (20, 12), (20, 25), (8, 25), (8, 12), (6, 24),
                    (2, 24), (5, 7)]
    if cls == 0:  # tshirt
        _poly(c, [(10, 4), (18, 4), (25, 9), (22, 13), (20, 11), (20, 25), (8, 25), (8, 11), (6, 13), (3, 9)], rng, v, s)
    elif cls == 1:  # trouser
        _poly(c, [(9, 2), (19, 2), (20, 27), (16, 27), (14, 10), (12, 27), (8, 27)], rng, v, s)
    elif cls == 2:  # pullover
        _poly(c, long_sleeves, rng, v, s)
    elif cls == 3:  # dress
        _poly(c, [(11, 2), (17, 2), (18, 9), (23, 27), (5, 27), (10, 9)], rng, v, s)
    elif cls == 4:  # coat: long, open front
        _poly(c, [(10, 2), (18, 2), (23, 5), (26, 26), (22, 26), (21, 12), (21, 27), (7, 27), (7, 12), (6, 26),
                  (2, 26), (5, 5)], rng, v, s)
        _line(c, (14, 3), (14, 27), rng, dark, s, 1.2)
    elif cls == 5:  # sandal: sole and straps
        _poly(c, [(2, 20), (26, 17), (26, 21), (2, 24)], rng, v, s)
        for a, b in (((6, 21), (12, 12)), ((12, 12), (19, 19)), ((15, 12), (23, 18))):
            _line(c, a, b, rng, v, s, 1.6)
    elif cls == 6:  # shirt: long sleeves, collar and buttons
        _poly(c, long_sleeves, rng, v, s)
        _line(c, (11, 4), (14, 8), rng, dark, s, 0.8)
        _line(c, (17, 4), (14, 8), rng, dark, s, 0.8)
        _line(c, (14, 8), (14, 25), rng, dark, s, 0.6)
    elif cls == 7:  # sneaker
        _poly(c, [(2, 13), (10, 12), (16, 16), (26, 18), (26, 23), (2, 23)], rng, v, s)
        _line(c, (2, 21), (26, 21), rng, dark, s, 0.8)
    elif cls == 8:  # bag with handle
        _poly(c, [(4, 11), (24, 11), (25, 26), (3, 26)], rng, v, s)
        cv2.ellipse(c, (56, 44), (int(24 + rng.normal(0, 2)), int(20 + rng.normal(0, 2))), 0, 180, 360, v, 7,
                    lineType=cv2.LINE_AA)
    else:  # ankle boot
        _poly(c, [(5, 3), (14, 3), (15, 15), (26, 18), (26, 24), (5, 24)], rng, v, s)
    img = cv2.resize(c, (28, 28), interpolation=cv2.INTER_AREA).astype(np.float32)
    img *= rng.uniform(0.8, 1.0, (28, 28)).astype(np.float32)  # fabric-like grain
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ items
@dataclass
class _Item:
    sprite: Sprite
    u: float  # belt coordinate of the sprite's left edge at frame 0
    y0: int  # top row

    @property
    def width(self) -> int:
        return self.sprite.alpha.shape[1]


class ItemSource:
    """Garment images (Fashion-MNIST split, or drawn stand-ins) and the rule for turning one into a sprite."""

    def __init__(self, items: str, fashion_dir: str, fashion_split: str) -> None:
        self.source = items
        if items in ("auto", "fashion"):
            if fashion_available(fashion_dir, fashion_split):
                self.source = "fashion"
            elif items == "fashion":
                raise UsageError(f"Fashion-MNIST not found in {fashion_dir}; install the Debian package "
                                 f"dataset-fashion-mnist, or use --items drawn")
            else:
                self.source = "drawn"
                print(f"warning: Fashion-MNIST not found in {fashion_dir}; drawing procedural parts instead "
                      f"(install dataset-fashion-mnist for real garments)", file=sys.stderr)
        if self.source == "fashion":
            self._images, self._labels = load_fashion_mnist(fashion_dir, fashion_split)

    def sprite(self, rng: np.random.Generator, side: int, max_rotation: float, style: str) -> Sprite:
        """A random garment sprite (retries until something is visible)."""
        while True:
            if self.source == "fashion":
                i = int(rng.integers(len(self._labels)))
                cls, img = int(self._labels[i]), self._images[i]
            else:
                cls = int(rng.integers(NUM_ITEMS))
                img = draw_part(cls, rng)
            sp = garment_sprite(cls, img, rng, side, max_rotation, style)
            if sp is not None:
                return sp


def frame_truth(index: int, image: np.ndarray, owner: np.ndarray, cls_of: np.ndarray,
                min_visible_px: int, belt: str = "") -> LineFrame:
    """Exact truth from the owner map (item index per pixel, -1 background): instance masks, boxes, the semantic
    map and the station label (``conveyor.classes.STATION``)."""
    n_h, n_w = owner.shape
    semantic = np.zeros((n_h, n_w), np.uint8)
    fg = owner >= 0
    if len(cls_of):
        semantic[fg] = (cls_of[owner[fg]] + 1).astype(np.uint8)
    counts = np.bincount(owner[fg], minlength=len(cls_of)) if len(cls_of) else np.zeros(0, np.int64)
    keep = np.flatnonzero(counts >= min_visible_px)
    masks = owner[None] == keep[:, None, None].astype(np.int16)
    boxes = np.zeros((len(keep), 4), np.float32)
    for j in range(len(keep)):
        rows = np.flatnonzero(masks[j].any(axis=1))
        cols = np.flatnonzero(masks[j].any(axis=0))
        boxes[j] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    label = 0
    if len(keep):
        lo, hi = int(round(STATION[0] * n_w)), int(round(STATION[1] * n_w))
        xs = np.arange(n_w, dtype=np.float64)
        col_counts = masks.sum(axis=1)  # (N, W) visible pixels per column
        centroid = (col_counts * xs).sum(axis=1) / np.maximum(col_counts.sum(axis=1), 1)
        inside = col_counts[:, lo:hi].sum(axis=1)
        at_station = (centroid >= lo) & (centroid < hi)
        if at_station.any():
            score = np.where(at_station, inside, -1)
            j = int(np.flatnonzero(score == score.max())[-1])  # ties: the front-most item
            label = int(cls_of[keep[j]]) + 1
    return LineFrame(index, image, boxes, cls_of[keep].astype(np.int64), masks, semantic, label, belt)


class ConveyorLine:
    """An endless, reproducible conveyor line. ``iter(line)`` starts at frame 0 every time."""

    def __init__(self, cfg: LineConfig | None = None) -> None:
        self.cfg = cfg = cfg or LineConfig()
        cfg.validate()
        self.items = ItemSource(cfg.items, cfg.fashion_dir, cfg.fashion_split)
        self.source = self.items.source
        n = cfg.size
        self.scale = n / 256.0
        self.px_per_frame = cfg.belt_speed * n / cfg.fps
        self.rail = max(2, int(round(0.06 * n)))
        self.min_visible_px = max(8, int(round(cfg.min_visible * n * n)))
        self._blur_len = int(round(cfg.blur * self.px_per_frame))

    # ---- static parts
    def _belt_tile(self, rng: np.random.Generator) -> np.ndarray:
        n = self.cfg.size
        self.belt_family = draw_family(rng, self.cfg.belts)
        tile = make_belt(self.belt_family, rng, n, n)
        r = self.rail
        rail = np.linspace(150, 90, r, dtype=np.float32)[:, None, None] * np.ones((1, tile.shape[1], 3), np.float32)
        rail = rail * rng.uniform(0.6, 1.3, 3).astype(np.float32)
        tile[:r] = rail
        tile[-r:] = rail[::-1]
        return np.ascontiguousarray(tile, dtype=np.float32)

    def _next_item(self, rng: np.random.Generator, prev: _Item | None) -> _Item:
        cfg, n = self.cfg, self.cfg.size
        side = max(4, int(round(rng.uniform(cfg.min_item, cfg.max_item) * self.scale)))
        if prev is not None and cfg.look == "wide" and rng.random() < cfg.distractors:
            sprite = distractor_sprite(rng, self.scale)
        else:
            sprite = self.items.sprite(rng, side, cfg.max_rotation, "plain" if cfg.look == "plain" else "wide")
        h, w = sprite.alpha.shape
        lo, hi = self.rail, n - self.rail - h
        y0 = int(rng.integers(lo, hi + 1)) if hi >= lo else int((n - h) // 2)
        if prev is None:
            u = 0.55 * n - w  # the line starts with an item on the belt
        else:
            r = rng.random()
            mean_side = 0.5 * (cfg.min_item + cfg.max_item) * self.scale
            if r < cfg.empty_prob:
                gap = rng.uniform(0.4, 1.1) * n
            elif r < cfg.empty_prob + cfg.overlap_prob:
                gap = -rng.uniform(0.15, 0.5) * min(w, prev.width)
            else:
                gap = rng.uniform(-0.05, 0.6) * mean_side / cfg.density
            u = prev.u - gap - w
        return _Item(sprite, float(u), y0)

    # ---- frames
    def __iter__(self) -> Iterator[LineFrame]:
        cfg, n = self.cfg, self.cfg.size
        rng = np.random.default_rng([cfg.seed, 0x11E])
        tile = self._belt_tile(rng)  # always drawn, so belt_seed leaves the rest of the line unchanged
        if cfg.belt_seed is not None:
            tile = self._belt_tile(np.random.default_rng([cfg.belt_seed, 0x11E]))  # line belt_seed's belt
        cam_rng = np.random.default_rng([cfg.seed, 0xCA3])
        camera = Camera.draw(cam_rng, n) if cfg.look == "wide" else Camera(noise=cfg.noise)
        camera.blur, camera.shadows = self._blur_len, 0  # motion blur follows the belt speed
        if cfg.look == "wide":
            camera.noise = max(camera.noise, cfg.noise) if cfg.noise > 0 else 0.0
        else:
            camera.noise = cfg.noise
        tw = tile.shape[1]
        phases = rng.uniform(0, 2 * math.pi, 4)
        periods = np.array([7.0, 2.3, 11.0, 5.0]) * cfg.fps * rng.uniform(0.8, 1.25, 4)
        xs_norm = (np.arange(n, dtype=np.float32) / n - 0.5)[None, :, None]
        items: list[_Item] = []
        last: _Item | None = None
        t = 0
        while True:
            shift = t * self.px_per_frame
            while last is None or last.u + shift > -2 * n:  # keep the queue filled beyond the left edge
                last = self._next_item(rng, last)
                items.append(last)
            items = [it for it in items if it.u + shift < n]  # gone past the right edge
            offset = int(round(shift)) % tw
            img = np.take(tile, (np.arange(n) - offset) % tw, axis=1)
            owner = np.full((n, n), -1, np.int16)
            painted: list[int] = []
            for it in items:
                x0 = int(round(it.u + shift))
                if x0 >= n or x0 + it.width <= 0:
                    continue
                k = len(painted)
                if it.sprite.cls >= 0:
                    painted.append(it.sprite.cls)
                paste(img, owner, it.sprite, x0, it.y0, k, shadow=0.35 if cfg.look == "wide" else 0.0)
            # lighting drift, then the line's camera (fixed perspective, blur along the belt, noise)
            ph = 2 * math.pi * t / periods + phases
            gain = 1.0 + cfg.lighting * math.sin(ph[0]) + 0.4 * cfg.lighting * math.sin(ph[1])
            slope = 0.8 * cfg.lighting * math.sin(ph[2])
            img *= (gain * (1.0 + slope * xs_norm)).astype(np.float32)
            if cfg.look == "wide":
                img = camera.light(img, np.random.default_rng([cfg.seed, 0x5AD]))
            img, owner = camera.optics(img, owner, np.random.default_rng([cfg.seed, 0x9E0]),
                                       np.random.default_rng([cfg.seed, 0x7015E, t]))
            image = np.clip(img + 0.5, 0, 255).astype(np.uint8)
            yield frame_truth(t, image, owner, np.asarray(painted, np.int64), self.min_visible_px, self.belt_family)
            t += 1

    def frames(self, n: int) -> Iterator[LineFrame]:
        """The first ``n`` frames of the line (a fresh start each call)."""
        return islice(iter(self), n)


__all__ = ["LineConfig", "LineFrame", "ConveyorLine", "ItemSource", "frame_truth", "ITEM_NAMES", "FRAME_LABELS",
           "load_fashion_mnist", "draw_part"]

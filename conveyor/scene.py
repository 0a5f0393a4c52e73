"""Independent training scenes: every frame a fresh belt, fresh items, fresh camera (domain randomisation).

A video line shows a few hundred distinct items on one belt; a model trained on it learns that belt. Training
frames are therefore drawn independently: frame ``i`` of seed ``s`` comes from its own generator
``default_rng([s, i])`` (so any frame can be made alone, in any order or process, and one seed gives the same
bytes), with

- a belt from ``belts`` (default the training families of ``conveyor.belts``; the held-out families never
  appear), shifted, sometimes with rails or a floor strip beside it;
- 0 to ``max_items`` garments at random positions, sizes (``min_item``-``max_item`` px at 256), rotations,
  appearances and occlusion, some cut by the frame edge, plus non-garment distractors (background in every task);
- a random camera: brightness, contrast, gamma, white balance, lighting gradients, soft shadows, mild
  perspective, motion blur along the belt, sensor noise, then a real H.264 or JPEG round trip.

Truth follows the same rules as the video line (``conveyor.line.frame_truth``), computed before blur, noise
and compression but after perspective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from conveyor.belts import BELT_SETS, ALL_FAMILIES, draw_family, make_belt
from conveyor.line import DEFAULT_FASHION_DIR, ItemSource, LineFrame, frame_truth
from conveyor.render import Camera, compress, distractor_sprite, paste
from core.errors import UsageError


@dataclass
class SceneConfig:
    """Ranges of the randomisation; sizes in px refer to a 256 px frame and scale with ``size``."""

    size: int = 256
    seed: int = 0
    items: str = "auto"
    fashion_dir: str = DEFAULT_FASHION_DIR
    fashion_split: str = "train"
    belts: str = "train"  # belt set or family (conveyor.belts)
    max_items: int = 5
    min_item: float = 36.0
    max_item: float = 130.0
    max_distractors: int = 3
    min_visible: float = 0.0015
    compression: bool = True

    def validate(self) -> None:
        if not isinstance(self.size, int) or self.size < 64 or self.size % 2:
            raise UsageError(f"size {self.size!r} is not an even number of pixels >= 64; use e.g. 256")
        if self.belts not in tuple(BELT_SETS) + ALL_FAMILIES:
            raise UsageError(f"belts {self.belts!r} is not a belt set or family; use e.g. 'train'")
        if not 4 <= self.min_item <= self.max_item:
            raise UsageError(f"item sizes min {self.min_item!r} / max {self.max_item!r} need 4 <= min <= max")
        if self.max_items < 0 or self.max_distractors < 0:
            raise UsageError("max_items and max_distractors must be >= 0")


class SceneGenerator:
    """``scene(i)`` renders frame ``i`` alone; ``frames(n)`` yields frames 0..n-1."""

    def __init__(self, cfg: SceneConfig | None = None) -> None:
        self.cfg = cfg = cfg or SceneConfig()
        cfg.validate()
        self.items = ItemSource(cfg.items, cfg.fashion_dir, cfg.fashion_split)
        self.scale = cfg.size / 256.0
        self.min_visible_px = max(8, int(round(cfg.min_visible * cfg.size ** 2)))

    def scene(self, index: int) -> LineFrame:
        cfg, n = self.cfg, self.cfg.size
        rng = np.random.default_rng([cfg.seed, index, 0x5CE])
        family = draw_family(rng, cfg.belts)
        tile = make_belt(family, rng, n, n)
        off = int(rng.integers(0, tile.shape[1] - n + 1))
        img = np.ascontiguousarray(tile[:, off:off + n])
        top, bot = 0, n  # rows the belt occupies; outside: rails or floor
        if rng.random() < 0.6:
            for side in (0, 1):
                r = int(rng.uniform(0.0, 0.15) * n)
                if r == 0:
                    continue
                colour = rng.uniform(30, 200, 3).astype(np.float32)
                shade = np.linspace(1.15, 0.8, r, dtype=np.float32)[:, None, None]
                if side == 0:
                    img[:r] = colour * shade
                    top = r
                else:
                    img[n - r:] = colour * shade[::-1]
                    bot = n - r
        owner = np.full((n, n), -1, np.int16)
        k_items = int(rng.integers(0, cfg.max_items + 1)) if rng.random() > 0.08 else 0
        n_dis = int(rng.integers(0, cfg.max_distractors + 1)) if rng.random() < 0.4 else 0
        kinds = [True] * k_items + [False] * n_dis
        rng.shuffle(kinds)
        rotation = 180.0 if rng.random() < 0.3 else 45.0
        painted: list[int] = []
        shadow = float(rng.uniform(0.2, 0.5)) if rng.random() < 0.5 else 0.0
        for is_item in kinds:
            if is_item:
                side = max(4, int(round(rng.uniform(cfg.min_item, cfg.max_item) * self.scale)))
                sprite = self.items.sprite(rng, side, rotation, "wide")
            else:
                sprite = distractor_sprite(rng, self.scale)
            h, w = sprite.alpha.shape
            x0 = int(rng.integers(-w // 2, n - w // 2 + 1))
            lo, hi = top - h // 6, bot - h + h // 6
            y0 = int(rng.integers(lo, hi + 1)) if hi >= lo else (top + bot - h) // 2
            k = len(painted)
            if sprite.cls >= 0:
                painted.append(sprite.cls)
            paste(img, owner, sprite, x0, y0, k, shadow=shadow)
        camera = Camera.draw(rng, n)
        img = camera.light(img, rng)
        img, owner = camera.optics(img, owner, rng)
        image = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        if cfg.compression:
            image = compress(image, rng)
        return frame_truth(index, image, owner, np.asarray(painted, np.int64), self.min_visible_px, family)

    def frames(self, n: int, start: int = 0) -> Iterator[LineFrame]:
        for i in range(start, start + n):
            yield self.scene(i)


__all__ = ["SceneConfig", "SceneGenerator"]

"""Belt appearances: every offline photo source plus procedural belts, in named families.

A belt is a float32 RGB tile ``(H, 2W, 3)`` on 0..255 that repeats seamlessly along x (the belt direction).
Families are the unit of held-out evaluation: training draws from :data:`TRAIN_FAMILIES`, and ``eval`` scores by
default on :data:`HELDOUT_FAMILIES`, whose belts the teachers and the student never saw.

- ``photo``: a crop of a ``skimage.data`` image bundled with the wheel (loads offline), grey or colour, at a
  random scale and contrast. The photos in :data:`HELDOUT_PHOTOS` form the held-out ``photo_heldout`` family.
- procedural: ``rubber`` (fine grain + mottling), ``grooved`` (ribs across or along the belt), ``woven``
  (fabric weave), ``metal`` (brushed steel with a sheen), ``noise`` (multi-octave value noise), ``solid``
  (one colour, faint grain), ``slats`` (roller or slat conveyor), ``lattice`` (modular plastic or stamped belts:
  a random 2-D lattice of discs, squares, slots, crosses or rings, sunk or raised, sharp or soft, optionally lit
  from one side), and held out: ``perforated`` (a plate with a grid of holes) and ``diamond`` (diamond-plate
  tread).

Colour, brightness and contrast are drawn per belt, so one family covers black rubber, green PVC, white food
belts and grey steel. All randomness comes from the ``rng`` passed in: the same generator state gives the same
belt.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

from core.errors import UsageError

TRAIN_PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "coffee", "grass", "gravel", "immunohistochemistry",
                "moon", "page", "retina", "rocket", "text", "clock", "checkerboard", "microaneurysms",
                "colorwheel", "binary_blobs", "shepp_logan_phantom")
HELDOUT_PHOTOS = ("chelsea", "coins", "hubble_deep_field", "horse", "logo")
PROCEDURAL = ("rubber", "grooved", "woven", "metal", "noise", "solid", "slats", "lattice")
HELDOUT_PROCEDURAL = ("perforated", "diamond")
TRAIN_FAMILIES = ("photo",) + PROCEDURAL
HELDOUT_FAMILIES = ("photo_heldout",) + HELDOUT_PROCEDURAL
ALL_FAMILIES = TRAIN_FAMILIES + HELDOUT_FAMILIES
BELT_SETS = {"train": TRAIN_FAMILIES, "heldout": HELDOUT_FAMILIES, "all": ALL_FAMILIES}

# belt base colours (RGB): black/grey rubber, green and blue PVC, white food-grade, tan, steel
_PALETTE = np.array([[35, 35, 38], [60, 62, 64], [95, 96, 98], [140, 142, 145], [45, 95, 60], [40, 70, 120],
                     [200, 200, 195], [170, 150, 115], [120, 125, 130], [90, 60, 45], [150, 60, 50]], np.float32)


@functools.lru_cache(maxsize=64)
def photo(name: str) -> np.ndarray:
    """A ``skimage.data`` image as float32 RGB 0..255 (grey images repeated); UsageError if it cannot load."""
    try:
        import skimage.data

        img = np.asarray(getattr(skimage.data, name)())
    except Exception as exc:  # noqa: BLE001 - any failure means the image cannot be used here
        raise UsageError(f"belt photo {name!r} could not be loaded ({type(exc).__name__}: {exc})") from None
    img = img.astype(np.float32)
    if img.dtype == np.float32 and img.max() <= 1.0:
        img = img * 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def value_noise(rng: np.random.Generator, h: int, w: int, cells: float, octaves: int = 3) -> np.ndarray:
    """Smooth multi-octave noise, zero mean and unit std, ``(h, w)`` float32."""
    out = np.zeros((h, w), np.float32)
    amp = 1.0
    for o in range(octaves):
        gh = max(2, int(round(cells * 2 ** o * h / max(h, w))) + 1)
        gw = max(2, int(round(cells * 2 ** o * w / max(h, w))) + 1)
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        out += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        amp *= 0.5
    return (out - out.mean()) / (out.std() + 1e-6)


def _lattice(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A 2-D lattice of one motif (the ``lattice`` family) on the pixel grid ``yy, xx``: random cell size, angle,
    skew and aspect, the motif's shape, size, polarity and edge softness drawn per belt; zero mean."""
    period = rng.uniform(6, 26)
    angle = rng.uniform(0, np.pi)
    skew = (np.pi / 2, np.pi / 3, rng.uniform(np.pi / 4, np.pi / 2))[int(rng.integers(3))]
    aspect = rng.uniform(0.6, 1.6) if rng.random() < 0.5 else 1.0
    basis = period * np.array([[np.cos(angle), aspect * np.cos(angle + skew)],
                               [np.sin(angle), aspect * np.sin(angle + skew)]], np.float32)  # columns: cell edges
    inv = np.linalg.inv(basis)
    u, v = inv[0, 0] * xx + inv[0, 1] * yy, inv[1, 0] * xx + inv[1, 1] * yy
    fu, fv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
    dx, dy = basis[0, 0] * fu + basis[0, 1] * fv, basis[1, 0] * fu + basis[1, 1] * fv  # pixels from the cell centre
    rot = rng.uniform(0, np.pi)
    cx, cy = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)
    size = period * rng.uniform(0.12, 0.38)
    motif = ("disc", "square", "slot", "cross", "ring")[int(rng.integers(5))]
    if motif == "disc":
        dist = np.hypot(cx, cy) - size
    elif motif == "square":
        dist = np.maximum(np.abs(cx), np.abs(cy)) - size
    elif motif == "slot":
        dist = np.maximum(np.abs(cx) / rng.uniform(1.5, 3.0), np.abs(cy)) - 0.6 * size
    elif motif == "cross":
        t = size * rng.uniform(0.2, 0.45)
        dist = np.minimum(np.maximum(np.abs(cx) - size, np.abs(cy) - t), np.maximum(np.abs(cy) - size, np.abs(cx) - t))
    else:
        dist = np.abs(np.hypot(cx, cy) - size) - size * rng.uniform(0.15, 0.35)
    soft = rng.uniform(0.3, 2.5)
    shape = 1.0 / (1.0 + np.exp(np.clip(dist / soft, -30, 30)))  # 1 inside the motif, 0 outside
    pat = rng.uniform(1.0, 2.8) * (1.0 if rng.random() < 0.5 else -1.0) * shape
    if rng.random() < 0.5:  # embossed: lit from one side
        light = rng.uniform(0, 2 * np.pi)
        gy, gx = np.gradient(shape)
        pat = pat + rng.uniform(2, 6) * soft * (np.cos(light) * gx + np.sin(light) * gy)
    return (pat - pat.mean()).astype(np.float32) + 0.2 * rng.standard_normal(yy.shape).astype(np.float32)


def _pattern(family: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Zero-mean, unit-ish grey pattern ``(h, w)`` of a procedural family."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grain = rng.standard_normal((h, w)).astype(np.float32)
    if family == "rubber":
        return 0.5 * cv2.GaussianBlur(grain, (0, 0), rng.uniform(0.5, 1.2)) + value_noise(rng, h, w, 4) * 0.6
    if family == "grooved":
        period = rng.uniform(4, 16)
        coord = xx if rng.random() < 0.6 else yy
        ribs = np.sign(np.sin(2 * np.pi * coord / period)) * 0.8 + 0.2 * np.sin(2 * np.pi * coord / period * 2)
        return ribs + 0.3 * grain
    if family == "woven":
        p = rng.uniform(3, 8)
        a = np.sin(2 * np.pi * xx / p) * np.sign(np.sin(np.pi * yy / p))
        b = np.sin(2 * np.pi * yy / p) * np.sign(np.sin(np.pi * xx / p))
        return a + b + 0.3 * grain
    if family == "metal":
        streak = cv2.GaussianBlur(grain, (0, 0), sigmaX=rng.uniform(8, 30), sigmaY=0.4)
        streak = streak / (streak.std() + 1e-6)
        sheen = np.cos(np.pi * (yy / h - rng.uniform(0.2, 0.8))) * rng.uniform(0.5, 2.0)
        return 0.6 * streak + sheen
    if family == "noise":
        return value_noise(rng, h, w, rng.uniform(2, 24), octaves=int(rng.integers(2, 5)))
    if family == "solid":
        return 0.15 * grain
    if family == "slats":
        period = rng.uniform(12, 40)
        gap = rng.uniform(0.06, 0.2)
        phase = (xx / period) % 1.0
        return np.where(phase < gap, -2.5, 0.0).astype(np.float32) + 0.4 * np.cos(np.pi * phase) + 0.2 * grain
    if family == "lattice":
        return _lattice(rng, yy, xx)
    if family == "perforated":
        p = rng.uniform(8, 18)
        r = p * rng.uniform(0.15, 0.3)
        oy = (yy % p) - p / 2
        ox = ((xx + (np.floor(yy / p) % 2) * p / 2 * (rng.random() < 0.5)) % p) - p / 2
        return np.where(ox ** 2 + oy ** 2 < r ** 2, -2.5, 0.3).astype(np.float32) + 0.2 * grain
    if family == "diamond":
        p = rng.uniform(10, 22)
        u, v = (xx + yy) / p, (xx - yy) / p
        bump = np.maximum(np.abs(np.sin(np.pi * u)), np.abs(np.sin(np.pi * v * 2))) ** 8
        return 1.8 * bump - 0.5 + 0.25 * grain
    raise UsageError(f"unknown belt family {family!r}; choose one of {', '.join(ALL_FAMILIES)}")


def _photo_pattern(rng: np.random.Generator, names: tuple[str, ...], h: int, w: int) -> np.ndarray:
    """An RGB crop of a random photo, scaled to ``(h, w)``, returned zero-mean unit-std per channel mix."""
    img = photo(str(names[int(rng.integers(len(names)))]))
    ih, iw = img.shape[:2]
    zoom = rng.uniform(0.3, 1.0)
    ch, cw = max(8, int(ih * zoom)), max(8, int(iw * zoom))
    y0, x0 = int(rng.integers(0, ih - ch + 1)), int(rng.integers(0, iw - cw + 1))
    crop = cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = np.repeat(crop.mean(axis=2, keepdims=True), 3, axis=2)
    return (crop - crop.mean()) / (crop.std() + 1e-6)


def make_belt(family: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A belt tile of ``family``: float32 RGB ``(h, 2w, 3)``, seamless along x (mirrored), on 0..255."""
    if family not in ALL_FAMILIES:
        raise UsageError(f"unknown belt family {family!r}; choose one of {', '.join(ALL_FAMILIES)}")
    base = _PALETTE[int(rng.integers(len(_PALETTE)))] * rng.uniform(0.7, 1.3, 3).astype(np.float32)
    base = base * rng.uniform(0.6, 1.4)
    contrast = rng.uniform(6, 45)
    if family in ("photo", "photo_heldout"):
        pat = _photo_pattern(rng, TRAIN_PHOTOS if family == "photo" else HELDOUT_PHOTOS, h, w)
        if rng.random() < 0.5:  # a photo's own colours, or its texture in the belt's colour
            tile = base[None, None, :] + contrast * pat
        else:
            tile = base[None, None, :] + contrast * pat.mean(axis=2, keepdims=True)
    else:
        pat = _pattern(family, rng, h, w)
        tile = base[None, None, :] * (1.0 + contrast / 100.0 * pat[..., None])
    tile = np.concatenate([tile, tile[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.clip(tile, 0, 255), dtype=np.float32)


def draw_family(rng: np.random.Generator, belts: str) -> str:
    """A family name from the set ``belts`` ('train', 'heldout', 'all') or a single family name."""
    if belts in BELT_SETS:
        fams = BELT_SETS[belts]
        return str(fams[int(rng.integers(len(fams)))])
    if belts in ALL_FAMILIES:
        return belts
    raise UsageError(f"belts {belts!r} is not a belt set ({', '.join(BELT_SETS)}) or family "
                     f"({', '.join(ALL_FAMILIES)}); use e.g. --belts train")


__all__ = ["make_belt", "draw_family", "value_noise", "BELT_SETS", "TRAIN_FAMILIES", "HELDOUT_FAMILIES",
           "ALL_FAMILIES", "TRAIN_PHOTOS", "HELDOUT_PHOTOS"]

"""Rendering pieces shared by the video line and the independent training scenes.

- Items: a Fashion-MNIST garment (or a drawn stand-in) scaled, rotated, flipped and given an appearance (tint,
  brightness, an optional fabric pattern, sometimes darker than the belt), with a soft alpha edge. Its exact
  mask is where the item dominates the pixel (alpha >= 0.5), so truth equals what the frame shows.
- Distractors: non-garment things on a belt (washers, bolts, tape, cable, labels, blobs) that are background
  in every task: they occlude garments but are never detected, segmented or named.
- Camera: brightness, contrast and gamma, lighting gradients, soft shadows, motion blur along the belt, sensor
  noise, mild perspective (applied to the image and the owner map alike), and compression artefacts from a
  real codec round trip (H.264 through PyAV, or JPEG).

Everything draws from the ``rng`` passed in, so a seed gives the same bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

from conveyor.belts import value_noise

MASK_THRESHOLD = 40  # garment intensity (0..255, after resize + rotate) where fabric starts


@dataclass
class Sprite:
    """An item ready to paint: colour ``patch`` (h, w, 3) float32, ``alpha`` (h, w) float32 0..1, class or -1."""

    cls: int  # item class 0..9, or -1 for a distractor (background in every task)
    patch: np.ndarray
    alpha: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.alpha >= 0.5


def garment_sprite(cls: int, img28: np.ndarray, rng: np.random.Generator, side: int, max_rotation: float,
                   style: str = "wide") -> Sprite | None:
    """A garment of class ``cls`` from a 28x28 uint8 image; ``style`` 'plain' keeps the original line's look
    (tinted, bright on the belt), 'wide' randomises appearance for training. None if nothing is left visible."""
    big = cv2.resize(img28, (side, side), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    d = int(math.ceil(side * math.sqrt(2))) + 2
    angle = float(rng.uniform(-max_rotation, max_rotation))
    m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    m[:, 2] += (d - side) / 2
    rot = cv2.warpAffine(big, m, (d, d), flags=cv2.INTER_LINEAR, borderValue=0)
    if rng.random() < 0.5:
        rot = rot[:, ::-1]
    if style == "plain":
        alpha = (rot > MASK_THRESHOLD).astype(np.float32)
    else:  # soft edge centred on the threshold: ramps over a few intensity levels
        soft = rng.uniform(4, 30)
        alpha = np.clip((rot - MASK_THRESHOLD) / soft + 0.5, 0.0, 1.0).astype(np.float32)
    ys, xs = np.nonzero(alpha >= 0.5)
    if len(ys) == 0:
        return None
    y1, y2, x1, x2 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    g = rot[y1:y2, x1:x2] / 255.0
    alpha = np.ascontiguousarray(alpha[y1:y2, x1:x2])
    if style == "plain":
        tint = rng.uniform(0.3, 1.0, 3).astype(np.float32) * rng.uniform(0.8, 1.25)
        patch = 255.0 * (0.2 + 0.8 * g[..., None]) * tint[None, None, :]
    else:
        colour = rng.uniform(0.15, 1.0, 3).astype(np.float32)
        if rng.random() < 0.3:  # greyish garments are common
            colour[:] = colour.mean()
        level = rng.uniform(60, 255)
        lo = rng.uniform(0.0, 0.5)  # how dark the garment's darkest parts get
        shade = lo + (1 - lo) * g
        if rng.random() < 0.15:  # inverted: dark print on light fabric
            shade = 1.0 - 0.7 * g
        patch = level * shade[..., None] * colour[None, None, :]
        if rng.random() < 0.4:  # fabric pattern: stripes, checks or mottling
            h, w = shade.shape
            kind = rng.integers(3)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            if kind == 0:
                p = rng.uniform(3, 12)
                pat = np.sign(np.sin(2 * np.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / p))
            elif kind == 1:
                p = rng.uniform(4, 14)
                pat = np.sign(np.sin(2 * np.pi * xx / p)) * np.sign(np.sin(2 * np.pi * yy / p))
            else:
                pat = value_noise(rng, h, w, rng.uniform(2, 8))
            patch = patch * (1.0 + rng.uniform(0.1, 0.4) * pat[..., None])
    return Sprite(int(cls), np.clip(patch, 0, 255).astype(np.float32), alpha)


def distractor_sprite(rng: np.random.Generator, scale: float) -> Sprite:
    """A non-garment object (background in every task): washer, bolt, tape strip, cable, label or blob."""
    s = int(max(6, rng.uniform(10, 45) * scale))
    kind = int(rng.integers(6))
    c = np.zeros((2 * s, 2 * s), np.uint8)
    if kind == 0:  # washer / ring
        cv2.circle(c, (s, s), int(s * 0.8), 255, -1, cv2.LINE_AA)
        cv2.circle(c, (s, s), int(s * rng.uniform(0.25, 0.5)), 0, -1, cv2.LINE_AA)
    elif kind == 1:  # bolt: hexagon head and a shank
        pts = [(s + 0.45 * s * math.cos(a), 0.6 * s + 0.45 * s * math.sin(a)) for a in np.arange(6) * math.pi / 3]
        cv2.fillPoly(c, [np.int32(pts)], 255, cv2.LINE_AA)
        cv2.rectangle(c, (int(0.85 * s), int(0.6 * s)), (int(1.15 * s), int(1.9 * s)), 255, -1)
    elif kind == 2:  # tape strip / label
        w, h = int(s * rng.uniform(0.6, 1.9)), int(s * rng.uniform(0.2, 0.7))
        cv2.rectangle(c, (s - w // 2, s - h // 2), (s + w // 2, s + h // 2), 255, -1)
    elif kind == 3:  # cable: a thick curve
        pts = np.stack([np.linspace(0.1, 1.9, 12) * s, s + np.cumsum(rng.normal(0, 0.15 * s, 12))], 1)
        cv2.polylines(c, [np.int32(pts)], False, 255, max(2, s // 6), cv2.LINE_AA)
    elif kind == 4:  # blob / stain
        cv2.ellipse(c, (s, s), (int(s * rng.uniform(0.3, 0.9)), int(s * rng.uniform(0.3, 0.9))),
                    float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
    else:  # box / carton, seen from above
        w, h = int(s * rng.uniform(0.8, 1.8)), int(s * rng.uniform(0.8, 1.8))
        cv2.rectangle(c, (s - w // 2, s - h // 2), (s + w // 2, s + h // 2), 255, -1)
    m = cv2.getRotationMatrix2D((s, s), float(rng.uniform(0, 360)), 1.0)
    c = cv2.warpAffine(c, m, (2 * s, 2 * s), flags=cv2.INTER_LINEAR)
    alpha = c.astype(np.float32) / 255.0
    colour = rng.uniform(20, 240, 3).astype(np.float32)
    shade = 0.8 + 0.2 * value_noise(rng, 2 * s, 2 * s, 3)[..., None]
    return Sprite(-1, np.clip(colour[None, None, :] * shade, 0, 255).astype(np.float32), alpha)


def paste(img: np.ndarray, owner: np.ndarray, sprite: Sprite, x0: int, y0: int, k: int,
          shadow: float = 0.0) -> None:
    """Paint ``sprite`` at (x0, y0) in place, clipped to the frame; owner pixels it covers become ``k``
    (garments) or -1 (distractors hide what is under them). ``shadow`` > 0 darkens the belt below-right first."""
    n_h, n_w = owner.shape
    h, w = sprite.alpha.shape
    if shadow > 0:
        off = max(1, int(0.06 * max(h, w)))
        sa = cv2.GaussianBlur(sprite.alpha, (0, 0), max(1.0, 0.05 * max(h, w)))
        _darken(img, x0 + off, y0 + off, sa * shadow)
    a, b = max(0, x0), min(n_w, x0 + w)
    top, bot = max(0, y0), min(n_h, y0 + h)
    if a >= b or top >= bot:
        return
    al = sprite.alpha[top - y0:bot - y0, a - x0:b - x0]
    pa = sprite.patch[top - y0:bot - y0, a - x0:b - x0]
    region = img[top:bot, a:b]
    region *= (1.0 - al[..., None])
    region += al[..., None] * pa
    owner[top:bot, a:b][al >= 0.5] = k if sprite.cls >= 0 else -1


def _darken(img: np.ndarray, x0: int, y0: int, dark: np.ndarray) -> None:
    n_h, n_w = img.shape[:2]
    h, w = dark.shape
    a, b = max(0, x0), min(n_w, x0 + w)
    top, bot = max(0, y0), min(n_h, y0 + h)
    if a < b and top < bot:
        img[top:bot, a:b] *= (1.0 - dark[top - y0:bot - y0, a - x0:b - x0])[..., None]


@dataclass
class Camera:
    """Per-frame (scene) or per-line (video) camera and light. ``draw`` makes a random one."""

    gain: float = 1.0
    contrast: float = 1.0
    gamma: float = 1.0
    slope_x: float = 0.0  # linear lighting gradient across the frame
    slope_y: float = 0.0
    vignette: float = 0.0
    shadows: int = 0
    blur: int = 0  # motion-blur length in px along the belt
    noise: float = 3.0
    perspective: float = 0.0  # max corner displacement as a fraction of the side
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)  # white balance

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int) -> "Camera":
        return cls(gain=float(rng.uniform(0.6, 1.35)), contrast=float(rng.uniform(0.7, 1.25)),
                   gamma=float(rng.uniform(0.75, 1.35)), slope_x=float(rng.uniform(-0.35, 0.35)),
                   slope_y=float(rng.uniform(-0.35, 0.35)), vignette=float(rng.uniform(0, 0.4)),
                   shadows=int(rng.integers(0, 3)) if rng.random() < 0.4 else 0,
                   blur=int(rng.integers(0, max(2, n // 40))) if rng.random() < 0.6 else 0,
                   noise=float(rng.uniform(0, 8)), perspective=float(rng.uniform(0, 0.08)) if rng.random() < 0.6
                   else 0.0, colour=tuple(float(c) for c in rng.uniform(0.85, 1.15, 3)))

    def light(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Lighting, shadows, colour, contrast and gamma on a float RGB image (returns a new array)."""
        n_h, n_w = img.shape[:2]
        ys = (np.arange(n_h, dtype=np.float32) / n_h - 0.5)[:, None]
        xs = (np.arange(n_w, dtype=np.float32) / n_w - 0.5)[None, :]
        field = self.gain * (1.0 + self.slope_x * xs + self.slope_y * ys - self.vignette * (xs ** 2 + ys ** 2) * 2)
        for _ in range(self.shadows):  # soft shadows of things above the belt
            sh = np.zeros((n_h, n_w), np.float32)
            cx, cy = rng.uniform(0, n_w), rng.uniform(0, n_h)
            cv2.ellipse(sh, (int(cx), int(cy)), (int(rng.uniform(0.1, 0.5) * n_w), int(rng.uniform(0.05, 0.3) * n_h)),
                        float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
            sh = cv2.GaussianBlur(sh, (0, 0), rng.uniform(4, 20) * n_w / 256)
            field = field * (1.0 - rng.uniform(0.2, 0.55) * sh)
        out = img * field[..., None] * np.asarray(self.colour, np.float32)[None, None, :]
        mean = out.mean()
        out = (out - mean) * self.contrast + mean
        out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** self.gamma
        return out.astype(np.float32)

    def optics(self, img: np.ndarray, owner: np.ndarray, rng: np.random.Generator,
               noise_rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Perspective (image and owner map together), motion blur and noise. Truth follows the warp."""
        n_h, n_w = owner.shape
        if self.perspective > 0:
            src = np.float32([[0, 0], [n_w, 0], [n_w, n_h], [0, n_h]])
            dst = (src + rng.uniform(-self.perspective, self.perspective, (4, 2)) * [n_w, n_h]).astype(np.float32)
            hm = cv2.getPerspectiveTransform(src, dst)
            img = cv2.warpPerspective(img, hm, (n_w, n_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            owner = cv2.warpPerspective(owner.astype(np.float32), hm, (n_w, n_h), flags=cv2.INTER_NEAREST,
                                        borderMode=cv2.BORDER_CONSTANT, borderValue=-1).astype(np.int16)
        if self.blur > 1:
            kernel = np.full((1, self.blur), 1.0 / self.blur, np.float32)
            img = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REPLICATE)
        if self.noise > 0:
            r = noise_rng if noise_rng is not None else rng
            img = img + r.standard_normal(img.shape, dtype=np.float32) * np.float32(self.noise)
        return img, owner


def compress(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A real codec round trip: H.264 (PyAV, one intra frame at a random CRF), JPEG, or nothing."""
    r = rng.random()
    if r < 0.45:
        return h264_roundtrip(image, int(rng.integers(18, 40)))
    if r < 0.75:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 96))])
        return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return image


def yuv420_video_frame(image: np.ndarray, pts: int):
    """An RGB frame as a PyAV yuv420p VideoFrame, converted by OpenCV (limited-range BT.601), not swscale: its SIMD
    path depends on buffer alignment and made identical frames encode to different bytes."""
    import av

    h, w = image.shape[:2]
    yuv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2YUV_I420)
    vf = av.VideoFrame(w, h, "yuv420p")
    planes = (yuv[:h], yuv[h:h + h // 4].reshape(h // 2, w // 2), yuv[h + h // 4:].reshape(h // 2, w // 2))
    for plane, data in zip(vf.planes, planes):
        buf = np.zeros((plane.height, plane.line_size), np.uint8)
        buf[:, :data.shape[1]] = data
        plane.update(buf.tobytes())
    vf.pts = pts
    return vf


def h264_roundtrip(image: np.ndarray, crf: int) -> np.ndarray:
    """Encode one RGB frame with libx264 at ``crf`` (one thread: deterministic) and decode it back."""
    import av

    h, w = image.shape[:2]
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = w, h, "yuv420p"
    codec.time_base = Fraction(1, 15)
    codec.thread_count = 1
    codec.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
    vf = yuv420_video_frame(image, 0)
    packets = list(codec.encode(vf)) + list(codec.encode(None))
    dec = av.CodecContext.create("h264", "r")
    frames = []
    for p in packets:
        frames += dec.decode(p)
    frames += dec.decode(None)
    if not frames:
        return image
    return frames[0].to_ndarray(format="rgb24")


__all__ = ["Sprite", "garment_sprite", "distractor_sprite", "paste", "Camera", "compress", "h264_roundtrip",
           "MASK_THRESHOLD"]

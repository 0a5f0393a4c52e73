"""Input and video compression baselines: JPEG/WebP frames (OpenCV) and H.264/H.265 streams (PyAV, low latency)."""
from __future__ import annotations

import time
from fractions import Fraction

import av
import cv2
import numpy as np


def image_roundtrip(frames: np.ndarray, fmt: str, quality: int) -> tuple[np.ndarray, list[int], float, float]:
    """Each frame through JPEG or WebP at ``quality``: decoded frames, bytes per frame, encode and decode s/frame."""
    ext, flag = {"jpeg": (".jpg", cv2.IMWRITE_JPEG_QUALITY), "webp": (".webp", cv2.IMWRITE_WEBP_QUALITY)}[fmt]
    out, sizes, t_enc, t_dec = [], [], 0.0, 0.0
    for im in frames:
        bgr = cv2.cvtColor(im, cv2.COLOR_RGB2BGR)
        t0 = time.perf_counter()
        ok, buf = cv2.imencode(ext, bgr, [flag, int(quality)])
        t1 = time.perf_counter()
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {fmt} at quality {quality}")
        dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        t2 = time.perf_counter()
        out.append(cv2.cvtColor(dec, cv2.COLOR_BGR2RGB))
        sizes.append(int(buf.size))
        t_enc += t1 - t0
        t_dec += t2 - t1
    n = max(len(frames), 1)
    return np.stack(out), sizes, t_enc / n, t_dec / n


VIDEO_CODECS = {"h264": ("libx264", "h264"), "h265": ("libx265", "hevc")}


def video_available(kind: str) -> bool:
    enc, dec = VIDEO_CODECS[kind]
    return enc in av.codecs_available and dec in av.codecs_available


def video_roundtrip(frames: np.ndarray, kind: str, crf: int, fps: int = 25,
                    preset: str = "veryfast") -> tuple[np.ndarray, list[int], float, float]:
    """The frames as one low-latency stream (no B-frames, tune=zerolatency, CRF ``crf``), decoded back.

    Returns decoded frames, bytes per frame (the packets each frame produced; the first carries the key frame and
    parameter sets), encode and decode seconds per frame.
    """
    enc_name, dec_name = VIDEO_CODECS[kind]
    n, h, w = frames.shape[:3]
    enc = av.CodecContext.create(enc_name, "w")
    enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
    enc.time_base = Fraction(1, fps)
    enc.framerate = Fraction(fps, 1)
    enc.gop_size = 2 * fps  # a key frame every 2 s, as a live camera stream would
    opts = {"crf": str(crf), "preset": preset, "tune": "zerolatency", "bf": "0"}
    if kind == "h265":
        opts = {"crf": str(crf), "preset": preset, "tune": "zerolatency", "x265-params": "bframes=0:log-level=error"}
    enc.options = opts
    packets: list[tuple[int, bytes]] = []
    t0 = time.perf_counter()
    for i, im in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(im), format="rgb24").reformat(format="yuv420p")
        vf.pts = i
        for p in enc.encode(vf):
            packets.append((i, bytes(p)))
    for p in enc.encode(None):
        packets.append((n - 1, bytes(p)))
    t_enc = (time.perf_counter() - t0) / max(n, 1)
    sizes = [0] * n
    for i, data in packets:
        sizes[i] += len(data)
    dec = av.CodecContext.create(dec_name, "r")
    out = []
    t0 = time.perf_counter()
    for _, data in packets:
        for f in dec.decode(av.Packet(data)):
            out.append(f.to_ndarray(format="rgb24"))
    for f in dec.decode(None):
        out.append(f.to_ndarray(format="rgb24"))
    t_dec = (time.perf_counter() - t0) / max(n, 1)
    if len(out) != n:
        raise RuntimeError(f"{kind} crf {crf}: decoded {len(out)} frames from {n}")
    return np.stack(out), sizes, t_enc, t_dec

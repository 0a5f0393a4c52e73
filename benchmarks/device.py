"""Device and server cost: parameters, MACs, time per frame (batch 1, warm, median), peak resident memory."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import media

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def probe(kind: str, checkpoint: str, frames: int, n_threads: int = 1) -> dict:
    """Run :mod:`benchmarks.probe` in a fresh process (its own peak RSS)."""
    cmd = [sys.executable, "-m", "benchmarks.probe", kind, str(checkpoint), "--frames", str(frames),
           "--threads", str(n_threads)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def device_cost(codec, frames: np.ndarray, cfg: dict, checkpoint: str, jpeg_q: int, video_crf: int) -> dict:
    """Encoder vs three local models vs JPEG/H.264 encoding, on one frame at a time."""
    reps = cfg["timing_repeats"]
    frame = frames[:1]
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(0, 3, 1, 2).float().div(255)
    t = codec.model.teachers
    out = {**codec.encoder_stats(),
           "teacher_params_three_models": int(sum(sum(p.numel() for p in m.parameters())
                                                  for m in (t.detect, t.semantic, t.classify))),
           "teacher_params_shared": int(sum(p.numel() for p in t.parameters()))}
    try:
        from codec.student import count_macs
        out["three_models_macs"] = int(sum(count_macs(m, (1, 3, codec.input_size, codec.input_size))
                                           for m in (t.detect, t.semantic, t.classify)))
    except Exception as exc:  # noqa: BLE001 - MAC counting of Ultralytics graphs is best effort
        log.warning("could not count the teachers' MACs: %s", exc)
    with torch.no_grad():
        for label, n in (("1thread", 1), ("default", None)):
            with threads(n):
                out[f"encoder_tensor_s_{label}"] = median_time(lambda: codec.encoder(x), reps)
                out[f"encode_s_{label}"] = median_time(lambda: codec.encode(frame), reps)
                out[f"three_models_s_{label}"] = median_time(
                    lambda: [m(x) for m in (t.detect, t.semantic, t.classify)], reps)
                out[f"shared_multitask_s_{label}"] = median_time(lambda: codec.teachers_on_frames(frame), reps)
                enc = codec.encode(frame)
                out[f"server_split_s_{label}"] = median_time(lambda: codec.heads(codec.decode(enc)), reps)
        out["torch_threads_default"] = torch.get_num_threads()
    out["jpeg_quality"] = jpeg_q
    _, _, out["jpeg_encode_s"], out["jpeg_decode_s"] = media.image_roundtrip(frames[:min(len(frames), 32)],
                                                                            "jpeg", jpeg_q)
    out["h264_crf"] = video_crf
    _, _, out["h264_encode_s"], out["h264_decode_s"] = media.video_roundtrip(frames, "h264", video_crf)
    if cfg["probes"]:
        out["edge_process"] = probe("edge", checkpoint, max(5, reps))
        out["local_process"] = probe("local", checkpoint, max(5, reps))
        from codec.edge_onnx import edge_paths

        onnx_path = edge_paths(checkpoint)[0]
        if onnx_path.is_file():
            out["edge_onnx_process"] = probe("edge-onnx", str(onnx_path), max(5, reps))
        else:
            log.warning("no ONNX edge export beside %s (python -m codec.edge_onnx --checkpoint %s)", checkpoint,
                        checkpoint)
    out["encoder_speedup_vs_local_1thread"] = out["three_models_s_1thread"] / out["encode_s_1thread"]
    log.info("device cost: %s", {k: v for k, v in out.items() if not isinstance(v, dict)})
    return out

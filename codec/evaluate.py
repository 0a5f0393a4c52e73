"""Evaluation on a freshly generated conveyor-line video: teachers on raw frames against the split model.

The line uses Fashion-MNIST's *test* garments and a seed the training never saw; the video goes through H.264
like a real recording and is decoded back with PyAV, and the truth comes from its sidecar.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Iterable

import av
import cv2
import numpy as np
from tqdm import tqdm

from codec.api import SplitCodec
from codec.metrics import TaskMetrics
from codec.teachers import TASKS


def make_eval_video(out_dir: Path, frames: int, seed: int, size: int) -> Path:
    """Write a fresh conveyor-line video with its ground-truth sidecar; returns the video path."""
    from conveyor.export import write_video
    from conveyor.line import ConveyorLine, LineConfig

    cfg = LineConfig(size=size, seed=seed, fashion_split="test")
    path = out_dir / f"eval_seed{seed}.mp4"
    write_video(ConveyorLine(cfg).frames(frames), path, cfg.fps)
    return path


def read_video(path: Path) -> Iterable[np.ndarray]:
    """Decoded RGB frames of a video file (PyAV)."""
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def _add(metrics: TaskMetrics, result: dict, truth) -> None:
    metrics.add_detection(result["detection"], truth.boxes, truth.classes)
    metrics.add_segmentation(result["segmentation"], truth.semantic)
    metrics.add_classification(result["classification"]["label"], truth.label)


def evaluate(codec: SplitCodec, frames: int = 200, seed: int = 12345, batch: int = 8,
             video: Path | None = None, progress: bool = True) -> dict:
    """Teacher and student metrics, payload sizes and encoder cost, as one flat dict (the --json object)."""
    from conveyor.groundtruth import load_ground_truth

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = video or make_eval_video(Path(tmp), frames, seed, codec.input_size)
        truth = load_ground_truth(path)
        images = np.stack(list(read_video(path)))
    if images.shape[1:3] != (codec.input_size, codec.input_size):
        images = np.stack([cv2.resize(im, (codec.input_size, codec.input_size)) for im in images])
    n_det = len(codec.class_names["detection"])
    n_sem = len(codec.class_names["segmentation"])
    teacher_m, student_m = TaskMetrics(n_det, n_sem), TaskMetrics(n_det, n_sem)
    sizes, estimates, jpeg = [], [], []
    for start in tqdm(range(0, len(images), batch), desc="eval", unit="batch", disable=not progress):
        chunk = images[start:start + batch]
        encoded = codec.encode(chunk)
        sizes += [len(e.payload) for e in encoded]
        estimates += codec.estimate_bytes(chunk)
        jpeg += [len(cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR),
                                  [cv2.IMWRITE_JPEG_QUALITY, 90])[1]) for im in chunk]
        student = codec.heads(codec.decode(encoded), conf=0.001)
        teacher = codec.teachers_on_frames(chunk, conf=0.001)
        for i, (s, t) in enumerate(zip(student, teacher)):
            gt = truth[start + i]
            _add(student_m, s, gt)
            _add(teacher_m, t, gt)
    sizes_a, est_a = np.asarray(sizes, dtype=np.float64), np.asarray(estimates)
    stats = codec.encoder_stats()
    result = {
        "frames": int(len(images)), "seed": seed, "input_size": codec.input_size,
        "fingerprint": codec.fingerprint.hex(),
        "teacher": teacher_m.summary(), "student": student_m.summary(),
        "payload_bytes_mean": float(sizes_a.mean()), "payload_bytes_p95": float(np.percentile(sizes_a, 95)),
        "estimate_bytes_mean": float(est_a.mean()),
        "payload_vs_estimate": float(sizes_a.sum() / max(est_a.sum(), 1e-9)),
        "jpeg90_bytes_mean": float(np.mean(jpeg)),
        "jpeg90_over_payload": float(np.mean(jpeg) / max(sizes_a.mean(), 1e-9)),
        **stats,
        "seconds": time.perf_counter() - t0,
    }
    return result


def format_table(result: dict) -> str:
    """Human-readable summary of :func:`evaluate`'s dict."""
    t, s = result["teacher"], result["student"]
    rows = [f"eval: {result['frames']} frames, seed {result['seed']}, {result['input_size']} px, "
            f"model {result['fingerprint']}",
            f"{'':24}{'teachers (raw)':>16}{'split model':>14}",
            f"{'box mAP50-95':24}{t.get('box_map50_95', 0):16.1f}{s.get('box_map50_95', 0):14.1f}",
            f"{'mIoU':24}{t.get('miou', 0):16.1f}{s.get('miou', 0):14.1f}",
            f"{'top-1':24}{t.get('top1', 0):16.1f}{s.get('top1', 0):14.1f}",
            f"payload bytes/frame: mean {result['payload_bytes_mean']:.0f}, p95 {result['payload_bytes_p95']:.0f}, "
            f"estimate {result['estimate_bytes_mean']:.0f} (real/estimate {result['payload_vs_estimate']:.4f})",
            f"JPEG q90 bytes/frame: {result['jpeg90_bytes_mean']:.0f} ({result['jpeg90_over_payload']:.1f}x the "
            f"payload)",
            f"encoder: {result['encoder_params']} parameters (+{result['entropy_model_params']} entropy model), "
            f"{result['encoder_macs'] / 1e6:.1f} M MACs/frame"]
    return "\n".join(rows)


__all__ = ["evaluate", "format_table", "make_eval_video", "read_video", "TASKS"]

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


def training_belt_seed(codec: SplitCodec) -> int | None:
    """The seed of the line the model was trained on (its belt), from the checkpoint's recorded config."""
    data = (getattr(codec, "metadata", {}) or {}).get("config", {}).get("data", {})
    return data.get("seed")


def make_eval_video(out_dir: Path, frames: int, seed: int, size: int, belt_seed: int | None = None) -> Path:
    """Write a fresh conveyor-line video with its ground-truth sidecar; returns the video path.

    ``seed`` draws the items, their order and the lighting; ``belt_seed`` (when given) the belt's look, so the
    video can be new footage of the belt a model was trained on. Garments come from Fashion-MNIST's test split.
    """
    from conveyor.export import write_video
    from conveyor.line import ConveyorLine, LineConfig

    cfg = LineConfig(size=size, seed=seed, fashion_split="test", belt_seed=belt_seed)
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
             video: Path | None = None, progress: bool = True, belt: str = "trained") -> dict:
    """Teacher and student metrics, payload sizes and encoder cost, as one flat dict (the --json object).

    ``belt``: 'trained' (default) renders the new items on the belt the model was trained on (a fresh recording
    from the same camera); 'own' gives the line its own belt (``seed``'s), a test of generalisation to a
    belt never seen in training.
    """
    from conveyor.groundtruth import load_ground_truth

    if belt not in ("trained", "own"):
        raise ValueError(f"belt {belt!r} must be 'trained' or 'own'")
    belt_seed = training_belt_seed(codec) if belt == "trained" else None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = video or make_eval_video(Path(tmp), frames, seed, codec.input_size, belt_seed)
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
        encoded, estimate = codec.encode_with_estimate(chunk)
        sizes += [len(e.payload) for e in encoded]
        estimates += estimate
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
        "frames": int(len(images)), "seed": seed, "belt_seed": belt_seed, "input_size": codec.input_size,
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
    belt = "its own belt" if result.get("belt_seed") is None else f"the training belt (seed {result['belt_seed']})"
    rows = [f"eval: {result['frames']} frames, seed {result['seed']} on {belt}, unseen garments, "
            f"{result['input_size']} px, model {result['fingerprint']}",
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

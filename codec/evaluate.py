"""The evaluation protocol, fixed in code: teachers on raw frames against the split model on real bitstreams.

Suites (rendered fresh each time, through H.264 like a real recording, decoded with PyAV):

- ``heldout`` (the default headline): conveyor lines whose belts come from the **held-out belt families**
  (``conveyor.belts.HELDOUT_FAMILIES``: never in any training frame) carrying **Fashion-MNIST test-split
  garments** (never seen in training), with the randomised look (camera, lighting, distractors). The frames are
  split over several lines (seeds ``seed``, ``seed + 1``, ...), line k on family k of the suite's belt families in
  turn, so every family counts alike (:func:`suite_lines`: held-out 3 families x 2 lines, training 9 x 1), and
  each line keeps every ``FRAME_STRIDE``-th frame of its video (the H.264 stream itself has every frame): an item
  crosses the frame in about 30 frames, so consecutive frames would score the same few garments over and over
  (300 consecutive frames on 3 lines hold about 35 garments, 3-4 per class).
- ``train``: the same, with belts from the training families (new belts of a kind seen in training): the
  training distribution, for comparison.

``evaluate_footage`` scores any footage with ground truth in the format ``data`` writes (a video and its
``.gt.jsonl`` sidecar), letterboxing frames to the model input as the pipeline does and mapping the truth
into that frame.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import av
import cv2
import numpy as np
from tqdm import tqdm

from codec.api import SplitCodec
from codec.metrics import TaskMetrics
from codec.tasks import TASKS

SUITES = {"heldout": "heldout", "train": "train"}  # suite name -> belt set of conveyor.belts
LINES_PER_SUITE = 6  # at least; rounded up to a whole number of lines per belt family
FRAME_STRIDE = 5  # scored frames are this many video frames apart: 300 frames hold about 5x the garments


def make_eval_video(out_dir: Path, frames: int, seed: int, size: int, belts: str = "heldout") -> Path:
    """Write one fresh conveyor-line video (unseen garments, a belt from ``belts``) with its ground-truth
    sidecar; returns the video path."""
    from conveyor.export import write_video
    from conveyor.line import ConveyorLine, LineConfig

    cfg = LineConfig(size=size, seed=seed, fashion_split="test", belts=belts)
    path = out_dir / f"eval_{belts}_seed{seed}.mp4"
    write_video(ConveyorLine(cfg).frames(frames), path, cfg.fps)
    return path


def read_video(path: Path) -> Iterable[np.ndarray]:
    """Decoded RGB frames of a video file (PyAV)."""
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def letterboxed(images: Sequence[np.ndarray], truth: list, size: int) -> tuple[np.ndarray, list]:
    """Frames letterboxed to the model input (Ultralytics' LetterBox, as the edge does) and the truth mapped into
    that frame: boxes scaled and shifted, the class map resized (nearest) with the padding ignored (255)."""
    from ultralytics.data.augment import LetterBox

    from conveyor.groundtruth import FrameTruth

    out_images, out_truth = [], []
    for im, gt in zip(images, truth):
        h, w = im.shape[:2]
        if (h, w) == (size, size):
            out_images.append(im)
            out_truth.append(gt)
            continue
        lb = LetterBox(new_shape=(size, size), auto=False, scaleup=True, center=True)
        p = lb.get_params({"img": im})
        r, left, top = float(p["ratio"][0]), int(p["left"]), int(p["top"])
        uw, uh = int(p["new_unpad"][0]), int(p["new_unpad"][1])
        out_images.append(lb(image=im))
        boxes = gt.boxes * r + np.array([left, top, left, top], np.float32)
        sem = np.full((size, size), 255, np.uint8)
        sem[top:top + uh, left:left + uw] = cv2.resize(gt.semantic, (uw, uh), interpolation=cv2.INTER_NEAREST)
        out_truth.append(FrameTruth(gt.index, boxes.astype(np.float32), gt.classes, sem, gt.label))
    return np.stack(out_images), out_truth


def load_footage(video: Path, gt: Path | None, size: int) -> tuple[np.ndarray, list]:
    """A video and its truth (``gt`` or the sidecar beside the video), letterboxed to ``size``."""
    from conveyor.groundtruth import load_ground_truth

    truth = load_ground_truth(gt or video)
    images = list(read_video(video))
    if len(images) != len(truth):
        raise ValueError(f"{video} has {len(images)} frames but its truth {gt or 'sidecar'} has {len(truth)}; "
                         f"they must describe the same frames")
    return letterboxed(images, truth, size)


def score(codec: SplitCodec, images: np.ndarray, truth: list, batch: int = 8, progress: bool = True,
          desc: str = "eval", groups: Sequence[str] | None = None) -> dict:
    """Teacher and student metrics, payload sizes against the estimate and JPEG q90, on given frames; with
    ``groups`` (one name per frame, e.g. its belt family) also the metrics of each group (``by_group``)."""
    n_det = len(codec.class_names["detection"])
    n_sem = len(codec.class_names["segmentation"])
    teacher_m, student_m = TaskMetrics(n_det, n_sem), TaskMetrics(n_det, n_sem)
    if groups is not None and len(groups) != len(images):
        raise ValueError(f"groups names {len(groups)} frames, the footage has {len(images)}")
    per_group = {g: (TaskMetrics(n_det, n_sem), TaskMetrics(n_det, n_sem)) for g in dict.fromkeys(groups or ())}
    sizes, estimates, jpeg = [], [], []
    for start in tqdm(range(0, len(images), batch), desc=desc, unit="batch", disable=not progress):
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
            student_m.add_frame(s, gt)
            teacher_m.add_frame(t, gt)
            if groups is not None:
                group_t, group_s = per_group[groups[start + i]]
                group_t.add_frame(t, gt)
                group_s.add_frame(s, gt)
    sizes_a, est_a = np.asarray(sizes, dtype=np.float64), np.asarray(estimates)
    out = {
        "frames": int(len(images)),
        "teacher": teacher_m.summary(), "student": student_m.summary(),
        "payload_bytes_mean": float(sizes_a.mean()), "payload_bytes_p95": float(np.percentile(sizes_a, 95)),
        "estimate_bytes_mean": float(est_a.mean()),
        "payload_vs_estimate": float(sizes_a.sum() / max(est_a.sum(), 1e-9)),
        "jpeg90_bytes_mean": float(np.mean(jpeg)),
        "jpeg90_over_payload": float(np.mean(jpeg) / max(sizes_a.mean(), 1e-9)),
    }
    if groups is not None:
        out["by_group"] = {g: {"frames": groups.count(g), "teacher": t.summary(), "student": st.summary()}
                           for g, (t, st) in per_group.items()}
    return out


def suite_families(suite: str) -> tuple[str, ...]:
    """The belt families a suite's lines are drawn from, in the order lines take them."""
    from conveyor.belts import BELT_SETS

    if suite not in SUITES:
        raise ValueError(f"suite {suite!r} must be one of {', '.join(SUITES)}")
    return tuple(BELT_SETS[SUITES[suite]])


def suite_lines(suite: str) -> int:
    """The protocol's number of lines for a suite: LINES_PER_SUITE rounded up to whole rounds of its families."""
    n = len(suite_families(suite))
    return -(-LINES_PER_SUITE // n) * n


def _frames_per_line(frames: int, lines: int) -> list[int]:
    lines = max(1, min(lines, frames))
    return [frames // lines + (1 if k < frames % lines else 0) for k in range(lines)]


def frame_families(suite: str, frames: int, lines: int | None = None) -> list[str]:
    """The belt family of each frame :func:`suite_footage` returns for the same arguments."""
    families = suite_families(suite)
    per = _frames_per_line(frames, suite_lines(suite) if lines is None else lines)
    return [families[k % len(families)] for k, n in enumerate(per) for _ in range(n)]


def suite_footage(suite: str, frames: int, seed: int, size: int, lines: int | None = None,
                  stride: int = FRAME_STRIDE) -> tuple[np.ndarray, list]:
    """The frames and truth of one suite: ``frames`` split over ``lines`` fresh lines (default
    :func:`suite_lines`; seeds seed, seed+1..., line k on the suite's family k in turn), every ``stride``-th
    frame of each line's video. :func:`frame_families` names each frame's belt family."""
    from conveyor.groundtruth import load_ground_truth

    families = suite_families(suite)
    lines = suite_lines(suite) if lines is None else lines
    if stride < 1:
        raise ValueError(f"stride {stride!r} must be >= 1")
    per = _frames_per_line(frames, lines)
    images, truth = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k, n in enumerate(per):
            path = make_eval_video(Path(tmp), (n - 1) * stride + 1, seed + k, size, families[k % len(families)])
            truth += load_ground_truth(path)[::stride]
            images += list(read_video(path))[::stride]
    return np.stack(images), truth


def evaluate(codec: SplitCodec, frames: int = 300, seed: int = 12345, batch: int = 8,
             suites: Sequence[str] = ("heldout", "train"), progress: bool = True) -> dict:
    """The protocol: each suite scored, plus the encoder's cost; the first suite's figures are repeated at the
    top level (``teacher``, ``student``, bytes), as the headline."""
    t0 = time.perf_counter()
    result: dict = {"seed": seed, "input_size": codec.input_size, "fingerprint": codec.fingerprint.hex(),
                    "lines_per_suite": {name: suite_lines(name) for name in suites}, "frame_stride": FRAME_STRIDE,
                    "suites": {}}
    for name in suites:
        images, truth = suite_footage(name, frames, seed, codec.input_size)
        result["suites"][name] = score(codec, images, truth, batch, progress, desc=f"eval {name}",
                                       groups=frame_families(name, frames))
    result.update(result["suites"][suites[0]])
    result["suite"] = suites[0]
    result.update(codec.encoder_stats())
    result["seconds"] = time.perf_counter() - t0
    return result


def evaluate_footage(codec: SplitCodec, video: Path, gt: Path | None = None, batch: int = 8,
                     progress: bool = True) -> dict:
    """Score a user's labelled footage (a video and its ``.gt.jsonl`` truth in the format ``data`` writes)."""
    t0 = time.perf_counter()
    images, truth = load_footage(video, gt, codec.input_size)
    result = {"video": str(video), "input_size": codec.input_size, "fingerprint": codec.fingerprint.hex(),
              "suite": "footage", **score(codec, images, truth, batch, progress)}
    result["suites"] = {"footage": {k: v for k, v in result.items() if k not in ("video", "suite")}}
    result.update(codec.encoder_stats())
    result["seconds"] = time.perf_counter() - t0
    return result


def _rows(name: str, r: dict) -> list[str]:
    t, s = r["teacher"], r["student"]
    rows = [f"[{name}] {r['frames']} frames",
            f"{'':26}{'teachers (raw)':>16}{'split model':>14}"]
    for key, label in (("items_ap50", "items found (AP50, any)"), ("box_map50_95", "box mAP50-95"),
                       ("box_map50", "box mAP50"), ("miou", "mIoU"), ("fg_iou", "foreground IoU"),
                       ("top1", "top-1 (station)"), ("majority_top1", "top-1 of the majority class")):
        rows.append(f"{label:26}{t.get(key, 0):16.1f}{s.get(key, 0):14.1f}")
    rows.append(f"payload bytes/frame: mean {r['payload_bytes_mean']:.0f}, p95 {r['payload_bytes_p95']:.0f}, "
                f"estimate {r['estimate_bytes_mean']:.0f} (real/estimate {r['payload_vs_estimate']:.4f}); "
                f"JPEG q90 {r['jpeg90_bytes_mean']:.0f} ({r['jpeg90_over_payload']:.1f}x the payload)")
    if r.get("by_group"):
        rows.append("per belt family, teachers / split model: items AP50, box mAP50-95, mIoU, top-1")
        for g, m in r["by_group"].items():
            rows.append(f"  {g:18} {m['frames']:4d} frames  " + "   ".join(
                f"{m['teacher'].get(k, 0):5.1f} / {m['student'].get(k, 0):5.1f}"
                for k in ("items_ap50", "box_map50_95", "miou", "top1")))
    return rows


def format_table(result: dict) -> str:
    """Human-readable summary of :func:`evaluate`'s (or :func:`evaluate_footage`'s) dict."""
    head = (f"eval: {result.get('video') or 'fresh conveyor lines, unseen garments'}, {result['input_size']} px, "
            f"model {result['fingerprint']}")
    rows = [head]
    for name, r in result["suites"].items():
        label = {"heldout": "held-out belt families", "train": "training belt families"}.get(name, name)
        rows += _rows(label, r)
    rows.append(f"encoder: {result['encoder_params']} parameters (+{result['entropy_model_params']} entropy model), "
                f"{result['encoder_macs'] / 1e6:.1f} M MACs/frame")
    return "\n".join(rows)


__all__ = ["evaluate", "evaluate_footage", "score", "format_table", "make_eval_video", "read_video",
           "suite_footage", "suite_families", "suite_lines", "frame_families", "letterboxed", "SUITES", "TASKS"]

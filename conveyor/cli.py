"""`run_pipeline.py data`: render a conveyor line to an H.264 video + ground-truth sidecar and Ultralytics datasets.

Output (``--out DIR``, default ``out/line``)::

    DIR/line.mp4  DIR/line.gt.jsonl  DIR/detect/  DIR/semantic/  DIR/classify/

Everything is written into a temporary folder beside ``DIR`` and renamed into place at the end, so a failed or
interrupted run leaves no half-written output and an existing ``DIR`` is replaced only by a complete one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from core.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from conveyor.line import BELT_CHOICES

    parser.add_argument("--out", default="out/line", help="output folder (default: out/line; replaced atomically)")
    parser.add_argument("--frames", default="300", help="number of frames (default: 300)")
    parser.add_argument("--seed", default="0", help="line seed: same seed, identical output (default: 0)")
    parser.add_argument("--size", default="256", help="frame side in pixels, even, >= 64 (default: 256)")
    parser.add_argument("--fps", default="15", help="frames per second of the video and the belt (default: 15)")
    parser.add_argument("--items", default="auto",
                        help="auto (Fashion-MNIST if installed, else drawn parts), fashion or drawn (default: auto)")
    parser.add_argument("--belts", default=None,
                        help=f"belt family or set the seed draws its belt from: {', '.join(BELT_CHOICES)} "
                             "(default: 'all' for a video line, 'train' for --scenes)")
    parser.add_argument("--look", default="wide", choices=["wide", "plain"],
                        help="'wide': randomised garments, distractors and camera per line (default); 'plain': the "
                             "original uniform look")
    parser.add_argument("--scenes", action="store_true",
                        help="training data: independent frames (fresh belt, items and camera each; "
                             "conveyor.scene) into the Ultralytics datasets; implies --dataset-only")
    parser.add_argument("--fashion-split", default="train", choices=["train", "test"],
                        help="Fashion-MNIST split the garments come from: 'test' for unseen garments (default: train)")
    parser.add_argument("--val-fraction", default="0.2", help="share of frames in the val split (default: 0.2)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--video-only", action="store_true", help="write only the video and its sidecar")
    only.add_argument("--dataset-only", action="store_true", help="write only the Ultralytics datasets")


def _number(value: str, option: str, kind, lo, hi, example: str):
    try:
        x = kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{option} {value!r} is not a{'n integer' if kind is int else ' number'}; "
                         f"use e.g. {option} {example}") from None
    if not lo <= x <= hi:
        raise UsageError(f"{option} {value!r} is out of range {lo}..{hi}; use e.g. {option} {example}")
    return x


def _prepare_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file, not a folder; pick another path, e.g. --out out/line")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the parent folder {parent} ({exc.strerror or exc}); "
                         f"pick a writable path, e.g. --out out/line") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: folder {parent} is not writable; pick a writable path, e.g. --out out/line")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write in {parent} ({exc.strerror or exc}); "
                         f"pick a writable path, e.g. --out out/line") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output folder gets the usual permissions
    return tmp


def _replace(tmp: Path, out: Path) -> None:
    out = out.resolve()
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "x")
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from conveyor.classes import FRAME_LABELS, ITEM_NAMES
    from conveyor.export import DatasetWriter, VideoWriter
    from conveyor.line import ConveyorLine, LineConfig

    n = _number(args.frames, "--frames", int, 1, 10_000_000, "300")
    seed = _number(args.seed, "--seed", int, 0, 2**63 - 1, "1")
    size = _number(args.size, "--size", int, 64, 4096, "256")
    fps = _number(args.fps, "--fps", int, 1, 240, "15")
    vf = _number(args.val_fraction, "--val-fraction", float, 0.0, 0.9, "0.2")
    if size % 2:
        raise UsageError(f"--size {size} must be even (H.264 yuv420p); use e.g. --size 256")
    if args.scenes:
        if args.video_only:
            raise UsageError("--scenes makes independent frames for training, not a video; drop --video-only")
        from conveyor.scene import SceneConfig, SceneGenerator

        cfg = SceneConfig(size=size, seed=seed, items=args.items, belts=args.belts or "train",
                          fashion_split=args.fashion_split)
        line = SceneGenerator(cfg)
        args.dataset_only = True
    else:
        cfg = LineConfig(size=size, fps=fps, seed=seed, items=args.items, belts=args.belts or "all", look=args.look,
                         fashion_split=args.fashion_split)
        line = ConveyorLine(cfg)  # validates the config before anything is written
    out = Path(args.out)
    tmp = _prepare_out(out)
    final = out.resolve()
    t0 = time.perf_counter()
    labels: Counter = Counter()
    objects: Counter = Counter()
    video = datasets = None
    try:
        if not args.dataset_only:
            video = VideoWriter(tmp / "line.mp4", fps, size, size)
        if not args.video_only:
            datasets = DatasetWriter(tmp, n, vf, final_root=final)
        for frame in tqdm(line.frames(n), total=n, unit="frame", file=sys.stderr, mininterval=0.5,
                          desc="conveyor line"):
            labels[frame.label] += 1
            objects.update(frame.classes.tolist())
            if video is not None:
                video.write(frame)
            if datasets is not None:
                datasets.write(frame)
        if video is not None:
            video.close()
        _replace(tmp, out)
    except BaseException:
        if video is not None:
            try:
                video.close()
            except Exception:  # noqa: BLE001 - cleanup only
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dt = time.perf_counter() - t0
    kind = "scenes" if args.scenes else f"conveyor line @ {fps} fps, belt {line.belt_family}"
    print(f"{kind}: {n} frames {size}x{size}, seed {seed}, items {line.items.source}, belts {cfg.belts} -> {final}")
    if video is not None:
        print(f"  video     {final / 'line.mp4'} (H.264) + ground truth {final / 'line.gt.jsonl'}")
    if datasets is not None:
        c = datasets.counts
        print(f"  datasets  {final / 'detect'}, {final / 'semantic'}, {final / 'classify'} "
              f"(train {c['train']} / val {c['val']} frames)")
    print("  frame labels: " + ", ".join(f"{FRAME_LABELS[k]} {labels[k]}" for k in range(len(FRAME_LABELS))))
    print("  objects:      " + ", ".join(f"{ITEM_NAMES[k]} {objects[k]}" for k in range(len(ITEM_NAMES)))
          + f" (total {sum(objects.values())})")
    print(f"  time {dt:.1f} s, {n / dt:.1f} frames/s")
    return 0

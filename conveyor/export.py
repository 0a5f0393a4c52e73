"""Writers for a conveyor line: an H.264 video with its ground-truth sidecar, and Ultralytics datasets.

Layouts written by :func:`export_datasets` (``IMG`` = ``{index:06d}.png``)::

    detect/    data.yaml  images/{train,val}/IMG  labels/{train,val}/*.txt   (class cx cy w h, normalized)
    semantic/  data.yaml  images/{train,val}/IMG  masks/{train,val}/IMG      (uint8 class map, SEMANTIC_NAMES)
    classify/             {train,val}/{NN_label}/IMG                       (00_empty, 01_tshirt, ... FRAME_LABELS)

Train/val split: frames are cut into blocks of up to 100 consecutive frames; the last ``val_fraction`` of each
block goes to val (whole stretches, so val frames are not near-copies of their train neighbours). Every output
is a deterministic function of the frames (PNG, x264 with one thread), so one seed gives identical bytes.
"""
from __future__ import annotations

import os
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import cv2

from conveyor.classes import FRAME_LABELS, ITEM_NAMES, SEMANTIC_NAMES
from conveyor.groundtruth import record_line, sidecar_path
from conveyor.render import yuv420_video_frame

X264_OPTIONS = {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}  # mbtree reads
# uninitialised padding at some frame sizes (e.g. 96, 160 px) and made identical input encode differently


class VideoWriter:
    """H.264 MP4 (libx264, yuv420p, one thread: byte-identical for identical frames) + ``.gt.jsonl`` sidecar."""

    def __init__(self, path: str | Path, fps: int, width: int, height: int) -> None:
        import av

        self.path = Path(path)
        self.count = 0
        self._container = av.open(str(self.path), mode="w", format="mp4")
        st = self._container.add_stream("libx264", rate=Fraction(int(fps), 1), options=dict(X264_OPTIONS))
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.codec_context.thread_count = 1
        st.codec_context.time_base = Fraction(1, int(fps))
        self._stream = st
        self._av = av
        self._side = open(sidecar_path(self.path), "w", encoding="utf-8", newline="\n")

    def write(self, frame) -> None:
        vf = yuv420_video_frame(frame.image, self.count)
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self._side.write(record_line(frame))
        self.count += 1

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._side.close()
        self._container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(frames: Iterable, path: str | Path, fps: int) -> int:
    """Encode ``frames`` (LineFrame objects) to ``path`` and write the sidecar beside it; returns the frame count."""
    writer = None
    try:
        for f in frames:
            if writer is None:
                h, w = f.image.shape[:2]
                writer = VideoWriter(path, fps, w, h)
            writer.write(f)
    finally:
        if writer is not None:
            writer.close()
    return 0 if writer is None else writer.count


def is_val(index: int, n_frames: int, val_fraction: float) -> bool:
    """The split rule (see module docstring). At least one val and one train frame once ``n_frames >= 2``."""
    if val_fraction <= 0 or n_frames < 2:
        return False
    block = min(100, n_frames)
    start = index - index % block
    length = min(block, n_frames - start)
    n_val = min(length - 1, max(1, int(round(length * val_fraction)))) if length >= 2 else 0
    return index % block >= length - n_val


def classify_folder(label: int) -> str:
    return f"{label:02d}_{FRAME_LABELS[label]}"


def _yaml(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _names_yaml(names: list[str]) -> list[str]:
    return ["names:"] + [f"  {i}: {n}" for i, n in enumerate(names)]


class DatasetWriter:
    """Writes detect/, semantic/ and classify/ under ``root``. ``final_root`` is the path written into data.yaml
    (the folder the datasets will live in after an atomic rename; defaults to ``root``)."""

    def __init__(self, root: str | Path, n_frames: int, val_fraction: float = 0.2,
                 final_root: str | Path | None = None) -> None:
        self.root = Path(root)
        self.final_root = Path(final_root or root).resolve()
        self.n_frames, self.val_fraction = int(n_frames), float(val_fraction)
        self.counts = {"train": 0, "val": 0}
        for split in ("train", "val"):
            for sub in ("detect/images", "detect/labels", "semantic/images", "semantic/masks"):
                (self.root / sub / split).mkdir(parents=True, exist_ok=True)
            for label in range(len(FRAME_LABELS)):  # every class folder, even if empty (ImageFolder allow_empty)
                (self.root / "classify" / split / classify_folder(label)).mkdir(parents=True, exist_ok=True)
        self._write_yaml()

    def _write_yaml(self) -> None:
        det, sem = self.final_root / "detect", self.final_root / "semantic"
        _yaml(self.root / "detect" / "data.yaml", [f"path: {det}", "train: images/train", "val: images/val",
                                                   f"nc: {len(ITEM_NAMES)}"] + _names_yaml(ITEM_NAMES))
        _yaml(self.root / "semantic" / "data.yaml", [f"path: {sem}", "train: images/train", "val: images/val",
                                                     "masks_dir: masks", f"nc: {len(SEMANTIC_NAMES)}"]
              + _names_yaml(SEMANTIC_NAMES))

    def write(self, frame) -> str:
        split = "val" if is_val(frame.index, self.n_frames, self.val_fraction) else "train"
        name = f"{frame.index:06d}.png"
        img = self.root / "detect" / "images" / split / name
        if not cv2.imwrite(str(img), cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"could not write {img}")
        for other in (self.root / "semantic" / "images" / split / name,
                      self.root / "classify" / split / classify_folder(frame.label) / name):
            try:
                os.link(img, other)
            except OSError:
                shutil.copyfile(img, other)
        h, w = frame.semantic.shape
        lines = []
        for (x1, y1, x2, y2), c in zip(frame.boxes.tolist(), frame.classes.tolist()):
            lines.append(f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
        (self.root / "detect" / "labels" / split / f"{frame.index:06d}.txt").write_text(
            "".join(line + "\n" for line in lines), encoding="utf-8")
        cv2.imwrite(str(self.root / "semantic" / "masks" / split / name), frame.semantic,
                    [cv2.IMWRITE_PNG_COMPRESSION, 1])
        self.counts[split] += 1
        return split


def export_datasets(frames: Iterable, out_dir: str | Path, n_frames: int, val_fraction: float = 0.2,
                    final_root: str | Path | None = None) -> dict[str, int]:
    """Write the three Ultralytics datasets for ``frames`` (``n_frames`` of them) under ``out_dir``;
    returns ``{"train": n, "val": m}``."""
    writer = DatasetWriter(out_dir, n_frames, val_fraction, final_root)
    for f in frames:
        writer.write(f)
    return dict(writer.counts)

"""The heads retrained on several bodies' cached features (the teachers' and the split model's decoded path,
``stage2.semantic_head_epochs`` and ``stage2.detect_head_epochs``): they train on every body's frames and are
validated, and their best epoch kept, on the last body's; the detector as it came is kept when no epoch beats it.
The shipped model's trained heads, a few held-out scenes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import core.offline  # noqa: F401  (before ultralytics)
from codec.api import load_codec
from codec.metrics import DetectionMetric, SegmentationMetric
from codec.teachers import BODY_END, MultiTaskTeachers, postprocess
from codec.train import read_detection_labels, train_detection_head, train_semantic_head
from conveyor.export import DatasetWriter
from conveyor.scene import SceneConfig, SceneGenerator
from ultralytics.utils.ops import xyxy2xywh

DEFAULT = Path(__file__).resolve().parent.parent / "models" / "default.pt"


def _head_output(teachers: MultiTaskTeachers, body, images: np.ndarray, task: str):
    """``task``'s raw head output for ``images`` through ``body``, from half-precision features as the trainer
    caches them."""
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        return teachers.head_raw(task, {k: v.half().float() for k, v in body(x).items()})


def _miou(teachers: MultiTaskTeachers, body, images: np.ndarray, semantic: np.ndarray) -> float:
    metric = SegmentationMetric(len(teachers.semantic.names))
    logits = _head_output(teachers, body, images, "segmentation")
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    up = F.interpolate(logits, size=semantic.shape[1:], mode="bilinear", align_corners=False)
    for p, g in zip(up.argmax(1).numpy(), semantic):
        metric.add(p, g)
    return metric.summary()["miou"]


@pytest.fixture
def shipped() -> tuple:
    """The shipped split model (its trained heads, not fused: they are trained here) and 20 held-out scenes."""
    if not DEFAULT.is_file():
        pytest.skip("needs the shipped models/default.pt (trained heads)")
    model = load_codec(DEFAULT, fuse=False).model.eval()
    return model, list(SceneGenerator(SceneConfig(size=256, seed=5, belts="heldout")).frames(20))


def test_semantic_head_on_two_bodies_is_validated_on_the_last(tmp_path, shipped):
    model, frames = shipped
    teachers = model.teachers
    images, semantic = np.stack([f.image for f in frames]), np.stack([f.semantic for f in frames])
    rows = train_semantic_head(teachers, images, semantic, epochs=2, batch=8, lr=1e-4, log=tmp_path / "s.csv",
                               bodies=[teachers.backbone, model.decoded_features])
    log = (tmp_path / "s.csv").read_text().splitlines()
    assert log[0] == "epoch,train_loss,val_miou,seconds" and len(log) == 3
    val = slice(18, 20)  # val_fraction 0.1 of 20 frames: the last 2
    on_student = _miou(teachers, model.decoded_features, images[val], semantic[val])
    on_teachers = _miou(teachers, teachers.backbone, images[val], semantic[val])
    print(f"\nkept epoch {rows['epoch']}: val mIoU {rows['val_miou']:.2f}; recomputed on the decoded path "
          f"{on_student:.2f}, on the teachers' body {on_teachers:.2f}")
    assert abs(rows["val_miou"] - on_student) < 0.5, (rows, on_student)
    assert abs(on_student - on_teachers) > 0.5  # the two paths tell apart: the check above names the path used


def _detection_map(teachers: MultiTaskTeachers, body, images: np.ndarray, frames: list) -> float:
    metric = DetectionMetric()
    raw = _head_output(teachers, body, images, "detection")
    for result, f in zip(postprocess("detection", raw, images.shape[1], conf=0.001), frames):
        metric.add(result, (f.boxes, f.classes))
    return metric.summary()["box_map50_95"]


def _labels(frames: list) -> list[np.ndarray]:
    """Each scene's boxes as ``read_detection_labels`` gives them (class, cx, cy, w, h normalised)."""
    return [np.concatenate([f.classes[:, None], xyxy2xywh(f.boxes.astype(np.float64)) / f.image.shape[0]], 1)
            .astype(np.float32).reshape(-1, 5) for f in frames]


def test_detection_labels_are_read_back_as_the_scenes_boxes(tmp_path):
    frames = list(SceneGenerator(SceneConfig(size=256, seed=9, belts="heldout")).frames(6))
    writer = DatasetWriter(tmp_path, len(frames), val_fraction=0.5)
    for f in frames:
        writer.write(f)
    assert writer.counts["val"] > 0 and writer.counts["train"] > 0  # both folders are read
    for got, want in zip(read_detection_labels(tmp_path, len(frames)), _labels(frames)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert sum(len(x) for x in _labels(frames)) > 0
    with pytest.raises(FileNotFoundError, match="scene 6"):
        read_detection_labels(tmp_path, 7)


def test_detection_head_is_validated_on_the_last_body_and_never_kept_worse(tmp_path, shipped):
    model, frames = shipped
    teachers = model.teachers
    images, labels = np.stack([f.image for f in frames]), _labels(frames)
    before = {k: v.clone() for k, v in teachers.detect.state_dict().items()}
    bodies = [teachers.backbone, model.decoded_features]
    val = slice(18, 20)  # val_fraction 0.1 of 20 frames: the last 2
    on_student = _detection_map(teachers, model.decoded_features, images[val], frames[val])
    on_teachers = _detection_map(teachers, teachers.backbone, images[val], frames[val])
    assert abs(on_student - on_teachers) > 0.5  # the two paths tell apart

    # a step far too large wrecks the head: the detector as it came is kept, weights and figure
    row = train_detection_head(teachers, images, labels, epochs=1, batch=8, lr=0.5, log=tmp_path / "d.csv",
                               bodies=bodies)
    log = (tmp_path / "d.csv").read_text().splitlines()
    assert log[0] == "epoch,train_loss,val_map50_95,seconds" and len(log) == 3
    assert float(log[2].split(",")[2]) < row["val_map50_95"] - 1  # the wrecked epoch scored worse...
    assert row["epoch"] == 0 and abs(row["val_map50_95"] - on_student) < 0.5  # ...than the start, on the student
    after = teachers.detect.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # a small step changes the neck and head only, never the shared body, and reports the path it kept
    row = train_detection_head(teachers, images, labels, epochs=2, batch=8, lr=1e-4, bodies=bodies)
    after = teachers.detect.state_dict()
    changed = {int(k.split(".")[1]) for k in before if not torch.equal(before[k], after[k])}
    assert not changed or min(changed) >= BODY_END
    assert abs(row["val_map50_95"] - _detection_map(teachers, model.decoded_features, images[val], frames[val])) < 0.5

"""The segmentation head retrained on several bodies' cached features (the teachers' and the split model's
decoded path, ``stage2.semantic_head_epochs``): it trains on every body's frames and is validated, and its best
epoch kept, on the last body's. The shipped model's trained heads, a few held-out scenes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import core.offline  # noqa: F401  (before ultralytics)
from codec.api import load_codec
from codec.metrics import SegmentationMetric
from codec.teachers import MultiTaskTeachers
from codec.train import train_semantic_head
from conveyor.scene import SceneConfig, SceneGenerator

DEFAULT = Path(__file__).resolve().parent.parent / "models" / "default.pt"


def _miou(teachers: MultiTaskTeachers, body, images: np.ndarray, semantic: np.ndarray) -> float:
    metric = SegmentationMetric(len(teachers.semantic.names))
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        cache = {k: v.half().float() for k, v in body(x).items()}  # the trainer caches features in half precision
        logits = teachers.head_raw("segmentation", cache)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        up = F.interpolate(logits, size=semantic.shape[1:], mode="bilinear", align_corners=False)
    for p, g in zip(up.argmax(1).numpy(), semantic):
        metric.add(p, g)
    return metric.summary()["miou"]


@pytest.mark.skipif(not DEFAULT.is_file(), reason="needs the shipped models/default.pt (trained heads)")
def test_semantic_head_on_two_bodies_is_validated_on_the_last(tmp_path):
    codec = load_codec(DEFAULT, fuse=False)
    model = codec.model.eval()
    teachers = model.teachers
    frames = list(SceneGenerator(SceneConfig(size=256, seed=5, belts="heldout")).frames(20))
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

"""The inspection station: one band shared by the label rule, the classification head and the drawing."""
from __future__ import annotations

import numpy as np
import torch

import core.offline  # noqa: F401  (before ultralytics)
from codec.teachers import MultiTaskTeachers, TeacherSpec, station_window
from codec.train import train_station_head
from conveyor.classes import FRAME_LABELS, STATION
from conveyor.scene import SceneConfig, SceneGenerator
from stages.sinks import station_columns


def test_station_window_is_the_central_band_of_the_features():
    f = torch.arange(8, dtype=torch.float32).repeat(1, 2, 8, 1)  # value = column index
    w = station_window(f)
    assert w.shape == (1, 2, 8, 2) and w[0, 0, 0].tolist() == [3.0, 4.0]  # 256 px: columns 96-160 at stride 32
    assert STATION == (0.375, 0.625)


def test_station_drawn_where_the_model_looks_after_letterbox():
    assert station_columns(256, 256) == (96, 160)
    assert station_columns(320, 240) == (120, 200)  # landscape: padded above and below, band over the width
    assert station_columns(240, 320) == (80, 160)  # portrait: padded left and right, band narrower than 1/4


def test_station_head_learns_and_only_reads_the_band(tmp_path):
    teachers = MultiTaskTeachers.from_spec(TeacherSpec(input_size=128))
    frames = list(SceneGenerator(SceneConfig(size=128, seed=3, compression=False)).frames(40))
    images = np.stack([f.image for f in frames])
    labels = np.array([f.label for f in frames])
    rows = train_station_head(teachers, images, labels, epochs=6, batch=16, lr=5e-3, log=tmp_path / "c.csv")
    log = (tmp_path / "c.csv").read_text().splitlines()
    assert log[0] == "epoch,train_loss,val_top1" and len(log) == 7
    losses = [float(line.split(",")[1]) for line in log[1:]]
    assert losses[-1] < losses[0] and 0 <= rows["val_top1"] <= 100
    # the head reads the band only (128 px: feature columns 1-2 of 4): columns outside it do not matter
    x = torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float() / 255
    cache = teachers.backbone(x)
    base = teachers.head_raw("classification", cache)[0]
    cache[8] = cache[8].clone()
    cache[8][..., :1] += 5.0
    cache[8][..., -1:] -= 5.0
    assert torch.allclose(teachers.head_raw("classification", cache)[0], base)
    assert base.shape == (2, len(FRAME_LABELS))

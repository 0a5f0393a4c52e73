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
    assert log[0] == "epoch,train_loss,val_top1,seconds" and len(log) == 7
    losses = [float(line.split(",")[1]) for line in log[1:]]
    assert losses[-1] < losses[0] and 0 <= rows["val_top1"] <= 100
    # the head keeps its best epoch's weights, and says which one it kept
    curve = [float(line.split(",")[2]) for line in log[1:]]
    assert rows["val_top1"] == max(curve) and rows["epoch"] == curve.index(max(curve)) + 1
    # the head reads the band only (128 px: feature columns 1-2 of 4): columns outside it do not matter
    x = torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float() / 255
    cache = teachers.backbone(x)
    base = teachers.head_raw("classification", cache)[0]
    cache[8] = cache[8].clone()
    cache[8][..., :1] += 5.0
    cache[8][..., -1:] -= 5.0
    assert torch.allclose(teachers.head_raw("classification", cache)[0], base)
    assert base.shape == (2, len(FRAME_LABELS))


def _truth_as_predictions(frame) -> dict:
    """A frame's truth in the form of the detection and segmentation heads' results (a perfect model)."""
    n = len(frame.boxes)
    return {"detection": {"boxes": frame.boxes.astype(np.float32), "scores": np.full(n, 0.9, np.float32),
                          "classes": frame.classes.astype(np.int64)},
            "segmentation": frame.semantic}


def test_station_label_from_items_follows_the_labelling_rule_on_truth():
    """Fed the truth of generated scenes as if predicted, the derived label agrees with the station rule that
    labelled them on nearly every frame (they differ only where another item's pixels inside a box move the
    centroid across a band border: 56 of 60 here, 54 with the box centre), and "empty" is exact where no item is
    near the band."""
    from codec.tasks import _station_from_items

    frames = list(SceneGenerator(SceneConfig(size=128, seed=11, compression=False)).frames(60))
    preds = [_truth_as_predictions(f) for f in frames]
    got = _station_from_items({"detection": [p["detection"] for p in preds],
                               "segmentation": [p["segmentation"] for p in preds]}, 128)
    labels = np.array([f.label for f in frames])
    derived = np.array([g["label"] for g in got])
    assert len(set(labels.tolist())) >= 4  # the scenes cover several garments and empty frames
    assert (derived == labels).mean() >= 0.9, (derived, labels)
    for g in got:  # the label leads its top5, "empty" is always a candidate, probabilities in [0, 1]
        assert g["top5"][0][0] == g["label"] and any(c == 0 for c, _ in g["top5"])
        assert all(0.0 <= p <= 1.0 for _, p in g["top5"]) and len(g["top5"]) <= 5


def test_station_label_prefers_the_item_with_most_pixels_in_the_band_and_needs_a_mask():
    from codec.tasks import _station_from_items

    seg = np.zeros((128, 128), np.uint8)
    seg[10:40, 50:70] = 3  # class 2 item, 600 px in the band (48-80)
    seg[60:120, 40:90] = 5  # class 4 item, 60 x 32 = 1920 px in the band
    det = {"boxes": np.array([[50, 10, 70, 40], [40, 60, 90, 120], [100, 0, 127, 30], [55, 0, 75, 8]], np.float32),
           "scores": np.array([0.9, 0.3, 0.99, 0.95], np.float32), "classes": np.array([2, 4, 7, 9])}
    (r,) = _station_from_items({"detection": [det], "segmentation": [seg]}, 128)
    # the big item wins though less sure; the right-hand item is outside the band; the last box has no mask
    assert r["label"] == 5 and [c for c, _ in r["top5"]] == [5, 3, 0]
    assert abs(r["top5"][-1][1] - 0.7) < 1e-6  # empty: one minus the winner's score
    (r,) = _station_from_items({"detection": [det], "segmentation": [np.zeros_like(seg)]}, 128)
    assert r == {"label": 0, "top5": [(0, 1.0)]}


def test_segmentation_takes_its_garment_classes_from_the_best_covering_box():
    from codec.tasks import _segmentation_named_by_items

    seg = np.zeros((64, 64), np.uint8)
    seg[10:30, 10:30] = 7  # the head's class inside both boxes
    seg[40:50, 40:50] = 2  # foreground outside every box keeps the head's class
    before = seg.copy()
    det = {"boxes": np.array([[5, 5, 25, 25], [15, 15, 35, 35]], np.float32),
           "scores": np.array([0.9, 0.6], np.float32), "classes": np.array([3, 8])}
    (named,) = _segmentation_named_by_items({"detection": [det], "segmentation": [seg]}, 64)
    assert np.array_equal(seg, before)  # the input map is not changed
    assert (named[10:25, 10:25] == 4).all()  # the better box wins where both cover
    assert (named[25:30, 15:30] == 9).all() and (named[15:25, 25:30] == 9).all()  # the other box alone
    assert (named[5:10, 5:25] == 0).all() and (named[30:35, 15:35] == 0).all()  # background stays background
    assert (named[40:50, 40:50] == 2).all()
    (same,) = _segmentation_named_by_items({"detection": [{"boxes": np.zeros((0, 4), np.float32),
                                                           "scores": np.zeros(0, np.float32),
                                                           "classes": np.zeros(0, np.int64)}],
                                            "segmentation": [seg]}, 64)
    assert np.array_equal(same, seg)


def test_segmentation_is_named_by_items_only_where_its_classes_are_the_detectors():
    from codec.api import SplitCodec

    from conveyor.classes import ITEM_NAMES, SEMANTIC_NAMES

    codec = SplitCodec.random(input_size=64, seed=0)
    assert not codec.derives("segmentation")  # unnamed classes: nothing says they are the same garments
    codec.model.teachers.detect.names = dict(enumerate(ITEM_NAMES))
    codec.model.teachers.semantic.names = dict(enumerate(SEMANTIC_NAMES))
    assert codec.derives("segmentation")  # background + the same garments, in order
    codec.own_heads.add("segmentation")
    assert not codec.derives("segmentation")
    codec.own_heads.clear()
    codec.model.teachers.semantic.names = {0: "background", 1: "sky"}
    assert not codec.derives("segmentation")


def test_every_head_runs_once_per_batch_however_many_tasks_read_it():
    """The derived station label reuses the detection and segmentation heads' raw output (Features memo)."""
    from codec.api import SplitCodec

    codec = SplitCodec.random(input_size=64, seed=0)
    codec.model.teachers.station = True
    calls: list[str] = []
    real = codec.model.teachers.head_raw

    def counting(task, cache):
        calls.append(task)
        return real(task, cache)

    codec.model.teachers.head_raw = counting
    frames = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), np.uint8)
    features = codec.decode(codec.encode(frames))
    per_frame = codec.heads(features, conf=0.001)
    assert sorted(calls) == ["detection", "segmentation"]  # the classifier head itself is not run
    assert len(per_frame) == 2 and all(set(r) == {"detection", "segmentation", "classification"} for r in per_frame)
    det_again = codec.head("detection", features, conf=0.001)  # memo: NMS on a copy, same boxes again
    assert all(np.array_equal(a["detection"]["boxes"], b["boxes"]) for a, b in zip(per_frame, det_again))
    codec.own_heads.add("classification")
    codec.heads(features)
    assert calls.count("classification") == 1


def test_the_segmentation_map_is_made_once_for_its_consumer_and_the_station_label():
    """The station label and the segmentation consumer share one post-processed map per frame (upsample + argmax
    are not repeated); detection, whose results depend on the threshold, is post-processed per threshold."""
    import dataclasses

    from codec.api import SplitCodec
    from codec.tasks import get_task, register_task

    codec = SplitCodec.random(input_size=64, seed=0)
    codec.model.teachers.station = True
    seg_task = get_task("segmentation")
    calls: list[int] = []

    def counting(raw, opts):
        calls.append(opts.input_size)
        return seg_task.postprocess(raw, opts)

    register_task(dataclasses.replace(seg_task, postprocess=counting), replace=True)
    try:
        frames = np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), np.uint8)
        features = codec.decode(codec.encode(frames))
        per_frame = codec.heads(features)  # classification derives from detection + segmentation
        assert len(calls) == 1
        fresh = codec.decode(codec.encode(frames))
        alone = codec.head("segmentation", fresh)
        assert all(np.array_equal(a["segmentation"], b) for a, b in zip(per_frame, alone))
        per_frame[0]["segmentation"][:] = 255  # each caller holds its own copy
        assert not np.array_equal(codec.head("segmentation", features)[0], per_frame[0]["segmentation"])
    finally:
        register_task(seg_task, replace=True)

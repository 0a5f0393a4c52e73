"""Conveyor-line generator: exact truth, determinism, video + sidecar, Ultralytics datasets, CLI bad input."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import core.offline  # noqa: F401  (before ultralytics)
from conveyor.belts import ALL_FAMILIES, HELDOUT_FAMILIES, TRAIN_FAMILIES, make_belt
from conveyor.classes import FRAME_LABELS, ITEM_NAMES, SEMANTIC_NAMES, STATION
from conveyor.groundtruth import load_ground_truth
from conveyor.line import ConveyorLine, LineConfig
from conveyor.scene import SceneConfig, SceneGenerator
from pipeline.cli import main as cli_main

SIZE, N = 96, 24


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One CLI run (video + datasets), shared by the read-back tests."""
    out = tmp_path_factory.mktemp("line") / "line"
    rc = cli_main(["data", "--out", str(out), "--frames", str(N), "--seed", "5", "--size", str(SIZE),
                   "--val-fraction", "0.25"])
    assert rc == 0
    return out


def _check_truth(f, size):
    assert f.image.shape == (size, size, 3) and f.image.dtype == np.uint8
    assert f.semantic.shape == (size, size) and f.semantic.dtype == np.uint8
    n = len(f.classes)
    assert f.boxes.shape == (n, 4) and f.boxes.dtype == np.float32 and f.classes.dtype == np.int64
    assert f.instance_masks.shape == (n, size, size) and f.instance_masks.dtype == bool
    if n:
        assert f.instance_masks.sum(axis=0).max() <= 1  # visible pixels belong to one item
    for box, c, m in zip(f.boxes, f.classes, f.instance_masks):
        ys, xs = np.nonzero(m)
        assert len(ys) > 0 and 0 <= c < len(ITEM_NAMES)
        x1, y1, x2, y2 = box
        assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2  # box encloses its mask
        assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # ...exactly
        assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size  # clipped at the border
        assert (f.semantic[m] == c + 1).all()  # every mask pixel has its box's semantic class
    # station rule, recomputed here from the instance masks: centroid in the band, most pixels in the band wins
    lo, hi = round(STATION[0] * size), round(STATION[1] * size)
    best, want = -1, 0
    for j, m in enumerate(f.instance_masks):
        ys, xs = np.nonzero(m)
        if lo <= xs.mean() < hi and m[:, lo:hi].sum() >= best:
            best, want = m[:, lo:hi].sum(), int(f.classes[j]) + 1
    assert f.label == want


def test_class_names():
    assert ITEM_NAMES == ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                          "ankle_boot"]
    assert SEMANTIC_NAMES[0] == "background" and SEMANTIC_NAMES[1:] == ITEM_NAMES
    assert FRAME_LABELS[0] == "empty" and FRAME_LABELS[1:] == ITEM_NAMES


def test_truth_is_exact_and_consistent():
    frames = list(ConveyorLine(LineConfig(size=SIZE, seed=3)).frames(60))
    assert [f.index for f in frames] == list(range(60))
    for f in frames:
        _check_truth(f, SIZE)
    assert sum(len(f.classes) for f in frames) > 20
    assert any(f.label > 0 for f in frames)


def test_scenes_exact_independent_and_deterministic():
    gen = SceneGenerator(SceneConfig(size=SIZE, seed=4))
    frames = list(gen.frames(40))
    for f in frames:
        _check_truth(f, SIZE)
    assert sum(len(f.classes) for f in frames) > 40 and len({f.label for f in frames}) > 3
    again = SceneGenerator(SceneConfig(size=SIZE, seed=4)).scene(17)  # any frame alone, same bytes
    assert np.array_equal(again.image, frames[17].image) and np.array_equal(again.semantic, frames[17].semantic)
    other = SceneGenerator(SceneConfig(size=SIZE, seed=5)).scene(17)
    assert not np.array_equal(other.image, frames[17].image)
    # independent frames: consecutive scenes share no belt (unlike a video line, where frames overlap)
    corr = np.corrcoef(frames[0].image.ravel().astype(float), frames[1].image.ravel().astype(float))[0, 1]
    assert abs(corr) < 0.5


def test_belt_families_split_and_draw():
    assert set(TRAIN_FAMILIES).isdisjoint(HELDOUT_FAMILIES)
    rng = np.random.default_rng(0)
    for fam in ALL_FAMILIES:
        tile = make_belt(fam, rng, 32, 32)
        assert tile.shape == (32, 64, 3) and tile.dtype == np.float32 and 0 <= tile.min() and tile.max() <= 255
        assert np.allclose(tile[:, :32], tile[:, 32:][:, ::-1])  # mirrored: seamless along the belt
    # training scenes draw only training families; a held-out line draws only held-out ones
    seen = {f.belt for f in SceneGenerator(SceneConfig(size=64, seed=1, compression=False)).frames(40)}
    assert seen <= set(TRAIN_FAMILIES) and len(seen) > 3
    line = ConveyorLine(LineConfig(size=64, seed=2, belts="heldout"))
    next(iter(line))
    assert line.belt_family in HELDOUT_FAMILIES


def test_lattice_belts_are_periodic_and_differ_per_draw():
    """A lattice belt is a repeating motif: its spectrum has a few strong peaks, unlike grain; draws differ."""
    from conveyor.belts import _pattern

    patterns = [_pattern("lattice", np.random.default_rng(s), 96, 96) for s in range(6)]
    for pat in patterns:
        power = np.abs(np.fft.fft2(pat - pat.mean())) ** 2
        assert np.sort(power.ravel())[-8:].sum() > 0.1 * power.sum()  # white grain alone: ~8 / 9216 of the power
    assert all(not np.allclose(patterns[0], other) for other in patterns[1:])


def test_line_deterministic_and_seed_dependent():
    a = list(ConveyorLine(LineConfig(size=SIZE, seed=7)).frames(5))
    line = ConveyorLine(LineConfig(size=SIZE, seed=7))
    b, b2 = list(line.frames(5)), list(line.frames(5))
    c = list(ConveyorLine(LineConfig(size=SIZE, seed=8)).frames(5))
    for x, y, z in zip(a, b, b2):
        assert np.array_equal(x.image, y.image) and np.array_equal(y.image, z.image)
        assert np.array_equal(x.semantic, y.semantic) and np.array_equal(x.boxes, y.boxes)
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_drawn_parts_when_fashion_mnist_is_absent(tmp_path, capsys):
    line = ConveyorLine(LineConfig(size=SIZE, seed=1, fashion_dir=str(tmp_path / "nothing")))
    err = capsys.readouterr().err
    assert line.source == "drawn" and len(err.strip().splitlines()) == 1 and "Fashion-MNIST" in err
    for f in line.frames(30):
        _check_truth(f, SIZE)


def test_cli_same_seed_identical_bytes_other_seed_differs(tmp_path, made):
    out = tmp_path / "again"
    args = ["data", "--out", str(out), "--frames", str(N), "--seed", "5", "--size", str(SIZE), "--val-fraction",
            "0.25"]
    assert cli_main(args) == 0
    first = _tree(out)
    assert cli_main(args) == 0  # replaces the existing folder
    assert _tree(out) == first
    assert "line.mp4" in first and "line.gt.jsonl" in first and "detect/labels/train/000000.txt" in first
    other = _tree(made)  # same seed, other folder: everything but the data.yaml paths is identical
    assert {k: v for k, v in first.items() if not k.endswith("data.yaml")} == \
           {k: v for k, v in other.items() if not k.endswith("data.yaml")}
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temp folders left behind
    assert cli_main(["data", "--out", str(tmp_path / "s6"), "--frames", str(N), "--seed", "6", "--size",
                     str(SIZE), "--video-only"]) == 0
    assert _digest(tmp_path / "s6" / "line.mp4") != first["line.mp4"]
    assert sorted(p.name for p in (tmp_path / "s6").iterdir()) == ["line.gt.jsonl", "line.mp4"]


def test_video_decodes_and_sidecar_round_trips(made):
    import av

    with av.open(str(made / "line.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == N and frames[0].shape == (SIZE, SIZE, 3)
    truth = load_ground_truth(made / "line.mp4")
    gen = list(ConveyorLine(LineConfig(size=SIZE, seed=5)).frames(N))
    assert len(truth) == N
    for t, g, img in zip(truth, gen, frames):
        assert t.index == g.index and t.label == g.label
        assert np.array_equal(t.boxes, g.boxes) and np.array_equal(t.classes, g.classes)
        assert np.array_equal(t.semantic, g.semantic)
        assert np.abs(img.astype(int) - g.image.astype(int)).mean() < 8  # H.264 at crf 18 is close


def test_datasets_load_through_ultralytics(made):
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.dataset import ClassificationDataset, SemanticDataset, YOLODataset
    from ultralytics.data.utils import check_cls_dataset, check_det_dataset

    gen = list(ConveyorLine(LineConfig(size=SIZE, seed=5)).frames(N))
    val_idx = {int(p.stem) for p in (made / "detect" / "images" / "val").glob("*.png")}
    assert 0 < len(val_idx) < N

    det = check_det_dataset(str(made / "detect" / "data.yaml"))
    assert det["names"] == dict(enumerate(ITEM_NAMES))
    cfg = get_cfg(overrides={"imgsz": SIZE, "task": "detect", "workers": 0, "plots": False})
    for split in ("train", "val"):
        ds = build_yolo_dataset(cfg, det[split], 2, det, mode="val")
        assert type(ds) is YOLODataset
        want = [g for g in gen if (g.index in val_idx) == (split == "val")]
        assert len(ds.labels) == len(want)
        assert sum(len(lb["cls"]) for lb in ds.labels) == sum(len(g.classes) for g in want)
        item = ds[0]
        assert item["img"].shape[0] == 3

    sem = check_det_dataset(str(made / "semantic" / "data.yaml"))
    assert sem["masks_dir"] == "masks" and sem["names"] == dict(enumerate(SEMANTIC_NAMES))
    scfg = get_cfg(overrides={"imgsz": SIZE, "task": "semantic", "workers": 0, "plots": False})
    ds = build_yolo_dataset(scfg, sem["train"], 2, sem, mode="val")
    assert type(ds) is SemanticDataset and len(ds.labels) == N - len(val_idx)
    g = next(x for x in gen if x.index == int(Path(ds.labels[0]["im_file"]).stem))
    assert np.array_equal(ds.load_mask(0), g.semantic)

    cls = check_cls_dataset(str(made / "classify"))
    assert list(cls["names"].values()) == [f"{i:02d}_{n}" for i, n in enumerate(FRAME_LABELS)]
    ccfg = get_cfg(overrides={"imgsz": SIZE, "task": "classify", "workers": 0, "plots": False})
    for split in ("train", "val"):
        ds = ClassificationDataset(str(cls[split]), ccfg, augment=False, prefix=split)
        want = sorted((g.index, g.label) for g in gen if (g.index in val_idx) == (split == "val"))
        got = sorted((int(Path(s[0]).stem), s[1]) for s in ds.samples)
        assert got == want  # folder index == FRAME_LABELS index


@pytest.mark.parametrize("bad, needle", [
    (["--belts", "wood"], "wood"),
    (["--frames", "many"], "many"),
    (["--size", "7"], "7"),
    (["--items", "socks"], "socks"),
    (["--val-fraction", "2"], "2"),
    (["--out", "FILE/out"], "FILE"),
])
def test_cli_bad_input_one_line_exit_2_no_output(tmp_path, capsys, bad, needle):
    (tmp_path / "FILE").write_text("not a folder")
    out = tmp_path / "out"
    args = ["data", "--out", str(out), "--frames", "3", "--size", "64"]
    if bad[0] == "--out":
        bad = ["--out", str(tmp_path / bad[1])]
    rc = cli_main(args + bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # nothing written, no temp folder

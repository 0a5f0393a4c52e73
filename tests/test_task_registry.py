"""The task registry (codec.tasks): one declaration per task, read by the codec, the consumers, the sinks, the
metrics and the CLI. A toy fourth task registered here only runs through the whole server half."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from codec.tasks import TASKS, Task, get_task, register_task, unregister_task
from core.errors import UsageError
from pipeline.stage import FrameMeta, FrameResult, available_stages

ROOT = Path(__file__).resolve().parent.parent
CKPT = "random:64"
BUILTIN = ("detection", "segmentation", "classification")
MARK = (slice(0, 6), slice(-6, None))  # where the toy task draws: the top right 6 x 6 pixels


# ------------------------------------------------------------------------------------------- the toy task
def _brightness_head(teachers, cache):
    """Average of the shared body's last feature map, one number per frame."""
    from codec.teachers import BODY_END

    return cache[BODY_END - 1].mean(dim=(1, 2, 3))


def _brightness_postprocess(raw, opts):
    return [{"mean": float(v)} for v in raw]


def _brightness_to_json(result, names):
    return {"mean": round(result["mean"], 4)}


def _brightness_grey(result) -> int:
    return int(np.clip(128 + 100 * result["mean"], 0, 255))


def _brightness_draw(canvas, result, names, alpha):
    canvas[MARK] = _brightness_grey(result)


class _AbsoluteError:
    def __init__(self, num_classes: int):
        self.errors: list[float] = []

    def add(self, prediction, truth) -> None:
        self.errors.append(abs(prediction["mean"] - truth))

    def summary(self) -> dict:
        return {"brightness_mae": float(np.mean(self.errors))} if self.errors else {}


@pytest.fixture
def brightness():
    task = register_task(Task("brightness", "mean of the body's last feature map", head=_brightness_head,
                              postprocess=_brightness_postprocess, to_json=_brightness_to_json,
                              draw=_brightness_draw, metric=_AbsoluteError, truth=lambda frame: frame.brightness))
    try:
        yield task
    finally:
        unregister_task("brightness")


# ------------------------------------------------------------------------------------------- the registry
def test_registry_import_keeps_the_edge_torch_free():
    code = ("import codec.tasks, pipeline.stage; pipeline.stage.available_stages(); import sys; "
            "print('torch' in sys.modules, 'ultralytics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_builtin_tasks_one_registry_everywhere():
    import codec.api
    import codec.teachers
    assert tuple(TASKS) == BUILTIN and TASKS == BUILTIN and repr(TASKS) == repr(BUILTIN)
    assert codec.api.TASKS is TASKS and codec.teachers.TASKS is TASKS
    assert {f"task.{t}" for t in BUILTIN} <= set(available_stages())
    with pytest.raises(KeyError, match="unknown task 'colour'.*'detection', 'segmentation', 'classification'"):
        get_task("colour")
    with pytest.raises(ValueError, match="already registered"):
        register_task(get_task("detection"))
    with pytest.raises(ValueError, match="lower-case"):
        register_task(Task("Bad Name", "", head=_brightness_head, postprocess=_brightness_postprocess))


def test_a_registered_task_gets_its_stage_cli_name_and_goes_again(brightness):
    from pipeline.commands._common import select_tasks
    from pipeline.graph import load_graph
    assert tuple(TASKS) == (*BUILTIN, "brightness")
    assert "task.brightness" in available_stages()
    spec = load_graph("server")
    select_tasks(spec, ["brightness"])  # allowed now; the graph simply has no brightness consumer
    assert not [s for s in spec.stages if s.key.startswith("task.")]
    unregister_task("brightness")
    try:
        assert "task.brightness" not in available_stages() and tuple(TASKS) == BUILTIN
        with pytest.raises(UsageError, match="brightness"):
            select_tasks(load_graph("server"), ["brightness"])
    finally:
        register_task(brightness)  # the fixture unregisters it


# ------------------------------------------------------------------------------------------- end to end
def test_toy_task_runs_through_consumers_merge_jsonl_video_and_metrics(tmp_path, brightness):
    from codec.metrics import TaskMetrics
    from pipeline.codecs import get_codec
    from pipeline.graph import GraphRunner, parse_graph
    from core.geometry import letterbox_image
    from stages.sinks import annotate

    frames = tmp_path / "frames"
    frames.mkdir()
    images = [np.full((48, 80, 3), level, np.uint8) for level in (20, 120, 230)]
    for i, img in enumerate(images):
        cv2.imwrite(str(frames / f"{i:03d}.png"), img)  # grey: BGR = RGB
    out = tmp_path / "out"
    spec = parse_graph({"name": "toy", "stages": [
        {"name": "source", "key": "source.images", "params": {"path": str(frames)}},
        {"name": "edge", "key": "edge.encode", "inputs": ["source"], "params": {"checkpoint": CKPT}},
        {"name": "decode", "key": "server.decode", "inputs": ["edge"], "params": {"checkpoint": CKPT}},
        {"name": "classification", "key": "task.classification", "inputs": ["decode"]},
        {"name": "brightness", "key": "task.brightness", "inputs": ["decode"]},
        {"name": "merge", "key": "results.merge", "inputs": ["classification", "brightness"]},
        {"name": "jsonl", "key": "sink.jsonl", "inputs": ["merge"], "params": {"path": str(out / "r.jsonl")}},
        {"name": "video", "key": "sink.video", "inputs": ["merge"], "params": {"path": str(out / "a.mp4")}},
    ]}, "<toy>")
    runner = GraphRunner(spec, log=lambda m: None)
    assert runner.run() == 0, runner.errors
    rows = [json.loads(line) for line in (out / "r.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in rows] == [0, 1, 2] and all(r["errors"] == {} for r in rows)
    assert list(rows[0])[-3:] == ["classification", "brightness", "errors"]  # registry order, then errors
    assert runner.stats()["video"].processed == 3 and (out / "a.mp4").stat().st_size > 0

    codec = get_codec(CKPT)
    direct = [codec.head("brightness", codec.decode(codec.encode(letterbox_image(img, 64)[None])))[0]
              for img in images]
    assert [r["brightness"] for r in rows] == [{"mean": round(d["mean"], 4)} for d in direct]

    fr = FrameResult(FrameMeta(0, 0, 1, sent_ns=2, received_ns=3), 4, 100, (24, 16, 16), (80, 48),
                     {"brightness": direct[0]}, {})
    drawn = annotate(images[0], fr)
    assert (drawn[MARK] == _brightness_grey(direct[0])).all()
    drawn[MARK] = images[0][MARK]
    assert (drawn == images[0]).all()  # nothing else drawn

    metrics = TaskMetrics(num_classes={"classification": 11})
    for d, truth in zip(direct, (0.0, 0.5, 1.0)):
        metrics.add_frame({"brightness": d, "classification": {"label": 0}},
                          SimpleNamespace(brightness=truth, label=0))
    summary = metrics.summary()
    assert summary["top1"] == 100.0 and list(summary)[-1] == "brightness_mae"
    assert summary["brightness_mae"] == pytest.approx(np.mean([abs(d["mean"] - t)
                                                               for d, t in zip(direct, (0.0, 0.5, 1.0))]))

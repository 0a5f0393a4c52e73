"""The task registry: every task the server answers is declared here once, with everything per-task.

A :class:`Task` bundles, for one task name:

==============  ==================================================================================================
``head``        raw batch output from the shared body's features: ``head(teachers, cache)``
                (``codec.teachers.MultiTaskTeachers.head_raw`` passes a private copy of the body cache)
``postprocess`` raw output -> one plain-numpy result per frame, in model-input pixels:
                ``postprocess(raw, HeadOptions)``
``result``      what one frame's result is, in words (the docstring of its ``task.<name>`` consumer stage)
``names``       its class names: ``names(teachers) -> list[str]`` (none: ids are written as text)
``to_frame``    model-input -> original-frame coordinates: ``to_frame(result, letterbox)`` (none: unchanged)
``to_json``     its field of the JSONL record: ``to_json(result, names)`` (none: JSON-able results pass through)
``draw``        its drawing on the annotated frame, in place: ``draw(canvas, result, names, alpha)``, in
                ``draw_order`` (lower first, so an overlay goes under boxes and text)
``metric``      an accumulator over a set, ``metric(num_classes)`` with ``add(prediction, truth)`` and
                ``summary() -> dict`` (``codec.metrics.TaskMetrics`` holds one per task), and ``truth``, which
                picks this task's truth out of a ground-truth frame (``conveyor.groundtruth.FrameTruth``)
``derive``      optional: the results computed from other tasks' results instead of this task's own head,
                ``derive({task: per-frame results}, input_size)``, the inputs being ``derive_inputs`` post-processed
                at ``derive_conf`` (their heads run once per frame however many tasks read them); the codec uses
                it where it applies (``codec.api.SplitCodec.derives``)
``derive_applies`` optional: ``derive_applies(teachers) -> bool``, whether these teachers' heads fit the rule
                (none: always)
``uses_conf``   whether ``postprocess`` reads ``HeadOptions.conf`` (default True); False lets a derived task and
                the task's own consumer share one post-processed result per frame
==============  ==================================================================================================

The codec (``codec.api``), the consumers (``stages.consumers``: each registered task gets its ``task.<name>``
stage), the sinks (``stages.sinks``), the metrics and the CLI's ``--tasks`` all read from here, so a fourth task
is one :func:`register_task` call. The built-ins (detection, segmentation, classification) are at the bottom.

Importing this module never imports torch or Ultralytics (the edge process stays torch-free): the heavy work
happens inside the hook functions, which import what they need when first called.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from core.geometry import map_boxes, map_class_map  # noqa: F401 - used here, and re-exported (their former home)
from core.rle import rle_decode, rle_encode  # noqa: F401 - re-exported (their former home)

if TYPE_CHECKING:  # pragma: no cover - type hints only
    from core.geometry import Letterbox

_TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class HeadOptions:
    """Post-processing settings a head may use (detection uses all of them, the others only ``input_size``)."""

    input_size: int
    conf: float = 0.25
    iou: float = 0.7
    end2end: bool = False
    max_det: int = 300


@dataclass(frozen=True)
class Task:
    """One task, declared once: see the module docstring for what each hook receives and returns."""

    name: str
    result: str
    head: Callable[[Any, dict], Any]
    postprocess: Callable[[Any, HeadOptions], list]
    names: Callable[[Any], list[str]] | None = None
    to_frame: Callable[[Any, "Letterbox"], Any] | None = None
    to_json: Callable[[Any, Sequence[str]], Any] | None = None
    draw: Callable[[np.ndarray, Any, Sequence[str], float], None] | None = None
    draw_order: int = 50
    metric: Callable[[int], Any] | None = None
    truth: Callable[[Any], Any] | None = None
    derive: Callable[[dict, int], list] | None = None
    derive_inputs: tuple[str, ...] = ()
    derive_conf: float = 0.1
    derive_applies: Callable[[Any], bool] | None = None
    uses_conf: bool = True

    def class_names(self, teachers: Any) -> list[str]:
        """This task's class names for ``teachers`` (empty when the task declares none)."""
        return list(self.names(teachers)) if self.names is not None else []

    def in_frame(self, result: Any, letterbox: "Letterbox") -> Any:
        """A model-input result mapped onto the original frame (the letterbox undone)."""
        return result if self.to_frame is None else self.to_frame(result, letterbox)

    def json_value(self, result: Any, names: Sequence[str]) -> Any:
        """This task's field of a frame's JSONL record."""
        return self.to_json(result, names) if self.to_json is not None else plain_json(result)


# --------------------------------------------------------------------------------------------- registry
_TASKS: dict[str, Task] = {}
_WATCHERS: list[tuple[Callable[[Task], None], Callable[[Task], None] | None]] = []
_lock = threading.RLock()


class UnknownTaskError(KeyError):
    """A task name nobody registered."""


class _TaskNames(Sequence[str]):
    """The registered task names in registration order, read live: a tuple-like view that stays current when a
    task is registered later (``codec.api.TASKS`` and ``codec.teachers.TASKS`` are this object)."""

    def __getitem__(self, index):
        return tuple(_TASKS)[index]

    def __len__(self) -> int:
        return len(_TASKS)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_TASKS))

    def __contains__(self, name: object) -> bool:
        return name in _TASKS

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (tuple, list, _TaskNames)) and tuple(self) == tuple(other)

    __hash__ = None  # a live view is not a constant

    def __repr__(self) -> str:
        return repr(tuple(_TASKS))


#: the registered task names, in registration order (detection, segmentation, classification, then plugins)
TASKS: Sequence[str] = _TaskNames()


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` to the registry (``replace=True`` to redefine a name); returns it. Everything that reads the
    registry sees it at once: its consumer stage ``task.<name>``, the JSONL field, the drawing, the metrics."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task takes a codec.tasks.Task, got {type(task).__name__}")
    if not _TASK_NAME.match(task.name):
        raise ValueError(f"task name {task.name!r} must be lower-case letters, digits and _ (it names a JSONL "
                         f"field and the stage task.{task.name})")
    with _lock:
        old = _TASKS.get(task.name)
        if old is not None and not replace:
            raise ValueError(f"task {task.name!r} is already registered; pass replace=True to redefine it")
        if old is not None:
            _notify(old, registered=False)
        _TASKS[task.name] = task
        _notify(task, registered=True)
    return task


def unregister_task(name: str) -> Task:
    """Remove a registered task (a test or plugin that registered it at run time); returns it."""
    with _lock:
        task = get_task(name)
        del _TASKS[name]
        _notify(task, registered=False)
    return task


def get_task(name: str) -> Task:
    """The task registered under ``name``; UnknownTaskError (a KeyError) names the registered ones."""
    task = _TASKS.get(name)
    if task is None:
        raise UnknownTaskError(f"unknown task {name!r}; expected one of {TASKS}")
    return task


def watch_tasks(on_register: Callable[[Task], None], on_unregister: Callable[[Task], None] | None = None) -> None:
    """Call ``on_register`` for every task registered now and later, ``on_unregister`` when one is removed: how
    ``stages.consumers`` gives every task its consumer stage without this module importing the pipeline."""
    with _lock:
        _WATCHERS.append((on_register, on_unregister))
        for task in list(_TASKS.values()):
            on_register(task)


def _notify(task: Task, registered: bool) -> None:
    for on_register, on_unregister in list(_WATCHERS):
        if registered:
            on_register(task)
        elif on_unregister is not None:
            on_unregister(task)


# --------------------------------------------------------------------------------------------- shared helpers
def plain_json(value: Any) -> Any:
    """A result as JSON: JSON-able values pass through, anything else becomes its repr (never fails a line)."""
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def label_name(names: Sequence[str], index: int) -> str:
    """Class ``index``'s name, or the index as text when the names do not cover it."""
    return names[index] if 0 <= index < len(names) else str(index)


#: drawing colours (RGB), indexed by class id modulo its length
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                    [0, 128, 128], [220, 190, 255], [170, 110, 40], [128, 0, 0]], np.uint8)


def station_columns(w: int, h: int) -> tuple[int, int]:
    """The inspection station's borders (``conveyor.classes.STATION`` of the square model input) in the columns of
    a ``w`` x ``h`` original frame, through the centred letterbox the edge applies."""
    from conveyor.classes import STATION

    side = max(w, h)
    return tuple(int(round(min(w - 1, max(0.0, w / 2 + (f - 0.5) * side)))) for f in STATION)


def _first(raw: Any) -> Any:
    """Ultralytics heads may return (output, extras): the output."""
    return raw[0] if isinstance(raw, (tuple, list)) else raw


# --------------------------------------------------------------------------------------------- detection
def _detection_head(teachers: Any, cache: dict) -> Any:
    from codec.teachers import BODY_END, run_layers

    return run_layers(teachers.detect, cache, BODY_END)


def _detection_postprocess(raw: Any, opts: HeadOptions) -> list[dict]:
    import core.offline  # noqa: F401 - before Ultralytics
    from ultralytics.utils import nms

    out = nms.non_max_suppression(_first(raw), opts.conf, opts.iou, max_det=opts.max_det, end2end=opts.end2end)
    return [{"boxes": d[:, :4].clamp(0, opts.input_size).numpy().astype(np.float32),
             "scores": d[:, 4].numpy().astype(np.float32),
             "classes": d[:, 5].numpy().astype(np.int64)} for d in out]


def _detection_names(teachers: Any) -> list[str]:
    from codec.teachers import model_class_names

    return model_class_names(teachers.detect)


def _detection_to_frame(result: dict, lb: "Letterbox") -> dict:
    return {"boxes": map_boxes(result["boxes"], lb), "scores": np.asarray(result["scores"], np.float32),
            "classes": np.asarray(result["classes"], np.int64)}


def _detection_to_json(det: dict, names: Sequence[str]) -> dict:
    cls = [int(c) for c in det["classes"]]
    out = {"boxes": [[round(float(v), 2) for v in b] for b in det["boxes"]],
           "scores": [round(float(s), 4) for s in det["scores"]], "classes": cls,
           "names": [label_name(names, c) for c in cls]}
    if det.get("track_ids") is not None:  # set by the factory tracker (track.items): -1 where no track holds it
        out["track_ids"] = [int(t) for t in det["track_ids"]]
    return out


def _detection_draw(canvas: np.ndarray, det: dict, names: Sequence[str], alpha: float) -> None:
    import cv2

    for b, s, c in zip(det["boxes"], det["scores"], det["classes"]):
        x1, y1, x2, y2 = (int(round(float(v))) for v in b)
        col = tuple(int(v) for v in PALETTE[int(c) % len(PALETTE)])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), col, 1)
        name = label_name(names, int(c))
        cv2.putText(canvas, f"{name} {float(s):.2f}", (x1, max(8, y1 - 2)), cv2.FONT_HERSHEY_PLAIN, 0.7, col, 1)


def _detection_metric(num_classes: int) -> Any:
    from codec.metrics import DetectionMetric

    return DetectionMetric()


# --------------------------------------------------------------------------------------------- segmentation
def _segmentation_head(teachers: Any, cache: dict) -> Any:
    from codec.teachers import SEM_HEAD_START, run_layers

    return run_layers(teachers.semantic, cache, SEM_HEAD_START)


def _segmentation_postprocess(raw: Any, opts: HeadOptions) -> list[np.ndarray]:
    import torch

    # channels-last: the upsample and the argmax over 11 classes run 4x faster, with identical results
    logits = torch.nn.functional.interpolate(_first(raw).contiguous(memory_format=torch.channels_last),
                                             size=(opts.input_size, opts.input_size), mode="bilinear",
                                             align_corners=False)
    return [m.numpy().astype(np.uint8) for m in logits.argmax(1)]


MASK_BOX_SCORE = 0.5  # the detections that name the segmentation's pixels


def _segmentation_named_by_items(inputs: dict, input_size: int) -> list[np.ndarray]:
    """The segmentation head's map with its garment classes taken from the detected items: a pixel the head
    calls foreground and a detection of score >= ``MASK_BOX_SCORE`` covers takes that detection's class (the
    highest-scoring box where boxes overlap); background stays background and foreground outside every box keeps
    the head's class. So a mask carries its box's name, and the class comes from the detector, trained on every
    item of every frame, rather than from the pixel head (which named garment pixels right only 53 % of the time
    on held-out belts).

    Measured on the shipped model (eval's 300 frames each; held-out belts / training families / the other
    renderer's wooden and canvas belts), mIoU teachers 38.3 / 43.1 / 37.0 / 52.8 -> 39.9 / 44.6 / 37.0 / 55.5, split
    model 34.6 / 41.0 / 30.5 / 53.3 -> 37.4 / 43.0 / 32.5 / 55.4 at a box score of 0.5 (on an earlier draw of the
    suites 0.3-0.6 all gained on the split model; 0.3-0.4 lost up to 2.0 on the wooden belt's teachers); on fresh
    suites (seed 777) held-out +1.9 / +1.9, training families +1.2 / +3.3."""
    out = []
    for det, seg in zip(inputs["detection"], inputs["segmentation"]):
        named = np.array(seg, copy=True)
        foreground = named > 0
        h, w = named.shape
        # the detections come at the station label's lower threshold (one NMS pass serves both rules)
        scores = np.asarray(det["scores"])
        order = np.argsort(scores, kind="stable")  # the best box painted last wins
        for j in order[scores[order] >= MASK_BOX_SCORE]:
            x1, y1, x2, y2 = det["boxes"][j]
            xa, ya = max(0, int(x1)), max(0, int(y1))
            xb, yb = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
            if xa < xb and ya < yb:
                window = named[ya:yb, xa:xb]
                window[foreground[ya:yb, xa:xb]] = int(det["classes"][j]) + 1
        out.append(named)
    return out


def _segmentation_fits_detection(teachers: Any) -> bool:
    """The rule needs the segmentation classes to be background + the detection classes, in order."""
    return _segmentation_names(teachers) == ["background"] + _detection_names(teachers)


def _segmentation_names(teachers: Any) -> list[str]:
    from codec.teachers import model_class_names

    return model_class_names(teachers.semantic)


def _segmentation_to_frame(result: np.ndarray, lb: "Letterbox") -> np.ndarray:
    return map_class_map(np.asarray(result), lb)


def _segmentation_to_json(seg: np.ndarray, names: Sequence[str]) -> dict:
    return rle_encode(seg)


def _segmentation_draw(canvas: np.ndarray, seg: np.ndarray, names: Sequence[str], alpha: float) -> None:
    """Class 0 (background) stays clear; a map of another size than the frame is not drawn."""
    if seg.shape[:2] != canvas.shape[:2]:
        return
    mask = seg > 0
    if mask.any():
        color = PALETTE[seg % len(PALETTE)]
        canvas[mask] = (canvas[mask] * (1 - alpha) + color[mask] * alpha).astype(np.uint8)


def _segmentation_metric(num_classes: int) -> Any:
    from codec.metrics import SegmentationMetric

    return SegmentationMetric(num_classes)


# --------------------------------------------------------------------------------------------- classification
def _classification_head(teachers: Any, cache: dict) -> Any:
    """The classifier's own layers; with ``teachers.station`` it reads only the station window of its input."""
    from codec.teachers import CLS_HEAD_START, run_layers, station_window

    if teachers.station:
        cache[CLS_HEAD_START - 1] = station_window(cache[CLS_HEAD_START - 1])
    return run_layers(teachers.classify, cache, CLS_HEAD_START)


def _classification_postprocess(raw: Any, opts: HeadOptions) -> list[dict]:
    import torch

    results = []
    for p in _first(raw):
        top = torch.topk(p, k=min(5, p.numel()))
        results.append({"label": int(top.indices[0]),
                        "top5": [(int(i), float(s)) for i, s in zip(top.indices, top.values)]})
    return results


def _station_from_items(inputs: dict, input_size: int) -> list[dict]:
    """The station label read off the detected items, by the rule that labels the footage
    (``conveyor.line``): among the detections whose segmented pixels (inside the box) have their centroid in the
    station band, the one with the most segmented pixels inside the band names the frame (``class + 1``); none
    gives 0 = empty. A box the segmentation does not confirm there is not an item at the station.
    ``top5`` lists the candidates' labels with their detection scores, then "empty" with one minus the best.

    Measured on held-out belts (150 frames, model of 2026-12-05): top-1 58.0 split / 60.7 teachers against 40.7 /
    42.0 for the station head (majority 39.3): the detector, trained on every item of every frame, knows garments
    far better than a head trained on about 150 station examples per class. The centroid of the segmented pixels,
    as the labelling rule has it, instead of the box centre (model of 2026-12-07, 300 frames, teachers / split):
    held-out 73.3 / 66.3 -> 75.3 / 67.7, training belts 80.0 / 76.3 -> 80.7 / 76.7 (fewer false items)."""
    from conveyor.classes import STATION

    lo, hi = STATION[0] * input_size, STATION[1] * input_size
    out = []
    for det, seg in zip(inputs["detection"], inputs["segmentation"]):
        ranked: list[tuple[float, int, float]] = []  # (pixels in the band, label, score)
        for (x1, y1, x2, y2), score, cls in zip(det["boxes"], det["scores"], det["classes"]):
            xa, xb = int(max(x1, 0)), int(np.ceil(min(x2, input_size)))
            ya, yb = int(max(y1, 0)), int(np.ceil(min(y2, input_size)))
            cols = np.nonzero(seg[ya:yb, xa:xb])[1]
            if not cols.size or not lo <= xa + cols.mean() + 0.5 < hi:
                continue
            pixels = float(np.count_nonzero((cols + xa >= lo) & (cols + xa < hi)))
            if pixels > 0:
                ranked.append((pixels, int(cls) + 1, float(score)))
        ranked.sort(key=lambda r: -r[0])
        top5, seen = [], set()
        for _, label, score in ranked:
            if label not in seen:
                seen.add(label)
                top5.append((label, score))
        best = top5[0][1] if top5 else 0.0
        top5 = (top5 + [(0, 1.0 - best)])[:5]
        out.append({"label": top5[0][0], "top5": top5})
    return out


def _classification_names(teachers: Any) -> list[str]:
    from codec.teachers import model_class_names

    return model_class_names(teachers.classify)


def _classification_to_json(clf: dict, names: Sequence[str]) -> dict:
    lab = int(clf["label"])
    return {"label": lab, "name": label_name(names, lab),
            "top5": [[int(c), round(float(p), 4)] for c, p in clf.get("top5", [])]}


def _classification_draw(canvas: np.ndarray, clf: dict, names: Sequence[str], alpha: float) -> None:
    """The frame label speaks about the inspection station: its borders dotted, the label at the top left."""
    import cv2

    text = label_name(names, int(clf["label"]))
    p = clf["top5"][0][1] if clf.get("top5") else 0.0
    h, w = canvas.shape[:2]
    for x in station_columns(w, h):
        for y in range(0, h, 6):
            cv2.line(canvas, (x, y), (x, min(h - 1, y + 2)), (255, 255, 255), 1)
    cv2.putText(canvas, f"station: {text} {p:.2f}", (2, 12), cv2.FONT_HERSHEY_PLAIN, 0.9, (255, 255, 255), 1)


def _classification_metric(num_classes: int) -> Any:
    from codec.metrics import ClassificationMetric

    return ClassificationMetric()


register_task(Task(
    "detection", "boxes (N, 4) xyxy float32 in original-frame pixels, scores (N,) float32, classes (N,) int64",
    head=_detection_head, postprocess=_detection_postprocess, names=_detection_names,
    to_frame=_detection_to_frame, to_json=_detection_to_json, draw=_detection_draw, draw_order=20,
    metric=_detection_metric, truth=lambda frame: (frame.boxes, frame.classes)))
register_task(Task(
    "segmentation", "(H, W) uint8 class map of the original frame (0 = background)",
    head=_segmentation_head, postprocess=_segmentation_postprocess, names=_segmentation_names, uses_conf=False,
    to_frame=_segmentation_to_frame, to_json=_segmentation_to_json, draw=_segmentation_draw, draw_order=10,
    metric=_segmentation_metric, truth=lambda frame: frame.semantic,
    derive=_segmentation_named_by_items, derive_inputs=("detection", "segmentation"),
    derive_applies=_segmentation_fits_detection))
register_task(Task(
    "classification", "label int and top5 [(class, probability)] of the item at the inspection station",
    head=_classification_head, postprocess=_classification_postprocess, names=_classification_names,
    to_json=_classification_to_json, draw=_classification_draw, draw_order=30,
    metric=_classification_metric, truth=lambda frame: frame.label,
    derive=_station_from_items, derive_inputs=("detection", "segmentation"),
    derive_applies=lambda teachers: bool(teachers.station)))

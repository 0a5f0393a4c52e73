"""The three Ultralytics YOLO teachers as one multi-task network: a shared backbone and three heads.

The detector, the semantic segmenter and the classifier are one YOLO family at one input size. Their backbones
are identical up to the split (all of layers 0-10 for detect and semantic, 0-8 for classify), and our recipe
trains the segmentation and classification heads on the detector's *frozen* backbone, so the three collapse
into one backbone (run once per frame) and three heads. This module builds them from YAML or from Ultralytics
checkpoints, checks that the backbones really are shared, runs the layers in ranges (so the split model can
inject decoded features at the split point) and turns raw head outputs into plain arrays.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import core.offline  # noqa: F401
from codec.tasks import TASKS, HeadOptions, get_task  # noqa: F401  (TASKS re-exported: codec.teachers.TASKS)
from conveyor.classes import STATION
from ultralytics.nn.tasks import ClassificationModel, DetectionModel, SemanticSegmentationModel, load_checkpoint

# Layer ranges of the YOLO26 graphs: the body is the detector's backbone; heads start where the graphs diverge.
SEM_HEAD_START = 11  # yolo26-sem.yaml: layers 0-10 equal the detector's backbone
CLS_HEAD_START = 9  # yolo26-cls.yaml: layers 0-8 equal the detector's backbone, 9 is its own C2PSA
BODY_END = 11  # detector layers [0, 11) are the shared backbone


def run_layers(model: nn.Module, cache: dict[int, torch.Tensor], start: int, stop: int | None = None) -> torch.Tensor:
    """Run ``model.model[start:stop]`` the way Ultralytics' ``_predict_once`` does, reading inputs from ``cache``.

    ``cache`` maps layer index to output and is filled in place; it must hold every earlier output the layers
    refer to (``m.f``). Returns the last layer's output.
    """
    layers = model.model
    stop = len(layers) if stop is None else stop
    x = cache[start - 1] if start > 0 else None
    for m in layers[start:stop]:
        if m.f != -1:
            x = cache[m.f] if isinstance(m.f, int) else [x if j == -1 else cache[j] for j in m.f]
        elif x is None:
            raise ValueError(f"layer {m.i} needs the output of layer {m.i - 1}, which is not in the cache")
        x = m(x)
        cache[m.i] = x
    return x


@dataclass
class TeacherSpec:
    """How to build the teachers: model family YAMLs, class counts and input size."""

    detect_yaml: str = "yolo26n.yaml"
    semantic_yaml: str = "yolo26n-sem.yaml"
    classify_yaml: str = "yolo26n-cls.yaml"
    det_classes: int = 10
    sem_classes: int = 11
    cls_classes: int = 11
    input_size: int = 256


class MultiTaskTeachers(nn.Module):
    """One shared YOLO backbone and detection, semantic-segmentation and classification heads.

    The segmenter's and classifier's backbone layers are *the detector's modules* (shared, not copied), so a
    state dict holds them once (under ``detect``) and a forward pass computes them once.
    """

    def __init__(self, detect: DetectionModel, semantic: SemanticSegmentationModel, classify: ClassificationModel,
                 station: bool = False):
        super().__init__()
        self.detect, self.semantic, self.classify = detect, semantic, classify
        self.station = station  # the classification head reads the station window (conveyor.classes.STATION)
        for i in range(SEM_HEAD_START):
            self.semantic.model[i] = self.detect.model[i]
        for i in range(CLS_HEAD_START):
            self.classify.model[i] = self.detect.model[i]
        for m in (self.detect, self.semantic, self.classify):
            m.float().eval()
            m.requires_grad_(False)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_spec(cls, spec: TeacherSpec) -> "MultiTaskTeachers":
        """Fresh, randomly initialised teachers from the family YAMLs (no download)."""
        det = DetectionModel(spec.detect_yaml, nc=spec.det_classes, verbose=False)
        sem = SemanticSegmentationModel(spec.semantic_yaml, nc=spec.sem_classes, verbose=False)
        clf = ClassificationModel(spec.classify_yaml, nc=spec.cls_classes, verbose=False)
        return cls(det, sem, clf, station=True)

    @classmethod
    def from_checkpoints(cls, detect: str | Path, semantic: str | Path, classify: str | Path,
                         atol: float = 1e-3) -> "MultiTaskTeachers":
        """Load three trained Ultralytics checkpoints and insist that they share the detector's backbone.

        Raises ValueError naming the first layer that differs: heads trained on another backbone would get
        features they never saw, so silently sharing would give wrong answers.
        """
        models = []
        for path, want in ((detect, DetectionModel), (semantic, SemanticSegmentationModel),
                           (classify, ClassificationModel)):
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"teacher checkpoint not found: {path}")
            model, _ = load_checkpoint(str(path), device="cpu")
            if not isinstance(model, want):
                raise ValueError(f"{path} holds a {type(model).__name__}, expected a {want.__name__}")
            models.append(model.float())
        det, sem, clf = models
        for other, stop, name in ((sem, SEM_HEAD_START, "semantic"), (clf, CLS_HEAD_START, "classify")):
            for i in range(stop):
                eps_a = [m.eps for m in det.model[i].modules() if isinstance(m, nn.BatchNorm2d)]
                eps_b = [m.eps for m in other.model[i].modules() if isinstance(m, nn.BatchNorm2d)]
                if eps_a != eps_b:
                    raise ValueError(f"{name} teacher layer {i} normalises with BatchNorm eps {eps_b[:1]}, the "
                                     f"detector with {eps_a[:1]}: its head learned on other features than the "
                                     f"shared body computes (train it with `run_pipeline.py train`, which aligns eps)")
                a, b = det.model[i].state_dict(), other.model[i].state_dict()
                if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
                    raise ValueError(f"{name} teacher layer {i} has another architecture than the detector's")
                for k in a:
                    if a[k].is_floating_point() and not torch.allclose(a[k].float(), b[k].float(), atol=atol):
                        raise ValueError(
                            f"{name} teacher layer {i} ({k}) differs from the detector's backbone: train its head "
                            f"on the detector's frozen backbone (freeze={stop}, pretrained=detector) so they share it")
        return cls(det, sem, clf)

    # ----------------------------------------------------------------- (de)serialisation
    def yaml_dicts(self) -> dict:
        """The three model definitions (architecture only: part of the model fingerprint)."""
        return {"detect": self.detect.yaml, "semantic": self.semantic.yaml, "classify": self.classify.yaml}

    def export_state(self) -> dict:
        """Distinct parts only: the whole detector plus the segmentation and classification heads."""
        return {
            "yaml": self.yaml_dicts(),
            "names": {"detect": dict(self.detect.names) if hasattr(self.detect, "names") else None,
                      "semantic": dict(self.semantic.names) if hasattr(self.semantic, "names") else None,
                      "classify": dict(self.classify.names) if hasattr(self.classify, "names") else None},
            "detect": {k: v.half() if v.is_floating_point() else v for k, v in self.detect.state_dict().items()},
            "semantic_head": _head_state(self.semantic, SEM_HEAD_START),
            "classify_head": _head_state(self.classify, CLS_HEAD_START),
            "end2end": bool(getattr(self.detect, "end2end", False)),
            "station": bool(self.station),
        }

    @classmethod
    def from_state(cls, state: dict) -> "MultiTaskTeachers":
        y = state["yaml"]
        det = DetectionModel(dict(y["detect"]), verbose=False)
        sem = SemanticSegmentationModel(dict(y["semantic"]), verbose=False)
        clf = ClassificationModel(dict(y["classify"]), verbose=False)
        obj = cls(det, sem, clf, station=bool(state.get("station", False)))
        det.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["detect"].items()})
        _load_head(sem, state["semantic_head"], SEM_HEAD_START)
        _load_head(clf, state["classify_head"], CLS_HEAD_START)
        for model, key in ((det, "detect"), (sem, "semantic"), (clf, "classify")):
            names = (state.get("names") or {}).get(key)
            if names:
                model.names = {int(k): v for k, v in names.items()}
        if state.get("end2end") is not None and hasattr(det, "end2end"):
            det.end2end = state["end2end"]
        return obj

    # ----------------------------------------------------------------- running
    @property
    def split_channels(self) -> int:
        """Channels of the split-point feature (output of layer 2, end of the stride-4 stage)."""
        with torch.no_grad():
            cache = {-1: torch.zeros(1, 3, 64, 64)}
            cache[0] = self.detect.model[0](cache[-1])
            return int(run_layers(self.detect, cache, 1, 3).shape[1])

    def backbone(self, x: torch.Tensor, start: int = 0, cache: dict | None = None) -> dict[int, torch.Tensor]:
        """Run the shared backbone from layer ``start`` (cache must then hold layer ``start - 1``)."""
        cache = {} if cache is None else cache
        if start == 0:
            cache[-1] = x
            layer0 = self.detect.model[0]
            cache[0] = layer0(x)
            start = 1
        run_layers(self.detect, cache, start, BODY_END)
        return cache

    def head_raw(self, task: str, cache: dict[int, torch.Tensor]):
        """Raw output of one task head given the backbone cache (Ultralytics' own output conventions); the head
        itself is the task's ``head`` hook in :mod:`codec.tasks`."""
        return get_task(task).head(self, dict(cache))  # heads add their own layers: keep the shared cache clean

    def names(self, task: str) -> list[str]:
        """One task's class names, in class order (the task's ``names`` hook in :mod:`codec.tasks`)."""
        return get_task(task).class_names(self)


def model_class_names(model: nn.Module) -> list[str]:
    """An Ultralytics model's class names in class order, one per output class."""
    names = getattr(model, "names", None) or {}
    n = _num_classes(model)
    # classify folders are numbered so Ultralytics' alphabetical order is the class order: drop "07_"
    return [re.sub(r"^\d+_", "", str(names.get(i, i))) for i in range(n)]


def station_window(feature: torch.Tensor) -> torch.Tensor:
    """The columns of a feature map ``(B, C, H, W)`` that see the inspection station (``STATION`` of the width):
    what the classification head pools, so it names the item at the station rather than the whole frame."""
    w = feature.shape[-1]
    lo = int(math.floor(STATION[0] * w))
    hi = max(lo + 1, int(math.ceil(STATION[1] * w)))
    return feature[..., lo:hi]


def station_features(teachers: "MultiTaskTeachers", x: torch.Tensor) -> torch.Tensor:
    """The classification head's input for frames ``x`` (B, 3, S, S in 0..1): body layers up to the head, then
    the station window."""
    cache = {-1: x}
    cache[0] = teachers.detect.model[0](x)
    run_layers(teachers.detect, cache, 1, CLS_HEAD_START)
    return station_window(cache[CLS_HEAD_START - 1])


def postprocess(task: str, raw, input_size: int, conf: float = 0.25, iou: float = 0.7, end2end: bool = False,
                max_det: int = 300) -> list:
    """Turn a head's raw batch output into per-frame results in plain numpy (model-input pixel coordinates): the
    task's ``postprocess`` hook in :mod:`codec.tasks`."""
    return get_task(task).postprocess(raw, HeadOptions(input_size, conf, iou, end2end, max_det))


def _head_state(model: nn.Module, start: int) -> dict:
    prefixes = tuple(f"model.{i}." for i in range(start, len(model.model)))
    return {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()
            if k.startswith(prefixes)}


def _load_head(model: nn.Module, state: dict, start: int) -> None:
    own = {k: v for k, v in model.state_dict().items()
           if k.startswith(tuple(f"model.{i}." for i in range(start, len(model.model))))}
    if own.keys() != state.keys():
        missing, extra = own.keys() - state.keys(), state.keys() - own.keys()
        raise ValueError(f"head weights do not fit the architecture (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]})")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)


def _num_classes(model: nn.Module) -> int:
    head = model.model[-1]
    for attr in ("nc",):
        if hasattr(head, attr):
            return int(getattr(head, attr))
    linear = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return int(linear[-1].out_features if isinstance(linear[-1], nn.Linear) else linear[-1].out_channels)

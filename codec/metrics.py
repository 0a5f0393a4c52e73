"""Task metrics accumulated over a whole set, one definition for eval and bench.

- Detection (Ultralytics' matching and AP): box mAP50-95 and mAP50 over the classes present in the truth,
  per-class AP50-95, and **class-agnostic AP50** (every box one class: are the items found at all).
- Segmentation: mIoU from one confusion matrix over all pixels of all frames (not a per-batch average), over
  the classes present in truth or prediction, and foreground IoU (item vs background, any class). Truth
  values >= the class count (e.g. 255 for letterbox padding) are ignored.
- Classification: top-1 and the majority-class top-1 (always answering the most frequent true label), so a
  figure can be read against what guessing achieves.

Each task's accumulator (``add(prediction, truth)``, ``summary() -> dict``) is its ``metric`` hook in
:mod:`codec.tasks`; :class:`TaskMetrics` holds one per registered task."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

import core.offline  # noqa: F401
from codec.tasks import TASKS, get_task
from ultralytics.utils.metrics import ap_per_class, box_iou


class DetectionMetric:
    """Box AP with Ultralytics' matching; truth is ``(boxes (N, 4) xyxy, classes (N,))``."""

    def __init__(self):
        import tempfile

        from ultralytics.models.yolo.detect import DetectionValidator

        # its match_predictions and IoU thresholds 0.50:0.95; a validator makes its save folder at once (by default
        # a new runs/detect/train-N in the working directory on every eval): give it one that is removed again
        with tempfile.TemporaryDirectory() as scratch:
            self._matcher = DetectionValidator(save_dir=Path(scratch))
        self.iouv = self._matcher.iouv
        self.tp, self.conf, self.pred_cls, self.target_cls = [], [], [], []
        self.tp_any = []  # class-agnostic matches at IoU 0.5

    def add(self, pred: dict, truth: tuple[np.ndarray, np.ndarray]) -> None:
        gt_boxes, gt_classes = truth
        boxes = torch.as_tensor(pred["boxes"], dtype=torch.float32).reshape(-1, 4)
        p_cls = torch.as_tensor(pred["classes"]).reshape(-1)
        conf = torch.as_tensor(pred["scores"], dtype=torch.float32).reshape(-1)
        order = torch.argsort(conf, descending=True)
        boxes, p_cls, conf = boxes[order], p_cls[order], conf[order]
        t_cls = torch.as_tensor(gt_classes).reshape(-1)
        if len(t_cls) and len(p_cls):
            iou = box_iou(torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4), boxes)
            tp = self._matcher.match_predictions(p_cls, t_cls, iou).numpy()
            tp_any = self._matcher.match_predictions(torch.zeros_like(p_cls), torch.zeros_like(t_cls), iou).numpy()
        else:
            tp = np.zeros((len(p_cls), len(self.iouv)), dtype=bool)
            tp_any = tp
        self.tp.append(tp)
        self.tp_any.append(tp_any)
        self.conf.append(conf.numpy())
        self.pred_cls.append(p_cls.numpy())
        self.target_cls.append(t_cls.numpy())

    def summary(self) -> dict:
        out = {}
        if self.tp:
            tp, conf = np.concatenate(self.tp), np.concatenate(self.conf)
            pred_cls, target_cls = np.concatenate(self.pred_cls), np.concatenate(self.target_cls)
            if len(target_cls) and len(tp):
                res = ap_per_class(tp, conf, pred_cls, target_cls)
                ap, classes = res[5], res[6]
                out["box_map50_95"] = float(ap.mean() * 100)
                out["box_map50"] = float(ap[:, 0].mean() * 100)
                out["box_ap_per_class"] = {int(c): float(a * 100) for c, a in zip(classes, ap.mean(1))}
                agnostic = ap_per_class(np.concatenate(self.tp_any), conf, np.zeros_like(pred_cls),
                                        np.zeros_like(target_cls))[5]
                out["items_ap50"] = float(agnostic[:, 0].mean() * 100)
            else:
                out["box_map50_95"] = out["box_map50"] = out["items_ap50"] = 0.0
                out["box_ap_per_class"] = {}
        return out


class SegmentationMetric:
    """mIoU and foreground IoU from one confusion matrix; truth is the (H, W) class map."""

    def __init__(self, num_classes: int):
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.num_sem = num_classes

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        valid = gt < self.num_sem
        idx = gt[valid].astype(np.int64) * self.num_sem + pred[valid].astype(np.int64)
        self.confusion += np.bincount(idx, minlength=self.num_sem ** 2).reshape(self.num_sem, self.num_sem)

    def summary(self) -> dict:
        out = {}
        if self.confusion.any():
            inter = np.diag(self.confusion).astype(np.float64)
            union = self.confusion.sum(0) + self.confusion.sum(1) - inter
            present = union > 0
            out["miou"] = float((inter[present] / union[present]).mean() * 100)
            fg_inter = self.confusion[1:, 1:].sum()
            fg_union = self.confusion.sum() - self.confusion[0, 0]
            out["fg_iou"] = float(fg_inter / max(fg_union, 1) * 100)
        return out


class ClassificationMetric:
    """Top-1 against the majority-class top-1; the prediction is a result with ``label``, truth the label."""

    def __init__(self):
        self.labels: list[int] = []
        self.correct = self.total = 0

    def add(self, pred: dict, gt_label: int) -> None:
        self.correct += int(pred["label"] == gt_label)
        self.total += 1
        self.labels.append(int(gt_label))

    def summary(self) -> dict:
        out = {}
        if self.total:
            out["top1"] = 100.0 * self.correct / self.total
            out["majority_top1"] = 100.0 * float(np.bincount(self.labels).max()) / self.total
        return out


class TaskMetrics:
    """Feed per-frame predictions and truth; read ``summary()`` (every task's figures, in registry order).

    ``num_det_classes`` / ``num_sem_classes`` are the class counts of the built-in detection and segmentation;
    ``num_classes`` gives any task's (e.g. ``{t: len(codec.class_names[t]) for t in codec.class_names}``)."""

    def __init__(self, num_det_classes: int = 0, num_sem_classes: int = 0,
                 num_classes: Mapping[str, int] | None = None):
        self.num_classes = {"detection": num_det_classes, "segmentation": num_sem_classes, **(num_classes or {})}
        self.metrics: dict[str, Any] = {}
        for task in TASKS:
            if get_task(task).metric is not None:
                self._metric(task)

    def _metric(self, task: str) -> Any:
        """The accumulator of ``task`` (made on first use for a task registered after this object)."""
        if task not in self.metrics:
            make = get_task(task).metric
            if make is None:
                raise ValueError(f"task {task!r} declares no metric (codec.tasks: Task.metric)")
            self.metrics[task] = make(int(self.num_classes.get(task, 0)))
        return self.metrics[task]

    def add(self, task: str, prediction: Any, truth: Any) -> None:
        """One frame's ``prediction`` of ``task`` against its ``truth`` (in the form that task's metric takes)."""
        self._metric(task).add(prediction, truth)

    def add_frame(self, results: Mapping[str, Any], frame_truth: Any) -> None:
        """Every task in ``results`` that has a metric and a ``truth`` hook, against a ground-truth frame."""
        for task, prediction in results.items():
            spec = get_task(task) if task in TASKS else None
            if spec is not None and spec.metric is not None and spec.truth is not None:
                self.add(task, prediction, spec.truth(frame_truth))

    def add_detection(self, pred: dict, gt_boxes: np.ndarray, gt_classes: np.ndarray) -> None:
        self.add("detection", pred, (gt_boxes, gt_classes))

    def add_segmentation(self, pred: np.ndarray, gt: np.ndarray) -> None:
        self.add("segmentation", pred, gt)

    def add_classification(self, pred_label: int, gt_label: int) -> None:
        self.add("classification", {"label": pred_label}, gt_label)

    def summary(self) -> dict:
        out = {}
        order = [t for t in TASKS if t in self.metrics] + [t for t in self.metrics if t not in TASKS]
        for task in order:
            out.update(self.metrics[task].summary())
        return out

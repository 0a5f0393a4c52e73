"""Task metrics accumulated over a whole set, one definition for eval and bench.

- Detection (Ultralytics' matching and AP): box mAP50-95 and mAP50 over the classes present in the truth,
  per-class AP50-95, and **class-agnostic AP50** (every box one class: are the items found at all).
- Segmentation: mIoU from one confusion matrix over all pixels of all frames (not a per-batch average), over
  the classes present in truth or prediction, and foreground IoU (item vs background, any class). Truth
  values >= the class count (e.g. 255 for letterbox padding) are ignored.
- Classification: top-1 and the majority-class top-1 (always answering the most frequent true label), so a
  figure can be read against what guessing achieves."""
from __future__ import annotations

import numpy as np
import torch

import pipeline.offline  # noqa: F401
from ultralytics.utils.metrics import ap_per_class, box_iou


class TaskMetrics:
    """Feed per-frame predictions and truth; read ``summary()``."""

    def __init__(self, num_det_classes: int, num_sem_classes: int):
        from ultralytics.models.yolo.detect import DetectionValidator

        self._matcher = DetectionValidator()  # its match_predictions and IoU thresholds 0.50:0.95
        self.iouv = self._matcher.iouv
        self.tp, self.conf, self.pred_cls, self.target_cls = [], [], [], []
        self.tp_any = []  # class-agnostic matches at IoU 0.5
        self.labels: list[int] = []
        self.confusion = np.zeros((num_sem_classes, num_sem_classes), dtype=np.int64)
        self.num_sem = num_sem_classes
        self.correct = self.total = 0

    def add_detection(self, pred: dict, gt_boxes: np.ndarray, gt_classes: np.ndarray) -> None:
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

    def add_segmentation(self, pred: np.ndarray, gt: np.ndarray) -> None:
        valid = gt < self.num_sem
        idx = gt[valid].astype(np.int64) * self.num_sem + pred[valid].astype(np.int64)
        self.confusion += np.bincount(idx, minlength=self.num_sem ** 2).reshape(self.num_sem, self.num_sem)

    def add_classification(self, pred_label: int, gt_label: int) -> None:
        self.correct += int(pred_label == gt_label)
        self.total += 1
        self.labels.append(int(gt_label))

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
        if self.confusion.any():
            inter = np.diag(self.confusion).astype(np.float64)
            union = self.confusion.sum(0) + self.confusion.sum(1) - inter
            present = union > 0
            out["miou"] = float((inter[present] / union[present]).mean() * 100)
            fg_inter = self.confusion[1:, 1:].sum()
            fg_union = self.confusion.sum() - self.confusion[0, 0]
            out["fg_iou"] = float(fg_inter / max(fg_union, 1) * 100)
        if self.total:
            out["top1"] = 100.0 * self.correct / self.total
            out["majority_top1"] = 100.0 * float(np.bincount(self.labels).max()) / self.total
        return out

"""The training recipe: teachers (Ultralytics trainers), stage 1 and stage 2 of the split model, per beta.

Layout of a run directory (``cfg.out``)::

    data/{detect,semantic,classify}/   conveyor-line datasets (Ultralytics layouts), made once
    frames.npz                         the same training frames as arrays, for stages 1 and 2
    teachers/{detect,semantic,classify}/weights/best.pt
    beta_<b>/stage1/last.pt, beta_<b>/stage2/last.pt   resumable training state, every epoch
    beta_<b>/split.pt, beta_<b>/config.yaml            exported checkpoint (CDF tables built) + resolved config

Completed steps (datasets, teachers, exported betas) are skipped on a re-run; a stage interrupted mid-way
continues from its last epoch with ``--resume``.
Multi-GPU: run the same command under ``torchrun --nproc_per_node N``; stages 1 and 2 then wrap the student in
DistributedDataParallel and shard the frames (teachers use Ultralytics' own ``device=0,1,...``).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import core.offline  # noqa: F401
from codec.api import SplitCodec
from codec.config import TrainConfig, dump_config
from codec.model import SplitModel
from codec.student import StudentSpec
from codec.teachers import BODY_END, CLS_HEAD_START, SEM_HEAD_START, MultiTaskTeachers
from conveyor.classes import FRAME_LABELS, SEMANTIC_NAMES
from core.errors import UsageError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dist() -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun; (0, 1, cpu/cuda) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


# ------------------------------------------------------------------------------------------------ data
def _scene(args: tuple) -> object:
    cfg, index = args
    from conveyor.scene import SceneGenerator

    global _SCENES
    if _SCENES is None or _SCENES.cfg != cfg:
        _SCENES = SceneGenerator(cfg)
    return _SCENES.scene(index)


_SCENES = None


def scene_frames(cfg, n: int, workers: int = 1):
    """Scenes 0..n-1 of ``cfg`` (a ``SceneConfig``) in order, rendered by ``workers`` processes."""
    if workers <= 1:
        from conveyor.scene import SceneGenerator

        yield from SceneGenerator(cfg).frames(n)
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_scene, ((cfg, i) for i in range(n)), chunksize=16)


def make_data(cfg: TrainConfig, run: Path) -> tuple[Path, Path]:
    """Render the training scenes once into Ultralytics datasets and a frame-array file (atomic: temp, rename).

    Scenes are independent frames (``conveyor.scene``) with belts from ``cfg.data.belts``; the val split is the
    tail of every 100-frame block, as for video lines."""
    from conveyor.export import DatasetWriter
    from conveyor.scene import SceneConfig

    data_dir, arrays = run / "data", run / "frames.npz"
    scene_cfg = SceneConfig(size=cfg.input_size, seed=cfg.data.seed, items=cfg.data.items, belts=cfg.data.belts)
    keep = min(cfg.data.frames, cfg.data.array_frames)
    if data_dir.is_dir() and arrays.is_file():
        return data_dir, arrays
    tmp = run / "data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = DatasetWriter(tmp, cfg.data.frames, cfg.data.val_fraction, final_root=data_dir)
    images = np.zeros((keep, cfg.input_size, cfg.input_size, 3), np.uint8)
    semantic = np.zeros((keep, cfg.input_size, cfg.input_size), np.uint8)
    labels = np.zeros(keep, np.int64)
    frames = tqdm(scene_frames(scene_cfg, cfg.data.frames, cfg.data.workers), total=cfg.data.frames,
                  desc="training scenes", unit="frame")
    for f in frames:
        writer.write(f)
        if f.index < keep:
            images[f.index], semantic[f.index], labels[f.index] = f.image, f.semantic, f.label
    tmp_arrays = run / "frames.tmp.npz"
    np.savez(tmp_arrays, images=images, semantic=semantic, labels=labels)
    shutil.rmtree(data_dir, ignore_errors=True)
    tmp.rename(data_dir)
    tmp_arrays.rename(arrays)
    return data_dir, arrays


# ------------------------------------------------------------------------------------------------ teachers
def train_teachers(cfg: TrainConfig, run: Path, data_dir: Path) -> MultiTaskTeachers:
    """Detector first (Ultralytics' trainer); then the segmentation head and the station classification head on
    its frozen body's cached features (``train_semantic_head``, ``train_station_head``)."""
    t = cfg.teachers
    if t.detect or t.semantic or t.classify:
        if not (t.detect and t.semantic and t.classify):
            raise UsageError("teachers: bring all three checkpoints (detect, semantic, classify) or none")
        return MultiTaskTeachers.from_checkpoints(t.detect, t.semantic, t.classify)
    from ultralytics import YOLO

    root = (run / "teachers").resolve()
    final = root / "teachers.pt"
    if final.is_file():
        return MultiTaskTeachers.from_state(torch.load(final, map_location="cpu", weights_only=True))
    gpu = torch.cuda.is_available()  # Ultralytics' own device handling: GPU 0 (and AMP) where there is one
    common = dict(imgsz=cfg.input_size, batch=t.batch, workers=t.workers, device=0 if gpu else "cpu", plots=True,
                  amp=gpu, seed=cfg.seed, deterministic=not gpu, project=str(root), exist_ok=True, verbose=False,
                  patience=1000)
    common.update(t.train_args)  # e.g. {device: "0,1"} for several GPUs, {nbs: 16}
    jobs = [
        ("detect", t.detect_yaml, data_dir / "detect" / "data.yaml",
         dict(epochs=t.epochs, **({"time": t.time} if t.time else {}))),
    ]

    def detector_bn_eps(trainer) -> None:
        # Ultralytics gives detect/semantic models BatchNorm eps 1e-3 but classify models 1e-5: use the detector's
        # eps everywhere, in the model and its EMA (what the checkpoint keeps), so heads see the body's features.
        for model in (trainer.model, getattr(getattr(trainer, "ema", None), "ema", None)):
            for m in (model.modules() if model is not None else ()):
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eps = 1e-3

    weights = {}
    for name, yaml_file, data, extra in jobs:
        if name == "detect" and t.detect_init and t.epochs == 0:  # the given detector as it is, no more epochs
            if not Path(t.detect_init).is_file():
                raise UsageError(f"teachers.detect_init {t.detect_init}: no such file (teachers.epochs 0 uses it as "
                                 f"the detector); give an Ultralytics detector checkpoint such as "
                                 f"models/teachers/detect.pt")
            print(f"[train] teacher 'detect': {t.detect_init} as it is (teachers.epochs 0)", flush=True)
            weights[name] = Path(t.detect_init)
            continue
        best = root / name / "weights" / "best.pt"
        last = root / name / "weights" / "last.pt"
        if not best.is_file() or _unfinished(last):
            start = t.detect_init if name == "detect" and t.detect_init else yaml_file
            print(f"[train] teacher '{name}': {start} on {data}", flush=True)
            if _unfinished(last):
                model = YOLO(str(last))
                model.add_callback("on_pretrain_routine_end", detector_bn_eps)
                with _torch_threads_kept(model):
                    model.train(resume=True)
            else:
                if start != yaml_file and not Path(start).is_file():
                    raise UsageError(f"teachers.detect_init {start}: no such file; give an Ultralytics detector "
                                     f"checkpoint such as models/teachers/detect.pt, or leave it unset")
                model = YOLO(start)
                model.add_callback("on_pretrain_routine_end", detector_bn_eps)
                kwargs = dict(common, data=str(data), name=name, **extra)
                if name != "detect":
                    kwargs["pretrained"] = str(weights["detect"])
                with _torch_threads_kept(model):
                    model.train(**kwargs)
        weights[name] = best
    from ultralytics.nn.tasks import ClassificationModel, SemanticSegmentationModel, load_checkpoint

    det, _ = load_checkpoint(str(weights["detect"]), device="cpu")
    sem = SemanticSegmentationModel(t.semantic_yaml, nc=len(SEMANTIC_NAMES), verbose=False)
    sem.names = {i: n for i, n in enumerate(SEMANTIC_NAMES)}
    clf = ClassificationModel(t.classify_yaml, nc=len(FRAME_LABELS), verbose=False)
    clf.names = {i: n for i, n in enumerate(FRAME_LABELS)}
    for model in (sem, clf):  # the detector's eps: its backbone is what these heads will read
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps = 1e-3
    teachers = MultiTaskTeachers(det.float(), sem, clf, station=True)  # shares the detector's backbone modules
    arrays = np.load(run / "frames.npz")
    images = arrays["images"]
    train_semantic_head(teachers, images, arrays["semantic"], epochs=t.head_epochs,
                        log=root / "semantic" / "results.csv")
    train_station_head(teachers, images, arrays["labels"], epochs=t.classify_epochs,
                       log=root / "classify" / "results.csv")
    tmp = final.with_suffix(".tmp")
    torch.save(teachers.export_state(), tmp)
    tmp.replace(final)
    return teachers


def threads_restorer(threads: int) -> Callable[[object], None]:
    """An Ultralytics ``on_pretrain_routine_start`` callback that gives torch ``threads`` threads again: the
    trainer's ``select_device`` has just set ``cpu_count - 1`` (one on a 2-core machine) for CPU training, while
    the dataloader workers augment in their own processes. Measured on this 2-core machine (detector, batch 16,
    256 px, 36 batches, twice each): 26.3 / 26.8 s with 2 threads against 42.6 / 45.0 s with Ultralytics' 1."""
    def restore(trainer) -> None:
        torch.set_num_threads(threads)
    return restore


@contextlib.contextmanager
def _torch_threads_kept(model=None) -> Iterator[None]:
    """Keep torch's thread count through an Ultralytics training of ``model``: inside it (callback
    :func:`threads_restorer`) and after it, since the trainer leaves ``cpu_count - 1`` set and the heads and the
    student trained after it in the same process ran on one core (stage 1: 3.3 instead of 5.4 batches/s, measured
    2026-12-07)."""
    threads = torch.get_num_threads()
    if model is not None:
        model.add_callback("on_pretrain_routine_start", threads_restorer(threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _unfinished(last: Path) -> bool:
    """True when an Ultralytics ``last.pt`` belongs to a run that stopped before its final epoch."""
    if not last.is_file():
        return False
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    return ckpt.get("epoch", -1) != -1  # Ultralytics sets epoch -1 once training has finished


def _fit_cached_head(name: str, modules: list[torch.nn.Module], n_train: int, step_loss, evaluate, epochs: int,
                     batch: int, lr: float, log: Path | None, metric: str, keep_initial: bool = False,
                     freeze_norm: bool = False) -> dict:
    """Train head ``modules`` on cached body features: ``step_loss(indices)`` gives a batch's loss,
    ``evaluate()`` the held-out ``metric`` (percent) after each epoch; AdamW with a one-cycle schedule. The heads
    keep the weights of their best epoch (as Ultralytics' ``best.pt``: a small head on cached features can overfit
    before the schedule ends); with ``keep_initial`` the weights as they came are scored first (epoch 0) and kept
    when no epoch beats them, so fine-tuning a trained head cannot make it worse on the held-out frames.
    ``freeze_norm`` keeps BatchNorm statistics as they are (a fine-tuned head's running statistics came from many
    more frames than the cache holds). Writes the learning curve to ``log`` (CSV: epoch, train_loss, metric,
    seconds) and returns the best row."""
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    steps = max(1, math.ceil(n_train / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    gen = torch.Generator().manual_seed(0)
    rows = []
    best: tuple[float, int, list[dict]] | None = None
    t0 = time.perf_counter()
    if keep_initial:
        for m in modules:
            m.eval()
        with torch.no_grad():
            value = float(evaluate())
        rows.append({"epoch": 0, "train_loss": float("nan"), metric: value, "seconds": 0.0})
        best = (value, 0, [copy.deepcopy(m.state_dict()) for m in modules])
        print(f"[train] {name} as it came: {metric} {value:.1f}", flush=True)
    for epoch in range(epochs):
        for m in modules:
            m.train()
            if freeze_norm:
                for norm in m.modules():
                    if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
                        norm.eval()
        order = torch.randperm(n_train, generator=gen)
        total = 0.0
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            loss = step_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        for m in modules:
            m.eval()
        with torch.no_grad():
            value = float(evaluate())
        rows.append({"epoch": epoch + 1, "train_loss": total / n_train, metric: value,
                     "seconds": time.perf_counter() - t0})
        if best is None or value > best[0]:
            best = (value, len(rows) - 1, [copy.deepcopy(m.state_dict()) for m in modules])
        print(f"[train] {name} epoch {epoch + 1}/{epochs}: loss {total / n_train:.4f}, {metric} {value:.1f}",
              flush=True)
    if best is not None:
        for m, state in zip(modules, best[2]):
            m.load_state_dict(state)
        print(f"[train] {name}: kept epoch {rows[best[1]]['epoch']} ({metric} {best[0]:.1f})", flush=True)
    for m in modules:
        m.requires_grad_(False)
        m.eval()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"epoch,train_loss,{metric},seconds\n" + "".join(
            f"{r['epoch']},{r['train_loss']:.5f},{r[metric]:.2f},{r['seconds']:.0f}\n" for r in rows))
    return rows[best[1]] if best is not None else {}


def train_station_head(teachers: MultiTaskTeachers, images: np.ndarray, labels: np.ndarray, epochs: int = 30,
                       batch: int = 64, lr: float = 2e-3, val_fraction: float = 0.1, log: Path | None = None) -> dict:
    """Train the classification head on the station window of the frozen body's features.

    The body is frozen, so its features are computed once (a few seconds per thousand frames) and the head
    trains on the cache; the last ``val_fraction`` of frames is held out for the learning curve in ``log``."""
    from codec.teachers import station_features

    clf = teachers.classify
    feats = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), 32), desc="station features", unit="batch"):
            x = torch.from_numpy(images[i:i + 32]).permute(0, 3, 1, 2).float().div(255.0)
            feats.append(station_features(teachers, x))
    feats_t = torch.cat(feats)
    y = torch.from_numpy(np.asarray(labels)).long()
    n_val = max(1, int(len(y) * val_fraction))
    xtr, ytr, xva, yva = feats_t[:-n_val], y[:-n_val], feats_t[-n_val:], y[-n_val:]
    head = torch.nn.Sequential(*[clf.model[i] for i in range(CLS_HEAD_START, len(clf.model))])

    def step_loss(idx):
        out = head(xtr[idx])
        logits = out[1] if isinstance(out, (tuple, list)) else out
        return F.cross_entropy(logits, ytr[idx], label_smoothing=0.05)

    def evaluate():
        pred = torch.cat([_probs(head(xva[i:i + 256])) for i in range(0, len(yva), 256)]).argmax(1)
        return (pred == yva).float().mean() * 100

    return _fit_cached_head("station head", [head], len(ytr), step_loss, evaluate, epochs, batch, lr, log,
                            "val_top1")


def head_taps(model: torch.nn.Module, start: int) -> list[int]:
    """The body layers (below ``start``) that ``model``'s layers from ``start`` on read."""
    return sorted({j for m in model.model[start:] for j in ([m.f] if isinstance(m.f, int) else m.f)
                   if j != -1 and j < start} | {start - 1})


def cache_body_features(bodies: list, images: np.ndarray, taps: list[int], batch: int = 32) -> dict[int, torch.Tensor]:
    """Body layers ``taps`` for every frame under every body (half precision, body k's frame i at row k * n + i):
    computed once, so a head trained on them costs the head alone per epoch. ``bodies``: functions frame batch
    (B, 3, S, S in 0..1) -> body feature cache (layer -> tensor)."""
    cached: dict[int, list[torch.Tensor]] = {j: [] for j in taps}
    with torch.no_grad():
        for body in bodies:
            for i in tqdm(range(0, len(images), batch), desc="body features", unit="batch"):
                x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float().div(255.0)
                cache = body(x)
                for j in taps:
                    cached[j].append(cache[j].half())
    return {j: torch.cat(v) for j, v in cached.items()}


class _HeadCache(NamedTuple):
    """A head's training data: body features of every frame under every body, and which rows train and validate."""

    taps: list[int]
    feats: dict[int, torch.Tensor]
    n: int  # frames
    n_train: int  # the first n_train frames train, the rest (under the last body) validate
    train_rows: torch.Tensor  # rows of feats that train: every body's first n_train frames
    val_start: int  # row of the last body's first held-out frame


def _head_cache(model: torch.nn.Module, start: int, teachers: MultiTaskTeachers, images: np.ndarray,
                bodies: list | None, features: dict[int, torch.Tensor] | None, val_fraction: float) -> _HeadCache:
    """The cache for ``model``'s head (layers from ``start``): ``features`` when given, else computed; the last
    ``val_fraction`` of frames is held out under every body and validated under the last."""
    taps = head_taps(model, start)
    bodies = bodies or [teachers.backbone]
    feats = features if features is not None else cache_body_features(bodies, images, taps)
    n = len(images)
    n_train = n - max(1, int(n * val_fraction))
    train_rows = torch.cat([torch.arange(k * n, k * n + n_train) for k in range(len(bodies))])
    return _HeadCache(taps, feats, n, n_train, train_rows, (len(bodies) - 1) * n + n_train)


def train_semantic_head(teachers: MultiTaskTeachers, images: np.ndarray, semantic: np.ndarray, epochs: int = 12,
                        batch: int = 32, lr: float = 2e-3, val_fraction: float = 0.1, log: Path | None = None,
                        bodies: list | None = None, features: dict[int, torch.Tensor] | None = None) -> dict:
    """Train the segmentation head (yolo26-sem layers 11-17) on the frozen body's cached features.

    The head reads body layers 4, 6 and 10; they are computed once (half precision, about 0.4 MB per frame at
    256 px), so an epoch costs the head alone: on 2 CPU cores many epochs take the time Ultralytics' trainer
    needs for one, since it recomputes the frozen body and its augmentation every step. Loss: cross-entropy of the
    upsampled logits (and 0.4 x the auxiliary output's) plus soft Dice, so small garments weigh against the
    background; validation: mIoU from one confusion matrix at full resolution (``log`` column ``val_miou``).

    ``bodies``: functions frame batch -> body feature cache, each giving the head one more copy of the training
    frames (default: the teachers' body alone). With the split model's decoded path as the last one, the head
    learns from the teachers' features and from what the server will really give it, and is validated on the
    latter. ``features``: the same bodies' :func:`cache_body_features`, when already computed."""
    from codec.metrics import SegmentationMetric
    from codec.teachers import run_layers

    sem = teachers.semantic
    taps, feats, n, n_train, train_rows, val_start = _head_cache(sem, SEM_HEAD_START, teachers, images, bodies,
                                                                 features, val_fraction)
    side = 128  # loss resolution: logits upsampled, masks subsampled (nearest)
    masks = torch.from_numpy(np.stack([cv2_resize_nearest(m, side) for m in semantic])).long()
    num = _num_semantic_classes(sem)
    head = [sem.model[i] for i in range(SEM_HEAD_START, len(sem.model))]

    def forward(idx) -> tuple:
        c = {j: feats[j][idx].float() for j in taps}
        out = run_layers(sem, c, SEM_HEAD_START)
        return out if isinstance(out, (tuple, list)) else (out,)

    def step_loss(idx):
        idx = train_rows[idx]
        outs = forward(idx)
        target = masks[idx % n]
        loss = 0.0
        for k, logits in enumerate(outs):
            up = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
            weight = 1.0 if k == 0 else 0.4
            loss = loss + weight * F.cross_entropy(up, target)
            if k == 0:
                prob = up.softmax(1)
                onehot = F.one_hot(target, num).permute(0, 3, 1, 2).float()
                inter = (prob * onehot).sum((0, 2, 3))
                dice = 1 - (2 * inter + 1) / (prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
                loss = loss + dice[onehot.sum((0, 2, 3)) > 0].mean()
        return loss

    def evaluate():
        metric = SegmentationMetric(num)
        for i in range(n_train, n, 32):
            idx = torch.arange(i, min(i + 32, n))
            logits = forward(idx - n_train + val_start)[0]
            up = F.interpolate(logits.contiguous(memory_format=torch.channels_last),
                               size=semantic.shape[1:], mode="bilinear", align_corners=False)
            for p, g in zip(up.argmax(1).numpy(), semantic[i:i + 32]):
                metric.add(p, g)
        return metric.summary().get("miou", 0.0)

    return _fit_cached_head("segmentation head", head, len(train_rows), step_loss, evaluate, epochs, batch, lr,
                            log, "val_miou")


def read_detection_labels(data_dir: Path, count: int) -> list[np.ndarray]:
    """Boxes of training scenes ``0 .. count-1`` from the run's Ultralytics detection dataset: one ``(N, 5)``
    array per scene, rows ``class, cx, cy, w, h`` normalised to the frame (the files ``make_data`` wrote)."""
    labels = []
    for i in range(count):
        paths = [data_dir / "detect" / "labels" / split / f"{i:06d}.txt" for split in ("train", "val")]
        path = next((p for p in paths if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no detection labels for training scene {i} under {data_dir / 'detect'}: "
                                    f"remove {data_dir} and its frames.npz to render the scenes again")
        text = path.read_text(encoding="utf-8").strip()
        rows = np.array([line.split() for line in text.splitlines()], np.float32) if text else np.zeros((0, 5))
        labels.append(rows.reshape(-1, 5).astype(np.float32))
    return labels


def train_detection_head(teachers: MultiTaskTeachers, images: np.ndarray, labels: list[np.ndarray],
                         epochs: int = 3, batch: int = 16, lr: float = 1e-4, val_fraction: float = 0.1,
                         log: Path | None = None, bodies: list | None = None,
                         features: dict[int, torch.Tensor] | None = None) -> dict:
    """Fine-tune the detector's neck and head (layers 11 on) on cached body features, the detection counterpart
    of :func:`train_semantic_head` (same ``bodies`` and ``features``).

    Loss: Ultralytics' own detection loss (task-aligned assignment, box, class and DFL/L1 terms with its default
    gains) on the branch the server decodes (one-to-many with NMS, or one-to-one for an end-to-end detector), with
    ``labels`` from :func:`read_detection_labels`; BatchNorm statistics stay as the detector's training left them.
    Validation: box mAP50-95 on the last body's held-out frames (``log`` column ``val_map50_95``); the weights as
    they came are scored first and kept when no epoch beats them."""
    from types import SimpleNamespace

    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss
    from ultralytics.utils.ops import xywh2xyxy

    from codec.metrics import DetectionMetric
    from codec.teachers import postprocess, run_layers

    det = teachers.detect
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} label sets for {len(images)} frames")
    taps, feats, n, n_train, train_rows, val_start = _head_cache(det, BODY_END, teachers, images, bodies, features,
                                                                 val_fraction)
    side = images.shape[1]
    end2end = bool(getattr(det, "end2end", False))
    branch = "one2one" if end2end else "one2many"
    # the loss reads the model's hyperparameters (Ultralytics' defaults), its Detect layer and its device
    owner = SimpleNamespace(args=get_cfg(), model=det.model, parameters=det.parameters)
    criterion = v8DetectionLoss(owner, tal_topk=7, tal_topk2=1) if end2end else v8DetectionLoss(owner)
    head = [det.model[i] for i in range(BODY_END, len(det.model))]

    def forward(idx):
        return run_layers(det, {j: feats[j][idx].float() for j in taps}, BODY_END)

    def step_loss(idx):
        rows = train_rows[idx]
        preds = forward(rows)
        preds = preds[branch] if branch in preds else preds
        targets = [torch.from_numpy(labels[int(r) % n]) for r in rows]
        found = torch.cat(targets)
        batch_data = {"batch_idx": torch.cat([torch.full((len(t),), k, dtype=torch.float32)
                                              for k, t in enumerate(targets)]),
                      "cls": found[:, 0], "bboxes": found[:, 1:5]}
        return criterion.get_assigned_targets_and_loss(preds, batch_data)[1].sum()

    def evaluate():
        metric = DetectionMetric()
        for i in range(n_train, n, 32):
            idx = torch.arange(i, min(i + 32, n))
            results = postprocess("detection", forward(idx - n_train + val_start), side, conf=0.001,
                                  end2end=end2end)
            for k, result in zip(idx.tolist(), results):
                truth = labels[k]
                metric.add(result, (xywh2xyxy(truth[:, 1:5]) * side, truth[:, 0].astype(np.int64)))
        return metric.summary().get("box_map50_95", 0.0)

    return _fit_cached_head("detection head", head, len(train_rows), step_loss, evaluate, epochs, batch, lr,
                            log, "val_map50_95", keep_initial=True, freeze_norm=True)


def cv2_resize_nearest(mask: np.ndarray, side: int) -> np.ndarray:
    import cv2

    return cv2.resize(mask, (side, side), interpolation=cv2.INTER_NEAREST)


def _num_semantic_classes(model) -> int:
    return int(model.model[-1].nc)


def _probs(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ------------------------------------------------------------------------------------------------ student
def build_split_model(cfg: TrainConfig, teachers: MultiTaskTeachers) -> SplitModel:
    spec = StudentSpec(latent_channels=cfg.student.latent_channels,
                       encoder_channels=tuple(cfg.student.encoder_channels),
                       decoder_channels=tuple(cfg.student.decoder_channels),
                       encoder_kernels=tuple(cfg.student.encoder_kernels),
                       split_channels=teachers.split_channels)
    return SplitModel(teachers, spec, cfg.input_size)


def rate_bpp(likelihoods: torch.Tensor, pixels: int) -> torch.Tensor:
    """Bits per input pixel of the latent under the entropy model (the rate term)."""
    return -torch.log2(likelihoods.clamp_min(1e-9)).sum() / (likelihoods.shape[0] * pixels)


def stage1_loss(model: SplitModel, x: torch.Tensor, beta: float, layers: list[int],
                foreground: torch.Tensor | None = None, foreground_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Sum over backbone stages of MSE(student, teacher) + beta * bits per pixel. With ``foreground`` (B, H, W)
    bool item pixels and ``foreground_weight`` w > 0, each stage's MSE is a weighted mean over its grid: a cell
    with an item pixel weighs 1 + w, the belt 1 (``foreground_weighted_mse``)."""
    with torch.no_grad():
        target = model.teacher_features(x)
    out = model.forward_train(x)
    # each stage's MSE relative to the teacher feature's variance: beta means the same for any teacher scale
    if foreground is not None and foreground_weight > 0:
        def error(s, t):
            return foreground_weighted_mse(s, t, foreground, foreground_weight)
    else:
        error = F.mse_loss  # the uniform mean, bit for bit as before the weighting existed
    mse = sum(error(out["features"][i], target[i]) / target[i].var().clamp_min(1e-6) for i in layers)
    bpp = rate_bpp(out["likelihoods"], x.shape[-1] * x.shape[-2])
    return mse + beta * bpp, {"mse": float(mse.detach()), "bpp": float(bpp.detach())}


def foreground_weighted_mse(student: torch.Tensor, teacher: torch.Tensor, foreground: torch.Tensor,
                            weight: float) -> torch.Tensor:
    """Squared error of a (B, C, h, w) feature, averaged over channels, then a weighted mean over the grid: a cell
    weighs ``1 + weight`` when any pixel of ``foreground`` (B, H, W) under it is an item (max pooling: a cell on an
    item's edge counts as the item's), else 1. ``weight`` 0 gives ``F.mse_loss``'s value."""
    se = (student - teacher).pow(2).mean(1)  # (B, h, w)
    cells = F.adaptive_max_pool2d(foreground[:, None].float(), se.shape[-2:])[:, 0]
    w = 1.0 + weight * cells
    return (se * w).sum() / w.sum()


def stage2_loss(model: SplitModel, x: torch.Tensor, semantic: torch.Tensor, labels: torch.Tensor,
                cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """Task losses (CE on the frame label and the class map) + distillation (KL to the teachers, feature MSE)."""
    s2, teachers = cfg.stage2, model.teachers
    with torch.no_grad():
        t_cache = teachers.backbone(x)
        t_cls = teachers.head_raw("classification", t_cache)
        t_sem = teachers.head_raw("segmentation", t_cache)
        t_det = teachers.head_raw("detection", t_cache)
    y_hat = model.rounded_latent(x)
    cache = model.body_from_split(model.decoder(y_hat))
    s_cls = teachers.head_raw("classification", cache)
    s_sem = teachers.head_raw("segmentation", cache)
    s_det = teachers.head_raw("detection", cache)
    # eval-mode heads: classify -> (probs, logits); semantic -> logits at 1/8; detect -> (decoded, raw dict)
    s_logits, p_t = s_cls[1], t_cls[0]
    cls_loss = (1 - s2.kd_weight) * F.cross_entropy(s_logits, labels) + s2.kd_weight * F.kl_div(
        F.log_softmax(s_logits, 1), p_t, reduction="batchmean")
    l_sem_s, l_sem_t = _first(s_sem), _first(t_sem)
    target = F.interpolate(semantic[:, None].float(), size=l_sem_s.shape[-2:], mode="nearest")[:, 0].long()
    sem_loss = 0.5 * F.cross_entropy(l_sem_s, target) + 0.5 * F.kl_div(
        F.log_softmax(l_sem_s, 1), F.softmax(l_sem_t, 1), reduction="batchmean") / l_sem_s[0, 0].numel()
    s_raw, t_raw = s_det[1]["one2many"], t_det[1]["one2many"]
    det_loss = detection_distillation(s_raw, t_raw, s2.det_anchor_weight)
    if s2.det_class_kl:
        det_loss = det_loss + s2.det_class_kl * detection_class_kl(s_raw["scores"], t_raw["scores"])
    feat = sum(F.mse_loss(cache[i], t_cache[i]) for i in cfg.stage1.feature_layers)
    loss = cls_loss + sem_loss + det_loss + s2.feature_weight * feat
    return loss, {"cls": float(cls_loss), "sem": float(sem_loss), "det": float(det_loss), "feat": float(feat)}


ANCHOR_FLOOR = 0.05  # "teacher" anchor weighting: what a background anchor still weighs, against up to 1 for an item


def detection_distillation(student: dict, teacher: dict, anchor_weight: str = "uniform") -> torch.Tensor:
    """Distance of the student's raw detection output (``scores`` (B, classes, anchors) logits, ``boxes``
    (B, 4, anchors)) from the teacher's: BCE of the scores against the teacher's probabilities plus smooth L1 of the
    boxes. ``anchor_weight`` "uniform" averages over every anchor; "teacher" weighs each by the teacher's best class
    probability (plus ``ANCHOR_FLOOR`` for the scores, so background stays background): a frame has a few items
    among about 1,300 anchors, and a uniform mean is almost all background."""
    target = torch.sigmoid(teacher["scores"])
    scores = F.binary_cross_entropy_with_logits(student["scores"], target, reduction="none").mean(1)  # (B, anchors)
    boxes = F.smooth_l1_loss(student["boxes"], teacher["boxes"], reduction="none").mean(1)
    if anchor_weight == "uniform":
        return scores.mean() + boxes.mean()
    conf = target.amax(1)
    score_w = conf + ANCHOR_FLOOR
    return (scores * score_w).sum() / score_w.sum() + (boxes * conf).sum() / conf.sum().clamp_min(1e-6)


def detection_class_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL from the teacher's class distribution (softmax over the class logits, (B, classes, anchors)) to the
    student's at each anchor, weighed by the teacher's best class probability there: the items' anchors, where
    which garment ranks first decides the name the station label reads."""
    kl = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), reduction="none", log_target=True).sum(1)
    conf = torch.sigmoid(teacher).amax(1)
    return (kl * conf).sum() / conf.sum().clamp_min(1e-6)


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _random_crops(images: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    if crop >= images.shape[-1]:
        return images
    h, w = images.shape[-2:]
    out = []
    for img in images:
        top = int(torch.randint(0, (h - crop) // 4 + 1, (1,), generator=gen)) * 4
        left = int(torch.randint(0, (w - crop) // 4 + 1, (1,), generator=gen)) * 4
        out.append(img[:, top:top + crop, left:left + crop])
    return torch.stack(out)


def _save_state(path: Path, state: dict, cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    dump_config(cfg, path.parent / "config.yaml")


def _epochs(stage_dir: Path, total: int, resume: bool, model: torch.nn.Module, optims: list) -> int:
    """Load the last per-epoch checkpoint of a stage when resuming; return the epoch to start at."""
    last = stage_dir / "last.pt"
    if not last.is_file():
        return 0
    if not resume:
        raise UsageError(f"{last} exists from an earlier run: pass --resume to continue it, "
                         f"or --out DIR to start a new run")
    state = torch.load(last, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"], strict=False)
    for opt, s in zip(optims, state["optims"]):
        opt.load_state_dict(s)
    print(f"[train] resumed {stage_dir} at epoch {state['epoch'] + 1}/{total}", flush=True)
    return int(state["epoch"]) + 1


def _student_state(model: SplitModel) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("teachers.")}


def run_stage1(cfg: TrainConfig, model: SplitModel, images: np.ndarray, beta: float, stage_dir: Path,
               resume: bool, semantic: np.ndarray | None = None) -> None:
    """Stage 1 at ``beta``; ``semantic`` (N, H, W) class maps give the item pixels when
    ``stage1.foreground_weight`` > 0."""
    rank, world, device = _dist()
    s1 = cfg.stage1
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("teachers.")]
    density = [p for n, p in named if n.startswith("entropy_bottleneck.") and not n.endswith(".quantiles")]
    nets = [p for n, p in named if not n.startswith("entropy_bottleneck.")]
    aux = [p for n, p in named if n.endswith(".quantiles")]
    params = nets + density
    opt = torch.optim.Adam([{"params": nets, "lr": s1.lr}, {"params": density, "lr": s1.eb_lr}])
    aux_opt = torch.optim.Adam(aux, lr=s1.aux_lr)
    start = _epochs(stage_dir, s1.epochs, resume, model, [opt, aux_opt])
    model.to(device)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    n = len(images)
    steps = math.ceil(n / world / s1.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, s1.epochs * steps), eta_min=1e-5)
    for _ in range(start * steps):
        sched.step()
    warmup_steps = s1.beta_warmup_epochs * steps
    weigh_items = s1.foreground_weight > 0
    if weigh_items and (semantic is None or semantic.shape != images.shape[:3]):
        raise ValueError(f"stage1.foreground_weight {s1.foreground_weight} needs the class maps of the training frames "
                         f"(frames.npz 'semantic', shape {images.shape[:3]})")
    first_mse: float | None = None
    for epoch in range(start, s1.epochs):
        seen: dict[str, list[float]] = {"mse": [], "bpp": []}
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(n, generator=gen)[rank::world]
        model.encoder.train(), model.decoder.train(), model.entropy_bottleneck.train()
        bar = tqdm(range(steps), desc=f"stage1 beta={beta} epoch {epoch + 1}/{s1.epochs}", disable=rank != 0)
        for step in bar:
            idx = order[step * s1.batch:(step + 1) * s1.batch]
            if len(idx) == 0:
                continue
            x = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float().div(255.0)
            fg = None
            if weigh_items:  # the class maps ride along as a fourth channel so both take the same crop
                x = torch.cat([x, torch.from_numpy(semantic[idx.numpy()] > 0)[:, None].float()], 1)
            x = _random_crops(x, s1.crop, gen).to(device)
            if weigh_items:
                x, fg = x[:, :3], x[:, 3] > 0.5
            done = epoch * steps + step
            beta_now = beta * min(1.0, (done + 1) / warmup_steps) if warmup_steps > 0 else beta
            loss, parts = stage1_loss(train_model.module if world > 1 else model, x, beta_now, s1.feature_layers,
                                      fg, s1.foreground_weight)
            seen["mse"].append(parts["mse"])
            seen["bpp"].append(parts["bpp"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            aux_loss = model.entropy_bottleneck.loss()
            aux_opt.zero_grad(set_to_none=True)
            aux_loss.backward()
            aux_opt.step()
            bar.set_postfix(mse=f"{parts['mse']:.4f}", bpp=f"{parts['bpp']:.3f}",
                            kb=f"{parts['bpp'] * cfg.input_size ** 2 / 8192:.2f}")
        if rank == 0:
            _save_state(stage_dir / "last.pt", {"epoch": epoch, "model": _student_state(model),
                                                 "optims": [opt.state_dict(), aux_opt.state_dict()]}, cfg)
        mse, bpp = (float(np.mean(seen[k])) if seen[k] else 0.0 for k in ("mse", "bpp"))
        first_mse = mse if first_mse is None else first_mse
        check_stage1_collapse(epoch - start, mse, first_mse, bpp, beta)


def check_stage1_collapse(epochs_done: int, mse: float, first_mse: float, bpp: float, beta: float) -> None:
    """Stop a stage 1 whose latent collapsed: after 3 epochs almost no bits (< 0.01 per pixel) and a feature
    error no lower than in its first epoch. The rate term won before the features mattered; more epochs do not
    bring it back (measured: 12 epochs at 0.003-0.006 bits per pixel, the error flat at 4.7-5.1)."""
    if epochs_done >= 2 and bpp < 0.01 and mse > 0.9 * first_mse:
        raise RuntimeError(
            f"stage 1 at beta {beta} collapsed: the latent carries {bpp:.4f} bits per pixel and the feature error "
            f"stays at {mse:.2f} (first epoch {first_mse:.2f}); retrain with a rate warm-up, e.g. --set "
            f"stage1.beta_warmup_epochs=1, or a smaller --beta")


def run_stage2(cfg: TrainConfig, model: SplitModel, arrays: dict, stage_dir: Path, resume: bool) -> None:
    rank, world, device = _dist()
    s2 = cfg.stage2
    model.encoder.requires_grad_(False)
    model.entropy_bottleneck.requires_grad_(False)
    params = list(model.decoder.parameters())
    opt = torch.optim.Adam(params, lr=s2.lr)
    start = _epochs(stage_dir, s2.epochs, resume, model, [opt])
    images, semantic, labels = arrays["images"], arrays["semantic"], arrays["labels"]
    n = len(images)
    steps = math.ceil(n / world / s2.batch)
    for epoch in range(start, s2.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 2000 + epoch)
        order = torch.randperm(n, generator=gen)[rank::world]
        model.encoder.eval(), model.entropy_bottleneck.eval(), model.decoder.train()
        bar = tqdm(range(steps), desc=f"stage2 epoch {epoch + 1}/{s2.epochs}", disable=rank != 0)
        for step in bar:
            idx = order[step * s2.batch:(step + 1) * s2.batch].numpy()
            if len(idx) == 0:
                continue
            x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float().div(255.0).to(device)
            sem = torch.from_numpy(semantic[idx]).long().to(device)
            lab = torch.from_numpy(labels[idx]).long().to(device)
            loss, parts = stage2_loss(model, x, sem, lab, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
        if rank == 0:
            _save_state(stage_dir / "last.pt", {"epoch": epoch, "model": _student_state(model),
                                                 "optims": [opt.state_dict()]}, cfg)


def run_heads_step(cfg: TrainConfig, model: SplitModel, arrays: dict, data_dir: Path, out: Path) -> None:
    """After stage 2: the segmentation head, then the detector's neck and head, retrained on the teachers' and the
    student's decoded body features (computed once for both), each validated on the student's path."""
    s2 = cfg.stage2
    model.eval()
    bodies = [model.teachers.backbone, model.decoded_features]
    taps = sorted(set(head_taps(model.teachers.semantic, SEM_HEAD_START)) | set(head_taps(model.teachers.detect,
                                                                                          BODY_END)))
    features = cache_body_features(bodies, arrays["images"], taps)
    if s2.semantic_head_epochs > 0:
        train_semantic_head(model.teachers, arrays["images"], arrays["semantic"], epochs=s2.semantic_head_epochs,
                            log=out / "semantic_head.csv", bodies=bodies, features=features)
    if s2.detect_head_epochs > 0:
        labels = read_detection_labels(data_dir, len(arrays["images"]))
        train_detection_head(model.teachers, arrays["images"], labels, epochs=s2.detect_head_epochs,
                             log=out / "detect_head.csv", bodies=bodies, features=features)


def export_parts(export: str | Path) -> list[Path]:
    """Every file ``export_default`` writes for ``export``: the checkpoint, its config, the torch edge and the
    torch-free edge (ONNX + tables)."""
    from codec.edge_onnx import edge_paths

    export = Path(export)
    return [export, export.with_suffix(".yaml"), export.with_suffix(".edge.pt"), *edge_paths(export)]


def export_default(cfg: TrainConfig, final: Path) -> None:
    """Copy the default-rate checkpoint to ``cfg.export`` (the shipped model), with its config and edge part."""
    if not cfg.export:
        return
    from codec.api import load_codec

    export = Path(cfg.export)
    export.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(final, export)
    dump_config(cfg, export.with_suffix(".yaml"))
    codec = load_codec(export)
    codec.save_edge(export.with_suffix(".edge.pt"))
    from codec.edge_onnx import export_edge

    onnx_path, npz_path = export_edge(codec, export)  # the torch-free device half; fails unless symbols match
    print(f"[train] exported {export} (+ {export.with_suffix('.edge.pt').name}, {onnx_path.name}, {npz_path.name}, "
          f"{export.with_suffix('.yaml').name})", flush=True)


def train(cfg: TrainConfig, resume: bool = False, only_beta: float | None = None,
          until: str | None = None) -> dict[float, Path]:
    """The whole recipe (or up to ``until``: 'data' or 'teachers'). Returns {beta: exported checkpoint}."""
    seed_everything(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run / "config.yaml")
    t0 = time.perf_counter()
    data_dir, arrays_path = make_data(cfg, run)
    if until == "data":
        return {}
    teachers = train_teachers(cfg, run, data_dir)
    if until == "teachers":
        return {}
    print(f"[train] data + teachers ready after {time.perf_counter() - t0:.0f} s", flush=True)
    arrays = dict(np.load(arrays_path))
    results = {}
    # the shipped (default) rate first, so a cut-short run still leaves the model the demo needs
    order = sorted(cfg.betas, key=lambda b: b != cfg.default_beta)
    for beta in order:
        if only_beta is not None and beta != only_beta:
            continue
        out = run / f"beta_{beta:g}"
        final = out / "split.pt"
        if final.is_file():
            results[beta] = final
            # a run whose export was cut short (e.g. the edge export's check failed) is completed on --resume
            if beta == cfg.default_beta and cfg.export and not all(p.is_file() for p in export_parts(cfg.export)):
                export_default(cfg, final)
            continue
        seed_everything(cfg.seed)
        # each rate gets the teachers as trained: the heads retrained on one student's features after stage 2
        # (stage2.semantic_head_epochs, stage2.detect_head_epochs) must not carry over to the next rate's
        heads_step = cfg.stage2.semantic_head_epochs > 0 or cfg.stage2.detect_head_epochs > 0
        model = build_split_model(cfg, copy.deepcopy(teachers) if heads_step else teachers)
        tb = time.perf_counter()
        run_stage1(cfg, model, arrays["images"], beta, out / "stage1", resume, arrays["semantic"])
        if cfg.stage2.epochs > 0:
            run_stage2(cfg, model, arrays, out / "stage2", resume)
        if heads_step:  # the heads are shared: the teachers' figures change with them
            run_heads_step(cfg, model, arrays, data_dir, out)
        model.entropy_bottleneck.update(force=True)
        codec = SplitCodec(model.eval())
        codec.save(final, extra={"beta": beta, "config": cfg.to_dict(), "cpu_seconds": time.perf_counter() - tb})
        dump_config(cfg, out / "config.yaml")
        print(f"[train] beta={beta:g}: {final} ({time.perf_counter() - tb:.0f} s)", flush=True)
        results[beta] = final
        if beta == cfg.default_beta:
            export_default(cfg, final)
    print(f"[train] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return results

"""Training configuration: dataclasses loaded from YAML (``yaml.safe_load``), unknown keys rejected by name."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.errors import UsageError


@dataclass
class DataConfig:
    """Training scenes (``conveyor.scene``: every frame drawn independently, belts from the training families),
    generated once per run directory."""

    frames: int = 2000
    seed: int = 1000  # eval uses other seeds, belts from held-out families and unseen garments
    val_fraction: float = 0.1
    items: str = "auto"
    belts: str = "train"  # belt set or family (conveyor.belts); 'heldout' families are for evaluation
    array_frames: int = 4000  # how many of the frames stages 1 and 2 of the student keep in memory
    workers: int = 2  # processes rendering scenes


@dataclass
class TeacherConfig:
    """Ultralytics training of the three teachers, or checkpoints a user brings (then nothing is trained)."""

    detect_yaml: str = "yolo26n.yaml"
    semantic_yaml: str = "yolo26n-sem.yaml"
    classify_yaml: str = "yolo26n-cls.yaml"
    epochs: int = 8  # 0 with detect_init: that detector as it is, no more training
    time: float | None = None  # hours for the detector instead of epochs (Ultralytics fits its schedule to it)
    head_epochs: int = 10  # segmentation head on the frozen body's cached features
    classify_epochs: int = 30  # station classification head on cached body features (seconds per epoch)
    batch: int = 32
    workers: int = 2
    train_args: dict = field(default_factory=dict)  # more Ultralytics train() arguments, e.g. {nbs: 16, flipud: 0.5}
    detect_init: str | None = None  # start the detector from these Ultralytics weights (continue an earlier run,
    # e.g. models/teachers/detect.pt) instead of from scratch; the heads are then trained anew on its backbone
    detect: str | None = None  # bring-your-own checkpoints (all three, sharing the detector's backbone)
    semantic: str | None = None
    classify: str | None = None


@dataclass
class StudentConfig:
    latent_channels: int = 24
    encoder_channels: list[int] = field(default_factory=lambda: [32, 24])
    decoder_channels: list[int] = field(default_factory=lambda: [96, 64])
    encoder_kernels: list[int] = field(default_factory=lambda: [5, 5])  # odd sizes of the two stride-2 convolutions


@dataclass
class Stage1Config:
    """Encoder + entropy model + decoder: feature MSE against the frozen teachers plus beta times the rate."""

    epochs: int = 4
    batch: int = 16
    crop: int = 128  # fully convolutional: train on crops, 4x cheaper than whole 256 px frames
    lr: float = 2e-3  # encoder and decoder
    eb_lr: float = 1e-2  # the entropy model's density: it must sharpen within a few hundred steps
    aux_lr: float = 1e-2  # the entropy model's quantiles (auxiliary loss)
    feature_layers: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 10])
    # beta ramps from 0 over this many epochs: without it the rate term can win before the features matter and
    # the latent collapses to nothing (measured on the detector of 2026-12-07: 0.004 bits per pixel, no learning)
    beta_warmup_epochs: float = 0.0
    # item pixels' share of the feature error: each feature cell holding an item pixel (the class map, max-pooled to
    # the feature's grid) counts 1 + this in a weighted mean, the belt 1. Uniform (0) spends bits and error on belt
    # texture, which no task reads; a weight moves both to the items the tasks are about
    foreground_weight: float = 0.0


DET_ANCHOR_WEIGHTS = ("uniform", "teacher")


@dataclass
class Stage2Config:
    """Encoder and entropy model frozen; decoder fine-tuned with task losses and distillation from the teachers."""

    epochs: int = 1
    batch: int = 16
    lr: float = 2e-4
    kd_weight: float = 0.5  # classification: (1-kd) CE + kd KL, as Ladon
    feature_weight: float = 1.0
    # detection distillation over the head's anchors: "uniform" (every anchor alike: nearly all are background, so
    # the few that hold an item barely count) or "teacher" (each anchor weighs by the teacher's best class
    # probability there plus a small floor: the boxes and scores of the items the teacher sees)
    det_anchor_weight: str = "uniform"
    # weight of a class-distribution term at the item anchors: KL from the teacher's softmax over class logits to
    # the student's, each anchor weighed by the teacher's confidence (codec.train.detection_class_kl). Per-class BCE
    # matches each probability alone; the KL pulls on which class ranks first, the one the station label reads
    det_class_kl: float = 0.0
    # then the segmentation head retrained on the teachers' and the student's body features, best epoch by mIoU on
    # the student's (codec.train.train_semantic_head ``bodies``); 0: the teachers' head as trained on their own
    semantic_head_epochs: int = 0
    # then the detector's neck and head likewise, best epoch by box mAP50-95 on the student's path, the detector as
    # it came kept when no epoch beats it (codec.train.train_detection_head); 0: the detector as trained
    detect_head_epochs: int = 0


@dataclass
class TrainConfig:
    seed: int = 0
    out: str = "runs/default"
    input_size: int = 256
    betas: list[float] = field(default_factory=lambda: [0.05, 0.4, 3.2])
    default_beta: float | None = 0.4  # exported as the shipped model when `export` is set
    export: str | None = None  # e.g. models/default.pt
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, raw: Any, where: str, source: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: '{where}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            name = f"{where}.{key}" if where else key
            raise UsageError(f"{source}: unknown key '{name}'; allowed: {', '.join(sorted(fields))}")
        ftype = fields[key].type
        sub = {"DataConfig": DataConfig, "TeacherConfig": TeacherConfig, "StudentConfig": StudentConfig,
               "Stage1Config": Stage1Config, "Stage2Config": Stage2Config}.get(str(ftype))
        kwargs[key] = _build(sub, value, f"{where}.{key}" if where else key, source) if sub else value
    return cls(**kwargs)


def load_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    """Load a YAML config (None: built-in defaults) and apply ``overrides`` (dotted keys)."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UsageError(f"config file not found: {path}; see configs/train/ for examples")
        raw = yaml.safe_load(path.read_text()) or {}
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    cfg = _build(TrainConfig, raw, "", source)
    if cfg.input_size % 32:
        raise UsageError(f"{source}: input_size {cfg.input_size} must be a multiple of 32 (e.g. 256 or 320)")
    if not 0 <= cfg.stage1.beta_warmup_epochs <= cfg.stage1.epochs:
        raise UsageError(f"{source}: stage1.beta_warmup_epochs {cfg.stage1.beta_warmup_epochs} must be between 0 and "
                         f"stage1.epochs ({cfg.stage1.epochs}), e.g. 1")
    if not 0 <= cfg.stage1.foreground_weight <= 100:
        raise UsageError(f"{source}: stage1.foreground_weight {cfg.stage1.foreground_weight} must be between 0 (a "
                         f"uniform feature error) and 100, e.g. 4")
    kernels = cfg.student.encoder_kernels
    if len(kernels) != 2 or any(type(k) is not int or k < 1 or k % 2 == 0 or k > 9 for k in kernels):
        raise UsageError(f"{source}: student.encoder_kernels {kernels} must be two odd sizes from 1 to 9, e.g. [5, 3]")
    if cfg.stage1.crop % 32 or cfg.stage1.crop > cfg.input_size:
        raise UsageError(f"{source}: stage1.crop {cfg.stage1.crop} must be a multiple of 32 and <= input_size")
    if not cfg.betas or any(b <= 0 for b in cfg.betas):
        raise UsageError(f"{source}: betas {cfg.betas} must be a non-empty list of positive numbers")
    if cfg.stage2.det_anchor_weight not in DET_ANCHOR_WEIGHTS:
        raise UsageError(f"{source}: stage2.det_anchor_weight {cfg.stage2.det_anchor_weight!r} must be one of "
                         f"{', '.join(DET_ANCHOR_WEIGHTS)}")
    if not 0 <= cfg.stage2.det_class_kl <= 10:
        raise UsageError(f"{source}: stage2.det_class_kl {cfg.stage2.det_class_kl} must be between 0 (off) and 10, "
                         f"e.g. 1.0")
    if cfg.default_beta is not None and cfg.default_beta not in cfg.betas:
        raise UsageError(f"{source}: default_beta {cfg.default_beta} is not one of betas {cfg.betas}")
    return cfg


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config beside a checkpoint."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

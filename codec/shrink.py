"""A narrower edge encoder distilled from a trained split model: same latent, same entropy model, same decoder.

Why: the encoder is the only network the device runs. Narrower or smaller-kernel encoders trained from scratch in
the full recipe lost 1-4 points of accuracy (README). Here the narrow encoder only learns to reproduce the trained
encoder's latent (mean squared error on the continuous latent, in symbol units, so it directly counts rounding
errors); the entropy model, decoder, teachers and heads are copied unchanged, so the server side and the rate stay
what they were. The result is an ordinary checkpoint (its own fingerprint) written with what `train` exports beside
a shipped one: ``OUT.yaml`` (the recipe and the source's training config), ``OUT.edge.pt`` and the torch-free
``OUT.edge.onnx`` + ``.edge.npz``.

    python -m codec.shrink --checkpoint models/default.pt --frames runs/RUN/frames.npz \
        --encoder-channels 16 24 --epochs 8 --out runs/shrink16/split.pt [--resume]
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

import core.offline  # noqa: F401
from codec.api import SplitCodec, load_codec
from codec.edge_onnx import export_edge
from codec.model import SplitModel
from codec.student import StudentSpec, count_macs
from core.errors import UsageError


def narrow_copy(codec: SplitCodec, spec: StudentSpec) -> SplitModel:
    """A split model with ``spec``'s encoder (fresh) and everything else copied from ``codec``'s model."""
    src = codec.model
    if spec.latent_channels != src.spec.latent_channels:
        raise UsageError(f"the narrow encoder must emit the same {src.spec.latent_channels} latent channels, "
                         f"not {spec.latent_channels}")
    model = SplitModel(src.teachers, spec, src.input_size)
    model.decoder.load_state_dict(src.decoder.state_dict())
    model.entropy_bottleneck = copy.deepcopy(src.entropy_bottleneck)  # its CDF tables too: the same rate model
    return model


@torch.no_grad()
def symbol_agreement(wide: torch.nn.Module, narrow: torch.nn.Module, eb, images: np.ndarray,
                     batch: int = 16) -> tuple[float, float]:
    """(share of latent symbols equal to the wide encoder's, their mean absolute difference) on ``images``."""
    equal = total = 0
    diff = 0.0
    medians = eb._get_medians()
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float().div(255.0)
        a = eb.quantize(wide(x), "symbols", medians)
        b = eb.quantize(narrow(x), "symbols", medians)
        equal += int((a == b).sum())
        diff += float((a - b).abs().float().sum())
        total += a.numel()
    return equal / total, diff / total


def shrink(codec: SplitCodec, images: np.ndarray, spec: StudentSpec, out: Path, epochs: int = 8, batch: int = 16,
           lr: float = 2e-3, val: int = 64, resume: bool = False, seed: int = 0) -> Path:
    """Train ``spec``'s encoder to reproduce ``codec``'s latent on ``images`` (N,H,W,3 uint8); write ``out``."""
    torch.manual_seed(seed)
    wide = codec.model.encoder.eval().requires_grad_(False)
    model = narrow_copy(codec, spec)
    narrow = model.encoder
    opt = torch.optim.Adam(narrow.parameters(), lr=lr)
    train_imgs, val_imgs = images[val:], images[:val]
    steps = math.ceil(len(train_imgs) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.05)
    last, curve = out.with_name(out.stem + ".last.pt"), out.with_name(out.stem + ".curve.csv")
    start = 0
    if last.is_file():
        if not resume:
            raise UsageError(f"{last} exists from an earlier run: pass --resume to continue it, or another --out")
        state = torch.load(last, map_location="cpu", weights_only=True)
        narrow.load_state_dict(state["encoder"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["epoch"] + 1
        print(f"[shrink] resumed at epoch {start + 1}/{epochs}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    for epoch in range(start, epochs):
        order = torch.randperm(len(train_imgs), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        narrow.train()
        bar = tqdm(range(steps), desc=f"shrink epoch {epoch + 1}/{epochs}")
        for step in bar:
            idx = np.sort(order[step * batch:(step + 1) * batch].numpy())
            x = torch.from_numpy(train_imgs[idx]).permute(0, 3, 1, 2).float().div(255.0)
            with torch.no_grad():
                target = wide(x)
            loss = F.mse_loss(narrow(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(mse=f"{loss.item():.4f}")
        narrow.eval()
        agree, mad = symbol_agreement(wide, narrow, model.entropy_bottleneck, val_imgs)
        print(f"[shrink] epoch {epoch + 1}: held-back frames' symbols {100 * agree:.2f} % equal, mean |diff| "
              f"{mad:.4f}", flush=True)
        new = not curve.is_file()
        with curve.open("a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(["epoch", "train_mse_last", "symbols_equal", "symbols_mean_abs_diff"])
            w.writerow([epoch + 1, f"{loss.item():.5f}", f"{agree:.5f}", f"{mad:.5f}"])
        tmp = last.with_name(last.name + ".tmp")
        torch.save({"epoch": epoch, "encoder": narrow.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict()}, tmp)
        tmp.replace(last)
    narrow.eval()
    agree, _ = symbol_agreement(wide, narrow, model.entropy_bottleneck, val_imgs)
    result = SplitCodec(model, codec.entropy_coder)
    recipe = {"encoder_channels": list(spec.encoder_channels), "encoder_kernels": list(spec.encoder_kernels),
              "epochs": epochs, "batch": batch, "lr": lr, "frames": len(images), "seed": seed,
              "symbols_equal_held_back": round(agree, 5)}
    result.save(out, extra={**codec.metadata, "shrunk_from": codec.fingerprint.hex(), "shrink": recipe})
    # what `train` exports beside a shipped checkpoint: the resolved recipe, the torch edge, the torch-free edge
    with out.with_suffix(".yaml").open("w") as fh:
        yaml.safe_dump({"shrink": recipe, "source_fingerprint": codec.fingerprint.hex(),
                        "source_training": codec.metadata.get("config")}, fh, sort_keys=False)
    result.save_edge(out.with_suffix(".edge.pt"))
    export_edge(result, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m codec.shrink", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the trained split model whose encoder is distilled")
    p.add_argument("--frames", required=True, help="training frames: a run's frames.npz (key 'images')")
    p.add_argument("--encoder-channels", type=int, nargs=2, default=[16, 24], metavar=("C1", "C2"))
    p.add_argument("--encoder-kernels", type=int, nargs=2, default=None, metavar=("K1", "K2"),
                   help="kernel sizes of the two stride-2 convolutions (default: the checkpoint's)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", required=True, help="the distilled checkpoint to write, e.g. runs/shrink16/split.pt")
    p.add_argument("--resume", action="store_true", help="continue from OUT's .last.pt")
    a = p.parse_args(argv)
    if a.epochs < 1 or a.batch < 1 or not a.lr > 0:
        raise UsageError(f"--epochs {a.epochs} and --batch {a.batch} must be >= 1 and --lr {a.lr} > 0")
    codec = load_codec(a.checkpoint, fuse=False)
    spec = dataclasses.replace(codec.model.spec, encoder_channels=tuple(a.encoder_channels),
                               encoder_kernels=tuple(a.encoder_kernels or codec.model.spec.encoder_kernels))
    frames = Path(a.frames)
    if not frames.is_file():
        raise UsageError(f"--frames {frames}: no such file; `train` writes RUN/frames.npz")
    images = np.load(frames)["images"]
    size = codec.model.input_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise UsageError(f"--frames {frames}: images {images.shape} {images.dtype}; want (N, {size}, {size}, 3) uint8")
    shape = (1, 3, size, size)
    print(f"[shrink] encoder {codec.model.spec.encoder_channels} -> {spec.encoder_channels}: "
          f"{count_macs(codec.model.encoder, shape) / 1e6:.1f} -> "
          f"{count_macs(SplitModel(codec.model.teachers, spec, size).encoder, shape) / 1e6:.1f} M MACs; "
          f"{len(images)} frames", flush=True)
    t0 = time.perf_counter()
    out = shrink(codec, images, spec, Path(a.out), a.epochs, a.batch, a.lr, resume=a.resume)
    print(json.dumps({"out": str(out), "minutes": round((time.perf_counter() - t0) / 60, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

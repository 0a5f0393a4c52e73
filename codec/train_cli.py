"""`run_pipeline.py train`: the whole recipe from one YAML config (see configs/train/)."""
from __future__ import annotations

import argparse

import yaml

from core.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/train/default.yaml",
                   help="training config YAML (default: %(default)s)")
    p.add_argument("--out", help="run directory (overrides the config's 'out')")
    p.add_argument("--resume", action="store_true", help="continue interrupted stages from their last epoch")
    p.add_argument("--beta", type=float, help="train only this beta of the config's sweep")
    p.add_argument("--until", choices=["data", "teachers"], help="stop after this step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stage1.epochs=2 (YAML value syntax)")


def run(args: argparse.Namespace) -> int:
    from codec.config import load_config
    from codec.train import train

    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise UsageError(f"--set {item!r} needs KEY=VALUE, e.g. --set stage1.epochs=2")
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    if args.out:
        overrides["out"] = args.out
    cfg = load_config(args.config, overrides)
    if args.beta is not None and args.beta not in cfg.betas:
        raise UsageError(f"--beta {args.beta} is not in the config's betas {cfg.betas}")
    results = train(cfg, resume=args.resume, only_beta=args.beta, until=args.until)
    for beta, path in results.items():
        print(f"beta={beta:g}\t{path}")
    return 0

"""`run_pipeline.py eval`: teachers on raw frames vs the split model on a fresh conveyor-line video."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from pipeline.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="split-model checkpoint (default: the shipped models/default.pt)")
    p.add_argument("--frames", type=int, default=200, help="frames of the fresh line (default: %(default)s)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the fresh line (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="frames per forward pass (default: %(default)s)")
    p.add_argument("--belt", choices=["trained", "own"], default="trained",
                   help="'trained': new items on the belt the model was trained on (default); 'own': the line's "
                        "own belt from --seed, never seen in training")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")


def run(args: argparse.Namespace) -> int:
    from codec.api import CodecError, load_codec
    from codec.evaluate import evaluate, format_table

    if args.frames < 1:
        raise UsageError(f"--frames {args.frames} must be at least 1")
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch} must be at least 1")
    if args.json:  # Ultralytics logs to stdout; with --json, stdout carries the one JSON object only
        for handler in logging.getLogger("ultralytics").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        try:
            codec = load_codec(args.checkpoint)
        except (FileNotFoundError, CodecError) as exc:
            raise UsageError(str(exc)) from exc
        result = evaluate(codec, frames=args.frames, seed=args.seed, batch=args.batch, progress=not args.json,
                          belt=args.belt)
    result["checkpoint"] = args.checkpoint or "models/default.pt"
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
    return 0

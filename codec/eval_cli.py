"""`run_pipeline.py eval`: teachers on raw frames vs the split model on real bitstreams, on fresh conveyor lines
with held-out belts and unseen garments (the protocol in ``codec.evaluate``), or on footage a user labelled."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from core.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="split-model checkpoint (default: the shipped models/default.pt)")
    p.add_argument("--frames", type=int, default=300,
                   help="frames per suite, split over 3 fresh lines (default: %(default)s)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the first fresh line (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="frames per forward pass (default: %(default)s)")
    p.add_argument("--suite", choices=["heldout", "train", "both"], default="both",
                   help="'heldout': belts from families never used in training; 'train': new belts of the "
                        "training families; 'both' (default, held-out first: the headline)")
    p.add_argument("--video", help="score this labelled footage instead (any size; letterboxed like the pipeline)")
    p.add_argument("--gt", help="its ground truth in the format `data` writes (default: <video>.gt.jsonl beside it)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")


def run(args: argparse.Namespace) -> int:
    from codec.api import CodecError, load_codec
    from pathlib import Path

    from codec.evaluate import evaluate, evaluate_footage, format_table

    if args.frames < 1:
        raise UsageError(f"--frames {args.frames} must be at least 1")
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch} must be at least 1")
    if args.gt and not args.video:
        raise UsageError("--gt needs --video: the footage the truth describes")
    if args.video and not Path(args.video).is_file():
        raise UsageError(f"--video {args.video}: no such file")
    if args.gt and not Path(args.gt).is_file():
        raise UsageError(f"--gt {args.gt}: no such file")
    if args.json:  # Ultralytics logs to stdout; with --json, stdout carries the one JSON object only
        for handler in logging.getLogger("ultralytics").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        try:
            codec = load_codec(args.checkpoint)
        except (FileNotFoundError, CodecError) as exc:
            raise UsageError(str(exc)) from exc
        if args.video:
            try:
                result = evaluate_footage(codec, Path(args.video), Path(args.gt) if args.gt else None,
                                          batch=args.batch, progress=not args.json)
            except (FileNotFoundError, ValueError, KeyError) as exc:
                raise UsageError(f"--video {args.video}: {exc}") from exc
        else:
            suites = ("heldout", "train") if args.suite == "both" else (args.suite,)
            result = evaluate(codec, frames=args.frames, seed=args.seed, batch=args.batch, suites=suites,
                              progress=not args.json)
    result["checkpoint"] = args.checkpoint or "models/default.pt"
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
    return 0

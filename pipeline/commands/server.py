"""`run_pipeline.py server`: the server half. ZeroMQ PULL -> wire checks -> decode + shared body once ->
task consumers -> JSONL, annotated video, optional ZeroMQ PUB, console line.

Runs until SIGINT/SIGTERM (then drains what is queued, closes files, exit 0), or with --exit-on-eos until
every edge stream has sent its end-of-stream message.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands._common import (add_common, check_max_frames, list_stages, load, run_graph, select_tasks)
from pipeline.errors import UsageError
from pipeline.graph import StageSpec
from transport.link import check_endpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", default="tcp://*:5555", metavar="ENDPOINT",
                   help="ZeroMQ endpoint to receive on (default tcp://*:5555)")
    p.add_argument("--tasks", default="detection,segmentation,classification",
                   help="comma-separated task consumers to run (default: all three)")
    p.add_argument("--exit-on-eos", action="store_true", help="exit when every edge stream has ended")
    p.add_argument("--frames-from", default=None, metavar="PATH",
                   help="the replayed file/folder, to draw the annotated video on the original frames")
    p.add_argument("--pub", default=None, metavar="ENDPOINT", help="also publish each frame's JSON on a ZeroMQ PUB socket")
    add_common(p)


def run(args) -> int:
    if args.list_stages:
        return list_stages()
    check_max_frames(args.max_frames)
    check_endpoint(args.bind, "--bind")
    variables = {"bind": args.bind, "checkpoint": args.checkpoint, "out": args.out,
                 "exit_on_eos": bool(args.exit_on_eos), "max_frames": args.max_frames,
                 "frames_from": args.frames_from}
    spec = load(args.config or "server", variables)
    select_tasks(spec, [t.strip() for t in args.tasks.split(",") if t.strip()])
    if args.pub:
        check_endpoint(args.pub, "--pub")
        merges = [s.name for s in spec.stages if s.key == "results.merge"]
        if not merges:
            raise UsageError(f"--pub needs a results.merge stage in {spec.path} to publish from")
        spec.stages.append(StageSpec("pub", "sink.zmq_pub", [merges[-1]], {"endpoint": args.pub}))
    return run_graph(spec, Path(args.out) / "server_summary.json", quiet=args.quiet)

"""`run_pipeline.py server`: the server half. ZeroMQ ROUTER -> wire checks -> decode + shared body once ->
task consumers -> JSONL, annotated video, optional ZeroMQ PUB, console line.

Runs until SIGINT/SIGTERM (then drains what is queued, closes files, exit 0), or with --exit-on-eos until
every edge stream has sent its end-of-stream message.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands._common import (add_common, check_max_frames, list_stages, load, run_graph, select_tasks)
from pipeline.commands._factory import add_factory_arguments, check_tasks_for_factory, factory_plan
from core.errors import UsageError
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
    p.add_argument("--key", default=None, metavar="FILE",
                   help="the server's CurveZMQ secret key (server.key_secret from `run_pipeline.py keys`)")
    p.add_argument("--allowed-keys", default=None, metavar="DIR",
                   help="folder of the public keys (*.key) of the edges allowed to connect")
    p.add_argument("--insecure", action="store_true",
                   help="allow a tcp link without encryption or authentication (a warning is printed)")
    p.add_argument("--window", type=int, default=8, metavar="N", help="frames in flight per replayed stream (default 8; live streams get --live-window)")
    p.add_argument("--live-window", type=int, default=2, metavar="N",
                   help="frames in flight per live stream (default 2: each frame in flight adds a frame of latency)")
    p.add_argument("--ray", default=None, metavar="auto|HOST:PORT",
                   help="topology (b): decode, shared body and heads on a Ray Serve deployment (graph server_ray): "
                        "`auto` starts a local Ray instance, HOST:PORT joins the cluster of `ray start --head`")
    p.add_argument("--ray-replicas", default=None, metavar="N|MIN:MAX",
                   help="with --ray: N replicas of the deployment (default 1), or MIN:MAX to autoscale between them "
                        "on the frames queued per replica (e.g. 1:4)")
    p.add_argument("--ray-max-batch", type=int, default=None, metavar="N",
                   help="with --ray: frames per forward pass, batched across streams (default 8)")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="decode up to N frames (from any streams) in one pass (default 1: each frame alone; "
                        "8 pays with several streams, see README)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="with --max-batch: wait at most MS milliseconds after a batch's first frame for more "
                        "(default 5; every frame of the batch waits as long)")
    add_factory_arguments(p, "server")
    add_common(p)


def run(args) -> int:
    if args.list_stages:
        return list_stages()
    check_max_frames(args.max_frames)
    check_endpoint(args.bind, "--bind")
    variables = {"bind": args.bind, "checkpoint": args.checkpoint, "out": args.out,
                 "exit_on_eos": bool(args.exit_on_eos), "max_frames": args.max_frames,
                 "frames_from": args.frames_from, "secret_key": args.key, "allowed_keys": args.allowed_keys,
                 "insecure": bool(args.insecure), "window": args.window, "live_window": args.live_window,
                 "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms}
    if args.ray is None and (args.ray_replicas is not None or args.ray_max_batch is not None):
        raise UsageError("--ray-replicas/--ray-max-batch need --ray auto|HOST:PORT (the Ray Serve deployment)")
    if args.ray is not None:
        variables.update({"ray": args.ray, "tasks": args.tasks})
        if args.ray_replicas is not None:
            variables.update(ray_replicas_variables(args.ray_replicas))
        if args.ray_max_batch is not None:
            if args.ray_max_batch < 1:
                raise UsageError(f"--ray-max-batch {args.ray_max_batch}: give a whole number >= 1")
            variables["ray_max_batch"] = args.ray_max_batch
    plan = factory_plan(args, "server")  # --factory, --mqtt, ...: the factory graph (or fill --config's variables)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if plan is not None:
        if args.ray is not None and plan.config is not None:
            raise UsageError("--ray with the factory options: the factory graph runs the in-process server; drop "
                             "--ray, or give --config a graph that feeds server.ray's results to the factory stages")
        if plan.config is not None:
            check_tasks_for_factory(tasks)
        variables.update(plan.variables)
    default = plan.config if plan is not None and plan.config else ("server_ray" if args.ray is not None else "server")
    spec = load(args.config or default, variables, threads=args.threads)
    select_tasks(spec, tasks)  # the in-process consumers; server.ray takes --tasks as its `tasks` variable
    if plan is not None:
        plan.apply(spec)
    _batching(spec, args)
    if args.pub:
        check_endpoint(args.pub, "--pub")
        merges = [s.name for s in spec.stages if s.key in ("results.merge", "server.ray")]
        if not merges:
            raise UsageError(f"--pub needs a results.merge or server.ray stage in {spec.path} to publish from")
        spec.stages.append(StageSpec("pub", "sink.zmq_pub", [merges[-1]], {"endpoint": args.pub}))
    return run_graph(spec, Path(args.out) / "server_summary.json", quiet=args.quiet)


def ray_replicas_variables(value: str) -> dict:
    """``--ray-replicas N`` (fixed) or ``MIN:MAX`` (autoscaling) -> the server_ray graph's variables."""
    text = str(value).strip()
    lo, sep, hi = text.partition(":")
    fix = "give N (fixed replicas, e.g. 2) or MIN:MAX to autoscale (e.g. 1:4, 1 <= MIN <= MAX)"
    if not sep:
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"--ray-replicas {value}: {fix}")
        return {"ray_replicas": int(text), "ray_min_replicas": None, "ray_max_replicas": None}
    if not (lo.strip().isdigit() and hi.strip().isdigit()) or not 1 <= int(lo) <= int(hi):
        raise UsageError(f"--ray-replicas {value}: {fix}")
    return {"ray_min_replicas": int(lo), "ray_max_replicas": int(hi)}


def _batching(spec, args) -> None:
    """--max-batch / --max-wait-ms for every server.decode stage of the graph: server.yaml takes them as its
    variables; another graph (--factory, --config) that leaves a decode stage's batching unset gets them too. A
    graph without a decode stage (--ray: the replicas decode) cannot batch here: refused rather than ignored."""
    decodes = [s for s in spec.stages if s.key == "server.decode"]
    if args.max_batch != 1 and not decodes:
        raise UsageError(f"--max-batch {args.max_batch}: graph {spec.path} has no server.decode stage to batch "
                         f"(with --ray the replicas batch: --ray-max-batch); drop --max-batch")
    for s in decodes:
        s.params.setdefault("max_batch", args.max_batch)
        s.params.setdefault("max_wait_ms", args.max_wait_ms)

"""`run_pipeline.py run` (the default command): run a pipeline graph; with no options, the built-in demo.

The demo replays a conveyor-line video (generated into OUT/conveyor_demo.mp4 when absent) through the edge
half, a real ZeroMQ tcp socket on 127.0.0.1 and the server half in one process (separate stage threads),
with the shipped model, and writes OUT/results.jsonl, OUT/annotated.mp4 and OUT/summary.json.
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import sys
from pathlib import Path

from pipeline.commands._common import add_common, check_max_frames, check_threads, list_stages, load, run_graph
from pipeline.commands._factory import add_factory_arguments, factory_plan
from core.errors import UsageError
from pipeline.graph import VAR_NAME, graph_variables, load_yaml

DEMO_FRAMES = 150


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=None, metavar="URL_OR_PATH",
                   help="video file, image folder, rtsp:// udp:// http:// URL, camera:N or /dev/videoN, conveyor[:SEED] "
                        "(default: a generated conveyor-line video)")
    p.add_argument("--rate", default="native", help="replay pace of a file: native (its own frame rate), max (as "
                                                     "fast as possible) or FPS (default: native)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="set a ${NAME} variable of the graph YAML, one it declares under `vars:` or uses "
                        "(repeatable; VALUE is read as YAML)")
    p.add_argument("--insecure", action="store_true",
                   help="run tcp links without CurveZMQ (by default throwaway keys are made in OUT/keys)")
    add_factory_arguments(p, "run")
    add_common(p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _frame_size(video: Path) -> tuple[int, int] | None:
    """A video's frame (width, height), or None when it cannot be read."""
    import av

    try:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            return int(stream.width), int(stream.height)
    except (av.error.FFmpegError, IndexError, OSError):
        return None


def make_demo_video(path: Path, frames: int = DEMO_FRAMES, size: int = 256, fps: int = 15, seed: int = 0) -> Path:
    """Render the demo clip (H.264 with PyAV, ground truth beside it as ``.gt.jsonl``): a belt from the held-out
    families and Fashion-MNIST test garments, i.e. a belt and items the model never saw in training."""
    try:
        from conveyor.export import write_video
        from conveyor.line import ConveyorLine, LineConfig
    except ModuleNotFoundError as exc:
        raise UsageError(f"cannot generate the demo video: the conveyor generator is missing ({exc}); "
                         f"pass --source PATH") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.mp4")
    line = LineConfig(size=size, fps=fps, seed=seed, belts="heldout", fashion_split="test")
    write_video(ConveyorLine(line).frames(frames), tmp, fps)
    from conveyor.groundtruth import sidecar_path

    sidecar_path(tmp).replace(sidecar_path(path))
    tmp.replace(path)
    return path


def _parse_sets(items: list[str], config: str) -> dict:
    """``--set NAME=VALUE`` pairs; VALUE is read as YAML (``3``, ``true``, ``null``, ``[a, b]``), bounded.
    A NAME the graph neither declares under `vars:` nor uses as ${NAME} is refused: it would do nothing."""
    out = {}
    for it in items:
        k, eq, v = it.partition("=")
        k = k.strip()
        if not eq or not VAR_NAME.fullmatch(k):
            raise UsageError(f"--set {it!r}: use NAME=VALUE with NAME a graph variable (letters, digits, _)")
        out[k] = load_yaml(v, f"--set {k}")
    if out:
        known = graph_variables(config)
        unknown = [k for k in out if k not in known]
        if unknown:
            raise UsageError(f"--set {unknown[0]}: graph {config!r} has no variable {unknown[0]!r}; known: "
                             f"{', '.join(sorted(known)) or 'none'}")
    return out


def run(args) -> int:
    if args.list_stages:
        return list_stages()
    check_max_frames(args.max_frames)
    check_threads(args.threads)  # before anything is made, so a bad value leaves nothing behind
    plan = factory_plan(args, "run")  # --factory, --mqtt, ...: the factory graph (or fill --config's variables)
    config = args.config or (plan.config if plan is not None else None) or "demo"
    sets = _parse_sets(args.set, config)
    out = Path(args.out)
    variables = {"out": str(out), "rate": args.rate, "max_frames": args.max_frames,
                 "endpoint": f"tcp://127.0.0.1:{free_port()}", "checkpoint": args.checkpoint}
    demo = args.config is None
    if demo:
        # never silently fall back to a random model: get_codec raises a UsageError saying how to make one
        from pipeline.codecs import get_codec
        demo_codec = get_codec(args.checkpoint)
    if args.source is not None:
        variables["source"] = args.source
    elif demo:
        video = out / "conveyor_demo_heldout.mp4"
        if not video.is_file() or _frame_size(video) != (demo_codec.input_size, demo_codec.input_size):
            # absent, or made for a model of another input size (a clip upscaled from 64 px is no demo)
            print(f"generating the demo video {video} ({DEMO_FRAMES} conveyor-line frames on a held-out belt)",
                  file=sys.stderr)
            make_demo_video(video, size=demo_codec.input_size)
        variables["source"] = str(video)
    if args.insecure:
        variables["insecure"] = True
    else:  # the loopback demo is secure too: throwaway key pairs, the edge's public key allowed
        from transport.security import demo_keys
        variables.update(demo_keys(out / "keys"))
        variables["insecure"] = False
    with plan.services() if plan is not None else contextlib.nullcontext():  # run --mqtt: a local broker
        if plan is not None:
            variables.update(plan.variables)
        variables.update(sets)
        variables = {k: v for k, v in variables.items() if not (v is None and k in ("source",))}
        spec = load(config, variables, threads=args.threads)
        if plan is not None:
            plan.apply(spec)
        rc = run_graph(spec, out / "summary.json", quiet=args.quiet)
    if demo and rc == 0:
        print(f"wrote {out / 'results.jsonl'}, {out / 'annotated.mp4'} and {out / 'summary.json'}", file=sys.stderr)
    return rc

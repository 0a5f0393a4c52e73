"""What the factory stages cost per frame, against the server's own per-frame work, measured side by side.

    .venv/bin/python -m benchmarks.factory_cost [--frames 90] [--rounds 5] [--checkpoint PATH] [--out DIR]

The server path (entropy decode + decoder + shared body + every task head + mapping to the frame, one frame at a
time, as `server.decode` and the consumers do) is timed on a fresh conveyor line; its FrameResults then go
through the factory stages as the factory graph chains them: ``track.items`` -> ``count.items`` ->
``events.items`` -> ``sink.mqtt`` (no broker listening: events go to its buffer, the usual cost of ``process``),
``sink.metrics`` (a real Prometheus endpoint on a free port) and ``sink.opcua`` (a real asyncua server). The two
are interleaved round by round (the machine is shared: load hits both alike) at one thread each, and medians
are reported. The frame-rate cost is the stages' time over the server's plus theirs: what a graph that ran
them on the same core would lose (they run in their own threads, so on a free core it is less).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as run_pipeline.py sets it (pipeline/cli.py), before numpy
import core.offline  # noqa: E402,F401
import numpy as np  # noqa: E402

FACTORY_STAGES = ("track", "count", "events", "mqtt", "metrics", "opcua")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open_stages(names, log) -> dict:
    """The factory stages, opened as a graph would open them (each with its own context)."""
    from pipeline.stage import StageContext, StageStats, create_stage

    params = {
        "track": ("track.items", {"names": names, "clock": "frames", "fps": 15}),
        "count": ("count.items", {}),
        "events": ("events.items", {"line": "bench", "rules": [{"when": "item", "emit": ["new", "update", "end"],
                                                                 "min_hits": 3}, {"when": "idle", "after_s": 5}]}),
        "mqtt": ("sink.mqtt", {"port": _free_port(), "line": "bench", "reconnect_min_s": 5, "reconnect_max_s": 30,
                               "drain_s": 0}),
        "metrics": ("sink.metrics", {"port": _free_port()}),
        "opcua": ("sink.opcua", {"endpoint": f"opc.tcp://127.0.0.1:{_free_port()}/bench/", "line": "bench"}),
    }
    stages = {}
    for name in FACTORY_STAGES:
        key, kw = params[name]
        stage = create_stage(key, **kw)
        stage.open(StageContext(name, "bench", threading.Event(), StageStats(), {}, log, ["in"]))
        stages[name] = stage
    return stages


def factory_cost(codec, frames: list[np.ndarray], rounds: int = 5, log=lambda m: None) -> dict:
    """Median per-frame milliseconds of the server path and of each factory stage over ``frames``."""
    import torch

    from codec.tasks import TASKS
    from core.geometry import letterbox_image, letterbox_params
    from pipeline.envelope import FrameMeta
    from pipeline.stage import FrameResult
    from stages.consumers import map_result

    torch.set_num_threads(1)
    encoded = [codec.encode(letterbox_image(im, codec.input_size)[None])[0] for im in frames]
    sizes = [im.shape[1::-1] for im in frames]

    def server_pass() -> tuple[float, list[FrameResult]]:
        out, t0 = [], time.perf_counter()
        for i, (enc, (w, h)) in enumerate(zip(encoded, sizes)):
            feats = codec.decode([enc])
            lb = letterbox_params(w, h, codec.input_size)
            results = {t: map_result(t, codec.head(t, feats)[0], lb) for t in TASKS}
            meta = FrameMeta(0, i, capture_ns=1_000_000_000 + i * 66_666_667)
            out.append(FrameResult(meta, 0, len(enc.payload), tuple(enc.latent_shape), (w, h), results, {}))
        return (time.perf_counter() - t0) / len(encoded), out

    def factory_pass(results: list[FrameResult]) -> dict[str, float]:
        stages = _open_stages(list(codec.class_names["detection"]), log)  # fresh per round: a new line
        spent = dict.fromkeys(FACTORY_STAGES, 0.0)
        try:
            for fr in results:
                for name in ("track", "count", "events"):
                    t0 = time.perf_counter()
                    fr = stages[name].process(fr)
                    spent[name] += time.perf_counter() - t0
                for name in ("mqtt", "metrics", "opcua"):
                    t0 = time.perf_counter()
                    stages[name].process(fr)
                    spent[name] += time.perf_counter() - t0
        finally:
            for stage in stages.values():
                stage.close()
        return {k: v / len(results) for k, v in spent.items()}

    server_pass()  # warm-up: lazy imports, first-call allocations
    server_s, factory = [], {k: [] for k in FACTORY_STAGES}
    for _ in range(rounds):
        s, results = server_pass()
        server_s.append(s)
        for k, v in factory_pass(results).items():
            factory[k].append(v)
    server_ms = 1000 * float(np.median(server_s))
    stage_ms = {k: 1000 * float(np.median(v)) for k, v in factory.items()}
    total = sum(stage_ms.values())
    return {"frames": len(frames), "rounds": rounds, "threads": 1, "server_ms_per_frame": server_ms,
            "stage_ms_per_frame": stage_ms, "factory_ms_per_frame": total,
            "frame_rate_cost_same_core": total / (server_ms + total),
            "note": "server: decode + body + all heads, one frame at a time; stages: process() per frame; mqtt "
                    "without a broker (buffered), metrics and opcua with their real servers"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=90, help="frames of a fresh conveyor line (default 90)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds, medians reported (default 5)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint (default: models/default.pt)")
    ap.add_argument("--out", default=None, help="write factory_cost.json here (default: print only)")
    args = ap.parse_args(argv)
    if args.frames < 10 or args.rounds < 1:
        ap.error("--frames must be >= 10 and --rounds >= 1")
    from codec.api import load_codec
    from conveyor.line import ConveyorLine, LineConfig

    codec = load_codec(args.checkpoint)
    frames = [lf.image for lf in ConveyorLine(LineConfig(size=codec.input_size, fps=15, seed=7)).frames(args.frames)]
    r = factory_cost(codec, frames, args.rounds)
    print(f"server path {r['server_ms_per_frame']:.1f} ms/frame (1 thread); factory stages "
          f"{r['factory_ms_per_frame']:.2f} ms/frame: " +
          ", ".join(f"{k} {v:.2f}" for k, v in r["stage_ms_per_frame"].items()))
    print(f"frame-rate cost if they shared the server's core: {100 * r['frame_rate_cost_same_core']:.1f} % "
          f"(target <= 5 %)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "factory_cost.json").write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

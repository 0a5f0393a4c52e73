"""Shared by the run/edge/server commands: options, signal handling, running a graph, the summary."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from core.errors import IncompleteInput, UsageError
from pipeline.graph import GraphRunner, GraphSpec, load_graph


def add_common(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="split-model checkpoint (default: the shipped models/default.pt); random:SIZE for plumbing tests")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N frames")
    if out:
        p.add_argument("--out", default="out", metavar="DIR", help="output folder (default: out)")
    p.add_argument("--config", default=None, metavar="FILE", help="graph YAML (path or name in configs/pipelines/)")
    p.add_argument("--list-stages", action="store_true", help="print the registered stage keys and exit")
    p.add_argument("--quiet", action="store_true", help="no console status line")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="cores the graph may use, shared by the stages that run models (default: all; "
                        "overrides the graph's `threads:`)")


def check_max_frames(n) -> None:
    if n is not None and n < 1:
        raise UsageError(f"--max-frames {n}: give a positive number of frames")


def list_stages() -> int:
    from pipeline.stage import available_stages, get_stage_class
    for k in available_stages():
        cls = get_stage_class(k)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{k:24s} {cls.__module__}.{cls.__name__}  {doc}")
    return 0


def drop_console(spec: GraphSpec) -> None:
    gone = {s.name for s in spec.stages if s.key == "sink.console"}
    spec.stages = [s for s in spec.stages if s.name not in gone]


def select_tasks(spec: GraphSpec, tasks: list[str]) -> None:
    """Keep only the task consumers named in ``tasks`` (names registered in :mod:`codec.tasks`)."""
    from codec.tasks import TASKS
    allowed = set(TASKS)
    bad = [t for t in tasks if t not in allowed]
    if bad or not tasks:
        raise UsageError(f"--tasks {','.join(tasks)!r}: choose a comma-separated subset of {', '.join(sorted(allowed))}")
    gone = {s.name for s in spec.stages if s.key.startswith("task.") and s.key[5:] in allowed and s.key[5:] not in tasks}
    spec.stages = [s for s in spec.stages if s.name not in gone]
    for s in spec.stages:
        s.inputs = [i for i in s.inputs if i not in gone]


class _Signals:
    """First SIGINT/SIGTERM: stop the sources, let in-flight frames finish, close files. Second: exit now."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.count = 0
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            print(f"\n{signal.Signals(signum).name}: finishing in-flight frames and closing files "
                  f"(send again to quit at once)", file=sys.stderr, flush=True)
            self.stop.set()
        else:
            import os
            os._exit(130)

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
        return False


def run_graph(spec: GraphSpec, summary_path: Path | None = None, quiet: bool = False) -> int:
    """Run the graph to its end and print/write the summary. Returns 0, or 1 when a stage failed; raises
    IncompleteInput (exit 2) after the summary when a replayed input ended early or had unreadable parts."""
    if quiet:
        drop_console(spec)
    stop = threading.Event()
    runner = GraphRunner(spec, stop=stop)
    t0 = time.monotonic()
    with _Signals(stop) as sig:
        runner.open()
        runner.start()
        rc = runner.wait()
    wall = time.monotonic() - t0
    summary = summarize(runner, wall)
    summary["stopped_by_signal"] = sig.count > 0
    summary["exit_code"] = rc
    print(format_summary(summary), file=sys.stderr, flush=True)
    if summary_path is not None:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    if rc == 2:
        raise IncompleteInput("; ".join(runner.incomplete))
    return rc


def summarize(runner: GraphRunner, wall: float) -> dict:
    st = {}
    for name, node in runner.nodes.items():
        s = node.stats
        st[name] = {"key": node.spec.key, "processed": s.processed, "dropped": s.dropped, "errors": s.errors,
                    "mean_ms": round(s.busy_s * 1000 / s.processed, 3) if s.processed else None, **s.extra}
    return {"graph": runner.spec.name, "wall_s": round(wall, 3), "stages": st, "errors": list(runner.errors),
            "incomplete_input": list(runner.incomplete)}


def format_summary(s: dict) -> str:
    lines = [f"graph {s['graph']}: {s['wall_s']:.1f} s"]
    for name, v in s["stages"].items():
        extra = "".join(f"  {k} {v[k]}" for k in ("bytes", "refused", "counted") if k in v)
        if v.get("counted_by_class"):
            extra += " (" + ", ".join(f"{c} {n}" for c, n in v["counted_by_class"].items()) + ")"
        ms = f"  {v['mean_ms']:.2f} ms/msg" if v.get("mean_ms") is not None else ""
        lines.append(f"  {name:16s} {v['key']:22s} {v['processed']:6d} msgs{ms}  dropped {v['dropped']}  "
                     f"errors {v['errors']}{extra}")
    for e in s["errors"]:
        lines.append(f"  FAILED: {e}")
    return "\n".join(lines)


def check_threads(threads: int | None) -> None:
    """``--threads``: None (the graph's own budget) or a whole number of cores >= 1."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: give the number of cores the graph may use, >= 1")


def load(config: str, variables: dict, threads: int | None = None) -> GraphSpec:
    """Parse a graph with the command's variables; ``threads`` (``--threads``) overrides its thread budget."""
    check_threads(threads)
    spec = load_graph(config, {k: v for k, v in variables.items()})
    if threads is not None:
        spec.threads = threads
    return spec

"""`run_pipeline.py`: one entry point with sub-commands.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``, so the
command owners never edit this file to change their options. A command whose module cannot be imported (a
device install without the server packages, a broken checkout) says which module is missing and how to install
it, and exits 2, while the other commands keep working.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

# numpy's BLAS threads, set before numpy loads: the pipeline's numpy linear algebra is tiny (the tracker's Kalman
# filter solves 8x8 systems per item per frame), where a BLAS thread pool costs more than it gives (track.items
# 1.4 -> 0.65 ms per frame on this 2-core machine) and competes with the stages' torch threads (the budget)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import core.offline  # noqa: F401  (before anything imports ultralytics)
from core.errors import UsageError

# name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pipeline.commands.run", "run a pipeline graph (default: the built-in demo, both ends on this machine)"),
    "edge": ("pipeline.commands.edge", "run the edge half: source -> letterbox -> encoder -> entropy coder -> ZeroMQ"),
    "server": ("pipeline.commands.server", "run the server half: ZeroMQ -> decode -> shared body -> task consumers -> sinks"),
    "data": ("conveyor.cli", "generate a conveyor-line video with ground truth and Ultralytics datasets"),
    "train": ("codec.train_cli", "train teachers, stage 1 and stage 2 of the split model"),
    "eval": ("codec.eval_cli", "evaluate teachers and the split model on held-out conveyor lines or labelled footage"),
    "bench": ("benchmarks.cli", "rate/accuracy, device cost and latency benchmarks against JPEG, H.264 and local"),
    "keys": ("transport.keys_cli", "make CurveZMQ key pairs for secure tcp links"),
}
DEFAULT_COMMAND = "run"


def _load(name: str):
    """The command's module, or the ImportError that stops it (reported only when that command is used)."""
    try:
        return importlib.import_module(COMMANDS[name][0])
    except ImportError as exc:
        return exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_pipeline.py",
        description="Multi-task split computing for live video (Ladon on Ultralytics YOLO). "
        "With no sub-command, runs the built-in demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        module = _load(name)
        broken = isinstance(module, ImportError)
        p = sub.add_parser(name, help=f"{help_text} [unavailable: {module}]" if broken else help_text,
                           description=help_text)
        if not broken:
            module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _missing(command: str, exc: ImportError) -> int:
    """One line for a command whose packages are not installed (e.g. `train` on a device with the edge only)."""
    missing = getattr(exc, "name", None) or str(exc)
    print(f"error: '{command}' needs the module {missing!r}, which is not installed here; a device install has the "
          f"edge only (pip install .[edge]); install the rest with `pip install .[server]` or "
          f"`bash scripts/bootstrap.sh`", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, DEFAULT_COMMAND)
    parser = build_parser()
    args = parser.parse_args(argv)
    if isinstance(args._module, ImportError):
        return _missing(args.command, args._module)
    try:
        return int(args._module.run(args) or 0)
    except ModuleNotFoundError as exc:  # a package the command imports lazily (torch, ultralytics...)
        return _missing(args.command, exc)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`run_pipeline.py`: one entry point with sub-commands.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``, so the
command owners never edit this file to change their options. A command whose module is not there yet says
which issue brings it and exits 2 instead of pretending to work.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

import pipeline.offline  # noqa: F401  (before anything imports ultralytics)
from pipeline.errors import UsageError

# name -> (module implementing it, one-line help, issue that brings it)
COMMANDS: dict[str, tuple[str, str, int]] = {
    "run": ("pipeline.commands.run", "run a pipeline graph (default: the built-in demo, both ends on this machine)", 4),
    "edge": ("pipeline.commands.edge", "run the edge half: source -> letterbox -> encoder -> entropy coder -> ZeroMQ", 4),
    "server": ("pipeline.commands.server", "run the server half: ZeroMQ -> decode -> shared body -> task consumers -> sinks", 4),
    "data": ("conveyor.cli", "generate a conveyor-line video with ground truth and Ultralytics datasets", 2),
    "train": ("codec.train_cli", "train teachers, stage 1 and stage 2 of the split model", 3),
    "eval": ("codec.eval_cli", "evaluate teachers and the split model on a fresh conveyor-line video", 3),
    "bench": ("benchmarks.cli", "rate/accuracy, device cost and latency benchmarks against JPEG, H.264 and local", 6),
    "keys": ("transport.keys_cli", "make CurveZMQ key pairs for secure tcp links", 5),
}
DEFAULT_COMMAND = "run"


def _load(name: str):
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_pipeline.py",
        description="Multi-task split computing for live video (Ladon on Ultralytics YOLO). "
        "With no sub-command, runs the built-in demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text, issue) in COMMANDS.items():
        module = _load(name)
        p = sub.add_parser(name, help=help_text if module else f"{help_text} [not built yet: issue #{issue}]",
                           description=help_text)
        if module is not None:
            module.add_arguments(p)
        p.set_defaults(_module=module, _issue=issue)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, DEFAULT_COMMAND)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._module is None:
        print(f"error: '{args.command}' is not built yet (it arrives with issue #{args._issue}); "
              f"see README.md for what works today", file=sys.stderr)
        return 2
    try:
        return int(args._module.run(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`run_pipeline.py bench`: rate/accuracy, device cost, end-to-end latency and entropy-coding throughput of the
split model against JPEG/WebP frames, H.264/H.265 streams, per-task bitstreams and running everything locally.

Writes ``report.md``, PNG plots, ``results.json`` and the resolved ``config.yaml`` into ``--out``
(default ``benchmarks/results``); ``--json`` also prints the results as one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

from core.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
FULL = {"frames": 64, "seed": 4242, "batch": 8, "jpeg_qualities": [10, 30, 50, 70, 90],
        "webp_qualities": [10, 30, 50, 80], "h264_crf": [23, 28, 33, 38, 43], "h265_crf": [28, 33, 38],
        "timing_repeats": 30, "entropy_frames": 16, "bandwidths_mbps": [1, 5, 10, 25, 100],
        "shaped_mbps": [5, 25], "link_messages": 12, "netns": True, "probes": True}
QUICK = {**FULL, "frames": 6, "jpeg_qualities": [30, 90], "webp_qualities": [50], "h264_crf": [28, 38],
         "h265_crf": [], "timing_repeats": 3, "entropy_frames": 2, "shaped_mbps": [], "netns": False,
         "probes": False}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoints", nargs="+", metavar="SPLIT_PT",
                   help="split-model checkpoints, one per beta (default: runs/default/beta_*/split.pt if present, "
                        "else models/default.pt)")
    p.add_argument("--out", default=None,
                   help="folder for report.md, plots, results.json, config.yaml (default: benchmarks/results; "
                        "with --quick a new temporary folder, so a quick run never overwrites the full report)")
    p.add_argument("--quick", action="store_true",
                   help="a few frames and settings, no namespaces, no subprocess probes (under 3 minutes)")
    p.add_argument("--frames", type=int, help="frames of the fresh conveyor line (default 64, --quick 6)")
    p.add_argument("--seed", type=int, help="seed of the footage's fresh lines (default 4242)")
    p.add_argument("--repeats", type=int, help="timing repetitions, median taken (default 30, --quick 3)")
    p.add_argument("--no-netns", action="store_true", help="skip the shaped-link check in network namespaces")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")


def _resolve_checkpoints(given: list[str] | None) -> list[Path]:
    if given:
        paths = [Path(p) for p in given]
        for p in paths:
            if not p.is_file():
                raise UsageError(f"--checkpoints: {p} does not exist; pass split.pt files written by "
                                 f"`run_pipeline.py train` (e.g. runs/default/beta_0.08/split.pt)")
        return paths
    found = sorted(glob.glob(str(ROOT / "runs" / "default" / "beta_*" / "split.pt")))
    if found:
        return [Path(p) for p in found]
    default = ROOT / "models" / "default.pt"
    if default.is_file():
        return [default]
    raise UsageError("no checkpoints: none at runs/default/beta_*/split.pt nor models/default.pt; train with "
                     "`run_pipeline.py train --config configs/train/default.yaml` or pass --checkpoints")


def _name(path: Path) -> str:
    m = re.match(r"beta_([0-9.eE+-]+)$", path.parent.name)
    return f"beta={m.group(1)}" if m else path.stem


def _beta(name: str) -> float:
    try:
        return float(name.split("=", 1)[1])
    except (IndexError, ValueError):
        return 0.0


def resolve_config(args) -> dict:
    cfg = dict(QUICK if args.quick else FULL)
    for key, val in (("frames", args.frames), ("seed", args.seed), ("timing_repeats", args.repeats)):
        if val is not None:
            if val < (0 if key == "seed" else 1):
                raise UsageError(f"--{key.replace('timing_', '')} {val} must be at least {0 if key == 'seed' else 1}")
            cfg[key] = val
    if args.no_netns:
        cfg["netns"] = False
    cfg["checkpoints"] = [str(p) for p in _resolve_checkpoints(args.checkpoints)]
    cfg["quick"] = bool(args.quick)
    return cfg


def machine() -> dict:
    import os
    import platform

    import torch

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="ladon-bench-quick-")) if args.quick else ROOT / "benchmarks" / "results"
    else:
        out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create it ({exc}); pass a writable folder") from exc
    log = logging.getLogger("bench")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("bench: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    import core.offline  # noqa: F401
    for handler in logging.getLogger("ultralytics").handlers:  # Ultralytics logs to stdout; stdout is the JSON
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    command = "python run_pipeline.py " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else \
        "python run_pipeline.py bench" + (" --quick" if args.quick else "")
    with contextlib.redirect_stdout(sys.stderr):
        result = bench(cfg, out, command)
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"bench: report {out / 'report.md'}")
    return 0


def bench(cfg: dict, out: Path, command: str) -> dict:
    import yaml

    from benchmarks import device, entropy, factory_cost, latency, rate, report
    from codec.api import CodecError, load_codec

    log = logging.getLogger("bench")
    t_start = time.perf_counter()
    codecs = {}
    for p in cfg["checkpoints"]:
        try:
            codecs[_name(Path(p))] = load_codec(p)
        except (FileNotFoundError, CodecError) as exc:
            raise UsageError(f"--checkpoints: {exc}") from exc
    codecs = dict(sorted(codecs.items(), key=lambda kv: _beta(kv[0])))
    sizes = {c.input_size for c in codecs.values()}
    if len(sizes) != 1:
        raise UsageError(f"--checkpoints have different input sizes {sorted(sizes)}; pass checkpoints of one run")
    size = sizes.pop()
    names = list(codecs)
    default_name = names[len(names) // 2]
    default = codecs[default_name]
    default_ckpt = cfg["checkpoints"][[_name(Path(p)) for p in cfg["checkpoints"]].index(default_name)]
    from codec.evaluate import FRAME_STRIDE, suite_lines  # the footage is eval's: say how it is drawn

    cfg.update({"input_size": size, "default_point": default_name,
                "footage": {"suite": "heldout", "lines": suite_lines("heldout"), "frame_stride": FRAME_STRIDE}})
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    log.info("eval's held-out footage: %d frames, seed %d, %d px", cfg["frames"], cfg["seed"], size)
    frames, truth = rate.eval_frames(cfg["frames"], cfg["seed"], size)
    rows = rate.rate_accuracy(codecs, frames, truth, cfg)
    split_rows = [r for r in rows if r["method"].startswith("split")]
    baselines = sorted({r["method"] for r in rows if not r["method"].startswith(("split", "teachers"))})
    comparisons = {r["setting"]: {m: rate.matches(rows, r, m) for m in baselines} for r in split_rows}

    point = next(r for r in split_rows if r["setting"] == default_name)

    def matched(method: str) -> dict:
        m = comparisons[default_name].get(method, {}).get("all", {})
        cands = [r for r in rows if r["method"] == method]
        if m.get("setting"):
            return next(r for r in cands if r["setting"] == m["setting"])
        return max(cands, key=lambda r: r["bytes_mean"])  # none reaches the split model: the best it has

    jpeg_row, h264_row = matched("JPEG frames"), matched("H.264 stream")
    jpeg_q, crf = int(jpeg_row["setting"][1:]), int(h264_row["setting"][3:])
    from codec.server_onnx import attach

    attach(default, default_ckpt, log=log.info)  # the server's runtime (onnxruntime unless unavailable)
    dev = device.device_cost(default, frames, cfg, default_ckpt, jpeg_q, crf)
    ent = entropy.entropy_bench(default, frames[:cfg["entropy_frames"]], max(1, min(cfg["timing_repeats"], 5)))
    log.info("factory stages against the server path, interleaved")
    factory = factory_cost.factory_cost(default, list(frames[:60]), rounds=max(1, min(cfg["timing_repeats"], 5)))

    def srv(*keys: str) -> float:  # a server is a bigger machine; here the fastest thread setting and runtime
        return min(dev[f"{k}_s_{label}"] for k in keys for label in ("1thread", "default") if f"{k}_s_{label}" in dev)

    teachers = ("shared_multitask", "shared_multitask_onnx")  # offload baselines get their fastest runtime too

    scenarios = {
        # the deployed edge: ONNX when the checkpoint has its export (same bytes), else PyTorch
        f"split ({default_name})": {"device_s": dev.get("encode_onnx_s_1thread", dev["encode_s_1thread"]),
                                    "bytes": point["bytes_mean"],
                                    "server_s": srv("server_split")},
        f"offload JPEG {jpeg_row['setting']}": {"device_s": dev["jpeg_encode_s"], "bytes": jpeg_row["bytes_mean"],
                                                "server_s": dev["jpeg_decode_s"] + srv(*teachers)},
        f"offload H.264 {h264_row['setting']}": {"device_s": dev["h264_encode_s"], "bytes": h264_row["bytes_mean"],
                                                 "server_s": dev["h264_decode_s"] + srv(*teachers)},
        "full local (3 models, 1 thread)": {"device_s": dev["three_models_s_1thread"], "bytes": 0.0,
                                            "server_s": 0.0},
    }
    lat = {"bandwidths_mbps": cfg["bandwidths_mbps"], "scenarios": scenarios,
           "total_s": latency.latency_model(scenarios, cfg["bandwidths_mbps"])}
    if cfg["netns"] and cfg["shaped_mbps"]:
        import cv2

        n = cfg["link_messages"]
        sel = frames[:n]
        payload_sets = {f"split {default_name}": [e.payload for e in default.encode(sel)],
                        f"JPEG {jpeg_row['setting']}": [
                            cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR),
                                         [cv2.IMWRITE_JPEG_QUALITY, jpeg_q])[1].tobytes() for im in sel]}
        lat["links"] = latency.measure_links(payload_sets, cfg["shaped_mbps"], use_netns=True)
        lat["links"]["transport"] = ("minimal ZeroMQ PUSH/PULL sender/receiver (benchmarks/probe.py) carrying the "
                                     "real payloads packed as transport.wire messages")

    targets = report.targets(rows, comparisons, default_name, dev, lat)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "command": command,
              "config": cfg, "rate_accuracy": rows, "comparisons": comparisons, "device": dev,
              "latency": lat, "entropy_coding": ent, "factory": factory, "targets": targets,
              "seconds": time.perf_counter() - t_start}
    result["plots"] = report.plots(result, out)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(report.markdown(result))
    log.info("done in %.0f s: %s", result["seconds"], out)
    return result

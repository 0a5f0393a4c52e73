"""`run_pipeline.py bench --quick` end to end on a tiny checkpoint trained in the session, plus unit checks."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = """seed: 0
out: {out}
input_size: 64
betas: [0.05, 0.2]
default_beta: 0.05
data: {{frames: 24, seed: 5, val_fraction: 0.25}}
teachers: {{epochs: 1, head_epochs: 1, batch: 8, workers: 0}}
stage1: {{epochs: 1, batch: 8, crop: 64, beta_warmup_epochs: 0.5}}
stage2: {{epochs: 1, batch: 8, semantic_head_epochs: 1, detect_head_epochs: 1}}
"""


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_tiny")
    cfg = d / "tiny.yaml"
    cfg.write_text(TINY.format(out=d / "run"))
    r = _cli("train", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    paths = sorted((d / "run").glob("beta_*/split.pt"))
    assert len(paths) == 2
    for p in paths:  # the heads step after stage 2 ran for each rate: its learning curves, the start scored first
        assert len((p.parent / "semantic_head.csv").read_text().splitlines()) == 2
        assert [r.split(",")[0] for r in (p.parent / "detect_head.csv").read_text().splitlines()] == \
            ["epoch", "0", "1"]
    return paths


@pytest.fixture(scope="session")
def quick_bench(tiny_checkpoints, tmp_path_factory):
    from codec.api import load_codec
    from codec.edge_onnx import export_edge

    for p in tiny_checkpoints:  # the torch-free edge beside each, as `train` exports it: bench times it too
        export_edge(load_codec(p, fuse=False), p)
    out = tmp_path_factory.mktemp("bench_out")
    r = _cli("bench", "--quick", "--json", "--out", str(out), "--checkpoints", *map(str, tiny_checkpoints),
             timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_quick_bench_writes_report_plots_and_json(quick_bench):
    out, r = quick_bench
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, "stdout must hold only the JSON object"
    res = json.loads(lines[0])
    for key in ("date", "machine", "command", "config", "rate_accuracy", "comparisons", "device", "latency",
                "entropy_coding", "factory", "targets", "plots"):
        assert key in res
    for name in ("report.md", "results.json", "config.yaml", "rate_box_map50_95.png", "rate_miou.png",
                 "rate_top1.png", "latency.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for part in ("## Targets", "## Rate versus accuracy", "## Device cost", "## End-to-end latency",
                 "## Entropy coding throughput", "## Factory stages per frame", "bench --quick", "AMD" if "AMD" in res["machine"]["cpu"] else ""):
        assert part in report


def test_quick_bench_numbers_are_sane(quick_bench):
    res = json.loads((quick_bench[0] / "results.json").read_text())
    rows = res["rate_accuracy"]
    methods = {r["method"] for r in rows}
    assert {"split (ours, one bitstream)", "per-task bitstreams (3x split)", "JPEG frames", "WebP frames",
            "H.264 stream"} <= methods
    jpeg = sorted((int(r["setting"][1:]), r["bytes_mean"]) for r in rows if r["method"] == "JPEG frames")
    assert [b for _, b in jpeg] == sorted(b for _, b in jpeg) and jpeg[0][1] < jpeg[-1][1]
    h264 = sorted((int(r["setting"][3:]), r["bytes_mean"]) for r in rows if r["method"] == "H.264 stream")
    assert h264[0][1] > h264[-1][1]  # higher CRF, fewer bytes
    for r in rows:
        assert r["bytes_mean"] > 0
        assert all(0 <= r[k] <= 100 for k in ("box_map50_95", "miou", "top1"))
        if r["method"].startswith("split"):
            assert r["bytes_mean"] == pytest.approx(r["payload_bytes_mean"] + 74)
            assert 0.9 < r["payload_vs_estimate"] < 1.2
    split = {r["setting"]: r for r in rows if r["method"].startswith("split")}
    per_task = {r["setting"]: r for r in rows if r["method"].startswith("per-task")}
    for k in split:
        assert per_task[k]["bytes_mean"] == pytest.approx(3 * split[k]["bytes_mean"])
    dev = res["device"]
    assert dev["encoder_params"] > 0 and dev["encoder_macs"] > 0
    assert 0 < dev["encode_s_1thread"] < dev["three_models_s_1thread"]
    assert 0 < dev["encode_onnx_s_1thread"] < dev["three_models_s_1thread"]  # the deployed edge, interleaved
    t = res["targets"]["device_time_vs_local"]
    assert t["edge"] == "onnx" and t["ratio"] == pytest.approx(dev["encode_onnx_s_1thread"] /
                                                              dev["three_models_s_1thread"])
    # the server paths, timed side by side: the deployed runtime, eager PyTorch, the teachers on both runtimes
    assert dev["server_runtime"] in ("onnxruntime", "torch")
    for key in ("server_split", "server_split_torch", "shared_multitask", "shared_multitask_onnx"):
        assert dev[f"{key}_s_1thread"] > 0 and dev[f"{key}_s_default"] > 0, key
    lat = res["latency"]
    for vals in lat["total_s"].values():
        assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:]))  # more bandwidth, never slower
    ent = res["entropy_coding"]
    assert all(c["lossless"] for c in ent["coders"].values())
    assert ent["codec_entropy_coder"] == "constriction" and ent["coder_matches_codec_payload"]
    fac = res["factory"]
    assert set(fac["stage_ms_per_frame"]) == {"track", "count", "events", "mqtt", "metrics", "opcua"}
    assert fac["server_ms_per_frame"] > 0 and all(v >= 0 for v in fac["stage_ms_per_frame"].values())
    assert 0 <= fac["frame_rate_cost_same_core"] < 1


def test_bad_checkpoint_is_a_usage_error(tmp_path):
    r = _cli("bench", "--quick", "--checkpoints", str(tmp_path / "missing.pt"), "--out", str(tmp_path))
    assert r.returncode == 2 and "missing.pt" in r.stderr and "split.pt" in r.stderr
    r = _cli("bench", "--quick", "--frames", "0", "--out", str(tmp_path))
    assert r.returncode == 2 and "--frames 0" in r.stderr


def test_latency_model_and_media_units():
    from benchmarks.latency import latency_model
    from benchmarks.report import crossover_mbps
    from benchmarks.media import image_roundtrip, video_roundtrip

    t = latency_model({"x": {"device_s": 0.01, "bytes": 125_000, "server_s": 0.02}}, [1, 10])["x"]
    assert t == pytest.approx([0.01 + 1.0 + 0.02, 0.01 + 0.1 + 0.02])
    split = {"device_s": 0.005, "bytes": 1_000, "server_s": 0.025}
    jpeg = {"device_s": 0.001, "bytes": 20_000, "server_s": 0.019}  # 10 ms less fixed time, 152 kbit more
    below = crossover_mbps(split, jpeg)["below_mbps"]
    assert below == pytest.approx(152_000 / 0.010 / 1e6)
    t_split, t_jpeg = latency_model({"s": split, "j": jpeg}, [below * 0.9, below * 1.1]).values()
    assert t_split[0] < t_jpeg[0] and t_split[1] > t_jpeg[1]  # wins just below the crossover, loses above
    assert crossover_mbps({**split, "server_s": 0.01}, jpeg) == {"every_bandwidth": True}
    assert crossover_mbps({**split, "bytes": 30_000}, jpeg) == {"no_bandwidth": True}
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    dec, sizes, _, _ = image_roundtrip(frames, "jpeg", 50)
    assert dec.shape == frames.shape and len(sizes) == 4
    dec, sizes, _, _ = video_roundtrip(frames, "h264", 30)
    assert dec.shape == frames.shape and sum(sizes) > 0


def test_equal_accuracy_match_is_monotone_in_bytes():
    """A baseline point that dips below a cheaper one does not let noise pick the match."""
    from benchmarks.rate import matches

    def row(setting, b, box, miou, top1):
        return {"method": "JPEG frames", "setting": setting, "bytes_mean": b,
                "box_map50_95": box, "miou": miou, "top1": top1}

    rows = [row("q50", 5_000, 40.0, 31.0, 70.0), row("q30", 4_000, 40.0, 33.0, 70.0),
            row("q70", 9_000, 40.0, 35.0, 70.0), row("q90", 20_000, 40.0, 36.0, 70.0)]
    split = {"setting": "beta", "bytes_mean": 1_000, "box_map50_95": 40.0, "miou": 33.5, "top1": 70.0}
    m = matches(rows, split, "JPEG frames")
    # raw points would take q30 (33.0 within 1 of 33.5); fitted, q30 and q50 pool to 32.0: q70 is the first to reach
    assert m["all"]["setting"] == "q70" and m["all"]["fitted"]["miou"] == 35.0
    assert m["miou"]["setting"] == "q70" and m["box_map50_95"]["setting"] == "q30"
    assert m["all"]["split_over_baseline"] == pytest.approx(1_000 / 9_000)
    split["miou"] = 40.0
    assert m != matches(rows, split, "JPEG frames") and matches(rows, split, "JPEG frames")["all"]["setting"] is None

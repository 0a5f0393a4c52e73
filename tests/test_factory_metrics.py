"""The factory stages in a real running graph (threads, bounded queues): conveyor truth -> track.items ->
count.items -> events.items -> sink.metrics + sink.jsonl; Prometheus /metrics scraped over HTTP while it runs."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest

from conveyor.classes import ITEM_NAMES
from conveyor.line import LineConfig
from core.errors import UsageError
from pipeline.graph import GraphRunner, parse_graph
from pipeline.stage import FrameMeta, FrameResult, Source, create_stage, register_stage
from stages.factory.truth import IdentifiedLine, detections_from_truth

N = 150


@register_stage
class TruthFrames(Source):
    """Test source: FrameResults with detections derived from a conveyor line's truth; then waits for `gate`."""
    key = "test.factory_truth_frames"
    gate = threading.Event()

    def __init__(self, frames: int = N):
        self.n = frames

    def frames(self):
        rng = np.random.default_rng(0)
        for tf in IdentifiedLine(LineConfig(size=128, seed=3, belt_speed=1.0)).frames(self.n):
            now = time.time_ns()
            meta = FrameMeta(0, tf.frame.index, now - 40_000_000, timings={"decode": 12.0, "detection": 8.0},
                             sent_ns=now - 30_000_000, received_ns=now - 20_000_000)
            yield FrameResult(meta, now, 900, (24, 32, 32), (128, 128),
                              {"detection": detections_from_truth(tf, rng, drop=0.05)}, {})
        while not self.gate.wait(0.05) and not self.ctx.stop.is_set():
            pass


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_scraped_over_http_while_the_graph_runs(tmp_path):
    spec = parse_graph({"name": "factory_metrics_test", "stages": [
        {"name": "src", "key": "test.factory_truth_frames"},
        {"name": "track", "key": "track.items", "inputs": ["src"], "params": {"names": ITEM_NAMES, "clock": "frames"}},
        {"name": "count", "key": "count.items", "inputs": ["track"]},
        {"name": "events", "key": "events.items", "inputs": ["count"], "params": {"line": "L1"}},
        {"name": "metrics", "key": "sink.metrics", "inputs": ["events"], "params": {"port": 0}},
        {"name": "jsonl", "key": "sink.jsonl", "inputs": ["events"], "params": {"path": str(tmp_path / "r.jsonl")}},
    ]})
    TruthFrames.gate.clear()
    runner = GraphRunner(spec, log=lambda m: None)
    runner.open()
    runner.start()
    try:
        port = runner.nodes["metrics"].stage.bound_port
        deadline = time.monotonic() + 30
        m = {}
        while time.monotonic() < deadline:
            m = scrape(port)
            if m.get(("ladon_frames_total", (("stream", "0"),))) == N:
                break
            time.sleep(0.1)
        assert m[("ladon_frames_total", (("stream", "0"),))] == N
        assert m[("ladon_wire_bytes_total", (("stream", "0"),))] == N * 900
        for stage in ("decode", "detection", "track", "count", "events"):  # per-stage latency histograms
            assert m[("ladon_stage_latency_seconds_count", (("stage", stage),))] == N
        assert m[("ladon_stage_latency_seconds_bucket", (("le", "0.025"), ("stage", "decode")))] == N  # 12 ms
        assert m[("ladon_stage_latency_seconds_bucket", (("le", "0.01"), ("stage", "decode")))] == 0
        assert m[("ladon_frame_latency_seconds_count", ())] == N
        for stage in ("track", "count", "events", "metrics", "jsonl"):  # from the runtime, at scrape time
            assert ("ladon_stage_queue_depth", (("stage", stage),)) in m
            assert m[("ladon_stage_dropped_total", (("stage", stage),))] == 0
        assert m[("ladon_stage_processed_total", (("stage", "track"),))] == N
        counted = {k[1][0][1]: v for k, v in m.items() if k[0] == "ladon_items_counted_total"}
        assert set(counted) <= set(ITEM_NAMES) and sum(counted.values()) > 10
        assert m[("ladon_events_total", (("stream", "0"), ("type", "item.new")))] > 10
        assert m[("ladon_items_per_minute", (("stream", "0"),))] > 0
        assert m[("ladon_stage_stat", (("name", "counted"), ("stage", "count")))] == sum(counted.values())
    finally:
        TruthFrames.gate.set()
        assert runner.wait() == 0
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == N and [r["frame"] for r in rows] == list(range(N))
    last = rows[-1]
    assert last["counts"]["total"] == sum(counted.values()) == sum(last["counts"]["by_class"].values())
    assert sum(len(r["events"]) for r in rows) == sum(v for k, v in m.items() if k[0] == "ladon_events_total")
    assert all(a["id"] >= 1 for r in rows for a in r["tracks"]["active"])
    with pytest.raises(OSError):  # the HTTP server is gone after close
        scrape(port)


def test_bad_metrics_options():
    for params, words in [({"port": 70000}, ["port", "70000"]), ({"namespace": "9x"}, ["namespace", "'9x'"]),
                          ({"buckets_ms": [5, 1]}, ["buckets_ms", "increasing"])]:
        with pytest.raises(UsageError) as e:
            create_stage("sink.metrics", **params)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_edge_metrics_count_encoded_frames_bytes_and_encode_time():
    """`edge --metrics-port`: sink.metrics after edge.encode (Packets) on a live camera, scraped over HTTP."""
    spec = parse_graph({"name": "edge_metrics_test", "stages": [
        {"name": "source", "key": "source.conveyor", "params": {"size": 64, "fps": 30, "seed": 2}},
        {"name": "edge", "key": "edge.encode", "inputs": ["source"], "params": {"checkpoint": "random:64"}},
        {"name": "metrics", "key": "sink.metrics", "inputs": ["edge"], "params": {"port": 0}},
    ]})
    runner = GraphRunner(spec, log=lambda m: None)
    runner.open()
    runner.start()
    try:
        port = runner.nodes["metrics"].stage.bound_port
        deadline, m = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            m = scrape(port)
            if m.get(("ladon_frames_total", (("stream", "0"),)), 0) >= 5:
                break
            time.sleep(0.1)
        frames = m[("ladon_frames_total", (("stream", "0"),))]
        assert frames >= 5
        assert m[("ladon_wire_bytes_total", (("stream", "0"),))] > 40 * frames  # header + payload per frame
        assert m[("ladon_stage_latency_seconds_count", (("stage", "edge"),))] >= frames
        assert m[("ladon_frame_latency_seconds_count", ())] >= frames
        assert ("ladon_stage_queue_depth", (("stage", "edge"),)) in m  # the runtime's view, at scrape time
    finally:
        runner.stop.set()
        runner.wait()

"""The frame envelope's completion handle, in real graphs (GraphRunner threads, the real receive, record, delay
and JSONL stages, a real EdgeClient over ZeroMQ; no mocks):

* a frame is acknowledged to its edge only after the JSONL sink wrote its row (a slow sink: the edge never holds
  fewer frames than the file lacks); a sink that fails acknowledges nothing, and the next server gets every frame,
  exactly once;
* a frame a stage loses (a tolerated error) or the runtime drops (a live message on a full queue) completes its
  handle as lost: acknowledged (the edge's credit comes back, nothing is resent for ever) and counted;
* who commits is decided from the graph when it is wired, not from the order stages open in.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.envelope import Completion
from pipeline.graph import GraphRunner, parse_graph
from pipeline.stage import FrameMeta, FrameResult, Source, Stage, register_stage, unregister_stage
from transport.runs import RunLedger

pytest.importorskip("codec.api")

CKPT = "random:64"


def rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def wire_frames():
    """``msg(i)``: frame ``i`` of stream 0 as a wire message the server accepts (the random 64 px codec)."""
    from pipeline.codecs import get_codec
    from transport import wire
    codec = get_codec(CKPT, edge_only=True)
    enc = codec.encode(np.zeros((1, 64, 64, 3), np.uint8))[0]

    def msg(i: int) -> bytes:
        return wire.pack(wire.WireHeader(0, i, time.time_ns(), time.time_ns(), codec.fingerprint,
                                         tuple(enc.latent_shape), (64, 64)), enc.payload)

    msg.fingerprint = codec.fingerprint
    return msg


def server_graph(ep: str, jsonl: Path, *middle: dict, **receive) -> GraphRunner:
    """receive -> [middle stages] -> server.record -> sink.jsonl, as one in-process graph."""
    stages = [{"name": "receive", "key": "server.receive",
               "params": {"endpoint": ep, "checkpoint": CKPT, "insecure": True, "exit_on_eos": True,
                          "bye_grace_s": 0.5, "drain_s": 0.5, **receive}}]
    prev = "receive"
    for m in middle:
        stages.append({**m, "inputs": [prev]})
        prev = m["name"]
    stages += [{"name": "record", "key": "server.record", "inputs": [prev]},
               {"name": "jsonl", "key": "sink.jsonl", "inputs": ["record"], "params": {"path": str(jsonl)}}]
    runner = GraphRunner(parse_graph({"name": "completion", "stages": stages}, "<test>"), log=lambda m: None)
    runner.open()
    runner.start()
    return runner


def edge(ep: str, fingerprint: bytes, **kw):
    from transport.session import EdgeClient
    return EdgeClient(ep, stream=0, fingerprint=fingerprint, mode="replay", log=lambda m: None, **kw)


def test_committers_come_from_the_graph_not_from_the_open_order(tmp_path):
    def wired(commit: bool) -> GraphRunner:
        return GraphRunner(parse_graph({"name": "g", "stages": [
            {"name": "receive", "key": "server.receive", "params": {"endpoint": "tcp://127.0.0.1:5999",
                                                                    "insecure": True}},
            {"name": "record", "key": "server.record", "inputs": ["receive"]},
            {"name": "jsonl", "key": "sink.jsonl", "inputs": ["record"],
             "params": {"path": str(tmp_path / "r.jsonl"), "commit": commit}},
            {"name": "console", "key": "sink.console", "inputs": ["record"]}]}, "<test>"))

    r = wired(True)
    assert r.nodes["receive"].committers == (r.nodes["jsonl"].stage,)
    assert r.nodes["record"].leads_to_commit and r.nodes["jsonl"].leads_to_commit
    assert not r.nodes["console"].leads_to_commit  # a loss on that branch does not finish the frame
    r = wired(False)  # no committing stage: the receive stage acknowledges on emission
    assert r.nodes["receive"].committers == () and not r.nodes["record"].leads_to_commit


def test_a_frame_is_acknowledged_only_after_its_jsonl_row_is_written(tmp_path, wire_frames):
    n = 8
    ep, jl = f"ipc://{tmp_path}/s.ipc", tmp_path / "r.jsonl"
    runner = server_graph(ep, jl, {"name": "slow", "key": "util.delay", "params": {"ms": 120}})
    cl = edge(ep, wire_frames.fingerprint, timeout_s=30)
    try:
        for i in range(n):
            assert cl.submit(i, wire_frames(i))
        samples = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with cl.cond:
                held = set(cl.unacked)
            released = set(range(n)) - held  # acknowledged: the edge let them go
            written = {r["frame"] for r in rows(jl)}  # read after: rows only grow
            assert released <= written, f"acknowledged before written: {sorted(released - written)}"
            samples += 1
            if len(written) == n and not held - {n}:
                break
            time.sleep(0.01)
        assert cl.finish(n, timeout_s=30)
        assert runner.wait() == 0
    finally:
        cl.close()
        runner.stop.set()
        runner.wait()
    assert samples > 10
    assert [r["frame"] for r in rows(jl)] == list(range(n))
    assert len({r["session"] for r in rows(jl)}) == 1  # the run, from the envelope
    assert runner.stats()["receive"].extra["lost"] == 0


def test_a_failing_sink_acknowledges_nothing_and_the_next_server_gets_every_frame_once(tmp_path, wire_frames):
    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("needs /dev/full (a file whose writes fail)")
    n = 6
    ep = f"ipc://{tmp_path}/s.ipc"
    cl = edge(ep, wire_frames.fingerprint, timeout_s=60)
    try:
        runner = server_graph(ep, full)  # every write fails with ENOSPC: the sink fails, the graph stops
        for i in range(n):
            assert cl.submit(i, wire_frames(i))
        assert runner.wait() == 1 and "jsonl" in runner.errors[0]
        with cl.cond:
            assert sorted(cl.unacked) == list(range(n)) and cl.stats["acked"] == 0
        jl = tmp_path / "r.jsonl"
        runner = server_graph(ep, jl)  # a new server instance: the edge resends what it still holds
        assert cl.finish(n, timeout_s=60)
        assert runner.wait() == 0
    finally:
        cl.close()
        runner.stop.set()
        runner.wait()
    assert [r["frame"] for r in rows(jl)] == list(range(n))


@register_stage
class LoseFrame(Stage):
    """Test stage: passes messages through, but raises on frame ``index`` (a tolerated error loses it)."""
    key = "test.lose_frame"
    tolerate_errors = True

    def __init__(self, index: int = 2):
        self.index = int(index)

    def process(self, msg):
        if msg.index == self.index:
            raise ValueError(f"frame {msg.index} is lost here")
        return msg


def test_a_frame_lost_in_the_graph_is_acknowledged_as_lost_and_its_credit_returns(tmp_path, wire_frames):
    n = 20  # more than the window (8): without the lost frame's ack the edge would wait for ever
    ep, jl = f"ipc://{tmp_path}/s.ipc", tmp_path / "r.jsonl"
    runner = server_graph(ep, jl, {"name": "lose", "key": "test.lose_frame", "params": {"index": 2}})
    cl = edge(ep, wire_frames.fingerprint, timeout_s=30)
    try:
        for i in range(n):
            assert cl.submit(i, wire_frames(i))
        assert cl.finish(n, timeout_s=30)  # every frame acknowledged, the lost one too
        assert runner.wait() == 0
    finally:
        cl.close()
        runner.stop.set()
        runner.wait()
    assert [r["frame"] for r in rows(jl)] == [i for i in range(n) if i != 2]
    assert runner.stats()["lose"].errors == 1
    assert runner.stats()["receive"].extra["lost"] == 1


@register_stage
class LiveResults(Source):
    """Test source: ``n`` live FrameResults as fast as it can, each with a completion handle on ``ledger``."""
    key = "test.live_results"
    live = True
    ledger: RunLedger | None = None
    handles: list[Completion] = []

    def __init__(self, n: int = 200):
        self.n = int(n)

    def frames(self):
        for i in range(self.n):
            h = Completion(lambda lost, _i=i: self.ledger.done(0, _i), resend=False)
            self.handles.append(h)
            yield FrameResult(FrameMeta(0, i, time.time_ns(), live=True, completion=h), time.time_ns(), 10,
                              (1, 1, 1), (8, 8), {}, {})


def test_a_dropped_live_message_completes_its_handle_as_lost(tmp_path):
    n = 200
    LiveResults.ledger, LiveResults.handles = RunLedger(), []
    jl = tmp_path / "r.jsonl"
    spec = parse_graph({"name": "drops", "stages": [
        {"name": "src", "key": "test.live_results", "params": {"n": n}},
        {"name": "slow", "key": "util.delay", "inputs": ["src"], "queue_size": 1, "params": {"ms": 5}},
        {"name": "jsonl", "key": "sink.jsonl", "inputs": ["slow"], "params": {"path": str(jl)}}]}, "<test>")
    runner = GraphRunner(spec, log=lambda m: None)
    assert runner.run() == 0
    handles, written = LiveResults.handles, [r["frame"] for r in rows(jl)]
    dropped = runner.stats()["slow"].dropped
    assert len(handles) == n and all(h.done for h in handles)  # every frame finished: none waits for ever
    lost = [i for i, h in enumerate(handles) if h.outcome == "lost"]
    assert dropped > 0 and len(lost) == dropped  # each drop completed its handle as lost ...
    assert sorted(lost + written) == list(range(n))  # ... and every other frame was committed by the sink
    assert all(handles[i].outcome == "committed" for i in written)
    acks = []
    while not LiveResults.ledger.queue.empty():
        acks.append(LiveResults.ledger.queue.get()[1])
    assert sorted(acks) == list(range(n))  # one acknowledgement per frame, credit back for the lost ones


def teardown_module(module):
    unregister_stage("test.lose_frame")
    unregister_stage("test.live_results")

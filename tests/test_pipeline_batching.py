"""Dynamic batching: the runtime's ``max_batch`` / ``process_batch`` (real GraphRunner threads, real stages), the
server's batched decode across streams (the random 64 px codec; real ZeroMQ for exactly-once), and
``codec.api.Features.split`` on the PyTorch cache and on prefilled raw head outputs (the onnxruntime path).

* a batched server graph writes the same JSON rows as the unbatched one, each stream in order;
* a batch that raises is redone message by message: a bad message loses only itself (its frame completes as lost);
  a frame that fails the codec inside a batch is lost alone;
* the end of input and a graph's shutdown are never held back by a batch waiting to fill;
* ``max_batch`` 1 (the default) never calls ``process_batch``.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from core.errors import UsageError
from pipeline.envelope import Completion
from pipeline.graph import GraphRunner, parse_graph
from pipeline.stage import FrameMeta, FrameResult, Packet, Source, Stage, register_stage, unregister_stage

pytest.importorskip("codec.api")
import torch  # noqa: E402

CKPT = "random:64"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def content(row: dict) -> dict:
    """A JSONL row without what differs from run to run (clock times and per-stage timings)."""
    return {k: v for k, v in row.items() if k not in ("timestamps", "latency_ms")}


# --------------------------------------------------------------------------------------------- runtime
@register_stage
class Numbers(Source):
    """Test source: ``n`` FrameResults of stream 0 as fast as taken, each with a completion handle (``handles``);
    ``hold``: after them, stay open until the graph stops (an input that has not ended)."""
    key = "test.numbers"
    handles: list[Completion] = []

    def __init__(self, n: int = 10, hold: bool = False):
        self.n, self.hold = int(n), bool(hold)

    def frames(self):
        for i in range(self.n):
            h = Completion(lambda lost: None, resend=False)
            self.handles.append(h)
            yield FrameResult(FrameMeta(0, i, time.time_ns(), completion=h), time.time_ns(), 10, (1, 1, 1), (8, 8),
                              {}, {})
        while self.hold and not self.ctx.stop.wait(0.01):
            pass


@register_stage
class Batcher(Stage):
    """Test stage that batches: records each ``process_batch`` size and ``process`` call; the messages of frame
    ``poison`` make ``process_batch`` raise and ``process`` raise (a tolerated error: that frame is lost)."""
    key = "test.batcher"
    tolerate_errors = True
    calls: list = []

    def __init__(self, max_batch: int = 4, max_wait_ms: float = 20.0, poison: int = -1, sleep_ms: float = 10.0):
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms
        self.poison, self.sleep_ms = int(poison), float(sleep_ms)

    def process(self, msg):
        self.calls.append(("one", msg.index))
        if msg.index == self.poison:
            raise ValueError(f"frame {msg.index} is bad")
        return msg

    def process_batch(self, msgs):
        self.calls.append(("batch", len(msgs)))
        time.sleep(self.sleep_ms / 1000.0)  # slower than the source: messages queue up behind each batch
        if any(m.index == self.poison for m in msgs):
            raise ValueError("a bad frame in the batch")
        return [m for m in msgs]


def run_batcher(tmp_path, n=30, hold=False, **params) -> tuple[GraphRunner, list[dict]]:
    Numbers.handles, Batcher.calls = [], []
    jl = tmp_path / "r.jsonl"
    spec = parse_graph({"name": "batching", "stages": [
        {"name": "src", "key": "test.numbers", "params": {"n": n, "hold": hold}},
        {"name": "batch", "key": "test.batcher", "inputs": ["src"], "params": params},
        {"name": "jsonl", "key": "sink.jsonl", "inputs": ["batch"], "params": {"path": str(jl)}}]}, "<test>")
    runner = GraphRunner(spec, log=lambda m: None)
    return runner, jl


def test_the_runtime_batches_up_to_max_batch_in_order(tmp_path):
    runner, jl = run_batcher(tmp_path, n=30, max_batch=4)
    assert runner.run() == 0
    sizes = [k for kind, k in Batcher.calls if kind == "batch"]
    assert sizes and max(sizes) == 4 and all(1 < k <= 4 for k in sizes)  # a batch of 1 goes to process()
    assert sum(sizes) + sum(1 for kind, _ in Batcher.calls if kind == "one") == 30
    assert [r["frame"] for r in rows(jl)] == list(range(30))  # outputs in the order received
    assert all(h.outcome == "committed" for h in Numbers.handles)
    st = runner.stats()["batch"]
    assert st.processed == 30 and st.extra["batched"] == 30 and st.extra["batches"] < 30
    assert all(isinstance(r["latency_ms"]["batch"], float) for r in rows(jl))  # each frame's share of its batch


def test_max_batch_1_never_calls_process_batch(tmp_path):
    runner, jl = run_batcher(tmp_path, n=12, max_batch=1)
    assert runner.run() == 0
    assert Batcher.calls == [("one", i) for i in range(12)]
    assert [r["frame"] for r in rows(jl)] == list(range(12))
    assert "batches" not in runner.stats()["batch"].extra


def test_a_batch_that_raises_is_redone_one_by_one_and_loses_only_the_bad_message(tmp_path):
    runner, jl = run_batcher(tmp_path, n=30, max_batch=4, poison=7)
    assert runner.run() == 0
    assert [r["frame"] for r in rows(jl)] == [i for i in range(30) if i != 7]
    outcomes = [h.outcome for h in Numbers.handles]
    assert outcomes[7] == "lost" and outcomes.count("lost") == 1 and outcomes.count("committed") == 29
    st = runner.stats()["batch"]
    assert st.errors == 1 and st.extra["batch_fallbacks"] == 1 and st.processed == 29
    singles = [i for kind, i in Batcher.calls if kind == "one"]
    assert 7 in singles and len(singles) <= 4 + 1  # the failed batch's messages (and perhaps a lone last one)


@pytest.mark.parametrize("hold", [False, True])
def test_neither_the_end_of_input_nor_a_shutdown_waits_for_a_batch_to_fill(tmp_path, hold):
    runner, jl = run_batcher(tmp_path, n=3, hold=hold, max_batch=64, max_wait_ms=10_000, sleep_ms=0)
    t0 = time.monotonic()
    if hold:  # the input stays open: the batch waits for more ... until the graph stops
        threading.Timer(0.5, runner.stop.set).start()
    assert runner.run() == 0
    assert time.monotonic() - t0 < 5.0  # not the 10 s a batch may wait
    assert [r["frame"] for r in rows(jl)] == [0, 1, 2]


def test_batching_values_are_checked():
    def runner(**params):
        return GraphRunner(parse_graph({"name": "g", "stages": [
            {"name": "src", "key": "test.numbers"},
            {"name": "b", "key": "test.batcher", "inputs": ["src"], "params": params}]}, "<test>"))

    for params, words in (({"max_batch": 0}, "max_batch 0 must be an integer >= 1"),
                          ({"max_batch": "4"}, "max_batch '4'"),
                          ({"max_wait_ms": -1}, "max_wait_ms -1 must be")):
        with pytest.raises(UsageError, match=words) as e:
            runner(**params)
        assert "'b' (test.batcher)" in str(e.value)
    with pytest.raises(UsageError, match="'d' .*has no process_batch; set max_batch 1"):
        _no_process_batch()
    from stages.server import ServerDecode
    for kw, words in (({"max_batch": 0}, r"max_batch 0: .*1\.\.256.*--max-batch"),
                      ({"max_batch": True}, "max_batch True"), ({"max_batch": "8"}, "max_batch '8'"),
                      ({"max_wait_ms": -1}, r"max_wait_ms -1: .*0\.\.1000.*--max-wait-ms"),
                      ({"max_wait_ms": float("nan")}, "max_wait_ms nan")):
        with pytest.raises(UsageError, match=words):
            ServerDecode(**kw)
    assert ServerDecode().max_batch == 1  # the default: no batching


def _no_process_batch():
    """A stage asking for batches without process_batch is refused when the graph is built."""
    from pipeline.graph import StageSpec, batching
    from stages.server import Delay

    d = Delay()
    d.max_batch = 2
    batching(StageSpec("d", "util.delay"), d)


# --------------------------------------------------------------------------------------------- Features.split
@pytest.fixture(scope="module")
def codec():
    from pipeline.codecs import get_codec
    return get_codec(CKPT)


@pytest.fixture(scope="module")
def encoded(codec):
    rng = np.random.default_rng(3)
    return codec.encode(rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8))


def same(a, b, atol=0.0) -> bool:
    """Equal results (dicts, lists, tuples, arrays, tensors, numbers), arrays within ``atol``."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k], atol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        a, b = a.numpy(), b.numpy()
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.allclose(a, b, atol=atol, rtol=0)
    return a == b


def test_split_slices_the_torch_cache_and_heads_give_the_batch_results(codec, encoded):
    from codec.tasks import TASKS
    batch = codec.decode(encoded)
    parts = batch.split()
    assert len(parts) == 4 and all(p.batch == 1 for p in parts)
    want = codec.heads(batch, conf=0.0)
    for i, p in enumerate(parts):
        assert p.cache.keys() == batch.cache.keys()
        for k, t in p.cache.items():
            assert t.shape[0] == 1 and torch.equal(t, batch.cache[k][i:i + 1])
        alone = codec.decode([encoded[i]])  # the frame decoded alone: the same features within float rounding
        assert all(torch.allclose(alone.cache[k], t, atol=1e-5) for k, t in p.cache.items())
        got = {t: codec.head(t, p, conf=0.0)[0] for t in TASKS}
        assert same(got, want[i], atol=1e-4)  # heads on one row or on the batch: float rounding apart
    assert codec.decode(encoded[:1]).split()[0].batch == 1


def test_split_slices_prefilled_raw_outputs_as_the_onnxruntime_path_gives_them(codec, encoded):
    from codec.api import Features
    from codec.tasks import TASKS
    torch_batch = codec.decode(encoded)
    want = codec.heads(torch_batch, conf=0.0)
    # what codec.decode returns with a server runtime attached: no cache, every task's raw batch output memoised
    raw = {t: torch_batch.raw(t, lambda t=t: codec.model.teachers.head_raw(t, torch_batch.cache)) for t in TASKS}
    prefilled = Features({}, 4)
    prefilled._raw.update(raw)
    prefilled._raw["nested"] = (torch.arange(8).reshape(4, 2), [np.arange(4)], {"x": torch.ones(4, 3)}, 7,
                                torch.zeros(2, 5))
    parts = prefilled.split()
    for i, p in enumerate(parts):
        assert p.cache == {} and p.batch == 1
        got = {t: codec.head(t, p, conf=0.0)[0] for t in TASKS}  # post-processing only, on the frame's rows
        assert same(got, want[i])
        rows_, arr, d, seven, shared = p._raw["nested"]
        assert torch.equal(rows_, torch.tensor([[2 * i, 2 * i + 1]])) and arr[0].tolist() == [i]
        assert d["x"].shape == (1, 3) and seven == 7 and shared.shape == (2, 5)  # not batched: shared as is


def test_split_on_the_onnxruntime_server_path(codec, encoded, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from codec.api import SplitCodec
    from codec.server_onnx import OnnxServer, export_server
    onnx_codec = SplitCodec(codec.model)
    path = export_server(onnx_codec, tmp_path / "random64.server.onnx")
    onnx_codec.server_runtime = OnnxServer(path, onnx_codec.fingerprint, threads=1)
    batch = onnx_codec.decode(encoded)
    assert batch.cache == {} and batch._raw
    for i, p in enumerate(batch.split()):
        alone = onnx_codec.decode([encoded[i]])
        for t in batch._raw:
            assert p._raw[t].shape[0] == 1 and torch.allclose(p._raw[t], alone._raw[t], atol=1e-4)


# --------------------------------------------------------------------------------------------- server.decode
def server_graph(jsonl: Path, max_batch: int, streams: int = 3, n: int = 12) -> GraphRunner:
    """``streams`` conveyor streams, each encoded by its own edge stage, into one server.decode, three task
    consumers, merge and JSONL: one process, no network."""
    stages = []
    for s in range(streams):
        stages += [{"name": f"src{s}", "key": "source.conveyor",
                    "params": {"size": 96, "seed": s, "stream": s, "rate": "max", "max_frames": n, "live": False}},
                   {"name": f"enc{s}", "key": "edge.encode", "inputs": [f"src{s}"], "params": {"checkpoint": CKPT}}]
    stages += [{"name": "decode", "key": "server.decode", "inputs": [f"enc{s}" for s in range(streams)],
                "params": {"checkpoint": CKPT, "max_batch": max_batch, "max_wait_ms": 50}},
               {"name": "detection", "key": "task.detection", "inputs": ["decode"], "params": {"conf": 0.0}},
               {"name": "segmentation", "key": "task.segmentation", "inputs": ["decode"]},
               {"name": "classification", "key": "task.classification", "inputs": ["decode"]},
               {"name": "merge", "key": "results.merge", "inputs": ["detection", "segmentation", "classification"]},
               {"name": "jsonl", "key": "sink.jsonl", "inputs": ["merge"], "params": {"path": str(jsonl)}}]
    return GraphRunner(parse_graph({"name": "batched", "stages": stages}, "<test>"), log=lambda m: None)


def test_a_batched_server_graph_writes_the_rows_of_the_unbatched_one(tmp_path, codec):
    got = {}
    for mb in (1, 8):
        runner = server_graph(tmp_path / f"b{mb}.jsonl", mb)
        assert runner.run() == 0
        got[mb] = rows(tmp_path / f"b{mb}.jsonl")
        ex = runner.stats()["decode"].extra
        if mb == 8:
            assert ex["batched"] == 36 and ex["batches"] < 36  # frames did share decodes
        else:
            assert "batches" not in ex
    for mb, rs in got.items():
        for s in range(3):  # each stream in order
            assert [r["frame"] for r in rs if r["stream"] == s] == list(range(12)), mb
    one = {(r["stream"], r["frame"]): content(r) for r in got[1]}
    eight = {(r["stream"], r["frame"]): content(r) for r in got[8]}
    assert one == eight and len(one) == 36
    assert any(r["detection"]["boxes"] for r in got[8])  # conf 0: the random model's boxes are compared too


@register_stage
class Packets(Source):
    """Test source: ``n`` received frames of stream 0 (wire header and payload split off, as server.receive
    emits them), each with a completion handle; frame ``wrong_shape`` declares another latent shape, frame
    ``truncated`` carries half its payload (it does not entropy-decode)."""
    key = "test.packets"
    handles: list[Completion] = []

    def __init__(self, n: int = 16, wrong_shape: int = 3, truncated: int = 5):
        self.n, self.wrong_shape, self.truncated = int(n), int(wrong_shape), int(truncated)

    def frames(self):
        from pipeline.codecs import get_codec
        from transport import wire
        c = get_codec(CKPT)
        rng = np.random.default_rng(0)
        for i in range(self.n):
            enc = c.encode(rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8))[0]
            shape, payload = tuple(enc.latent_shape), enc.payload
            if i == self.wrong_shape:
                shape = (shape[0] - 1, *shape[1:])
            if i == self.truncated:
                payload = payload[:len(payload) // 2]
            h, p = wire.unpack(wire.pack(wire.WireHeader(0, i, time.time_ns(), time.time_ns(), c.fingerprint, shape,
                                                         (64, 64)), payload))
            handle = Completion(lambda lost: None, resend=False)
            self.handles.append(handle)
            yield Packet(FrameMeta(0, i, h.capture_ns, completion=handle), b"", header=h, payload=p)


def test_a_bad_frame_inside_a_batch_is_lost_alone(tmp_path, codec):
    Packets.handles = []
    jl = tmp_path / "r.jsonl"
    runner = GraphRunner(parse_graph({"name": "bad", "stages": [
        {"name": "src", "key": "test.packets", "params": {"n": 16}},
        {"name": "decode", "key": "server.decode", "inputs": ["src"],
         "params": {"checkpoint": CKPT, "max_batch": 16, "max_wait_ms": 500}},
        {"name": "classification", "key": "task.classification", "inputs": ["decode"]},
        {"name": "merge", "key": "results.merge", "inputs": ["classification"]},
        {"name": "jsonl", "key": "sink.jsonl", "inputs": ["merge"], "params": {"path": str(jl)}}]}, "<test>"),
        log=lambda m: None)
    assert runner.run() == 0
    assert [r["frame"] for r in rows(jl)] == [i for i in range(16) if i not in (3, 5)]
    assert all(r["errors"] == {} and "classification" in r for r in rows(jl))
    outcomes = [h.outcome for h in Packets.handles]
    assert outcomes[3] == outcomes[5] == "lost" and outcomes.count("committed") == 14
    st = runner.stats()["decode"]
    assert st.errors == 2 and st.extra["batched"] == 16 and st.extra["batches"] < 16
    assert "batch_fallbacks" not in st.extra  # the stage handled its bad frames itself


def test_batched_decode_over_zeromq_acknowledges_every_frame_of_every_stream_once(tmp_path, codec):
    """Three edges (real EdgeClients over ipc) into receive -> decode (batches of up to 8) -> merge -> JSONL:
    every frame written once, each stream in order, every frame acknowledged only after its row."""
    from transport import wire
    from transport.session import EdgeClient
    n, streams = 20, 3
    ep, jl = f"ipc://{tmp_path}/s.ipc", tmp_path / "r.jsonl"
    enc = codec.encode(np.zeros((1, 64, 64, 3), np.uint8))[0]
    spec = parse_graph({"name": "zmq_batched", "stages": [
        {"name": "receive", "key": "server.receive",
         "params": {"endpoint": ep, "checkpoint": CKPT, "insecure": True, "exit_on_eos": True, "bye_grace_s": 0.5,
                    "drain_s": 0.5}},
        {"name": "decode", "key": "server.decode", "inputs": ["receive"],
         "params": {"checkpoint": CKPT, "max_batch": 8, "max_wait_ms": 20}},
        {"name": "merge", "key": "results.merge", "inputs": ["decode"]},
        {"name": "jsonl", "key": "sink.jsonl", "inputs": ["merge"], "params": {"path": str(jl)}}]}, "<test>")
    runner = GraphRunner(spec, log=lambda m: None)
    runner.open()
    runner.start()
    clients = [EdgeClient(ep, stream=s, fingerprint=codec.fingerprint, mode="replay", log=lambda m: None,
                          timeout_s=60) for s in range(streams)]
    try:
        def send(cl, s):
            for i in range(n):
                assert cl.submit(i, wire.pack(wire.WireHeader(s, i, time.time_ns(), time.time_ns(), codec.fingerprint,
                                                              tuple(enc.latent_shape), (64, 64)), enc.payload))
        threads = [threading.Thread(target=send, args=(cl, s)) for s, cl in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(cl.finish(n, timeout_s=60) for cl in clients)
        assert runner.wait() == 0
    finally:
        for cl in clients:
            cl.close()
        runner.stop.set()
        runner.wait()
    rs = rows(jl)
    assert len(rs) == n * streams
    for s in range(streams):
        assert [r["frame"] for r in rs if r["stream"] == s] == list(range(n))
    assert runner.stats()["receive"].extra["lost"] == 0
    ex = runner.stats()["decode"].extra
    assert ex["batched"] == n * streams


def teardown_module(module):
    for key in ("test.numbers", "test.batcher", "test.packets"):
        unregister_stage(key)


# --------------------------------------------------------------------------------------------- the server command
def test_server_flags_set_the_decode_stage_and_bad_values_exit_2(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.graph import load_graph
    dec = load_graph("server").stage("decode").params
    assert (dec["max_batch"], dec["max_wait_ms"]) == (1, 5)  # the shipped default: no batching
    dec = load_graph("server", {"max_batch": 8, "max_wait_ms": 2.5}).stage("decode").params
    assert (dec["max_batch"], dec["max_wait_ms"]) == (8, 2.5)
    base = ["server", "--bind", f"ipc://{tmp_path}/s.ipc", "--out", str(tmp_path / "out"), "--checkpoint", CKPT,
            "--quiet"]
    assert main([*base, "--max-batch", "0"]) == 2
    assert "max_batch 0" in capsys.readouterr().err
    assert main([*base, "--max-batch", "8", "--max-wait-ms", "-1"]) == 2
    assert "max_wait_ms -1.0" in capsys.readouterr().err
    assert main([*base, "--max-batch", "4", "--ray", "auto"]) == 2  # the replicas batch (--ray-max-batch)
    assert "no server.decode stage" in capsys.readouterr().err

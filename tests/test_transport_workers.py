"""Topology (b): worker processes behind the server's dispatcher. Throughput scales with workers; a worker
killed mid-frame loses nothing in replay. Consumer-bound graph: each worker spends 150 ms per frame."""
import signal
import struct
import time

import pytest

from tests.transport_helpers import edge_checkpoint, free_port, kill, read_jsonl, spawn, wait_for

pytest.importorskip("codec.api")

SERVER = """
name: dispatch_server
vars: {bind: null, workers: null, checkpoint: null, out: out, exit_on_eos: false, max_frames: null,
       frames_from: null, secret_key: null, allowed_keys: null, insecure: true, window: 8}
stages:
  - {name: receive, key: server.receive, params: {endpoint: "${bind}", checkpoint: "${checkpoint}", insecure: true, exit_on_eos: false}}
  - {name: dispatch, key: server.dispatch, inputs: [receive], params: {endpoint: "${workers}", insecure: true, worker_timeout_s: 1.5}}
  - {name: jsonl, key: sink.jsonl, inputs: [dispatch], params: {path: "${out}/results.jsonl", resume: true}}
"""
WORKER = """
name: test_worker
vars: {connect: null, checkpoint: null}
stages:
  - {name: jobs, key: worker.jobs, params: {endpoint: "${connect}", checkpoint: "${checkpoint}", capacity: 1, insecure: true}}
  - {name: busy, key: util.delay, inputs: [jobs], params: {ms: 150}}
  - {name: record, key: server.record, inputs: [busy]}
  - {name: reply, key: worker.reply, inputs: [record]}
"""


def _stream(ep, stream, n, fp, shape, payload):
    from transport import wire
    from transport.session import EdgeClient
    cl = EdgeClient(ep, stream, fp, "replay", log=lambda m: None, timeout_s=60, backlog=64)
    try:
        for i in range(n):
            cl.submit(i, wire.pack(wire.WireHeader(stream, i, time.time_ns(), time.time_ns(), fp, shape, (64, 64)),
                                   payload))
        assert cl.finish(n, timeout_s=90), cl.status()
    finally:
        cl.close()


def _rate(rows, stream):
    t = sorted(r["timestamps"]["done_ns"] for r in rows if r["stream"] == stream)
    return (len(t) - 1) / ((t[-1] - t[0]) / 1e9)


def test_workers_scale_and_a_killed_worker_loses_nothing(tmp_path):
    import numpy as np

    from codec.api import load_edge
    ckpt = edge_checkpoint()
    codec = load_edge(ckpt)
    enc = codec.encode(np.zeros((1, 64, 64, 3), np.uint8))[0]
    fp, shape, payload = codec.fingerprint, tuple(enc.latent_shape), enc.payload
    (tmp_path / "server.yaml").write_text(SERVER)
    (tmp_path / "worker.yaml").write_text(WORKER)
    port, wport, out = free_port(), free_port(), tmp_path / "out"
    ep, wep = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{wport}"
    slog = tmp_path / "server.log"
    server = spawn("server", "--config", str(tmp_path / "server.yaml"), "--bind", ep, "--workers", wep,
                   "--checkpoint", str(ckpt), "--out", str(out), "--insecure", log=slog)
    workers = []

    def add_worker(i):
        workers.append(spawn("run", "--config", str(tmp_path / "worker.yaml"), "--set", f"connect={wep}",
                             "--checkpoint", str(ckpt), "--out", str(tmp_path / f"w{i}"), "--insecure", "--quiet",
                             log=tmp_path / f"w{i}.log"))
        wait_for(lambda: slog.read_text().count("joined") >= i + 1, 60, f"worker {i} to join", server)

    try:
        add_worker(0)
        _stream(ep, 1, 24, fp, shape, payload)
        add_worker(1)
        _stream(ep, 2, 24, fp, shape, payload)
        # kill one worker in the middle of a replay: its frames go to the other one
        add_worker(2)
        wait_for(lambda: slog.read_text().count("joined") >= 3, 30, "3 workers")
        import threading
        t = threading.Thread(target=_stream, args=(ep, 3, 40, fp, shape, payload))
        t.start()
        wait_for(lambda: sum(r["stream"] == 3 for r in read_jsonl(out / "results.jsonl")) >= 8, 60, "stream 3 going")
        workers[1].send_signal(signal.SIGKILL)
        t.join(120)
        assert not t.is_alive()
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, slog.read_text()[-3000:]
    finally:
        for p in (*workers, server):
            kill(p)
    rows = read_jsonl(out / "results.jsonl")
    for s, n in ((1, 24), (2, 24), (3, 40)):
        assert [r["frame"] for r in rows if r["stream"] == s] == list(range(n)), s
    one, two = _rate(rows, 1), _rate(rows, 2)
    log = slog.read_text()
    print(f"\nworkers: 1 worker {one:.2f} frames/s, 2 workers {two:.2f} frames/s (x{two / one:.2f}); "
          f"a worker killed mid-replay: 40/40 frames, in order, none twice; "
          + next(line for line in log.splitlines() if "gone" in line).split("] ", 1)[1])
    assert two > 1.6 * one
    assert "handed to other workers" in log


def test_dispatch_counts_live_frames_of_a_dead_worker_and_hands_replay_frames_over():
    """In-process: a fake worker takes two frames (one live, one replay) and goes silent."""
    import json
    import threading

    import zmq

    from pipeline.stage import Packet, StageContext, StageStats, create_stage
    from transport import wire
    from transport.session import CommitLog

    ep = f"tcp://127.0.0.1:{free_port()}"
    d = create_stage("server.dispatch", endpoint=ep, insecure=True, worker_timeout_s=0.5, drain_s=5)
    emitted, commit = [], CommitLog()
    stats = StageStats()
    d.open(StageContext("dispatch", "t", threading.Event(), stats, {"commit": commit}, lambda m: None,
                        emit=emitted.append))
    fp = bytes(16)

    def packet(stream, i, live):
        data = wire.pack(wire.WireHeader(stream, i, 1, 2, fp, (1, 1, 1), (4, 4),
                                         flags=wire.FLAG_LIVE if live else 0), b"p")
        return Packet(stream, i, 1, data, False, header=wire.unpack(data)[0])

    ctx = zmq.Context.instance()
    dead = ctx.socket(zmq.DEALER)
    dead.connect(ep)
    dead.send_multipart([b"R", json.dumps({"capacity": 2}).encode()])
    d.process(packet(1, 0, live=True))
    d.process(packet(2, 0, live=False))
    got = [dead.recv_multipart() for _ in range(2) if dead.poll(3000)]
    assert len(got) == 2  # the doomed worker holds both frames, then says nothing more
    good = ctx.socket(zmq.DEALER)
    good.connect(ep)
    deadline = time.monotonic() + 10
    served = []
    while time.monotonic() < deadline and not served:
        good.send_multipart([b"R", json.dumps({"capacity": 2}).encode()])
        if good.poll(200):
            parts = good.recv_multipart()
            h = wire.unpack(parts[1])[0]
            served.append((h.stream_id, h.frame_index))
            good.send_multipart([b"O", struct.pack("<IQ", h.stream_id, h.frame_index),
                                 json.dumps({"stream": h.stream_id, "frame": h.frame_index}).encode()])
    assert served == [(2, 0)]  # the replay frame went to the other worker; the live one did not
    wait_for(lambda: len(emitted) == 1, 5, "the handed-over result")
    d.close()
    dead.close(0)
    good.close(0)
    assert emitted[0].record == {"stream": 2, "frame": 0}
    assert stats.extra["lost_live"] == 1 and stats.extra["handed_over"] == 1 and stats.dropped == 1
    assert commit.queue.get_nowait()[:2] == (1, 0)  # the lost live frame is acknowledged: the edge's credit returns


def test_worker_graphs_load_and_server_workers_option():
    from pipeline.graph import load_graph
    spec = load_graph("server_workers", {"insecure": True})
    assert [s.key for s in spec.stages][:2] == ["server.receive", "server.dispatch"]
    spec = load_graph("worker", {"insecure": True})
    assert spec.stages[0].key == "worker.jobs" and spec.stages[-1].key == "worker.reply"
    from pipeline.cli import main
    assert main(["server", "--workers", "tcp://nohost", "--insecure"]) == 2

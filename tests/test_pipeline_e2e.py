"""End to end over real ZeroMQ and PyAV, edge and server in separate processes (tiny inputs, random model)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from tests import transport_helpers
from tests.test_pipeline_graph import make_plugin

pytest.importorskip("codec.api")

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CKPT = "random:64"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_video(path: Path, n: int, w: int, h: int, fps: int = 10) -> Path:
    return transport_helpers.write_video(path, n, w, h, fps, step=5, gradient=True)


def read_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def env(extra_path=None):
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path) if extra_path else "", str(ROOT)) if p)
    return e


def cmd(*args):
    return [PY, str(ROOT / "run_pipeline.py"), *args]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


SERVER_YAML = """
name: test_server
vars: {{bind: null, checkpoint: null, out: null, exit_on_eos: true, max_frames: null, frames_from: null,
        secret_key: null, allowed_keys: null, insecure: false}}
stages:
  - {{name: receive, key: server.receive, params: {{endpoint: "${{bind}}", checkpoint: "${{checkpoint}}", exit_on_eos: true,
                                                 secret_key: "${{secret_key}}", allowed_keys: "${{allowed_keys}}"}}}}
  - {{name: decode, key: server.decode, inputs: [receive], params: {{checkpoint: "${{checkpoint}}"}}}}
  - {{name: detection, key: task.detection, inputs: [decode], params: {{conf: {conf}}}}}
  - {{name: segmentation, key: task.segmentation, inputs: [decode]}}
  - {{name: classification, key: task.classification, inputs: [decode]}}
  - {{name: flaky, key: test.flaky, inputs: [decode]}}
  - {{name: merge, key: results.merge, inputs: [detection, segmentation, classification, flaky]}}
  - {{name: jsonl, key: sink.jsonl, inputs: [merge], params: {{path: "${{out}}/results.jsonl"}}}}
  - {{name: video, key: sink.video, inputs: [merge], params: {{path: "${{out}}/annotated.mp4", frames_from: "${{frames_from}}"}}}}
"""


def keys(tmp_path):
    """Server and edge key pairs, the edge allowed: (server args, edge args)."""
    from transport.security import make_keypair
    d = tmp_path / "keys"
    make_keypair(d, "server")
    _, _ = make_keypair(d, "edge")
    (d / "allowed").mkdir()
    (d / "allowed" / "edge.key").write_bytes((d / "edge.key").read_bytes())
    return (["--key", str(d / "server.key_secret"), "--allowed-keys", str(d / "allowed")],
            ["--key", str(d / "edge.key_secret"), "--server-key", str(d / "server.key")])


def run_split(tmp_path, endpoint_bind, endpoint_connect, video, n):
    plugin = make_plugin(tmp_path / "plugin")
    s_keys, e_keys = keys(tmp_path) if endpoint_bind.startswith("tcp://") else ([], [])
    cfg = tmp_path / "server.yaml"
    cfg.write_text(SERVER_YAML.format(conf=0.0))  # conf 0: the random model yields boxes
    out = tmp_path / "out"
    server = subprocess.Popen(cmd("server", "--config", str(cfg), "--bind", endpoint_bind, "--checkpoint", CKPT,
                                  "--out", str(out), "--frames-from", str(video), "--quiet", *s_keys),
                              cwd=ROOT, env=env(plugin), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    edge = subprocess.Popen(cmd("edge", "--source", str(video), "--connect", endpoint_connect, "--checkpoint", CKPT,
                                "--rate", "max", "--quiet", *e_keys),
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        e_out, _ = edge.communicate(timeout=120)
        s_out, _ = server.communicate(timeout=60)
    finally:
        for p in (edge, server):
            if p.poll() is None:
                p.kill()
    assert edge.returncode == 0, e_out
    assert server.returncode == 0, s_out
    rows = read_jsonl(out / "results.jsonl")
    return rows, out, s_out


def test_tcp_replay_every_frame_once_in_order_and_equal_to_direct(tmp_path):
    n, w, h = 8, 80, 48  # non-square: exercises the letterbox mapping
    video = write_video(tmp_path / "clip.mp4", n, w, h)
    port = free_port()
    rows, out, s_out = run_split(tmp_path, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port}", video, n)
    assert [r["frame"] for r in rows] == list(range(n))
    assert all(r["stream"] == 0 and r["size"] == [w, h] for r in rows)
    # the failing plugin consumer loses frame 1's result for its task only, and says so
    assert "flaky consumer fails on frame 1" in rows[1]["errors"]["flaky"]
    assert rows[1]["detection"] is not None and "flaky" not in rows[1] and rows[2]["flaky"] == {"index": 2}
    assert all(r["bytes"] > 74 for r in rows)
    with av.open(str(out / "annotated.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == n

    # the same frames through the codec and heads directly
    from codec.api import SplitCodec
    from stages.consumers import map_result
    from core.geometry import letterbox_image, letterbox_params
    from core.rle import rle_decode
    codec = SplitCodec.random(input_size=64, seed=0)
    lb = letterbox_params(w, h, 64)
    for img, row in zip(read_frames(video), rows):
        enc = codec.encode(letterbox_image(img, 64)[None])
        assert row["bytes"] == 74 + len(enc[0].payload)
        feats = codec.decode(enc)
        det = map_result("detection", codec.head("detection", feats, conf=0.0)[0], lb)
        seg = map_result("segmentation", codec.head("segmentation", feats)[0], lb)
        clf = codec.head("classification", feats)[0]
        np.testing.assert_allclose(np.array(row["detection"]["boxes"]).reshape(-1, 4), det["boxes"], atol=0.01)
        assert row["detection"]["classes"] == det["classes"].tolist()
        np.testing.assert_allclose(row["detection"]["scores"], det["scores"], atol=1e-4)
        np.testing.assert_array_equal(rle_decode(row["segmentation"]), seg)
        assert row["classification"]["label"] == clf["label"]
        np.testing.assert_allclose([p for _, p in row["classification"]["top5"]], [p for _, p in clf["top5"]],
                                   atol=1e-4)
    assert sum(len(r["detection"]["boxes"]) for r in rows) > 0


def test_ipc_replay(tmp_path):
    n = 6
    video = write_video(tmp_path / "clip.mp4", n, 64, 64)
    ep = f"ipc://{tmp_path}/ladon.sock"
    rows, _, _ = run_split(tmp_path, ep, ep, video, n)
    assert [r["frame"] for r in rows] == list(range(n))


def _udp_listening(pid: int, port: int) -> bool:
    import psutil
    try:
        return any(c.laddr and c.laddr.port == port for c in psutil.Process(pid).net_connections(kind="udp"))
    except psutil.Error:
        return False


def test_live_udp_mpegts_stream_from_ffmpeg(tmp_path):
    port = free_port()
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd("run", "--source", f"udp://127.0.0.1:{port}", "--checkpoint", CKPT, "--out", str(out),
                                "--quiet"), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 90
        while not _udp_listening(proc.pid, port):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the pipeline never opened the UDP port"
            time.sleep(0.1)
        subprocess.run(["ffmpeg", "-loglevel", "error", "-re", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=10",
                        "-t", "4", "-f", "mpegts", f"udp://127.0.0.1:{port}"], check=True, timeout=60)
        log, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) >= 10, log
    idx = [r["frame"] for r in rows]
    assert idx == sorted(set(idx)) and rows[0]["size"] == [64, 64]


def test_sigterm_clean_shutdown(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd("run", "--source", "conveyor", "--checkpoint", CKPT, "--out", str(out), "--quiet"),
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        jl = out / "results.jsonl"
        while not (jl.is_file() and len(jl.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no results within 90 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    assert "SIGTERM" in log
    rows = read_jsonl(out / "results.jsonl")  # every line is complete JSON
    with av.open(str(out / "annotated.mp4")) as c:  # the video was finalised
        assert sum(1 for _ in c.decode(video=0)) == len(rows)
    assert json.loads((out / "summary.json").read_text())["stopped_by_signal"] is True
    with pytest.raises(ProcessLookupError):  # nothing left behind in its process group
        os.killpg(proc.pid, 0)


def test_edge_without_server_fails_clearly(tmp_path, capsys):
    from pipeline.cli import main
    video = write_video(tmp_path / "clip.mp4", 3, 64, 64)
    rc = main(["edge", "--source", str(video), "--connect", f"tcp://127.0.0.1:{free_port()}", "--checkpoint", CKPT,
               "--link-timeout", "1", "--rate", "max", "--quiet", "--insecure"])
    assert rc == 1
    assert "no server took a frame" in capsys.readouterr().err


def test_server_refuses_foreign_and_corrupt_messages_counts_and_logs_once():
    import threading

    import zmq

    from pipeline.codecs import get_codec
    from pipeline.stage import StageContext, StageStats, create_stage
    from transport import wire
    from transport.session import K_DATA, K_HELLO
    codec = get_codec(CKPT)
    ep = f"tcp://127.0.0.1:{free_port()}"
    logs = []
    rx = create_stage("server.receive", endpoint=ep, checkpoint=CKPT, exit_on_eos=True, insecure=True,
                      bye_grace_s=0.5)
    stats = StageStats()
    rx.open(StageContext("receive", "t", threading.Event(), stats, {}, logs.append))
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(ep)
    img = np.zeros((1, 64, 64, 3), np.uint8)
    enc = codec.encode(img)[0]

    def msg(i, fp=codec.fingerprint):
        return wire.pack(wire.WireHeader(0, i, 1, 2, fp, enc.latent_shape, (64, 64)), enc.payload)

    dealer.send_multipart([K_HELLO, json.dumps({"proto": 1, "stream": 0, "session": "s", "mode": "replay",
                                                "fingerprint": codec.fingerprint.hex()}).encode()])
    dealer.send_multipart([K_DATA, msg(0, fp=b"\x01" * 16)])
    dealer.send_multipart([K_DATA, msg(0, fp=b"\x02" * 16)])
    dealer.send_multipart([K_DATA, msg(0)[:-1]])  # truncated
    dealer.send_multipart([K_DATA, msg(0)])
    dealer.send_multipart([K_DATA, msg(0)])  # duplicate
    dealer.send_multipart([K_DATA, wire.end_of_stream(0, 1, codec.fingerprint)])
    got = list(rx.frames())
    rx.close()
    dealer.close(0)
    assert [p.index for p in got] == [0]
    assert stats.extra["refused"] == {"FingerprintMismatch": 2, "LengthMismatchError": 1, "ReplayedError": 1}
    assert sum("FingerprintMismatch" in m for m in logs) == 1  # logged once, counted always
    assert any("FingerprintMismatch) from peer 127.0.0.1" in m for m in logs)  # with its sender

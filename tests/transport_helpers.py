"""Shared by the transport tests: a tiny edge checkpoint (fast to load), processes, JSONL, keys, a TCP relay."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
_EDGE_CKPT: Path | None = None


def edge_checkpoint() -> Path:
    """An edge-only checkpoint of the random 64 px codec: edge and record-only servers load it in ~4 s."""
    global _EDGE_CKPT
    if _EDGE_CKPT is None or not _EDGE_CKPT.is_file():
        d = Path(tempfile.mkdtemp(prefix="ladon-edge-ckpt-"))
        p = d / "edge64.pt"
        subprocess.run([PY, "-c", f"from codec.api import SplitCodec; SplitCodec.random(input_size=64, seed=0)"
                                  f".save_edge({str(p)!r})"], cwd=ROOT, check=True, capture_output=True,
                       timeout=180)
        _EDGE_CKPT = p
    return _EDGE_CKPT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    return e


def cmd(*args) -> list[str]:
    return [PY, str(ROOT / "run_pipeline.py"), *args]


def spawn(*args, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd(*args), cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def write_video(path: Path, n: int, w: int = 64, h: int = 64, fps: int = 10, step: int = 3,
                gradient: bool = False) -> Path:
    """A small H.264 clip: a coloured square moving ``step`` px per frame (plus a blue ramp with ``gradient``)."""
    import av
    import numpy as np
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.full((h, w, 3), 40, np.uint8)
            x = (i * step) % (w - 16)
            img[h // 4:h // 4 + 16, x:x + 16] = rng.integers(0, 255, 3, dtype=np.uint8)
            if gradient:
                img[:, :, 2] += np.linspace(0, 80, w, dtype=np.uint8)[None, :]
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def make_keys(d: Path, allowed=("edge",), extra=()) -> Path:
    from transport.security import make_keypair
    for name in ("server", *allowed, *extra):
        make_keypair(d, name)
    (d / "allowed").mkdir(exist_ok=True)
    for name in allowed:
        (d / "allowed" / f"{name}.key").write_bytes((d / f"{name}.key").read_bytes())
    return d


RECORD_SERVER = """
name: record_server
vars: {{bind: null, checkpoint: null, out: out, exit_on_eos: false, max_frames: null, frames_from: null,
        secret_key: null, allowed_keys: null, insecure: false, window: 8}}
stages:
  - {{name: receive, key: server.receive, params: {{endpoint: "${{bind}}", checkpoint: "${{checkpoint}}",
      exit_on_eos: "${{exit_on_eos}}", secret_key: "${{secret_key}}", allowed_keys: "${{allowed_keys}}",
      insecure: "${{insecure}}", window: "${{window}}"{receive}}}}}
  - {{name: slow, key: util.delay, inputs: [receive], params: {delay}}}
  - {{name: record, key: server.record, inputs: [slow]}}
  - {{name: jsonl, key: sink.jsonl, inputs: [record], params: {{path: "${{out}}/results.jsonl", resume: true}}}}
"""


def record_server_config(path: Path, delay: str = "{ms: 0}", **receive) -> Path:
    """A record-only server graph (receive -> delay -> record -> JSONL); ``receive``: more server.receive
    parameters (e.g. ``peer_rate=1e9``)."""
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in receive.items())
    path.write_text(RECORD_SERVER.format(delay="{" + delay.strip("{}") + "}", receive=extra))
    return path


class Relay:
    """A TCP relay that records every byte it forwards in both directions (a wire capture)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.captured = bytearray()
        self.lock = threading.Lock()
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.captured += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.stop = True
        self.lsock.close()

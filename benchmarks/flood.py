"""A flood from one peer against another peer's live stream, with the model in the loop.

Two parts:

* ``python -m benchmarks.flood flooder EP SRC LOG FP`` is the hostile peer: 20 DEALER connections from source
  address ``SRC`` sending, as fast as they go, hellos for new streams, broken hellos (``1e400``, deep nesting),
  junk and foreign frames and unknown message kinds (the same pool as ``tests/test_transport_fairness.py``, which
  runs it against a record-only server). On SIGTERM it appends ``sent seconds`` to ``LOG``.
* ``python -m benchmarks.flood`` runs the real ``server`` (the shipped model) and a real live ``edge``
  (``--source conveyor:7 --rate 10`` with the exported ONNX encoder), then turns the flooder on and off:
  quiet, flood at the server, quiet, flood at a sink, quiet, ... The sink is a separate process on the same
  machine that reads and drops the same flood: the control for what the flood costs the machine (the flooder's
  CPU, the kernel's TCP work) rather than the server's handling of it. Each flood turn is compared with the two
  quiet turns around it (the machine's load drifts; neighbours cancel it), and each flood-at-the-server turn with
  the flood-at-the-sink turns beside it. Writes ``flood.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def flooder(ep: str, src: str, log: Path, fingerprint: bytes, connections: int = 20) -> None:
    """Send the hostile pool from ``connections`` sockets bound to ``src`` until SIGTERM; log the count."""
    import zmq

    ctx = zmq.Context.instance()
    socks = []
    for _ in range(connections):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 1000)
        s.connect(f"tcp://{src}:0;{ep[len('tcp://'):]}")
        socks.append(s)
    rng = random.Random(0)

    def frame(stream: int) -> bytes:  # a well-formed wire header for a stream the peer never opened
        body = struct.pack("<4sBBHIQqq16s3H2HII", b"LADN", 1, 0, 74, stream, 0, 1, 2, fingerprint, 4, 2, 2, 64, 64,
                           0, 8)
        return body + b"\0\0\0\0" + b"p" * 8

    pool = []
    for i in range(500):
        k = i % 5
        if k == 0:
            pool.append([b"H", json.dumps({"proto": 1, "stream": rng.randrange(10 ** 6),
                                           "session": os.urandom(6).hex(), "mode": "replay",
                                           "fingerprint": fingerprint.hex()}).encode()])
        elif k == 1:
            pool.append([b"H", b'{"proto": 1, "stream": 1e400' + b"[" * rng.randrange(100)])
        elif k == 2:
            pool.append([b"D", rng.randbytes(rng.randrange(20, 400))])
        elif k == 3:
            pool.append([b"D", frame(rng.randrange(10 ** 6))])
        else:
            pool.append([b"Z", b"x", b"y"])
    stop = False

    def bye(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, bye)
    sent, t0 = 0, time.monotonic()
    while not stop:
        for s in socks:
            try:
                s.send_multipart(pool[sent % len(pool)], zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                pass
            while s.poll(0):
                s.recv_multipart()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"{sent} {time.monotonic() - t0:.3f}\n")


def sink(ep: str) -> None:
    """A plain ROUTER that reads and drops everything: the control target (the flood's cost to the machine,
    without the server's handling), until SIGTERM."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(ep)
    stop = False

    def bye(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, bye)
    while not stop:
        if sock.poll(100):
            while True:
                try:
                    sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break


def start_flooder(ep: str, src: str, log: Path, fingerprint: bytes) -> subprocess.Popen:
    """The flooder as its own process at the lowest CPU priority (as if it ran on another machine)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "benchmarks.flood", "flooder", ep, src, str(log),
                             fingerprint.hex()], cwd=ROOT, env=env, start_new_session=True,
                            preexec_fn=lambda: os.nice(19))


def stop_flooder(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def flood_rate(log: Path) -> float:
    """Messages per second the flooder sent, over all its turns."""
    sent = [line.split() for line in log.read_text(encoding="utf-8").splitlines()]
    return sum(int(n) for n, _ in sent) / max(1e-9, sum(float(t) for _, t in sent))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def compare_turns(turns: list[list[float]], kinds: list[str]) -> dict:
    """``turns``: latencies per turn, ``kinds``: each turn's kind ("quiet", "server", "sink"; quiet at both ends
    and between floods). Each flood turn against its two quiet neighbours, and the flood at the server against
    the flood at the sink in the turns beside it."""
    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    out: dict = {}
    for kind in ("quiet", "server", "sink"):
        xs = [x for t, k in zip(turns, kinds) if k == kind for x in t]
        if xs:
            out[kind] = {"median_ms": med(xs), "p95_ms": pct(xs, 0.95), "frames": len(xs)}
    for kind in ("server", "sink"):
        ratios = [med(turns[k]) / med(turns[k - 1] + turns[k + 1]) for k in range(1, len(turns) - 1)
                  if kinds[k] == kind]
        if ratios:
            out[f"{kind}_over_quiet_per_turn"] = ratios
            out[f"{kind}_over_quiet"] = statistics.median(ratios)
    pairs = []
    for k, kind in enumerate(kinds):
        if kind == "server":
            near = [turns[j] for j in (k - 2, k + 2) if 0 <= j < len(kinds) and kinds[j] == "sink"]
            if near:
                pairs.append(med(turns[k]) / med([x for t in near for x in t]))
    if pairs:
        out["server_over_sink_per_turn"] = pairs
        out["server_over_sink"] = statistics.median(pairs)
    return out


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(out: Path, turns: int, turn_s: float, rate: float, edge_checkpoint: str, server_checkpoint: str) -> dict:
    """Real server and live edge, flooder on in every other turn, at the server and at the sink in turn; returns
    and writes ``flood.json``."""
    from codec.edge_onnx import OnnxEdgeCodec

    out.mkdir(parents=True, exist_ok=True)
    fingerprint = OnnxEdgeCodec(edge_checkpoint, threads=1).fingerprint
    ep = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="ladon-flood-"))
    run = [sys.executable, str(ROOT / "run_pipeline.py")]
    server = subprocess.Popen(run + ["server", "--bind", ep, "--insecure", "--checkpoint", server_checkpoint,
                                     "--out", str(work / "out"), "--quiet"], cwd=ROOT, env=env,
                              stdout=open(work / "server.log", "ab"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    frames = int((turns * turn_s + 30) * rate)
    edge = flood = None
    sink_ep = f"tcp://127.0.0.1:{_free_port()}"
    other = subprocess.Popen([sys.executable, "-m", "benchmarks.flood", "sink", sink_ep], cwd=ROOT, env=env,
                             start_new_session=True)
    phases: list[tuple[str, int, int]] = []
    try:
        time.sleep(8)  # the server loads its model
        edge = subprocess.Popen(run + ["edge", "--source", "conveyor:7", "--rate", str(rate), "--insecure",
                                       "--connect", ep, "--max-frames", str(frames), "--checkpoint",
                                       edge_checkpoint, "--quiet"], cwd=ROOT, env=env,
                                stdout=open(work / "edge.log", "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        results = work / "out" / "results.jsonl"
        deadline = time.monotonic() + 120
        while len(_read_rows(results)) < 5 * rate:
            if time.monotonic() > deadline or server.poll() is not None or edge.poll() is not None:
                raise RuntimeError(f"the live stream did not start; logs in {work}")
            time.sleep(0.2)
        for k in range(turns):
            kind = "quiet" if k % 2 == 0 else ("server" if k % 4 == 1 else "sink")
            start = time.time_ns()
            if kind != "quiet":
                flood = start_flooder(ep if kind == "server" else sink_ep, "127.0.0.77", work / "flood.txt",
                                      fingerprint)
            time.sleep(turn_s)
            if flood is not None:
                stop_flooder(flood)
                flood = None
            phases.append((kind, start, time.time_ns()))
            if server.poll() is not None:
                raise RuntimeError(f"the server exited ({server.returncode}) during turn {k}; logs in {work}")
    finally:
        if flood is not None:
            stop_flooder(flood)
        for proc in (edge, server, other):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    rows = _read_rows(work / "out" / "results.jsonl")
    kinds = [kind for kind, _, _ in phases]
    lat = []  # per turn, without its first second (the flooder starting) and last 0.2 s
    for _, start, end in phases:
        lat.append([r["latency_ms"]["total"] for r in rows
                    if start + 1_000_000_000 <= r["timestamps"]["capture_ns"] < end - 200_000_000])
    summary = json.loads((work / "out" / "server_summary.json").read_text()) \
        if (work / "out" / "server_summary.json").is_file() else {}
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "camera_fps": rate,
              "turns": turns, "turn_s": turn_s, "edge_checkpoint": edge_checkpoint,
              "server_checkpoint": server_checkpoint, "flood_messages_per_s": flood_rate(work / "flood.txt"),
              "refused": summary.get("stages", {}).get("receive", {}).get("refused", {}),
              "kinds": kinds, "frames_per_turn": [len(t) for t in lat], **compare_turns(lat, kinds)}
    (out / "flood.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sink"]:
        sink(argv[1])
        return 0
    if argv[:1] == ["flooder"]:
        ep, src, log, fp = argv[1:5]
        flooder(ep, src, Path(log), bytes.fromhex(fp))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.flood", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where flood.json goes")
    p.add_argument("--turns", type=int, default=17,
                   help="turns in all: quiet, flood at the server, quiet, flood at the sink, ..., quiet (odd, >= 5)")
    p.add_argument("--turn-s", type=float, default=8.0, help="seconds per turn")
    p.add_argument("--rate", type=float, default=10.0, help="the live camera's frames per second")
    p.add_argument("--edge-checkpoint", default=str(ROOT / "models" / "default.edge.onnx"))
    p.add_argument("--server-checkpoint", default=str(ROOT / "models" / "default.pt"))
    a = p.parse_args(argv)
    if a.turns < 5 or a.turns % 2 == 0:
        p.error(f"--turns {a.turns}: give an odd number >= 5 (quiet, flood at the server, quiet, at the sink, ...)")
    r = measure(a.out, a.turns, a.turn_s, a.rate, a.edge_checkpoint, a.server_checkpoint)
    print(json.dumps({k: v for k, v in r.items() if k not in ("command", "edge_checkpoint", "server_checkpoint")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

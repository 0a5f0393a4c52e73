"""Small subprocesses the bench measures in isolation (peak resident memory of an edge or a full-local device,
and the ZeroMQ sender/receiver of the shaped-link check). Run as ``python -m benchmarks.probe KIND ...``; each
prints one JSON object on stdout."""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _rss_mb() -> float:
    """This process's own peak resident memory (VmHWM). ``ru_maxrss`` would do on a fresh process, but Linux
    carries a parent's peak across exec, so a probe started by the bench would report the bench's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux: best effort (KiB)


def _encode_timing(codec, n: int) -> float:
    """Median seconds per frame of ``codec.encode`` at batch 1 on ``n`` random frames (the first one is warm-up)."""
    import numpy as np

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (n, codec.input_size, codec.input_size, 3), dtype=np.uint8)
    times = []
    for f in frames:
        t = time.perf_counter()
        codec.encode(f[None])
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:] or times))


def edge_onnx(args) -> dict:
    """The torch-free edge: ``codec.edge_onnx.OnnxEdgeCodec`` (onnxruntime + constriction) encodes frames."""
    t0 = time.perf_counter()
    from codec.edge_onnx import OnnxEdgeCodec

    codec = OnnxEdgeCodec(args.checkpoint, threads=args.threads)
    load_s = time.perf_counter() - t0
    return {"kind": "edge-onnx", "load_s": load_s, "encode_s_median": _encode_timing(codec, args.frames),
            "peak_rss_mb": _rss_mb(), "imports_torch": "torch" in sys.modules}


def edge(args) -> dict:
    """Load only codec.api.load_edge(path) and encode frames at batch 1."""
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from codec.api import load_edge

    codec = load_edge(args.checkpoint)
    load_s = time.perf_counter() - t0
    return {"kind": "edge", "load_s": load_s, "encode_s_median": _encode_timing(codec, args.frames),
            "peak_rss_mb": _rss_mb()}


def local(args) -> dict:
    """Full local: the three full Ultralytics models (each on the frame), as a device without split computing."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from codec.api import load_codec

    codec = load_codec(args.checkpoint)
    t = codec.model.teachers
    models = [t.detect, t.semantic, t.classify]
    x = torch.rand(1, 3, codec.input_size, codec.input_size)
    times = []
    with torch.no_grad():
        for _ in range(args.frames):
            t0 = time.perf_counter()
            for m in models:
                m(x)
            times.append(time.perf_counter() - t0)
    return {"kind": "local", "three_models_s_median": float(np.median(times[1:] or times)), "peak_rss_mb": _rss_mb()}


def recv(args) -> dict:
    """PULL wire messages; record when each arrived (wall clock, shared by the namespaces of one host)."""
    import zmq

    from transport.wire import unpack

    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVTIMEO, int(args.timeout * 1000))
    sock.bind(args.endpoint)
    print(json.dumps({"ready": True}), flush=True)
    out = []
    for _ in range(args.count):
        try:
            msg = sock.recv(copy=True)
        except zmq.Again:
            break
        now = time.time_ns()
        header, _payload = unpack(msg)
        out.append({"frame": header.frame_index, "bytes": len(msg), "latency_s": (now - header.sent_ns) / 1e9,
                    "arrival_ns": now})
    sock.close(0)
    return {"kind": "recv", "messages": out}


def send(args) -> dict:
    """PUSH real wire messages (header + payload) one at a time, waiting ``gap`` seconds between them."""
    import zmq

    from transport.wire import WireHeader, pack

    with open(args.payloads, "rb") as f:
        blob = f.read()
    payloads, pos = [], 0
    while pos < len(blob):
        n = int.from_bytes(blob[pos:pos + 4], "little")
        payloads.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 30000)
    sock.connect(args.endpoint)
    time.sleep(0.5)  # let the TCP connection come up before the first timed message
    for i, p in enumerate(payloads):
        h = WireHeader(stream_id=0, frame_index=i, capture_ns=time.time_ns(), sent_ns=time.time_ns(),
                       fingerprint=b"\0" * 16, latent_shape=(1, 1, 1), orig_size=(1, 1))
        sock.send(pack(h, p))
        if args.gap > 0:
            time.sleep(args.gap)
    sock.close()
    return {"kind": "send", "messages": len(payloads)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe")
    sub = p.add_subparsers(dest="kind", required=True)
    for name in ("edge", "edge-onnx", "local"):
        s = sub.add_parser(name)
        s.add_argument("checkpoint")
        s.add_argument("--frames", type=int, default=20)
        s.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("recv")
    s.add_argument("endpoint")
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--timeout", type=float, default=60.0)
    s = sub.add_parser("send")
    s.add_argument("endpoint")
    s.add_argument("payloads")
    s.add_argument("--gap", type=float, default=0.2)
    args = p.parse_args(argv)
    if args.kind == "edge-onnx":
        result = edge_onnx(args)
    elif args.kind in ("edge", "local"):
        import contextlib
        import logging

        import core.offline  # noqa: F401
        for h in logging.getLogger("ultralytics").handlers:
            if isinstance(h, logging.StreamHandler):
                h.setStream(sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):
            result = {"edge": edge, "local": local}[args.kind](args)
    else:
        result = {"recv": recv, "send": send}[args.kind](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

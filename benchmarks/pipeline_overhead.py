"""Server throughput through the pipeline against the same models called directly, in one run.

    .venv/bin/python benchmarks/pipeline_overhead.py [--frames 60] [--checkpoint PATH|random:SIZE] [--size 256]

Both sides get the same pre-encoded wire messages (the edge is not timed). *Direct*: for each message,
wire.unpack + codec.decode + the head of every registered task (codec.tasks) + mapping to the original frame, in
a plain loop. *Pipeline*: the server graph (server.receive over a real ZeroMQ tcp socket on 127.0.0.1 ->
server.decode -> one consumer thread per task -> results.merge -> JSONL sink), fed by a PUSH socket as fast as it
takes them. Prints frames per second of each and the overhead ratio (direct fps / pipeline fps; above 1.0 =
pipeline slower).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import core.offline  # noqa: E402,F401
import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint (default: models/default.pt when present, else random:128)")
    ap.add_argument("--size", type=int, default=256, help="conveyor frame size (default 256)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported (default 3)")
    args = ap.parse_args(argv)

    from codec.api import DEFAULT_CHECKPOINT
    from codec.tasks import TASKS
    from pipeline.codecs import get_codec
    from pipeline.graph import GraphRunner, parse_graph
    from stages.consumers import map_result
    from core.geometry import letterbox_image, letterbox_params
    from transport import wire
    from transport.session import EdgeClient

    ckpt = args.checkpoint or (str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.is_file() else "random:128")
    codec = get_codec(ckpt)
    try:
        from conveyor.line import ConveyorLine, LineConfig
        frames = [lf.image for lf in ConveyorLine(LineConfig(size=args.size, fps=15, seed=1)).frames(args.frames)]
    except ModuleNotFoundError:
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.frames)]
    encoded = [(codec.encode(letterbox_image(img, codec.input_size)[None])[0], img.shape[1::-1]) for img in frames]

    def pack(index: int, k: int) -> bytes:
        """Frame ``k``'s payload as wire message number ``index`` (replay wants strictly increasing indices)."""
        enc, (w, h) = encoded[k]
        return wire.pack(wire.WireHeader(0, index, time.time_ns(), time.time_ns(), codec.fingerprint,
                                         enc.latent_shape, (w, h)), enc.payload)

    msgs = [pack(i, i) for i in range(len(encoded))]
    from codec.api import EncodedFrame
    tasks = tuple(TASKS)

    def direct(batch):
        for m in batch:
            hd, payload = wire.unpack(m, codec.fingerprint)
            feats = codec.decode([EncodedFrame(bytes(payload), hd.latent_shape, hd.fingerprint)])
            lb = letterbox_params(hd.orig_size[0], hd.orig_size[1], codec.input_size)
            for t in tasks:
                map_result(t, codec.head(t, feats)[0], lb)

    direct(msgs[:args.warmup])

    with tempfile.TemporaryDirectory() as tmp:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ep = f"tcp://127.0.0.1:{port}"
        spec = parse_graph({"name": "bench", "stages": [
            # loopback on one machine: measuring transport + stage overhead, not CurveZMQ
            {"name": "receive", "key": "server.receive",
             "params": {"endpoint": ep, "checkpoint": ckpt, "insecure": True}},
            {"name": "decode", "key": "server.decode", "inputs": ["receive"], "params": {"checkpoint": ckpt}},
            *({"name": t, "key": f"task.{t}", "inputs": ["decode"]} for t in tasks),
            {"name": "merge", "key": "results.merge", "inputs": list(tasks)},
            {"name": "jsonl", "key": "sink.jsonl", "inputs": ["merge"], "params": {"path": f"{tmp}/r.jsonl"}},
        ]}, "<bench>")
        runner = GraphRunner(spec, log=lambda m: None)
        runner.open()
        runner.start()
        client = EdgeClient(ep, stream=0, fingerprint=codec.fingerprint, mode="replay", log=lambda m: None)
        jsonl = runner.nodes["jsonl"].stats
        sent = 0

        def through_pipeline(batch):
            nonlocal sent
            target = sent + len(batch)
            for k in range(len(batch)):
                client.submit(sent + k, pack(sent + k, k % len(encoded)))
            sent = target
            while jsonl.processed < target:
                time.sleep(0.002)

        through_pipeline(msgs[:args.warmup])
        # alternate the two so that load from other processes on the machine hits both alike
        t_direct, t_pipe = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            direct(msgs)
            t_direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            through_pipeline(msgs)
            t_pipe.append(time.perf_counter() - t0)
        client.finish(sent)
        client.close()
        runner.wait()
    t_direct, t_pipe = float(np.median(t_direct)), float(np.median(t_pipe))

    # threads or processes? A consumer in another process would need the shared body's features shipped to it
    import pickle
    hd, payload = wire.unpack(msgs[0], codec.fingerprint)
    feats = codec.decode([EncodedFrame(bytes(payload), hd.latent_shape, hd.fingerprint)])
    t0 = time.perf_counter()
    for _ in range(5):
        blob = pickle.dumps(feats, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)
    t_pickle = (time.perf_counter() - t0) / 5
    n = len(msgs)
    fps_d, fps_p = n / t_direct, n / t_pipe
    print(f"checkpoint {ckpt}  input {codec.input_size}px  frames {n} ({args.size}px)  "
          f"mean {np.mean([len(m) for m in msgs]) / 1000:.2f} kB/frame on the wire")
    print(f"median of {args.rounds} alternating rounds")
    print(f"direct   (unpack + decode + body + {len(tasks)} heads, one loop): {fps_d:7.2f} fps")
    print(f"pipeline (ZeroMQ tcp with acks + stage threads + merge + JSONL): {fps_p:7.2f} fps")
    print(f"overhead ratio direct/pipeline: {fps_d / fps_p:.3f}  ({(fps_d / fps_p - 1) * 100:+.1f} %)")
    print(f"features per frame for a consumer process: {len(blob) / 1e6:.2f} MB, pickle+unpickle "
          f"{t_pickle * 1000:.1f} ms x {len(tasks)} consumers, against {1000 / fps_p:.1f} ms per frame in the "
          f"thread pipeline")
    return 0


if __name__ == "__main__":
    sys.exit(main())

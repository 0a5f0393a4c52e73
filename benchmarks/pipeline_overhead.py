"""Server throughput through the pipeline against the same models called directly, in one run.

    .venv/bin/python benchmarks/pipeline_overhead.py [--frames 60] [--checkpoint PATH|random:SIZE] [--size 256]

Both sides get the same pre-encoded wire messages (the edge is not timed). *Direct*: for each message,
wire.unpack + codec.decode + the head of every registered task (codec.tasks) + mapping to the original frame, in
a plain loop. *Pipeline*: the server graph (server.receive over a real ZeroMQ tcp socket on 127.0.0.1 ->
server.decode -> one consumer thread per task -> results.merge -> JSONL sink), fed by a PUSH socket as fast as it
takes them. Prints frames per second of each and the overhead ratio (direct fps / pipeline fps; above 1.0 =
pipeline slower).

    .venv/bin/python benchmarks/pipeline_overhead.py --streams 1,4,8 --max-batch 8 [--max-wait-ms 5]

*Batching* (``--streams``): the same server graph with server.decode at ``max_batch`` 1 and at ``--max-batch``,
fed by 1, 4, 8 edge streams (EdgeClients over ZeroMQ tcp, frames spread round-robin over the streams), all graphs
running in this process at the same thread counts; rounds alternate between the configurations (the order turns
each round) so load from other processes hits them alike. Prints frames per second of each, the ratio batched /
unbatched per stream count, and the mean batch size.
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
    ap.add_argument("--streams", default=None, metavar="N,N,...",
                    help="compare server.decode batching instead: these stream counts (e.g. 1,4,8)")
    ap.add_argument("--max-batch", type=int, default=8, help="with --streams: the batched configuration (default 8)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="with --streams: its max_wait_ms (default 5)")
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
    if args.streams:
        return batching(args, ckpt, codec, encoded, TASKS)
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


def _free_endpoint() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def batching(args, ckpt: str, codec, encoded: list, tasks) -> int:
    """Frames/s of the server graph at max_batch 1 and ``args.max_batch`` for each stream count, interleaved."""
    import torch

    from pipeline.graph import GraphRunner, parse_graph
    from transport import wire
    from transport.session import EdgeClient

    counts = [int(x) for x in args.streams.split(",") if x.strip()]
    configs = [(n, mb) for n in counts for mb in dict.fromkeys((1, args.max_batch))]
    live: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, mb in configs:
            ep = _free_endpoint()
            spec = parse_graph({"name": f"batch{n}x{mb}", "stages": [
                {"name": "receive", "key": "server.receive", "params": {"endpoint": ep, "checkpoint": ckpt,
                                                                        "insecure": True}},
                {"name": "decode", "key": "server.decode", "inputs": ["receive"],
                 "params": {"checkpoint": ckpt, "max_batch": mb, "max_wait_ms": args.max_wait_ms}},
                *({"name": t, "key": f"task.{t}", "inputs": ["decode"]} for t in tasks),
                {"name": "merge", "key": "results.merge", "inputs": list(tasks)},
                {"name": "jsonl", "key": "sink.jsonl", "inputs": ["merge"],
                 "params": {"path": f"{tmp}/r{n}x{mb}.jsonl"}}]}, "<bench>")
            runner = GraphRunner(spec, log=lambda m: None)
            runner.open()
            runner.start()
            clients = [EdgeClient(ep, stream=s, fingerprint=codec.fingerprint, mode="replay", log=lambda m: None)
                       for s in range(n)]
            live[(n, mb)] = (runner, clients, [0] * n)

        def push(cfg, total: int) -> float:
            """``total`` frames spread round-robin over the configuration's streams; seconds until all are written."""
            runner, clients, sent = live[cfg]
            jsonl = runner.nodes["jsonl"].stats
            target = jsonl.processed + total
            t0 = time.perf_counter()
            for k in range(total):
                s = k % len(clients)
                enc, (w, h) = encoded[k % len(encoded)]
                clients[s].submit(sent[s], wire.pack(wire.WireHeader(s, sent[s], time.time_ns(), time.time_ns(),
                                                                     codec.fingerprint, enc.latent_shape, (w, h)),
                                                     enc.payload))
                sent[s] += 1
            while jsonl.processed < target:
                time.sleep(0.002)
            return time.perf_counter() - t0

        for cfg in configs:
            push(cfg, max(args.warmup, cfg[0]))
        times: dict = {cfg: [] for cfg in configs}
        for r in range(args.rounds):
            for cfg in configs[r % len(configs):] + configs[:r % len(configs)]:
                times[cfg].append(push(cfg, args.frames))
        mean_batch = {}
        for cfg, (runner, clients, sent) in live.items():
            for s, cl in enumerate(clients):
                cl.finish(sent[s], timeout_s=30)
                cl.close()
            runner.stop.set()
            runner.wait()
            ex = runner.stats()["decode"].extra
            mean_batch[cfg] = ex["batched"] / ex["batches"] if ex.get("batches") else 1.0
    fps = {cfg: args.frames / float(np.median(t)) for cfg, t in times.items()}
    runtime = "onnxruntime" if getattr(codec, "server_runtime", None) is not None else "torch"
    print(f"checkpoint {ckpt}  input {codec.input_size}px  server runtime {runtime}  torch threads "
          f"{torch.get_num_threads()}  {args.frames} frames per round, median of {args.rounds} interleaved rounds, "
          f"max_wait_ms {args.max_wait_ms:g}")
    print(f"{'streams':>7}  {'max_batch 1':>12}  {f'max_batch {args.max_batch}':>12}  {'ratio':>6}  mean batch")
    for n in counts:
        a, b = fps[(n, 1)], fps[(n, args.max_batch)]
        print(f"{n:>7}  {a:8.2f} fps  {b:8.2f} fps  {b / a:6.2f}  {mean_batch[(n, args.max_batch)]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`run_pipeline.py edge`: the device half. Source -> letterbox -> encoder -> entropy coder -> ZeroMQ DEALER.

Pair it with `run_pipeline.py server --bind tcp://*:5555` on the server machine. At the end of a replay the
edge sends an end-of-stream message; Ctrl-C / SIGTERM stops the source, sends what is in flight and exits.
"""
from __future__ import annotations

import argparse

from pipeline.commands._common import add_common, check_max_frames, list_stages, load, run_graph
from pipeline.graph import StageSpec
from core.errors import UsageError
from transport.link import check_endpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=False, default=None, metavar="URL_OR_PATH",
                   help="video file, image folder, rtsp:// udp:// http:// URL, camera:N or /dev/videoN, conveyor[:SEED]")
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", metavar="ENDPOINT",
                   help="the server's ZeroMQ endpoint (default tcp://127.0.0.1:5555)")
    p.add_argument("--rate", default="native", help="replay pace of a file: native, max or FPS (default native)")
    p.add_argument("--link-timeout", type=float, default=30.0, metavar="S",
                   help="give up when the server takes no frame for S seconds (default 30)")
    p.add_argument("--stream-id", type=int, default=0, help="stream id written into every message (default 0)")
    p.add_argument("--key", default=None, metavar="FILE",
                   help="this edge's CurveZMQ secret key (NAME.key_secret from `run_pipeline.py keys`)")
    p.add_argument("--server-key", default=None, metavar="FILE", help="the server's public key (server.key)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a tcp link without encryption or authentication (a warning is printed)")
    p.add_argument("--policy", default="drop-oldest", choices=["drop-oldest", "drop-newest"],
                   help="live sources: which frame to drop when the link or the server falls behind")
    p.add_argument("--metrics-port", default=None, metavar="[HOST:]PORT",
                   help="serve Prometheus /metrics of this edge (frames, bytes, encode time, link drops and "
                        "queues) on HOST:PORT (default host 127.0.0.1)")
    p.add_argument("--live-queue", type=int, default=2, metavar="N",
                   help="live sources: frames waiting for credit on the edge (default 2)")
    add_common(p, out=False)


def run(args) -> int:
    if args.list_stages:
        return list_stages()
    check_max_frames(args.max_frames)
    if args.source is None and args.config is None:
        raise UsageError("edge needs --source URL_OR_PATH (a file, folder, stream URL, camera:N or conveyor)")
    check_endpoint(args.connect, "--connect")
    if not args.link_timeout > 0:
        raise UsageError(f"--link-timeout {args.link_timeout}: give a positive number of seconds")
    if not 0 <= args.stream_id < 2 ** 32:
        raise UsageError(f"--stream-id {args.stream_id}: use 0..4294967295")
    variables = {"connect": args.connect, "checkpoint": args.checkpoint, "max_frames": args.max_frames,
                 "rate": args.rate, "stream": args.stream_id, "link_timeout": args.link_timeout,
                 "secret_key": args.key, "server_key": args.server_key, "insecure": bool(args.insecure),
                 "policy": args.policy, "live_queue": args.live_queue}
    if args.source is not None:
        variables["source"] = args.source
    spec = load(args.config or "edge", variables, threads=args.threads)
    if args.metrics_port is not None:
        from pipeline.commands._factory import host_port
        host, port = host_port(args.metrics_port, "127.0.0.1", None, "--metrics-port")
        encoders = [st.name for st in spec.stages if st.key == "edge.encode"]
        if not encoders:
            raise UsageError(f"--metrics-port: graph {spec.path} has no edge.encode stage to measure")
        spec.stages.append(StageSpec("metrics", "sink.metrics", [encoders[-1]], {"host": host, "port": port}))
    return run_graph(spec, None, quiet=args.quiet)

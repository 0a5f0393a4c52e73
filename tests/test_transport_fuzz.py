"""Fuzz a running server with 100,000 mutated and random messages, then a valid stream: no crash, no hang,
the valid stream complete, memory flat, every refusal counted by kind."""
import json
import random
import signal
import struct
import time
import zlib

import psutil
import pytest
import zmq

from tests.transport_helpers import (edge_checkpoint, free_port, kill, read_jsonl, record_server_config, spawn)

pytest.importorskip("codec.api")
N_FUZZ = 100_000


def _recrc(b: bytearray) -> bytes:
    from transport import wire
    body = wire._BODY.size
    struct.pack_into("<I", b, body, zlib.crc32(bytes(b[wire.HEADER_SIZE:]), zlib.crc32(bytes(b[:body]))))
    return bytes(b)


def _valid_stream(ep, stream, n, fp, shape, payload, session=None):
    from transport import wire
    from transport.session import EdgeClient
    cl = EdgeClient(ep, stream, fp, "replay", log=lambda m: None, timeout_s=30, session=session)
    try:
        for i in range(n):
            cl.submit(i, wire.pack(wire.WireHeader(stream, i, time.time_ns(), time.time_ns(), fp, shape, (64, 64)),
                                   payload))
        assert cl.finish(n, timeout_s=60), cl.status()
    finally:
        cl.close()


def test_fuzz_100k_messages_then_valid_stream(tmp_path):
    import numpy as np

    from codec.api import load_edge
    from transport import wire
    from transport.session import K_DATA, K_HELLO
    ckpt = edge_checkpoint()
    codec = load_edge(ckpt)
    enc = codec.encode(np.zeros((1, 64, 64, 3), np.uint8))[0]
    fp, shape, payload = codec.fingerprint, tuple(enc.latent_shape), enc.payload
    # every message parsed and checked: no per-peer budget (peer_rate) cutting the fuzzer short
    cfg = record_server_config(tmp_path / "server.yaml", peer_rate=1e9)
    port, out = free_port(), tmp_path / "out"
    ep = f"tcp://127.0.0.1:{port}"
    slog = tmp_path / "server.log"
    server = spawn("server", "--config", str(cfg), "--bind", ep, "--checkpoint", str(ckpt), "--out", str(out),
                   "--insecure", log=slog)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        proc = psutil.Process(server.pid)
        _valid_stream(ep, 1, 10, fp, shape, payload)  # the server is up and working
        rss_before = proc.memory_info().rss
        dealer.connect(ep)
        rng = random.Random(0)
        hello = json.dumps({"proto": 1, "stream": 7, "session": "fuzz", "mode": "replay",
                            "fingerprint": fp.hex()}).encode()
        dealer.send_multipart([K_HELLO, hello])

        def frame(i=0, stream=7, **kw):
            h = dict(stream_id=stream, frame_index=i, capture_ns=1, sent_ns=2, fingerprint=fp, latent_shape=shape,
                     orig_size=(64, 64))
            h.update(kw)
            return wire.pack(wire.WireHeader(**h), payload)

        good = frame(0)
        dealer.send_multipart([K_DATA, good])  # accepted once; every later copy is a replay
        kinds = {}

        def mutate():
            k = rng.randrange(12)
            kinds[k] = kinds.get(k, 0) + 1
            if k == 0:  # bit flips
                b = bytearray(good)
                for _ in range(rng.randint(1, 4)):
                    p = rng.randrange(len(b))
                    b[p] ^= 1 << rng.randrange(8)
                return [K_DATA, bytes(b)]
            if k == 1:  # truncation
                return [K_DATA, good[:rng.randrange(len(good))]]
            if k == 2:  # huge declared latent shape, valid checksum
                b = bytearray(good)
                struct.pack_into("<3H", b, 52, rng.randint(1, 65535), 65535, 65535)
                return [K_DATA, _recrc(b)]
            if k == 3:  # huge declared payload
                b = bytearray(good)
                struct.pack_into("<I", b, 66, rng.randint(len(payload) + 1, 2 ** 32 - 1))
                return [K_DATA, _recrc(b)]
            if k == 4:  # wrong version
                b = bytearray(good)
                b[4] = rng.choice([0, 2, 3, 255])
                return [K_DATA, _recrc(b)]
            if k == 5:  # foreign fingerprint
                return [K_DATA, frame(rng.randint(1, 10 ** 6), fingerprint=rng.randbytes(16))]
            if k == 6:  # random bytes
                return [K_DATA, rng.randbytes(rng.randrange(300))]
            if k == 7:  # random multipart / unknown kinds
                return [rng.randbytes(rng.randrange(3)) for _ in range(rng.randint(1, 5))]
            if k == 8:  # replayed frame (same stream id + index) and frames far ahead
                return [K_DATA, good if rng.random() < 0.5 else frame(rng.randint(2, 10 ** 9))]
            if k == 9:  # broken hellos: garbage, wrong protocol, foreign model
                return [K_HELLO, rng.choice([rng.randbytes(40), b'{"proto": 9}', json.dumps(
                    {"proto": 1, "stream": 8, "session": "x", "mode": "replay", "fingerprint": "00" * 16}).encode()])]
            if k == 10:  # a stream this peer never opened
                return [K_DATA, frame(0, stream=rng.randint(100, 2 ** 32 - 1))]
            b = bytearray(good)  # header length / flags nonsense with a valid checksum
            struct.pack_into("<BH", b, 5, rng.randrange(256), rng.randrange(65536))
            return [K_DATA, _recrc(b)]

        msgs = [mutate() for _ in range(2000)]  # a pool, recycled: sending is then as fast as ZeroMQ goes
        t0 = time.monotonic()
        rss_mid = None
        rss_trace = []
        for i in range(N_FUZZ):
            dealer.send_multipart(msgs[i % 2000] if i % 7 else mutate())
            if i == 10_000:
                rss_mid = proc.memory_info().rss
            if i % 30_000 == 0:
                rss_trace.append(round(proc.memory_info().rss / 2 ** 20, 1))
            if i % 1000 == 0:
                while dealer.poll(0):
                    dealer.recv_multipart()  # acks/nacks for the fuzz peer: read them, like a real peer
        send_s = time.monotonic() - t0
        assert server.poll() is None, slog.read_text()[-3000:]
        t1 = time.monotonic()
        _valid_stream(ep, 0, 50, fp, shape, payload)  # then a valid stream: processed in full, no hang
        valid_s = time.monotonic() - t1
        rss_after = proc.memory_info().rss
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, slog.read_text()[-3000:]
    finally:
        dealer.close(0)
        kill(server)
    rows = read_jsonl(out / "results.jsonl")
    assert [r["frame"] for r in rows if r["stream"] == 0] == list(range(50))
    assert [r["frame"] for r in rows if r["stream"] == 1] == list(range(10))
    assert [r["frame"] for r in rows if r["stream"] == 7] == [0]
    summary = json.loads((out / "server_summary.json").read_text())
    refused = summary["stages"]["receive"]["refused"]
    log = slog.read_text()
    print(f"\nfuzz: {N_FUZZ} messages in {send_s:.1f} s, refused {sum(refused.values())} by kind {refused}; "
          f"valid 50-frame stream afterwards in {valid_s:.1f} s; server RSS {rss_before / 2 ** 20:.1f} MiB before, "
          f"{rss_mid / 2 ** 20:.1f} MiB after 10k, {rss_after / 2 ** 20:.1f} MiB after all (every 30k: {rss_trace})")
    assert sum(refused.values()) >= N_FUZZ * 0.95
    for kind in ("ChecksumError", "LengthMismatchError", "ShapeError", "VersionError", "FingerprintMismatch",
                 "ReplayedError", "OutOfOrderError", "ControlError", "UnknownPeerError", "TruncatedError"):
        assert refused.get(kind, 0) > 0, (kind, refused)
        assert log.count(f"refused a message ({kind})") == 1  # logged once per kind, with its sender
    assert "from peer 127.0.0.1" in log
    assert rss_after - rss_mid < 16 * 2 ** 20  # flat: no growth with the number of bad messages

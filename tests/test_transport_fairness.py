"""Issue 12, floods: stream slots are not held by a flood (per-peer stream and session caps, slots of silent
streams reclaimed within seconds), and a flood from one peer does not slow another peer's live stream (fair
queuing per peer, budgets for costly messages, the receive thread yielding the GIL)."""
import json
import os
import random
import signal
import statistics
import threading
import time

import pytest
import zmq

from benchmarks.flood import flood_rate, pct, start_flooder, stop_flooder
from tests.transport_helpers import (edge_checkpoint, free_port, kill, read_jsonl,
                                     record_server_config, spawn, wait_for)
from transport import wire
from transport.runs import RunLedger
from transport.session import K_ERROR, K_HELLO, K_WELCOME, EdgeClient, ServerSession

FP = bytes(range(16))
SHAPE = (4, 2, 2)


def _hello(stream: int, session: str, fp: bytes = FP) -> bytes:
    return json.dumps({"proto": 1, "stream": stream, "session": session, "mode": "replay",
                       "fingerprint": fp.hex()}).encode()


def _frame(stream: int, i: int) -> bytes:
    return wire.pack(wire.WireHeader(stream, i, 1, 2, FP, SHAPE, (64, 64)), b"p" * 8)


def _dealer(ep: str, src: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 100)
    s.connect(f"tcp://{src}:0;{ep[len('tcp://'):]}")
    return s


def _answer(sock: zmq.Socket, timeout_s: float = 2.0) -> bytes | None:
    """The kind of the next welcome or error on ``sock`` (None: no answer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(20):
            parts = sock.recv_multipart()
            if parts[0] in (K_WELCOME, K_ERROR):
                return parts[0]
    return None


class _Server:
    def __init__(self, ep, **kw):
        self.logs: list[str] = []
        self.commit = RunLedger()
        self.ses = ServerSession(ep, FP, SHAPE, self.commit, log=self.logs.append, window=4, **kw)
        self.frames: list[tuple[int, int]] = []
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        last = time.monotonic()
        while not self.stop:
            for h, p, data, rx in self.ses.poll(10):
                self.frames.append((h.stream_id, h.frame_index))
                self.commit.done(h.stream_id, h.frame_index)
            self.ses.flush_acks()
            if time.monotonic() - last > 1.0:
                last = time.monotonic()
                self.ses.housekeeping()

    def held_by(self, addr: str) -> int:
        return sum(1 for s in list(self.ses.streams.values()) if s.peer_id == f"address {addr}")

    def close(self):
        self.stop = True
        self.t.join(5)
        self.ses.close()


def test_a_hello_flood_holds_no_stream_slots_and_silent_slots_come_back_in_seconds():
    """200 connections from one address flood hellos for new stream ids: that peer holds at most its 32 streams,
    a legitimate edge opens its stream during the flood. Then 256 live streams of 8 peers fill every slot: a new
    stream is refused while they are heard, and taken about ``reclaim_s`` (3 s) after they fall silent."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    srv = _Server(ep)  # reclaim_s = owner_timeout_s = 3 s
    flood = [_dealer(ep, "127.0.0.31") for _ in range(200)]
    fillers = {f"127.0.0.{60 + k}": _dealer(ep, f"127.0.0.{60 + k}") for k in range(8)}
    newcomer = _dealer(ep, "127.0.0.90")
    legit = EdgeClient(ep, 5, FP, "replay", log=lambda m: None, timeout_s=30)
    rng = random.Random(1)
    try:
        t0 = time.monotonic()
        sent = 0
        legit_started = False
        while time.monotonic() - t0 < 4.0:
            for s in flood:
                try:
                    s.send_multipart([K_HELLO, _hello(rng.randrange(1000, 100_000), os.urandom(6).hex())],
                                     zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass
                while s.poll(0):
                    s.recv_multipart()
            if not legit_started and time.monotonic() - t0 > 1.0:  # the flood is on: a real edge comes
                legit_started = True
                for i in range(20):
                    legit.submit(i, _frame(5, i))
        flood_s = time.monotonic() - t0
        held = srv.held_by("127.0.0.31")
        assert legit.finish(20, timeout_s=20), legit.status()
        assert [i for s, i in srv.frames if s == 5] == list(range(20))
        refused = dict(srv.ses.refused)
        print(f"\nhello flood: {sent} hellos from 200 connections of one address in {flood_s:.1f} s; that peer "
              f"held {held} streams; refused {refused}; the legitimate stream opened during the flood finished")
        assert held <= 32 and refused.get("StreamLimitError", 0) > 0 and refused.get("FloodError", 0) > 0
        assert len(srv.commit.sessions) <= srv.ses.max_streams + 1  # the state does not grow with the flood

        # every slot taken by live streams of 8 peers (32 each), heard while they keep saying hello (the
        # flooder's streams, silent now, give their slots up to them)
        last_hello = [0.0]

        def keep_alive(seconds: float, until=lambda: False):
            end = time.monotonic() + seconds
            while time.monotonic() < end and not until():
                for k, s in enumerate(fillers.values()):
                    for j in range(32):
                        s.send_multipart([K_HELLO, _hello(2000 + 32 * k + j, f"f{k}-{j}")])
                    while s.poll(0):
                        s.recv_multipart()
                last_hello[0] = time.monotonic()
                time.sleep(0.3)

        full = lambda: len(srv.ses.streams) == 256 and all(srv.held_by(a) == 32 for a in fillers)  # noqa: E731
        keep_alive(20, full)
        state = (len(srv.ses.streams), {a: srv.held_by(a) for a in fillers})
        assert state == (256, {a: 32 for a in fillers}), state
        keep_alive(0.6)
        newcomer.send_multipart([K_HELLO, _hello(9999, "new")])
        assert _answer(newcomer) is None  # refused (counted, no answer): every slot is held by a live stream
        assert "too many streams" in " ".join(srv.logs)
        keep_alive(1.0)
        silent_from = last_hello[0]  # the fillers stop: their slots are reclaimable after reclaim_s
        took = None
        while time.monotonic() - silent_from < 10:
            newcomer.send_multipart([K_HELLO, _hello(9999, "new")])
            if _answer(newcomer, 0.2) == K_WELCOME:
                took = time.monotonic() - silent_from
                break
        print(f"stream slots: 256 held by live streams; a new stream id was taken {took:.2f} s after their last "
              f"hello (reclaim_s 3.0); {srv.ses.reclaimed} slot(s) reclaimed")
        assert took is not None and 2.9 < took < 6.0, took
    finally:
        legit.close()
        for s in (*flood, *fillers.values(), newcomer):
            s.close(0)
        srv.close()


def test_per_peer_stream_cap_and_session_rate():
    ep = f"tcp://127.0.0.1:{free_port()}"
    srv = _Server(ep, max_streams_per_peer=4, session_rate=1.0, reclaim_s=1.0, log_interval_s=0.2)
    s = _dealer(ep, "127.0.0.32")
    other = _dealer(ep, "127.0.0.33")
    try:
        for i in range(6):  # 4 streams at once are fine, the 5th and 6th are over this peer's cap
            s.send_multipart([K_HELLO, _hello(100 + i, f"s{i}")])
        wait_for(lambda: srv.ses.refused.get("StreamLimitError", 0) == 2, 5, "two refusals")
        assert srv.held_by("127.0.0.32") == 4
        assert any("holds 4 live streams" in m for m in srv.logs)
        other.send_multipart([K_HELLO, _hello(200, "o")])  # another peer is not affected
        assert _answer(other) == K_WELCOME
        while s.poll(100):
            s.recv_multipart()
        for i in range(4):  # its own streams stay open: hellos of existing sessions cost no new slot
            s.send_multipart([K_HELLO, _hello(100 + i, f"s{i}")])
        assert [_answer(s) for _ in range(4)] == [K_WELCOME] * 4
        assert srv.ses.refused.get("StreamLimitError", 0) == 2
        # its streams go silent (reclaim_s) and it opens others: slots come back, but only at session_rate
        time.sleep(1.3)  # also past the refusal log's interval
        for i in range(4):
            s.send_multipart([K_HELLO, _hello(300 + i, f"t{i}")])
        wait_for(lambda: srv.ses.refused.get("StreamLimitError", 0) >= 5, 5, "the session-rate refusals")
        assert any("opens sessions faster than 1 per second" in m for m in srv.logs), srv.logs
        assert srv.held_by("127.0.0.32") == 4 and sum(1 for st in srv.ses.streams if 300 <= st < 304) in (1, 2)
    finally:
        s.close(0)
        other.close(0)
        srv.close()


# ============================================================================================ fair queuing
class _LiveSender:
    """A live edge stream at ``fps`` from this process: pre-encoded frames, capture time stamped at submit (the
    latency measured is then the link's and the server's, not an encoder's competing for this machine's CPU)."""

    def __init__(self, ep: str, stream: int, fp: bytes, shape, payload: bytes, fps: float):
        self.cl = EdgeClient(ep, stream, fp, "live", log=lambda m: None, timeout_s=30)
        self.stream, self.fp, self.shape, self.payload, self.period = stream, fp, shape, payload, 1.0 / fps
        self.n = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        t0 = time.monotonic()
        while not self.stop.is_set():
            now = time.time_ns()
            self.cl.submit(self.n, wire.pack(wire.WireHeader(self.stream, self.n, now, now, self.fp, self.shape,
                                                             (64, 64), 0, wire.FLAG_LIVE), self.payload))
            self.n += 1
            self.stop.wait(max(0.0, t0 + self.n * self.period - time.monotonic()))

    def close(self):
        self.stop.set()
        self.t.join(5)
        self.cl.finish(self.n, timeout_s=5)
        self.cl.close()


def test_a_flood_from_one_peer_does_not_slow_another_peers_live_stream(tmp_path):
    """A live stream (20 frames/s, its own peer) into a record-only server process; a flooder process (another
    peer: 20 connections, hellos for new streams, broken hellos, junk, foreign and unknown-kind messages, as
    fast as it goes, at the lowest CPU priority as if it ran elsewhere) on and off in turns of 4 s: quiet,
    flood, quiet, ..., quiet. Each flood turn is compared with the two quiet turns around it (the machine's load
    drifts: neighbours cancel it), and the median of the latency each flood turn adds is asserted, so that one
    turn hit by someone else's load spike does not decide."""
    import numpy as np
    pytest.importorskip("codec.api")

    from codec.api import load_edge
    ckpt = edge_checkpoint()
    codec = load_edge(ckpt)
    enc = codec.encode(np.zeros((1, 64, 64, 3), np.uint8))[0]
    fp = codec.fingerprint
    cfg = record_server_config(tmp_path / "server.yaml")
    port, out = free_port(), tmp_path / "out"
    ep = f"tcp://127.0.0.1:{port}"
    slog, sent_log = tmp_path / "server.log", tmp_path / "flood.txt"
    server = spawn("server", "--config", str(cfg), "--bind", ep, "--checkpoint", str(ckpt), "--out", str(out),
                   "--insecure", "--quiet", log=slog)
    phases: list[tuple[str, int, int]] = []  # (quiet|flood, start ns, end ns)
    flooder = sender = None
    try:
        sender = _LiveSender(ep, 1, fp, tuple(enc.latent_shape), enc.payload, fps=20)
        wait_for(lambda: len(read_jsonl(out / "results.jsonl")) >= 40, 120, "the live stream running", server)
        for k in range(9):
            kind = "flood" if k % 2 else "quiet"
            start = time.time_ns()
            if kind == "flood":
                flooder = start_flooder(ep, "127.0.0.77", sent_log, fp)
            time.sleep(4.0)
            if flooder is not None:
                stop_flooder(flooder)
                flooder = None
            phases.append((kind, start, time.time_ns()))
            assert server.poll() is None, slog.read_text()[-3000:]
        sender.close()
        sender = None
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, slog.read_text()[-3000:]
    finally:
        if sender is not None:
            sender.close()
        if flooder is not None:
            kill(flooder)
        kill(server)
    rows = [r for r in read_jsonl(out / "results.jsonl") if r["stream"] == 1]
    turns = []  # the live stream's latencies per turn, without its first second (the flooder starting/stopping)
    for kind, start, end in phases:
        turns.append([r["latency_ms"]["total"] for r in rows
                      if start + 1_000_000_000 <= r["timestamps"]["capture_ns"] < end - 200_000_000])
    assert all(len(t) > 40 for t in turns), [len(t) for t in turns]
    quiet, flood = [x for t in turns[0::2] for x in t], [x for t in turns[1::2] for x in t]
    ratios = [statistics.median(turns[k]) / statistics.median(turns[k - 1] + turns[k + 1])
              for k in range(1, len(turns), 2)]
    added = [statistics.median(turns[k]) - statistics.median(turns[k - 1] + turns[k + 1])
             for k in range(1, len(turns), 2)]
    rate = flood_rate(sent_log)
    refused = json.loads((out / "server_summary.json").read_text())["stages"]["receive"]["refused"]
    med = {"quiet": statistics.median(quiet), "flood": statistics.median(flood)}
    p95 = {"quiet": pct(quiet, 0.95), "flood": pct(flood, 0.95)}
    print(f"\nfair queuing: flood {rate:.0f} messages/s from 20 connections of one peer (server refused "
          f"{sum(refused.values())}: {refused}); live stream latency quiet median {med['quiet']:.1f} ms p95 "
          f"{p95['quiet']:.1f} ms ({len(quiet)} frames), flood median {med['flood']:.1f} ms p95 "
          f"{p95['flood']:.1f} ms ({len(flood)} frames); flood / neighbouring quiet turns, median per turn: "
          f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}); pooled p95 ratio "
          f"{p95['flood'] / p95['quiet']:.2f}")
    assert sum(refused.values()) > 20_000  # the flood reached the server
    # Bounded in milliseconds, not as a ratio: the edge sends a live frame the moment it is queued (its I/O thread
    # is woken), so the quiet median is ~1 ms here and any fixed cost reads as a large ratio. Measured on the
    # 2-core test machine at load average 5 (a training job): quiet median 0.9 ms, flood 2.7 ms (the server
    # reading ~110k messages/s it then drops costs it ~1/3 of a core); before the edge wake-up 6 ms and 6.6-7.6.
    # A flood that queued the live stream behind it would add seconds. The p95 bound is three frame periods
    # (150 ms), not one: on the CI machine the pooled flood p95 once read 53 ms with every turn's median fine
    # (scheduler noise of a shared 2-core machine, not queuing); the measured ratio is reported in the README.
    print(f"added by the flood, per turn: {', '.join(f'{a:.1f}' for a in added)} ms")
    assert statistics.median(added) < 8.0, added
    assert p95["flood"] < 150.0, p95

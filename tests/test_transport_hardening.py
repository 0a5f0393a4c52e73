"""Hardening (issue 12, transport half): no message, peer or config stops the server, hangs it, takes a stream
over or exhausts it. Real ZeroMQ over loopback: a real server process where the process is what matters
(exit codes, RSS), in-process sessions and stages elsewhere (fast, and their counters can be read)."""
import json
import math
import random
import signal
import subprocess
import threading
import time

import psutil
import pytest
import zmq

from tests.transport_helpers import (PY, ROOT, edge_checkpoint, env, free_port, kill, make_keys, read_jsonl,
                                     record_server_config, spawn, wait_for)
from transport import control, wire
from transport.control import ControlError
from transport.security import client_security, server_security
from stages.commitlog import CommitLog  # the JSONL sink's journal (a transport.runs.RunLedger)
from transport.runs import RunLedger
from transport.session import BUSY, K_BYE, K_DATA, K_ERROR, K_HELLO, K_WELCOME, EdgeClient, Refused, ServerSession

FP = bytes(range(16))
SHAPE = (4, 2, 2)


def _hello(stream=1, session="s1", mode="replay", fp=FP, **over) -> bytes:
    h = {"proto": 1, "stream": stream, "session": session, "mode": mode, "fingerprint": fp.hex()}
    h.update(over)
    return json.dumps(h).encode()


def _frame(stream, i, fp=FP, shape=SHAPE, payload=b"p" * 8, orig=(64, 64), flags=0) -> bytes:
    return wire.pack(wire.WireHeader(stream, i, 1, 2, fp, shape, orig, flags=flags), payload)


def _dealer(ep: str, sec=None, src: str | None = None) -> zmq.Socket:
    """A raw DEALER; ``src`` picks the local address (127.0.0.N), so each test is a peer of its own."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if sec is not None:
        sec.apply(s)
    s.connect(f"tcp://{src}:0;{ep[len('tcp://'):]}" if src else ep)
    return s


def _reply(sock: zmq.Socket, kinds=(K_WELCOME, K_ERROR), timeout_s: float = 5.0) -> list[bytes] | None:
    """The next message of one of ``kinds`` (acks and nacks are skipped), or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(50):
            parts = sock.recv_multipart()
            if parts[0] in kinds:
                return parts
    return None


class _Server:
    """A ServerSession polled by a thread that finishes every frame at once (so it is acknowledged)."""

    def __init__(self, ep, security=None, commit=None, **kw):
        self.logs: list[str] = []
        self.ses = ServerSession(ep, FP, SHAPE, commit or RunLedger(), security=security, log=self.logs.append,
                                 window=4, **kw)
        self.frames: list[tuple[int, int]] = []
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop:
            for h, p, data, rx in self.ses.poll(10):
                self.frames.append((h.stream_id, h.frame_index))
                self.ses.commit.done(h.stream_id, h.frame_index)
            self.ses.flush_acks()

    def close(self):
        self.stop = True
        self.t.join(5)
        self.ses.close()


# ============================================================================================ the schema check
CRASHERS = [  # each of these stopped the server (OverflowError, RecursionError) or was taken at face value
    b'{"proto": 1, "stream": 1e400, "session": "s", "mode": "replay", "fingerprint": "00"}',
    b'{"proto": 1, "stream": -1e400, "session": "s", "mode": "replay", "fingerprint": "00"}',
    b'{"proto": 1, "stream": NaN, "session": "s", "mode": "replay", "fingerprint": "00"}',
    b'{"proto": 1, "stream": Infinity, "session": "s", "mode": "replay", "fingerprint": "00"}',
    b"[" * 200_000,
    b"[" * 4000,
    b'{"a":' * 800 + b"1" + b"}" * 800,
    b'{"proto": 1, "stream": 1, "session": "s", "mode": "replay", "fingerprint": "00", "x": [[[[[[1]]]]]]}',
    b'{"proto": 1, "stream": 5.7, "session": "s", "mode": "replay", "fingerprint": "00"}',
    b'{"proto": true, "stream": 1, "session": "s", "mode": "replay", "fingerprint": "00"}',
    b'{"proto": 1, "stream": 1, "stream": 2, "session": "s", "mode": "replay", "fingerprint": "00"}',
    b'{"proto": 1, "stream": ' + b"9" * 5000 + b"}",
    b'{"proto": 1, "stream": 1e308, "session": "s", "mode": "replay", "fingerprint": "00"}',
    b"\xff\xfe{}", b"", b"null", b"[]", b'"hello"', b"12",
]


# the schema machinery on shapes the protocol no longer has (the worker messages went with the worker protocol)
BOUNDED = control.Schema("bounded count", {"capacity": control.Int(1, 64)})
FREE = control.Schema("free result", max_bytes=4 * 1024 * 1024, max_depth=32, free=True, nullable=True)

HELLO_ONLY = (b'"proto": true', b'"stream": 5.7', b'"stream": 1e308', b'"x": [')  # other schemas lack the field


@pytest.mark.parametrize("raw", CRASHERS, ids=lambda r: r[:24].decode("latin-1"))
def test_control_parse_refuses_what_crashed_the_server(raw):
    schemas = [control.HELLO]
    if not any(m in raw for m in HELLO_ONLY):
        schemas += [control.GOODBYE, BOUNDED, control.WELCOME]
    for schema in schemas:
        with pytest.raises(ControlError):
            control.parse(raw, schema)


BAD_FIELDS = {
    "stream": [5.7, "1", True, False, None, -1, 2 ** 32, [1], {"a": 1}, 1e400],
    "proto": [True, 1.0, "1", None, -1, 256],
    "mode": ["x", 1, True, None, ["replay"]],
    "session": ["", "a" * 65, "a b", "\u00e9", 5, "a\nb"],
    "fingerprint": ["zz", 1, "", "0" * 129],
}


def test_control_parse_checks_exact_types_and_ranges():
    good = json.loads(_hello())
    assert control.parse(json.dumps(good).encode(), control.HELLO) == good
    assert control.parse(json.dumps({**good, "later": {"field": [1, 2]}}).encode(), control.HELLO)  # forward compat
    for name, values in BAD_FIELDS.items():
        for v in values:
            raw = json.dumps({**good, name: v}).encode() if not (isinstance(v, float) and math.isinf(v)) else \
                json.dumps(good).replace(f'"{name}": {json.dumps(good[name])}', f'"{name}": 1e400').encode()
            with pytest.raises(ControlError, match=name if not isinstance(v, float) or math.isfinite(v) else "finite"):
                control.parse(raw, control.HELLO)
        bad = {k: v for k, v in good.items() if k != name}
        with pytest.raises(ControlError, match=f"lacks the field '{name}'"):
            control.parse(json.dumps(bad).encode(), control.HELLO)
    with pytest.raises(ControlError, match="exceeds the limit of 4096 bytes"):
        control.parse(json.dumps({**good, "pad": "x" * 5000}).encode(), control.HELLO)
    assert control.parse(b'{"capacity": 64}', BOUNDED) == {"capacity": 64}
    for cap in (b"0", b"65", b"1e400", b"true", b'"2"', b"2.0", b"null"):
        with pytest.raises(ControlError):
            control.parse(b'{"capacity": ' + cap + b"}", BOUNDED)
    assert control.parse(b"null", FREE) is None
    with pytest.raises(ControlError, match="finite"):
        control.parse(b'{"stream": 1, "frame": 2, "scores": [1e400]}', FREE)


def _random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 5 or r < 0.35:
        return rng.choice([0, -1, 1, 2 ** 32, 2 ** 64, True, False, None, 5.7, 1e300, "", "replay", "live",
                           "s" * rng.randrange(80), "\u00e9\n", "0" * 32, FP.hex()])
    if r < 0.6:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["proto", "stream", "session", "mode", "fingerprint", "capacity", "instance", "next", "window", "x"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(7))}


def _hostile(rng: random.Random) -> bytes:
    """A control body that is hostile more often than not: huge numbers, nesting, sizes, wrong types, garbage."""
    k = rng.randrange(8)
    if k == 0:
        return json.dumps(_random_json(rng)).encode()
    if k == 1:  # a field replaced by something huge, non-finite or deeply nested
        h = json.loads(_hello(rng.randrange(10)))
        text = json.dumps(h)
        field = rng.choice(list(h))
        bomb = rng.choice(["1e400", "-1e400", "NaN", "Infinity", "[" * rng.randrange(5, 5000),
                           "9" * rng.randrange(20, 6000), "true", "5.7", '"' + "a" * 5000 + '"', "{}"])
        return text.replace(f'"{field}": {json.dumps(h[field])}', f'"{field}": {bomb}').encode()
    if k == 2:
        return rng.randbytes(rng.randrange(200))
    if k == 3:
        return (rng.choice(["[", "{\"a\":"]) * rng.randrange(1, 100_000)).encode()
    if k == 4:  # a valid hello, truncated
        h = _hello(rng.randrange(10))
        return h[:rng.randrange(len(h))]
    if k == 5:
        return json.dumps({"capacity": _random_json(rng)}).encode()
    if k == 6:
        return json.dumps({"stream": _random_json(rng)}).encode()
    return b"x" * rng.randrange(4000, 70_000)


def test_control_parse_fuzz_raises_nothing_but_control_errors():
    rng = random.Random(12)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(4000):
        raw = _hostile(rng)
        for schema in (control.HELLO, control.GOODBYE, BOUNDED, FREE):
            try:
                obj = control.parse(raw, schema)
            except ControlError:
                outcomes["refused"] += 1
                continue
            outcomes["ok"] += 1
            if schema is control.HELLO:  # what passes is exactly what the server may use
                assert type(obj["stream"]) is int and 0 <= obj["stream"] < 2 ** 32
                assert type(obj["proto"]) is int and obj["mode"] in ("replay", "live")
    assert outcomes["refused"] > 10_000 and outcomes["ok"] > 100, outcomes


def _reference_depth(b: bytes) -> int:
    d = m = 0
    inside = esc = False
    for ch in b:
        if inside:
            if esc:
                esc = False
            elif ch == 0x5C:
                esc = True
            elif ch == 0x22:
                inside = False
        elif ch == 0x22:
            inside = True
        elif ch in (0x5B, 0x7B):
            d += 1
            m = max(m, d)
        elif ch in (0x5D, 0x7D):
            d -= 1
    return m


def test_nesting_depth_is_exact_on_json_and_never_recurses():
    rng = random.Random(3)

    def gen(d):
        r = rng.random()
        if d > 7 or r < 0.3:
            return rng.choice(['"a\\\\"', '"[\\"{"', "1", '"\\\\\\""', '"]]"', '"\\u005b"', "[]", "{}"])
        if r < 0.65:
            return "[" + ",".join(gen(d + 1) for _ in range(rng.randrange(3))) + "]"
        return "{" + ",".join(f'"k{i}[":' + gen(d + 1) for i in range(rng.randrange(3))) + "}"

    for _ in range(2000):
        text = gen(0).encode()
        json.loads(text)
        assert control.nesting_depth(text) == _reference_depth(text), text
    t0 = time.perf_counter()
    assert control.nesting_depth(b"[" * 4_000_000) == 4_000_000  # linear, no recursion
    assert control.nesting_depth(b'"\\"' * 1_000_000) == 0
    assert time.perf_counter() - t0 < 5


def test_refusal_log_one_line_per_kind_per_peer_per_interval_with_counts():
    logs: list[str] = []
    rl = control.RefusalLog(logs.append, "srv", interval_s=0.3)
    for _ in range(100):
        rl.refuse(ControlError("bad hello"), "peer A", "a")
        rl.refuse(ControlError("bad hello"), "peer B", "b")
        rl.refuse(wire.ShapeError("big"), "peer A", "a")
    assert rl.counts == {"ControlError": 200, "ShapeError": 100}
    assert len(logs) == 3 and all(line.startswith("[srv] refused a message (") for line in logs)
    time.sleep(0.35)
    rl.refuse(ControlError("bad hello again"), "peer A", "a")
    assert len(logs) == 4 and "refused 100 more message(s) (ControlError) from peer A" in logs[-1]
    assert "latest: bad hello again" in logs[-1]
    flood = control.RefusalLog(logs.append, "srv", interval_s=60, max_lines=5)
    for i in range(1000):  # a thousand peers: still 5 lines per interval, every refusal counted
        flood.refuse(ControlError("x"), f"peer {i}", str(i))
    assert flood.counts == {"ControlError": 1000} and len(logs) == 4 + 5


# ======================================================================================= in-process: control channels
def test_control_channel_fuzz_hello_goodbye_ready(tmp_path):
    """Thousands of hostile hellos and goodbyes into a live session: every one is refused and counted, nothing
    dies, a valid edge works afterwards."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    srv = _Server(ep)
    edge, stranger = _dealer(ep), _dealer(ep)
    rng = random.Random(7)
    expect = {"hello": 0, "bye": 0}
    n = 1500
    try:
        for i in range(n):
            body = _hostile(rng)
            try:
                control.parse(body, control.HELLO)
                valid_hello = True
            except ControlError:
                valid_hello = False
            edge.send_multipart([K_HELLO, body])
            expect["hello"] += not valid_hello
            stranger.send_multipart([K_BYE, body])  # valid or not: this peer owns no stream
            expect["bye"] += 1
            if i % 100 == 0:
                while edge.poll(0):
                    edge.recv_multipart()
        refused = srv.ses.refused
        wait_for(lambda: sum(refused.values()) >= expect["hello"] + expect["bye"], 60, "the session's refusals")
        time.sleep(0.2)
        assert srv.t.is_alive()
        assert "InternalError" not in refused
        assert expect["hello"] > 0.9 * n
        # then a valid edge stream, in full
        cl = EdgeClient(ep, 42, FP, "replay", log=lambda m: None, timeout_s=20)
        try:
            for i in range(10):
                cl.submit(i, _frame(42, i))
            assert cl.finish(10, timeout_s=20), cl.status()
        finally:
            cl.close()
        assert [f for f in srv.frames if f[0] == 42] == [(42, i) for i in range(10)]
        log_lines = [m for m in srv.logs if "refused" in m]
        assert len(log_lines) < 40, log_lines  # rate-limited: per kind per peer, not per message
    finally:
        srv.close()
        edge.close(0)
        stranger.close(0)


def test_edge_client_survives_hostile_server_messages():
    """A hostile or broken server: welcomes with 1e400 and nesting, part floods, foreign acks, a huge error text.
    The edge's link thread ignores (and counts) them and connects once a valid welcome comes."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(ep)
    cl = EdgeClient(ep, 3, FP, "replay", log=lambda m: None, timeout_s=10)
    try:
        assert router.poll(5000)
        rid = router.recv_multipart()[0]
        w = {"instance": "ab12", "stream": 3, "next": 0, "window": 4}
        for body in (json.dumps({**w, "next": 1e400}), json.dumps({**w, "window": True}), "[" * 100_000,
                     json.dumps({**w, "window": 0}), json.dumps({**w, "stream": 4}), json.dumps({**w, "next": -1}),
                     json.dumps({**w, "instance": "x y"}), "NaN"):
            router.send_multipart([rid, K_WELCOME, body.encode()])
        router.send_multipart([rid, b"A", b"short"])
        router.send_multipart([rid, K_WELCOME] + [b"x"] * 50)
        time.sleep(0.5)
        assert cl.thread.is_alive() and cl.error is None and cl.instance is None and cl.refused >= 10
        router.send_multipart([rid, K_WELCOME, json.dumps(w).encode()])
        wait_for(lambda: cl.instance == "ab12", 5, "the valid welcome")
        assert cl.window == 4 and cl.error is None
    finally:
        cl.close()
        router.close(0)


def test_a_handler_that_raises_costs_one_message_not_the_server():
    ep = f"tcp://127.0.0.1:{free_port()}"
    srv = _Server(ep)
    real = srv.ses._handle
    calls = {"n": 0}

    def flaky(frames, *a):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("injected bug")
        return real(frames, *a)

    srv.ses._handle = flaky
    try:
        cl = EdgeClient(ep, 5, FP, "replay", log=lambda m: None, timeout_s=20)
        try:
            for i in range(5):
                cl.submit(i, _frame(5, i))
            assert cl.finish(5, timeout_s=20), cl.status()
        finally:
            cl.close()
        assert srv.t.is_alive() and srv.ses.refused.get("InternalError") == 1
        assert any("KeyError" in m and "injected bug" in m and "a bug" in m for m in srv.logs)
        assert [f for f in srv.frames if f[0] == 5] == [(5, i) for i in range(5)]
    finally:
        srv.close()


# ======================================================================================= in-process: data rules
def test_data_after_eos_mode_mismatch_and_frame_size_refused():
    ep = f"tcp://127.0.0.1:{free_port()}"
    srv = _Server(ep, max_frame_side=4096)
    s = _dealer(ep)
    try:
        s.send_multipart([K_HELLO, _hello(9, "r9")])
        assert _reply(s)[0] == K_WELCOME
        s.send_multipart([K_DATA, _frame(9, 0, flags=wire.FLAG_LIVE)])  # live flag on a replay stream
        for _ in range(8):  # 8 frames declaring an 8192x8192 original
            s.send_multipart([K_DATA, _frame(9, 0, orig=(8192, 8192))])
        s.send_multipart([K_DATA, _frame(9, 0, orig=(4097, 64))])
        s.send_multipart([K_DATA, _frame(9, 0, orig=(4096, 4096))])  # at the limit: taken
        s.send_multipart([K_DATA, wire.end_of_stream(9, 1, FP)])
        s.send_multipart([K_DATA, _frame(9, 1)])  # that index is the end-of-stream's: a replay
        s.send_multipart([K_DATA, _frame(9, 2)])  # after the end
        s.send_multipart([K_HELLO, _hello(10, "l10", mode="live")])
        s.send_multipart([K_DATA, _frame(10, 0)])  # replay flag on a live stream
        s.send_multipart([K_DATA, _frame(10, 1, flags=wire.FLAG_LIVE)])
        s.send_multipart([K_DATA, wire.end_of_stream(10, 2, FP)])
        s.send_multipart([K_DATA, _frame(10, 3, flags=wire.FLAG_LIVE)])  # after the end
        s.send_multipart([K_HELLO, _hello(10, "l10", mode="replay")])  # the same session switching mode
        for bad in (_hello(11, "x", proto=True), _hello(5.7, "x"), _hello("11", "x"),
                    _hello(2 ** 32, "x"), _hello(11, "x", mode="both")):
            s.send_multipart([K_HELLO, bad])
        r = srv.ses.refused
        wait_for(lambda: sum(r.values()) >= 20, 10, f"20 refusals (have {r})")
        time.sleep(0.2)
        assert r == {"ModeError": 3, "FrameSizeError": 9, "ReplayedError": 1, "EndedError": 2,
                     "ControlError": 5}, r
        assert sorted(srv.frames) == [(9, 0), (10, 1)]
        assert any("8192x8192 exceeds this receiver's limit of 4096x4096" in m for m in srv.logs)
        assert sum("(FrameSizeError)" in m for m in srv.logs) == 1  # 9 refused, one line
    finally:
        s.close(0)
        srv.close()


# ============================================================================================ stream ownership
def test_another_key_cannot_take_over_a_live_stream_the_owner_can_come_back(tmp_path):
    d = make_keys(tmp_path / "keys", allowed=("cam1", "cam2"))
    ep = f"tcp://127.0.0.1:{free_port()}"
    srv = _Server(ep, server_security(ep, d / "server.key_secret", d / "allowed"), owner_timeout_s=1.0)
    sec1 = client_security(ep, d / "cam1.key_secret", d / "server.key")
    sec2 = client_security(ep, d / "cam2.key_secret", d / "server.key")
    owner = _dealer(ep, sec1)
    intruder = _dealer(ep, sec2)
    try:
        owner.send_multipart([K_HELLO, _hello(1, "own1")])
        assert _reply(owner)[0] == K_WELCOME
        for i in range(3):
            owner.send_multipart([K_DATA, _frame(1, i)])
        wait_for(lambda: len(srv.frames) == 3, 10, "the owner's first frames")
        # another allowed key says hello for the same stream: refused, naming the conflict and the fix
        intruder.send_multipart([K_HELLO, _hello(1, "evil")])
        r = _reply(intruder)
        assert r[0] == K_ERROR and r[1] == BUSY
        text = r[2].decode()
        assert "stream 1 belongs to another edge" in text and "--stream-id" in text and "key" in text
        intruder.send_multipart([K_DATA, _frame(1, 0)])  # data without a welcome: refused
        owner.send_multipart([K_HELLO, _hello(1, "own1")])
        assert _reply(owner)[0] == K_WELCOME
        for i in range(3, 6):  # the owner's stream did not reset: it goes on at frame 3
            owner.send_multipart([K_DATA, _frame(1, i)])
        wait_for(lambda: len(srv.frames) == 6, 10, "the owner's later frames")
        assert srv.frames == [(1, i) for i in range(6)]
        assert srv.ses.refused.get("StreamOwnerError") == 1 and srv.ses.refused.get("UnknownPeerError") == 1
        # the owner restarts (same key, new session, new connection): it gets its stream back at once
        owner.close(0)
        owner = _dealer(ep, sec1)
        owner.send_multipart([K_HELLO, _hello(1, "own2")])
        assert _reply(owner)[0] == K_WELCOME
        assert srv.ses.streams[1].session == "own2"
        # an EdgeClient on the other key retries for busy_wait_s, then stops with the server's message
        stop = threading.Event()

        def keep_alive():
            while not stop.is_set():
                owner.send_multipart([K_HELLO, _hello(1, "own2")])
                time.sleep(0.2)

        t = threading.Thread(target=keep_alive, daemon=True)
        t.start()
        cl = EdgeClient(ep, 1, FP, "replay", security=sec2, log=lambda m: None, timeout_s=10, busy_wait_s=1.0)
        try:
            t0 = time.monotonic()
            cl.submit(0, _frame(1, 0))
            wait_for(lambda: cl.error is not None, 8, "the edge to give up")
            assert 0.9 < time.monotonic() - t0 < 8
            with pytest.raises(Refused, match="--stream-id"):
                cl.submit(1, _frame(1, 1))
        finally:
            stop.set()
            t.join(2)
            cl.close()
        # once the owner is silent for owner_timeout_s, another key may open the stream (a new run)
        time.sleep(1.2)
        intruder.send_multipart([K_HELLO, _hello(1, "evil")])
        assert _reply(intruder)[0] == K_WELCOME
        assert any("its owner (key" in m and "silent for" in m and "takes it over" in m for m in srv.logs)
    finally:
        owner.close(0)
        intruder.close(0)
        srv.close()


def test_without_keys_two_edges_on_one_stream_id_the_second_is_told_to_pick_another(tmp_path):
    ep = f"tcp://127.0.0.1:{free_port()}"
    srv = _Server(ep, owner_timeout_s=1.0)
    first = EdgeClient(ep, 0, FP, "replay", log=lambda m: None, timeout_s=20)
    logs: list[str] = []
    second = None
    try:
        for i in range(4):
            first.submit(i, _frame(0, i))
        wait_for(lambda: first.instance is not None, 10, "the first edge to connect")
        second = EdgeClient(ep, 0, FP, "replay", log=logs.append, timeout_s=20, busy_wait_s=1.5)
        second.submit(0, _frame(0, 100))
        wait_for(lambda: second.error is not None, 8, "the second edge to give up")
        with pytest.raises(Refused, match=r"stream 0 belongs to another edge .*--stream-id 1"):
            second.submit(1, _frame(0, 101))
        assert any("retrying for" in m for m in logs)  # a quick restart of the same edge would have got in
        assert first.finish(4, timeout_s=20), first.status()
        assert srv.frames == [(0, i) for i in range(4)]
        # that stream has ended: a new edge session may start a new run on it
        third = EdgeClient(ep, 0, FP, "replay", log=lambda m: None, timeout_s=20)
        try:
            third.submit(0, _frame(0, 0))
            assert third.finish(1, timeout_s=20), (third.status(), third.error, srv.logs)
        finally:
            third.close()
        assert srv.frames[-1] == (0, 0) and len(srv.frames) == 5
    finally:
        first.close()
        if second is not None:
            second.close()
        srv.close()


def test_the_recorded_owner_gets_its_stream_back_first_after_a_server_restart(tmp_path):
    d = make_keys(tmp_path / "keys", allowed=("cam1", "cam2"))
    ep = f"tcp://127.0.0.1:{free_port()}"
    (tmp_path / "results.jsonl").write_text("")
    commit = CommitLog(tmp_path / "results.jsonl", resume=True)
    sec = server_security(ep, d / "server.key_secret", d / "allowed")
    srv = _Server(ep, sec, commit=commit, owner_timeout_s=2.0)
    owner = _dealer(ep, client_security(ep, d / "cam1.key_secret", d / "server.key"))
    intruder = _dealer(ep, client_security(ep, d / "cam2.key_secret", d / "server.key"))
    try:
        owner.send_multipart([K_HELLO, _hello(4, "own")])
        assert _reply(owner)[0] == K_WELCOME
        srv.close()
        owner.close(0)
        intruder.close(0)
        ep = f"tcp://127.0.0.1:{free_port()}"  # the restarted server (a new port: the old one may linger)
        sec = server_security(ep, d / "server.key_secret", d / "allowed")
        srv = _Server(ep, sec, commit=CommitLog(tmp_path / "results.jsonl", resume=True), owner_timeout_s=2.0)
        owner = _dealer(ep, client_security(ep, d / "cam1.key_secret", d / "server.key"))
        intruder = _dealer(ep, client_security(ep, d / "cam2.key_secret", d / "server.key"))
        intruder.send_multipart([K_HELLO, _hello(4, "evil")])
        r = _reply(intruder)
        assert r[0] == K_ERROR and r[1] == BUSY and b"recorded before this server started" in r[2]
        owner.send_multipart([K_HELLO, _hello(4, "own")])
        assert _reply(owner)[0] == K_WELCOME
    finally:
        owner.close(0)
        intruder.close(0)
        srv.close()


# ======================================================================================= a real server process
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One record-only server process for the attacks below; each test comes from its own 127.0.0.N address
    (a peer of its own for the per-peer log limits). Teardown: SIGTERM, exit 0, summary with every kind."""
    pytest.importorskip("codec.api")
    import numpy as np

    from codec.api import load_edge
    tmp = tmp_path_factory.mktemp("hardening")
    ckpt = edge_checkpoint()
    codec = load_edge(ckpt)
    enc = codec.encode(np.zeros((1, 64, 64, 3), np.uint8))[0]
    port, out = free_port(), tmp / "out"
    ep = f"tcp://127.0.0.1:{port}"
    log = tmp / "server.log"
    proc = spawn("server", "--config", str(record_server_config(tmp / "server.yaml")), "--bind", ep,
                 "--checkpoint", str(ckpt), "--out", str(out), "--insecure", "--quiet", log=log)
    info = {"ep": ep, "proc": proc, "log": log, "out": out, "fp": codec.fingerprint,
            "shape": tuple(enc.latent_shape), "payload": enc.payload, "kinds": set()}
    try:
        _valid_stream(info, 100, 3)  # up and working
        yield info
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        refused = json.loads((out / "server_summary.json").read_text())["stages"]["receive"]["refused"]
        assert info["kinds"] <= set(refused), (info["kinds"], refused)
    finally:
        kill(proc)


def _valid_stream(info, stream: int, n: int) -> None:
    cl = EdgeClient(info["ep"], stream, info["fp"], "replay", log=lambda m: None, timeout_s=30)
    try:
        for i in range(n):
            cl.submit(i, wire.pack(wire.WireHeader(stream, i, time.time_ns(), time.time_ns(), info["fp"],
                                                   info["shape"], (64, 64)), info["payload"]))
        assert cl.finish(n, timeout_s=60), cl.status()
    finally:
        cl.close()
    rows = read_jsonl(info["out"] / "results.jsonl")
    assert [r["frame"] for r in rows if r["stream"] == stream] == list(range(n))


def _logged(info, kind: str, src: str) -> bool:
    return f"refused a message ({kind}) from peer {src} " in info["log"].read_text()


def test_server_process_survives_1e400_and_deep_nesting_in_hello_and_goodbye(server):
    src = "127.0.0.11"
    s = _dealer(server["ep"], src=src)
    try:
        fp = server["fp"]
        for body in (_hello(7, "a", fp=fp).replace(b'"stream": 7', b'"stream": 1e400'), b"[" * 200_000,
                     _hello(7, "a", fp=fp).replace(b'"proto": 1', b'"proto": true'),
                     _hello(7, "a", fp=fp).replace(b'"stream": 7', b'"stream": 5.7')):
            s.send_multipart([K_HELLO, body])
            s.send_multipart([K_BYE, body.replace(b'"proto"', b'"x"')])
        s.send_multipart([K_BYE, b'{"stream": 1e400}'])
        s.send_multipart([K_BYE, b'{"stream": ' + b"[" * 100_000])
        s.send_multipart([K_HELLO, _hello(7, "a", fp=fp)])  # then a valid hello from the same peer: welcomed
        assert _reply(s, timeout_s=15)[0] == K_WELCOME
        assert server["proc"].poll() is None
        wait_for(lambda: _logged(server, "ControlError", src), 10, "the refusal line")
        text = server["log"].read_text()
        assert "not finite" in text
        assert text.count(f"from peer {src} ") == 1  # 10 refusals, one line
        server["kinds"].add("ControlError")
    finally:
        s.close(0)
    _valid_stream(server, 101, 3)


def test_server_process_part_flood_is_dropped_and_memory_returns(server):
    src = "127.0.0.12"
    proc = psutil.Process(server["proc"].pid)
    rss0 = proc.memory_info().rss
    s = _dealer(server["ep"], src=src)
    part = b"\0" * (4 * 1024 * 1024)
    try:
        for _ in range(2):
            s.send_multipart([K_DATA] + [part] * 48)  # 48 parts x 4 MiB each: 192 MiB in one message
        s.send_multipart([K_HELLO, _hello(8, "b", fp=server["fp"])])  # answered after both floods
        assert _reply(s, timeout_s=30)[0] == K_WELCOME
        wait_for(lambda: _logged(server, "PartsError", src), 10, "the refusal line")
        assert "a message of 49 parts (192.0 MiB)" in server["log"].read_text()
        wait_for(lambda: proc.memory_info().rss < rss0 + 48 * 2 ** 20, 10,
                 f"the server's RSS to return (before {rss0 / 2 ** 20:.0f} MiB)")
        print(f"\npart flood: 2 x 192 MiB messages refused; server RSS {rss0 / 2 ** 20:.0f} MiB before, "
              f"{proc.memory_info().rss / 2 ** 20:.0f} MiB after")
        server["kinds"].add("PartsError")
    finally:
        s.close(0)
    _valid_stream(server, 102, 3)


def test_server_process_refuses_a_large_declared_frame_size(server):
    src = "127.0.0.13"
    proc = psutil.Process(server["proc"].pid)
    rss0 = proc.memory_info().rss
    s = _dealer(server["ep"], src=src)
    fp, shape, payload = server["fp"], server["shape"], server["payload"]
    try:
        s.send_multipart([K_HELLO, _hello(12, "c", fp=fp)])
        assert _reply(s, timeout_s=15)[0] == K_WELCOME
        for _ in range(8):
            s.send_multipart([K_DATA, _frame(12, 0, fp, shape, payload, orig=(8192, 8192))])
        s.send_multipart([K_DATA, _frame(12, 0, fp, shape, payload, orig=(640, 480))])
        wait_for(lambda: any(r["stream"] == 12 for r in read_jsonl(server["out"] / "results.jsonl")), 15,
                 "the normal frame")
        rows = [r for r in read_jsonl(server["out"] / "results.jsonl") if r["stream"] == 12]
        assert [(r["frame"], r["size"]) for r in rows] == [(0, [640, 480])]
        assert _logged(server, "FrameSizeError", src)
        assert proc.memory_info().rss < rss0 + 64 * 2 ** 20
        server["kinds"].add("FrameSizeError")
    finally:
        s.close(0)


DRIVER = '''
import sys


class Boom(BaseException):
    """Not an Exception: no per-message handler may swallow it."""


def boom(*args, **kwargs):
    raise Boom("injected failure")


from transport.session import ServerSession
ServerSession._handle = boom
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
'''
def test_a_loop_thread_that_dies_takes_the_server_down_with_exit_1_and_says_why(tmp_path):
    pytest.importorskip("codec.api")
    ckpt = edge_checkpoint()
    (tmp_path / "driver.py").write_text(DRIVER)
    record_server_config(tmp_path / "server.yaml")
    ep = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path / "server.log"
    args = ["server", "--config", str(tmp_path / "server.yaml"), "--bind", ep,
            "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--insecure", "--quiet"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen([PY, str(tmp_path / "driver.py"), *args], cwd=ROOT, env=env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    s = _dealer(ep)
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            s.send_multipart([K_HELLO, _hello(1, "x")])
            time.sleep(0.2)
        rc = proc.wait(5)
    finally:
        s.close(0)
        kill(proc)
    text = log.read_text()
    assert rc == 1, text[-3000:]
    assert "stage 'receive' (server.receive) failed: Boom: injected failure" in text, text[-3000:]


FULL_PIPE_HANGUP = r'''
import sys, time, zmq
from transport.runs import RunLedger
from transport.session import ServerSession
ses = ServerSession("tcp://127.0.0.1:0", bytes(16), (4, 2, 2), RunLedger(), log=lambda m: None)
ses.sock.setsockopt(zmq.RCVHWM, 100)
ep = ses.endpoint
for _ in range(3):
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.SNDHWM, 100_000)
    d.connect(ep)
    for _ in range(20_000):  # the server is busy elsewhere and does not read: its pipe for this peer fills
        d.send_multipart([b"H", b"x" * 200], zmq.NOBLOCK)
    time.sleep(0.5)
    d.close(0)  # ... and the peer hangs up
    time.sleep(1.5)  # a heartbeat timer of that connection would fire now
n = 0
while ses.sock.poll(0):
    ses.sock.recv_multipart()
    n += 1
print("alive", n)
'''


def test_a_peer_that_fills_its_pipe_and_hangs_up_cannot_abort_the_server(tmp_path):
    """libzmq 4.3.5 aborts a process whose ROUTER runs ZMTP heartbeats when a connection with a full receive pipe
    is hung up (``Assertion failed: !_io_error``); the released server took that abort under a flood. The
    server's ROUTER runs no heartbeat timer of its own (its edges' hellos tell it who is alive)."""
    (tmp_path / "full_pipe.py").write_text(FULL_PIPE_HANGUP)
    r = subprocess.run([PY, str(tmp_path / "full_pipe.py")], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "alive" in r.stdout, (r.returncode, r.stderr[-2000:])

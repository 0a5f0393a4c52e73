"""Issue 12, exactly once across edge restarts: a new edge session replaying the same source on the same stream
continues the server's unfinished run where the server stands (the frames below are skipped, never sent twice);
another source, another key or an ended run starts a new run. Every accepted frame is registered with its run
(the rows' ``session``). In-process ServerSession and EdgeClients over loopback tcp (fast, counters readable)."""
import json
import threading
import time

import pytest

from tests.transport_helpers import free_port, make_keys, wait_for
from transport import control, wire
from transport.control import ControlError
from transport.security import client_security, server_security
from stages.commitlog import CommitLog
from transport.runs import RunLedger
from transport.session import EdgeClient, ServerSession

FP = bytes(range(16))
SHAPE = (4, 2, 2)
SRC = "ab" * 16  # a replay source's identity
OTHER = "cd" * 16


def _frame(stream: int, i: int) -> bytes:
    return wire.pack(wire.WireHeader(stream, i, 1, 2, FP, SHAPE, (64, 64)), b"p" * 8)


class _Server:
    """A ServerSession polled by a thread; every accepted frame is finished at once (so it is acknowledged) and
    recorded with the run it was admitted for."""

    def __init__(self, ep, security=None, commit=None, **kw):
        self.logs: list[str] = []
        self.commit = commit or RunLedger()
        self.ses = ServerSession(ep, FP, SHAPE, self.commit, security=security, log=self.logs.append, window=4,
                                 **kw)
        self.frames: list[tuple[int, int, str]] = []  # (stream, index, run)
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop:
            for h, p, data, rx in self.ses.poll(10):
                self.frames.append((h.stream_id, h.frame_index, self.commit.session_of(h.stream_id, h.frame_index)))
                self.commit.done(h.stream_id, h.frame_index)
            self.ses.flush_acks()

    def indices(self, stream: int) -> list[int]:
        return [i for s, i, _ in self.frames if s == stream]

    def close(self):
        self.stop = True
        self.t.join(5)
        self.ses.close()


def _edge(ep, stream=1, source=SRC, security=None, **kw) -> EdgeClient:
    return EdgeClient(ep, stream, FP, "replay", security=security, log=kw.pop("log", lambda m: None), timeout_s=20,
                      source=source, **kw)


def _kill(cl: EdgeClient) -> None:
    """An edge process killed: its link stops without end-of-stream or goodbye."""
    cl.close()


def test_hello_source_and_welcome_session_fields_are_checked():
    good = {"proto": 1, "stream": 1, "session": "s", "mode": "replay", "fingerprint": FP.hex()}
    assert control.parse(json.dumps({**good, "source": SRC}).encode(), control.HELLO)["source"] == SRC
    for bad in ("", "xyz", "AB" * 16, "a" * 15, "a" * 65, 5, None, ["ab"]):
        with pytest.raises(ControlError, match="source"):
            control.parse(json.dumps({**good, "source": bad}).encode(), control.HELLO)
    w = {"instance": "ab", "stream": 1, "next": 0, "window": 4}
    assert control.parse(json.dumps(w).encode(), control.WELCOME) == w  # an older server: no session field
    for bad in ("", "a b", 7, "x" * 65):
        with pytest.raises(ControlError, match="session"):
            control.parse(json.dumps({**w, "session": bad}).encode(), control.WELCOME)
    with pytest.raises(ValueError, match="source"):
        EdgeClient("tcp://127.0.0.1:1", 1, FP, "replay", source="not hex", log=lambda m: None)


@pytest.mark.parametrize("keys", [True, False], ids=["curve-key", "no-keys"])
def test_a_restarted_edge_continues_the_run_where_the_server_stands(tmp_path, keys):
    ep = f"tcp://127.0.0.1:{free_port()}"
    sec_s = sec_e = None
    if keys:
        d = make_keys(tmp_path / "keys", allowed=("cam1",))
        sec_s = server_security(ep, d / "server.key_secret", d / "allowed")
        sec_e = client_security(ep, d / "cam1.key_secret", d / "server.key")
    srv = _Server(ep, sec_s, owner_timeout_s=1.0)
    first = _edge(ep, security=sec_e)
    edges = [first]
    try:
        for i in range(12):
            first.submit(i, _frame(1, i))
        wait_for(lambda: len(srv.indices(1)) == 12 and not first.unacked, 10, "the first 12 frames committed")
        run = first.session
        _kill(first)  # killed mid-replay: no end-of-stream
        logs: list[str] = []
        second = _edge(ep, security=sec_e, log=logs.append, busy_wait_s=5.0)  # a new process: a new session
        edges.append(second)
        assert second.session != run
        t0 = time.monotonic()
        for i in range(30):  # the restarted edge replays its source from the start
            second.submit(i, _frame(1, i))
        assert second.finish(30, timeout_s=20), second.status()
        took = time.monotonic() - t0
        assert srv.indices(1) == list(range(30))  # every frame once, in order
        assert {r for s, _, r in srv.frames} == {run}  # one run: the rows carry one session
        assert second.session == run and second.stats["skipped"] == 12 and second.stats["sent"] == 18
        assert any(f"continuing run {run}" in m for m in logs), logs
        assert any("continue" in m and run in m for m in srv.logs), srv.logs
        # with a key the owner's restart is taken at once; without keys once the old session is silent (1 s)
        assert took < (5.0 if keys else 10.0)
        # that run has ended: the same source again is a new run (a deliberate second replay), from frame 0
        third = _edge(ep, security=sec_e)
        edges.append(third)
        for i in range(3):
            third.submit(i, _frame(1, i))
        assert third.finish(3, timeout_s=20), (third.status(), srv.ses.refused, srv.logs[-8:])
        assert srv.indices(1) == list(range(30)) + [0, 1, 2]
        assert third.session != run and srv.frames[-1][2] == third.session
    finally:
        for e in edges:
            e.close()
        srv.close()


def test_another_source_or_no_source_starts_a_new_run(tmp_path):
    ep = f"tcp://127.0.0.1:{free_port()}"
    d = make_keys(tmp_path / "keys", allowed=("cam1",))
    srv = _Server(ep, server_security(ep, d / "server.key_secret", d / "allowed"))
    sec = client_security(ep, d / "cam1.key_secret", d / "server.key")
    edges = []
    try:
        for source in (SRC, OTHER, None):  # killed after 5 frames, then restarted on another input (or unnamed)
            cl = _edge(ep, security=sec, source=source)
            edges.append(cl)
            for i in range(5):
                cl.submit(i, _frame(1, i))
            wait_for(lambda: not cl.unacked and cl.instance is not None, 10, "5 frames committed")
            _kill(cl)
        assert srv.indices(1) == [0, 1, 2, 3, 4] * 3  # three runs, each from frame 0
        runs = [r for s, i, r in srv.frames if i == 0]
        assert runs == [e.session for e in edges] and len(set(runs)) == 3
        assert all(e.stats["skipped"] == 0 for e in edges)
    finally:
        for e in edges:
            e.close()
        srv.close()


def test_another_key_never_continues_a_run(tmp_path):
    ep = f"tcp://127.0.0.1:{free_port()}"
    d = make_keys(tmp_path / "keys", allowed=("cam1", "cam2"))
    srv = _Server(ep, server_security(ep, d / "server.key_secret", d / "allowed"), owner_timeout_s=0.5)
    a = _edge(ep, security=client_security(ep, d / "cam1.key_secret", d / "server.key"))
    b = None
    try:
        for i in range(5):
            a.submit(i, _frame(1, i))
        wait_for(lambda: not a.unacked and a.instance is not None, 10, "5 frames committed")
        _kill(a)
        time.sleep(0.7)  # the owner is silent: another key may take the stream, as a new run
        b = _edge(ep, security=client_security(ep, d / "cam2.key_secret", d / "server.key"))
        for i in range(3):
            b.submit(i, _frame(1, i))
        assert b.finish(3, timeout_s=20), b.status()
        assert srv.indices(1) == [0, 1, 2, 3, 4, 0, 1, 2] and b.session != a.session and b.stats["skipped"] == 0
    finally:
        a.close()
        if b is not None:
            b.close()
        srv.close()


def test_frames_in_flight_of_the_killed_edge_are_neither_lost_nor_doubled():
    """The server still holds frames of the killed session (not yet finished) when the new session arrives: they
    finish once; the new edge's copies are refused as replays and acknowledged when the originals are done."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    commit = RunLedger()
    logs: list[str] = []
    ses = ServerSession(ep, FP, SHAPE, commit, log=logs.append, window=4, owner_timeout_s=0.3)
    held: list[int] = []  # accepted, not finished yet
    done: list[int] = []  # finished (rows written), in order
    first = _edge(ep)
    second = None
    try:
        def pump(finish: bool):
            for h, p, data, rx in ses.poll(10):
                held.append(h.frame_index)
            while finish and held:
                done.append(held.pop(0))
                commit.done(1, done[-1])
            ses.flush_acks()

        for i in range(6):
            first.submit(i, _frame(1, i))
        deadline = time.monotonic() + 10
        while len(held) < 4 and time.monotonic() < deadline:  # 4 frames accepted (the window), none finished
            pump(False)
        assert held == [0, 1, 2, 3]
        _kill(first)
        time.sleep(0.4)  # the killed session is silent beyond owner_timeout_s (no keys)
        second = _edge(ep)
        for i in range(6):
            second.submit(i, _frame(1, i))
        second.finish(6, timeout_s=0.01)  # queues the end-of-stream, does not wait
        deadline = time.monotonic() + 10
        while second.instance is None and time.monotonic() < deadline:
            pump(False)
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:  # the new edge resends 0..3: the server holds them (refused as replays)
            pump(False)
        assert held == [0, 1, 2, 3] and ses.refused.get("ReplayedError", 0) >= 1
        assert second.session == first.session  # it continues the run (no rows yet: next is 0)
        deadline = time.monotonic() + 10
        while second.unacked and time.monotonic() < deadline:
            pump(True)
        assert done == list(range(6)) and not second.unacked
    finally:
        first.close()
        if second is not None:
            second.close()
        ses.close()


def test_commit_log_records_runs_and_ignores_late_frames_of_an_earlier_run(tmp_path):
    jl = tmp_path / "results.jsonl"
    jl.write_text("")
    c = CommitLog(jl, resume=True)
    assert c.next_for(3, "run1", "key K", SRC) == 0
    c.admit(3, 0, "run1")
    c.admit(3, 1, "run1")
    assert c.session_of(3, 0) == "run1"
    c.done(3, 0)
    assert c.run_info(3) == {"session": "run1", "owner": "key K", "source": SRC, "ended": False, "next": 1}
    assert c.next_for(3, "run2", "key K", OTHER) == 0  # a new run while frame 1 of run1 is still in flight
    c.done(3, 1)  # ... which finishes now: it does not count for run2
    assert c.run_info(3)["next"] == 0
    assert [c.queue.get_nowait() for _ in range(2)] == [(3, 0, "run1"), (3, 1, "run1")]
    c.end(3, "run2")
    state = json.loads((tmp_path / "results.jsonl.state.json").read_text())["streams"]["3"]
    assert state["session"] == "run2" and state["source"] == OTHER and state["ended"] is True
    assert CommitLog(jl, resume=True).run_info(3)["ended"] is True  # survives a restart
    assert c.forget(3, "run2") and c.run_info(3) is None  # no row: nothing kept


def test_the_session_of_an_ended_run_takes_nothing_over(tmp_path):
    """An edge whose run ended but whose link is still open (or a stale copy of its hello) must not continue or
    take over the stream's next run: its hello is refused as EndedError, the new run goes on undisturbed."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    d = make_keys(tmp_path / "keys", allowed=("cam1",))
    sec = client_security(ep, d / "cam1.key_secret", d / "server.key")
    srv = _Server(ep, server_security(ep, d / "server.key_secret", d / "allowed"))
    old = _edge(ep, security=sec)
    new = None
    try:
        for i in range(3):
            old.submit(i, _frame(1, i))
        assert old.finish(3, timeout_s=20)
        ended = old.session
        sent = old.stats["sent"]
        time.sleep(1.2)  # a finished client says no more hellos
        new = _edge(ep, security=sec)  # the same key and source: a new run (the old one ended)
        for i in range(4):
            new.submit(i, _frame(1, i))
        wait_for(lambda: not new.unacked and new.instance is not None, 10, "the new run's frames")
        stale = zmq_dealer(ep, sec)
        stale.send_multipart([b"H", json.dumps({"proto": 1, "stream": 1, "session": ended, "mode": "replay",
                                                "fingerprint": FP.hex(), "source": SRC}).encode()])
        wait_for(lambda: srv.ses.refused.get("EndedError", 0) == 1, 5, "the stale hello refused")
        assert srv.ses.streams[1].session == new.session and srv.ses.streams[1].peer != b""
        for i in range(4, 6):  # the new run is undisturbed
            new.submit(i, _frame(1, i))
        assert new.finish(6, timeout_s=20)
        assert srv.indices(1) == [0, 1, 2, 0, 1, 2, 3, 4, 5] and old.stats["sent"] == sent
        stale.close(0)
    finally:
        old.close()
        if new is not None:
            new.close()
        srv.close()


def zmq_dealer(ep: str, sec):
    import zmq
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    sec.apply(s)
    s.connect(ep)
    return s


def test_live_streams_get_the_shallow_window_replays_the_deep_one():
    """Each frame in flight on a live stream is a frame of latency: the welcome grants live_window (2) to live
    streams and the full window to replays."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    srv = _Server(ep)  # window 4, live_window default 2
    live = EdgeClient(ep, 7, FP, "live", log=lambda m: None, timeout_s=20)
    replay = _edge(ep, stream=8)
    try:
        live.submit(0, wire.pack(wire.WireHeader(7, 0, 1, 2, FP, SHAPE, (64, 64), 0, wire.FLAG_LIVE), b"p" * 8))
        replay.submit(0, _frame(8, 0))
        wait_for(lambda: live.window and replay.window, 10, "both welcomed")
        assert live.window == 2 and replay.window == 4
    finally:
        for e in (live, replay):
            _kill(e)
        srv.close()


def test_a_live_edge_is_welcomed_in_milliseconds_and_drops_none_of_its_first_frames():
    """The first hello goes out before the TCP connection exists (the socket queues to completed connections
    only), so it was lost and the next came a heartbeat (0.5 s) later: a 20 fps live camera dropped its first
    frames every start. A hello that finds no connection is retried within milliseconds."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    srv = _Server(ep)
    t0 = time.monotonic()
    live = EdgeClient(ep, 7, FP, "live", log=lambda m: None, timeout_s=20, heartbeat_s=0.5)
    try:
        wait_for(lambda: live.connected, 5, "welcomed")
        took = time.monotonic() - t0
        for i in range(10):  # a camera at 20 frames/s from then on
            assert live.submit(i, wire.pack(wire.WireHeader(7, i, 1, 2, FP, SHAPE, (64, 64), 0, wire.FLAG_LIVE),
                                            b"p" * 8))
            time.sleep(0.05)
        wait_for(lambda: len(srv.indices(7)) == 10, 5, "ten live frames")
        print(f"\nlive edge welcomed {1000 * took:.0f} ms after it started (heartbeat 500 ms)")
        assert took < 0.25, took
        assert srv.indices(7) == list(range(10)) and live.stats["dropped"] == 0
    finally:
        _kill(live)
        srv.close()

"""Replay across server crashes (exactly once, in order), live overload (bounded latency, counted drops),
several edge streams into one server. Real processes over tcp, tiny 64 px frames, random codec."""
import re
import signal

import pytest

from tests.transport_helpers import (count_lines, edge_checkpoint, free_port, kill, make_keys, read_jsonl,
                                     record_server_config, spawn, wait_for, write_video)

pytest.importorskip("codec.api")


def _server(cfg, port, out, ckpt, log, *extra):
    return spawn("server", "--config", str(cfg), "--bind", f"tcp://127.0.0.1:{port}", "--checkpoint", str(ckpt),
                 "--out", str(out), "--insecure", "--quiet", *extra, log=log)


def test_replay_exactly_once_across_three_server_kills(tmp_path):
    n = 500
    ckpt = edge_checkpoint()
    video = write_video(tmp_path / "clip.mp4", n)
    cfg = record_server_config(tmp_path / "server.yaml", "{ms: 15}")
    port, out = free_port(), tmp_path / "out"
    jl = out / "results.jsonl"
    slog, elog = tmp_path / "server.log", tmp_path / "edge.log"
    server = _server(cfg, port, out, ckpt, slog, "--exit-on-eos")
    edge = spawn("edge", "--source", str(video), "--connect", f"tcp://127.0.0.1:{port}", "--checkpoint", str(ckpt),
                 "--rate", "max", "--insecure", "--quiet", "--link-timeout", "60", log=elog)
    kills = []
    try:
        for k, at in enumerate((60, 200, 340)):
            wait_for(lambda: count_lines(jl) >= at, 120, f"{at} rows before kill {k + 1}", server)
            server.send_signal(signal.SIGKILL)  # no chance to flush or say goodbye
            server.wait(10)
            kills.append(count_lines(jl))
            server = _server(cfg, port, out, ckpt, slog, "--exit-on-eos")
        assert edge.wait(180) == 0, elog.read_text()[-3000:]
        assert server.wait(60) == 0, slog.read_text()[-3000:]
    finally:
        kill(edge)
        kill(server)
    rows = read_jsonl(jl)
    frames = [r["frame"] for r in rows]
    lost = sorted(set(range(n)) - set(frames))
    dup = len(frames) - len(set(frames))
    print(f"\nreplay with 3 SIGKILLs at rows {kills}: {len(frames)} rows, lost {len(lost)}, duplicated {dup}, "
          f"in order {frames == sorted(frames)}")
    assert lost == [] and dup == 0 and frames == list(range(n))
    assert all(r["stream"] == 0 for r in rows)
    elog_text = elog.read_text()
    assert elog_text.count("new server instance") == 3, elog_text[-2000:]
    assert "resuming" in slog.read_text()


def test_replay_exactly_once_across_two_edge_kills_and_three_server_kills(tmp_path):
    """One replay; the edge process SIGKILLed twice and the server three times, alternately. Each restarted edge
    (a new session, the same source, its key owning the stream) continues the run where the server stands:
    every frame once, in order, and (with the JSONL sink writing it) one ``session`` in every row."""
    n = 300
    ckpt = edge_checkpoint()
    video = write_video(tmp_path / "clip.mp4", n)
    keys = make_keys(tmp_path / "keys", allowed=("cam",))
    cfg = record_server_config(tmp_path / "server.yaml", "{ms: 15}")
    port, out = free_port(), tmp_path / "out"
    jl = out / "results.jsonl"
    slog, elog = tmp_path / "server.log", tmp_path / "edge.log"
    ep = f"tcp://127.0.0.1:{port}"

    def server():
        return spawn("server", "--config", str(cfg), "--bind", ep, "--checkpoint", str(ckpt), "--out", str(out),
                     "--key", str(keys / "server.key_secret"), "--allowed-keys", str(keys / "allowed"), "--quiet",
                     "--exit-on-eos", log=slog)

    def edge():
        return spawn("edge", "--source", str(video), "--connect", ep, "--checkpoint", str(ckpt), "--rate", "max",
                     "--key", str(keys / "cam.key_secret"), "--server-key", str(keys / "server.key"), "--quiet",
                     "--link-timeout", "90", log=elog)

    srv, edg = server(), edge()
    kills = []
    try:
        for at, who in ((40, "server"), (80, "edge"), (120, "server"), (165, "edge"), (210, "server")):
            wait_for(lambda: count_lines(jl) >= at, 180, f"{at} rows before killing the {who}",
                     srv if who == "server" else edg)
            victim = srv if who == "server" else edg
            victim.send_signal(signal.SIGKILL)  # no chance to flush, say goodbye or end the stream
            victim.wait(10)
            kills.append((who, count_lines(jl)))
            if who == "server":
                srv = server()
            else:
                edg = edge()
        assert edg.wait(240) == 0, elog.read_text()[-3000:]
        assert srv.wait(60) == 0, slog.read_text()[-3000:]
    finally:
        kill(edg)
        kill(srv)
    rows = read_jsonl(jl)
    frames = [r["frame"] for r in rows]
    lost = sorted(set(range(n)) - set(frames))
    dup = len(frames) - len(set(frames))
    sessions = {r.get("session") for r in rows}
    elog_text, slog_text = elog.read_text(), slog.read_text()
    skipped = [int(m) for m in re.findall(r"continuing run \S+ .*? at frame (\d+)", elog_text)]
    print(f"\nreplay with the edge killed twice and the server three times ({kills}): {len(frames)} rows, lost "
          f"{len(lost)}, duplicated {dup}, in order {frames == sorted(frames)}; restarted edges continued at frames "
          f"{skipped}; sessions in the rows {sessions}")
    assert lost == [] and dup == 0 and frames == list(range(n))
    assert all(r["stream"] == 0 for r in rows)
    assert len(skipped) == 2 and all(k > 0 for k in skipped), elog_text[-3000:]
    assert slog_text.count("continues run") + slog_text.count("continuing run") >= 2, slog_text[-3000:]
    assert elog_text.count("new server instance") >= 2, elog_text[-3000:]
    assert "resuming" in slog_text
    if sessions != {None}:  # the JSONL sink writes each row's run (CommitLog.session_of): one run here
        assert len(sessions) == 1 and None not in sessions, sessions


def _latencies(rows):
    return [r["latency_ms"]["total"] for r in rows]


def test_live_overload_bounded_latency_counted_drops_and_recovery(tmp_path):
    """Camera at 10 fps, server at 5 fps (200 ms per frame) for its first 30 frames, then 5 ms per frame."""
    ckpt = edge_checkpoint()
    cfg = record_server_config(tmp_path / "server.yaml", "{ms: 200, after: 30, then_ms: 5}")
    edge_cfg = tmp_path / "edge.yaml"
    edge_cfg.write_text("""
name: live_edge
queue_size: 2
vars: {connect: null, checkpoint: null, insecure: true}
stages:
  - {name: source, key: source.conveyor, params: {size: 64, fps: 10, max_frames: 120, seed: 3}}
  - {name: edge, key: edge.encode, inputs: [source], params: {checkpoint: "${checkpoint}"}}
  - {name: uplink, key: edge.send, inputs: [edge], params: {endpoint: "${connect}", insecure: true,
      policy: drop-oldest, live_queue: 1}}
""")
    port, out = free_port(), tmp_path / "out"
    slog, elog = tmp_path / "server.log", tmp_path / "edge.log"
    server = _server(cfg, port, out, ckpt, slog, "--exit-on-eos", "--window", "2")
    edge = spawn("edge", "--config", str(edge_cfg), "--connect", f"tcp://127.0.0.1:{port}", "--checkpoint", str(ckpt),
                 "--insecure", log=elog)
    try:
        assert edge.wait(120) == 0, elog.read_text()[-3000:]
        assert server.wait(60) == 0, slog.read_text()[-3000:]
    finally:
        kill(edge)
        kill(server)
    rows = read_jsonl(out / "results.jsonl")
    frames = [r["frame"] for r in rows]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)
    summary = elog.read_text()
    m = re.search(r"uplink\s+edge\.send\s+(\d+) msgs.*?dropped (\d+)", summary)
    assert m, summary[-2000:]
    sent_to_uplink, dropped = int(m.group(1)), int(m.group(2))
    over = rows[3:30]  # the overloaded part (server at half the camera rate)
    after = rows[40:]
    lat_over, lat_after = _latencies(over), _latencies(after)
    p_over = sorted(lat_over)[int(0.95 * (len(lat_over) - 1))]
    print(f"\nlive 2x overload: {len(rows)} of {sent_to_uplink} frames processed, edge dropped {dropped}; "
          f"latency median {sorted(lat_over)[len(lat_over) // 2]:.0f} ms, p95 {p_over:.0f} ms (max {max(lat_over):.0f}) "
          f"while overloaded, "
          f"median {sorted(lat_after)[len(lat_after) // 2]:.0f} ms after")
    assert dropped >= 15  # about half of the frames during the overload
    assert p_over < 1500  # bounded: window 2 + 1 queued on the edge, 200 ms each
    # nothing piles up: the second half of the overload is no slower than the first
    assert sum(lat_over[-10:]) / 10 < 1.3 * sum(lat_over[:10]) / 10 + 100
    # recovered once the overload ended
    assert sorted(lat_after)[len(lat_after) // 2] < 0.5 * sorted(lat_over)[len(lat_over) // 2]


def test_two_edge_streams_into_one_server_keep_order_and_share_fairly(tmp_path):
    ckpt = edge_checkpoint()
    cfg = record_server_config(tmp_path / "server.yaml", "{ms: 120}")  # the server is the bottleneck
    port, out = free_port(), tmp_path / "out"
    slog = tmp_path / "server.log"
    videos = [write_video(tmp_path / f"clip{i}.mp4", 40) for i in range(2)]
    server = _server(cfg, port, out, ckpt, slog)
    edges = [spawn("edge", "--source", str(v), "--connect", f"tcp://127.0.0.1:{port}", "--checkpoint", str(ckpt),
                   "--rate", "max", "--insecure", "--quiet", "--stream-id", str(i + 1), log=tmp_path / f"e{i}.log")
             for i, v in enumerate(videos)]
    try:
        for i, e in enumerate(edges):
            assert e.wait(120) == 0, (tmp_path / f"e{i}.log").read_text()[-2000:]
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, slog.read_text()[-2000:]
    finally:
        for p in (*edges, server):
            kill(p)
    rows = read_jsonl(out / "results.jsonl")
    for s in (1, 2):
        assert [r["frame"] for r in rows if r["stream"] == s] == list(range(40))
    # fairness: while both streams were sending, neither got far ahead of the other
    order = [r["stream"] for r in rows]
    start = max(order.index(1), order.index(2))
    end = min(max(i for i, s in enumerate(order) if s == 1), max(i for i, s in enumerate(order) if s == 2))
    both = order[start:end + 1]
    print(f"\ntwo streams: while both were sending, {both.count(1)} frames of stream 1 and {both.count(2)} of "
          f"stream 2 were finished")
    assert len(both) >= 20 and abs(both.count(1) - both.count(2)) <= max(6, len(both) // 4), order
    assert "stream 1 (replay) opened by peer 127.0.0.1" in slog.read_text()

"""Topology (b) on Ray Serve (`server --ray ADDRESS`), on a real local Ray cluster the test starts: a head and a
second node process on loopback. Two edges replay a clip through 2 replicas; one replica is SIGKILLed mid-replay.
Every frame comes back exactly once, in order per stream, with the same results as the in-process server."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.transport_helpers import PY, ROOT, free_port, kill, read_jsonl, wait_for, write_video

pytest.importorskip("codec.api")
pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")

CKPT = "random:64"
N = 30  # frames per stream
TASKS = ("detection", "segmentation", "classification")
RAY = [PY, "-m", "ray.scripts.scripts"]  # the `ray` CLI, not through a console script's #! line


def _env() -> dict:
    # the same authentication mode for the cluster and the server whatever ~/.ray holds (a token there turns
    # token authentication on for `ray start`)
    return dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")


def _cluster_procs(tmp: str, port: int) -> list:
    """The processes of the test's cluster (their command lines name its temp dir, or its GCS address as Ray's
    own ``--address=`` argument) and their children (workers, replicas); never a pipeline process."""
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            args = p.info["cmdline"] or []
            if any(tmp in c or (c.startswith("--address=") and c.endswith(f":{port}")) for c in args) \
                    and not any(c.endswith("run_pipeline.py") for c in args):
                roots.append(p)
        except (psutil.Error, TypeError):
            pass
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    return list(found.values())


def _start_cluster(second_node: bool):
    """A Ray cluster on 127.0.0.1 in its own temp dir: a head with 2 CPUs (and a second node process with 1)."""
    tmp = tempfile.mkdtemp(prefix="ladon-ray-")
    port = free_port()
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    head = [*RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
            f"--temp-dir={tmp}", "--object-store-memory=100000000", *common]
    node = [*RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--object-store-memory=80000000",
            f"--dashboard-agent-listen-port={free_port()}", *common]
    try:
        for argv in (head, node) if second_node else (head,):
            out = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    except BaseException:
        _stop_cluster(tmp, port)
        raise
    return f"127.0.0.1:{port}", tmp


def _stop_cluster(tmp: str, port: int) -> None:
    for p in _cluster_procs(tmp, port):
        try:
            p.kill()
        except psutil.Error:
            pass
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """(HEAD:PORT, temp dir) of a 2-node Ray cluster on 127.0.0.1 (head 2 CPUs, node 1 CPU); killed afterwards."""
    address, tmp = _start_cluster(second_node=True)
    try:
        yield address, tmp
    finally:
        _stop_cluster(tmp, int(address.rpartition(":")[2]))


def _spawn(*args, log: Path) -> subprocess.Popen:
    from tests.transport_helpers import cmd
    return subprocess.Popen(cmd(*args), cwd=ROOT, env=_env(), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _config(tmp: Path, name: str, text: str) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(text)
    return p


def _graphs(tmp: Path) -> tuple[Path, Path]:
    """The shipped server_ray and server graphs with detection's threshold at 0 (the random model then has boxes)."""
    ray_yaml = (ROOT / "configs/pipelines/server_ray.yaml").read_text()
    assert 'address: "${ray}",' in ray_yaml
    local_yaml = (ROOT / "configs/pipelines/server.yaml").read_text()
    assert "key: task.detection, inputs: [decode]}" in local_yaml
    return (_config(tmp, "ray", ray_yaml.replace('address: "${ray}",', 'address: "${ray}", conf: 0.0,')),
            _config(tmp, "local", local_yaml.replace("key: task.detection, inputs: [decode]}",
                                                     "key: task.detection, inputs: [decode], params: {conf: 0.0}}")))


def _replicas(tmp_marker: str, port: int) -> list:
    return [p for p in _cluster_procs(tmp_marker, port) if "ServeReplica" in " ".join(_safe_cmdline(p))]


def _safe_cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def _replay(tmp: Path, server_args: list[str], video: Path, name: str, during=None, n: int = N, rate: str = "15",
            before_stop=None):
    """Run a server with ``server_args`` and two replaying edges (streams 1 and 2) of ``n`` frames each;
    ``during(rows_path, server)`` runs while they go, ``before_stop(server, log_path)`` once every row is written
    (before the SIGTERM). Returns the JSONL rows and the server's log."""
    port, out = free_port(), tmp / name
    ep = f"tcp://127.0.0.1:{port}"
    slog = tmp / f"{name}.server.log"
    server = _spawn("server", "--bind", ep, "--checkpoint", CKPT, "--out", str(out), "--insecure", "--quiet",
                   *server_args, log=slog)
    edges = []
    try:
        # the server binds its port once every other stage is open (the Ray app ready: minutes on a loaded
        # machine), and an edge gives up after 30 s without a server: start the edges once it listens
        wait_for(lambda: _listening(port), 300, "the server listening", server, poll=0.5)
        for sid in (1, 2):
            edges.append(_spawn("edge", "--source", str(video), "--connect", ep, "--checkpoint", CKPT, "--rate", rate,
                               "--stream-id", str(sid), "--insecure", "--quiet", log=tmp / f"{name}.edge{sid}.log"))
        if during is not None:
            during(out / "results.jsonl", server)
        for e in edges:
            assert e.wait(240) == 0, (tmp / f"{name}.edge{edges.index(e) + 1}.log").read_text()[-3000:]
        wait_for(lambda: len(read_jsonl(out / "results.jsonl")) >= 2 * n, 60, "every row", server)
        if before_stop is not None:
            before_stop(server, slog)
        server.send_signal(signal.SIGTERM)
        assert server.wait(120) == 0, slog.read_text()[-4000:]
    finally:
        for p in (*edges, server):
            kill(p)
    return read_jsonl(out / "results.jsonl"), slog.read_text()


def test_ray_replay_exactly_once_in_order_equal_to_in_process_and_a_killed_replica_loses_nothing(ray_cluster,
                                                                                                tmp_path):
    address, tmp_marker = ray_cluster
    port = int(address.rpartition(":")[2])
    video = write_video(tmp_path / "clip.mp4", N, 80, 48, step=5, gradient=True)  # non-square: the letterbox
    ray_cfg, local_cfg = _graphs(tmp_path)
    killed = []

    def kill_a_replica(rows_path, server):
        wait_for(lambda: len(_replicas(tmp_marker, port)) >= 2, 240, "2 replicas", server)
        wait_for(lambda: sum(r["stream"] == 1 for r in read_jsonl(rows_path)) >= 6, 240, "stream 1 going", server)
        victim = _replicas(tmp_marker, port)[0]
        victim.kill()  # SIGKILL, mid-replay
        killed.append(victim.pid)

    t0 = time.monotonic()
    rows, log = _replay(tmp_path, ["--config", str(ray_cfg), "--ray", address, "--ray-replicas", "2"], video, "ray",
                        during=kill_a_replica)
    t_ray = time.monotonic() - t0
    assert killed and "Ray Serve app 'ladon' ready" in log, log[-3000:]
    for s in (1, 2):
        assert [r["frame"] for r in rows if r["stream"] == s] == list(range(N)), (s, log[-3000:])
    assert len(rows) == 2 * N  # nothing twice

    t0 = time.monotonic()
    local, _ = _replay(tmp_path, ["--config", str(local_cfg)], video, "local")
    t_local = time.monotonic() - t0
    want = {(r["stream"], r["frame"]): r for r in local}
    assert len(want) == 2 * N
    for r in rows:
        w = want[(r["stream"], r["frame"])]
        for field in (*TASKS, "size", "latent_shape", "bytes", "errors"):
            assert r.get(field) == w.get(field), (r["stream"], r["frame"], field)
    assert sum(len(r["detection"]["boxes"]) for r in rows) > 0
    retried = [line for line in log.splitlines() if "sending it again" in line]  # at most one line per 2 s
    print(f"\nray: 2x{N} frames through 2 replicas on a 2-node cluster, replica pid {killed[0]} SIGKILLed mid-replay: "
          f"0 lost, 0 duplicated, in order, equal to the in-process server; {len(retried)} request(s) sent again; "
          f"{t_ray:.0f} s (in-process {t_local:.0f} s)")


def test_ray_autoscales_between_min_and_max_under_load_and_the_replay_stays_exactly_once(ray_cluster, tmp_path):
    """--ray-replicas 1:2: two streams keep frames queued, Serve adds the second replica (the server logs the
    change, read from serve.status()) and removes it once the replay is over; every frame exactly once, in order."""
    address, tmp_marker = ray_cluster
    port = int(address.rpartition(":")[2])
    n = 400
    video = write_video(tmp_path / "clip.mp4", n, 80, 48, step=5, gradient=True)
    ray_cfg, _ = _graphs(tmp_path)
    text = ray_cfg.read_text()
    # the test's delays (a camera server: 3 s up, 60 s down); one frame queued per replica is the target, and a
    # batch waits up to 0.1 s for more: two 20 frames/s streams keep several frames queued on one replica. Down
    # after 12 s: on a loaded machine a replica takes long to start, and a lull in the queue must not cancel it
    for a, b in (("ray_upscale_delay_s: 3 ", "ray_upscale_delay_s: 1 "),
                 ("ray_downscale_delay_s: 60 ", "ray_downscale_delay_s: 12 "),
                 ("ray_target_ongoing: null ", "ray_target_ongoing: 1 "),
                 ("ray_batch_wait_s: 0.01 ", "ray_batch_wait_s: 0.1 ")):
        assert a in text, a
        text = text.replace(a, b)
    ray_cfg.write_text(text)
    seen: dict[str, float] = {}

    def scaled_up(rows_path, server):
        slog, t0 = tmp_path / "auto.server.log", time.monotonic()
        wait_for(lambda: "1 running, 1 starting (was 1 running" in slog.read_text(), 120, "a second replica", server)
        seen["rows_at_up"], seen["up_s"] = len(read_jsonl(rows_path)), time.monotonic() - t0
        wait_for(lambda: "2 running, 0 starting" in slog.read_text(), 120, "the second replica running", server)
        seen["running_s"], seen["processes"] = time.monotonic() - t0, len(_replicas(tmp_marker, port))

    def scaled_down(server, slog):
        t0 = time.monotonic()
        wait_for(lambda: "1 running, 0 starting (was 2 running" in slog.read_text(), 60, "back to one replica",
                 server)
        seen["down_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    rows, log = _replay(tmp_path, ["--config", str(ray_cfg), "--ray", address, "--ray-replicas", "1:2"], video,
                        "auto", during=scaled_up, n=n, rate="20", before_stop=scaled_down)
    took = time.monotonic() - t0
    assert "1..2 (autoscaling: 1 frames queued per replica, up after 1 s, down after 12 s)" in log, log[-3000:]
    assert seen["rows_at_up"] < 2 * n  # scaled while the replay was going
    for s in (1, 2):
        assert [r["frame"] for r in rows if r["stream"] == s] == list(range(n)), (s, log[-3000:])
    assert len(rows) == 2 * n  # nothing twice
    print(f"\nray autoscaling 1..2: 2x{n} frames; a second replica starting {seen['up_s']:.0f} s after the edges "
          f"started ({seen['rows_at_up']} rows written), running after {seen['running_s']:.0f} s "
          f"({seen['processes']} replica processes), back to one {seen['down_s']:.0f} s after the last row; 0 lost, "
          f"0 duplicated, in order; {took:.0f} s")


def test_ray_replicas_asking_for_a_gpu_no_node_has_are_named_not_waited_on_silently(ray_cluster, tmp_path):
    """ray_gpus 1 on a cluster without GPUs: one line at once saying the replicas wait for such a node, then (after
    the deploy timeout, short here) exit 2 naming ray_cpus/ray_gpus, Serve's own words and `ray status`."""
    address, _ = ray_cluster
    ray_cfg, _ = _graphs(tmp_path)
    text = ray_cfg.read_text()
    for a, b in (("ray_gpus: 0 ", "ray_gpus: 1 "), ('address: "${ray}",', 'address: "${ray}", deploy_timeout_s: 8,')):
        assert a in text, a
        text = text.replace(a, b)
    ray_cfg.write_text(text)
    slog = tmp_path / "gpu.server.log"
    server = _spawn("server", "--bind", f"tcp://127.0.0.1:{free_port()}", "--checkpoint", CKPT, "--out",
                    str(tmp_path / "out"), "--insecure", "--quiet", "--config", str(ray_cfg), "--ray", address, log=slog)
    try:
        assert server.wait(180) == 2, slog.read_text()[-3000:]
    finally:
        kill(server)
    log = slog.read_text()
    assert f"no node of the Ray cluster at {address} has 1 CPU / 1 GPU per replica" in log, log[-3000:]
    assert "stay pending until one joins" in log and "--num-gpus" in log, log[-3000:]
    assert "is not running on the Ray cluster" in log and "ray_cpus/ray_gpus (1/1 per replica)" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_ray_bad_address_and_options_are_usage_errors(capsys, tmp_path):
    from pipeline.cli import main
    port = free_port()  # nothing listens there
    for argv, words in ((["--ray", "nohost"], ["--ray 'nohost'", "HOST:PORT", "auto"]),
                        (["--ray", f"127.0.0.1:{port}"], [f"no Ray cluster answers at 127.0.0.1:{port}",
                                                          "ray start --head"]),
                        (["--ray-replicas", "2"], ["need --ray"]),
                        (["--ray", "auto", "--ray-replicas", "0"], ["--ray-replicas 0"]),
                        (["--ray", "auto", "--ray-replicas", "3:1"], ["--ray-replicas 3:1", "MIN:MAX"]),
                        (["--ray", "auto", "--ray-replicas", "two"], ["--ray-replicas two", "MIN:MAX"])):
        rc = main(["server", "--bind", f"tcp://127.0.0.1:{free_port()}", "--insecure", "--checkpoint", CKPT,
                   "--out", str(tmp_path / "out"), "--quiet", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and all(w in err for w in words) and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "out").exists()  # refused before any file was made


def test_server_ray_graph_loads_and_ray_is_imported_lazily():
    import sys

    from pipeline.graph import load_graph
    spec = load_graph("server_ray", {"insecure": True, "ray": "10.0.0.5:6379"})
    assert [s.key for s in spec.stages][:2] == ["server.receive", "server.ray"]
    code = ("import sys; from pipeline.stage import available_stages; available_stages(); "
            "import pipeline.commands.server; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_ray_cluster_gone_mid_replay_stops_the_server_and_a_restart_loses_nothing(tmp_path):
    """The whole cluster killed mid-replay: the server names it and exits 1 without acknowledging what has no
    result; the edge keeps those frames and a restarted (in-process) server finishes the replay exactly once."""
    n = 40
    video = write_video(tmp_path / "clip.mp4", n, 64, 64, step=3)
    ray_cfg, local_cfg = _graphs(tmp_path)
    address, tmp = _start_cluster(second_node=False)
    port = int(address.rpartition(":")[2])
    ep, out = f"tcp://127.0.0.1:{free_port()}", tmp_path / "out"
    slog, elog = tmp_path / "server.log", tmp_path / "edge.log"
    base = ["--bind", ep, "--checkpoint", CKPT, "--out", str(out), "--insecure", "--quiet"]
    server = _spawn("server", *base, "--config", str(ray_cfg), "--ray", address, log=slog)
    edge = restarted = None
    try:
        wait_for(lambda: "ready on" in slog.read_text(), 240, "the Ray Serve app", server)
        edge = _spawn("edge", "--source", str(video), "--connect", ep, "--checkpoint", CKPT, "--rate", "8",
                      "--insecure", "--quiet", log=elog)
        wait_for(lambda: len(read_jsonl(out / "results.jsonl")) >= 6, 120, "rows", server)
        _stop_cluster(tmp, port)
        t0 = time.monotonic()
        assert server.wait(60) == 1, slog.read_text()[-3000:]
        took = time.monotonic() - t0
        log = slog.read_text()
        assert f"the Ray cluster at {address} is gone" in log and "not acknowledged" in log, log[-3000:]
        first = [r["frame"] for r in read_jsonl(out / "results.jsonl")]
        assert first == list(range(len(first))) and len(first) < n
        # the edge still holds every frame without a row; the next server (here the in-process one) takes them
        restarted = _spawn("server", *base, "--config", str(local_cfg), log=tmp_path / "server2.log")
        assert edge.wait(180) == 0, elog.read_text()[-3000:]
        wait_for(lambda: len(read_jsonl(out / "results.jsonl")) >= n, 60, "every row", restarted)
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(60) == 0
    finally:
        for p in (edge, server, restarted):
            if p is not None:
                kill(p)
        _stop_cluster(tmp, port)
    assert [r["frame"] for r in read_jsonl(out / "results.jsonl")] == list(range(n))
    print(f"\nray: cluster killed after {len(first)}/{n} rows: the server said so and exited 1 in {took:.1f} s; "
          f"a restarted server finished the replay: {n}/{n} rows, in order, none twice")

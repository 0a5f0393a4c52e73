"""Two 'hosts': server and edge in their own network namespaces joined by a veth pair (10.201.0.1/24 and
10.201.0.2/24), the edge's side shaped with tc tbf to a slow link. Replay over CurveZMQ stays exact.
Skipped where namespaces cannot be made (not root, no iproute2)."""
import os
import shutil
import subprocess

import pytest

from tests.transport_helpers import (ROOT, cmd, edge_checkpoint, env, kill, make_keys, read_jsonl,
                                     record_server_config, write_video)

pytest.importorskip("codec.api")


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("network namespaces need root and iproute2")
    tag = f"{os.getpid() % 100000}"
    srv, edg = f"ladon-srv-{tag}", f"ladon-edg-{tag}"
    try:
        _ip("netns", "add", srv)
        _ip("netns", "add", edg)
        _ip("link", "add", f"vs{tag}", "type", "veth", "peer", "name", f"ve{tag}")
        _ip("link", "set", f"vs{tag}", "netns", srv)
        _ip("link", "set", f"ve{tag}", "netns", edg)
        for ns, dev, addr in ((srv, f"vs{tag}", "10.201.0.1/24"), (edg, f"ve{tag}", "10.201.0.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # the uplink from the edge: 2 Mbit/s token bucket
        subprocess.run(["ip", "netns", "exec", edg, "tc", "qdisc", "add", "dev", f"ve{tag}", "root", "tbf",
                        "rate", "2mbit", "burst", "16kb", "latency", "200ms"], check=True, capture_output=True,
                       timeout=20)
    except (subprocess.CalledProcessError, OSError) as exc:
        for ns in (srv, edg):
            _ip("netns", "del", ns, check=False)
        pytest.skip(f"cannot make network namespaces here: {getattr(exc, 'stderr', exc)}")
    try:
        yield srv, edg
    finally:
        for ns in (srv, edg):
            _ip("netns", "del", ns, check=False)  # also removes the veth pair


def test_replay_between_two_namespaces_over_a_shaped_curve_link(tmp_path, two_hosts):
    srv, edg = two_hosts
    n = 60
    ckpt = edge_checkpoint()
    video = write_video(tmp_path / "clip.mp4", n)
    keys = make_keys(tmp_path / "keys")
    cfg = record_server_config(tmp_path / "server.yaml")
    out = tmp_path / "out"
    server = subprocess.Popen(["ip", "netns", "exec", srv, *cmd(
        "server", "--config", str(cfg), "--bind", "tcp://10.201.0.1:5555", "--checkpoint", str(ckpt),
        "--out", str(out), "--exit-on-eos", "--quiet", "--key", str(keys / "server.key_secret"),
        "--allowed-keys", str(keys / "allowed"))], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    edge = subprocess.Popen(["ip", "netns", "exec", edg, *cmd(
        "edge", "--source", str(video), "--connect", "tcp://10.201.0.1:5555", "--checkpoint", str(ckpt),
        "--rate", "max", "--quiet", "--key", str(keys / "edge.key_secret"), "--server-key",
        str(keys / "server.key"))], cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        e_out, _ = edge.communicate(timeout=120)
        s_out, _ = server.communicate(timeout=60)
    finally:
        kill(edge)
        kill(server)
    assert edge.returncode == 0, e_out[-2000:]
    assert server.returncode == 0, s_out[-2000:]
    rows = read_jsonl(out / "results.jsonl")
    assert [r["frame"] for r in rows] == list(range(n))
    assert "opened by peer 10.201.0.2" in s_out  # the sender, as the server saw it

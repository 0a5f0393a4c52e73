"""End-to-end latency: a model (device time + bytes*8/bandwidth + server time) and a check of its transfer term
against real links shaped with ``tc tbf`` between two network namespaces (a veth pair), carrying the real wire
messages over ZeroMQ PUSH/PULL."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parent.parent
BURST_BYTES = 4000  # tbf burst 32 kbit: an idle bucket lets this much through at line rate


def latency_model(scenarios: dict[str, dict], bandwidths_mbps: list[float]) -> dict:
    """scenarios: name -> {device_s, bytes, server_s}; returns name -> list of (total seconds) per bandwidth."""
    out = {}
    for name, s in scenarios.items():
        out[name] = [float(s["device_s"] + s["bytes"] * 8 / (bw * 1e6) + s["server_s"]) for bw in bandwidths_mbps]
    return out


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class ShapedLink:
    """Two namespaces joined by a veth pair; the sender's side shaped with tbf. Always cleaned up on exit."""

    def __init__(self, tag: str):
        self.tx, self.rx = f"bench_tx_{tag}", f"bench_rx_{tag}"
        self.vtx, self.vrx = f"bvt{tag}"[:15], f"bvr{tag}"[:15]
        self.tx_addr, self.rx_addr = "10.200.0.1", "10.200.0.2"

    def __enter__(self):
        try:
            _ip("netns", "add", self.tx)
            _ip("netns", "add", self.rx)
            _ip("link", "add", self.vtx, "type", "veth", "peer", "name", self.vrx)
            _ip("link", "set", self.vtx, "netns", self.tx)
            _ip("link", "set", self.vrx, "netns", self.rx)
            _ip("-n", self.tx, "addr", "add", f"{self.tx_addr}/24", "dev", self.vtx)
            _ip("-n", self.rx, "addr", "add", f"{self.rx_addr}/24", "dev", self.vrx)
            for ns, dev in ((self.tx, self.vtx), (self.rx, self.vrx)):
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def shape(self, mbps: float) -> None:
        _ip("netns", "exec", self.tx, "tc", "qdisc", "del", "dev", self.vtx, "root", check=False)
        _ip("netns", "exec", self.tx, "tc", "qdisc", "add", "dev", self.vtx, "root", "tbf", "rate",
            f"{mbps}mbit", "burst", "32kbit", "latency", "50ms")

    def __exit__(self, *exc):
        for ns in (self.tx, self.rx):  # deleting a namespace deletes its end of the veth pair (and the peer)
            _ip("netns", "del", ns, check=False)
        return False


def _transfer(link: ShapedLink | None, payloads: list[bytes], mbps: float, port: int,
              back_to_back: bool = False) -> list[dict]:
    """Send the payloads (each as one real wire message) and return what the receiver recorded per message."""
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        for p in payloads:
            f.write(len(p).to_bytes(4, "little") + p)
        blob = f.name
    host = link.rx_addr if link else "127.0.0.1"
    py = [sys.executable, "-m", "benchmarks.probe"]
    pre_rx = ["ip", "netns", "exec", link.rx] if link else []
    pre_tx = ["ip", "netns", "exec", link.tx] if link else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    gap = 0.0 if back_to_back else max(0.05, 2.5 * max(len(p) for p in payloads) * 8 / (mbps * 1e6) + 0.06)
    try:
        rx = subprocess.Popen([*pre_rx, *py, "recv", f"tcp://{host}:{port}", "--count", str(len(payloads)),
                               "--timeout", str(30 + gap * len(payloads))], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            rx.stdout.readline()  # {"ready": true}
            subprocess.run([*pre_tx, *py, "send", f"tcp://{host}:{port}", blob, "--gap", f"{gap:.4f}"], cwd=ROOT,
                           env=env, check=True, capture_output=True, timeout=120 + gap * len(payloads))
            out, err = rx.communicate(timeout=60 + gap * len(payloads))
        finally:
            if rx.poll() is None:
                rx.kill()
                rx.wait()
    finally:
        os.unlink(blob)
    msgs = json.loads(out.strip().splitlines()[-1])["messages"]
    if len(msgs) != len(payloads):
        raise RuntimeError(f"received {len(msgs)} of {len(payloads)} messages: {err.strip()[-300:]}")
    return msgs


def measure_links(payload_sets: dict[str, list[bytes]], bandwidths: list[float], use_netns: bool) -> dict:
    """Measured transfer time (median over messages) per payload set and bandwidth, against bytes*8/bandwidth."""
    from transport.wire import HEADER_SIZE

    result = {"mode": None, "rows": []}
    try:
        link = ShapedLink(str(os.getpid())).__enter__() if use_netns else None
        result["mode"] = "netns+veth+tbf" if link else "loopback (unshaped)"
    except (subprocess.CalledProcessError, FileNotFoundError, OSError) as exc:
        msg = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        log.warning("network namespaces unavailable (%s); falling back to loopback, unshaped", msg)
        link, result["mode"] = None, f"loopback (unshaped): namespaces failed: {msg}"
    try:
        port = 46000 + os.getpid() % 1000
        for bw in bandwidths if link else bandwidths[:1]:
            if link:
                link.shape(bw)
            for name, payloads in payload_sets.items():
                port += 1
                try:
                    msgs = _transfer(link, payloads, bw, port)
                except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
                    log.warning("link check %s at %s Mbit/s failed: %s", name, bw, exc)
                    result["rows"].append({"payload": name, "mbps": bw if link else None, "error": str(exc)})
                    continue
                lat = [m["latency_s"] for m in msgs]
                port += 1
                try:  # back to back: queueing beyond tbf's 50 ms limit drops packets; TCP must recover
                    arr = sorted(m["arrival_ns"] for m in _transfer(link, payloads, bw, port, back_to_back=True))
                    per_msg = (arr[-1] - arr[0]) / 1e9 / max(len(arr) - 1, 1)
                except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
                    log.warning("back-to-back link check %s at %s Mbit/s failed: %s", name, bw, exc)
                    per_msg = None
                wire = float(np.mean([len(p) + HEADER_SIZE for p in payloads]))
                model = wire * 8 / (bw * 1e6)
                result["rows"].append({"payload": name, "mbps": bw if link else None, "wire_bytes_mean": wire,
                                       "measured_s_median": float(np.median(lat)),
                                       "measured_s_p90": float(np.percentile(lat, 90)),
                                       "model_s": model if link else None,
                                       "model_with_burst_s": (max(0.0, wire - BURST_BYTES) * 8 / (bw * 1e6)
                                                              if link else None),
                                       "back_to_back_s_per_message": per_msg,
                                       "messages": len(lat)})
                log.info("link %s: %s", result["mode"], result["rows"][-1])
    finally:
        if link:
            link.__exit__(None, None, None)
    return result

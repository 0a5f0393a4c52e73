"""`sink.opcua` in a real running graph, read by asyncua's own client over opc.tcp on loopback.

conveyor truth -> track.items -> count.items -> events.items -> sink.opcua + sink.jsonl: the tags change while the
line runs (read twice and through a subscription), equal the counts the JSONL holds at both points, the line goes
idle on an empty belt, the tags are read-only, and the server is gone after the graph closes. A second graph
sends real frames over ZeroMQ (random model, ipc link) so the health tags see a connected edge.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import timezone
from pathlib import Path

import numpy as np
import pytest

from conveyor.classes import ITEM_NAMES
from conveyor.line import LineConfig
from core.errors import UsageError
from pipeline.graph import GraphRunner, parse_graph
from pipeline.stage import FrameMeta, FrameResult, Source, create_stage, register_stage
from stages.factory import opcua_sink  # noqa: F401  (registers sink.opcua)
from stages.factory.truth import IdentifiedLine, detections_from_truth

pytest.importorskip("asyncua")

URI = "urn:ladon-stream:test"
HALF, N, TAIL = 80, 160, 30  # frames before the first gate, truth frames in all, empty frames at the end


@register_stage
class GatedTruthFrames(Source):
    """Test source: detections from a conveyor line's truth; pauses at HALF until `half` is set, then an empty belt
    for TAIL frames (the line goes idle), then waits for `done`."""
    key = "test.opcua_truth_frames"
    half = threading.Event()
    done = threading.Event()

    def frames(self):
        rng = np.random.default_rng(0)
        for tf in IdentifiedLine(LineConfig(size=128, seed=3, belt_speed=1.0)).frames(N):
            if tf.frame.index == HALF:
                while not self.half.wait(0.05) and not self.ctx.stop.is_set():
                    pass
            yield self._frame(tf.frame.index, detections_from_truth(tf, rng, drop=0.05))
        empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                 "classes": np.zeros(0, np.int64)}
        for i in range(N, N + TAIL):
            yield self._frame(i, empty)
        while not self.done.wait(0.05) and not self.ctx.stop.is_set():
            pass

    @staticmethod
    def _frame(index: int, det: dict) -> FrameResult:
        now = time.time_ns()
        meta = FrameMeta(0, index, now - 40_000_000, timings={"decode": 12.0}, sent_ns=now - 30_000_000,
                         received_ns=now - 20_000_000)
        return FrameResult(meta, now, 900, (24, 32, 32), (128, 128), {"detection": det}, {})


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_until(cond, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Changes:
    """asyncua subscription handler: every value each subscribed tag took, in order."""

    def __init__(self):
        self.values: dict[str, list] = {}
        self.lock = threading.Lock()

    def datachange_notification(self, node, val, data):
        with self.lock:
            self.values.setdefault(node.nodeid.Identifier, []).append(val)


def expected(rs: list[dict]) -> dict:
    """What the tags must say after the JSONL rows ``rs``: counts, last item, line state."""
    counted = [c for r in rs for c in r["counts"]["counted"]]
    line_events = [e["type"] for r in rs for e in r["events"] if e["type"] in ("line.idle", "line.running")]
    last = rs[-1]
    return {"total": last["counts"]["total"], "by_class": last["counts"]["by_class"],
            "last": counted[-1] if counted else None,
            "state": "idle" if line_events and line_events[-1] == "line.idle" else "running",
            "done_ns": last["timestamps"]["done_ns"]}


def check_tags(tag, exp: dict, frames: int) -> None:
    assert tag("Health.Frames") == frames
    assert tag("Total") == exp["total"] == tag("Streams.Stream0.Total")
    for name in ITEM_NAMES:  # every class the line knows has a tag, 0 included
        assert tag(f"Counts.{name}") == exp["by_class"].get(name, 0), name
        assert tag(f"Streams.Stream0.Counts.{name}") == exp["by_class"].get(name, 0), name
    assert tag("State") == exp["state"] and tag("Running") == (exp["state"] == "running")
    last = exp["last"]
    assert last is not None
    assert (tag("LastItem.TrackId"), tag("LastItem.Class"), tag("LastItem.ClassId"), tag("LastItem.Frame")) == \
           (last["id"], last["name"], last["class"], last["frame"])
    assert tag("LastItem.Stream") == 0 and abs(tag("LastItem.Score") - last["score"]) < 1e-9
    t = tag("Health.LastFrameTime").replace(tzinfo=timezone.utc).timestamp()
    assert abs(t - exp["done_ns"] / 1e9) < 0.001  # the last JSONL row's done time (OPC UA: 100 ns ticks)
    assert tag("Health.Receiving") is True and tag("Health.Counting") is True
    assert tag("Health.ConnectedEdges") == -1  # no server.receive in this process: unknown, not 0
    assert tag("Streams.Stream0.Health.LastFrameIndex") == frames - 1


def test_opcua_tags_follow_the_line_and_match_the_jsonl(tmp_path):
    from asyncua import ua
    from asyncua.sync import Client

    out = tmp_path / "r.jsonl"
    spec = parse_graph({"name": "factory_opcua_test", "stages": [
        {"name": "src", "key": "test.opcua_truth_frames"},
        {"name": "track", "key": "track.items", "inputs": ["src"], "params": {"names": ITEM_NAMES, "clock": "frames"}},
        {"name": "count", "key": "count.items", "inputs": ["track"]},
        {"name": "events", "key": "events.items", "inputs": ["count"],
         "params": {"line": "L1", "rules": [{"when": "item"}, {"when": "idle", "after_s": 1.0}]}},
        {"name": "opcua", "key": "sink.opcua", "inputs": ["events"],
         "params": {"endpoint": "opc.tcp://127.0.0.1:0/ladon/", "namespace": URI, "line": "L1", "update_ms": 50,
                    "classes": ITEM_NAMES}},
        {"name": "jsonl", "key": "sink.jsonl", "inputs": ["events"], "params": {"path": str(out)}},
    ]})
    GatedTruthFrames.half.clear()
    GatedTruthFrames.done.clear()
    runner = GraphRunner(spec, log=lambda m: None)
    runner.open()
    runner.start()
    url = runner.nodes["opcua"].stage.url
    assert ":0/" not in url
    client = Client(url, timeout=10)
    try:
        client.connect()
        ns = client.get_namespace_index(URI)
        node = {}

        def tag(path: str):
            if path not in node:
                node[path] = client.get_node(f"ns={ns};s=L1.{path}")
            return node[path].read_value()

        # browse names give the same nodes as the documented string NodeIds
        total = client.nodes.objects.get_child([f"{ns}:Ladon", f"{ns}:L1", f"{ns}:Total"])
        assert total.nodeid == ua.NodeId("L1.Total", ns)
        assert {n.read_browse_name().Name for n in client.get_node(f"ns={ns};s=L1.Counts").get_children()} == \
               set(ITEM_NAMES)
        changes = Changes()
        sub = client.create_subscription(20, changes)
        sub.subscribe_data_change([total, client.get_node(f"ns={ns};s=L1.Health.Frames")])

        # first half: the tags equal the JSONL's counts at that point
        wait_until(lambda: len(rows(out)) == HALF and tag("Health.Frames") == HALF, what="the first half")
        time.sleep(0.2)  # one more sync period: every tag of that frame is written
        first = expected(rows(out))
        assert first["total"] > 3, first
        check_tags(tag, first, HALF)

        # second half, then an empty belt: more items, and the line goes idle
        GatedTruthFrames.half.set()
        wait_until(lambda: len(rows(out)) == N + TAIL and tag("Health.Frames") == N + TAIL, what="the end")
        time.sleep(0.2)
        end = expected(rows(out))
        assert end["total"] > first["total"] and end["state"] == "idle"
        check_tags(tag, end, N + TAIL)
        assert tag("ItemsPerMinute") == tag("Streams.Stream0.ItemsPerMinute") > 0

        # the subscription saw the values change: non-decreasing counts through the first-half and final totals
        wait_until(lambda: changes.values.get("L1.Total", [None])[-1] == end["total"], 5, "the last notification")
        seen = changes.values["L1.Total"]
        assert seen == sorted(seen) and first["total"] in seen and len(set(seen)) >= 3, seen
        frames_seen = changes.values["L1.Health.Frames"]
        assert frames_seen == sorted(frames_seen) and frames_seen[-1] == N + TAIL

        with pytest.raises(ua.UaStatusCodeError):  # read-only for clients
            total.write_value(ua.Variant(0, ua.VariantType.UInt32))
        sub.delete()
    finally:
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001
            pass
        GatedTruthFrames.half.set()
        GatedTruthFrames.done.set()
        assert runner.wait() == 0
    gone = Client(url, timeout=2)
    try:
        with pytest.raises((OSError, TimeoutError, ua.UaError)):  # the server stopped with the graph
            gone.connect()
    finally:
        try:
            gone.disconnect()  # stops the sync client's own event-loop thread
        except Exception:  # noqa: BLE001
            pass


def test_opcua_health_sees_the_connected_edge(tmp_path):
    """Real frames over ZeroMQ into server.receive: ConnectedEdges and the stream's EdgeConnected say 1 / true."""
    pytest.importorskip("codec.api")
    from asyncua.sync import Client

    ep = f"ipc://{tmp_path / 'link'}"
    spec = parse_graph({"name": "factory_opcua_edge_test", "stages": [
        {"name": "source", "key": "source.conveyor", "params": {"size": 64, "fps": 15, "seed": 1, "max_frames": 45}},
        {"name": "edge", "key": "edge.encode", "inputs": ["source"], "params": {"checkpoint": "random:64"}},
        {"name": "uplink", "key": "edge.send", "inputs": ["edge"], "params": {"endpoint": ep}},
        {"name": "receive", "key": "server.receive", "params": {"endpoint": ep, "checkpoint": "random:64"}},
        {"name": "record", "key": "server.record", "inputs": ["receive"]},
        {"name": "opcua", "key": "sink.opcua", "inputs": ["record"],
         "params": {"endpoint": "opc.tcp://127.0.0.1:0/ladon/", "line": "L2", "update_ms": 50}},
    ]})
    runner = GraphRunner(spec, log=lambda m: None)
    runner.open()
    runner.start()
    client = Client(runner.nodes["opcua"].stage.url, timeout=10)
    try:
        client.connect()
        ns = client.get_namespace_index("urn:ladon-stream:factory")

        def tag(path: str):
            return client.get_node(f"ns={ns};s=L2.{path}").read_value()

        wait_until(lambda: tag("Health.Frames") >= 5 and tag("Health.ConnectedEdges") == 1, 30, "a connected edge")
        assert tag("Streams.Stream0.Health.EdgeConnected") is True
        assert tag("Health.Counting") is False and tag("Total") == 0  # no count.items in this graph
        assert tag("State") == "running"
    finally:
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001
            pass
        runner.stop.set()
        assert runner.wait() == 0


@pytest.mark.parametrize("params,words", [
    ({"endpoint": "http://127.0.0.1:4840/"}, ["endpoint", "'http://127.0.0.1:4840/'", "opc.tcp://"]),
    ({"endpoint": "opc.tcp://host/no-port"}, ["endpoint", "opc.tcp://HOST:PORT/PATH"]),
    ({"namespace": ""}, ["namespace", "''", "URI"]),
    ({"update_ms": 0}, ["update_ms", "0"]),
    ({"certificate": "server.der"}, ["certificate and private_key go together"]),
    ({"certificate": "/nope.der", "private_key": "/nope.pem"}, ["certificate", "'/nope.der'", "not a file"]),
    ({"classes": "tshirt"}, ["classes", "'tshirt'", "list"]),
    ({"application_uri": "a b"}, ["application_uri", "'a b'", "subjectAltName"]),
])
def test_bad_opcua_options(params, words):
    with pytest.raises(UsageError) as e:
        create_stage("sink.opcua", **params)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_port_in_use_is_a_clear_error():
    import socket

    from pipeline.stage import StageContext, StageStats
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        stage = create_stage("sink.opcua", endpoint=f"opc.tcp://127.0.0.1:{port}/ladon/")
        with pytest.raises(UsageError) as e:
            stage.open(StageContext("opcua", "t", threading.Event(), StageStats(), {}, lambda m: None))
    assert f"127.0.0.1:{port}" in str(e.value) and "port 0" in str(e.value)


def test_encrypted_endpoint_with_a_certificate(tmp_path):
    """certificate + private_key: a client with Basic256Sha256 SignAndEncrypt reads the tags, a plain one is refused."""
    import asyncio

    from asyncua import ua
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from asyncua.sync import Client
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from pipeline.stage import StageContext, StageStats

    server_uri, client_uri = "urn:ladon-stream:factory:server", "urn:ladon-stream:test-client"
    for name, uri, use in (("server", server_uri, ExtendedKeyUsageOID.SERVER_AUTH),
                           ("client", client_uri, ExtendedKeyUsageOID.CLIENT_AUTH)):
        asyncio.run(setup_self_signed_certificate(tmp_path / f"{name}.pem", tmp_path / f"{name}.der", uri,
                                                  "localhost", [use], {"commonName": f"ladon test {name}"}))
    stage = create_stage("sink.opcua", endpoint="opc.tcp://127.0.0.1:0/ladon/", line="L3", update_ms=20,
                         certificate=str(tmp_path / "server.der"), private_key=str(tmp_path / "server.pem"))
    stage.open(StageContext("opcua", "t", threading.Event(), StageStats(), {}, lambda m: None))
    try:
        now = time.time_ns()
        counts = {"total": 3, "by_class": {"bag": 3}, "items_per_min": 6.0,
                  "counted": [{"id": 7, "class": 8, "name": "bag", "score": 0.9, "frame": 4, "crossing_frame": 4}]}
        stage.process(FrameResult(FrameMeta(0, 4, now, sent_ns=now, received_ns=now), now, 100, (24, 32, 32),
                                  (128, 128), {"counts": counts}, {}))
        stage.ua.flush()

        secure = Client(stage.url, timeout=10)
        secure.application_uri = client_uri
        secure.set_security_string(f"Basic256Sha256,SignAndEncrypt,{tmp_path / 'client.der'},"
                                   f"{tmp_path / 'client.pem'}")
        secure.connect()
        try:
            ns = secure.get_namespace_index("urn:ladon-stream:factory")
            assert secure.get_node(f"ns={ns};s=L3.Total").read_value() == 3
            assert secure.get_node(f"ns={ns};s=L3.LastItem.TrackId").read_value() == 7
            policies = {e.SecurityPolicyUri.rsplit("#", 1)[-1] for e in secure.get_endpoints()}
            assert policies == {"Basic256Sha256"}  # no unencrypted endpoint offered
        finally:
            secure.disconnect()

        plain = Client(stage.url, timeout=5)
        try:
            with pytest.raises((ua.UaError, OSError, TimeoutError)):
                plain.connect()
        finally:
            try:
                plain.disconnect()
            except Exception:  # noqa: BLE001
                pass
    finally:
        stage.close()


def test_unreadable_certificate_is_a_clear_error(tmp_path):
    from pipeline.stage import StageContext, StageStats
    (tmp_path / "bad.der").write_bytes(b"not a certificate")
    (tmp_path / "bad.pem").write_bytes(b"not a key")
    stage = create_stage("sink.opcua", endpoint="opc.tcp://127.0.0.1:0/ladon/", certificate=str(tmp_path / "bad.der"),
                         private_key=str(tmp_path / "bad.pem"))
    with pytest.raises(UsageError) as e:
        stage.open(StageContext("opcua", "t", threading.Event(), StageStats(), {}, lambda m: None))
    assert "certificate" in str(e.value) and "bad.der" in str(e.value) and "PEM or DER" in str(e.value)

"""`sink.mqtt` against a real Mosquitto broker on a free loopback port: every event of a replayed sequence arrives
(exactly once after de-duplication by event id), with the broker down at the start and restarted mid-sequence;
a bounded buffer with counted drops while no broker is there; clear errors for bad options."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conveyor.classes import ITEM_NAMES
from conveyor.line import LineConfig
from core.errors import UsageError
from pipeline.commands._factory import mosquitto_user_line
from pipeline.stage import FrameMeta, FrameResult, StageContext, StageStats, create_stage
from stages.factory.truth import IdentifiedLine, detections_from_truth

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None)
needs_broker = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto not installed (apt-get install mosquitto; "
                                                            "scripts/bootstrap.sh does it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A Mosquitto process on 127.0.0.1:PORT with persistence (sessions and queued QoS 1 messages survive)."""

    def __init__(self, root: Path, port: int):
        self.port, self.root = port, root
        (root / "db").mkdir(parents=True, exist_ok=True)
        self.conf = root / "mosquitto.conf"
        # `user`: started as root, mosquitto drops to user "mosquitto", which cannot write into pytest's private
        # tmp folder: persistence would silently save nothing, sessions would not survive a restart, and which
        # client reconnects first would decide whether events arrive. Staying the current user keeps it working.
        self.conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {root / 'db'}/\nlog_dest file {root / 'broker.log'}\n"
                             f"{mosquitto_user_line()}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                assert self.proc.poll() is None, (self.root / "broker.log").read_text()
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence database
            self.proc.wait(10)
            log = self.root / "broker.log"
            assert (self.root / "db" / "mosquitto.db").is_file(), \
                "mosquitto saved no persistence database: " + (log.read_text()[-500:] if log.is_file() else "no log")
        self.proc = None


class Subscriber:
    """A paho subscriber with a persistent session (QoS 1), so messages queued while it is away still arrive."""

    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="factory-test-sub", clean_session=False)
        c.reconnect_delay_set(0.1, 0.5)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
        c.on_message = self._on_message
        self.subscribed = threading.Event()
        c.on_subscribe = lambda cl, u, mid, rcs, p: self.subscribed.set()
        c.connect_async("127.0.0.1", port, 30)
        c.loop_start()
        self.client = c

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def wait_for(self, pred, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if pred(list(self.messages)):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def replayed_frames(n: int = 120) -> list[FrameResult]:
    """A replayed line through the real track -> count -> events stages: FrameResults carrying events."""
    ctx = lambda name: StageContext(name, "t", threading.Event(), StageStats(), {}, print, ["x"])  # noqa: E731
    stages = [create_stage("track.items", names=ITEM_NAMES, clock="frames", fps=15), create_stage("count.items"),
              create_stage("events.items", line="L1", rules=[{"when": "item", "update_every": 10},
                                                             {"when": "idle", "after_s": 1}])]
    for s, name in zip(stages, ("track", "count", "events")):
        s.open(ctx(name))
    rng = np.random.default_rng(0)
    out = []
    for tf in IdentifiedLine(LineConfig(size=128, seed=3, belt_speed=1.0)).frames(n):
        fr = FrameResult(FrameMeta(0, tf.frame.index), 0, 800, (24, 32, 32), (128, 128),
                         {"detection": detections_from_truth(tf, rng)}, {})
        for s in stages:
            fr = s.process(fr)
        out.append(fr)
    return out


def open_sink(port: int, logs: list[str], **kw):
    sink = create_stage("sink.mqtt", port=port, prefix="test", line="L1", reconnect_min_s=0.1, reconnect_max_s=0.5,
                        **kw)
    sink.open(StageContext("mqtt", "t", threading.Event(), StageStats(), {}, logs.append, ["events"]))
    return sink


@needs_broker
def test_every_event_arrives_once_across_broker_down_at_start_and_restart(tmp_path):
    frames = replayed_frames()
    sent = [ev for fr in frames for ev in fr.results["events"]]
    assert len(sent) > 30 and len({e["id"] for e in sent}) == len(sent)
    assert {"item.new", "item.update", "item.end"} <= {e["type"] for e in sent}
    port = free_port()
    broker = Broker(tmp_path, port)
    broker.start()  # create the subscriber's persistent session, then take the broker away
    sub = Subscriber(port, "test/#")
    assert sub.subscribed.wait(10)
    broker.stop()
    logs: list[str] = []
    sink = open_sink(port, logs)
    try:
        third = len(frames) // 3
        for fr in frames[:third]:  # broker down at start: buffered, process() never blocks
            t0 = time.perf_counter()
            sink.process(fr)
            assert time.perf_counter() - t0 < 0.05
        # paho's network thread finds the broker down on its own schedule (slow on a loaded machine): wait for it
        deadline = time.monotonic() + 15
        while not any("unreachable" in line and "buffer" in line for line in logs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("unreachable" in line and "buffer" in line for line in logs), logs
        broker.start()
        for fr in frames[third:2 * third]:
            sink.process(fr)
        ids_before = {e["id"] for fr in frames[:2 * third] for e in fr.results["events"]}
        assert sub.wait_for(lambda m: ids_before <= {json.loads(p)["id"] for t, p, r in m if t.endswith("/events")})
        broker.stop()  # gone mid-run
        for fr in frames[2 * third:]:
            sink.process(fr)
        time.sleep(0.3)
        broker.start()
        want = {e["id"] for e in sent}
        assert sub.wait_for(lambda m: want <= {json.loads(p)["id"] for t, p, r in m if t.endswith("/events")}), \
            "not every event arrived after the broker restart"
    finally:
        sink.close()
    got = [json.loads(p) for t, p, r in sub.messages if t == "test/L1/0/events"]
    unique = {}
    for e in got:
        unique.setdefault(e["id"], e)
    assert set(unique) == {e["id"] for e in sent}  # every event, exactly once after de-duplication
    assert all(unique[e["id"]] == e for e in sent)  # and intact
    assert sink.dropped == 0
    assert any("dropped the connection" in line for line in logs) and any("connected to" in line for line in logs)
    # retained topics: the final counts and status are there for a subscriber that comes later
    late: dict[str, dict] = {}
    import paho.mqtt.client as mqtt
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="factory-test-late")
    c.on_message = lambda cl, u, msg: late.__setitem__(msg.topic, json.loads(msg.payload))
    c.connect("127.0.0.1", port)
    c.subscribe("test/L1/#", qos=1)
    c.loop_start()
    deadline = time.monotonic() + 5
    while len(late) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    sub.close()
    broker.stop()
    assert late["test/L1/0/counts"]["total"] == frames[-1].results["counts"]["total"] > 0
    assert late["test/L1/0/status"]["state"] == "stopped"
    assert late["test/L1/status"] == {"state": "offline", "reason": "closed"}


@needs_broker
def test_last_will_marks_a_vanished_sink_offline(tmp_path):
    port = free_port()
    broker = Broker(tmp_path, port)
    broker.start()
    logs: list[str] = []
    sink = open_sink(port, logs, keepalive=5)
    sub = Subscriber(port, "test/L1/status")
    try:
        assert sub.subscribed.wait(10)
        assert sub.wait_for(lambda m: any(json.loads(p).get("state") == "online" for _, p, _ in m), 10)
        sink.client._sock_close()  # the process "dies": its TCP link breaks without a DISCONNECT
        sink.client.loop_stop()
        assert sub.wait_for(lambda m: any(json.loads(p) == {"state": "offline", "reason": "connection lost"}
                                          for _, p, _ in m), 10)
    finally:
        sink.closing = True
        sub.close()
        broker.stop()


def test_bounded_buffer_drops_oldest_and_counts_while_no_broker():
    logs: list[str] = []
    sink = open_sink(free_port(), logs, buffer=5, drain_s=0.2)  # nothing listens on that port
    try:
        for i in range(20):
            ev = {"id": f"x:{i}", "type": "item.new"}
            sink.process(FrameResult(FrameMeta(0, i), 0, 1, (1, 1, 1), (8, 8), {"events": [ev]}, {}))
        assert sink.dropped == 15 and sink.ctx.stats.dropped == 15
        assert [json.loads(p)["id"] for _, p in sink.events] == [f"x:{i}" for i in range(15, 20)]
        assert any("buffer full (5)" in line for line in logs)
    finally:
        sink.close()
    assert any("not delivered" in line for line in logs)


def test_bad_options_name_the_value_and_the_fix(tmp_path, monkeypatch):
    for params, words in [({"port": 0}, ["port", "1-65535"]), ({"qos": 3}, ["qos", "0, 1 or 2"]),
                          ({"prefix": "a/#"}, ["prefix", "'a/#'"]),
                          ({"tls": {"ca_certs": str(tmp_path / "nope.pem")}}, ["tls.ca_certs", "not a file"]),
                          ({"tls": {"cafile": "x"}}, ["unknown key", "ca_certs"]),
                          ({"password": "pw"}, ["needs a username"]),
                          ({"username": "u", "password_env": "LADON_NO_SUCH_VAR"}, ["LADON_NO_SUCH_VAR", "export"]),
                          ({"reconnect_min_s": 5, "reconnect_max_s": 1}, ["reconnect_min_s", "min <= max"])]:
        with pytest.raises(UsageError) as e:
            create_stage("sink.mqtt", **params)
        assert all(w in str(e.value) for w in words), str(e.value)
    monkeypatch.setenv("LADON_TEST_PW", "secret")
    s = create_stage("sink.mqtt", username="u", password_env="LADON_TEST_PW")
    assert s.password == "secret"

"""The factory options of `run` and `server`: which graph and outputs they pick, their errors, and `run --mqtt`
starting a real local mosquitto for the run (messages arrive at a subscriber) and stopping it at the end."""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline.commands import _factory
from pipeline.commands._common import load
from core.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def parse(command: str, *argv: str) -> argparse.Namespace:
    from pipeline.commands import run, server
    p = argparse.ArgumentParser()
    (run if command == "run" else server).add_arguments(p)
    return p.parse_args(list(argv))


def integration_stages(config: str, plan: _factory.FactoryPlan) -> set[str]:
    spec = load(config, plan.variables)
    plan.apply(spec)
    return {s.key for s in spec.stages if s.key in _factory.INTEGRATIONS.values()}


def test_no_factory_option_keeps_the_plain_demo():
    assert _factory.factory_plan(parse("run"), "run") is None
    assert _factory.factory_plan(parse("server"), "server") is None


def test_each_option_picks_the_factory_graph_with_only_its_output():
    plan = _factory.factory_plan(parse("server", "--view-port", "0.0.0.0:8099"), "server")
    assert plan.config == "factory" and plan.keep == {"view"}
    assert plan.variables == {"view_host": "0.0.0.0", "view_port": 8099}
    assert integration_stages("factory", plan) == {"sink.view"}

    plan = _factory.factory_plan(parse("server", "--opcua", "--metrics-port", "9200", "--mqtt", "broker.plant:1884"),
                                 "server")
    assert plan.keep == {"opcua", "metrics", "mqtt"} and not plan.local_broker
    assert plan.variables == {"opcua_endpoint": "opc.tcp://0.0.0.0:4840/ladon/", "metrics_host": "127.0.0.1",
                              "metrics_port": 9200, "mqtt_host": "broker.plant", "mqtt_port": 1884}
    assert integration_stages("factory", plan) == {"sink.opcua", "sink.metrics", "sink.mqtt"}

    plan = _factory.factory_plan(parse("server", "--factory"), "server")  # every output, at its default
    assert integration_stages("factory", plan) == set(_factory.INTEGRATIONS.values())
    assert plan.variables == {"opcua_endpoint": "opc.tcp://0.0.0.0:4840/ladon/"}

    plan = _factory.factory_plan(parse("run", "--opcua"), "run")  # the one-machine demo stays on loopback
    assert plan.config == "factory_demo" and plan.variables == {"opcua_endpoint": "opc.tcp://127.0.0.1:4840/ladon/"}
    assert integration_stages("factory_demo", plan) == {"sink.opcua"}


@pytest.mark.skipif(_factory.mosquitto_binary() is None, reason="mosquitto not installed")
def test_run_mqtt_without_a_host_asks_for_a_local_broker():
    plan = _factory.factory_plan(parse("run", "--mqtt"), "run")
    assert plan.local_broker and plan.keep == {"mqtt"} and plan.variables == {}
    assert not _factory.factory_plan(parse("server", "--mqtt"), "server").local_broker  # a server uses 1883


def test_with_config_the_options_fill_its_variables():
    plan = _factory.factory_plan(parse("run", "--config", "factory_demo", "--view-port", "8090"), "run")
    assert plan.config is None and plan.variables == {"view_host": "127.0.0.1", "view_port": 8090}
    assert integration_stages("factory_demo", plan) == set(_factory.INTEGRATIONS.values())  # the YAML's choice


@pytest.mark.parametrize("command,argv,words", [
    ("run", ["--factory", "--config", "demo"], ["--factory and --config", "drop"]),
    ("run", ["--config", "demo", "--view-port", "8080"], ["'demo'", "'view_host'", "--view-port", "factory_demo"]),
    ("run", ["--view-port", "8o80"], ["--view-port", "'8o80'", "[HOST:]PORT"]),
    ("server", ["--metrics-port", "99999"], ["--metrics-port", "'99999'", "0-65535"]),
    ("server", ["--mqtt", "broker:0"], ["--mqtt", "'broker:0'", "broker's port"]),
    ("server", ["--opcua", "tcp://x:4840"], ["--opcua", "'tcp://x:4840'", "opc.tcp://HOST:PORT/PATH"]),
])
def test_bad_factory_options(command, argv, words):
    with pytest.raises(UsageError) as e:
        _factory.factory_plan(parse(command, *argv), command)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_server_factory_refuses_ray_and_a_missing_detection_task():
    from pipeline.commands import server
    for argv, words in ((["--factory", "--ray", "auto"], ["--ray", "drop --ray"]),
                        (["--factory", "--tasks", "segmentation"], ["--tasks", "detection"])):
        with pytest.raises(UsageError) as e:
            server.run(parse("server", "--bind", "tcp://127.0.0.1:5599", "--insecure", *argv))
        assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.skipif(_factory.mosquitto_binary() is None, reason="mosquitto not installed")
def test_run_mqtt_starts_and_stops_a_local_mosquitto(tmp_path):
    """`run --mqtt` end to end (random model, a live conveyor source): the broker it starts gets the sink's messages
    (a subscriber sees them while the run goes), only the MQTT output runs, and the broker is gone afterwards."""
    pytest.importorskip("codec.api")
    import paho.mqtt.client as mqtt
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), "run", "--mqtt", "--source", "conveyor:1",
                             "--checkpoint", "random:64", "--max-frames", "45", "--out", str(tmp_path / "out"),
                             "--insecure", "--quiet"], stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    messages: list[tuple[str, dict]] = []
    lines: list[str] = []
    port = None
    client = None
    try:
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"local broker \(mosquitto\) on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
                client.on_connect = lambda c, u, f, rc, p: c.subscribe("ladon/#", qos=1)
                client.on_message = lambda c, u, msg: messages.append((msg.topic, json.loads(msg.payload)))
                client.connect("127.0.0.1", port, 30)
                client.loop_start()
                threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
                break
        assert proc.wait(120) == 0, "".join(lines[-30:])
    finally:
        if proc.poll() is None:
            proc.kill()
        if client is not None:
            client.loop_stop()
    assert port is not None, "".join(lines[-30:])
    topics = {t for t, _ in messages}
    assert "ladon/line1/status" in topics and "ladon/line1/0/status" in topics, topics
    assert any(t == "ladon/line1/status" and p.get("state") == "online" for t, p in messages), messages
    with pytest.raises(OSError):  # the broker stopped with the run
        socket.create_connection(("127.0.0.1", port), 1).close()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    keys = {v["key"] for v in summary["stages"].values()}
    assert summary["graph"] == "factory_demo" and {"track.items", "count.items", "sink.mqtt"} <= keys
    assert not keys & {"sink.metrics", "sink.opcua", "sink.view"}
    assert summary["stages"]["mqtt"]["mqtt_sent"] > 0 and summary["stages"]["mqtt"]["mqtt_dropped"] == 0

"""The factory-line options of `run` and `server`: ``--factory``, ``--mqtt``, ``--metrics-port``, ``--opcua``,
``--view-port``, and the throwaway Mosquitto broker of ``run --mqtt``.

Any of them switches the command to the factory graph (``run``: ``factory_demo``, ``server``: ``factory``):
tracking, counting at the station, events, JSONL, annotated video, console, plus the integrations asked for.
``--factory`` alone turns on every integration at its default; the other options turn on theirs (and set where
it listens or connects). With ``--config FILE`` the graph is yours: the options only fill its variables.
"""
from __future__ import annotations

import argparse
import getpass
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from core.errors import UsageError
from pipeline.graph import GraphSpec, graph_variables

#: integration -> the stage key the factory graphs give it
INTEGRATIONS: dict[str, str] = {"mqtt": "sink.mqtt", "metrics": "sink.metrics", "opcua": "sink.opcua",
                                "view": "sink.view"}
GRAPHS = {"run": "factory_demo", "server": "factory"}
OPCUA_DEFAULT = {"run": "opc.tcp://127.0.0.1:4840/ladon/", "server": "opc.tcp://0.0.0.0:4840/ladon/"}


def add_factory_arguments(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("factory line", "any of these switches to the factory graph "
                                             f"(configs/pipelines/{GRAPHS[command]}.yaml): item tracking, counting at "
                                             "the station, events, plus the outputs named")
    g.add_argument("--factory", action="store_true",
                   help="the factory graph with every output at its default: MQTT, Prometheus, OPC UA, live view")
    if command == "run":
        mqtt_help = ("publish events, counts and status over MQTT; without HOST a local mosquitto is started on a "
                     "free loopback port for the run and stopped at the end")
    else:
        mqtt_help = "publish events, counts and status to the MQTT broker HOST[:PORT] (default 127.0.0.1:1883)"
    g.add_argument("--mqtt", nargs="?", const="", default=None, metavar="HOST[:PORT]", help=mqtt_help)
    g.add_argument("--metrics-port", default=None, metavar="[HOST:]PORT",
                   help="Prometheus /metrics on PORT (default 127.0.0.1:9108; 0.0.0.0:PORT for a remote scraper)")
    g.add_argument("--opcua", nargs="?", const=OPCUA_DEFAULT[command], default=None, metavar="ENDPOINT",
                   help=f"OPC UA server for SCADA / PLC gateways (default {OPCUA_DEFAULT[command]})")
    g.add_argument("--view-port", default=None, metavar="[HOST:]PORT",
                   help="live view in a browser: annotated MJPEG, counts, line state, health "
                        "(default 127.0.0.1:8080; 0.0.0.0:PORT to share it)")


def host_port(value: str, default_host: str, default_port: int | None, flag: str) -> tuple[str, int]:
    """``HOST:PORT``, ``PORT``, ``HOST`` (with ``default_port``) or ``[V6]:PORT`` -> (host, port)."""
    v = value.strip()
    host, port_s = default_host, ""
    if v.startswith("["):
        h, _, rest = v[1:].partition("]")
        host, port_s = h, rest[1:] if rest.startswith(":") else rest
    elif v.isdigit():
        port_s = v
    elif v.count(":") == 1:
        host, port_s = v.split(":")
    else:
        host = v
    if not port_s and default_port is not None:
        port_s = str(default_port)
    if not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        example = f"{default_host}:{default_port or 8080}"
        raise UsageError(f"{flag} {value!r}: give [HOST:]PORT with a port 0-65535, e.g. {flag} {example}")
    return host, int(port_s)


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                              if Path(p).is_file()), None)


@dataclass
class FactoryPlan:
    """What the factory options ask for: the graph, its variables, the integrations kept, a local broker."""

    command: str
    config: str | None  # the graph to load (None: the user's --config)
    variables: dict = field(default_factory=dict)
    keep: set[str] = field(default_factory=set)
    local_broker: bool = False

    def apply(self, spec: GraphSpec) -> None:
        """Drop the integration stages not asked for (only from the built-in factory graphs)."""
        if self.config is None:
            return
        gone = {s.name for s in spec.stages if s.key in INTEGRATIONS.values()
                and s.key not in {INTEGRATIONS[k] for k in self.keep}}
        spec.stages = [s for s in spec.stages if s.name not in gone]

    @contextmanager
    def services(self) -> Iterator[None]:
        """Start what the run needs beside the graph (``run --mqtt`` without a broker: mosquitto), stop it after."""
        if not self.local_broker:
            yield
            return
        with local_mosquitto() as port:
            self.variables.update(mqtt_host="127.0.0.1", mqtt_port=port)
            yield


def factory_plan(args: argparse.Namespace, command: str) -> FactoryPlan | None:
    """The plan for ``args`` (None when no factory option is given); every bad value is a UsageError."""
    given = {name: v for name, v in (("mqtt", args.mqtt), ("metrics", args.metrics_port), ("opcua", args.opcua),
                                     ("view", args.view_port)) if v is not None}
    if not args.factory and not given:
        return None
    if args.factory and args.config:
        raise UsageError(f"--factory and --config both choose the graph; drop --factory (the factory options then "
                         f"fill {args.config!r}'s variables) or --config (the built-in {GRAPHS[command]} graph)")
    plan = FactoryPlan(command, None if args.config else GRAPHS[command])
    plan.keep = set(INTEGRATIONS) if args.factory else set(given)
    v = plan.variables
    if "mqtt" in plan.keep:
        if args.mqtt:
            v["mqtt_host"], v["mqtt_port"] = host_port(args.mqtt, "127.0.0.1", 1883, "--mqtt")
            if v["mqtt_port"] == 0:
                raise UsageError(f"--mqtt {args.mqtt!r}: give the broker's port (1883 plain, 8883 TLS)")
        elif command == "run":
            if mosquitto_binary() is not None:
                plan.local_broker = True
            elif args.mqtt is not None:
                raise UsageError("--mqtt without HOST starts a local mosquitto, but none is installed; install it "
                                 "(apt-get install mosquitto) or give a broker: --mqtt HOST[:PORT]")
            else:
                print("--factory: no mosquitto installed, so no MQTT in this run (apt-get install mosquitto, or "
                      "--mqtt HOST[:PORT] for a broker elsewhere)", file=sys.stderr)
                plan.keep.discard("mqtt")
    if args.metrics_port is not None:
        v["metrics_host"], v["metrics_port"] = host_port(args.metrics_port, "127.0.0.1", None, "--metrics-port")
    if args.opcua is not None:
        from pipeline.stage import get_stage_class  # the sink's own check, via the registry (stages sit above)
        try:
            get_stage_class("sink.opcua").check_endpoint(args.opcua)
        except UsageError as exc:
            raise UsageError(f"--opcua: {exc}") from None
        v["opcua_endpoint"] = args.opcua
    elif "opcua" in plan.keep:
        v["opcua_endpoint"] = OPCUA_DEFAULT[command]
    if args.view_port is not None:
        v["view_host"], v["view_port"] = host_port(args.view_port, "127.0.0.1", None, "--view-port")
    if args.config:  # the user's graph: every value must land in one of its variables
        known = graph_variables(args.config)
        missing = sorted(k for k in v if k not in known)
        if missing:
            raise UsageError(f"graph {args.config!r} has no variable {missing[0]!r}, which "
                             f"{_flag_of(missing[0])} sets; use a graph like configs/pipelines/{GRAPHS[command]}.yaml "
                             f"or drop {_flag_of(missing[0])}")
    return plan


def _flag_of(var: str) -> str:
    return {"mqtt": "--mqtt", "metrics": "--metrics-port", "opcua": "--opcua", "view": "--view-port"}[var.split("_")[0]]


def check_tasks_for_factory(tasks: list[str]) -> None:
    if "detection" not in tasks:
        raise UsageError(f"--tasks {','.join(tasks)!r}: the factory graph tracks and counts detections; keep "
                         f"detection in --tasks")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_user_line() -> str:
    """mosquitto's ``user`` line naming the current user: started as root, mosquitto would switch to user
    "mosquitto" and could not write into a private folder; for any other user the line changes nothing. Empty
    where the user has no name (a bare UID in a container)."""
    try:
        return f"user {getpass.getuser()}\n"
    except (KeyError, OSError):
        return ""


@contextmanager
def local_mosquitto(timeout_s: float = 10.0) -> Iterator[int]:
    """A Mosquitto broker on a free 127.0.0.1 port for the length of the block (anonymous, no persistence)."""
    exe = mosquitto_binary()
    if exe is None:
        raise UsageError("no mosquitto binary found; install it (apt-get install mosquitto) or give a broker with "
                         "--mqtt HOST[:PORT]")
    root = Path(tempfile.mkdtemp(prefix="ladon-mosquitto-"))
    port = free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"log_dest file {root / 'mosquitto.log'}\n{mosquitto_user_line()}")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (root / "mosquitto.log").read_text()[-500:] if (root / "mosquitto.log").exists() else ""
                    raise UsageError(f"the local mosquitto ({exe}) did not start on 127.0.0.1:{port}: "
                                     f"{log.strip() or 'no log'}; give a broker with --mqtt HOST[:PORT]") from None
                time.sleep(0.05)
        print(f"MQTT: local broker (mosquitto) on 127.0.0.1:{port} for this run; watch it with "
              f"mosquitto_sub -h 127.0.0.1 -p {port} -t 'ladon/#' -v", file=sys.stderr)
        yield port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(root, ignore_errors=True)

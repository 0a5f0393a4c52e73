"""MQTT sink (`sink.mqtt`): events, counts and status to a broker with paho-mqtt, never stopping the pipeline.

Topics (``PREFIX/LINE/STREAM/...``, QoS 1 = at least once; events carry unique ids for de-duplication):

* ``.../events``: one JSON message per event of ``results["events"]`` (``events.items``), in order.
* ``.../counts``: retained, on every change: ``total``, ``by_class``, ``items_per_min``, ``frame``, ``t``.
* ``.../status``: retained: ``{"state": "running" | "idle" | "stopped", "frame", "t"}`` (from the line events).
* ``PREFIX/LINE/status``: retained connection status of this sink, ``{"state": "online"}``; the broker
  publishes the **last will** ``{"state": "offline", "reason": "connection lost"}`` there if the sink vanishes.

The broker down at start or gone mid-run: one clear log line, paho reconnects with exponential back-off
(``reconnect_min_s`` doubling to ``reconnect_max_s``), events wait in a bounded buffer (``buffer`` messages; when
full the oldest is dropped and counted: ``dropped`` in the stage summary), the latest counts and status per topic
are kept apart and never dropped, and messages that were in flight when the link broke are sent again after
reconnecting. ``process`` only appends to the buffer, so nothing upstream ever waits for the broker.
Options: ``username`` with ``password`` or ``password_env`` (the name of an environment variable holding it, to
keep secrets out of the YAML), ``tls: true`` or ``tls: {ca_certs, certfile, keyfile, insecure}``.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

from core.errors import UsageError
from pipeline.stage import FrameResult, Stage, register_stage

_TOPIC_BAD = set("+#\x00")


def _word(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v or _TOPIC_BAD & set(v) or v.startswith("/") or v.endswith("/"):
        raise UsageError(f"sink.mqtt: {name} {v!r} must be a non-empty MQTT topic part without + # or a leading "
                         f"or trailing /, e.g. {name}: {'factory' if name == 'prefix' else 'line1'}")
    return v


class MqttSink(Stage):
    """Publishes events, counts and line status over MQTT (paho-mqtt), buffering through broker outages."""
    key = "sink.mqtt"
    accepts = (FrameResult,)

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, prefix: str = "ladon", line: str = "line1",
                 client_id: str | None = None, qos: int = 1, keepalive: int = 30, username: str | None = None,
                 password: str | None = None, password_env: str | None = None, tls: Any = False,
                 buffer: int = 10000, max_inflight: int = 100, reconnect_min_s: float = 0.5,
                 reconnect_max_s: float = 30.0, drain_s: float = 5.0):
        if not isinstance(host, str) or not host:
            raise UsageError(f"sink.mqtt: host {host!r} must be the broker's name or address, e.g. 127.0.0.1")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise UsageError(f"sink.mqtt: port {port!r} must be a TCP port 1-65535 (1883 plain, 8883 TLS)")
        if qos not in (0, 1, 2):
            raise UsageError(f"sink.mqtt: qos {qos!r} must be 0, 1 or 2 (1: at least once, the default)")
        for name, v, lo in (("buffer", buffer, 1), ("max_inflight", max_inflight, 1), ("keepalive", keepalive, 5)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UsageError(f"sink.mqtt: {name} {v!r} must be a whole number >= {lo}")
        if not (isinstance(reconnect_min_s, (int, float)) and isinstance(reconnect_max_s, (int, float))
                and 0 < reconnect_min_s <= reconnect_max_s):
            raise UsageError(f"sink.mqtt: reconnect_min_s {reconnect_min_s!r} / reconnect_max_s {reconnect_max_s!r} "
                             f"need 0 < min <= max seconds, e.g. 0.5 and 30")
        if password is not None and password_env is not None:
            raise UsageError("sink.mqtt: give password or password_env, not both")
        if password_env is not None:
            if password_env not in os.environ:
                raise UsageError(f"sink.mqtt: password_env {password_env!r}: no such environment variable; "
                                 f"export it before starting, or drop password_env")
            password = os.environ[password_env]
        if password is not None and not username:
            raise UsageError("sink.mqtt: a password needs a username (username: NAME)")
        self.tls = self._check_tls(tls)
        self.host, self.port, self.qos, self.keepalive = host, port, qos, keepalive
        self.prefix, self.line = _word("prefix", prefix), _word("line", line)
        self.client_id = client_id or f"ladon-{self.line}-{uuid.uuid4().hex[:8]}"
        self.username, self.password = username, password
        self.buffer_max, self.max_inflight = buffer, max_inflight
        self.reconnect = (float(reconnect_min_s), float(reconnect_max_s))
        self.drain_s = float(drain_s)

    @staticmethod
    def _check_tls(tls: Any) -> dict | None:
        if tls is False or tls is None:
            return None
        if tls is True:
            return {}
        if not isinstance(tls, dict):
            raise UsageError(f"sink.mqtt: tls {tls!r} must be true, false or a mapping with ca_certs, certfile, "
                             f"keyfile, insecure")
        bad = sorted(set(tls) - {"ca_certs", "certfile", "keyfile", "insecure"})
        if bad:
            raise UsageError(f"sink.mqtt: tls: unknown key(s) {bad}; allowed: ca_certs, certfile, keyfile, insecure")
        for k in ("ca_certs", "certfile", "keyfile"):
            if tls.get(k) is not None and not Path(str(tls[k])).is_file():
                raise UsageError(f"sink.mqtt: tls.{k} {tls[k]!r} is not a file; give the PEM file's path")
        if bool(tls.get("certfile")) != bool(tls.get("keyfile")):
            raise UsageError("sink.mqtt: tls.certfile and tls.keyfile go together (a client certificate and its key)")
        return dict(tls)

    # ------------------------------------------------------------------ topics
    def topic(self, stream: int | None, leaf: str) -> str:
        return f"{self.prefix}/{self.line}/{leaf}" if stream is None else f"{self.prefix}/{self.line}/{stream}/{leaf}"

    # ------------------------------------------------------------------ connection
    def open(self, ctx) -> None:
        super().open(ctx)
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:
            raise UsageError(f"sink.mqtt needs paho-mqtt: {exc}; install it with "
                             f"`.venv/bin/pip install -r requirements.txt`") from exc
        self.mqtt = mqtt
        self.cond = threading.Condition()
        self.events: deque[tuple[str, bytes]] = deque()
        self.retained: OrderedDict[str, bytes] = OrderedDict()  # latest counts/status per topic
        self.inflight: list = []  # paho MQTTMessageInfo of messages not yet acknowledged
        self.connected = False
        self.closing = False
        self.down_since: float | None = time.monotonic()
        self.announced_down = False
        self.streams: dict[int, dict] = {}
        self.sent = self.dropped = 0
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True)
        c.reconnect_delay_set(self.reconnect[0], self.reconnect[1])
        c.max_inflight_messages_set(self.max_inflight)
        if self.username:
            c.username_pw_set(self.username, self.password)
        if self.tls is not None:
            import ssl
            c.tls_set(ca_certs=self.tls.get("ca_certs"), certfile=self.tls.get("certfile"),
                      keyfile=self.tls.get("keyfile"), cert_reqs=ssl.CERT_REQUIRED)
            c.tls_insecure_set(bool(self.tls.get("insecure", False)))
        c.will_set(self.topic(None, "status"), json.dumps({"state": "offline", "reason": "connection lost"}),
                   qos=1, retain=True)
        c.on_connect, c.on_disconnect = self._on_connect, self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        self.client = c
        c.connect_async(self.host, self.port, self.keepalive)
        c.loop_start()
        self.sender = threading.Thread(target=self._send_loop, name=f"mqtt-{ctx.name}", daemon=True)
        self.sender.start()

    def _where(self) -> str:
        return f"{'mqtts' if self.tls is not None else 'mqtt'}://{self.host}:{self.port}"

    def _down(self, why: str) -> None:
        with self.cond:
            self.connected = False
            if self.down_since is None:
                self.down_since = time.monotonic()
            first = not self.announced_down
            self.announced_down = True
        if first and not self.closing:
            self.ctx.log(f"[{self.ctx.name}] MQTT broker {self._where()} {why}; reconnecting with back-off "
                         f"({self.reconnect[0]:g} s doubling to {self.reconnect[1]:g} s); events wait in a buffer of "
                         f"{self.buffer_max} (oldest dropped and counted when full); the pipeline goes on")

    def _on_connect_fail(self, client, userdata) -> None:
        self._down("is unreachable")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            hint = " (check username/password)" if "authori" in str(reason_code).lower() or \
                "password" in str(reason_code).lower() else ""
            self._down(f"refused the connection: {reason_code}{hint}")
            return
        client.publish(self.topic(None, "status"), json.dumps({"state": "online", "client": self.client_id}),
                       qos=1, retain=True)
        with self.cond:
            gone = None if self.down_since is None else time.monotonic() - self.down_since
            was_down = self.announced_down
            self.connected, self.down_since, self.announced_down = True, None, False
            pending = len(self.events) + len(self.retained)
            self.cond.notify_all()
        if was_down:
            self.ctx.log(f"[{self.ctx.name}] MQTT connected to {self._where()} after {gone:.1f} s; "
                         f"sending {pending} buffered message(s), {self.dropped} dropped so far")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self.closing:
            self._down(f"dropped the connection ({reason_code})")

    def _prune(self) -> None:
        """Forget messages the broker has acknowledged (paho marks them published; read under ``cond``)."""
        if self.inflight:
            left = [i for i in self.inflight if not i.is_published()]
            self.sent += len(self.inflight) - len(left)
            self.inflight = left

    def _send_loop(self) -> None:
        """Hand buffered messages to paho while connected, at most ``max_inflight`` unacknowledged at a time.

        paho is called outside ``cond``: it runs its callbacks under its own locks. A QoS>0 message that paho
        could not send (the link just broke) stays in paho's queue and is sent again on reconnect, so once handed
        over a message is paho's, whatever publish() returned."""
        while True:
            with self.cond:
                while True:
                    self._prune()
                    if self.closing:
                        return
                    if self.connected and len(self.inflight) < self.max_inflight and (self.events or self.retained):
                        break
                    self.cond.wait(0.05)
                if self.retained:
                    topic, payload = self.retained.popitem(last=False)
                    retain = True
                else:
                    topic, payload = self.events.popleft()
                    retain = False
            info = self.client.publish(topic, payload, qos=self.qos, retain=retain)
            with self.cond:
                if self.qos == 0:
                    self.sent += 1
                else:
                    self.inflight.append(info)

    # ------------------------------------------------------------------ frames
    def _put_event(self, topic: str, payload: bytes) -> None:
        if len(self.events) >= self.buffer_max:
            self.events.popleft()
            self.dropped += 1
            self.ctx.stats.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                self.ctx.log(f"[{self.ctx.name}] MQTT buffer full ({self.buffer_max}): {self.dropped} event(s) "
                             f"dropped so far (broker {self._where()} {'up' if self.connected else 'down'})")
        self.events.append((topic, payload))

    def process(self, fr: FrameResult) -> None:
        events = fr.results.get("events") or []
        counts = fr.results.get("counts")
        st = self.streams.get(fr.stream)
        with self.cond:
            if st is None:
                st = self.streams[fr.stream] = {"state": "running", "total": None}
                self._status(fr, "running")
            for ev in events:
                self._put_event(self.topic(fr.stream, "events"), json.dumps(ev, separators=(",", ":")).encode())
                if ev.get("type") in ("line.idle", "line.running"):
                    st["state"] = "idle" if ev["type"] == "line.idle" else "running"
                    self._status(fr, st["state"])
            if counts is not None and counts.get("total") != st["total"]:
                st["total"] = counts.get("total")
                body = {k: counts.get(k) for k in ("total", "by_class", "items_per_min", "items_per_min_total")}
                body.update(frame=fr.index, t=(fr.results.get("tracks") or {}).get("t"))
                self.retained[self.topic(fr.stream, "counts")] = json.dumps(body, separators=(",", ":")).encode()
            self.cond.notify_all()
        self.ctx.stats.extra.update(mqtt_sent=self.sent, mqtt_buffered=len(self.events), mqtt_dropped=self.dropped,
                                    mqtt_connected=self.connected)

    def _status(self, fr: FrameResult | None, state: str, stream: int | None = None) -> None:
        s = fr.stream if fr is not None else stream
        body = {"state": state}
        if fr is not None:
            body.update(frame=fr.index, t=(fr.results.get("tracks") or {}).get("t"))
        self.retained[self.topic(s, "status")] = json.dumps(body, separators=(",", ":")).encode()

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is None:
            return None
        with self.cond:
            for s in self.streams:
                self._status(None, "stopped", stream=s)
            self.retained[self.topic(None, "status")] = json.dumps({"state": "offline", "reason": "closed"}).encode()
            self.cond.notify_all()
        deadline = time.monotonic() + self.drain_s
        with self.cond:  # give a connected broker time to take what is left
            while time.monotonic() < deadline:
                self._prune()
                if not (self.events or self.retained or self.inflight):
                    break
                self.cond.wait(0.05)
            left = len(self.events) + len(self.retained) + len(self.inflight)
            self.closing = True
            self.cond.notify_all()
        if left:
            self.ctx.log(f"[{self.ctx.name}] MQTT: {left} message(s) not delivered to {self._where()} at shutdown "
                         f"(broker {'up' if self.connected else 'down'}); {self.dropped} dropped earlier")
        self.sender.join(2.0)
        client.disconnect()
        client.loop_stop()
        self.ctx.stats.extra.update(mqtt_sent=self.sent, mqtt_buffered=left, mqtt_dropped=self.dropped)
        self.client = None
        return None


register_stage(MqttSink)

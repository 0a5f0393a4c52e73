"""Topology (b): the server's decode, shared body and heads as a Ray Serve deployment behind the ZeroMQ ingress.

``server.ray`` sits after ``server.receive`` (which keeps the session: auth, checks, credits, acknowledgements)
and in place of ``server.decode`` -> task consumers -> ``results.merge``: it hands each accepted frame's payload
(and the few header fields decoding needs) to the deployment of :mod:`stages.ray_deployment`, whose replicas load
the model once and batch frames of all streams into one forward pass (``@serve.batch``). The answer is the task
results; the FrameResult the sinks take is built here from the input Packet, so every sink works unchanged.

* **Order**: results leave in each stream's arrival order whatever order Ray answers in (a reorder buffer);
  at most ``max_in_flight`` frames are out at once (``process`` waits for room: back-pressure to the ingress).
* **Exactly once**: nothing here acknowledges a frame; the JSONL sink does when it writes the line (the
  CommitLog of ``server.receive``). A frame that does not decode is finished without a result, as in
  ``server.decode``.
* **Failure**: a request that fails (a replica or Ray worker died, a timeout) is sent again, up to ``retries``
  times (to another replica or the restarted one; a result is used once per frame, so nothing is duplicated).
  When the Ray cluster itself is gone (its GCS port closed) or the retries run out, the stage stops the server
  with a message naming the cluster; frames without a result are not acknowledged, so the edges resend them to
  the next server.

Ray is imported when the stage opens (never by ``server``/``edge`` without ``--ray``). ``address``: ``auto``
starts a local Ray instance in this process (no dashboard unless ``dashboard: true``); ``HOST:PORT`` joins the
cluster whose head listens there (``ray start --head``; its dashboard shows the deployment, port 8265).
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from pathlib import Path

from core.errors import UsageError
from pipeline.stage import FrameResult, Packet, Stage, register_stage
from transport import wire

ROOT = Path(__file__).resolve().parent.parent


def parse_address(value) -> str | None:
    """``auto`` -> None (start a local instance); ``HOST:PORT`` -> itself; anything else -> UsageError."""
    text = str(value or "").strip()
    if text.lower() in ("auto", "local"):
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/ "):
        raise UsageError(f"--ray {value!r}: give `auto` (a local Ray instance in this process) or the address of "
                         f"a Ray cluster's head, HOST:PORT (as `ray start --head` prints it, e.g. 10.0.0.5:6379)")
    return text


def probe(address: str, timeout_s: float = 3.0) -> str | None:
    """None when something listens at HOST:PORT, else why not."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


class _RemoteCodecInfo:
    """What the sinks read of the codec (class names, input size), as the replicas report it."""

    def __init__(self, info: dict):
        self.class_names = info["class_names"]
        self.input_size = info["input_size"]
        self.fingerprint = info["fingerprint"]


@register_stage
class RayCompute(Stage):
    """Packet -> Ray Serve deployment (decode + shared body + heads, batched across streams) -> FrameResult,
    each stream in order."""
    key = "server.ray"
    provides_codec = True  # ctx.codec() of the sinks: the class names the replicas report
    accepts = (Packet,)
    emits = (FrameResult,)

    def __init__(self, address="auto", checkpoint=None, tasks="detection,segmentation,classification", conf=None,
                 num_replicas=1, min_replicas=None, max_replicas=None, max_batch_size=8,
                 batch_wait_timeout_s=0.01, num_cpus=1.0, num_gpus=0.0, threads=None, max_in_flight=16,
                 retries=5, request_timeout_s=120.0, app="ladon", dashboard=False, object_store_mb=256,
                 drain_s=60.0, keep_app=False, deploy_timeout_s=300.0, target_ongoing_requests=None,
                 upscale_delay_s=3.0, downscale_delay_s=60.0):
        from codec.tasks import TASKS
        self.address = parse_address(address)
        self.address_text = str(address)
        self.checkpoint = checkpoint
        names = tasks if isinstance(tasks, (list, tuple)) else [t.strip() for t in str(tasks).split(",") if t.strip()]
        bad = [t for t in names if t not in TASKS]
        if bad or not names:
            raise UsageError(f"server.ray tasks {tasks!r}: choose a comma-separated subset of {', '.join(TASKS)}")
        self.tasks = tuple(names)
        self.conf = None if conf in (None, "") else float(conf)

        def count(v, name, lo=1):
            if v in (None, ""):
                return None
            try:
                n = int(v)
            except (TypeError, ValueError):
                n = lo - 1
            if n < lo or isinstance(v, bool):
                raise UsageError(f"server.ray {name} {v!r}: give a whole number >= {lo}")
            return n

        self.num_replicas = count(num_replicas, "num_replicas") or 1
        self.min_replicas, self.max_replicas = count(min_replicas, "min_replicas", 0), count(max_replicas, "max_replicas")
        if self.max_replicas is not None and (self.min_replicas or 0) > self.max_replicas:
            raise UsageError(f"server.ray min_replicas {min_replicas} > max_replicas {max_replicas}")
        self.max_batch_size = count(max_batch_size, "max_batch_size")
        self.max_in_flight = count(max_in_flight, "max_in_flight")
        self.retries = count(retries, "retries", 0)
        self.threads = count(threads, "threads")
        self.batch_wait_timeout_s, self.request_timeout_s = float(batch_wait_timeout_s), float(request_timeout_s)
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self.app, self.dashboard, self.keep_app = str(app), bool(dashboard), bool(keep_app)
        self.object_store_mb, self.drain_s = int(object_store_mb), float(drain_s)
        self.deploy_timeout_s = float(deploy_timeout_s)

        def seconds(v, name, default):
            try:
                x = float(default if v in (None, "") else v)
            except (TypeError, ValueError):
                x = -1.0
            if not x >= 0 or isinstance(v, bool):
                raise UsageError(f"server.ray {name} {v!r}: give seconds >= 0")
            return x

        self.upscale_delay_s = seconds(upscale_delay_s, "upscale_delay_s", 3.0)
        self.downscale_delay_s = seconds(downscale_delay_s, "downscale_delay_s", 60.0)
        target = seconds(target_ongoing_requests, "target_ongoing_requests", self.max_batch_size)
        if target <= 0:
            raise UsageError(f"server.ray target_ongoing_requests {target_ongoing_requests!r}: give a number > 0 "
                             f"(frames queued or in work per replica that Serve aims at)")
        self.target_ongoing_requests = target
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise UsageError(f"server.ray num_cpus {num_cpus!r} / num_gpus {num_gpus!r}: give numbers >= 0")
        # now, before any stage opens (and a sink creates its files): is there a cluster at all?
        if self.address is not None:
            why = probe(self.address)
            if why is not None:
                raise UsageError(f"--ray {self.address_text}: no Ray cluster answers at {self.address} ({why}); "
                                 f"start one there with `ray start --head --port {self.address.rpartition(':')[2]}` "
                                 f"(other hosts: `ray start --address {self.address}`), or use --ray auto for a "
                                 f"local instance")

    # ------------------------------------------------------------------ setup
    def _where(self) -> str:
        return "the local Ray instance (--ray auto)" if self.address is None else f"the Ray cluster at {self.address}"

    def open(self, ctx) -> None:
        super().open(ctx)
        self.cond = threading.Condition()
        self.emit_lock = threading.Lock()
        self.order: dict[int, deque] = {}  # stream -> Packets in arrival order (results leave in this order)
        self.answers: dict[tuple[int, int], object] = {}
        self.inflight = 0
        self.failed: str | None = None
        self.gone = False  # the cluster itself is gone (nothing to take down, nobody to tell)
        self.retried = self.bad = 0
        self.last_retry_log = 0.0
        self.batches: dict[int, int] = {}
        self.callers: list[threading.Thread] = []
        self.started_local = False
        self.owns_ray = False
        from pipeline.codecs import get_codec
        # what server.receive checks frames against (and a bad checkpoint said here, before Ray starts)
        fp = get_codec(self.checkpoint, edge_only=True).fingerprint
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.address is not None and "RAY_AUTH_MODE" not in os.environ \
                and (Path.home() / ".ray" / "auth_token").is_file():
            # `ray start` on this host turned token authentication on because this token exists; ray.init with an
            # explicit address would not: join the way `ray start --address` would
            os.environ["RAY_AUTH_MODE"] = "token"
        import ray
        from ray import serve
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.serve").setLevel(logging.ERROR)  # a dead replica: our own line says what happens
        # replicas import this project: the driver's path first (an installed copy elsewhere must not win)
        pypath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {"PYTHONPATH": pypath, "RAY_USAGE_STATS_ENABLED": "0"}
        if os.environ.get("LADON_SERVER_RUNTIME"):  # replicas choose their runtime as server.decode here would
            env["LADON_SERVER_RUNTIME"] = os.environ["LADON_SERVER_RUNTIME"]
        self._export_once(fp)
        handlers = _signal_handlers()
        self.owns_ray = not ray.is_initialized()  # else: this process joined already (a benchmark, a notebook)
        try:
            if not self.owns_ray:
                pass
            elif self.address is None:
                ray.init(include_dashboard=self.dashboard, log_to_driver=False, logging_level=logging.WARNING,
                         object_store_memory=self.object_store_mb * 2 ** 20, namespace="ladon",
                         runtime_env={"env_vars": env})
                self.started_local = True
            else:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING,
                         namespace="ladon", runtime_env={"env_vars": env})
        except Exception as exc:  # noqa: BLE001 - named for the user
            raise UsageError(f"--ray {self.address_text}: cannot start or join {self._where()}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        _restore_signal_handlers(handlers)
        self.gcs = self.address or ray.get_runtime_context().gcs_address  # probed when a request fails
        try:
            self._check_resources(ray)
        except BaseException:
            self._teardown()
            raise
        from stages import ray_deployment
        dep = ray_deployment.deployment(self.num_replicas, self.min_replicas, self.max_replicas, self.max_batch_size,
                                        self.num_cpus, self.num_gpus, env, self.target_ongoing_requests,
                                        self.upscale_delay_s, self.downscale_delay_s)
        app = dep.bind(self.checkpoint, self.tasks, self.conf, self.max_batch_size, self.batch_wait_timeout_s,
                       self.threads or max(1, int(self.num_cpus)))
        t0 = time.monotonic()
        try:
            serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
            # serve.run waits for the app to run, without a time limit (blocking=False only means it returns
            # then): it runs in a thread, and _wait_ready watches serve.status() with ours
            ran: dict = {}

            def run() -> None:
                try:
                    ran["handle"] = serve.run(app, name=self.app, route_prefix=None, blocking=False,
                                              logging_config={"log_level": "WARNING"})
                except BaseException as exc:  # noqa: BLE001 - _wait_ready reports it
                    ran["error"] = exc
            runner = threading.Thread(target=run, name=f"{ctx.name}-deploy", daemon=True)
            runner.start()
            self._wait_ready(serve, runner, ran)
            info = self.handle.info.remote().result(timeout_s=self.request_timeout_s)
        except BaseException:
            self._teardown()
            raise
        if fp != info["fingerprint"]:
            self._teardown()
            raise UsageError(f"server.ray: the replicas hold model {info['fingerprint'].hex()}, the ingress checks "
                             f"frames against {fp.hex()}: give both the same --checkpoint")
        self.codec = _RemoteCodecInfo(info)  # ctx.codec() of the sinks: class names and input size
        self.replica_runtime = str(info.get("runtime", "?"))  # onnxruntime or torch, as server.decode would choose
        if self.max_replicas is not None:
            lo = 1 if self.min_replicas is None else self.min_replicas
            n = (f"{lo}..{self.max_replicas} (autoscaling: {self.target_ongoing_requests:g} frames queued per "
                 f"replica, up after {self.upscale_delay_s:g} s, down after {self.downscale_delay_s:g} s)")
            if self.max_replicas * self.target_ongoing_requests > self.max_in_flight:
                ctx.log(f"[{ctx.name}] note: this ingress keeps at most {self.max_in_flight} frames out at Ray "
                        f"(ray_in_flight), enough load for {max(1, int(self.max_in_flight // self.target_ongoing_requests))} "
                        f"replica(s) at {self.target_ongoing_requests:g} each, not {self.max_replicas}: raise "
                        f"ray_in_flight (or lower ray_target_ongoing) to use them all")
        else:
            n = str(self.num_replicas)
        ctx.log(f"[{ctx.name}] Ray Serve app {self.app!r} ready on {self._where()} (GCS {self.gcs}) in "
                f"{time.monotonic() - t0:.1f} s: {n} replica(s), {self.num_cpus:g} CPU / {self.num_gpus:g} GPU each, "
                f"model on {self.replica_runtime}, batches of up to {self.max_batch_size}")
        # daemon call threads (not an executor's): one stuck on a dead cluster must not hold the process at exit
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.callers = [threading.Thread(target=self._caller, name=f"{ctx.name}-call{i}", daemon=True)
                        for i in range(self.max_in_flight)]
        for t in self.callers:
            t.start()
        self.closing = threading.Event()
        self.watch = threading.Thread(target=self._watch, name=f"{ctx.name}-watch", daemon=True)
        self.watch.start()
        self.replicas_running, self.replicas_most = None, 0
        if self.max_replicas is not None:  # a separate thread: serve.status() may block when the cluster goes
            threading.Thread(target=self._watch_replicas, args=(serve,), name=f"{ctx.name}-scale", daemon=True).start()

    def _export_once(self, fingerprint: bytes) -> None:
        """The checkpoint's onnxruntime export (:mod:`codec.server_onnx`), made here once when it is missing or
        stale, before the replicas start: replicas on this host then load it instead of each making it at the
        same moment (replicas on other hosts make their own, beside their copy of the checkpoint)."""
        spec = str(self.checkpoint or "default")
        if os.environ.get("LADON_SERVER_RUNTIME", "auto") == "torch" or spec.startswith("random:"):
            return
        try:
            from codec.api import DEFAULT_CHECKPOINT, load_codec
            from codec.server_onnx import export_ready
        except ImportError:  # no onnx here: each replica says so and decodes with PyTorch
            return
        path = DEFAULT_CHECKPOINT if spec == "default" else Path(spec)
        if export_ready(path, fingerprint):
            return
        self.ctx.log(f"[{self.ctx.name}] making the onnxruntime export of {path} once, before the replicas start")
        try:
            load_codec(path, runtime="auto")  # exports (checked, atomic replace) and attaches; then dropped
        except Exception as exc:  # noqa: BLE001 - the replicas try again themselves (or fall back to PyTorch)
            self.ctx.log(f"[{self.ctx.name}] no onnxruntime export ({type(exc).__name__}: {exc})")

    def _check_resources(self, ray) -> None:
        """A replica needs ``num_cpus``/``num_gpus`` on one node: none of the local instance's nodes has them ->
        UsageError now; none of a cluster's -> one line saying the replicas wait for such a node to join."""
        need = {k: v for k, v in (("CPU", self.num_cpus), ("GPU", self.num_gpus)) if v > 0}
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(all(r.get(k, 0.0) >= v for k, v in need.items()) for r in nodes):
            return
        have = ", ".join(f"{r.get('CPU', 0):g} CPU / {r.get('GPU', 0):g} GPU" for r in nodes) or "no node"
        want = f"{self.num_cpus:g} CPU / {self.num_gpus:g} GPU per replica (ray_cpus / ray_gpus)"
        if self.started_local:
            raise UsageError(f"server.ray: a replica asks for {want} but the local Ray instance (--ray auto) has "
                             f"{have}: lower ray_gpus / ray_cpus (ray_gpus 0: replicas on CPU), or join a cluster "
                             f"with such a node (--ray HEAD:PORT)")
        self.ctx.log(f"[{self.ctx.name}] no node of {self._where()} has {want} (nodes: {have}): the replicas stay "
                     f"pending until one joins (`ray start --address {self.address} --num-cpus N --num-gpus N`), "
                     f"{self.deploy_timeout_s:.0f} s at most")

    def _watch_replicas(self, serve, every_s: float = 1.0) -> None:
        """Autoscaling: one line each time the replicas running or starting change (the most running is in the
        summary)."""
        last = None
        while not self.closing.wait(every_s) and self.failed is None:
            try:
                states = serve.status().applications[self.app].deployments["SplitServer"].replica_states
                states = {str(k).rsplit(".", 1)[-1]: int(v) for k, v in states.items()}
            except Exception:  # noqa: BLE001 - the app going away at shutdown, a cluster going: _watch says it
                continue
            now = (states.get("RUNNING", 0), sum(states.get(k, 0) for k in ("STARTING", "RECOVERING", "UPDATING")))
            if now != last:
                if last is not None:
                    lo = 1 if self.min_replicas is None else self.min_replicas
                    self.ctx.log(f"[{self.ctx.name}] replicas: {now[0]} running, {now[1]} starting (was "
                                 f"{last[0]} running; autoscaling {lo}..{self.max_replicas}; {self.inflight} "
                                 f"frame(s) in flight)")
                last = now
                self.replicas_running = now[0]
                self.replicas_most = max(self.replicas_most, now[0])

    def _wait_ready(self, serve, runner: threading.Thread, ran: dict) -> None:
        """Until the app runs (its replicas constructed: the model loaded) and ``runner`` (serve.run) has its
        handle; its deployment failing, or not running within ``deploy_timeout_s`` (e.g. replicas asking for GPUs
        or CPUs the cluster does not have: Serve's message every 30 s meanwhile), is an error with Serve's own
        words."""
        t0 = time.monotonic()
        deadline, said = t0 + self.deploy_timeout_s, t0
        state, msg = "", ""
        while time.monotonic() < deadline:
            if "handle" in ran:
                self.handle = ran["handle"]
                return
            st = serve.status().applications.get(self.app)
            state = str(getattr(st, "status", ""))
            msg = " ".join(str(getattr(d, "message", "") or "") for d in getattr(st, "deployments", {}).values())
            msg = (str(getattr(st, "message", "") or "") + " " + msg).strip()
            if "error" in ran:
                msg = msg or f"{type(ran['error']).__name__}: {_first_line(ran['error'])}"
                break
            if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
                break
            if msg and time.monotonic() - said >= 30.0:  # e.g. replicas waiting for a node with a GPU
                said = time.monotonic()
                self.ctx.log(f"[{self.ctx.name}] the Ray Serve app {self.app!r} is not running yet after "
                             f"{said - t0:.0f} s: {msg[:500]}")
            runner.join(0.2)
        raise UsageError(f"server.ray: the Ray Serve app {self.app!r} is not running on {self._where()} "
                         f"({state.rsplit('.', 1)[-1] or 'no status'} after {time.monotonic() - t0:.0f} s, "
                         f"deploy_timeout_s {self.deploy_timeout_s:.0f}): {msg[:1500] or 'no message'}; check the "
                         f"checkpoint on every host and ray_cpus/ray_gpus ({self.num_cpus:g}/{self.num_gpus:g} per "
                         f"replica) against `ray status`")

    def _watch(self, every_s: float = 1.0, misses: int = 3) -> None:
        """The cluster gone (its GCS port closed ``misses`` times in a row): stop the server with a message naming
        it, before Ray's own client gives up on it (60 s) and ends the process without one."""
        missed = 0
        while not self.closing.wait(every_s) and self.failed is None:
            why = probe(self.gcs, 2.0)
            missed = missed + 1 if why is not None else 0
            if missed >= misses:
                self._die(f"{self._where()} is gone (its GCS at {self.gcs}: {why})", gone=True)
                return

    def status(self) -> str:
        return f"ray: {self.inflight} in flight, {self.retried} retried"

    def link_status(self) -> str | None:
        return self.status() if getattr(self, "cond", None) is not None else None

    # ------------------------------------------------------------------ graph thread
    def process(self, p: Packet):
        h = p.header if p.header is not None else wire.unpack(p.data)[0]
        payload = p.payload if p.payload is not None else wire.unpack(p.data)[1]
        from stages.ray_deployment import FrameJob
        job = FrameJob(bytes(payload), tuple(h.latent_shape), h.fingerprint, tuple(h.orig_size))
        with self.cond:
            while self.inflight >= self.max_in_flight and self.failed is None:
                self.cond.wait(0.1)
            if self.failed is not None:
                raise RuntimeError(self.failed)
            self.order.setdefault(p.stream, deque()).append(p)
            self.inflight += 1
        self.jobs.put((p, job, time.perf_counter()))
        return None

    # ------------------------------------------------------------------ call threads
    def _caller(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            try:
                self._call(*item)
            except BaseException as exc:  # noqa: BLE001 - a bug here must stop the server, never hang it
                self._die(f"a Ray call thread failed: {type(exc).__name__}: {exc}")

    def _call(self, p: Packet, job, t0: float) -> None:
        last = None
        for attempt in range(self.retries + 1):
            if self.failed is not None:
                return
            try:
                ans = self.handle.infer.remote(job).result(timeout_s=self.request_timeout_s)
                break
            except Exception as exc:  # noqa: BLE001 - a replica/worker died, a timeout: send it again
                last = exc
                why = probe(self.gcs, 2.0)
                if why is not None:
                    return self._die(f"{self._where()} is gone (its GCS at {self.gcs}: {why})", gone=True)
                if attempt < self.retries:
                    with self.cond:
                        self.retried += 1
                        now, say = time.monotonic(), False
                        if now - self.last_retry_log > 2.0:  # one line per 2 s, not one per frame
                            self.last_retry_log, say = now, True
                    if say:
                        self.ctx.log(f"[{self.ctx.name}] stream {p.stream} frame {p.index}: {type(exc).__name__}: "
                                     f"{_first_line(exc)}; sending it again ({attempt + 1}/{self.retries}; "
                                     f"{self.retried} request(s) sent again so far)")
                    time.sleep(min(0.5 * 2 ** attempt, 5.0))
        else:
            return self._die(f"stream {p.stream} frame {p.index} failed {self.retries + 1} times on {self._where()}: "
                             f"{type(last).__name__}: {_first_line(last)}")
        ms = (time.perf_counter() - t0) * 1000.0
        with self.cond:
            self.answers[(p.stream, p.index)] = (ans, ms)
            self.batches[ans.batch] = self.batches.get(ans.batch, 0) + 1
        self._emit_ready()

    def _die(self, why: str, gone: bool = False) -> None:
        msg = (f"[{self.ctx.name}] {why}: stopping the server (exit 1); frames without a result are not "
               f"acknowledged (the edges resend them to the next server)")
        with self.cond:
            if self.failed is not None:
                return
            self.failed, self.gone = msg, gone
            self.cond.notify_all()
        self.ctx.log(msg)
        self.ctx.stop.set()

    def _emit_ready(self) -> None:
        with self.emit_lock:  # one emitter at a time: each stream's results leave in arrival order
            out = []
            with self.cond:
                for stream, q in self.order.items():
                    while q and (q[0].stream, q[0].index) in self.answers:
                        p = q.popleft()
                        out.append((p, *self.answers.pop((p.stream, p.index))))
                        self.inflight -= 1
                if out:
                    self.cond.notify_all()
            for p, ans, ms in out:
                if ans.bad is not None:
                    self.bad += 1
                    self.ctx.stats.errors += 1
                    self.ctx.log(f"[{self.ctx.name}] stream {p.stream} frame {p.index}: cannot decode: {ans.bad}")
                    p.meta.lose(f"cannot decode: {ans.bad}")  # finished without a result: acknowledged, not resent
                    continue
                self.ctx.emit(self._frame_result(p, ans, ms))

    def _frame_result(self, p: Packet, ans, ms: float) -> FrameResult:
        h = p.header if p.header is not None else wire.unpack(p.data)[0]
        meta = p.meta.derive(sent_ns=h.sent_ns, received_ns=p.received_ns or time.time_ns())
        meta.timings.update(ans.ms)
        meta.timings[self.ctx.name] = round(ms, 3)  # the whole round trip: queue, Ray, batch, compute
        return FrameResult(meta, time.time_ns(), len(p.data), tuple(h.latent_shape), tuple(h.orig_size),
                           dict(ans.results), dict(ans.errors), p.image)

    # ------------------------------------------------------------------ shutdown
    def close(self):
        if getattr(self, "cond", None) is None:
            return None
        deadline = time.monotonic() + self.drain_s
        with self.cond:
            while self.inflight and self.failed is None and time.monotonic() < deadline:
                self.cond.wait(0.1)
            left = self.inflight
        if getattr(self, "closing", None) is not None:
            self.closing.set()
        for _ in getattr(self, "callers", ()):
            self.jobs.put(None)
        if self.max_replicas is not None:
            self.ctx.stats.extra["replicas_most_running"] = getattr(self, "replicas_most", 0)
        self.ctx.stats.extra.update({"retried": self.retried, "undecodable": self.bad,
                                     "batch_sizes": {str(k): v for k, v in sorted(self.batches.items())}})
        if left and self.failed is None:
            self.ctx.log(f"[{self.ctx.name}] {left} frame(s) had no result from Ray at shutdown (not acknowledged)")
        self._teardown()
        if self.failed is not None:
            raise RuntimeError(self.failed)
        return None

    def _teardown(self) -> None:
        try:
            import ray
            from ray import serve
        except ImportError:  # pragma: no cover
            return
        if not ray.is_initialized():
            return
        if self.gone:  # Ray's client (and its exit hook) would wait up to a minute for the GCS, then abort
            import atexit
            atexit.register(_exit_now, 1)  # runs first (last registered): the summary is out, files are closed
            return
        if self.failed is None and not self.started_local and not self.keep_app:  # our replicas leave the cluster
            try:
                serve.delete(self.app)
            except Exception:  # noqa: BLE001 - the cluster may be going away too
                pass
        if self.owns_ray:
            ray.shutdown()  # a local instance (--ray auto) goes with it, Serve included


def _exit_now(code: int) -> None:
    import sys
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _signal_handlers() -> dict:
    import signal
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict) -> None:
    """ray.init installs its own SIGTERM handler (exit at once); put back the command's (the first signal finishes
    in-flight frames and closes files, see pipeline.commands._common)."""
    import signal
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, h in handlers.items():
        if h is not None:
            signal.signal(sig, h)


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""

"""The Ray Serve deployment behind ``server.ray`` (:mod:`stages.ray_compute`): entropy decode, decoder, shared
body and task heads, once per frame, with dynamic batching across streams (``@serve.batch``).

Imported only where Ray runs: by ``server.ray`` when it opens, and by each replica (which loads the model once,
with the same loader as ``server.decode``: :func:`pipeline.codecs.get_codec`). A request holds the frame's payload
bytes and the few header fields decoding needs (:class:`FrameJob`); the answer holds each task's result in
original-frame coordinates (what ``results.merge`` puts into a FrameResult), or why the frame cannot be decoded.
The per-frame metadata stays in the ingress process, which builds the FrameResult itself.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ray import serve


@dataclass
class FrameJob:
    """What a replica needs of one frame: the payload and the header fields the decoder checks."""
    payload: bytes
    latent_shape: tuple[int, int, int]
    fingerprint: bytes
    orig_size: tuple[int, int]  # original (width, height): the letterbox the results are mapped back through


@dataclass
class FrameAnswer:
    """A replica's answer: ``results`` {task: result} and ``errors`` {task: message} (a head that failed on this
    frame), or ``bad`` (the payload does not decode: no result, the frame is finished without one)."""
    results: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    ms: dict = field(default_factory=dict)  # decode and per-task milliseconds (this frame's share of its batch)
    bad: str | None = None
    batch: int = 1
    pid: int = 0


class SplitServer:
    """One replica: the model loaded once; ``infer`` batches concurrent requests (all streams) into one decode."""

    def __init__(self, checkpoint=None, tasks=("detection", "segmentation", "classification"), conf=None,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, threads: int | None = None):
        import torch

        from pipeline.codecs import get_codec
        if threads:
            torch.set_num_threads(int(threads))
        self.codec = get_codec(checkpoint)  # as server.decode loads it (BatchNorms folded for a checkpoint)
        self.tasks = tuple(tasks)
        self.kw = {} if conf is None else {"conf": float(conf)}  # detection's threshold (as task.detection's conf)
        self.infer.set_max_batch_size(int(max_batch_size))
        self.infer.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    def _kw(self, task: str) -> dict:
        return self.kw if task == "detection" else {}

    def info(self) -> dict:
        """What the ingress checks and shows: the model's fingerprint, input size, class names; this replica's pid
        and where its decoder, body and heads run (``onnxruntime`` or ``torch``, as ``server.decode`` chooses)."""
        runtime = "onnxruntime" if getattr(self.codec, "server_runtime", None) is not None else "torch"
        return {"fingerprint": self.codec.fingerprint, "input_size": int(self.codec.input_size),
                "class_names": {t: list(v) for t, v in self.codec.class_names.items()}, "pid": os.getpid(),
                "runtime": runtime}

    def ping(self, x=None):
        """A no-op round trip (the cost Ray adds per request: serialisation, routing, scheduling)."""
        return x

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def infer(self, jobs: list[FrameJob]) -> list[FrameAnswer]:
        return self.compute(jobs)

    def compute(self, jobs: list[FrameJob]) -> list[FrameAnswer]:
        """Decode the batch once and run the heads once; a payload that does not decode is isolated (its frame gets
        ``bad``, the others are decoded without it); a head that fails on the batch is retried frame by frame."""
        from codec.api import CodecError, EncodedFrame
        answers = [FrameAnswer(batch=len(jobs), pid=os.getpid()) for _ in jobs]
        enc = [EncodedFrame(j.payload, tuple(j.latent_shape), j.fingerprint) for j in jobs]
        t0 = time.perf_counter()
        try:
            feats, ok = self.codec.decode(enc), list(range(len(jobs)))
        except CodecError:
            ok = []
            for i, e in enumerate(enc):  # find the bad payload(s); decode the rest as one batch
                try:
                    self.codec.decode([e])
                    ok.append(i)
                except CodecError as exc:
                    answers[i].bad = str(exc)
            feats = self.codec.decode([enc[i] for i in ok]) if ok else None
        share = (time.perf_counter() - t0) * 1000.0 / max(1, len(ok))
        if feats is None:
            return answers
        from core.geometry import letterbox_params
        from stages.consumers import map_result
        lbs = [letterbox_params(jobs[i].orig_size[0], jobs[i].orig_size[1], self.codec.input_size) for i in ok]
        for i in ok:
            answers[i].ms["decode"] = round(share, 3)
        for task in self.tasks:
            t0 = time.perf_counter()
            try:
                raw = self.codec.head(task, feats, **self._kw(task))
                per = [(r, None) for r in raw]
            except Exception:  # noqa: BLE001 - find the frame(s) it fails on, as the in-process consumers would
                per = []
                for k in range(len(ok)):
                    try:
                        one = self.codec.head(task, _one(feats, k), **self._kw(task))[0]
                        per.append((one, None))
                    except Exception as exc:  # noqa: BLE001 - that frame loses this task's result only
                        per.append((None, f"{type(exc).__name__}: {exc}"))
            share = (time.perf_counter() - t0) * 1000.0 / len(ok)
            for k, i in enumerate(ok):
                raw_k, err = per[k]
                if err is None:
                    try:
                        answers[i].results[task] = map_result(task, raw_k, lbs[k])
                    except Exception as exc:  # noqa: BLE001
                        err = f"{type(exc).__name__}: {exc}"
                if err is not None:
                    answers[i].errors[task] = err
                answers[i].ms[task] = round(share, 3)
        return answers


def _one(feats, k: int):
    """Frame ``k`` of a batch of shared-body features (the torch cache or the onnxruntime outputs)."""
    return feats.split()[k]


# Serve's autoscaling defaults (metrics every 10 s over 30 s, up after 30 s, down after 600 s) suit web traffic;
# a camera server should follow a burst within seconds: metrics twice a second over the last 2 s
METRICS_INTERVAL_S = 0.5
LOOK_BACK_PERIOD_S = 2.0


def autoscaling_config(min_replicas: int, max_replicas: int, target_ongoing_requests: float,
                       upscale_delay_s: float = 3.0, downscale_delay_s: float = 60.0) -> dict:
    """Serve's ``autoscaling_config``: between ``min_replicas`` and ``max_replicas``, aiming at
    ``target_ongoing_requests`` frames queued or in work per replica; a replica is added after the load has held
    ``upscale_delay_s`` and removed after it has stayed low ``downscale_delay_s``."""
    return {"min_replicas": int(min_replicas), "max_replicas": int(max_replicas),
            "target_ongoing_requests": float(target_ongoing_requests),
            "upscale_delay_s": float(upscale_delay_s), "downscale_delay_s": float(downscale_delay_s),
            "metrics_interval_s": METRICS_INTERVAL_S, "look_back_period_s": LOOK_BACK_PERIOD_S}


def deployment(num_replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
               max_batch_size: int = 8, num_cpus: float = 1.0, num_gpus: float = 0.0, env_vars: dict | None = None,
               target_ongoing_requests: float | None = None, upscale_delay_s: float = 3.0,
               downscale_delay_s: float = 60.0):
    """The Serve deployment of :class:`SplitServer` with the config's replicas (fixed, or autoscaling between
    ``min_replicas`` and ``max_replicas``: :func:`autoscaling_config`; ``target_ongoing_requests`` defaults to a
    full batch per replica) and resources per replica."""
    opts = {"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)}
    if env_vars:
        opts["runtime_env"] = {"env_vars": dict(env_vars)}
    kw = {"ray_actor_options": opts, "max_ongoing_requests": max(2 * int(max_batch_size), 4),
          "max_constructor_retry_count": 3}  # a model that does not load fails the deployment soon
    if max_replicas is not None:
        kw["autoscaling_config"] = autoscaling_config(
            1 if min_replicas is None else min_replicas, max_replicas,
            target_ongoing_requests or max(1, int(max_batch_size)), upscale_delay_s, downscale_delay_s)
    else:
        kw["num_replicas"] = int(num_replicas)
    return serve.deployment(SplitServer, name="SplitServer", **kw)

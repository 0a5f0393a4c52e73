"""Device and server cost: parameters, MACs, time per frame (batch 1, warm, median), peak resident memory."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import media

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (the order rotating each round) so that load
    from other processes falls on all of them alike."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) for name, v in times.items()}


def _with_runtime(codec, runtime, fn):
    """Call ``fn`` with ``codec``'s server runtime swapped for ``runtime`` (None: eager PyTorch)."""
    saved = codec.server_runtime
    codec.server_runtime = runtime
    try:
        return fn()
    finally:
        codec.server_runtime = saved


class _TeacherGraph(torch.nn.Module):
    """frame batch -> each task's raw head output: the JPEG-offload server's tensor work, for onnxruntime."""

    def __init__(self, teachers):
        super().__init__()
        self.teachers = teachers

    def forward(self, x: torch.Tensor):
        from codec.tasks import TASKS, _first

        cache = self.teachers.backbone(x)
        return tuple(_first(self.teachers.head_raw(task, cache)) for task in TASKS)


def _teachers_onnx(codec, x: torch.Tensor) -> str | None:
    """The teachers exported to ONNX (a temporary file), so the offload baseline gets the same fast runtime as
    the split server; None (logged) when onnxruntime is missing or the export does not reproduce PyTorch."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("onnxruntime not installed: the teachers are timed on PyTorch only")
        return None
    import tempfile
    import warnings

    from codec.server_onnx import ATOL

    path = Path(tempfile.mkdtemp(prefix="ladon-bench-")) / "teachers.onnx"
    graph = _TeacherGraph(codec.model.teachers).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (x,), str(path), input_names=["frames"], opset_version=17, dynamo=False)
            want = [o.numpy() for o in graph(x)]
        got = _ort_session(str(path), 1).run(None, {"frames": x.numpy()})
        err = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
        if err > ATOL:
            raise RuntimeError(f"outputs differ from PyTorch's by {err:.3g}")
    except Exception as exc:  # noqa: BLE001 - a baseline's fast path is optional; say why it is missing
        log.warning("teachers not exported to ONNX (%s): timed on PyTorch only", exc)
        return None
    return str(path)


def _ort_session(path: str, n_threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = int(n_threads), 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _teachers_onnx_heads(codec, session, frames: np.ndarray) -> list:
    """The teachers' results on raw frames with the tensor work in onnxruntime, post-processed like the server's."""
    from codec.api import Features, _frames_to_tensor
    from codec.tasks import TASKS

    x = _frames_to_tensor(frames, codec.input_size)
    raw = {t: torch.from_numpy(o) for t, o in zip(TASKS, session.run(None, {"frames": x.numpy()}))}
    return codec.heads(Features({}, x.shape[0], raw))


def probe(kind: str, checkpoint: str, frames: int, n_threads: int = 1) -> dict:
    """Run :mod:`benchmarks.probe` in a fresh process (its own peak RSS)."""
    cmd = [sys.executable, "-m", "benchmarks.probe", kind, str(checkpoint), "--frames", str(frames),
           "--threads", str(n_threads)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _onnx_edge(checkpoint: str):
    """A factory ``threads -> OnnxEdgeCodec`` for the checkpoint's torch-free edge export, or None without one."""
    try:
        from codec.edge_onnx import OnnxEdgeCodec, edge_paths

        path = edge_paths(checkpoint)[0]
        if not path.is_file():
            return None
        OnnxEdgeCodec(path)  # fails here, once, on a broken export or without onnxruntime
        return lambda threads: OnnxEdgeCodec(path, threads=threads)
    except Exception as exc:  # noqa: BLE001 - the torch edge is still timed; say why the ONNX one is not
        log.warning("the ONNX edge beside %s is not timed: %s", checkpoint, exc)
        return None


def device_cost(codec, frames: np.ndarray, cfg: dict, checkpoint: str, jpeg_q: int, video_crf: int) -> dict:
    """Encoder vs three local models vs JPEG/H.264 encoding, on one frame at a time."""
    reps = cfg["timing_repeats"]
    frame = frames[:1]
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(0, 3, 1, 2).float().div(255)
    t = codec.model.teachers
    out = {**codec.encoder_stats(),
           "teacher_params_three_models": int(sum(sum(p.numel() for p in m.parameters())
                                                  for m in (t.detect, t.semantic, t.classify))),
           "teacher_params_shared": int(sum(p.numel() for p in t.parameters()))}
    try:
        from codec.student import count_macs
        out["three_models_macs"] = int(sum(count_macs(m, (1, 3, codec.input_size, codec.input_size))
                                           for m in (t.detect, t.semantic, t.classify)))
    except Exception as exc:  # noqa: BLE001 - MAC counting of Ultralytics graphs is best effort
        log.warning("could not count the teachers' MACs: %s", exc)
    enc = codec.encode(frame)
    onnx_edge = _onnx_edge(checkpoint)
    deployed = codec.server_runtime  # onnxruntime when bench attached it (the server's default), else None
    teachers_onnx = _teachers_onnx(codec, x)
    with torch.no_grad():
        for label, n in (("1thread", 1), ("default", None)):
            with threads(n):
                n_now = torch.get_num_threads()
                out[f"encoder_tensor_s_{label}"] = median_time(lambda: codec.encoder(x), reps)
                # the device side, interleaved: PyTorch edge, the deployed ONNX edge (same bytes) and full local
                fns = {"encode": lambda: codec.encode(frame),
                       "three_models": lambda: [m(x) for m in (t.detect, t.semantic, t.classify)]}
                if onnx_edge is not None:
                    edge_rt = onnx_edge(n_now)
                    fns["encode_onnx"] = lambda: edge_rt.encode(frame)
                for key, v in interleaved_medians(fns, reps).items():
                    out[f"{key}_s_{label}"] = v
                # the server paths side by side, interleaved, every runtime at the same thread count
                fns = {"shared_multitask": lambda: codec.teachers_on_frames(frame),
                       "server_split_torch": lambda: _with_runtime(codec, None,
                                                                   lambda: codec.heads(codec.decode(enc)))}
                if deployed is not None:
                    from codec.server_onnx import OnnxServer

                    split_rt = OnnxServer(deployed.path, codec.fingerprint, threads=n_now)
                    fns["server_split"] = lambda: _with_runtime(codec, split_rt,
                                                                lambda: codec.heads(codec.decode(enc)))
                if teachers_onnx is not None:
                    sess = _ort_session(teachers_onnx, n_now)
                    fns["shared_multitask_onnx"] = lambda: _teachers_onnx_heads(codec, sess, frame)
                for key, v in interleaved_medians(fns, reps).items():
                    out[f"{key}_s_{label}"] = v
                if deployed is None:
                    out[f"server_split_s_{label}"] = out[f"server_split_torch_s_{label}"]
        out["torch_threads_default"] = torch.get_num_threads()
    out["server_runtime"] = "onnxruntime" if deployed is not None else "torch"
    out["jpeg_quality"] = jpeg_q
    _, _, out["jpeg_encode_s"], out["jpeg_decode_s"] = media.image_roundtrip(frames[:min(len(frames), 32)],
                                                                            "jpeg", jpeg_q)
    out["h264_crf"] = video_crf
    _, _, out["h264_encode_s"], out["h264_decode_s"] = media.video_roundtrip(frames, "h264", video_crf)
    if cfg["probes"]:
        out["edge_process"] = probe("edge", checkpoint, max(5, reps))
        out["local_process"] = probe("local", checkpoint, max(5, reps))
        from codec.edge_onnx import edge_paths

        onnx_path = edge_paths(checkpoint)[0]
        if onnx_path.is_file():
            out["edge_onnx_process"] = probe("edge-onnx", str(onnx_path), max(5, reps))
        else:
            log.warning("no ONNX edge export beside %s (python -m codec.edge_onnx --checkpoint %s)", checkpoint,
                        checkpoint)
    out["encoder_speedup_vs_local_1thread"] = out["three_models_s_1thread"] / out["encode_s_1thread"]
    if "encode_onnx_s_1thread" in out:
        out["onnx_edge_speedup_vs_local_1thread"] = out["three_models_s_1thread"] / out["encode_onnx_s_1thread"]
    log.info("device cost: %s", {k: v for k, v in out.items() if not isinstance(v, dict)})
    return out

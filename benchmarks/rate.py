"""Rate versus accuracy per task on a fresh conveyor-line video with exact ground truth.

Every method's frames end up at the same teachers (or, for the split model, at its decoder and the teachers'
shared body and heads); metrics come from :class:`codec.metrics.TaskMetrics` and the helpers of
:mod:`codec.evaluate`, exactly as ``run_pipeline.py eval`` computes them.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from benchmarks import media
from codec.evaluate import suite_footage
from codec.metrics import TaskMetrics
from transport.wire import HEADER_SIZE

log = logging.getLogger("bench")
METRICS = ("box_map50_95", "miou", "top1")


def eval_frames(frames: int, seed: int, size: int) -> tuple[np.ndarray, list]:
    """Fresh frames and truth of eval's headline suite (held-out belt families, unseen garments, through H.264
    like a real recording), the same footage ``run_pipeline.py eval`` scores."""
    return suite_footage("heldout", frames, seed, size)


def score(codec, results: list[dict], truth: list) -> dict:
    m = TaskMetrics(len(codec.class_names["detection"]), len(codec.class_names["segmentation"]))
    for r, gt in zip(results, truth):
        m.add_frame(r, gt)
    s = m.summary()
    return {k: float(s.get(k, 0.0)) for k in METRICS}


def _teachers(codec, frames: np.ndarray, batch: int) -> list[dict]:
    out = []
    for i in range(0, len(frames), batch):
        out += codec.teachers_on_frames(frames[i:i + batch], conf=0.001)
    return out


def _point(method: str, setting: str, sizes, metrics: dict, **extra) -> dict:
    sizes = np.asarray(sizes, dtype=np.float64)
    return {"method": method, "setting": setting, "bytes_mean": float(sizes.mean()),
            "bytes_p95": float(np.percentile(sizes, 95)), **metrics, **extra}


def rate_accuracy(codecs: dict, frames: np.ndarray, truth: list, cfg: dict) -> list[dict]:
    """One row per (method, setting): mean bytes per frame on the wire and the three task metrics."""
    batch = cfg["batch"]
    ref = next(iter(codecs.values()))  # teachers for the baselines (every checkpoint of one run shares them)
    rows = []
    t0 = time.perf_counter()
    raw = _teachers(ref, frames, batch)
    rows.append(_point("teachers (raw frames)", "uncompressed", [frames[0].nbytes] * len(frames),
                       score(ref, raw, truth)))
    log.info("teachers on raw frames: %s", rows[-1])
    for name, codec in codecs.items():
        sizes, est, results = [], [], []
        for i in range(0, len(frames), batch):
            chunk = frames[i:i + batch]
            enc, estimate = codec.encode_with_estimate(chunk)
            sizes += [len(e.payload) + HEADER_SIZE for e in enc]
            est += estimate
            results += codec.heads(codec.decode(enc), conf=0.001)
        metrics = score(codec, results, truth)
        payload = np.asarray(sizes, dtype=np.float64) - HEADER_SIZE
        rows.append(_point("split (ours, one bitstream)", name, sizes, metrics,
                           payload_bytes_mean=float(payload.mean()), estimate_bytes_mean=float(np.mean(est)),
                           payload_vs_estimate=float(payload.sum() / max(np.sum(est), 1e-9))))
        rows.append(_point("per-task bitstreams (3x split)", name, [3 * s for s in sizes], metrics))
        log.info("split %s: %s", name, rows[-2])
    for fmt, key in (("jpeg", "jpeg_qualities"), ("webp", "webp_qualities")):
        for q in cfg[key]:
            dec, sizes, _, _ = media.image_roundtrip(frames, fmt, q)
            label = {"jpeg": "JPEG", "webp": "WebP"}[fmt] + " frames"
            rows.append(_point(label, f"q{q}", sizes, score(ref, _teachers(ref, dec, batch), truth)))
            log.info("%s q%d: %s", fmt, q, rows[-1])
    for kind, key in (("h264", "h264_crf"), ("h265", "h265_crf")):
        if not cfg[key]:
            continue
        if not media.video_available(kind):
            log.warning("%s not available in this PyAV build; skipped", kind)
            continue
        for crf in cfg[key]:
            dec, sizes, _, _ = media.video_roundtrip(frames, kind, crf)
            rows.append(_point(kind.upper().replace("H", "H.") + " stream", f"crf{crf}", sizes,
                               score(ref, _teachers(ref, dec, batch), truth)))
            log.info("%s crf %d: %s", kind, crf, rows[-1])
    log.info("rate/accuracy: %d points in %.0f s", len(rows), time.perf_counter() - t0)
    return rows


def monotone_accuracy(cands: list[dict], key: str) -> list[float]:
    """``key`` of ``cands`` (sorted by bytes) fitted non-decreasing in bytes (isotonic regression).

    A baseline's accuracy rises with its bytes in expectation; on a few dozen frames a point can dip below a cheaper
    one (JPEG q70 under q50), and matching on the raw points lets that noise choose the setting. The fit pools such
    dips with their neighbours, so a match needs the trend to reach the split model, not one lucky point."""
    from scipy.optimize import isotonic_regression

    return [float(v) for v in isotonic_regression([r[key] for r in cands], increasing=True).x]


def matches(rows: list[dict], split_row: dict, method: str, tol: float = 1.0) -> dict:
    """Cheapest setting of ``method`` within ``tol`` points of ``split_row`` on every task, and per task.

    Baselines are matched on their accuracy fitted monotone in bytes (``monotone_accuracy``); the per-task
    bitstreams are the split model's own points, matched as they are."""
    cands = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bytes_mean"])
    if method.startswith("per-task"):  # the same encoder's bitstream sent three times: compare at the same beta
        cands = [r for r in cands if r["setting"] == split_row["setting"]]
        fitted = {k: [r[k] for r in cands] for k in METRICS}
    else:
        fitted = {k: monotone_accuracy(cands, k) if cands else [] for k in METRICS}
    out = {"method": method}
    for task in (*METRICS, "all"):
        keys = METRICS if task == "all" else (task,)
        ok = [i for i, r in enumerate(cands) if all(fitted[k][i] >= split_row[k] - tol for k in keys)]
        if ok:
            best = cands[ok[0]]  # sorted by bytes: the first that reaches is the cheapest
            out[task] = {"setting": best["setting"], "bytes_mean": best["bytes_mean"],
                         "split_over_baseline": split_row["bytes_mean"] / best["bytes_mean"],
                         "fitted": {k: round(fitted[k][ok[0]], 2) for k in keys}}
        else:
            top = cands[-1] if cands else None
            out[task] = {"setting": None, "bytes_mean": None, "split_over_baseline": None,
                         "note": "no setting reaches the split model's accuracy"
                         + (f" (largest: {top['setting']}, {top['bytes_mean']:.0f} B)" if top else "")}
    return out

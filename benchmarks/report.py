"""The bench's outputs: computed targets, PNG plots and the Markdown report."""
from __future__ import annotations

from pathlib import Path

TASK_LABELS = {"box_map50_95": "box mAP50-95", "miou": "mIoU", "top1": "top-1"}


def targets(rows, comparisons, default_name, dev, lat) -> dict:
    """The issue's targets, computed (never asserted) for the default operating point."""
    comp = comparisons[default_name]
    out = {}
    for method, key, want in (("JPEG frames", "bytes_vs_jpeg", 0.1), ("H.264 stream", "bytes_vs_h264", None),
                              ("per-task bitstreams (3x split)", "bytes_vs_per_task", None),
                              ("WebP frames", "bytes_vs_webp", None)):
        c = comp.get(method, {}).get("all", {})
        ratio = c.get("split_over_baseline")
        out[key] = {"ratio": ratio, "baseline_setting": c.get("setting"), "want_at_most": want,
                    "met": (ratio is not None and ratio <= want) if want else None,
                    "note": c.get("note")}
    # the deployed edge (ONNX, same bytes) when the checkpoint has one, else the PyTorch edge; both interleaved
    # with the three local models at one thread
    edge = "onnx" if "encode_onnx_s_1thread" in dev else "torch"
    ratio = dev["encode_onnx_s_1thread" if edge == "onnx" else "encode_s_1thread"] / dev["three_models_s_1thread"]
    out["device_time_vs_local"] = {"ratio": ratio, "want_at_most": 0.1, "met": ratio <= 0.1, "edge": edge,
                                   "torch_edge_ratio": dev["encode_s_1thread"] / dev["three_models_s_1thread"]}
    bws = lat["bandwidths_mbps"]
    if 5 in bws:
        i = bws.index(5)
        split = next(v for k, v in lat["total_s"].items() if k.startswith("split"))[i]
        jpeg = next(v for k, v in lat["total_s"].items() if k.startswith("offload JPEG"))[i]
        red = 1 - split / jpeg
        out["latency_reduction_vs_jpeg_at_5mbps"] = {"reduction": red, "want_at_least": 0.8, "met": red >= 0.8}
        out["latency_vs_jpeg_at_5mbps"] = {"split_s": split, "jpeg_s": jpeg, "met": split <= jpeg}
    sc = lat["scenarios"]
    s_split = next(v for k, v in sc.items() if k.startswith("split"))
    s_jpeg = next(v for k, v in sc.items() if k.startswith("offload JPEG"))
    out["split_wins_vs_jpeg"] = crossover_mbps(s_split, s_jpeg)
    return out


def crossover_mbps(split: dict, other: dict) -> dict:
    """Where ``split`` has the lower modelled latency than ``other`` (scenarios: device_s, bytes, server_s):
    ``below_mbps`` (it wins on any link slower than this), or ``every_bandwidth`` / ``no_bandwidth``."""
    fixed = (split["device_s"] + split["server_s"]) - (other["device_s"] + other["server_s"])
    saved_bits = 8 * (other["bytes"] - split["bytes"])
    if saved_bits > 0 and fixed <= 0:
        return {"every_bandwidth": True}
    if saved_bits <= 0 and fixed >= 0:
        return {"no_bandwidth": True}
    if saved_bits > 0:
        return {"below_mbps": saved_bits / fixed / 1e6}
    return {"above_mbps": saved_bits / fixed / 1e6}


def plots(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rate_accuracy"]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)]
    files = []
    for key, label in TASK_LABELS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for m in methods:
            pts = sorted((r["bytes_mean"], r[key]) for r in rows if r["method"] == m)
            if m.startswith("teachers"):
                ax.axhline(pts[0][1], color="k", ls=":", lw=1, label=f"{m}")
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("bytes per frame on the wire (log)")
        ax.set_ylabel(label)
        ax.set_title(f"rate vs {label} ({result['config']['frames']} frames, {result['config']['input_size']} px)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"rate_{key}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    lat = result["latency"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, vals in lat["total_s"].items():
        ax.plot(lat["bandwidths_mbps"], [1e3 * v for v in vals], marker="o", label=name)
    for r in (lat.get("links") or {}).get("rows", []):
        if r["mbps"] and r["payload"].startswith("split") and "measured_s_median" in r:
            ax.scatter([r["mbps"]], [1e3 * r["measured_s_median"]], marker="x", color="k", zorder=5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("uplink Mbit/s")
    ax.set_ylabel("end-to-end latency per frame, ms (model)")
    ax.set_title("latency vs bandwidth")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    files.append("latency.png")
    return files


def _f(v, fmt="{:.1f}"):
    return "n/a" if v is None else fmt.format(v)


def markdown(r: dict) -> str:
    m, cfg, dev, lat, ent, tg = r["machine"], r["config"], r["device"], r["latency"], r["entropy_coding"], r["targets"]
    foot = cfg.get("footage", {})
    L = ["# Benchmarks: where split computing wins", "",
         f"- date: {r['date']}",
         f"- machine: {m['nproc']} CPUs ({m['cpu']}), torch {m['torch']} ({m['torch_threads']} threads), "
         f"Python {m['python']}",
         f"- command: `{r['command']}`",
         f"- checkpoints: {', '.join(f'`{c}`' for c in cfg['checkpoints'])}; default operating point "
         f"**{cfg['default_point']}**",
         f"- data: eval's held-out footage ({foot.get('lines', '?')} fresh lines of the held-out belt families, "
         f"unseen garments, every {foot.get('frame_stride', '?')}th video frame), {cfg['frames']} frames, "
         f"seed {cfg['seed']}, {cfg['input_size']} px, "
         f"exact ground truth; run time {r['seconds']:.0f} s" + (" (**--quick**: few frames, numbers are noisy)"
                                                               if cfg["quick"] else ""),
         "", "## Targets (computed)", "",
         "| target | value | wanted | met |", "|---|---|---|---|"]
    for key, label in (("bytes_vs_jpeg", "bytes vs JPEG at equal accuracy"),
                       ("bytes_vs_webp", "bytes vs WebP at equal accuracy"),
                       ("bytes_vs_h264", "bytes vs H.264 at equal accuracy"),
                       ("bytes_vs_per_task", "bytes vs three per-task bitstreams")):
        t = tg[key]
        val = (f"{t['ratio']:.3f}x ({t['baseline_setting']})" if t["ratio"] is not None
               else (t.get("note") or "n/a"))
        L.append(f"| {label} | {val} | {'<= ' + str(t['want_at_most']) if t['want_at_most'] else '-'} | "
                 f"{'-' if t['met'] is None else ('yes' if t['met'] else 'no')} |")
    t = tg["device_time_vs_local"]
    which = ("ONNX edge; PyTorch edge " + f"{t['torch_edge_ratio']:.3f}x" if t.get("edge") == "onnx"
             else "PyTorch edge")
    L.append(f"| device time vs full local (1 thread, {which}) | {t['ratio']:.3f}x | <= 0.1 | "
             f"{'yes' if t['met'] else 'no'} |")
    if "latency_reduction_vs_jpeg_at_5mbps" in tg:
        t = tg["latency_reduction_vs_jpeg_at_5mbps"]
        L.append(f"| latency at 5 Mbit/s, reduction vs JPEG offload | {100 * t['reduction']:.1f} % | >= 80 % | "
                 f"{'yes' if t['met'] else 'no'} |")
        t = tg["latency_vs_jpeg_at_5mbps"]
        L.append(f"| latency at 5 Mbit/s, split vs JPEG offload | {1e3 * t['split_s']:.1f} vs {1e3 * t['jpeg_s']:.1f} "
                 f"ms | split <= JPEG | {'yes' if t['met'] else 'no'} |")
    if "split_wins_vs_jpeg" in tg:
        w = tg["split_wins_vs_jpeg"]
        where = ("every bandwidth" if w.get("every_bandwidth") else "no bandwidth" if w.get("no_bandwidth") else
                 f"below {w['below_mbps']:.1f} Mbit/s" if "below_mbps" in w else f"above {w['above_mbps']:.1f} Mbit/s")
        L.append(f"| where split beats JPEG offload on latency (model) | {where} | - | - |")
    L += ["", "Equal accuracy: the cheapest setting of the baseline whose box mAP50-95, mIoU and top-1 are all within "
          "1 point of the split model's, each taken from the baseline's accuracy fitted non-decreasing in bytes "
          "(isotonic regression: a point that dips below a cheaper one on these few frames is pooled with it, so "
          "noise does not pick the match; per-task matches and fitted values are in `results.json` under "
          "`comparisons`). A ratio below 1 means the split model sends fewer bytes.",
          "", "## Rate versus accuracy", "",
          "Bytes are bytes on the wire per frame: the split model's entropy-coded payload plus the "
          "74-byte `transport.wire` header (`HEADER_SIZE`); JPEG/WebP the encoded file; H.264/H.265 the packets of "
          "each frame of one low-latency stream (no B-frames, `tune=zerolatency`, key frame every 2 s, preset "
          "veryfast), averaged over the stream. Baselines are decoded on the server and fed to the same teachers.",
          "",
          "**Per-task bitstreams** are *not* separately trained single-task encoders: the row sends the split "
          "model's own bitstream three times (3x the bytes at the same accuracy), the cost of three single-task "
          "encoders at that rate, as in Entropic Student's one-encoder-per-task deployment. Training per-task "
          "students did not fit the time; real single-task encoders could be somewhat smaller each.", "",
          "| method | setting | bytes/frame | box mAP50-95 | mIoU | top-1 |", "|---|---|---:|---:|---:|---:|"]
    for row in r["rate_accuracy"]:
        L.append(f"| {row['method']} | {row['setting']} | {row['bytes_mean']:.0f} | {row['box_map50_95']:.1f} | "
                 f"{row['miou']:.1f} | {row['top1']:.1f} |")
    L += ["", "Split-model payloads, real versus the entropy model's estimate (header excluded):", "",
          "| point | payload bytes | estimate | real/estimate |", "|---|---:|---:|---:|"]
    for row in r["rate_accuracy"]:
        if row["method"].startswith("split"):
            L.append(f"| {row['setting']} | {row['payload_bytes_mean']:.0f} | {row['estimate_bytes_mean']:.0f} | "
                     f"{row['payload_vs_estimate']:.4f} |")
    L += ["", "![box](rate_box_map50_95.png) ![miou](rate_miou.png) ![top1](rate_top1.png)", "",
          "## Device cost", "",
          f"Batch 1, warm, median of {cfg['timing_repeats']} runs; the two edges and the three local models "
          f"interleaved, turn by turn. \"1 thread\" emulates a weak device "
          f"(`torch.set_num_threads(1)`); \"default\" uses {dev['torch_threads_default']} threads.", "",
          "| | parameters | MACs/frame | time 1 thread (ms) | time default (ms) |", "|---|---:|---:|---:|---:|",
          f"| split encoder (tensor part) | {dev['encoder_params']:,} (+{dev['entropy_model_params']:,} entropy model) "
          f"| {dev['encoder_macs'] / 1e6:.1f} M | {1e3 * dev['encoder_tensor_s_1thread']:.2f} | "
          f"{1e3 * dev['encoder_tensor_s_default']:.2f} |",
          f"| split encoder + entropy coding, PyTorch edge (`codec.encode`) | | | "
          f"{1e3 * dev['encode_s_1thread']:.2f} | {1e3 * dev['encode_s_default']:.2f} |",
          *([f"| split encoder + entropy coding, ONNX edge (`codec.edge_onnx`, same bytes) | | | "
             f"{1e3 * dev['encode_onnx_s_1thread']:.2f} | {1e3 * dev['encode_onnx_s_default']:.2f} |"]
            if "encode_onnx_s_1thread" in dev else []),
          f"| full local: three full YOLO models | {dev['teacher_params_three_models']:,} | "
          f"{_f(dev.get('three_models_macs') and dev['three_models_macs'] / 1e6, '{:.0f} M')} | "
          f"{1e3 * dev['three_models_s_1thread']:.2f} | {1e3 * dev['three_models_s_default']:.2f} |",
          f"| local, shared backbone + 3 heads (ours, for reference) | {dev['teacher_params_shared']:,} | | "
          f"{1e3 * dev['shared_multitask_s_1thread']:.2f} | {1e3 * dev['shared_multitask_s_default']:.2f} |",
          f"| JPEG encode q{dev['jpeg_quality']} (OpenCV) | | | {1e3 * dev['jpeg_encode_s']:.2f} | |",
          f"| H.264 encode crf{dev['h264_crf']} (libx264, per frame of the stream) | | | "
          f"{1e3 * dev['h264_encode_s']:.2f} | |",
          f"| server: decode + shared body + 3 heads (split, {dev.get('server_runtime', 'torch')}) | | | "
          f"{1e3 * dev['server_split_s_1thread']:.2f} | {1e3 * dev['server_split_s_default']:.2f} |"]
    for key, label in (("server_split_torch", "server: the same on eager PyTorch (split)"),
                       ("shared_multitask_onnx", "server for offload: the teachers on a decoded frame, onnxruntime")):
        if f"{key}_s_1thread" in dev:
            L.append(f"| {label} | | | {1e3 * dev[f'{key}_s_1thread']:.2f} | {1e3 * dev[f'{key}_s_default']:.2f} |")
    best_teachers = min(dev[f"{k}_s_1thread"] for k in ("shared_multitask", "shared_multitask_onnx")
                        if f"{k}_s_1thread" in dev)
    L += ["", "Server rows and the shared-backbone row are timed interleaved (turn by turn) at the same thread count. "
          f"Split server at 1 thread: {dev['server_split_s_1thread'] / best_teachers:.2f}x the teachers on a "
          "decoded frame (their faster runtime); the split decoder has more MACs than the teachers' stem it "
          "replaces.", ""]
    if "edge_process" in dev:
        e, lo = dev["edge_process"], dev["local_process"]
        L += ["Each device process measured alone (its own VmHWM, one thread):", "",
              "| device process | imports | load s | encode ms/frame | peak RSS MB |", "|---|---|---:|---:|---:|",
              f"| edge, PyTorch (`codec.api.load_edge`) | torch, compressai | {e['load_s']:.2f} | "
              f"{1e3 * e['encode_s_median']:.2f} | {e['peak_rss_mb']:.0f} |"]
        o = dev.get("edge_onnx_process")
        if o:
            L.append(f"| edge, ONNX (`codec.edge_onnx`, same bytes) | onnxruntime, constriction"
                     f"{', torch' if o['imports_torch'] else ''} | {o['load_s']:.2f} | "
                     f"{1e3 * o['encode_s_median']:.2f} | {o['peak_rss_mb']:.0f} |")
        L += [f"| full local: the three YOLO models | torch, ultralytics | | {1e3 * lo['three_models_s_median']:.1f} "
              f"| {lo['peak_rss_mb']:.0f} |", ""]
    L += ["## End-to-end latency", "",
          "Model: device time (1 thread) + bytes x 8 / bandwidth + server time (the faster of 1 thread and default "
          "threads on this machine; with 2 cores shared with other jobs, multi-threaded timings are noisy). Offload "
          "baselines send the JPEG/H.264 setting that matches the split model's accuracy (or, when none does, "
          "their largest); their server time is decode + the shared-backbone teachers.", "",
          "| scenario | device ms | bytes | server ms | " + " | ".join(f"{b} Mbit/s" for b in lat["bandwidths_mbps"])
          + " |", "|---|---:|---:|---:|" + "---:|" * len(lat["bandwidths_mbps"])]
    for name, s in lat["scenarios"].items():
        L.append(f"| {name} | {1e3 * s['device_s']:.2f} | {s['bytes']:.0f} | {1e3 * s['server_s']:.2f} | "
                 + " | ".join(f"{1e3 * v:.1f} ms" for v in lat["total_s"][name]) + " |")
    L += ["", "![latency](latency.png)", ""]
    links = lat.get("links")
    if links:
        L += [f"Model against measurement ({links['mode']}; {links['transport']}; `tc qdisc ... tbf rate R burst "
              f"32kbit latency 50ms` on the sender's veth; one message at a time, one-way time from `sent_ns` to "
              f"arrival, both namespaces on one clock):", "",
              "| payload | Mbit/s | wire bytes | measured median ms | p90 ms | model ms | model with 4 KB burst ms "
              "| back-to-back ms/message |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for x in links["rows"]:
            if "error" in x:
                L.append(f"| {x['payload']} | {x['mbps']} | failed: {x['error'][:120]} | | | | | |")
                continue
            L.append(f"| {x['payload']} | {_f(x['mbps'], '{}')} | {x['wire_bytes_mean']:.0f} | "
                     f"{1e3 * x['measured_s_median']:.2f} | {1e3 * x['measured_s_p90']:.2f} | "
                     f"{_f(x['model_s'] and 1e3 * x['model_s'], '{:.2f}')} | "
                     f"{_f(x['model_with_burst_s'] is not None and 1e3 * x['model_with_burst_s'], '{:.2f}')} | "
                     f"{_f(x['back_to_back_s_per_message'] and 1e3 * x['back_to_back_s_per_message'], '{:.2f}')} |")
        L += ["", "The token bucket starts full after each idle gap, so the first 32 kbit (4 KB) of a message pass at "
              "line rate: small payloads arrive faster than bytes/bandwidth, larger ones follow the model minus the "
              "burst. Back-to-back (the bucket drained, the steady state of a live stream) the spacing of arrivals "
              "is the link's real per-frame cost, to compare with the model column (TCP/IP and ZeroMQ framing add "
              "a few percent).", ""]
    else:
        L += ["Shaped-link measurement skipped (--quick or --no-netns).", ""]
    L += ["## Entropy coding throughput", "",
          f"Real latents of {ent['frames']} frames (shape {ent['latent_shape']}), one frame per call, median.", "",
          "| coder | encode ms | decode ms | bytes | lossless |", "|---|---:|---:|---:|---|"]
    for name, c in ent["coders"].items():
        L.append(f"| {name} | {c['encode_ms_median']:.3f} | {c['decode_ms_median']:.3f} | {c['bytes_mean']:.1f} | "
                 f"{c['lossless']} |")
    L += ["", f"constriction vs CompressAI: encode {ent['constriction_speedup_encode']:.2f}x, decode "
          f"{ent['constriction_speedup_decode']:.2f}x faster, size {ent['constriction_size_ratio']:.4f}x. "
          f"The codec's coder (`{ent['codec_entropy_coder']}`, the default since this benchmark) here produces "
          f"byte-identical payloads to `codec.encode`: {ent['coder_matches_codec_payload']}. `compressai-cached` "
          f"is the same rANS as `compressai` with the CDF tables converted to lists once instead of per call.", ""]
    fac = r.get("factory")
    if fac:
        L += ["## Factory stages per frame", "",
              f"`benchmarks/factory_cost.py`: the server path (decode + body + all heads, one frame at a time, "
              f"{fac['threads']} thread) and the factory stages on its results, interleaved over {fac['rounds']} "
              f"rounds of {fac['frames']} frames, medians. {fac['note']}.", "",
              "| | ms per frame |", "|---|---:|", f"| server path | {fac['server_ms_per_frame']:.2f} |"]
        L += [f"| {k} | {v:.3f} |" for k, v in fac["stage_ms_per_frame"].items()]
        L += ["", f"Frame-rate cost if the stages shared the server's core: "
              f"{100 * fac['frame_rate_cost_same_core']:.1f} % (target <= 5 %).", ""]
    return "\n".join(L) + "\n"

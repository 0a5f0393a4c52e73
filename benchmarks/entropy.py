"""Entropy coding throughput on the real latents: CompressAI's rANS against constriction, per frame."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from codec.entropy_coder import CODERS, get_coder, symbols_from_latent

log = logging.getLogger("bench")


def entropy_bench(codec, frames: np.ndarray, repeats: int) -> dict:
    eb = codec.entropy_bottleneck
    with torch.no_grad():
        y = codec.encoder(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(255))
    symbols = symbols_from_latent(eb, y)
    shape = tuple(symbols.shape[1:])
    out = {"frames": int(len(frames)), "latent_shape": list(shape), "coders": {}}
    for name in CODERS:
        coder = get_coder(name, eb)
        enc_t, dec_t, sizes, exact = [], [], [], True
        for r in range(repeats):
            for i in range(len(symbols)):
                s = symbols[i:i + 1]
                t0 = time.perf_counter()
                data = coder.compress(s)
                t1 = time.perf_counter()
                back = coder.decompress(data, shape)
                t2 = time.perf_counter()
                if r == 0:
                    sizes.append(len(data[0]))
                    exact &= bool(np.array_equal(back, s))
                enc_t.append(t1 - t0)
                dec_t.append(t2 - t1)
        out["coders"][name] = {"encode_ms_median": 1e3 * float(np.median(enc_t)),
                               "decode_ms_median": 1e3 * float(np.median(dec_t)),
                               "bytes_mean": float(np.mean(sizes)), "lossless": exact}
    ref = codec.encode(frames[:1])[0].payload
    out["codec_entropy_coder"] = codec.entropy_coder
    # the coder interface reproduces the codec's own payload byte for byte (the wire format is unchanged)
    out["coder_matches_codec_payload"] = get_coder(codec.entropy_coder, eb).compress(symbols[:1])[0] == ref
    c, k = out["coders"]["compressai"], out["coders"]["constriction"]
    out["constriction_speedup_encode"] = c["encode_ms_median"] / max(k["encode_ms_median"], 1e-9)
    out["constriction_speedup_decode"] = c["decode_ms_median"] / max(k["decode_ms_median"], 1e-9)
    out["constriction_size_ratio"] = k["bytes_mean"] / max(c["bytes_mean"], 1e-9)
    log.info("entropy coding: %s", out)
    return out

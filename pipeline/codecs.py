"""Which codec a stage uses, from one string, with one instance per process.

``checkpoint`` values: ``None`` / ``"default"`` -> the shipped model (``codec.api.load_codec(None)``); a file
path -> ``load_codec(path)``; for the edge, a ``.onnx`` path -> ``codec.edge_onnx.OnnxEdgeCodec`` (the device
half without PyTorch: onnxruntime + constriction); ``"random:SIZE[:SEED]"`` -> ``SplitCodec.random(input_size=SIZE, seed=SEED)``,
a randomly initialised model **for plumbing tests only** (the demo never falls back to it). A server codec runs
its decoder, body and heads in onnxruntime (``codec.server_onnx``, exported once per checkpoint and cached beside
it) unless ``LADON_SERVER_RUNTIME=torch`` is set.
Edge and server stages in one process share the instance (it is cached by spec).
"""
from __future__ import annotations

import os
import threading
from typing import Any

import core.offline  # noqa: F401
from core.errors import UsageError

_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def _norm(spec: Any) -> str:
    return "default" if spec in (None, "", "default") else str(spec)


def get_codec(spec: Any = None, edge_only: bool = False):
    key = _norm(spec)
    with _LOCK:
        if (key, "full") in _CACHE:
            return _CACHE[(key, "full")]
        if edge_only and (key, "edge") in _CACHE:
            return _CACHE[(key, "edge")]
        if key.endswith(".onnx"):
            if not edge_only:
                raise UsageError(f"checkpoint {spec!r} is an ONNX edge export: the server needs the full .pt "
                                 f"checkpoint (e.g. models/default.pt)")
            from codec.edge_onnx import EdgeExportError, OnnxEdgeCodec
            try:
                codec = OnnxEdgeCodec(key)
            except (FileNotFoundError, EdgeExportError) as exc:
                raise UsageError(str(exc)) from exc
            _CACHE[(key, "edge")] = codec
            return codec
        try:
            from codec import api
        except ModuleNotFoundError as exc:  # pragma: no cover - codec is part of the project
            raise UsageError(f"the codec package is not available ({exc})") from exc
        if key.startswith("random:"):
            parts = key.split(":")
            try:
                size = int(parts[1])
                seed = int(parts[2]) if len(parts) > 2 else 0
            except (IndexError, ValueError):
                raise UsageError(f"checkpoint {spec!r}: use random:SIZE[:SEED], e.g. random:64") from None
            codec, kind = api.SplitCodec.random(input_size=size, seed=seed), "full"
        else:
            path = None if key == "default" else key
            try:
                if edge_only:
                    codec, kind = api.load_edge(path), "edge"
                else:  # decoder + body + heads in onnxruntime where it passes its check (2.3x), else torch
                    runtime = os.environ.get("LADON_SERVER_RUNTIME", "auto")
                    codec, kind = api.load_codec(path, runtime=runtime), "full"
            except FileNotFoundError as exc:
                raise UsageError(f"{exc}. Pass --checkpoint PATH to use another model.") from exc
            except api.CodecError as exc:
                raise UsageError(str(exc)) from exc
        _CACHE[(key, kind)] = codec
        return codec


def warm_up(codec: Any, decode: bool = False) -> None:
    """One blank frame through ``codec.encode`` (and ``codec.decode`` with ``decode``) before the first real one.

    The first call of onnxruntime or PyTorch allocates and plans: measured on a live 10 fps stream, the first
    frame's server decode took 49-81 ms against 28 ms warm, which a live stream pays as latency (and, with a window
    of 2 frames, as drops). Paying it at start costs the same once, before any camera frame waits on it."""
    import numpy as np

    size = int(codec.input_size)
    encoded = codec.encode(np.zeros((1, size, size, 3), np.uint8))
    if decode:
        codec.decode(encoded)

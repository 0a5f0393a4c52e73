"""The server's tensor work in onnxruntime: decoder + shared body + every task head, one ONNX graph.

Measured on this 2-core machine, one thread each, batch 1, side by side: eager PyTorch (BatchNorm already
fused) 29.0 ms per frame, onnxruntime 12.8 ms (2.3x), raw head outputs within 6e-5 of PyTorch's. Entropy
decoding stays in the codec (constriction); post-processing (NMS, argmax, the derived station label) stays in
PyTorch/numpy on the raw outputs, so every result goes through the same code either way.

The export is made from the loaded checkpoint and cached beside it as ``<stem>.server.onnx`` (or, where that
folder is read-only, under ``$XDG_CACHE_HOME/ladon``): about 13 MB and 10-20 s once per checkpoint and machine,
never committed. It is checked on real conveyor frames (raw outputs within ``atol`` of PyTorch's, else no
export) and carries the model fingerprint and the checkpoint file's SHA-256, so a file from another checkpoint,
or from a retrained one with the same fingerprint (heads retrained on the same student), is refused and made again.

    python -m codec.server_onnx --checkpoint models/default.pt     # export (or check) it ahead of time
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

FORMAT = "ladon-server-onnx"
FORMAT_VERSION = 1
ATOL = 1e-3  # raw head outputs (logits, box distances in pixels): far below what changes a result


class ServerExportError(ValueError):
    """The ONNX graph does not reproduce PyTorch's outputs, or a file is not this checkpoint's export."""


def server_path(checkpoint: str | Path) -> Path:
    """Where the export of ``checkpoint`` lives: beside it when that folder is writable, else in the user cache."""
    p = Path(checkpoint).resolve()
    name = p.name[:-3] if p.name.endswith(".pt") else p.name
    beside = p.with_name(name + ".server.onnx")
    if os.access(p.parent, os.W_OK):
        return beside
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ladon"
    return cache / f"{name}-{hashlib.sha1(str(p).encode()).hexdigest()[:10]}.server.onnx"


class _ServerGraph(torch.nn.Module):
    """latent ``(B, C, h, w)`` -> each task's raw head output (Ultralytics' first output), in ``tasks`` order."""

    def __init__(self, model, tasks: Sequence[str]):
        super().__init__()
        self.model, self.tasks = model, tuple(tasks)

    def forward(self, latent: torch.Tensor):
        from codec.tasks import _first

        cache = self.model.body_from_split(self.model.decoder(latent))
        return tuple(_first(self.model.teachers.head_raw(t, cache)) for t in self.tasks)


def _torch_outputs(codec, latent: torch.Tensor, tasks: Sequence[str]) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in _ServerGraph(codec.model, tasks).eval()(latent)]


def checkpoint_digest(checkpoint: str | Path) -> str | None:
    """SHA-256 of the checkpoint file (None when there is no such file): the fingerprint covers the student and the
    teachers' architecture, not the teachers' weights, so an export records the file it was made from."""
    try:
        return hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    except OSError:
        return None


def export_server(codec, path: str | Path, check_frames: np.ndarray | None = None, atol: float = ATOL,
                  source: str | None = None) -> Path:
    """Export ``codec``'s decoder + body + heads to ``path`` (atomically), after checking onnxruntime reproduces
    PyTorch's raw outputs on real frames within ``atol``; ``source``: the checkpoint's digest, recorded so a
    later load can tell a stale export. Returns the path."""
    import onnx
    import onnxruntime as ort

    from codec.tasks import TASKS

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = tuple(TASKS)
    if check_frames is None:
        from conveyor.line import ConveyorLine, LineConfig

        check_frames = np.stack([f.image for f in ConveyorLine(LineConfig(size=codec.input_size, seed=99)).frames(8)])
    latent = codec.decode_latents(codec.encode(check_frames))
    graph = _ServerGraph(codec.model, tasks).eval()
    grads = [p.requires_grad for p in graph.parameters()]
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        for p in graph.parameters():
            p.requires_grad_(False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's tracer notes (shapes fixed per input size: intended)
            torch.onnx.export(graph, (latent[:1],), str(tmp), input_names=["latent"], output_names=list(tasks),
                              dynamic_axes={"latent": {0: "batch"}, **{t: {0: "batch"} for t in tasks}},
                              opset_version=17, dynamo=False)
        m = onnx.load(str(tmp))
        for k, v in (("format", FORMAT), ("version", str(FORMAT_VERSION)), ("fingerprint", codec.fingerprint.hex()),
                     ("tasks", ",".join(tasks)), ("checkpoint_sha256", source or "")):
            m.metadata_props.add(key=k, value=v)
        onnx.save(m, str(tmp))
        got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"latent": latent.numpy()})
        want = _torch_outputs(codec, latent, tasks)
        for t, g, w in zip(tasks, got, want):
            err = float(np.abs(g - w).max()) if g.shape == w.shape else float("inf")
            if err > atol:
                raise ServerExportError(f"onnxruntime's {t} output differs from PyTorch's by {err:.3g} (shapes "
                                        f"{g.shape} vs {w.shape}, tolerance {atol}); not exported")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        for p, g in zip(graph.parameters(), grads):
            p.requires_grad_(g)
    return path


def _read_meta(path: Path) -> dict[str, str]:
    """An export's metadata (ServerExportError when the file is not a readable ONNX file)."""
    import onnx

    try:
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is "not an export"
        raise ServerExportError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})") from exc


def _refusal(path: Path, meta: dict[str, str], fingerprint: bytes, source: str | None) -> str | None:
    """Why the export at ``path`` is not this model's (``source``: the checkpoint digest, None to skip that
    check), or None when it is: the one check both loading and ``export_ready`` apply."""
    if meta.get("format") != FORMAT or meta.get("version") != str(FORMAT_VERSION):
        return f"{path} is not a {FORMAT} v{FORMAT_VERSION} file"
    if meta.get("fingerprint") != fingerprint.hex():
        return f"{path} was exported from model {meta.get('fingerprint')}, not {fingerprint.hex()}"
    if source is not None and meta.get("checkpoint_sha256") != source:
        return (f"{path} was exported from another file with the same model fingerprint (checkpoint SHA-256 "
                f"{meta.get('checkpoint_sha256') or 'unknown'}, not {source}: retrained heads?)")
    return None


class OnnxServer:
    """An onnxruntime session over an export, for the codec whose fingerprint it carries."""

    def __init__(self, path: str | Path, fingerprint: bytes, threads: int | None = None, source: str | None = None):
        import onnxruntime as ort

        path = Path(path)
        meta = _read_meta(path)
        reason = _refusal(path, meta, fingerprint, source)
        if reason is not None:
            raise ServerExportError(reason)
        self.path, self.tasks = path, tuple(meta.get("tasks", "").split(","))
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def covers(self, tasks: Sequence[str]) -> bool:
        """Whether the export has a head for every task in ``tasks`` (a task registered later has none)."""
        return set(tasks) <= set(self.tasks)

    def raw_outputs(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every task's raw head output for a batch of dequantised latents."""
        outs = self.session.run(None, {"latent": latent.detach().cpu().numpy()})
        return {t: torch.from_numpy(o) for t, o in zip(self.tasks, outs)}


def attach(codec, checkpoint: str | Path, log=None) -> OnnxServer | None:
    """Give ``codec`` its onnxruntime server path: the cached export of ``checkpoint``, made now when missing or
    stale. None (the codec stays on PyTorch, with one line to ``log``) when onnxruntime is missing or the export
    fails its check."""
    say = log or (lambda m: print(m, file=sys.stderr))
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        say(f"server runtime: onnxruntime not installed ({exc}); decoding with PyTorch")
        return None
    path = server_path(checkpoint)
    source = checkpoint_digest(checkpoint)
    try:
        if path.is_file():
            try:
                server = OnnxServer(path, codec.fingerprint, source=source)
                codec.server_runtime = server
                return server
            except ServerExportError as exc:
                say(f"server runtime: {exc}; exporting it again")
        say(f"server runtime: exporting decoder + body + heads to {path} for onnxruntime (once per checkpoint)")
        export_server(codec, path, source=source)
        server = OnnxServer(path, codec.fingerprint, source=source)
    except (ServerExportError, OSError, RuntimeError) as exc:
        say(f"server runtime: no onnxruntime export ({exc}); decoding with PyTorch")
        return None
    codec.server_runtime = server
    return server


def export_ready(checkpoint: str | Path, fingerprint: bytes) -> bool:
    """Whether ``checkpoint``'s export is there and is this model's (its metadata only: no session is made)."""
    path = server_path(checkpoint)
    try:
        meta = _read_meta(path)
    except ServerExportError:  # missing or unreadable: not ready
        return False
    return _refusal(path, meta, fingerprint, checkpoint_digest(checkpoint) or "") is None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="export (or check) the server's onnxruntime graph of a checkpoint")
    ap.add_argument("--checkpoint", default=None, help="full checkpoint (default: models/default.pt)")
    args = ap.parse_args(argv)
    from codec.api import DEFAULT_CHECKPOINT, load_codec

    ckpt = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    codec = load_codec(ckpt, runtime="torch")
    server = attach(codec, ckpt)
    if server is None:
        return 1
    print(f"{server.path}: tasks {', '.join(server.tasks)}, model {codec.fingerprint.hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The codec API the pipeline uses: ``encode(frames) -> payloads``, ``decode(payloads) -> features``,
``head(task, features) -> results``, plus checkpoints that carry the CDF tables and a model fingerprint.

A checkpoint is a plain dict saved with ``torch.save`` and loaded with ``weights_only=True`` (no pickled code):
architecture (student spec, teacher YAMLs, input size), weights, entropy-model buffers (the CDF tables, built
once by ``update()`` at export) and the fingerprint. The edge loads only the encoder and the entropy model.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from codec.entropy_coder import get_coder, latent_from_symbols, symbols_from_latent
from codec.payload import EncodedFrame
from codec.student import EdgeEncoder, StudentSpec, count_macs
from codec.tasks import TASKS, get_task  # the registered task names, read live (codec.tasks)
from compressai.entropy_models import EntropyBottleneck
from compressai.models.utils import update_registered_buffers

# The server side (teachers, Ultralytics) is imported lazily: the edge process loads only encoder + entropy model.
CDF_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length")
DEFAULT_ENTROPY_CODER = "constriction"  # 4x faster than CompressAI's rANS at the same size (benchmarks/)
LEGACY_ENTROPY_CODER = "compressai"  # checkpoints that predate the choice
FORMAT = "ladon-split-checkpoint"
FORMAT_VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "default.pt"


class CodecError(ValueError):
    """Bad input to the codec: names what was expected. The caller can drop the item and go on."""


class ForeignBitstreamError(CodecError):
    """A payload made by another model (fingerprint mismatch): its CDF tables are not ours."""


class CheckpointError(CodecError):
    """A checkpoint from another architecture, another format, or without CDF tables."""


@dataclass
class Features:
    """Shared-body output for a batch of frames: Ultralytics layer index -> tensor. Computed once per frame."""

    cache: dict[int, torch.Tensor]
    batch: int
    _raw: dict = field(default_factory=dict, repr=False, compare=False)
    _post: dict = field(default_factory=dict, repr=False, compare=False)
    _locks: dict = field(default_factory=dict, repr=False, compare=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def raw(self, task: str, compute: Callable[[], Any]) -> Any:
        """A head's raw batch output, computed once for these features even when several consumers (threads)
        ask for it: a task derived from others (the station label from the items) reuses their heads' work.
        Each caller gets its own copy of the tensors (Ultralytics' NMS rewrites its input in place)."""
        with self._guard:
            lock = self._locks.setdefault(task, threading.Lock())
        with lock:
            if task not in self._raw:
                self._raw[task] = compute()
            return _copied(self._raw[task])

    def post(self, key: tuple, compute: Callable[[], list]) -> list:
        """A task's post-processed per-frame results, computed once per ``key`` (task, options) for these
        features: the station label reads the segmentation map its consumer also makes. Copied per caller."""
        with self._guard:
            lock = self._locks.setdefault(("post", key), threading.Lock())
        with lock:
            if key not in self._post:
                self._post[key] = compute()
            return _copied(self._post[key])

    def split(self) -> list["Features"]:
        """One Features per frame of this batch, in order (a batch of one: itself): every cache tensor and every
        memoised raw head output (a tensor, or tuples, lists and dicts of them, e.g. what an onnxruntime server
        runtime prefilled) sliced ``[i:i+1]`` along dim 0, so each frame's heads run (or are post-processed) on
        that frame alone, with the same results as on the batch. The slices are views of the batch's tensors (no
        copy; pickling one would write the whole batch's storage). Tensors whose first dimension is not the batch
        are shared as they are."""
        if self.batch == 1:
            return [self]
        with self._guard:
            raw = dict(self._raw)
        return [Features({k: _row(v, i, self.batch) for k, v in self.cache.items()}, 1,
                         {t: _row(r, i, self.batch) for t, r in raw.items()}) for i in range(self.batch)]

    def __getstate__(self) -> dict:  # picklable (to ship features to another process): locks are per process
        return {"cache": self.cache, "batch": self.batch, "_raw": dict(self._raw)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cache"], state["batch"], state["_raw"])


def _map_arrays(x: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to every tensor or array in ``x``, through tuples, lists and dicts; anything else unchanged."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map_arrays(r, fn) for r in x)
    if isinstance(x, dict):
        return {k: _map_arrays(v, fn) for k, v in x.items()}
    return x


def _row(x: Any, i: int, n: int) -> Any:
    """Row ``i`` of a batch of ``n`` (kept as a batch of one) for every tensor or array whose dim 0 is the batch."""
    return _map_arrays(x, lambda a: a[i:i + 1] if a.ndim >= 1 and a.shape[0] == n else a)


def _copied(raw: Any) -> Any:
    """``raw`` with every tensor cloned (NMS may rewrite what it is given)."""
    return _map_arrays(raw, lambda a: a.clone() if isinstance(a, torch.Tensor) else a.copy())


def model_fingerprint(spec: StudentSpec, input_size: int, teacher_yaml: dict, eb: EntropyBottleneck,
                      entropy_coder: str = LEGACY_ENTROPY_CODER) -> bytes:
    """16-byte hash of the architecture, the entropy coder and the entropy model's tables: equal iff bitstreams
    are compatible."""
    h = hashlib.sha256()
    arch = {"spec": spec.to_dict(), "input_size": input_size, "teachers": teacher_yaml, "format": FORMAT_VERSION}
    if entropy_coder != LEGACY_ENTROPY_CODER:
        arch["entropy_coder"] = entropy_coder
    h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    for name in (*CDF_BUFFERS, "quantiles"):
        t = getattr(eb, name).detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.digest()[:16]


def _frames_to_tensor(frames: np.ndarray, size: int) -> torch.Tensor:
    if not isinstance(frames, np.ndarray):
        raise CodecError(f"frames must be a numpy uint8 array (B,{size},{size},3) RGB, got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.dtype != np.uint8:
        raise CodecError(f"frames must have dtype uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[1:] != (size, size, 3):
        raise CodecError(f"frames must have shape (B,{size},{size},3) (letterbox to the model input first), "
                         f"got {frames.shape}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


class _EntropyCoding:
    """Shared encode path of the full codec and the edge-only codec."""

    encoder: EdgeEncoder
    entropy_bottleneck: EntropyBottleneck
    input_size: int
    fingerprint: bytes
    entropy_coder: str
    _coder = None

    @property
    def coder(self):
        """The entropy coder bound to this model's CDF tables (built once)."""
        if self._coder is None:
            self._coder = get_coder(self.entropy_coder, self.entropy_bottleneck)
        return self._coder

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> list[EncodedFrame]:
        """Frames (B,S,S,3) uint8 RGB at the model input size -> one entropy-coded payload per frame."""
        return self._code(self.encoder(_frames_to_tensor(frames, self.input_size)))

    @torch.no_grad()
    def estimate_bytes(self, frames: np.ndarray) -> list[float]:
        """The entropy model's estimate of each frame's payload size (bytes), without coding."""
        return self._estimate(self.encoder(_frames_to_tensor(frames, self.input_size)))

    @torch.no_grad()
    def encode_with_estimate(self, frames: np.ndarray) -> tuple[list[EncodedFrame], list[float]]:
        """``encode`` and ``estimate_bytes`` from one encoder pass (evaluation and benchmarks report both)."""
        y = self.encoder(_frames_to_tensor(frames, self.input_size))
        return self._code(y), self._estimate(y)

    def _code(self, y: torch.Tensor) -> list[EncodedFrame]:
        strings = self.coder.compress(symbols_from_latent(self.entropy_bottleneck, y))
        shape = tuple(int(s) for s in y.shape[1:])
        return [EncodedFrame(bytes(s), shape, self.fingerprint) for s in strings]

    def _estimate(self, y: torch.Tensor) -> list[float]:
        _, lik = self.entropy_bottleneck(y, training=False)
        return [float(v) for v in (-torch.log2(lik).flatten(1).sum(1) / 8.0)]

    @torch.no_grad()
    def latents(self, frames: np.ndarray) -> torch.Tensor:
        """Integer latent symbols (what the entropy coder codes), for checks and benchmarks."""
        x = _frames_to_tensor(frames, self.input_size)
        return self.entropy_bottleneck.quantize(self.encoder(x), "symbols")

    def encoder_stats(self) -> dict:
        return {"encoder_params": sum(p.numel() for p in self.encoder.parameters()),
                "entropy_model_params": sum(p.numel() for p in self.entropy_bottleneck.parameters()),
                "encoder_macs": count_macs(self.encoder, (1, 3, self.input_size, self.input_size))}


class SplitCodec(_EntropyCoding):
    """Everything: encode (edge), decode + shared body (server), heads (consumers)."""

    def __init__(self, model, entropy_coder: str = DEFAULT_ENTROPY_CODER):
        """``model`` is a :class:`codec.model.SplitModel`."""
        self.model = model.eval()
        self.encoder, self.entropy_bottleneck = model.encoder, model.entropy_bottleneck
        self.input_size = model.input_size
        self.entropy_coder = entropy_coder
        if self.entropy_bottleneck._quantized_cdf.numel() == 0:
            self.entropy_bottleneck.update(force=True)
        self.fingerprint = model_fingerprint(model.spec, model.input_size,
                                             model.teachers.yaml_dicts(), self.entropy_bottleneck,
                                             entropy_coder)
        self.class_names = {t: model.teachers.names(t) for t in TASKS}
        self.fused = False
        self.server_runtime = None  # codec.server_onnx.OnnxServer once attached (load_codec(runtime="auto"))
        self.own_heads: set[str] = set()  # tasks answered by their own head even where a derive rule applies
        self.latent_shape = (model.spec.latent_channels, self.input_size // 4, self.input_size // 4)
        self.metadata: dict = {}

    # ------------------------------------------------------------- construction
    @classmethod
    def random(cls, input_size: int = 64, seed: int = 0, spec: StudentSpec | None = None,
               entropy_coder: str = DEFAULT_ENTROPY_CODER) -> "SplitCodec":
        """Randomly initialised model of the default architecture: for plumbing tests, never for results."""
        from codec.model import SplitModel
        from codec.teachers import MultiTaskTeachers, TeacherSpec

        torch.manual_seed(seed)
        teachers = MultiTaskTeachers.from_spec(TeacherSpec(input_size=input_size))
        model = SplitModel(teachers, spec, input_size)
        model.entropy_bottleneck.update(force=True)
        return cls(model, entropy_coder)

    # ------------------------------------------------------------- server side
    @torch.no_grad()
    def decode(self, encoded: Sequence[EncodedFrame]) -> Features:
        """Entropy-decode, run the decoder and the shared body once for the batch."""
        y_hat = self.decode_latents(encoded)
        runtime = self.server_runtime
        if runtime is not None and runtime.covers(TASKS):  # onnxruntime: every head's raw output at once
            features = Features({}, len(encoded))
            features._raw.update(runtime.raw_outputs(y_hat))
            return features
        cache = self.model.body_from_split(self.model.decoder(y_hat))
        return Features(cache, len(encoded))

    @torch.no_grad()
    def decode_latents(self, encoded: Sequence[EncodedFrame]) -> torch.Tensor:
        """Entropy-decode only: the dequantised latent (B,C,h,w), bit-identical on any machine."""
        if not encoded:
            raise CodecError("decode() needs at least one EncodedFrame")
        for i, e in enumerate(encoded):
            self.check_encoded(e, i)
        try:
            symbols = self.coder.decompress([e.payload for e in encoded], self.latent_shape)
        except (ValueError, RuntimeError) as exc:
            raise CodecError(f"payload does not decode with the {self.entropy_coder} coder: {exc}") from exc
        return latent_from_symbols(self.entropy_bottleneck, symbols)

    def check_encoded(self, e: EncodedFrame, i: int = 0) -> None:
        """The checks ``decode`` makes on each payload before decoding (type, model fingerprint, latent shape, not
        empty); CodecError naming item ``i`` otherwise. A payload that passes may still fail to entropy-decode."""
        if not isinstance(e, EncodedFrame):
            raise CodecError(f"item {i} is a {type(e).__name__}, expected EncodedFrame")
        if e.fingerprint is not None and e.fingerprint != self.fingerprint:
            raise ForeignBitstreamError(
                f"payload {i} was made by model {e.fingerprint.hex()}, this decoder holds the CDF tables of "
                f"{self.fingerprint.hex()}; load the checkpoint the edge uses")
        if tuple(e.latent_shape) != self.latent_shape:
            raise CodecError(f"payload {i} declares latent shape {tuple(e.latent_shape)}, "
                             f"expected {self.latent_shape}")
        if not e.payload:
            raise CodecError(f"payload {i} is empty")

    @torch.no_grad()
    def head(self, task: str, features: Features, conf: float = 0.25) -> list:
        """One task's per-frame results (the forms: each task's ``result`` in :mod:`codec.tasks`)."""
        if task not in TASKS:
            raise CodecError(f"unknown task {task!r}; expected one of {TASKS}")
        return self._results(task, features, conf)

    def derives(self, task: str) -> bool:
        """Whether ``task``'s results come from other tasks' results (its ``derive`` hook) rather than its own
        head alone: the station label is read off the detected items when the checkpoint's classifier is a
        station classifier, and the segmentation's garment classes off the detected items when its classes are
        the detector's. Naming a task in ``own_heads`` answers it from its own head only."""
        t = get_task(task)
        return (t.derive is not None and task not in self.own_heads
                and (t.derive_applies is None or t.derive_applies(self.model.teachers)))

    def _results(self, task: str, features: Features, conf: float) -> list:
        """One task's per-frame results from its raw head output (or, derived, from other tasks' results); raw
        outputs and post-processed results memoised in ``features`` so no consumer repeats another's work."""
        from codec.teachers import postprocess

        def results(name: str, c: float) -> list:
            key = (name, c if get_task(name).uses_conf else None)
            raw = lambda: features.raw(name, lambda: self.model.teachers.head_raw(name, features.cache))  # noqa: E731
            return features.post(key, lambda: postprocess(name, raw(), self.input_size, conf=c,
                                                          end2end=self._end2end))

        if self.derives(task):
            t = get_task(task)
            return t.derive({name: results(name, t.derive_conf) for name in t.derive_inputs}, self.input_size)
        return results(task, conf)

    def heads(self, features: Features, tasks: Sequence[str] = TASKS, conf: float = 0.25) -> list[dict]:
        """All requested heads, regrouped per frame: [{task: result}, ...]."""
        per_task = {t: self.head(t, features, conf=conf) for t in tasks}
        return [{t: per_task[t][i] for t in tasks} for i in range(features.batch)]

    @torch.no_grad()
    def teachers_on_frames(self, frames: np.ndarray, tasks: Sequence[str] = TASKS, conf: float = 0.25) -> list[dict]:
        """The reference: the teachers run on the raw frames (no compression)."""
        x = _frames_to_tensor(frames, self.input_size)
        features = Features(self.model.teachers.backbone(x), x.shape[0])
        per_task = {t: self.head(t, features, conf=conf) for t in tasks}
        return [{t: per_task[t][i] for t in tasks} for i in range(x.shape[0])]

    def fuse(self) -> "SplitCodec":
        """Fold every BatchNorm into its convolution (Ultralytics' ``fuse``) for inference: about 10 % less server
        time, results equal within float rounding. A fused codec cannot be saved (its weights no longer match the
        architecture in its YAMLs); load_codec fuses by default."""
        if not self.fused:
            t = self.model.teachers
            for m in (t.detect, t.semantic, t.classify):  # shared backbone modules are fused once, by the first
                m.fuse()
            self.fused = True
        return self

    @property
    def _end2end(self) -> bool:
        return bool(getattr(self.model.teachers.detect, "end2end", False))

    # ------------------------------------------------------------- checkpoints
    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the full checkpoint (teachers once, student, CDF tables, fingerprint) atomically."""
        if self.fused:
            raise CodecError("this codec's BatchNorms are folded for inference (load_codec(..., fuse=True)); "
                             "save the codec training returns, or load with fuse=False")
        m = self.model
        state = {
            "format": FORMAT, "version": FORMAT_VERSION, "input_size": m.input_size,
            "student_spec": m.spec.to_dict(), "teachers": m.teachers.export_state(),
            "encoder": m.encoder.state_dict(), "entropy_bottleneck": m.entropy_bottleneck.state_dict(),
            "decoder": m.decoder.state_dict(), "fingerprint": self.fingerprint.hex(),
            "entropy_coder": self.entropy_coder, "extra": extra or {},
        }
        return _atomic_save(state, path)

    def save_edge(self, path: str | Path) -> Path:
        """Write what the device needs (encoder, entropy model, fingerprint): well under 1 MB."""
        m = self.model
        state = {"format": FORMAT + "-edge", "version": FORMAT_VERSION, "input_size": m.input_size,
                 "student_spec": m.spec.to_dict(), "encoder": m.encoder.state_dict(),
                 "entropy_bottleneck": m.entropy_bottleneck.state_dict(), "fingerprint": self.fingerprint.hex(),
                 "entropy_coder": self.entropy_coder}
        return _atomic_save(state, path)


class EdgeCodec(_EntropyCoding):
    """The device's half: encoder + entropy model only. Loads from a full or an edge checkpoint."""

    def __init__(self, spec: StudentSpec, input_size: int, encoder_state: dict, eb_state: dict, fingerprint: bytes,
                 entropy_coder: str = LEGACY_ENTROPY_CODER):
        self.spec, self.input_size, self.fingerprint = spec, int(input_size), fingerprint
        self.entropy_coder = entropy_coder
        self.encoder = EdgeEncoder(spec).eval()
        self.encoder.load_state_dict(encoder_state)
        self.entropy_bottleneck = EntropyBottleneck(spec.latent_channels).eval()
        _load_eb(self.entropy_bottleneck, eb_state)
        self.latent_shape = (spec.latent_channels, self.input_size // 4, self.input_size // 4)


def _atomic_save(state: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def _load_eb(eb: EntropyBottleneck, state: dict) -> None:
    missing = [b for b in CDF_BUFFERS if b not in state or state[b].numel() == 0]
    if missing:
        raise CheckpointError(f"checkpoint has no CDF tables ({', '.join(missing)}); run update() at export "
                              f"(codec.api.SplitCodec.save does) and save again")
    prefixed = {f"eb.{k}": v for k, v in state.items()}
    update_registered_buffers(eb, "eb", list(CDF_BUFFERS), prefixed, policy="resize")
    try:
        eb.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"entropy model does not fit this architecture: {str(exc).splitlines()[0]}") from exc


_EXPECTED = (f"expected a split-model checkpoint (a torch dict with format {FORMAT!r}, written by "
             f"`run_pipeline.py train`, like models/default.pt)")


def _unreadable(path: Path, exc: Exception) -> str:
    """Why torch.load refused a file, in a few words from its first bytes (torch's own text runs to 7 lines)."""
    with path.open("rb") as f:
        head = f.read(4)
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    after = [ln for prev, ln in zip(lines, lines[1:]) if prev.endswith("WeightsUnpickler error:")]
    detail = (after or lines or [type(exc).__name__])[0][:120]
    code = "safe_globals" in text or "Unsupported global" in text  # it names a class or function to import
    if not head:
        return "is empty (0 bytes)"
    if code:
        return ("holds pickled code (a whole saved model or object, such as an Ultralytics .pt), which is never "
                "loaded here")
    if head == b"PK\x03\x04":
        return f"is a zip archive but not a readable PyTorch file ({detail})"
    if head[:1] == b"\x80":
        return f"is a pickle but not a readable PyTorch file ({detail})"
    return "is not a PyTorch file (neither a zip archive nor a pickle: random bytes or text?)"


def _read_checkpoint(path: str | Path | None, want_edge_ok: bool) -> dict:
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the checkpoint file itself ({_EXPECTED})")
    if not path.is_file():
        hint = (" (the default model ships in models/; restore it with `git checkout models/` or train one with "
                "`python run_pipeline.py train --config configs/train/default.yaml`)") if path == DEFAULT_CHECKPOINT \
            else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")
    import warnings
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: noise on top of the one-line error
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise CheckpointError(f"checkpoint {path} {_unreadable(path, exc)}; {_EXPECTED}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict with a `format` "
                              f"entry; {_EXPECTED}")
    fmt = state.get("format")
    ok = {FORMAT, FORMAT + "-edge"} if want_edge_ok else {FORMAT}
    if fmt not in ok:
        raise CheckpointError(f"{path} has format {fmt!r}, expected {sorted(ok)} (is it an Ultralytics .pt? "
                              f"teachers go through `train`, not `load_codec`)")
    if state.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {state.get('version')}, this code reads {FORMAT_VERSION}")
    return state


def _coder_name(state: dict, path) -> str:
    from codec.entropy_coder import CODERS

    name = state.get("entropy_coder", LEGACY_ENTROPY_CODER)
    if name not in CODERS:
        raise CheckpointError(f"{path} uses entropy coder {name!r}; this code has {sorted(CODERS)}")
    return name


def load_codec(path: str | Path | None = None, fuse: bool = True, runtime: str = "torch") -> SplitCodec:
    """Load a full checkpoint (None: the shipped default), for inference (``fuse``: BatchNorms folded, see
    :meth:`SplitCodec.fuse`). ``runtime``: where decoder, body and heads run: ``torch``; ``auto``, onnxruntime
    when it is installed and the checkpoint's export passes its check (made and cached on first use,
    :mod:`codec.server_onnx`), else torch; ``onnx``, onnxruntime or a CheckpointError. Raises CheckpointError
    on a foreign or broken file."""
    if runtime not in ("torch", "auto", "onnx"):
        raise CodecError(f"runtime {runtime!r} must be torch, auto or onnx")
    from codec.model import SplitModel
    from codec.teachers import MultiTaskTeachers

    state = _read_checkpoint(path, want_edge_ok=False)
    coder = _coder_name(state, path)
    try:
        spec = StudentSpec.from_dict(state["student_spec"])
        teachers = MultiTaskTeachers.from_state(state["teachers"])
        model = SplitModel(teachers, spec, state["input_size"])
        model.encoder.load_state_dict(state["encoder"])
        model.decoder.load_state_dict(state["decoder"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the architecture: {str(exc).splitlines()[0]}") from exc
    _load_eb(model.entropy_bottleneck, state["entropy_bottleneck"])
    codec = SplitCodec(model, coder)
    codec.metadata = state.get("extra") or {}  # beta, resolved training config, CPU time
    if codec.fingerprint.hex() != state["fingerprint"]:
        raise CheckpointError(f"{path}: stored fingerprint {state['fingerprint']} does not match its tables "
                              f"({codec.fingerprint.hex()}); the file is corrupt or was edited")
    if fuse:
        codec.fuse()
    if runtime != "torch":
        from codec.server_onnx import attach

        if attach(codec, DEFAULT_CHECKPOINT if path is None else path) is None and runtime == "onnx":
            raise CheckpointError(f"{path or DEFAULT_CHECKPOINT}: no onnxruntime server graph (see the line above); "
                                  f"use runtime auto or torch")
    return codec


def load_edge(path: str | Path | None = None) -> EdgeCodec:
    """Load only the encoder and entropy model, from a full or an edge-only checkpoint."""
    state = _read_checkpoint(path, want_edge_ok=True)
    try:
        spec = StudentSpec.from_dict(state["student_spec"])
        return EdgeCodec(spec, state["input_size"], state["encoder"], state["entropy_bottleneck"],
                         bytes.fromhex(state["fingerprint"]), _coder_name(state, path))
    except (RuntimeError, KeyError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: edge weights do not fit the architecture: {str(exc).splitlines()[0]}") \
            from exc

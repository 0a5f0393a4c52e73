"""The stage interface, the messages stages pass, and the stage registry.

A stage is a class with a registry key and three methods::

    class MyStage(Stage):
        key = "sink.mine"                      # how graphs name it
        def __init__(self, **params): ...       # YAML `params:` arrive here; raise UsageError on a bad value
        def open(self, ctx): ...                # sockets, files, models (ctx: StageContext)
        def process(self, msg): ...             # one message in -> None, one message, or a list of messages
        def close(self): ...                    # flush; may return final messages

A stage that works faster on several messages at once (the server's decode: one decoder + body pass for frames
of several streams) sets ``max_batch`` > 1 (and ``max_wait_ms``) and implements ``process_batch(msgs)``: one
output (None, a message or a list, as ``process`` returns) per input, in input order. The runtime
(:mod:`pipeline.graph`) takes the first queued message, then whatever else is queued or arrives within
``max_wait_ms``, up to ``max_batch``, and emits the outputs in input order. If ``process_batch`` raises, the
runtime processes the same messages one by one with ``process`` (so a bad message loses only itself, with the
usual error semantics): ``process_batch`` should leave side effects (losing a frame, counting an error) until
it can no longer fail. ``max_batch`` 1, the default, never batches.

A :class:`Source` has no inputs; it implements ``frames()`` (an iterator of messages) instead of
``process``. Messages are the small dataclasses below; a stage declares the types it ``accepts`` and ``emits``,
and a graph that feeds a stage a type it does not accept is refused when it is parsed (``pipeline.graph``).
Every message derived from a frame carries the frame's envelope as ``meta`` (:class:`FrameMeta`: identity,
timings, run and completion handle; :mod:`pipeline.envelope`); a stage deriving a new message passes
``msg.meta.derive()`` on. Stages learn about the rest of the graph only through their :class:`StageContext`.

Stages are found through the entry-point group ``ladon.stages``: a value ``"my_pkg.module:MyStage"`` names one
stage class (its key is the entry's name), a value without ``:Class`` names a module whose stages register
themselves on import with :func:`register_stage`. The project declares its own modules that way (pyproject.toml);
:data:`BUILTIN_STAGE_MODULES` is the same list, for a checkout used without ``pip install -e .`` or whose install
predates a module. Public registry functions: :func:`register_stage`, :func:`unregister_stage`,
:func:`available_stages`, :func:`get_stage_class`, :func:`create_stage`.
"""
from __future__ import annotations

import importlib
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np

from core.errors import UsageError
from core.geometry import Letterbox  # noqa: F401 - re-exported (its former home)
from pipeline.envelope import Completion, FrameMeta, meta_of  # noqa: F401 - the messages' envelope

ENTRY_POINT_GROUP = "ladon.stages"
DISTRIBUTION = "ladon-stream"  # this project's name in its installed metadata (its entry points are the built-ins)


# --------------------------------------------------------------------------------------------- messages
class _Enveloped:
    """Read-only views of a message's envelope (``self.meta``, a :class:`FrameMeta`): ``msg.stream`` and the
    like keep working, while the envelope stays the one place these fields live."""
    __slots__ = ()

    stream = property(lambda self: self.meta.stream, doc="the edge stream the frame came from")
    index = property(lambda self: self.meta.index, doc="the frame's index in its stream")
    capture_ns = property(lambda self: self.meta.capture_ns, doc="wall clock (ns) when the frame was captured")
    live = property(lambda self: self.meta.live, doc="may be dropped on a full queue (see FrameMeta)")
    timings = property(lambda self: self.meta.timings, doc="stage name -> milliseconds")
    sent_ns = property(lambda self: self.meta.sent_ns, doc="wall clock (ns) when the edge sent the frame")
    received_ns = property(lambda self: self.meta.received_ns, doc="wall clock (ns) when the server received it")
    session = property(lambda self: self.meta.session, doc="the edge run the frame belongs to, or None")


@dataclass
class Frame(_Enveloped):
    """A captured frame. ``image`` is (H, W, 3) uint8 RGB. Its ``meta`` starts the envelope every message
    derived from it carries."""
    meta: FrameMeta
    image: np.ndarray


@dataclass
class Packet(_Enveloped):
    """An encoded frame as it travels: one wire message (header + payload)."""
    meta: FrameMeta
    data: bytes
    eos: bool = False
    image: np.ndarray | None = None  # the original frame, only when edge and server share a process
    header: Any = None  # transport.wire.WireHeader once received
    payload: Any = None  # memoryview of the payload once received


@dataclass
class Features(_Enveloped):
    """The shared body's output for one frame (opaque codec object) plus what the consumers need."""
    meta: FrameMeta
    wire_bytes: int
    latent_shape: tuple[int, int, int]
    letterbox: Letterbox
    features: Any
    image: np.ndarray | None = None


@dataclass
class TaskResult:
    """One consumer's answer for one frame, already mapped to original-frame coordinates."""
    task: str
    source: Features
    result: Any = None
    error: str | None = None
    ms: float = 0.0

    @property
    def meta(self) -> FrameMeta:
        """The envelope of the frame it answers for (its Features')."""
        return self.source.meta


@dataclass
class FrameResult(_Enveloped):
    """Everything known about one frame: what the sinks write."""
    meta: FrameMeta
    done_ns: int
    wire_bytes: int
    latent_shape: tuple[int, int, int]
    size: tuple[int, int]  # original (width, height)
    results: dict[str, Any]
    errors: dict[str, str]
    image: np.ndarray | None = None


@dataclass
class ResultRecord(_Enveloped):
    """A frame's finished JSON object (the JSONL schema), computed elsewhere (the sinks write it as it is)."""
    meta: FrameMeta
    record: dict


@dataclass
class EndOfStream:
    """Sent downstream by the runtime after a stage's inputs have all ended (never passed to process)."""
    reason: str = "end"


# --------------------------------------------------------------------------------------------- interface
@dataclass
class StageContext:
    """What a stage gets at ``open``: its name, the graph's stop event, its counters, a logger, and the typed
    ways it may learn about the rest of the graph (``runtime``, ``committers``): stages share no string-keyed
    state; per-frame facts travel in the messages' envelope (:class:`FrameMeta`)."""
    name: str
    graph: str
    stop: threading.Event
    stats: "StageStats"
    #: free-form objects for third-party stages that agree on a key among themselves; the built-in stages use
    #: none (kept so that plugins written against it keep working)
    shared: dict[str, Any]
    log: Callable[[str], None]
    inputs: list[str] = field(default_factory=list)
    #: send a message downstream from any thread (for stages whose results arrive asynchronously)
    emit: Callable[[Any], None] | None = None
    #: the running graph as stages may see it (status lines, metrics, the codec); None outside a GraphRunner
    runtime: "GraphView | None" = None
    #: the stages downstream of this one that commit frames (``Stage.commits``), decided from the graph when it
    #: is wired: a receive stage acknowledges a frame once all of them wrote it, or on emission when there is none
    committers: tuple["Stage", ...] = ()

    def codec(self) -> Any:
        """The codec a stage of this graph loaded (its class names label results), or None."""
        return self.runtime.codec() if self.runtime is not None else None


@dataclass(frozen=True)
class StageStatus:
    """One stage of a running graph, as status lines and metrics read it."""
    name: str
    key: str
    stats: "StageStats"
    queue_depth: int  # messages waiting at its input (0 for a source)
    failed: str | None  # why it failed, or None


class GraphView:
    """The public, read-only view of a running graph that its stages get as ``ctx.runtime`` (instead of the
    runtime's internals): stage counters, link status, the edges connected, the loaded codec, and the stages up-
    or downstream of a stage (e.g. the sender whose server says which frames are committed)."""

    def stages(self) -> list[StageStatus]:
        """Every stage's counters, queue depth and failure, in graph order."""
        raise NotImplementedError

    def upstream(self, name: str) -> list["Stage"]:
        """The stages feeding stage ``name``, directly or not (nearest first)."""
        raise NotImplementedError

    def downstream(self, name: str) -> list["Stage"]:
        """The stages stage ``name`` feeds, directly or not (nearest first)."""
        raise NotImplementedError

    def link_status(self) -> str | None:
        """One line on the graph's network links (its stages' ``link_status()``), or None without links."""
        raise NotImplementedError

    def edge_links(self) -> dict[int, dict[str, Any]] | None:
        """The edge streams this graph receives (its stages' ``edge_links()``: {stream: {connected, mode, peer}}),
        or None when no stage receives edges."""
        raise NotImplementedError

    def codec(self) -> Any:
        """The codec loaded by a stage that ``provides_codec`` (the decode stage), or None."""
        raise NotImplementedError


@dataclass
class StageStats:
    processed: int = 0
    dropped: int = 0
    errors: int = 0
    busy_s: float = 0.0
    last_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Stage:
    key: ClassVar[str] = ""
    #: message types this stage accepts (checked when a graph is parsed); empty = anything
    accepts: ClassVar[tuple[type, ...]] = ()
    #: message types it emits (checked against each downstream stage's ``accepts``); empty = not declared
    emits: ClassVar[tuple[type, ...]] = ()
    #: runs a neural network (PyTorch / onnxruntime): counts towards the graph's thread budget
    runs_model: ClassVar[bool] = False
    #: when True the runtime calls process(msg) under a try: a raising call loses that message only
    tolerate_errors: ClassVar[bool] = False
    #: completes frames: calls ``msg.meta.commit()`` once a frame is durably written (the JSONL sink). May be
    #: set per instance. A receive stage upstream then acknowledges a frame only after every committer wrote it
    commits: bool = False
    #: its ``codec`` attribute is the graph's codec (``ctx.codec()``: class names for results and drawings)
    provides_codec: ClassVar[bool] = False
    #: dynamic batching (may be set per instance, read once when the graph is built): at most this many messages
    #: go to one ``process_batch`` call; 1 (the default) calls ``process`` per message
    max_batch: int = 1
    #: how long to wait for more messages after the first of a batch (milliseconds) before processing fewer
    max_wait_ms: float = 0.0

    ctx: StageContext

    def open(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def process(self, msg: Any) -> Any:
        raise NotImplementedError

    def process_batch(self, msgs: list) -> list:
        """Several messages at once (only called when ``max_batch`` > 1): one output per input (None, a message or
        a list of messages, as ``process`` returns), in the same order. Raising makes the runtime redo them one by
        one with ``process``. A stage that sets ``max_batch`` implements it."""
        raise NotImplementedError

    def close(self) -> Any:
        return None

    def journal(self) -> Any:
        """A committing stage's durable record of the frames it finished (a ``transport.runs.RunLedger``, e.g.
        the JSONL sink's CommitLog): the receive stage upstream resumes from it after a restart. None: none."""
        return None

    def link_status(self) -> str | None:
        """One line on this stage's network link (console status), or None when it holds none."""
        return None

    def edge_links(self) -> dict[int, dict[str, Any]] | None:
        """The edge streams this stage receives, {stream: {connected, mode, peer}}, or None when it receives none."""
        return None


class Source(Stage):
    live: ClassVar[bool] = False

    def frames(self) -> Iterator[Any]:
        raise NotImplementedError

    def process(self, msg: Any) -> Any:  # pragma: no cover - sources have no inputs
        raise RuntimeError(f"source {self.key} takes no input")


def now_ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


# --------------------------------------------------------------------------------------------- registry
#: the project's own stage modules, as pyproject.toml declares them under [project.entry-points."ladon.stages"]
#: (a test keeps the two lists equal); imported whatever the installed metadata says
BUILTIN_STAGE_MODULES = (
    "stages.sources", "stages.edge", "stages.server", "stages.consumers", "stages.sinks", "stages.ray_compute",
    "stages.factory.tracking", "stages.factory.counting", "stages.factory.events", "stages.factory.mqtt_sink",
    "stages.factory.metrics", "stages.factory.opcua_sink", "stages.factory.webview",
)

_REGISTRY: dict[str, type[Stage]] = {}
_BUILTINS_LOADED = False
_ENTRY_POINTS_LOADED = False
_EP_ERRORS: dict[str, str] = {}
_lock = threading.Lock()


def register_stage(cls=None, *, key: str | None = None):
    """Class decorator: ``@register_stage`` (uses ``cls.key``) or ``@register_stage(key="...")``.

    A key taken by another class raises ValueError naming that class."""

    def wrap(c):
        k = key or c.key
        if not k:
            raise ValueError(f"{c.__name__} needs a `key`")
        c.key = k
        if k in _REGISTRY and _REGISTRY[k] is not c:
            raise ValueError(f"stage key {k!r} already registered by {_REGISTRY[k].__module__}.{_REGISTRY[k].__name__}")
        _REGISTRY[k] = c
        return c

    return wrap(cls) if cls is not None else wrap


def unregister_stage(key: str) -> type[Stage] | None:
    """Remove the stage registered under ``key`` (one a plugin or test added at run time); returns its class."""
    return _REGISTRY.pop(key, None)


def _is_own(ep) -> bool:
    """Whether an entry point belongs to this project's installed metadata (a built-in, not a plugin)."""
    dist = getattr(ep, "dist", None)
    return dist is not None and (dist.name or "").replace("_", "-").lower() == DISTRIBUTION


def _load_builtins() -> None:
    """Import the project's stage modules: those its installed entry points name, then any of
    BUILTIN_STAGE_MODULES they miss. Not guarded: a broken built-in is a bug to see, not a plugin to skip."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    declared = [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if _is_own(ep) and ep.attr is None]
    for module in dict.fromkeys([*declared, *BUILTIN_STAGE_MODULES]):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # metadata installed from an older checkout may name a module this one removed (stages.workers)
            if module in BUILTIN_STAGE_MODULES or exc.name != module:
                raise


def _load_entry_points() -> None:
    """Load third-party entries: a stage class under its entry name, or a module whose stages register
    themselves. A broken plugin is recorded in _EP_ERRORS and named when its key is asked for."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if _is_own(ep) or ep.name in _REGISTRY:
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take the built-ins down
            _EP_ERRORS[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
            continue
        if ep.attr is None:  # a module: importing it registered its stages
            continue
        if not (isinstance(obj, type) and issubclass(obj, Stage)):
            _EP_ERRORS[ep.name] = f"{ep.value} is not a pipeline.stage.Stage subclass"
            continue
        obj.key = obj.key or ep.name
        _REGISTRY[ep.name] = obj


def available_stages() -> list[str]:
    """Every registered stage key, sorted (built-ins and installed plugins loaded on first call)."""
    with _lock:
        _load_builtins()
        _load_entry_points()
    return sorted(_REGISTRY)


def get_stage_class(key: str) -> type[Stage]:
    """The class registered under ``key``; UsageError names the allowed keys (or why a plugin failed to load)."""
    keys = available_stages()
    if key not in _REGISTRY:
        if key in _EP_ERRORS:
            raise UsageError(f"stage {key!r} is declared by an installed package (entry point group "
                             f"{ENTRY_POINT_GROUP!r}) but failed to load: {_EP_ERRORS[key]}")
        broken = "".join(f"; entry point {name!r} failed to load: {why}" for name, why in _EP_ERRORS.items())
        raise UsageError(f"unknown stage key {key!r}; allowed keys: {', '.join(keys)} "
                         f"(third-party stages register under the entry-point group {ENTRY_POINT_GROUP!r}){broken}")
    return _REGISTRY[key]


def create_stage(key: str, **params) -> Stage:
    """Build the stage registered under ``key`` with ``params``. Unknown key -> UsageError naming allowed keys."""
    cls = get_stage_class(key)
    try:
        return cls(**params)
    except TypeError as exc:
        raise UsageError(f"stage {key!r}: bad parameters {sorted(params)}: {exc}") from exc


def as_list(out: Any) -> Iterable[Any]:
    if out is None:
        return ()
    if isinstance(out, (list, tuple)):
        return out
    return (out,)

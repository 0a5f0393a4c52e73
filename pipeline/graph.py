"""Pipeline graphs: YAML files in ``configs/pipelines/`` loaded into dataclasses, validated, and run.

YAML schema::

    name: demo                       # required, a word
    description: free text           # optional
    queue_size: 8                    # optional, default bounded queue length between stages
    vars:                            # optional defaults for ${NAME} substitutions (the CLI overrides them)
      out: out
    stages:                          # required, a non-empty list
      - name: source                 # required, unique in the graph
        key: source.video            # required, a registered stage key (run_pipeline.py run --list-stages)
        inputs: [other_stage]        # names of upstream stages; omitted/empty only for sources
        queue_size: 4                # optional, this stage's input queue length
        params: {path: "${source}"}  # keyword arguments of the stage class

A string that is exactly ``${NAME}`` takes the variable's value with its type; ``${NAME}`` inside a longer
string is replaced by its text. Errors name the file, the key path (``stages[2].inputs``) and what is allowed.
Every wire is checked against the stages' declared message types (``emits`` upstream, ``accepts`` downstream):
``source.video -> sink.jsonl`` is refused at parse time, naming both stages and both types.

Loading is bounded (see :func:`load_yaml`): a config file is at most 1 MiB of UTF-8 text, nests at most 64
levels and holds at most 100,000 YAML nodes counted with every alias (``*name``) expanded, so a "billion
laughs" alias bomb or a binary file is refused with one line instead of hanging or raising a traceback.

Runtime: each stage runs in its own thread, connected by bounded ``queue.Queue``s; a stage's output goes to
every stage that lists it as an input (fan-out). A message marked ``live`` that finds a full queue replaces
the oldest queued message (counted as a drop: live latency stays bounded); everything else waits (replay is
lossless). A stage that batches (``max_batch`` > 1, :class:`pipeline.stage.Stage`) gets up to ``max_batch``
messages per ``process_batch`` call: the first queued one, then those already queued or arriving within its
``max_wait_ms`` (never past its inputs' end: an end marker is never held back), and its outputs go downstream
one per message in arrival order; a batch that raises is processed again message by message, so the error
semantics below hold per message. Threads, not processes, measured: the heavy work (torch, PyAV, zlib, ZeroMQ) releases the GIL,
so decode and the three heads of successive frames already overlap on the cores; a consumer in its own process
would need the shared body's features shipped to it, 0.59 MB and 9.2 ms of pickle+unpickle per frame and
consumer at 128 px input (x3 consumers, against about 40 ms per frame for the whole server on a 2-core box),
so processes would cost more than they could win here. ``benchmarks/pipeline_overhead.py`` prints both
figures. Edge and server are separate processes when run as ``edge``/``server`` commands (or machines).

Completion (exactly-once replay): every message derived from a frame carries its envelope
(:mod:`pipeline.envelope`) and, in a server, the frame's completion handle. Which stages complete frames is
decided here from the graph when it is wired: each stage learns the committing stages downstream of it
(``ctx.committers``; a receive stage with none acknowledges on emission). A message dropped on a full queue or
lost by a stage's tolerated error, on its way to a committing stage, completes its handle as lost; a stage that
fails and stops the graph abandons it (a replay frame stays unacknowledged and goes to the next server). Stages
see the graph through ``ctx.runtime`` (:class:`pipeline.stage.GraphView`), never through its internals.
"""
from __future__ import annotations

import queue
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from core.errors import IncompleteInput, UsageError
from pipeline.envelope import meta_of
from pipeline.stage import (EndOfStream, GraphView, Source, Stage, StageContext, StageStats, StageStatus, as_list,
                            available_stages, create_stage, get_stage_class)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a ${NAME} variable's name
_VAR = re.compile(r"\$\{(" + VAR_NAME.pattern + r")\}")
GRAPH_KEYS = {"name", "description", "queue_size", "threads", "vars", "stages"}
STAGE_KEYS = {"name", "key", "inputs", "params", "queue_size"}
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "pipelines"
MAX_CONFIG_BYTES = 1 << 20  # a graph config is a few kB; anything near this is not one
MAX_YAML_NODES = 100_000  # nodes with aliases expanded: the shipped graphs have a few hundred
MAX_YAML_DEPTH = 64  # nesting levels (the composer recurses once per level)


@dataclass
class StageSpec:
    name: str
    key: str
    inputs: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    queue_size: int | None = None


@dataclass
class GraphSpec:
    name: str
    stages: list[StageSpec]
    queue_size: int = 8
    description: str = ""
    vars: dict[str, Any] = field(default_factory=dict)
    path: str = "<memory>"
    threads: int | None = None  # the machine's thread budget for model stages (None: all cores)

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)


def resolve_config(path_or_name: str) -> Path:
    """A path, or a bare name of a file in configs/pipelines/ (with or without .yaml)."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    if p.is_dir():
        raise UsageError(f"graph config {path_or_name!r} is a folder; give a YAML file such as "
                         f"{CONFIG_DIR / 'demo.yaml'} (or a name from configs/pipelines/)")
    for cand in (CONFIG_DIR / path_or_name, CONFIG_DIR / f"{path_or_name}.yaml"):
        if cand.is_file():
            return cand
    known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise UsageError(f"graph config {path_or_name!r} not found; give a YAML path or one of: {', '.join(known)}")


def _substitute(value: Any, variables: dict[str, Any], where: str, file: str) -> Any:
    if isinstance(value, str):
        m = _VAR.fullmatch(value)
        if m:
            if m.group(1) not in variables:
                raise UsageError(f"{file}: {where}: unknown variable ${{{m.group(1)}}}; "
                                 f"known: {', '.join(sorted(variables)) or 'none'} (define it under `vars:`)")
            return variables[m.group(1)]

        def rep(mm):
            if mm.group(1) not in variables:
                raise UsageError(f"{file}: {where}: unknown variable ${{{mm.group(1)}}}; "
                                 f"known: {', '.join(sorted(variables)) or 'none'} (define it under `vars:`)")
            return str(variables[mm.group(1)])

        return _VAR.sub(rep, value)
    if isinstance(value, dict):
        return {k: _substitute(v, variables, f"{where}.{k}", file) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, f"{where}[{i}]", file) for i, v in enumerate(value)]
    return value


def parse_graph(data: Any, file: str = "<memory>", variables: dict[str, Any] | None = None) -> GraphSpec:
    """Validate a loaded YAML document and build a GraphSpec. Every error names file, key and allowed values."""
    if not isinstance(data, dict):
        raise UsageError(f"{file}: the top level must be a mapping with keys {sorted(GRAPH_KEYS)}")
    unknown = set(data) - GRAPH_KEYS
    if unknown:
        raise UsageError(f"{file}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(GRAPH_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(f"{file}: `name` must be a word (letters, digits, _ . -), got {name!r}")
    qs = data.get("queue_size", 8)
    if not isinstance(qs, int) or isinstance(qs, bool) or qs < 1:
        raise UsageError(f"{file}: `queue_size` must be an integer >= 1, got {qs!r}")
    threads = data.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise UsageError(f"{file}: `threads` must be an integer >= 1 (the cores the graph may use), got {threads!r}")
    defaults = data.get("vars") or {}
    if not isinstance(defaults, dict):
        raise UsageError(f"{file}: `vars` must be a mapping of NAME: value, got {type(defaults).__name__}")
    variables = {**defaults, **(variables or {})}
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise UsageError(f"{file}: `stages` must be a non-empty list of stages "
                         f"(each a mapping with keys {sorted(STAGE_KEYS)})")
    allowed_keys = available_stages()
    stages: list[StageSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(stages_raw):
        where = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise UsageError(f"{file}: {where} must be a mapping with keys {sorted(STAGE_KEYS)}")
        unknown = set(raw) - STAGE_KEYS
        if unknown:
            raise UsageError(f"{file}: {where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(STAGE_KEYS)}")
        sname = raw.get("name")
        if not isinstance(sname, str) or not _NAME.match(sname):
            raise UsageError(f"{file}: {where}.name must be a word (letters, digits, _ . -), got {sname!r}")
        if sname in seen:
            raise UsageError(f"{file}: {where}.name {sname!r} is used twice; stage names must be unique")
        seen.add(sname)
        key = raw.get("key")
        if key not in allowed_keys:
            raise UsageError(f"{file}: {where}.key: unknown stage key {key!r}; allowed keys: {', '.join(allowed_keys)}")
        inputs = raw.get("inputs") or []
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise UsageError(f"{file}: {where}.inputs must be a list of stage names, got {inputs!r}")
        params = raw.get("params") or {}
        if not isinstance(params, dict):
            raise UsageError(f"{file}: {where}.params must be a mapping, got {type(params).__name__}")
        params = _substitute(params, variables, f"{where}.params", file)
        sq = raw.get("queue_size")
        if sq is not None and (not isinstance(sq, int) or isinstance(sq, bool) or sq < 1):
            raise UsageError(f"{file}: {where}.queue_size must be an integer >= 1, got {sq!r}")
        stages.append(StageSpec(sname, key, list(inputs), params, sq))
    names = [s.name for s in stages]
    for i, s in enumerate(stages):
        cls = get_stage_class(s.key)
        is_source = issubclass(cls, Source)
        for inp in s.inputs:
            if inp not in names:
                raise UsageError(f"{file}: stages[{i}].inputs: no stage named {inp!r}; stages are: {', '.join(names)}")
            if inp == s.name:
                raise UsageError(f"{file}: stages[{i}].inputs: stage {s.name!r} cannot feed itself")
        if is_source and s.inputs:
            raise UsageError(f"{file}: stages[{i}] ({s.key}) is a source and takes no `inputs`; remove them")
        if not is_source and not s.inputs:
            raise UsageError(f"{file}: stages[{i}] ({s.key}) needs `inputs`: the names of the stages feeding it")
    _topo_order(stages, file)
    check_contracts(stages, file)
    return GraphSpec(name, stages, qs, str(data.get("description", "")), variables, file, threads)


def _type_names(types) -> str:
    return ", ".join(t.__name__ for t in types)


def check_contracts(stages: list[StageSpec], file: str = "<memory>") -> None:
    """Refuse a wire whose upstream stage emits a message type the downstream stage does not accept (``emits`` /
    ``accepts`` of the stage classes; either left empty is not checked). One line naming both stages, both
    types, and the stages that would turn the one into the other where some exist."""
    by_name = {s.name: s for s in stages}
    for i, s in enumerate(stages):
        accepts = get_stage_class(s.key).accepts
        if not accepts:
            continue
        for inp in s.inputs:
            up = by_name[inp]
            emits = get_stage_class(up.key).emits
            refused = [t for t in emits if not issubclass(t, accepts)]
            if not refused:
                continue
            bridges = [k for k in available_stages()
                       if (c := get_stage_class(k)).accepts and c.emits and issubclass(refused[0], c.accepts)
                       and all(issubclass(t, accepts) for t in c.emits)]
            hint = f"; put a stage between them, e.g. {', '.join(bridges)}" if bridges else ""
            raise UsageError(f"{file}: stages[{i}].inputs: stage {inp!r} ({up.key}) emits {_type_names(refused)}, "
                             f"but stage {s.name!r} ({s.key}) accepts only {_type_names(accepts)}{hint}")


def graph_variables(path_or_name: str) -> set[str]:
    """The variables a graph config knows: declared under ``vars:`` or used as ``${NAME}`` in stage params.

    What ``run --set NAME=...`` may name; checked before anything slow starts (a misspelt name would otherwise
    be ignored without a word)."""
    path = resolve_config(path_or_name)
    data = load_yaml(read_config_text(path), str(path))
    if not isinstance(data, dict):
        return set()
    defaults, stages = data.get("vars"), data.get("stages")
    known = set(defaults) if isinstance(defaults, dict) else set()
    for raw in stages if isinstance(stages, list) else []:
        if isinstance(raw, dict):
            known |= _referenced(raw.get("params"))
    return {str(k) for k in known}


def _referenced(value: Any) -> set[str]:
    """The ${NAME} variables a (params) value uses."""
    if isinstance(value, str):
        return set(_VAR.findall(value))
    if isinstance(value, dict):
        return set().union(*(_referenced(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_referenced(v) for v in value))
    return set()


def _topo_order(stages: list[StageSpec], file: str) -> list[StageSpec]:
    by = {s.name: s for s in stages}
    order, state = [], {}

    def visit(n, chain):
        if state.get(n) == 1:
            raise UsageError(f"{file}: stages form a cycle: {' -> '.join(chain + [n])}; a graph must be acyclic")
        if state.get(n) == 2:
            return
        state[n] = 1
        for i in by[n].inputs:
            visit(i, chain + [n])
        state[n] = 2
        order.append(by[n])

    for s in stages:
        visit(s.name, [])
    return order


class _YamlLimit(yaml.MarkedYAMLError):
    """A document over the size limits of :class:`_BoundedLoader` (reported like a syntax error)."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses what could exhaust memory or the stack once loaded.

    Aliases stay allowed (``<<: *defaults`` is handy in a graph), but every node is counted as often as aliases
    repeat it, so nine levels of nine aliases (a 1 kB file that expands to 387 million strings) stop at
    MAX_YAML_NODES while still being composed, before anything walks the expanded tree. An alias to a node that
    contains it (a recursive structure) and nesting deeper than MAX_YAML_DEPTH are refused too."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> node count with aliases expanded (finished nodes only)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._sizes:
                raise _YamlLimit(None, None, f"alias *{event.anchor} points into the node that contains it "
                                             f"(a recursive structure)", event.start_mark)
            return super().compose_node(parent, index)
        start = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _YamlLimit(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", start)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        size = 1 + sum(self._sizes.get(id(c), 1) for c in children)
        if size > MAX_YAML_NODES:
            raise _YamlLimit(None, None, f"more than {MAX_YAML_NODES:,} nodes once the aliases (*name) are "
                                         f"expanded (an alias bomb?)", start)
        self._sizes[id(node)] = size
        return node


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: the problem and its line/column (PyYAML's own text spans several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        return f"{exc.problem or exc.context or type(exc).__name__}{context}{where}"
    return " ".join(str(exc).split())


def load_yaml(text: str, what: str) -> Any:
    """Parse YAML text with :class:`_BoundedLoader`; any problem becomes one UsageError line naming ``what``."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _YamlLimit as exc:
        raise UsageError(f"{what}: refused to load: {_yaml_problem(exc)}; a graph needs a few hundred YAML nodes, "
                         f"write the values out instead") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{what}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:  # the constructor recurses too; the depth bound should keep it from getting here
        raise UsageError(f"{what}: nested too deeply to load") from None
    finally:
        loader.dispose()


def read_config_text(path: Path) -> str:
    """A config file's text: at most MAX_CONFIG_BYTES of UTF-8 (a binary or huge file is no graph config)."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UsageError(f"{path}: {size:,} bytes is too large for a graph config (at most "
                             f"{MAX_CONFIG_BYTES:,}); give a YAML graph file such as {CONFIG_DIR / 'demo.yaml'}")
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not a text file (byte 0x{data[exc.start]:02x} at offset {exc.start} is not "
                         f"UTF-8); give a YAML graph file such as {CONFIG_DIR / 'demo.yaml'}") from None
    if "\x00" in text:
        raise UsageError(f"{path}: a binary file (it holds NUL bytes); give a YAML graph file such as "
                         f"{CONFIG_DIR / 'demo.yaml'}")
    return text


def load_graph(path: str | Path, variables: dict[str, Any] | None = None) -> GraphSpec:
    path = resolve_config(str(path))
    data = load_yaml(read_config_text(path), str(path))
    return parse_graph(data, str(path), variables)


# --------------------------------------------------------------------------------------------- runtime
_EOS = EndOfStream()


class _Node:
    def __init__(self, spec: StageSpec, stage: Stage, qsize: int):
        self.spec = spec
        self.stage = stage
        self.queue: queue.Queue = queue.Queue(maxsize=qsize)
        self.down: list[_Node] = []
        self.n_inputs = len(spec.inputs)
        self.stats = StageStats()
        self.thread: threading.Thread | None = None
        self.failed: str | None = None
        self.opened = False
        self.committers: tuple[Stage, ...] = ()  # committing stages downstream (GraphRunner sets them)
        self.leads_to_commit = False  # it commits, or a stage downstream does
        self.max_batch, self.max_wait_s = batching(spec, stage)


def batching(spec: StageSpec, stage: Stage) -> tuple[int, float]:
    """A stage's dynamic batching as the runtime uses it: (max messages per ``process_batch``, seconds to wait
    for more after the first). (1, 0.0): process one message at a time. UsageError on values no batch can have,
    or on ``max_batch`` > 1 without a ``process_batch``."""
    n, wait = getattr(stage, "max_batch", 1), getattr(stage, "max_wait_ms", 0.0)
    where = f"stage {spec.name!r} ({spec.key})"
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UsageError(f"{where}: max_batch {n!r} must be an integer >= 1 (1: no batching)")
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 10_000:
        raise UsageError(f"{where}: max_wait_ms {wait!r} must be a number of milliseconds in 0..10000")
    if n > 1 and type(stage).process_batch is Stage.process_batch:
        raise UsageError(f"{where}: max_batch {n} but the stage has no process_batch; set max_batch 1")
    return n, float(wait) / 1000.0


def model_threads(budget: int | None, model_stages: int) -> int:
    """Intra-op threads per model for a graph: the budget (default: all cores) shared by the stages that run
    models concurrently, at least 1. PyTorch's and OpenCV's thread counts are per process, and stages that each
    take every core slow each other 3-8x on a small machine (measured: replay 7.8 -> 13.6 frames/s at 1 thread)."""
    import os

    budget = budget or os.cpu_count() or 1
    return max(1, budget // max(1, model_stages))


def apply_thread_budget(spec: GraphSpec, stages: list) -> int:
    """Set PyTorch's (when loaded) and OpenCV's thread counts for this process from the graph's budget; call it
    after the stages have opened (they load the models). Returns the count."""
    n = model_threads(spec.threads, sum(1 for s in stages if getattr(s, "runs_model", False)))
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:  # pragma: no cover - OpenCV is a base dependency
        pass
    torch = sys.modules.get("torch")  # never imported here: a torch-free edge (ONNX) stays torch-free
    if torch is not None:
        torch.set_num_threads(n)
    return n


class GraphRunner:
    """Build the stages of a GraphSpec, run them concurrently, and report."""

    def __init__(self, spec: GraphSpec, stop: threading.Event | None = None, shared: dict | None = None,
                 log: Callable[[str], None] | None = None):
        self.spec = spec
        self.stop = stop or threading.Event()
        self.shared = shared if shared is not None else {}
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.nodes: dict[str, _Node] = {}
        check_contracts(spec.stages, spec.path)  # again: commands edit a parsed spec (--tasks, --pub)
        for s in spec.stages:
            stage = create_stage(s.key, **s.params)
            self.nodes[s.name] = _Node(s, stage, s.queue_size or spec.queue_size)
        for s in spec.stages:
            for i in s.inputs:
                self.nodes[i].down.append(self.nodes[s.name])
        # who completes frames, decided here from the graph (not from the order stages open in): a message lost at
        # a stage that leads to a committing stage will never be committed, so its handle is completed as lost
        for node in self.nodes.values():
            below = self._reach(node.spec.name, up=False)
            node.committers = tuple(st for st in (self.nodes[n].stage for n in below) if getattr(st, "commits", False))
            node.leads_to_commit = bool(node.committers) or bool(getattr(node.stage, "commits", False))
        self.view = _RunnerView(self)
        self.errors: list[str] = []
        self.incomplete: list[str] = []  # sources whose input ended early or had unreadable parts

    def _reach(self, name: str, up: bool) -> list[str]:
        """The stages upstream (``up``) or downstream of stage ``name``, nearest first (breadth-first)."""
        step = ((lambda n: self.nodes[n].spec.inputs) if up else (lambda n: [d.spec.name for d in self.nodes[n].down]))
        out, seen, todo = [], {name}, list(step(name))
        while todo:
            n = todo.pop(0)
            if n in seen:
                continue
            seen.add(n)
            out.append(n)
            todo.extend(step(n))
        return out

    # ---- completion of frames the graph gives up
    def _lose(self, node: _Node, msg: Any, reason: str) -> None:
        """``msg`` is lost at ``node`` (dropped on its full queue, or lost by its tolerated error): when it was on
        its way to a committing stage, its frame will never be committed: complete the handle as lost (the frame
        is acknowledged, its credit comes back, the receive stage counts it)."""
        meta = meta_of(msg)
        if meta is not None and node.leads_to_commit:
            meta.lose(f"{node.spec.name}: {reason}")

    def _abandon(self, node: _Node, msg: Any, reason: str) -> None:
        """``node`` failed (the graph stops) on ``msg`` or before reaching it: a replay frame stays unacknowledged
        (the edge resends it to the next server), a live one is lost (see FrameMeta.abandon)."""
        meta = meta_of(msg)
        if meta is not None and node.leads_to_commit:
            meta.abandon(f"{node.spec.name}: {reason}")

    # ---- message passing
    def _emit(self, node: _Node, msg: Any) -> None:
        live = bool(getattr(msg, "live", False))
        for d in node.down:
            if live:
                while True:
                    try:
                        d.queue.put_nowait(msg)
                        break
                    except queue.Full:
                        try:
                            old = d.queue.get_nowait()
                            if isinstance(old, EndOfStream):  # never drop an end marker
                                d.queue.put(old)
                                d.queue.put(msg)
                                break
                            d.stats.dropped += 1
                            self._lose(d, old, "dropped on a full queue")
                        except queue.Empty:
                            pass
            else:
                d.queue.put(msg)

    def _fail(self, node: _Node, exc: BaseException) -> None:
        node.failed = f"{type(exc).__name__}: {exc}"
        msg = f"[{self.spec.name}] stage {node.spec.name!r} ({node.spec.key}) failed: {node.failed}"
        self.errors.append(msg)
        self.log(msg)
        if not isinstance(exc, (UsageError, OSError, RuntimeError, ValueError)):
            self.log(traceback.format_exc())
        self.stop.set()

    def _incomplete(self, node: _Node, exc: IncompleteInput) -> None:
        """A source lost part of its input: say so now, let the frames it did read finish (no stop)."""
        self.incomplete.append(str(exc))
        self.log(f"[{self.spec.name}] warning: stage {node.spec.name!r} ({node.spec.key}): {exc}")

    def _run_source(self, node: _Node) -> None:
        stage = node.stage
        try:
            it = stage.frames()
            for msg in it:
                node.stats.processed += 1
                self._emit(node, msg)
                if self.stop.is_set():
                    break
            if hasattr(it, "close"):
                it.close()
        except IncompleteInput as exc:
            self._incomplete(node, exc)
        except BaseException as exc:  # noqa: BLE001 - report and shut the graph down cleanly
            self._fail(node, exc)
        self._finish(node)

    def _finish(self, node: _Node) -> None:
        try:
            for out in as_list(node.stage.close()):
                self._emit(node, out)
        except BaseException as exc:  # noqa: BLE001
            if node.failed is None:
                self._fail(node, exc)
        for d in node.down:
            d.queue.put(_EOS)

    def _run_stage(self, node: _Node) -> None:
        ended = 0
        while ended < node.n_inputs:
            msg = node.queue.get()
            if isinstance(msg, EndOfStream):
                ended += 1
                continue
            if node.max_batch > 1 and node.failed is None:
                batch, ended = self._gather(node, msg, ended)
                self._process_batch(node, batch)
            else:
                self._process_one(node, msg)
        self._finish(node)

    def _gather(self, node: _Node, first: Any, ended: int) -> tuple[list, int]:
        """``first`` and the messages queued behind it or arriving within the stage's ``max_wait_ms``, at most
        ``max_batch``; end markers are counted (returned with the batch). Stops waiting at once when every input
        has ended or the graph is stopping (what is already queued still joins the batch)."""
        batch = [first]
        deadline = time.monotonic() + node.max_wait_s
        while len(batch) < node.max_batch and ended < node.n_inputs:
            left = 0.0 if self.stop.is_set() else deadline - time.monotonic()
            try:
                msg = node.queue.get(timeout=left) if left > 0 else node.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(msg, EndOfStream):
                ended += 1
            else:
                batch.append(msg)
        return batch, ended

    def _process_batch(self, node: _Node, batch: list) -> None:
        """One ``process_batch`` call for ``batch``; its outputs emitted in order, each message's timing its share
        of the call (the call's time / the messages in it). If it raises, or answers with the wrong number of
        outputs, the messages are processed again one by one (``process``: per-message error semantics)."""
        ex = node.stats.extra
        if len(batch) == 1:  # nothing to batch: the per-message path (no split, no fallback)
            ex["batches"] = ex.get("batches", 0) + 1
            ex["batched"] = ex.get("batched", 0) + 1
            self._process_one(node, batch[0])
            return
        t0 = time.perf_counter()
        try:
            outs = list(node.stage.process_batch(list(batch)))
            if len(outs) != len(batch):
                raise RuntimeError(f"process_batch answered {len(outs)} outputs for {len(batch)} messages")
        except Exception as exc:  # noqa: BLE001 - redo per message: a bad one loses only itself
            ex["batch_fallbacks"] = ex.get("batch_fallbacks", 0) + 1
            if ex["batch_fallbacks"] == 1:
                self.log(f"[{self.spec.name}] stage {node.spec.name!r}: a batch of {len(batch)} failed "
                         f"({type(exc).__name__}: {exc}); processing its messages one by one (logged once)")
            for msg in batch:
                self._process_one(node, msg)
            return
        ms = (time.perf_counter() - t0) * 1000.0
        share = ms / len(batch)
        node.stats.processed += len(batch)
        node.stats.busy_s += ms / 1000.0
        node.stats.last_ms = share
        ex["batches"] = ex.get("batches", 0) + 1
        ex["batched"] = ex.get("batched", 0) + len(batch)
        for out in outs:
            self._emit_outputs(node, as_list(out), share)

    def _process_one(self, node: _Node, msg: Any) -> None:
        """``process(msg)`` with the runtime's error semantics: a tolerated error loses the message (its frame
        completes as lost), any other error fails the stage (the graph stops; the message is abandoned)."""
        if node.failed is not None:
            self._abandon(node, msg, "not processed: the stage failed")
            return  # drain so upstream never blocks
        t0 = time.perf_counter()
        try:
            outs = as_list(node.stage.process(msg))
        except Exception as exc:  # noqa: BLE001
            if node.stage.tolerate_errors:
                node.stats.errors += 1
                self.log(f"[{self.spec.name}] stage {node.spec.name!r} lost one message: {type(exc).__name__}: {exc}")
                self._lose(node, msg, f"{type(exc).__name__}: {exc}")
                return
            self._fail(node, exc)
            self._abandon(node, msg, node.failed or "failed")
            return
        ms = (time.perf_counter() - t0) * 1000.0
        node.stats.processed += 1
        node.stats.busy_s += ms / 1000.0
        node.stats.last_ms = ms
        self._emit_outputs(node, outs, ms)

    def _emit_outputs(self, node: _Node, outs, ms: float) -> None:
        for out in outs:
            t = getattr(out, "timings", None)
            if isinstance(t, dict) and node.spec.name not in t:
                t[node.spec.name] = ms
            self._emit(node, out)

    def open(self) -> None:
        # open downstream first: receivers bind and sinks create files before sources start producing
        order = list(reversed(_topo_order(self.spec.stages, self.spec.path)))
        for s in order:
            node = self.nodes[s.name]
            ctx = StageContext(s.name, self.spec.name, self.stop, node.stats, self.shared, self.log, list(s.inputs),
                               emit=lambda msg, _n=node: self._emit(_n, msg), runtime=self.view,
                               committers=node.committers)
            try:
                node.stage.open(ctx)
            except BaseException:
                self.close_opened()
                raise
            node.opened = True
        self.model_threads = apply_thread_budget(self.spec, [n.stage for n in self.nodes.values()])

    def close_opened(self) -> None:
        for node in self.nodes.values():
            if node.opened:
                try:
                    node.stage.close()
                except Exception:  # noqa: BLE001
                    pass

    def start(self) -> None:
        for node in self.nodes.values():
            target = self._run_source if isinstance(node.stage, Source) else self._run_stage
            node.thread = threading.Thread(target=target, args=(node,), name=f"stage-{node.spec.name}", daemon=True)
        for node in self.nodes.values():
            node.thread.start()

    def wait(self, poll: float = 0.2) -> int:
        """Join every stage: 1 when a stage failed, 2 when a source's input was incomplete, else 0."""
        for node in self.nodes.values():
            while node.thread.is_alive():
                node.thread.join(poll)
        return 1 if self.errors else 2 if self.incomplete else 0

    def run(self) -> int:
        self.open()
        self.start()
        return self.wait()

    def stats(self) -> dict[str, StageStats]:
        return {n: node.stats for n, node in self.nodes.items()}


class _RunnerView(GraphView):
    """:class:`GraphView` of a GraphRunner: what its stages may read of it (``ctx.runtime``)."""

    def __init__(self, runner: GraphRunner):
        self._runner = runner

    def _stages(self, names) -> list[Stage]:
        return [self._runner.nodes[n].stage for n in names]

    def stages(self) -> list[StageStatus]:
        return [StageStatus(name, node.spec.key, node.stats, node.queue.qsize(), node.failed)
                for name, node in list(self._runner.nodes.items())]

    def upstream(self, name: str) -> list[Stage]:
        return self._stages(self._runner._reach(name, up=True))

    def downstream(self, name: str) -> list[Stage]:
        return self._stages(self._runner._reach(name, up=False))

    def link_status(self) -> str | None:
        parts = [x for node in self._runner.nodes.values() if node.opened and (x := node.stage.link_status())]
        return "; ".join(parts) or None

    def edge_links(self) -> dict[int, dict[str, Any]] | None:
        found = [x for node in self._runner.nodes.values()
                 if node.opened and (x := node.stage.edge_links()) is not None]
        if not found:
            return None
        return {sid: info for links in found for sid, info in links.items()}

    def codec(self) -> Any:
        for node in self._runner.nodes.values():
            if node.stage.provides_codec and getattr(node.stage, "codec", None) is not None:
                return node.stage.codec
        return None

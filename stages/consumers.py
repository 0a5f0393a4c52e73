"""Task consumers (one ``task.<name>`` stage per task of :mod:`codec.tasks`) and `results.merge`, which joins
them per frame.

A consumer turns Features into a TaskResult in original-frame coordinates. If its head raises on a frame,
that frame loses this task's result only: the TaskResult carries the error text, the merge puts it into the
frame's ``errors`` field, and the pipeline goes on. A task registered with ``codec.tasks.register_task`` gets
its consumer stage here at once; a stage with other logic subclasses :class:`Consumer` and overrides
``compute`` (registered with ``@register_stage`` or through the ``ladon.stages`` entry-point group).
"""
from __future__ import annotations

import time

from codec.tasks import TASKS, Task, get_task, watch_tasks
from core.geometry import map_boxes, map_class_map  # noqa: F401 - re-exported (their former home)
from pipeline.codecs import get_codec
from core.geometry import Letterbox
from pipeline.stage import Features, FrameResult, Stage, TaskResult, register_stage, unregister_stage


def map_result(task: str, result, lb: Letterbox):
    """A task's model-input result on the original frame (its ``to_frame`` hook); unregistered tasks: unchanged."""
    return get_task(task).in_frame(result, lb) if task in TASKS else result


class Consumer(Stage):
    """Features -> TaskResult for the task named ``task``: its head on the shared body, then its ``to_frame``."""
    task = ""
    accepts = (Features,)
    emits = (TaskResult,)
    runs_model = True

    def __init__(self, checkpoint=None, conf: float | None = None):
        self.checkpoint = checkpoint
        self.conf = conf

    def open(self, ctx) -> None:
        super().open(ctx)
        self.codec = None

    def _codec(self):
        if self.codec is None:
            self.codec = self.ctx.codec() if self.checkpoint is None else None
            if self.codec is None:
                self.codec = get_codec(self.checkpoint)
        return self.codec

    def compute(self, f: Features):
        """This task's result for one frame, in original-frame coordinates."""
        codec = self._codec()
        kw = {} if self.conf is None else {"conf": float(self.conf)}
        raw = codec.head(self.task, f.features, **kw)[0]
        return map_result(self.task, raw, f.letterbox)

    def process(self, f: Features) -> TaskResult:
        t0 = time.perf_counter()
        try:
            res, err = self.compute(f), None
        except Exception as exc:  # noqa: BLE001 - lose this frame's result for this task only
            res, err = None, f"{type(exc).__name__}: {exc}"
            self.ctx.stats.errors += 1
            if self.ctx.stats.errors == 1:
                self.ctx.log(f"[{self.ctx.name}] {self.task} failed on stream {f.stream} frame {f.index}: {err} "
                             f"(that frame loses its {self.task} result; see the JSONL `errors` field)")
        return TaskResult(self.task or self.ctx.name, f, res, err, (time.perf_counter() - t0) * 1000.0)


_TASK_CONSUMERS: dict[str, type[Consumer]] = {}  # task name -> the stage made for it here


def _add_consumer(task: Task) -> None:
    """Register the ``task.<name>`` stage of a newly registered task (a stage registered earlier under that key,
    e.g. a hand-written one, is kept)."""
    name = "".join(part.title() for part in task.name.split("_")) + "Consumer"
    cls = type(name, (Consumer,), {"__module__": __name__, "__qualname__": name,
                                   "__doc__": f"Features -> {task.name}: {task.result}.",
                                   "key": f"task.{task.name}", "task": task.name})
    try:
        register_stage(cls)
    except ValueError:  # the key is taken
        return
    _TASK_CONSUMERS[task.name] = cls


def _remove_consumer(task: Task) -> None:
    """Drop the stage :func:`_add_consumer` made for a task that is no longer registered."""
    cls = _TASK_CONSUMERS.pop(task.name, None)
    if cls is not None:
        unregister_stage(cls.key)


watch_tasks(_add_consumer, _remove_consumer)  # the built-ins now, plugin tasks when they register


@register_stage
class MergeResults(Stage):
    """Join one TaskResult per input per frame into a FrameResult (in frame order: consumers keep order).

    An input that sends Features (no consumer in between) counts as a task with no result."""
    key = "results.merge"
    emits = (FrameResult,)

    def open(self, ctx) -> None:
        super().open(ctx)
        self.n = len(ctx.inputs)
        self.pending: dict[tuple[int, int], list] = {}

    def process(self, msg):
        f = msg.source if isinstance(msg, TaskResult) else msg
        k = (f.stream, f.index)
        got = self.pending.setdefault(k, [])
        got.append(msg)
        if len(got) < self.n:
            return None
        del self.pending[k]
        meta = f.meta.derive()
        timings = meta.timings
        results, errors = {}, {}
        for m in got:
            if isinstance(m, TaskResult):
                timings[m.task] = round(m.ms, 3)
                if m.error is not None:
                    errors[m.task] = m.error
                else:
                    results[m.task] = m.result
        lb = f.letterbox
        return FrameResult(meta, time.time_ns(), f.wire_bytes, f.latent_shape, (lb.orig_w, lb.orig_h), results, errors,
                           f.image)

    def close(self):
        if getattr(self, "pending", None):
            self.ctx.log(f"[{self.ctx.name}] {len(self.pending)} frame(s) incomplete at shutdown (an input ended early)")
        return None

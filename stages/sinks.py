"""Sinks: JSON Lines, annotated video, ZeroMQ PUB, live console line. Schema: README "Streaming pipeline"."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from codec.tasks import TASKS, get_task, plain_json
from codec.tasks import station_columns  # noqa: F401 - re-exported (its former home)
from core.rle import rle_decode, rle_encode  # noqa: F401 - re-exported (their former home)
from core.errors import UsageError
from pipeline.stage import FrameResult, ResultRecord, Stage, register_stage


def _names(codec, task: str) -> list[str]:
    """The class names ``codec`` (any object with a ``class_names`` mapping, or None) gives ``task``."""
    names = getattr(codec, "class_names", None)
    return list(names.get(task, [])) if isinstance(names, dict) else []


def frame_to_json(fr: FrameResult, codec=None) -> dict:
    """A frame's JSONL record: the frame's own fields, then one field per task (its ``to_json`` hook in
    :mod:`codec.tasks`, in registry order; results of unregistered tasks pass through when JSON-able), then
    ``errors``. ``codec``: whose ``class_names`` label the results (``ctx.codec()``; None: ids only)."""
    lat = {k: round(float(v), 3) for k, v in fr.timings.items()}
    lat["total"] = round((fr.done_ns - fr.capture_ns) / 1e6, 3) if fr.capture_ns else None
    obj = {"stream": fr.stream, "frame": fr.index,
           "timestamps": {"capture_ns": fr.capture_ns, "sent_ns": fr.sent_ns, "received_ns": fr.received_ns,
                          "done_ns": fr.done_ns},
           "latency_ms": lat, "bytes": fr.wire_bytes, "latent_shape": list(fr.latent_shape),
           "size": list(fr.size)}
    for name in TASKS:
        result = fr.results.get(name)
        if result is not None and name not in obj:
            obj[name] = get_task(name).json_value(result, _names(codec, name))
    for name, result in fr.results.items():  # tasks nobody registered (plugin consumers): pass through
        if name not in obj and name not in TASKS:
            obj[name] = plain_json(result)
    obj["errors"] = dict(fr.errors)
    return obj


@register_stage
class JsonlSink(Stage):
    """One JSON object per frame, one line each, flushed per line (the file is valid at every line end).

    It is the server's commit point (``commit: true``, the default: it ``commits``): a frame's completion
    handle is committed once its line is written and flushed, and the receive stage acknowledges the frame to
    its edge then. Its :class:`stages.commitlog.CommitLog` (:meth:`journal`) is what the receive stage resumes
    from: ``resume: true``: a restarted server appends and skips what the file already holds for the same edge
    session (``PATH.state.json`` beside it); otherwise the file starts empty. Each row names its edge run
    (``session``, from the frame's envelope) when the frame came from an edge."""
    key = "sink.jsonl"
    accepts = (FrameResult, ResultRecord)

    def __init__(self, path: str = "out/results.jsonl", resume: bool = False, commit: bool = True):
        self.path = Path(path)
        self.resume, self.commits = bool(resume), bool(commit)
        self.log = None

    def journal(self):
        """This sink's CommitLog, created on first use (by the receive stage or by :meth:`open`, whichever
        comes first): it reads back an earlier run's rows and state when ``resume``."""
        if self.log is None:
            from stages.commitlog import CommitLog
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.log = CommitLog(self.path, resume=self.resume)
            except OSError as exc:
                raise UsageError(f"cannot write {str(self.path)!r}: {exc}") from exc
        return self.log

    def open(self, ctx) -> None:
        super().open(ctx)
        self.journal()
        try:
            if self.log.resumable:
                ctx.log(f"[{ctx.name}] resuming {self.path}: "
                        + ", ".join(f"stream {s} done up to frame {i}" for s, i in self.log.finished.items()))
                self.fh = open(self.path, "a", encoding="utf-8")
            else:
                self.fh = open(self.path, "w", encoding="utf-8")
                if self.log.state_path.exists():
                    self.log.state_path.unlink()
        except OSError as exc:
            raise UsageError(f"cannot write {str(self.path)!r}: {exc}") from exc

    def process(self, fr):
        obj = fr.record if isinstance(fr, ResultRecord) else frame_to_json(fr, self.ctx.codec())
        run = fr.meta.session
        if run is not None and "session" not in obj:  # the edge run this row belongs to
            obj = {"stream": obj["stream"], "frame": obj["frame"], "session": run, **obj}
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        self.fh.write(line)
        self.fh.flush()
        self.log.wrote(len(line.encode("utf-8")))
        if self.commits:  # durably written: this frame may be acknowledged (once every committer wrote it)
            fr.meta.commit()

    def close(self):
        fh = getattr(self, "fh", None)
        if fh is not None and not fh.closed:
            fh.close()


def annotate(image: np.ndarray, fr: FrameResult, codec=None, alpha: float = 0.4) -> np.ndarray:
    """Draw every task's result with its ``draw`` hook (:mod:`codec.tasks`, in ``draw_order``: the segmentation
    overlay, boxes, the station label), then the names of the tasks that failed on this frame. ``codec``: whose
    ``class_names`` label the drawing (``ctx.codec()``; None: ids only)."""
    import cv2
    out = np.ascontiguousarray(image.copy())
    for task in sorted((get_task(name) for name in TASKS), key=lambda t: t.draw_order):
        result = fr.results.get(task.name)
        if result is not None and task.draw is not None:
            task.draw(out, result, _names(codec, task.name), alpha)
    if fr.errors:
        cv2.putText(out, "err: " + ",".join(fr.errors), (2, out.shape[0] - 4), cv2.FONT_HERSHEY_PLAIN, 0.8,
                    (255, 0, 0), 1)
    return out


class _FrameReader:
    """Re-reads the original frames of a replayed file by index (the server does not receive pixels)."""

    def __init__(self, uri: str | None):
        self.uri = uri
        self.it = None
        self.next_index = 0
        if uri:
            from stages.sources import source_for
            p = Path(str(uri))
            if not (p.is_file() or p.is_dir()):
                self.uri = None  # a live source cannot be re-read: draw on a grey canvas
                return
            import threading

            from pipeline.stage import StageContext, StageStats
            self.src = source_for(str(uri), rate="max")
            self.src.open(StageContext("annotate-reader", "annotate", threading.Event(), StageStats(), {},
                                       lambda m: print(m, file=sys.stderr)))
            self.it = self.src.frames()

    def get(self, index: int, size: tuple[int, int]) -> np.ndarray:
        w, h = size
        while self.it is not None and self.next_index <= index:
            try:
                f = next(self.it)
            except StopIteration:
                self.it = None
                break
            self.next_index += 1
            if self.next_index - 1 == index and f.image.shape[:2] == (h, w):
                return f.image
        return np.full((h, w, 3), 64, np.uint8)


@register_stage
class VideoSink(Stage):
    """Annotated H.264 MP4 via PyAV. Draws on the original frames: carried in-process, re-read from
    ``frames_from`` (the replayed file or folder), or a grey canvas when neither is available."""
    key = "sink.video"
    accepts = (FrameResult,)

    def __init__(self, path: str = "out/annotated.mp4", fps: float = 15, frames_from: str | None = None,
                 codec: str = "libx264"):
        self.path, self.fps, self.frames_from, self.vcodec = Path(path), float(fps), frames_from, codec

    def open(self, ctx) -> None:
        super().open(ctx)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = None
        self.reader = _FrameReader(self.frames_from) if self.frames_from else None
        if self.frames_from and Path(str(self.frames_from)).is_file():
            import av
            try:
                with av.open(str(self.frames_from)) as c:
                    r = c.streams.video[0].average_rate
                    if r:
                        self.fps = float(r)
            except Exception:  # noqa: BLE001
                pass
        self.written = 0

    def _open_container(self, w: int, h: int) -> None:
        import av
        from fractions import Fraction
        self.container = av.open(str(self.path), "w")
        self.vs = self.container.add_stream(self.vcodec, rate=Fraction(self.fps).limit_denominator(1000))
        self.vs.width, self.vs.height = w + (w % 2), h + (h % 2)
        self.vs.pix_fmt = "yuv420p"
        self.size = (w, h)

    def process(self, fr: FrameResult):
        import av
        w, h = fr.size
        if self.container is None:
            self._open_container(w, h)
        img = fr.image if fr.image is not None else (self.reader.get(fr.index, (w, h)) if self.reader
                                                      else np.full((h, w, 3), 64, np.uint8))
        img = annotate(img, fr, self.ctx.codec())
        if (w, h) != self.size or img.shape[1] != self.vs.width or img.shape[0] != self.vs.height:
            import cv2
            img = cv2.resize(img, (self.vs.width, self.vs.height))
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        for pkt in self.vs.encode(vf):
            self.container.mux(pkt)
        self.written += 1

    def close(self):
        c = getattr(self, "container", None)
        if c is not None:
            for pkt in self.vs.encode():
                c.mux(pkt)
            c.close()
            self.container = None
        return None


@register_stage
class ZmqPubSink(Stage):
    """Publish each frame's JSON object on a ZeroMQ PUB socket: two frames, topic then JSON."""
    key = "sink.zmq_pub"
    accepts = (FrameResult, ResultRecord)

    def __init__(self, endpoint: str = "tcp://*:5556", topic: str = "ladon", bind: bool = True):
        from transport.link import check_endpoint
        self.endpoint = check_endpoint(endpoint, "sink.zmq_pub endpoint")
        self.topic, self.bind = topic.encode(), bool(bind)

    def open(self, ctx) -> None:
        super().open(ctx)
        import zmq
        self.sock = zmq.Context.instance().socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 1000)
        try:
            (self.sock.bind if self.bind else self.sock.connect)(self.endpoint)
        except zmq.ZMQError as exc:
            self.sock.close(0)
            raise UsageError(f"sink.zmq_pub cannot bind {self.endpoint!r}: {exc}") from exc

    def process(self, fr):
        obj = fr.record if isinstance(fr, ResultRecord) else frame_to_json(fr, self.ctx.codec())
        self.sock.send_multipart([self.topic, json.dumps(obj).encode()])

    def close(self):
        s = getattr(self, "sock", None)
        if s is not None:
            s.close()
            self.sock = None


@register_stage
class ConsoleSink(Stage):
    """A live status line on stderr: fps, kB/frame, mean latency per stage, drops, errors and who is connected."""
    key = "sink.console"
    accepts = (FrameResult, ResultRecord)

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = float(interval_s)

    def open(self, ctx) -> None:
        super().open(ctx)
        self.t0 = self.last = time.monotonic()
        self.n = self.n_win = 0
        self.bytes = 0
        self.lat: dict[str, float] = {}
        self.counts: dict[int, dict] = {}  # stream -> its latest ``counts`` (count.items upstream)
        self.tty = sys.stderr.isatty()

    def line(self) -> str:
        now = time.monotonic()
        fps = self.n_win / max(now - self.last, 1e-9)
        rt = self.ctx.runtime
        stages = rt.stages() if rt is not None else []
        drops = sum(s.stats.dropped for s in stages)
        errs = sum(s.stats.errors for s in stages)
        lat = " ".join(f"{k} {v / max(self.n_win, 1):.1f}" for k, v in self.lat.items())
        link = rt.link_status() if rt is not None else None
        link = f"  [{link}]" if link else ""
        return (f"frames {self.n}  {fps:5.1f} fps  {self.bytes / max(self.n, 1) / 1000:.2f} kB/frame  "
                f"ms: {lat}{self.counts_text()}  drops {drops}  errors {errs}{link}")

    def counts_text(self) -> str:
        """``  items N (class n, ...)``: the items counted at the station so far, over all streams (the three
        most frequent classes); empty without a count.items stage upstream."""
        if not self.counts:
            return ""
        total, by_class = 0, {}
        for c in self.counts.values():
            total += int(c.get("total") or 0)
            for k, v in (c.get("by_class") or {}).items():
                by_class[k] = by_class.get(k, 0) + int(v)
        top = sorted(by_class.items(), key=lambda kv: -kv[1])[:3]
        more = ", ..." if len(by_class) > 3 else ""
        return f"  items {total}" + (f" ({', '.join(f'{k} {v}' for k, v in top)}{more})" if top else "")

    def process(self, fr):
        self.n += 1
        self.n_win += 1
        if isinstance(fr, ResultRecord):
            self.bytes += int(fr.record.get("bytes", 0))
            timings = {k: v for k, v in fr.record.get("latency_ms", {}).items() if v is not None}
            counts = fr.record.get("counts")
        else:
            self.bytes += fr.wire_bytes
            timings = fr.timings
            counts = fr.results.get("counts")
        if isinstance(counts, dict):
            self.counts[fr.stream] = counts
        for k, v in timings.items():
            self.lat[k] = self.lat.get(k, 0.0) + float(v)
        if time.monotonic() - self.last >= self.interval_s:
            print(("\r" if self.tty else "") + self.line(), end="" if self.tty else "\n", file=sys.stderr, flush=True)
            self.last, self.n_win, self.lat = time.monotonic(), 0, {}

    def close(self):
        if getattr(self, "n", 0) and self.tty:
            print(file=sys.stderr)

"""Sources: recorded video, camera, network stream, image folder, conveyor-line generator, and `source.auto`.

Every frame leaves a source as :class:`pipeline.stage.Frame` with stream id, frame index (from 0) and the
capture timestamp (``time.time_ns()``). Files and folders are replays (lossless: ``live=False``); cameras,
network streams and the conveyor generator are live (``live=True``: dropped under load, counted).

A replay loses nothing silently: a file or folder with no readable frame is refused when the source opens
(UsageError), and one that ends early (a video cut short: fewer frames than its index lists, a partial packet,
a decoding error, frames that did not decode) or holds unreadable images raises
:class:`core.errors.IncompleteInput` after its last readable frame, so the run finishes those frames and
then exits 2 with the counts.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from core.errors import IncompleteInput, UsageError
from pipeline.stage import Frame, FrameMeta, Source, register_stage

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
NETWORK_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "udp://", "tcp://", "http://", "https://", "srt://", "rtp://")


def _check_rate(rate) -> str | float:
    if rate in ("native", "max"):
        return rate
    try:
        r = float(rate)
        if r > 0:
            return r
    except (TypeError, ValueError):
        pass
    raise UsageError(f"rate {rate!r}: use 'native' (the file's own frame rate), 'max' (as fast as possible) "
                     f"or a number of frames per second")


def _check_max(max_frames) -> int | None:
    if max_frames in (None, "", 0):
        return None
    try:
        n = int(max_frames)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise UsageError(f"max_frames {max_frames!r} must be a positive integer (0 or empty: no limit)")
    return n


class _Base(Source):
    emits = (Frame,)

    def __init__(self, stream: int = 0, max_frames: int | None = None):
        self.stream = int(stream)
        self.max_frames = _check_max(max_frames)
        self.count = 0

    def _frame(self, image: np.ndarray) -> Frame:
        f = Frame(FrameMeta(self.stream, self.count, time.time_ns(), live=self.live), image)
        self.count += 1
        return f

    def _more(self) -> bool:
        return (self.max_frames is None or self.count < self.max_frames) and not self.ctx.stop.is_set()


class _Pacer:
    def __init__(self, fps: float | None):
        self.period = 1.0 / fps if fps else 0.0
        self.t0 = None
        self.n = 0

    def wait(self, stop) -> None:
        if not self.period:
            return
        if self.t0 is None:
            self.t0 = time.monotonic()
        target = self.t0 + self.n * self.period
        self.n += 1
        delay = target - time.monotonic()
        if delay > 0:
            stop.wait(delay)


@register_stage
class VideoFileSource(_Base):
    """A recorded video file (any container/codec PyAV reads), replayed losslessly."""
    key = "source.video"
    live = False

    def __init__(self, path: str, rate="native", loop: bool = False, stream: int = 0, max_frames=None):
        super().__init__(stream, max_frames)
        self.path = str(path)
        self.rate = _check_rate(rate)
        self.loop = bool(loop)

    def open(self, ctx) -> None:
        super().open(ctx)
        if not Path(self.path).is_file():
            raise UsageError(f"video file {self.path!r} does not exist")
        try:
            with av.open(self.path) as c:
                if not c.streams.video:
                    raise UsageError(f"{self.path!r} has no video stream")
                s = c.streams.video[0]
                self.fps = float(s.average_rate or s.guessed_rate or 25)
                self.declared = int(s.frames or 0)  # the container's index (mp4/mov); 0 when it has none
                first = next(c.decode(s), None)
        except av.error.FFmpegError as exc:
            raise UsageError(f"cannot read video {self.path!r}: {exc} (an unsupported, corrupt or truncated "
                             f"file)") from exc
        if first is None:
            listed = f" (its index lists {self.declared} frames)" if self.declared else ""
            raise UsageError(f"video {self.path!r} has no decodable frame{listed}: the file is truncated or "
                             f"corrupt; re-record or re-export it")

    def frames(self) -> Iterator[Frame]:
        fps = self.fps if self.rate == "native" else (None if self.rate == "max" else self.rate)
        pacer = _Pacer(fps)
        while True:
            read = _ReadCount()
            try:
                with av.open(self.path) as c:
                    s = c.streams.video[0]
                    s.thread_type = "AUTO"
                    for vf in read.frames(c, s):
                        if not self._more():
                            return
                        pacer.wait(self.ctx.stop)
                        yield self._frame(vf.to_ndarray(format="rgb24"))
            except av.error.FFmpegError as exc:
                raise IncompleteInput(f"video {self.path!r}: decoding failed after {read.decoded} frames "
                                      f"({exc}); the file is truncated or corrupt and the rest of it was not "
                                      f"replayed") from exc
            lost = read.shortfall(self.declared)
            if lost:
                raise IncompleteInput(f"video {self.path!r} {lost}: the file is truncated or corrupt; "
                                      f"the {read.decoded} frames read were replayed, the rest is lost")
            if not self.loop or read.decoded == 0:
                return


class _ReadCount:
    """Decodes a video stream packet by packet, counting what the demuxer and the decoder deliver.

    Frame-threaded decoding (``thread_type = "AUTO"``) drops a broken frame without raising, so a file cut in
    half used to end early and quietly; these counts are how :meth:`shortfall` notices."""

    def __init__(self):
        self.packets = 0  # packets with data that the decoder was meant to output
        self.partial = 0  # packets the demuxer flagged corrupt (e.g. cut off by the end of the file)
        self.decoded = 0

    def frames(self, container, stream) -> Iterator[av.VideoFrame]:
        for pkt in container.demux(stream):
            if pkt.size:  # the last, empty packet only flushes the decoder
                self.packets += 0 if pkt.is_discard else 1
                self.partial += 1 if pkt.is_corrupt else 0
            for vf in pkt.decode():
                self.decoded += 1
                yield vf

    def shortfall(self, declared: int) -> str:
        """What was lost, as words ('' when nothing): against the container's index and the packets read."""
        if declared and self.packets < declared:
            return f"ended after {self.decoded} of the {declared} frames its index lists"
        if self.partial:
            return f"ended in {self.partial} partial packet(s) after {self.decoded} frames"
        if self.decoded < self.packets:
            return f"gave {self.decoded} frames from {self.packets} packets ({self.packets - self.decoded} did " \
                   f"not decode)"
        return ""


@register_stage
class ImageFolderSource(_Base):
    """The images of a folder in name order (png/jpg/bmp/webp/tif), replayed losslessly."""
    key = "source.images"
    live = False

    def __init__(self, path: str, rate="max", loop: bool = False, stream: int = 0, max_frames=None):
        super().__init__(stream, max_frames)
        self.path = Path(path)
        self.rate = _check_rate(rate)
        self.loop = bool(loop)

    def open(self, ctx) -> None:
        import cv2
        super().open(ctx)
        if not self.path.is_dir():
            raise UsageError(f"image folder {str(self.path)!r} does not exist")
        entries = [p for p in self.path.iterdir() if p.is_file()]
        self.files = sorted(p for p in entries if p.suffix.lower() in IMAGE_EXTS)
        n_other = len(entries) - len(self.files)
        others = f"; {n_other} other file(s) ignored" if n_other else ""
        if not self.files:
            raise UsageError(f"image folder {str(self.path)!r} holds no images ({', '.join(IMAGE_EXTS)}){others}")
        if all(cv2.imread(str(p), cv2.IMREAD_COLOR) is None for p in self.files):  # stops at the first good one
            raise UsageError(f"image folder {str(self.path)!r}: none of its {len(self.files)} image file(s) can be "
                             f"read (first: {self.files[0].name}); they are corrupt or not images{others}")

    def frames(self) -> Iterator[Frame]:
        import cv2
        pacer = _Pacer(None if self.rate in ("max", "native") else self.rate)
        skipped: list[Path] = []
        for p in self._paths():
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is None:
                self.ctx.log(f"[{self.ctx.name}] skipping unreadable image {p}")
                self.ctx.stats.errors += 1
                skipped.append(p)
                continue
            pacer.wait(self.ctx.stop)
            yield self._frame(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        if skipped:
            bad = sorted({p.name for p in skipped})
            names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise IncompleteInput(f"image folder {str(self.path)!r}: {len(bad)} unreadable image(s) skipped "
                                  f"({names}); the {self.count} readable ones were replayed")

    def _paths(self) -> Iterator[Path]:
        """The files in name order (over and over with ``loop``) while frames are still wanted."""
        while True:
            for p in self.files:
                if not self._more():
                    return
                yield p
            if not self.loop:
                return


class _LiveAV(_Base):
    live = True
    timeout_s: float = 5.0

    def _open_container(self):
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    def open(self, ctx) -> None:
        super().open(ctx)
        try:
            self.container = self._open_container()
        except (av.error.FFmpegError, OSError) as exc:
            raise UsageError(f"cannot open {self._describe()}: {exc}") from exc
        if not self.container.streams.video:
            self.container.close()
            raise UsageError(f"{self._describe()} carries no video stream")

    def frames(self) -> Iterator[Frame]:
        s = self.container.streams.video[0]
        try:
            for vf in self.container.decode(s):
                if not self._more():
                    return
                yield self._frame(vf.to_ndarray(format="rgb24"))
        except (av.error.FFmpegError, OSError) as exc:
            if self.ctx.stop.is_set():
                return
            if self.count == 0:
                raise RuntimeError(f"{self._describe()} delivered no frame: {exc}") from exc
            if isinstance(exc, (av.error.ExitError,)) or "timed out" in str(exc).lower() or \
                    isinstance(exc, av.error.EOFError):
                self.ctx.log(f"[{self.ctx.name}] {self._describe()} went quiet after {self.count} frames ({exc}); "
                             f"treating it as the end of the stream")
                return
            raise RuntimeError(f"{self._describe()} stopped delivering frames after {self.count}: {exc}") from exc
        finally:
            self.container.close()

    def close(self):
        c = getattr(self, "container", None)
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass


@register_stage
class NetworkStreamSource(_LiveAV):
    """rtsp:// udp:// tcp:// http(s):// srt:// streams through PyAV/FFmpeg, with open and read timeouts."""
    key = "source.stream"

    def __init__(self, url: str, timeout_s: float = 5.0, stream: int = 0, max_frames=None, options: dict | None = None):
        super().__init__(stream, max_frames)
        if not str(url).startswith(NETWORK_SCHEMES):
            raise UsageError(f"stream url {url!r} must start with one of {', '.join(NETWORK_SCHEMES)}")
        self.url = str(url)
        self.timeout_s = float(timeout_s)
        self.options = {str(k): str(v) for k, v in (options or {}).items()}

    def _describe(self) -> str:
        return f"network stream {self.url!r}"

    def _open_container(self):
        opts = dict(self.options)
        if self.url.startswith("rtsp"):
            opts.setdefault("rtsp_transport", "tcp")
        if self.url.startswith("udp://"):
            opts.setdefault("overrun_nonfatal", "1")
            opts.setdefault("fifo_size", "1000000")
        return av.open(self.url, options=opts, timeout=(self.timeout_s, self.timeout_s))


@register_stage
class CameraSource(_LiveAV):
    """A local camera through PyAV: v4l2 (Linux, /dev/videoN), avfoundation (macOS, index), dshow (Windows)."""
    key = "source.camera"

    def __init__(self, device: str = "0", size: str | None = None, fps: float | None = None, input_format: str | None = None,
                 stream: int = 0, max_frames=None, timeout_s: float = 5.0):
        super().__init__(stream, max_frames)
        self.device = str(device)
        self.size, self.fps, self.timeout_s = size, fps, float(timeout_s)
        self.input_format = input_format or {"linux": "v4l2", "darwin": "avfoundation", "win32": "dshow"}.get(
            sys.platform, "v4l2")
        if self.input_format == "v4l2" and self.device.isdigit():
            self.device = f"/dev/video{self.device}"
        if self.input_format == "dshow" and not self.device.startswith("video="):
            self.device = f"video={self.device}"

    def _describe(self) -> str:
        return f"camera {self.device!r} ({self.input_format})"

    def _open_container(self):
        if self.input_format == "v4l2" and not Path(self.device).exists():
            raise UsageError(f"camera {self.device!r} does not exist (no such v4l2 device); list cameras with "
                             f"`ls /dev/video*`")
        opts = {}
        if self.size:
            opts["video_size"] = str(self.size)
        if self.fps:
            opts["framerate"] = str(self.fps)
        return av.open(self.device, format=self.input_format, options=opts, timeout=(self.timeout_s, self.timeout_s))


@register_stage
class ConveyorSource(_Base):
    """The conveyor-line generator as a live synthetic camera (paced at its fps; `rate: max` unpaced)."""
    key = "source.conveyor"
    live = True

    def __init__(self, size: int = 256, fps: float = 15, seed: int = 0, rate="native", stream: int = 0,
                 max_frames=None, live: bool = True):
        super().__init__(stream, max_frames)
        self.size, self.fps, self.seed = int(size), float(fps), int(seed)
        self.rate = _check_rate(rate)
        self.live = bool(live)

    def open(self, ctx) -> None:
        super().open(ctx)
        try:
            from conveyor.line import ConveyorLine, LineConfig
        except ModuleNotFoundError as exc:
            raise UsageError(f"the conveyor-line generator is not available ({exc}); it arrives with issue #2") from exc
        self.line = ConveyorLine(LineConfig(size=self.size, fps=int(self.fps), seed=self.seed))

    def frames(self) -> Iterator[Frame]:
        pacer = _Pacer(self.fps if self.rate == "native" else (None if self.rate == "max" else self.rate))
        n = self.max_frames if self.max_frames is not None else 10 ** 12
        for lf in self.line.frames(n):
            if not self._more():
                return
            pacer.wait(self.ctx.stop)
            yield self._frame(np.ascontiguousarray(lf.image))


def source_for(uri: str, **kw):
    """The source stage for a path or URL: folder -> images, scheme -> stream, /dev/video* or camera:N -> camera,
    conveyor[:SEED] -> generator, anything else -> video file."""
    u = str(uri)
    rate = kw.pop("rate", "native")
    if u.startswith(NETWORK_SCHEMES):
        return NetworkStreamSource(u, **kw)
    if u.startswith("camera:") or u.startswith("/dev/video"):
        return CameraSource(u.split(":", 1)[1] if u.startswith("camera:") else u, **kw)
    if u == "conveyor" or u.startswith("conveyor:"):
        seed = int(u.split(":", 1)[1]) if ":" in u else 0
        return ConveyorSource(seed=seed, rate=rate, **kw)
    p = Path(u)
    if p.is_dir():
        return ImageFolderSource(u, rate="max" if rate == "native" else rate, **kw)
    if not p.exists():
        raise UsageError(f"source {u!r} is neither an existing file or folder nor a stream URL "
                         f"({', '.join(s[:-3] for s in NETWORK_SCHEMES)}), camera:N, /dev/videoN or conveyor[:SEED]")
    return VideoFileSource(u, rate=rate, **kw)


@register_stage
class AutoSource(Source):
    """Picks the source from `uri` (see :func:`source_for`)."""
    key = "source.auto"
    emits = (Frame,)

    def __init__(self, uri: str, **kw):
        self.inner = source_for(uri, **kw)
        self.live = self.inner.live

    def open(self, ctx) -> None:
        super().open(ctx)
        self.inner.open(ctx)

    def frames(self):
        return self.inner.frames()

    def close(self):
        return self.inner.close()

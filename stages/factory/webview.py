"""Live view in a browser (`sink.view`): the annotated stream as MJPEG plus a page with counts, line state and
per-stream health, served by the standard library's ``ThreadingHTTPServer`` on its own threads.

Routes (``http://HOST:PORT``):

* ``/``: the page. It renders from the state embedded in it and then polls ``/api/state`` every ``poll_ms``;
  one card per stream with its MJPEG stream, state, counts, frame rate, latency and edge link.
* ``/api/state``: :meth:`stages.factory.linestate.LineState.snapshot` as JSON (line state, total, per-class
  counts, last item, health; per stream the same plus ``fps``, ``latency_ms``, ``edge``).
* ``/stream/<N>.mjpg``: stream N's annotated frames, ``multipart/x-mixed-replace`` JPEG, at most ``max_fps``.
* ``/snapshot/<N>.jpg``: its latest annotated frame.

Pixels: the server does not receive them over the wire. The view draws (``stages.sinks.annotate``, plus each
item's track id) on, in order: ``FrameResult.image`` (carried in-process), the source's own frame when the
view also takes the source stage as an input (the one-process demo: ``inputs: [source, events]``, frames matched
to results by stream and index, so live sources work too), the replayed file re-read from ``frames_from`` (as
``sink.video`` does), or a grey canvas. Frames are annotated and JPEG-encoded only when a browser asks, once per
frame whatever the number of viewers, so the view costs next to nothing while nobody watches.

No authentication: the default host 127.0.0.1 serves this machine only; ``host: 0.0.0.0`` opens it to the
network (a plant network, behind a reverse proxy with authentication for anything wider).
"""
from __future__ import annotations

import html
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from core.errors import UsageError
from pipeline.stage import Frame, FrameResult, Stage, register_stage
from stages.factory.linestate import LineState

_STREAM_PATH = re.compile(r"^/(stream|snapshot)/(-?\d+)\.(mjpg|jpg)$")
BOUNDARY = "ladonframe"
KEEPALIVE_S = 2.0  # an idle MJPEG stream resends its frame this often


class _StreamFrames:
    """The latest result of one stream and its image; the JPEG made from them on demand (once per frame)."""

    def __init__(self) -> None:
        self.seq = 0
        self.image: np.ndarray | None = None
        self.fr: FrameResult | None = None
        self.jpeg_seq = -1
        self.jpeg = b""
        self.encode_lock = threading.Lock()


class LiveView(Stage):
    """Browser live view: annotated MJPEG per stream and a page with counts, line state and health (stdlib HTTP)."""
    key = "sink.view"
    accepts = (Frame, FrameResult)

    def __init__(self, port: int = 8080, host: str = "127.0.0.1", line: str = "line1", frames_from: str | None = None,
                 max_fps: float = 10.0, jpeg_quality: int = 80, poll_ms: int = 1000, stale_s: float = 5.0,
                 classes: list[str] | None = None, frame_buffer: int = 256, title: str | None = None,
                 display_width: int = 512):
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise UsageError(f"sink.view: port {port!r} must be a TCP port 0-65535 (0: any free port), e.g. port: 8080")
        if not isinstance(host, str) or not host:
            raise UsageError(f"sink.view: host {host!r} must be an address to listen on, e.g. 127.0.0.1 (this machine) "
                             f"or 0.0.0.0 (every interface)")
        if not isinstance(line, str) or not line:
            raise UsageError(f"sink.view: line {line!r} must be the line's name (as in events.items), e.g. line1")
        for name, v, lo, hi in (("max_fps", max_fps, 0.1, 120), ("stale_s", stale_s, 0.1, None)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
                raise UsageError(f"sink.view: {name} {v!r} must be a number in [{lo}, {hi or 'inf'}]")
        for name, v, lo, hi in (("jpeg_quality", jpeg_quality, 10, 100), ("poll_ms", poll_ms, 100, 60000),
                                ("frame_buffer", frame_buffer, 1, 100000), ("display_width", display_width, 64, 4096)):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise UsageError(f"sink.view: {name} {v!r} must be a whole number in [{lo}, {hi}]")
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise UsageError(f"sink.view: classes {classes!r} must be a list of class names, e.g. [tshirt, bag]")
        self.port, self.host, self.line = port, host, line
        self.frames_from = frames_from
        self.min_interval = 1.0 / float(max_fps)
        self.jpeg_quality, self.poll_ms, self.stale_s = jpeg_quality, poll_ms, float(stale_s)
        self.classes, self.frame_buffer, self.display_width = classes, frame_buffer, display_width
        self.title = title or f"Ladon - {line}"
        self.server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def open(self, ctx) -> None:
        super().open(ctx)
        names = self.classes or list(getattr(ctx.codec(), "class_names", {}).get("detection", []))
        self.state = LineState(self.line, names, stale_s=self.stale_s)
        self.cond = threading.Condition()
        self.closing = False
        self.streams: dict[int, _StreamFrames] = {}
        self.pending: dict[int, dict[int, np.ndarray]] = {}  # source frames waiting for their results
        self.reader = None
        if self.frames_from:
            from stages.sinks import _FrameReader
            self.reader = _FrameReader(self.frames_from)
        handler = type("Handler", (_Handler,), {"view": self})  # the routes, bound to this stage
        try:
            self.server = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as exc:
            raise UsageError(f"sink.view cannot listen on {self.host}:{self.port}: {exc.strerror or exc}; choose "
                             f"another port (port: 0 picks a free one)") from exc
        self.server.daemon_threads = True  # MJPEG clients hold a thread each; they end with the process
        self.bound_port = self.server.server_address[1]
        self.url = f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.bound_port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name=f"view-{ctx.name}", daemon=True)
        self.thread.start()
        ctx.stats.extra["port"] = self.bound_port
        ctx.log(f"[{ctx.name}] live view on {self.url} (MJPEG /stream/N.mjpg, JSON /api/state)")

    def close(self) -> None:
        server = self.server
        if server is None:
            return None
        self.state.stop()
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        server.shutdown()
        server.server_close()
        self.thread.join(5.0)
        self.server = None
        return None

    # ------------------------------------------------------------------ frames
    def process(self, msg: Frame | FrameResult) -> None:
        if isinstance(msg, Frame):  # the source's frame, waiting for its result (one-process graphs)
            with self.cond:
                sf = self.streams.get(msg.stream)
                latest = sf.fr.index if sf is not None and sf.fr is not None else -1
                if msg.index == latest and sf.image is None:  # its result came first (separate threads)
                    sf.image = msg.image
                    sf.seq += 1
                    self.cond.notify_all()
                elif msg.index > latest:
                    waiting = self.pending.setdefault(msg.stream, {})
                    waiting[msg.index] = msg.image
                    while len(waiting) > self.frame_buffer:
                        waiting.pop(min(waiting))
            return None
        fr = msg
        if not self.state.classes:
            names = list(getattr(self.ctx.codec(), "class_names", {}).get("detection", []))
            if names:
                self.state.set_classes(names)
        self.state.update(fr)
        with self.cond:
            waiting = self.pending.get(fr.stream, {})
            image = fr.image if fr.image is not None else waiting.pop(fr.index, None)
            for i in [i for i in waiting if i < fr.index]:  # results come in order: older frames are done
                del waiting[i]
        if image is None and self.reader is not None:
            image = self.reader.get(fr.index, fr.size)
        with self.cond:
            sf = self.streams.setdefault(fr.stream, _StreamFrames())
            sf.seq += 1
            sf.image, sf.fr = image, fr
            self.cond.notify_all()
        return None

    def jpeg(self, stream: int) -> tuple[int, bytes] | None:
        """(sequence number, JPEG) of the stream's latest frame, annotated; None before its first frame."""
        with self.cond:
            sf = self.streams.get(stream)
            if sf is None or sf.fr is None:
                return None
            seq, image, fr = sf.seq, sf.image, sf.fr
        with sf.encode_lock:
            if sf.jpeg_seq != seq:
                sf.jpeg = self._encode(image, fr)
                sf.jpeg_seq = seq
            return sf.jpeg_seq, sf.jpeg

    def _encode(self, image: np.ndarray | None, fr: FrameResult) -> bytes:
        import cv2

        from stages.sinks import annotate
        w, h = fr.size
        if image is None or image.shape[:2] != (h, w):
            image = np.full((h, w, 3), 64, np.uint8)
        out = annotate(image, fr, self.ctx.codec())
        det = fr.results.get("detection") or {}
        ids = det.get("track_ids")
        if ids is not None:  # the item id next to each tracked box (what events and the JSONL call it)
            for b, tid in zip(det.get("boxes", []), ids):
                if int(tid) >= 0:
                    x1, y2 = int(round(float(b[0]))), int(round(float(b[3])))
                    cv2.putText(out, f"#{int(tid)}", (x1 + 1, max(9, y2 - 2)), cv2.FONT_HERSHEY_PLAIN, 0.8,
                                (255, 255, 255), 1)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR),
                               [int(cv2.IMWRITE_JPEG_QUALITY), self.jpeg_quality])
        if not ok:
            raise RuntimeError(f"sink.view: JPEG encoding failed for frame {fr.index} of stream {fr.stream}")
        return buf.tobytes()

    def snapshot(self) -> dict[str, Any]:
        snap = self.state.snapshot(self.ctx.runtime)
        with self.cond:
            snap["view"] = {"poll_ms": self.poll_ms, "title": self.title,
                            "frames": sorted(s for s, sf in self.streams.items() if sf.fr is not None)}
        return snap

    def page(self) -> bytes:
        snap = json.dumps(self.snapshot(), separators=(",", ":")).replace("</", "<\\/")
        return (_PAGE.replace("__TITLE__", html.escape(self.title)).replace("__W__", str(self.display_width))
                .replace("__STATE__", snap)).encode("utf-8")


class _Handler(BaseHTTPRequestHandler):
    """Routes of the live view; ``view`` is set on a per-stage subclass."""

    view: LiveView
    server_version = "ladon-view/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request would drown the console line

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        try:
            if path in ("/", "/index.html"):
                self._send(200, self.view.page(), "text/html; charset=utf-8")
            elif path == "/api/state":
                self._send(200, json.dumps(self.view.snapshot()).encode(), "application/json")
            elif (m := _STREAM_PATH.match(path)) and (m.group(1), m.group(3)) in (("stream", "mjpg"),
                                                                                   ("snapshot", "jpg")):
                stream = int(m.group(2))
                if m.group(1) == "snapshot":
                    got = self.view.jpeg(stream)
                    if got is None:
                        self._send(404, f"no frame of stream {stream} yet\n".encode(), "text/plain")
                    else:
                        self._send(200, got[1], "image/jpeg")
                else:
                    self._mjpeg(stream)
            else:
                self._send(404, b"not found: try /, /api/state, /stream/0.mjpg or /snapshot/0.jpg\n", "text/plain")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the browser went away

    def _mjpeg(self, stream: int) -> None:
        view = self.view
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.wfile.write(f"--{BOUNDARY}\r\n".encode())
        self.wfile.flush()
        last, sent_at = 0, 0.0
        while True:
            with view.cond:
                view.cond.wait_for(lambda: view.closing or (stream in view.streams
                                                            and view.streams[stream].seq != last),
                                   timeout=KEEPALIVE_S)
                if view.closing:
                    return
            got = view.jpeg(stream)
            if got is None:
                continue
            if got[0] == last:  # nothing new (a paused line): resend now and then, which also finds dead clients
                if time.monotonic() - sent_at >= KEEPALIVE_S:
                    self._part(got[1])
                    sent_at = time.monotonic()
                continue
            wait = view.min_interval - (time.monotonic() - sent_at)
            if wait > 0:
                time.sleep(wait)
                got = view.jpeg(stream) or got  # the newest frame after the pause
            if last == 0:
                # browsers (Chromium at least) fire the image's `load` and paint a multipart part only when the
                # next part arrives: the first frame goes twice so a page shows it at once, paused line or not
                self._part(got[1])
            last = got[0]
            self._part(got[1])
            sent_at = time.monotonic()

    def _part(self, jpeg: bytes) -> None:
        """One multipart part, closed at once by the next boundary line."""
        self.wfile.write(f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg
                         + f"\r\n--{BOUNDARY}\r\n".encode())
        self.wfile.flush()


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
 body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;background:#15181d;
      color:#e6e6e6}
 header{display:flex;align-items:center;gap:18px;padding:10px 16px;background:#1f242b;border-bottom:1px solid #333}
 header h1{font-size:18px;margin:0;font-weight:600}
 .badge{padding:2px 10px;border-radius:10px;font-weight:600;text-transform:uppercase;font-size:12px}
 .running{background:#1e7b34;color:#fff}.idle{background:#b7791f;color:#fff}.waiting{background:#555;color:#fff}
 .stopped{background:#9b2c2c;color:#fff}
 .big{font-size:26px;font-weight:700}.muted{color:#9aa3ad}
 main{display:flex;flex-wrap:wrap;gap:16px;padding:16px}
 section{background:#1f242b;border:1px solid #333;border-radius:6px;padding:12px}
 table{border-collapse:collapse}td,th{padding:2px 10px 2px 0;text-align:left}
 td.n{text-align:right;font-variant-numeric:tabular-nums}
 .stream{width:__W__px;max-width:calc(100vw - 60px)}
 .stream img{display:block;width:100%;height:auto;background:#000}
 .health span{margin-right:12px}
</style></head>
<body>
<header><h1 id="title"></h1><span id="state" class="badge"></span>
 <span>total <span id="total" class="big"></span></span><span><span id="rate"></span> items/min</span>
 <span class="muted" id="last"></span><span class="muted" id="edges"></span></header>
<main><section><h3>Counts by class</h3><table id="counts"></table>
 <p class="muted" id="health"></p></section><div id="streams" style="display:contents"></div></main>
<script id="init" type="application/json">__STATE__</script>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const time = (ns) => ns ? new Date(ns / 1e6).toLocaleTimeString() : "-";
function countsRows(byClass) {
  return Object.entries(byClass).map(([k, v]) => `<tr><td>${esc(k)}</td><td class="n">${v}</td></tr>`).join("");
}
function lastItem(li) {  // plain text (set as textContent)
  return li ? `last: #${li.track_id} ${li.class} (stream ${li.stream}, frame ${li.frame}) at ${time(li.time_ns)}`
            : "no item counted yet";
}
function card(id) {
  let el = $("stream-" + id);
  if (!el) {
    el = document.createElement("section");
    el.className = "stream"; el.id = "stream-" + id;
    el.innerHTML = `<h3>stream ${esc(id)} <span class="badge"></span></h3><img alt="stream ${esc(id)}"
      src="/stream/${encodeURIComponent(id)}.mjpg"><p class="health"></p><table></table>`;
    $("streams").appendChild(el);
  }
  return el;
}
function render(s) {
  document.title = s.view.title;
  $("title").textContent = s.view.title;
  $("state").textContent = s.state; $("state").className = "badge " + s.state;
  $("total").textContent = s.total; $("rate").textContent = s.items_per_min.toFixed(1);
  $("last").textContent = lastItem(s.last_item);
  const ce = s.health.connected_edges;
  $("edges").textContent = ce === null ? "" : `edges connected: ${ce}`;
  $("counts").innerHTML = countsRows(s.by_class);
  $("health").textContent = `frames ${s.health.frames}, last frame ${time(s.health.last_frame_ns)}` +
    (s.health.receiving ? "" : " (not receiving)") + (s.health.counting ? "" : "; no counts in the results");
  for (const [id, st] of Object.entries(s.streams)) {
    const el = card(id), h = st.health;
    const b = el.querySelector(".badge"); b.textContent = st.state; b.className = "badge " + st.state;
    const age = h.last_frame_ns ? ((s.time_ns - h.last_frame_ns) / 1e9).toFixed(1) + " s ago" : "-";
    const edge = h.edge ? (h.edge.connected ? "edge up " : "edge silent ") + h.edge.peer : "";
    el.querySelector(".health").innerHTML = `<span>total <b>${st.total}</b></span>` +
      `<span>${h.fps.toFixed(1)} fps</span>` +
      `<span>latency ${h.latency_ms === null ? "-" : h.latency_ms.toFixed(0) + " ms"}</span>` +
      `<span>frames ${h.frames}</span><span>last ${age}</span><span>${esc(edge)}</span>`;
    el.querySelector("table").innerHTML = countsRows(Object.fromEntries(
      Object.entries(st.by_class).filter(([, v]) => v > 0)));
  }
}
render(JSON.parse($("init").textContent));
async function poll() {
  try {
    const r = await fetch("/api/state", {cache: "no-store"});
    if (r.ok) render(await r.json());
  } catch (e) { $("state").textContent = "view offline"; $("state").className = "badge stopped"; }
  setTimeout(poll, JSON.parse($("init").textContent).view.poll_ms);
}
setTimeout(poll, JSON.parse($("init").textContent).view.poll_ms);
</script></body></html>
"""

register_stage(LiveView)

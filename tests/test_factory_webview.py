"""`sink.view` in a real running graph, over real HTTP and in a real headless Chromium.

A source of conveyor frames (pixels) and a source of their detections (conveyor truth) feed the one-process wiring
the demo uses: track.items -> count.items -> events.items -> sink.view (inputs: the frames and the results) +
sink.jsonl. Checked: the JSON state and the page carry the JSONL's counts, the MJPEG stream and the snapshot are the
real frame annotated (not a grey canvas), Chromium renders the page with the counts (DOM after its scripts ran)
and its screenshot shows the frame, and the server is gone after the graph ends.
"""
from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conveyor.classes import ITEM_NAMES
from conveyor.line import LineConfig
from core.errors import UsageError
from pipeline.graph import GraphRunner, parse_graph
from pipeline.stage import Frame, FrameMeta, FrameResult, Source, create_stage, register_stage
from stages.factory import webview  # noqa: F401  (registers sink.view)
from stages.factory.truth import IdentifiedLine, detections_from_truth

cv2 = pytest.importorskip("cv2")
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
N = 90
LINE = dict(size=256, seed=3, belt_speed=1.0)


class _Gated(Source):
    done = threading.Event()

    def _wait(self):
        while not self.done.wait(0.05) and not self.ctx.stop.is_set():
            pass


@register_stage
class LinePixels(_Gated):
    """Test source: the conveyor line's frames (what source.* emits), then waits for `done`."""
    key = "test.view_line_pixels"
    emits = (Frame,)

    def frames(self):
        for tf in IdentifiedLine(LineConfig(**LINE)).frames(N):
            yield Frame(FrameMeta(0, tf.frame.index, time.time_ns()), tf.frame.image)
        self._wait()


@register_stage
class LineResults(_Gated):
    """Test source: the same line's detections as results (no pixels, as a server gets them), then waits."""
    key = "test.view_line_results"
    emits = (FrameResult,)

    def frames(self):
        rng = np.random.default_rng(0)
        for tf in IdentifiedLine(LineConfig(**LINE)).frames(N):
            now = time.time_ns()
            meta = FrameMeta(0, tf.frame.index, now - 40_000_000, timings={"decode": 12.0}, sent_ns=now - 30_000_000,
                             received_ns=now - 20_000_000)
            yield FrameResult(meta, now, 900, (24, 64, 64), (256, 256),
                              {"detection": detections_from_truth(tf, rng, drop=0.05)}, {})
        self._wait()


def get(url: str) -> bytes:
    return urllib.request.urlopen(url, timeout=10).read()


def chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--hide-scrollbars", "--force-device-scale-factor=1", f"--user-data-dir={tmp}", *args],
                          capture_output=True, timeout=60)


def first_mjpeg_part(port: int) -> tuple[str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/stream/0.mjpg")
    r = conn.getresponse()
    ctype = r.getheader("Content-Type")
    boundary = ctype.split("boundary=")[1]
    assert r.fp.readline().strip() == f"--{boundary}".encode()
    headers = {}
    while (line := r.fp.readline().strip()):
        k, _, v = line.decode().partition(":")
        headers[k.lower()] = v.strip()
    assert headers["content-type"] == "image/jpeg"
    body = r.fp.read(int(headers["content-length"]))
    conn.close()
    return ctype, body


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; "
                                             "scripts/bootstrap.sh does it)")
def test_live_view_in_headless_chromium(tmp_path):
    out = tmp_path / "r.jsonl"
    spec = parse_graph({"name": "factory_view_test", "stages": [
        {"name": "pixels", "key": "test.view_line_pixels"},
        {"name": "results", "key": "test.view_line_results"},
        {"name": "track", "key": "track.items", "inputs": ["results"],
         "params": {"names": ITEM_NAMES, "clock": "frames"}},
        {"name": "count", "key": "count.items", "inputs": ["track"]},
        {"name": "events", "key": "events.items", "inputs": ["count"], "params": {"line": "L1"}},
        {"name": "view", "key": "sink.view", "inputs": ["pixels", "events"],
         "params": {"port": 0, "line": "L1", "classes": ITEM_NAMES, "poll_ms": 200}},
        {"name": "jsonl", "key": "sink.jsonl", "inputs": ["events"], "params": {"path": str(out)}},
    ]})
    _Gated.done.clear()
    runner = GraphRunner(spec, log=lambda m: None)
    runner.open()
    runner.start()
    view = runner.nodes["view"].stage
    base = f"http://127.0.0.1:{view.bound_port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                out.exists() and len(out.read_text().splitlines()) == N
                and json.loads(get(base + "/api/state"))["health"]["frames"] == N):
            time.sleep(0.1)
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(rows) == N
        last = rows[-1]["counts"]
        assert last["total"] > 3

        # JSON and page: the JSONL's counts
        state = json.loads(get(base + "/api/state"))
        assert state["total"] == last["total"] == state["streams"]["0"]["total"]
        assert state["by_class"] == {c: last["by_class"].get(c, 0) for c in ITEM_NAMES}
        assert state["state"] == "running" and state["health"]["receiving"] is True
        assert state["health"]["connected_edges"] is None and state["view"]["frames"] == [0]
        assert state["last_item"]["track_id"] == [c for r in rows for c in r["counts"]["counted"]][-1]["id"]
        page = get(base + "/").decode()
        assert '"total":%d' % last["total"] in page and "/stream/" in page

        # the snapshot is the real last frame, annotated: far closer to it than to a grey canvas
        original = next(tf.frame.image for tf in IdentifiedLine(LineConfig(**LINE)).frames(N)
                        if tf.frame.index == N - 1)
        deadline = time.monotonic() + 10  # the pixel source runs in its own thread: its last frame may come last
        while True:
            snap = cv2.cvtColor(cv2.imdecode(np.frombuffer(get(base + "/snapshot/0.jpg"), np.uint8),
                                             cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            diff = np.abs(snap.astype(int) - original.astype(int))
            if np.median(diff) < 8 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert snap.shape == original.shape and np.median(diff) < 8
        assert np.abs(snap.astype(int) - 64).mean() > 4 * diff.mean()

        # MJPEG: multipart/x-mixed-replace of decodable JPEG frames
        ctype, part = first_mjpeg_part(view.bound_port)
        assert ctype.startswith("multipart/x-mixed-replace; boundary=")
        assert cv2.imdecode(np.frombuffer(part, np.uint8), cv2.IMREAD_COLOR).shape == (256, 256, 3)

        # a real browser: the DOM after the page's scripts ran shows the counts ...
        t0 = time.monotonic()
        dom = chromium(["--dump-dom", base + "/"], tmp_path / "profile1")
        assert dom.returncode == 0, dom.stderr.decode()[-2000:]
        html = dom.stdout.decode()
        assert f'<span id="total" class="big">{last["total"]}</span>' in html
        for name, n in last["by_class"].items():
            assert f'<tr><td>{name}</td><td class="n">{n}</td></tr>' in html
        assert 'class="badge running">running<' in html and 'id="stream-0"' in html

        # ... and its screenshot shows the annotated frame
        png = tmp_path / "view.png"
        shot = chromium([f"--screenshot={png}", "--window-size=1000,760", base + "/"], tmp_path / "profile2")
        assert shot.returncode == 0 and png.is_file(), shot.stderr.decode()[-2000:]
        assert time.monotonic() - t0 < 30
        img = cv2.imread(str(png), cv2.IMREAD_COLOR)
        assert img.shape[:2] == (760, 1000) and img.std() > 20  # not a blank page
        shown = cv2.resize(cv2.cvtColor(snap, cv2.COLOR_RGB2BGR), (512, 512), interpolation=cv2.INTER_LINEAR)
        match = cv2.matchTemplate(img, shown, cv2.TM_CCOEFF_NORMED)  # the page shows frames 512 px wide
        assert match.max() > 0.9, match.max()
    finally:
        _Gated.done.set()
        assert runner.wait() == 0
    with pytest.raises(OSError):  # the HTTP server is gone after close
        get(base + "/api/state")


def test_frames_re_read_from_the_replayed_file(tmp_path):
    """The server-only wiring: no pixels arrive, the view re-reads them from `frames_from` (the replayed video)."""
    from conveyor.export import write_video
    from conveyor.line import ConveyorLine
    from pipeline.stage import StageContext, StageStats

    video = tmp_path / "line.mp4"
    frames = list(ConveyorLine(LineConfig(size=128, seed=5)).frames(5))
    write_video(iter(frames), video, 15)
    stage = create_stage("sink.view", port=0, frames_from=str(video))
    stage.open(StageContext("view", "t", threading.Event(), StageStats(), {}, lambda m: None))
    try:
        for i in range(5):
            now = time.time_ns()
            stage.process(FrameResult(FrameMeta(0, i, now, sent_ns=now, received_ns=now), now, 100, (24, 32, 32),
                                      (128, 128), {}, {}))
        snap = cv2.cvtColor(cv2.imdecode(np.frombuffer(get(f"http://127.0.0.1:{stage.bound_port}/snapshot/0.jpg"),
                                                       np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.abs(snap.astype(int) - frames[4].image.astype(int)).mean() < 6  # H.264 + JPEG, no boxes
        assert json.loads(get(f"http://127.0.0.1:{stage.bound_port}/api/state"))["health"]["counting"] is False
    finally:
        stage.close()


@pytest.mark.parametrize("params,words", [
    ({"port": 70000}, ["port", "70000"]),
    ({"host": ""}, ["host", "''"]),
    ({"max_fps": 0}, ["max_fps", "0"]),
    ({"jpeg_quality": 5}, ["jpeg_quality", "5", "[10, 100]"]),
    ({"classes": "bag"}, ["classes", "'bag'"]),
])
def test_bad_view_options(params, words):
    with pytest.raises(UsageError) as e:
        create_stage("sink.view", **params)
    assert all(w in str(e.value) for w in words), str(e.value)

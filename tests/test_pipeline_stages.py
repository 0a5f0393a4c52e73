"""Single stages in-process: image-folder source, source dispatch, ZeroMQ PUB sink, JSONL sink, merge errors."""
import json
import threading
import time

import cv2
import numpy as np
import pytest
import zmq

from core.errors import UsageError
from core.geometry import Letterbox
from pipeline.stage import Features, FrameMeta, FrameResult, StageContext, StageStats, TaskResult, create_stage
from stages.sources import CameraSource, ImageFolderSource, NetworkStreamSource, VideoFileSource, source_for


def ctx(name="t", inputs=()):
    return StageContext(name, "g", threading.Event(), StageStats(), {}, lambda m: None, list(inputs))


def frame_result(index=0, errors=None):
    seg = np.zeros((4, 6), np.uint8)
    seg[1:3, 2:5] = 2
    return FrameResult(FrameMeta(0, index, 1, timings={"decode": 1.0}, sent_ns=2, received_ns=3), 4, 100, (24, 1, 1),
                       (6, 4),
                       {"detection": {"boxes": np.array([[1, 1, 3, 3]], np.float32), "scores": np.array([0.9]),
                                      "classes": np.array([1])},
                        "segmentation": seg, "classification": {"label": 2, "top5": [(2, 0.8), (1, 0.1)]}},
                       errors or {})


def test_image_folder_source_and_dispatch(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), np.full((10, 12, 3), i * 50, np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    src = source_for(str(tmp_path))
    assert isinstance(src, ImageFolderSource)
    src.open(ctx())
    frames = list(src.frames())
    assert [f.index for f in frames] == [0, 1, 2] and frames[2].image.shape == (10, 12, 3)
    assert frames[2].image[0, 0, 0] == 100 and frames[0].capture_ns <= frames[2].capture_ns
    assert isinstance(source_for("udp://127.0.0.1:1234"), NetworkStreamSource)
    assert isinstance(source_for("camera:0"), CameraSource)
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    assert isinstance(source_for(str(video)), VideoFileSource)
    with pytest.raises(UsageError, match="neither an existing file"):
        source_for(str(tmp_path / "nope.mp4"))
    with pytest.raises(UsageError, match="no such v4l2 device"):
        CameraSource("/dev/video99").open(ctx())


def test_jsonl_and_pub_sinks(tmp_path):
    jl = create_stage("sink.jsonl", path=str(tmp_path / "r.jsonl"))
    jl.open(ctx())
    import socket
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        p = so.getsockname()[1]
    pub = create_stage("sink.zmq_pub", endpoint=f"tcp://127.0.0.1:{p}")
    pub.open(ctx())
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"ladon")
    sub.connect(f"tcp://127.0.0.1:{p}")
    time.sleep(0.3)  # PUB/SUB join
    fr = frame_result(errors={"flaky": "boom"})
    jl.process(fr)
    pub.process(fr)
    assert sub.poll(3000)
    topic, body = sub.recv_multipart()
    line = json.loads((tmp_path / "r.jsonl").read_text())
    assert topic == b"ladon" and json.loads(body) == line
    assert line["segmentation"] == {"size": [4, 6], "values": [0, 2, 0, 2, 0], "counts": [8, 3, 3, 3, 7]}
    assert line["detection"]["boxes"] == [[1.0, 1.0, 3.0, 3.0]] and line["classification"]["label"] == 2
    assert line["errors"] == {"flaky": "boom"} and line["bytes"] == 100
    jl.close()
    pub.close()
    sub.close(0)


def test_merge_joins_tasks_and_keeps_errors():
    m = create_stage("results.merge")
    m.open(ctx("merge", ["a", "b"]))
    f = Features(FrameMeta(0, 5, 1, timings={"decode": 1.0}, sent_ns=2, received_ns=3), 99, (24, 1, 1),
                 Letterbox(6, 4, 8, 1.0, 1, 2, 6, 4), None)
    assert m.process(TaskResult("detection", f, {"boxes": []}, None, 1.5)) is None
    out = m.process(TaskResult("segmentation", f, None, "ValueError: bad", 0.5))
    assert out.index == 5 and out.results == {"detection": {"boxes": []}} and out.errors == {"segmentation": "ValueError: bad"}
    assert out.timings["detection"] == 1.5 and out.size == (6, 4)

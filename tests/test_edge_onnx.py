"""The torch-free edge: ONNX encoder + constriction give the PyTorch edge's bytes, and an edge process that uses
them imports neither PyTorch, CompressAI nor Ultralytics (real export, real onnxruntime, real ZeroMQ)."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from codec.api import SplitCodec
from codec.edge_onnx import EdgeExportError, OnnxEdgeCodec, edge_paths, export_edge, symbol_mismatches
from conveyor.line import ConveyorLine, LineConfig
from tests.test_pipeline_e2e import ROOT, SERVER_YAML, cmd, env, read_jsonl, write_video


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    codec = SplitCodec.random(input_size=64, seed=0)
    onnx_path, npz_path = export_edge(codec, tmp_path_factory.mktemp("edge") / "tiny.pt")
    return codec, onnx_path


def test_onnx_edge_payloads_equal_torch_edge(exported):
    codec, onnx_path = exported
    assert onnx_path.name == "tiny.edge.onnx" and edge_paths(onnx_path)[1].is_file()
    edge = OnnxEdgeCodec(onnx_path)
    frames = np.stack([f.image for f in ConveyorLine(LineConfig(size=64, seed=21)).frames(12)])
    got, want = edge.encode(frames), codec.encode(frames)
    assert [g.payload for g in got] == [w.payload for w in want]
    assert edge.fingerprint == codec.fingerprint and got[0].latent_shape == want[0].latent_shape
    decoded = codec.decode(got)  # the server decodes what the ONNX edge sends
    assert decoded.batch == len(frames)
    with pytest.raises(ValueError, match="letterbox"):
        edge.encode(np.zeros((1, 32, 32, 3), np.uint8))


def test_only_rounding_ties_may_differ():
    """The export check: a neighbouring symbol where PyTorch's value sits on x.5 (within float error) is a tie;
    the same difference elsewhere, or a jump of two, is a real mismatch."""
    centred = np.array([[-1.5000008, 0.2, 2.49999, 3.7]], np.float32)
    want = np.array([[-2, 0, 2, 4]], np.int32)
    assert symbol_mismatches(want.copy(), want, centred) == (0, 0)
    assert symbol_mismatches(np.array([[-1, 0, 3, 4]], np.int32), want, centred) == (0, 2)
    assert symbol_mismatches(np.array([[-1, 1, 2, 5]], np.int32), want, centred) == (2, 1)
    assert symbol_mismatches(np.array([[0, 0, 2, 4]], np.int32), want, centred) == (1, 0)


def test_foreign_files_are_refused(tmp_path, exported):
    _, onnx_path = exported
    with pytest.raises(FileNotFoundError, match="python -m codec.edge_onnx"):
        OnnxEdgeCodec(tmp_path / "nothing.edge.onnx")
    bad = tmp_path / "bad.edge.onnx"
    bad.write_bytes(onnx_path.read_bytes())
    edge_paths(bad)[1].write_bytes(b"not an npz")
    with pytest.raises(EdgeExportError, match="not a readable edge export"):
        OnnxEdgeCodec(bad)


def test_edge_process_runs_without_torch_against_a_torch_server(tmp_path, exported):
    _, onnx_path = exported
    n = 6
    video = write_video(tmp_path / "clip.mp4", n, 80, 48)
    cfg = tmp_path / "server.yaml"
    cfg.write_text(SERVER_YAML.format(conf=0.0).replace("  - {name: flaky, key: test.flaky, inputs: [decode]}\n", "")
                   .replace(", flaky]", "]"))
    out, ep = tmp_path / "out", f"ipc://{tmp_path}/edge.sock"
    server = subprocess.Popen(cmd("server", "--config", str(cfg), "--bind", ep, "--checkpoint", "random:64",
                                  "--out", str(out), "--quiet"), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    edge_env = dict(env(), PYTHONPROFILEIMPORTTIME="1")  # every import the edge makes, on stderr
    edge = subprocess.run(cmd("edge", "--source", str(video), "--connect", ep, "--checkpoint", str(onnx_path),
                              "--rate", "max", "--quiet"), cwd=ROOT, env=edge_env, capture_output=True, text=True,
                          timeout=120)
    try:
        s_out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert edge.returncode == 0, edge.stderr[-3000:]
    assert server.returncode == 0, s_out
    imported = {line.split("|")[-1].strip().split(".")[0] for line in edge.stderr.splitlines()
                if line.startswith("import time:")}
    assert "onnxruntime" in imported and "constriction" in imported
    assert not imported & {"torch", "compressai", "ultralytics"}, sorted(imported & {"torch", "compressai",
                                                                                    "ultralytics"})
    rows = read_jsonl(out / "results.jsonl")
    assert [r["frame"] for r in rows] == list(range(n))
    assert all(r["bytes"] > 74 for r in rows)


def test_export_parts_name_every_file_the_export_writes(tmp_path):
    """`train --resume` re-exports when any of `export_parts` is missing (an export cut short by a failed edge
    check), so the list must hold every file `export_default` writes."""
    from codec.config import TrainConfig
    from codec.train import export_default, export_parts

    final = SplitCodec.random(input_size=64, seed=0).save(tmp_path / "beta_1" / "split.pt")
    cfg = TrainConfig(out=str(tmp_path), export=str(tmp_path / "shipped" / "model.pt"))
    assert not any(p.exists() for p in export_parts(cfg.export))
    export_default(cfg, final)
    written = sorted(p for p in (tmp_path / "shipped").iterdir())
    assert written == sorted(export_parts(cfg.export))
    assert OnnxEdgeCodec(edge_paths(cfg.export)[0]).fingerprint == SplitCodec.random(input_size=64, seed=0).fingerprint

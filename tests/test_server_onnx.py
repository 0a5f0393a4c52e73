"""The server's decoder + body + heads in onnxruntime (codec.server_onnx): exported once per checkpoint, checked,
cached beside it; results equal PyTorch's; a stale or foreign export is refused and made again."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from codec.api import DEFAULT_CHECKPOINT, CheckpointError, CodecError, load_codec
from codec.server_onnx import OnnxServer, ServerExportError, server_path
from conveyor.line import ConveyorLine, LineConfig

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="needs the shipped models/default.pt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("server_onnx")
    return shutil.copy(DEFAULT_CHECKPOINT, d / "model.pt")


def test_onnx_server_results_equal_torch_and_the_export_is_cached(checkpoint):
    logs: list[str] = []
    from codec.server_onnx import attach

    onnx_codec = load_codec(checkpoint)
    assert attach(onnx_codec, checkpoint, log=logs.append) is not None
    assert server_path(checkpoint).is_file() and any("exporting" in m for m in logs)
    torch_codec = load_codec(checkpoint)
    assert torch_codec.server_runtime is None  # the default runtime of the API stays torch
    frames = np.stack([f.image for f in ConveyorLine(LineConfig(size=256, seed=5)).frames(12)])
    enc = torch_codec.encode(frames)
    features = onnx_codec.decode(enc)
    assert features.cache == {}  # nothing ran in torch but the entropy decoding
    got, want = onnx_codec.heads(features, conf=0.05), torch_codec.heads(torch_codec.decode(enc), conf=0.05)
    boxes = 0
    for g, w in zip(got, want):
        assert g["classification"]["label"] == w["classification"]["label"]
        assert (g["segmentation"] == w["segmentation"]).mean() > 0.999
        assert len(g["detection"]["boxes"]) == len(w["detection"]["boxes"])
        assert np.abs(g["detection"]["boxes"] - w["detection"]["boxes"]).max(initial=0) < 0.05
        assert np.array_equal(g["detection"]["classes"], w["detection"]["classes"])
        boxes += len(g["detection"]["boxes"])
    assert boxes > 5
    logs.clear()
    again = load_codec(checkpoint, runtime="onnx")  # the cached export: no second export
    assert again.server_runtime is not None and not logs


def test_a_foreign_export_is_refused_then_made_again(checkpoint, tmp_path):
    import onnx

    from codec.server_onnx import attach

    codec = load_codec(checkpoint, runtime="auto")
    path = server_path(checkpoint)
    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == "fingerprint":
            p.value = "00" * 16
    onnx.save(m, str(path))
    with pytest.raises(ServerExportError, match="exported from model 0000"):
        OnnxServer(path, codec.fingerprint)
    path.write_bytes(b"not an onnx file")
    with pytest.raises(ServerExportError, match="not a readable ONNX file"):
        OnnxServer(path, codec.fingerprint)
    logs: list[str] = []
    assert attach(codec, checkpoint, log=logs.append) is not None
    assert any("exporting it again" in m for m in logs)
    assert OnnxServer(path, codec.fingerprint).covers(("detection", "segmentation", "classification"))


def test_an_export_of_the_same_model_with_other_head_weights_is_made_again(checkpoint):
    """Retrained heads keep the fingerprint (it covers the student and the teachers' architecture): the export
    records the checkpoint file's digest, so the old graph is not used for the new weights."""
    import torch

    from codec.server_onnx import attach, export_ready

    base = load_codec(checkpoint, runtime="auto")  # makes (or finds) the export of the original file
    retrained = load_codec(checkpoint, fuse=False)
    sem = retrained.model.teachers.semantic.model[-1]
    with torch.no_grad():
        next(p for p in sem.parameters() if p.dim() == 1).add_(3.0)
    other = retrained.save(checkpoint.parent / "retrained.pt")
    assert retrained.fingerprint == base.fingerprint
    shutil.copy(server_path(checkpoint), server_path(other))  # the stale graph, beside the new file
    assert not export_ready(other, base.fingerprint)
    with pytest.raises(ServerExportError, match="another file with the same model fingerprint"):
        from codec.server_onnx import checkpoint_digest

        OnnxServer(server_path(other), base.fingerprint, source=checkpoint_digest(other))
    logs: list[str] = []
    codec = load_codec(other)
    assert attach(codec, other, log=logs.append) is not None
    assert any("exporting it again" in m for m in logs) and export_ready(other, base.fingerprint)
    frames = np.stack([f.image for f in ConveyorLine(LineConfig(size=256, seed=5)).frames(2)])
    latent = codec.decode_latents(codec.encode(frames))
    new = codec.server_runtime.raw_outputs(latent)["segmentation"]
    old = base.server_runtime.raw_outputs(latent)["segmentation"]
    assert (new - old).abs().max() > 1.0  # the new weights run, not the cached graph of the old ones


def test_runtime_values_are_checked(checkpoint):
    with pytest.raises(CodecError, match="runtime 'gpu' must be torch, auto or onnx"):
        load_codec(checkpoint, runtime="gpu")
    assert issubclass(CheckpointError, CodecError)

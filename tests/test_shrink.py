"""`codec.shrink`: a narrower encoder learns the trained encoder's latent; decoder, entropy model and teachers are
the source's, and the result is an ordinary checkpoint (real models, tiny sizes, a few frames)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from codec.api import SplitCodec, load_codec
from codec.shrink import main, narrow_copy, shrink, symbol_agreement
from conveyor.line import ConveyorLine, LineConfig
from core.errors import UsageError


@pytest.fixture(scope="module")
def source():
    codec = SplitCodec.random(input_size=64, seed=0)
    with torch.no_grad():  # a random encoder's latent is near 0 (one symbol): widen it to a few symbols
        codec.model.encoder.layers[-1][-1].weight.mul_(40)
    images = np.stack([f.image for f in ConveyorLine(LineConfig(size=64, seed=5)).frames(96)])
    return codec, images


def test_the_narrow_encoder_learns_the_wide_latent(source, tmp_path):
    codec, images = source
    spec = dataclasses.replace(codec.model.spec, encoder_channels=(8, 24))
    start = narrow_copy(codec, spec)
    before, _ = symbol_agreement(codec.model.encoder, start.encoder, start.entropy_bottleneck, images[:32])
    out = shrink(codec, images, spec, tmp_path / "narrow.pt", epochs=3, batch=8, val=32)
    narrow = load_codec(out, fuse=False)
    after, _ = symbol_agreement(codec.model.encoder, narrow.model.encoder, narrow.model.entropy_bottleneck,
                                images[:32])
    assert after > before + 0.05, (before, after)
    assert narrow.model.spec.encoder_channels == (8, 24) and narrow.fingerprint != codec.fingerprint
    for a, b in zip(narrow.model.decoder.state_dict().values(), codec.model.decoder.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(narrow.model.entropy_bottleneck.quantiles, codec.model.entropy_bottleneck.quantiles)
    assert narrow.metadata["shrunk_from"] == codec.fingerprint.hex()
    assert len((tmp_path / "narrow.curve.csv").read_text().splitlines()) == 4  # header + one row per epoch
    from codec.train import export_parts  # exported like a shipped checkpoint: config, torch and ONNX edges
    assert all(p.is_file() for p in export_parts(out))
    payloads = narrow.encode(images[:2])  # and it codes like any checkpoint
    assert narrow.decode(payloads).batch == 2
    with pytest.raises(UsageError, match="--resume"):
        shrink(codec, images, spec, tmp_path / "narrow.pt", epochs=3, batch=8, val=32)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(UsageError, match="--epochs 0"):
        main(["--checkpoint", "x.pt", "--frames", "f.npz", "--out", str(tmp_path / "o.pt"), "--epochs", "0"])

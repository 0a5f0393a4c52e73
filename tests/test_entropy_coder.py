"""Entropy coders behind codec.entropy_coder: lossless, CompressAI-compatible bytes, constriction at the same size."""
import numpy as np
import pytest
import torch

from codec.api import SplitCodec
from codec.entropy_coder import CODERS, get_coder, latent_from_symbols, symbols_from_latent


@pytest.fixture(scope="module")
def codec():
    return SplitCodec.random(input_size=64, seed=0)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(3)
    f = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    f[1] = 128  # a flat frame: very skewed symbols
    return f


def _symbols(codec, frames):
    with torch.no_grad():
        y = codec.encoder(torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255))
    return symbols_from_latent(codec.entropy_bottleneck, y)


@pytest.mark.parametrize("name", sorted(CODERS))
def test_roundtrip_is_bit_identical(codec, frames, name):
    sym = _symbols(codec, frames)
    coder = get_coder(name, codec.entropy_bottleneck)
    data = coder.compress(sym)
    assert len(data) == len(frames) and all(isinstance(d, bytes) and d for d in data)
    back = coder.decompress(data, sym.shape[1:])
    assert back.dtype == np.int32 and np.array_equal(back, sym)


@pytest.mark.parametrize("name", sorted(CODERS))
def test_out_of_table_values_escape_and_roundtrip(codec, frames, name):
    sym = _symbols(codec, frames[:1]).copy()
    sym[0, 0, 0, 0], sym[0, 1, 2, 3], sym[0, -1, -1, -1] = 5000, -4321, 70000
    coder = get_coder(name, codec.entropy_bottleneck)
    assert np.array_equal(coder.decompress(coder.compress(sym), sym.shape[1:]), sym)


def test_compressai_coder_matches_codec_payload_and_latent(codec, frames):
    legacy = SplitCodec(codec.model, entropy_coder="compressai")  # checkpoints without an entropy_coder key
    assert legacy.fingerprint != codec.fingerprint  # a server refuses payloads of the other coder
    sym = _symbols(codec, frames)
    encoded = legacy.encode(frames)
    with torch.no_grad():  # CompressAI's own compress() gives the same bytes as the legacy codec payload
        y = codec.encoder(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
        assert [bytes(b) for b in codec.entropy_bottleneck.compress(y)] == [e.payload for e in encoded]
    for name in ("compressai", "compressai-cached"):
        data = get_coder(name, codec.entropy_bottleneck).compress(sym)
        assert data == [e.payload for e in encoded]
    latent = latent_from_symbols(codec.entropy_bottleneck, sym)
    assert torch.equal(latent, legacy.decode_latents(encoded))


def test_default_codec_payload_is_the_constriction_coder(codec, frames):
    assert codec.entropy_coder == "constriction"
    data = get_coder("constriction", codec.entropy_bottleneck).compress(_symbols(codec, frames))
    assert data == [e.payload for e in codec.encode(frames)]


def test_constriction_decodes_same_latent_at_same_size(codec, frames):
    sym = _symbols(codec, frames)
    eb = codec.entropy_bottleneck
    ref = get_coder("compressai", eb).compress(sym)
    data = get_coder("constriction", eb).compress(sym)
    back = get_coder("constriction", eb).decompress(data, sym.shape[1:])  # a fresh coder decodes it
    assert torch.equal(latent_from_symbols(eb, back), codec.decode_latents(codec.encode(frames)))
    for a, b in zip(data, ref):
        assert abs(len(a) - len(b)) <= max(16, 0.02 * len(b))


def test_bad_inputs_raise_clear_errors(codec):
    eb = codec.entropy_bottleneck
    with pytest.raises(KeyError, match="unknown entropy coder"):
        get_coder("zstd", eb)
    coder = get_coder("constriction", eb)
    with pytest.raises(ValueError, match="shape"):
        coder.compress(np.zeros((1, 3, 4, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="integers"):
        coder.compress(np.zeros((1, codec.latent_shape[0], 4, 4), dtype=np.float32))
    good = coder.compress(np.zeros((1, codec.latent_shape[0], 4, 4), dtype=np.int32))[0]
    with pytest.raises(ValueError, match="truncated"):
        coder.decompress([good[:3]], (codec.latent_shape[0], 4, 4))

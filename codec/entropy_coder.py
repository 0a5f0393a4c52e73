"""Entropy coders for the factorized-prior latent, behind one small interface.

The split model's entropy model (CompressAI ``EntropyBottleneck``) holds, per latent channel, a 16-bit quantized
CDF (``_quantized_cdf``), its length (``_cdf_length``) and the offset of its first symbol (``_offset``). Any coder
that reads those tables codes the same symbols to (about) the same size; they differ in speed and bitstream format:

* ``compressai``: CompressAI's own rANS (``compressai.ans``), called exactly as ``EntropyBottleneck.compress`` does
  (the tables converted to Python lists on every call). Its payload is what the wire carries today.
* ``compressai-cached``: the same rANS and the same bytes, tables converted to lists once (isolates the list cost).
* ``constriction``: ``constriction.stream.stack.AnsCoder`` with one ``Categorical`` model per channel built once
  from the same integer tables. Another bitstream format (not interchangeable with ``compressai``).

Symbols are the integers CompressAI codes: ``round(y - medians)`` (:func:`symbols_from_latent`), shape (B,C,H,W);
the CDF index of every element is its channel (factorized prior). Values outside a channel's table are coded as
its escape symbol plus the raw value, as CompressAI does (CompressAI: Elias-gamma bypass bits inside the rANS
stream; constriction: zigzag varints after the ANS words).

Payload layout of ``constriction``: ``varint(n_words)``, ``n_words`` little-endian uint32 ANS words, then one
zigzag varint per escaped symbol in channel-major raster order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:  # torch only for type hints: the ONNX edge runs this module without PyTorch
    import torch


class EntropyCoder(Protocol):
    """Codes integer symbols (B,C,H,W) of a factorized-prior latent to one bytes object per frame and back."""

    name: str

    def compress(self, symbols: np.ndarray, indexes: np.ndarray | None = None) -> list[bytes]:
        """Symbols (B,C,H,W) int -> one payload per frame. ``indexes`` default: the channel of each element."""

    def decompress(self, strings: Sequence[bytes], shape: tuple[int, int, int]) -> np.ndarray:
        """Payloads and the latent shape (C,H,W) -> symbols (B,C,H,W) int32, bit-identical to the input."""


def _tables(eb) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cdf = eb._quantized_cdf.detach().cpu().numpy().astype(np.int64)
    length = eb._cdf_length.detach().cpu().numpy().reshape(-1).astype(np.int64)
    offset = eb._offset.detach().cpu().numpy().reshape(-1).astype(np.int64)
    if cdf.size == 0:
        raise ValueError("the entropy model has no CDF tables; run update() (checkpoints from codec.api carry them)")
    return cdf, length, offset


def symbols_from_latent(eb, y: "torch.Tensor") -> np.ndarray:
    """The integers ``EntropyBottleneck.compress`` codes for latent ``y`` (B,C,H,W): round(y - medians)."""
    medians = eb._get_medians().detach()
    return eb.quantize(y, "symbols", medians).cpu().numpy().astype(np.int32)


def latent_from_symbols(eb, symbols: np.ndarray) -> "torch.Tensor":
    """The dequantised latent (what ``EntropyBottleneck.decompress`` returns) from decoded symbols."""
    import torch

    medians = eb._get_medians().detach()
    return eb.dequantize(torch.from_numpy(np.asarray(symbols, dtype=np.int32)), medians)


def _check(symbols: np.ndarray, channels: int) -> np.ndarray:
    symbols = np.asarray(symbols)
    if symbols.ndim != 4 or symbols.shape[1] != channels:
        raise ValueError(f"symbols must have shape (B,{channels},H,W), got {symbols.shape}")
    if not np.issubdtype(symbols.dtype, np.integer):
        raise ValueError(f"symbols must be integers, got {symbols.dtype}")
    return symbols


class CompressAICoder:
    """CompressAI's rANS, called as ``EntropyBottleneck.compress`` calls it: same bytes as today's payloads."""

    name = "compressai"
    cache_lists = False

    def __init__(self, eb):
        from compressai.ans import RansDecoder, RansEncoder

        self._eb = eb
        self._enc, self._dec = RansEncoder(), RansDecoder()
        cdf, length, offset = _tables(eb)
        self.channels = len(length)
        self._lists = (eb._quantized_cdf.tolist(), length.tolist(), offset.tolist()) if self.cache_lists else None

    def _tab(self):
        if self._lists is not None:
            return self._lists
        eb = self._eb  # as CompressAI does on every call
        return (eb._quantized_cdf.tolist(), eb._cdf_length.reshape(-1).int().tolist(),
                eb._offset.reshape(-1).int().tolist())

    def compress(self, symbols: np.ndarray, indexes: np.ndarray | None = None) -> list[bytes]:
        symbols = _check(symbols, self.channels)
        b, c, h, w = symbols.shape
        idx = (np.broadcast_to(np.arange(c, dtype=np.int32)[:, None, None], (c, h, w)) if indexes is None
               else None)
        out = []
        for i in range(b):
            ii = idx if indexes is None else np.asarray(indexes[i])
            cdf, length, offset = self._tab()
            out.append(bytes(self._enc.encode_with_indexes(symbols[i].reshape(-1).astype(np.int32).tolist(),
                                                           ii.reshape(-1).astype(np.int32).tolist(),
                                                           cdf, length, offset)))
        return out

    def decompress(self, strings: Sequence[bytes], shape: tuple[int, int, int]) -> np.ndarray:
        c, h, w = (int(v) for v in shape)
        idx = np.broadcast_to(np.arange(c, dtype=np.int32)[:, None, None], (c, h, w)).reshape(-1).tolist()
        out = np.empty((len(strings), c, h, w), dtype=np.int32)
        for i, s in enumerate(strings):
            cdf, length, offset = self._tab()
            out[i] = np.asarray(self._dec.decode_with_indexes(s, idx, cdf, length, offset),
                                dtype=np.int32).reshape(c, h, w)
        return out


class CachedCompressAICoder(CompressAICoder):
    """CompressAI's rANS with the tables converted to Python lists once: same bytes, less overhead."""

    name = "compressai-cached"
    cache_lists = True


def _varint(value: int, out: bytearray) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated constriction payload (varint runs past the end)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("corrupt constriction payload (varint longer than 64 bits)")


class ConstrictionCoder:
    """``constriction`` ANS (stack) coder, one Categorical model per channel from CompressAI's integer tables."""

    name = "constriction"

    def __init__(self, eb=None, tables: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
        """From an entropy model ``eb``, or from its ``(quantized_cdf, cdf_length, offset)`` arrays (no PyTorch)."""
        import constriction
        Categorical = constriction.stream.model.Categorical

        if tables is None:
            cdf, length, offset = _tables(eb)
        else:
            cdf, length, offset = (np.asarray(t, np.int64) for t in tables)
            length, offset = length.reshape(-1), offset.reshape(-1)
        self.channels = len(length)
        self.offset = offset
        self.max_value = length - 2  # the escape symbol of each channel, as in CompressAI's rANS
        self.models = []
        for c in range(self.channels):
            pmf = np.diff(cdf[c, :length[c]]).astype(np.float64)
            self.models.append(Categorical(pmf, perfect=False))

    def compress(self, symbols: np.ndarray, indexes: np.ndarray | None = None) -> list[bytes]:
        import constriction
        AnsCoder = constriction.stream.stack.AnsCoder

        symbols = _check(symbols, self.channels)
        if indexes is not None:
            raise ValueError("ConstrictionCoder codes a factorized prior: the CDF index is the channel (indexes=None)")
        out = []
        for frame in symbols:
            values = frame.reshape(self.channels, -1).astype(np.int64) - self.offset[:, None]
            escape = (values < 0) | (values >= self.max_value[:, None])
            coded = np.where(escape, self.max_value[:, None], values).astype(np.int32)
            coder = AnsCoder()
            for c in range(self.channels - 1, -1, -1):  # stack: encode last channel first, decode in order
                coder.encode_reverse(coded[c], self.models[c])
            words = coder.get_compressed().astype("<u4", copy=False)
            buf = bytearray()
            _varint(len(words), buf)
            buf += words.tobytes()
            for v in frame.reshape(self.channels, -1)[escape].tolist():  # channel-major raster order
                _varint((v << 1) ^ (v >> 63) if v < 0 else v << 1, buf)
            out.append(bytes(buf))
        return out

    def decompress(self, strings: Sequence[bytes], shape: tuple[int, int, int]) -> np.ndarray:
        import constriction
        AnsCoder = constriction.stream.stack.AnsCoder

        c_, h, w = (int(v) for v in shape)
        if c_ != self.channels:
            raise ValueError(f"latent shape {shape} has {c_} channels, the tables have {self.channels}")
        n = h * w
        out = np.empty((len(strings), c_, h, w), dtype=np.int32)
        for i, s in enumerate(strings):
            n_words, pos = _read_varint(s, 0)
            end = pos + 4 * n_words
            if end > len(s):
                raise ValueError(f"truncated constriction payload: {n_words} words need {end} bytes, got {len(s)}")
            coder = AnsCoder(np.frombuffer(s[pos:end], dtype="<u4").astype(np.uint32))
            values = np.empty((c_, n), dtype=np.int64)
            for c in range(c_):
                values[c] = coder.decode(self.models[c], n)
            escape = values == self.max_value[:, None]
            symbols = values + self.offset[:, None]
            raw = []
            for _ in range(int(escape.sum())):
                z, end = _read_varint(s, end)
                raw.append((z >> 1) ^ -(z & 1))
            symbols[escape] = np.asarray(raw, dtype=np.int64)
            out[i] = symbols.reshape(c_, h, w)
        return out


CODERS = {c.name: c for c in (CompressAICoder, CachedCompressAICoder, ConstrictionCoder)}


def get_coder(name: str, eb) -> EntropyCoder:
    """Build the coder ``name`` (see :data:`CODERS`) for entropy model ``eb``."""
    if name not in CODERS:
        raise KeyError(f"unknown entropy coder {name!r}; choose one of {sorted(CODERS)}")
    return CODERS[name](eb)


__all__ = ["CODERS", "CompressAICoder", "CachedCompressAICoder", "ConstrictionCoder", "EntropyCoder", "get_coder",
           "latent_from_symbols", "symbols_from_latent"]

"""The one type both halves of the codec exchange, free of PyTorch so a torch-less edge can build it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodedFrame:
    """One frame's entropy-coded latent. ``fingerprint`` (when set) must match the decoder's model."""

    payload: bytes
    latent_shape: tuple[int, int, int]
    fingerprint: bytes | None = None

"""The student's learned parts: the edge encoder (runs on the device) and the server decoder.

Ladon shape: conv 5x5 stride 2, GDN, conv 5x5 stride 2, GDN, conv 2x2 stride 1 -> latent (b channels at 1/4 of
the input; the two kernel sizes are configurable). The decoder mirrors it with 2x2 convolutions and inverse GDN
and emits the teacher's split-point feature (end of the stride-4 stage). Widths are configurable: Ladon's 4b/2b
widths cost more multiply-adds than a whole YOLO26n at 256 px, so the default keeps the encoder under a tenth of
the three teachers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from compressai.layers import GDN
from torch import nn


@dataclass
class StudentSpec:
    """Architecture of the learned encoder/decoder. Part of the model fingerprint."""

    latent_channels: int = 24
    encoder_channels: tuple[int, int] = (32, 24)
    decoder_channels: tuple[int, int] = (96, 64)
    split_channels: int = 64  # teacher feature channels at the split point (YOLO26n layer 2)
    # kernel sizes of the encoder's two stride-2 convolutions (odd): the second, at 1/2 resolution, holds half the
    # encoder's multiply-adds at 5x5; 3x3 takes them from 78.6 M to 28.3 M
    encoder_kernels: tuple[int, int] = (5, 5)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_channels"] = list(self.encoder_channels)
        d["decoder_channels"] = list(self.decoder_channels)
        d["encoder_kernels"] = list(self.encoder_kernels)
        if self.encoder_kernels == (5, 5):
            del d["encoder_kernels"]  # the shape before the key existed: earlier checkpoints keep their fingerprint
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudentSpec":
        allowed = set(cls.__dataclass_fields__)
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown student spec keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        d = dict(d)
        for k in ("encoder_channels", "decoder_channels", "encoder_kernels"):
            if k in d:
                d[k] = tuple(int(v) for v in d[k])
        return cls(**d)


def _conv2x2(c_in: int, c_out: int) -> nn.Sequential:
    """2x2 convolution, stride 1, that keeps the spatial size (pad one row/column at the bottom/right)."""
    return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c_in, c_out, 2))


class EdgeEncoder(nn.Module):
    """Frame (B,3,H,W) in [0,1] -> latent (B,b,H/4,W/4). The only network the device runs."""

    def __init__(self, spec: StudentSpec):
        super().__init__()
        c1, c2 = spec.encoder_channels
        k1, k2 = spec.encoder_kernels
        self.layers = nn.Sequential(
            nn.Conv2d(3, c1, k1, stride=2, padding=k1 // 2), GDN(c1),
            nn.Conv2d(c1, c2, k2, stride=2, padding=k2 // 2), GDN(c2),
            _conv2x2(c2, spec.latent_channels),
        )
        # start with a small latent: the first few hundred steps then spend bits only where the feature loss
        # asks for them, instead of first having to shrink a wide random latent (measured: same rate 4x sooner)
        with torch.no_grad():
            self.layers[-1][-1].weight.mul_(0.1)
            self.layers[-1][-1].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ServerDecoder(nn.Module):
    """Latent (B,b,H/4,W/4) -> teacher split-point feature (B,split_channels,H/4,W/4)."""

    def __init__(self, spec: StudentSpec):
        super().__init__()
        d1, d2 = spec.decoder_channels
        self.layers = nn.Sequential(
            _conv2x2(spec.latent_channels, d1), GDN(d1, inverse=True),
            _conv2x2(d1, d2), GDN(d2, inverse=True),
            _conv2x2(d2, spec.split_channels),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.layers(y)


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass (convs, GDN and linear layers), counted with forward hooks."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += int(out.numel() * k)

    def gdn_hook(m: GDN, inp, _out):
        nonlocal total
        c = inp[0].shape[1]
        total += int(inp[0].numel() * c)  # 1x1 conv of x^2 with the gamma matrix

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal total
        total += int(out.numel() * m.in_features)

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, GDN):
            hooks.append(m.register_forward_hook(gdn_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            module(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
    return total


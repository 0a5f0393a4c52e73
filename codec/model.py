"""The split model: edge encoder + factorized-prior entropy model + server decoder + the teachers' shared body.

Training uses :meth:`SplitModel.forward_train`; the codec API (:mod:`codec.api`) uses the same modules for real
bitstreams. The teachers are frozen throughout: the student learns to reproduce their split-point feature and
the later backbone stages from a few kilobytes per frame.
"""
from __future__ import annotations

import torch
from compressai.entropy_models import EntropyBottleneck
from torch import nn

from codec.student import EdgeEncoder, ServerDecoder, StudentSpec
from codec.teachers import MultiTaskTeachers

SPLIT_LAYER = 2  # YOLO26 layer 2: end of the stride-4 stage


class SplitModel(nn.Module):
    """Student (encoder, entropy bottleneck, decoder) spliced into frozen multi-task teachers."""

    def __init__(self, teachers: MultiTaskTeachers, spec: StudentSpec | None = None, input_size: int = 256):
        super().__init__()
        spec = spec or StudentSpec(split_channels=teachers.split_channels)
        if spec.split_channels != teachers.split_channels:
            raise ValueError(f"student emits {spec.split_channels} channels but the teachers' split point has "
                             f"{teachers.split_channels}; set split_channels={teachers.split_channels}")
        if input_size % 32:
            raise ValueError(f"input_size {input_size} must be a multiple of 32 (YOLO stride)")
        self.spec, self.input_size = spec, int(input_size)
        self.teachers = teachers
        self.encoder = EdgeEncoder(spec)
        # a narrow initial density (init_scale 1, CompressAI's default is 10): the rate starts near what a
        # trained model sends, so a CPU-sized schedule of a few hundred steps reaches the target rate
        self.entropy_bottleneck = EntropyBottleneck(spec.latent_channels, init_scale=1.0)
        self.decoder = ServerDecoder(spec)

    def body_from_split(self, split_feature: torch.Tensor) -> dict[int, torch.Tensor]:
        """Shared backbone from the layer after the split, fed with the decoded split feature."""
        return self.teachers.backbone(split_feature, start=SPLIT_LAYER + 1, cache={SPLIT_LAYER: split_feature})

    def forward_train(self, x: torch.Tensor) -> dict:
        """Noisy-quantised latent, its likelihoods and the student's backbone features (for stage-1/2 losses)."""
        y = self.encoder(x)
        y_hat, likelihoods = self.entropy_bottleneck(y)
        cache = self.body_from_split(self.decoder(y_hat))
        return {"y": y, "y_hat": y_hat, "likelihoods": likelihoods, "features": cache}

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.teachers.backbone(x)

    @torch.no_grad()
    def rounded_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The latent as the entropy coder sends it (rounded around the medians), not ``forward_train``'s noisy one."""
        eb = self.entropy_bottleneck
        return eb.quantize(self.encoder(x), "dequantize", eb._get_medians())

    @torch.no_grad()
    def decoded_features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The body features the server computes from the edge's bitstream: rounded latent, decoder, shared body
        (what the heads really read)."""
        return self.body_from_split(self.decoder(self.rounded_latent(x)))


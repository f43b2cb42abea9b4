"""Gemma 3n's audio tower: the Universal Speech Model (USM) Conformer encoder."""

from typing import Dict, Tuple

import mlx.core as mx
import mlx.nn as nn

from .config import AudioConfig
from .conformer import ConformerBlock
from .subsample import SubSampleConvProjection, time_stride


class AudioEncoder(nn.Module):
    """Log-mel features -> one embedding per 160 ms of audio: the 10 ms frames are subsampled
    4x by the convolutions, then every `conf_reduction_factor`-th Conformer output is kept.

    Parameter names follow the checkpoint's `model.audio_tower.*` tensors with that prefix
    removed; pass checkpoint tensors through `sanitize` before `load_weights`.
    """

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubSampleConvProjection(config)
        self.conformer = [ConformerBlock(config) for _ in range(config.conf_num_hidden_layers)]

    def __call__(self, features: mx.array, padding_mask: mx.array) -> Tuple[mx.array, mx.array]:
        """Encode a batch.

        Args:
            features: [B, T, input_feat_size] log-mels.
            padding_mask: [B, T] bool, True for padding frames (the inverse of the
                feature extractor's mask).

        Returns:
            (encodings [B, T', hidden_size] with padding steps zeroed, padding_mask [B, T']).
        """
        x = self.subsample_conv_projection(features)
        # Each subsampled step takes the padding flag of the first frame it covers.
        index = mx.minimum(mx.arange(x.shape[1]) * time_stride(self.config), padding_mask.shape[1] - 1)
        padding_mask = mx.take(padding_mask, index, axis=1)
        for block in self.conformer:
            x = block(x, padding_mask)
        r = self.config.conf_reduction_factor
        x, padding_mask = x[:, ::r], padding_mask[:, ::r]
        return mx.where(padding_mask[..., None], 0.0, x), padding_mask

    @staticmethod
    def sanitize(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Convert PyTorch-layout convolution weights to MLX layout; idempotent.

        Conv2d OIHW -> OHWI and depthwise Conv1d [D, 1, K] -> [D, K, 1]. A tensor already in
        MLX layout is recognised by shape: its kernel is square and sits in the middle
        ([O, k, k, I] with I != k; Gemma 3n's SSCP kernels are 3x3 with 1 or more than 3 input
        channels), and a depthwise kernel ends in 1.
        """
        out = {}
        for name, w in weights.items():
            if name.endswith("conv.weight") and w.ndim == 4 and not _is_ohwi(w.shape):
                w = w.transpose(0, 2, 3, 1)
            elif name.endswith("depthwise_conv1d.weight") and w.shape[-1] != 1:
                w = w.transpose(0, 2, 1)
            out[name] = w
        return out


def _is_ohwi(shape) -> bool:
    return shape[1] == shape[2] != shape[3]

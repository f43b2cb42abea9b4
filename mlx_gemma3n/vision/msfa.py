"""MobileNet-V5 multi-scale fusion adapter (MSFA), NHWC."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .blocks import RMSNorm2d, UniversalInvertedResidual


def resize_nearest(x: mx.array, size: tuple[int, int]) -> mx.array:
    """torch `F.interpolate(mode="nearest")`: src = floor(dst * (in / out)) in float32."""
    for axis, out in ((1, size[0]), (2, size[1])):
        n = x.shape[axis]
        if n == out:
            continue
        scale = np.float32(n) / np.float32(out)
        idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64), n - 1)
        x = mx.take(x, mx.array(idx.astype(np.int32)), axis=axis)
    return x


def resize_bilinear(x: mx.array, size: tuple[int, int]) -> mx.array:
    """torch `F.interpolate(mode="bilinear", align_corners=False)` without antialiasing."""
    for axis, out in ((1, size[0]), (2, size[1])):
        n = x.shape[axis]
        if n == out:
            continue
        scale = np.float32(n) / np.float32(out)
        src = np.maximum(
            scale * (np.arange(out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0
        )
        i0 = src.astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        l1 = (src - i0).astype(np.float32)
        shape = [1, 1, 1, 1]
        shape[axis] = out
        l1 = mx.array(l1).reshape(shape).astype(x.dtype)
        a = mx.take(x, mx.array(i0.astype(np.int32)), axis=axis)
        b = mx.take(x, mx.array(i1.astype(np.int32)), axis=axis)
        x = a * (1 - l1) + b * l1
    return x


class MultiScaleFusionAdapter(nn.Module):
    """Upsample the tapped feature maps to the largest one, concatenate channels, fuse with an
    inverted-residual FFN, bring to `output_resolution` (avg-pool or bilinear), RMS-normalise."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        output_resolution: int = 16,
        expansion_ratio: float = 2.0,
        padding: str = "same",
    ):
        super().__init__()
        self.output_resolution = (output_resolution, output_resolution)
        self.ffn = UniversalInvertedResidual(
            in_chs,
            out_chs,
            dw_kernel_size_mid=0,
            exp_ratio=expansion_ratio,
            noskip=True,
            layer_scale_init_value=None,
            padding=padding,
        )
        self.norm = RMSNorm2d(out_chs)

    def __call__(self, inputs: list[mx.array]) -> mx.array:
        high = inputs[0].shape[1:3]
        resized = [
            resize_nearest(t, high) if t.shape[1] < high[0] or t.shape[2] < high[1] else t
            for t in inputs
        ]
        x = self.ffn(mx.concatenate(resized, axis=-1))
        oh, ow = self.output_resolution
        if tuple(high) != (oh, ow):
            if high[0] % oh or high[1] % ow:
                x = resize_bilinear(x, (oh, ow))
            else:
                sh, sw = high[0] // oh, high[1] // ow
                B, _, _, C = x.shape
                x = x.reshape(B, oh, sh, ow, sw, C).mean(axis=(2, 4))
        return self.norm(x)

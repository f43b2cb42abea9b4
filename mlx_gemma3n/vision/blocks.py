"""MobileNet-V5 building blocks in MLX (NHWC).

Module and parameter names follow timm (``conv``/``bn`` in ConvNormAct, ``conv_exp``/``bn1``/
``conv_pwl``/``bn2`` in EdgeResidual, ``layer_scale.gamma`` ...) so Gemma 3n checkpoints load
by name. Conv weights are stored in MLX layout ``[out, kh, kw, in // groups]``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def make_divisible(
    v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9
) -> int:
    """timm's channel rounding: nearest multiple of `divisor`, never more than 10% below `v`."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def gelu_tanh(x: mx.array) -> mx.array:
    # timm builds MobileNet-V5 with nn.GELU(approximate="tanh").
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (low, high) for one spatial axis (timm's pad_same)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2d(nn.Module):
    """timm `create_conv2d`: 'same' padding is symmetric when static (stride 1, odd kernel) and
    TF-style asymmetric (computed from the input size) otherwise; '' is PyTorch-style symmetric."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        padding: str = "same",
    ):
        super().__init__()
        if padding not in ("same", "", "valid"):
            raise ValueError(f"unsupported pad_type {padding!r}")
        self.weight = mx.zeros((out_chs, kernel_size, kernel_size, in_chs // groups))
        if bias:
            self.bias = mx.zeros((out_chs,))
        self.kernel_size, self.stride, self.groups, self.padding = kernel_size, stride, groups, padding

    def _pads(self, x: mx.array):
        k, s = self.kernel_size, self.stride
        if self.padding == "valid" or k == 1 and s == 1:
            return 0, None
        if self.padding == "":
            return ((s - 1) + (k - 1)) // 2, None
        if s == 1 and (k - 1) % 2 == 0:
            return (k - 1) // 2, None
        return 0, [same_padding(x.shape[1], k, s), same_padding(x.shape[2], k, s)]

    def __call__(self, x: mx.array) -> mx.array:
        if self.kernel_size == 1 and self.stride == 1 and self.groups == 1:
            y = x @ self.weight.reshape(self.weight.shape[0], -1).T
        else:
            pad, explicit = self._pads(x)
            if explicit is not None:
                x = mx.pad(x, [(0, 0), explicit[0], explicit[1], (0, 0)])
            y = mx.conv2d(x, self.weight, stride=self.stride, padding=pad, groups=self.groups)
        if "bias" in self:
            y = y + self.bias
        return y


class RMSNorm2d(nn.Module):
    """timm RmsNorm2d / RmsNormAct2d: RMS over channels, times a per-channel weight, optional act."""

    def __init__(self, channels: int, eps: float = 1e-6, act: bool = False):
        super().__init__()
        self.weight = mx.ones((channels,))
        self.eps, self.act = eps, act

    def __call__(self, x: mx.array) -> mx.array:
        x = mx.fast.rms_norm(x, self.weight, self.eps)
        return gelu_tanh(x) if self.act else x


class ConvNormAct(nn.Module):
    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        act: bool = True,
        padding: str = "same",
    ):
        super().__init__()
        self.conv = Conv2d(in_chs, out_chs, kernel_size, stride, groups, bias, padding)
        self.bn = RMSNorm2d(out_chs, act=act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.bn(self.conv(x))


class LayerScale2d(nn.Module):
    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = mx.full((dim,), init_value)

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.gamma


class EdgeResidual(nn.Module):
    """FusedMBConv: full kxk expansion conv (+norm/act), then 1x1 projection (+norm)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        exp_kernel_size: int = 3,
        stride: int = 1,
        exp_ratio: float = 1.0,
        noskip: bool = False,
        padding: str = "same",
    ):
        super().__init__()
        mid_chs = make_divisible(in_chs * exp_ratio)
        self.has_skip = in_chs == out_chs and stride == 1 and not noskip
        self.conv_exp = Conv2d(in_chs, mid_chs, exp_kernel_size, stride, padding=padding)
        self.bn1 = RMSNorm2d(mid_chs, act=True)
        self.conv_pwl = Conv2d(mid_chs, out_chs, 1, padding=padding)
        self.bn2 = RMSNorm2d(out_chs)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.bn2(self.conv_pwl(self.bn1(self.conv_exp(x))))
        return y + x if self.has_skip else y


class UniversalInvertedResidual(nn.Module):
    """MobileNet-V4 UIB: [dw_start] -> pw_exp -> [dw_mid] -> pw_proj -> [dw_end] -> [layer scale]."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        dw_kernel_size_start: int = 0,
        dw_kernel_size_mid: int = 3,
        dw_kernel_size_end: int = 0,
        stride: int = 1,
        exp_ratio: float = 1.0,
        noskip: bool = False,
        layer_scale_init_value: float | None = 1e-5,
        padding: str = "same",
    ):
        super().__init__()
        self.has_skip = in_chs == out_chs and stride == 1 and not noskip
        mid_chs = make_divisible(in_chs * exp_ratio)
        if dw_kernel_size_start:
            self.dw_start = ConvNormAct(
                in_chs,
                in_chs,
                dw_kernel_size_start,
                stride=1 if dw_kernel_size_mid else stride,
                groups=in_chs,
                act=False,
                padding=padding,
            )
        self.pw_exp = ConvNormAct(in_chs, mid_chs, 1, padding=padding)
        if dw_kernel_size_mid:
            self.dw_mid = ConvNormAct(
                mid_chs, mid_chs, dw_kernel_size_mid, stride=stride, groups=mid_chs, padding=padding
            )
        self.pw_proj = ConvNormAct(mid_chs, out_chs, 1, act=False, padding=padding)
        if dw_kernel_size_end:
            end_stride = stride if not dw_kernel_size_start and not dw_kernel_size_mid else 1
            self.dw_end = ConvNormAct(
                out_chs,
                out_chs,
                dw_kernel_size_end,
                stride=end_stride,
                groups=out_chs,
                act=False,
                padding=padding,
            )
        if layer_scale_init_value is not None:
            self.layer_scale = LayerScale2d(out_chs, layer_scale_init_value)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.dw_start(x) if "dw_start" in self else x
        y = self.pw_exp(y)
        if "dw_mid" in self:
            y = self.dw_mid(y)
        y = self.pw_proj(y)
        if "dw_end" in self:
            y = self.dw_end(y)
        if "layer_scale" in self:
            y = self.layer_scale(y)
        return y + x if self.has_skip else y


class _KVProjection(nn.Module):
    """timm's `key` / `value` Sequential: optional strided depthwise conv + norm, then 1x1 projection."""

    def __init__(self, dim: int, out_dim: int, kv_stride: int, dw_kernel_size: int, padding: str):
        super().__init__()
        if kv_stride > 1:
            self.down_conv = Conv2d(dim, dim, dw_kernel_size, kv_stride, groups=dim, padding=padding)
            self.norm = RMSNorm2d(dim)
        self.proj = Conv2d(dim, out_dim, 1, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if "down_conv" in self:
            x = self.norm(self.down_conv(x))
        return self.proj(x)


class _Projection(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = Conv2d(in_dim, out_dim, 1, padding="")

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class MultiQueryAttention2d(nn.Module):
    """Multi-query attention over the spatial positions (one shared key/value head),
    with optional strided depthwise downsampling of keys and values."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        key_dim: int,
        value_dim: int,
        kv_stride: int = 1,
        dw_kernel_size: int = 3,
        padding: str = "same",
    ):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.scale = key_dim**-0.5
        self.query = _Projection(dim, num_heads * key_dim)
        self.key = _KVProjection(dim, key_dim, kv_stride, dw_kernel_size, padding)
        self.value = _KVProjection(dim, value_dim, kv_stride, dw_kernel_size, padding)
        self.output = _Projection(num_heads * value_dim, dim_out)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, _ = x.shape
        # Channels of the query projection are head-major: [head, key_dim].
        q = self.query(x).reshape(B, H * W, self.num_heads, self.key_dim).transpose(0, 2, 1, 3)
        k = self.key(x).reshape(B, 1, -1, self.key_dim)
        v = self.value(x).reshape(B, 1, -1, self.value_dim)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        o = o.transpose(0, 2, 1, 3).reshape(B, H, W, self.num_heads * self.value_dim)
        return self.output(o)


class MobileAttention(nn.Module):
    """RMS norm -> multi-query attention -> layer scale, with a residual connection."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        num_heads: int,
        key_dim: int,
        value_dim: int,
        stride: int = 1,
        kv_stride: int = 1,
        dw_kernel_size: int = 3,
        noskip: bool = False,
        layer_scale_init_value: float | None = 1e-5,
        padding: str = "same",
    ):
        super().__init__()
        # As in timm, `stride` only disables the residual; queries are never strided here.
        self.has_skip = in_chs == out_chs and stride == 1 and not noskip
        self.norm = RMSNorm2d(in_chs)
        self.attn = MultiQueryAttention2d(
            in_chs, out_chs, num_heads, key_dim, value_dim, kv_stride, dw_kernel_size, padding
        )
        if layer_scale_init_value is not None:
            self.layer_scale = LayerScale2d(out_chs, layer_scale_init_value)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.attn(self.norm(x))
        if "layer_scale" in self:
            y = self.layer_scale(y)
        return y + x if self.has_skip else y

"""Conformer block of the USM encoder: half-step feed-forward, local self-attention,
light (depthwise, causal) convolution, half-step feed-forward, final norm."""

import mlx.core as mx
import mlx.nn as nn

from .attention import LocalAttention
from .config import AudioConfig


def _clip(x: mx.array, limit: float) -> mx.array:
    """The checkpoint's "gradient clipping" clamp, kept for parity; capped at the dtype's range
    so a float16 limit does not overflow to inf."""
    limit = min(limit, mx.finfo(x.dtype).max)
    return mx.clip(x, -limit, limit)


class ConformerFeedForward(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        d = config.hidden_size
        self.clip = config.gradient_clipping
        self.residual_weight = config.conf_residual_weight
        self.pre_layer_norm = nn.RMSNorm(d, eps=1e-6)
        self.ffw_layer_1 = nn.Linear(d, 4 * d, bias=False)
        self.ffw_layer_2 = nn.Linear(4 * d, d, bias=False)
        self.post_layer_norm = nn.RMSNorm(d, eps=1e-6)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.pre_layer_norm(_clip(x, self.clip))
        h = self.ffw_layer_2(nn.silu(self.ffw_layer_1(h)))
        return x + self.post_layer_norm(_clip(h, self.clip)) * self.residual_weight


class ConformerAttention(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        d = config.hidden_size
        self.clip = config.gradient_clipping
        self.pre_attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.attn = LocalAttention(config)
        self.post = nn.Linear(d, d, bias=False)
        self.post_norm = nn.RMSNorm(d, eps=1e-6)

    def __call__(self, x: mx.array, padding_mask: mx.array) -> mx.array:
        h = self.attn(self.pre_attn_norm(_clip(x, self.clip)), padding_mask)
        h = self.post(h.reshape(*x.shape))
        return x + self.post_norm(_clip(h, self.clip))


class ConformerLightConv1d(nn.Module):
    """GLU -> causal depthwise conv over time -> norm -> SiLU, with a residual."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        d = config.hidden_size
        self.clip = config.gradient_clipping
        self.pre_layer_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.linear_start = nn.Linear(d, 2 * d, bias=False)
        self.kernel_size = config.conf_conv_kernel_size
        self.depthwise_conv1d = nn.Conv1d(d, d, config.conf_conv_kernel_size, groups=d, bias=False)
        self.conv_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.linear_end = nn.Linear(d, d, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        a, gate = mx.split(self.linear_start(self.pre_layer_norm(x)), 2, axis=-1)
        h = a * mx.sigmoid(gate)
        h = mx.pad(h, [(0, 0), (self.kernel_size - 1, 0), (0, 0)])
        h = self.conv_norm(_clip(self.depthwise_conv1d(h), self.clip))
        return x + self.linear_end(nn.silu(h))


class ConformerBlock(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.clip = config.gradient_clipping
        self.ffw_layer_start = ConformerFeedForward(config)
        self.attention = ConformerAttention(config)
        self.lconv1d = ConformerLightConv1d(config)
        self.ffw_layer_end = ConformerFeedForward(config)
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)

    def __call__(self, x: mx.array, padding_mask: mx.array) -> mx.array:
        x = self.attention(self.ffw_layer_start(x), padding_mask)
        # Padding steps enter the convolution as zeros, as in the reference; being causal and
        # at the end of each clip, they only reach other padding steps.
        x = self.lconv1d(mx.where(padding_mask[..., None], 0.0, x))
        return self.norm(_clip(self.ffw_layer_end(x), self.clip))

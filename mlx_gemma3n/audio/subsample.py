"""Sub-sample convolution projection (SSCP): two strided 2-D convolutions over (time, mel)
that cut the frame rate by 4 before the Conformer, each followed by a causal group norm."""

import math

import mlx.core as mx
import mlx.nn as nn

from .config import AudioConfig

_FREQ_PADDING = (1, 1)


def conv_output_length(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + padding - kernel) // stride + 1


def time_stride(config: AudioConfig) -> int:
    """Feature frames per subsampled step (4)."""
    return math.prod(stride for stride, _ in config.sscp_conv_stride_size)


def encoder_output_length(num_frames: int, config: AudioConfig) -> int:
    """Encoder output steps for `num_frames` feature frames (188 for 30 s of audio)."""
    for (kernel, _), (stride, _) in zip(config.sscp_conv_kernel_size, config.sscp_conv_stride_size):
        num_frames = conv_output_length(num_frames, kernel, stride, kernel - 1)
    return -(-num_frames // config.conf_reduction_factor)


class CumulativeGroupNorm(nn.Module):
    """Group norm with one group whose statistics accumulate causally over time.

    At step t the mean is that of all (freq, channel) values at steps <= t. The variance is the
    running sum over steps s <= t of squared deviations from the *step-s* running mean, as in
    the USM reference, not the exact variance of the prefix. No bias.
    """

    def __init__(self, num_channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((num_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        """x: [B, T, F, C]."""
        dtype = x.dtype
        x = x.astype(mx.float32)
        group_size = x.shape[2] * x.shape[3]
        count = mx.arange(1, x.shape[1] + 1, dtype=mx.float32)[None, :, None, None] * group_size
        mean = mx.cumsum(x.sum(axis=(2, 3), keepdims=True), axis=1) / count
        squared = ((x - mean) ** 2).sum(axis=(2, 3), keepdims=True)
        variance = mx.cumsum(squared, axis=1) / count
        return ((x - mean) * mx.rsqrt(variance + self.eps) * self.weight).astype(dtype)


class SSCPConvBlock(nn.Module):
    """Conv2d over (time, freq) -> cumulative group norm -> ReLU, in [B, T, F, C] layout.

    Time is padded only at the end (kernel - 1): the reverse-causal padding of the JAX model.
    """

    def __init__(self, config: AudioConfig, idx: int, in_freq: int):
        super().__init__()
        in_channels = 1 if idx == 0 else config.sscp_conv_channel_size[idx - 1]
        out_channels = config.sscp_conv_channel_size[idx]
        self.kernel = config.sscp_conv_kernel_size[idx]
        self.stride = config.sscp_conv_stride_size[idx]
        self.conv = nn.Conv2d(in_channels, out_channels, self.kernel, self.stride, bias=False)
        self.norm = CumulativeGroupNorm(out_channels, config.sscp_conv_group_norm_eps)
        self.out_freq = conv_output_length(in_freq, self.kernel[1], self.stride[1], sum(_FREQ_PADDING))

    def __call__(self, x: mx.array) -> mx.array:
        x = mx.pad(x, [(0, 0), (0, self.kernel[0] - 1), _FREQ_PADDING, (0, 0)])
        return nn.relu(self.norm(self.conv(x)))


class SubSampleConvProjection(nn.Module):
    """[B, T, n_mels] log-mels -> [B, T / 4, hidden_size]."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.conv_0 = SSCPConvBlock(config, 0, config.input_feat_size)
        self.conv_1 = SSCPConvBlock(config, 1, self.conv_0.out_freq)
        in_features = self.conv_1.out_freq * config.sscp_conv_channel_size[1]
        self.input_proj_linear = nn.Linear(in_features, config.hidden_size, bias=False)

    def __call__(self, features: mx.array) -> mx.array:
        x = self.conv_1(self.conv_0(features[..., None]))
        b, t, f, c = x.shape
        # Frequency-major, channel-minor flattening, as the checkpoint's projection expects.
        return self.input_proj_linear(x.reshape(b, t, f * c))

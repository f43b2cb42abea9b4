"""Kernel (b), the elementwise part of the per-layer-input gate: gelu_approx(gate) * input."""

import mlx.core as mx
import mlx.nn as nn

from .base import FusedOp

# A flat elementwise grid: the last threadgroup is partial, and CUDA launches it whole.
SOURCE = r"""
  const uint i = thread_position_in_grid.x;
  if (i >= uint(gate_shape[0] * gate_shape[1])) {
    return;
  }
  float g = static_cast<float>(gate[i]);
  float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
  float gelu = 0.5f * g * (1.0f + metal::precise::tanh(inner));
  out[i] = static_cast<T>(gelu * static_cast<float>(per_layer_input[i]));
"""

THREADS = 256


def reference(gate: mx.array, per_layer_input: mx.array):
    return (nn.gelu_approx(gate) * per_layer_input,)


def launch(kernel, gate: mx.array, per_layer_input: mx.array):
    p = gate.shape[-1]
    flat = (gate.size // p, p)
    (out,) = kernel(
        inputs=[gate.reshape(flat), per_layer_input.reshape(flat)],
        template=[("T", gate.dtype)],
        grid=(gate.size, 1, 1),
        threadgroup=(min(THREADS, -(-gate.size // 32) * 32), 1, 1),
        output_shapes=[flat],
        output_dtypes=[gate.dtype],
    )
    return (out.reshape(gate.shape),)


def sample(dtype: mx.Dtype, rows=3, p=100, seed=3) -> tuple:
    """Random arguments; the defaults (300 elements: a partial last threadgroup) are the
    self-check's case."""
    k = mx.random.split(mx.random.key(seed), 2)
    return tuple((3 * mx.random.normal((1, rows, p), key=key)).astype(dtype) for key in k)


ple_gate = FusedOp(
    "ple_gate",
    ["gate", "per_layer_input"],
    ["out"],
    SOURCE,
    launch,
    reference,
    sample,
)

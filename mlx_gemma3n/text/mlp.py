"""Gated GELU feed-forward with Gemma 3n's gaussian top-k activation sparsity."""

from statistics import NormalDist

import mlx.core as mx
import mlx.nn as nn


class MLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, activation_sparsity: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)
        # Keeping the top (1 - sparsity) share of a gaussian means cutting at its quantile:
        # mean + std * Phi^-1(sparsity), computed per token instead of a true top-k sort.
        self._std_multiplier = (
            NormalDist().inv_cdf(activation_sparsity) if activation_sparsity > 0 else None
        )

    def _gaussian_topk(self, x: mx.array) -> mx.array:
        mean = mx.mean(x, axis=-1, keepdims=True)
        std = mx.sqrt(mx.var(x, axis=-1, keepdims=True))
        cutoff = mean + std * mx.array(self._std_multiplier, dtype=x.dtype)
        return nn.relu(x - cutoff)

    def __call__(self, x: mx.array) -> mx.array:
        gate = self.gate_proj(x)
        if self._std_multiplier is not None:
            gate = self._gaussian_topk(gate)
        return self.down_proj(nn.gelu_approx(gate) * self.up_proj(x))

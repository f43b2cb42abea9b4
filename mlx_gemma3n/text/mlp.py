"""Gated GELU feed-forward with Gemma 3n's gaussian top-k activation sparsity.

The activation is one fused kernel at decode (kernels/gated_gelu.py). On sparse layers of a
converted checkpoint, down_proj is stored transposed (text/transposed.py) and the decode FFN
reads only the surviving units' rows of up and down (kernels/sparse_ffn.py)."""

from statistics import NormalDist

import mlx.core as mx
import mlx.nn as nn

from ..kernels.gated_gelu import gated_gelu
from ..kernels.sparse_ffn import sparse_ffn
from .transposed import QuantizedTransposedLinear, TransposedLinear


class MLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, activation_sparsity: float = 0.0,
                 transposed_down: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        sparse = activation_sparsity > 0
        self.down_proj = (TransposedLinear(hidden_dims, dims) if sparse and transposed_down
                          else nn.Linear(hidden_dims, dims, bias=False))
        # Keeping the top (1 - sparsity) share of a gaussian means cutting at its quantile:
        # mean + std * Phi^-1(sparsity), computed per token instead of a true top-k sort.
        self._std_multiplier = NormalDist().inv_cdf(activation_sparsity) if sparse else None
        self.use_kernels = True  # the fused decode kernels where available (kernels.set_kernels)

    def __call__(self, x: mx.array) -> mx.array:
        gate = self.gate_proj(x)
        if self._std_multiplier is not None and self.is_transposed_down:
            return sparse_ffn(x, gate, self.up_proj, self.down_proj, self._std_multiplier,
                              enabled=self.use_kernels)
        act = gated_gelu(gate, self.up_proj(x), self._std_multiplier, enabled=self.use_kernels)
        return self.down_proj(act)

    @property
    def is_transposed_down(self) -> bool:
        return isinstance(self.down_proj, (TransposedLinear, QuantizedTransposedLinear))

"""LAuReL: Learned Augmented Residual Layer (low-rank residual branch)."""

import mlx.core as mx
import mlx.nn as nn

from .norm import RMSNorm


class LaurelBlock(nn.Module):
    def __init__(self, dims: int, rank: int, eps: float):
        super().__init__()
        self.linear_left = nn.Linear(dims, rank, bias=False)
        self.linear_right = nn.Linear(rank, dims, bias=False)
        self.post_laurel_norm = RMSNorm(dims, eps)

    def __call__(self, x: mx.array) -> mx.array:
        """The low-rank branch. Its post-norm and the residual `x + ...` are applied with the
        attention residual (kernels/attn_residual.py)."""
        return self.linear_right(self.linear_left(x))

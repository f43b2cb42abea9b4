"""RMSNorm as Gemma 3n uses it: the scale multiplies directly (no `1 + w`), and some norms have none."""

import mlx.core as mx
import mlx.nn as nn


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.get("weight"), self.eps)

"""Self-attention with q/k/v RMS norms, per-type RoPE, sliding windows and KV sharing."""

from typing import Any, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .config import SLIDING, TextConfig
from .norm import RMSNorm

KV = Tuple[mx.array, mx.array]


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        self.is_sliding = config.layer_types[layer_idx] == SLIDING
        self.rope_base = config.rope_local_base_freq if self.is_sliding else config.rope_theta
        # KV-shared layers attend over another layer's keys/values and own no K/V weights.
        self.is_kv_shared = config.kv_source(layer_idx) != layer_idx
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        if not self.is_kv_shared:
            self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
            self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
            self.v_norm = RMSNorm(hd, config.rms_norm_eps, with_scale=False)

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset
        )

    def _heads(self, x: mx.array, n: int) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, n, self.head_dim).transpose(0, 2, 1, 3)

    def project_kv(self, x: mx.array, offset: int, cache: Optional[Any]) -> KV:
        """Keys and values for `x`, appended to `cache`; returns what attention reads."""
        keys = self._rope(self.k_norm(self._heads(self.k_proj(x), self.n_kv_heads)), offset)
        values = self.v_norm(self._heads(self.v_proj(x), self.n_kv_heads))
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        return keys, values

    def __call__(
        self,
        x: mx.array,
        mask: Any,
        offset: int,
        cache: Optional[Any] = None,
        shared_kv: Optional[KV] = None,
    ) -> Tuple[mx.array, KV]:
        B, L, _ = x.shape
        queries = self._rope(self.q_norm(self._heads(self.q_proj(x), self.n_heads)), offset)
        kv = shared_kv if self.is_kv_shared else self.project_kv(x, offset, cache)
        out = mx.fast.scaled_dot_product_attention(queries, *kv, scale=1.0, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out), kv

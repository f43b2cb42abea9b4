"""Self-attention with q/k/v RMS norms, per-type RoPE, sliding windows and KV sharing.

The norms and RoPE (kernels/qkv_norm_rope.py, decode and prefill chunks) and the attention
itself at decode (kernels/decode_attention.py) are fused kernels where available; the
modules' norm weights are what the checkpoint stores (v's norm has none)."""

from typing import Any, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..kernels.decode_attention import decode_attention
from ..kernels.qkv_norm_rope import qkv_norm_rope
from .concat import join_layers, layer_outputs
from .config import SLIDING, TextConfig
from .norm import RMSNorm

KV = Tuple[mx.array, mx.array]
QKV = ("q_proj", "k_proj", "v_proj")


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
        self.use_kernels = True  # the fused decode kernels where available (kernels.set_kernels)

    def __call__(
        self,
        x: mx.array,
        mask: Any,
        offset: int,
        cache: Optional[Any] = None,
        shared_kv: Optional[KV] = None,
    ) -> Tuple[mx.array, KV]:
        """Returns the output and the (keys, values) attended over (for KV-shared layers)."""
        B, L, _ = x.shape
        k_weight = None if self.is_kv_shared else self.k_norm.weight
        projected = qkv_norm_rope(
            *self._project(x), self.q_norm.weight, k_weight, self.q_norm.eps,
            self.rope_base, offset, self.n_heads, self.n_kv_heads, self.head_dim,
            enabled=self.use_kernels,
        )
        if self.is_kv_shared:
            kv = shared_kv
        elif cache is not None:
            kv = cache.update_and_fetch(*projected[1:])
        else:
            kv = tuple(projected[1:])
        out = decode_attention(projected[0], *kv, mask=mask, enabled=self.use_kernels)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out), kv

    def _project(self, x: mx.array) -> tuple:
        """q, k, v (k and v None on KV-shared layers)."""
        if self.is_kv_shared:
            return self.q_proj(x), None, None
        return tuple(layer_outputs(self, "qkv_proj", QKV, x))

    def fuse_projections(self) -> None:
        """Compute q, k and v with one matvec from now on (text/concat.py)."""
        if not self.is_kv_shared:
            join_layers(self, "qkv_proj", QKV)

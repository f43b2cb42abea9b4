"""One Gemma 3n decoder layer: AltUp predict -> attention + LAuReL -> FFN -> AltUp correct,
then the per-layer embedding is gated into the predicted streams."""

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from ..kernels.attn_residual import attn_residual
from ..kernels.ple_gate import ple_gate
from ..kernels.ple_residual import ple_residual
from .altup import AltUp
from .attention import KV, Attention
from .config import TextConfig
from .laurel import LaurelBlock
from .mlp import MLP
from .norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.eps = eps
        self.use_kernels = True
        self.active = config.altup_active_idx
        self.correct_scale = config.altup_correct_scale
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(
            d,
            config.intermediate_size[layer_idx],
            config.activation_sparsity_pattern[layer_idx],
            config.sparse_down_proj_transposed,
        )
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)
        self.altup = AltUp(config)
        self.laurel = LaurelBlock(d, config.laurel_rank, eps)
        self.per_layer_input_gate = nn.Linear(d, config.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = nn.Linear(config.hidden_size_per_layer_input, d, bias=False)
        self.post_per_layer_input_norm = RMSNorm(d, eps)

    def __call__(
        self,
        streams: mx.array,
        per_layer_input: mx.array,
        mask: Any,
        offset: int,
        cache: Optional[Any] = None,
        shared_kv: Optional[KV] = None,
    ):
        """streams: [n, B, L, D]; per_layer_input: [B, L, P]. Returns (streams, (keys, values))."""
        # Fused kernels at decode only: a prefill chunk is dominated by its matmuls.
        fused = self.use_kernels and streams.shape[2] == 1
        eps = self.eps
        predictions, normed = self.altup.predict(streams, self.input_layernorm, fused)
        laurel = self.laurel(normed)

        attn, kv = self.self_attn(normed, mask, offset, cache, shared_kv)
        h, ffn_in = attn_residual(
            attn,
            laurel,
            predictions,
            normed,
            self.post_attention_layernorm.weight,
            self.laurel.post_laurel_norm.weight,
            self.pre_feedforward_layernorm.weight,
            eps,
            self.active,
            enabled=fused,
        )
        corrected, first = self.altup.correct(
            predictions, h, self.mlp(ffn_in), self.post_feedforward_layernorm,
            self.correct_scale, fused,
        )
        (gated,) = ple_gate(self.per_layer_input_gate(first), per_layer_input, enabled=fused)
        (streams,) = ple_residual(
            corrected,
            self.per_layer_projection(gated),
            self.post_per_layer_input_norm.weight,
            eps,
            enabled=fused,
        )
        return streams, kv

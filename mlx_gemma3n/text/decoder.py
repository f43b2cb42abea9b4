"""One Gemma 3n decoder layer: AltUp predict -> attention + LAuReL -> FFN -> AltUp correct,
then the per-layer embedding is gated into the predicted streams. That last addition is left
to the next layer's AltUp predict, which makes it as it reads the streams (one launch fewer
per layer at decode); the last layer makes it itself."""

from typing import Any, NamedTuple, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from ..kernels.attn_residual import attn_residual
from ..kernels.gated_gelu import gated_gelu
from ..kernels.ple_residual import ple_residual
from .altup import AltUp
from .attention import KV, Attention
from .config import TextConfig
from .laurel import LaurelBlock
from .mlp import MLP
from .norm import RMSNorm


class PendingStreams(NamedTuple):
    """A layer's output streams before its last step, the normed per-layer projection added
    to streams 1..: the next layer's AltUp predict adds it as it reads them."""

    corrected: mx.array
    projected: mx.array
    norm_w: mx.array
    eps: float


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
        self.is_last = layer_idx == config.num_hidden_layers - 1

    def __call__(
        self,
        streams: Union[mx.array, PendingStreams],
        per_layer_input: mx.array,
        mask: Any,
        offset: int,
        cache: Optional[Any] = None,
        shared_kv: Optional[KV] = None,
    ):
        """streams: [n, B, L, D], or the previous layer's PendingStreams; per_layer_input:
        [B, L, P]. Returns (streams, (keys, values)): the streams as PendingStreams on every
        layer but the last."""
        residual = ()
        if isinstance(streams, PendingStreams):
            streams, *residual = streams
        # The row kernels (one threadgroup per token) serve a prefill chunk too, where they
        # replace ~30 small launches and several passes over the streams per layer
        # (bench/prefill_graph.py).
        fused = self.use_kernels
        eps = self.eps
        predictions, normed = self.altup.predict(streams, self.input_layernorm, fused, residual)
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
        gated = gated_gelu(self.per_layer_input_gate(first), per_layer_input, None, enabled=fused)
        pending = PendingStreams(
            corrected, self.per_layer_projection(gated), self.post_per_layer_input_norm.weight, eps
        )
        if not self.is_last:
            return pending, kv
        return ple_residual(*pending, enabled=fused)[0], kv

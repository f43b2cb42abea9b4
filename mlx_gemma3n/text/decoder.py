"""One Gemma 3n decoder layer: AltUp predict -> attention + LAuReL -> FFN -> AltUp correct,
then the per-layer embedding is gated into the predicted streams."""

import math
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

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
        predictions = self.altup.predict(streams)
        active = predictions[self.active]
        normed = self.input_layernorm(active)
        laurel = self.laurel(normed)

        attn, kv = self.self_attn(normed, mask, offset, cache, shared_kv)
        h = active + self.post_attention_layernorm(attn)
        h = (h + laurel) * (1 / math.sqrt(2))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))

        corrected = self.altup.correct(predictions, h)
        first = corrected[self.active]
        if self.correct_scale:
            first = self.altup.scale_corrected_output(first)
        gated = nn.gelu_approx(self.per_layer_input_gate(first)) * per_layer_input
        ple = self.post_per_layer_input_norm(self.per_layer_projection(gated))
        rest = corrected[1:] + ple
        return mx.concatenate([corrected[:1], rest], axis=0), kv

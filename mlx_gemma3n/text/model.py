"""The Gemma 3n text decoder: embeddings, per-layer embeddings (PLE), AltUp streams, layers."""

from typing import Any, Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..kernels.altup_streams import STREAMS, altup_embed, altup_unembed
from ..mlx_lm_parts import base as mlx_lm_base
from ..mlx_lm_parts import cache as mlx_lm_cache
from .config import SLIDING, TextConfig
from .decoder import DecoderLayer, PendingStreams
from .norm import RMSNorm
from .ple import PerLayerEmbeddingTable, ReadRows


def _scale(value: float, dtype: mx.Dtype) -> mx.array:
    # Rounded to the table's dtype first, as the reference does (sqrt(2048) is 45.25 in bf16).
    return mx.array(value, dtype=mx.float32).astype(dtype)


def _last_position(streams: PendingStreams, per_layer: mx.array, masks: dict, offset: int):
    """A layer's pending output streams, the per-layer inputs, masks and position offset of a
    chunk's last position alone: its query row of each mask (a "causal" chunk's last row sees
    every key)."""
    corrected, projected, *rest = streams
    streams = PendingStreams(corrected[:, :, -1:], projected[:, -1:], *rest)
    rows = {kind: m[..., -1:, :] if isinstance(m, mx.array) else None for kind, m in masks.items()}
    return streams, per_layer[:, -1:], rows, offset + per_layer.shape[1] - 1


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        d, n_layers = config.hidden_size, config.num_hidden_layers
        ple_dims = n_layers * config.hidden_size_per_layer_input
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        # Not a parameter: read from the checkpoint file by row (see ple.py).
        self.ple_table: Optional[PerLayerEmbeddingTable] = None
        self.per_layer_model_projection = nn.Linear(d, ple_dims, bias=False)
        self.per_layer_projection_norm = RMSNorm(
            config.hidden_size_per_layer_input, config.rms_norm_eps
        )
        self.altup_projections = [
            nn.Linear(d, d, bias=False) for _ in range(config.altup_num_inputs - 1)
        ]
        self.altup_unembed_projections = [
            nn.Linear(d, d, bias=False) for _ in range(config.altup_num_inputs - 1)
        ]
        self.layers = [DecoderLayer(config, i) for i in range(n_layers)]
        self._kv_sources = [config.kv_source(i) for i in range(n_layers)]
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.use_kernels = True  # the fused decode kernels where available (kernels.set_kernels)

    # -- embeddings -------------------------------------------------------------------------

    def embed(self, input_ids: mx.array) -> mx.array:
        """Scaled token embeddings (multimodal ids are embedded too and replaced later)."""
        x = self.embed_tokens(input_ids)
        return x * _scale(self.config.hidden_size**0.5, x.dtype)

    def per_layer_embeddings(self, input_ids: mx.array) -> mx.array:
        """Token-identity part of the per-layer inputs: [B, L, layers, P]. Ids outside the
        per-layer vocabulary (image/audio tokens) read row 0."""
        return self.per_layer_embeddings_of(self.read_per_layer_rows(np.array(input_ids)))

    def read_per_layer_rows(self, input_ids: np.ndarray) -> ReadRows:
        """The PLE table's rows for `input_ids`, read from the file (host work, no MLX)."""
        if self.ple_table is None:
            raise RuntimeError("the per-layer embedding table is not loaded")
        in_table = (input_ids >= 0) & (input_ids < self.config.vocab_size_per_layer_input)
        return self.ple_table.read(np.where(in_table, input_ids, 0))

    def per_layer_embeddings_of(self, rows: ReadRows) -> mx.array:
        """`per_layer_embeddings` from rows `read_per_layer_rows` read."""
        return self.scale_per_layer_rows(self.ple_table.gather(rows))

    def scale_per_layer_rows(self, rows: mx.array) -> mx.array:
        """PLE table rows [..., layers * P] -> the token-identity part [..., layers, P]."""
        c = self.config
        rows = rows * _scale(c.hidden_size_per_layer_input**0.5, rows.dtype)
        return rows.reshape(*rows.shape[:-1], c.num_hidden_layers, c.hidden_size_per_layer_input)

    def per_layer_inputs(self, inputs_embeds: mx.array, per_layer_embeds: mx.array) -> mx.array:
        """Combine the token-identity part with a projection of the (multimodal) embeddings."""
        c = self.config
        proj = self.per_layer_model_projection(inputs_embeds) * (c.hidden_size**-0.5)
        proj = proj.reshape(
            *inputs_embeds.shape[:-1], c.num_hidden_layers, c.hidden_size_per_layer_input
        )
        proj = self.per_layer_projection_norm(proj)
        return (proj + per_layer_embeds) * (2**-0.5)

    # -- caches -----------------------------------------------------------------------------

    def make_cache(self) -> List[Any]:
        """One cache per layer that computes K/V; KV-shared layers read their source's cache."""
        c = self.config
        return [
            mlx_lm_cache.RotatingKVCache(max_size=c.sliding_window)
            if t == SLIDING
            else mlx_lm_cache.KVCache()
            for t in c.layer_types[: c.first_kv_shared_layer]
        ]

    def _masks(self, h: mx.array, caches: List[Any]):
        c = self.config
        masks = {}
        for kind in set(c.layer_types):
            window = c.sliding_window if kind == SLIDING else None
            owner = caches[c.cache_owner(kind)]
            masks[kind] = mlx_lm_base.create_attention_mask(h, owner, window_size=window)
        return masks

    # -- forward ----------------------------------------------------------------------------

    def __call__(
        self,
        inputs_embeds: mx.array,
        per_layer_embeds: mx.array,
        cache: Optional[List[Any]] = None,
        pace: Optional[Callable[[List[mx.array]], None]] = None,
        outputs: str = "all",
    ) -> Optional[mx.array]:
        """inputs_embeds: [B, L, D] (already multimodal-merged); per_layer_embeds: [B, L,
        layers, P] from `per_layer_embeddings`. Returns the final normed hidden states of
        every position (`outputs` "all"), of the last one only ("last": the KV-shared layers
        run for it alone), or None ("none": only the layers that write a cache are built).

        A prefill's chunks before its last take "none", its last chunk "last": the KV-shared
        layers write no cache, and only the last position's logits are needed.
        `pace` (a prefill's `generation.InFlight`) is given each layer's output streams as
        they are built, up to the second-last layer that writes a cache."""
        c = self.config
        if outputs not in ("all", "last", "none"):
            raise ValueError(f"outputs must be 'all', 'last' or 'none', not {outputs!r}")
        if cache is None:
            cache = [None] * c.first_kv_shared_layer
        offset = cache[0].offset if cache[0] is not None else 0
        per_layer = self.per_layer_inputs(inputs_embeds, per_layer_embeds)

        # the AltUp stream entry and exit kernels are written for the released 4 streams
        fused = self.use_kernels and c.altup_num_inputs == STREAMS
        (h,) = altup_embed(
            inputs_embeds, *(p(inputs_embeds) for p in self.altup_projections), enabled=fused
        )

        masks = self._masks(inputs_embeds, cache)
        kvs = {}
        # from the first KV-shared layer on, "last" takes the last position alone
        last_only = outputs == "last" and inputs_embeds.shape[1] > 1
        narrow_at = c.first_kv_shared_layer if last_only else None
        layers = self.layers[: c.first_kv_shared_layer] if outputs == "none" else self.layers
        for i, (layer, src) in enumerate(zip(layers, self._kv_sources)):
            if i == narrow_at:
                h, per_layer, masks, offset = _last_position(h, per_layer, masks, offset)
            h, kv = layer(
                h,
                per_layer[:, :, i, :],
                masks[c.layer_types[i]],
                offset,
                cache=cache[i] if i < len(cache) else None,
                shared_kv=kvs.get(src),
            )
            kvs[i] = kv
            if pace is not None and i < c.first_kv_shared_layer - 1:
                pace(list(h[:2]) if isinstance(h, PendingStreams) else [h])
        if outputs == "none":
            return None

        # streams 1.. as slices (views; an integer index would gather)
        projected = (
            p(h[k + 1 : k + 2].squeeze(0)) for k, p in enumerate(self.altup_unembed_projections)
        )
        (out,) = altup_unembed(h, self.norm.weight, self.norm.eps, *projected, enabled=fused)
        return out[:, -1:] if outputs == "last" else out

"""MatFormer Mix-n-Match: carve a smaller model out of a larger one.

Gemma 3n's FFNs are nested (MatFormer): the first k neurons of a layer's FFN form a working
smaller FFN, and E4B contains E2B this way. A slice keeps the first `ffn_dims[i]` neurons of
each layer and may skip whole layers, giving sizes between (or below) the released ones.
"""

from typing import List, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma3n.model import Gemma3n


class SliceError(ValueError):
    """A Mix-n-Match slice that the model cannot take."""


def parse_ints(text: Optional[str]) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()] if text else []


def _per_layer_dims(ffn_dims: Sequence[int], current: Sequence[int]) -> List[int]:
    if not ffn_dims:
        return list(current)
    dims = list(ffn_dims) * len(current) if len(ffn_dims) == 1 else list(ffn_dims)
    if len(dims) != len(current):
        raise SliceError(f"--ffn-dims needs 1 or {len(current)} values (one per layer), got {len(ffn_dims)}")
    for i, (new, old) in enumerate(zip(dims, current)):
        if not 0 < new <= old:
            raise SliceError(f"layer {i}: FFN size {new} must be in 1..{old} (its current size)")
    return dims


def _kept_layers(model: Gemma3n, skip: Sequence[int]) -> List[int]:
    text = model.config.text_config
    n = text.num_hidden_layers
    bad = [i for i in skip if not 0 <= i < n]
    if bad:
        raise SliceError(f"cannot skip layers {bad}: the model has layers 0..{n - 1}")
    sources = {text.kv_source(i) for i in range(text.first_kv_shared_layer, n) if i not in skip}
    feeding = sorted(sources & set(skip))
    if feeding:
        raise SliceError(f"cannot skip layers {feeding}: KV-shared layers read their caches")
    kept = [i for i in range(n) if i not in set(skip)]
    if not kept:
        raise SliceError("cannot skip every layer")
    return kept


def slice_model(model: Gemma3n, ffn_dims: Sequence[int] = (), skip_layers: Sequence[int] = ()) -> Gemma3n:
    """A new model holding the slice of `model`'s text decoder; its parts (towers) are moved
    over unchanged. KV-shared layers keep reading the same source layer's cache."""
    text = model.config.text_config
    dims = _per_layer_dims(ffn_dims, text.intermediate_size)
    kept = _kept_layers(model, skip_layers)

    config = model.config
    text.intermediate_size = [dims[i] for i in kept]
    text.layer_types = [text.layer_types[i] for i in kept]
    text.activation_sparsity_pattern = [text.activation_sparsity_pattern[i] for i in kept]
    text.num_kv_shared_layers = sum(i >= text.first_kv_shared_layer for i in kept)
    text.num_hidden_layers = len(kept)

    old = model.language_model
    per_layer = text.hidden_size_per_layer_input
    weights = {}
    for name, value in tree_flatten(old.parameters()):
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if int(index) not in kept:
                continue
            name = f"layers.{kept.index(int(index))}.{rest}"
            transposed = old.layers[int(index)].mlp.is_transposed_down
            value = _slice_ffn(rest, value, dims[int(index)], transposed)
        elif name == "per_layer_model_projection.weight":
            value = value.reshape(-1, per_layer, value.shape[-1])[mx.array(kept)].reshape(-1, value.shape[-1])
        weights[name] = value

    sliced = Gemma3n(config)
    sliced.language_model.load_weights(list(weights.items()), strict=True)
    sliced.language_model.ple_table = old.ple_table.select_layers(kept, per_layer)
    for part in model.parts:
        if part in model:
            setattr(sliced, part, model[part])
    return sliced


def _slice_ffn(name: str, value: mx.array, k: int, transposed_down: bool) -> mx.array:
    if name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return value[:k]
    if name == "mlp.down_proj.weight":
        return value[:k] if transposed_down else value[:, :k]
    return value

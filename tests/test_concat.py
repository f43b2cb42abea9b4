"""Joined projections (text/concat.py): q/k/v and gate/up as one matvec per layer, built at
load from any layout. Each part's output is bit-identical to its own layer's; layers that
cannot join stay apart; a loaded decoder holds the joined weights only, never the parts too."""

import gc

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gemma3n.loading import load_model
from mlx_gemma3n.text.altup import AltUp
from mlx_gemma3n.text.attention import Attention
from mlx_gemma3n.text.concat import ConcatLinear
from mlx_gemma3n.text.config import TextConfig
from mlx_gemma3n.text.norm import RMSNorm
from mlx_gemma3n.tiny import TINY_CONFIG

QUANTIZATIONS = {
    "float32": None,
    "affine-4bit": dict(group_size=32, bits=4),
    "affine-8bit": dict(group_size=64, bits=8),
    "mxfp4": dict(group_size=32, bits=4, mode="mxfp4"),
}


def _layers(sizes, quantization=None, dims=128):
    mx.random.seed(1)
    layers = [nn.Linear(dims, n, bias=False) for n in sizes]
    if quantization:
        layers = [nn.QuantizedLinear.from_linear(layer, **quantization) for layer in layers]
    return layers


@pytest.mark.parametrize("quantization", QUANTIZATIONS.values(), ids=QUANTIZATIONS.keys())
@pytest.mark.parametrize("shape", [(1, 1, 128), (2, 5, 128)], ids=["decode", "prefill"])
def test_joined_layers_give_each_part_its_own_output(quantization, shape):
    layers = _layers([96, 32, 32], quantization)
    joined = ConcatLinear.join(*layers)
    x = mx.random.normal(shape, key=mx.random.key(2))
    outputs = joined(x)
    assert len(outputs) == 3
    for got, layer in zip(outputs, layers):
        assert np.array_equal(np.array(got), np.array(layer(x)))


@pytest.mark.parametrize("make", [
    lambda: [*_layers([64, 32], dict(group_size=32, bits=4)),
             *_layers([32], dict(group_size=32, bits=6))],  # mlx-lm's mixed recipes
    lambda: [*_layers([64], dict(group_size=32, bits=4)), *_layers([32], dict(group_size=64, bits=4))],
    lambda: [*_layers([64]), *_layers([32], dict(group_size=32, bits=4))],
    lambda: [*_layers([64]), nn.Linear(128, 32, bias=True)],
    lambda: [*_layers([64]), *_layers([32], dims=64)],
    lambda: [*_layers([64]), _layers([32])[0].update({"weight": mx.zeros((32, 128), mx.float16)})],
], ids=["bits", "group-size", "quantized-or-not", "bias", "input-width", "dtype"])
def test_layers_that_differ_stay_apart(make):
    assert ConcatLinear.join(*make()) is None


def test_attention_keeps_its_projections_when_they_cannot_join():
    attention = Attention(TextConfig.from_dict(TINY_CONFIG["text_config"]), 0)
    nn.quantize(attention, group_size=32, bits=4)
    attention.v_proj = nn.QuantizedLinear.from_linear(nn.Linear(64, 32, bias=False), 32, 8)
    attention.fuse_projections()
    assert {"q_proj", "k_proj", "v_proj"} <= set(attention) and "qkv_proj" not in attention


def _joined(model) -> tuple:
    text = model.config.text_config
    layers = model.language_model.layers
    qkv = ["qkv_proj" in layer.self_attn for layer in layers]
    gate_up = ["gate_up_proj" in layer.mlp for layer in layers]
    return qkv, gate_up, text


def test_load_joins_projections_and_holds_only_the_joined_weights(tiny_hf):
    gc.collect()
    before = mx.get_active_memory()
    model = load_model(tiny_hf[0], lazy=False)
    qkv, gate_up, text = _joined(model)
    assert qkv == [i < text.first_kv_shared_layer for i in range(text.num_hidden_layers)]
    assert all(gate_up)  # this HF layout stores no layer's down_proj transposed

    weights = dict(tree_flatten(model.language_model.parameters()))
    nbytes = sum(w.nbytes for w in weights.values())
    assert not any(k.endswith(("k_proj.weight", "up_proj.weight")) for k in weights)
    is_joined = lambda k: "qkv_proj" in k or "gate_up_proj" in k
    joined = sum(w.nbytes for k, w in weights.items() if is_joined(k))
    per_layer = [
        sum(w.nbytes for k, w in tree_flatten(layer.parameters()) if is_joined(k))
        for layer in model.language_model.layers
    ]
    mx.reset_peak_memory()
    for layer in model.language_model.layers:  # in the order a forward pass reads them
        mx.eval(layer.parameters())
    mx.eval(weights)
    # the parts are read, copied once into the joined tensors and dropped: held alongside
    # them, they would add `joined` bytes; while a layer is joined, its parts exist once more
    assert nbytes <= mx.get_active_memory() - before < nbytes + joined / 4
    assert mx.get_peak_memory() - before <= nbytes + max(per_layer)


def test_load_without_fuse_keeps_the_checkpoint_modules(tiny_hf):
    qkv, gate_up, _ = _joined(load_model(tiny_hf[0], fuse=False))
    assert not any(qkv) and not any(gate_up)


def test_a_quantized_altup_router_is_dequantized_once_at_load():
    config = TextConfig.from_dict(TINY_CONFIG["text_config"])
    altup = AltUp(config)
    altup.modality_router = nn.QuantizedLinear.from_linear(altup.modality_router, 32, 4)
    norm = RMSNorm(config.hidden_size)
    streams = mx.random.normal((config.altup_num_inputs, 1, 3, config.hidden_size))
    before = altup.predict(streams, norm, fused=False)
    altup.fuse_projections()
    assert type(altup.modality_router) is nn.Linear
    for a, b in zip(before, altup.predict(streams, norm, fused=False)):
        assert mx.array_equal(a, b)

"""MatFormer Mix-n-Match slicing in the converter, checked against transformers running the
same slice (float32; max |ours - ref| / max |ref|, measured ~1e-6, bound 1e-5)."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from convert import convert
from convert.matformer import SliceError
from mlx_gemma3n.loading import load_model
from reference import hf_config

FFN = [64, 96, 64, 128, 64, 96, 128]
SKIP = [1, 5]  # a sliding layer before the shared ones, and a KV-shared sliding layer


def sliced_reference(model, kept, ffn):
    """transformers' model with the same slice, built from the full model's weights."""
    from transformers import Gemma3nForConditionalGeneration

    text = model.config.text_config
    first_shared = text.num_hidden_layers - text.num_kv_shared_layers
    per_layer = text.hidden_size_per_layer_input
    cfg = hf_config(
        {
            "text_config": {
                "num_hidden_layers": len(kept),
                "layer_types": [text.layer_types[i] for i in kept],
                "intermediate_size": [ffn[i] for i in kept],
                "activation_sparsity_pattern": [text.activation_sparsity_pattern[i] for i in kept],
                "num_kv_shared_layers": sum(i >= first_shared for i in kept),
            }
        }
    )
    cfg._attn_implementation = cfg.text_config._attn_implementation = "eager"
    columns = np.concatenate([np.arange(i * per_layer, (i + 1) * per_layer) for i in kept])
    state = {}
    for key, value in model.state_dict().items():
        if ".language_model.layers." in key:
            head, rest = key.split(".language_model.layers.")
            index, tail = rest.split(".", 1)
            if int(index) not in kept:
                continue
            k = ffn[int(index)]
            if tail in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                value = value[:k]
            elif tail == "mlp.down_proj.weight":
                value = value[:, :k]
            key = f"{head}.language_model.layers.{kept.index(int(index))}.{tail}"
        elif key.endswith("embed_tokens_per_layer.weight"):
            value = value[:, columns]
        elif key.endswith("per_layer_model_projection.weight"):
            value = value[columns]
        state[key] = value
    ref = Gemma3nForConditionalGeneration(cfg).eval()
    ref.load_state_dict(state, strict=False)
    missing = set(ref.state_dict()) - set(state) - {"lm_head.weight"}
    assert not missing, missing
    return ref


def test_slice_matches_transformers_with_the_same_slice(tiny_hf, tmp_path):
    out = convert(tiny_hf[0], tmp_path / "slice", dtype="float32", ffn_dims=FFN, skip_layers=SKIP)
    cfg = json.loads((out / "config.json").read_text())["text_config"]
    kept = [0, 2, 3, 4, 6]
    assert cfg["num_hidden_layers"] == 5 and cfg["intermediate_size"] == [FFN[i] for i in kept]
    assert cfg["num_kv_shared_layers"] == 2
    ref_model = sliced_reference(tiny_hf[1], kept, FFN)
    ids = np.random.default_rng(0).integers(7, 250, size=(1, 30))
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.array(load_model(out)(mx.array(ids)))
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5
    with torch.no_grad():
        full = tiny_hf[1](input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(full - ref).max() > 0.1  # the slice is a different model


def test_uniform_ffn_size_and_quantized_slice_load(tiny_hf, tmp_path):
    out = convert(tiny_hf[0], tmp_path / "q", dtype="float32", quantize=True, q_bits=8, q_group_size=32, ffn_dims=[64])
    model = load_model(out)
    assert model.config.text_config.intermediate_size == [64] * 7
    assert np.isfinite(np.array(model(mx.array([[2, 5, 100]])))).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"skip_layers": [2]}, r"cannot skip layers \[2\]: KV-shared layers read their caches"),
        ({"skip_layers": [9]}, r"the model has layers 0..6"),
        ({"ffn_dims": [97, 1, 1, 1, 1, 1, 1]}, "layer 0: FFN size 97 must be in 1..96"),
        ({"ffn_dims": [8, 8]}, "needs 1 or 7 values"),
    ],
)
def test_bad_slices_are_refused(tiny_hf, tmp_path, kwargs, message):
    with pytest.raises(SliceError, match=message):
        convert(tiny_hf[0], tmp_path / "bad", dtype="float32", **kwargs)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_slice_of_a_converted_checkpoint(tiny_hf, tmp_path):
    """A converted float checkpoint stores the sparse layers' down_proj transposed; slicing
    it gives the model that slicing the HF checkpoint gives."""
    full = convert(tiny_hf[0], tmp_path / "full", dtype="float32")
    assert json.loads((full / "config.json").read_text())["text_config"]["sparse_down_proj_transposed"]
    from_converted = convert(full, tmp_path / "a", dtype="float32", ffn_dims=FFN, skip_layers=SKIP)
    from_hf = convert(tiny_hf[0], tmp_path / "b", dtype="float32", ffn_dims=FFN, skip_layers=SKIP)
    ids = mx.array(np.random.default_rng(1).integers(7, 250, size=(1, 12)))
    a, b = load_model(from_converted)(ids), load_model(from_hf)(ids)
    assert mx.array_equal(a, b)

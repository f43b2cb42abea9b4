"""Layout name mapping, per-module quantization entries, and layouts refused by name."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from convert import convert
from mlx_gemma3n.layouts import checkpoint_key, quantization_lookup
from mlx_gemma3n.loading import CheckpointError, load_model


@pytest.mark.parametrize(
    "stored, ours",
    [
        ("model.language_model.layers.0.mlp.up_proj.weight", "language_model.layers.0.mlp.up_proj.weight"),
        ("language_model.model.layers.0.mlp.up_proj.weight", "language_model.layers.0.mlp.up_proj.weight"),
        ("language_model.layers.0.mlp.up_proj.weight", "language_model.layers.0.mlp.up_proj.weight"),
        ("model.vision_tower.timm_model.conv_stem.conv.weight", "vision_tower.timm_model.conv_stem.conv.weight"),
        ("vision_tower.timm_model.conv_stem.conv.weight", "vision_tower.timm_model.conv_stem.conv.weight"),
        ("language_model.model.embed_tokens_per_layer.scales", "language_model.embed_tokens_per_layer.scales"),
        ("lm_head.weight", None),
        ("language_model.lm_head.weight", None),
    ],
)
def test_checkpoint_key(stored, ours):
    assert checkpoint_key(stored) == ours


def test_quantization_entries_by_module_and_part():
    lookup = quantization_lookup(
        {
            "group_size": 64,
            "bits": 4,
            "model.language_model.layers.0.mlp.down_proj": {"group_size": None, "bits": 6, "mode": "affine"},
            "language_model.model.layers.1.self_attn.q_proj": False,
            "audio_tower": {"group_size": 32, "bits": 8},
        }
    )
    defaults = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert lookup("language_model.layers.0.mlp.down_proj") == {"group_size": None, "bits": 6, "mode": "affine"}
    assert lookup("language_model.layers.0.mlp.up_proj") == defaults
    assert lookup("language_model.layers.1.self_attn.q_proj") is None
    assert lookup("audio_tower.conformer.0.ffw_layer_start.ffw_layer_1") == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert quantization_lookup(None)("language_model.embed_tokens") is None


@pytest.fixture
def ckpt(tiny_hf, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_hf[0], dst)
    return dst


def replace_weights(path, tensors, file="model.safetensors"):
    for f in [*path.glob("*.safetensors"), path / "model.safetensors.index.json"]:
        f.unlink()
    if tensors is not None:
        save_file(tensors, str(path / file))


def test_gguf_only_checkpoint_is_named(ckpt):
    replace_weights(ckpt, None)
    (ckpt / "gemma-3n-E2B-it-Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"no \.safetensors weight files \(found GGUF weights \(gemma-3n-E2B-it-Q4_K_M\.gguf\)"):
        load_model(ckpt)


def test_foreign_tensor_names_are_refused_by_layout(ckpt):
    replace_weights(ckpt, {"model.layers.0.mlp.up_proj.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(CheckpointError, match=r"not a Gemma 3n checkpoint layout .*\['model\.layers\.0\.mlp\.up_proj\.weight'\]"):
        load_model(ckpt)


def test_transformers_quantization_is_refused_by_method(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantized with 'bitsandbytes'"):
        load_model(ckpt)


def test_quantized_tensors_without_config_entry(tiny_hf, tmp_path):
    out = convert(str(tiny_hf[0]), str(tmp_path / "q"), dtype="float32", quantize=True, drop=["vision", "audio"])
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization": None}))
    with pytest.raises(CheckpointError, match="language_model.embed_tokens is stored quantized but config.json does not"):
        load_model(out)
    config["quantization"]["language_model.embed_tokens_per_layer"] = False
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="embed_tokens_per_layer is stored quantized but config.json does not"):
        load_model(out)

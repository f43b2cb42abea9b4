"""Bad checkpoints give clear errors that name the problem."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlx_gemma3n
from mlx_gemma3n.loading import CheckpointError, load_model

KEY = "model.language_model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def ckpt(tiny_hf, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_hf[0], dst)
    return dst


def shard_of(path, key):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path / index["weight_map"][key]


def rewrite_shard(path, key, change):
    shard = shard_of(path, key)
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_missing_path():
    with pytest.raises(CheckpointError, match="model path not found: /nonexistent/gemma"):
        mlx_gemma3n.load("/nonexistent/gemma")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        load_model(ckpt)


def test_truncated_safetensors(ckpt):
    shard = shard_of(ckpt, KEY)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read .*{shard.name}"):
        load_model(ckpt)


def test_missing_shard(ckpt):
    shard = shard_of(ckpt, KEY)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shard.name}"):
        load_model(ckpt)


def test_missing_tensor_is_named(ckpt):
    rewrite_shard(ckpt, KEY, lambda t: t.pop(KEY))
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*layers.1.mlp.up_proj.weight"):
        load_model(ckpt)


def test_misshaped_tensor_names_key_and_both_shapes(ckpt):
    def widen(t):
        t[KEY] = np.zeros((t[KEY].shape[0] + 1, t[KEY].shape[1]), np.float32)

    rewrite_shard(ckpt, KEY, widen)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "layers.1.mlp.up_proj.weight" in msg and "(129, 64)" in msg and "(128, 64)" in msg


def test_unexpected_tensor_is_named(ckpt):
    def add(t):
        t["model.language_model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)

    rewrite_shard(ckpt, KEY, add)
    with pytest.raises(CheckpointError, match="unexpected tensor.*mlp.extra.weight"):
        load_model(ckpt)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        mlx_gemma3n.load(str(ckpt))


def test_hub_id_without_network(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="could not fetch 'google/gemma-3n-E2B-it'"):
        mlx_gemma3n.load("google/gemma-3n-E2B-it")

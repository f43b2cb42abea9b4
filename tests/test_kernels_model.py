"""The whole tiny model with every fused kernel executed by the CPU executor, against the
reference path (float32): the logits of every greedy decode step within
max |kernels - reference| / max |reference| <= 1e-5, and the same tokens, from a 5-token
prompt through three sliding windows of decode (the rotating caches wrap).

The checkpoint is converted (sparse layers' down_proj stored transposed, so the sparse FFN
kernels run) and the decode-attention kernel is selected for every cache length."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from kernel_check import all_kernels
from kernel_launches import Counting

import mlx_gemma3n
from mlx_gemma3n.generation import prefill
from mlx_gemma3n.kernels import use_factory
from convert.converter import convert
from mlx_gemma3n.loading import load_model

TOL = 1e-5
WINDOW = 8  # TINY_CONFIG sliding_window
STEPS = 3 * WINDOW + 2
# Kernels the tiny model cannot reach, and why.
UNREACHED = {"gqa_decode_combine": "its caches are shorter than one decode-attention split"}


def greedy_logits(model, ids: mx.array) -> np.ndarray:
    cache = model.make_cache()
    logits = prefill(model, ids, model.embed_inputs(ids), cache)
    steps = []
    for _ in range(STEPS):
        steps.append(np.array(logits))
        logits = model(mx.argmax(logits, axis=-1)[:, None], cache)[:, -1, :]
    return np.stack(steps)


@pytest.fixture(scope="module")
def converted(tiny_hf, tmp_path_factory):
    return convert(tiny_hf[0], tmp_path_factory.mktemp("f32") / "ckpt", dtype="float32",
                   drop=["audio", "vision"])


def test_whole_model_through_the_executor_matches_the_reference_path(converted, monkeypatch):
    model = load_model(converted)
    sparsity = model.config.text_config.activation_sparsity_pattern
    # gate/up joined (text/concat.py) but where the sparse FFN reads up's rows
    assert [("gate_up_proj" in l.mlp) for l in model.language_model.layers] == [s == 0 for s in sparsity]
    ids = mx.array(np.random.default_rng(5).integers(7, 250, size=(1, 5)))
    reference = greedy_logits(model, ids)

    monkeypatch.setenv("MLX_GEMMA3N_DECODE_ATTENTION", "all")
    factory = Counting()
    with use_factory(factory), warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed self-check would warn
        fused = greedy_logits(model, ids)

    assert set(factory.launches) == {op.name for op in all_kernels()} - set(UNREACHED)
    assert fused.argmax(-1).tolist() == reference.argmax(-1).tolist()
    assert np.abs(fused - reference).max() / np.abs(reference).max() <= TOL


def test_prefill_chunk_takes_the_row_kernels(converted):
    """A chunk of several tokens (every position's logits) through the row kernels and
    the q/k/v norm + RoPE kernel."""
    model = load_model(converted)
    ids = mx.array(np.random.default_rng(6).integers(7, 250, size=(1, 12)))
    reference = np.array(model(ids, model.make_cache()))
    factory = Counting()
    with use_factory(factory), warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = np.array(model(ids, model.make_cache()))
    assert set(factory.launches) == {"altup_embed", "altup_predict", "qkv_norm_rope",
                                     "attn_residual", "altup_correct", "gated_gelu",
                                     "ple_residual", "altup_unembed"}
    assert np.abs(fused - reference).max() / np.abs(reference).max() <= TOL


def test_load_with_kernels_off_takes_the_reference_path(tiny_hf):
    model, _ = mlx_gemma3n.load(str(tiny_hf[0]), text_only=True, kernels=False)
    ids = mx.array([[9, 8, 7]])
    factory = Counting()
    with use_factory(factory):
        logits = model(ids[:, :1], model.make_cache())
    assert not factory.launches
    assert np.array_equal(np.array(logits), np.array(model(ids[:, :1])))

"""Kernels (c)-(f) in the model: their self-checks pass on the executor, and the attention
and FFN modules take them at decode (one token) and give the reference path's output."""

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_check import DTYPES
from kernel_launches import Counting
from metal_executor import metal_kernel

from mlx_gemma3n.kernels import decode_attention, gated_gelu, qkv_norm_rope, sparse_ffn
from mlx_gemma3n.kernels import use_factory
from mlx_gemma3n.kernels.altup_predict import altup_predict
from mlx_gemma3n.mlx_lm_parts import cache as mlx_lm_cache
from mlx_gemma3n.text.attention import Attention
from mlx_gemma3n.text.config import GLOBAL, SLIDING, TextConfig
from mlx_gemma3n.text.mlp import MLP
from mlx_gemma3n.text.transposed import QuantizedTransposedLinear, TransposedLinear
from mlx_gemma3n.tiny import TINY_CONFIG

OPS = [qkv_norm_rope.OP, gated_gelu.OP, decode_attention.PARTIAL, decode_attention.COMBINE,
       sparse_ffn.UP, sparse_ffn.DOWN]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_self_check_passes_on_the_executor(op, dtype):
    """What runs on first use on Metal/CUDA: a correct kernel must not disable itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with use_factory(metal_kernel):
            assert op.compiled(dtype) is not None


def _close(got, want, tol=1e-5):
    got, want = np.array(got), np.array(want)
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


def _text_config():
    return TextConfig.from_dict(TINY_CONFIG["text_config"])


def _mlp_case(hidden_sparsity, transposed, bits):
    mx.random.seed(3)
    mlp = MLP(64, 160, hidden_sparsity, transposed)
    if bits:
        nn.quantize(mlp, group_size=32, bits=bits)
    x = mx.random.normal((2, 1, 64))
    return mlp, x


@pytest.mark.parametrize("sparsity,transposed,bits,kernels", [
    (0.95, True, 4, ["sparse_up", "sparse_down"]),
    (0.95, True, 0, ["sparse_up", "sparse_down"]),
    (0.95, False, 0, ["gated_gelu"]),  # an HF checkpoint's layout: no sparse rows to read
    (0.0, False, 4, ["gated_gelu"]),
])
@pytest.mark.parametrize("joined", [False, True], ids=["apart", "joined"])
def test_mlp_decode_takes_the_kernels(sparsity, transposed, bits, kernels, joined):
    """With gate and up apart (as stored) and joined (as loaded, but on the sparse FFN).
    Several tokens (a prefill chunk) take the activation kernel on a sparse layer only."""
    mlp, x = _mlp_case(sparsity, transposed, bits)
    if joined:
        mlp.fuse_projections()
    assert ("gate_up_proj" in mlp) == (joined and not transposed)
    assert mlp.is_transposed_down == transposed
    if transposed:
        assert isinstance(mlp.down_proj, QuantizedTransposedLinear if bits else TransposedLinear)
    decode, chunk = Counting(), Counting()
    with use_factory(decode, self_check=False):
        got = mlp(x)
    with use_factory(chunk, self_check=False):
        prefill = mlp(mx.concatenate([x, x], axis=1))
        mlp.use_kernels = False
        want = mlp(x)
    assert decode.launches == kernels
    assert chunk.launches == (["gated_gelu"] if sparsity else [])
    _close(got, want)
    _close(prefill[:, 1:], want)


def test_transposed_linear_quantizes_along_its_output_dims():
    layer = TransposedLinear(64, 96)
    quantized = layer.to_quantized(group_size=32, bits=8)
    assert quantized["weight"].shape == (64, 96 * 8 // 32) and quantized["scales"].shape == (64, 3)
    x = mx.random.normal((3, 64))
    w = mx.dequantize(quantized["weight"], quantized["scales"], quantized["biases"], 32, 8)
    _close(quantized(x), x @ w)
    with pytest.raises(ValueError, match="affine"):
        layer.to_quantized(group_size=32, bits=4, mode="mxfp4")


def _attention_pair(layer_idx):
    """Two identical attention layers of the tiny config: kernels on with q/k/v joined (as
    loaded), kernels off with them apart."""
    config = _text_config()
    mx.random.seed(layer_idx)
    a = Attention(config, layer_idx)
    b = Attention(config, layer_idx)
    b.update(a.parameters())
    b.use_kernels = False
    a.fuse_projections()
    assert ("qkv_proj" in a) == (not a.is_kv_shared)
    return config, a, b


@pytest.mark.parametrize("kind", [SLIDING, GLOBAL])
def test_attention_decode_with_kernels(monkeypatch, kind):
    """A cache-owning layer (sliding: past its window, the rotating cache has wrapped; full:
    the cache's filled prefix), then a KV-shared layer reading its keys/values: decode
    through the kernels (q/k/v norm + RoPE, attention) equals the reference path."""
    monkeypatch.setenv("MLX_GEMMA3N_DECODE_ATTENTION", "all")
    config = _text_config()
    owner = config.cache_owner(kind)
    shared = max(i for i, t in enumerate(config.layer_types) if t == kind)
    assert config.kv_source(shared) == owner != shared
    _, own_k, own_r = _attention_pair(owner)
    _, shr_k, shr_r = _attention_pair(shared)
    window = config.sliding_window if kind == SLIDING else None
    assert window is None or window < 11
    outs = {}
    for name, own, shr in (("kernels", own_k, shr_k), ("reference", own_r, shr_r)):
        cache = mlx_lm_cache.RotatingKVCache(max_size=window) if window else mlx_lm_cache.KVCache()
        mx.random.seed(7)
        prompt = mx.random.normal((1, 11, config.hidden_size))
        own(prompt, "causal", 0, cache)
        factory = Counting()
        with use_factory(factory, self_check=False):
            for step in range(3):
                x = mx.random.normal((1, 1, config.hidden_size))
                out, kv = own(x, None, 11 + step, cache)
                out_shared, _ = shr(x, None, 11 + step, shared_kv=kv)
        outs[name] = (out, out_shared, factory.launches)
    assert outs["reference"][2] == []
    assert outs["kernels"][2].count("qkv_norm_rope") == 6
    assert outs["kernels"][2].count("gqa_decode_attention") == 6
    for got, want in zip(outs["kernels"][:2], outs["reference"][:2]):
        _close(got, want)


def _sparse_args(dtype, bits):
    k = mx.random.split(mx.random.key(bits), 3)
    up, down_t = sparse_ffn.sample_layers(dtype, 128, 300, bits, k[0])
    x = mx.random.normal((1, 1, 128), key=k[1]).astype(dtype)
    gate = mx.random.normal((1, 1, 300), key=k[2]).astype(dtype)
    return x, gate, up, down_t


def _qkv_shared(dtype):
    q, _, _, q_w, _, *rest = qkv_norm_rope.sample(dtype)
    return (q, None, None, q_w, None, *rest)


# The template variants the self-check samples do not reach (test_kernels_cuda.py compiles
# those): the dense activation, a KV-shared layer's q-only rows, attention finished in one
# split, float and 8-bit sparse FFN weights, the first layer's AltUp predict (no residual).
CUDA_VARIANTS = [
    (gated_gelu.OP, lambda dt: (*gated_gelu.sample(dt)[:2], None)),
    (qkv_norm_rope.OP, _qkv_shared),
    (decode_attention.PARTIAL, lambda dt: (*decode_attention._sample(dt, 37), 37, 1)),
    (sparse_ffn.UP, lambda dt: (*_sparse_args(dt, 0)[:3], 1.6448536)),
    (sparse_ffn.UP, lambda dt: (*_sparse_args(dt, 8)[:3], 1.6448536)),
    (sparse_ffn.DOWN, lambda dt: (_sparse_args(dt, 0)[0], mx.ones((1, 300)), _sparse_args(dt, 0)[3])),
    (sparse_ffn.DOWN, lambda dt: (_sparse_args(dt, 8)[0], mx.ones((1, 300)), _sparse_args(dt, 8)[3])),
    (altup_predict, lambda dt: altup_predict.sample(dt, residual=False)),
]


@pytest.mark.parametrize("dtype", [mx.bfloat16], ids=str)  # each dtype: test_kernels_cuda.py
@pytest.mark.parametrize("op,make_args", CUDA_VARIANTS,
                         ids=["dense", "kv-shared", "one-split", "up-float", "up-8bit",
                              "down-float", "down-8bit", "predict-first-layer"])
def test_cuda_variants_compile_with_nvrtc(op, make_args, dtype, monkeypatch):
    from test_kernels_cuda import NvrtcCudaKernel

    from mlx_gemma3n.kernels import base

    monkeypatch.setattr(mx.fast, "cuda_kernel", NvrtcCudaKernel)
    NvrtcCudaKernel.compiled = []
    op.launch(base._cuda_kernel(**op.spec), *make_args(dtype))
    assert NvrtcCudaKernel.compiled == [op.name]

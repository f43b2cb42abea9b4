"""Kernel (c), q/k/v norm + RoPE, executed on the CPU executor: every dtype, ragged head
sizes, one token and a prefill chunk's several, KV-shared layers (q only), positions up to
32K, and the dispatch."""

import mlx.core as mx
import numpy as np
import pytest
from kernel_check import DTYPES, assert_close, executed
from kernel_launches import Counting

from mlx_gemma3n.kernels import qkv_norm_rope as module, use_factory
from mlx_gemma3n.kernels.qkv_norm_rope import OP, inverse_frequencies, qkv_norm_rope, reference

EPS, BASE = 1e-6, 10_000.0
# (batch, q heads, kv heads, head_dim): 20 and 33 rotation pairs over 32 lanes, and E2B's shape.
SHAPES = [(2, 3, 1, 40), (1, 5, 1, 66), (1, 8, 2, 256)]


def _args(dtype, B, H, HKV, D, offset=37, shared=False, length=1):
    k = mx.random.split(mx.random.key(D + H), 5)

    def normal(shape, key, mean=0.0, std=1.0):
        return (mean + std * mx.random.normal(shape, key=key)).astype(dtype)

    q = normal((B, length, H * D), k[0])
    keys, values = normal((B, length, HKV * D), k[1]), normal((B, length, HKV * D), k[2])
    q_w, k_w = normal((D,), k[3], 1.0, 0.2), normal((D,), k[4], 1.0, 0.2)
    if shared:
        keys = values = k_w = None
    return q, keys, values, q_w, k_w, EPS, BASE, offset, H, HKV, D


def _oracle(args):
    """float64 norms and rotation at the float32 angle (offset + token) * inv_freq, as the
    kernel states it. (MLX-CPU's mx.fast.rope takes its inverse frequencies from exp rather than
    exp2, a few ulp apart, and its cos/sin are approximations: at position 37 its float32
    results are already 2e-6 from these, and ~1e-3 at 30000.)"""
    q, k, v, q_w, k_w, eps, base, offset, H, HKV, D = args
    inv = np.array(inverse_frequencies(base, D))
    positions = np.arange(offset, offset + q.shape[1], dtype=np.float32)[:, None]
    theta = (positions * inv).astype(np.float64)  # [L, D / 2]
    cos, sin = np.cos(theta), np.sin(theta)

    def norm(x, n, w):
        B, L = x.shape[:2]
        x = np.array(x.astype(mx.float32), np.float64).reshape(B, L, n, D).transpose(0, 2, 1, 3)
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        return x if w is None else x * np.array(w.astype(mx.float32), np.float64)

    def rope(x):
        a, b = x[..., : D // 2], x[..., D // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    if k is None:
        return (rope(norm(q, H, q_w)),)
    return rope(norm(q, H, q_w)), rope(norm(k, HKV, k_w)), norm(v, HKV, None)


def _check(args):
    got = executed(OP, args)
    want = _oracle(args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close(g, mx.array(w.astype(np.float32)), args[0].dtype)
    return got


def test_oracle_is_todays_op_sequence():
    args = _args(mx.float32, 1, 8, 2, 256)
    for w, r in zip(_oracle(args), reference(*args)):
        assert np.abs(w - np.array(r)).max() <= 1e-4 * np.abs(w).max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("length", [1, 7])
def test_matches_the_oracle(dtype, shape, length):
    _check(_args(dtype, *shape, length=length))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 4])
def test_kv_shared_layer_gets_q_only(dtype, length):
    got = _check(_args(dtype, 2, 3, 1, 40, shared=True, length=length))
    assert len(got) == 1 and got[0].shape == (2, 3, length, 40)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("offset", [1000, 32767])
def test_far_positions(dtype, offset):
    _check(_args(dtype, 1, 8, 2, 256, offset=offset))


def test_dispatch_kernel_per_token_reference_otherwise(monkeypatch):
    """Decode and prefill chunks take the kernel; switched off, or past the rows a CUDA grid
    holds, the reference."""
    factory = Counting()
    decode = _args(mx.float32, 2, 3, 1, 40)
    prefill = _args(mx.float32, 2, 3, 1, 40, length=5)  # 2 x 5 tokens x 5 head rows
    with use_factory(factory, self_check=False):
        got = qkv_norm_rope(*decode) + qkv_norm_rope(*prefill)
        assert factory.launches == ["qkv_norm_rope"] * 2
        for g, w in zip(got, executed(OP, decode) + executed(OP, prefill)):
            assert mx.array_equal(g, w)
        off = qkv_norm_rope(*decode, enabled=False)
        monkeypatch.setattr(module, "MAX_GRID_ROWS", 49)
        too_many = qkv_norm_rope(*prefill)
    assert factory.launches == ["qkv_norm_rope"] * 2
    for g, w in zip(off + too_many, reference(*decode) + reference(*prefill)):
        assert mx.array_equal(g, w)

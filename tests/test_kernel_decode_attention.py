"""Kernel (e), GQA decode attention, executed on the CPU executor: the split kernel and the
combine kernel against float64 attention, over plain, rotating (sliding-window) and full
caches and a KV-shared layer; the per-case switch and its SDPA default."""

import mlx.core as mx
import numpy as np
import pytest
from kernel_check import assert_within, executed
from kernel_launches import Counting

from mlx_gemma3n.kernels import decode_attention as attn
from mlx_gemma3n.kernels import use_factory
from mlx_gemma3n.mlx_lm_parts import cache as mlx_lm_cache


def _qkv(dtype, B, H, HKV, D, S, seed=0):
    k = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((B, H, 1, D), key=k[0]).astype(dtype)
    keys = mx.random.normal((B, HKV, S, D), key=k[1]).astype(dtype)
    values = mx.random.normal((B, HKV, S, D), key=k[2]).astype(dtype)
    return q, keys, values


def _oracle(q, keys, values):
    """float64 softmax(q k^T) v per query head, its KV head shared by H / HKV heads; and
    the scale of each output element, softmax @ |v| (what the sum is made of)."""
    q, k, v = (np.array(a.astype(mx.float32), np.float64) for a in (q, keys, values))
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    v = np.repeat(v, q.shape[1] // v.shape[1], axis=1)
    s = q @ k.swapaxes(-1, -2)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ v, p @ np.abs(v)


def assert_attention_close(got, q, keys, values):
    """float32 within 1e-5 of the element's scale, half types within 2 ulp at that scale: a
    weighted average of many values can cancel far below the size of its terms."""
    want, scale = _oracle(q, keys, values)
    assert_within(got, want, scale, q.dtype, "attention")


def _executed_attention(q, keys, values, split_len, n_splits):
    o, ml = executed(attn.PARTIAL, (q, keys, values, split_len, n_splits))
    if n_splits == 1:
        return o
    return executed(attn.COMBINE, (q, o, ml))[0]


# (batch, q heads, kv heads, head_dim, keys, keys per split): one split (finished by the
# first kernel), ragged splits with a short last one, more simdgroups than keys per split,
# and E2B's heads. Each shape is a compile: float16 and bfloat16 take a subset.
ONE_SPLIT, RAGGED = (2, 6, 2, 40, 37, 37), (2, 6, 2, 40, 37, 10)
NARROW, E2B = (1, 3, 1, 66, 29, 5), (1, 8, 2, 256, 300, 128)
CASES = [(mx.float32, c) for c in (ONE_SPLIT, RAGGED, NARROW, E2B)] + [
    (mx.float16, RAGGED), (mx.bfloat16, RAGGED), (mx.bfloat16, E2B)]


@pytest.mark.parametrize("dtype,case", CASES)
def test_matches_attention(dtype, case):
    B, H, HKV, D, S, split_len = case
    q, keys, values = _qkv(dtype, B, H, HKV, D, S)
    got = _executed_attention(q, keys, values, split_len, -(-S // split_len))
    assert_attention_close(got, q, keys, values)


@pytest.mark.parametrize("split_len", [37, 10])
def test_pure_mlx_fallbacks_of_both_kernels(split_len):
    """What runs if a kernel fails its self-check: the split and combine references."""
    q, keys, values = _qkv(mx.float32, 2, 6, 2, 40, 37)
    n_splits = -(-37 // split_len)
    o, ml = attn.partial_reference(q, keys, values, split_len, n_splits)
    got = o if n_splits == 1 else attn.combine_reference(q, o, ml)[0]
    assert_attention_close(got, q, keys, values)


def test_split_policy():
    assert attn.splits_for(1) == (1, 1)
    assert attn.splits_for(512) == (256, 2)
    assert attn.splits_for(32768) == (512, 64)
    for n in (1, 300, 511, 2049, 40000):
        split_len, n_splits = attn.splits_for(n)
        assert (n_splits - 1) * split_len < n <= n_splits * split_len and n_splits <= 64


def test_kernel_cases_setting(monkeypatch):
    assert attn.parse_cases("") == attn.parse_cases("sdpa") == frozenset()
    assert attn.parse_cases("all") == frozenset(attn.CASES)
    assert attn.parse_cases("2048, 8192") == {2048, 8192}
    for bad in ("fast", "1000", "512,"):
        with pytest.raises(ValueError, match="MLX_GEMMA3N_DECODE_ATTENTION"):
            attn.parse_cases(bad)
    monkeypatch.setenv("MLX_GEMMA3N_DECODE_ATTENTION", "8192,all")
    with pytest.warns(RuntimeWarning, match="'8192,all'.*scaled_dot_product_attention"):
        assert attn.kernel_cases() == frozenset()
    assert [attn.case_of(n) for n in (1, 512, 513, 2048, 9000, 40000)] == [
        512, 512, 2048, 2048, 32768, 32768
    ]


def _decode(cache, dtype, prompt, steps, H=6, HKV=2, D=40):
    """Fill `cache` with a prompt, then decode `steps` tokens; the keys/values the last step
    attends over (views into the cache) and its query."""
    q, keys, values = _qkv(dtype, 1, H, HKV, D, prompt, seed=1)
    cache.update_and_fetch(keys, values)
    for i in range(steps):
        q, keys, values = _qkv(dtype, 1, H, HKV, D, 1, seed=2 + i)
        kv = cache.update_and_fetch(keys, values)
    return q, kv


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("cache", ["rotating", "full"])
def test_over_the_caches_when_selected(monkeypatch, dtype, cache):
    """The sliding window's rotating cache (wrapped around) and the full cache's filled
    prefix, through decode_attention with the kernel selected and small splits."""
    monkeypatch.setenv("MLX_GEMMA3N_DECODE_ATTENTION", "all")
    monkeypatch.setattr(attn, "SPLIT_KEYS", 8)
    made = mlx_lm_cache.RotatingKVCache(max_size=16) if cache == "rotating" else mlx_lm_cache.KVCache()
    q, (keys, values) = _decode(made, dtype, prompt=20, steps=5)
    assert keys.shape[2] == (16 if cache == "rotating" else 25)
    factory = Counting()
    with use_factory(factory, self_check=False):
        got = attn.decode_attention(q, keys, values)
    assert factory.launches == ["gqa_decode_attention", "gqa_decode_combine"]
    assert_attention_close(got, q, keys, values)


def test_sdpa_unless_selected(monkeypatch):
    monkeypatch.delenv("MLX_GEMMA3N_DECODE_ATTENTION", raising=False)
    q, keys, values = _qkv(mx.float32, 1, 6, 2, 40, 30)
    factory = Counting()
    with use_factory(factory, self_check=False):
        default = attn.decode_attention(q, keys, values)
        monkeypatch.setenv("MLX_GEMMA3N_DECODE_ATTENTION", "2048")
        other_case = attn.decode_attention(q, keys, values)
        monkeypatch.setenv("MLX_GEMMA3N_DECODE_ATTENTION", "512")
        switched_off = attn.decode_attention(q, keys, values, enabled=False)
        masked = attn.decode_attention(q, keys, values, mask=mx.ones((1, 30), mx.bool_))
        assert factory.launches == []
        selected = attn.decode_attention(q, keys, values)
        assert factory.launches == ["gqa_decode_attention"]
    sdpa = attn.reference(q, keys, values)
    for out in (default, other_case, switched_off, masked):
        assert mx.array_equal(out, sdpa)
    assert_attention_close(selected, q, keys, values)


@pytest.mark.parametrize("queries,mask", [(1, None), (9, "causal")])
def test_reference_computes_half_precision_in_float32_on_the_cpu(queries, mask):
    """On the CPU backend the reference (SDPA) runs in float32 and rounds the result once:
    MLX-CPU's bfloat16 SDPA, without a BLAS, is 3-12x slower (and gives other values)."""
    k = mx.random.split(mx.random.key(5), 3)
    q = mx.random.normal((1, 8, queries, 64), key=k[0]).astype(mx.bfloat16)
    keys, values = (mx.random.normal((1, 2, 40, 64), key=i).astype(mx.bfloat16) for i in k[1:])
    upcast = (a.astype(mx.float32) for a in (q, keys, values))
    want = mx.fast.scaled_dot_product_attention(*upcast, scale=1.0, mask=mask).astype(mx.bfloat16)
    with mx.stream(mx.cpu):
        got = attn.reference(q, keys, values, mask)
    assert got.dtype == mx.bfloat16 and mx.array_equal(got, want)

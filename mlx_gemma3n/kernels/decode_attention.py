"""Kernel (e): decode attention for grouped-query heads (one token, no mask, scale 1.0 as
Gemma 3n uses it) that reads each KV head once for all the query heads sharing it.

Keys and values are read through their strides, so the caches' views (the rotating sliding
window, the full cache's filled prefix, another layer's cache on KV-shared layers) are used
in place, never copied. Long caches are split across threadgroups (flash-decoding): each
writes its split's running max, normaliser and unnormalised sum, and a second kernel
combines them; a cache short enough for one split is finished by the first kernel alone.

Whether this beats mx.fast.scaled_dot_product_attention depends on the GPU and the key
count and has not been measured (no GPU was available when it was written), so it is used
only for the key-count cases named in MLX_GEMMA3N_DECODE_ATTENTION (e.g. "2048,8192", or
"all"); the default is SDPA everywhere.
"""

import os
import warnings
from functools import lru_cache
from typing import Any, FrozenSet, Tuple

import mlx.core as mx

from .base import FusedOp, kernels_enabled

# A finite stand-in for -inf as the initial running max: exp(NEG - NEG) is 1, not NaN.
NEG = "-3.0e38f"

# One threadgroup per (batch, KV head, split); simdgroup j takes keys j, j + NSG, ... of the
# split and keeps an online softmax per query head, then the simdgroups are merged through
# threadgroup memory one query head at a time (NSG * D floats).
PARTIAL_SOURCE = f"""
    constexpr int E = (D + 31) / 32;
    int HKV = keys_shape[1];
    int H = HKV * G;
    uint lane = thread_index_in_simdgroup;
    uint sg = simdgroup_index_in_threadgroup;
    uint tid = thread_position_in_threadgroup.x;
    uint b = threadgroup_position_in_grid.y / HKV;
    uint kh = threadgroup_position_in_grid.y % HKV;
    int split = threadgroup_position_in_grid.z;
    int n_splits = meta[1];
    int start = split * meta[0];
    int stop = metal::min(int(keys_shape[2]), start + meta[0]);
    auto kb = keys + b * keys_strides[0] + kh * keys_strides[1];
    auto vb = values + b * values_strides[0] + kh * values_strides[1];

    float qr[G][E];
    float acc[G][E];
    float m[G];
    float l[G];
    for (int g = 0; g < G; g++) {{
        auto qg = queries + b * queries_strides[0] + (kh * G + g) * queries_strides[1];
        for (int e = 0; e < E; e++) {{
            int d = lane + 32 * e;
            qr[g][e] = d < D ? static_cast<float>(qg[d * queries_strides[3]]) : 0.0f;
            acc[g][e] = 0.0f;
        }}
        m[g] = {NEG};
        l[g] = 0.0f;
    }}
    for (int s = start + sg; s < stop; s += NSG) {{
        float kr[E];
        float vr[E];
        for (int e = 0; e < E; e++) {{
            int d = lane + 32 * e;
            kr[e] = d < D ? static_cast<float>(kb[s * keys_strides[2] + d * keys_strides[3]]) : 0.0f;
            vr[e] = d < D ? static_cast<float>(vb[s * values_strides[2] + d * values_strides[3]]) : 0.0f;
        }}
        for (int g = 0; g < G; g++) {{
            float dot = 0.0f;
            for (int e = 0; e < E; e++) {{
                dot += qr[g][e] * kr[e];
            }}
            dot = simd_sum(dot);
            float mn = metal::max(m[g], dot);
            float c = metal::precise::exp(m[g] - mn);
            float p = metal::precise::exp(dot - mn);
            l[g] = l[g] * c + p;
            for (int e = 0; e < E; e++) {{
                acc[g][e] = acc[g][e] * c + p * vr[e];
            }}
            m[g] = mn;
        }}
    }}

    threadgroup float tm[NSG * G];
    threadgroup float tl[NSG * G];
    threadgroup float tacc[NSG * D];
    if (lane == 0) {{
        for (int g = 0; g < G; g++) {{
            tm[sg * G + g] = m[g];
            tl[sg * G + g] = l[g];
        }}
    }}
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int g = 0; g < G; g++) {{
        float mx_all = {NEG};
        for (int j = 0; j < NSG; j++) {{
            mx_all = metal::max(mx_all, tm[j * G + g]);
        }}
        float l_all = 0.0f;
        for (int j = 0; j < NSG; j++) {{
            l_all += tl[j * G + g] * metal::precise::exp(tm[j * G + g] - mx_all);
        }}
        float f = metal::precise::exp(m[g] - mx_all);
        for (int e = 0; e < E; e++) {{
            int d = lane + 32 * e;
            if (d < D) {{
                tacc[sg * D + d] = acc[g][e] * f;
            }}
        }}
        threadgroup_barrier(mem_flags::mem_threadgroup);
        size_t row = (size_t(b) * H + kh * G + g) * n_splits + split;
        for (uint d = tid; d < D; d += NSG * 32) {{
            float sum = 0.0f;
            for (int j = 0; j < NSG; j++) {{
                sum += tacc[j * D + d];
            }}
            o[row * D + d] = static_cast<O>(FINAL ? sum / l_all : sum);
        }}
        if (tid == 0) {{
            ml[row * 2] = mx_all;
            ml[row * 2 + 1] = l_all;
        }}
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }}
"""

# One threadgroup per (batch, query head): rescale each split's sum to the common max.
COMBINE_SOURCE = f"""
    uint row = threadgroup_position_in_grid.y;
    uint tid = thread_position_in_threadgroup.x;
    uint tpg = threads_per_threadgroup.x;
    int n = meta[1];
    auto mr = ml + row * n * 2;
    float mx_all = {NEG};
    for (int s = 0; s < n; s++) {{
        mx_all = metal::max(mx_all, mr[2 * s]);
    }}
    float l_all = 0.0f;
    for (int s = 0; s < n; s++) {{
        l_all += mr[2 * s + 1] * metal::precise::exp(mr[2 * s] - mx_all);
    }}
    for (uint d = tid; d < D; d += tpg) {{
        float sum = 0.0f;
        for (int s = 0; s < n; s++) {{
            sum += o[(row * n + s) * D + d] * metal::precise::exp(mr[2 * s] - mx_all);
        }}
        out[row * D + d] = static_cast<T>(sum / l_all);
    }}
"""

NSG = 8  # simdgroups per threadgroup
SPLIT_KEYS = 256  # at least this many keys per split
MAX_SPLITS = 64
CASES = (512, 2048, 8192, 32768)  # key-count cases (each covers the counts up to it)
ENV = "MLX_GEMMA3N_DECODE_ATTENTION"


def parse_cases(setting: str) -> FrozenSet[int]:
    """Key-count cases from a setting: "all", "sdpa" or "" (none), or a comma list of cases
    from CASES; anything else raises ValueError."""
    setting = setting.strip().lower()
    if setting == "all":
        return frozenset(CASES)
    if setting in ("", "sdpa"):
        return frozenset()
    try:
        cases = frozenset(int(c) for c in setting.split(","))
    except ValueError:
        cases = None
    if not cases or not cases <= set(CASES):
        raise ValueError(
            f"{ENV}={setting!r}: expected 'all', 'sdpa' or a comma list of key counts from "
            f"{CASES}"
        )
    return cases


@lru_cache(maxsize=None)
def _cases_from(setting: str) -> FrozenSet[int]:
    try:
        return parse_cases(setting)
    except ValueError as e:  # a mistyped variable should not stop generation
        warnings.warn(f"{e}; using scaled_dot_product_attention everywhere", RuntimeWarning,
                      stacklevel=2)
        return frozenset()


def kernel_cases() -> FrozenSet[int]:
    """The key-count cases selected by MLX_GEMMA3N_DECODE_ATTENTION (an invalid value
    warns once and selects none)."""
    return _cases_from(os.environ.get(ENV, ""))


def case_of(n_keys: int) -> int:
    """The case a key count falls in: the smallest of CASES not below it (or the largest)."""
    return next((c for c in CASES if n_keys <= c), CASES[-1])


def reference(queries: mx.array, keys: mx.array, values: mx.array, mask: Any = None) -> mx.array:
    """mx.fast.scaled_dot_product_attention with Gemma 3n's scale 1.0; in float32 on the CPU
    backend, where MLX multiplies half precision without a BLAS: SDPA there is 3x (one
    query, 2,048 keys) to 12x (256 queries, 1,920 keys) slower in bfloat16 than in float32,
    casts included."""
    if queries.dtype == mx.float32 or mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)
    upcast = (a.astype(mx.float32) for a in (queries, keys, values))
    out = mx.fast.scaled_dot_product_attention(*upcast, scale=1.0, mask=mask)
    return out.astype(queries.dtype)


def splits_for(n_keys: int) -> Tuple[int, int]:
    """(keys per split, splits) for a cache of n_keys."""
    n = min(MAX_SPLITS, max(1, n_keys // SPLIT_KEYS))
    split_len = -(-n_keys // n)
    return split_len, -(-n_keys // split_len)


def partial_reference(queries, keys, values, split_len, n_splits) -> tuple:
    """Per split: the unnormalised softmax-weighted value sum o [B, H, splits, D] (float32)
    and ml [B, H, splits, 2] = (max score, sum of exp(score - max)); with one split, o is
    the normalised attention output in the queries' dtype."""
    B, H, _, D = queries.shape
    hkv, S = keys.shape[1], keys.shape[2]
    pad = n_splits * split_len - S
    q = queries.astype(mx.float32).reshape(B, hkv, H // hkv, D)
    scores = q @ keys.astype(mx.float32).swapaxes(-1, -2)
    scores = mx.pad(scores, [(0, 0)] * 3 + [(0, pad)], constant_values=-mx.inf)
    scores = scores.reshape(B, hkv, H // hkv, n_splits, split_len).transpose(0, 1, 3, 2, 4)
    m = scores.max(axis=-1, keepdims=True)
    p = mx.exp(scores - m)
    v = mx.pad(values.astype(mx.float32), [(0, 0), (0, 0), (0, pad), (0, 0)])
    o = p @ v.reshape(B, hkv, n_splits, split_len, D)  # [B, hkv, splits, G, D]
    l = p.sum(axis=-1, keepdims=True)
    ml = mx.concatenate([m, l], axis=-1).transpose(0, 1, 3, 2, 4).reshape(B, H, n_splits, 2)
    o = o.transpose(0, 1, 3, 2, 4).reshape(B, H, n_splits, D)
    if n_splits == 1:
        o = (o / ml[..., 1:]).astype(queries.dtype)
    return o, ml


def partial_launch(kernel, queries, keys, values, split_len, n_splits) -> tuple:
    """The split kernel: queries [B, H, 1, D]; keys, values [B, HKV, S, D] (any strides)."""
    B, H, _, D = queries.shape
    hkv = keys.shape[1]
    final = n_splits == 1
    o_type = queries.dtype if final else mx.float32
    return tuple(kernel(
        inputs=[queries, keys, values, mx.array([split_len, n_splits], mx.int32)],
        template=[("T", queries.dtype), ("O", o_type), ("D", D), ("G", H // hkv),
                  ("NSG", NSG), ("FINAL", final)],
        grid=(32 * NSG, B * hkv, n_splits),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=[(B, H, n_splits, D), (B, H, n_splits, 2)],
        output_dtypes=[o_type, mx.float32],
    ))


def combine_reference(queries, o, ml) -> tuple:
    """The attention output [B, H, 1, D] from the splits' partial sums; `queries` gives the
    dtype (it is not read)."""
    w = mx.exp(ml[..., 0] - ml[..., 0].max(axis=-1, keepdims=True))
    total = (ml[..., 1] * w).sum(axis=-1, keepdims=True)
    out = (o * w[..., None]).sum(axis=2) / total
    return (out[:, :, None].astype(queries.dtype),)


def combine_launch(kernel, queries, o, ml) -> tuple:
    B, H, n_splits, D = o.shape
    threads = min(256, (D + 31) // 32 * 32)
    return tuple(kernel(
        inputs=[o, ml, mx.array([0, n_splits], mx.int32)],
        template=[("T", queries.dtype), ("D", D)],
        grid=(threads, B * H, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, H, 1, D)],
        output_dtypes=[queries.dtype],
    ))


def _sample(dtype: mx.Dtype, n_keys: int) -> tuple:
    """Ragged: 2 batch entries, 2 KV heads of 3 query heads, head_dim 40, n_keys keys."""
    k = mx.random.split(mx.random.key(0), 3)
    q = mx.random.normal((2, 6, 1, 40), key=k[0]).astype(dtype)
    keys = mx.random.normal((2, 2, n_keys, 40), key=k[1]).astype(dtype)
    values = mx.random.normal((2, 2, n_keys, 40), key=k[2]).astype(dtype)
    return q, keys, values


def _partial_sample(dtype: mx.Dtype) -> tuple:
    return (*_sample(dtype, 300), 100, 3)


def _combine_sample(dtype: mx.Dtype) -> tuple:
    q, keys, values = _sample(dtype, 300)
    return (q, *partial_reference(q, keys, values, 100, 3))


PARTIAL = FusedOp("gqa_decode_attention", ["queries", "keys", "values", "meta"], ["o", "ml"],
                  PARTIAL_SOURCE, partial_launch, partial_reference, _partial_sample)
# Cache views are read in place through their strides.
PARTIAL.spec["ensure_row_contiguous"] = False
COMBINE = FusedOp("gqa_decode_combine", ["o", "ml", "meta"], ["out"], COMBINE_SOURCE,
                  combine_launch, combine_reference, _combine_sample)


def decode_attention(queries: mx.array, keys: mx.array, values: mx.array, mask: Any = None,
                     enabled: bool = True) -> mx.array:
    """Attention of queries [B, H, L, D] over keys/values [B, HKV, S, D]: the kernel for one
    unmasked token when its key-count case is selected (kernel_cases) and `enabled`, else
    SDPA."""
    S = keys.shape[2]
    if not (kernels_enabled(enabled) and queries.shape[2] == 1 and mask is None and S > 0
            and queries.shape[1] % keys.shape[1] == 0 and case_of(S) in kernel_cases()):
        return reference(queries, keys, values, mask)
    split_len, n_splits = splits_for(S)
    o, ml = PARTIAL(queries, keys, values, split_len, n_splits, enabled=enabled)
    if n_splits == 1:
        return o
    return COMBINE(queries, o, ml, enabled=enabled)[0]

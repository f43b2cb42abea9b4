"""Kernel (c): q/k/v RMSNorm, Gemma's half-split RoPE on q and k, the scale-free v norm.

One launch replaces five per layer (three norms, two ropes; two on a KV-shared layer), at
decode and at a prefill chunk alike. One simdgroup normalises one head row of one token; the
rows of q, k and v land in a single [B, H + 2 * HKV, L, D] output whose slices are the three
results. KV-shared layers have no k/v: HKV = 0 and q is passed in the unused slots, which the
body never reads.
"""

import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .base import MAX_GRID_ROWS, FusedOp

# Rows 0..H-1 of a batch entry are q heads, then HKV k heads, then HKV v heads, each for the
# L tokens in order. RoPE pairs element i with i + D/2 (non-traditional), at angle
# (offset + token) * inv_freq[i]. The inverse
# frequencies come in as data: at position 30000 one ulp of inv_freq moves the angle by
# 2e-3 rad, so computing them in the body would make the result depend on each compiler's
# exp2 rather than on the formula.
# Sizes and the position come in `meta` (offset, H, HKV, D, L): one compiled kernel per dtype.
SOURCE = """
    int H = meta[1];
    int HKV = meta[2];
    int D = meta[3];
    int L = meta[4];
    int R = H + 2 * HKV;
    int HALF = D / 2;
    uint lane = thread_index_in_simdgroup;
    uint row = threadgroup_position_in_grid.y;
    uint t = row % L;
    uint b = row / L / R;
    uint r = row / L % R;
    uint token = b * L + t;
    int pos_i = meta[0] + int(t);
    bool is_q = r < H;
    bool is_v = r >= H + HKV;
    // q, k and v are device buffers (constant only below 8 elements, never a head row)
    const device T* x = is_q ? q + (token * H + r) * D
        : (is_v ? v + (token * HKV + r - H - HKV) * D : k + (token * HKV + r - H) * D);
    device T* y = out + row * D;

    float ss = 0.0f;
    for (int i = lane; i < D; i += 32) {
        float xi = static_cast<float>(x[i]);
        ss += xi * xi;
    }
    float inv = metal::precise::rsqrt(simd_sum(ss) / D + eps[0]);

    if (is_v) {
        for (int i = lane; i < D; i += 32) {
            y[i] = static_cast<T>(static_cast<float>(x[i]) * inv);
        }
    } else {
        float pos = static_cast<float>(pos_i);
        for (int i = lane; i < HALF; i += 32) {
            float w0 = is_q ? static_cast<float>(q_weight[i]) : static_cast<float>(k_weight[i]);
            float w1 = is_q ? static_cast<float>(q_weight[i + HALF])
                            : static_cast<float>(k_weight[i + HALF]);
            float a = static_cast<float>(x[i]) * inv * w0;
            float c = static_cast<float>(x[i + HALF]) * inv * w1;
            float theta = pos * inv_freq[i];
            float cs = metal::precise::cos(theta);
            float sn = metal::precise::sin(theta);
            y[i] = static_cast<T>(a * cs - c * sn);
            y[i + HALF] = static_cast<T>(c * cs + a * sn);
        }
    }
"""


@lru_cache(maxsize=None)
def inverse_frequencies(rope_base: float, head_dim: int) -> mx.array:
    """base^(-i / (D/2)) for i < D/2 in float32, as mx.fast.rope's Metal kernel computes it
    (exp2 of the scaled log2 base)."""
    half = head_dim // 2
    i = np.arange(half, dtype=np.float32)
    return mx.array(np.exp2(-(i / np.float32(half)) * np.float32(math.log2(rope_base))))


def _heads(x: mx.array, n: int, head_dim: int) -> mx.array:
    B, L, _ = x.shape
    return x.reshape(B, L, n, head_dim).transpose(0, 2, 1, 3)


def reference(q, k, v, q_weight, k_weight, eps, rope_base, offset, n_heads, n_kv_heads,
              head_dim) -> tuple:
    """Today's op sequence: q [B, L, H*D] and k, v [B, L, HKV*D] (None on KV-shared layers)
    -> (q [B, H, L, D], k, v [B, HKV, L, D]), or (q,) on KV-shared layers."""

    def rope(x):
        return mx.fast.rope(x, head_dim, traditional=False, base=rope_base, scale=1.0,
                            offset=offset)

    queries = rope(mx.fast.rms_norm(_heads(q, n_heads, head_dim), q_weight, eps))
    if k is None:
        return (queries,)
    keys = rope(mx.fast.rms_norm(_heads(k, n_kv_heads, head_dim), k_weight, eps))
    values = mx.fast.rms_norm(_heads(v, n_kv_heads, head_dim), None, eps)
    return queries, keys, values


def launch(kernel, q, k, v, q_weight, k_weight, eps, rope_base, offset, n_heads, n_kv_heads,
           head_dim) -> tuple:
    """The kernel, for L tokens per batch entry (q [B, L, H*D])."""
    B, L = q.shape[:2]
    nkv = 0 if k is None else n_kv_heads
    rows = n_heads + 2 * nkv
    out = kernel(
        inputs=[q, q if k is None else k, q if v is None else v, q_weight,
                q_weight if k_weight is None else k_weight,
                mx.array([eps], mx.float32), inverse_frequencies(rope_base, head_dim),
                mx.array([offset, n_heads, nkv, head_dim, L], mx.int32)],
        template=[("T", q.dtype)],
        grid=(32, B * rows * L, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(B, rows, L, head_dim)],
        output_dtypes=[q.dtype],
    )[0]
    queries = out[:, :n_heads]
    if k is None:
        return (queries,)
    return queries, out[:, n_heads:n_heads + nkv], out[:, n_heads + nkv:]


def sample(dtype: mx.Dtype) -> tuple:
    """A small ragged case: 2 batch entries of 3 tokens from position 37, 3 q heads on 1 KV
    head, head_dim 40."""
    k = mx.random.split(mx.random.key(0), 5)
    h, hkv, d = 3, 1, 40
    return (
        mx.random.normal((2, 3, h * d), key=k[0]).astype(dtype),
        mx.random.normal((2, 3, hkv * d), key=k[1]).astype(dtype),
        mx.random.normal((2, 3, hkv * d), key=k[2]).astype(dtype),
        (1 + 0.1 * mx.random.normal((d,), key=k[3])).astype(dtype),
        (1 + 0.1 * mx.random.normal((d,), key=k[4])).astype(dtype),
        1e-6, 10_000.0, 37, h, hkv, d,
    )


OP = FusedOp("qkv_norm_rope", ["q", "k", "v", "q_weight", "k_weight", "eps", "inv_freq",
                               "meta"], ["out"], SOURCE, launch, reference, sample)


def qkv_norm_rope(q, k, v, q_weight, k_weight, eps, rope_base, offset, n_heads, n_kv_heads,
                  head_dim, enabled: bool = True) -> tuple:
    """Normed and rotated q and k, normed v, as `reference`; through the kernel (decode and
    prefill chunks) unless `enabled` is False."""
    args = (q, k, v, q_weight, k_weight, eps, rope_base, offset, n_heads, n_kv_heads, head_dim)
    rows = q.shape[0] * q.shape[1] * (n_heads + (0 if k is None else 2 * n_kv_heads))
    if head_dim % 2 == 0 and rows <= MAX_GRID_ROWS:
        return OP(*args, enabled=enabled)
    return reference(*args)

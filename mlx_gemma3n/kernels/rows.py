"""Shared pieces of the row kernels: one threadgroup per token row, its threads striding
over the hidden dimension, row sums through simd_sum and a small threadgroup array."""

from functools import lru_cache
from typing import Sequence

import mlx.core as mx

# Every thread of a threadgroup sums its partials in the same order (simdgroup 0, 1, ...),
# so all threads hold bit-identical sums whatever order the threads ran in.
ROW_HEADER = r"""
#ifndef DEVICE_FN
#define DEVICE_FN inline
#endif

// Sums of the K per-thread partials v[0..K) over the threadgroup (a multiple of 32 threads,
// at most 1024); every thread gets the totals back in v. scratch: a threadgroup float array
// of 32 * K declared in the body (Metal allows threadgroup memory only there, hence a macro).
// Needs the preamble's lane, simd and simds.
#define THREADGROUP_SUMS(K, v, scratch)                                           \
  do {                                                                            \
    for (int k_ = 0; k_ < (K); ++k_) {                                            \
      v[k_] = simd_sum(v[k_]);                                                    \
    }                                                                             \
    if (lane == 0) {                                                              \
      for (int k_ = 0; k_ < (K); ++k_) {                                          \
        scratch[k_ * 32 + simd] = v[k_];                                          \
      }                                                                           \
    }                                                                             \
    threadgroup_barrier(mem_flags::mem_threadgroup);                              \
    for (int k_ = 0; k_ < (K); ++k_) {                                            \
      float total_ = 0.0f;                                                        \
      for (uint s_ = 0; s_ < simds; ++s_) {                                       \
        total_ += scratch[k_ * 32 + s_];                                          \
      }                                                                           \
      v[k_] = total_;                                                             \
    }                                                                             \
    /* scratch may be reused only once every thread has read it */                \
    threadgroup_barrier(mem_flags::mem_threadgroup);                              \
  } while (0)

// This thread's share of the sum of squares of a row of `width` elements.
template <typename P>
DEVICE_FN float sum_squares(P row, uint tid, uint threads, uint width) {
  float total = 0.0f;
  for (uint d = tid; d < width; d += threads) {
    float v = static_cast<float>(row[d]);
    total += v * v;
  }
  return total;
}

// Adds element d (value v) of a row to the AltUp router partials: acc[k] for the K router
// rows (the router norm weight folded in), acc[K] the sum of squares.
template <int K, typename P, typename Q>
DEVICE_FN void router_accumulate(thread float* acc, float v, P norm_w, Q router_w, uint d,
                                 uint width) {
  float u = v * static_cast<float>(norm_w[d]);
  for (int k = 0; k < K; ++k) {
    acc[k] += u * static_cast<float>(router_w[k * width + d]);
  }
  acc[K] += v * v;
}

// AltUp router: tanh of the K router dot products of the RMS-normed row, scaled.
template <int K>
DEVICE_FN void router_tanh(thread float* dots, float sum_sq, float width, float eps,
                           float scale) {
  float inv = metal::rsqrt(sum_sq / width + eps) * scale;
  for (int k = 0; k < K; ++k) {
    dots[k] = metal::precise::tanh(dots[k] * inv);
  }
}
"""

# The preamble every row body starts with: its row, its lane and the simdgroup layout.
ROW_PREAMBLE = """
  const uint row = threadgroup_position_in_grid.x;
  const uint tid = thread_position_in_threadgroup.x;
  const uint threads = threads_per_threadgroup.x;
  const uint lane = thread_index_in_simdgroup;
  const uint simd = simdgroup_index_in_threadgroup;
  const uint simds = (threads + 31) / 32;
"""



def row_preamble(streams: str) -> str:
    """ROW_PREAMBLE plus `rows` and `D` from the [n, rows, D] input `streams`, and `eps`, the
    first of the `params` input."""
    return ROW_PREAMBLE + f"""
  const uint rows = {streams}_shape[1];
  const uint D = {streams}_shape[2];
  const float eps = params[0];
"""


MAX_THREADS = 512


def row_threads(width: int) -> int:
    """Threads per row: enough for the width in multiples of 32, at most MAX_THREADS."""
    return min(MAX_THREADS, -(-width // 32) * 32)


@lru_cache(maxsize=64)
def scalars(*values: float) -> mx.array:
    """Float scalars for a kernel, as one small float32 input."""
    return mx.array(values, dtype=mx.float32)


def launch_rows(
    kernel,
    inputs: Sequence[mx.array],
    template: list,
    rows: int,
    width: int,
    output_shapes: Sequence[tuple],
    dtype: mx.Dtype,
) -> tuple:
    """Launch one threadgroup per row; all outputs in `dtype`."""
    threads = row_threads(width)
    return tuple(
        kernel(
            inputs=list(inputs),
            template=template,
            grid=(threads * rows, 1, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=list(output_shapes),
            output_dtypes=[dtype] * len(output_shapes),
        )
    )

"""Kernel (b), the end of a layer: the per-layer projection's RMSNorm added to every stream
but the first (which passes through unchanged)."""

from functools import lru_cache, partial

import mlx.core as mx
import numpy as np

from .base import FusedOp
from .rows import ROW_HEADER, launch_rows, row_preamble, scalars

SOURCE = (
    row_preamble("corrected")
    + r"""
  threadgroup float scratch[32];
  auto p_row = projected + row * D;

  float sq[1] = {sum_squares(p_row, tid, threads, D)};
  THREADGROUP_SUMS(1, sq, scratch);
  const float inv = metal::rsqrt(sq[0] / D + eps);
  for (uint d = tid; d < D; d += threads) {
    float ple = static_cast<float>(p_row[d]) * inv * static_cast<float>(norm_w[d]);
    streams[row * D + d] = corrected[row * D + d];
    for (int j = 1; j < N; ++j) {
      size_t at = (j * rows + row) * D + d;
      streams[at] = static_cast<T>(static_cast<float>(corrected[at]) + ple);
    }
  }
"""
)


@lru_cache(maxsize=None)
def _rest(n: int) -> mx.array:
    """[n, 1, 1, 1]: whether a stream takes the projection (all but the first). Made from
    numpy, so it holds data and any thread may use it."""
    return mx.array((np.arange(n) > 0).reshape(n, 1, 1, 1))


# One fused pass writing the n streams once (a prefill chunk: a concatenation after the
# addition wrote them one and a half times more, in two launches).
@partial(mx.compile, shapeless=True)
def _add_to_rest(corrected: mx.array, ple: mx.array, rest: mx.array) -> mx.array:
    return mx.where(rest, corrected + ple, corrected)


def reference(corrected: mx.array, projected: mx.array, norm_w: mx.array, eps: float):
    ple = mx.fast.rms_norm(projected, norm_w, eps)
    return (_add_to_rest(corrected, ple, _rest(corrected.shape[0])),)


def launch(kernel, corrected: mx.array, projected: mx.array, norm_w: mx.array, eps: float):
    n, d = corrected.shape[0], corrected.shape[-1]
    rows = projected.size // d
    (streams,) = launch_rows(
        kernel,
        [corrected.reshape(n, rows, d), projected, norm_w, scalars(eps)],
        [("T", corrected.dtype), ("N", n)],
        rows,
        d,
        [(n, rows, d)],
        corrected.dtype,
    )
    return (streams.reshape(corrected.shape),)


def sample(dtype: mx.Dtype, rows=3, d=40, n=4, seed=4) -> tuple:
    """Random arguments; the defaults are the self-check's small ragged case."""
    k = mx.random.split(mx.random.key(seed), 3)
    return (
        mx.random.normal((n, 1, rows, d), key=k[0]).astype(dtype),
        mx.random.normal((1, rows, d), key=k[1]).astype(dtype),
        (1 + 0.1 * mx.random.normal((d,), key=k[2])).astype(dtype),
        1e-6,
    )


ple_residual = FusedOp(
    "ple_residual",
    ["corrected", "projected", "norm_w", "params"],
    ["streams"],
    SOURCE,
    launch,
    reference,
    sample,
    header=ROW_HEADER,
)

"""Kernel (a): AltUp predict, one threadgroup per token, plus the layer's input RMSNorm.

router RMSNorm of the active stream, the 1/D scale, the D->n router matvec and tanh, the
n->n*n coefficient matvec with clipping, the n x n stream mix plus residual; then the input
layernorm of the active prediction (what attention and LAuReL read), as a second output.

With RESIDUAL, the streams come in without the previous layer's last step (kernels/
ple_residual.py: its per-layer projection, RMS-normed, added to every stream but the first),
which is applied here as the streams are read: one launch fewer per layer."""

import math
from typing import Optional

import mlx.core as mx

from . import ple_residual
from .base import FusedOp
from .rows import ROW_HEADER, launch_rows, row_preamble, scalars

SOURCE = (
    row_preamble("streams")
    + r"""
  const float clip = params[1];
  threadgroup float scratch[32 * (N + 1)];

  // the previous layer's normed per-layer projection at d (0 without RESIDUAL), and stream i
  // at d with it added (streams 1.. only)
  auto p_row = projected + row * D;
  float ple_inv = 0.0f;
  if (RESIDUAL) {
    float p_sq[1] = {sum_squares(p_row, tid, threads, D)};
    THREADGROUP_SUMS(1, p_sq, scratch);
    ple_inv = metal::rsqrt(p_sq[0] / D + params[2]);
  }
#define PLE(d) \
  (RESIDUAL ? static_cast<float>(p_row[d]) * ple_inv * static_cast<float>(ple_norm_w[d]) : 0.0f)
#define STREAM(i, d, ple) \
  (static_cast<float>(streams[((i) * rows + row) * D + (d)]) + ((i) > 0 ? (ple) : 0.0f))

  // router dot products of the active stream (norm weight folded in) and its sum of squares
  float acc[N + 1] = {0.0f};
  for (uint d = tid; d < D; d += threads) {
    router_accumulate<N>(acc, STREAM(A, d, PLE(d)), router_norm_w, router_w, d, D);
  }
  THREADGROUP_SUMS(N + 1, acc, scratch);
  router_tanh<N>(acc, acc[N], D, eps, 1.0f / D);

  // coef[j * N + i]: weight of stream i in prediction j
  float coef[N * N];
  for (int o = 0; o < N * N; ++o) {
    float c = 0.0f;
    for (int k = 0; k < N; ++k) {
      c += acc[k] * metal::clamp(static_cast<float>(pred_w[o * N + k]), -clip, clip);
    }
    coef[o] = c;
  }

  float sum_sq[1] = {0.0f};
  for (uint d = tid; d < D; d += threads) {
    float ple = PLE(d);
    float s[N];
    for (int i = 0; i < N; ++i) {
      s[i] = STREAM(i, d, ple);
    }
    for (int j = 0; j < N; ++j) {
      float p = s[j];
      for (int i = 0; i < N; ++i) {
        p += coef[j * N + i] * s[i];
      }
      predictions[(j * rows + row) * D + d] = static_cast<T>(p);
      if (j == A) {
        sum_sq[0] += p * p;
      }
    }
  }
  THREADGROUP_SUMS(1, sum_sq, scratch);

  // the input norm reads the active prediction in float, recomputed rather than re-read
  float inv = metal::rsqrt(sum_sq[0] / D + eps);
  for (uint d = tid; d < D; d += threads) {
    float ple = PLE(d);
    float p = STREAM(A, d, ple);
    for (int i = 0; i < N; ++i) {
      p += coef[A * N + i] * STREAM(i, d, ple);
    }
    normed[row * D + d] = static_cast<T>(p * inv * static_cast<float>(input_norm_w[d]));
  }
#undef PLE
#undef STREAM
"""
)


def clipped(w: mx.array, clip: Optional[float]) -> mx.array:
    return w if clip is None else mx.clip(w, -clip, clip)


def router_modalities(
    x: mx.array, norm_w: mx.array, router_w: mx.array, eps: float
) -> mx.array:
    """tanh(router(RMSNorm(x) / D)): the AltUp router's view of a stream, [..., n]."""
    return mx.tanh((mx.fast.rms_norm(x, norm_w, eps) * x.shape[-1] ** -1.0) @ router_w.T)


def reference(streams, router_norm_w, router_w, pred_w, input_norm_w, eps, clip, active,
              projected=None, ple_norm_w=None, ple_eps=None):
    if projected is not None:
        (streams,) = ple_residual.reference(streams, projected, ple_norm_w, ple_eps)
    n = streams.shape[0]
    modalities = router_modalities(streams[active], router_norm_w, router_w, eps)
    coefs = modalities @ clipped(pred_w, clip).T
    coefs = coefs.reshape(*modalities.shape[:-1], n, n).swapaxes(-1, -2)
    mixed = mx.matmul(streams.transpose(1, 2, 3, 0), coefs).transpose(3, 0, 1, 2)
    predictions = mixed + streams
    return predictions, mx.fast.rms_norm(predictions[active], input_norm_w, eps)


def launch(kernel, streams, router_norm_w, router_w, pred_w, input_norm_w, eps, clip, active,
           projected=None, ple_norm_w=None, ple_eps=None):
    n, d = streams.shape[0], streams.shape[-1]
    rows = streams.size // (n * d)
    clip = math.inf if clip is None else clip
    residual = projected is not None
    predictions, normed = launch_rows(
        kernel,
        # without a residual its two inputs are never read: any arrays will do
        [streams.reshape(n, rows, d), router_norm_w, router_w, pred_w, input_norm_w,
         projected if residual else input_norm_w, ple_norm_w if residual else input_norm_w,
         scalars(eps, clip, ple_eps if residual else 0.0)],
        [("T", streams.dtype), ("N", n), ("A", active), ("RESIDUAL", residual)],
        rows,
        d,
        [(n, rows, d), (rows, d)],
        streams.dtype,
    )
    return predictions.reshape(streams.shape), normed.reshape(streams.shape[1:])


def sample(dtype: mx.Dtype, rows=3, d=40, n=4, active=0, clip=0.5, residual=True,
           seed=0) -> tuple:
    """Random arguments; the defaults are the self-check's small ragged case (with the
    previous layer's residual, as on every layer but the first)."""
    k = mx.random.split(mx.random.key(seed), 7)
    extra = (
        mx.random.normal((1, rows, d), key=k[5]).astype(dtype),
        (1 + 0.1 * mx.random.normal((d,), key=k[6])).astype(dtype),
        1e-6,
    )
    return (
        mx.random.normal((n, 1, rows, d), key=k[0]).astype(dtype),
        (1 + 0.1 * mx.random.normal((d,), key=k[1])).astype(dtype),
        mx.random.normal((n, d), key=k[2]).astype(dtype),
        mx.random.normal((n * n, n), key=k[3]).astype(dtype),
        (1 + 0.1 * mx.random.normal((d,), key=k[4])).astype(dtype),
        1e-6,
        clip,
        active,
        *(extra if residual else ()),
    )


altup_predict = FusedOp(
    "altup_predict",
    ["streams", "router_norm_w", "router_w", "pred_w", "input_norm_w", "projected",
     "ple_norm_w", "params"],
    ["predictions", "normed"],
    SOURCE,
    launch,
    reference,
    sample,
    header=ROW_HEADER,
)

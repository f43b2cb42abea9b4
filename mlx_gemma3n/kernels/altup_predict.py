"""Kernel (a): AltUp predict, one threadgroup per token, plus the layer's input RMSNorm.

router RMSNorm of the active stream, the 1/D scale, the D->n router matvec and tanh, the
n->n*n coefficient matvec with clipping, the n x n stream mix plus residual; then the input
layernorm of the active prediction (what attention and LAuReL read), as a second output."""

import math
from typing import Optional

import mlx.core as mx

from .base import FusedOp
from .rows import ROW_HEADER, launch_rows, row_preamble, scalars

SOURCE = (
    row_preamble("streams")
    + r"""
  const float clip = params[1];
  threadgroup float scratch[32 * (N + 1)];

  // router dot products of the active stream (norm weight folded in) and its sum of squares
  auto x = streams + (A * rows + row) * D;
  float acc[N + 1] = {0.0f};
  for (uint d = tid; d < D; d += threads) {
    router_accumulate<N>(acc, static_cast<float>(x[d]), router_norm_w, router_w, d, D);
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
    float s[N];
    for (int i = 0; i < N; ++i) {
      s[i] = static_cast<float>(streams[(i * rows + row) * D + d]);
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
    float p = static_cast<float>(streams[(A * rows + row) * D + d]);
    for (int i = 0; i < N; ++i) {
      p += coef[A * N + i] * static_cast<float>(streams[(i * rows + row) * D + d]);
    }
    normed[row * D + d] = static_cast<T>(p * inv * static_cast<float>(input_norm_w[d]));
  }
"""
)


def clipped(w: mx.array, clip: Optional[float]) -> mx.array:
    return w if clip is None else mx.clip(w, -clip, clip)


def router_modalities(
    x: mx.array, norm_w: mx.array, router_w: mx.array, eps: float
) -> mx.array:
    """tanh(router(RMSNorm(x) / D)): the AltUp router's view of a stream, [..., n]."""
    return mx.tanh((mx.fast.rms_norm(x, norm_w, eps) * x.shape[-1] ** -1.0) @ router_w.T)


def reference(streams, router_norm_w, router_w, pred_w, input_norm_w, eps, clip, active):
    n = streams.shape[0]
    modalities = router_modalities(streams[active], router_norm_w, router_w, eps)
    coefs = modalities @ clipped(pred_w, clip).T
    coefs = coefs.reshape(*modalities.shape[:-1], n, n).swapaxes(-1, -2)
    mixed = mx.matmul(streams.transpose(1, 2, 3, 0), coefs).transpose(3, 0, 1, 2)
    predictions = mixed + streams
    return predictions, mx.fast.rms_norm(predictions[active], input_norm_w, eps)


def launch(kernel, streams, router_norm_w, router_w, pred_w, input_norm_w, eps, clip, active):
    n, d = streams.shape[0], streams.shape[-1]
    rows = streams.size // (n * d)
    clip = math.inf if clip is None else clip
    predictions, normed = launch_rows(
        kernel,
        [streams.reshape(n, rows, d), router_norm_w, router_w, pred_w, input_norm_w,
         scalars(eps, clip)],
        [("T", streams.dtype), ("N", n), ("A", active)],
        rows,
        d,
        [(n, rows, d), (rows, d)],
        streams.dtype,
    )
    return predictions.reshape(streams.shape), normed.reshape(streams.shape[1:])


def sample(dtype: mx.Dtype, rows=3, d=40, n=4, active=0, clip=0.5, seed=0) -> tuple:
    """Random arguments; the defaults are the self-check's small ragged case."""
    k = mx.random.split(mx.random.key(seed), 5)
    return (
        mx.random.normal((n, 1, rows, d), key=k[0]).astype(dtype),
        (1 + 0.1 * mx.random.normal((d,), key=k[1])).astype(dtype),
        mx.random.normal((n, d), key=k[2]).astype(dtype),
        mx.random.normal((n * n, n), key=k[3]).astype(dtype),
        (1 + 0.1 * mx.random.normal((d,), key=k[4])).astype(dtype),
        1e-6,
        clip,
        active,
    )


altup_predict = FusedOp(
    "altup_predict",
    ["streams", "router_norm_w", "router_w", "pred_w", "input_norm_w", "params"],
    ["predictions", "normed"],
    SOURCE,
    launch,
    reference,
    sample,
    header=ROW_HEADER,
)

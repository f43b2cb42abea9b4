"""Kernel (b), after the FFN: post-FFN norm + residual, AltUp correct, correct_output_scale.

One threadgroup per token: h2 = h + RMSNorm(ffn_out); the router reads h2; every stream
gets the innovation h2 - prediction[active] times its coefficient (+1). Outputs the corrected
streams and the scaled active stream that feeds the per-layer-input gate."""

import math

import mlx.core as mx

from .altup_predict import clipped, router_modalities
from .base import FusedOp
from .rows import ROW_HEADER, launch_rows, row_preamble, scalars

SOURCE = (
    row_preamble("predictions")
    + r"""
  const float clip = params[1];
  threadgroup float scratch[32 * (N + 1)];
  auto h_row = h + row * D;
  auto f_row = ffn_out + row * D;

  float f_sq[1] = {sum_squares(f_row, tid, threads, D)};
  THREADGROUP_SUMS(1, f_sq, scratch);
  const float f_inv = metal::rsqrt(f_sq[0] / D + eps);

  // h2 = h + RMSNorm(ffn_out) at d, in float
#define H2(d) \
  (static_cast<float>(h_row[d]) + \
   static_cast<float>(f_row[d]) * f_inv * static_cast<float>(post_ffn_norm_w[d]))

  // router dot products of h2 (router norm weight folded in) and its sum of squares
  float acc[N + 1] = {0.0f};
  for (uint d = tid; d < D; d += threads) {
    router_accumulate<N>(acc, H2(d), router_norm_w, router_w, d, D);
  }
  THREADGROUP_SUMS(N + 1, acc, scratch);
  router_tanh<N>(acc, acc[N], D, eps, 1.0f / D);

  float coef[N];
  for (int j = 0; j < N; ++j) {
    float c = 1.0f;
    for (int k = 0; k < N; ++k) {
      c += acc[k] * metal::clamp(static_cast<float>(corr_w[j * N + k]), -clip, clip);
    }
    coef[j] = c;
  }

  for (uint d = tid; d < D; d += threads) {
    float innovation = H2(d) - static_cast<float>(predictions[(A * rows + row) * D + d]);
    for (int j = 0; j < N; ++j) {
      float c = static_cast<float>(predictions[(j * rows + row) * D + d]) + coef[j] * innovation;
      corrected[(j * rows + row) * D + d] = static_cast<T>(c);
      if (j == A) {
        float scale = SCALED ? static_cast<float>(out_scale[d]) : 1.0f;
        active_out[row * D + d] = static_cast<T>(c * scale);
      }
    }
  }
#undef H2
"""
)


def reference(
    predictions, h, ffn_out, post_ffn_norm_w, router_norm_w, router_w, corr_w, out_scale,
    eps, clip, active, scaled,
):
    h = h + mx.fast.rms_norm(ffn_out, post_ffn_norm_w, eps)
    modalities = router_modalities(h, router_norm_w, router_w, eps)
    innovation = h - predictions[active]
    coefs = modalities @ clipped(corr_w, clip).T + 1.0
    corrected = innovation[None] * coefs.transpose(2, 0, 1)[..., None] + predictions
    first = corrected[active]
    return corrected, first * out_scale if scaled else first


def launch(
    kernel, predictions, h, ffn_out, post_ffn_norm_w, router_norm_w, router_w, corr_w,
    out_scale, eps, clip, active, scaled,
):
    n, d = predictions.shape[0], predictions.shape[-1]
    rows = h.size // d
    clip = math.inf if clip is None else clip
    corrected, first = launch_rows(
        kernel,
        [predictions.reshape(n, rows, d), h, ffn_out, post_ffn_norm_w, router_norm_w,
         router_w, corr_w, out_scale, scalars(eps, clip)],
        [("T", predictions.dtype), ("N", n), ("A", active), ("SCALED", scaled)],
        rows,
        d,
        [(n, rows, d), (rows, d)],
        predictions.dtype,
    )
    return corrected.reshape(predictions.shape), first.reshape(h.shape)


def sample(
    dtype: mx.Dtype, rows=3, d=40, n=4, active=0, clip=0.5, scaled=True, seed=1
) -> tuple:
    """Random arguments; the defaults are the self-check's small ragged case."""
    k = mx.random.split(mx.random.key(seed), 8)
    shape = (1, rows, d)

    def norm_w(key):
        return (1 + 0.1 * mx.random.normal((d,), key=key)).astype(dtype)

    return (
        mx.random.normal((n, *shape), key=k[0]).astype(dtype),
        mx.random.normal(shape, key=k[1]).astype(dtype),
        mx.random.normal(shape, key=k[2]).astype(dtype),
        norm_w(k[3]),
        norm_w(k[4]),
        mx.random.normal((n, d), key=k[5]).astype(dtype),
        mx.random.normal((n, n), key=k[6]).astype(dtype),
        norm_w(k[7]),
        1e-6,
        clip,
        active,
        scaled,
    )


altup_correct = FusedOp(
    "altup_correct",
    ["predictions", "h", "ffn_out", "post_ffn_norm_w", "router_norm_w", "router_w", "corr_w",
     "out_scale", "params"],
    ["corrected", "active_out"],
    SOURCE,
    launch,
    reference,
    sample,
    header=ROW_HEADER,
)

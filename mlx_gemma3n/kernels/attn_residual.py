"""Kernel (b), after attention: post-attention norm + residual, LAuReL's post-norm and
residual, (h + laurel) / sqrt(2), and the pre-FFN norm; two outputs, the new residual h and
its normed copy (what the FFN reads), like mlx-lm's norm_add_norm."""

import mlx.core as mx

from .base import FusedOp
from .rows import ROW_HEADER, launch_rows, row_preamble, scalars

SOURCE = (
    row_preamble("predictions")
    + r"""
  threadgroup float scratch[32 * 2];
  auto a_row = attn + row * D;
  auto l_row = laurel_lr + row * D;
  auto x_row = predictions + (A * rows + row) * D;
  auto n_row = normed + row * D;

  float sq[2] = {sum_squares(a_row, tid, threads, D), sum_squares(l_row, tid, threads, D)};
  THREADGROUP_SUMS(2, sq, scratch);
  const float a_inv = metal::rsqrt(sq[0] / D + eps);
  const float l_inv = metal::rsqrt(sq[1] / D + eps);

  // the new residual h at d, in float
#define RESIDUAL(d) \
  ((static_cast<float>(x_row[d]) + \
    static_cast<float>(a_row[d]) * a_inv * static_cast<float>(post_attn_norm_w[d]) + \
    static_cast<float>(n_row[d]) + \
    static_cast<float>(l_row[d]) * l_inv * static_cast<float>(post_laurel_norm_w[d])) * \
   0.70710678118654752f)
  float h_sq[1] = {0.0f};
  for (uint d = tid; d < D; d += threads) {
    float v = RESIDUAL(d);
    h[row * D + d] = static_cast<T>(v);
    h_sq[0] += v * v;
  }
  THREADGROUP_SUMS(1, h_sq, scratch);
  const float h_inv = metal::rsqrt(h_sq[0] / D + eps);
  for (uint d = tid; d < D; d += threads) {
    h_normed[row * D + d] =
        static_cast<T>(RESIDUAL(d) * h_inv * static_cast<float>(pre_ffn_norm_w[d]));
  }
#undef RESIDUAL
"""
)


def reference(
    attn, laurel_lr, predictions, normed, post_attn_norm_w, post_laurel_norm_w,
    pre_ffn_norm_w, eps, active,
):
    laurel = normed + mx.fast.rms_norm(laurel_lr, post_laurel_norm_w, eps)
    h = predictions[active] + mx.fast.rms_norm(attn, post_attn_norm_w, eps)
    h = (h + laurel) * (2**-0.5)
    return h, mx.fast.rms_norm(h, pre_ffn_norm_w, eps)


def launch(
    kernel, attn, laurel_lr, predictions, normed, post_attn_norm_w, post_laurel_norm_w,
    pre_ffn_norm_w, eps, active,
):
    d = attn.shape[-1]
    rows = attn.size // d
    h, h_normed = launch_rows(
        kernel,
        [attn, laurel_lr, predictions.reshape(-1, rows, d), normed, post_attn_norm_w,
         post_laurel_norm_w, pre_ffn_norm_w, scalars(eps)],
        [("T", attn.dtype), ("A", active)],
        rows,
        d,
        [(rows, d), (rows, d)],
        attn.dtype,
    )
    return h.reshape(attn.shape), h_normed.reshape(attn.shape)


def sample(dtype: mx.Dtype, rows=3, d=40, n=4, active=1, seed=2) -> tuple:
    """Random arguments; the defaults are the self-check's small ragged case."""
    k = mx.random.split(mx.random.key(seed), 7)
    attn, lr, normed = (mx.random.normal((1, rows, d), key=key).astype(dtype) for key in k[:3])
    predictions = mx.random.normal((n, 1, rows, d), key=k[3]).astype(dtype)
    norms = [(1 + 0.1 * mx.random.normal((d,), key=key)).astype(dtype) for key in k[4:]]
    return (attn, lr, predictions, normed, *norms, 1e-6, active)


attn_residual = FusedOp(
    "attn_residual",
    ["attn", "laurel_lr", "predictions", "normed", "post_attn_norm_w", "post_laurel_norm_w",
     "pre_ffn_norm_w", "params"],
    ["h", "h_normed"],
    SOURCE,
    launch,
    reference,
    sample,
    header=ROW_HEADER,
)

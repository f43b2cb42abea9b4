"""AltUp stream entry and exit, once per forward pass, one threadgroup per token.

Entry: the embedding is stream 0; streams 1..3 are its three projections rescaled to its
RMS. Exit: streams 1..3's projections rescaled to stream 0's RMS, the four averaged and
RMS-normed (the decoder's final norm). Four streams, as every released Gemma 3n has; the
model keeps the reference ops otherwise."""

import mlx.core as mx

from .base import FusedOp
from .rows import ROW_HEADER, ROW_PREAMBLE, launch_rows, scalars

STREAMS = 4

# Shared start of both bodies: `target` (the RMS of row x) and the rescale factor of each
# projection, target / sqrt(max(mean(p^2), 1e-5)).
_RESCALE = r"""
  threadgroup float scratch[32 * 4];
  auto p1_row = p1 + row * D;
  auto p2_row = p2 + row * D;
  auto p3_row = p3 + row * D;
  float sq[4] = {sum_squares(x_row, tid, threads, D), sum_squares(p1_row, tid, threads, D),
                 sum_squares(p2_row, tid, threads, D), sum_squares(p3_row, tid, threads, D)};
  THREADGROUP_SUMS(4, sq, scratch);
  const float target = metal::sqrt(sq[0] / D);
  float rescale[4];
  for (int k = 1; k < 4; ++k) {
    rescale[k] = target / metal::sqrt(metal::max(sq[k] / D, 1e-5f));
  }
"""

EMBED_SOURCE = (
    ROW_PREAMBLE
    + r"""
  const uint rows = p1_shape[0];
  const uint D = p1_shape[1];
  auto x_row = x + row * D;
"""
    + _RESCALE
    + r"""
  for (uint d = tid; d < D; d += threads) {
    streams[row * D + d] = x_row[d];
    streams[(rows + row) * D + d] = static_cast<T>(static_cast<float>(p1_row[d]) * rescale[1]);
    streams[(2 * rows + row) * D + d] =
        static_cast<T>(static_cast<float>(p2_row[d]) * rescale[2]);
    streams[(3 * rows + row) * D + d] =
        static_cast<T>(static_cast<float>(p3_row[d]) * rescale[3]);
  }
"""
)

UNEMBED_SOURCE = (
    ROW_PREAMBLE
    + r"""
  const uint D = p1_shape[1];
  auto x_row = streams + row * D;
"""
    + _RESCALE
    + r"""
  const float eps = params[0];
#define MEAN(d)                                                        \
  (0.25f * (static_cast<float>(x_row[d]) +                             \
            static_cast<float>(p1_row[d]) * rescale[1] +               \
            static_cast<float>(p2_row[d]) * rescale[2] +               \
            static_cast<float>(p3_row[d]) * rescale[3]))
  float mean_sq[1] = {0.0f};
  for (uint d = tid; d < D; d += threads) {
    float m = MEAN(d);
    mean_sq[0] += m * m;
  }
  THREADGROUP_SUMS(1, mean_sq, scratch);
  const float inv = metal::rsqrt(mean_sq[0] / D + eps);
  for (uint d = tid; d < D; d += threads) {
    out[row * D + d] = static_cast<T>(MEAN(d) * inv * static_cast<float>(norm_w[d]));
  }
#undef MEAN
"""
)


def _rms(x: mx.array) -> mx.array:
    return mx.sqrt(mx.mean(x * x, axis=-1, keepdims=True))


def _match_magnitude(x: mx.array, target: mx.array) -> mx.array:
    """Rescale x to the per-token RMS `target`."""
    rms = mx.sqrt(mx.maximum(mx.mean(x * x, axis=-1, keepdims=True), 1e-5))
    return x * target / rms


def embed_reference(x, *projected):
    """x: [B, L, D] and its projections -> the streams, [1 + len(projected), B, L, D]."""
    target = _rms(x)
    return (mx.stack([x] + [_match_magnitude(p, target) for p in projected], axis=0),)


def unembed_reference(streams, norm_w, eps, *projected):
    """The final normed hidden state from the streams [n, B, L, D] and the projections of
    streams 1.. ."""
    h0 = streams[0]
    target = _rms(h0)
    mixed = mx.stack([h0] + [_match_magnitude(p, target) for p in projected], axis=0)
    return (mx.fast.rms_norm(mx.mean(mixed, axis=0), norm_w, eps),)


def _flat(*rows_of: mx.array) -> list:
    """Each array as [tokens, D]."""
    return [a.reshape(-1, a.shape[-1]) for a in rows_of]


def embed_launch(kernel, x, *projected):
    inputs = _flat(x, *projected)
    rows, d = inputs[0].shape
    (streams,) = launch_rows(
        kernel, inputs, [("T", x.dtype)], rows, d, [(STREAMS, rows, d)], x.dtype
    )
    return (streams.reshape(STREAMS, *x.shape),)


def unembed_launch(kernel, streams, norm_w, eps, *projected):
    inputs = _flat(*projected)
    rows, d = inputs[0].shape
    (out,) = launch_rows(
        kernel,
        [streams.reshape(STREAMS, rows, d), *inputs, norm_w, scalars(eps)],
        [("T", streams.dtype)],
        rows,
        d,
        [(rows, d)],
        streams.dtype,
    )
    return (out.reshape(projected[0].shape),)


def _sample(dtype: mx.Dtype, rows: int, d: int, seed: int) -> list:
    k = mx.random.split(mx.random.key(seed), 4)
    scales = (1.0, 0.5, 2.0, 0.1)  # streams of different magnitudes
    return [(s * mx.random.normal((1, rows, d), key=key)).astype(dtype) for s, key in zip(scales, k)]


def embed_sample(dtype: mx.Dtype, rows=3, d=40, seed=5) -> tuple:
    """Random arguments; the defaults are the self-check's small ragged case."""
    return tuple(_sample(dtype, rows, d, seed))


def unembed_sample(dtype: mx.Dtype, rows=3, d=40, seed=6) -> tuple:
    """Random arguments; the defaults are the self-check's small ragged case."""
    x, p1, p2, p3 = _sample(dtype, rows, d, seed)
    streams = mx.stack([x, p3, p2, p1], axis=0)
    norm_w = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(seed + 1))).astype(dtype)
    return (streams, norm_w, 1e-6, p1, p2, p3)


altup_embed = FusedOp(
    "altup_embed", ["x", "p1", "p2", "p3"], ["streams"], EMBED_SOURCE,
    embed_launch, embed_reference, embed_sample, header=ROW_HEADER,
)
altup_unembed = FusedOp(
    "altup_unembed", ["streams", "p1", "p2", "p3", "norm_w", "params"], ["out"], UNEMBED_SOURCE,
    unembed_launch, unembed_reference, unembed_sample, header=ROW_HEADER,
)

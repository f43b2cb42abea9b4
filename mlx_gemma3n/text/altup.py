"""AltUp (Alternating Updates): several residual streams, one of which the layer computes;
the others are predicted before the layer and corrected after it.

The op sequences live beside their fused kernels in `mlx_gemma3n.kernels`; `fused` picks
the kernel where one can run."""

import mlx.core as mx
import mlx.nn as nn

from ..kernels.altup_correct import altup_correct
from ..kernels.altup_predict import altup_predict
from .config import TextConfig
from .norm import RMSNorm


def dense_weight(linear: nn.Module) -> mx.array:
    """The float weight of a linear or embedding layer, dequantized when a checkpoint stored
    it quantized (any MLX quantized layer: weight, scales, biases, group_size, bits, mode)."""
    if "scales" in linear:
        return mx.dequantize(
            linear.weight,
            linear.scales,
            linear.get("biases"),
            group_size=linear.group_size,
            bits=linear.bits,
            mode=linear.mode,
        )
    return linear.weight


class AltUp(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        n, d = config.altup_num_inputs, config.hidden_size
        self.num_inputs = n
        self.active = config.altup_active_idx
        self.coef_clip = config.altup_coef_clip
        self.eps = config.rms_norm_eps
        self.correct_output_scale = mx.zeros((d,))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(d, n, bias=False)
        self.router_norm = RMSNorm(d, config.rms_norm_eps)

    def fuse_projections(self) -> None:
        """At load (text/concat.fuse_projections): a router stored quantized is dequantized
        once here, so that predict and correct do not each dequantize it on every token; the
        coefficient maps are clipped once here, not on every call (clipping is idempotent)."""
        if isinstance(self.modality_router, nn.QuantizedLinear):
            weight = dense_weight(self.modality_router)
            self.modality_router = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            self.modality_router.weight = weight
        if self.coef_clip is not None:
            for coefs in (self.prediction_coefs, self.correction_coefs):
                coefs.weight = mx.clip(coefs.weight, -self.coef_clip, self.coef_clip)
            self.coef_clip = None

    def predict(self, streams: mx.array, input_norm: RMSNorm, fused: bool, residual=()):
        """streams: [n, B, L, D] -> (predicted streams, `input_norm` of the active one).
        `residual`: the previous layer's (per-layer projection, its norm weight, eps) when
        that layer left it to be added to streams 1.. here."""
        return altup_predict(
            streams,
            self.router_norm.weight,
            dense_weight(self.modality_router),
            self.prediction_coefs.weight,
            input_norm.weight,
            self.eps,
            self.coef_clip,
            self.active,
            *residual,
            enabled=fused,
        )

    def correct(
        self,
        predictions: mx.array,
        h: mx.array,
        ffn_out: mx.array,
        post_ffn_norm: RMSNorm,
        scaled: bool,
        fused: bool,
    ):
        """Propagate the computed stream's innovation (h + post_ffn_norm(ffn_out), the
        layer's output) to every stream. Returns (corrected streams, the corrected active
        stream, times correct_output_scale when `scaled`)."""
        return altup_correct(
            predictions,
            h,
            ffn_out,
            post_ffn_norm.weight,
            self.router_norm.weight,
            dense_weight(self.modality_router),
            self.correction_coefs.weight,
            self.correct_output_scale,
            self.eps,
            self.coef_clip,
            self.active,
            scaled,
            enabled=fused,
        )

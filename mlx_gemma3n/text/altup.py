"""AltUp (Alternating Updates): several residual streams, one of which the layer computes;
the others are predicted before the layer and corrected after it."""

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .norm import RMSNorm


class AltUp(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        n, d = config.altup_num_inputs, config.hidden_size
        self.num_inputs = n
        self.active = config.altup_active_idx
        self.coef_clip = config.altup_coef_clip
        self.correct_output_scale = mx.zeros((d,))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(d, n, bias=False)
        self.router_norm = RMSNorm(d, config.rms_norm_eps)
        self._router_input_scale = d**-1.0

    def _coefs(self, linear: nn.Linear, modalities: mx.array) -> mx.array:
        w = linear.weight
        if self.coef_clip is not None:
            w = mx.clip(w, -self.coef_clip, self.coef_clip)
        return modalities @ w.T

    def router_modalities(self, x: mx.array) -> mx.array:
        return mx.tanh(self.modality_router(self.router_norm(x) * self._router_input_scale))

    def predict(self, streams: mx.array) -> mx.array:
        """streams: [n, B, L, D] -> predicted streams, same shape."""
        n = self.num_inputs
        modalities = self.router_modalities(streams[self.active])
        coefs = self._coefs(self.prediction_coefs, modalities)
        coefs = coefs.reshape(*modalities.shape[:-1], n, n).swapaxes(-1, -2)
        mixed = mx.matmul(streams.transpose(1, 2, 3, 0), coefs).transpose(3, 0, 1, 2)
        return mixed + streams

    def correct(self, predictions: mx.array, activated: mx.array) -> mx.array:
        """Propagate the computed stream's innovation to every stream."""
        modalities = self.router_modalities(activated)
        innovation = activated - predictions[self.active]
        coefs = self._coefs(self.correction_coefs, modalities) + 1.0
        return innovation[None] * coefs.transpose(2, 0, 1)[..., None] + predictions

    def scale_corrected_output(self, x: mx.array) -> mx.array:
        return x * self.correct_output_scale

"""Configuration of Gemma 3n's vision tower (MobileNet-V5 encoder + its multimodal embedder sizes)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VisionConfig:
    """Mirror of transformers' ``Gemma3nVisionConfig``.

    ``model_args`` holds the extra keyword arguments transformers passes to
    ``timm.create_model`` (e.g. ``{"channel_multiplier": 0.125}``); the encoder honours the
    ones that change the architecture (see ``mlx_gemma3n.vision.encoder.SUPPORTED_MODEL_ARGS``).
    """

    model_type: str = "gemma3n_vision"
    architecture: str = "mobilenetv5_300m_enc"
    hidden_size: int = 2048
    vocab_size: int = 128
    vocab_offset: int = 262_144
    rms_norm_eps: float = 1e-6
    do_pooling: bool = False
    model_args: dict[str, Any] | None = field(default=None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("model_args") is not None:
            kwargs["model_args"] = dict(kwargs["model_args"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

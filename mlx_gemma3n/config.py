"""Top-level Gemma 3n configuration built from an HF `config.json`, and E2B/E4B presets."""

import copy
from dataclasses import asdict, dataclass, field
from typing import Optional

from .checks import is_finite_number, is_int
from .text.config import TextConfig

SUPPORTED_MODEL_TYPES = ("gemma3n",)
# transformers' defaults for the fields the text side reads from the tower blocks
TOWER_DEFAULTS = {
    "vision_config": {"hidden_size": 2048, "vocab_size": 128, "vocab_offset": 262_144, "rms_norm_eps": 1e-6},
    "audio_config": {"hidden_size": 1536, "vocab_size": 128, "vocab_offset": 262_272, "rms_norm_eps": 1e-6},
}


@dataclass
class ModelConfig:
    """The whole model: text decoder config plus the raw tower blocks (parsed by each tower)."""

    text_config: TextConfig
    vision_config: Optional[dict] = None
    audio_config: Optional[dict] = None
    image_token_id: int = 262_145
    audio_token_id: int = 262_273
    boi_token_id: int = 255_999
    eoi_token_id: int = 262_144
    boa_token_id: int = 256_000
    eoa_token_id: int = 262_272
    vision_soft_tokens_per_image: int = 256
    audio_soft_tokens_per_image: int = 188
    quantization: Optional[dict] = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object, got a {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json "
                f"(expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        hf_quantization = d.get("quantization_config")
        method = hf_quantization.get("quant_method") if isinstance(hf_quantization, dict) else None
        if method is not None:
            raise ValueError(
                f"this checkpoint is quantized with {method!r} (a transformers quantization), which "
                "is not supported; use the unquantized checkpoint or an MLX conversion of it"
            )
        if not isinstance(d.get("text_config"), dict):
            raise ValueError("config.json has no text_config block (a JSON object)")
        kwargs = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in ("text_config", "raw")}
        for key, value in kwargs.items():
            _check_field(key, value)
        for key, defaults in TOWER_DEFAULTS.items():
            if kwargs.get(key) is not None:
                kwargs[key] = {**defaults, **kwargs[key]}
                for name in defaults:
                    _check_field(f"{key}.{name}", kwargs[key][name])
        return cls(text_config=TextConfig.from_dict(d["text_config"]), raw=copy.deepcopy(d), **kwargs)

    def to_dict(self) -> dict:
        """The HF-style dict this config was read from, with changes (text decoder shape,
        quantization, dropped towers) written back."""
        d = copy.deepcopy(self.raw)
        d.pop("quantization_config", None)  # mlx-lm's copy of `quantization`, rewritten below
        d["text_config"].update(asdict(self.text_config))
        for key in ("vision_config", "audio_config", "quantization"):
            if getattr(self, key) is None:
                d.pop(key, None)
            else:
                d[key] = copy.deepcopy(getattr(self, key))
        return d


def _check_field(name: str, value) -> None:
    """Top-level fields and the tower fields the text side reads: objects or numbers, by name."""
    if name in ("vision_config", "audio_config", "quantization"):
        ok, rule = value is None or isinstance(value, dict), "a JSON object or null"
    elif name.endswith("rms_norm_eps"):
        ok, rule = is_finite_number(value) and value > 0, "a positive number"
    else:  # token ids, soft-token counts, tower widths and vocabulary ranges
        ok, rule = is_int(value) and value >= 0, "an integer >= 0"
    if not ok:
        raise ValueError(f"config.json: {name} must be {rule}, got {value!r}")


def _preset(layers: int, intermediate: int, kv_shared: int) -> dict:
    return {
        "model_type": "gemma3n",
        "text_config": {
            "model_type": "gemma3n_text",
            "num_hidden_layers": layers,
            "intermediate_size": [intermediate] * layers,
            "num_kv_shared_layers": kv_shared,
            "activation_sparsity_pattern": [0.95] * 10 + [0.0] * (layers - 10),
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
        },
        "vision_config": {"model_type": "gemma3n_vision", "architecture": "mobilenetv5_300m_enc"},
        "audio_config": {"model_type": "gemma3n_audio"},
    }


# Shapes of the released checkpoints (google/gemma-3n-E2B-it, google/gemma-3n-E4B-it).
PRESETS = {
    "E2B": _preset(layers=30, intermediate=8192, kv_shared=10),
    "E4B": _preset(layers=35, intermediate=16384, kv_shared=15),
}

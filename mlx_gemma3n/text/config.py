"""Text decoder configuration, read from either checkpoint dialect."""

import inspect
from dataclasses import dataclass, field, fields
from typing import List, Optional

from ..checks import is_finite_number, is_int

SLIDING = "sliding_attention"
GLOBAL = "full_attention"


@dataclass
class TextConfig:
    """Gemma 3n text decoder hyper-parameters (defaults: E2B)."""

    vocab_size: int = 262_400
    vocab_size_per_layer_input: int = 262_144
    hidden_size: int = 2048
    hidden_size_per_layer_input: int = 256
    intermediate_size: List[int] = field(default_factory=lambda: [8192] * 30)
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: Optional[List[str]] = None
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    max_position_embeddings: int = 32_768
    final_logit_softcapping: Optional[float] = 30.0
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_coef_clip: Optional[float] = 120.0
    altup_correct_scale: bool = True
    laurel_rank: int = 64
    num_kv_shared_layers: int = 10
    activation_sparsity_pattern: Optional[List[float]] = None
    hidden_activation: str = "gelu_pytorch_tanh"
    # Written by our converter: down_proj of the activation-sparse layers is stored
    # transposed, [hidden, dims] (see text/transposed.py). HF checkpoints never set it.
    sparse_down_proj_transposed: bool = False

    def __post_init__(self):
        _check_scalars(self)
        n = self.num_hidden_layers
        if isinstance(self.intermediate_size, int):
            self.intermediate_size = [self.intermediate_size] * n
        if self.layer_types is None:
            self.layer_types = [GLOBAL if (i + 1) % 5 == 0 else SLIDING for i in range(n)]
        if self.activation_sparsity_pattern is None:
            self.activation_sparsity_pattern = [0.95] * min(10, n) + [0.0] * max(0, n - 10)
        elif isinstance(self.activation_sparsity_pattern, (int, float)):
            self.activation_sparsity_pattern = [float(self.activation_sparsity_pattern)] * n
        for name, ok, what in _LISTS:
            values = getattr(self, name)
            if not isinstance(values, list) or not all(ok(v) for v in values):
                raise ValueError(f"text_config.{name} must be a list of {what}, got {values!r}")
            if len(values) != n:
                raise ValueError(f"text_config.{name} has {len(values)} entries, expected one per layer ({n})")
        unknown = set(self.layer_types) - {SLIDING, GLOBAL}
        if unknown:
            raise ValueError(f"text_config.layer_types has unknown types {sorted(unknown)}")
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported hidden_activation {self.hidden_activation!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        """Build from an HF `text_config` block of either dialect: transformers-5 writes
        `rope_parameters` per layer type, 2025 checkpoints write `rope_theta` and
        `rope_local_base_freq`."""
        d = dict(d)
        rope = d.get("rope_parameters") or {}
        if GLOBAL in rope:
            d["rope_theta"] = rope[GLOBAL].get("rope_theta", cls.rope_theta)
            _check_default_rope(rope[GLOBAL])
        if SLIDING in rope:
            d["rope_local_base_freq"] = rope[SLIDING].get("rope_theta", cls.rope_local_base_freq)
            _check_default_rope(rope[SLIDING])
        if d.get("rope_scaling"):
            _check_default_rope(d["rope_scaling"])
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def cache_owner(self, kind: str) -> int:
        """The last non-shared layer of attention type `kind`: KV-shared layers of that type
        read its keys/values, and its cache decides that type's attention mask."""
        owners = [i for i in range(self.first_kv_shared_layer) if self.layer_types[i] == kind]
        if not owners:
            raise ValueError(f"no non-shared layer of type {kind} to share its KV cache")
        return owners[-1]

    def kv_source(self, layer: int) -> int:
        """The layer whose keys/values `layer` attends over: itself, or for a KV-shared layer
        the cache owner of its type."""
        if layer < self.first_kv_shared_layer:
            return layer
        return self.cache_owner(self.layer_types[layer])


def _check_default_rope(params: dict) -> None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"unsupported rope_type {kind!r} (only 'default' RoPE is implemented)")


# Fields that may be 0; every other integer field must be positive.
_MAY_BE_ZERO = {"altup_active_idx", "num_kv_shared_layers"}


_LISTS = (
    ("intermediate_size", lambda v: is_int(v) and v > 0, "positive integers"),
    ("layer_types", lambda v: isinstance(v, str), "strings"),
    ("activation_sparsity_pattern", lambda v: is_finite_number(v) and 0 <= v < 1, "numbers in [0, 1)"),
)


_SCALAR_RULES = {
    int: (is_int, "an integer"),
    float: (is_finite_number, "a finite number"),
    Optional[float]: (lambda v: v is None or is_finite_number(v), "a finite number or null"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _check_scalars(config: "TextConfig") -> None:
    """A config.json value of the wrong type fails here, by name, not deep inside the model."""
    for f in fields(config):
        value = getattr(config, f.name)
        ok, rule = _SCALAR_RULES.get(f.type, (lambda v: True, ""))
        if not ok(value):
            raise ValueError(f"text_config.{f.name} must be {rule}, got {value!r}")
        least = 0 if f.name in _MAY_BE_ZERO else 1
        if f.type is int and value < least:
            raise ValueError(f"text_config.{f.name} must be >= {least}, got {value}")

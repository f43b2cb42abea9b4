"""Audio encoder configuration (the `audio_config` block of a Gemma 3n config.json)."""

import dataclasses
from dataclasses import dataclass
from typing import Tuple


@dataclass
class AudioConfig:
    """USM Conformer hyper-parameters; defaults are Gemma 3n E2B's and E4B's (they share one)."""

    vocab_size: int = 128
    vocab_offset: int = 262_144 + 128  # text vocab, then the vision vocab, then ours
    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: Tuple[int, int] = (128, 32)
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: Tuple[Tuple[int, int], ...] = ((3, 3), (3, 3))
    sscp_conv_stride_size: Tuple[Tuple[int, int], ...] = ((2, 2), (2, 2))

    def __post_init__(self):
        # config.json stores these as nested lists; tuples keep the config hashable and comparable.
        self.sscp_conv_channel_size = tuple(self.sscp_conv_channel_size)
        self.sscp_conv_kernel_size = tuple(tuple(k) for k in self.sscp_conv_kernel_size)
        self.sscp_conv_stride_size = tuple(tuple(s) for s in self.sscp_conv_stride_size)
        if self.hidden_size % self.conf_num_attention_heads:
            raise ValueError(
                f"audio_config.hidden_size {self.hidden_size} is not divisible by "
                f"conf_num_attention_heads {self.conf_num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "AudioConfig":
        """Build from an HF `audio_config` dict, ignoring keys this port does not use."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

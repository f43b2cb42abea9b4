"""Audio input: file loading, log-mel features, the USM Conformer encoder and prompt helpers."""

from .config import AudioConfig
from .encoder import AudioEncoder
from .features import AudioFeatureExtractor
from .io import AudioError, load_audio
from .prompt import (
    AUDIO_SEQ_LENGTH,
    audio_placeholder_text,
    expand_audio_placeholders,
    num_audio_soft_tokens,
    pad_audio_features,
    split_audio,
)

__all__ = [
    "AUDIO_SEQ_LENGTH",
    "AudioConfig",
    "AudioEncoder",
    "AudioError",
    "AudioFeatureExtractor",
    "audio_placeholder_text",
    "expand_audio_placeholders",
    "load_audio",
    "num_audio_soft_tokens",
    "pad_audio_features",
    "split_audio",
]

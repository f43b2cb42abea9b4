"""Audio in the prompt: placeholder expansion, soft-token padding and long-clip segmentation.

Like transformers' `Gemma3nProcessor`, every clip takes a fixed `AUDIO_SEQ_LENGTH` soft tokens
(the encoder's output for 30 s); a shorter clip's unused slots get the embedding of the last
audio vocabulary entry, as `Gemma3nModel.forward` does.
"""

from typing import List, Optional

import mlx.core as mx
import numpy as np

from .config import AudioConfig
from .features import AudioFeatureExtractor
from .io import SAMPLING_RATE
from .subsample import encoder_output_length, time_stride

AUDIO_SEQ_LENGTH = 188  # config.json: audio_soft_tokens_per_image
AUDIO_TOKEN = "<audio_soft_token>"
BOA_TOKEN = "<start_of_audio>"
EOA_TOKEN = "<end_of_audio>"


def num_audio_soft_tokens(
    num_samples: int,
    config: Optional[AudioConfig] = None,
    extractor: Optional[AudioFeatureExtractor] = None,
) -> int:
    """How many of a clip's soft tokens carry audio (the rest are padding), for a clip of
    `num_samples` 16 kHz samples encoded on its own. 188 for 30 s or more."""
    config = config or AudioConfig()
    extractor = extractor or AudioFeatureExtractor()
    frames = extractor.num_frames(num_samples)
    # An output step is valid when the first feature frame it covers starts inside the clip.
    steps = np.arange(encoder_output_length(frames, config))
    first_frame = np.minimum(steps * config.conf_reduction_factor * time_stride(config), frames - 1)
    clip_end = min(num_samples, extractor.max_length)
    return int(np.count_nonzero(first_frame * extractor.hop_length < clip_end))


def audio_placeholder_text(num_tokens: int = AUDIO_SEQ_LENGTH) -> str:
    """What the processor substitutes for each `<audio_soft_token>` the prompt contains."""
    return f"\n\n{BOA_TOKEN}{AUDIO_TOKEN * num_tokens}{EOA_TOKEN}\n\n"


def expand_audio_placeholders(text: str, num_tokens: int = AUDIO_SEQ_LENGTH) -> str:
    """Expand every `<audio_soft_token>` of a prompt, one per clip in order; tokenizing the
    result gives the processor's `input_ids`."""
    return text.replace(AUDIO_TOKEN, audio_placeholder_text(num_tokens))


def pad_audio_features(
    features: mx.array,
    padding_mask: mx.array,
    padding_embedding: mx.array,
    num_tokens: int = AUDIO_SEQ_LENGTH,
) -> mx.array:
    """Fit embedded audio to the prompt's `num_tokens` slots per clip, as `Gemma3nModel.forward`.

    Args:
        features: [B, T, D] encoder outputs already projected by the audio embedder.
        padding_mask: [B, T] bool, True = padding (the encoder's second output).
        padding_embedding: [D] (or broadcastable) embedder output for the last audio
            vocabulary id, `vocab_offset + vocab_size - 1`.

    Returns:
        [B, num_tokens, D]: padding steps and the slots after T hold `padding_embedding`.
    """
    b, t, d = features.shape
    if t > num_tokens:
        raise ValueError(
            f"{t} audio soft tokens do not fit the prompt's {num_tokens}; split clips longer than "
            "30 s with split_audio"
        )
    padding_embedding = padding_embedding.reshape(1, 1, d).astype(features.dtype)
    features = mx.where(padding_mask[..., None], padding_embedding, features)
    fill = mx.broadcast_to(padding_embedding, (b, num_tokens - t, d))
    return mx.concatenate([features, fill], axis=1)


def split_audio(
    samples: np.ndarray,
    max_seconds: float = 30.0,
    sampling_rate: int = SAMPLING_RATE,
    search_seconds: float = 3.0,
    window_seconds: float = 0.03,
) -> List[np.ndarray]:
    """Cut a long clip into segments of at most `max_seconds`, each to get its own placeholder.

    The feature extractor silently drops everything after 30 s, so no segment may be longer.
    Each cut is placed in the quietest `window_seconds` stretch (lowest energy) of the last
    `search_seconds` before the limit: cutting in a pause rather than exactly at 30 s avoids
    splitting a word between two segments, where neither half would be recognisable, while
    keeping segments close to full length so few placeholders (188 tokens each) are spent.
    Segments are contiguous and together are exactly `samples`.
    """
    max_len = int(max_seconds * sampling_rate)
    search = min(int(search_seconds * sampling_rate), max_len)
    window = max(1, min(int(window_seconds * sampling_rate), search))
    segments, start = [], 0
    while len(samples) - start > max_len:
        region_start = start + max_len - search
        cut = region_start + _quietest_point(samples[region_start : start + max_len], window)
        segments.append(samples[start:cut])
        start = cut
    segments.append(samples[start:])
    return segments


def _quietest_point(samples: np.ndarray, window: int) -> int:
    """Centre of the lowest-energy `window`-sample stretch; the latest one on ties, so that
    silence gives segments of nearly `max_seconds`."""
    energy = np.concatenate([[0.0], np.cumsum(np.square(samples, dtype=np.float64))])
    window_energy = energy[window:] - energy[:-window]
    start = len(window_energy) - 1 - int(np.argmin(window_energy[::-1]))
    return start + (window + 1) // 2

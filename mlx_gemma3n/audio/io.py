"""Loading audio as the 16 kHz mono float32 waveform the feature extractor expects."""

import os
from typing import Optional, Union

import numpy as np
import soundfile
import soxr

SAMPLING_RATE = 16_000
_MAX_CHANNELS = 16


class AudioError(ValueError):
    """An audio input that cannot be used: unreadable, empty, non-finite or badly shaped."""


def load_audio(
    source: Union[str, os.PathLike, np.ndarray], sampling_rate: Optional[int] = None
) -> np.ndarray:
    """Load `source` as a float32 mono waveform at 16 kHz.

    Args:
        source: a path to any file libsndfile reads (wav, flac, ogg, ...), or a waveform array,
            1-D, or 2-D [samples, channels] / [channels, samples] (the shorter axis is taken as
            channels). Integer arrays are scaled from their full range to [-1, 1].
        sampling_rate: the rate of `source` when it is an array (required then); files carry
            their own rate, so it must be left out for paths.

    Channels are averaged; other rates are resampled with soxr's high-quality filter.
    """
    if isinstance(source, np.ndarray):
        if sampling_rate is None:
            raise AudioError("sampling_rate is required when audio is given as an array")
        name = "audio array"
        samples = _mono(_to_float(source, name), name)
    else:
        if sampling_rate is not None:
            raise AudioError(f"sampling_rate is only for arrays; {source} carries its own rate")
        name = str(source)
        samples, sampling_rate = _read(name)
    if samples.size == 0:
        raise AudioError(f"{name} is empty: no audio samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name} contains NaN or infinite samples")
    if sampling_rate <= 0:
        raise AudioError(f"{name}: sampling rate must be positive, got {sampling_rate}")
    if sampling_rate != SAMPLING_RATE:
        samples = soxr.resample(samples, sampling_rate, SAMPLING_RATE, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _read(path: str) -> tuple:
    if not os.path.exists(path):
        raise AudioError(f"audio file not found: {path}")
    if os.path.isdir(path):
        raise AudioError(f"expected an audio file, got a directory: {path}")
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except soundfile.SoundFileError as e:
        raise AudioError(f"could not decode {path} as audio: {e}") from e
    return samples.mean(axis=1), rate


def _to_float(samples: np.ndarray, name: str) -> np.ndarray:
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float32)
    if np.issubdtype(samples.dtype, np.signedinteger):
        return (samples / float(2 ** (8 * samples.dtype.itemsize - 1))).astype(np.float32)
    raise AudioError(f"{name} has dtype {samples.dtype}; expected float or signed integer samples")


def _mono(samples: np.ndarray, name: str) -> np.ndarray:
    if samples.ndim == 1:
        return samples
    if samples.ndim == 2 and min(samples.shape) <= _MAX_CHANNELS:
        # An empty clip is reported as such by the caller, not as NaNs from an empty mean.
        return samples.mean(axis=int(np.argmin(samples.shape))) if samples.size else samples.reshape(-1)
    raise AudioError(
        f"{name} has shape {samples.shape}; expected [samples] or [samples, channels] "
        f"with at most {_MAX_CHANNELS} channels"
    )

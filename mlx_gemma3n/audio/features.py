"""Log-mel front end of Gemma 3n's Universal Speech Model, in numpy.

Matches transformers' `Gemma3nAudioFeatureExtractor`: 32 ms Hann frames every 10 ms, HTK-style
pre-emphasis folded into each frame, a 1024-point FFT magnitude (twice the next power of two
of the frame: "FFT overdrive"), 128 unnormalised HTK mel bands over 125-7600 Hz, natural log
with a 1e-5 floor. Clips are cut at 30 s and right-padded with zeros to a common length that
is a multiple of 128 samples.
"""

import inspect
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np


def mel_filterbank(
    num_freqs: int, f_min: float, f_max: float, num_mels: int, sampling_rate: int, fft_length: int
) -> np.ndarray:
    """Triangular HTK-mel filters without area normalisation, shape [num_freqs, num_mels]."""
    freqs = np.arange(num_freqs, dtype=np.float32) * (sampling_rate / fft_length)
    mel_min, mel_max = (2595.0 * math.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    edges = 700.0 * (10 ** (np.linspace(mel_min, mel_max, num_mels + 2) / 2595.0) - 1.0)
    widths = np.diff(edges)
    slopes = edges[None, :] - freqs[:, None]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


class AudioFeatureExtractor:
    """Turns 16 kHz mono waveforms into log-mel features and a valid-frame mask."""

    def __init__(
        self,
        feature_size: int = 128,
        sampling_rate: int = 16_000,
        padding_value: float = 0.0,
        frame_length_ms: float = 32.0,
        hop_length_ms: float = 10.0,
        min_frequency: float = 125.0,
        max_frequency: float = 7600.0,
        preemphasis: float = 0.97,
        preemphasis_htk_flavor: bool = True,
        fft_overdrive: bool = True,
        dither: float = 0.0,
        input_scale_factor: float = 1.0,
        mel_floor: float = 1e-5,
        per_bin_mean: Optional[Sequence[float]] = None,
        per_bin_stddev: Optional[Sequence[float]] = None,
        max_length: int = 480_000,
        pad_to_multiple_of: int = 128,
    ):
        self.feature_size = feature_size
        self.sampling_rate = sampling_rate
        self.padding_value = padding_value
        self.preemphasis = preemphasis
        self.preemphasis_htk_flavor = preemphasis_htk_flavor
        self.dither = dither
        self.input_scale_factor = input_scale_factor
        self.mel_floor = mel_floor
        self.max_length = _round_up(max_length, pad_to_multiple_of)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.frame_length = int(round(sampling_rate * frame_length_ms / 1000.0))
        self.hop_length = int(round(sampling_rate * hop_length_ms / 1000.0))
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if fft_overdrive else 1)
        n = np.arange(self.frame_length, dtype=np.float32)
        self.window = (0.5 * (1 - np.cos(2 * np.pi * n / self.frame_length))).astype(np.float32)
        self.mel_filters = mel_filterbank(
            self.fft_length // 2 + 1,
            min_frequency,
            max_frequency,
            feature_size,
            sampling_rate,
            self.fft_length,
        )
        self.per_bin_mean = _per_bin(per_bin_mean, feature_size)
        self.per_bin_stddev = _per_bin(per_bin_stddev, feature_size)

    @classmethod
    def from_dict(cls, d: dict) -> "AudioFeatureExtractor":
        """Build from a `preprocessor_config.json` dict.

        The derived `frame_length`/`hop_length`/`fft_length` keys that transformers also saves
        are ignored, as transformers ignores them: they are recomputed from the millisecond
        values. Image-processor keys sharing the file are ignored too.
        """
        if d.get("padding_side", "right") != "right":
            raise ValueError(
                f"unsupported padding_side {d['padding_side']!r}: Gemma 3n pads audio on the right"
            )
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in d.items() if k in names})

    def num_frames(self, num_samples: int) -> int:
        """Feature frames produced for a batch whose longest clip has `num_samples` samples."""
        padded = min(_round_up(num_samples, self.pad_to_multiple_of), self.max_length)
        return max(0, (padded - self.frame_length - 1) // self.hop_length + 1)

    def __call__(
        self, audio: Union[np.ndarray, Sequence[np.ndarray]], truncate: bool = False
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Extract features for one clip or a batch of clips.

        Args:
            audio: a 1-D float waveform at `sampling_rate` (16 kHz mono, see `load_audio`),
                or a list of them (a 2-D array is taken as a batch of equal-length clips).
            truncate: cut clips longer than `max_length` samples (30 s) as transformers does;
                by default such a clip is an error, since the model would never hear the rest
                (split long audio with `split_audio`).

        Returns:
            (features [B, T, feature_size] float32, mask [B, T] bool, True where the frame
            starts inside the clip rather than in the padding).
        """
        clips = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 else list(audio)
        if not clips:
            raise ValueError("no audio clips given")
        clips = [np.asarray(c, dtype=np.float32) for c in clips]
        if any(c.ndim != 1 for c in clips):
            raise ValueError(f"expected 1-D mono waveforms, got shapes {[c.shape for c in clips]}")
        longest = max(len(c) for c in clips)
        if longest > self.max_length and not truncate:
            raise ValueError(
                f"audio clip of {longest / self.sampling_rate:.1f} s exceeds the "
                f"{self.max_length / self.sampling_rate:.0f} s maximum; split it with split_audio "
                "(the processor does) or pass truncate=True"
            )
        clips = [c[: self.max_length] for c in clips]
        length = _round_up(max(len(c) for c in clips), self.pad_to_multiple_of)
        batch = np.full((len(clips), length), self.padding_value, dtype=np.float32)
        for row, clip in zip(batch, clips):
            row[: len(clip)] = clip
        features = self._log_mel(batch)
        starts = np.arange(features.shape[1]) * self.hop_length
        mask = starts[None, :] < np.array([len(c) for c in clips])[:, None]
        return features, mask

    def _log_mel(self, waveforms: np.ndarray) -> np.ndarray:
        if self.dither > 0.0:
            waveforms = waveforms + self.dither * np.random.randn(*waveforms.shape).astype(np.float32)
        if self.input_scale_factor != 1.0:
            waveforms = waveforms * self.input_scale_factor
        frames = self._preemphasize(self._frames(waveforms)) * self.window
        magnitude = np.abs(np.fft.rfft(frames, n=self.fft_length, axis=-1))
        log_mel = np.log(np.maximum(magnitude @ self.mel_filters, self.mel_floor))
        if self.per_bin_mean is not None:
            log_mel = log_mel - self.per_bin_mean
        if self.per_bin_stddev is not None:
            log_mel = log_mel / self.per_bin_stddev
        return log_mel.astype(np.float32)

    def _frames(self, waveforms: np.ndarray) -> np.ndarray:
        """[B, L] -> [B, T, frame_length + 1]: each frame reads one sample more than its length,
        the pre-emphasis look-back."""
        size = self.frame_length + 1
        if waveforms.shape[1] < size:
            return np.zeros((waveforms.shape[0], 0, size), np.float32)
        return np.lib.stride_tricks.sliding_window_view(waveforms, size, axis=-1)[:, :: self.hop_length]

    def _preemphasize(self, frames: np.ndarray) -> np.ndarray:
        """[..., frame_length + 1] samples -> [..., frame_length] pre-emphasised samples."""
        p = self.preemphasis
        if p <= 0.0:
            return frames[..., :-1]
        if not self.preemphasis_htk_flavor:
            return frames[..., 1:] - p * frames[..., :-1]
        # HTK: the first sample has no predecessor inside the frame, so it is scaled by (1 - p).
        first = frames[..., :1] * (1.0 - p)
        return np.concatenate([first, frames[..., 1:-1] - p * frames[..., :-2]], axis=-1)


def _per_bin(values: Optional[Sequence[float]], feature_size: int) -> Optional[np.ndarray]:
    return None if values is None else np.asarray(values).reshape(1, feature_size)


def _round_up(n: int, multiple: Optional[int]) -> int:
    return -(-n // multiple) * multiple if multiple else n

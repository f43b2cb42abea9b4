"""load_audio: formats, channel mixing, resampling and the errors users see."""

import numpy as np
import pytest
import soundfile

from mlx_gemma3n.audio import AudioError, load_audio

SR = 16_000


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg"])
def test_reads_formats_at_16k(tmp_path, ext):
    path = tmp_path / f"tone.{ext}"
    soundfile.write(path, tone(440, 1.0, SR), SR)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) == SR
    assert abs(dominant_frequency(audio, SR) - 440) < 2


def test_stereo_file_is_mixed_and_resampled(tmp_path):
    rate = 44_100
    left, right = tone(440, 1.0, rate), tone(1000, 1.0, rate)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), rate, subtype="FLOAT")
    audio = load_audio(str(path))
    assert len(audio) == SR
    # Mixing averages the channels: both tones survive at half amplitude (0.25).
    spectrum = np.abs(np.fft.rfft(audio)) / (len(audio) / 2)
    assert spectrum[440] == pytest.approx(0.25, abs=0.01)
    assert spectrum[1000] == pytest.approx(0.25, abs=0.01)
    assert spectrum[700] < 0.01


def test_arrays_any_layout_and_int16():
    mono = tone(300, 0.5, 8_000)
    out = load_audio(mono, sampling_rate=8_000)
    assert len(out) == SR // 2 and abs(dominant_frequency(out, SR) - 300) < 4
    np.testing.assert_allclose(load_audio(np.stack([mono, mono]), 8_000), out, atol=1e-6)
    np.testing.assert_allclose(load_audio(np.stack([mono, mono], axis=1), 8_000), out, atol=1e-6)
    at16k = tone(300, 0.5, SR)
    pcm = np.round(at16k * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(pcm, SR), at16k, atol=1e-4)
    np.testing.assert_array_equal(load_audio(at16k, SR), at16k)  # no resampling at 16 kHz


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.wav", "not found.*missing.wav"),
        (lambda p: p, "directory"),
        (lambda p: _write(p / "notes.wav", b"this is not audio"), "could not decode.*notes.wav"),
        (lambda p: _silent_file(p / "empty.wav"), "empty.wav is empty"),
    ],
)
def test_file_errors(tmp_path, make, message):
    with pytest.raises(AudioError, match=message):
        load_audio(make(tmp_path))


@pytest.mark.parametrize(
    "array, rate, message",
    [
        (np.zeros(100, np.float32), None, "sampling_rate is required"),
        (np.zeros(0, np.float32), SR, "empty"),
        (np.zeros((0, 2), np.float32), SR, "empty"),
        (np.array([0.0, np.nan], np.float32), SR, "NaN or infinite"),
        (np.array([0.0, np.inf]), SR, "NaN or infinite"),
        (np.zeros((2, 3, 100), np.float32), SR, r"shape \(2, 3, 100\)"),
        (np.zeros((100, 100), np.float32), SR, "at most 16 channels"),
        (np.zeros(100, np.uint8), SR, "dtype uint8"),
        (np.zeros(100, np.float32), 0, "must be positive"),
    ],
)
def test_array_errors(array, rate, message):
    with pytest.raises(AudioError, match=message):
        load_audio(array, sampling_rate=rate)


def test_sampling_rate_with_a_path_is_rejected(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, tone(440, 0.1, SR), SR)
    with pytest.raises(ValueError, match="only for arrays"):
        load_audio(path, sampling_rate=SR)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _silent_file(path):
    soundfile.write(path, np.zeros((0, 1), np.float32), SR)
    return path

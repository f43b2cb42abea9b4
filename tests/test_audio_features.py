"""Log-mel front end vs transformers' Gemma3nAudioFeatureExtractor.

Relative error here is max|ours - ref| / max|ref|. Measured: 0.0 (bit-identical) on every case.
"""

import subprocess

import numpy as np
import pytest
from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

from mlx_gemma3n.audio import AudioFeatureExtractor, load_audio

SR = 16_000


def rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def reference(clips, **kwargs):
    out = Gemma3nAudioFeatureExtractor(**kwargs)(clips, return_tensors="np")
    return out["input_features"], out["input_features_mask"]


def assert_matches(ours, ref, tol=1e-4):
    (features, mask), (ref_features, ref_mask) = ours, ref
    assert features.dtype == np.float32 and mask.dtype == np.bool_
    assert features.shape == ref_features.shape and mask.shape == ref_mask.shape
    assert rel_err(features, ref_features) <= tol
    np.testing.assert_array_equal(mask, ref_mask)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """'hello world' from espeak-ng (22.05 kHz), resampled to 16 kHz by load_audio."""
    path = tmp_path_factory.mktemp("speech") / "hello.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "hello world, this is a test"], check=True)
    return load_audio(path)


def test_noise_matches_reference():
    noise = np.random.default_rng(0).standard_normal(2 * SR).astype(np.float32) * 0.3
    assert_matches(AudioFeatureExtractor()(noise), reference(noise))


def test_speech_matches_reference(speech):
    assert len(speech) > SR  # the utterance is real, not an empty file
    assert_matches(AudioFeatureExtractor()(speech), reference(speech))


def test_batch_padding_and_mask_match_reference(speech):
    rng = np.random.default_rng(1)
    clips = [speech, rng.standard_normal(12_345).astype(np.float32) * 0.1]
    features, mask = AudioFeatureExtractor()(clips)
    assert_matches((features, mask), reference(clips))
    # The short clip's frames are valid up to its last start sample, then padding.
    assert mask[1].sum() == -(-12_345 // 160) and not mask[1, -1] and mask[0].all()


def test_long_clip_is_truncated_to_30_seconds():
    rng = np.random.default_rng(2)
    clips = [rng.standard_normal(n).astype(np.float32) for n in (31 * SR, SR)]
    features, mask = AudioFeatureExtractor()(clips, truncate=True)
    assert features.shape[1] == AudioFeatureExtractor().num_frames(30 * SR) == 2997
    assert_matches((features, mask), reference(clips))
    with pytest.raises(ValueError, match="31.0 s exceeds the 30 s maximum; split it"):
        AudioFeatureExtractor()(clips)


def test_clip_shorter_than_a_frame_gives_no_frames():
    clip = np.ones(300, np.float32)
    features, mask = AudioFeatureExtractor()(clip)
    ref_features, ref_mask = reference(clip)
    assert features.shape == ref_features.shape == (1, 0, 128)
    assert mask.shape == ref_mask.shape == (1, 0)


def test_from_preprocessor_config_with_normalisation_and_derived_keys():
    rng = np.random.default_rng(3)
    config = {
        "feature_extractor_type": "Gemma3nAudioFeatureExtractor",
        "frame_length": 512,  # derived keys transformers writes but recomputes from the ms values
        "hop_length": 160,
        "fft_length": 1024,
        "hop_length_ms": 12.5,
        "preemphasis_htk_flavor": False,
        "per_bin_mean": rng.standard_normal(128).tolist(),
        "per_bin_stddev": (1 + rng.random(128)).tolist(),
        "image_seq_length": 256,  # image-processor keys share the file
        "padding_side": "right",
    }
    clip = rng.standard_normal(SR).astype(np.float32)
    ours = AudioFeatureExtractor.from_dict(config)
    assert ours.hop_length == 200 and ours.fft_length == 1024
    not_hf_kwargs = ("image_seq_length", "feature_extractor_type")
    hf_kwargs = {k: v for k, v in config.items() if k not in not_hf_kwargs}
    assert_matches(ours(clip), reference(clip, **hf_kwargs))


def test_non_mono_batch_entry_is_rejected():
    with pytest.raises(ValueError, match="1-D mono"):
        AudioFeatureExtractor()([np.zeros((2, 100), np.float32)])

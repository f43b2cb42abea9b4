"""Prompt-side audio helpers vs transformers' Gemma3nProcessor and Gemma3nAudioEncoder."""

import json

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    Gemma3nAudioConfig,
    Gemma3nAudioFeatureExtractor,
    Gemma3nProcessor,
    SiglipImageProcessor,
)
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder

from mlx_gemma3n.audio import (
    AudioFeatureExtractor,
    audio_placeholder_text,
    expand_audio_placeholders,
    num_audio_soft_tokens,
    split_audio,
)
from mlx_gemma3n.tiny import TINY_CONFIG, write_tiny_tokenizer

torch.set_num_threads(1)
SR = 16_000


@pytest.mark.parametrize("seconds", [0.05, 1.0, 2.51, 7.77, 29.99, 30.0, 41.0])
def test_num_audio_soft_tokens_matches_encoder_mask(seconds):
    n = int(seconds * SR)
    features, mask = AudioFeatureExtractor()(np.zeros(n, np.float32), truncate=True)
    encoder = Gemma3nAudioEncoder(Gemma3nAudioConfig(**TINY_CONFIG["audio_config"])).eval()
    with torch.no_grad():
        out = encoder(torch.from_numpy(features), torch.from_numpy(~mask))
    valid = int((~out.audio_mel_mask).sum())
    assert num_audio_soft_tokens(n) == valid
    assert valid == 188 if seconds >= 30 else valid <= 188


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = {
        "audio_token": "<audio_soft_token>",
        "boa_token": "<start_of_audio>",
        "eoa_token": "<end_of_audio>",
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Gemma3nProcessor(Gemma3nAudioFeatureExtractor(), SiglipImageProcessor(), tokenizer)


def test_placeholder_expansion_matches_processor(processor):
    tokenizer = processor.tokenizer
    prompt = (
        "<start_of_turn>user\nhello <audio_soft_token> and then <audio_soft_token>"
        " transcribe.<end_of_turn>"
    )
    audio = [np.zeros(SR, np.float32), np.zeros(SR // 3, np.float32)]
    ref = processor(text=[prompt], audio=audio, return_tensors="np")["input_ids"][0].tolist()
    assert ref.count(tokenizer.audio_token_id) == 2 * 188

    assert processor.full_audio_sequence == audio_placeholder_text()
    assert tokenizer.encode(expand_audio_placeholders(prompt)) == ref


def test_split_audio_cuts_in_the_pauses_near_each_limit():
    rng = np.random.default_rng(0)
    samples = (0.5 * rng.standard_normal(70 * SR)).astype(np.float32)
    pauses = [(int(28.2 * SR), int(28.5 * SR)), (int(56.0 * SR), int(56.4 * SR))]
    for a, b in pauses:
        samples[a:b] *= 1e-3
    segments = split_audio(samples)
    assert [len(s) <= 30 * SR for s in segments] == [True] * 3
    np.testing.assert_array_equal(np.concatenate(segments), samples)
    cuts = np.cumsum([len(s) for s in segments])[:-1]
    for cut, (a, b) in zip(cuts, pauses):
        assert a < cut < b


def test_split_audio_without_pauses_keeps_segments_near_full_length():
    lengths = [len(s) for s in split_audio(np.zeros(65 * SR, np.float32))]
    assert len(lengths) == 3 and sum(lengths) == 65 * SR
    assert all(29.9 * SR <= n <= 30 * SR for n in lengths[:2])
    short = np.ones(30 * SR, np.float32)
    (only,) = split_audio(short)
    np.testing.assert_array_equal(only, short)

"""Full-model logits with images and audio against transformers (float32).

Error metric: max |mlx - ref| / max |ref| over every logit of the prompt. Measured on the tiny
checkpoint: 2 images + 1 clip ~3e-6, two clips of different lengths ~1e-6 (tolerance 1e-4)."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from mlx_gemma3n.api import load
from mlx_gemma3n.processor import user_message

TOL = 1e-4
ASSETS = Path(__file__).parents[1] / "examples" / "assets"


def rel_err(out, ref) -> float:
    return float(np.abs(np.asarray(out) - np.asarray(ref)).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    return load(str(tiny_hf[0]))


def tone(seconds: float, freq: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def ours_and_reference(tiny_hf, loaded, messages):
    model, processor = loaded
    inputs = processor(messages)
    ids = mx.array([inputs.token_ids])
    image = audio = None
    kwargs = {}
    if inputs.images:
        pixels = inputs.pixel_values()
        image = model.encode_images(mx.array(pixels))
        kwargs["pixel_values"] = torch.tensor(pixels)
    if inputs.audio:
        features, valid = processor.audio_features(inputs.audio)
        audio = model.encode_audio(mx.array(features), mx.array(valid))
        kwargs["input_features"] = torch.tensor(features)
        kwargs["input_features_mask"] = torch.tensor(valid)
    ours = np.array(model(ids, inputs_embeds=model.embed_inputs(ids, image, audio)))
    with torch.no_grad():
        ref = tiny_hf[1](input_ids=torch.tensor([inputs.token_ids]), **kwargs).logits.numpy()
    return inputs, ours, ref


def test_two_images_and_audio(tiny_hf, loaded):
    cat = Image.open(ASSETS / "cat.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    message = user_message("Compare the pictures, then answer the question.", [cat, noise], [(tone(3.0, 440), 16000)])
    inputs, ours, ref = ours_and_reference(tiny_hf, loaded, [message])
    cfg = loaded[0].config
    ids = np.array(inputs.token_ids)
    assert (ids == cfg.image_token_id).sum() == 2 * 256 and (ids == cfg.audio_token_id).sum() == 188
    assert rel_err(ours, ref) < TOL


def test_one_image(tiny_hf, loaded):
    message = user_message("What is in the picture?", [str(ASSETS / "cat.png")])
    _, ours, ref = ours_and_reference(tiny_hf, loaded, [{"role": "system", "content": "Be brief."}, message])
    assert rel_err(ours, ref) < TOL


def test_two_audio_clips_of_different_lengths(tiny_hf, loaded):
    message = user_message("Transcribe both.", audio=[(tone(1.0, 300), 16000), (tone(2.5, 700, 8000), 8000)])
    _, ours, ref = ours_and_reference(tiny_hf, loaded, [message])
    assert rel_err(ours, ref) < TOL


def test_real_speech_clip(tiny_hf, loaded):
    message = user_message("Transcribe this audio.", audio=[str(ASSETS / "speech.flac")])
    _, ours, ref = ours_and_reference(tiny_hf, loaded, [message])
    assert rel_err(ours, ref) < TOL

"""Image placeholder expansion vs transformers' Gemma3nProcessor (tiny tokenizer)."""

import pytest

from mlx_gemma3n.tiny import SPECIAL_TOKENS, TINY_CONFIG, write_tiny_tokenizer
from mlx_gemma3n.vision.prompt import (
    expand_image_placeholders,
    full_image_sequence,
)

IDS = {name: i for i, name in SPECIAL_TOKENS.items()}


@pytest.fixture(scope="module")
def hf_processor(tmp_path_factory):
    from transformers import (
        Gemma3nAudioFeatureExtractor,
        Gemma3nProcessor,
        GemmaTokenizer,
        SiglipImageProcessor,
    )

    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    extra = {
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "audio_token": "<audio_soft_token>",
        "boa_token": "<start_of_audio>",
        "eoa_token": "<end_of_audio>",
    }
    tok = GemmaTokenizer.from_pretrained(d, extra_special_tokens=extra)
    image_processor = SiglipImageProcessor(
        size={"height": 32, "width": 32}, resample=2, do_normalize=False
    )
    return Gemma3nProcessor(Gemma3nAudioFeatureExtractor(), image_processor, tok)


@pytest.mark.parametrize(
    "text",
    [
        "<image_soft_token>",
        "describe\n<image_soft_token> the cat and <image_soft_token>.",
        "<start_of_turn>user\nwhat is this? <image_soft_token><end_of_turn>\n",
    ],
)
def test_matches_gemma3n_processor(hf_processor, text):
    from PIL import Image

    n = text.count("<image_soft_token>")
    images = [Image.new("RGB", (40, 30), (9 * i, 100, 200)) for i in range(n)]
    ref = hf_processor(text=text, images=images, return_tensors="np")["input_ids"][0].tolist()
    tok = hf_processor.tokenizer
    assert tok(expand_image_placeholders(text, n))["input_ids"] == ref
    assert ref.count(TINY_CONFIG["image_token_id"]) == 256 * n


def test_helpers():
    seq = full_image_sequence()
    assert seq.startswith("\n\n<start_of_image><image_soft_token>") and seq.endswith(
        "<end_of_image>\n\n"
    )
    assert seq.count("<image_soft_token>") == 256
    assert full_image_sequence("<i>", "<b>", "<e>", num_tokens=2) == "\n\n<b><i><i><e>\n\n"
    with pytest.raises(ValueError, match="2 images"):
        expand_image_placeholders("one <image_soft_token>", num_images=2)
    assert expand_image_placeholders("<img>", placeholder="<img>", num_tokens=1) == full_image_sequence(
        num_tokens=1
    )

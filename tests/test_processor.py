"""Chat template and multimodal prompt assembly."""

import numpy as np
import pytest

from mlx_gemma3n.config import ModelConfig
from mlx_gemma3n.processor import Processor, user_message
from mlx_gemma3n.tiny import TINY_CONFIG, write_tiny_tokenizer
from mlx_gemma3n.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    path = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return Processor(Tokenizer(path), ModelConfig.from_dict(TINY_CONFIG))


def test_template_puts_the_system_prompt_in_the_first_user_turn(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": " And now? "}]},
    ]
    assert processor.render(messages) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nAnd now?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_roles_must_alternate(processor):
    with pytest.raises(ValueError, match="alternate"):
        processor.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="unsupported message role 'tool'"):
        processor.render([{"role": "tool", "content": "a"}])


def test_ids_start_with_bos_and_parse_special_tokens(processor):
    ids = processor("hello").token_ids
    tok = processor.tokenizer
    assert ids[0] == tok.bos_token_id and ids[1] == tok.token_id("<start_of_turn>")
    assert ids[-3:] == tok.encode("<start_of_turn>model\n")


def test_audio_over_30_seconds_becomes_several_blocks(processor):
    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(70 * 16000)).astype(np.float32)
    inputs = processor([user_message("Transcribe.", audio=[(clip, 16000)])])
    assert len(inputs.audio) == 3 and all(len(c) <= 30 * 16000 for c in inputs.audio)
    assert sum(len(c) for c in inputs.audio) == len(clip)
    ids = np.array(inputs.token_ids)
    assert (ids == TINY_CONFIG["audio_token_id"]).sum() == 3 * 188
    assert (ids == TINY_CONFIG["boa_token_id"]).sum() == 3


def test_images_then_audio_then_text(processor):
    image = np.zeros((32, 48, 3), np.uint8)
    inputs = processor([user_message("Both?", images=[image, image], audio=[(np.zeros(8000, np.float32), 8000)])])
    ids = inputs.token_ids
    first_image = ids.index(TINY_CONFIG["image_token_id"])
    first_audio = ids.index(TINY_CONFIG["audio_token_id"])
    assert first_image < first_audio and ids.count(TINY_CONFIG["image_token_id"]) == 512
    assert inputs.pixel_values().shape == (2, 3, 768, 768)
    assert len(inputs.audio) == 1 and len(inputs.audio[0]) == 16000  # resampled to 16 kHz

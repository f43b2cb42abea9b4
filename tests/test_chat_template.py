"""Checkpoint chat templates (Jinja) vs transformers' apply_chat_template, where they are found,
and the built-in fallback against Gemma 3n's template."""

import json
import shutil

import numpy as np
import pytest
from reference import GEMMA3N_TEMPLATE
from transformers import AutoTokenizer

from mlx_gemma3n.chat_template import ChatTemplateError
from mlx_gemma3n.config import ModelConfig
from mlx_gemma3n.processor import Processor, user_message
from mlx_gemma3n.tiny import TINY_CONFIG, write_tiny_tokenizer

# A fine-tune's own format: different turn markers, the image after the text.
CUSTOM_TEMPLATE = """{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] | upper }}:
{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% for c in m['content'] if c['type'] == 'image' %}[{{ loop.index }}]<image_soft_token>{% endfor %}{% endif %}<end_of_turn>
{% endfor %}{% if add_generation_prompt %}<start_of_turn>MODEL:
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": " Hi "}],
    [
        {"role": "system", "content": [{"type": "text", "text": "Answer in French. "}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "Un chat."},
        {"role": "user", "content": [{"type": "text", "text": " And now? "}, {"type": "image"}]},
    ],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path, "bpe")
    return path


def checkpoint(src, dst, files=None):
    """A processor for a copy of the tokenizer directory `src` with `files` (name -> text) added."""
    shutil.copytree(src, dst)
    for name, text in (files or {}).items():
        (dst / name).write_text(text)
    return Processor.from_pretrained(dst, ModelConfig.from_dict(TINY_CONFIG))


@pytest.mark.parametrize(
    "template, messages",
    [(GEMMA3N_TEMPLATE, m) for m in CONVERSATIONS] + [(CUSTOM_TEMPLATE, m) for m in CONVERSATIONS[:2]],
)
def test_checkpoint_template_renders_as_transformers(tokenizer_dir, tmp_path, template, messages):
    processor = checkpoint(tokenizer_dir, tmp_path / "ckpt", {"chat_template.jinja": template})
    hf = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    for add in (True, False):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert "<bos>" + processor.render(messages, add_generation_prompt=add) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_builtin_template_is_gemma3ns(tokenizer_dir, tmp_path, messages):
    with_template = checkpoint(tokenizer_dir, tmp_path / "ckpt", {"chat_template.jinja": GEMMA3N_TEMPLATE})
    builtin = checkpoint(tokenizer_dir, tmp_path / "plain")
    assert builtin.chat_template is None and with_template.chat_template is not None
    assert builtin.render(messages) == with_template.render(messages)


def test_custom_template_drives_the_prompt_ids(tokenizer_dir, tmp_path):
    processor = checkpoint(tokenizer_dir, tmp_path / "ckpt", {"chat_template.jinja": CUSTOM_TEMPLATE})
    image = np.zeros((32, 48, 3), np.uint8)
    inputs = processor([user_message("the cat", images=[image])])
    tok = processor.tokenizer
    n = TINY_CONFIG["vision_soft_tokens_per_image"]
    image_block = "\n\n<start_of_image>" + "<image_soft_token>" * n + "<end_of_image>\n\n"
    text = f"<start_of_turn>USER:\nthe cat[1]{image_block}<end_of_turn>\n<start_of_turn>MODEL:\n"
    assert inputs.token_ids == [tok.bos_token_id] + tok.encode(text)
    assert len(inputs.images) == 1


def test_template_sources_in_transformers_order(tokenizer_dir, tmp_path):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages[0]['content'] }}"}]
    p = checkpoint(tokenizer_dir, tmp_path / "a", {"tokenizer_config.json": json.dumps({**config, "chat_template": named})})
    assert p.render([{"role": "user", "content": "x"}]) == "Dx"
    processor_template = json.dumps({"chat_template": "P"})
    p = checkpoint(
        tokenizer_dir,
        tmp_path / "b",
        {"tokenizer_config.json": json.dumps({**config, "chat_template": "C"}), "chat_template.json": processor_template},
    )
    assert p.render([{"role": "user", "content": "x"}]) == "P"
    p = checkpoint(tokenizer_dir, tmp_path / "c", {"chat_template.json": processor_template, "chat_template.jinja": "J"})
    assert p.render([{"role": "user", "content": "x"}]) == "J"


def test_template_errors_are_named(tokenizer_dir, tmp_path):
    p = checkpoint(tokenizer_dir, tmp_path / "a", {"chat_template.jinja": GEMMA3N_TEMPLATE})
    with pytest.raises(ChatTemplateError, match="rejected the conversation: Conversation roles must alternate"):
        p.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        checkpoint(tokenizer_dir, tmp_path / "b", {"chat_template.jinja": "{% for m in messages %}"})
    drops_media = "{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}"
    p = checkpoint(tokenizer_dir, tmp_path / "c", {"chat_template.jinja": drops_media})
    with pytest.raises(ValueError, match="wrote 0 image placeholder.*for 1 image item"):
        p([user_message("x", images=[np.zeros((8, 8, 3), np.uint8)])])


PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] if m['content'] is string else m['content'][-1]['text'] }}"
    "\n\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_chat_session_closes_turns_as_the_template_does(tiny_hf, tokenizer_dir, tmp_path):
    import mlx_gemma3n

    assert checkpoint(tokenizer_dir, tmp_path / "plain").model_turn_end() == "<end_of_turn>\n"
    gemma = checkpoint(tokenizer_dir, tmp_path / "gemma", {"chat_template.jinja": GEMMA3N_TEMPLATE})
    assert gemma.model_turn_end() == "<end_of_turn>\n"

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_hf[0], path)
    (path / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
    model, processor = mlx_gemma3n.load(str(path))
    assert processor.model_turn_end() == "\n\n"
    chat = mlx_gemma3n.ChatSession(model, processor)
    list(chat.send("hello", max_tokens=3))
    first = len(chat.prompt_cache.tokens)
    second = list(chat.send("the cat", max_tokens=3))
    turn = chat.prompt_cache.tokens[first : -len(second)]
    assert turn == processor.tokenizer.encode("\n\nuser: the cat\n\nassistant: ")

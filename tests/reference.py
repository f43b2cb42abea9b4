"""Builds tiny random-weight Hugging Face Gemma 3n checkpoints with transformers (test-only)."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch

from mlx_gemma3n.tiny import TINY_CONFIG, write_tiny_tokenizer


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter a random, non-degenerate value.

    transformers/timm initialise many tensors to constants (norm scales to 1, AltUp's
    output scale to 0, layer scale to 1e-5); a parity test against those would not see
    a missing scale or a swapped pair, so perturb them all.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                std = 0.5 if "embed" in name and "embedding_projection" not in name else fan_in**-0.5
                p.copy_(noise * std)
            else:
                p.add_(0.2 * noise)


def hf_config(overrides: dict | None = None):
    from transformers import Gemma3nConfig

    cfg = copy.deepcopy(TINY_CONFIG)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return Gemma3nConfig(**{k: v for k, v in cfg.items() if k != "architectures"})


def build_hf_model(overrides: dict | None = None, seed: int = 0):
    from transformers import Gemma3nForConditionalGeneration

    config = hf_config(overrides)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Gemma3nForConditionalGeneration(config).eval()
    randomize_(model, seed)
    return model


def save_hf_checkpoint(model, out_dir: Path, max_shard_size: str = "20MB") -> Path:
    """Save as sharded safetensors with an index, plus config and tokenizer files."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    write_tiny_tokenizer(out_dir)
    gen = {"bos_token_id": 2, "eos_token_id": [1, 6], "pad_token_id": 0}
    (out_dir / "generation_config.json").write_text(json.dumps(gen))
    return out_dir


def to_transformers4_dialect(src: Path, dst: Path, model) -> Path:
    """Rewrite a transformers-5 checkpoint the way 2025 Google checkpoints look: rope_theta /
    rope_local_base_freq instead of rope_parameters, and k/v weights present for KV-shared layers."""
    import shutil

    from safetensors.numpy import save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    text = cfg["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope["full_attention"]["rope_theta"]
    text["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    text["rope_scaling"] = None
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tc = model.config.text_config
    first_shared = tc.num_hidden_layers - tc.num_kv_shared_layers
    rng = np.random.default_rng(1)
    extra = {}
    for i in range(first_shared, tc.num_hidden_layers):
        prefix = f"model.language_model.layers.{i}.self_attn"
        kv = tc.num_key_value_heads * tc.head_dim
        extra[f"{prefix}.k_proj.weight"] = rng.standard_normal((kv, tc.hidden_size), np.float32)
        extra[f"{prefix}.v_proj.weight"] = rng.standard_normal((kv, tc.hidden_size), np.float32)
        extra[f"{prefix}.k_norm.weight"] = rng.standard_normal((tc.head_dim,), np.float32)
    save_file(extra, str(dst / "model-kv-shared.safetensors"), metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-kv-shared.safetensors" for k in extra})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dst


# Gemma 3n's chat template, as the released checkpoints ship it: the system prompt, as written,
# opens the first user turn; text is trimmed; one placeholder per image/audio item.
GEMMA3N_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'audio' -%}
                {{ '<audio_soft_token>' }}
            {%- elif item['type'] == 'image' -%}
                {{ '<image_soft_token>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""


def save_hf_processor(path: Path, image_size: int = 768) -> None:
    """The processor files a transformers-5 Gemma 3n checkpoint carries (what the converters
    copy): tokenizer.json + tokenizer_config.json, processor_config.json, chat_template.jinja."""
    from transformers import AutoTokenizer, Gemma3nAudioFeatureExtractor, Gemma3nProcessor, SiglipImageProcessor

    config = json.loads((path / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = {
        "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>",
        "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    images = SiglipImageProcessor(size={"height": image_size, "width": image_size}, resample=2, do_normalize=False)
    processor = Gemma3nProcessor(
        Gemma3nAudioFeatureExtractor(), images, AutoTokenizer.from_pretrained(path), chat_template=GEMMA3N_TEMPLATE
    )
    processor.save_pretrained(path)

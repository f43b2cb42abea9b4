"""E2B/E4B presets give the released checkpoints' shapes: every text-decoder and embedder
tensor transformers would load has the same name and shape here (checked without
allocating: transformers on the meta device, MLX arrays never evaluated)."""

import pytest
import torch
from mlx.utils import tree_flatten

from mlx_gemma3n.config import PRESETS, ModelConfig
from mlx_gemma3n.model import Gemma3n
from mlx_gemma3n.text.ple import NAME as PLE


def hf_shapes(preset: dict) -> dict:
    from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration

    with torch.device("meta"):
        model = Gemma3nForConditionalGeneration(Gemma3nConfig(**preset))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,layers,total", [("E2B", 30, 5.44e9), ("E4B", 35, 7.85e9)])
def test_preset_matches_transformers_shapes(name, layers, total):
    ref = hf_shapes(PRESETS[name])
    model = Gemma3n(ModelConfig.from_dict(PRESETS[name]))
    for part in ("embed_vision", "embed_audio"):
        setattr(model, part, model.build_part(part))
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    mapped = {k: v for k, v in ((k.removeprefix("model."), v) for k, v in ref.items())}
    wanted = {k: v for k, v in mapped.items() if k.startswith(("language_model.", "embed_"))}
    ple = wanted.pop(f"{PLE}.weight")
    assert ple == (262144, layers * 256)
    assert ours == wanted
    # total parameter count of the released checkpoint (lm_head is tied)
    count = sum(torch.Size(s).numel() for k, s in ref.items() if k != "lm_head.weight")
    assert abs(count - total) / total < 0.01, count

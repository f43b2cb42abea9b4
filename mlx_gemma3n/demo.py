"""`--model demo`: a tiny random-weight Gemma 3n built on the spot, for a machine with no
network and no weights. It runs the whole pipeline (text, image and audio); what it says is
meaningless."""

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .config import ModelConfig
from .model import Gemma3n
from .saving import ple_specs, write_checkpoint
from .text.ple import NAME as PLE
from .tiny import TINY_CONFIG, write_tiny_tokenizer

DEMO_VERSION = "3"


def cache_dir() -> Path:
    """Where the package keeps generated files: $MLX_GEMMA3N_CACHE or ~/.cache/mlx_gemma3n."""
    return Path(os.environ.get("MLX_GEMMA3N_CACHE", Path.home() / ".cache" / "mlx_gemma3n"))


def _random_model(seed: int) -> Gemma3n:
    mx.random.seed(seed)
    model = Gemma3n(ModelConfig.from_dict(TINY_CONFIG))
    for part in model.parts:
        setattr(model, part, model.build_part(part))
    model.update(tree_map(_randomize, model.parameters()))
    return model


def _randomize(a: mx.array) -> mx.array:
    """Every tensor random: a constant one (norm scales of 1, zero AltUp output scales, the
    vision tower's zero-initialised kernels) would switch a whole path off. Vectors are
    perturbed around their initial value; matrices and kernels ([out, ..., in]) are drawn with
    standard deviation 1/sqrt(fan-in), so activations keep their scale layer after layer."""
    noise = mx.random.normal(a.shape, dtype=a.dtype)
    if a.ndim == 1:
        return a + 0.2 * noise
    return noise / math.sqrt(math.prod(a.shape[1:]))


def _ple_blocks(rows: int, dims: int, seed: int, block: int = 4096):
    rng = np.random.default_rng(seed)
    for start in range(0, rows, block):
        yield {f"{PLE}.weight": mx.array(rng.standard_normal((min(block, rows - start), dims), np.float32) * 0.5)}


def build_demo_checkpoint(out: Path, seed: int = 0) -> Path:
    """Write the tiny random-weight checkpoint (MLX layout) to `out`."""
    out.mkdir(parents=True)
    model = _random_model(seed)
    text = model.config.text_config
    rows, dims = text.vocab_size_per_layer_input, text.num_hidden_layers * text.hidden_size_per_layer_input
    weights = dict(tree_flatten(model.parameters()))
    write_checkpoint(out, weights, ple_specs(rows, dims, mx.float32, 0, 0), _ple_blocks(rows, dims, seed))
    (out / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    write_tiny_tokenizer(out)
    (out / "README.md").write_text("Random-weight tiny Gemma 3n built by mlx_gemma3n.demo.\n")
    return out


def demo_checkpoint() -> Path:
    """The demo checkpoint, built once into the cache directory."""
    target = cache_dir() / f"demo-v{DEMO_VERSION}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
        try:
            build_demo_checkpoint(tmp / "ckpt")
            shutil.rmtree(target, ignore_errors=True)
            (tmp / "ckpt").rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target

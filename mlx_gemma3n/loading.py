"""Loading Gemma 3n checkpoints: HF (either dialect) or MLX-converted, from disk or the Hub."""

import json
import re
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig
from .file_tensors import read_header
from .layouts import known_layout, quantization_lookup, unsupported_files
from .model import TOWERS, Gemma3n
from .quantized import use_blocks
from .text.concat import fuse_projections
from .text.ple import NAME as PLE_NAME
from .text.ple import PARTS as PLE_PARTS
from .text.ple import PerLayerEmbeddingTable

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.md"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model."""


def resolve_model_path(path_or_hub_id: str) -> Path:
    """A local directory as is; an `owner/name` Hub id is downloaded (or read from the cache)."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"model path {path} is a file; expected a checkpoint directory")
        return path
    if not _HUB_ID.match(str(path_or_hub_id)):
        raise CheckpointError(f"model path not found: {path}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth and missing-repo errors all end here
        raise CheckpointError(
            f"could not fetch {path_or_hub_id!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}); "
            "check the network or pass a local checkpoint directory"
        ) from None


def read_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        return ModelConfig.from_dict(json.loads(file.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def weight_files(path: Path) -> list:
    """The safetensors shards, checked against the index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path} is missing shard(s) named in its index: {missing}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = unsupported_files(p.name for p in path.iterdir())
        found = f" (found {other}, a format not supported here)" if other else ""
        raise CheckpointError(f"{path} has no .safetensors weight files{found}")
    return files


def read_weights(files: Iterable[Path]) -> Dict[str, mx.array]:
    """All tensors of the shards, lazily: nothing is read until a tensor is evaluated."""
    weights = {}
    for file in files:
        try:
            read_header(file)  # mx.load does not check that the tensors tile the data
            shard = mx.load(str(file))
        except Exception as e:
            raise CheckpointError(f"cannot read {file} (corrupt or truncated?): {e}") from None
        weights.update(shard)
    return weights


def check_weights(model: nn.Module, weights: Dict[str, mx.array]) -> None:
    """Every parameter present with its shape, nothing extra; errors name the key."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:5]}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected tensor(s), e.g. {extra[:5]}")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"tensor {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )


def _load_module(module: nn.Module, weights: Dict[str, mx.array], quantization, prefix: str) -> None:
    """Load `weights` into `module` (at `prefix` in the model), quantizing exactly the
    submodules the checkpoint stores quantized, each with its parameters from the config."""

    def predicate(path: str, _) -> Union[bool, dict]:
        if f"{path}.scales" not in weights:
            return False
        params = quantization(f"{prefix}.{path}")
        if params is None:
            raise CheckpointError(f"{prefix}.{path} is stored quantized but config.json does not quantize it")
        return params

    nn.quantize(module, class_predicate=predicate)
    use_blocks(module)
    check_weights(module, weights)
    module.load_weights(list(weights.items()), strict=True)
    module.eval()


def load_ple_table(files, config: ModelConfig, quantization) -> PerLayerEmbeddingTable:
    try:
        table = PerLayerEmbeddingTable.from_files(files, quantization(PLE_NAME))
    except (KeyError, ValueError) as e:
        raise CheckpointError(str(e).strip("'")) from None
    c = config.text_config
    expected = (c.vocab_size_per_layer_input, c.num_hidden_layers * c.hidden_size_per_layer_input)
    if (table.num_rows, table.dims) != expected:
        raise CheckpointError(
            f"tensor language_model.embed_tokens_per_layer.weight has shape "
            f"{(table.num_rows, table.dims)}, the model expects {expected}"
        )
    return table


def load_model(
    path: Path, parts: Optional[Iterable[str]] = None, lazy: bool = True, fuse: bool = True
) -> Gemma3n:
    """Build the model for the checkpoint in `path` and load its text decoder.

    `parts` (e.g. "vision_tower", "embed_audio") are loaded now; with `lazy` the others are
    loaded from the same files on first use, else they stay absent. Tensors are read lazily,
    so the weights of parts never used are never read. With `fuse` each decoder layer's q/k/v
    and gate/up projections are joined into one matvec each (text/concat.py); the converter
    loads without, to keep the checkpoint's modules."""
    config = read_config(path)
    model = Gemma3n(config)
    files = weight_files(path)
    stored = read_weights(files)
    if not known_layout(stored):
        raise CheckpointError(
            f"{path} is not a Gemma 3n checkpoint layout this package reads (transformers, "
            f"mlx-lm, mlx-vlm or its own): tensor names such as {sorted(stored)[:3]}"
        )
    weights = model.sanitize(stored)
    by_part = {}
    for key, value in weights.items():
        part, rest = key.split(".", 1)
        by_part.setdefault(part, {})[rest] = value
    for tower in TOWERS:
        if not any(p in by_part for p in (f"embed_{tower}", f"{tower}_tower")):
            setattr(config, f"{tower}_config", None)  # text-only conversions (mlx-lm) keep the block
    unknown = sorted(set(by_part) - {"language_model", *model.parts})
    if unknown:
        raise CheckpointError(f"checkpoint has tensors for unknown part(s) {unknown}")
    text = by_part.pop("language_model", {})
    for name in PLE_PARTS:
        text.pop(f"embed_tokens_per_layer.{name}", None)  # mapped below, never loaded whole
    quantization = quantization_lookup(config.quantization)
    _load_module(model.language_model, text, quantization, "language_model")
    if fuse:
        fuse_projections(model.language_model)
    model.language_model.ple_table = load_ple_table(files, config, quantization)

    def load_part(part: str, module: nn.Module) -> None:
        found = by_part.get(part)
        if not found:
            raise CheckpointError(f"{path} has no weights for {part}")
        if hasattr(module, "sanitize"):
            found = module.sanitize(found)
        _load_module(module, found, quantization, part)

    model.set_part_loader(load_part)
    model.require(*(parts or ()))
    if not lazy:
        model.set_part_loader(None)
    return model

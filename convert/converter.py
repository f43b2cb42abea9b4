"""Conversion: load and validate an HF checkpoint, cast/quantize, write MLX shards atomically."""

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_gemma3n.loading import load_model, resolve_model_path
from mlx_gemma3n.model import tower_of
from mlx_gemma3n.saving import ple_specs, write_checkpoint
from mlx_gemma3n.text.altup import dense_weight
from mlx_gemma3n.text.ple import NAME as PLE
from mlx_gemma3n.text.ple import quantize_blocks
from mlx_gemma3n.text.transposed import QuantizedTransposedLinear, TransposedLinear

from .matformer import slice_model

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
AUX_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


class ConversionError(RuntimeError):
    """The conversion cannot be done as asked (output location, options)."""


def _should_quantize(group_size: int):
    def predicate(path: str, module: nn.Module) -> bool:
        # Each layer's AltUp router and coefficient maps are tiny and steer every stream: keep
        # them exact (the model-level altup_(un)embed_projections are large and quantize).
        if ".altup." in path or not isinstance(module, (nn.Linear, nn.Embedding, TransposedLinear)):
            return False
        return module.weight.shape[-1] % group_size == 0

    return predicate


def _cast(module: nn.Module, dtype: mx.Dtype) -> None:
    module.update(
        tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                 module.parameters())
    )


def _readme(source: str, options: dict, parts: Iterable[str]) -> str:
    lines = [
        "# Gemma 3n, converted for MLX",
        "",
        f"- Source: `{source}`",
        f"- Converted: {datetime.now(timezone.utc).isoformat(timespec='seconds')} by mlx-gemma3n",
        f"- Options: `{json.dumps(options)}`",
        f"- Parts besides the text decoder: {', '.join(parts) or 'none (text only)'}",
        "",
        "Load with `mlx_gemma3n.load(path)`. Gemma 3n is subject to the Gemma terms of use.",
    ]
    return "\n".join(lines) + "\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_dir_beside(out: Path) -> Path:
    if out.exists():
        raise ConversionError(f"output directory {out} already exists; remove it or pick another")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as e:
        raise ConversionError(f"cannot write to {parent}: {e.strerror or e}") from None


def _load(src: Path, drop: set):
    model = load_model(src, fuse=False)  # its modules as stored, to slice, cast and write
    parts = [p for p in model.parts if tower_of(p) not in drop]
    print(f"loading {src}: language_model {' '.join(parts)}")
    model.require(*parts)
    model.set_part_loader(None)
    for tower in drop:
        setattr(model.config, f"{tower}_config", None)
    _dequantize(model)
    return model, parts


def _dequantize(model) -> None:
    """A quantized source (ours, mlx-vlm's or mlx-lm's) becomes the float model it computes
    with, so that the options (dtype, -q) apply to every module as for an HF source."""
    replaced = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedTransposedLinear)):
            weight = dense_weight(module)
            if isinstance(module, nn.QuantizedEmbedding):
                plain = nn.Embedding(*weight.shape)
            elif isinstance(module, QuantizedTransposedLinear):
                plain = TransposedLinear(*weight.shape)
            else:
                plain = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
                if "bias" in module:
                    plain.bias = module.bias
            plain.weight = weight
            replaced.append((path, plain))
    model.update_modules(tree_unflatten(replaced))
    model.config.quantization = None


def _transpose_sparse_down(model) -> None:
    """Store down_proj transposed on the activation-sparse layers, so the sparse FFN kernel
    reads a surviving unit's weights as one row (text/transposed.py). Runs after
    `_dequantize`, so every down_proj is a float layer here."""
    text = model.config.text_config
    if text.sparse_down_proj_transposed:
        return
    layers = model.language_model.layers
    sparse = [l.mlp for l, s in zip(layers, text.activation_sparsity_pattern) if s > 0]
    for mlp in sparse:
        mlp.down_proj = TransposedLinear.from_linear(mlp.down_proj)
    text.sparse_down_proj_transposed = True


def _quantize(model, group_size: int, bits: int, audio_bits: int) -> None:
    nn.quantize(
        model.language_model, group_size=group_size, bits=bits, class_predicate=_should_quantize(group_size)
    )
    model.config.quantization = {"group_size": group_size, "bits": bits}
    if audio_bits and "audio_tower" in model:
        # The conformer's linears are 1.4 GB in bfloat16, more than the 4-bit E2B decoder.
        nn.quantize(
            model.audio_tower, group_size=group_size, bits=audio_bits, class_predicate=_should_quantize(group_size)
        )
        if any(isinstance(m, nn.QuantizedLinear) for m in model.audio_tower.modules()):
            model.config.quantization["audio_tower"] = {"group_size": group_size, "bits": audio_bits}


def _ple_output(model, dtype: mx.Dtype, group_size: int, bits: int):
    """(specs, row blocks) of the stored PLE table; `bits` 0 keeps it in `dtype`."""
    table = model.language_model.ple_table
    if bits and table.dims % group_size:
        bits = 0  # rows that do not split into groups stay unquantized
    if bits:
        model.config.quantization[PLE] = {"group_size": group_size, "bits": bits}
    specs = ple_specs(table.num_rows, table.dims, dtype, group_size, bits)
    return specs, quantize_blocks(table, dtype, group_size, bits), bits


def convert(
    hf_path: str,
    mlx_path: str,
    dtype: str = "bfloat16",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_ple_bits: int = 8,
    q_audio_bits: int = 8,
    drop: Iterable[str] = (),
    ffn_dims: Sequence[int] = (),
    skip_layers: Sequence[int] = (),
) -> Path:
    """Convert `hf_path` (directory or Hub id) into a new MLX checkpoint at `mlx_path`.

    `ffn_dims` / `skip_layers` cut a MatFormer Mix-n-Match slice (see `matformer.py`).
    Everything is written to a temporary directory beside `mlx_path` and renamed at the end:
    a failed or interrupted conversion leaves nothing at `mlx_path`."""
    if dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose from {sorted(DTYPES)}")
    out = Path(mlx_path).expanduser()
    _temp_dir_beside(out).rmdir()  # fail on a bad output location before the long work
    src = resolve_model_path(hf_path)
    drop = set(drop)
    model, parts = _load(src, drop)
    if ffn_dims or skip_layers:
        model = slice_model(model, ffn_dims, skip_layers)
    _cast(model, DTYPES[dtype])
    _transpose_sparse_down(model)
    if quantize:
        _quantize(model, q_group_size, q_bits, q_audio_bits)
    specs, blocks, ple_bits = _ple_output(model, DTYPES[dtype], q_group_size, q_ple_bits if quantize else 0)
    options = {"dtype": dtype, "quantize": quantize, "drop": sorted(drop)}
    if ffn_dims or skip_layers:
        options.update(ffn_dims=list(ffn_dims), skip_layers=list(skip_layers))
    if quantize:
        options.update(q_bits=q_bits, q_group_size=q_group_size, q_ple_bits=ple_bits, q_audio_bits=q_audio_bits)

    tmp = _temp_dir_beside(out)
    try:
        write_checkpoint(tmp, dict(tree_flatten(model.parameters())), specs, blocks)
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        for name in AUX_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        (tmp / "README.md").write_text(_readme(str(hf_path), options, parts))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

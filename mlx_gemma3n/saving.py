"""Writing MLX checkpoints: weight shards plus the per-layer embedding table in its own file."""

import json
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .file_tensors import write_streaming
from .text.ple import NAME as PLE

SHARD_BYTES = 2 << 30
PLE_FILE = "per_layer_embeddings.safetensors"

Specs = Dict[str, Tuple[mx.Dtype, tuple]]


def ple_specs(rows: int, dims: int, dtype: mx.Dtype, group_size: int, bits: int) -> Specs:
    """Names, dtypes and shapes of the stored PLE table (affine-quantized when `bits`)."""
    if not bits:
        return {f"{PLE}.weight": (dtype, (rows, dims))}
    return {
        f"{PLE}.weight": (mx.uint32, (rows, dims * bits // 32)),
        f"{PLE}.scales": (dtype, (rows, dims // group_size)),
        f"{PLE}.biases": (dtype, (rows, dims // group_size)),
    }


def _shards(weights: Dict[str, mx.array]) -> List[Dict[str, mx.array]]:
    shards, current, size = [], {}, 0
    for key in sorted(weights):
        nbytes = weights[key].nbytes
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = weights[key]
        size += nbytes
    return shards + [current] if current else shards


def write_checkpoint(
    out: Path,
    weights: Dict[str, mx.array],
    specs: Specs,
    ple_blocks: Iterable[Dict[str, mx.array]],
) -> None:
    """Write `weights` in shards of at most 2 GB and stream the PLE table (`specs`, row blocks)
    into its own file, where each token's row is one contiguous read; then the index.
    Shows a progress bar by bytes."""
    shards = _shards(weights)
    ple_bytes = sum(int(np.prod(shape)) * dt.size for dt, shape in specs.values())
    total = sum(w.nbytes for w in weights.values()) + ple_bytes
    index = {"metadata": {"total_size": total}, "weight_map": {}}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing") as bar:
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
            index["weight_map"].update({k: name for k in shard})
            bar.update(sum(w.nbytes for w in shard.values()))

        def counted():
            for block in ple_blocks:
                yield block
                bar.update(sum(b.nbytes for b in block.values()))

        write_streaming(out / PLE_FILE, specs, counted())
    index["weight_map"].update({k: PLE_FILE for k in specs})
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

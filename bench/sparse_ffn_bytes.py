"""Weight bytes one decode token reads in the FFNs of the activation-sparse layers: the
sparse FFN kernel (kernels/sparse_ffn.py) against the dense projections.

    python bench/sparse_ffn_bytes.py --shape E2B [--bits 4] [--group-size 64] [--tokens 64]

Builds one sparse layer's FFN with the real widths and random weights, quantized as the
converter does (`-q`: gate/up [hidden, dims], down stored transposed, all grouped along
dims), runs `--tokens` random tokens through the gate projection and counts the units the
gaussian top-k keeps. Dense decode reads all of gate, up and down; the sparse kernel reads
all of gate and, for each kept unit, its row of up and its row of down (one contiguous
range each). Reported per layer and for the model's sparse layers together.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_gemma3n.config import PRESETS, ModelConfig  # noqa: E402
from mlx_gemma3n.kernels.gated_gelu import gaussian_topk_cutoff  # noqa: E402
from mlx_gemma3n.text.mlp import MLP  # noqa: E402


def row_bytes(layer: nn.Module) -> int:
    """Bytes of one unit's row: packed weights plus its scales and biases."""
    return sum(layer[name][0].nbytes for name in ("weight", "scales", "biases") if name in layer)


def layer_bytes(layer: nn.Module) -> int:
    return sum(layer[name].nbytes for name in ("weight", "scales", "biases") if name in layer)


def kept_units(mlp: MLP, tokens: int) -> np.ndarray:
    """Units kept per token by the gaussian top-k, for random unit-RMS inputs."""
    x = mx.random.normal((tokens, 1, mlp.gate_proj["scales"].shape[1] * mlp.gate_proj.group_size))
    gate = mlp.gate_proj(x.astype(mx.bfloat16))
    cutoff = gaussian_topk_cutoff(gate, mlp._std_multiplier)
    return np.array((gate > cutoff).sum(axis=-1)).reshape(-1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(PRESETS), default="E2B")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args(argv)

    text = ModelConfig.from_dict(PRESETS[args.shape]).text_config
    sparse = [i for i, s in enumerate(text.activation_sparsity_pattern) if s > 0]
    layer = sparse[0]
    mx.random.seed(0)
    mlp = MLP(text.hidden_size, text.intermediate_size[layer],
              text.activation_sparsity_pattern[layer], transposed_down=True)
    mlp.set_dtype(mx.bfloat16)
    nn.quantize(mlp, group_size=args.group_size, bits=args.bits)
    kept = kept_units(mlp, args.tokens)

    gate, up, down = (layer_bytes(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    dense = gate + up + down
    per_unit = row_bytes(mlp.up_proj) + row_bytes(mlp.down_proj)
    sparse_bytes = gate + kept.mean() * per_unit
    n_units = text.intermediate_size[layer]
    mb = 1e6
    print(f"{args.shape}: {len(sparse)} sparse layers, {n_units} units x {text.hidden_size} dims, "
          f"{args.bits}-bit weights (groups of {args.group_size}), bfloat16 scales")
    print(f"kept units per token: mean {kept.mean():.1f} ({kept.mean() / n_units:.2%}), "
          f"min {kept.min()}, max {kept.max()} over {args.tokens} random tokens")
    print(f"per layer: dense {dense / mb:.2f} MB (gate {gate / mb:.2f} + up {up / mb:.2f} + "
          f"down {down / mb:.2f}); sparse kernel {sparse_bytes / mb:.2f} MB "
          f"(gate + {kept.mean():.0f} x {per_unit} B rows)")
    print(f"{args.shape} sparse FFNs per token: {len(sparse) * sparse_bytes / mb:.1f} MB with the "
          f"sparse kernel, {len(sparse) * dense / mb:.1f} MB dense "
          f"({sparse_bytes / dense:.2f}x)")


if __name__ == "__main__":
    main()

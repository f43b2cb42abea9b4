"""Command line for the converter."""

import argparse
import sys

from mlx_gemma3n.loading import CheckpointError

from .converter import DTYPES, ConversionError, convert
from .matformer import SliceError, parse_ints


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a Hugging Face Gemma 3n checkpoint to an MLX checkpoint.",
    )
    p.add_argument("--hf-path", required=True, help="HF checkpoint directory or Hub id")
    p.add_argument("--mlx-path", required=True, help="output directory (must not exist)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the text decoder")
    p.add_argument("--q-bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=64)
    p.add_argument(
        "--q-ple-bits",
        type=int,
        choices=(0, 4, 8),
        default=8,
        help="bits for the per-layer embedding table when quantizing (0: keep --dtype)",
    )
    p.add_argument(
        "--q-audio-bits",
        type=int,
        choices=(0, 4, 8),
        default=8,
        help="bits for the audio tower's linear layers when quantizing (0: keep --dtype)",
    )
    p.add_argument("--drop-audio", action="store_true", help="leave out the audio tower")
    p.add_argument("--drop-vision", action="store_true", help="leave out the vision tower")
    p.add_argument(
        "--ffn-dims",
        type=parse_ints,
        default=[],
        help="MatFormer slice: FFN size per layer, comma-separated (one value: every layer)",
    )
    p.add_argument(
        "--skip-layers", type=parse_ints, default=[], help="MatFormer slice: layer indices to drop"
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        out = convert(
            args.hf_path,
            args.mlx_path,
            dtype=args.dtype,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            q_ple_bits=args.q_ple_bits,
            q_audio_bits=args.q_audio_bits,
            drop=[t for t in ("audio", "vision") if getattr(args, f"drop_{t}")],
            ffn_dims=args.ffn_dims,
            skip_layers=args.skip_layers,
        )
    except (CheckpointError, ConversionError, SliceError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out}", file=sys.stderr)

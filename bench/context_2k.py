"""Peak RSS at a 2K context for E2B/E4B 4-bit, on a CPU too slow to prefill the full models.

A 1920-token prefill of the full E2B 4-bit decoder would take hours with MLX-CPU's quantized
matmul, so the 2K point is derived from two measurements:

1. the full 4-bit model's resident memory once loaded and past its first tokens (measured by
   `bench/memory.py`, passed in with --full-rss-gb);
2. what a 2K context adds on top of the weights -- activations of a prefill chunk and
   the KV caches -- measured on a *stand-in* with the real widths but only the two layers the
   KV-shared layers read from, cut from the same HF checkpoint with our MatFormer slicing
   (`--skip-layers`), run in bfloat16 like the real 4-bit model, or with --dtype float32
   (fast on CPU with OpenBLAS; float32 activations and caches are twice the bfloat16 ones,
   so that over-estimates).

Activations are freed layer by layer, so their peak does not grow with depth; the KV caches of
the other non-shared layers are added exactly from their shapes (bfloat16).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python bench/context_2k.py --hf /work/bench-cache/E2B-hf --full-rss-gb 1.50 --target-gb 1.8 \\
        [--dtype bfloat16]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlx_gemma3n.generation import PREFILL_CHUNK

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("BENCH_CACHE", "/work/bench-cache"))

WORKER = """
import json, sys, time
import mlx.core as mx, numpy as np
from pathlib import Path
from mlx_gemma3n.loading import load_model
from mlx_gemma3n.generation import generate_step

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

def kv_bytes(cache):
    return sum(c.keys.nbytes + c.values.nbytes for c in cache)

path, n_prompt, n_gen, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = load_model(Path(path))
mx.eval(model.parameters())
loaded, weights = status("VmRSS"), mx.get_active_memory()
ids = mx.array(np.random.default_rng(0).integers(10, 200_000, n_prompt))
cache = model.make_cache()
t = time.perf_counter()
mx.reset_peak_memory()
steps = generate_step(model, ids, cache, max_tokens=n_gen, prefill_step_size=chunk)
next(steps)  # the prefill, and the first token
prefill = {"prefill_mlx_peak": mx.get_peak_memory(), "prefill_end_active": mx.get_active_memory(),
           "prefill_end_allocator_cache": mx.get_cache_memory(), "prefill_end_kv": kv_bytes(cache),
           "prefill_end_rss": status("VmRSS"), "prefill_hwm": status("VmHWM")}
mx.reset_peak_memory()
n = 1 + sum(1 for _ in steps)
print(json.dumps({"loaded_rss": loaded, "weights_mlx": weights, "peak_rss": status("VmHWM"), "tokens": n,
                  "seconds": time.perf_counter() - t, "decode_mlx_peak": mx.get_peak_memory(),
                  "end_kv": kv_bytes(cache), "end_allocator_cache": mx.get_cache_memory(), **prefill}))
"""


def standin(hf: Path, dtype: str) -> Path:
    """Two-layer 4-bit stand-in: the last sliding and the last global non-shared layer."""
    config = json.loads((hf / "config.json").read_text())["text_config"]
    n, shared = config["num_hidden_layers"], config["num_kv_shared_layers"]
    types = config["layer_types"]
    first = n - shared
    keep = {max(i for i in range(first) if types[i] == t) for t in set(types)}
    out = CACHE / f"{hf.name}-standin-2layer-4bit-{dtype}"
    if not out.exists():
        skip = ",".join(str(i) for i in range(n) if i not in keep)
        subprocess.run(
            [sys.executable, "-m", "convert", "--hf-path", str(hf), "--mlx-path", str(out), "--dtype", dtype,
             "-q", "--q-bits", "4", "--drop-audio", "--drop-vision", "--skip-layers", skip],
            check=True, cwd=HERE.parent,
        )
    return out


def other_kv_bytes(hf: Path, context: int, chunk: int) -> int:
    """bfloat16 K+V bytes, at `context` tokens, of the non-shared layers the stand-in lacks
    (all but one sliding and one global layer). A sliding cache holds up to window + chunk - 1
    tokens while a prefill chunk is appended."""
    c = json.loads((hf / "config.json").read_text())["text_config"]
    first = c["num_hidden_layers"] - c["num_kv_shared_layers"]
    per_token = 2 * c["num_key_value_heads"] * c["head_dim"] * 2
    sliding = min(context, c["sliding_window"] + chunk - 1)
    types = c["layer_types"][:first]
    n_sliding, n_global = types.count("sliding_attention") - 1, types.count("full_attention") - 1
    return (n_sliding * sliding + n_global * context) * per_token


def parts(m: dict) -> dict:
    """What the stand-in holds beyond its weights (MLX's own counters), in GB: its KV caches,
    a prefill chunk's transient activations on top of weights and caches, what MLX's
    allocator keeps cached after the prefill, a decode step's transients."""
    gb = 1e-9
    return {
        "kv_after_prefill": m["prefill_end_kv"] * gb,
        "kv_at_end": m["end_kv"] * gb,
        "prefill_chunk_transient": (m["prefill_mlx_peak"] - m["weights_mlx"] - m["prefill_end_kv"]) * gb,
        "allocator_cache_after_prefill": m["prefill_end_allocator_cache"] * gb,
        "decode_transient": (m["decode_mlx_peak"] - m["prefill_end_active"]) * gb,
        "rss_over_loaded_after_prefill": (m["prefill_hwm"] - m["loaded_rss"]) * gb,
        "rss_over_loaded_at_end": (m["peak_rss"] - m["loaded_rss"]) * gb,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", type=Path, required=True)
    p.add_argument("--full-rss-gb", type=float, required=True, help="measured by bench/memory.py")
    p.add_argument("--target-gb", type=float)
    p.add_argument("--prompt", type=int, default=1920)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--prefill-step", type=int, default=PREFILL_CHUNK, help="tokens per prefill chunk")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="float32",
        help="stand-in activations: bfloat16 as the real 4-bit model, or float32 (fast, over-estimates)",
    )
    args = p.parse_args()
    model = standin(args.hf, args.dtype)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WORKER, str(model), str(args.prompt), str(args.gen), str(args.prefill_step)],
                       capture_output=True, text=True, check=True, cwd=HERE.parent)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    added = m["peak_rss"] - m["loaded_rss"]
    kv = other_kv_bytes(args.hf, args.prompt + args.gen, args.prefill_step)
    estimate = args.full_rss_gb * 1e9 + added + kv
    report = {
        "checkpoint": str(args.hf), "standin": str(model), "context": args.prompt + args.gen,
        "standin_loaded_gb": m["loaded_rss"] / 1e9, "standin_peak_gb": m["peak_rss"] / 1e9,
        "context_overhead_gb": added / 1e9, "other_layers_kv_gb": kv / 1e9,
        "full_rss_gb": args.full_rss_gb, "estimated_peak_gb": estimate / 1e9,
        "target_gb": args.target_gb, "standin_seconds": m["seconds"], "wall_s": time.perf_counter() - t,
        "standin_parts_gb": parts(m),
        "standin_dtype": args.dtype, "prefill_step": args.prefill_step,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

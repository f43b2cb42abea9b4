"""Memory and time an op takes at the shapes of a Gemma 3n prefill.

MLX-CUDA measured E2B/E4B 4-bit at 1920 + 128 tokens with an MLX peak 0.35-0.7 GB above the
weights (H200, 2026-11-26), while on MLX-CPU the same run stays within ~0.16 GB (activations
of a 256-token chunk and the caches). Peak memory counts what a backend allocates inside an
op as well (a dequantized copy of a weight for a matrix-matrix product, a score matrix in
attention), which a graph does not show. This measures it per op, on whatever device MLX
uses: the MLX peak during the op minus what was live before it and its output; and the op's
median time over a few evaluations after a first (compiling) one.

Besides the projections as stored for dense layers (transpose=True), the activation-sparse
layers' down_proj as the converter stores it, [ffn, hidden] (transpose=False: MLX-CUDA 0.32
routes that to its generic quantized matmul, not the Hopper/Ampere ones), and the alternative
of dequantizing it for a plain matmul. "package matmul" is what the model runs
(mlx_gemma3n/quantized.py): MLX's quantized matmul on an accelerator, dequantized blocks and
a float32 matmul for several rows on the CPU.

    python bench/peak_probe.py [--shape E2B|E4B] > probe.jsonl      # one JSON line per case
    python bench/peak_probe.py --shape E2B --dtype float32 --rows 1,8,256 --ops qmm,package

Activations are bfloat16 as in the GPU runs; `--dtype float32` for a quick run on MLX-CPU
(whose bfloat16 quantized matmul takes minutes at these sizes).
"""

import argparse
import json
import statistics
import time

import mlx.core as mx

from mlx_gemma3n.quantized import quantized_matmul

# Real widths (hidden, FFN, q heads, kv heads, head dim, vocab).
SHAPES = {"E2B": (2048, 8192, 8, 2, 256, 262144), "E4B": (2048, 16384, 8, 2, 256, 262144),
          "tiny": (128, 512, 2, 1, 64, 512)}  # tiny: bench/device_run.py's dry run
MB = 1e6


def extra_mb(build) -> float:
    """Peak during `build()`'s evaluation over what was live before it plus its output."""
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = build()
    mx.eval(out)
    mx.synchronize()
    outputs = sum(o.nbytes for o in (out if isinstance(out, (list, tuple)) else [out]))
    return (mx.get_peak_memory() - before - outputs) / MB


def median_ms(build, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(build())
        mx.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def quantized(rows: int, cols: int, dtype: mx.Dtype):
    w = mx.random.normal((rows, cols)).astype(dtype)
    parts = mx.quantize(w, group_size=64, bits=4)
    mx.eval(parts)
    return parts


def cases(shape: str, dtype: mx.Dtype, rows, keep):
    hidden, ffn, heads, kv_heads, head_dim, vocab = SHAPES[shape]
    weights = {"up (hidden->ffn)": quantized(ffn, hidden, dtype), "down (ffn->hidden)": quantized(hidden, ffn, dtype),
               "q/k/v joined": quantized((heads + 2 * kv_heads) * head_dim, hidden, dtype)}
    for name, (wq, scales, biases) in weights.items():
        for m in rows:
            x = mx.random.normal((1, m, wq.shape[1] * 8)).astype(dtype)
            mx.eval(x)
            yield f"qmm {name}", {"M": m}, lambda x=x, wq=wq, s=scales, b=biases: mx.quantized_matmul(
                x, wq, s, b, transpose=True, group_size=64, bits=4)
            yield f"package matmul {name}", {"M": m}, lambda x=x, wq=wq, s=scales, b=biases: quantized_matmul(
                x, wq, s, b, True, 64, 4)
        del wq, scales, biases
    weights.clear()
    wq, scales, biases = quantized(ffn, hidden, dtype)  # [ffn, hidden]: the sparse layers' down_proj
    for m in rows:
        x = mx.random.normal((1, m, ffn)).astype(dtype)
        mx.eval(x)
        yield "qmm down stored transposed (transpose=False)", {"M": m}, lambda x=x: mx.quantized_matmul(
            x, wq, scales, biases, transpose=False, group_size=64, bits=4)
        yield "package matmul down stored transposed", {"M": m}, lambda x=x: quantized_matmul(
            x, wq, scales, biases, False, 64, 4)
        if m > 1:
            yield "dequantize + matmul, down stored transposed", {"M": m}, lambda x=x: x @ mx.dequantize(
                wq, scales, biases, group_size=64, bits=4)
    del wq, scales, biases
    if keep("tied logits"):  # a vocabulary-sized weight
        embed = quantized(vocab, hidden, dtype)
        x = mx.random.normal((1, 1, hidden)).astype(dtype)
        yield "tied logits (qmv)", {"M": 1}, lambda: mx.quantized_matmul(
            x, *embed, transpose=True, group_size=64, bits=4)
        del embed
    if not keep("sdpa"):
        return
    for queries, keys in ((256, 512 + 255), (256, 2048), (1920, 2048)):
        q = mx.random.normal((1, heads, queries, head_dim)).astype(dtype)
        k, v = (mx.random.normal((1, kv_heads, keys, head_dim)).astype(dtype) for _ in range(2))
        mask = mx.arange(keys)[None] <= (mx.arange(queries)[:, None] + keys - queries)
        mx.eval(q, k, v, mask)
        yield "sdpa", {"queries": queries, "keys": keys}, lambda q=q, k=k, v=v, m=mask: (
            mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=m))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="E4B")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--repeats", type=int, default=5, help="timed evaluations per case")
    p.add_argument("--rows", default="1,8,256,1920", help="rows (tokens) of the matmuls")
    p.add_argument("--ops", default="", help="only ops starting with one of these (comma-separated)")
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    wanted = tuple(o for o in args.ops.split(",") if o)

    def keep(op):
        return not wanted or op.startswith(wanted)

    for op, dims, build in cases(args.shape, getattr(mx, args.dtype), rows, keep):
        if not keep(op):
            continue
        extra_mb(build)  # the first run compiles kernels, which may allocate
        print(json.dumps({"shape": args.shape, "op": op, **dims, "extra_mb": round(extra_mb(build), 2),
                          "ms": round(median_ms(build, args.repeats), 4), "dtype": args.dtype,
                          "device": str(mx.default_device()), "mlx": mx.__version__}), flush=True)


if __name__ == "__main__":
    main()

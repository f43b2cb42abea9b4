"""Host time per prefill chunk: what the device waited for between chunks before the
prefill overlapped them (generation.prefill queues a chunk with mx.async_eval and reads the
next chunk's per-layer-embedding rows and builds its graph while it runs).

Per chunk of --chunk random ids after --context positions (synthetic: synthetic_context.py),
on the benchmark checkpoint (ours), medians over --repeats:
    ple read   `per_layer_embeddings`: the rows read from the file, dequantized (evaluated)
    build      the graph of the layers that write a cache (what a prefill chunk before the
               prompt's last position builds), not evaluated
    build all  the graph of every layer (what such a chunk built before), not evaluated
The caches are refilled before each build, so no chunk's graph is ever evaluated.
`--matmul mlx` builds MLX's quantized matmul for every row count, as on an accelerator
(the CPU's dequantized blocks put hundreds of ops in each layer's graph).

    nice python bench/prefill_host.py --shape E2B
"""

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import mlx.core as mx
import numpy as np
from host_time import CACHE, _load
from synthetic_context import fill_cache

from mlx_gemma3n.quantized import mlx_matmul


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("E2B", "E4B", "tiny"), default="E2B")
    p.add_argument("--cache-dir", type=Path, default=CACHE)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--matmul", choices=("blocks", "mlx"), default="blocks",
                   help="mlx: MLX's quantized matmul for any row count (the CPU's blocks are the default)")
    args = p.parse_args(argv)

    model_dir = args.cache_dir / f"{args.shape}-ours-4bit"
    model = _load("ours", model_dir, float32=False)
    lm = model.language_model
    text = json.loads((model_dir / "config.json").read_text())["text_config"]
    rng = np.random.default_rng(0)
    read, build, build_all = [], [], []

    def filled():
        cache = model.make_cache()
        fill_cache(cache, text["num_key_value_heads"], text["head_dim"], args.context, mx.bfloat16)
        return cache

    for _ in range(args.repeats):
        ids = mx.array(rng.integers(3, text["vocab_size_per_layer_input"], (1, args.chunk)))
        embeds = model.embed_inputs(ids)
        mx.eval(embeds)
        t = time.perf_counter()
        per_layer = lm.per_layer_embeddings(ids)
        mx.eval(per_layer)
        read.append(time.perf_counter() - t)
        for outputs, times in (("none", build), ("all", build_all)):
            cache = filled()
            with mlx_matmul() if args.matmul == "mlx" else nullcontext():
                t = time.perf_counter()
                lm(embeds, per_layer, cache, outputs=outputs)
                times.append(time.perf_counter() - t)
    ms = {k: 1e3 * statistics.median(v) for k, v in (("ple read", read), ("build", build), ("build all", build_all))}
    print(f"{args.shape} host ms per chunk of {args.chunk} after {args.context} (median of "
          f"{args.repeats}, mlx {mx.__version__} {mx.default_device()}, matmul {args.matmul}): "
          + ", ".join(f"{k} {v:.1f}" for k, v in ms.items())
          + f", total {ms['ple read'] + ms['build']:.1f} (before: {ms['ple read'] + ms['build all']:.1f})")


if __name__ == "__main__":
    main()

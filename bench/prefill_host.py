"""Host time per prefill chunk: what the device waited for between chunks before the
prefill overlapped them (generation.prefill queues a chunk with mx.async_eval and reads the
next chunk's per-layer-embedding rows and builds its graph while it runs).

Per chunk of --chunk random ids after --context positions (synthetic: synthetic_context.py),
on the benchmark checkpoint (ours), medians over --repeats:
    ple read   `per_layer_embeddings`: the rows read from the file, dequantized (evaluated)
    build      the decoder's graph over the caches, not evaluated
The caches are refilled before each repeat, so no chunk's graph is ever evaluated.

    nice python bench/prefill_host.py --shape E2B
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from host_time import CACHE, _load
from synthetic_context import fill_cache


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("E2B", "E4B", "tiny"), default="E2B")
    p.add_argument("--cache-dir", type=Path, default=CACHE)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    model_dir = args.cache_dir / f"{args.shape}-ours-4bit"
    model = _load("ours", model_dir, float32=False)
    lm = model.language_model
    text = json.loads((model_dir / "config.json").read_text())["text_config"]
    rng = np.random.default_rng(0)
    read, build = [], []
    for _ in range(args.repeats):
        cache = model.make_cache()
        fill_cache(cache, text["num_key_value_heads"], text["head_dim"], args.context, mx.bfloat16)
        ids = mx.array(rng.integers(3, text["vocab_size_per_layer_input"], (1, args.chunk)))
        embeds = model.embed_inputs(ids)
        mx.eval(embeds)
        t = time.perf_counter()
        per_layer = lm.per_layer_embeddings(ids)
        mx.eval(per_layer)
        read.append(time.perf_counter() - t)
        t = time.perf_counter()
        lm(embeds, per_layer, cache)
        build.append(time.perf_counter() - t)
    ms = {k: 1e3 * statistics.median(v) for k, v in (("ple read", read), ("build", build))}
    print(f"{args.shape} host ms per chunk of {args.chunk} after {args.context} (median of "
          f"{args.repeats}, mlx {mx.__version__} {mx.default_device()}): "
          + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()) + f", total {sum(ms.values()):.1f}")


if __name__ == "__main__":
    main()

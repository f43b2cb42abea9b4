"""Where a prefill's time goes: per chunk, and over the chunks the per-layer-embedding read,
each decoder layer (its FFN apart) and the rest, on the benchmark checkpoints (ours).

Each timed part is evaluated on its own (layers, then their FFNs), so parts do not overlap
and the sum is a little above an untimed prefill. Only what the real prefill computes is
timed: the KV-shared layers run for the last position alone (`generation.prefill`). The
context before the timed chunks can be synthetic (--context: random keys/values in the
caches, bench/synthetic_context.py), so that a chunk late in a long prompt costs minutes, not hours,
on MLX-CPU.

    nice python bench/prefill_profile.py --shape E2B --context 448 --prompt 64 --chunk 64

--untimed: the real prefill's wall time alone (its chunks overlapped as generation.prefill
queues them), with the MLX peak over the loaded model and the process's peak RSS.
--matmul mlx: MLX's quantized matmul for every row count instead of the CPU's dequantized
blocks (mlx_gemma3n/quantized.py), the comparison for them:

    nice python bench/prefill_profile.py --shape E2B --context 0 --prompt 257 --chunk 256 --untimed [--matmul mlx]
"""

import argparse
import json
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import mlx.core as mx
import numpy as np
from host_time import CACHE, _load
from synthetic_context import fill_cache
from worker import MiB, ru_maxrss_mib

from mlx_gemma3n.generation import prefill
from mlx_gemma3n.quantized import mlx_matmul
from mlx_gemma3n.text.decoder import PendingStreams


class Timed:
    """Stands in for a module: runs it, evaluates its output, adds the seconds to `log[key]`
    and to its chunk's total. With `inputs_key`, its inputs are evaluated first and charged
    there (for an FFN: everything of its layer before it). A layer called without a cache on
    more than one position is a KV-shared layer before the last position, which the prefill
    never evaluates: it and its FFN stay lazy."""

    lazy = False  # set while such a layer builds its graph
    chunk = -1

    def __init__(self, module, log: dict, key: str, inputs_key: str = ""):
        self.module, self.log, self.key, self.inputs_key = module, log, key, inputs_key

    def _eval(self, key: str, arrays) -> None:
        t = time.perf_counter()
        mx.eval(arrays)
        dt = time.perf_counter() - t
        self.log[key] += dt
        self.log[f"chunk {Timed.chunk}"] += dt

    def __call__(self, *args, **kwargs):
        is_layer = self.key.startswith("layer")
        if is_layer:
            streams = args[0]  # a layer's input: the streams, or the previous layer's pending ones
            tokens = (streams.corrected if isinstance(streams, PendingStreams) else streams).shape[2]
            Timed.lazy = kwargs.get("cache") is None and tokens > 1
        if self.key == "ple read":  # called once per chunk, first
            Timed.chunk += 1
        if self.inputs_key and not Timed.lazy:
            self._eval(self.inputs_key, args)
        out = self.module(*args, **kwargs)
        if not Timed.lazy:
            self._eval(self.key, out)
        if is_layer:
            Timed.lazy = False
        return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("E2B", "E4B", "tiny"), default="E2B")
    p.add_argument("--cache-dir", type=Path, default=CACHE)
    p.add_argument("--context", type=int, default=448, help="synthetic positions before the prompt")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--as-stored", dest="float32", action="store_false", help="stored dtype instead of float32")
    p.add_argument("--untimed", action="store_true",
                   help="the prefill's wall time and memory alone, its parts not evaluated one by one")
    p.add_argument("--matmul", choices=("blocks", "mlx"), default="blocks",
                   help="mlx: MLX's quantized matmul for any row count (the CPU's blocks are the default)")
    args = p.parse_args(argv)

    model_dir = args.cache_dir / f"{args.shape}-ours-4bit"
    model = _load("ours", model_dir, args.float32)
    lm = model.language_model
    text = json.loads((model_dir / "config.json").read_text())["text_config"]
    cache = model.make_cache()
    if args.context:
        fill_cache(cache, text["num_key_value_heads"], text["head_dim"], args.context,
                   mx.float32 if args.float32 else mx.bfloat16)
    log = defaultdict(float)
    for i, layer in enumerate([] if args.untimed else lm.layers):
        layer.mlp = Timed(layer.mlp, log, f"{i:02d} ffn", inputs_key=f"{i:02d} before ffn")
        lm.layers[i] = Timed(layer, log, f"layer {i:02d}")
    if not args.untimed:
        # the file reads run on the prefill's reader thread; this is the rows' dequantization
        lm.per_layer_embeddings_of = Timed(lm.per_layer_embeddings_of, log, "ple read")

    ids = mx.array(np.random.default_rng(0).integers(3, text["vocab_size_per_layer_input"], (1, args.prompt)))
    embeds = model.embed_inputs(ids)
    mx.eval(embeds)
    loaded = mx.get_active_memory()
    mx.reset_peak_memory()
    t = time.perf_counter()
    with mlx_matmul() if args.matmul == "mlx" else nullcontext():
        mx.eval(prefill(model, ids, embeds, cache, args.chunk))
    total = time.perf_counter() - t
    chunks = sum(v for k, v in log.items() if k.startswith("chunk"))
    print(f"{args.shape} prefill of {args.prompt} tokens after {args.context} (chunks of {args.chunk}), "
          f"{'float32' if args.float32 else 'stored dtype'}, mlx {mx.__version__} {mx.default_device()}: "
          f"{total:.1f} s" + ("" if args.untimed else
                              "; 'layer NN' is a layer's part after its FFN (AltUp correction, PLE gate)"))
    if args.untimed:
        print(f"  matmul {args.matmul}: MLX peak over the loaded model "
              f"{(mx.get_peak_memory() - loaded) / 1e9:.3f} GB, process peak RSS {ru_maxrss_mib() * MiB / 1e9:.3f} GB")
        return
    for key in sorted(log):
        print(f"  {key:<15} {log[key]:8.2f} s  {100 * log[key] / total:5.1f}%")
    print(f"  {'rest':<15} {total - chunks:8.2f} s  {100 * (total - chunks) / total:5.1f}%  (AltUp exit, logits)")


if __name__ == "__main__":
    main()

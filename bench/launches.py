"""Primitives one decode step launches at a 2K context: fused kernels against the reference ops.

    python bench/launches.py --shape E2B [--verbose]

Builds the text decoder with the real E2B/E4B shapes and random 4-bit weights (no
checkpoint, never evaluated; q/k/v and gate/up joined as `load` joins them), fills the KV caches to 2047 tokens and builds the graph of one
token (embedding -> decoder -> logits) without running it. Counted: the primitives that
depend on the step's inputs (the token id and its per-layer-embedding rows, which are read on
the host), views excluded, a compiled function as one.

MLX-CPU would expand the `mx.fast` ops (rms_norm, rope, sdpa) and `mx.dequantize` into
their fallback ops, and it has no Metal kernels to build, so both are replaced here by
stand-ins that are one primitive each, as they are on a GPU: the kernel factory
(`kernels.use_factory`) returns stand-ins called with exactly the launch arguments the Metal
kernels get.
"""

import argparse
import copy
import re
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert.converter import _should_quantize  # noqa: E402  (the converter's choice)
from mlx_gemma3n.config import PRESETS, ModelConfig  # noqa: E402
from mlx_gemma3n.kernels import set_kernels, use_factory  # noqa: E402
from mlx_gemma3n.model import Gemma3n  # noqa: E402
from mlx_gemma3n.text.concat import fuse_projections  # noqa: E402
from synthetic_context import fill_cache  # noqa: E402

# Primitives that only re-describe memory: no launch.
VIEWS = {
    "AsStrided", "Broadcast", "BroadcastAxes", "ExpandDims", "Flatten", "Reshape", "Slice",
    "Split", "Squeeze", "StopGradient", "Transpose", "Unflatten",
}
_NODE = re.compile(r'^\{ (\d+) \[label ="([^"]+)"')
_EDGE = re.compile(r'^"?([^"\s]+)"? -> "?([^"\s]+)"?$')


def _like_first(x, *args, **kwargs):
    return x.shape, x.dtype


def _attention(q, k, v, *args, **kwargs):
    return (*q.shape[:-1], v.shape[-1]), q.dtype


def _dequantized(w, scales, *args, bits=None, **kwargs):
    return (*w.shape[:-1], w.shape[-1] * 32 // (bits or 4)), scales.dtype


# Ops that are one kernel on a GPU but that MLX-CPU expands into its fallback ops:
# (namespace, name, the output's (shape, dtype) from the call's arguments).
GPU_SINGLE_KERNELS = [
    (mx.fast, "rms_norm", _like_first),
    (mx.fast, "layer_norm", _like_first),
    (mx.fast, "rope", _like_first),
    (mx.fast, "scaled_dot_product_attention", _attention),
    (mx, "dequantize", _dequantized),
]


def one_primitive(inputs, shapes, dtypes) -> list:
    """Outputs of the given shapes that depend on `inputs` through a single primitive."""
    outputs = [mx.zeros(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes)]
    return mx.depends(outputs, [a for a in inputs if isinstance(a, mx.array)])


class StandIns:
    """One-primitive stand-ins for the fused kernels and the GPU_SINGLE_KERNELS ops; counts
    the calls."""

    def __init__(self):
        self.calls = Counter()

    def kernel_factory(self, name, input_names, output_names, source, header="", **options):
        def kernel(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **_):
            assert len(inputs) == len(input_names) and len(output_shapes) == len(output_names)
            self.calls[f"kernel {name}"] += 1
            return one_primitive(inputs, output_shapes, output_dtypes)

        return kernel

    def single_kernel(self, name: str, output):
        def op(*args, **kwargs):
            self.calls[name] += 1
            shape, dtype = output(*args, **kwargs)
            return one_primitive([*args, *kwargs.values()], [shape], [dtype])[0]

        return op

    @contextmanager
    def installed(self):
        saved = [(space, name, getattr(space, name)) for space, name, _ in GPU_SINGLE_KERNELS]
        try:
            for space, name, output in GPU_SINGLE_KERNELS:
                setattr(space, name, self.single_kernel(f"mx.{name}", output))
            with use_factory(self.kernel_factory, self_check=False):
                yield
        finally:
            for space, name, op in saved:
                setattr(space, name, op)


def build(shape: str, bits: int, dtype: mx.Dtype) -> Gemma3n:
    config = copy.deepcopy(PRESETS[shape])
    # as the converter stores the sparse layers' down_proj (kernels/sparse_ffn.py reads it)
    config["text_config"]["sparse_down_proj_transposed"] = True
    model = Gemma3n(ModelConfig.from_dict(config))
    lm = model.language_model
    lm.update(tree_map(lambda a: a.astype(dtype), lm.parameters()))
    if bits:
        nn.quantize(lm, group_size=64, bits=bits, class_predicate=_should_quantize(64))
    fuse_projections(lm)  # as load_model does
    return model


def filled_cache(model: Gemma3n, context: int, dtype: mx.Dtype) -> list:
    c = model.config.text_config
    cache = model.make_cache()
    fill_cache(cache, c.num_key_value_heads, c.head_dim, context - 1, dtype)
    return cache


def step_graph(model: Gemma3n, cache: list, dot: Path, dtype: mx.Dtype) -> None:
    """Write the graph of one decode step to `dot`."""
    c = model.config.text_config
    lm = model.language_model
    ids = mx.zeros((1, 1), dtype=mx.int32)
    rows = mx.zeros((1, 1, c.num_hidden_layers, c.hidden_size_per_layer_input), dtype=dtype)
    mx.eval(ids, rows)
    logits = model.logits(lm(lm.embed(ids), rows, cache))
    states = [a for layer_cache in cache for a in (layer_cache.keys, layer_cache.values)]
    mx.export_to_dot(str(dot), logits, *states, ids=ids, per_layer_rows=rows)


def count(dot: Path) -> Counter:
    """Launching primitives downstream of the named inputs, by name. A primitive's id can
    recur (a compiled function's calls share one), so each declaration is its own node and
    the edges after it are its own."""
    nodes = []  # [name, input arrays, output arrays]
    for line in dot.read_text().splitlines():
        line = line.strip()
        if m := _NODE.match(line):
            nodes.append((m[2], [], []))
        elif (m := _EDGE.match(line)) and nodes:
            src, dst = m[1], m[2]
            name, inputs, outputs = nodes[-1]
            (outputs if src.isdigit() else inputs).append(dst if src.isdigit() else src)
    tainted = {"ids", "per_layer_rows"}
    live = Counter()
    for name, inputs, outputs in nodes:  # DOT lists a node after the producers of its inputs
        if tainted.intersection(inputs):
            tainted.update(outputs)
            if name not in VIEWS:
                live[name] += 1
    return live


def launches(model: Gemma3n, context: int, kernels: bool, dtype: mx.Dtype):
    """(primitives by name, stand-in calls by op) of one decode step."""
    cache = filled_cache(model, context, dtype)
    set_kernels(model, kernels)
    stand_ins = StandIns()
    with tempfile.TemporaryDirectory() as tmp, stand_ins.installed():
        dot = Path(tmp) / "step.dot"
        step_graph(model, cache, dot, dtype)
        return count(dot), stand_ins.calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(PRESETS), required=True)
    p.add_argument("--context", type=int, default=2048, help="tokens in the cache after the step")
    p.add_argument("--bits", type=int, default=4, choices=(0, 4, 8), help="0: unquantized")
    p.add_argument("--verbose", action="store_true", help="print the count per primitive")
    args = p.parse_args()

    dtype = mx.bfloat16
    model = build(args.shape, args.bits, dtype)
    fused, fused_calls = launches(model, args.context, True, dtype)
    reference, reference_calls = launches(model, args.context, False, dtype)
    if args.verbose:
        print(f"{'primitive':>40} {'kernels':>8} {'reference':>9}")
        for name in sorted(set(fused) | set(reference), key=lambda n: -reference[n]):
            print(f"{name:>40} {fused[name]:8d} {reference[name]:9d}")
        print("of the Depends stand-ins:")
        for name in sorted(set(fused_calls) | set(reference_calls)):
            print(f"{name:>40} {fused_calls[name]:8d} {reference_calls[name]:9d}")
    n, m = sum(fused.values()), sum(reference.values())
    print(f"{args.shape} decode step: {n} primitives with kernels, {m} reference")


if __name__ == "__main__":
    main()

"""One prefill chunk's graph, ours against mlx-vlm 0.7.10's gemma3n, counted per layer.

    nice python bench/prefill_graph.py --shape E4B [--verbose]

Why a graph and not a clock: the GPU where mlx-vlm's prefill ran 1.5x faster per computed
layer is not available here, and on MLX-CPU the 4-bit matmuls hide everything else. The
graph is what the GPU would run, hardware aside, so it is built (never evaluated) and walked
through `mx.export_function`'s callback, which gives every primitive with its inputs' and
outputs' shapes and dtypes.

The model: the E2B/E4B text decoder with the real widths but six computed layers (sliding /
full, activation-sparse and dense, as in the first 20 of the real ones; KV-shared layers run
for the last position only in our prefill) and small vocabularies (the gather of a row does
not depend on how many rows there are), random 4-bit weights (group 64, as the benchmark
checkpoints; ours through our converter's choice of layers, its transposed sparse down_proj
and the q/k/v, gate/up joins `load` makes), bfloat16 activations, the PLE table read from a
file as `load` reads it. A chunk is 256 tokens after 1024 in the caches (our default chunk,
mid-prompt) or 1920 tokens from an empty cache (mlx-vlm's default prefill_step_size 2048
takes a 1920-token prompt in one chunk).

Counted, per layer (primitives between the layer's inputs and outputs):
  launches  primitives that run a kernel: views (reshape, slice, transpose, broadcast, ...)
            excluded; a compiled function (mlx.nn's activations, our gated GELU, mlx-vlm's
            gelu_topk) and each `mx.fast` op and `mx.dequantize` count as one, as on a GPU
            (MLX-CPU would expand them; they are replaced by one-primitive stand-ins here)
  bytes     written by those launches (dtype size x elements of every output)
  GFLOP     of the matmuls (quantized or not) and the attention
  f32>=LxD  float32 outputs of at least L x hidden elements
  casts     casts (AsType) of at least L x hidden elements
  big       outputs of at least L x L or L x intermediate elements
  copies    launches that only move data (concatenate, copy, slice update, gather, a cast
            of >= L x D elements) and the implicit copies MLX makes: a reshape of a view
            that strides cannot describe, and a strided view read by a kernel that needs
            row-contiguous input (quantized matmul, the fast norms)
  fixed     launches that do not depend on the chunk's data (the same on every chunk)

Kernels: on a CUDA GPU (kernels/base.py: `mx.fast.cuda_kernel` is the factory when the
default device is a CUDA GPU) and on Metal our fused kernels run where a call site asks for
one; without a factory (MLX-CPU) the reference ops run. "kernels on" stands the factory in
with one-primitive kernels (the launch arguments are the real ones). Until this change every
call site asked only for one token per row (decode), so a GPU prefill chunk built exactly the
"kernels off" graph.

Findings (per layer; E2B, chunk of 256 after 1024; launches / MiB written; before -> after;
`git archive` of the commit before, run with this script, gives "before"):
  1. A GPU prefill ran the reference ops: 56 / 68.5 per dense layer, 66 / 76.6 per sparse
     one. The row kernels (AltUp predict with the PLE residual, attention residual, AltUp
     correct, stream entry/exit, the sparse layers' gated GELU with the gaussian top-k) take
     one threadgroup per token and the q/k/v norm + RoPE kernel now takes L tokens, so they
     run at a chunk too: 18 / 36.3 dense, 19 / 36.3 sparse (mlx-vlm 70 / 113.2). E4B at 1920
     tokens in one chunk: 54 / 593 -> 16 / 351 (mlx-vlm 72 / 958).
  2. Sparse layers, reference path: the top-k statistics wrote two [L, intermediate]
     temporaries (x - mean and its square) in 5 launches; the kernel keeps them in registers.
  3. The PLE residual concatenated the four streams after adding to three (2 launches,
     7 x L x D written): now one compiled pass (1 launch, 4 x L x D).
  4. Work repeated on every chunk: the AltUp coefficient maps clipped, 4 launches per layer
     (now once, at load). Left, per chunk, not per layer: the sliding-window mask (6
     launches, as in mlx-vlm), the full caches' growth by 256 zeros (mlx-lm's KVCache, both).
  5. No float32 temporary of L x hidden or more in ours (norms, AltUp, LAuReL, the top-k
     statistics stay in the activation dtype, float32 only inside fused ops); mlx-vlm has 7
     per layer (its AltUp casts the four streams to float32 and back). FLOPs are equal.
  6. Copies left, unfixed: the joined q/k/v are split views with a row stride of
     (H + 2 HKV) x D, which the norms (or the kernel's row-contiguous inputs) copy: 3 copies,
     L x 3072 values (mlx-vlm's separate projections avoid them with two more matmul
     launches); a dense layer's gated GELU stays the compiled op at a chunk, which reads the
     joined gate/up halves in place (the kernel would copy 2 x L x intermediate); the
     attention output's transpose + reshape (both); the sliding caches' concatenation per
     chunk (both).
  7. Not visible as graph size: the 10 sparse layers' down_proj is stored transposed for the
     decode kernel, so at prefill it is a quantized matmul with transpose=False where
     mlx-vlm's is transpose=True (kernel speed unmeasured without a GPU); a 1920-token prompt
     is 8 of our chunks, i.e. ~8x one chunk's launches per layer (after: ~150 against
     mlx-vlm's ~73); and between chunks the device waited for the host (bench/
     prefill_host.py: the next chunk's PLE rows and graph, 60-79 ms per chunk here), which
     generation.prefill now overlaps with the running chunk.
"""

import argparse
import copy
import sys
import tempfile
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert.converter import _should_quantize  # noqa: E402  (the converter's choice)
from mlx_gemma3n.config import PRESETS  # noqa: E402
from mlx_gemma3n.kernels import gated_gelu, ple_residual, set_kernels, use_factory  # noqa: E402
from mlx_gemma3n.text.concat import fuse_projections  # noqa: E402
from mlx_gemma3n.text.config import GLOBAL, SLIDING, TextConfig  # noqa: E402
from mlx_gemma3n.text.model import TextModel  # noqa: E402
from mlx_gemma3n.text.ple import NAME as PLE_NAME, PerLayerEmbeddingTable  # noqa: E402
from synthetic_context import fill_cache  # noqa: E402

try:
    from mlx_gemma3n.quantized import mlx_matmul  # noqa: E402
except ImportError:  # a checkout from before it
    from contextlib import nullcontext as mlx_matmul  # noqa: E402

# (kind, activation sparsity) of the six computed layers; the middle four are reported
# (the first has no previous layer's residual to take, the last adds its own).
LAYERS = [(SLIDING, 0.95), (SLIDING, 0.95), (GLOBAL, 0.95), (SLIDING, 0.0), (GLOBAL, 0.0),
          (SLIDING, 0.0)]
REPORTED = {1: "sliding, sparse", 2: "full, sparse", 3: "sliding, dense", 4: "full, dense"}
VOCAB = 2048
GROUP, BITS = 64, 4
VIEWS = {
    "AsStrided", "Broadcast", "BroadcastAxes", "ExpandDims", "Flatten", "Reshape", "Slice",
    "Split", "Squeeze", "StopGradient", "Transpose", "Unflatten", "Depends",
}
MOVES = {"Concatenate", "Copy", "Contiguous", "SliceUpdate", "Scatter", "ScatterAxis",
         "Gather", "GatherAxis", "Pad"}
ROW_CONTIGUOUS_INPUT = {"QuantizedMatmul", "mx.rms_norm", "mx.layer_norm"}
_MARK = 1 << 29  # marker constants are this plus their index


# -- stand-ins: one primitive, tagged, for what a GPU runs as one kernel --------------------

class Marks:
    """Labels attached to the graph: each is a Depends on a unique int32 constant."""

    def __init__(self):
        self.labels = []  # index -> (label, flops)

    def attach(self, arrays, label: str) -> list:
        return self.attach_inputs(list(arrays), [], label)

    def tag(self, tree, label: str):
        """The same tree (lists, tuples, named tuples), its arrays passed through one tagged
        Depends."""
        leaves = []
        _rebuild(tree, lambda a: leaves.append(a) or a)
        if not leaves:
            return tree
        it = iter(self.attach(leaves, label))
        return _rebuild(tree, lambda a: next(it))

    def kernel_factory(self, name, input_names, output_names, source, header="", **options):
        """A kernel factory (kernels.use_factory) whose kernels are one tagged primitive."""

        def kernel(inputs, output_shapes, output_dtypes, **launch):
            zeros = [_zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]
            return self.attach_inputs(zeros, inputs, f"kernel {name}")

        return kernel

    def attach_inputs(self, outputs, inputs, label: str, flops: float = 0.0) -> list:
        self.labels.append((label, flops))
        marker = mx.array(_MARK + len(self.labels) - 1, dtype=mx.int32)
        return mx.depends(outputs, [a for a in inputs if isinstance(a, mx.array)] + [marker])

    def stand_in(self, label: str, fn, flops=None):
        """`fn` as one primitive: outputs of its shapes and dtypes depending on its inputs.
        (`fn` is called for the shapes only; what it builds is not in the exported graph.)"""

        def op(*args, **kwargs):
            ref = fn(*args, **kwargs)
            outs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
            zeros = [_zeros(o.shape, o.dtype) for o in outs]
            made = self.attach_inputs(zeros, [*args, *kwargs.values()], label,
                                      flops(*args, **kwargs) if flops else 0.0)
            return made if isinstance(ref, (list, tuple)) else made[0]

        return op


def _zeros(shape, dtype) -> mx.array:
    """A stand-in's output before its Depends: a broadcast scalar (a view, no launch)."""
    return mx.broadcast_to(mx.array(0, dtype=dtype), shape)


def _rebuild(tree, fn):
    """`tree` with fn(array) in place of each array, in order."""
    if isinstance(tree, mx.array):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_rebuild(t, fn) for t in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rebuild(t, fn) for t in tree)
    return tree


def _attention_flops(q, k, v, *args, **kwargs):
    B, H, L, D = q.shape
    return 4.0 * B * H * L * k.shape[2] * D


@contextmanager
def gpu_ops(marks: Marks):
    """The `mx.fast` ops, `mx.dequantize` and the compiled functions of both models as one
    primitive each (see the docstring)."""
    from mlx_vlm.models.gemma3n import language as vlm

    patches = [
        (mx.fast, "rms_norm", None), (mx.fast, "layer_norm", None), (mx.fast, "rope", None),
        (mx.fast, "scaled_dot_product_attention", _attention_flops), (mx, "dequantize", None),
        (nn, "gelu_approx", None), (gated_gelu, "_gated_gelu", None),
        (gated_gelu, "_sparse_gated_gelu", None), (ple_residual, "_add_to_rest", None),
        (vlm, "gelu_topk", None),
    ]
    with ExitStack() as stack:
        for space, name, flops in patches:
            if not hasattr(space, name):  # an older checkout of ours (before/after runs)
                continue
            label = name if space in (gated_gelu, ple_residual, vlm, nn) else f"mx.{name}"
            op = marks.stand_in(label, getattr(space, name), flops)
            stack.enter_context(mock.patch.object(space, name, op))
        yield


# -- the graph --------------------------------------------------------------------------------

class Graph:
    """The primitives `mx.export_function` reports, in its (topological) order."""

    def __init__(self, marks: Marks):
        self.marks = marks
        self.nodes = []  # dicts: name, args, inputs [(name, shape, dtype)], outputs, label
        self.constants = {}
        self.producer = {}
        self.inputs = []

    def data(self) -> set:
        """Nodes reached from the function's inputs or from the arrays tagged as data."""
        roots = [i for i, n in enumerate(self.nodes) if n["label"] == "tag data"
                 or any(name in self.inputs for name, *_ in n["inputs"])]
        return descendants(self, roots)

    def __call__(self, record: dict) -> None:
        if record["type"] == "inputs":
            self.inputs = [n for n, *_ in record["inputs"]]
        if record["type"] == "constants":
            self.constants.update({n: v for n, v in record["constants"]})
        if record["type"] != "primitive":
            return
        node = dict(record, label=record["name"])
        if node["name"] == "Depends":
            mark = [self.constants.get(n) for n, shape, dtype in node["inputs"]]
            mark = [int(m.item()) for m in mark if m is not None and m.dtype == mx.int32
                    and m.size == 1 and int(m.item()) >= _MARK]
            if mark:
                node["label"], node["flops"] = self.marks.labels[mark[-1] - _MARK]
        for name, *_ in node["outputs"]:
            self.producer[name] = len(self.nodes)
        self.nodes.append(node)

    def ancestors(self, indices) -> set:
        seen, stack = set(), list(indices)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(self.producer[n] for n, *_ in self.nodes[i]["inputs"] if n in self.producer)
        return seen

    def tagged(self, label: str) -> list:
        return [i for i, n in enumerate(self.nodes) if n["label"] == label]


def export(fn, *inputs, marks: Marks) -> Graph:
    graph = Graph(marks)
    mx.export_function(graph, fn, *inputs)
    return graph


# -- strides: which views are free and which a kernel copies --------------------------------

def _row_strides(shape) -> tuple:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _row_contiguous(shape, strides) -> bool:
    return all(st == r for s, st, r in zip(shape, strides, _row_strides(shape)) if s > 1)


def _reshape_strides(old_shape, old_strides, new_shape):
    """New strides if the reshape is a view (numpy's no-copy rule, which MLX follows), else None."""
    old = [(s, st) for s, st in zip(old_shape, old_strides) if s != 1]
    new_strides = []
    oi, ni, new = 0, 0, list(new_shape)
    while ni < len(new) and oi <= len(old):
        if new[ni] == 1:
            new_strides.append(0)
            ni += 1
            continue
        if oi == len(old):
            return None
        np_, op_ = new[ni], old[oi][0]
        nj, oj = ni + 1, oi + 1
        while np_ != op_:
            if np_ < op_:
                if nj >= len(new):
                    return None
                np_ *= new[nj]
                nj += 1
            else:
                if oj >= len(old):
                    return None
                op_ *= old[oj][0]
                oj += 1
        for k in range(oi, oj - 1):
            if old[k][1] != old[k + 1][0] * old[k + 1][1]:
                return None
        chunk = [0] * (nj - ni)
        stride = old[oj - 1][1]
        for k in range(nj - 1, ni - 1, -1):
            chunk[k - ni] = stride
            stride *= new[k]
        new_strides.extend(chunk)
        ni, oi = nj, oj
    return tuple(new_strides) if len(new_strides) == len(new) else None


def _view_strides(node, strides_of) -> tuple:
    """Output strides of a view primitive, and whether MLX copies to make it (a reshape that
    strides cannot describe)."""
    name, args = node["name"], node["arguments"]
    (src, in_shape, _), out = node["inputs"][0], node["outputs"]
    st = strides_of(src, in_shape)
    if name == "Transpose":
        return [tuple(st[a] for a in args[0])], False
    if name == "Slice":
        return [tuple(s * step for s, step in zip(st, args[2]))], False
    if name == "Split":
        return [st] * len(out), False
    if name in ("Broadcast", "BroadcastAxes"):
        shape = out[0][1]
        pad = len(shape) - len(in_shape)
        full = [0] * pad + list(st)
        return [tuple(0 if i >= pad and in_shape[i - pad] == 1 and shape[i] != 1 else full[i]
                      for i in range(len(shape)))], False
    if name in ("Depends", "StopGradient"):
        return [strides_of(n, s) for n, s, _ in node["inputs"][: len(out)]], False
    if name == "AsStrided":
        return [(-1,) * len(out[0][1])], False
    new = _reshape_strides(in_shape, st, out[0][1])  # Reshape, Flatten, ExpandDims, ...
    return ([new], False) if new is not None else ([_row_strides(out[0][1])], True)


# -- per-layer counts -----------------------------------------------------------------------

def _bytes(outputs) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * dtype.size for _, shape, dtype in outputs)


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _flops(node) -> float:
    if node["name"] in ("QuantizedMatmul", "Matmul", "GatherQMM", "GatherMM"):
        x = node["inputs"][0][1]
        return 2.0 * _size(node["outputs"][0][1]) * x[-1]
    return node.get("flops", 0.0)


def _is_big(shape, L: int, inter: int) -> bool:
    """[L, intermediate] or bigger, or an [L, keys] matrix (scores, masks) over >= L keys."""
    if _size(shape) >= L * inter:
        return True
    return len(shape) >= 2 and shape[-2] == L and shape[-1] >= L and shape[-1] != 256


def summarize(graph: Graph, members, data_dependent, L: int, D: int, inter: int) -> dict:
    """Counts over the nodes `members` (indices); `data_dependent`: those reached from the
    chunk's data."""
    strides = {}

    def strides_of(name, shape):
        return strides.get(name, _row_strides(shape))

    s = Counter()
    by_name, notes = Counter(), defaultdict(Counter)
    for i in sorted(members):
        node = graph.nodes[i]
        name = node["label"]
        if node["name"] in VIEWS and (node["name"] != "Depends" or name.startswith("tag ")
                                      or name == "Depends"):
            out_strides, copied = _view_strides(node, strides_of)
            for (n, *_), st in zip(node["outputs"], out_strides):
                strides[n] = st
            if copied and _size(node["outputs"][0][1]) > 1:
                s["launches"] += 1
                s["bytes"] += _bytes(node["outputs"])
                s["copies"] += 1
                by_name["Reshape (copy)"] += 1
                notes["copies"][f"reshape of a strided view -> {node['outputs'][0][1]}"] += 1
            continue
        s["launches"] += 1
        by_name[name] += 1
        s["bytes"] += _bytes(node["outputs"])
        s["flops"] += _flops(node)
        if i not in data_dependent:
            s["fixed"] += 1
            notes["fixed"][name] += 1
        for _, shape, dtype in node["outputs"]:
            if dtype == mx.float32 and _size(shape) >= L * D and L > 1:
                s["f32>=LxD"] += 1
                notes["f32>=LxD"][f"{name} {shape}"] += 1
            if L > 1 and _is_big(shape, L, inter):
                s["big"] += 1
                notes["big"][f"{name} {shape} {dtype}"] += 1
        if name == "AsType" and _size(node["outputs"][0][1]) >= L * D:
            s["casts"] += 1
            notes["casts"][f"{node['inputs'][0][2]} -> {node['outputs'][0][2]} {node['outputs'][0][1]}"] += 1
        if name in MOVES:
            s["copies"] += 1
            notes["copies"][f"{name} {node['outputs'][0][1]} {node['outputs'][0][2]}"] += 1
        if name == "QuantizedMatmul" and node["arguments"][-1] is False:
            notes["qmm transpose=False"][f"{node['inputs'][0][1]} -> {node['outputs'][0][1]}"] += 1
        # a stand-in's first inputs are the zeros it returns in place of its outputs; our
        # kernels copy every strided input (metal_kernel's ensure_row_contiguous), the other
        # ops listed their first
        first = len(node["outputs"]) if node["name"] == "Depends" else 0
        if name.startswith("kernel "):
            checked = node["inputs"][first:]
        else:
            checked = node["inputs"][first:first + 1] if name in ROW_CONTIGUOUS_INPUT else []
        for n, shape, dtype in checked:
            if not _row_contiguous(shape, strides_of(n, shape)):
                s["copies"] += 1
                s["bytes"] += _bytes([(n, shape, dtype)])
                notes["copies"][f"strided input of {name} {shape}"] += 1
    return {"counts": s, "by_name": by_name, "notes": notes}


def layer_members(graph: Graph, index: int) -> set:
    """The nodes of layer `index`: ancestors of its output tag that are not ancestors of its
    input tag (the tags themselves excluded)."""
    enter = graph.tagged(f"tag enter {index}")
    leave = graph.tagged(f"tag leave {index}")
    return graph.ancestors(leave) - graph.ancestors(enter) - set(leave)


def descendants(graph: Graph, roots) -> set:
    """Nodes reached from the outputs of `roots`."""
    live = set(roots)
    names = {n for i in roots for n, *_ in graph.nodes[i]["outputs"]}
    for i, node in enumerate(graph.nodes):
        if any(n in names for n, *_ in node["inputs"]):
            live.add(i)
            names.update(n for n, *_ in node["outputs"])
    return live


# -- the two models ---------------------------------------------------------------------------

def text_config(shape: str) -> dict:
    c = copy.deepcopy(PRESETS[shape]["text_config"])
    n = len(LAYERS)
    c.update(
        num_hidden_layers=n, layer_types=[k for k, _ in LAYERS], num_kv_shared_layers=0,
        activation_sparsity_pattern=[s for _, s in LAYERS],
        intermediate_size=c["intermediate_size"][:n], vocab_size=VOCAB,
        vocab_size_per_layer_input=VOCAB, sparse_down_proj_transposed=True,
    )
    return c


def _random_bf16(module: nn.Module) -> None:
    module.update(tree_map(lambda a: a.astype(mx.bfloat16), module.parameters()))


def _evaluate(module: nn.Module) -> None:
    """Weights evaluated layer by layer (they are constants of the graph, not primitives)."""
    for layer in module.layers:
        mx.eval(layer.parameters())
    mx.eval(module.parameters())


def ours(cfg: dict, tmp: Path) -> TextModel:
    config = TextConfig.from_dict(cfg)
    lm = TextModel(config)
    _random_bf16(lm)
    nn.quantize(lm, group_size=GROUP, bits=BITS, class_predicate=_should_quantize(GROUP))
    fuse_projections(lm)
    _evaluate(lm)
    # the PLE table, 8-bit as our converter stores it, read by row from a file
    table = mx.random.normal((VOCAB, config.num_hidden_layers * config.hidden_size_per_layer_input))
    w, scales, biases = mx.quantize(table.astype(mx.bfloat16), group_size=64, bits=8)
    path = tmp / "ple.safetensors"
    mx.save_safetensors(str(path), {f"{PLE_NAME}.weight": w, f"{PLE_NAME}.scales": scales,
                                    f"{PLE_NAME}.biases": biases})
    lm.ple_table = PerLayerEmbeddingTable.from_files([path], {"group_size": 64, "bits": 8})
    return lm


def mlx_vlm(cfg: dict):
    from mlx_vlm.models.gemma3n.config import TextConfig as VlmConfig
    from mlx_vlm.models.gemma3n.language import LanguageModel

    ours_config = dict(asdict(TextConfig.from_dict(cfg)), model_type="gemma3n_text")
    lm = LanguageModel(VlmConfig.from_dict(ours_config))
    _random_bf16(lm)
    # mlx-vlm's converter quantizes every layer with a `to_quantized` whose input width
    # splits into groups (its PLE table included)
    nn.quantize(lm, group_size=GROUP, bits=BITS,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % GROUP == 0)
    _evaluate(lm.model)
    return lm


def _states(cache: list) -> list:
    """The arrays the prefill evaluates after a chunk."""
    return [a for c in cache for a in tree_flatten(c.state) if isinstance(a, mx.array)]


class Tagging:
    """Stands in for a decoder layer: tags what goes in and what comes out."""

    def __init__(self, layer, index: int, marks: Marks, inputs: tuple):
        self.layer, self.index, self.marks, self.inputs = layer, index, marks, inputs

    def __call__(self, *args, **kwargs):
        args = list(args)
        tagged = self.marks.tag([args[i] for i in self.inputs], f"tag enter {self.index}")
        for i, a in zip(self.inputs, tagged):
            args[i] = a
        return self.marks.tag(self.layer(*args, **kwargs), f"tag leave {self.index}")


class DataRows:
    """A file tensor whose rows are tagged as the chunk's data (read on the host per chunk,
    they enter the graph as constants)."""

    def __init__(self, tensor, marks: Marks):
        self.tensor, self.marks = tensor, marks

    def rows(self, ids):
        return self.marks.tag(self.tensor.rows(ids), "tag data")

    def typed(self, stored):  # where the table reads rows as stored, then types them
        return self.marks.tag(self.tensor.typed(stored), "tag data")

    def __getattr__(self, name):
        return getattr(self.tensor, name)


def ours_graph(lm: TextModel, L: int, context: int, kernels: bool, marks: Marks):
    """Our prefill chunk (generation.prefill's `run`): the per-layer embedding rows read for
    the chunk's ids, then the decoder over the caches. Returns (graph, prologue nodes)."""
    c = lm.config
    set_kernels(lm, kernels)
    cache = lm.make_cache()
    fill_cache(cache, c.num_key_value_heads, c.head_dim, context, mx.bfloat16)
    layers = list(lm.layers)
    lm.layers = [Tagging(layer, i, marks, (0, 1, 2)) for i, layer in enumerate(layers)]
    ids = mx.array(np.random.default_rng(0).integers(0, VOCAB, (1, L)), dtype=mx.int32)
    embeds = mx.random.normal((1, L, c.hidden_size)).astype(mx.bfloat16)
    mx.eval(ids, embeds)

    def chunk(embeds):
        per_layer = lm.per_layer_embeddings(ids)  # host reads: constants of the graph
        out = lm(embeds, per_layer, cache)
        return [out] + _states(cache)

    table = lm.ple_table
    lm.ple_table = copy.copy(table)
    for part in ("weight", "scales", "biases"):
        setattr(lm.ple_table, part, DataRows(getattr(table, part), marks))
    try:
        with gpu_ops(marks), mlx_matmul():  # not this CPU's dequantized blocks
            graph = export(chunk, embeds, marks=marks)
    finally:
        lm.layers, lm.ple_table = layers, table
    return graph


def vlm_graph(lm, L: int, context: int, marks: Marks):
    """mlx-vlm's language model over the chunk's ids (its generate passes the ids and
    prefills in steps of prefill_step_size)."""
    c = lm.config
    cache = lm.make_cache()
    fill_cache(cache, c.num_key_value_heads, c.head_dim, context, mx.bfloat16)
    model = lm.model
    layers = list(model.layers)
    model.layers = [Tagging(layer, i, marks, (0, 1, 3)) for i, layer in enumerate(layers)]
    ids = mx.array(np.random.default_rng(0).integers(0, VOCAB, (1, L)), dtype=mx.int32)
    mx.eval(ids)

    def chunk(ids):
        out = model(ids, cache=cache)
        return [out] + _states(cache)

    try:
        with gpu_ops(marks):
            graph = export(chunk, ids, marks=marks)
    finally:
        model.layers = layers
    return graph


def report(graph: Graph, L: int, D: int, inter: int, n_layers: int) -> dict:
    data = graph.data()
    out = {}
    in_layers = set()
    for i in range(n_layers):
        members = layer_members(graph, i)
        in_layers |= members
        out[i] = summarize(graph, members, data, L, D, inter)
    first_enter = graph.tagged("tag enter 0")
    prologue = graph.ancestors(first_enter) - set(first_enter)
    out["prologue"] = summarize(graph, prologue, data, L, D, inter)
    return out


def _line(label: str, s: Counter) -> str:
    return (f"  {label:<26} {s['launches']:6d} {s['bytes'] / 2**20:9.1f} {s['flops'] / 1e9:8.1f}"
            f" {s['f32>=LxD']:8d} {s['casts']:5d} {s['big']:4d} {s['copies']:6d} {s['fixed']:6d}")


HEADER = (f"  {'':<26} {'launch':>6} {'MiB out':>9} {'GFLOP':>8} {'f32>=LxD':>8} {'casts':>5}"
          f" {'big':>4} {'copies':>6} {'fixed':>6}")


def print_report(title: str, r: dict, verbose: bool) -> None:
    print(title)
    print(HEADER)
    print(_line("prologue", r["prologue"]["counts"]))
    for i, kind in REPORTED.items():
        print(_line(f"layer {i} ({kind})", r[i]["counts"]))
    if verbose:
        for key in ["prologue", *REPORTED]:
            print(f"  -- {key}: launches by primitive: "
                  + ", ".join(f"{n} {k}" for n, k in r[key]["by_name"].most_common()))
            for what, c in r[key]["notes"].items():
                print(f"     {what}: " + "; ".join(f"{k} x{v}" for k, v in c.most_common()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(PRESETS), default="E2B")
    p.add_argument("--verbose", action="store_true", help="launches by primitive, and what was flagged")
    p.add_argument("--skip-vlm", action="store_true", help="ours only")
    args = p.parse_args(argv)

    cfg = text_config(args.shape)
    D, inter = cfg.get("hidden_size", 2048), cfg["intermediate_size"][0]
    cases = [(256, 1024), (1920, 0)]
    with tempfile.TemporaryDirectory() as tmp:
        ours_lm = ours(cfg, Path(tmp))
        for L, context in cases:
            for kernels in (False, True):
                marks = Marks()
                # a factory as on a GPU, so that the kernel path is the one a GPU takes
                factory = use_factory(marks.kernel_factory, self_check=False)
                with factory if kernels else ExitStack():
                    g = ours_graph(ours_lm, L, context, kernels, marks)
                print_report(f"{args.shape} ours, chunk of {L} after {context}, kernels "
                             f"{'on' if kernels else 'off'}", report(g, L, D, inter, len(LAYERS)),
                             args.verbose)
        del ours_lm
    if args.skip_vlm:
        return
    vlm_lm = mlx_vlm(cfg)
    for L, context in cases:
        marks = Marks()
        g = vlm_graph(vlm_lm, L, context, marks)
        print_report(f"{args.shape} mlx-vlm, chunk of {L} after {context}",
                     report(g, L, D, inter, len(LAYERS)), args.verbose)


if __name__ == "__main__":
    main()

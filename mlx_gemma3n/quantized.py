"""Quantized matmuls on the CPU backend: many rows through dequantized blocks and BLAS, a few
in float32.

MLX-CPU's quantized matmul is a scalar loop. At a 256-token prefill chunk (an 8192 x 2048
4-bit weight, MLX 0.32.4, 2-core x86) it takes 4.2 s in float32 and 33 s in bfloat16, where
dequantizing the weight in blocks and multiplying in float32 takes 0.15-0.25 s with a BLAS
(OpenBLAS here, Accelerate on macOS), ~4 s with MLX's own matmul on Linux
(`bench/peak_probe.py --dtype float32 --ops qmm,package`). Every accelerator, whose quantized
matmul is fast, keeps MLX's quantized matmul.

The weight is dequantized a block of output features at a time, each block after the
previous one's product, so that one or two float32 blocks (2 MB) are alive at once instead of
a float32 copy of the matrix (134 MB for E4B's down_proj).

Fewer rows than `_min_rows` (a decode step) go through MLX's quantized matmul in float32
whatever the input's dtype: its half-precision CPU loop is ~8x slower than its float32 one
(160 ms against 20 ms for one row of an 8192 x 2048 4-bit weight) and off by ~11% of the
output's largest value.
"""

from contextlib import contextmanager
from functools import lru_cache, reduce

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

BLOCK = 2**19  # weight values dequantized per block
PART_SCALES = 2**16  # quantization scales cast to float32 per part of a few rows' matmul
_blocks_off = False


@contextmanager
def mlx_matmul():
    """Inside, MLX's quantized matmul for every row count, as on an accelerator (the CPU's
    blocks off: to compare them, or to count what an accelerator would run)."""
    global _blocks_off
    before, _blocks_off = _blocks_off, True
    try:
        yield
    finally:
        _blocks_off = before


def _min_rows(dtype: mx.Dtype) -> int:
    """Rows from which the blocks beat MLX-CPU's float32 quantized matmul (which fewer rows
    of any dtype take). With a BLAS (Accelerate, or OpenBLAS preloaded on Linux) that is 2-3
    rows: one 8192 x 2048 4-bit weight, bfloat16 rows, 33 ms both at 2 rows, 50 against 207 ms
    at 12. Without one (MLX's own matmul on Linux) the blocks are 10-40% slower up to ~16
    rows, so float32 waits for 16 rows; half precision takes them from 2, as it did when its
    rows had only MLX's bfloat16 quantized matmul (~8x slower) to go through. A single row (a
    decode step) keeps the quantized matmul: one op in the graph instead of hundreds of
    blocks, which the compiled decode step would replay every token."""
    return 16 if dtype == mx.float32 else 2


@lru_cache(maxsize=None)
def _unpacker(bits: int, group_size: int):
    """Affine dequantization to float32 as one compiled op. `mx.dequantize` would do, but each
    call holds ~34 kB of host memory while its graph is pending (MLX 0.32.4; an E2B prefill
    chunk has ~2,300 blocks); this holds ~1.5 kB and runs ~25% faster."""
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    mx.eval(shifts)  # a lazy array would belong to the stream of the thread that first got here
    mask = (1 << bits) - 1

    @mx.compile
    def unpack(w, scales, biases):
        q = ((w[..., None] >> shifts) & mask).astype(mx.float32)
        q = q.reshape(*w.shape[:-1], -1, group_size)
        scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        return (q * scales[..., None] + biases[..., None]).reshape(*w.shape[:-1], -1)

    return unpack


def _dequantize(w, scales, biases, group_size: int, bits: int, mode: str) -> mx.array:
    if mode == "affine" and 32 % bits == 0:  # values do not straddle words
        return _unpacker(bits, group_size)(w, scales, biases)
    return mx.dequantize(w, scales, biases, group_size, bits, mode=mode, dtype=mx.float32)


def _few_rows(xf, w, scales, biases, transpose: bool, group_size: int, bits: int, mode: str):
    """MLX's quantized matmul of float32 rows. It casts half-precision scales and biases to
    float32 first (64 MB for the whole tied LM head), so a weight with more than 8 parts'
    worth (4 MB cast; E2B/E4B: the LM head alone) goes in parts of PART_SCALES, each after the
    previous part's product. Parts must be small: MLX-CPU allocates an op's buffers when it
    queues it, several ops ahead of the one running (the LM head's peak over its input: 66 MB
    whole, 45 MB in 16 parts, 7.5 MB in 128, at the same speed)."""
    def qmm(x_part, rows, after):
        part = [a[rows] for a in (w, scales, biases) if a is not None]
        packed, s, *b = part if after is None else mx.depends(part, [after])
        return mx.quantized_matmul(x_part, packed, s, b[0] if b else None, transpose, group_size, bits,
                                   mode=mode)

    if scales.dtype not in (mx.bfloat16, mx.float16) or scales.size <= 8 * PART_SCALES:
        return qmm(xf, slice(None), None)
    step = max(1, PART_SCALES // scales.shape[-1])
    parts = []
    for i in range(0, w.shape[0], step):
        rows = slice(i, i + step)
        parts.append(qmm(xf if transpose else xf[..., rows], rows, parts[-1] if parts else None))
    if transpose:  # w [out, in]: parts of the output
        return mx.concatenate(parts, axis=-1)
    return reduce(mx.add, parts)  # w [in, out]: parts of the input, their products summed


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases, transpose: bool,
                     group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """`mx.quantized_matmul`; on the CPU always in float32, from `_min_rows` rows on through
    blocks of dequantized weights and a float32 matmul, the result rounded to `x`'s dtype
    (MLX-CPU's bfloat16 quantized matmul is off by ~12% of the output's largest value)."""
    if _blocks_off or mx.default_device() != mx.cpu:
        return mx.quantized_matmul(x, w, scales, biases, transpose, group_size, bits, mode=mode)
    xf = x.astype(mx.float32)
    if x.size < _min_rows(x.dtype) * x.shape[-1]:
        return _few_rows(xf, w, scales, biases, transpose, group_size, bits, mode).astype(x.dtype)

    def block(w_part, group_part, after):
        packed = w[w_part] if after is None else mx.depends(w[w_part], after)
        part = _dequantize(packed, scales[group_part],
                           None if biases is None else biases[group_part], group_size, bits, mode)
        return (xf @ (part.T if transpose else part)).astype(x.dtype)

    width = x.shape[-1]
    if transpose:  # w [out, in]: blocks of output rows
        step = max(1, BLOCK // width)
        parts = [(slice(i, i + step),) * 2 for i in range(0, w.shape[0], step)]
    else:  # w [in, out], grouped along out: blocks of whole groups of output columns
        step = max(1, BLOCK // (width * group_size))
        words = group_size * bits // 32  # a group's values fill whole words for group sizes >= 32
        parts = [((slice(None), slice(g * words, (g + step) * words)), (slice(None), slice(g, g + step)))
                 for g in range(0, scales.shape[1], step)]
    # Each block is dequantized after the previous block's product: without the dependency
    # MLX may order every block's dequantization first, all of them alive at once.
    outputs = []
    for w_part, group_part in parts:
        outputs.append(block(w_part, group_part, outputs[-1] if outputs else None))
    return mx.concatenate(outputs, axis=-1)


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear through `quantized_matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), True,
                             self.group_size, self.bits, self.mode)
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose `as_linear` (the tied LM head) is `quantized_matmul`."""

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), True,
                                self.group_size, self.bits, self.mode)


_OURS = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}


def _same_arrays(cls: type, layer: nn.Module) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    dict.update(new, layer)
    return new


def use_blocks(module: nn.Module) -> None:
    """Give every nn.QuantizedLinear and nn.QuantizedEmbedding in `module` this module's
    matmul (same arrays)."""
    swapped = tree_map(lambda m: _same_arrays(_OURS[type(m)], m) if type(m) in _OURS else m,
                       module.leaf_modules(), is_leaf=nn.Module.is_module)
    module.update_modules(swapped)

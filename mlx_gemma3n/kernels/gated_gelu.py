"""Kernel (d): the FFN activation, GELU(tanh)(gate) x up, as one row kernel; on the
activation-sparse layers with Gemma 3n's gaussian top-k first (row mean and std, the cutoff
at the sparsity quantile, relu(gate - cutoff)).

On a sparse layer this replaces the statistics' primitives (mean, var, sqrt, the cutoff
arithmetic) and the fused activation with one launch; on a dense layer it is one launch
either way (the compiled activation already was).
"""

from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .base import MAX_GRID_ROWS, FusedOp
from .rows import ROW_HEADER

# One threadgroup per row of `gate` ([rows, N]; row threadgroup_position_in_grid.y), shared
# with the sparse FFN kernel; whole simdgroups (rows.THREADGROUP_SUMS).
ROW_SETUP = """
    threadgroup float partial[32];
    uint tid = thread_position_in_threadgroup.x;
    uint tpg = threads_per_threadgroup.x;
    uint lane = thread_index_in_simdgroup;
    uint simd = simdgroup_index_in_threadgroup;
    uint simds = (tpg + 31) / 32;
    uint row = threadgroup_position_in_grid.y;
    uint N = gate_shape[1];
    auto g = gate + row * N;
    float cutoff = 0.0f;
"""

# The gaussian top-k cutoff of the row, into `cutoff`. Two passes (mean, then the mean
# squared deviation) for accuracy; every thread holds the same cutoff.
CUTOFF = """
    {
        float s[1] = {0.0f};
        for (uint i = tid; i < N; i += tpg) {
            s[0] += static_cast<float>(g[i]);
        }
        THREADGROUP_SUMS(1, s, partial);
        float mean = s[0] / N;
        float d2[1] = {0.0f};
        for (uint i = tid; i < N; i += tpg) {
            float t = static_cast<float>(g[i]) - mean;
            d2[0] += t * t;
        }
        THREADGROUP_SUMS(1, d2, partial);
        cutoff = mean + metal::precise::sqrt(d2[0] / N) * std_multiplier[0];
    }
"""


def gelu_tanh(x: str) -> str:
    """Metal expression for GELU(tanh) of the float expression `x` (a plain name)."""
    return (f"(0.5f * {x} * (1.0f + metal::precise::tanh(0.7978845608028654f * "
            f"({x} + 0.044715f * {x} * {x} * {x}))))")


SOURCE = ROW_SETUP + "    if (SPARSE) " + CUTOFF.lstrip() + f"""
    auto u = up + row * N;
    device T* o = out + row * N;
    for (uint i = tid; i < N; i += tpg) {{
        float x = static_cast<float>(g[i]);
        if (SPARSE) {{
            x = metal::max(x - cutoff, 0.0f);
        }}
        o[i] = static_cast<T>({gelu_tanh("x")} * static_cast<float>(u[i]));
    }}
"""


# Compiled so that the elementwise tail is one fused pass: a prefill chunk then holds only
# gate, up and the product ([tokens, hidden_dims] each), not a temporary per op (E4B, 512
# tokens, float32: 105 MB instead of 172).
@partial(mx.compile, shapeless=True)
def _gated_gelu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


@partial(mx.compile, shapeless=True)
def _sparse_gated_gelu(gate: mx.array, up: mx.array, cutoff: mx.array) -> mx.array:
    return nn.gelu_approx(nn.relu(gate - cutoff)) * up


def gaussian_topk_cutoff(gate: mx.array, std_multiplier: float) -> mx.array:
    """Keeping the top share of a gaussian means cutting at its quantile: mean + std *
    Phi^-1(sparsity), per row, instead of a true top-k sort."""
    mean = mx.mean(gate, axis=-1, keepdims=True)
    std = mx.sqrt(mx.var(gate, axis=-1, keepdims=True))
    return mean + std * mx.array(std_multiplier, dtype=gate.dtype)


def reference(gate: mx.array, up: mx.array, std_multiplier: Optional[float]) -> mx.array:
    """Today's op sequence; `std_multiplier` None on dense layers."""
    if std_multiplier is None:
        return _gated_gelu(gate, up)
    return _sparse_gated_gelu(gate, up, gaussian_topk_cutoff(gate, std_multiplier))


def row_threads(n: int) -> int:
    """Threads for one row of n values: about eight values each, whole simdgroups."""
    per_eight = -(-n // 8)
    return min(1024, max(32, (per_eight + 31) // 32 * 32))


def launch(kernel, gate: mx.array, up: mx.array, std_multiplier: Optional[float]) -> tuple:
    """The kernel over the rows of gate/up ([..., N])."""
    n = gate.shape[-1]
    rows = gate.size // n
    tg = row_threads(n)
    out = kernel(
        inputs=[gate.reshape(rows, n), up.reshape(rows, n),
                mx.array([std_multiplier or 0.0], mx.float32)],
        template=[("T", gate.dtype), ("SPARSE", std_multiplier is not None)],
        grid=(tg, rows, 1),
        threadgroup=(tg, 1, 1),
        output_shapes=[(rows, n)],
        output_dtypes=[gate.dtype],
    )[0]
    return (out.reshape(gate.shape),)


def sample(dtype: mx.Dtype) -> tuple:
    """A small ragged case: 2 rows of 300 units, sparse (the sparse path covers the dense)."""
    k = mx.random.split(mx.random.key(0), 2)
    return (mx.random.normal((2, 1, 300), key=k[0]).astype(dtype),
            mx.random.normal((2, 1, 300), key=k[1]).astype(dtype), 1.6448536)


OP = FusedOp("gated_gelu", ["gate", "up", "std_multiplier"], ["out"], SOURCE, launch,
             lambda *args: (reference(*args),), sample, header=ROW_HEADER)


def gated_gelu(gate: mx.array, up: mx.array, std_multiplier: Optional[float],
               enabled: bool = True) -> mx.array:
    """GELU(tanh)(gate) x up, after the gaussian top-k when `std_multiplier` is given; one
    kernel (a threadgroup per token) unless `enabled` is False: at decode, and at a prefill
    chunk of a sparse layer, where it spares the statistics' launches and [tokens, hidden]
    temporaries. A dense chunk keeps the compiled activation: one launch too, and it reads
    the joined gate/up projection's strided halves in place, which the kernel would copy."""
    rows = gate.size // gate.shape[-1] if gate.ndim >= 2 else 0
    if 0 < rows <= MAX_GRID_ROWS and (gate.shape[-2] == 1 or std_multiplier is not None):
        return OP(gate, up, std_multiplier, enabled=enabled)[0]
    return reference(gate, up, std_multiplier)

"""Kernel (f): the FFN of an activation-sparse layer at decode, reading only the surviving
units' weights.

After the (dense) gate projection, the gaussian top-k keeps ~5% of the units. `up` then
needs only those units' rows, and so does `down` once the converter stores it transposed
([hidden, dims]: a unit's weights are one contiguous row). Two launches replace the up
projection, the activation and the down projection:
  * sparse_up: every threadgroup recomputes the row's cutoff (the gate row is small and
    cached), then its simdgroups take the units of its block and, for a survivor only, dot
    the unit's up row with x; the activation is written in float32 (zero for the others).
  * sparse_down: threadgroups own column blocks of the output; their simdgroups walk the
    units and add act * (the unit's down row) for the survivors, then are summed in a fixed
    order.
Weights are float ([hidden, dims], `wf`) or MLX affine-quantized rows (`wq`, `scales`,
`biases`, quantized along dims); the unused slots get one-element placeholders.
"""

import mlx.core as mx
import mlx.nn as nn

from ..text.transposed import TransposedLinear
from .base import FusedOp, kernels_enabled
from .gated_gelu import CUTOFF, ROW_SETUP, gated_gelu, gelu_tanh, reference as activation
from .rows import ROW_HEADER

NSG = 8  # simdgroups per threadgroup
UNITS = 256  # units per sparse_up threadgroup
COLS = 256  # output columns per sparse_down threadgroup (8 per lane)

# A quantized word holds PER values of one row, all in the same group (GS is a multiple
# of PER); the weight of value t of the word is scale * q_t + bias.
# Sizes come in `meta` (D, group size): one compiled kernel per dtype and bit width.
QUANT = """
    uint D = meta[0];
    uint GS = meta[1];
    constexpr uint PER = 32 / (BITS == 0 ? 32 : BITS);
    constexpr uint MASK = BITS == 0 ? 0u : (1u << BITS) - 1u;
    uint WORDS = D / PER;
    uint GROUPS = D / GS;
"""

UP_SOURCE = ROW_SETUP + CUTOFF + QUANT + f"""
    auto xr = x + row * D;
    uint first = threadgroup_position_in_grid.z * UNITS;
    uint last = metal::min(first + UNITS, N);
    for (uint n = first + simd; n < last; n += simds) {{
        float z = static_cast<float>(g[n]) - cutoff;
        float a = 0.0f;
        if (z > 0.0f) {{
            float dot = 0.0f;
            if (BITS == 0) {{
                for (uint j = lane; j < D; j += 32) {{
                    dot += static_cast<float>(wf[n * D + j]) * static_cast<float>(xr[j]);
                }}
            }} else {{
                for (uint w = lane; w < WORDS; w += 32) {{
                    uint word = wq[n * WORDS + w];
                    uint j0 = w * PER;
                    float part = 0.0f;
                    float xsum = 0.0f;
                    for (int t = 0; t < PER; t++) {{
                        float xv = static_cast<float>(xr[j0 + t]);
                        part += static_cast<float>((word >> (t * BITS)) & MASK) * xv;
                        xsum += xv;
                    }}
                    uint grp = n * GROUPS + j0 / GS;
                    dot += static_cast<float>(scales[grp]) * part + static_cast<float>(biases[grp]) * xsum;
                }}
            }}
            a = {gelu_tanh("z")} * simd_sum(dot);
        }}
        if (lane == 0) {{
            act[row * N + n] = a;
        }}
    }}
"""

DOWN_SOURCE = QUANT + """
    uint N = act_shape[1];
    constexpr int CPL = COLS / 32;
    uint lane = thread_index_in_simdgroup;
    uint sg = simdgroup_index_in_threadgroup;
    uint tid = thread_position_in_threadgroup.x;
    uint row = threadgroup_position_in_grid.y;
    uint block = threadgroup_position_in_grid.z * COLS;
    auto ar = act + row * N;
    float acc[CPL];
    for (int t = 0; t < CPL; t++) {
        acc[t] = 0.0f;
    }
    for (uint n = sg; n < N; n += NSG) {
        float a = ar[n];
        if (a != 0.0f) {
            for (int t = 0; t < CPL; t++) {
                uint c = block + lane * CPL + t;
                if (c < D) {
                    float w;
                    if (BITS == 0) {
                        w = static_cast<float>(wf[n * D + c]);
                    } else {
                        uint q = (wq[n * WORDS + c / PER] >> ((c % PER) * BITS)) & MASK;
                        uint grp = n * GROUPS + c / GS;
                        w = static_cast<float>(scales[grp]) * q + static_cast<float>(biases[grp]);
                    }
                    acc[t] += a * w;
                }
            }
        }
    }
    threadgroup float red[NSG * COLS];
    for (int t = 0; t < CPL; t++) {
        red[sg * COLS + lane * CPL + t] = acc[t];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint i = tid; i < COLS; i += NSG * 32) {
        if (block + i < D) {
            float sum = 0.0f;
            for (int s = 0; s < NSG; s++) {
                sum += red[s * COLS + i];
            }
            out[row * D + block + i] = static_cast<T>(sum);
        }
    }
"""

WEIGHTS = ["wq", "scales", "biases", "wf"]


def _weight_inputs(layer: nn.Module, dtype: mx.Dtype) -> tuple:
    """(wq, scales, biases, wf, bits, group size) of a layer whose rows are units ([N, D])."""
    if "scales" in layer:
        return (layer["weight"], layer["scales"], layer["biases"], mx.zeros((1,), dtype),
                layer.bits, layer.group_size)
    zeros = mx.zeros((1,), dtype)
    return mx.zeros((1,), mx.uint32), zeros, zeros, layer["weight"], 0, 1


def supported(up: nn.Module, down_t: nn.Module) -> bool:
    """Float rows, or affine-quantized rows whose groups hold whole 32-bit words."""
    for layer in (up, down_t):
        if "scales" not in layer:
            continue
        if getattr(layer, "mode", "affine") != "affine" or "biases" not in layer:
            return False
        if layer.bits not in (2, 4, 8) or layer.group_size % (32 // layer.bits):
            return False
    return True


def up_reference(x, gate, up, std_multiplier) -> tuple:
    """The activations [rows, N] in float32, zero for the units cut by the top-k."""
    act = activation(gate, up(x), std_multiplier)
    return (act.reshape(-1, gate.shape[-1]).astype(mx.float32),)


def up_launch(kernel, x, gate, up, std_multiplier) -> tuple:
    D, N = x.shape[-1], gate.shape[-1]
    rows = x.size // D
    wq, scales, biases, wf, bits, group_size = _weight_inputs(up, x.dtype)
    return tuple(kernel(
        inputs=[x.reshape(rows, D), gate.reshape(rows, N), wq, scales, biases, wf,
                mx.array([std_multiplier], mx.float32), mx.array([D, group_size], mx.int32)],
        template=[("T", x.dtype), ("BITS", bits), ("UNITS", UNITS)],
        grid=(32 * NSG, rows, -(-N // UNITS)),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=[(rows, N)],
        output_dtypes=[mx.float32],
    ))


def down_reference(x, act, down_t) -> tuple:
    """down_t(act) in x's dtype and shape; `x` is not read."""
    return (down_t(act.astype(x.dtype)).reshape(x.shape),)


def down_launch(kernel, x, act, down_t) -> tuple:
    D = x.shape[-1]
    wq, scales, biases, wf, bits, group_size = _weight_inputs(down_t, x.dtype)
    return tuple(kernel(
        inputs=[act, wq, scales, biases, wf, mx.array([D, group_size], mx.int32)],
        template=[("T", x.dtype), ("BITS", bits), ("NSG", NSG), ("COLS", COLS)],
        grid=(32 * NSG, act.shape[0], -(-D // COLS)),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    ))


def sample_layers(dtype: mx.Dtype, dims: int, hidden: int, bits: int, key: mx.array):
    """Random up ([hidden, dims]) and transposed down layers, float or quantized."""
    k = mx.random.split(key, 2)
    up, down_t = nn.Linear(dims, hidden, bias=False), TransposedLinear(hidden, dims)
    up.weight = (mx.random.normal((hidden, dims), key=k[0]) * dims**-0.5).astype(dtype)
    down_t.weight = (mx.random.normal((hidden, dims), key=k[1]) * hidden**-0.5).astype(dtype)
    if bits:
        up = up.to_quantized(group_size=32, bits=bits)
        down_t = down_t.to_quantized(group_size=32, bits=bits)
    return up, down_t


def _sample(dtype: mx.Dtype) -> tuple:
    """Ragged, quantized: 2 tokens, 300 units of width 96 (4-bit, groups of 32)."""
    k = mx.random.split(mx.random.key(0), 3)
    up, down_t = sample_layers(dtype, 96, 300, 4, k[0])
    x = mx.random.normal((2, 1, 96), key=k[1]).astype(dtype)
    return x, mx.random.normal((2, 1, 300), key=k[2]).astype(dtype), up, down_t


def _up_sample(dtype: mx.Dtype) -> tuple:
    x, gate, up, _ = _sample(dtype)
    return x, gate, up, 1.6448536


def _down_sample(dtype: mx.Dtype) -> tuple:
    x, gate, up, down_t = _sample(dtype)
    return x, up_reference(x, gate, up, 1.6448536)[0], down_t


UP = FusedOp("sparse_up", ["x", "gate", *WEIGHTS, "std_multiplier", "meta"], ["act"],
             UP_SOURCE, up_launch, up_reference, _up_sample, header=ROW_HEADER)
DOWN = FusedOp("sparse_down", ["act", *WEIGHTS, "meta"], ["out"], DOWN_SOURCE, down_launch,
               down_reference, _down_sample)


def sparse_ffn(x: mx.array, gate: mx.array, up: nn.Module, down_t: nn.Module,
               std_multiplier: float, enabled: bool = True) -> mx.array:
    """down_t(act(gate, up(x))) on a sparse layer whose down projection is stored
    transposed; at decode (one token per row) the two kernels unless `enabled` is False."""
    if not (kernels_enabled(enabled) and x.ndim >= 2 and x.shape[-2] == 1
            and supported(up, down_t)):
        # several tokens read most rows of up anyway: dense projections, the activation kernel
        return down_t(gated_gelu(gate, up(x), std_multiplier, enabled=enabled))
    act = UP(x, gate, up, std_multiplier, enabled=enabled)[0]
    return DOWN(x, act, down_t, enabled=enabled)[0]

"""Kernel (f), the sparse FFN (up and down rows of the surviving units only), executed on
the CPU executor against a float64 oracle: float and 4/8-bit weights, every dtype, ragged
widths. (The MLP's dispatch to it: test_kernels_attnffn_wiring.py.)"""

import mlx.core as mx
import numpy as np
import pytest
from kernel_check import DTYPES, assert_within, executed

from mlx_gemma3n.kernels import sparse_ffn as f

SPARSE = 1.6448536  # Phi^-1(0.95)


def _weights(layer):
    """The float64 [units, dims] matrix a layer holds (dequantized if quantized)."""
    if "scales" in layer:
        w = mx.dequantize(layer["weight"], layer["scales"].astype(mx.float32),
                          layer["biases"].astype(mx.float32), layer.group_size, layer.bits)
    else:
        w = layer["weight"].astype(mx.float32)
    return np.array(w, np.float64)


def _oracle(x, gate, up, down_t):
    """float64: cutoff from the gate row's mean and std, activations, then the down rows.
    Returns (activations, output), each with its scale: what its sums are made of (the
    magnitude of the terms), floored at 1e-2 of the largest."""
    g = np.array(gate.astype(mx.float32), np.float64).reshape(-1, gate.shape[-1])
    xs = np.array(x.astype(mx.float32), np.float64).reshape(-1, x.shape[-1])
    z = np.maximum(g - (g.mean(-1, keepdims=True) + g.std(-1, keepdims=True) * SPARSE), 0)
    gelu = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    w_up, w_down = _weights(up), _weights(down_t)
    act, act_scale = gelu * (xs @ w_up.T), gelu * (np.abs(xs) @ np.abs(w_up).T)
    out, out_scale = act @ w_down, np.abs(act) @ np.abs(w_down)
    floor = lambda s: np.maximum(s, 1e-2 * s.max())  # noqa: E731
    return (act, floor(act_scale)), (out.reshape(x.shape), floor(out_scale).reshape(x.shape))


def _args(dtype, dims, hidden, bits, rows=2):
    k = mx.random.split(mx.random.key(dims + bits), 3)
    up, down_t = f.sample_layers(dtype, dims, hidden, bits, k[0])
    x = mx.random.normal((rows, 1, dims), key=k[1]).astype(dtype)
    gate = mx.random.normal((rows, 1, hidden), key=k[2]).astype(dtype)
    return x, gate, up, down_t


# (dims, units, bits): one partial column block; two blocks and a partial unit block (8-bit,
# wide groups); float weights with dims not a multiple of 32.
CASES = [(96, 300, 4), (320, 600, 8), (100, 300, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=["4bit", "8bit", "float"])
def test_matches_the_oracle(dtype, case):
    x, gate, up, down_t = _args(dtype, *case)
    act = executed(f.UP, (x, gate, up, SPARSE))[0]
    out = executed(f.DOWN, (x, act, down_t))[0]
    (want_act, act_scale), (want, out_scale) = _oracle(x, gate, up, down_t)
    # The activations are float32 whatever the dtype; the output is rounded once.
    assert_within(act, want_act, act_scale, mx.float32, "activations")
    assert_within(out, want, out_scale, dtype, "output")
    kept = (want_act != 0).mean()
    assert 0.02 < kept < 0.09 and np.array_equal(np.array(act) != 0, want_act != 0)

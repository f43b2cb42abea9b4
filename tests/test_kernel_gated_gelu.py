"""Kernel (d), gaussian top-k + GELU(tanh) x up (sparse layers) and the gated GELU (dense
layers), executed on the CPU executor against the fp32 reference."""

import mlx.core as mx
import numpy as np
import pytest
from kernel_check import DTYPES, assert_close, executed
from kernel_launches import Counting

from mlx_gemma3n.kernels import gated_gelu as gated_gelu_module, use_factory
from mlx_gemma3n.kernels.gated_gelu import OP, gated_gelu, reference, row_threads

SPARSE = 1.6448536  # Phi^-1(0.95)


def _args(dtype, rows, n, multiplier):
    k = mx.random.split(mx.random.key(n), 2)
    gate = mx.random.normal((rows, 1, n), key=k[0]).astype(dtype)
    up = mx.random.normal((rows, 1, n), key=k[1]).astype(dtype)
    return gate, up, multiplier


def _oracle(gate, up, multiplier):
    """float64: the cutoff from the row's mean and (population) std, then the activation.
    (The reference's float32 mean/var over 8192 values are ~1e-6 off themselves.)"""
    g = np.array(gate.astype(mx.float32), np.float64)
    if multiplier is not None:
        cutoff = g.mean(-1, keepdims=True) + g.std(-1, keepdims=True) * multiplier
        g = np.maximum(g - cutoff, 0.0)
    act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    return mx.array((act * np.array(up.astype(mx.float32), np.float64)).astype(np.float32))


@pytest.mark.parametrize("multiplier", [SPARSE, None], ids=["sparse", "dense"])
def test_oracle_is_todays_op_sequence(multiplier):
    args = _args(mx.float32, 3, 1000, multiplier)
    want, ref = np.array(_oracle(*args)), np.array(reference(*args))
    assert np.abs(want - ref).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(3, 77), (3, 1000), (1, 8192)])  # partial simdgroup; 4; E2B
@pytest.mark.parametrize("multiplier", [SPARSE, None], ids=["sparse", "dense"])
def test_matches_the_oracle(dtype, rows, n, multiplier):
    args = _args(dtype, rows, n, multiplier)
    got = executed(OP, args)[0]
    assert_close(got, _oracle(*args), dtype)
    kept = float((got != 0).astype(mx.float32).mean())
    assert (0.02 < kept < 0.09) if multiplier else kept > 0.99


def test_threads_per_row():
    assert [row_threads(n) for n in (1, 77, 1000, 8192, 16384, 10**6)] == [
        32, 32, 128, 1024, 1024, 1024
    ]


def test_dispatch_kernel_per_token_row_reference_otherwise(monkeypatch):
    """Decode rows and a sparse prefill chunk take the kernel; switched off, a dense chunk,
    or past the rows a CUDA grid holds, the reference."""
    decode = _args(mx.float32, 2, 300, SPARSE)
    prefill = (mx.concatenate([decode[0]] * 3, axis=1), mx.concatenate([decode[1]] * 3, axis=1))
    factory = Counting()
    with use_factory(factory, self_check=False):
        got = gated_gelu(*decode)
        off = gated_gelu(*decode, enabled=False)
        longer = gated_gelu(*prefill, SPARSE)
        dense = gated_gelu(*prefill, None)
        monkeypatch.setattr(gated_gelu_module, "MAX_GRID_ROWS", 5)  # 6 rows in the prefill case
        too_many = gated_gelu(*prefill, SPARSE)
    assert factory.launches == ["gated_gelu", "gated_gelu"]
    assert mx.array_equal(got, executed(OP, decode)[0])
    assert mx.array_equal(off, reference(*decode))
    assert mx.array_equal(longer, executed(OP, (*prefill, SPARSE))[0])
    assert mx.array_equal(too_many, reference(*prefill, SPARSE))
    assert mx.array_equal(dense, reference(*prefill, None))
    assert np.array_equal(np.array(longer[:, 1]), np.array(got[:, 0]))

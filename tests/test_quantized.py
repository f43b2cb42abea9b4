"""quantized.py: the CPU's blocked dequantize + matmul against a float64 oracle, when it is
taken, what it keeps alive, and that loaded models use it."""

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_gemma3n.quantized as quantized
from mlx_gemma3n.quantized import QuantizedEmbedding, QuantizedLinear, quantized_matmul, use_blocks
from mlx_gemma3n.text.concat import ConcatLinear

CASES = [  # out, in, transpose, bits, group size, mode
    (1000, 320, True, 4, 64, "affine"),
    (384, 512, False, 4, 64, "affine"),
    (256, 192, True, 8, 32, "affine"),
    (320, 256, False, 3, 64, "affine"),
    (256, 128, True, 4, 32, "mxfp4"),
]


def _quantized(out_dims, in_dims, transpose, bits, group_size, mode, dtype):
    shape = (out_dims, in_dims) if transpose else (in_dims, out_dims)
    w, scales, *biases = mx.quantize(mx.random.normal(shape).astype(dtype), group_size, bits, mode=mode)
    return w, scales, (biases[0] if biases else None)


def _exact(x, w, scales, biases, transpose, group_size, bits, mode):
    dense = mx.dequantize(w, scales, biases, group_size, bits, mode=mode, dtype=mx.float32)
    dense = np.array(dense, dtype=np.float64)
    return np.array(x.astype(mx.float32), dtype=np.float64) @ (dense.T if transpose else dense)


@pytest.mark.parametrize("rows", [(2, 9), (1, 1)])
@pytest.mark.parametrize("dtype,bound", [(mx.float32, 1e-5), (mx.bfloat16, 8e-3)])
@pytest.mark.parametrize("case", CASES)
def test_matches_exact_product(case, dtype, bound, rows, monkeypatch):
    """Blocks (18 rows; several blocks with a ragged last one, BLOCK made small, batch dims
    kept) and one row (MLX's quantized matmul in float32, in parts of 7 weight rows for
    half-precision scales, PART_SCALES made small): float32 to 1e-5 of the largest output,
    bfloat16 to its own rounding (2^-8 relative, 8e-3 of the max; MLX-CPU's bfloat16
    quantized matmul is off by ~1e-1)."""
    out_dims, in_dims, transpose, bits, group_size, mode = case
    monkeypatch.setattr(quantized, "BLOCK", 7 * group_size * in_dims // 3)
    monkeypatch.setattr(quantized, "PART_SCALES", 7 * (in_dims if transpose else out_dims) // group_size)
    mx.random.seed(3)
    w, scales, biases = _quantized(out_dims, in_dims, transpose, bits, group_size, mode, dtype)
    x = mx.random.normal((*rows, in_dims)).astype(dtype)
    y = quantized_matmul(x, w, scales, biases, transpose, group_size, bits, mode)
    assert y.shape == (*rows, out_dims) and y.dtype == dtype
    exact = _exact(x, w, scales, biases, transpose, group_size, bits, mode)
    err = np.abs(np.array(y.astype(mx.float32), dtype=np.float64) - exact).max() / np.abs(exact).max()
    assert err <= bound


def _spy_on_quantized_matmul(monkeypatch):
    """The (shape, dtype) of the input of each call of MLX's quantized matmul."""
    calls = []
    original = mx.quantized_matmul

    def spy(*args, **kwargs):
        calls.append((args[0].shape, args[0].dtype))
        return original(*args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", spy)
    return calls


@pytest.mark.parametrize("dtype,rows", [(mx.float32, 16), (mx.bfloat16, 2)])
def test_which_path(dtype, rows, monkeypatch):
    """From a few rows on (16 in float32, 2 in half precision) the CPU takes the blocks; fewer
    rows (a decode step) keep MLX's quantized matmul, in float32 whatever the input's dtype;
    any row count on an accelerator or inside `mlx_matmul()` keeps MLX's quantized matmul in
    the input's dtype."""
    calls = _spy_on_quantized_matmul(monkeypatch)
    w, scales, biases = _quantized(128, 256, True, 4, 64, "affine", dtype)

    def run(n):
        y = quantized_matmul(mx.ones((n, 256), dtype), w, scales, biases, True, 64, 4)
        assert y.dtype == dtype
        mx.eval(y)

    for n in (1, rows - 1, rows):
        run(n)
    assert calls == [((1, 256), mx.float32), ((rows - 1, 256), mx.float32)]
    calls.clear()
    with quantized.mlx_matmul():
        run(rows)
    run(rows)
    assert calls == [((rows, 256), dtype)]
    calls.clear()
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    run(rows)
    assert calls == [((rows, 256), dtype)]


def test_blocks_bound_memory():
    """The dequantized float32 weights are never alive whole: through four FFN-like layers
    (8192 x 2048, 32 rows) the MLX peak over the inputs stays under half of one weight's
    float32 copy (67 MB). Measured 18 MB; 47 MB without each block waiting for the previous
    block's product (MLX then orders many blocks' dequantization first)."""
    mx.random.seed(0)
    layers = []
    for _ in range(4):
        layers.append([_quantized(8192, 2048, True, 4, 64, "affine", mx.float32),
                       _quantized(2048, 8192, False, 4, 64, "affine", mx.float32)])
    x = mx.random.normal((32, 2048))
    mx.eval(layers, x)
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    for up, down in layers:
        x = x + quantized_matmul(quantized_matmul(x, *up, True, 64, 4), *down, False, 64, 4)
    mx.eval(x)
    extra = mx.get_peak_memory() - before
    assert 0 < extra < 8192 * 2048 * 4 / 2


def test_few_rows_cast_the_scales_in_parts(monkeypatch):
    """One bfloat16 row through a weight with 2^20 scales (32768 x 2048, like a slice of the
    tied LM head) in 128 parts (PART_SCALES made small): MLX's peak over the inputs stays
    under a sixth of what casting all scales and biases to float32 at once costs (8 MB).
    Measured 0.95 MB; cast whole 8.6 MB; in parts that do not wait for the previous part's
    product 2.1 MB. MLX-CPU queues ~12 parts ahead of the one running, so what bounds the
    peak is a part's size."""
    monkeypatch.setattr(quantized, "PART_SCALES", 2**13)
    mx.random.seed(0)
    w, scales, biases = _quantized(32768, 2048, True, 4, 64, "affine", mx.bfloat16)
    x = mx.random.normal((1, 2048)).astype(mx.bfloat16)
    mx.eval(w, scales, biases, x)
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    y = quantized_matmul(x, w, scales, biases, True, 64, 4)
    mx.eval(y)
    extra = mx.get_peak_memory() - before
    assert 0 < extra < 2 * scales.size * 4 / 6


def test_loaded_layers_use_blocks(monkeypatch):
    """use_blocks (called by loading) swaps nn.QuantizedLinear and nn.QuantizedEmbedding for
    this module's classes on the same arrays, including inside containers; such layers still
    join (text/concat.py), and the embedding's `as_linear` (the tied LM head) is
    `quantized_matmul` too."""
    model = nn.Sequential(nn.Linear(256, 64, bias=False), nn.Linear(64, 32), nn.Embedding(100, 256))
    nn.quantize(model, group_size=64, bits=4)
    before = [dict(layer) for layer in model.layers]
    use_blocks(model)
    assert [type(layer) for layer in model.layers] == [QuantizedLinear] * 2 + [QuantizedEmbedding]
    for layer, params in zip(model.layers, before):
        assert layer.bits == 4 and all(layer[k] is v for k, v in params.items())
    x = mx.random.normal((16, 256))
    calls = _spy_on_quantized_matmul(monkeypatch)
    y = model.layers[1](model.layers[0](x))
    assert calls == []  # 16 float32 rows: the blocks
    first = model.layers[0]
    reference = mx.quantized_matmul(x, first["weight"], first["scales"], first["biases"], True, 64, 4)
    expected = nn.QuantizedLinear.__call__(model.layers[1], reference)
    assert mx.allclose(y, expected, rtol=1e-5, atol=1e-5)
    joined = ConcatLinear.join(model.layers[0], model.layers[0])
    assert joined is not None and type(joined.linear) is QuantizedLinear
    calls.clear()
    embedding = model.layers[2]
    h = x[:1].astype(mx.bfloat16)
    logits = embedding.as_linear(h)
    assert calls == [((1, 256), mx.float32)] and logits.dtype == mx.bfloat16
    exact = _exact(h, embedding["weight"], embedding["scales"], embedding["biases"], True, 64, 4, "affine")
    assert np.abs(np.array(logits.astype(mx.float32)) - exact).max() <= 8e-3 * np.abs(exact).max()


def test_blocks_built_in_one_thread_run_in_another():
    """The unpacking function is cached across threads (mlx_thread.py builds graphs on its
    own stream): what it keeps must not be a lazy array of the thread that made it."""
    quantized._unpacker.cache_clear()
    w, scales, biases = _quantized(64, 128, True, 4, 64, "affine", mx.float32)
    x = mx.ones((16, 128))
    mx.eval(w, scales, biases, x)
    worker = threading.Thread(target=quantized_matmul, args=(x, w, scales, biases, True, 64, 4))
    worker.start()
    worker.join()
    y = quantized_matmul(x, w, scales, biases, True, 64, 4)
    assert mx.allclose(y, mx.quantized_matmul(x, w, scales, biases, True, 64, 4), rtol=1e-5, atol=1e-5)

"""Running a FusedOp's Metal body on the CPU executor and judging it against an fp32 reference.

    outs = check_kernel(op, args)   # every schedule, no diagnostics, within tolerance

Tolerances, on each output against `op.reference` run on float32 copies of the same inputs:
float32 |got - ref| <= 1e-5 * scale, float16/bfloat16 |got - ref| <= 2 ulp of the output type
at `scale`, where scale = max(|ref|, RMS of that output): an element that cancels to well
below its terms' size is held to the output's typical size, not to a precision float32
arithmetic cannot give it (its terms round at that size).
"""

import pkgutil
from importlib import import_module

import mlx.core as mx
import numpy as np
from metal_executor import metal_kernel, run_all_schedules

import mlx_gemma3n.kernels as kernels_pkg
from mlx_gemma3n.kernels import FusedOp

DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_MANTISSA_BITS = {mx.float16: 10, mx.bfloat16: 7}
_MIN_NORMAL = {mx.float16: 2.0**-14, mx.bfloat16: 2.0**-126}


def all_kernels() -> list:
    """Every FusedOp of the package, by name."""
    found = {}
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = import_module(f"{kernels_pkg.__name__}.{info.name}")
        found.update({v.name: v for v in vars(module).values() if isinstance(v, FusedOp)})
    return [found[name] for name in sorted(found)]


def ulp(dtype: mx.Dtype, x: np.ndarray) -> np.ndarray:
    """The spacing of `dtype` values at magnitude x."""
    x = np.maximum(np.abs(x), _MIN_NORMAL[dtype])
    return 2.0 ** (np.floor(np.log2(x)) - _MANTISSA_BITS[dtype])


def to_float32(args: tuple) -> tuple:
    return tuple(
        a.astype(mx.float32) if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)
        else a
        for a in args
    )


def executed(op, args: tuple) -> tuple:
    """op's kernel run by the executor under every schedule (bit-identical results required;
    any executor diagnostic raises)."""
    kernel = metal_kernel(**op.spec)
    return run_all_schedules(lambda: op.launch(kernel, *args))


def assert_within(got: mx.array, want: np.ndarray, scale, dtype: mx.Dtype, what: str = "") -> None:
    """got (of `dtype`) against a float64 `want`: float32 within 1e-5 of `scale`, half types
    within 2 ulp of the output type at `scale` (per element or one for all)."""
    assert got.shape == want.shape and got.dtype == dtype, (what, got.shape, got.dtype)
    err = np.abs(np.array(got.astype(mx.float32), dtype=np.float64) - want)
    limit = 1e-5 * scale if dtype == mx.float32 else 2 * ulp(dtype, scale)
    bad = ~(err <= limit)
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} elements off, worst {np.max(err / limit):.3g}x the limit"
    )


def assert_close(got: mx.array, want: mx.array, dtype: mx.Dtype, what: str = "") -> None:
    """got against an fp32 reference output, at the scale the module docstring gives."""
    w = np.array(want.astype(mx.float32), dtype=np.float64)
    assert_within(got, w, np.maximum(np.abs(w), np.sqrt(np.mean(w * w))), dtype, what)


def check_kernel(op, args: tuple) -> tuple:
    """Execute op's kernel on `args` and compare every output with the fp32 reference."""
    got = executed(op, args)
    want = op.reference(*to_float32(args))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, args[0].dtype, f"{op.name} output {i}")
    return got

"""Dispatch for the fused decode kernels.

Each kernel body is written once in Metal's dialect. It runs through `mx.fast.metal_kernel`
where Metal is available, through `mx.fast.cuda_kernel` with the prelude in `prelude.py`
where the default device is a CUDA GPU, and nowhere else: there the pure-MLX reference runs.

On first use per (kernel, dtype) the kernel checks itself against its reference on a small
input; a compile error or a mismatch disables it with one warning and the reference is used
from then on. `MLX_GEMMA3N_KERNELS=0` (or `enabled=False` at a call site, e.g. through
`load(..., kernels=False)`) forces the reference path everywhere.
"""

import os
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, Optional, Sequence

import mlx.core as mx
import numpy as np

from .prelude import CUDA_PRELUDE

ENV_SWITCH = "MLX_GEMMA3N_KERNELS"

# A kernel whose grid's y index is its row takes at most this many rows (CUDA's limit).
MAX_GRID_ROWS = 65535

# Self-check tolerances (relative and absolute, on float32 copies). Looser than the tests':
# the check guards against a broken compile or a wrong index, not against the last ulp.
_CHECK_TOLERANCE = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 6e-2}


def _cuda_kernel(name, input_names, output_names, source, header="", **options):
    options.pop("atomic_outputs", None)
    return mx.fast.cuda_kernel(
        name=name,
        input_names=input_names,
        output_names=output_names,
        source=source,
        header=CUDA_PRELUDE + header,
        **options,
    )


def _cuda_default() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda and cuda.is_available() and mx.default_device() == mx.gpu)


def _device_factory() -> Optional[Callable]:
    if mx.metal.is_available():
        return mx.fast.metal_kernel
    if _cuda_default():
        return _cuda_kernel
    return None


class _State:
    """The active kernel factory. `generation` changes with it, dropping compiled kernels."""

    factory: Optional[Callable] = None
    overridden = False
    self_check = True
    generation = 0


def _factory() -> Optional[Callable]:
    if not _State.overridden:
        _State.factory = _device_factory()
    return _State.factory


@contextmanager
def use_factory(factory: Callable, self_check: bool = True):
    """Build kernels with `factory` (same signature as `mx.fast.metal_kernel`), on any device.

    Tests pass the CPU executor's `metal_kernel`; `bench/launches.py` passes
    `mx.fast.metal_kernel` with `self_check=False` to trace the kernel path without Metal."""
    saved = (_State.factory, _State.overridden, _State.self_check)
    _State.factory, _State.overridden, _State.self_check = factory, True, self_check
    _State.generation += 1
    try:
        yield
    finally:
        _State.factory, _State.overridden, _State.self_check = saved
        _State.generation += 1


def kernels_enabled(enabled: bool = True) -> bool:
    """Whether the kernel path is taken: asked for, not switched off by the environment, and
    a kernel factory exists (Metal, CUDA or a test's)."""
    if not enabled or os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    return _factory() is not None


def kernel_setting(enabled: bool = True) -> tuple:
    """What a traced graph's kernel choices depend on: whether the path is taken and with
    which factory (a compiled function traced under one setting must not serve another)."""
    return kernels_enabled(enabled), _factory()


def _max_mismatch(got: Sequence[mx.array], want: Sequence[mx.array], tol: float) -> float:
    """Worst |got - want| / (tol * (1 + |want|)) over all outputs; > 1 means a mismatch."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            return float("inf")
        g = np.array(g.astype(mx.float32))
        w = np.array(w.astype(mx.float32))
        err = np.abs(g - w) / (tol * (1.0 + np.abs(w)))
        worst = max(worst, float(np.nan_to_num(err, nan=np.inf).max(initial=0.0)))
    return worst


class FusedOp:
    """One kernel: its Metal body, launcher, pure-MLX reference and self-check input.

    `launch(kernel, *args)` and `reference(*args)` return a tuple of arrays (the same
    outputs); `sample(dtype)` returns small `args` for the self-check. The dtype of the first
    argument selects the compiled instance and its self-check."""

    def __init__(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        launch: Callable,
        reference: Callable,
        sample: Callable[[mx.Dtype], tuple],
        header: str = "",
    ):
        self.name = name
        self.spec = dict(
            name=name,
            input_names=list(input_names),
            output_names=list(output_names),
            source=source,
            header=header,
        )
        self.launch = launch
        self.reference = reference
        self.sample = sample
        self._kernels: Dict[mx.Dtype, object] = {}
        self._generation = -1

    def __call__(self, *args, enabled: bool = True):
        if not kernels_enabled(enabled):
            return self.reference(*args)
        kernel = self.compiled(args[0].dtype)
        if kernel is None:
            return self.reference(*args)
        return self.launch(kernel, *args)

    def compiled(self, dtype: mx.Dtype):
        """The kernel object for `dtype`, built and self-checked once; None if it failed."""
        if self._generation != _State.generation:
            self._kernels, self._generation = {}, _State.generation
        if dtype not in self._kernels:
            self._kernels[dtype] = self._build(dtype)
        return self._kernels[dtype]

    def _build(self, dtype: mx.Dtype):
        try:
            kernel = _factory()(**self.spec)
            if _State.self_check:
                self._check(kernel, dtype)
        except Exception as e:  # any compile or launch failure disables just this kernel
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warnings.warn(
                f"mlx_gemma3n kernel {self.name!r} ({dtype}) failed its self-check "
                f"({type(e).__name__}: {first_line}); using the reference path for it",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        return kernel

    def _check(self, kernel, dtype: mx.Dtype) -> None:
        args = self.sample(dtype)
        got = self.launch(kernel, *args)
        # The reference runs on the CPU: on a GPU, MLX rounds float32 matmuls like TF32 by
        # default (MLX_ENABLE_TF32; CUDA, Apple M5), ~1e-3 off where the kernels' float32
        # arithmetic is exact (altup_predict "failed" this check on an H100 that way).
        with mx.stream(mx.cpu):
            want = self.reference(*args)
        mx.eval(got, want)
        worst = _max_mismatch(got, want, _CHECK_TOLERANCE[dtype])
        if not worst <= 1.0:
            raise ValueError(f"output differs from the reference ({worst:.3g}x the tolerance)")


def set_kernels(model, enabled: bool) -> None:
    """Turn the kernel path on or off for every submodule of `model` that has one (those
    that define a `use_kernels` attribute and pass it as `enabled=` to their FusedOps)."""
    for module in model.modules():
        if hasattr(module, "use_kernels"):
            module.use_kernels = enabled

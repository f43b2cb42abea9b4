"""A CPU executor for Metal kernel sources: a drop-in for `mx.fast.metal_kernel` in tests.

    kern = metal_kernel(name=..., input_names=[...], output_names=[...], source=...)
    outs = kern(inputs=[...], template=[("T", mx.float32)], grid=(gx, gy, gz),
                threadgroup=(tx, ty, tz), output_shapes=[...], output_dtypes=[...])

The source MLX would generate (see source.py) is compiled with clang++ against a small Metal
shim (shim.h) and run with every thread of a threadgroup as a fiber (scheduler.h): barriers
and simd collectives (collectives.h) synchronise for real, threadgroup memory and outputs start
as NaN, and every buffer sits between canaries (launch.h, buffers.py). Executor-only controls:

    with options(schedule="reverse"):  ...     # or "forward" (default), "shuffle" with seed=
    with options(check_coverage=False): ...    # allow outputs the kernel leaves unwritten
    with options(geometry="cuda"): ...         # whole edge threadgroups, as MLX's cuda_kernel
    with collect() as diags: ...               # record problems in `diags` instead of raising
    outs = run_all_schedules(lambda: kern(...))  # raises unless every schedule agrees bit for bit

Problems found (out-of-bounds writes, partial barriers, divergent simd collectives, unwritten
outputs, crashes, hangs) raise ExecutorError unless collected.
"""

import contextlib
import ctypes

import mlx.core as mx
import numpy as np

from . import buffers, build, source
from .build import CompileError

__all__ = ["metal_kernel", "options", "collect", "run_all_schedules", "ExecutorError",
           "CompileError", "SCHEDULES"]

SCHEDULES = {"forward": 0, "reverse": 1, "shuffle": 2}
MAX_THREADS_PER_THREADGROUP = 1024
_options = {"schedule": "forward", "seed": 0, "check_coverage": True, "stack_kb": 64,
            "timeout_s": 60, "geometry": "metal"}
GEOMETRIES = ("metal", "cuda")
_collectors = []


class ExecutorError(AssertionError):
    """The executor found a bug in the kernel (or in how it was launched)."""


@contextlib.contextmanager
def options(**kw):
    """Temporarily set schedule ("forward"/"reverse"/"shuffle"), seed, check_coverage, stack_kb
    (per thread), timeout_s (per launch) and geometry: "metal" (partial threadgroups at the
    grid's edge) or "cuda" (whole threadgroups, threads past the grid run too, as under
    MLX's cuda_kernel)."""
    unknown = set(kw) - set(_options)
    if unknown:
        raise TypeError(f"metal executor options: unknown {sorted(unknown)}")
    if kw.get("schedule", "forward") not in SCHEDULES:
        raise ValueError(f"metal executor: schedule must be one of {list(SCHEDULES)}")
    if kw.get("geometry", "metal") not in GEOMETRIES:
        raise ValueError(f"metal executor: geometry must be one of {list(GEOMETRIES)}")
    saved = dict(_options)
    _options.update(kw)
    try:
        yield
    finally:
        _options.clear()
        _options.update(saved)


@contextlib.contextmanager
def collect():
    """Collect executor diagnostics (strings) into the yielded list instead of raising."""
    found = []
    _collectors.append(found)
    try:
        yield found
    finally:
        _collectors.remove(found)


def _report(problems):
    if not problems:
        return
    if _collectors:
        _collectors[-1].extend(problems)
    else:
        raise ExecutorError("\n".join(problems))


def _as_list(outs):
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def run_all_schedules(fn, seeds=(0, 1, 2)):
    """fn() under the forward, reverse and shuffled schedules; its outputs must agree bitwise.

    Returns the forward schedule's result.
    """
    runs = [("forward", 0), ("reverse", 0)] + [("shuffle", s) for s in seeds]
    results = []
    for schedule, seed in runs:
        with options(schedule=schedule, seed=seed):
            results.append((f"{schedule}(seed={seed})", fn()))
    ref_name, ref = results[0]
    for name, outs in results[1:]:
        for i, (a, b) in enumerate(zip(_as_list(ref), _as_list(outs))):
            da, db = buffers.to_bytes(a), buffers.to_bytes(b)
            if not np.array_equal(da, db):
                raise ExecutorError(f"output {i} differs between the {ref_name} and {name} "
                                    "schedules: the kernel depends on thread order (a missing "
                                    "barrier or a race)")
    return ref


def _check_launch(grid, threadgroup):
    if len(grid) != 3 or len(threadgroup) != 3:
        raise ValueError("metal_kernel: grid and threadgroup must have three entries")
    if any(int(g) <= 0 for g in grid) or any(int(t) <= 0 for t in threadgroup):
        raise ValueError(f"metal_kernel: grid {tuple(grid)} and threadgroup {tuple(threadgroup)} "
                         "must be positive")
    # MLX dispatches min(threadgroup, grid) per dimension.
    tpg = tuple(min(int(t), int(g)) for t, g in zip(threadgroup, grid))
    if tpg[0] * tpg[1] * tpg[2] > MAX_THREADS_PER_THREADGROUP:
        raise ValueError(f"metal_kernel: threadgroup {tpg} has more than "
                         f"{MAX_THREADS_PER_THREADGROUP} threads")
    return tuple(int(g) for g in grid), tpg


class metal_kernel:
    """Same constructor and call as `mx.fast.metal_kernel`; runs on the CPU executor.

    `ensure_row_contiguous` is accepted for compatibility: inputs always arrive row-contiguous.
    """

    def __init__(self, name, input_names, output_names, source, header="",
                 ensure_row_contiguous=True, atomic_outputs=False):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
        self.source, self.header, self.atomic_outputs = source, header, atomic_outputs

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        for what, got, want in (("inputs", inputs, self.input_names),
                                ("output_shapes", output_shapes, self.output_names),
                                ("output_dtypes", output_dtypes, self.output_names)):
            if len(got) != len(want):
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {len(want)} "
                                 f"but got size {len(got)}.")
        grid, tpg = _check_launch(grid, threadgroup)
        gen = source.generate(self.name, self.input_names, self.output_names, self.source,
                              self.header, inputs, output_dtypes, template, self.atomic_outputs)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{gen.source}\n```")
        lib = build.load(gen)
        outs = [buffers.output_buffer(n, tuple(s), d, init_value)
                for n, s, d in zip(self.output_names, output_shapes, output_dtypes)]
        ins = [buffers.input_buffer(n, x) for n, x in zip(self.input_names, inputs)]
        args = [self._argument(p, inputs, ins, outs) for p in gen.params]
        self._launch(lib, args, grid, tpg)
        problems = [m for b in ins + outs if (m := b.overwritten_canaries())]
        if init_value is None and _options["check_coverage"]:
            problems += self._coverage(outs, output_dtypes)
        _report(problems)
        return [buffers.from_bytes(b.data, tuple(s), d)
                for b, s, d in zip(outs, output_shapes, output_dtypes)]

    @staticmethod
    def _argument(param, inputs, ins, outs):
        if param.kind == "output":
            return outs[param.index]
        if param.kind == "input":
            return ins[param.index]
        x = inputs[param.index]
        if param.kind == "shape":
            return buffers.int_buffer("shape", x.shape, np.int32)
        if param.kind == "strides":  # row-contiguous element strides
            strides = np.cumprod([1, *x.shape[::-1]])[:-1][::-1] if x.ndim else []
            return buffers.int_buffer("strides", strides, np.int64)
        return buffers.int_buffer("ndim", [x.ndim], np.int32)

    def _launch(self, lib, args, grid, tpg):
        ptrs = (ctypes.c_void_p * max(len(args), 1))(*[a.pointer for a in args])
        cfg = (ctypes.c_int64 * 11)(*grid, *tpg, SCHEDULES[_options["schedule"]],
                                    int(_options["seed"]), int(_options["stack_kb"]) * 1024,
                                    int(_options["timeout_s"]), _options["geometry"] == "cuda")
        err = ctypes.create_string_buffer(2048)
        if lib.mxexec_launch(ptrs, cfg, err, len(err)) != 0:
            _report([f"kernel {self.name}: {err.value.decode(errors='replace')}"])

    def _coverage(self, outs, dtypes):
        problems = []
        for b, d in zip(outs, dtypes):
            for pattern, what in ((buffers.POISON, "never written (NaN poison left, or "
                                                   "copied from an uninitialised variable"),
                                  (buffers.TG_POISON, "copied from uninitialised threadgroup "
                                                      "memory (its NaN poison")):
                idx = b.holding(d, pattern)
                if idx.size:
                    problems.append(f"kernel {self.name}: output '{b.name}' has {idx.size} of "
                                    f"{b.nbytes // d.size} elements {what}; first at flat index "
                                    f"{idx[0]})")
        return problems

"""Compiles `mx.fast.cuda_kernel` sources with NVRTC (from pip's NVIDIA packages; no GPU needed).

The translation unit is the one MLX 0.32's CUDA backend builds (mlx/backend/cuda/custom_kernel.cpp):
its default header (MLX's device utils.cuh and cooperative_groups), the caller's header, then
`namespace mlx::core::cu { __global__ void custom_kernel_<name><hash>(inputs..., outputs...) {
<template args as constexpr/using> <body> } }`. It is compiled the way MLX's jit_module.cpp does:
MLX's embedded device headers registered under `mlx/backend/cuda/device/...`, the CCCL headers
of MLX's wheel and the CUDA runtime headers on the include path, `--device-as-default-execution-
space`, for sm_90. `scripts/mlx_cuda_headers.py` (run by `scripts/setup.sh --test`) fetches the
MLX headers for the installed mlx version. At launch MLX runs ceil(grid / threadgroup) whole
blocks of min(threadgroup, grid) threads, so a body must guard positions past its size
(`metal_executor.options(geometry="cuda")` runs a body in that shape on the CPU).

    kernel = compile_cuda_kernel("myexp", ["inp"], ["out"], body, header=prelude,
                                 template=[("T", mx.bfloat16)], input_dtypes=[mx.bfloat16],
                                 output_dtypes=[mx.bfloat16])   # raises NvrtcError with the log
"""

import ctypes
import functools
import glob
import os
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx

from metal_executor.source import shape_infos, type_string

CUDA_TYPES = {
    mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t",
    mx.uint64: "uint64_t", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
    mx.float32: "float", mx.float64: "double", mx.complex64: "mlx::core::cu::complex64_t",
}
# The text of MLX 0.32's cuda_kernel source builder, piece by piece (tests check each piece
# against the strings of the libmlx.so it mirrors).
DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
OPEN = "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
KERNEL = "__global__ void "
SHAPE, STRIDES, NDIM = ("    const __grid_constant__ Shape ", "    const __grid_constant__ Strides ",
                        "    const __grid_constant__ int ")
CONST_INT, CONST_BOOL, USING = ("  constexpr int {} = {};\n", "  constexpr bool {} = {};\n",
                                "  using {} = {};\n")
CLOSE = "\n}\n\n} // namespace mlx::core::cu\n"
PIECES = (DEFAULT_HEADER, OPEN, KERNEL, SHAPE, STRIDES, NDIM, CONST_INT, CONST_BOOL, USING, CLOSE,
          "_shape,\n", "_strides,\n", "_ndim,\n", "custom_kernel_")


class NvrtcError(RuntimeError):
    """NVRTC is missing or rejected the source; the message carries the compiler log."""


@dataclass(frozen=True)
class CompiledKernel:
    """A kernel NVRTC compiled: the name MLX looks it up by, its symbol, source and cubin."""

    name: str          # mlx::core::cu::custom_kernel_...
    lowered_name: str  # the mangled symbol in the cubin
    source: str        # the translation unit
    cubin: bytes
    log: str


def cuda_type(dtype):
    if dtype not in CUDA_TYPES:
        raise TypeError(f"cuda_kernel: unsupported dtype {dtype}")
    return CUDA_TYPES[dtype]


def _template_hash(template):
    out = ""
    for _, v in template:
        out += ("_t" if v else "_f") if isinstance(v, bool) else f"_{v}" if isinstance(v, int) \
            else "_" + type_string(v)
    return out


def _template_line(key, v):
    if isinstance(v, bool):
        return CONST_BOOL.format(key, "true" if v else "false")
    if isinstance(v, int):
        return CONST_INT.format(key, v)
    return USING.format(key, cuda_type(v))


def build_source(name, input_names, output_names, source, header, template, input_dtypes,
                 input_ndims, output_dtypes):
    """(kernel name, translation unit) exactly as MLX's CUDA `build_kernel` writes them."""
    kernel_name = "custom_kernel_" + name + _template_hash(template)
    text = DEFAULT_HEADER + header + OPEN + KERNEL + kernel_name + "(\n"
    for n, d, nd, (shape, strides, ndim) in zip(input_names, input_dtypes, input_ndims,
                                                  shape_infos(source, input_names)):
        text += f"    const {cuda_type(d)}* {n},\n"
        if nd > 0:
            text += (SHAPE + n + "_shape,\n") if shape else ""
            text += (STRIDES + n + "_strides,\n") if strides else ""
            text += (NDIM + n + "_ndim,\n") if ndim else ""
    text += ",\n".join(f"    {cuda_type(d)}* {n}" for n, d in zip(output_names, output_dtypes))
    text += ") {\n"
    if template:
        text += "".join(_template_line(k, v) for k, v in template) + "\n"
    return kernel_name, text + source + CLOSE


def _site_dirs():
    return [Path(p) for p in sys.path if p and Path(p).is_dir()]


@functools.cache
def nvrtc():
    """The NVRTC library from pip's nvidia-cuda-nvrtc (NVRTC_LIBRARY overrides)."""
    found = [os.environ["NVRTC_LIBRARY"]] if os.environ.get("NVRTC_LIBRARY") else sorted(
        p for d in _site_dirs()
        for p in glob.glob(str(d / "nvidia" / "*" / "lib" / "libnvrtc.so.*"))
        if "builtins" not in p and ".alt." not in p)
    if not found:
        raise NvrtcError("NVRTC not found: install the test extra (pip's nvidia-cuda-nvrtc), "
                         "e.g. `bash scripts/setup.sh --test`")
    # NVRTC dlopens its builtins by soname; loaded first from the same folder, they are found.
    for builtins in glob.glob(str(Path(found[-1]).parent / "libnvrtc-builtins.so.*")):
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(found[-1])
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def mlx_cuda_jit_dir():
    """What scripts/mlx_cuda_headers.py extracted from MLX's CUDA wheel (MLX_CUDA_JIT_DIR overrides)."""
    jit = Path(os.environ.get("MLX_CUDA_JIT_DIR") or Path(sys.prefix) / "mlx-cuda-jit" / version("mlx"))
    if not (jit / "custom_kernel_strings.json").is_file():
        raise NvrtcError(f"MLX's CUDA headers are not in {jit}: run "
                         "`python scripts/mlx_cuda_headers.py` (scripts/setup.sh --test does)")
    return jit


@functools.cache
def include_dirs():
    """[CCCL from MLX's CUDA wheel, CUDA runtime headers] and MLX's device headers by name."""
    jit = mlx_cuda_jit_dir()
    cuda = [Path(p).parent for d in _site_dirs()
            for p in glob.glob(str(d / "nvidia" / "*" / "include" / "cuda_fp16.h"))]
    if not cuda:
        raise NvrtcError("CUDA runtime headers not found: install pip's nvidia-cuda-runtime")
    headers = {str(p.relative_to(jit / "headers")): p.read_bytes()
               for p in sorted((jit / "headers").rglob("*")) if p.is_file()}
    return [jit / "cccl", cuda[0]], headers


def _check(lib, result, what):
    if result != 0:
        raise NvrtcError(f"{what} failed: {lib.nvrtcGetErrorString(result).decode()}")


@functools.lru_cache(maxsize=256)
def compile_source(kernel_name, text, arch="sm_90"):
    """Compile a translation unit; returns the cubin and the lowered kernel name."""
    lib = nvrtc()
    dirs, headers = include_dirs()
    prog = ctypes.c_void_p()
    names = list(headers)
    n = len(names)
    _check(lib, lib.nvrtcCreateProgram(
        ctypes.byref(prog), text.encode(), f"{kernel_name}.cu".encode(), n,
        (ctypes.c_char_p * n)(*[headers[k] for k in names]),
        (ctypes.c_char_p * n)(*[k.encode() for k in names])), "nvrtcCreateProgram")
    try:
        full = f"mlx::core::cu::{kernel_name}".encode()
        _check(lib, lib.nvrtcAddNameExpression(prog, full), "nvrtcAddNameExpression")
        opts = [f"--gpu-architecture={arch}", "--device-as-default-execution-space",
                *[f"--include-path={d}" for d in dirs],
                # Speed only: NVRTC precompiles the leading #include (MLX's utils.cuh, ~6 s)
                # once per process and reuses it for every later kernel.
                "-pch"]
        result = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(
            *[o.encode() for o in opts]))
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        log = ctypes.create_string_buffer(size.value + 1)
        _check(lib, lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        log = log.value.decode(errors="replace")
        if result != 0:
            raise NvrtcError(f"NVRTC failed to compile {kernel_name} "
                             f"({lib.nvrtcGetErrorString(result).decode()}):\n{log}")
        lowered = ctypes.c_char_p()
        _check(lib, lib.nvrtcGetLoweredName(prog, full, ctypes.byref(lowered)), "nvrtcGetLoweredName")
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return CompiledKernel(full.decode(), lowered.value.decode(), text, cubin.raw, log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_cuda_kernel(name, input_names, output_names, source, header="", template=(), *,
                        inputs=None, input_dtypes=None, input_ndims=None, output_dtypes,
                        arch="sm_90"):
    """Build MLX's translation unit for a cuda_kernel call and compile it with NVRTC.

    Give the inputs either as arrays (`inputs`) or as `input_dtypes` (+ `input_ndims`, default 1).
    Raises NvrtcError with NVRTC's log when the source does not compile.
    """
    if inputs is not None:
        input_dtypes, input_ndims = [x.dtype for x in inputs], [x.ndim for x in inputs]
    input_ndims = input_ndims or [1] * len(input_dtypes)
    if not (len(input_names) == len(input_dtypes) == len(input_ndims)):
        raise ValueError("compile_cuda_kernel: input_names, input dtypes and ndims differ in length")
    if len(output_names) != len(output_dtypes) or not output_names:
        raise ValueError("compile_cuda_kernel: give one dtype per output (at least one output)")
    kernel_name, text = build_source(name, input_names, output_names, source, header,
                                     list(template or ()), input_dtypes, input_ndims, output_dtypes)
    return compile_source(kernel_name, text, arch)

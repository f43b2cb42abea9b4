"""Compiles MLX's generated kernel source against the shim with clang++, cached by content hash."""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Newest first; _Float16 on x86-64 needs clang >= 15 (Debian's default `clang` 14 lacks it).
CANDIDATES = [f"clang++-{v}" for v in range(22, 14, -1)] + ["clang++"]
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-fvisibility=hidden", "-Wno-unknown-attributes",
         # Uninitialised locals start as NaN (floats) or 0xAA.. (integers), like garbage would.
         "-ftrivial-auto-var-init=pattern",
         # Metal rounds every half operation to half; clang would keep float intermediates.
         "-Xclang", "-ffloat16-excess-precision=none"]


class CompileError(RuntimeError):
    """clang++ rejected a kernel; the message holds the compiler log and the source path."""


def _usable(cxx):
    probe = subprocess.run([cxx, *FLAGS, "-x", "c++", "-fsyntax-only", "-"],
                           input="_Float16 h = 1;", capture_output=True, text=True)
    return probe.returncode == 0


@functools.cache
def compiler():
    """(path, version line) of the clang++ used; METAL_EXECUTOR_CXX overrides the search."""
    names = [os.environ["METAL_EXECUTOR_CXX"]] if os.environ.get("METAL_EXECUTOR_CXX") else CANDIDATES
    for name in names:
        path = shutil.which(name)
        if path and _usable(path):
            version = subprocess.run([path, "--version"], capture_output=True, text=True)
            return path, version.stdout.splitlines()[0]
    raise CompileError("metal executor: no clang++ that takes _Float16 and the executor's flags "
                       f"({' '.join(FLAGS)}) found; `bash scripts/setup.sh --test` installs "
                       "Debian's clang-19")


def cache_dir():
    d = Path(os.environ.get("METAL_EXECUTOR_CACHE")
             or Path(tempfile.gettempdir()) / "mlx_gemma3n_metal_executor")
    d.mkdir(parents=True, exist_ok=True)
    return d


def translation_unit(gen):
    """The C++ file: runtime + shim, MLX's source verbatim, and the per-thread entry point.

    One MLX line is rewritten: its explicit instantiation carries `[[host_name]] [[kernel]]`,
    which C++ does not allow on an explicit instantiation; the instantiation itself is kept.
    """
    source = gen.source
    if gen.template_def:
        source = source.replace(f'template [[host_name("{gen.name}")]] [[kernel]] ', "template ")
    args = []
    for k, p in enumerate(gen.params):
        ctype = p.decl.rsplit(" ", 1)[0]
        args.append(f"*({ctype[:-1]}*)b[{k}]" if p.by_ref else f"({ctype})b[{k}]")
    args += [f"a->{name}" for name, _ in gen.attributes]
    call = f"{gen.name}{gen.template_def}(\n      " + ",\n      ".join(args) + ")"
    return (f'#include "{HERE / "runtime.h"}"\n#line 1 "{gen.name}.metal"\n{source}\n'
            f'#line 1 "executor_entry.cpp"\n'
            f"static void mxexec_entry(void** b, const mxexec::Attrs* a) {{\n  {call};\n}}\n"
            'extern "C" __attribute__((visibility("default")))\n'
            "int mxexec_launch(void** b, const int64_t* cfg, char* err, size_t len) {\n"
            "  return mxexec::launch(mxexec_entry, b, cfg, err, len);\n}\n")


# Once per process: it reads and hashes every header, and a test launches thousands of kernels.
@functools.cache
def _shim_digest():
    # Content and mtimes: clang refuses a precompiled header older than its sources.
    parts = [f.read_bytes() + str(f.stat().st_mtime_ns).encode() for f in sorted(HERE.glob("*.h"))]
    return hashlib.sha256(b"".join(parts)).hexdigest()


def _compile(cmd, out, what):
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CompileError(f"metal executor: clang++ rejected {what}:\n{done.stderr}")
    os.replace(tmp, out)


def _precompiled_runtime(cxx, key):
    """runtime.h (all the headers here) precompiled once: ~half of every kernel's compile time."""
    pch = cache_dir() / f"runtime-{key}.pch"
    if not pch.exists():
        _compile([cxx, *FLAGS, "-x", "c++-header", str(HERE / "runtime.h")], pch, "runtime.h")
    return pch


_loaded = {}


def load(gen):
    """The compiled kernel library for a generated source (compiling it once per content)."""
    cxx, version = compiler()
    tu = translation_unit(gen)
    runtime_key = hashlib.sha256("\0".join([_shim_digest(), version, *FLAGS]).encode()).hexdigest()[:24]
    key = hashlib.sha256(f"{tu}\0{runtime_key}".encode()).hexdigest()[:24]
    if key in _loaded:
        return _loaded[key]
    so = cache_dir() / f"{gen.name[:80]}-{key}.so"
    if not so.exists():
        pch = _precompiled_runtime(cxx, runtime_key)
        cpp = so.with_suffix(".cpp")
        cpp.write_text(tu)
        _compile([cxx, *FLAGS, "-shared", "-include-pch", str(pch), str(cpp)], so,
                 f"kernel {gen.name} (source: {cpp})")
    lib = ctypes.CDLL(str(so))
    lib.mxexec_launch.restype = ctypes.c_int
    lib.mxexec_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                                  ctypes.c_char_p, ctypes.c_size_t]
    _loaded[key] = lib
    return lib

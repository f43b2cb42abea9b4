"""Fetches what MLX's CUDA backend hands NVRTC, for compiling `mx.fast.cuda_kernel` sources in
tests without a GPU: the CCCL headers its wheel ships and the device headers it embeds in
libmlx.so (`jit_source_*`, given to nvrtcCreateProgram under `mlx/backend/cuda/device/...`).

    python scripts/mlx_cuda_headers.py [DEST]   # default: <venv>/mlx-cuda-jit/<mlx version>

Uses the mlx-cuda-13 wheel of the installed mlx's version (pip download; nothing is installed).
"""

import json
import mmap
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

INCLUDE_PREFIX = b"mlx/backend/cuda/device/"


def default_dest():
    return Path(sys.prefix) / "mlx-cuda-jit" / version("mlx")


def elf_sections(data):
    """{name: (address, file offset, size)} of an ELF64 file's sections, plus their list."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = raw[shstrndx][4]
    named = {bytes(data[names + r[0]:data.find(b"\0", names + r[0])]).decode(): r for r in raw}
    return named, raw


def jit_sources(data, raw):
    """{stem: bytes} of the `mlx::core::jit_source_<stem>` char arrays (first of duplicates)."""
    found = {}
    for sec in raw:
        if sec[1] != 2:  # SHT_SYMTAB
            continue
        strtab = raw[sec[6]][4]
        for off in range(sec[4], sec[4] + sec[5], 24):
            name_off, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", data, off)
            name = data[strtab + name_off:data.find(b"\0", strtab + name_off)]
            m = re.fullmatch(rb"_ZN3mlx4coreL\d+jit_source_(\w+)E", name)
            if m and size and shndx < len(raw):
                start = raw[shndx][4] + value - raw[shndx][3]
                found.setdefault(m.group(1), bytes(data[start:start + size]).rstrip(b"\0"))
    return found


# Strings of MLX's cuda_kernel source builder (custom_kernel.cpp), kept so that tests can check
# the harness's translation unit against the library it mirrors.
BUILDER_MARKERS = (b"__grid_constant__", b"constexpr ", b"using {}", b"__global__", b"namespace",
                   b"_shape", b"_strides", b"_ndim", b"cooperative_groups", b"custom_kernel")


def builder_strings(rodata):
    return sorted({p.decode() for p in rodata.split(b"\0")
                   if 2 <= len(p) <= 400 and any(k in p for k in BUILDER_MARKERS)
                   and all(c in b"\t\n" or 32 <= c < 127 for c in p)})


def read_library(lib_path):
    """({include name: bytes} of the headers libmlx.so hands NVRTC, builder strings)."""
    with open(lib_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        named, raw = elf_sections(data)
        _addr, off, size = named[".rodata"][3], named[".rodata"][4], named[".rodata"][5]
        rodata = bytes(data[off:off + size])
        headers = {}
        for stem, text in jit_sources(data, raw).items():
            # The include name MLX registers it under, as stored in the same library.
            inc = re.search(re.escape(INCLUDE_PREFIX + stem) + rb"\.(cuh|h)\0", rodata)
            if inc:  # otherwise a kernel source, not a header
                headers[inc.group(0)[:-1].decode()] = text
        return headers, builder_strings(rodata)


def extract(wheel, dest):
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if member.startswith("mlx/include/cccl/") and not member.endswith("/"):
                out = tmp / "cccl" / member[len("mlx/include/cccl/"):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(member))
        lib = tmp / "libmlx.so"
        with z.open("mlx/lib/libmlx.so") as src, open(lib, "wb") as dst:
            shutil.copyfileobj(src, dst)
    headers, strings = read_library(lib)
    lib.unlink()
    (tmp / "custom_kernel_strings.json").write_text(json.dumps(strings, indent=0))
    if "mlx/backend/cuda/device/utils.cuh" not in headers:
        raise SystemExit("mlx_cuda_headers: libmlx.so holds no embedded utils.cuh")
    for name, text in headers.items():
        out = tmp / "headers" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(text)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def main():
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else default_dest()
    if (dest / "custom_kernel_strings.json").is_file():  # written last: the set is complete
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--platform", "manylinux_2_35_x86_64",
                        f"mlx-cuda-13=={version('mlx')}", "-d", tmp], check=True)
        extract(next(Path(tmp).glob("mlx_cuda_13-*.whl")), dest)
    print(f"mlx_cuda_headers: {dest}")


if __name__ == "__main__":
    main()

"""Fetches what MLX's CUDA backend hands NVRTC, for compiling `mx.fast.cuda_kernel` sources in
tests without a GPU: the CCCL headers its wheel ships and the device headers it embeds in
libmlx.so (`jit_source_*`, given to nvrtcCreateProgram under `mlx/backend/cuda/device/...`).

    python scripts/mlx_cuda_headers.py [DEST]   # default: <venv>/mlx-cuda-jit/<mlx version>

Uses the mlx-cuda-13 wheel of the installed mlx's version (pip download; nothing is installed).
"""

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


def elf_symbols(data):
    """(name, value, size, section index) of every symbol in an ELF64 file's .symtab."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for sec in sections:
        if sec[1] != 2:  # SHT_SYMTAB
            continue
        strtab = sections[sec[6]]
        for off in range(sec[4], sec[4] + sec[5], 24):
            name_off, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", data, off)
            end = data.find(b"\0", strtab[4] + name_off)
            yield data[strtab[4] + name_off:end].decode(), value, size, shndx, sections


def embedded_headers(lib_path):
    """{include name: bytes} for the jit_source_* headers libmlx.so passes to NVRTC."""
    with open(lib_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        found = {}
        for name, value, size, shndx, sections in elf_symbols(data):
            m = re.fullmatch(r"_ZN3mlx4coreL\d+jit_source_(\w+)E", name)
            if not m or size == 0:
                continue
            stem = m.group(1).encode()
            # The include name MLX registers for it, as stored in the same library.
            inc = re.search(re.escape(INCLUDE_PREFIX + stem) + rb"\.(cuh|h)\0", data)
            if inc is None:
                continue  # a kernel source, not a header
            sec = sections[shndx]
            start = sec[4] + value - sec[3]
            found.setdefault(inc.group(0)[:-1].decode(), data[start:start + size].rstrip(b"\0"))
        return found


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
    headers = embedded_headers(lib)
    lib.unlink()
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
    if (dest / "headers").is_dir():
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

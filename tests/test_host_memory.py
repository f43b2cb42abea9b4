"""host_memory.map_large_blocks: after it, glibc maps a 2 MB block on its own even after a
larger block was freed (by default that free raises glibc's threshold and the block comes from
the heap, where freed memory stays resident). Each case in a fresh process: the setting is
process-wide."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from mlx_gemma3n.host_memory import map_large_blocks

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
took = map_large_blocks() if sys.argv[1] == "on" else None
libc.free(libc.malloc(4 << 20))  # freeing a mapped 4 MB block raises glibc's default threshold
before = libc.mallinfo2().hblkhd
block = libc.malloc(2 << 20)
print(took, libc.mallinfo2().hblkhd - before >= 2 << 20)
libc.free(block)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
@pytest.mark.parametrize("setting, expected", [("off", "None False"), ("on", "True True")])
def test_blocks_of_128k_or_more_are_mapped_on_their_own(setting, expected):
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True)
    assert out.stdout.split() == expected.split()


def test_cpu_load_maps_large_blocks(tiny_hf, monkeypatch):
    from mlx_gemma3n import loading

    calls = []
    monkeypatch.setattr(loading, "map_large_blocks", lambda: calls.append(1))
    loading.load_model(tiny_hf[0])
    assert calls == [1]

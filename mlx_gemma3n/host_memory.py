"""Freed host memory back to the system on Linux, for the CPU backend.

glibc keeps a freed block in its heap, and after each freed block it had mapped on its own it
serves blocks up to that size from the heap too (its mmap threshold grows, up to 32 MB); heap
memory goes back to the system only from the heap's top. A prefill on the CPU allocates and
frees many 0.1-30 MB buffers (activations, dequantized weight blocks), which then stay
resident after they are freed: E4B's peak RSS at a 256-token chunk was 0.07 GB higher with
the growing threshold than with it held at glibc's starting 128 kB, at the same speed
(`bench/prefill_profile.py --shape E4B --context 0 --prompt 257 --chunk 256 --untimed
--as-stored`, 2.775 against 2.706 GB). Elsewhere (macOS, other C libraries) nothing changes.
"""

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024


def map_large_blocks() -> bool:
    """Have glibc map every block of 128 kB or more on its own (unmapped when freed), for the
    whole process; True where it took effect. `load_model` calls it for the CPU backend."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1

"""Kernel buffers on the host: canaries on both sides, NaN poison for what the kernel must write."""

import ctypes

import mlx.core as mx
import numpy as np

PAD = 4096  # bytes of canary on each side: catches overshoots up to 1024 floats
# 0xA5 0xFF repeated reads as NaN in float32, float16 and bfloat16, so a read past the end of a
# buffer poisons the result too; a write there changes the bytes and is reported.
CANARY = np.tile(np.array([0xA5, 0xFF], np.uint8), PAD // 2)
POISON = [0xFF]  # all-ones: NaN in every float type, and no arithmetic result has these bits
TG_POISON = [0xFE, 0xFF]  # what launch.h fills threadgroup memory with
FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32, mx.float64)


def to_bytes(x):
    """Row-contiguous bytes of an mx.array (numpy has no bfloat16: go through uint16)."""
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.array(x)).reshape(-1).view(np.uint8)


def from_bytes(data, shape, dtype):
    if dtype == mx.bfloat16:
        return mx.array(data.view(np.uint16).reshape(shape)).view(mx.bfloat16)
    np_dtype = np.dtype(np.bool_) if dtype == mx.bool_ else np.dtype(str(dtype).split(".")[-1])
    return mx.array(data.view(np_dtype).reshape(shape))


class Buffer:
    """`nbytes` of kernel memory between two canaries, 64-byte aligned like a Metal buffer."""

    def __init__(self, name, nbytes, fill=None):
        self.name, self.nbytes = name, nbytes
        raw = np.empty(nbytes + 2 * PAD + 64, np.uint8)
        start = (-raw.ctypes.data) % 64
        self.mem = raw[start:start + nbytes + 2 * PAD]
        self.mem[:PAD] = CANARY
        self.mem[PAD + nbytes:] = CANARY
        self.data = self.mem[PAD:PAD + nbytes]
        if fill is None:
            self.data[:] = POISON[0]
        else:
            self.data[:] = fill

    @property
    def pointer(self):
        return ctypes.c_void_p(self.mem.ctypes.data + PAD)

    def overwritten_canaries(self):
        """Human-readable description of canary bytes the kernel changed, or None."""
        before = np.flatnonzero(self.mem[:PAD] != CANARY)
        after = np.flatnonzero(self.mem[PAD + self.nbytes:] != CANARY)
        if before.size == 0 and after.size == 0:
            return None
        where = []
        if before.size:
            where.append(f"{PAD - before[0]} bytes before its start")
        if after.size:
            where.append(f"{after[-1] + 1} bytes past its end")
        return f"out-of-bounds write to buffer '{self.name}': canary overwritten up to {' and '.join(where)}"

    def holding(self, dtype, pattern):
        """Indices of float elements whose bytes are `pattern` (a poison), repeated."""
        if dtype not in FLOAT_DTYPES or self.nbytes == 0:
            return np.zeros(0, np.int64)
        words = self.data.reshape(-1, dtype.size)
        want = np.resize(np.asarray(pattern, np.uint8), dtype.size)
        return np.flatnonzero((words == want).all(axis=1))


def input_buffer(name, x):
    return Buffer(name, x.nbytes, to_bytes(x))


def output_buffer(name, shape, dtype, init_value):
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.size
    if init_value is None:
        return Buffer(name, nbytes)
    return Buffer(name, nbytes, to_bytes(mx.full(shape, init_value, dtype=mx.float32).astype(dtype)))


def int_buffer(name, values, np_dtype):
    return Buffer(name, len(values) * np.dtype(np_dtype).itemsize,
                  np.asarray(values, np_dtype).view(np.uint8))

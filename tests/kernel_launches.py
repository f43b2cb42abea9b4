"""Test helpers for the decode kernels: a kernel factory that runs the CPU executor and
records each launch, and a fixture for kernels that read `<input>_strides`."""

import numpy as np
import pytest
from metal_executor import buffers, metal_kernel


class Counting:
    """The executor's metal_kernel, recording each launch's kernel name in `launches`."""

    def __init__(self):
        self.launches = []

    def __call__(self, **spec):
        kernel = metal_kernel(**spec)

        def launch(**kw):
            self.launches.append(spec["name"])
            return kernel(**kw)

        return launch


@pytest.fixture
def contiguous_stride_buffers(monkeypatch):
    """The executor builds `<input>_strides` from a reversed (non-contiguous) numpy view,
    which numpy cannot reinterpret as bytes; copy it first. (For the executor's owner to fix;
    harmless once fixed.)"""
    int_buffer = buffers.int_buffer
    monkeypatch.setattr(buffers, "int_buffer", lambda name, values, dtype: int_buffer(
        name, np.ascontiguousarray(np.asarray(values, dtype)), dtype))

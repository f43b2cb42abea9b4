"""Every kernel's CUDA form (its Metal body behind the prelude, as `mx.fast.cuda_kernel`
gets it on a CUDA device) compiles with NVRTC for sm_90, in every dtype, with the launch
arguments its launcher really passes. No GPU needed: only compilation is checked here; the
bodies' behaviour is checked by the CPU executor (test_kernels_rows.py and the others)."""

import mlx.core as mx
import pytest
from kernel_check import DTYPES, all_kernels
from nvrtc_compile import compile_cuda_kernel

from mlx_gemma3n.kernels import base


class NvrtcCudaKernel:
    """Stands in for `mx.fast.cuda_kernel`: compiles at launch time, returns zeros."""

    compiled = []

    def __init__(self, name, input_names, output_names, source, header="", **options):
        self.spec = (name, input_names, output_names, source, header)

    def __call__(self, inputs, template, output_shapes, output_dtypes, **launch):
        name, input_names, output_names, source, header = self.spec
        compile_cuda_kernel(
            name, input_names, output_names, source, header, template,
            inputs=inputs, output_dtypes=output_dtypes,
        )
        self.compiled.append(name)
        return [mx.zeros(shape, dtype=dtype) for shape, dtype in zip(output_shapes, output_dtypes)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", all_kernels(), ids=lambda op: op.name)
def test_cuda_form_compiles_with_nvrtc(op, dtype, monkeypatch):
    monkeypatch.setattr(mx.fast, "cuda_kernel", NvrtcCudaKernel)
    NvrtcCudaKernel.compiled = []
    op.launch(base._cuda_kernel(**op.spec), *op.sample(dtype))
    assert NvrtcCudaKernel.compiled and set(NvrtcCudaKernel.compiled) == {op.name}

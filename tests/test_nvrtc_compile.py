"""The NVRTC harness (tests/nvrtc_compile.py): MLX's cuda_kernel translation unit, compiled for
sm_90 by a real CUDA compiler, with the compiler's log on errors."""

import json
import sys

import mlx.core as mx
import pytest

from nvrtc_compile import PIECES, NvrtcError, build_source, compile_cuda_kernel, mlx_cuda_jit_dir

pytestmark = pytest.mark.skipif(sys.platform != "linux",
                                reason="pip ships NVRTC for Linux (and Windows) only")

BODY = """
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= inp_shape[0]) return;
  float v = static_cast<float>(inp[i]) * scale[0];
  out[i] = static_cast<T>(SQUARE ? v * v : v + N);
"""


def test_builder_pieces_are_in_mlx_s_library():
    """Each piece of text the harness writes is a string of the installed version's libmlx.so
    (CUDA build), as extracted by scripts/mlx_cuda_headers.py."""
    strings = json.loads((mlx_cuda_jit_dir() / "custom_kernel_strings.json").read_text())
    for piece in PIECES:
        assert any(s.endswith(piece) for s in strings), piece


def test_translation_unit_is_mlx_s():
    """The layout of mlx/backend/cuda/custom_kernel.cpp's build_kernel (MLX 0.32)."""
    name, text = build_source("k", ["inp", "scale"], ["out", "aux"], BODY, "// hdr\n",
                              [("T", mx.bfloat16), ("N", 3), ("SQUARE", False)],
                              [mx.float16, mx.float32], [2, 1], [mx.bfloat16, mx.int32])
    assert name == "custom_kernel_k_bfloat16_t_3_f"
    signature = ("// hdr\nnamespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
                 "__global__ void custom_kernel_k_bfloat16_t_3_f(\n"
                 "    const __half* inp,\n"
                 "    const __grid_constant__ Shape inp_shape,\n"
                 "    const float* scale,\n"
                 "    __nv_bfloat16* out,\n"
                 "    int32_t* aux) {\n"
                 "  using T = __nv_bfloat16;\n"
                 "  constexpr int N = 3;\n"
                 "  constexpr bool SQUARE = false;\n\n")
    assert text.startswith('\n#include "mlx/backend/cuda/device/utils.cuh"\n\n'
                           "#include <cooperative_groups.h>\n\n" + signature)
    assert text.endswith(BODY + "\n}\n\n} // namespace mlx::core::cu\n")


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_compiles_for_sm90(dtype):
    k = compile_cuda_kernel("scale", ["inp", "scale"], ["out"], BODY,
                            template=[("T", dtype), ("N", 3), ("SQUARE", True)],
                            inputs=[mx.zeros((5,), dtype), mx.ones((1,))], output_dtypes=[dtype])
    assert k.name.startswith("mlx::core::cu::custom_kernel_scale_")
    assert k.lowered_name.startswith("_ZN3mlx4core2cu") and "custom_kernel_scale_" in k.lowered_name
    assert k.cubin[:4] == b"\x7fELF"   # SASS for sm_90, not PTX


def test_syntax_error_is_reported_with_the_log():
    with pytest.raises(NvrtcError, match=r"(?s)custom_kernel_broken.*error: expected an "
                                         r"expression.*out\[0\] = inp\[0\] \+;"):
        compile_cuda_kernel("broken", ["inp"], ["out"], "out[0] = inp[0] +;",
                            input_dtypes=[mx.float32], output_dtypes=[mx.float32])


def test_unknown_name_in_header_is_reported():
    with pytest.raises(NvrtcError, match='identifier "not_declared" is undefined'):
        compile_cuda_kernel("hdr", ["inp"], ["out"], "out[0] = helper(inp[0]);",
                            header="__device__ float helper(float x) { return not_declared; }\n",
                            input_dtypes=[mx.float32], output_dtypes=[mx.float32])

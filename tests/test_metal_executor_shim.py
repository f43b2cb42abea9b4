"""The executor's Metal dialect (tests/metal_executor/shim.h): number formats, vectors, math,
atomics and per-threadgroup memory behave as on Metal."""

import sys

import mlx.core as mx
import numpy as np
import pytest

from metal_executor import metal_kernel

# The executor relies on ELF section bounds and glibc's ucontext; on macOS kernels run on Metal.
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the CPU executor is Linux-only")


def launch(name, src, inputs, n, out_dtype):
    """out[i] for i < n from a body over inputs in0, in1, ..."""
    kern = metal_kernel(name=name, input_names=[f"in{i}" for i in range(len(inputs))],
                        output_names=["out"], source=src)
    return kern(inputs=inputs, grid=(n, 1, 1), threadgroup=(min(n, 64), 1, 1),
                output_shapes=[(n,)], output_dtypes=[out_dtype])[0]


def test_bfloat16_rounds_to_nearest_even():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    bits[:1000] = (bits[:1000] & 0xFFFF0000) | 0x8000    # exact ties, odd and even
    x = bits.view(np.float32)
    x = np.concatenate([x[np.isfinite(x)], [np.inf, -np.inf, 0.0, -0.0]]).astype(np.float32)
    out = launch("shim_bf16", "uint i = thread_position_in_grid.x; out[i] = static_cast<bfloat16_t>(in0[i]);",
                 [mx.array(x)], x.size, mx.bfloat16)
    want = mx.array(x).astype(mx.bfloat16)
    np.testing.assert_array_equal(np.array(out.view(mx.uint16)), np.array(want.view(mx.uint16)))


def test_half_arithmetic_rounds_every_operation():
    rng = np.random.default_rng(1)
    a, b, c = (rng.normal(size=500).astype(np.float16) for _ in range(3))
    out = launch("shim_half", "uint i = thread_position_in_grid.x; half p = in0[i] * in1[i];"
                 "out[i] = p + in2[i] - in0[i] / in1[i];",
                 [mx.array(v) for v in (a, b, c)], 500, mx.float16)
    want = (a * b) + c - (a / b)          # numpy rounds each float16 operation too
    np.testing.assert_array_equal(np.array(out).view(np.uint16), want.view(np.uint16))


def test_vectors_swizzle_and_math():
    src = """
        uint i = thread_position_in_grid.x;
        float4 v = {in0[i], in0[i] + 1.0f, in0[i] + 2.0f, in0[i] + 3.0f};
        float4 w = v.wzyx * 2.0f;
        float2 h = w.xy + v.zw;
        out[i] = metal::precise::exp(-metal::abs(h.x - h.y)) + metal::fast::tanh(w.w)
                 + metal::max(v.x, v.y) + dot(v, float4(1.0f));
    """
    x = np.linspace(-2, 2, 37).astype(np.float32)
    out = np.array(launch("shim_vectors", src, [mx.array(x)], 37, mx.float32))
    v = np.stack([x, x + 1, x + 2, x + 3], 1).astype(np.float64)
    w = v[:, ::-1] * 2
    hx, hy = w[:, 0] + v[:, 2], w[:, 1] + v[:, 3]
    want = np.exp(-np.abs(hx - hy)) + np.tanh(w[:, 3]) + np.maximum(v[:, 0], v[:, 1]) + v.sum(1)
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_atomic_outputs_with_init_value():
    src = """
        uint i = thread_position_in_grid.x;
        atomic_fetch_add_explicit(&out[in0[i]], 1, memory_order_relaxed);
    """
    ids = np.random.default_rng(2).integers(0, 10, 300).astype(np.int32)
    kern = metal_kernel(name="shim_hist", input_names=["in0"], output_names=["out"], source=src,
                        atomic_outputs=True)
    out = kern(inputs=[mx.array(ids)], grid=(300, 1, 1), threadgroup=(64, 1, 1),
               output_shapes=[(10,)], output_dtypes=[mx.int32], init_value=0)[0]
    np.testing.assert_array_equal(np.array(out), np.bincount(ids, minlength=10))


def test_threadgroup_memory_is_poisoned_for_every_threadgroup():
    src = """
        threadgroup float buf[4];
        uint lid = thread_index_in_threadgroup;
        if (lid == 0) {
            out[threadgroup_position_in_grid.x] = metal::isnan(buf[1]) ? in0[0] : 0.0f;
            buf[1] = 5.0f;   // a value the next threadgroup must not see
        }
    """
    kern = metal_kernel(name="shim_tg_poison", input_names=["in0"], output_names=["out"], source=src)
    out = kern(inputs=[mx.array([7.0])], grid=(6 * 32, 1, 1), threadgroup=(32, 1, 1),
               output_shapes=[(6,)], output_dtypes=[mx.float32])[0]
    np.testing.assert_array_equal(np.array(out), [7.0] * 6)


IDIOMS_SOURCE = """
    uint i = thread_position_in_grid.x;
    T x = in0[i];
    T zero = T(0);
    T acc = 0.0f;
    acc += x;
    acc = acc * 2 + T(1.0f);
    float cube = float(x) * float(x) * float(x);
    float g = 0.5f * float(x) * (1.0f + metal::precise::tanh(0.7978845608f * (float(x) + 0.044715f * cube)));
    bool pos = x > 0;
    out[i * 8 + 0] = static_cast<T>(float(x) * 0.5f + static_cast<float>(acc));
    out[i * 8 + 1] = metal::max(x, zero);
    out[i * 8 + 2] = metal::exp(x);
    out[i * 8 + 3] = metal::precise::rsqrt(metal::abs(x) + T(1));
    out[i * 8 + 4] = T(pos && !(x == zero) ? 1 : 0) + (-x);
    out[i * 8 + 5] = pos ? x : T(0.0f);
    out[i * 8 + 6] = simd_sum(x);
    out[i * 8 + 7] = static_cast<T>(g + (FLT_MAX > 1e38f && HALF_MAX == 65504.0h ? 0.0f : NAN)
                                    + (M_PI_F - 3.14159265f) + (INFINITY > 0 ? 0.0f : 1.0f));
"""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_common_idioms_compile_and_compute_for_every_dtype(dtype):
    x = mx.array(np.linspace(-2, 2.5, 32).astype(np.float32)).astype(dtype)
    kern = metal_kernel(name="shim_idioms", input_names=["in0"], output_names=["out"],
                        source=IDIOMS_SOURCE)
    out = kern(inputs=[x], template=[("T", dtype)], grid=(32, 1, 1), threadgroup=(32, 1, 1),
               output_shapes=[(256,)], output_dtypes=[dtype])[0]
    v = np.array(x.astype(mx.float32), np.float64)
    gelu = 0.5 * v * (1 + np.tanh(0.7978845608 * (v + 0.044715 * v**3)))
    want = np.stack([v * 0.5 + 2 * v + 1, np.maximum(v, 0), np.exp(v), 1 / np.sqrt(np.abs(v) + 1),
                     (v > 0) - v, np.where(v > 0, v, 0), np.full_like(v, v.sum()), gelu], 1)
    eps = {mx.float32: 1e-6, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}[dtype]
    got = np.array(out.astype(mx.float32), np.float64).reshape(32, 8)
    for col in range(8):   # each idiom within a few roundings of its own scale
        np.testing.assert_allclose(got[:, col], want[:, col], rtol=4 * eps,
                                   atol=4 * eps * np.abs(want[:, col]).max(), err_msg=str(col))

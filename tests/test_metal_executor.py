"""The CPU executor for Metal kernel sources (tests/metal_executor): correct, schedule-independent
results on ragged shapes for float32/float16/bfloat16, and planted bugs caught."""

import sys

import mlx.core as mx
import numpy as np
import pytest

from metal_executor import (CompileError, ExecutorError, collect, metal_kernel, options,
                            run_all_schedules)

# The executor relies on ELF section bounds and glibc's ucontext; on macOS kernels run on Metal.
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the CPU executor is Linux-only")

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
MANTISSA_BITS = {mx.float16: 10, mx.bfloat16: 7}

# One threadgroup per row: strided sum of squares, simd_sum, partials through threadgroup
# memory and a barrier, then the scaled row (an RMSNorm with a (1 + w) gain).
RMS_SOURCE = """
    uint row = threadgroup_position_in_grid.y;
    uint lid = thread_index_in_threadgroup;
    uint tpg = threads_per_threadgroup.x;
    uint D = x_shape[1];
    threadgroup float partial[32];
    float acc = 0.0f;
    for (uint k = lid; k < D; k += tpg) {
        float v = float(x[row * D + k]);
        acc += v * v;
    }
    acc = simd_sum(acc);
    if (thread_index_in_simdgroup == 0) {
        partial[simdgroup_index_in_threadgroup] = acc;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = 0.0f;
    for (uint s = 0; s < simdgroups_per_threadgroup; s++) {
        total += partial[s];
    }
    float scale = metal::rsqrt(total / D + eps[0]);
    for (uint k = lid; k < D; k += tpg) {
        out[row * D + k] = static_cast<T>(float(x[row * D + k]) * scale * (1.0f + float(w[k])));
    }
"""


def rms_kernel(source=RMS_SOURCE):
    return metal_kernel(name="test_rms", input_names=["x", "w", "eps"], output_names=["out"],
                        source=source)


def run_rms(kern, x, w, threads):
    rows, d = x.shape
    eps = mx.array([1e-6], dtype=mx.float32)
    return kern(inputs=[x, w, eps], template=[("T", x.dtype)], grid=(threads, rows, 1),
                threadgroup=(threads, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


def rms_reference(x, w):
    x64, w64 = np.array(x.astype(mx.float32), np.float64), np.array(w.astype(mx.float32), np.float64)
    return x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * (1 + w64)


def assert_close(out, ref, dtype):
    """float32: <= 1e-5 relative; half types: within 2 ulp of the output type."""
    got = np.array(out.astype(mx.float32), np.float64)
    if dtype == mx.float32:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        return
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - MANTISSA_BITS[dtype])
    assert np.max(np.abs(got - ref) / ulp) <= 2, np.max(np.abs(got - ref) / ulp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d,threads", [(3, 77, 64), (2, 200, 96), (1, 5, 32)])
def test_row_reduction_ragged(dtype, rows, d, threads):
    x = mx.random.normal((rows, d), key=mx.random.key(1)).astype(dtype)
    w = (0.1 * mx.random.normal((d,), key=mx.random.key(2))).astype(dtype)
    kern = rms_kernel()
    out = run_all_schedules(lambda: run_rms(kern, x, w, threads))
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, rms_reference(x, w), dtype)


# The simd collectives on partial simdgroups and a partial threadgroup: small integer values,
# so every result is exact in all three dtypes.
COLLECTIVES_SOURCE = """
    uint i = thread_position_in_grid.x;
    float v = float(inp[i]);
    float r0 = simd_sum(v);
    float r1 = simd_max(v);
    float r2 = simd_min(v);
    float r3 = simd_prefix_inclusive_sum(v);
    float r4 = simd_prefix_exclusive_sum(v);
    float r5 = simd_broadcast(v, 3);
    out[i * 6 + 0] = static_cast<T>(r0);
    out[i * 6 + 1] = static_cast<T>(r1);
    out[i * 6 + 2] = static_cast<T>(r2);
    out[i * 6 + 3] = static_cast<T>(r3);
    out[i * 6 + 4] = static_cast<T>(r4);
    out[i * 6 + 5] = static_cast<T>(r5);
"""

SHUFFLE_SOURCE = """
    uint i = thread_position_in_grid.x;
    float v = float(inp[i]);
    out[i * 4 + 0] = static_cast<T>(simd_shuffle_xor(v, 5));
    out[i * 4 + 1] = static_cast<T>(simd_shuffle_down(v, 3));
    out[i * 4 + 2] = static_cast<T>(simd_shuffle_up(v, 2));
    out[i * 4 + 3] = static_cast<T>(simd_shuffle(v, 31 - thread_index_in_simdgroup));
"""


def simd_groups(n, threads):
    """[start, stop) of every simdgroup for a 1-D dispatch of n threads."""
    groups = []
    for tg in range(0, n, threads):
        end = min(tg + threads, n)
        groups += [(s, min(s + 32, end)) for s in range(tg, end, 32)]
    return groups


def run_1d(kern, x, threads, per_thread):
    n = x.size
    return kern(inputs=[x], template=[("T", x.dtype)], grid=(n, 1, 1), threadgroup=(threads, 1, 1),
                output_shapes=[(n * per_thread,)], output_dtypes=[x.dtype])[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_simd_collectives_partial_groups(dtype):
    n, threads = 77, 64  # threadgroup 1 holds 13 threads: one partial simdgroup
    vals = np.random.default_rng(0).integers(-8, 9, n).astype(np.float32)
    kern = metal_kernel(name="test_collectives", input_names=["inp"], output_names=["out"],
                        source=COLLECTIVES_SOURCE)
    out = run_all_schedules(lambda: run_1d(kern, mx.array(vals).astype(dtype), threads, 6))
    got = np.array(out.astype(mx.float32)).reshape(n, 6)
    for a, b in simd_groups(n, threads):
        seg = vals[a:b]
        expect = np.stack([np.full_like(seg, seg.sum()), np.full_like(seg, seg.max()),
                           np.full_like(seg, seg.min()), np.cumsum(seg), np.cumsum(seg) - seg,
                           np.full_like(seg, seg[3])], axis=1)
        np.testing.assert_array_equal(got[a:b], expect)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simd_shuffles(dtype):
    n, threads = 96, 64  # full simdgroups, the second threadgroup partial
    vals = np.random.default_rng(1).integers(-100, 100, n).astype(np.float32)
    kern = metal_kernel(name="test_shuffles", input_names=["inp"], output_names=["out"],
                        source=SHUFFLE_SOURCE)
    out = run_all_schedules(lambda: run_1d(kern, mx.array(vals).astype(dtype), threads, 4))
    got = np.array(out.astype(mx.float32)).reshape(n, 4)
    lane = np.arange(n) % 32
    base = np.arange(n) - lane
    down = np.where(lane + 3 < 32, base + lane + 3, np.arange(n))
    up = np.where(lane >= 2, base + lane - 2, np.arange(n))
    expect = np.stack([vals[base + (lane ^ 5)], vals[down], vals[up], vals[base + 31 - lane]], 1)
    np.testing.assert_array_equal(got, expect)


def test_grid_semantics_2d_partial_threadgroups():
    """dispatchThreads: grid = total threads; edge threadgroups are partial (MLX on Metal)."""
    src = """
        uint2 p = thread_position_in_grid.xy;
        uint W = threads_per_grid.x;
        out[p.y * W + p.x] = int(threads_per_threadgroup.x * 100 + threads_per_threadgroup.y);
        tg[p.y * W + p.x] = int(threadgroup_position_in_grid.x * 10 + threadgroup_position_in_grid.y);
    """
    kern = metal_kernel(name="test_grid", input_names=["dummy"], output_names=["out", "tg"],
                        source=src)
    out, tg = kern(inputs=[mx.zeros((1,))], grid=(5, 7, 1), threadgroup=(4, 4, 1),
                   output_shapes=[(7, 5), (7, 5)], output_dtypes=[mx.int32, mx.int32])
    xs, ys = np.meshgrid(np.arange(5), np.arange(7))
    np.testing.assert_array_equal(np.array(out), np.where(xs < 4, 4, 1) * 100 + np.where(ys < 4, 4, 3))
    np.testing.assert_array_equal(np.array(tg), (xs // 4) * 10 + ys // 4)


def test_cuda_geometry_runs_whole_threadgroups():
    """Under MLX's cuda_kernel the edge block is whole: an unguarded body writes past the end."""
    src = "out[thread_position_in_grid.x] = inp[0] + float(threads_per_threadgroup.x);"
    kern = metal_kernel(name="test_geometry", input_names=["inp"], output_names=["out"], source=src)
    launch = dict(inputs=[mx.zeros((1,))], grid=(40, 1, 1), threadgroup=(32, 1, 1),
                  output_shapes=[(40,)], output_dtypes=[mx.float32])
    np.testing.assert_array_equal(np.array(kern(**launch)[0]), [32] * 32 + [8] * 8)
    with options(geometry="cuda"), pytest.raises(ExecutorError, match="'out'.*96 bytes past"):
        kern(**launch)


# ---- planted bugs ---------------------------------------------------------------------------

def assert_caught(name, src, match, threads, inp, out_size=None, error=ExecutorError):
    """Launch a body over `threads` threads (one threadgroup of up to 64) reading `inp` and
    writing `out` (float32, out_size elements), and expect `error` matching `match`."""
    kern = metal_kernel(name=name, input_names=["inp"], output_names=["out"], source=src)
    with pytest.raises(error, match=match):
        kern(inputs=[inp], grid=(threads, 1, 1), threadgroup=(min(threads, 64), 1, 1),
             output_shapes=[(out_size or threads,)], output_dtypes=[mx.float32])


def test_missing_barrier_is_caught():
    # Each thread reads its neighbour's slot: without the barrier the result depends on order.
    src = """
        uint lid = thread_index_in_threadgroup;
        uint n = threads_per_threadgroup.x;
        threadgroup float slot[64];
        slot[lid] = float(inp[thread_position_in_grid.x]);
        %s
        out[thread_position_in_grid.x] = slot[(lid + 1) %% n];
    """
    x = mx.arange(50).astype(mx.float32)

    def run(body):
        kern = metal_kernel(name="test_barrier", input_names=["inp"], output_names=["out"],
                            source=body)
        return run_all_schedules(lambda: kern(inputs=[x], grid=(50, 1, 1), threadgroup=(64, 1, 1),
                                              output_shapes=[(50,)], output_dtypes=[mx.float32])[0])

    good = run(src % "threadgroup_barrier(mem_flags::mem_threadgroup);")
    np.testing.assert_array_equal(np.array(good), np.roll(np.arange(50), -1))
    with pytest.raises(ExecutorError, match="49 of 50 elements copied from uninitialised threadgroup"):
        run(src % "")
    with options(check_coverage=False), pytest.raises(ExecutorError, match="differs between the "
                                                                            "forward"):
        run(src % "")


@pytest.mark.parametrize("dtype", DTYPES)
def test_missing_barrier_in_reduction_is_caught(dtype):
    src = RMS_SOURCE.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    assert src != RMS_SOURCE
    x = mx.random.normal((3, 77), key=mx.random.key(1)).astype(dtype)
    kern = rms_kernel(src)
    with pytest.raises(ExecutorError, match="uninitialised threadgroup memory|differs between"):
        run_all_schedules(lambda: run_rms(kern, x, mx.zeros((77,), dtype), 64))


def test_off_by_one_index_is_caught():
    src = """
        uint i = thread_position_in_grid.x;
        if (i <= inp_shape[0]) out[i] = inp[i > 0 ? i - 1 : 0] * 2.0f;
    """
    assert_caught("test_off_by_one", src, "out-of-bounds write to buffer 'out'.*4 bytes past its end",
                  64, mx.ones((40,)), out_size=40)


def test_write_past_end_is_caught_and_reads_past_end_are_nan():
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = inp[i + 3];
        if (i == 0) out[40 + 100] = 1.0f;
    """
    kern = metal_kernel(name="test_past_end", input_names=["inp"], output_names=["out"], source=src)
    with collect() as found:
        out = kern(inputs=[mx.ones((40,))], grid=(40, 1, 1), threadgroup=(32, 1, 1),
                   output_shapes=[(40,)], output_dtypes=[mx.float32])[0]
    assert len(found) == 1 and "'out'" in found[0] and "404 bytes past its end" in found[0]
    got = np.array(out)
    assert (got[:37] == 1).all() and np.isnan(got[37:]).all()  # the canary reads as NaN


def test_divergent_simd_collective_is_caught():
    src = """
        float v = inp[thread_position_in_grid.x];
        if (thread_index_in_simdgroup < 16) v = simd_sum(v);
        out[thread_position_in_grid.x] = v;
    """
    assert_caught("test_divergent", src, "simd collective under divergent control flow: lane 16",
                  32, mx.ones((32,)))


def test_partial_barrier_is_caught():
    src = """
        uint lid = thread_index_in_threadgroup;
        if (lid >= 40) return;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = inp[thread_position_in_grid.x];
    """
    assert_caught("test_partial_barrier", src, "barrier reached by only part of a threadgroup: "
                  "40 of 64", 64, mx.ones((64,)))


def test_unwritten_output_is_caught():
    src = "uint i = thread_position_in_grid.x; if (i % 2 == 0) out[i] = inp[i];"
    kern = metal_kernel(name="test_unwritten", input_names=["inp"], output_names=["out"], source=src)
    launch = dict(inputs=[mx.ones((10,))], grid=(10, 1, 1), threadgroup=(32, 1, 1),
                  output_shapes=[(10,)], output_dtypes=[mx.bfloat16])
    with pytest.raises(ExecutorError, match="'out' has 5 of 10 elements never written.*index 1"):
        kern(**launch)
    with options(check_coverage=False):
        assert np.isnan(np.array(kern(**launch)[0].astype(mx.float32))[1::2]).all()
    filled = kern(init_value=0.0, **launch)[0]  # init_value: MLX fills outputs first
    np.testing.assert_array_equal(np.array(filled.astype(mx.float32)), [1, 0] * 5)


def test_uninitialised_local_reads_as_nan():
    src = """
        float acc;   // forgot = 0
        for (uint k = 0; k < 4; k++) acc += inp[k];
        out[thread_position_in_grid.x] = acc;
    """
    kern = metal_kernel(name="test_uninit", input_names=["inp"], output_names=["out"], source=src)
    with options(check_coverage=False):
        out = kern(inputs=[mx.ones((4,))], grid=(8, 1, 1), threadgroup=(8, 1, 1),
                   output_shapes=[(8,)], output_dtypes=[mx.float32])[0]
    assert np.isnan(np.array(out)).all()


def test_too_much_threadgroup_memory_is_refused():
    src = """
        threadgroup float big[8193];   // 32 KiB + 4 bytes
        big[thread_index_in_threadgroup] = inp[0];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = big[0];
    """
    assert_caught("test_big_tg", src, "declares 32772 bytes of threadgroup memory; Metal allows "
                  "32768", 4, mx.ones((1,)))


def test_wild_pointer_is_an_error_not_a_crash():
    src = "device float* p = (device float*)(uintptr_t)16; out[0] = p[0] + inp[0];"
    assert_caught("test_wild", src, "segmentation fault in threadgroup", 1, mx.ones((1,)))


def test_endless_loop_is_an_error_not_a_hang():
    src = """
        uint i = thread_position_in_grid.x;
        for (uint k = i; k < 64; k += inp[0]) out[k % 2] = float(k);   // a stride of 0
    """
    with options(timeout_s=1):
        assert_caught("test_endless", src, r"ran longer than 1 s, last in threadgroup \(0,0,0\) "
                      r"thread \(0,0,0\)", 2, mx.array([0], mx.uint32))


def test_compile_error_reports_the_log():
    assert_caught("test_syntax", "out[0] = inp[0] +;", r"test_syntax.*expected expression", 1,
                  mx.ones((1,)), error=CompileError)


def test_bad_launch_arguments_are_refused_by_name():
    kern = rms_kernel()
    x = mx.ones((2, 8))
    with pytest.raises(ValueError, match="Expected `inputs` to have size 3"):
        kern(inputs=[x], grid=(8, 2, 1), threadgroup=(8, 1, 1), output_shapes=[x.shape],
             output_dtypes=[x.dtype])
    with pytest.raises(ValueError, match="more than 1024 threads"):
        kern(inputs=[x, mx.ones((8,)), mx.ones((1,))], grid=(2048, 2, 1),
             threadgroup=(2048, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype],
             template=[("T", x.dtype)])

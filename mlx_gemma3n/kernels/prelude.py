"""The header that lets a Metal kernel body compile as a CUDA body under `mx.fast.cuda_kernel`.

The bodies keep to a subset of Metal that maps one to one:
- thread attributes by name (`thread_position_in_grid`, `threadgroup_position_in_grid`,
  `thread_position_in_threadgroup`, `threads_per_threadgroup`, `thread_index_in_threadgroup`,
  `thread_index_in_simdgroup`, `simdgroup_index_in_threadgroup`), read through `.x/.y/.z`;
- threadgroup memory only as fixed-size `threadgroup` arrays declared in the body, and
  `threadgroup_barrier(mem_flags::mem_threadgroup)`;
- `simd_sum`, `simd_max`, `simd_min`, `simd_shuffle_xor`, `simd_shuffle` on float/int, with
  threadgroups a multiple of 32 threads (a CUDA warp shuffle needs all 32 lanes);
- `metal::`, `metal::fast::`, `metal::precise::` scalar float math;
- `T` in {float, half, bfloat16_t}, converted with `static_cast`, accumulation in float;
- scalars as shape-(1,) inputs, sizes as template ints or `<input>_shape[i]`;
- helper functions in a header marked `DEVICE_FN` (a header defines it for Metal when the
  prelude has not), never taking threadgroup memory (Metal's pointers to it do not map).
CUDA launches whole blocks (grid rounded up to the threadgroup); a body whose grid is not a
multiple of its threadgroup must return early for positions past its size, as it also must
on Metal for threads it did not ask for.
"""

CUDA_PRELUDE = r"""
// ---- mlx_gemma3n: Metal kernel-body dialect on CUDA --------------------------------------
#define device
#define constant
#define thread
#define threadgroup __shared__
#define DEVICE_FN __device__ inline
typedef unsigned int uint;
using bfloat16_t = __nv_bfloat16;

struct mem_flags {
  static constexpr int mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4;
};
__device__ inline void threadgroup_barrier(int) { __syncthreads(); }

#define thread_position_in_grid \
  (make_uint3(blockIdx.x * blockDim.x + threadIdx.x, blockIdx.y * blockDim.y + threadIdx.y, \
              blockIdx.z * blockDim.z + threadIdx.z))
#define thread_position_in_threadgroup threadIdx
#define threadgroup_position_in_grid blockIdx
#define threads_per_threadgroup blockDim
#define threadgroups_per_grid gridDim
#define thread_index_in_threadgroup \
  (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z))
#define thread_index_in_simdgroup (thread_index_in_threadgroup % 32u)
#define simdgroup_index_in_threadgroup (thread_index_in_threadgroup / 32u)
#define threads_per_simdgroup 32u
#define simdgroups_per_threadgroup ((blockDim.x * blockDim.y * blockDim.z + 31u) / 32u)

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef FLT_MAX
#define FLT_MAX 3.402823466e+38f
#endif

template <typename U> __device__ inline U simd_sum(U x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <typename U> __device__ inline U simd_max(U x) {
  for (int o = 16; o > 0; o >>= 1) { U y = __shfl_xor_sync(0xffffffffu, x, o); x = x > y ? x : y; }
  return x;
}
template <typename U> __device__ inline U simd_min(U x) {
  for (int o = 16; o > 0; o >>= 1) { U y = __shfl_xor_sync(0xffffffffu, x, o); x = x < y ? x : y; }
  return x;
}
template <typename U> __device__ inline U simd_shuffle_xor(U x, uint mask) {
  return __shfl_xor_sync(0xffffffffu, x, mask);
}
template <typename U> __device__ inline U simd_shuffle(U x, uint lane) {
  return __shfl_sync(0xffffffffu, x, lane);
}

namespace metal {
__device__ inline float exp(float x) { return ::expf(x); }
__device__ inline float exp2(float x) { return ::exp2f(x); }
__device__ inline float log(float x) { return ::logf(x); }
__device__ inline float sqrt(float x) { return ::sqrtf(x); }
__device__ inline float rsqrt(float x) { return ::rsqrtf(x); }
__device__ inline float tanh(float x) { return ::tanhf(x); }
__device__ inline float erf(float x) { return ::erff(x); }
__device__ inline float abs(float x) { return ::fabsf(x); }
__device__ inline float pow(float x, float y) { return ::powf(x, y); }
__device__ inline float cos(float x) { return ::cosf(x); }
__device__ inline float sin(float x) { return ::sinf(x); }
__device__ inline float floor(float x) { return ::floorf(x); }
__device__ inline float max(float a, float b) { return ::fmaxf(a, b); }
__device__ inline float min(float a, float b) { return ::fminf(a, b); }
__device__ inline int max(int a, int b) { return a > b ? a : b; }
__device__ inline int min(int a, int b) { return a < b ? a : b; }
__device__ inline uint max(uint a, uint b) { return a > b ? a : b; }
__device__ inline uint min(uint a, uint b) { return a < b ? a : b; }
__device__ inline float clamp(float x, float lo, float hi) { return ::fminf(::fmaxf(x, lo), hi); }
__device__ inline float fma(float a, float b, float c) { return ::fmaf(a, b, c); }
namespace precise {
using metal::exp; using metal::exp2; using metal::log; using metal::sqrt; using metal::rsqrt;
using metal::tanh; using metal::erf; using metal::pow; using metal::cos; using metal::sin;
}
namespace fast {
using metal::exp; using metal::exp2; using metal::log; using metal::sqrt; using metal::rsqrt;
using metal::tanh; using metal::erf; using metal::pow; using metal::cos; using metal::sin;
}
}  // namespace metal
// ---- end of the Metal dialect -----------------------------------------------------------
"""

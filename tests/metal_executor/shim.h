// The Metal dialect that MLX's generated kernel sources use, mapped onto C++20 for clang++.
// Threads are fibers run by runtime.h; every call below that a simdgroup or threadgroup must
// reach together is a synchronisation point there.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

// ---- address spaces: one flat memory here. Threadgroup variables are statics in their own
// section, so that all fibers of a threadgroup share them and the runtime can poison the whole
// section before each threadgroup; `constinit` turns a threadgroup pointer variable (which
// the CUDA prelude cannot map either) into a compile error instead of a silent shared static.
#define device
#define constant
#define thread
#define threadgroup static constinit __attribute__((section("mxtg"), used, aligned(16)))
#define METAL_FUNC inline

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;
typedef half float16_t;

// ---- bfloat16: storage of the upper 16 bits of a float, rounded to nearest even; arithmetic
// in float, as MLX's own bfloat16 struct does.
struct bfloat16_t {
  uint16_t bits_;
  bfloat16_t() = default;
  static constexpr uint16_t from_float(float x) {
    uint32_t u = __builtin_bit_cast(uint32_t, x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
    u += ((u >> 16) & 1u) + 0x7fffu;
    return uint16_t(u >> 16);
  }
  template <class T, class = std::enable_if_t<std::is_arithmetic_v<T> || std::is_same_v<T, half>>>
  constexpr bfloat16_t(T x) : bits_(from_float(static_cast<float>(x))) {}
  template <class T, class = std::enable_if_t<std::is_arithmetic_v<T> || std::is_same_v<T, half>>>
  constexpr operator T() const {
    return static_cast<T>(__builtin_bit_cast(float, uint32_t(bits_) << 16));
  }
};
using bfloat = bfloat16_t;

template <class T>
constexpr bool is_bf_peer = std::is_integral_v<T>;
inline float bf2f(bfloat16_t x) { return static_cast<float>(x); }
#define MXEXEC_BF_BINOP(op)                                                                     \
  inline bfloat16_t operator op(bfloat16_t a, bfloat16_t b) { return bf2f(a) op bf2f(b); }       \
  inline float operator op(bfloat16_t a, float b) { return bf2f(a) op b; }                       \
  inline float operator op(float a, bfloat16_t b) { return a op bf2f(b); }                       \
  inline float operator op(bfloat16_t a, half b) { return bf2f(a) op float(b); }                 \
  inline float operator op(half a, bfloat16_t b) { return float(a) op bf2f(b); }                 \
  template <class T, class = std::enable_if_t<is_bf_peer<T>>>                                   \
  inline bfloat16_t operator op(bfloat16_t a, T b) { return bf2f(a) op float(b); }              \
  template <class T, class = std::enable_if_t<is_bf_peer<T>>>                                   \
  inline bfloat16_t operator op(T a, bfloat16_t b) { return float(a) op bf2f(b); }              \
  template <class T>                                                                            \
  inline bfloat16_t& operator op##=(bfloat16_t & a, T b) { return a = bfloat16_t(a op b); }      \
  inline float& operator op##=(float & a, bfloat16_t b) { return a = a op bf2f(b); }
MXEXEC_BF_BINOP(+)
MXEXEC_BF_BINOP(-)
MXEXEC_BF_BINOP(*)
MXEXEC_BF_BINOP(/)
#define MXEXEC_BF_CMP(op)                                                                       \
  inline bool operator op(bfloat16_t a, bfloat16_t b) { return bf2f(a) op bf2f(b); }             \
  template <class T, class = std::enable_if_t<std::is_arithmetic_v<T> || std::is_same_v<T, half>>> \
  inline bool operator op(bfloat16_t a, T b) { return bf2f(a) op float(b); }                    \
  template <class T, class = std::enable_if_t<std::is_arithmetic_v<T> || std::is_same_v<T, half>>> \
  inline bool operator op(T a, bfloat16_t b) { return float(a) op bf2f(b); }
MXEXEC_BF_CMP(<)
MXEXEC_BF_CMP(>)
MXEXEC_BF_CMP(<=)
MXEXEC_BF_CMP(>=)
MXEXEC_BF_CMP(==)
MXEXEC_BF_CMP(!=)
inline bfloat16_t operator-(bfloat16_t a) { return -bf2f(a); }

// ---- vectors: clang ext vectors (swizzles, .xyzw / .rgba, elementwise arithmetic).
#define MXEXEC_VEC(T, name)                                 \
  typedef T name##2 __attribute__((ext_vector_type(2)));    \
  typedef T name##3 __attribute__((ext_vector_type(3)));    \
  typedef T name##4 __attribute__((ext_vector_type(4)));
MXEXEC_VEC(float, float)
MXEXEC_VEC(half, half)
MXEXEC_VEC(int, int)
MXEXEC_VEC(uint, uint)
MXEXEC_VEC(short, short)
MXEXEC_VEC(ushort, ushort)
MXEXEC_VEC(char, char)
MXEXEC_VEC(uchar, uchar)
MXEXEC_VEC(long, long)
MXEXEC_VEC(unsigned long, ulong)

template <class T>
constexpr bool is_float_v = std::is_floating_point_v<T> || std::is_same_v<T, half> ||
                            std::is_same_v<T, bfloat16_t>;
template <class T, int N>
using mxvec __attribute__((ext_vector_type(N))) = T;

template <class To, class From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  return __builtin_bit_cast(To, x);
}

// ---- metal:: math. Scalars of half/bfloat16 compute in float and round back; vectors apply the
// scalar function per lane. min/max/fmin/fmax propagate NaN (Metal's drop it): stricter, so a
// NaN-poisoned read cannot vanish inside a max.
namespace metal {
using std::numeric_limits;

#define MXEXEC_UNARY(name, expr)                                              \
  template <class T, class = std::enable_if_t<is_float_v<T>>>                 \
  inline T name(T x) {                                                        \
    float v = static_cast<float>(x);                                          \
    return static_cast<T>(expr);                                              \
  }                                                                           \
  template <class T, int N>                                                   \
  inline mxvec<T, N> name(mxvec<T, N> x) {                                    \
    mxvec<T, N> r;                                                            \
    for (int i = 0; i < N; i++) r[i] = name(T(x[i]));                         \
    return r;                                                                 \
  }
#define MXEXEC_MATH_FUNCS                                                     \
  MXEXEC_UNARY(exp, std::exp(v))                                              \
  MXEXEC_UNARY(exp2, std::exp2(v))                                            \
  MXEXEC_UNARY(exp10, std::pow(10.0f, v))                                     \
  MXEXEC_UNARY(log, std::log(v))                                              \
  MXEXEC_UNARY(log2, std::log2(v))                                            \
  MXEXEC_UNARY(log10, std::log10(v))                                          \
  MXEXEC_UNARY(sqrt, std::sqrt(v))                                            \
  MXEXEC_UNARY(rsqrt, 1.0f / std::sqrt(v))                                    \
  MXEXEC_UNARY(sin, std::sin(v))                                              \
  MXEXEC_UNARY(cos, std::cos(v))                                              \
  MXEXEC_UNARY(tan, std::tan(v))                                              \
  MXEXEC_UNARY(asin, std::asin(v))                                            \
  MXEXEC_UNARY(acos, std::acos(v))                                            \
  MXEXEC_UNARY(atan, std::atan(v))                                            \
  MXEXEC_UNARY(sinh, std::sinh(v))                                            \
  MXEXEC_UNARY(cosh, std::cosh(v))                                            \
  MXEXEC_UNARY(tanh, std::tanh(v))                                            \
  MXEXEC_UNARY(asinh, std::asinh(v))                                          \
  MXEXEC_UNARY(acosh, std::acosh(v))                                          \
  MXEXEC_UNARY(atanh, std::atanh(v))                                          \
  MXEXEC_UNARY(floor, std::floor(v))                                          \
  MXEXEC_UNARY(ceil, std::ceil(v))                                            \
  MXEXEC_UNARY(round, std::round(v))                                          \
  MXEXEC_UNARY(rint, std::rint(v))                                            \
  MXEXEC_UNARY(trunc, std::trunc(v))                                          \
  MXEXEC_UNARY(fract, v - std::floor(v))                                      \
  MXEXEC_UNARY(fabs, std::fabs(v))                                            \
  MXEXEC_UNARY(saturate, std::isnan(v) ? v : std::fmin(std::fmax(v, 0.0f), 1.0f)) \
  MXEXEC_UNARY(sign, std::isnan(v) ? v : float((v > 0) - (v < 0)))

#define MXEXEC_BINARY(name, expr)                                             \
  template <class T, class = std::enable_if_t<is_float_v<T>>>                 \
  inline T name(T x, T y) {                                                   \
    float a = static_cast<float>(x), b = static_cast<float>(y);               \
    return static_cast<T>(expr);                                              \
  }                                                                           \
  template <class T, int N>                                                   \
  inline mxvec<T, N> name(mxvec<T, N> x, mxvec<T, N> y) {                     \
    mxvec<T, N> r;                                                            \
    for (int i = 0; i < N; i++) r[i] = name(T(x[i]), T(y[i]));                \
    return r;                                                                 \
  }
#define MXEXEC_NANPROP(op) (std::isnan(a) || std::isnan(b) ? a + b : (op))
#define MXEXEC_MATH_BINARY                                                    \
  MXEXEC_BINARY(pow, std::pow(a, b))                                          \
  MXEXEC_BINARY(powr, std::pow(a, b))                                         \
  MXEXEC_BINARY(atan2, std::atan2(a, b))                                      \
  MXEXEC_BINARY(fmod, std::fmod(a, b))                                        \
  MXEXEC_BINARY(copysign, std::copysign(a, b))                                \
  MXEXEC_BINARY(step, b < a ? 0.0f : 1.0f)                                    \
  MXEXEC_BINARY(fmin, MXEXEC_NANPROP(a < b ? a : b))                          \
  MXEXEC_BINARY(fmax, MXEXEC_NANPROP(a > b ? a : b))                          \
  MXEXEC_BINARY(divide, a / b)

MXEXEC_MATH_FUNCS
MXEXEC_MATH_BINARY
namespace fast {
MXEXEC_MATH_FUNCS
MXEXEC_MATH_BINARY
}  // namespace fast
namespace precise {
MXEXEC_MATH_FUNCS
MXEXEC_MATH_BINARY
}  // namespace precise

template <class T>
inline T abs(T x) {
  if constexpr (is_float_v<T>) return fabs(x);
  else return x < 0 ? T(-x) : x;
}
template <class T>
inline T min(T a, T b) {
  if constexpr (is_float_v<T>) return fmin(a, b);
  else return a < b ? a : b;
}
template <class T>
inline T max(T a, T b) {
  if constexpr (is_float_v<T>) return fmax(a, b);
  else return a > b ? a : b;
}
template <class T>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T>
inline T fma(T a, T b, T c) {
  return static_cast<T>(std::fma(float(a), float(b), float(c)));
}
template <class T>
inline T mix(T x, T y, T a) { return x + (y - x) * a; }
template <class T>
inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T>
inline bool isnan(T x) { return std::isnan(static_cast<float>(x)); }
template <class T>
inline bool isinf(T x) { return std::isinf(static_cast<float>(x)); }
template <class T>
inline bool isfinite(T x) { return std::isfinite(static_cast<float>(x)); }
template <class T>
inline bool signbit(T x) { return std::signbit(static_cast<float>(x)); }
template <class T, int N>
inline T dot(mxvec<T, N> a, mxvec<T, N> b) {
  T s = T(0);
  for (int i = 0; i < N; i++) s += T(a[i]) * T(b[i]);
  return s;
}

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
enum memory_order { memory_order_relaxed };
}  // namespace metal
using namespace metal;

// numeric_limits for the two half types (libstdc++ has none for _Float16 on every version).
template <>
struct std::numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr half max() { return half(65504.0f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half min() { return half(6.103515625e-05f); }
  static constexpr half epsilon() { return half(0.0009765625f); }
  static constexpr half infinity() { return half(__builtin_inff()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <>
struct std::numeric_limits<bfloat16_t> {
  static constexpr bool is_specialized = true;
  static constexpr bfloat16_t bits(uint16_t b) { bfloat16_t r{}; r.bits_ = b; return r; }
  static constexpr bfloat16_t max() { return bits(0x7f7f); }
  static constexpr bfloat16_t lowest() { return bits(0xff7f); }
  static constexpr bfloat16_t min() { return bits(0x0080); }
  static constexpr bfloat16_t epsilon() { return bits(0x3c00); }
  static constexpr bfloat16_t infinity() { return bits(0x7f80); }
  static constexpr bfloat16_t quiet_NaN() { return bits(0x7fc0); }
};

// ---- what MLX's metal::utils() prepends to every custom kernel and kernels commonly use.
template <typename U>
struct Limits {
  static constexpr U max = std::numeric_limits<U>::is_integer || !is_float_v<U>
                               ? std::numeric_limits<U>::max()
                               : std::numeric_limits<U>::infinity();
  static constexpr U min = std::numeric_limits<U>::is_integer || !is_float_v<U>
                               ? std::numeric_limits<U>::min()
                               : U(-float(std::numeric_limits<U>::infinity()));
  static constexpr U finite_max = std::numeric_limits<U>::max();
  static constexpr U finite_min = std::numeric_limits<U>::lowest();
};
inline size_t ceildiv(size_t n, size_t m) { return (n + m - 1) / m; }
template <class IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

// ---- atomics (atomic_outputs=True): fibers never run concurrently, so plain memory suffices.
template <class T>
struct atomic {
  T v;
};
template <class T, class U>
inline T atomic_fetch_add_explicit(device atomic<T>* o, U x, memory_order) {
  T old = o->v; o->v = old + T(x); return old;
}
template <class T, class U>
inline T atomic_fetch_sub_explicit(device atomic<T>* o, U x, memory_order) {
  T old = o->v; o->v = old - T(x); return old;
}
template <class T, class U>
inline T atomic_fetch_max_explicit(device atomic<T>* o, U x, memory_order) {
  T old = o->v; o->v = metal::max(old, T(x)); return old;
}
template <class T, class U>
inline T atomic_fetch_min_explicit(device atomic<T>* o, U x, memory_order) {
  T old = o->v; o->v = metal::min(old, T(x)); return old;
}
template <class T, class U>
inline void atomic_store_explicit(device atomic<T>* o, U x, memory_order) { o->v = T(x); }
template <class T>
inline T atomic_load_explicit(device atomic<T>* o, memory_order) { return o->v; }
template <class T, class U>
inline T atomic_exchange_explicit(device atomic<T>* o, U x, memory_order) {
  T old = o->v; o->v = T(x); return old;
}
template <class T, class U>
inline bool atomic_compare_exchange_weak_explicit(device atomic<T>* o, T* expected, U x,
                                                  memory_order, memory_order) {
  if (o->v == *expected) { o->v = T(x); return true; }
  *expected = o->v;
  return false;
}

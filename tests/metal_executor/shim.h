// The Metal dialect that MLX's generated kernel sources use, mapped onto C++20 for clang++:
// address spaces, scalar and vector types, constants (here), math (metal_math.h) and what MLX's
// utils() prelude gives kernels (mlx_utils.h). The builtins that synchronise threads are in
// collectives.h.
#pragma once
#include <cfloat>
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
// Metal's half literals (0.5h); C++ reserves suffixes without '_' but clang only warns.
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wuser-defined-literals"
constexpr half operator""h(long double x) { return half(x); }
constexpr half operator""h(unsigned long long x) { return half(x); }
#pragma clang diagnostic pop

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

// ---- Metal's math constants (FLT_MAX, INFINITY, NAN come from <cfloat>/<cmath>).
#define MAXFLOAT FLT_MAX
#define HALF_MAX 65504.0h
#define HALF_MIN 6.103515625e-05h
#define HALF_EPSILON 0.0009765625h
#define M_E_F 2.71828182845904523536f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LOG10E_F 0.434294481903251827651f
#define M_LN2_F 0.693147180559945309417f
#define M_LN10_F 2.30258509299404568402f
#define M_PI_F 3.14159265358979323846f
#define M_PI_2_F 1.57079632679489661923f
#define M_PI_4_F 0.785398163397448309616f
#define M_1_PI_F 0.318309886183790671538f
#define M_2_PI_F 0.636619772367581343076f
#define M_2_SQRTPI_F 1.12837916709551257390f
#define M_SQRT2_F 1.41421356237309504880f
#define M_SQRT1_2_F 0.707106781186547524401f

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

#include "metal_math.h"
#include "mlx_utils.h"

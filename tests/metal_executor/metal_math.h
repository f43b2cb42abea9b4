// metal::, metal::fast:: and metal::precise:: math for float, half, bfloat16 and vectors.
#pragma once

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

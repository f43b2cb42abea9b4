// The Metal builtins that synchronise: threadgroup_barrier, simdgroup_barrier and the simd
// collectives. Each waits in the scheduler until its whole simdgroup (or threadgroup) arrives at
// the same call site, then computes its result from the lanes' deposited values.
#pragma once
#include "scheduler.h"

namespace metal {

inline void threadgroup_barrier(mem_flags = mem_flags::mem_none, int line = __builtin_LINE(),
                                int col = __builtin_COLUMN()) {
  mxexec::wait_here(mxexec::AT_BARRIER, mxexec::site_of(line, col), 0);
}

namespace detail {
enum Op { SUM = 1, PROD, MAXOP, MINOP, AND, OR, XOR, PRE_INC_SUM, PRE_EXC_SUM, PRE_INC_PROD,
          PRE_EXC_PROD, SHUFFLE, SHUFFLE_XOR, SHUFFLE_DOWN, SHUFFLE_UP, ROT_DOWN, ROT_UP,
          BROADCAST, BROADCAST_FIRST, ALL, ANY, SIMD_BARRIER, IS_FIRST };

// Deposits x, waits for the whole simdgroup at this site, then returns the lanes' values.
template <class T>
struct Exchange {
  const unsigned char (*slots)[16];
  int lane, lanes;
  T at(int l) const {
    T v;
    if (l >= lanes) memset(&v, 0xff, sizeof v);  // a lane a partial simdgroup lacks: poison
    else memcpy(&v, slots[l], sizeof v);
    return v;
  }
};
template <class T>
inline Exchange<T> exchange(T x, Op op, int line, int col) {
  static_assert(sizeof(T) <= 16, "simd collective on a type wider than 16 bytes");
  mxexec::Fiber& f = mxexec::self();
  int s = int(f.attrs.simdgroup_index_in_threadgroup);
  mxexec::SimdGroup& g = mxexec::g_run->simd[s];
  int buf = g.gen & 1;
  int lane = int(f.attrs.thread_index_in_simdgroup);
  memcpy(g.slots[buf][lane], &x, sizeof x);
  mxexec::wait_here(mxexec::AT_SIMD, mxexec::site_of(line, col), op);
  return Exchange<T>{g.slots[buf], lane, g.lanes};
}
template <class T, class F>
inline T reduce(const Exchange<T>& e, int upto, F f) {
  T acc = e.at(0);
  for (int l = 1; l < upto; l++) acc = f(acc, e.at(l));
  return acc;
}
inline void check_lane(int l, const char* what) {
  if (l < 0 || l >= mxexec::kSimd)
    mxexec::fail("%s: lane %d is outside the 32-lane simdgroup", what, l);
}
}  // namespace detail

#define MXEXEC_SITE int line = __builtin_LINE(), int col = __builtin_COLUMN()
#define MXEXEC_REDUCE(name, op, fn)                                                       \
  template <class T>                                                                      \
  inline T name(T x, MXEXEC_SITE) {                                                       \
    auto e = detail::exchange(x, detail::op, line, col);                                  \
    return detail::reduce(e, e.lanes, [](T a, T b) { return fn; });                        \
  }
MXEXEC_REDUCE(simd_sum, SUM, T(a + b))
MXEXEC_REDUCE(simd_product, PROD, T(a * b))
MXEXEC_REDUCE(simd_max, MAXOP, metal::max(a, b))
MXEXEC_REDUCE(simd_min, MINOP, metal::min(a, b))
MXEXEC_REDUCE(simd_and, AND, T(a & b))
MXEXEC_REDUCE(simd_or, OR, T(a | b))
MXEXEC_REDUCE(simd_xor, XOR, T(a ^ b))

#define MXEXEC_PREFIX(name, op, fn, inclusive)                                            \
  template <class T>                                                                      \
  inline T name(T x, MXEXEC_SITE) {                                                       \
    auto e = detail::exchange(x, detail::op, line, col);                                  \
    int upto = e.lane + (inclusive ? 1 : 0);                                              \
    if (upto == 0) return T(detail::op == detail::PRE_EXC_PROD ? 1 : 0);                          \
    return detail::reduce(e, upto, [](T a, T b) { return fn; });                           \
  }
MXEXEC_PREFIX(simd_prefix_inclusive_sum, PRE_INC_SUM, T(a + b), true)
MXEXEC_PREFIX(simd_prefix_exclusive_sum, PRE_EXC_SUM, T(a + b), false)
MXEXEC_PREFIX(simd_prefix_inclusive_product, PRE_INC_PROD, T(a * b), true)
MXEXEC_PREFIX(simd_prefix_exclusive_product, PRE_EXC_PROD, T(a * b), false)

template <class T>
inline T simd_shuffle(T x, ushort lane, MXEXEC_SITE) {
  detail::check_lane(lane, "simd_shuffle");
  return detail::exchange(x, detail::SHUFFLE, line, col).at(lane);
}
template <class T>
inline T simd_broadcast(T x, ushort lane, MXEXEC_SITE) {
  detail::check_lane(lane, "simd_broadcast");
  return detail::exchange(x, detail::BROADCAST, line, col).at(lane);
}
template <class T>
inline T simd_broadcast_first(T x, MXEXEC_SITE) {
  return detail::exchange(x, detail::BROADCAST_FIRST, line, col).at(0);
}
template <class T>
inline T simd_shuffle_xor(T x, ushort mask, MXEXEC_SITE) {
  auto e = detail::exchange(x, detail::SHUFFLE_XOR, line, col);
  detail::check_lane(e.lane ^ mask, "simd_shuffle_xor");
  return e.at((e.lane ^ mask) & 31);
}
template <class T>
inline T simd_shuffle_down(T x, ushort delta, MXEXEC_SITE) {
  auto e = detail::exchange(x, detail::SHUFFLE_DOWN, line, col);
  int src = e.lane + delta;
  return src < mxexec::kSimd ? e.at(src) : x;
}
template <class T>
inline T simd_shuffle_up(T x, ushort delta, MXEXEC_SITE) {
  auto e = detail::exchange(x, detail::SHUFFLE_UP, line, col);
  int src = e.lane - delta;
  return src >= 0 ? e.at(src) : x;
}
template <class T>
inline T simd_shuffle_rotate_down(T x, ushort delta, MXEXEC_SITE) {
  auto e = detail::exchange(x, detail::ROT_DOWN, line, col);
  return e.at((e.lane + delta) % e.lanes);
}
template <class T>
inline T simd_shuffle_rotate_up(T x, ushort delta, MXEXEC_SITE) {
  auto e = detail::exchange(x, detail::ROT_UP, line, col);
  return e.at(((e.lane - delta) % e.lanes + e.lanes) % e.lanes);
}
inline bool simd_all(bool x, MXEXEC_SITE) {
  auto e = detail::exchange(x, detail::ALL, line, col);
  return detail::reduce(e, e.lanes, [](bool a, bool b) { return a && b; });
}
inline bool simd_any(bool x, MXEXEC_SITE) {
  auto e = detail::exchange(x, detail::ANY, line, col);
  return detail::reduce(e, e.lanes, [](bool a, bool b) { return a || b; });
}
inline bool simd_is_first(MXEXEC_SITE) {
  return detail::exchange(true, detail::IS_FIRST, line, col).lane == 0;
}
inline void simdgroup_barrier(mem_flags = mem_flags::mem_none, MXEXEC_SITE) {
  detail::exchange(true, detail::SIMD_BARRIER, line, col);
}
}  // namespace metal

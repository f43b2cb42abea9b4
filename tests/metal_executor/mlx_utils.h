// numeric_limits for the half types, and what MLX's metal::utils() prepends to every custom
// kernel that kernels commonly use (Limits, elem_to_loc, ceildiv), plus atomics.
#pragma once

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

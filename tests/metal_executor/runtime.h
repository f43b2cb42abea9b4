// Runs a Metal compute dispatch on one CPU thread: threadgroups one after another, the threads
// of a threadgroup as ucontext fibers. A fiber runs until it reaches threadgroup_barrier or a
// simd collective, which wait until every live thread of the threadgroup (barrier) or of the
// 32-lane simdgroup (collective) has arrived at the same call site; anything else is reported
// as an error instead of hanging or silently diverging.
#pragma once
#include <csetjmp>
#include <cstdarg>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <sys/mman.h>
#include <sys/time.h>
#include <ucontext.h>
#include <unistd.h>

#include "shim.h"

namespace mxexec {

constexpr int kSimd = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxThreadgroupBytes = 32768;  // Apple GPUs' threadgroup memory
enum State { RUNNABLE, AT_BARRIER, AT_SIMD, DONE };
enum Schedule { FORWARD = 0, REVERSE = 1, SHUFFLE = 2 };

struct Attrs {
  uint3 dispatch_threads_per_threadgroup, grid_origin, grid_size, thread_position_in_grid,
      thread_position_in_threadgroup, threadgroup_position_in_grid, threadgroups_per_grid,
      threads_per_grid, threads_per_threadgroup;
  uint dispatch_quadgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup,
      quadgroup_index_in_threadgroup, quadgroups_per_threadgroup, simdgroup_index_in_threadgroup,
      simdgroups_per_threadgroup, thread_execution_width, thread_index_in_quadgroup,
      thread_index_in_simdgroup, thread_index_in_threadgroup, threads_per_simdgroup;
};

struct Fiber {
  ucontext_t ctx;  // only to enter the fiber the first time
  jmp_buf jb;      // every later switch: _setjmp/_longjmp, which make no system call
  bool started;
  State state;
  uint64_t site;  // call site of the barrier / collective it waits at
  int op;         // which collective
  Attrs attrs;
};

// Values exchanged by a collective: double-buffered by generation, since a released lane may
// deposit for the next collective before a slower lane has read this one.
struct SimdGroup {
  alignas(16) unsigned char slots[2][kSimd][16];
  int gen;
  int lanes;  // lanes present (the last simdgroup of a partial threadgroup has fewer)
};

typedef void (*EntryFn)(void** bufs, const Attrs* attrs);

struct Run {
  EntryFn entry;
  void** bufs;
  Fiber fibers[kMaxThreads];
  SimdGroup simd[kMaxThreads / kSimd];
  int n;  // threads in the current threadgroup
  int current;
  ucontext_t sched;
  jmp_buf sched_jb;
  char* error;
  size_t error_len;
  bool failed;
  unsigned char* stacks;  // kept between launches; grown on demand
  size_t stack_size, stacks_for;
  uint64_t rng;
  sigjmp_buf crash;
};
inline Run* g_run = nullptr;

inline uint64_t next_rand(Run* r) {  // xorshift64*
  r->rng ^= r->rng >> 12;
  r->rng ^= r->rng << 25;
  r->rng ^= r->rng >> 27;
  return r->rng * 2685821657736338717ull;
}

inline Fiber& self() { return g_run->fibers[g_run->current]; }

inline void describe(char* buf, size_t len, const Fiber& f) {
  const Attrs& a = f.attrs;
  snprintf(buf, len, "threadgroup (%u,%u,%u) thread (%u,%u,%u)",
           a.threadgroup_position_in_grid.x, a.threadgroup_position_in_grid.y,
           a.threadgroup_position_in_grid.z, a.thread_position_in_threadgroup.x,
           a.thread_position_in_threadgroup.y, a.thread_position_in_threadgroup.z);
}

// Records the first error; the launch stops after the current sweep.
__attribute__((format(printf, 1, 2))) inline void fail(const char* fmt, ...) {
  if (g_run->failed) return;
  g_run->failed = true;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_run->error, g_run->error_len, fmt, ap);
  va_end(ap);
}

inline void to_scheduler() {
  if (_setjmp(self().jb) == 0) _longjmp(g_run->sched_jb, 1);
}

inline void wait_here(State s, uint64_t site, int op) {
  Fiber& f = self();
  f.state = s;
  f.site = site;
  f.op = op;
  to_scheduler();
}

inline uint64_t site_of(int line, int col) { return (uint64_t(line) << 20) | uint64_t(col); }

inline void fiber_main() {
  Fiber& f = self();
  g_run->entry(g_run->bufs, &f.attrs);
  self().state = DONE;
  _longjmp(g_run->sched_jb, 1);
}

// Runs fiber i until it waits or exits. Not inlined: its frame must stay intact while the
// fiber runs, since the fiber comes back by _longjmp into it.
__attribute__((noinline)) inline void switch_to(int i) {
  Fiber& f = g_run->fibers[i];
  g_run->current = i;
  if (_setjmp(g_run->sched_jb) != 0) return;
  if (f.started) _longjmp(f.jb, 1);
  f.started = true;
  swapcontext(&g_run->sched, &f.ctx);
}

// Releases every simdgroup whose live lanes all wait at one collective; a simdgroup where only
// some lanes wait (others at a barrier, another collective, or exited) is divergent use.
inline bool release_simdgroups() {
  bool released = false;
  char who[96];
  for (int s = 0; s * kSimd < g_run->n; s++) {
    Fiber* lanes = &g_run->fibers[s * kSimd];
    int count = g_run->simd[s].lanes, first = -1;
    for (int l = 0; l < count && first < 0; l++) first = lanes[l].state == AT_SIMD ? l : -1;
    if (first < 0) continue;
    const Fiber& ref = lanes[first];
    for (int l = 0; l < count; l++) {
      if (lanes[l].state == AT_SIMD && lanes[l].site == ref.site && lanes[l].op == ref.op) continue;
      describe(who, sizeof who, lanes[l]);
      fail("simd collective under divergent control flow: lane %d of simdgroup %d (%s) is %s "
           "while lane %d waits at the collective on line %u",
           l, s, who,
           lanes[l].state == DONE         ? "exited"
           : lanes[l].state == AT_BARRIER ? "at a threadgroup_barrier"
                                          : "at a different simd collective",
           first, unsigned(ref.site >> 20));
      return false;
    }
    for (int l = 0; l < count; l++) lanes[l].state = RUNNABLE;
    g_run->simd[s].gen++;
    released = true;
  }
  return released;
}

inline bool release_barrier() {
  Fiber* f = g_run->fibers;
  int waiting = 0, first = -1;
  for (int i = 0; i < g_run->n; i++)
    if (f[i].state == AT_BARRIER) waiting++, first = first < 0 ? i : first;
  if (waiting == 0) return false;
  char who[96];
  for (int i = 0; i < g_run->n; i++) {
    if (f[i].state == AT_BARRIER && f[i].site == f[first].site) continue;
    describe(who, sizeof who, f[i]);
    fail("threadgroup_barrier reached by only part of a threadgroup: %d of %d threads wait at "
         "the barrier on line %u, but %s %s",
         waiting, g_run->n, unsigned(f[first].site >> 20), who,
         f[i].state == DONE ? "has exited" : "waits at a barrier on another line");
    return false;
  }
  for (int i = 0; i < g_run->n; i++) f[i].state = RUNNABLE;
  return true;
}

inline void order(int* idx, int n, int schedule) {
  for (int i = 0; i < n; i++) idx[i] = schedule == REVERSE ? n - 1 - i : i;
  if (schedule == SHUFFLE)
    for (int i = n - 1; i > 0; i--) {
      int j = int(next_rand(g_run) % uint64_t(i + 1));
      int t = idx[i]; idx[i] = idx[j]; idx[j] = t;
    }
}

inline void on_crash(int sig) { siglongjmp(g_run->crash, sig); }

// Runs the current threadgroup to completion (or to the first error).
inline void run_threadgroup(int schedule) {
  Run* r = g_run;
  static ucontext_t proto;
  getcontext(&proto);
  for (int i = 0; i < r->n; i++) {
    Fiber& f = r->fibers[i];
    f.ctx = proto;
    f.started = false;
    f.ctx.uc_stack.ss_sp = r->stacks + size_t(i) * r->stack_size + 4096;  // page 0 guards
    f.ctx.uc_stack.ss_size = r->stack_size - 4096;
    f.ctx.uc_link = nullptr;
    f.state = RUNNABLE;
    makecontext(&f.ctx, fiber_main, 0);
  }
  int idx[kMaxThreads];
  while (!r->failed) {
    order(idx, r->n, schedule);
    bool ran = false;
    for (int k = 0; k < r->n && !r->failed; k++) {
      if (r->fibers[idx[k]].state != RUNNABLE) continue;
      ran = true;
      switch_to(idx[k]);
    }
    if (ran || r->failed) continue;
    if (release_simdgroups() || r->failed) continue;
    if (release_barrier() || r->failed) continue;
    return;  // every thread has exited
  }
}

}  // namespace mxexec

// ---- the synchronising Metal builtins -------------------------------------------------------
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

// ---- the launch: every threadgroup of the grid, in schedule order ----------------------------
// The linker's bounds of this library's threadgroup section (absent if the kernel has none).
extern "C" char __start_mxtg[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_mxtg[] __attribute__((weak, visibility("hidden")));

namespace mxexec {

inline unsigned ceil_div(unsigned a, unsigned b) { return (a + b - 1) / b; }

// Bytes FE FF: NaN in float32/float16/bfloat16 at any aligned offset, and distinct from the
// output poison (FF FF) so the host can tell "copied from uninitialised threadgroup memory".
inline void poison_threadgroup_memory() {
  if (!__start_mxtg) return;
  for (char* p = __start_mxtg; p < __stop_mxtg; p += 2) {
    p[0] = char(0xfe);
    if (p + 1 < __stop_mxtg) p[1] = char(0xff);
  }
}

inline void set_attrs(Run* r, uint3 grid, uint3 tpg, uint3 tg, uint3 actual) {
  uint3 ntg = {ceil_div(grid.x, tpg.x), ceil_div(grid.y, tpg.y), ceil_div(grid.z, tpg.z)};
  unsigned total = actual.x * actual.y * actual.z, dispatch = tpg.x * tpg.y * tpg.z;
  for (unsigned z = 0, i = 0; z < actual.z; z++)
    for (unsigned y = 0; y < actual.y; y++)
      for (unsigned x = 0; x < actual.x; x++, i++) {
        Attrs& a = r->fibers[i].attrs;
        a.dispatch_threads_per_threadgroup = tpg;
        a.grid_origin = uint3{0, 0, 0};
        a.grid_size = a.threads_per_grid = grid;
        a.thread_position_in_threadgroup = uint3{x, y, z};
        a.threadgroup_position_in_grid = tg;
        a.thread_position_in_grid = tg * tpg + uint3{x, y, z};
        a.threadgroups_per_grid = ntg;
        a.threads_per_threadgroup = actual;
        a.thread_index_in_threadgroup = i;
        a.simdgroup_index_in_threadgroup = i / kSimd;
        a.thread_index_in_simdgroup = i % kSimd;
        a.simdgroups_per_threadgroup = ceil_div(total, kSimd);
        a.dispatch_simdgroups_per_threadgroup = ceil_div(dispatch, kSimd);
        a.quadgroup_index_in_threadgroup = i / 4;
        a.thread_index_in_quadgroup = i % 4;
        a.quadgroups_per_threadgroup = ceil_div(total, 4);
        a.dispatch_quadgroups_per_threadgroup = ceil_div(dispatch, 4);
        a.thread_execution_width = a.threads_per_simdgroup = kSimd;
      }
  r->n = int(total);
  for (unsigned s = 0; s * kSimd < total; s++) {
    r->simd[s].gen = 0;
    r->simd[s].lanes = int(total - s * kSimd < unsigned(kSimd) ? total - s * kSimd : kSimd);
  }
}

// One stack per thread of a threadgroup, each above a PROT_NONE guard page.
inline bool ensure_stacks(Run* r, unsigned threads, size_t stack_size) {
  if (r->stacks && r->stack_size == stack_size && r->stacks_for >= threads) return true;
  if (r->stacks) munmap(r->stacks, r->stack_size * r->stacks_for);
  r->stacks = static_cast<unsigned char*>(mmap(nullptr, stack_size * threads,
      PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (r->stacks == MAP_FAILED) {
    r->stacks = nullptr;
    return false;
  }
  r->stack_size = stack_size;
  r->stacks_for = threads;
  for (unsigned i = 0; i < threads; i++) mprotect(r->stacks + i * stack_size, 4096, PROT_NONE);
  return true;
}

// Threadgroup indices in the order the schedule runs them.
inline int* threadgroup_order(unsigned count, int schedule) {
  int* tgs = static_cast<int*>(malloc(sizeof(int) * count));
  for (unsigned i = 0; i < count; i++) tgs[i] = schedule == REVERSE ? int(count - 1 - i) : int(i);
  if (schedule == SHUFFLE)
    for (unsigned i = count - 1; i > 0; i--) {
      unsigned j = unsigned(next_rand(g_run) % (i + 1));
      int t = tgs[i]; tgs[i] = tgs[j]; tgs[j] = t;
    }
  return tgs;
}

inline void run_grid(uint3 grid, uint3 tpg, int schedule) {
  uint3 ntg = {ceil_div(grid.x, tpg.x), ceil_div(grid.y, tpg.y), ceil_div(grid.z, tpg.z)};
  unsigned count = ntg.x * ntg.y * ntg.z;
  int* tgs = threadgroup_order(count, schedule);
  for (unsigned k = 0; k < count && !g_run->failed; k++) {
    unsigned t = unsigned(tgs[k]);
    uint3 tg = {t % ntg.x, (t / ntg.x) % ntg.y, t / (ntg.x * ntg.y)};
    uint3 edge = grid - tg * tpg;  // threads left in each dimension: the last group is partial
    uint3 actual = {edge.x < tpg.x ? edge.x : tpg.x, edge.y < tpg.y ? edge.y : tpg.y,
                    edge.z < tpg.z ? edge.z : tpg.z};
    set_attrs(g_run, grid, tpg, tg, actual);
    poison_threadgroup_memory();
    run_threadgroup(schedule);
  }
  free(tgs);
}

inline void report_signal(int sig, int timeout_s) {
  char who[96];
  describe(who, sizeof who, g_run->fibers[g_run->current]);
  g_run->failed = false;
  if (sig == SIGALRM)
    fail("the kernel ran longer than %d s, last in %s (an endless loop, or a thread spinning on "
         "memory another thread of its threadgroup writes, which needs a barrier)", timeout_s, who);
  else if (sig == SIGFPE)
    fail("arithmetic exception (integer division by zero) in %s", who);
  else
    fail("%s in %s: an access outside every buffer (or a fiber stack overflow)",
         sig == SIGSEGV ? "segmentation fault" : "bus error", who);
}

// cfg: grid xyz, threadgroup xyz (already min'd with the grid, as MLX does), schedule, seed,
// stack bytes per thread, timeout in seconds. Returns 0, or 1 with a message in `error`.
// A crash or a hang inside the kernel comes back as an error, not a dead or stuck test process.
inline int launch(EntryFn entry, void** bufs, const int64_t* cfg, char* error, size_t len) {
  static Run run;
  Run* r = &run;
  r->entry = entry; r->bufs = bufs; r->error = error; r->error_len = len; r->failed = false;
  r->rng = uint64_t(cfg[7]) * 0x9e3779b97f4a7c15ull + 1;
  uint3 grid = {unsigned(cfg[0]), unsigned(cfg[1]), unsigned(cfg[2])};
  uint3 tpg = {unsigned(cfg[3]), unsigned(cfg[4]), unsigned(cfg[5])};
  int timeout_s = int(cfg[9]);
  if (!ensure_stacks(r, tpg.x * tpg.y * tpg.z, size_t(cfg[8]))) {
    snprintf(error, len, "cannot map fiber stacks");
    return 1;
  }
  g_run = r;
  if (__start_mxtg && __stop_mxtg - __start_mxtg > kMaxThreadgroupBytes) {
    fail("the kernel declares %ld bytes of threadgroup memory; Metal allows %d",
         long(__stop_mxtg - __start_mxtg), kMaxThreadgroupBytes);
    g_run = nullptr;
    return 1;
  }
  const int sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGALRM};
  struct sigaction sa = {}, old[4];
  sa.sa_handler = on_crash;
  sa.sa_flags = SA_ONSTACK | SA_NODEFER;
  stack_t alt = {malloc(65536), 0, 65536}, old_alt;
  sigaltstack(&alt, &old_alt);
  for (int i = 0; i < 4; i++) sigaction(sigs[i], &sa, &old[i]);
  itimerval timer = {{0, 0}, {timeout_s, 0}}, off = {{0, 0}, {0, 0}}, old_timer;
  getitimer(ITIMER_REAL, &old_timer);  // someone else's alarm (pytest-timeout, say) resumes after
  if (int sig = sigsetjmp(r->crash, 1)) {
    setitimer(ITIMER_REAL, &off, nullptr);
    report_signal(sig, timeout_s);
  } else {
    setitimer(ITIMER_REAL, &timer, nullptr);
    run_grid(grid, tpg, int(cfg[6]));
    setitimer(ITIMER_REAL, &off, nullptr);
  }
  for (int i = 0; i < 4; i++) sigaction(sigs[i], &old[i], nullptr);
  setitimer(ITIMER_REAL, &old_timer, nullptr);
  sigaltstack(&old_alt, nullptr);
  free(alt.ss_sp);
  g_run = nullptr;
  return r->failed ? 1 : 0;
}

}  // namespace mxexec

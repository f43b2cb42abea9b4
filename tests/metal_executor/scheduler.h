// The threads of one threadgroup as ucontext fibers on one CPU thread. A fiber runs until it
// reaches a barrier or a simd collective (collectives.h) and waits there; when no fiber can
// run, the waiting simdgroups / the threadgroup are released if every live thread waits at the
// same call site, and anything else is reported as an error instead of hanging or silently
// diverging. (System headers for the whole runtime come first: shim.h defines `device`,
// `thread`, ... as macros.)
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


// A dispatch: every threadgroup of the grid in schedule order, with crashes, hangs and too much
// threadgroup memory reported as errors.
#pragma once
#include "collectives.h"

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

// whole_groups: CUDA's geometry (MLX's cuda_kernel launches ceil(grid / threadgroup) full
// blocks), where threads past the grid run too; otherwise Metal's partial edge threadgroups.
inline void run_grid(uint3 grid, uint3 tpg, int schedule, bool whole_groups) {
  uint3 ntg = {ceil_div(grid.x, tpg.x), ceil_div(grid.y, tpg.y), ceil_div(grid.z, tpg.z)};
  unsigned count = ntg.x * ntg.y * ntg.z;
  int* tgs = threadgroup_order(count, schedule);
  for (unsigned k = 0; k < count && !g_run->failed; k++) {
    unsigned t = unsigned(tgs[k]);
    uint3 tg = {t % ntg.x, (t / ntg.x) % ntg.y, t / (ntg.x * ntg.y)};
    uint3 edge = grid - tg * tpg;  // threads left in each dimension: the last group is partial
    uint3 actual = {edge.x < tpg.x ? edge.x : tpg.x, edge.y < tpg.y ? edge.y : tpg.y,
                    edge.z < tpg.z ? edge.z : tpg.z};
    if (whole_groups) actual = tpg;
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
// stack bytes per thread, timeout in seconds, whole (CUDA) threadgroups. Returns 0, or 1 with a message in `error`.
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
    run_grid(grid, tpg, int(cfg[6]), cfg[10] != 0);
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

// A Metal emulator for kernel bodies written for mx.fast.metal_kernel, in plain C++ (g++ >= 12).
//
// The same kernel text that MLX compiles for the GPU compiles here against this header:
//  - types: uint3, half/float16_t (_Float16), bfloat16_t (bf16 bits, round-to-nearest-even);
//  - address spaces: `device`, `constant`, `thread` vanish; `threadgroup` makes an array static
//    (shared by the threadgroup's threads, which run on one OS thread) and volatile (so no value is
//    kept in a register across a barrier), in a section the emulator fills with NaN before each
//    threadgroup: a read before the write that a barrier should have ordered shows up as NaN;
//  - threads: each thread of a threadgroup is a coroutine (ucontext) on its own stack. A simdgroup's
//    lanes run in turn to their next sync point; simd_sum returns the sum once every live lane
//    waits at one; threadgroup_barrier releases once every thread of the threadgroup waits at one.
//    Simdgroups run one after another, each as far as it can go, so one runs ahead of the rest up
//    to the barrier: a missing barrier, before a read or before an overwrite, then reads NaN or
//    another phase's data. Lanes waiting at different sync points, or a barrier some threads never
//    reach, are reported as errors instead of hanging. This is one legal schedule of many: races it
//    does not order badly go unseen, which is why the real-device tests exist too.
// Device buffers are bounds-checked pointers (ms_emu::dptr): an access outside its buffer is an error.
// The attribute values (thread_position_in_grid, ...) are the kernel function's arguments, as in
// MLX's generated signature; tests/metal_emu.py writes that function around the body.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <sys/types.h>
#include <type_traits>
#include <vector>

struct uint3 {
  uint32_t x, y, z;
};

typedef _Float16 half;
typedef half float16_t;

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = std::isnan(f) ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

namespace ms_emu {

enum class Op { none, barrier, simd_sum };
enum class State { ready, waiting, done };

struct Thread {
  ucontext_t ctx;
  State state;
  Op op;
  float value, result;
};

inline std::string& fault() {  // the first out-of-bounds access of this launch
  static std::string f;
  return f;
}

// A pointer into one device buffer, checked on every access; arithmetic and indexing as a pointer's.
template <typename T>
struct dptr {
  T* base;
  T* p;
  size_t n;
  template <typename I>
  dptr operator+(I d) const {
    return {base, p + d, n};
  }
  T& operator[](size_t i) const {
    if (p + i < base || p + i >= base + n) {
      static typename std::remove_const<T>::type scratch;
      if (fault().empty()) {
        char m[160];
        std::snprintf(m, sizeof m, "device access at element %td of a buffer of %zu", (p + i) - base, n);
        fault() = m;
      }
      return scratch;
    }
    return p[i];
  }
};

struct Ids {  // the attribute values of one thread
  uint3 thread_position_in_grid, threadgroup_position_in_grid, thread_position_in_threadgroup;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid;
  uint32_t thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width;
};

struct Runner {
  std::vector<Thread> threads;
  std::vector<std::vector<char>> stacks;
  std::vector<Ids> ids;
  ucontext_t sched;
  int current = -1;
  const std::function<void(const Ids&)>* body = nullptr;
  std::string error;
};

inline Runner& runner() {
  static Runner r;
  return r;
}

inline void entry() {
  Runner& r = runner();
  (*r.body)(r.ids[r.current]);
  r.threads[r.current].state = State::done;  // returning resumes uc_link, the scheduler
}

inline float sync(Op op, float value) {
  Runner& r = runner();
  Thread& t = r.threads[r.current];
  t.op = op;
  t.value = value;
  t.state = State::waiting;
  asm volatile("" ::: "memory");
  swapcontext(&t.ctx, &r.sched);
  asm volatile("" ::: "memory");
  return t.result;
}

// Run simdgroup [s0, s1) as far as it goes: its lanes run in turn to their next sync point, and
// while every live lane waits at simd_sum they get the sum and go on. Stops at a threadgroup
// barrier (or the end); false when the lanes wait at different sync points.
inline bool run_simdgroup(int s0, int s1, bool reverse) {
  Runner& r = runner();
  for (;;) {
    for (int j = s0; j < s1; j++) {
      int i = reverse ? s1 - 1 - (j - s0) : j;
      if (r.threads[i].state != State::ready) continue;
      r.current = i;
      swapcontext(&r.sched, &r.threads[i].ctx);
    }
    int live = 0, at_sum = 0;
    float sum = 0.0f;
    for (int i = s0; i < s1; i++) {
      Thread& t = r.threads[i];
      live += t.state != State::done;
      if (t.state == State::waiting && t.op == Op::simd_sum) {
        at_sum++;
        sum += t.value;
      }
    }
    if (!at_sum) return true;  // all done or at a barrier
    if (at_sum != live) {
      r.error = "lanes of a simdgroup wait at different sync points (simd_sum and a barrier)";
      return false;
    }
    for (int i = s0; i < s1; i++) {  // inactive (finished) lanes take no part, as on the GPU
      if (r.threads[i].state == State::waiting) {
        r.threads[i].result = sum;
        r.threads[i].state = State::ready;
      }
    }
  }
}

// One threadgroup of n threads. Simdgroups run one after another, each as far as it goes (so a
// simdgroup runs ahead of the others up to the next barrier: the schedule that exposes a missing
// barrier, whether before a read or before an overwrite); odd threadgroups go in reverse order.
inline bool run_threadgroup(int n, bool reverse) {
  Runner& r = runner();
  const int groups = (n + 31) / 32;
  for (;;) {
    for (int g = 0; g < groups; g++) {
      int s0 = 32 * (reverse ? groups - 1 - g : g);
      if (!run_simdgroup(s0, s0 + 32 < n ? s0 + 32 : n, reverse)) return false;
    }
    int done = 0;
    for (int i = 0; i < n; i++) done += r.threads[i].state == State::done;
    if (done == n) return true;
    if (done) {
      r.error = "threadgroup_barrier not reached by every thread of the threadgroup";
      return false;
    }
    for (int i = 0; i < n; i++) r.threads[i].state = State::ready;  // all wait at the barrier
  }
}

extern "C" char __start_ms_tg_mem[] __attribute__((weak));
extern "C" char __stop_ms_tg_mem[] __attribute__((weak));

// Run every thread of a grid of `grid` threads in threadgroups of `tg` threads (grid divisible by tg,
// as moestream's launches are). Returns 0, or 1 with the reason in err.
inline int launch(uint3 grid, uint3 tg, const std::function<void(const Ids&)>& body, char* err, int errlen) {
  Runner& r = runner();
  r.error.clear();
  fault().clear();
  r.body = &body;
  const int n = int(tg.x * tg.y * tg.z);
  if (grid.x % tg.x || grid.y % tg.y || grid.z % tg.z || n % 32) {
    std::snprintf(err, errlen, "grid not a multiple of the threadgroup, or threadgroup not whole simdgroups");
    return 1;
  }
  const size_t stack = 128 * 1024;
  r.threads.assign(n, Thread{});
  r.ids.assign(n, Ids{});
  if (int(r.stacks.size()) < n) r.stacks.resize(n);
  for (auto& s : r.stacks) s.resize(stack);
  const uint3 groups = {grid.x / tg.x, grid.y / tg.y, grid.z / tg.z};
  uint32_t ordinal = 0;
  for (uint32_t gz = 0; gz < groups.z; gz++)
    for (uint32_t gy = 0; gy < groups.y; gy++)
      for (uint32_t gx = 0; gx < groups.x; gx++, ordinal++) {
        if (__start_ms_tg_mem) std::memset(__start_ms_tg_mem, 0xff, __stop_ms_tg_mem - __start_ms_tg_mem);
        for (int i = 0; i < n; i++) {
          Ids& d = r.ids[i];
          uint3 p = {uint32_t(i) % tg.x, uint32_t(i) / tg.x % tg.y, uint32_t(i) / (tg.x * tg.y)};
          d.thread_position_in_threadgroup = p;
          d.threadgroup_position_in_grid = {gx, gy, gz};
          d.thread_position_in_grid = {gx * tg.x + p.x, gy * tg.y + p.y, gz * tg.z + p.z};
          d.threads_per_threadgroup = tg;
          d.threadgroups_per_grid = groups;
          d.threads_per_grid = grid;
          d.thread_index_in_threadgroup = uint32_t(i);
          d.thread_index_in_simdgroup = uint32_t(i) % 32;
          d.simdgroup_index_in_threadgroup = uint32_t(i) / 32;
          d.simdgroups_per_threadgroup = uint32_t(n) / 32;
          d.threads_per_simdgroup = d.thread_execution_width = 32;
          Thread& t = r.threads[i];
          t.state = State::ready;
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = r.stacks[i].data();
          t.ctx.uc_stack.ss_size = stack;
          t.ctx.uc_link = &r.sched;
          makecontext(&t.ctx, entry, 0);
        }
        if (!run_threadgroup(n, ordinal % 2)) {
          std::snprintf(err, errlen, "threadgroup (%u, %u, %u): %s", gx, gy, gz, r.error.c_str());
          return 1;
        }
      }
  if (!fault().empty()) {
    std::snprintf(err, errlen, "%s", fault().c_str());
    return 1;
  }
  return 0;
}

}  // namespace ms_emu

namespace metal {
using std::abs;
using std::exp;
using std::fma;
using std::max;
using std::min;
using std::sqrt;
enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };
inline void threadgroup_barrier(mem_flags) { ms_emu::sync(ms_emu::Op::barrier, 0.0f); }
inline float simd_sum(float v) { return ms_emu::sync(ms_emu::Op::simd_sum, v); }
}  // namespace metal
using namespace metal;

// Metal's address spaces, last: the standard headers above use these words themselves.
#define device
#define constant
#define thread
#define threadgroup static volatile __attribute__((section("ms_tg_mem")))

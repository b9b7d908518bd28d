// The CPU emulation's runtime (see cuda_emu.h): grid launch, the two execution modes (fibers on
// one OS thread; one std::thread per CUDA thread), block and warp barriers, the warp slot
// exchange, deferred cp.async, ldmatrix, and the few CUDA runtime calls the kernels make.
#include "cuda_emu.h"
#include "ptx_emu.h"

namespace segemu {
extern thread_local ThreadCtx* t_current;
}

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define SEGEMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define SEGEMU_TSAN 1
#endif
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace segemu {

thread_local ThreadCtx* t_current = nullptr;

ThreadCtx* current() { return t_current; }

namespace {

// ---------------------------------------------------------------------------------------------
// Execution mode
// ---------------------------------------------------------------------------------------------
bool use_threads() {
#if defined(SEGEMU_TSAN)
  return true;  // ThreadSanitizer needs real threads to see the CUDA threads' accesses race
#else
  const char* mode = getenv("SEGATTN_EMU_MODE");
  return mode != nullptr && strcmp(mode, "threads") == 0;
#endif
}

// ---------------------------------------------------------------------------------------------
// Fibers: a minimal context switch (x86-64: callee-saved registers, mxcsr and the x87 control
// word; elsewhere ucontext).
// ---------------------------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void segemu_switch(void** save_sp, void* new_sp);
extern "C" void segemu_fiber_start();
asm(R"(
  .text
  .globl segemu_switch
  .type segemu_switch, @function
segemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size segemu_switch, .-segemu_switch

  .globl segemu_fiber_start
  .type segemu_fiber_start, @function
segemu_fiber_start:
  movq %r12, %rdi
  call *%r13
  ud2
  .size segemu_fiber_start, .-segemu_fiber_start
)");
#endif

constexpr size_t kStackBytes = 512 * 1024;

struct Stack {
  unsigned char* base = nullptr;  // lowest usable byte (a guard page sits below it)
  size_t bytes = 0;
};

Stack new_stack() {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    fprintf(stderr, "segattn emulation: cannot allocate a fiber stack\n");
    abort();
  }
  mprotect(mem, page, PROT_NONE);  // an overflowing fiber faults instead of corrupting its neighbour
  return Stack{static_cast<unsigned char*>(mem) + page, kStackBytes};
}

std::vector<Stack>& stack_pool() {
  static std::vector<Stack> pool;
  return pool;
}

// ---------------------------------------------------------------------------------------------
// Barriers: `expected` threads arrive; a thread that exits is dropped from the count.
// ---------------------------------------------------------------------------------------------
struct Barrier {
  int expected = 0, arrived = 0;
  unsigned gen = 0;
  std::mutex mu;  // thread mode only
  std::condition_variable cv;
};

struct Warp {
  Barrier bar;
  int live = 0;
  alignas(16) unsigned char slots[2][32][kSlotBytes];
};

struct Pending {
  unsigned char* dst;
  unsigned char data[16];
  int group;  // -1 until committed
};

struct Thread;

}  // namespace

struct Block {
  uint3 idx;
  dim3 dim, grid;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  Barrier bar;
  std::vector<Warp> warps;
};

namespace {

struct Thread {
  ThreadCtx ctx;
  int parity = 0;               // which half of the warp's slot buffer the next exchange uses
  std::vector<Pending> pending;  // deferred cp.async copies
  int committed = 0;             // cp.async groups committed so far
  // Fiber mode
  Stack stack;
  void* sp = nullptr;
  bool done = false;
  Barrier* waiting = nullptr;
  unsigned wait_gen = 0;
  const std::function<void()>* body = nullptr;
#if defined(SEGEMU_ASAN)
  void* fake_stack = nullptr;
#endif
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
};

Thread* self() { return static_cast<Thread*>(t_current->runtime); }

// The scheduler's side of fiber mode.
struct Scheduler {
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
#if defined(SEGEMU_ASAN)
  void* fake_stack = nullptr;
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
#endif
};
Scheduler g_sched;
bool g_threads = false;
Block* g_block = nullptr;

void switch_to_scheduler(Thread* t, bool dying) {
#if defined(SEGEMU_ASAN)
  __sanitizer_start_switch_fiber(dying ? nullptr : &t->fake_stack, g_sched.stack_bottom, g_sched.stack_size);
#else
  (void)dying;
#endif
#if defined(__x86_64__)
  segemu_switch(&t->sp, g_sched.sp);
#else
  swapcontext(&t->uc, &g_sched.uc);
#endif
#if defined(SEGEMU_ASAN)
  __sanitizer_finish_switch_fiber(t->fake_stack, &g_sched.stack_bottom, &g_sched.stack_size);
#endif
}

void switch_to_fiber(Thread* t) {
  t_current = &t->ctx;
#if defined(SEGEMU_ASAN)
  __sanitizer_start_switch_fiber(&g_sched.fake_stack, t->stack.base, t->stack.bytes);
#endif
#if defined(__x86_64__)
  segemu_switch(&g_sched.sp, t->sp);
#else
  swapcontext(&g_sched.uc, &t->uc);
#endif
#if defined(SEGEMU_ASAN)
  __sanitizer_finish_switch_fiber(g_sched.fake_stack, nullptr, nullptr);
#endif
}

void release(Barrier& b) {
  b.arrived = 0;
  ++b.gen;
}

void arrive_and_wait(Barrier& b) {
  if (g_threads) {
    std::unique_lock<std::mutex> lock(b.mu);
    if (++b.arrived == b.expected) {
      release(b);
      b.cv.notify_all();
      return;
    }
    const unsigned gen = b.gen;
    if (!b.cv.wait_for(lock, std::chrono::seconds(60), [&] { return b.gen != gen; }))
      fault("deadlock: a barrier was not reached by every thread of the block / warp within 60 s");
    return;
  }
  if (++b.arrived == b.expected) {
    release(b);
    return;
  }
  Thread* t = self();
  t->waiting = &b;
  t->wait_gen = b.gen;
  switch_to_scheduler(t, false);
}

void drop(Barrier& b) {
  if (g_threads) {
    std::lock_guard<std::mutex> lock(b.mu);
    if (--b.expected == b.arrived && b.arrived > 0) {
      release(b);
      b.cv.notify_all();
    }
    return;
  }
  if (--b.expected == b.arrived && b.arrived > 0) release(b);
}

void finish_thread(Thread* t) {
  t->pending.clear();  // copies never waited for are never seen
  drop(g_block->warps[t->ctx.warp].bar);
  drop(g_block->bar);
}

#if defined(__x86_64__)
extern "C" void segemu_fiber_main(void* arg) {
#else
void segemu_fiber_main_uc(unsigned lo, unsigned hi) {
  void* arg = reinterpret_cast<void*>(((uintptr_t)hi << 32) | lo);
#endif
  Thread* t = static_cast<Thread*>(arg);
#if defined(SEGEMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g_sched.stack_bottom, &g_sched.stack_size);
#endif
  (*t->body)();
  finish_thread(t);
  t->done = true;
  switch_to_scheduler(t, true);
  fault("a finished fiber was resumed");
}

void prepare_fiber(Thread* t) {
  t->done = false;
  t->waiting = nullptr;
#if defined(__x86_64__)
  uintptr_t top = reinterpret_cast<uintptr_t>(t->stack.base + t->stack.bytes) & ~(uintptr_t)15;
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 64);
  const uint32_t csr[2] = {0x1F80u, 0x037Fu};  // default mxcsr, x87 control word
  memcpy(&sp[0], csr, 8);
  sp[1] = 0;                                                // r15
  sp[2] = 0;                                                // r14
  sp[3] = reinterpret_cast<uint64_t>(&segemu_fiber_main);  // r13: entry
  sp[4] = reinterpret_cast<uint64_t>(t);                    // r12: its argument
  sp[5] = 0;                                                // rbx
  sp[6] = 0;                                                // rbp
  sp[7] = reinterpret_cast<uint64_t>(&segemu_fiber_start);  // return address
  t->sp = sp;
#else
  getcontext(&t->uc);
  t->uc.uc_stack.ss_sp = t->stack.base;
  t->uc.uc_stack.ss_size = t->stack.bytes;
  t->uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t);
  makecontext(&t->uc, (void (*)())segemu_fiber_main_uc, 2, (unsigned)(p & 0xffffffffu), (unsigned)(p >> 32));
#endif
}

void run_block_fibers(std::vector<Thread>& threads) {
  auto& pool = stack_pool();
  while (pool.size() < threads.size()) pool.push_back(new_stack());
  for (size_t i = 0; i < threads.size(); ++i) {
    threads[i].stack = pool[i];
    prepare_fiber(&threads[i]);
  }
  size_t alive = threads.size();
  while (alive > 0) {
    bool ran = false;
    for (Thread& t : threads) {
      if (t.done || (t.waiting != nullptr && t.waiting->gen == t.wait_gen)) continue;
      t.waiting = nullptr;
      switch_to_fiber(&t);
      ran = true;
      if (t.done) --alive;
    }
    if (!ran) {
      t_current = &threads[0].ctx;
      for (Thread& t : threads)
        if (!t.done) {
          t_current = &t.ctx;
          break;
        }
      fault("deadlock: __syncthreads / __syncwarp / a warp-collective operation is not reached by every "
            "thread of the block / warp (e.g. called under a divergent branch)");
    }
  }
  t_current = nullptr;
}

void run_block_threads(std::vector<Thread>& threads) {
  std::vector<std::thread> os;
  os.reserve(threads.size());
  for (Thread& t : threads) {
    os.emplace_back([&t] {
      t_current = &t.ctx;
      (*t.body)();
      finish_thread(&t);
      t_current = nullptr;
    });
  }
  for (std::thread& th : os) th.join();
}

// ---------------------------------------------------------------------------------------------
// Launch bookkeeping: cudaFuncSetAttribute's limits, cudaGetLastError.
// ---------------------------------------------------------------------------------------------
constexpr int kDefaultSmem = 48 * 1024;
constexpr int kMaxSmem = 227 * 1024;  // sm_90's opt-in limit per block
std::mutex g_launch_mu;
std::map<const void*, int>& smem_limits() {
  static std::map<const void*, int> limits;
  return limits;
}
cudaError_t g_last_error = cudaSuccess;

}  // namespace

const uint3& block_idx() { return t_current->block->idx; }
const dim3& block_dim() { return t_current->block->dim; }
const dim3& grid_dim() { return t_current->block->grid; }
unsigned char* dynamic_smem() { return t_current->block->smem; }
size_t dynamic_smem_bytes() { return t_current->block->smem_bytes; }

void fault(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "segattn emulation: ");
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  if (t_current != nullptr) {
    const Block* b = t_current->block;
    fprintf(stderr, " [block (%u, %u, %u), thread (%u, %u, %u)]", b->idx.x, b->idx.y, b->idx.z,
            t_current->thread_idx.x, t_current->thread_idx.y, t_current->thread_idx.z);
  }
  fprintf(stderr, "\n");
  fflush(stderr);
  abort();
}

void syncthreads() { arrive_and_wait(t_current->block->bar); }

static void check_mask(unsigned mask, const char* what) {
  const Warp& w = t_current->block->warps[t_current->warp];
  const unsigned full = w.live == 32 ? 0xffffffffu : ((1u << w.live) - 1u);
  if ((mask & full) != full)
    fault("%s with mask 0x%08x: only full-warp masks are emulated", what, mask);
}

void syncwarp(unsigned mask) {
  check_mask(mask, "__syncwarp");
  arrive_and_wait(t_current->block->warps[t_current->warp].bar);
}

const unsigned char* warp_exchange(const void* mine, size_t bytes, unsigned mask) {
  check_mask(mask, "a warp-collective operation");
  Thread* t = self();
  Warp& w = t_current->block->warps[t_current->warp];
  unsigned char* slots = &w.slots[t->parity][0][0];
  memcpy(slots + t_current->lane * kSlotBytes, mine, bytes);
  arrive_and_wait(w.bar);
  t->parity ^= 1;
  return slots;
}

void run_grid(const void* func, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  std::lock_guard<std::mutex> launch_lock(g_launch_mu);
  const size_t nthreads = (size_t)block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  auto it = smem_limits().find(func);
  const size_t limit = it == smem_limits().end() ? kDefaultSmem : (size_t)it->second;
  if (smem_bytes > limit) {  // what a GPU does without cudaFuncSetAttribute's opt-in
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  g_threads = use_threads();

  // Exactly smem_bytes, so that AddressSanitizer sees an access past its end.
  unsigned char* smem = smem_bytes ? static_cast<unsigned char*>(::operator new(smem_bytes, std::align_val_t(128)))
                                   : nullptr;
  const int nwarps = (int)((nthreads + 31) / 32);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk;
        blk.idx = make_uint3(bx, by, bz);
        blk.dim = block;
        blk.grid = grid;
        blk.smem = smem;
        blk.smem_bytes = smem_bytes;
        if (smem) memset(smem, 0xFF, smem_bytes);  // unwritten shared memory reads as NaN
        blk.bar.expected = (int)nthreads;
        blk.warps = std::vector<Warp>(nwarps);
        for (int w = 0; w < nwarps; ++w) {
          blk.warps[w].live = (int)std::min<size_t>(32, nthreads - 32 * (size_t)w);
          blk.warps[w].bar.expected = blk.warps[w].live;
        }
        std::vector<Thread> threads(nthreads);
        for (size_t i = 0; i < nthreads; ++i) {
          Thread& t = threads[i];
          t.ctx.thread_idx = make_uint3((unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                                        (unsigned)(i / ((size_t)block.x * block.y)));
          t.ctx.linear = (int)i;
          t.ctx.lane = (int)(i % 32);
          t.ctx.warp = (int)(i / 32);
          t.ctx.block = &blk;
          t.ctx.runtime = &t;
          t.body = &body;
        }
        g_block = &blk;
        if (g_threads)
          run_block_threads(threads);
        else
          run_block_fibers(threads);
        g_block = nullptr;
      }
  if (smem) ::operator delete(smem, std::align_val_t(128));
}

// ---------------------------------------------------------------------------------------------
// PTX: cp.async and ldmatrix (ptx_emu.h)
// ---------------------------------------------------------------------------------------------
static bool in_smem(const void* p, size_t bytes) {
  const Block* b = t_current->block;
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return b->smem != nullptr && c >= b->smem && c + bytes <= b->smem + b->smem_bytes;
}

void cp_async_issue(void* smem_dst, const void* gmem_src, bool valid) {
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0))
    fault("cp.async of 16 bytes needs 16-byte aligned addresses; got dst %p, src %p", smem_dst, gmem_src);
  if (!in_smem(smem_dst, 16)) fault("cp.async destination %p is not in the block's shared memory", smem_dst);
  Pending p;
  p.dst = static_cast<unsigned char*>(smem_dst);
  if (valid)
    memcpy(p.data, gmem_src, 16);
  else
    memset(p.data, 0, 16);
  p.group = -1;
  self()->pending.push_back(p);
  memset(smem_dst, 0xFF, 16);  // in flight: reads NaN until the covering wait
}

void cp_async_commit() {
  Thread* t = self();
  for (Pending& p : t->pending)
    if (p.group < 0) p.group = t->committed;
  ++t->committed;
}

void cp_async_wait(int pending_groups) {
  Thread* t = self();
  const int complete_below = t->committed - pending_groups;  // groups [0, complete_below) land now
  size_t keep = 0;
  for (size_t i = 0; i < t->pending.size(); ++i) {
    Pending& p = t->pending[i];
    if (p.group >= 0 && p.group < complete_below)
      memcpy(p.dst, p.data, 16);
    else
      t->pending[keep++] = p;
  }
  t->pending.resize(keep);
}

void ldmatrix(uint32_t* r, int count, bool trans, const void* smem_row) {
  const int lane = t_current->lane, g = lane / 4, t = lane % 4;
  if (lane < 8 * count) {
    if (reinterpret_cast<uintptr_t>(smem_row) % 16 != 0)
      fault("ldmatrix: row address %p is not 16-byte aligned", smem_row);
    if (!in_smem(smem_row, 16)) fault("ldmatrix: row address %p is not in the block's shared memory", smem_row);
  }
  const unsigned char* slots = warp_exchange(&smem_row, sizeof smem_row, 0xffffffffu);
  auto row = [&](int l) {
    const unsigned char* p;
    memcpy(&p, slots + l * kSlotBytes, sizeof p);
    return p;
  };
  for (int i = 0; i < count; ++i) {
    if (!trans) {
      memcpy(&r[i], row(8 * i + g) + 4 * t, 4);  // row g, columns 2t, 2t + 1
    } else {
      uint16_t lo, hi;  // column g, rows 2t and 2t + 1
      memcpy(&lo, row(8 * i + 2 * t) + 2 * g, 2);
      memcpy(&hi, row(8 * i + 2 * t + 1) + 2 * g, 2);
      r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
  }
}

}  // namespace segemu

// ---------------------------------------------------------------------------------------------
// The CUDA runtime calls the kernels' host code makes.
// ---------------------------------------------------------------------------------------------
extern "C" cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > segemu::kMaxSmem) return segemu::g_last_error = cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(segemu::g_launch_mu);
    segemu::smem_limits()[func] = value;
  }
  return cudaSuccess;
}

extern "C" cudaError_t cudaGetLastError(void) {
  const cudaError_t err = segemu::g_last_error;
  segemu::g_last_error = cudaSuccess;
  return err;
}

extern "C" cudaError_t cudaPeekAtLastError(void) { return segemu::g_last_error; }

extern "C" const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error";
  }
}

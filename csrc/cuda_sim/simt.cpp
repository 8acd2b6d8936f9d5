// The runtime of the SIMT simulation (csrc/cuda_sim/simt.h): launches, barriers, warp exchange.
//
// The threads of a block are fibers on the launching thread, resumed in thread order by
// a scheduler until each finishes or waits at a barrier; a barrier opens when every thread that
// has not returned waits at it (__syncthreads: the block's; a shuffle: its warp's). A switch costs
// well under a microsecond, against tens of microseconds to wake an OS thread: shuffle-heavy
// kernels (a block sum is 20 exchanges) stay testable at multi-block sizes.
#include "cuda_sim/simt.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// SEGFAST_SIM_TSAN (`make tsan`): the kernels are compiled with ThreadSanitizer, this file is not
// (its scheduler hands state from fiber to fiber, which TSan would take for races). Each
// simulated thread is a TSan fiber, switched to without synchronisation, and what orders the
// threads of a block on a GPU orders them here: a __syncthreads is a release by every thread
// arriving and an acquire by every thread leaving, a shuffle the same for its warp's lanes, and a
// launch or the end of a block a release/acquire between the blocks (which run one after another
// here; races between concurrent blocks are out of reach). A shared-memory access that no
// barrier orders is then a data race that TSan reports, with the kernel's stack.
#ifdef SEGFAST_SIM_TSAN
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
namespace {
constexpr unsigned kNoSync = 1;  // __tsan_switch_to_fiber_no_sync
void tsan_switch_to(void* fiber) {
  __tsan_switch_to_fiber(fiber, kNoSync);
}
void tsan_release(void* token) {
  __tsan_release(token);
}
void tsan_acquire(void* token) {
  __tsan_acquire(token);
}
}  // namespace
#else
namespace {
void tsan_switch_to(void*) {}
void tsan_release(void*) {}
void tsan_acquire(void*) {}
}  // namespace
#endif

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// segfast_sim_switch(&from_sp, to_sp): saves the callee-saved registers, MXCSR and the x87 control
// word on the running stack, stores its pointer in *from_sp, and resumes the stack at to_sp.
extern "C" void segfast_sim_switch(void** from_sp, void* to_sp);
asm(R"(
  .text
  .globl segfast_sim_switch
  .hidden segfast_sim_switch
  .type segfast_sim_switch, @function
segfast_sim_switch:
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
  .size segfast_sim_switch, .-segfast_sim_switch
)");

namespace segfast::sim {
namespace {

constexpr int kWarp = 32;
constexpr std::size_t kStackBytes = 256 * 1024;

enum class State { Runnable, AtSyncthreads, AtWarpBarrier, Done };

struct Fiber {
  void* sp = nullptr;                                    // its stack pointer while switched out
  std::unique_ptr<char[]> stack{new char[kStackBytes]};  // untouched pages cost nothing
  State state = State::Runnable;
  // the values this lane offers to shuffles, alternately: a lane can run one exchange ahead of the
  // others (it waits at the next barrier), never two
  std::array<std::array<unsigned char, 16>, 2> slots;
  int exchanges = 0;
  int barriers = 0;            // __syncthreads passed in this block
  void* fake_stack = nullptr;  // ASan's bookkeeping across switches
  void* tsan_fiber = nullptr;  // TSan's, under SEGFAST_SIM_TSAN
};

// One launch's fibers and scheduler; blocks reuse the fibers.
struct Launch {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber>* fibers = nullptr;
  int threads = 0;
  int current = 0;
  void* scheduler_sp = nullptr;
  const void* scheduler_stack = nullptr;  // for ASan
  std::size_t scheduler_stack_bytes = 0;
  // TSan's synchronisation objects (their addresses): the launching thread's fiber, the start of
  // block b (released by the launch or block b - 1 ending, token b % 2), the block's barriers and
  // each warp's exchanges (alternating, as a thread is at most one barrier ahead of another)
  void* tsan_host = nullptr;
  char block_token[2] = {}, barrier_token[2] = {};
  std::vector<std::array<char, 2>> warp_tokens;
  unsigned long long block = 0;
};

Launch* launch_state = nullptr;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "cuda-sim: %s in block (%u, %u, %u), thread (%u, %u, %u)\n", what.c_str(), blockIdx.x,
               blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::abort();
}

void set_thread_index(int t) {
  threadIdx = dim3(t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y));
}

// In a fiber, back from the scheduler: ASan must be told which stack is in use (and records the
// scheduler's), or it takes the switch for a stack overflow.
void entered() {
#ifdef __SANITIZE_ADDRESS__
  Launch& l = *launch_state;
  __sanitizer_finish_switch_fiber((*l.fibers)[l.current].fake_stack, &l.scheduler_stack, &l.scheduler_stack_bytes);
#endif
}

// From the running fiber to the scheduler, until it resumes this fiber.
void yield(State state) {
  Launch& l = *launch_state;
  Fiber& f = (*l.fibers)[l.current];
  f.state = state;
  if (state == State::Done) tsan_release(&l.block_token[(l.block + 1) % 2]);
  tsan_switch_to(l.tsan_host);
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_start_switch_fiber(state == State::Done ? nullptr : &f.fake_stack, l.scheduler_stack,
                                 l.scheduler_stack_bytes);
#endif
  segfast_sim_switch(&f.sp, l.scheduler_sp);
  entered();
}

[[noreturn]] void fiber_main() {
  entered();
  tsan_acquire(&launch_state->block_token[launch_state->block % 2]);
  try {
    (*launch_state->body)();
  } catch (const std::exception& e) {
    fail(std::string("exception in a kernel: ") + e.what());
  }
  yield(State::Done);
  std::abort();  // a finished fiber is never resumed
}

// Whether some waiting fibers could be released; releases them.
bool release_barrier(std::vector<Fiber>& fibers, int threads) {
  bool released = false;
  for (int w = 0; w * kWarp < threads; ++w) {  // a warp whose live lanes all wait at its barrier
    const int end = std::min(threads, (w + 1) * kWarp);
    bool all = true, any = false;
    for (int t = w * kWarp; t < end; ++t) {
      all &= fibers[t].state == State::AtWarpBarrier || fibers[t].state == State::Done;
      any |= fibers[t].state == State::AtWarpBarrier;
    }
    if (!all || !any) continue;
    for (int t = w * kWarp; t < end; ++t) {
      if (fibers[t].state == State::AtWarpBarrier) fibers[t].state = State::Runnable;
    }
    released = true;
  }
  if (released) return true;
  bool all = true, any = false;  // the block, when every live thread waits at __syncthreads
  for (int t = 0; t < threads; ++t) {
    all &= fibers[t].state == State::AtSyncthreads || fibers[t].state == State::Done;
    any |= fibers[t].state == State::AtSyncthreads;
  }
  if (!all || !any) return false;
  for (int t = 0; t < threads; ++t) {
    if (fibers[t].state == State::AtSyncthreads) fibers[t].state = State::Runnable;
  }
  return true;
}

void run_block(Launch& l) {
  std::vector<Fiber>& fibers = *l.fibers;
  for (int t = 0; t < l.threads; ++t) {
    Fiber& f = fibers[t];
    f.state = State::Runnable;
    f.exchanges = 0;
    f.barriers = 0;
#ifdef __SANITIZE_ADDRESS__
    // a finished fiber never unwinds: its frames' redzones are still poisoned
    ASAN_UNPOISON_MEMORY_REGION(f.stack.get(), kStackBytes);
#endif
    // a new stack as segfast_sim_switch leaves one: MXCSR and x87 control word (the launching
    // thread's), six registers, then fiber_main as the return address; 16-byte aligned at its call
    auto* top = reinterpret_cast<std::uintptr_t*>((reinterpret_cast<std::uintptr_t>(f.stack.get()) + kStackBytes) &
                                                  ~std::uintptr_t{15});
    std::uintptr_t* sp = top - 9;
    sp[8] = 0;  // fiber_main's frame would return here; it never does
    sp[7] = reinterpret_cast<std::uintptr_t>(&fiber_main);
    for (int r = 1; r <= 6; ++r) sp[r] = 0;
    std::uint32_t control[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
    std::memcpy(sp, control, sizeof(control));
    f.sp = sp;
  }
  int done = 0;
  while (done < l.threads) {
    bool ran = false;
    for (int t = 0; t < l.threads; ++t) {
      Fiber& f = fibers[t];
      if (f.state != State::Runnable) continue;
      l.current = t;
      set_thread_index(t);
      tsan_switch_to(f.tsan_fiber);
#ifdef __SANITIZE_ADDRESS__
      void* scheduler_fake = nullptr;
      __sanitizer_start_switch_fiber(&scheduler_fake, f.stack.get(), kStackBytes);
      segfast_sim_switch(&l.scheduler_sp, f.sp);
      __sanitizer_finish_switch_fiber(scheduler_fake, nullptr, nullptr);
#else
      segfast_sim_switch(&l.scheduler_sp, f.sp);
#endif
      ran = true;
      if (f.state == State::Done) ++done;
    }
    if (done < l.threads && !ran && !release_barrier(fibers, l.threads)) {
      set_thread_index(0);
      fail("deadlock: a __syncthreads() or warp shuffle that not every live thread reaches");
    }
  }
}

}  // namespace

void launch(dim3 grid, dim3 block, const std::function<void()>& thread_body) {
  const std::uint64_t threads = std::uint64_t{block.x} * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.z <= 64, "cuda-sim: invalid launch: block (", block.x, ", ",
              block.y, ", ", block.z, ") (at most 1024 threads, z at most 64)");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535,
              "cuda-sim: invalid launch: grid (", grid.x, ", ", grid.y, ", ", grid.z,
              ") (x at most 2^31 - 1, y and z at most 65535)");
  // __shared__ statics are per kernel, and the fibers are reused: one launch at a time
  static std::mutex one_launch;
  static std::vector<Fiber> fibers;
  std::lock_guard<std::mutex> lock(one_launch);
  if (fibers.size() < threads) fibers.resize(threads);
  Launch l;
  l.body = &thread_body;
  l.fibers = &fibers;
  l.threads = static_cast<int>(threads);
  l.warp_tokens.resize((threads + kWarp - 1) / kWarp);
#ifdef SEGFAST_SIM_TSAN
  l.tsan_host = __tsan_get_current_fiber();
  for (Fiber& f : fibers) {
    if (f.tsan_fiber == nullptr) f.tsan_fiber = __tsan_create_fiber(0);
  }
#endif
  launch_state = &l;
  blockDim = block;
  gridDim = grid;
  threadIdx = blockIdx = dim3();    // the first use of a thread_local allocates it: before the release
  tsan_release(&l.block_token[0]);  // what the host wrote before the launch
  for (unsigned int z = 0; z < grid.z; ++z) {
    for (unsigned int y = 0; y < grid.y; ++y) {
      for (unsigned int x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        run_block(l);
        ++l.block;
      }
    }
  }
  tsan_acquire(&l.block_token[l.block % 2]);  // what the last block wrote, for the host
  launch_state = nullptr;
}

void syncthreads() {
  Launch& l = *launch_state;
  const int me = l.current, parity = (*l.fibers)[me].barriers++ % 2;
  tsan_release(&l.barrier_token[parity]);
  yield(State::AtSyncthreads);
  tsan_acquire(&l.barrier_token[parity]);
}

int lane() {
  return launch_state->current % kWarp;
}

void warp_exchange(const void* mine, void* theirs, std::size_t bytes, int source) {
  Launch& l = *launch_state;
  std::vector<Fiber>& fibers = *l.fibers;
  const int me = l.current, from = me / kWarp * kWarp + source;
  const int parity = fibers[me].exchanges++ % 2;
  char* token = &l.warp_tokens[me / kWarp][parity];
  std::memcpy(fibers[me].slots[parity].data(), mine, bytes);
  tsan_release(token);
  yield(State::AtWarpBarrier);  // every live lane has offered its value
  tsan_acquire(token);
  std::memcpy(theirs, fibers[from < l.threads ? from : me].slots[parity].data(), bytes);
}

void trap() {
  fail("__trap()");
}

namespace {
std::atomic<bool> capturing{false};
}

bool stream_is_capturing() {
  return capturing.load();
}

void set_stream_capturing(bool value) {
  capturing.store(value);
}

}  // namespace segfast::sim

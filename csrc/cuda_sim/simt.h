#pragma once
// A SIMT simulation of the CUDA execution model, so that csrc/cuda/*.cu compiled by the host
// compiler (SEGFAST_CUDA_SIM) runs on CPU tensors against its CPU twin (docs/cuda-sim.md).
//
// A launch runs its blocks one after another; the threads of a block are fibers on the launching
// thread (csrc/cuda_sim/simt.cpp), so that __syncthreads is a real barrier across them and warp
// shuffles exchange values among 32 lanes (consecutive linear thread ids, as on the GPU); a
// barrier some live thread never reaches is reported as a deadlock. __shared__ is a
// function-local static: one per kernel, which is per block because blocks do not overlap.
// Launch limits are asserted as the driver refuses them (more than 1024 threads a block, gridDim.y
// or .z above 65535).
//
// What it cannot catch: timing (threads interleave only at barriers, in thread order, so a race
// between warps that a GPU's scheduling would expose runs the same way every time here), device
// memory (pointers are host pointers, so a CPU tensor handed to a kernel is not an error here),
// float rounding of the device's fast math, and shared-memory bank conflicts or performance of
// any kind.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#include <c10/util/Exception.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
using cudaStream_t = void*;

// CUDA's math library has these at global scope.
using std::max;
using std::min;

// The built-in variables, per simulated thread.
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace segfast::sim {

// Runs `thread_body` once per thread of every block of the grid (see the file comment).
void launch(dim3 grid, dim3 block, const std::function<void()>& thread_body);

void syncthreads();
// The running thread's lane in its warp (its linear thread id modulo 32).
int lane();
// The 32-lane exchange behind every shuffle: each lane of the warp offers `bytes` of its value and
// reads lane `source`'s (its own when `source` is outside the warp).
void warp_exchange(const void* mine, void* theirs, std::size_t bytes, int source);
[[noreturn]] void trap();
// A stand-in for cudaStreamIsCapturing: the tests set it to run the kernels' graph-capture paths.
bool stream_is_capturing();
void set_stream_capturing(bool capturing);

template <typename T>
T shfl_down(unsigned int mask, T value, unsigned int delta) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16);
  TORCH_CHECK(mask == 0xffffffffu, "cuda-sim: only full-warp shuffles are simulated, got mask ", mask);
  const int source = lane() + static_cast<int>(delta);
  T out;
  warp_exchange(&value, &out, sizeof(T), source < 32 ? source : lane());
  return out;
}

template <typename T>
T shfl_xor(unsigned int mask, T value, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16);
  TORCH_CHECK(mask == 0xffffffffu, "cuda-sim: only full-warp shuffles are simulated, got mask ", mask);
  T out;
  warp_exchange(&value, &out, sizeof(T), lane() ^ lane_mask);
  return out;
}

}  // namespace segfast::sim

inline void __syncthreads() {
  segfast::sim::syncthreads();
}

inline void __trap() {
  segfast::sim::trap();
}

template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta) {
  return segfast::sim::shfl_down(mask, value, delta);
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask) {
  return segfast::sim::shfl_xor(mask, value, lane_mask);
}

// The atomics the kernels use; they return the old value, as CUDA's do.
template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

template <typename T>
T atomicMin(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (value < old && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

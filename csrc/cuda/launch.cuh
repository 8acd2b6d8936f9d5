#pragma once
// What every CUDA kernel file shares: the launch, its sizes, the device guard, the registration
// and a fixed-order block sum. Compiled with SEGFAST_CUDA_SIM by the host compiler, the same files
// run on CPU tensors in the SIMT simulation (csrc/cuda_sim/simt.h), registered under the
// `segfast_sim` op namespace for the CPU key (docs/cuda-sim.md).
#include <c10/core/Device.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#ifdef SEGFAST_CUDA_SIM
#include "cuda_sim/simt.h"
#define SEGFAST_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(segfast_sim, CPU, m)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define SEGFAST_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(segfast, CUDA, m)
#endif

namespace segfast::cuda {

constexpr int kThreads = 256;

#ifdef SEGFAST_CUDA_SIM
struct DeviceGuard {  // the simulation's tensors are CPU tensors: no device to set
  explicit DeviceGuard(c10::Device) {}
};
#else
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

// kernel<<<grid, block, 0, current stream>>>(args...), then the launch check; in the simulation,
// the same grid and block run on CPU fibers.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
#ifdef SEGFAST_CUDA_SIM
  sim::launch(grid, block, [&] { kernel(args...); });
#else
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // clang-format off: it splits the closing chevrons of a launch through a function pointer
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Blocks for a grid-stride loop over n elements: enough to fill the GPU, never more than needed.
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  const int64_t wanted = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::clamp<int64_t>(wanted, 1, int64_t{1} << 20));
}

// Grid-stride loop index, 64-bit so that tensors past 2^31 elements work.
#define SEGFAST_CUDA_KERNEL_LOOP(i, n)                                                   \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Sum of `value` over the block (blockDim.x a multiple of 32, at most 1024), valid in thread 0.
// The tree is fixed, so the result does not depend on timing: no atomics.
template <typename T>
__device__ T block_sum(T value) {
  __shared__ T warp_sums[32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : T(0);
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();  // warp_sums may be reused by the caller's next block_sum
  return value;
}

}  // namespace segfast::cuda

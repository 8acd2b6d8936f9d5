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

// Whether the current stream is being captured into a CUDA graph (the simulation's tests set it,
// csrc/cuda_sim/module.cpp): no host read of device memory may happen then.
inline bool stream_is_capturing() {
#ifdef SEGFAST_CUDA_SIM
  return sim::stream_is_capturing();
#else
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status));
  return status != cudaStreamCaptureStatusNone;
#endif
}

// Blocks for a grid-stride loop over n elements: enough to fill the GPU, never more than needed.
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  const int64_t wanted = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::clamp<int64_t>(wanted, 1, int64_t{1} << 20));
}

// Blocks for a grid-stride loop over n elements whose blocks have fixed costs of their own (shared
// counters to zero and flush): about as many as the GPU runs at once (2048 threads an SM), fewer
// for small n. The simulation has no SMs: 4 blocks, so that the loops still stride.
inline unsigned int resident_blocks(int64_t n, int threads = kThreads) {
#ifdef SEGFAST_CUDA_SIM
  const int64_t resident = 4;
#else
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t resident = int64_t{sms} * (2048 / threads);
#endif
  return static_cast<unsigned int>(std::min<int64_t>(blocks_for(n, threads), resident));
}

// Grid-stride loop index, 64-bit so that tensors past 2^31 elements work.
#define SEGFAST_CUDA_KERNEL_LOOP(i, n)                                                   \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Sum of `value` over the 32 lanes of a warp, in every lane. The butterfly adds the same pairs in
// every lane, so the lanes agree bit for bit, and the order is fixed: deterministic.
template <typename T>
__device__ T warp_sum(T value) {
  for (int mask = 16; mask > 0; mask /= 2) value += __shfl_xor_sync(0xffffffffu, value, mask);
  return value;
}

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

#pragma once
// What every CUDA kernel file shares: the stream, launch sizes and a fixed-order block sum.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace segfast::cuda {

constexpr int kThreads = 256;

inline cudaStream_t stream() {
  return c10::cuda::getCurrentCUDAStream();
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

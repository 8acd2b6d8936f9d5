// Per-pixel softmax statistics on CUDA: one thread per pixel walks its classes twice (max and
// argmax, then the two sums of common/softmax_stats.h; the second read hits the cache), so a
// warp's loads are coalesced over consecutive pixels of an NCHW image.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/devices.h"
#include "common/metrics.h"
#include "common/softmax_stats.h"
#include "cuda/fast_divide.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

using at::Tensor;

template <typename scalar_t>
__global__ void softmax_stats_kernel(const scalar_t* input, int64_t batch, int64_t classes, cuda::FastDivider pixels,
                                     int64_t batch_stride, int64_t class_stride, int64_t pixel_stride, int64_t* argmax,
                                     scalar_t* max_prob, scalar_t* entropy) {
  using acc_t = at::opmath_type<scalar_t>;
  SEGFAST_CUDA_KERNEL_LOOP(i, batch * pixels.divisor()) {
    const auto [n, s] = pixels.divmod(i);
    const scalar_t* x = input + n * batch_stride + s * pixel_stride;
    acc_t best;
    const int64_t arg = argmax_class<acc_t>(x, classes, class_stride, &best);
    acc_t sum = 0, weighted = 0;
    for (int64_t c = 0; c < classes; ++c) {
      const acc_t z = static_cast<acc_t>(x[c * class_stride]) - best;
      const acc_t e = exp(z);
      sum += e;
      weighted += e * entropy_term_z(z);
    }
    argmax[i] = arg;
    max_prob[i] = static_cast<scalar_t>(acc_t(1) / sum);
    entropy[i] = static_cast<scalar_t>(log(sum) - weighted / sum);
  }
}

std::tuple<Tensor, Tensor, Tensor> softmax_stats_cuda(const Tensor& input) {
  check_softmax_stats_args(input);
  const cuda::DeviceGuard guard(input.device());
  const int64_t batch = input.size(0), classes = input.size(1), pixels = input.size(2);
  Tensor argmax = at::empty({batch, pixels}, input.options().dtype(at::kLong));
  Tensor max_prob = at::empty({batch, pixels}, input.options());
  Tensor entropy = at::empty({batch, pixels}, input.options());
  const int64_t count = batch * pixels;
  if (count == 0) return {argmax, max_prob, entropy};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "softmax_stats", [&] {
    cuda::launch(softmax_stats_kernel<scalar_t>, cuda::blocks_for(count), cuda::kThreads,
                 input.const_data_ptr<scalar_t>(), batch, classes, cuda::FastDivider(pixels), input.stride(0),
                 input.stride(1), input.stride(2), argmax.mutable_data_ptr<int64_t>(),
                 max_prob.mutable_data_ptr<scalar_t>(), entropy.mutable_data_ptr<scalar_t>());
  });
  return {argmax, max_prob, entropy};
}

}  // namespace

SEGFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("softmax_stats", &softmax_stats_cuda);
}

}  // namespace segfast

// Confusion matrix on CUDA: per-pixel argmax (when given logits) fused with the histogram of
// (target, prediction) pairs. Blocks count into a shared-memory matrix when it fits, then add it
// to the result; integer atomics, so the counts are exact. A bad class index is flagged and
// raised as IndexError after the kernel (one device-to-host read), as in cross_entropy.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/class_index.h"
#include "common/metrics.h"
#include "cuda/bad_index.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

using at::Tensor;

constexpr int64_t kSharedCells = 4096;  // 32 KiB of counters: up to 64 classes in shared memory

struct Pixels {
  int64_t batch, pixels, target_stride0, target_stride1, num_classes, ignore_index;
};

// Counts pixel i into hist; returns false (and counts nothing) for a bad class index.
template <typename target_t, typename Predict>
__device__ bool count_pixel(int64_t i, const target_t* target, const Pixels& p, Predict predict,
                            unsigned long long* hist) {
  const int64_t n = i / p.pixels, s = i % p.pixels;
  const int64_t cls = static_cast<int64_t>(target[n * p.target_stride0 + s * p.target_stride1]);
  if (cls == p.ignore_index) return true;
  const int64_t pred = predict(n, s);
  if (cls < 0 || cls >= p.num_classes || pred < 0 || pred >= p.num_classes) return false;
  atomicAdd(hist + cls * p.num_classes + pred, 1ull);
  return true;
}

template <typename target_t, typename Predict>
__global__ void confusion_matrix_kernel(const target_t* target, Pixels p, Predict predict, unsigned long long* matrix,
                                        unsigned long long* bad_pixel) {
  __shared__ unsigned long long shared[kSharedCells];
  const int64_t cells = p.num_classes * p.num_classes;
  const bool use_shared = cells <= kSharedCells;
  unsigned long long* hist = use_shared ? shared : matrix;
  if (use_shared) {
    for (int64_t c = threadIdx.x; c < cells; c += blockDim.x) shared[c] = 0;
    __syncthreads();
  }
  SEGFAST_CUDA_KERNEL_LOOP(i, p.batch * p.pixels) {
    if (!count_pixel(i, target, p, predict, hist)) cuda::flag_bad_pixel(bad_pixel, i);
  }
  if (use_shared) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < cells; c += blockDim.x) {
      if (shared[c] != 0) atomicAdd(matrix + c, shared[c]);
    }
  }
}

template <typename scalar_t>
struct ArgmaxOfLogits {
  const scalar_t* x;
  int64_t stride0, stride1, stride2, classes;
  __device__ int64_t operator()(int64_t n, int64_t s) const {
    return argmax_class<at::opmath_type<scalar_t>>(x + n * stride0 + s * stride2, classes, stride1);
  }
};

template <typename index_t>
struct GivenClasses {
  const index_t* p;
  int64_t stride0, stride1;
  __device__ int64_t operator()(int64_t n, int64_t s) const {
    return static_cast<int64_t>(p[n * stride0 + s * stride1]);
  }
};

Tensor confusion_matrix_cuda(const Tensor& input, const Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const cuda::DeviceGuard guard(input.device());
  const bool logits = at::isFloatingType(input.scalar_type());
  const auto size = check_confusion_args(input, target, num_classes);
  const int64_t batch = size.first, pixels = size.second;
  TORCH_CHECK_VALUE(target.device() == input.device(), "confusion_matrix: target is on ", target.device(),
                    " but input is on ", input.device());
  Tensor matrix = at::zeros({num_classes, num_classes}, input.options().dtype(at::kLong));
  cuda::BadPixel bad_pixel(input);
  const int64_t count = batch * pixels;
  if (count == 0) return matrix;
  const Pixels p{batch, pixels, target.stride(0), target.stride(1), num_classes, ignore_index};
  auto* m = reinterpret_cast<unsigned long long*>(matrix.mutable_data_ptr<int64_t>());
  auto* bad = bad_pixel.flag();
  dispatch_class_index(target.scalar_type(), "confusion_matrix: target", [&](auto target_type) {
    using target_t = decltype(target_type);
    const target_t* t = target.const_data_ptr<target_t>();
    auto launch = [&](auto predict) {
      cuda::launch(confusion_matrix_kernel<target_t, decltype(predict)>, cuda::blocks_for(count), cuda::kThreads, t, p,
                   predict, m, bad);
    };
    if (logits) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "confusion_matrix", [&] {
        launch(ArgmaxOfLogits<scalar_t>{input.const_data_ptr<scalar_t>(), input.stride(0), input.stride(1),
                                        input.stride(2), num_classes});
      });
    } else {
      dispatch_class_index(input.scalar_type(), "confusion_matrix: predicted classes", [&](auto index) {
        using index_t = decltype(index);
        launch(GivenClasses<index_t>{input.const_data_ptr<index_t>(), input.stride(0), input.stride(1)});
      });
    }
  });
  // the flag holds the first pixel whose target or prediction is bad: the host reads which, for CPU's message
  bad_pixel.raise_if_any(target, pixels, num_classes, ignore_index, "confusion_matrix");
  const int64_t first_bad = bad_pixel.first();
  if (first_bad != -1) {
    const int64_t n = first_bad / pixels, s = first_bad % pixels;
    const int64_t predicted = logits ? input[n].select(1, s).argmax().item<int64_t>() : input[n][s].item<int64_t>();
    raise_bad_class_index("confusion_matrix", "predicted class", predicted, n, s, num_classes, {});
  }
  return matrix;
}

}  // namespace

SEGFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("confusion_matrix", &confusion_matrix_cuda);
}

}  // namespace segfast

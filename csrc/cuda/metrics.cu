// Confusion matrix on CUDA: per-pixel argmax (when given logits) fused with the histogram of
// (target, prediction) pairs; integer atomics, so the counts are exact. A grid of about as many
// blocks as the GPU holds at once walks the pixels (each block zeroes and flushes its shared
// counters once, not once per 256 pixels); in a block, each warp counts into its own copy of the
// matrix where the copies fit in shared memory (few classes: 8 warps no longer contend for the
// same few counters), else the block shares one copy, else (more than 64 classes) the counts go
// to the result directly. A bad class index is flagged and raised as IndexError after the kernel
// (one device-to-host read), as in cross_entropy; inside a CUDA graph capture, where that read
// cannot happen, a flagged launch fills the matrix with -1 instead (cuda/bad_index.cuh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "common/class_index.h"
#include "common/metrics.h"
#include "cuda/bad_index.cuh"
#include "cuda/fast_divide.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

using at::Tensor;

constexpr int64_t kSharedCells = 4096;  // 32 KiB of counters: up to 64 classes in shared memory

struct Pixels {
  int64_t batch, pixels, target_stride0, target_stride1, num_classes, ignore_index;
  cuda::FastDivider by_pixels;
};

// Counts pixel i into hist; returns false (and counts nothing) for a bad class index.
template <typename target_t, typename Predict>
__device__ bool count_pixel(int64_t i, const target_t* target, const Pixels& p, Predict predict,
                            unsigned long long* hist) {
  const auto [n, s] = p.by_pixels.divmod(i);
  const int64_t cls = static_cast<int64_t>(target[n * p.target_stride0 + s * p.target_stride1]);
  if (cls == p.ignore_index) return true;
  const int64_t pred = predict(n, s);
  if (cls < 0 || cls >= p.num_classes || pred < 0 || pred >= p.num_classes) return false;
  atomicAdd(hist + cls * p.num_classes + pred, 1ull);
  return true;
}

// Copies of the matrix in shared memory: one per warp when they fit, 0 when not even one does.
__device__ inline int64_t shared_copies(int64_t cells) {
  return std::min<int64_t>(cuda::kThreads / 32, kSharedCells / cells);
}

template <typename target_t, typename Predict>
__global__ void confusion_matrix_kernel(const target_t* target, Pixels p, Predict predict, unsigned long long* matrix,
                                        unsigned long long* bad_pixel) {
  __shared__ unsigned long long shared[kSharedCells];
  const int64_t cells = p.num_classes * p.num_classes, copies = shared_copies(cells);
  unsigned long long* hist = copies > 0 ? shared + threadIdx.x / 32 % copies * cells : matrix;
  if (copies > 0) {
    for (int64_t c = threadIdx.x; c < copies * cells; c += blockDim.x) shared[c] = 0;
    __syncthreads();
  }
  SEGFAST_CUDA_KERNEL_LOOP(i, p.batch * p.pixels) {
    if (!count_pixel(i, target, p, predict, hist)) cuda::flag_bad_pixel(bad_pixel, i);
  }
  if (copies > 0) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < cells; c += blockDim.x) {
      unsigned long long total = 0;
      for (int64_t k = 0; k < copies; ++k) total += shared[k * cells + c];
      if (total != 0) atomicAdd(matrix + c, total);
    }
  }
}

// Inside a capture: a flagged launch marks the whole matrix -1 (no count is -1).
__global__ void mark_bad_matrix_kernel(int64_t* matrix, int64_t cells, const unsigned long long* bad_pixel) {
  if (*bad_pixel == ~0ull) return;
  SEGFAST_CUDA_KERNEL_LOOP(c, cells) matrix[c] = -1;
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
  const Pixels p{batch,       pixels,       target.stride(0),         target.stride(1),
                 num_classes, ignore_index, cuda::FastDivider(pixels)};
  auto* m = reinterpret_cast<unsigned long long*>(matrix.mutable_data_ptr<int64_t>());
  auto* bad = bad_pixel.flag();
  dispatch_class_index(target.scalar_type(), "confusion_matrix: target", [&](auto target_type) {
    using target_t = decltype(target_type);
    const target_t* t = target.const_data_ptr<target_t>();
    auto launch = [&](auto predict) {
      cuda::launch(confusion_matrix_kernel<target_t, decltype(predict)>, cuda::resident_blocks(count), cuda::kThreads,
                   t, p, predict, m, bad);
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
  if (!cuda::BadPixel::readable()) {
    cuda::launch(mark_bad_matrix_kernel, cuda::blocks_for(matrix.numel()), cuda::kThreads,
                 matrix.mutable_data_ptr<int64_t>(), matrix.numel(), bad);
    return matrix;
  }
  // the flag holds the first pixel whose target or prediction is bad: the host reads which, for CPU's message
  const int64_t first_bad = bad_pixel.raise_if_any(target, pixels, num_classes, ignore_index, "confusion_matrix");
  if (first_bad != -1) {  // its target is good: the prediction is bad
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

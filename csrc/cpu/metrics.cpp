// Confusion matrix on CPU: per-pixel argmax over the classes (when given logits) fused with the
// histogram of (target, prediction) pairs. Each block of pixels counts into its own matrix, and
// the blocks are summed; integer counts, so the result is exact whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "common/class_index.h"
#include "common/metrics.h"

namespace segfast {
namespace {

using at::Tensor;

Tensor confusion_matrix_cpu(const Tensor& input, const Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const bool logits = at::isFloatingType(input.scalar_type());
  const auto size = check_confusion_args(input, target, num_classes);
  const int64_t batch = size.first, pixels = size.second;
  const int64_t count = batch * pixels, cells = num_classes * num_classes;
  const int64_t blocks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, count / 4096));
  std::vector<int64_t> partial(blocks * cells, 0);
  auto count_pixels = [&](auto predict) {
    dispatch_class_index(target.scalar_type(), "confusion_matrix: target", [&](auto target_type) {
      using target_t = decltype(target_type);
      const target_t* t = target.const_data_ptr<target_t>();
      const int64_t ts0 = target.stride(0), ts1 = target.stride(1);
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          int64_t* hist = partial.data() + b * cells;
          for (int64_t i = b * count / blocks; i < (b + 1) * count / blocks; ++i) {
            const int64_t n = i / pixels, s = i % pixels;
            const int64_t cls = static_cast<int64_t>(t[n * ts0 + s * ts1]);
            if (cls == ignore_index) continue;
            TORCH_CHECK_INDEX(cls >= 0 && cls < num_classes, "confusion_matrix: target class ", cls, " at (n=", n,
                              ", pixel=", s, ") is outside [0, ", num_classes, ") and is not ignore_index (",
                              ignore_index, ")");
            const int64_t pred = predict(n, s);
            TORCH_CHECK_INDEX(pred >= 0 && pred < num_classes, "confusion_matrix: predicted class ", pred,
                              " at (n=", n, ", pixel=", s, ") is outside [0, ", num_classes, ")");
            ++hist[cls * num_classes + pred];
          }
        }
      });
    });
  };
  if (logits) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "confusion_matrix", [&] {
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      const int64_t s0 = input.stride(0), s1 = input.stride(1), s2 = input.stride(2);
      count_pixels([&](int64_t n, int64_t s) {
        return argmax_class<at::opmath_type<scalar_t>>(x + n * s0 + s * s2, num_classes, s1);
      });
    });
  } else {
    dispatch_class_index(input.scalar_type(), "confusion_matrix: predicted classes", [&](auto index) {
      using index_t = decltype(index);
      const index_t* p = input.const_data_ptr<index_t>();
      const int64_t s0 = input.stride(0), s1 = input.stride(1);
      count_pixels([&](int64_t n, int64_t s) { return static_cast<int64_t>(p[n * s0 + s * s1]); });
    });
  }
  Tensor matrix = at::zeros({num_classes, num_classes}, input.options().dtype(at::kLong));
  int64_t* m = matrix.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t c = 0; c < cells; ++c) m[c] += partial[b * cells + c];
  }
  return matrix;
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) { m.impl("confusion_matrix", &confusion_matrix_cpu); }

}  // namespace segfast

#pragma once
// What the confusion-matrix kernels share on every backend.
#include <cstdint>
#include <utility>

#include <ATen/core/Tensor.h>

#include "common/macros.h"

namespace segfast {

// The class torch.argmax picks along a class stride: the first maximum, or the first NaN; its value
// goes to *best when asked for (softmax_stats normalises by it).
template <typename acc_t, typename scalar_t>
SEGFAST_HOST_DEVICE int64_t argmax_class(const scalar_t* x, int64_t classes, int64_t class_stride,
                                         acc_t* best_value = nullptr) {
  acc_t best = static_cast<acc_t>(x[0]);
  int64_t arg = 0;
  for (int64_t c = 1; c < classes && best == best; ++c) {
    const acc_t v = static_cast<acc_t>(x[c * class_stride]);
    if (v > best || v != v) {
      best = v;
      arg = c;
    }
  }
  if (best_value != nullptr) *best_value = best;
  return arg;
}

// Checks (N, C, S) logits or (N, S) predicted classes against (N, S) targets; returns (N, S).
inline std::pair<int64_t, int64_t> check_confusion_args(const at::Tensor& input, const at::Tensor& target,
                                                        int64_t num_classes) {
  const bool logits = at::isFloatingType(input.scalar_type());
  TORCH_CHECK_VALUE(num_classes > 0, "confusion_matrix: num_classes must be positive, got ", num_classes);
  TORCH_CHECK_VALUE(logits ? input.dim() == 3 && input.size(1) == num_classes : input.dim() == 2,
                    "confusion_matrix: input must be (N, ", num_classes, ", S) logits or (N, S) classes, got ",
                    input.sizes(), " ", input.scalar_type());
  const int64_t batch = input.size(0), pixels = logits ? input.size(2) : input.size(1);
  TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == batch && target.size(1) == pixels,
                    "confusion_matrix: target must be (N, S) = (", batch, ", ", pixels, "), got ", target.sizes());
  return {batch, pixels};
}

}  // namespace segfast

#pragma once
// What the confusion-matrix kernels share on every backend.
#include <cstdint>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "common/macros.h"

namespace segfast {

// The class torch.argmax picks along a class stride: the first maximum, or the first NaN.
template <typename acc_t, typename scalar_t>
SEGFAST_HOST_DEVICE int64_t argmax_class(const scalar_t* x, int64_t classes, int64_t class_stride) {
  acc_t best = static_cast<acc_t>(x[0]);
  int64_t arg = 0;
  for (int64_t c = 1; c < classes && best == best; ++c) {
    const acc_t v = static_cast<acc_t>(x[c * class_stride]);
    if (v > best || v != v) {
      best = v;
      arg = c;
    }
  }
  return arg;
}

// Calls f(index_t{}) for an integer class tensor's dtype (host side).
template <typename F>
void dispatch_index(c10::ScalarType type, const char* what, F&& f) {
  switch (type) {
    case c10::kLong: return f(int64_t{});
    case c10::kInt: return f(int32_t{});
    case c10::kByte: return f(uint8_t{});
    default: TORCH_CHECK_VALUE(false, "confusion_matrix: ", what, " must be int64, int32 or uint8, got ", type);
  }
}

}  // namespace segfast

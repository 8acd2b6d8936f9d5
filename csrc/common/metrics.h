#pragma once
// What the confusion-matrix kernels share on every backend.
#include <cstdint>


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

}  // namespace segfast

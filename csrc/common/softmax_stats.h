#pragma once
// What the softmax_stats kernels share on every backend: the per-pixel statistics from two sums over
// the classes, z_c = x_c - max (z <= 0):
//   s = sum_c exp(z_c),  w = sum_c exp(z_c) z_c
//   max probability = 1 / s,  entropy = -sum_c p_c log p_c = log s - w / s.
#include <ATen/core/Tensor.h>

#include "common/macros.h"

namespace segfast {

// z for the entropy's sum: classes with z below -88 (p < 7e-39, so |p log p| < 7e-37) add 0, so a
// -inf logit (p = 0) adds p log p = 0, not 0 * -inf, and a certain pixel's entropy is exactly 0
// (the CPU's exp floors at float's smallest normal). A NaN z stays in s.
template <typename acc_t>
SEGFAST_HOST_DEVICE acc_t entropy_term_z(acc_t z) {
  return z > acc_t(-88) ? z : acc_t(0);
}

// Checks (N, C, S) logits; returns (N, S).
inline void check_softmax_stats_args(const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() == 3 && input.size(1) > 0,
                    "softmax_stats: input must be (N, C, S) logits with C > 0, got ", input.sizes());
}

}  // namespace segfast

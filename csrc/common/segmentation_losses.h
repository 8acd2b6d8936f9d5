#pragma once
// Per-pixel math of the Dice and focal losses, shared by the CPU and CUDA kernels. A pixel's
// logits are x[c * class_stride], c < classes; the softmax is recomputed from them
// (common/softmax.h on CUDA, cpu/softmax_tile.h on CPU).
#include <cmath>
#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>

#include "common/macros.h"

namespace segfast {

// Focal loss of a pixel whose target class has probability pt = exp(log_pt):
// loss = -alpha (1 - pt)^gamma log pt, and A with d loss / d z_k = A (delta_kt - p_k).
template <typename acc_t>
struct FocalTerms {
  acc_t loss, a;
};

constexpr int kMaxSmallIntegerGamma = 8;

// gamma as an int if it is one of the small integers users pick (0 ... kMaxSmallIntegerGamma; 2 by
// default), whose powers are taken by repeated multiplication (pow is several times slower on the
// CPU); else -1.
template <typename acc_t>
SEGFAST_HOST_DEVICE int small_integer_gamma(acc_t gamma) {
  const bool small = gamma >= acc_t(0) && gamma <= acc_t(kMaxSmallIntegerGamma) &&
                     static_cast<acc_t>(static_cast<int>(gamma)) == gamma;
  return small ? static_cast<int>(gamma) : -1;
}

// q^gamma: repeated multiplication for a small integer gamma, pow otherwise; q^0 = 1.
template <typename acc_t>
SEGFAST_HOST_DEVICE acc_t focal_power(acc_t q, acc_t gamma) {
  const int times = small_integer_gamma(gamma);
  if (times >= 0) {
    acc_t r = 1;
    for (int i = 0; i < times; ++i) r *= q;
    return r;
  }
  return pow(q, gamma);
}

// The terms from pt = exp(log_pt) and the powers q^gamma, q^(gamma - 1) of q = 1 - pt (the CPU
// kernels compute exp and the powers a tile at a time, vectorised).
template <typename acc_t>
SEGFAST_HOST_DEVICE FocalTerms<acc_t> focal_terms_of_powers(acc_t log_pt, acc_t pt, acc_t q_gamma, acc_t q_gamma_less_1,
                                                            acc_t alpha, acc_t gamma) {
  const acc_t q = acc_t(1) - pt;
  // gamma (1 - pt)^(gamma - 1) pt log pt: 0 where 1 - pt = 0 (its limit for gamma > 0)
  const acc_t slope = gamma == acc_t(0) || q <= acc_t(0) ? acc_t(0) : gamma * q_gamma_less_1 * pt * log_pt;
  return {-alpha * q_gamma * log_pt, -alpha * (q_gamma - slope)};
}

template <typename acc_t>
SEGFAST_HOST_DEVICE FocalTerms<acc_t> focal_terms(acc_t log_pt, acc_t alpha, acc_t gamma) {
  const acc_t pt = exp(log_pt), q = acc_t(1) - pt;
  const acc_t q_gamma_less_1 = gamma == acc_t(0) || q <= acc_t(0) ? acc_t(0) : focal_power(q, gamma - acc_t(1));
  return focal_terms_of_powers(log_pt, pt, focal_power(q, gamma), q_gamma_less_1, alpha, gamma);
}

inline void check_loss_inputs(const char* op, const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK_VALUE(input.dim() == 3, op, ": expected (N, C, S) logits, got ", input.sizes());
  TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == input.size(0) && target.size(1) == input.size(2), op,
                    ": target must be (N, S) = (", input.size(0), ", ", input.size(2), "), got ", target.sizes());
  TORCH_CHECK_VALUE(input.size(1) <= std::numeric_limits<int32_t>::max(), op,
                    ": at most 2^31 - 1 classes are supported, got ", input.size(1));
}

}  // namespace segfast

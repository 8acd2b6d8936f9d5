#pragma once
// q^gamma and q^(gamma - 1) over a tile's values, for the focal losses (softmax and sigmoid):
// vectorised repeated multiplication for the small integer gammas users pick (2 by default), one
// factor at a time over the tile; focal_power (pow) per value otherwise. Always inlined: called
// from multiversioned loops, a plain function would stay baseline x86-64 code (SSE2, 4 lanes).
#include <cstdint>

#include "common/macros.h"
#include "common/segmentation_losses.h"

namespace segfast::cpu {

template <typename acc_t>
SEGFAST_HOST_DEVICE void focal_powers(const acc_t* q, int64_t count, acc_t gamma, acc_t* q_gamma,
                                      acc_t* q_gamma_less_1) {
  const int times = small_integer_gamma(gamma);
  if (times >= 0) {
    for (int64_t j = 0; j < count; ++j) q_gamma[j] = q_gamma_less_1[j] = acc_t(1);
    for (int i = 0; i < times; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) {
        q_gamma_less_1[j] = q_gamma[j];
        q_gamma[j] *= q[j];
      }
    }
    return;
  }
  for (int64_t j = 0; j < count; ++j) {
    q_gamma[j] = focal_power(q[j], gamma);
    q_gamma_less_1[j] = focal_power(q[j], gamma - acc_t(1));
  }
}

}  // namespace segfast::cpu

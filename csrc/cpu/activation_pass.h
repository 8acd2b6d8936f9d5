#pragma once
// Activation passes shared by the fused ops whose core is a vendor GEMM or convolution.
#include <ATen/core/Tensor.h>

#include <vector>

#include "common/activation.h"

namespace segfast::cpu {

// out = act(z) elementwise; z and out have the same layout, out may be z.
void apply_activation(const at::Tensor& z, const at::Tensor& out, Activation act, double negative_slope);

// For contiguous (rows, cols) matrices: grad_z = grad * act'(saved), and returns the column sums
// of grad_z (the bias gradient), added in a fixed order whatever the thread count.
at::Tensor activation_backward_rows(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& grad_z,
                                    Activation act, double negative_slope);

// out[i] = sum over blocks b of partial[b * width + i], added block by block: a fixed order, so
// per-block partial sums reduce to the same bits whatever the thread count.
template <typename acc_t, typename out_t>
void sum_block_partials(const std::vector<acc_t>& partial, int64_t width, out_t* out) {
  const int64_t blocks = width == 0 ? 0 : static_cast<int64_t>(partial.size()) / width;
  for (int64_t i = 0; i < width; ++i) {
    acc_t total = 0;
    for (int64_t b = 0; b < blocks; ++b) total += partial[b * width + i];
    out[i] = static_cast<out_t>(total);
  }
}

}  // namespace segfast::cpu

#pragma once
// Activation passes shared by the fused ops whose core is a vendor GEMM or convolution.
#include <ATen/core/Tensor.h>

#include "common/activation.h"
#include "cpu/reduce.h"

namespace segfast::cpu {

// A pass that changes layout (NCHW <-> channels_last) goes through an L1 scratch of kSubTile pixels
// x channels, each side touched in contiguous runs; the odd stride keeps a scratch column off one
// cache set.
constexpr int64_t kSubTile = 64;
constexpr int64_t kScratchStride = kSubTile + 1;

// out = act(z) elementwise; z and out have the same layout, out may be z.
void apply_activation(const at::Tensor& z, const at::Tensor& out, Activation act, double negative_slope);

// out = act(z) for a dense channels_last z (N, C, H, W) and a contiguous (NCHW) out of its shape:
// the activation and the change of layout in one pass.
void apply_activation_to_nchw(const at::Tensor& z, const at::Tensor& out, Activation act, double negative_slope);

// For contiguous (rows, cols) matrices: grad_z = grad * act'(saved), and returns the column sums
// of grad_z (the bias gradient), added in a fixed order whatever the thread count.
at::Tensor activation_backward_rows(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& grad_z,
                                    Activation act, double negative_slope);

}  // namespace segfast::cpu

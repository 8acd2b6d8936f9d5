#pragma once
// Activation passes shared by the fused ops whose core is a vendor GEMM or convolution.
#include <ATen/core/Tensor.h>

#include "common/activation.h"
#include "cpu/reduce.h"

namespace segfast::cpu {

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

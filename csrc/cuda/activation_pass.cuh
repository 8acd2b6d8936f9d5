#pragma once
// The passes around a vendor core (cuDNN convolution, cuBLAS GEMM) shared by conv2d_act and
// linear_act on CUDA. Tensors are dense; element i belongs to channel (i / inner) % channels, so
// inner = H*W for NCHW, 1 for channels_last and for (rows, features) matrices.
#include <ATen/core/Tensor.h>

#include <optional>

#include "common/activation.h"

namespace segfast::cuda {

// out = act(z + bias[channel]) in one pass. When out is not z, z keeps the pre-activation (+ bias);
// when it is, the activation is applied in place. bias may be absent.
void bias_activation(const at::Tensor& z, const std::optional<at::Tensor>& bias, const at::Tensor& out,
                     int64_t channels, int64_t inner, Activation act, double negative_slope);

// grad_z = grad * act'(saved) in one pass, also returning the per-channel sum of grad_z (the bias
// gradient, in grad's dtype) through per-block partials added in a fixed order: deterministic.
// grad, saved and grad_z have the same sizes and strides.
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& grad_z,
                               int64_t channels, int64_t inner, Activation act, double negative_slope);

}  // namespace segfast::cuda

#pragma once
// Argument checks and shape helpers of the fused weight ops (conv2d_act, linear_act), shared by
// the CPU and CUDA kernels so that both refuse the same input with the same message.
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace segfast {

inline void check_conv_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(input.dim() == 4, "conv2d_act kernel: expected 4-D input, got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(weight.dim() == 4, "conv2d_act kernel: expected 4-D weight, got ", weight.dim(), "-D");
  TORCH_CHECK_VALUE(input.scalar_type() == weight.scalar_type(), "conv2d_act: input dtype ", input.scalar_type(),
                    " and weight dtype ", weight.scalar_type(), " differ");
  if (bias && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "conv2d_act: bias must have shape (",
                      weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == input.scalar_type(), "conv2d_act: bias dtype ", bias->scalar_type(),
                      " differs from input dtype ", input.scalar_type());
  }
}

inline void check_linear_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(input.dim() >= 1, "linear_act: input must have at least one dimension");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == input.size(-1), "linear_act: weight must be (out, ",
                    input.size(-1), "), got ", weight.sizes());
  TORCH_CHECK_VALUE(input.scalar_type() == weight.scalar_type(), "linear_act: input dtype ", input.scalar_type(),
                    " and weight dtype ", weight.scalar_type(), " differ");
  if (bias && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                          bias->scalar_type() == input.scalar_type(),
                      "linear_act: bias must be (", weight.size(0), ",) of the input's dtype, got ", bias->sizes(),
                      " ", bias->scalar_type());
  }
}

// (*, features) as a (rows, features) matrix; rows stated explicitly, as features may be 0.
inline at::Tensor as_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.reshape({rows, t.size(-1)});
}

inline std::vector<int64_t> linear_output_size(const at::Tensor& input, const at::Tensor& weight) {
  std::vector<int64_t> size(input.sizes().begin(), input.sizes().end());
  size.back() = weight.size(0);
  return size;
}

}  // namespace segfast

#pragma once
// conv2d_act's host-side pieces shared by the CPU and CUDA kernels: the argument checks (so that
// both refuse the same input with the same message) and the call of the vendor convolution.
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>

#include <optional>

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

// The vendor convolution (oneDNN on CPU, cuDNN on CUDA) with input, weight and output in `format`.
inline at::Tensor vendor_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, at::MemoryFormat format) {
  const int64_t no_output_padding[2] = {0, 0};
  return at::convolution(input.contiguous(format), weight.contiguous(format), bias, stride, padding, dilation, false,
                         no_output_padding, groups)
      .contiguous(format);
}

}  // namespace segfast

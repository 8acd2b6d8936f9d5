#pragma once
// conv2d_act's host-side pieces shared by the CPU and CUDA kernels: the argument checks (so that
// both refuse the same input with the same message) and the call of the vendor convolution.
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>

#include <optional>
#include <tuple>

#include "common/checks.h"

namespace segfast {

// Every argument as F.conv2d checks it, with the messages of the Python face (which leaves these
// checks to the kernels): the forward and backward of both backends call it.
inline void check_conv_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            double negative_slope) {
  constexpr const char* op = "conv2d_act";
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 3-D or 4-D, got ", input.dim(), "-D with shape ",
                    input.sizes());
  check_dims(op, "weight", weight, 4);
  if (bias && bias->defined()) check_dims(op, "bias", *bias, 1);
  check_float_dtype(op, "input", input);
  check_same_dtype_and_device(op, named("input", input), {named("weight", weight), named("bias", bias)});
  check_finite(op, "negative_slope", negative_slope);
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": stride, padding and dilation must have 2 values each");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK_VALUE(stride[d] >= 1, op, ": stride must be >= 1, got ", stride);
    TORCH_CHECK_VALUE(dilation[d] >= 1, op, ": dilation must be >= 1, got ", dilation);
    TORCH_CHECK_VALUE(padding[d] >= 0, op, ": padding must be >= 0, got ", padding);
  }
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be a positive int, got ", groups);
  const int64_t in_channels = input.size(1), out_channels = weight.size(0);
  TORCH_CHECK_VALUE(in_channels == weight.size(1) * groups, op, ": input has ", in_channels, " channels but weight ",
                    weight.sizes(), " with groups=", groups, " expects ", weight.size(1) * groups);
  TORCH_CHECK_VALUE(out_channels % groups == 0, op, ": weight's ", out_channels,
                    " output channels are not divisible by groups=", groups);
  if (bias && bias->defined()) {
    TORCH_CHECK_VALUE(bias->size(0) == out_channels, op, ": bias must have shape (", out_channels, ",), got ",
                      bias->sizes());
  }
  TORCH_CHECK_VALUE(out_channels > 0 && weight.size(2) > 0 && weight.size(3) > 0, op,
                    ": weight must have output channels and a non-empty kernel, got ", weight.sizes());
  TORCH_CHECK_VALUE(in_channels > 0 && input.size(2) > 0 && input.size(3) > 0, op,
                    ": input must have non-empty channel and spatial dims, got ", input.sizes());
  for (int d = 0; d < 2; ++d) {
    const int64_t padded = input.size(2 + d) + 2 * padding[d];
    const int64_t span = dilation[d] * (weight.size(2 + d) - 1) + 1;
    TORCH_CHECK_VALUE(span <= padded, op, ": the dilated kernel ", d == 0 ? "height" : "width", " (", span,
                      ") exceeds the padded input ", d == 0 ? "height" : "width", " (", padded, ")");
  }
}

// conv2d_act_backward's checks on both backends: the forward's, and every tensor on one device.
inline void check_conv_backward_args(const at::Tensor& grad_output, const at::Tensor& saved, const at::Tensor& input,
                                     const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups, double negative_slope) {
  check_conv_args(input, weight, std::nullopt, stride, padding, dilation, groups, negative_slope);
  check_same_device("conv2d_act_backward", {named("input", input), named("weight", weight),
                                            named("grad_output", grad_output), named("saved", saved)});
}

// (grad_input, grad_weight, grad_bias), what conv2d_act_backward returns.
using ConvActGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

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

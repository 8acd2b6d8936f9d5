// conv2d + bias + activation on CUDA.
//
// General path (every argument the CPU op takes): cuDNN's convolution through ATen, then one
// kernel that adds the bias and applies the activation in place. Backward: one kernel for
// act' x grad_output with the bias-gradient partial sums, then ATen's convolution backward.
// Custom path (conv2d_act_igemm.cu): our implicit-GEMM tensor-core convolution with bias +
// activation in its epilogue, for the shapes igemm::chosen() picks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/conv2d_act.h"
#include "common/devices.h"
#include "common/grads.h"
#include "common/layout.h"
#include "cuda/activation_pass.cuh"
#include "cuda/conv2d_act_igemm.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

using at::IntArrayRef;
using at::MemoryFormat;
using at::Tensor;

// Elements of one channel that lie next to each other (see activation_pass.cuh).
int64_t channel_inner(const Tensor& t, MemoryFormat format) {
  return format == MemoryFormat::ChannelsLast ? 1 : t.size(2) * t.size(3);
}

std::tuple<Tensor, Tensor> conv2d_act_cuda(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                           IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                                           int64_t groups, c10::string_view activation, double negative_slope) {
  check_conv_args(input, weight, bias, stride, padding, dilation, groups, negative_slope);
  const cuda::DeviceGuard guard(input.device());
  const Activation act = parse_activation(activation);
  const MemoryFormat format = conv_output_format(input, weight);
  const bool keep_preact = act != Activation::None && !derivative_from_output(act, negative_slope);
  const Tensor empty = at::empty({0}, input.options());
  if (cuda::igemm::chosen(input, weight, stride, padding, dilation, groups, format)) {
    auto [out, preact] = cuda::igemm::forward(input, weight, bias, padding, act, negative_slope, keep_preact);
    return {out, keep_preact ? preact : empty};
  }
  // the bias joins the activation pass
  Tensor z = vendor_conv2d(input, weight, std::nullopt, stride, padding, dilation, groups, format);
  if (act == Activation::None && !(bias && bias->defined())) return {z, empty};
  Tensor out = keep_preact ? at::empty_like(z) : z;
  cuda::bias_activation(z, bias, out, z.size(1), channel_inner(z, format), act, negative_slope);
  return {out, keep_preact ? z : empty};
}

ConvActGrads conv2d_act_backward_cuda(const Tensor& grad_output, const Tensor& saved, const Tensor& input,
                                      const Tensor& weight, IntArrayRef stride, IntArrayRef padding,
                                      IntArrayRef dilation, int64_t groups, c10::string_view activation,
                                      double negative_slope, std::array<bool, 3> output_mask) {
  const cuda::DeviceGuard guard(input.device());
  check_conv_backward_args(grad_output, saved, input, weight, stride, padding, dilation, groups, negative_slope);
  const Activation act = parse_activation(activation);
  const MemoryFormat format = conv_output_format(input, weight);
  const int64_t no_output_padding[2] = {0, 0};
  const int64_t out_channels = weight.size(0);
  const Tensor g = grad_output.contiguous(format);
  Tensor grad_z = g, grad_bias;
  if (act != Activation::None) {
    const Tensor s = saved.contiguous(format);
    TORCH_CHECK_VALUE(s.sizes() == g.sizes(), "conv2d_act_backward: saved ", s.sizes(), " and grad_output ", g.sizes(),
                      " differ");
    grad_z = at::empty_like(g);
    grad_bias = cuda::activation_backward(g, s, grad_z, out_channels, channel_inner(g, format), act, negative_slope);
  }
  // with no activation there is nothing to fuse: ATen reduces the bias gradient itself
  const int64_t bias_size[1] = {out_channels};
  const bool aten_bias = act == Activation::None && output_mask[2];
  auto [gi, gw, gb] = at::convolution_backward(
      grad_z, input.contiguous(format), weight.contiguous(format),
      aten_bias ? at::OptionalIntArrayRef(bias_size) : at::OptionalIntArrayRef(), stride, padding, dilation, false,
      no_output_padding, groups, {output_mask[0], output_mask[1], aten_bias});
  return masked_grads(
      output_mask, input, weight, [&] { return gi; }, [&] { return gw; }, [&] { return aten_bias ? gb : grad_bias; });
}

}  // namespace

SEGFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("conv2d_act", &conv2d_act_cuda);
  m.impl("conv2d_act_backward", &conv2d_act_backward_cuda);
}

}  // namespace segfast

// linear + bias + activation on CPU. The core is ATen's GEMM with the bias added in it (addmm, as
// F.linear); ours is the pass around it: the activation in place in forward, and in backward
// act' x grad_output with the bias-gradient column sums in one pass.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/arguments.h"
#include "cpu/activation_pass.h"

namespace segfast {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> linear_act_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                          c10::string_view activation, double negative_slope) {
  check_linear_args(input, weight, bias);
  const Activation act = parse_activation(activation);
  const Tensor rows = as_rows(input);
  Tensor z = bias && bias->defined() ? at::addmm(*bias, rows, weight.t()) : at::mm(rows, weight.t());
  z = z.contiguous();
  const Tensor empty = at::empty({0}, input.options());
  const auto size = linear_output_size(input, weight);
  if (act == Activation::None) return {z.view(size), empty};
  const bool keep_preact = !derivative_from_output(act, negative_slope);
  Tensor out = keep_preact ? at::empty_like(z) : z;
  cpu::apply_activation(z, out, act, negative_slope);
  return {out.view(size), keep_preact ? z.view(size) : empty};
}

std::tuple<Tensor, Tensor, Tensor> linear_act_backward_cpu(const Tensor& grad_output, const Tensor& saved,
                                                           const Tensor& input, const Tensor& weight,
                                                           c10::string_view activation, double negative_slope,
                                                           std::array<bool, 3> output_mask) {
  check_linear_args(input, weight, std::nullopt);
  const Activation act = parse_activation(activation);
  const int64_t out_features = weight.size(0);
  const Tensor grad = as_rows(grad_output).contiguous();
  Tensor grad_z, grad_bias;
  if (act == Activation::None) {
    grad_z = grad;
    if (output_mask[2]) grad_bias = grad.sum(0);
  } else {
    grad_z = at::empty_like(grad);
    grad_bias = cpu::activation_backward_rows(grad, as_rows(saved).contiguous(), grad_z, act, negative_slope);
  }
  const Tensor rows = as_rows(input);
  return {output_mask[0] ? at::mm(grad_z, weight).view(input.sizes()) : at::empty({0}, input.options()),
          output_mask[1] ? at::mm(grad_z.t(), rows) : at::empty({0}, weight.options()),
          output_mask[2] ? grad_bias : at::empty({0}, weight.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  m.impl("linear_act", &linear_act_cpu);
  m.impl("linear_act_backward", &linear_act_backward_cpu);
}

}  // namespace segfast

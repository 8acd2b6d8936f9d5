// linear + bias + activation on CUDA: cuBLAS GEMM with the bias (addmm, as F.linear), then one
// pass for the activation; backward: one pass for act' x grad_output and the bias-gradient
// partial sums, then two GEMMs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/arguments.h"
#include "cuda/activation_pass.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> linear_act_cuda(const Tensor& input, const Tensor& weight,
                                           const std::optional<Tensor>& bias, c10::string_view activation,
                                           double negative_slope) {
  check_linear_args(input, weight, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  const Activation act = parse_activation(activation);
  const Tensor rows = as_rows(input);
  const Tensor z = (bias && bias->defined() ? at::addmm(*bias, rows, weight.t()) : at::mm(rows, weight.t())).contiguous();
  const Tensor empty = at::empty({0}, input.options());
  const auto size = linear_output_size(input, weight);
  if (act == Activation::None) return {z.view(size), empty};
  const bool keep_preact = !derivative_from_output(act, negative_slope);
  Tensor out = keep_preact ? at::empty_like(z) : z;
  cuda::bias_activation(z, std::nullopt, out, z.size(1), 1, act, negative_slope);
  return {out.view(size), keep_preact ? z.view(size) : empty};
}

std::tuple<Tensor, Tensor, Tensor> linear_act_backward_cuda(const Tensor& grad_output, const Tensor& saved,
                                                            const Tensor& input, const Tensor& weight,
                                                            c10::string_view activation, double negative_slope,
                                                            std::array<bool, 3> output_mask) {
  check_linear_args(input, weight, std::nullopt);
  const c10::cuda::CUDAGuard guard(input.device());
  const Activation act = parse_activation(activation);
  const Tensor grad = as_rows(grad_output).contiguous();
  Tensor grad_z = grad, grad_bias;
  if (act == Activation::None) {
    if (output_mask[2]) grad_bias = grad.sum(0);
  } else {
    grad_z = at::empty_like(grad);
    grad_bias = cuda::activation_backward(grad, as_rows(saved).contiguous(), grad_z, weight.size(0), 1, act,
                                          negative_slope);
  }
  const Tensor rows = as_rows(input);
  return {output_mask[0] ? at::mm(grad_z, weight).view(input.sizes()) : at::empty({0}, input.options()),
          output_mask[1] ? at::mm(grad_z.t(), rows) : at::empty({0}, weight.options()),
          output_mask[2] ? grad_bias : at::empty({0}, weight.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CUDA, m) {
  m.impl("linear_act", &linear_act_cuda);
  m.impl("linear_act_backward", &linear_act_backward_cuda);
}

}  // namespace segfast

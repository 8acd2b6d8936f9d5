#pragma once
// linear + bias + activation, one body for every backend. The core is ATen's GEMM with the bias
// added in it (addmm, as F.linear); the backend's `Passes` are the passes around it:
//   static void activation(const Tensor& z, const Tensor& out, Activation, double negative_slope);
//     out = act(z) in one pass (out may be z)
//   static Tensor backward_rows(const Tensor& grad, const Tensor& saved, const Tensor& grad_z,
//                               Activation, double negative_slope);
//     grad_z = grad * act'(saved) for contiguous (rows, features) matrices, returning the column
//     sums of grad_z (the bias gradient) in a fixed order
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <array>
#include <tuple>
#include <vector>

#include "common/activation.h"
#include "common/checks.h"
#include "common/devices.h"
#include "common/grads.h"

namespace segfast {

// Every argument as F.linear checks it, with the messages of the Python face (which leaves these
// checks to the kernels; it broadcasts a one-element bias itself, as F.linear does).
inline void check_linear_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              double negative_slope) {
  constexpr const char* op = "linear_act";
  check_float_dtype(op, "input", input);
  check_dims(op, "weight", weight, 2);
  if (bias && bias->defined()) check_dims(op, "bias", *bias, 1);
  check_same_dtype_and_device(op, named("input", input), {named("weight", weight), named("bias", bias)});
  check_finite(op, "negative_slope", negative_slope);
  TORCH_CHECK_VALUE(input.dim() >= 1, op,
                    ": input must have at least one dimension (*, in_features), got a 0-D tensor");
  TORCH_CHECK_VALUE(input.size(-1) == weight.size(1), op, ": input has ", input.size(-1), " features but weight ",
                    weight.sizes(), " expects ", weight.size(1));
  if (bias && bias->defined()) {
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), op, ": bias must have shape (", weight.size(0), ",), got ",
                      bias->sizes());
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

template <typename Passes>
struct LinearAct {
  using Tensor = at::Tensor;

  static std::tuple<Tensor, Tensor> forward(const Tensor& input, const Tensor& weight,
                                            const std::optional<Tensor>& bias, c10::string_view activation,
                                            double negative_slope) {
    check_linear_args(input, weight, bias, negative_slope);
    const Activation act = parse_activation(activation);
    const Tensor rows = as_rows(input);
    const Tensor z =
        (bias && bias->defined() ? at::addmm(*bias, rows, weight.t()) : at::mm(rows, weight.t())).contiguous();
    const Tensor empty = at::empty({0}, input.options());
    const auto size = linear_output_size(input, weight);
    if (act == Activation::None) return {z.view(size), empty};
    const bool keep_preact = !derivative_from_output(act, negative_slope);
    const Tensor out = keep_preact ? at::empty_like(z) : z;
    Passes::activation(z, out, act, negative_slope);
    return {out.view(size), keep_preact ? z.view(size) : empty};
  }

  static std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& saved,
                                                     const Tensor& input, const Tensor& weight,
                                                     c10::string_view activation, double negative_slope,
                                                     std::array<bool, 3> output_mask) {
    check_linear_args(input, weight, std::nullopt, negative_slope);
    check_same_device("linear_act_backward", {named("input", input), named("weight", weight),
                                              named("grad_output", grad_output), named("saved", saved)});
    const Activation act = parse_activation(activation);
    const Tensor grad = as_rows(grad_output).contiguous();
    Tensor grad_z = grad, grad_bias;
    if (act == Activation::None) {
      if (output_mask[2]) grad_bias = grad.sum(0);
    } else {
      grad_z = at::empty_like(grad);
      grad_bias = Passes::backward_rows(grad, as_rows(saved).contiguous(), grad_z, act, negative_slope);
    }
    const Tensor rows = as_rows(input);
    return masked_grads(
        output_mask, input, weight, [&] { return at::mm(grad_z, weight).view(input.sizes()); },
        [&] { return at::mm(grad_z.t(), rows); }, [&] { return grad_bias; });
  }
};

}  // namespace segfast

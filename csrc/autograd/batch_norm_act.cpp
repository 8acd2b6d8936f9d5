// Autograd of batch_norm_act, in C++ (Autograd key). Saves the input (the one activation-sized
// tensor: backward recomputes z from it), the residual if any (the caller's own tensor), the affine
// parameters and the per-channel mean and invstd the forward normalised with.
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "autograd/autograd.h"

namespace segfast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = const std::optional<Tensor>&;

using ForwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, OptionalTensor, OptionalTensor,
                                                            OptionalTensor, OptionalTensor, bool, double, double,
                                                            c10::string_view, double, OptionalTensor);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, OptionalTensor,
                                                                     OptionalTensor, const Tensor&, const Tensor&,
                                                                     OptionalTensor, bool, c10::string_view, double,
                                                                     std::array<bool, 4>);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = op_handle<ForwardSignature>("segfast::batch_norm_act");
  return op;
}

bool wants_grad(OptionalTensor t) {
  return t && t->defined() && t->requires_grad();
}

struct BatchNormAct : torch::autograd::Function<BatchNormAct> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, OptionalTensor weight, OptionalTensor bias,
                               OptionalTensor running_mean, OptionalTensor running_var, bool training, double momentum,
                               double eps, c10::string_view activation, double negative_slope,
                               OptionalTensor residual) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, invstd] = forward_op().call(input, weight, bias, running_mean, running_var, training, momentum,
                                                 eps, activation, negative_slope, residual);
    ctx->save_for_backward(
        {input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd, residual.value_or(Tensor())});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["mask"] =
        std::vector<bool>{input.requires_grad(), wants_grad(residual), wants_grad(weight), wants_grad(bias)};
    ctx->mark_non_differentiable({mean, invstd});
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<BackwardSignature>("segfast::batch_norm_act_backward");
    const variable_list saved = ctx->get_saved_variables();
    auto optional = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
    const auto& d = ctx->saved_data;
    const c10::List<bool> mask = d.at("mask").toBoolList();
    Tensor grad_input, grad_residual, grad_weight, grad_bias;
    if (grads[0].defined()) {
      std::tie(grad_input, grad_residual, grad_weight, grad_bias) =
          op.call(grads[0], saved[0], optional(saved[1]), optional(saved[2]), saved[3], saved[4], optional(saved[5]),
                  d.at("training").toBool(), d.at("activation").toStringRef(), d.at("negative_slope").toDouble(),
                  {mask[0], mask[1], mask[2], mask[3]});
    }
    auto kept = [&](const Tensor& g, bool wanted) { return wanted ? g : Tensor(); };
    return {kept(grad_input, mask[0]),
            kept(grad_weight, mask[2]),
            kept(grad_bias, mask[3]),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            kept(grad_residual, mask[1])};
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_autograd(const Tensor& input, OptionalTensor weight,
                                                           OptionalTensor bias, OptionalTensor running_mean,
                                                           OptionalTensor running_var, bool training, double momentum,
                                                           double eps, c10::string_view activation,
                                                           double negative_slope, OptionalTensor residual) {
  if (!torch::autograd::compute_requires_grad(input, weight, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(input, weight, bias, running_mean, running_var, training, momentum, eps, activation,
                             negative_slope, residual);
  }
  const variable_list out = BatchNormAct::apply(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                                activation, negative_slope, residual);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, Autograd, m) {
  m.impl("batch_norm_act", &batch_norm_act_autograd);
}

}  // namespace segfast

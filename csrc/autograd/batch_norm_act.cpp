// Autograd of batch_norm_act and batch_norm_act_ (InPlace-ABN), in C++ (Autograd key). Saves one
// activation-sized tensor — the input (backward recomputes z from it), or for batch_norm_act_ the
// output that overwrote it (backward inverts the activation) — the residual if any (the caller's
// own tensor), the affine parameters and the per-channel mean and invstd the forward normalised with.
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "autograd/autograd.h"

namespace segfast {
namespace {

using at::Tensor;

using ForwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, OptionalTensor, OptionalTensor,
                                                            OptionalTensor, OptionalTensor, bool, double, double,
                                                            c10::string_view, double, OptionalTensor);
using InplaceSignature = std::tuple<Tensor, Tensor>(const Tensor&, OptionalTensor, OptionalTensor, OptionalTensor,
                                                    OptionalTensor, bool, double, double, c10::string_view, double,
                                                    OptionalTensor);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, OptionalTensor,
                                                                     OptionalTensor, const Tensor&, const Tensor&,
                                                                     OptionalTensor, bool, c10::string_view, double,
                                                                     bool, std::array<bool, 4>);

constexpr char kBatchNormAct[] = "segfast::batch_norm_act";
constexpr auto forward_op = registered_op<ForwardSignature, kBatchNormAct>;

constexpr char kBatchNormActInplace[] = "segfast::batch_norm_act_";
constexpr auto inplace_op = registered_op<InplaceSignature, kBatchNormActInplace>;

// What both Functions keep: the saved activation-sized tensor (input or output), the caller's
// residual and affine parameters, the statistics, and which gradients are wanted.
void save_state(AutogradContext* ctx, const Tensor& saved, OptionalTensor weight, OptionalTensor bias,
                const Tensor& mean, const Tensor& invstd, OptionalTensor residual, bool training,
                c10::string_view activation, double negative_slope, std::vector<bool> mask) {
  ctx->save_for_backward(
      {saved, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd, residual.value_or(Tensor())});
  ctx->saved_data["training"] = training;
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["negative_slope"] = negative_slope;
  ctx->saved_data["mask"] = std::move(mask);
  ctx->mark_non_differentiable({mean, invstd});
}

// The gradients of (input, weight, bias, running_mean, running_var, training, momentum, eps,
// activation, negative_slope, residual), the arguments' order.
variable_list batch_norm_act_grads(AutogradContext* ctx, const Tensor& grad_output, bool from_output) {
  static const auto op = op_handle<BackwardSignature>("segfast::batch_norm_act_backward");
  const variable_list saved = ctx->get_saved_variables();
  const auto& d = ctx->saved_data;
  const c10::List<bool> mask = d.at("mask").toBoolList();
  Tensor grad_input, grad_residual, grad_weight, grad_bias;
  if (grad_output.defined()) {
    std::tie(grad_input, grad_residual, grad_weight, grad_bias) =
        op.call(grad_output, saved[0], optional_tensor(saved[1]), optional_tensor(saved[2]), saved[3], saved[4],
                optional_tensor(saved[5]), d.at("training").toBool(), d.at("activation").toStringRef(),
                d.at("negative_slope").toDouble(), from_output, {mask[0], mask[1], mask[2], mask[3]});
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

// kInplace, InPlace-ABN: the input is overwritten by the output (marked dirty: autograd records the
// op as the input's new history), which is what is saved.
template <bool kInplace>
struct BatchNormActFunction : torch::autograd::Function<BatchNormActFunction<kInplace>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, OptionalTensor weight, OptionalTensor bias,
                               OptionalTensor running_mean, OptionalTensor running_var, bool training, double momentum,
                               double eps, c10::string_view activation, double negative_slope,
                               OptionalTensor residual) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor out = input, mean, invstd;
    if constexpr (kInplace) {
      std::tie(mean, invstd) = inplace_op().call(input, weight, bias, running_mean, running_var, training, momentum,
                                                 eps, activation, negative_slope, residual);
      ctx->mark_dirty({input});
    } else {
      std::tie(out, mean, invstd) = forward_op().call(input, weight, bias, running_mean, running_var, training,
                                                      momentum, eps, activation, negative_slope, residual);
    }
    save_state(
        ctx, input, weight, bias, mean, invstd, residual, training, activation, negative_slope,
        {input.requires_grad(), requires_grad_arg(residual), requires_grad_arg(weight), requires_grad_arg(bias)});
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return batch_norm_act_grads(ctx, grads[0], /*from_output=*/kInplace);
  }
};

std::tuple<Tensor, Tensor> batch_norm_act_inplace_autograd(const Tensor& input, OptionalTensor weight,
                                                           OptionalTensor bias, OptionalTensor running_mean,
                                                           OptionalTensor running_var, bool training, double momentum,
                                                           double eps, c10::string_view activation,
                                                           double negative_slope, OptionalTensor residual) {
  if (!torch::autograd::compute_requires_grad(input, weight, bias, residual)) {
    auto stats = call_below_autograd(inplace_op(), input, weight, bias, running_mean, running_var, training, momentum,
                                     eps, activation, negative_slope, residual);
    torch::autograd::impl::bump_version(input);  // a graph that saved the input sees it changed
    return stats;
  }
  const variable_list out = BatchNormActFunction<true>::apply(input, weight, bias, running_mean, running_var, training,
                                                              momentum, eps, activation, negative_slope, residual);
  return {out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, Autograd, m) {
  m.impl("batch_norm_act", &AutogradKernel<BatchNormActFunction<false>, ForwardSignature, kBatchNormAct>::call);
  m.impl("batch_norm_act_", &batch_norm_act_inplace_autograd);
}

}  // namespace segfast

// Autograd of cross_entropy and cross_entropy_with_grad, in C++ (Autograd key).
//  - cross_entropy saves the logits and target (the caller's own tensors), the class weights and
//    one float per pixel (the log-sum-exp); backward recomputes the softmax from them. Probability
//    targets that require grad get d loss / d q_c = -(1 - eps) w_c log_softmax_c.
//  - cross_entropy_with_grad saves the gradient alone: neither logits nor log-sum-exp.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "autograd/autograd.h"
#include "common/cross_entropy.h"

namespace segfast {
namespace {

using at::Tensor;

constexpr char kCrossEntropy[] = "segfast::cross_entropy";
constexpr auto forward_op = registered_op<CrossEntropySignature, kCrossEntropy>;

constexpr char kCrossEntropyWithGrad[] = "segfast::cross_entropy_with_grad";
constexpr auto with_grad_op = registered_op<CrossEntropyWithGradSignature, kCrossEntropyWithGrad>;

// d loss / d q for probability targets q, from the saved logits and log-sum-exp.
Tensor probability_target_grad(const Tensor& grad_loss, const Tensor& input, const Tensor& weight, const Tensor& lse,
                               const Tensor& total_weight, const std::string& reduction, double label_smoothing) {
  Tensor per_pixel = reduction == "mean" ? grad_loss / total_weight : grad_loss;
  if (reduction == "none") per_pixel = per_pixel.unsqueeze(1);
  Tensor grad = (input - lse.unsqueeze(1).to(input.scalar_type())) * per_pixel;
  if (weight.defined()) grad = grad * weight.view({1, -1, 1});
  return grad * -(1.0 - label_smoothing);
}

struct CrossEntropy : torch::autograd::Function<CrossEntropy> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& target, OptionalTensor weight,
                               c10::string_view reduction, int64_t ignore_index, double label_smoothing) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, lse, total_weight] = forward_op().call(input, target, weight, reduction, ignore_index, label_smoothing);
    ctx->save_for_backward({input, target, weight.value_or(Tensor()), lse, total_weight});
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->mark_non_differentiable({lse, total_weight});  // internal: no zero-filled gradients for them
    ctx->set_materialize_grads(false);
    return {loss, lse, total_weight};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op_handle<CrossEntropyBackwardSignature>("segfast::cross_entropy_backward");
    variable_list result(6);
    if (!grads[0].defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &target = saved[1], &weight = saved[2], &lse = saved[3], &total_weight = saved[4];
    const auto& d = ctx->saved_data;
    const std::string& reduction = d.at("reduction").toStringRef();
    const double label_smoothing = d.at("label_smoothing").toDouble();
    if (ctx->needs_input_grad(0)) {
      result[0] = backward_op.call(grads[0], input, target, optional_tensor(weight), lse, total_weight, reduction,
                                   d.at("ignore_index").toInt(), label_smoothing);
    }
    if (ctx->needs_input_grad(1)) {
      result[1] = probability_target_grad(grads[0], input, weight, lse, total_weight, reduction, label_smoothing);
    }
    return result;
  }
};

struct CrossEntropyWithGrad : torch::autograd::Function<CrossEntropyWithGrad> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& target, OptionalTensor weight,
                               c10::string_view reduction, int64_t ignore_index, double label_smoothing) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, grad] = with_grad_op().call(input, target, weight, reduction, ignore_index, label_smoothing);
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad});
    ctx->set_materialize_grads(false);
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(6);
    if (!grads[0].defined()) return result;
    const Tensor grad = ctx->get_saved_variables()[0];
    result[0] = grad * grads[0].to(grad.scalar_type());
    return result;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(segfast, Autograd, m) {
  m.impl("cross_entropy", &AutogradKernel<CrossEntropy, CrossEntropySignature, kCrossEntropy>::call);
  m.impl("cross_entropy_with_grad",
         &AutogradKernel<CrossEntropyWithGrad, CrossEntropyWithGradSignature, kCrossEntropyWithGrad>::call);
}

}  // namespace segfast

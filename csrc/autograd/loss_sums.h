#pragma once
// The autograd of an op that reduces (N, C, S) logits to per-(sample, class) sums, the loss being
// Python math on them (dice_sums: softmax; sigmoid_sums: sigmoid). Forward saves nothing but the
// caller's logits and target; backward (kBackward: grad_sums, input, target, ignore_index,
// squared) recomputes the per-element terms.
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/custom_function.h>

#include "autograd/autograd.h"

namespace segfast {

using LossSumsSignature = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool);
using LossSumsBackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool);

template <const char* kForward, const char* kBackward>
struct LossSums : torch::autograd::Function<LossSums<kForward, kBackward>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                               int64_t ignore_index, bool squared) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor sums = registered_op<LossSumsSignature, kForward>().call(input, target, ignore_index, squared);
    ctx->save_for_backward({input, target});  // the caller's tensors: nothing new is kept
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["squared"] = squared;
    return {sums};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(4);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return result;
    const variable_list saved = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    result[0] = registered_op<LossSumsBackwardSignature, kBackward>().call(
        grads[0], saved[0], saved[1], d.at("ignore_index").toInt(), d.at("squared").toBool());
    return result;
  }
};

}  // namespace segfast

#pragma once
// Autograd of the fused op-plus-activation families (conv2d_act, linear_act), in C++ for the
// Autograd key. Such an op is (input, weight, bias, Extra..., activation, negative_slope) ->
// (output, preact) and its backward op (grad_output, saved, input, weight, Extra..., activation,
// negative_slope, output_mask) -> (grad_input, grad_weight, grad_bias). Forward saves input, weight
// and one output-sized tensor: the output where the activation's derivative follows from it, else
// the pre-activation (csrc/common/activation.h).
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "autograd/autograd.h"
#include "common/activation.h"

namespace segfast {

// Names: a struct with `static constexpr const char forward[], backward[]` naming the two ops.
template <typename Names, typename... Extra>
struct FusedAct : torch::autograd::Function<FusedAct<Names, Extra...>> {
  using Tensor = at::Tensor;
  using OptionalTensor = const std::optional<Tensor>&;
  using ForwardSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, OptionalTensor, Extra...,
                                                      c10::string_view, double);
  using BackwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const Tensor&, Extra..., c10::string_view, double,
                                                               std::array<bool, 3>);

  static constexpr auto forward_op = registered_op<ForwardSignature, Names::forward>;

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& input,
                                                const Tensor& weight, OptionalTensor bias, Extra... extra,
                                                c10::string_view activation, double negative_slope) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, preact] = forward_op().call(input, weight, bias, extra..., activation, negative_slope);
    const bool from_output = derivative_from_output(parse_activation(activation), negative_slope);
    ctx->save_for_backward({input, weight, from_output ? out : preact});
    ctx->saved_data["extra"] = c10::ivalue::Tuple::create(c10::IValue(extra)...);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();  // needs_input_grad counts tensors only
    ctx->mark_non_differentiable({preact});
    ctx->set_materialize_grads(false);
    return {out, preact};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    constexpr size_t kArgs = 5 + sizeof...(Extra);
    torch::autograd::variable_list result(kArgs);
    if (!grads[0].defined()) return result;
    const auto& d = ctx->saved_data;
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      d.at("has_bias").toBool() && ctx->needs_input_grad(2)};
    std::tie(result[0], result[1], result[2]) = call_backward(
        grads[0], ctx->get_saved_variables(), d.at("extra").toTupleRef().elements(), d.at("activation").toStringRef(),
        d.at("negative_slope").toDouble(), mask, std::index_sequence_for<Extra...>{});
    for (int i = 0; i < 3; ++i) {
      if (!mask[i]) result[i] = Tensor();
    }
    return result;
  }

  // The Autograd-key kernel.
  static constexpr auto kernel = &AutogradKernel<FusedAct, ForwardSignature, Names::forward>::call;

 private:
  template <size_t... I>
  static std::tuple<Tensor, Tensor, Tensor> call_backward(const Tensor& grad_output,
                                                          const torch::autograd::variable_list& saved,
                                                          const std::vector<c10::IValue>& extra,
                                                          const std::string& activation, double negative_slope,
                                                          std::array<bool, 3> mask, std::index_sequence<I...>) {
    static const auto op = op_handle<BackwardSignature>(Names::backward);
    return op.call(grad_output, saved[2], saved[0], saved[1], extra[I].template to<typename Owned<Extra>::type>()...,
                   activation, negative_slope, mask);
  }
};

}  // namespace segfast

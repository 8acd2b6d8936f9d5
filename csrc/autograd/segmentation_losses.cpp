// Autograd of dice_sums and focal_loss, in C++ (Autograd key).
//  - dice_sums (autograd/loss_sums.h) saves nothing but the caller's logits and target; backward
//    recomputes the softmax.
//  - focal_loss saves them, the class weights alpha and one float per pixel (the log-sum-exp).
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "autograd/autograd.h"
#include "autograd/loss_sums.h"

namespace segfast {
namespace {

using at::Tensor;

using FocalSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, OptionalTensor, double,
                                                          c10::string_view, int64_t);
using FocalBackwardSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, OptionalTensor, double,
                                      const Tensor&, const Tensor&, c10::string_view, int64_t);

constexpr char kDiceSums[] = "segfast::dice_sums";
constexpr char kDiceSumsBackward[] = "segfast::dice_sums_backward";

constexpr char kFocalLoss[] = "segfast::focal_loss";
constexpr auto focal_loss_op = registered_op<FocalSignature, kFocalLoss>;

struct FocalLoss : torch::autograd::Function<FocalLoss> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& target, OptionalTensor alpha,
                               double gamma, c10::string_view reduction, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, lse, count] = focal_loss_op().call(input, target, alpha, gamma, reduction, ignore_index);
    ctx->save_for_backward({input, target, alpha.value_or(Tensor()), lse, count});
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({lse, count});
    ctx->set_materialize_grads(false);
    return {loss, lse, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<FocalBackwardSignature>("segfast::focal_loss_backward");
    variable_list result(6);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return result;
    const variable_list saved = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    result[0] = op.call(grads[0], saved[0], saved[1], optional_tensor(saved[2]), d.at("gamma").toDouble(), saved[3],
                        saved[4], d.at("reduction").toStringRef(), d.at("ignore_index").toInt());
    return result;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(segfast, Autograd, m) {
  m.impl("dice_sums", &AutogradKernel<LossSums<kDiceSums, kDiceSumsBackward>, LossSumsSignature, kDiceSums>::call);
  m.impl("focal_loss", &AutogradKernel<FocalLoss, FocalSignature, kFocalLoss>::call);
}

}  // namespace segfast

// Autograd of sigmoid_sums and sigmoid_focal_loss, in C++ (Autograd key). Both save nothing but
// the caller's logits, target and class weights (and focal's element count): backward recomputes
// the sigmoid.
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "autograd/autograd.h"
#include "autograd/loss_sums.h"

namespace segfast {
namespace {

using at::Tensor;

using SigmoidFocalSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, OptionalTensor, double,
                                                         c10::string_view, int64_t);
using SigmoidFocalBackwardSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, OptionalTensor, double,
                                             const Tensor&, c10::string_view, int64_t);

constexpr char kSigmoidSums[] = "segfast::sigmoid_sums";
constexpr char kSigmoidSumsBackward[] = "segfast::sigmoid_sums_backward";
constexpr char kSigmoidFocalLoss[] = "segfast::sigmoid_focal_loss";
constexpr auto sigmoid_focal_loss_op = registered_op<SigmoidFocalSignature, kSigmoidFocalLoss>;

struct SigmoidFocalLoss : torch::autograd::Function<SigmoidFocalLoss> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& target, OptionalTensor alpha,
                               double gamma, c10::string_view reduction, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, count] = sigmoid_focal_loss_op().call(input, target, alpha, gamma, reduction, ignore_index);
    ctx->save_for_backward({input, target, alpha.value_or(Tensor()), count});
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({count});
    ctx->set_materialize_grads(false);
    return {loss, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<SigmoidFocalBackwardSignature>("segfast::sigmoid_focal_loss_backward");
    variable_list result(6);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return result;
    const variable_list saved = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    result[0] = op.call(grads[0], saved[0], saved[1], optional_tensor(saved[2]), d.at("gamma").toDouble(), saved[3],
                        d.at("reduction").toStringRef(), d.at("ignore_index").toInt());
    return result;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(segfast, Autograd, m) {
  m.impl("sigmoid_sums",
         &AutogradKernel<LossSums<kSigmoidSums, kSigmoidSumsBackward>, LossSumsSignature, kSigmoidSums>::call);
  m.impl("sigmoid_focal_loss", &AutogradKernel<SigmoidFocalLoss, SigmoidFocalSignature, kSigmoidFocalLoss>::call);
}

}  // namespace segfast

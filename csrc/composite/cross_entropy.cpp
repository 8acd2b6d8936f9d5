// cross_entropy_with_grad: the loss and its gradient in one call, built from the cross_entropy and
// cross_entropy_backward ops on whatever backend the input is (CompositeExplicitAutograd).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/ones.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace segfast {
namespace {

std::tuple<at::Tensor, at::Tensor> cross_entropy_with_grad(const at::Tensor& input, const at::Tensor& target,
                                                           const std::optional<at::Tensor>& weight,
                                                           c10::string_view reduction, int64_t ignore_index,
                                                           double label_smoothing) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum",
                    "cross_entropy_with_grad: reduction must be 'mean' or 'sum', got '", reduction, "'");
  static const auto forward = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("segfast::cross_entropy", "")
                                  .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                      c10::string_view, int64_t, double)>();
  static const auto backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("segfast::cross_entropy_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, c10::string_view, int64_t, double)>();
  auto [loss, lse, total_weight] = forward.call(input, target, weight, reduction, ignore_index, label_smoothing);
  const at::Tensor one = at::ones({}, loss.options());
  at::Tensor grad =
      backward.call(one, input, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing);
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy_with_grad", &cross_entropy_with_grad);
}

}  // namespace segfast

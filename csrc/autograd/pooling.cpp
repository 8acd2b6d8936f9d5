// Autograd of max_pool2d and avg_pool2d, registered in C++ for the Autograd key: forward and
// backward run without entering Python (segfast/ops/pooling.py keeps the fake kernels and docs).
// Each forward calls the op below autograd (the CPU or CUDA kernel, or the fake one under
// torch.compile) and saves what backward needs: the compact argmax for max pooling, nothing for avg.
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>

#include "autograd/autograd.h"

namespace segfast {
namespace {

using at::IntArrayRef;
using at::Tensor;

using MaxPool2dSignature = std::tuple<Tensor, Tensor>(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef,
                                                      bool, bool);
using MaxPool2dBackwardSignature = Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef, IntArrayRef, IntArrayRef,
                                          IntArrayRef, IntArrayRef, bool);
using AvgPool2dSignature = Tensor(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool, bool,
                                  std::optional<int64_t>);
using AvgPool2dBackwardSignature = Tensor(const Tensor&, c10::SymIntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef,
                                          bool, bool, std::optional<int64_t>);

constexpr char kMaxPool2d[] = "segfast::max_pool2d";
constexpr auto max_pool2d_op = registered_op<MaxPool2dSignature, kMaxPool2d>;

constexpr char kAvgPool2d[] = "segfast::avg_pool2d";
constexpr auto avg_pool2d_op = registered_op<AvgPool2dSignature, kAvgPool2d>;

// The window arguments backward needs, in one IValue tuple (input size, kernel, stride, padding,
// then each pooling's own): one insertion into the context's map instead of six.
template <typename... Rest>
void save_window(AutogradContext* ctx, const Tensor& input, IntArrayRef kernel, IntArrayRef stride, IntArrayRef padding,
                 Rest&&... rest) {
  ctx->saved_data["window"] =
      c10::ivalue::Tuple::create(c10::IValue(input.sym_sizes()), c10::IValue(kernel), c10::IValue(stride),
                                 c10::IValue(padding), c10::IValue(std::forward<Rest>(rest))...);
}

struct MaxPool2d : torch::autograd::Function<MaxPool2d> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, IntArrayRef kernel, IntArrayRef stride,
                               IntArrayRef padding, IntArrayRef dilation, bool ceil_mode, bool return_indices) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, argmax] = max_pool2d_op().call(input, kernel, stride, padding, dilation, ceil_mode, return_indices);
    save_window(ctx, input, kernel, stride, padding, dilation, ceil_mode);
    ctx->save_for_backward({argmax});  // 1 byte per output for windows of at most 256 taps
    ctx->mark_non_differentiable({argmax});
    return {out, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<MaxPool2dBackwardSignature>("segfast::max_pool2d_backward");
    Tensor grad_input;
    if (grads[0].defined()) {
      const auto& w = ctx->saved_data.at("window").toTupleRef().elements();
      grad_input = op.call(grads[0], ctx->get_saved_variables()[0], w[0].toSymIntVector(), w[1].toIntVector(),
                           w[2].toIntVector(), w[3].toIntVector(), w[4].toIntVector(), w[5].toBool());
    }
    return {grad_input, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct AvgPool2d : torch::autograd::Function<AvgPool2d> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, IntArrayRef kernel, IntArrayRef stride,
                               IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                               std::optional<int64_t> divisor_override) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor out = avg_pool2d_op().call(input, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override);
    save_window(ctx, input, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override);
    return {out};  // avg pooling saves no tensor
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<AvgPool2dBackwardSignature>("segfast::avg_pool2d_backward");
    Tensor grad_input;
    if (grads[0].defined()) {
      const auto& w = ctx->saved_data.at("window").toTupleRef().elements();
      grad_input = op.call(grads[0], w[0].toSymIntVector(), w[1].toIntVector(), w[2].toIntVector(), w[3].toIntVector(),
                           w[4].toBool(), w[5].toBool(), w[6].toOptional<int64_t>());
    }
    return {grad_input, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(segfast, Autograd, m) {
  m.impl("max_pool2d", &AutogradKernel<MaxPool2d, MaxPool2dSignature, kMaxPool2d>::call);
  m.impl("avg_pool2d", &AutogradKernel<AvgPool2d, AvgPool2dSignature, kAvgPool2d>::call);
}

}  // namespace segfast

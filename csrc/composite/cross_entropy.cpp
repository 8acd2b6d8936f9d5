// Ops built from cross_entropy and cross_entropy_backward, on whatever backend the input is:
//  - cross_entropy_loss (CompositeImplicitAutograd): F.cross_entropy's face in C++. It checks every
//    argument on the caller's shapes, with the messages segfast.ops.cross_entropy documents, views
//    (C,), (N, C) and (N, C, d1, ...) logits as the kernels' (N, C, S) and picks the gradient-in-
//    forward mode; autograd flows through the views and the ops it calls. Shapes are read as SymInts,
//    so under torch.compile the checks become guards.
//  - cross_entropy_with_grad (CompositeExplicitAutograd): the loss and its gradient in one call.
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/reshape.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "autograd/autograd.h"
#include "common/checks.h"
#include "common/class_index.h"
#include "common/cross_entropy.h"
#include "common/reduction.h"

namespace segfast {
namespace {

using at::Tensor;
using OptionalTensor = const std::optional<Tensor>&;
constexpr const char* kOp = "cross_entropy";

// The target's shape for class indices: input's without the class dim.
std::vector<c10::SymInt> pixel_shape(const Tensor& input) {
  std::vector<c10::SymInt> shape;
  if (input.dim() == 1) return shape;
  const auto sizes = input.sym_sizes();
  shape.push_back(sizes[0]);
  shape.insert(shape.end(), sizes.begin() + 2, sizes.end());
  return shape;
}

void check_weight(const Tensor& input, OptionalTensor weight, const c10::SymInt& classes) {
  if (!weight || !weight->defined()) return;
  check_dims(kOp, "weight", *weight, 1);
  TORCH_CHECK_VALUE(weight->sym_size(0) == classes, kOp, ": weight must have shape (", classes, ",), got ",
                    shape_str(weight->sym_sizes()));
  TORCH_CHECK(!(weight->requires_grad() && at::GradMode::is_enabled()), kOp,
              ": weight must not require grad (torch does not differentiate it either)");
  check_same_dtype_and_device(kOp, named("input", input), {named("weight", weight)});
}

// Probabilities of the input's shape, dtype and device, or class indices of its pixel shape.
void check_target(const Tensor& input, const Tensor& target, bool prob, int64_t ignore_index) {
  if (prob) {
    check_same_dtype_and_device(kOp, named("input", input), {named("target", target)});
    TORCH_CHECK_VALUE(target.sym_sizes() == input.sym_sizes(), kOp, ": probability target must have input's shape ",
                      shape_str(input.sym_sizes()), ", got ", shape_str(target.sym_sizes()));
    // torch's rule: a negative ignore_index is accepted and has no effect
    TORCH_CHECK_VALUE(ignore_index < 0, kOp, ": ignore_index=", ignore_index,
                      " is not supported for probability targets (as in torch)");
    return;
  }
  TORCH_CHECK_TYPE(is_class_index_type(target.scalar_type()), kOp,
                   ": target dtype must be one of int64, int32, uint8, got ", dtype_name(target.scalar_type()));
  // torch reads a target of the input's shape as probabilities
  TORCH_CHECK_TYPE(target.sym_sizes() != input.sym_sizes(), kOp, ": a target of the input's shape ",
                   shape_str(input.sym_sizes()), " holds class probabilities and must be floating point, got ",
                   dtype_name(target.scalar_type()));
  TORCH_CHECK_VALUE(target.device() == input.device(), kOp, ": target is on ", target.device(), " but input is on ",
                    input.device());
  const std::vector<c10::SymInt> pixels = pixel_shape(input);
  TORCH_CHECK_VALUE(target.sym_sizes() == c10::SymIntArrayRef(pixels), kOp, ": class-index target must have shape ",
                    shape_str(pixels), " for input ", shape_str(input.sym_sizes()), ", got ",
                    shape_str(target.sym_sizes()));
}

// (N, C, S) logits and (N, S) indices / (N, C, S) probabilities, views where the strides allow.
std::tuple<Tensor, Tensor> as_pixels(const Tensor& input, const Tensor& target, bool prob) {
  if (input.dim() == 1) {  // unbatched (C,)
    return {input.view_symint({1, input.sym_size(0), 1}),
            prob ? target.view_symint({1, target.sym_size(0), 1}) : target.view({1, 1})};
  }
  if (input.dim() == 2) {  // (N, C): the samples become the pixels of one image, no copy
    return {input.t().unsqueeze(0), prob ? target.t().unsqueeze(0) : target.unsqueeze(0)};
  }
  c10::SymInt pixels = 1;
  for (int64_t d = 2; d < input.dim(); ++d) pixels *= input.sym_size(d);
  const c10::SymInt n = input.sym_size(0), c = input.sym_size(1);
  return {input.reshape_symint({n, c, pixels}),
          prob ? target.reshape_symint({n, c, pixels}) : target.reshape_symint({n, pixels})};
}

Tensor cross_entropy_loss(const Tensor& input, const Tensor& target, OptionalTensor weight, c10::string_view reduction_,
                          int64_t ignore_index, double label_smoothing, bool grad_in_forward) {
  check_float_dtype(kOp, "input", input);
  TORCH_CHECK_VALUE(input.dim() > 0, kOp, ": input must be (C,), (N, C) or (N, C, d1, ...), got a 0-D tensor");
  const Reduction reduction = parse_reduction(reduction_);
  TORCH_CHECK_VALUE(std::isfinite(label_smoothing) && label_smoothing >= 0 && label_smoothing <= 1, kOp,
                    ": label_smoothing must be a finite float in [0.0, 1.0], got ", label_smoothing);
  const c10::SymInt classes = input.sym_size(input.dim() == 1 ? 0 : 1);
  TORCH_CHECK_VALUE(classes != 0, kOp, ": input has no classes (shape ", shape_str(input.sym_sizes()), ")");
  check_weight(input, weight, classes);
  const bool prob = at::isFloatingType(target.scalar_type());
  check_target(input, target, prob, ignore_index);
  TORCH_CHECK_VALUE(reduction != Reduction::Mean || input.sym_numel() != 0, kOp,
                    ": the mean over an empty batch is undefined (input shape ", shape_str(input.sym_sizes()),
                    "); torch returns NaN here");
  const bool grad_mode = at::GradMode::is_enabled();
  if (grad_in_forward) {
    TORCH_CHECK_VALUE(reduction != Reduction::None, kOp,
                      ": grad_in_forward needs reduction 'mean' or 'sum', got 'none'");
    TORCH_CHECK_VALUE(!(prob && target.requires_grad() && grad_mode), kOp,
                      ": grad_in_forward computes no gradient for a target that requires grad");
  }
  auto [logits, pixel_target] = as_pixels(input, target, prob);
  if (grad_in_forward && input.requires_grad() && grad_mode) {  // else nothing calls backward: the plain forward
    static const auto with_grad = op_handle<CrossEntropyWithGradSignature>("segfast::cross_entropy_with_grad");
    return std::get<0>(with_grad.call(logits, pixel_target, weight, reduction_, ignore_index, label_smoothing));
  }
  static const auto forward = op_handle<CrossEntropySignature>("segfast::cross_entropy");
  Tensor loss = std::get<0>(forward.call(logits, pixel_target, weight, reduction_, ignore_index, label_smoothing));
  return reduction == Reduction::None ? loss.reshape_symint(pixel_shape(input)) : loss;
}

std::tuple<Tensor, Tensor> cross_entropy_with_grad(const Tensor& input, const Tensor& target, OptionalTensor weight,
                                                   c10::string_view reduction, int64_t ignore_index,
                                                   double label_smoothing) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum",
                    "cross_entropy_with_grad: reduction must be 'mean' or 'sum', got '", reduction, "'");
  static const auto forward = op_handle<CrossEntropySignature>("segfast::cross_entropy");
  static const auto backward = op_handle<CrossEntropyBackwardSignature>("segfast::cross_entropy_backward");
  auto [loss, lse, total_weight] = forward.call(input, target, weight, reduction, ignore_index, label_smoothing);
  const Tensor one = at::ones({}, loss.options());
  Tensor grad = backward.call(one, input, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing);
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CompositeImplicitAutograd, m) {
  m.impl("cross_entropy_loss", &cross_entropy_loss);
}

TORCH_LIBRARY_IMPL(segfast, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy_with_grad", &cross_entropy_with_grad);
}

}  // namespace segfast

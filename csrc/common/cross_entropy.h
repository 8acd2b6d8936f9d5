#pragma once
// Cross-entropy's per-class coefficients, shared by the CPU and CUDA kernels.
//
// With class weights w_c and label smoothing eps over C classes, a pixel's loss is
// sum_c coef_c (lse - x_c), and its gradient scale * (softmax_c * mass - coef_c) with
// mass = sum_c coef_c, where
//   probability targets q:  coef_c = w_c ((1 - eps) q_c + eps / C)
//   class-index target y:   coef_c = w_c eps / C, plus (1 - eps) w_y for c = y.
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "common/macros.h"

namespace segfast {

template <typename acc_t>
struct LabelSmoothing {
  acc_t keep, spread;  // 1 - eps, eps / C

  SEGFAST_HOST_DEVICE LabelSmoothing(acc_t eps, int64_t classes)
      : keep(acc_t(1) - eps), spread(eps / static_cast<acc_t>(classes)) {}

  // coef_c of class weight w and probability target q
  SEGFAST_HOST_DEVICE acc_t probability_coef(acc_t w, acc_t q) const { return w * (keep * q + spread); }
  // the part of coef_c every class has under a class-index target
  SEGFAST_HOST_DEVICE acc_t spread_coef(acc_t w) const { return w * spread; }
  // the target class's extra part, (1 - eps) w_y
  SEGFAST_HOST_DEVICE acc_t target_coef(acc_t w) const { return keep * w; }
};

// The C++ signatures of the ops' schemas, for the callers that go through the dispatcher (the
// composite face and the autograd kernels).
using CrossEntropySignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                             const std::optional<at::Tensor>&,
                                                                             c10::string_view, int64_t, double);
using CrossEntropyBackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                                 c10::string_view, int64_t, double);
using CrossEntropyWithGradSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const std::optional<at::Tensor>&,
                                                                         c10::string_view, int64_t, double);

// Logits (N, C, S); a class-index target (N, S) or a probability target of the logits' shape and dtype.
inline void check_cross_entropy_args(const at::Tensor& input, const at::Tensor& target, bool prob) {
  TORCH_CHECK_VALUE(input.dim() == 3, "cross_entropy kernel: expected (N, C, S) logits, got ", input.sizes());
  if (prob) {
    TORCH_CHECK_VALUE(target.sizes() == input.sizes() && target.scalar_type() == input.scalar_type(),
                      "cross_entropy: probability target must match input ", input.sizes(), " ", input.scalar_type(),
                      ", got ", target.sizes(), " ", target.scalar_type());
  } else {
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == input.size(0) && target.size(1) == input.size(2),
                      "cross_entropy: class-index target must be (N, S) = (", input.size(0), ", ", input.size(2),
                      "), got ", target.sizes());
  }
  TORCH_CHECK_VALUE(target.device() == input.device(), "cross_entropy: target is on ", target.device(),
                    " but input is on ", input.device());
}

}  // namespace segfast

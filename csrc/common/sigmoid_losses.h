#pragma once
// Per-element math of the sigmoid (binary and multi-label) losses, shared by the CPU and CUDA
// kernels. An element has logit x and target y (a probability, or 0 / 1); p = sigmoid(x). The
// kernels pass e = exp(-|x|) and log(1 + e) (vectorised on the CPU): from them p and the
// BCE-with-logits are exact to rounding at every x, with no overflow.
#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>

#include "common/class_index.h"
#include "common/macros.h"
#include "common/segmentation_losses.h"

namespace segfast {

template <typename T>
struct SigmoidTerms {
  T p, bce;
};

// p = sigmoid(x) from e = exp(-|x|): one division, whichever side (vectorises)
template <typename T>
SEGFAST_HOST_DEVICE T sigmoid_of_exp(T x, T e) {
  return (x >= T(0) ? T(1) : e) / (T(1) + e);
}

template <typename T>
SEGFAST_HOST_DEVICE SigmoidTerms<T> sigmoid_terms(T x, T y, T e, T log1p_e) {
  const T p = sigmoid_of_exp(x, e);
  // torch's binary_cross_entropy_with_logits, (1 - y) x - log_sigmoid(x) with log_sigmoid(x) =
  // min(x, 0) - log(1 + exp(-|x|)): the same infinities and NaN (0 * inf at x = +-inf, y = 1)
  return {p, (T(1) - y) * x - (x < T(0) ? x : T(0)) + log1p_e};
}

// 1 - p_t of torchvision's sigmoid_focal_loss, p_t = p y + (1 - p)(1 - y), as a sum of two terms
// that are not negative (p + y - 2py could round below 0, and pow of it give NaN).
template <typename T>
SEGFAST_HOST_DEVICE T sigmoid_focal_q(T p, T y) {
  return p * (T(1) - y) + y * (T(1) - p);
}

// The per-class weight of torchvision's alpha: alpha for y = 1, 1 - alpha for y = 0 (linear in
// between), 1 without alpha.
template <typename T>
SEGFAST_HOST_DEVICE T sigmoid_focal_alpha(const double* alpha, int64_t c, T y) {
  if (alpha == nullptr) return T(1);
  const T a = static_cast<T>(alpha[c]);
  return a * y + (T(1) - a) * (T(1) - y);
}

template <typename T>
struct SigmoidFocalTerms {
  T loss, slope;
};

// loss = a_t BCE q^gamma (q = 1 - p_t), and its slope d loss / d x =
// a_t ((p - y) q^gamma + gamma BCE q^(gamma - 1) (1 - 2y) p (1 - p)), from the powers q^gamma and
// q^(gamma - 1); the second term is 0 for gamma = 0 and where q = 0 (p saturated at y, where
// (1 - 2y) p (1 - p) is 0 too; torch's autograd of the same formula gives 0 * inf = NaN there).
// The loss and the slope each from scalars (not SigmoidTerms: an aggregate passed by value inside
// a CPU `omp simd` loop stays in memory, and the loop scalar).
template <typename T>
SEGFAST_HOST_DEVICE T sigmoid_focal_loss_of_power(T bce, T alpha_t, T q_gamma) {
  return alpha_t * bce * q_gamma;
}

template <typename T>
SEGFAST_HOST_DEVICE T sigmoid_focal_slope_of_powers(T p, T bce, T y, T alpha_t, T q, T q_gamma, T q_gamma_less_1,
                                                    T gamma) {
  const T curve = gamma == T(0) || q <= T(0) ? T(0) : gamma * bce * q_gamma_less_1 * (T(1) - T(2) * y) * p * (T(1) - p);
  return alpha_t * ((p - y) * q_gamma + curve);
}

template <typename T>
SEGFAST_HOST_DEVICE SigmoidFocalTerms<T> sigmoid_focal_terms_of_powers(SigmoidTerms<T> s, T y, T alpha_t, T q,
                                                                       T q_gamma, T q_gamma_less_1, T gamma) {
  return {sigmoid_focal_loss_of_power(s.bce, alpha_t, q_gamma),
          sigmoid_focal_slope_of_powers(s.p, s.bce, y, alpha_t, q, q_gamma, q_gamma_less_1, gamma)};
}

template <typename T>
SEGFAST_HOST_DEVICE SigmoidFocalTerms<T> sigmoid_focal_terms(SigmoidTerms<T> s, T y, T alpha_t, T gamma) {
  const T q = sigmoid_focal_q(s.p, y);
  const T q_gamma_less_1 = gamma == T(0) || q <= T(0) ? T(0) : focal_power(q, gamma - T(1));
  return sigmoid_focal_terms_of_powers(s, y, alpha_t, q, focal_power(q, gamma), q_gamma_less_1, gamma);
}

// (N, C, S) logits and a target of the same shape: floating (the logits' dtype) or a class-index
// dtype holding 0, 1 or ignore_index.
inline void check_sigmoid_loss_inputs(const char* op, const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK_VALUE(input.dim() == 3, op, ": expected (N, C, S) logits, got ", input.sizes());
  TORCH_CHECK_VALUE(target.sizes() == input.sizes(), op, ": target must have the logits' shape ", input.sizes(),
                    ", got ", target.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(target.scalar_type()) || target.scalar_type() == input.scalar_type(), op,
                   ": a floating target must have the logits' dtype ", input.scalar_type(), ", got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(input.size(1) <= std::numeric_limits<int32_t>::max(), op,
                    ": at most 2^31 - 1 classes are supported, got ", input.size(1));
}

// An integer target element must be 0, 1 or ignore_index: an IndexError naming the element
// (pixel = c * S + s of image n), as a class index outside [0, 2).
inline void check_binary_target(const char* op, int64_t value, int64_t n, int64_t element, int64_t ignore_index) {
  check_class_index(op, value, n, element, 2, ignore_index);
}

}  // namespace segfast

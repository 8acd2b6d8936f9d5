#pragma once
// Activations of conv2d_act: forward, and derivative from whichever tensor the op saved.
#include <cmath>
#include <string_view>

#include <c10/util/Exception.h>

#include "common/macros.h"
#if !defined(__CUDACC__) && !defined(SEGFAST_CUDA_SIM)
#include "cpu/vec_math.h"
#endif

namespace segfast {

// exp, and the normal CDF Phi(z) = (1 + erf(z / sqrt 2)) / 2, of the activations. CPU kernels take
// the vectorisable forms of cpu/vec_math.h: glibc's expf and erff are scalar calls, which kept
// every SiLU / GELU / sigmoid loop from vectorising (batch_norm_act fwd+bwd 8x64x64x64 ran at
// 0.62x / 0.22x / 0.75x stock's). CUDA (and its CPU simulation) keep the library's.
template <typename T>
SEGFAST_HOST_DEVICE T activation_exp(T x) {
#if defined(__CUDACC__) || defined(SEGFAST_CUDA_SIM)
  return std::exp(x);
#else
  return cpu::exp_vec(x);
#endif
}

template <typename T>
SEGFAST_HOST_DEVICE T normal_cdf(T z) {
#if defined(__CUDACC__) || defined(SEGFAST_CUDA_SIM)
  return T(0.5) * (T(1) + std::erf(z * T(M_SQRT1_2)));
#else
  // from the tail Phi(-|z|) = erfc(|z| / sqrt 2) / 2: exact to rounding where Phi is small
  const T tail = T(0.5) * cpu::erfc_of_nonnegative(std::abs(z) * T(M_SQRT1_2));
  return z < T(0) ? tail : T(1) - tail;
#endif
}

enum class Activation { None, ReLU, LeakyReLU, SiLU, GELU, Sigmoid };

inline Activation parse_activation(std::string_view name) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::ReLU;
  if (name == "leaky_relu") return Activation::LeakyReLU;
  if (name == "silu") return Activation::SiLU;
  if (name == "gelu") return Activation::GELU;
  if (name == "sigmoid") return Activation::Sigmoid;
  TORCH_CHECK_VALUE(false, "activation must be one of none, relu, leaky_relu, silu, gelu, sigmoid; got '", name, "'");
}

// Backward needs one activation-sized tensor: the output y where the derivative is a function of
// y (relu, leaky_relu with slope >= 0, sigmoid), else the pre-activation z.
inline bool derivative_from_output(Activation act, double negative_slope) {
  return act == Activation::ReLU || act == Activation::Sigmoid || (act == Activation::LeakyReLU && negative_slope >= 0);
}

template <Activation A, typename T>
SEGFAST_HOST_DEVICE T activate(T z, T negative_slope) {
  if constexpr (A == Activation::ReLU) {
    return z > T(0) || z != z ? z : T(0);  // NaN propagates, as in torch.relu
  } else if constexpr (A == Activation::LeakyReLU) {
    return z > T(0) ? z : z * negative_slope;
  } else if constexpr (A == Activation::SiLU) {
    return z / (T(1) + activation_exp(-z));
  } else if constexpr (A == Activation::GELU) {
    return z * normal_cdf(z);
  } else if constexpr (A == Activation::Sigmoid) {
    return T(1) / (T(1) + activation_exp(-z));
  } else {
    return z;
  }
}

// d activation / dz, given `s`: the output y when derivative_from_output(), else z.
template <Activation A, typename T>
SEGFAST_HOST_DEVICE T activation_derivative(T s, T negative_slope) {
  if constexpr (A == Activation::ReLU) {
    return s <= T(0) ? T(0) : T(1);  // torch's threshold_backward: a NaN output passes the gradient
  } else if constexpr (A == Activation::LeakyReLU) {
    return s > T(0) ? T(1) : negative_slope;
  } else if constexpr (A == Activation::SiLU) {
    const T sig = T(1) / (T(1) + activation_exp(-s));
    return sig * (T(1) + s * (T(1) - sig));
  } else if constexpr (A == Activation::GELU) {
    const T pdf = activation_exp(T(-0.5) * s * s) * T(0.3989422804014327);  // 1/sqrt(2 pi)
    return normal_cdf(s) + s * pdf;
  } else if constexpr (A == Activation::Sigmoid) {
    return s * (T(1) - s);
  } else {
    return T(1);
  }
}

// Whether z can be recovered from y = act(z) (InPlace-ABN): the identity, and leaky_relu with a
// positive slope; relu loses every negative z, the others are not invertible in closed form.
inline bool invertible(Activation act, double negative_slope) {
  return act == Activation::None || (act == Activation::LeakyReLU && negative_slope > 0);
}

// z from y = act(z), for the invertible activations.
template <Activation A, typename T>
SEGFAST_HOST_DEVICE T inverse_activation(T y, T negative_slope) {
  if constexpr (A == Activation::LeakyReLU) {
    return y > T(0) ? y : y / negative_slope;
  } else {
    return y;
  }
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime value `act`.
template <typename F>
decltype(auto) dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::None:
      return f(std::integral_constant<Activation, Activation::None>{});
    case Activation::ReLU:
      return f(std::integral_constant<Activation, Activation::ReLU>{});
    case Activation::LeakyReLU:
      return f(std::integral_constant<Activation, Activation::LeakyReLU>{});
    case Activation::SiLU:
      return f(std::integral_constant<Activation, Activation::SiLU>{});
    case Activation::GELU:
      return f(std::integral_constant<Activation, Activation::GELU>{});
    case Activation::Sigmoid:
      return f(std::integral_constant<Activation, Activation::Sigmoid>{});
  }
  TORCH_CHECK(false, "unreachable activation");
}

}  // namespace segfast

#pragma once
// batch_norm_act: act(BatchNorm(x) [+ residual]) — what the CPU and CUDA kernels share.
//
// Per channel c, z = x * scale_c + shift_c (+ residual) with scale_c = weight_c * invstd_c and
// shift_c = bias_c - mean_c * scale_c (torch's batch_norm transform, same rounding), and out = act(z).
// Backward recomputes z from the saved input, g = grad_out * act'(z), and, over the channel's M
// values, sum_g = sum g, sum_gxhat = sum g * xhat (xhat = (x - mean) * invstd):
//   grad_input = weight * invstd * (g - sum_g / M - xhat * sum_gxhat / M)   (training)
//              = weight * invstd * g                                         (eval)
//   grad_weight = sum_gxhat, grad_bias = sum_g, grad_residual = g.
// InPlace-ABN (batch_norm_act_, inplace=True; Rota Bulo et al., CVPR 2018): the output overwrites
// the input and is all backward keeps; it inverts the activation, z = act^-1(y), and takes
// xhat = (z - residual - bias) / weight. Only invertible activations, and a weight without zeros.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "common/activation.h"
#include "common/checks.h"
#include "common/devices.h"
#include "common/layout.h"
#include "common/macros.h"

namespace segfast {

// act'(z) from z (the activations whose derivative torch takes from the output are evaluated first).
template <Activation A, typename T>
SEGFAST_HOST_DEVICE T derivative_at(T z, T negative_slope) {
  if constexpr (A == Activation::Sigmoid) {
    return activation_derivative<A>(activate<A>(z, negative_slope), negative_slope);
  } else {
    return activation_derivative<A>(z, negative_slope);
  }
}

// What backward recovers from a saved value v — the input x, or (kFromOutput, InPlace-ABN) the
// output y — and the residual r (0 without one): the pre-activation z, and u such that
// xhat = (u - center_c) * spread_c, where
//   from the input:  z = x * scale_c + shift_c + r,  u = x,      center = mean, spread = invstd
//   from the output: z = act^-1(y),                  u = z - r,  center = bias, spread = 1 / weight
template <typename acc_t>
struct Recovered {
  acc_t z, u;
};

template <bool kFromOutput, Activation A, typename acc_t>
SEGFAST_HOST_DEVICE Recovered<acc_t> recover(acc_t v, acc_t r, acc_t scale, acc_t shift, acc_t slope) {
  if constexpr (kFromOutput) {
    const acc_t z = inverse_activation<A>(v, slope);
    return {z, z - r};
  } else {
    return {v * scale + shift + r, v};
  }
}

// ------------------------------------------------------------------- host side, every backend

// (N, C, *) input: N * prod(*) values per channel.
inline int64_t values_per_channel(const at::Tensor& input) {
  return input.numel() / input.size(1);
}

inline void check_batch_norm_act_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& running_mean,
                                      const std::optional<at::Tensor>& running_var, bool training,
                                      const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "batch_norm_act";
  TORCH_CHECK_VALUE(input.dim() >= 2 && input.dim() <= 4, op, ": input must be (N, C), (N, C, L) or (N, C, H, W), got ",
                    input.sizes());
  check_float_dtype(op, "input", input);
  const auto t = input.scalar_type();
  const int64_t channels = input.size(1);
  auto check_vector = [&](const std::optional<at::Tensor>& v, const char* name) {
    if (!v || !v->defined()) return;
    TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == channels, op, ": ", name, " must have shape (", channels,
                      ",), got ", v->sizes());
    TORCH_CHECK_VALUE(v->device() == input.device(), op, ": ", name, " is on ", v->device(), " but input is on ",
                      input.device());
  };
  check_vector(weight, "weight");
  check_vector(bias, "bias");
  check_vector(running_mean, "running_mean");
  check_vector(running_var, "running_var");
  for (const auto* stat : {&running_mean, &running_var}) {
    if (*stat && (*stat)->defined()) {
      TORCH_CHECK_TYPE((*stat)->is_floating_point(), op, ": running statistics must be floating point, got ",
                       dtype_name((*stat)->scalar_type()));
    }
  }
  TORCH_CHECK_VALUE((running_mean && running_mean->defined()) == (running_var && running_var->defined()), op,
                    ": running_mean and running_var must be given together");
  TORCH_CHECK_VALUE(training || (running_mean && running_mean->defined()), op,
                    ": eval mode (training=False) needs running_mean and running_var");
  if (training) {
    TORCH_CHECK_VALUE(values_per_channel(input) > 1, op,
                      ": expected more than 1 value per channel when training, got input of size ", input.sizes());
  }
  if (residual && residual->defined()) {
    TORCH_CHECK_VALUE(residual->sizes() == input.sizes(), op, ": residual must have input's shape ", input.sizes(),
                      ", got ", residual->sizes());
    TORCH_CHECK_TYPE(residual->scalar_type() == t, op, ": residual dtype ", dtype_name(residual->scalar_type()),
                     " differs from input dtype ", dtype_name(t));
    TORCH_CHECK_VALUE(residual->device() == input.device(), op, ": residual is on ", residual->device(),
                      " but input is on ", input.device());
  }
}

// center_c and spread_c of xhat = (u - center_c) * spread_c (see recover), in mean's dtype.
inline std::pair<at::Tensor, at::Tensor> xhat_constants(bool from_output, const at::Tensor& mean,
                                                        const at::Tensor& invstd,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias) {
  if (!from_output) return {mean, invstd};
  const at::Tensor center = bias && bias->defined() ? bias->to(mean.scalar_type()).contiguous() : at::zeros_like(mean);
  const at::Tensor spread = weight && weight->defined()
                                ? weight->to(at::kDouble).reciprocal().to(mean.scalar_type()).contiguous()
                                : at::ones_like(mean);
  return {center, spread};
}

// InPlace-ABN's conditions: an invertible activation, and a weight backward can divide by.
inline void check_inplace_args(Activation act, double negative_slope, const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(invertible(act, negative_slope),
                    "batch_norm_act: inplace=True recovers the normalised input by inverting the activation, so it "
                    "needs activation 'none' or 'leaky_relu' with negative_slope > 0; relu, silu, gelu and sigmoid "
                    "lose what backward needs");
  if (weight && weight->defined()) {
    TORCH_CHECK_VALUE(!weight->eq(0).any().item<bool>(),
                      "batch_norm_act: inplace=True divides by weight in backward, and weight has zeros");
  }
}

// The forward's arguments after the input, as the backends' forward_into takes them.
struct BatchNormActArgs {
  const std::optional<at::Tensor>&weight, &bias, &running_mean, &running_var;
  bool training;
  double momentum, eps;
  Activation act;
  double negative_slope;
  const std::optional<at::Tensor>& residual;
};

// What a backend's backward kernel reads — the tensors checked and made dense in the saved tensor's
// layout (mean and invstd in the accumulation type, xhat's (center, spread): see recover()), the
// op's other arguments — and the activation-sized gradients it writes (undefined where not wanted).
struct BatchNormActBackwardOperands {
  at::Tensor saved, grad_out, residual, mean, invstd, center, spread;
  const std::optional<at::Tensor>&weight, &bias;
  bool training;
  Activation act;
  double negative_slope;
  bool from_output;
  std::array<bool, 4> output_mask;
  at::Tensor grad_input, grad_residual;
};

// The three entries of a backend: out of place, InPlace-ABN's batch_norm_act_ (the output overwrites
// the input: each value is read before it is written) and backward, around what the backend gives:
//   Backend::Guard                  its device guard (the CPU's does nothing);
//   Backend::empty_like(t)          its allocation of an activation-sized tensor;
//   Backend::forward_into(input, BatchNormActArgs, Tensor& out) -> (mean, invstd): the forward into
//                                   a dense tensor of input's shape and layout;
//   Backend::backward_into(BatchNormActBackwardOperands) -> (grad_weight, grad_bias) in the
//                                   accumulation type, undefined where not wanted.
template <typename Backend>
struct BatchNormActEntries {
  using Tensor = at::Tensor;
  using OptionalTensor = const std::optional<at::Tensor>&;

  // In TORCH_LIBRARY_IMPL(segfast, <backend's key>, m).
  static void register_for(torch::Library& m) {
    m.impl("batch_norm_act", &out_of_place);
    m.impl("batch_norm_act_", &in_place);
    m.impl("batch_norm_act_backward", &backward);
  }

  static std::tuple<Tensor, Tensor, Tensor> out_of_place(const Tensor& input_, OptionalTensor weight,
                                                         OptionalTensor bias, OptionalTensor running_mean,
                                                         OptionalTensor running_var, bool training, double momentum,
                                                         double eps, c10::string_view activation, double negative_slope,
                                                         OptionalTensor residual) {
    const typename Backend::Guard guard(input_.device());
    check_batch_norm_act_args(input_, weight, bias, running_mean, running_var, training, residual);
    const Tensor input = input_.contiguous(memory_format(input_));
    Tensor out = Backend::empty_like(input);
    const Activation act = parse_activation(activation);
    const BatchNormActArgs args{weight,   bias, running_mean, running_var,    training,
                                momentum, eps,  act,          negative_slope, residual};
    auto [mean, invstd] = Backend::forward_into(input, args, out);
    return {out, mean, invstd};
  }

  // A dense input is its own output; another is normalised in a dense copy, then written back.
  static std::tuple<Tensor, Tensor> in_place(const Tensor& input, OptionalTensor weight, OptionalTensor bias,
                                             OptionalTensor running_mean, OptionalTensor running_var, bool training,
                                             double momentum, double eps, c10::string_view activation,
                                             double negative_slope, OptionalTensor residual) {
    const typename Backend::Guard guard(input.device());
    check_batch_norm_act_args(input, weight, bias, running_mean, running_var, training, residual);
    const Activation act = parse_activation(activation);
    check_inplace_args(act, negative_slope, weight);
    Tensor dense = input.contiguous(memory_format(input));
    const BatchNormActArgs args{weight,   bias, running_mean, running_var,    training,
                                momentum, eps,  act,          negative_slope, residual};
    auto stats = Backend::forward_into(dense, args, dense);
    if (!dense.is_same(input)) input.copy_(dense);
    return stats;
  }

  // (grad_input, grad_residual, grad_weight, grad_bias); an unwanted one is an empty tensor, the
  // parameters' are in weight's dtype.
  static std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& saved,
                                                             OptionalTensor weight, OptionalTensor bias,
                                                             const Tensor& mean, const Tensor& invstd,
                                                             OptionalTensor residual, bool training,
                                                             c10::string_view activation, double negative_slope,
                                                             bool from_output, std::array<bool, 4> output_mask) {
    const typename Backend::Guard guard(saved.device());
    check_same_device("batch_norm_act_backward",
                      {named("saved", saved), named("grad_output", grad_output), named("weight", weight),
                       named("bias", bias), named("mean", mean), named("invstd", invstd), named("residual", residual)});
    BatchNormActBackwardOperands o{.weight = weight,
                                   .bias = bias,
                                   .training = training,
                                   .act = parse_activation(activation),
                                   .negative_slope = negative_slope,
                                   .from_output = from_output,
                                   .output_mask = output_mask};
    const at::MemoryFormat format = memory_format(saved);
    o.saved = saved.contiguous(format);
    o.grad_out = grad_output.contiguous(format);
    TORCH_CHECK_VALUE(o.grad_out.sizes() == o.saved.sizes(), "batch_norm_act_backward: grad_output ",
                      o.grad_out.sizes(), " and the saved ", from_output ? "output " : "input ", o.saved.sizes(),
                      " differ");
    if (residual && residual->defined()) o.residual = residual->contiguous(format);
    const auto acc_type = at::toOpMathType(saved.scalar_type());
    o.mean = mean.to(acc_type).contiguous();
    o.invstd = invstd.to(acc_type).contiguous();
    std::tie(o.center, o.spread) = xhat_constants(from_output, o.mean, o.invstd, weight, bias);
    if (output_mask[0]) o.grad_input = Backend::empty_like(o.saved);
    if (output_mask[1]) o.grad_residual = Backend::empty_like(o.saved);
    const auto [grad_weight, grad_bias] = Backend::backward_into(o);
    const Tensor& like_weight = weight && weight->defined() ? *weight : saved;
    auto activation_sized = [&](const Tensor& g) { return g.defined() ? g : at::empty({0}, saved.options()); };
    auto parameter = [&](const Tensor& g) {
      return g.defined() ? g.to(like_weight.scalar_type()) : at::empty({0}, like_weight.options());
    };
    return {activation_sized(o.grad_input), activation_sized(o.grad_residual), parameter(grad_weight),
            parameter(grad_bias)};
  }
};

// Calls f(std::integral_constant<bool, kFromOutput>{}, std::integral_constant<Activation, A>{}),
// instantiating the from-output kernels only for the invertible activations.
template <typename F>
void dispatch_saved_value(bool from_output, Activation act, F&& f) {
  dispatch_activation(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    if (!from_output) return f(std::false_type{}, a);
    if constexpr (A == Activation::None || A == Activation::LeakyReLU) {
      f(std::true_type{}, a);
    } else {
      TORCH_CHECK_VALUE(false, "batch_norm_act_backward: from_output needs an invertible activation");
    }
  });
}

}  // namespace segfast

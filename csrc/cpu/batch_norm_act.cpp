// batch_norm_act on CPU: act(BatchNorm(x) [+ residual]) for (N, C), (N, C, L) and (N, C, H, W)
// input, NCHW and channels_last read in place (math: common/batch_norm_act.h).
//
// Forward: one statistics pass (training), one normalise + activate pass. Backward: one pass for
// the two per-channel sums with the activation derivative fused in (training), one pass writing
// grad_input (and grad_residual). Per-channel sums are taken in double, in a fixed order: NCHW
// channels are reduced by one thread each; channels_last rows in fixed blocks whose partials are
// added in block order. The results are the same bits whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/batch_norm_act.h"
#include "common/layout.h"
#include "cpu/output_cache.h"
#include "cpu/vec_math.h"

namespace segfast {
namespace {

using at::Tensor;

constexpr int64_t kRowsPerBlock = 256;  // channels_last reduction blocks: fixed, so sums do not depend on threads

// The input as channel-major planes (NCHW: channel c of image n is `inner` contiguous values) or as
// rows of `channels` values (channels_last: batch * inner rows).
struct ChannelView {
  int64_t batch, channels, inner;
  bool channels_last;

  int64_t values() const { return batch * inner; }  // per channel
  int64_t rows() const { return batch * inner; }
  int64_t blocks() const { return (rows() + kRowsPerBlock - 1) / kRowsPerBlock; }
};

ChannelView view_of(const Tensor& t) {
  int64_t inner = 1;
  for (int64_t d = 2; d < t.dim(); ++d) inner *= t.size(d);
  return {t.size(0), t.size(1), inner, memory_format(t) == at::MemoryFormat::ChannelsLast};
}

// Per channel, two sums over the channel's values, in double, in a fixed order: `plane(base, c,
// count, s1, s2)` adds an NCHW plane's, `row(base, s1, s2)` a channels_last row's (every channel).
template <typename Plane, typename Row>
void channel_sums(const ChannelView& v, std::vector<double>& first, std::vector<double>& second, Plane&& plane,
                  Row&& row) {
  first.assign(v.channels, 0.0);
  second.assign(v.channels, 0.0);
  if (!v.channels_last) {
    at::parallel_for(0, v.channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double s1 = 0, s2 = 0;
        for (int64_t n = 0; n < v.batch; ++n) {
          const int64_t base = (n * v.channels + c) * v.inner;
          plane(base, c, v.inner, s1, s2);
        }
        first[c] = s1;
        second[c] = s2;
      }
    });
    return;
  }
  std::vector<double> partial(v.blocks() * 2 * v.channels, 0.0);
  at::parallel_for(0, v.blocks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double* p1 = partial.data() + b * 2 * v.channels;
      double* p2 = p1 + v.channels;
      const int64_t r1 = std::min(v.rows(), (b + 1) * kRowsPerBlock);
      for (int64_t r = b * kRowsPerBlock; r < r1; ++r) row(r * v.channels, p1, p2);
    }
  });
  for (int64_t b = 0; b < v.blocks(); ++b) {
    for (int64_t c = 0; c < v.channels; ++c) {
      first[c] += partial[b * 2 * v.channels + c];
      second[c] += partial[(b * 2 + 1) * v.channels + c];
    }
  }
}

// Sums of (x - shift) and its square over `count` values of one channel, and over one channels_last
// row (per channel): the variance from them does not cancel catastrophically.
template <typename scalar_t>
SEGFAST_CPU_MULTIVERSION void moment_plane(const scalar_t* x, double shift, int64_t count, double& s1, double& s2) {
  double a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < count; ++i) {
    const double d = static_cast<double>(cpu::widen<at::opmath_type<scalar_t>>(x[i])) - shift;
    a += d;
    b += d * d;
  }
  s1 += a;
  s2 += b;
}

template <typename scalar_t>
SEGFAST_CPU_MULTIVERSION void moment_row(const scalar_t* x, const double* shift, int64_t channels, double* s1,
                                         double* s2) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const double d = static_cast<double>(cpu::widen<at::opmath_type<scalar_t>>(x[c])) - shift[c];
    s1[c] += d;
    s2[c] += d * d;
  }
}

// Batch mean and 1 / sqrt(biased variance + eps) per channel, and the running statistics updated as
// torch updates them (momentum, unbiased variance).
template <typename scalar_t>
void batch_statistics_kernel(const Tensor& input, const ChannelView& v, double eps, double momentum, Tensor& mean,
                             Tensor& invstd, const std::optional<Tensor>& running_mean,
                             const std::optional<Tensor>& running_var) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  std::vector<double> shift(v.channels);
  for (int64_t c = 0; c < v.channels; ++c) {
    shift[c] = static_cast<double>(cpu::widen<acc_t>(x[v.channels_last ? c : c * v.inner]));
  }
  std::vector<double> sum, sum_sq;
  channel_sums(
      v, sum, sum_sq,
      [&](int64_t base, int64_t c, int64_t count, double& s1, double& s2) {
        moment_plane(x + base, shift[c], count, s1, s2);
      },
      [&](int64_t base, double* s1, double* s2) { moment_row(x + base, shift.data(), v.channels, s1, s2); });
  const double count = static_cast<double>(v.values());
  acc_t* m = mean.mutable_data_ptr<acc_t>();
  acc_t* is = invstd.mutable_data_ptr<acc_t>();
  std::vector<double> var(v.channels);
  for (int64_t c = 0; c < v.channels; ++c) {
    const double centred = sum[c] / count;
    m[c] = static_cast<acc_t>(shift[c] + centred);
    var[c] = std::max(0.0, sum_sq[c] / count - centred * centred);
    is[c] = static_cast<acc_t>(1.0 / std::sqrt(var[c] + eps));
  }
  if (running_mean && running_mean->defined()) {
    // torch: running = momentum * batch + (1 - momentum) * running, with the unbiased variance
    Tensor rm = running_mean->to(at::kDouble), rv = running_var->to(at::kDouble);
    double* rmp = rm.mutable_data_ptr<double>();
    double* rvp = rv.mutable_data_ptr<double>();
    for (int64_t c = 0; c < v.channels; ++c) {
      rmp[c] = momentum * static_cast<double>(m[c]) + (1 - momentum) * rmp[c];
      rvp[c] = momentum * var[c] * count / (count - 1) + (1 - momentum) * rvp[c];
    }
    running_mean->copy_(rm);
    running_var->copy_(rv);
  }
}

// Per channel: scale = weight * invstd, shift = bias - mean * scale (torch's transform).
template <typename acc_t>
void channel_affine(const ChannelView& v, const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, std::vector<acc_t>& scale, std::vector<acc_t>& shift) {
  const Tensor w = weight && weight->defined() ? weight->to(mean.scalar_type()).contiguous() : Tensor();
  const Tensor b = bias && bias->defined() ? bias->to(mean.scalar_type()).contiguous() : Tensor();
  const acc_t* m = mean.const_data_ptr<acc_t>();
  const acc_t* is = invstd.const_data_ptr<acc_t>();
  scale.resize(v.channels);
  shift.resize(v.channels);
  for (int64_t c = 0; c < v.channels; ++c) {
    scale[c] = (w.defined() ? w.const_data_ptr<acc_t>()[c] : acc_t(1)) * is[c];
    shift[c] = (b.defined() ? b.const_data_ptr<acc_t>()[c] : acc_t(0)) - m[c] * scale[c];
  }
}

// kResidual is a template flag, not a test of r inside the loop: GCC turns that test into masked
// loads from r = nullptr, and on Zen 4 each masked-off lane of an unmapped page is a microcode
// assist (SiLU forward 8x64x64x64: 6.9 ms this way, 0.5 ms without).
template <Activation A, bool kResidual, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void normalize_span(const scalar_t* x, const scalar_t* r, scalar_t* out, int64_t count,
                                             const at::opmath_type<scalar_t>* scale,
                                             const at::opmath_type<scalar_t>* shift, int64_t channel_step,
                                             at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  // channel_step 0: one channel (an NCHW plane); 1: one channels_last row
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const int64_t c = i * channel_step;
    acc_t z = cpu::widen<acc_t>(x[i]) * scale[c] + shift[c];
    if constexpr (kResidual) z += cpu::widen<acc_t>(r[i]);
    out[i] = cpu::narrow<scalar_t>(activate<A>(z, slope));
  }
}

template <Activation A, typename scalar_t>
void batch_norm_act_kernel(const Tensor& input, const Tensor* residual, const ChannelView& v,
                           const std::vector<at::opmath_type<scalar_t>>& scale,
                           const std::vector<at::opmath_type<scalar_t>>& shift, double negative_slope, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const scalar_t* r = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const auto slope = static_cast<acc_t>(negative_slope);
  auto with_residual = [&](auto residual_flag) {
    constexpr bool kResidual = decltype(residual_flag)::value;
    if (!v.channels_last) {
      at::parallel_for(0, v.batch * v.channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t base = plane * v.inner, c = plane % v.channels;
          normalize_span<A, kResidual>(x + base, kResidual ? r + base : nullptr, o + base, v.inner, scale.data() + c,
                                       shift.data() + c, 0, slope);
        }
      });
    } else {
      at::parallel_for(0, v.rows(), 64, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t base = row * v.channels;
          normalize_span<A, kResidual>(x + base, kResidual ? r + base : nullptr, o + base, v.channels, scale.data(),
                                       shift.data(), 1, slope);
        }
      });
    }
  };
  if (r != nullptr) {
    with_residual(std::true_type{});
  } else {
    with_residual(std::false_type{});
  }
}

// The forward into `out` (a dense tensor of input's shape and layout; it may be the input itself).
std::tuple<Tensor, Tensor> batch_norm_act_into(const Tensor& input, const BatchNormActArgs& args, Tensor& out) {
  const auto& [weight, bias, running_mean, running_var, training, momentum, eps, act, negative_slope, residual_] = args;
  const ChannelView v = view_of(input);
  const bool has_residual = residual_ && residual_->defined();
  const Tensor residual = has_residual ? residual_->contiguous(memory_format(input)) : Tensor();
  const auto acc_type = at::toOpMathType(input.scalar_type());
  Tensor mean = at::empty({v.channels}, input.options().dtype(acc_type));
  Tensor invstd = at::empty({v.channels}, input.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "batch_norm_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (training) {
      batch_statistics_kernel<scalar_t>(input, v, eps, momentum, mean, invstd, running_mean, running_var);
    } else {
      mean.copy_(*running_mean);
      invstd.copy_(running_var->to(at::kDouble).add(eps).rsqrt());
    }
    std::vector<acc_t> scale, shift;
    channel_affine<acc_t>(v, mean, invstd, weight, bias, scale, shift);
    dispatch_activation(act, [&](auto a) {
      batch_norm_act_kernel<decltype(a)::value, scalar_t>(input, has_residual ? &residual : nullptr, v, scale, shift,
                                                          negative_slope, out);
    });
  });
  return {mean, invstd};
}

// ---------------------------------------------------------------------------------------- backward

// What the backward passes read: the saved values v (the input, or the output for InPlace-ABN),
// the residual, grad_out, and per channel z's transform, xhat's (center, spread; see recover() in
// common/batch_norm_act.h) and the true invstd.
template <typename scalar_t>
struct BackwardInputs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *v, *r, *grad_out;
  const acc_t *scale, *shift, *center, *spread, *invstd;
  acc_t slope;
};

// Sums of g = grad_out * act'(z) and g * xhat over `count` values of channel c from `base`, and over
// one channels_last row. The channel's constants and the pointers are hoisted into locals: read
// through the struct, GCC reloads them every iteration and does not vectorise the loop. kResidual
// is a template flag, as for normalize_span.
template <bool kFromOutput, Activation A, bool kResidual, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void grad_sums_plane(const BackwardInputs<scalar_t>& s, int64_t base, int64_t c, int64_t count,
                                              double& s1, double& s2) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ v = s.v + base;
  const scalar_t* __restrict__ go = s.grad_out + base;
  const scalar_t* __restrict__ r = kResidual ? s.r + base : nullptr;
  const acc_t scale = s.scale[c], shift = s.shift[c], center = s.center[c], spread = s.spread[c], slope = s.slope;
  double a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < count; ++i) {
    const acc_t ri = kResidual ? cpu::widen<acc_t>(r[i]) : acc_t(0);
    const auto [z, u] = recover<kFromOutput, A>(cpu::widen<acc_t>(v[i]), ri, scale, shift, slope);
    const acc_t g = cpu::widen<acc_t>(go[i]) * derivative_at<A>(z, slope);
    a += static_cast<double>(g);
    b += static_cast<double>(g * ((u - center) * spread));
  }
  s1 += a;
  s2 += b;
}

template <bool kFromOutput, Activation A, bool kResidual, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void grad_sums_row(const BackwardInputs<scalar_t>& s, int64_t base, int64_t channels,
                                            double* s1, double* s2) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t r = kResidual ? cpu::widen<acc_t>(s.r[base + c]) : acc_t(0);
    const auto [z, u] = recover<kFromOutput, A>(cpu::widen<acc_t>(s.v[base + c]), r, s.scale[c], s.shift[c], s.slope);
    const acc_t g = cpu::widen<acc_t>(s.grad_out[base + c]) * derivative_at<A>(z, s.slope);
    s1[c] += static_cast<double>(g);
    s2[c] += static_cast<double>(g * ((u - s.center[c]) * s.spread[c]));
  }
}

// grad_input = a_c g + b_c + k_c xhat (training; eval: b = k = 0) and grad_residual = g, over `count`
// values from `base`: one NCHW plane of channel c (kRow false: the channel's constants are scalars)
// or one channels_last row (kRow: they are indexed by the value's position). Which outputs are
// written and whether a residual is read are template flags: conditional stores inside the loop
// keep GCC from vectorising it.
template <bool kFromOutput, Activation A, bool kRow, bool kResidual, bool kGradIn, bool kGradRes, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void grad_span(const BackwardInputs<scalar_t>& s, int64_t base, int64_t count, int64_t c0,
                                        const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
                                        const at::opmath_type<scalar_t>* k, scalar_t* grad_in, scalar_t* grad_res) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ v = s.v + base;
  const scalar_t* __restrict__ go = s.grad_out + base;
  const scalar_t* __restrict__ r = kResidual ? s.r + base : nullptr;
  scalar_t* __restrict__ gi = kGradIn ? grad_in + base : nullptr;
  scalar_t* __restrict__ gr = kGradRes ? grad_res + base : nullptr;
  const acc_t* __restrict__ scale = s.scale + c0, * __restrict__ shift = s.shift + c0, * __restrict__ center = s.center + c0;
  const acc_t* __restrict__ spread = s.spread + c0, * __restrict__ ac = a + c0, * __restrict__ bc = b + c0;
  const acc_t* __restrict__ kc = k + c0;
  const acc_t slope = s.slope;
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const int64_t c = kRow ? i : 0;
    const acc_t ri = kResidual ? cpu::widen<acc_t>(r[i]) : acc_t(0);
    const auto [z, u] = recover<kFromOutput, A>(cpu::widen<acc_t>(v[i]), ri, scale[c], shift[c], slope);
    const acc_t g = cpu::widen<acc_t>(go[i]) * derivative_at<A>(z, slope);
    if constexpr (kGradIn) gi[i] = cpu::narrow<scalar_t>(ac[c] * g + bc[c] + kc[c] * ((u - center[c]) * spread[c]));
    if constexpr (kGradRes) gr[i] = cpu::narrow<scalar_t>(g);
  }
}

// Calls f(kResidual, kGradIn, kGradRes) as compile-time flags.
template <typename F>
void dispatch_grad_outputs(bool residual, bool grad_in, bool grad_res, F&& f) {
  auto flag = [](bool v, auto&& g) { return v ? g(std::true_type{}) : g(std::false_type{}); };
  flag(residual, [&](auto r) { flag(grad_in, [&](auto i) { flag(grad_res, [&](auto o) { f(r, i, o); }); }); });
}

template <bool kFromOutput, Activation A, typename scalar_t>
void batch_norm_act_backward_kernel(const BackwardInputs<scalar_t>& s, const ChannelView& v, bool training,
                                    const at::opmath_type<scalar_t>* weight, const Tensor& grad_in,
                                    const Tensor& grad_res, Tensor& grad_weight, Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<double> sum_g, sum_gxhat;
  const bool need_sums = training || grad_weight.defined() || grad_bias.defined();
  auto sums = [&](auto residual_flag) {
    constexpr bool kResidual = decltype(residual_flag)::value;
    channel_sums(
        v, sum_g, sum_gxhat,
        [&](int64_t base, int64_t c, int64_t count, double& s1, double& s2) {
          grad_sums_plane<kFromOutput, A, kResidual>(s, base, c, count, s1, s2);
        },
        [&](int64_t base, double* s1, double* s2) {
          grad_sums_row<kFromOutput, A, kResidual>(s, base, v.channels, s1, s2);
        });
  };
  if (need_sums) {
    if (s.r != nullptr) {
      sums(std::true_type{});
    } else {
      sums(std::false_type{});
    }
  }
  std::vector<acc_t> a(v.channels), b(v.channels, acc_t(0)), k(v.channels, acc_t(0));
  const double count = static_cast<double>(v.values());
  for (int64_t c = 0; c < v.channels; ++c) {
    const acc_t wk = (weight ? weight[c] : acc_t(1)) * s.invstd[c];
    a[c] = wk;
    if (training) {
      b[c] = static_cast<acc_t>(-static_cast<double>(wk) * sum_g[c] / count);
      k[c] = static_cast<acc_t>(-static_cast<double>(wk) * sum_gxhat[c] / count);
    }
  }
  if (grad_weight.defined()) {
    for (int64_t c = 0; c < v.channels; ++c)
      grad_weight.mutable_data_ptr<acc_t>()[c] = static_cast<acc_t>(sum_gxhat[c]);
  }
  if (grad_bias.defined()) {
    for (int64_t c = 0; c < v.channels; ++c) grad_bias.mutable_data_ptr<acc_t>()[c] = static_cast<acc_t>(sum_g[c]);
  }
  scalar_t* gi = grad_in.defined() ? grad_in.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gr = grad_res.defined() ? grad_res.mutable_data_ptr<scalar_t>() : nullptr;
  if (gi == nullptr && gr == nullptr) return;
  dispatch_grad_outputs(s.r != nullptr, gi != nullptr, gr != nullptr, [&](auto res, auto in, auto out) {
    constexpr bool kRes = decltype(res)::value, kIn = decltype(in)::value, kOut = decltype(out)::value;
    if (!v.channels_last) {
      at::parallel_for(0, v.batch * v.channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          grad_span<kFromOutput, A, false, kRes, kIn, kOut>(s, plane * v.inner, v.inner, plane % v.channels, a.data(),
                                                            b.data(), k.data(), gi, gr);
        }
      });
    } else {
      at::parallel_for(0, v.rows(), 64, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          grad_span<kFromOutput, A, true, kRes, kIn, kOut>(s, row * v.channels, v.channels, 0, a.data(), b.data(),
                                                           k.data(), gi, gr);
        }
      });
    }
  });
}

std::pair<Tensor, Tensor> batch_norm_act_backward_into(const BatchNormActBackwardOperands& o) {
  const ChannelView v = view_of(o.saved);
  const bool affine = o.weight && o.weight->defined();
  Tensor grad_weight = o.output_mask[2] && affine ? at::empty({v.channels}, o.mean.options()) : Tensor();
  Tensor grad_bias = o.output_mask[3] && affine ? at::empty({v.channels}, o.mean.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, o.saved.scalar_type(), "batch_norm_act_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> scale, shift;
    channel_affine<acc_t>(v, o.mean, o.invstd, o.weight, o.bias, scale, shift);
    const Tensor w = affine ? o.weight->to(o.mean.scalar_type()).contiguous() : Tensor();
    dispatch_saved_value(o.from_output, o.act, [&](auto from_out, auto a) {
      const BackwardInputs<scalar_t> inputs{o.saved.const_data_ptr<scalar_t>(),
                                            o.residual.defined() ? o.residual.const_data_ptr<scalar_t>() : nullptr,
                                            o.grad_out.const_data_ptr<scalar_t>(),
                                            scale.data(),
                                            shift.data(),
                                            o.center.const_data_ptr<acc_t>(),
                                            o.spread.const_data_ptr<acc_t>(),
                                            o.invstd.const_data_ptr<acc_t>(),
                                            static_cast<acc_t>(o.negative_slope)};
      batch_norm_act_backward_kernel<decltype(from_out)::value, decltype(a)::value, scalar_t>(
          inputs, v, o.training, affine ? w.const_data_ptr<acc_t>() : nullptr, o.grad_input, o.grad_residual,
          grad_weight, grad_bias);
    });
  });
  return {grad_weight, grad_bias};
}

struct CpuBackend {
  static constexpr auto forward_into = &batch_norm_act_into;
  static constexpr auto backward_into = &batch_norm_act_backward_into;
  static Tensor empty_like(const Tensor& t) { return cpu::empty_like_cached(t); }
  struct Guard {  // one device: nothing to set
    explicit Guard(c10::Device) {}
  };
};

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  BatchNormActEntries<CpuBackend>::register_for(m);
}

}  // namespace segfast

// Per-pixel softmax cross-entropy on CPU, straight on (N, C, S) logits of any strides, tile by
// tile (cpu/softmax_tile.h). Backward recomputes softmax from the saved per-pixel log-sum-exp. Sums over pixels go
// through per-tile partials added in a fixed order, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <limits>
#include <string_view>
#include <vector>

#include "common/layout.h"
#include "common/macros.h"
#include "common/reduction.h"
#include "cpu/output_cache.h"
#include "cpu/softmax_tile.h"
#include "cpu/vec_math.h"

namespace segfast {
namespace {

using at::Tensor;
using cpu::dispatch_unit_stride;
using cpu::for_each_tile;
using cpu::Geometry;
using cpu::geometry_of;
using cpu::kTile;
using cpu::Tile;
using cpu::tile_at;
using cpu::tile_logsumexp;

// dot[j] = sum_c coef(c, j) x(c, j) and mass[j] = sum_c coef(c, j), where coef(c, j) is w_c
// (class-index targets, for label smoothing) or w_c q'(c, j) with q' the smoothed target
// probabilities (probability targets).
template <typename scalar_t, bool kUnit, bool kProb>
SEGFAST_CPU_MULTIVERSION void tile_weighted_sums(const Tile<scalar_t, kUnit> t, const scalar_t* prob,
                                                 const at::opmath_type<scalar_t>* weight,
                                                 at::opmath_type<scalar_t> smoothing, at::opmath_type<scalar_t>* dot,
                                                 at::opmath_type<scalar_t>* mass) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  const acc_t keep = acc_t(1) - smoothing, spread = smoothing / static_cast<acc_t>(t.classes);
  for (int64_t j = 0; j < t.pixels; ++j) dot[j] = mass[j] = 0;
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
    const scalar_t* q = kProb ? prob + c * t.class_stride : nullptr;
    const acc_t w = weight ? weight[c] : acc_t(1);
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t coef = kProb ? w * (keep * cpu::widen<acc_t>(q[j * ps]) + spread) : w;
      dot[j] += coef * cpu::widen<acc_t>(x[j * ps]);
      mass[j] += coef;
    }
  }
}

// grad(c, j) = scale[j] * (softmax(c, j) * mass[j] - coef(c, j)), coef as above but multiplied by
// `spread` for class-index targets (whose target-class term the caller adds).
template <typename scalar_t, bool kUnit, bool kProb>
SEGFAST_CPU_MULTIVERSION void tile_grad(const Tile<scalar_t, kUnit> t, const scalar_t* prob,
                                        const at::opmath_type<scalar_t>* weight, at::opmath_type<scalar_t> smoothing,
                                        const at::opmath_type<scalar_t>* lse, const at::opmath_type<scalar_t>* mass,
                                        const at::opmath_type<scalar_t>* scale, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  const acc_t keep = acc_t(1) - smoothing, spread = smoothing / static_cast<acc_t>(t.classes);
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
    const scalar_t* q = kProb ? prob + c * t.class_stride : nullptr;
    scalar_t* g = grad + c * t.class_stride;
    const acc_t w = weight ? weight[c] : acc_t(1);
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t coef = kProb ? w * (keep * cpu::widen<acc_t>(q[j * ps]) + spread) : w * spread;
      const acc_t p = cpu::exp_vec(cpu::widen<acc_t>(x[j * ps]) - lse[j]);
      g[j * ps] = cpu::narrow<scalar_t>(scale[j] * (p * mass[j] - coef));
    }
  }
}

// Class weights (none: every class weighs 1) and label smoothing, in the accumulation type.
template <typename acc_t>
struct LossTerms {
  std::vector<acc_t> weight;              // empty when no weight was given
  acc_t weight_total, smoothing, spread;  // spread = smoothing / classes

  LossTerms(const std::optional<Tensor>& w, int64_t classes, double label_smoothing)
      : weight_total(static_cast<acc_t>(classes)),
        smoothing(static_cast<acc_t>(label_smoothing)),
        spread(static_cast<acc_t>(label_smoothing / static_cast<double>(classes))) {
    if (w && w->defined()) {
      TORCH_CHECK_VALUE(w->dim() == 1 && w->numel() == classes, "weight: expected shape (", classes, ",), got ",
                        w->sizes());
      const Tensor wd = w->to(at::kDouble).contiguous();
      weight.assign(wd.const_data_ptr<double>(), wd.const_data_ptr<double>() + classes);
      weight_total = 0;
      for (acc_t v : weight) weight_total += v;
    }
  }
  const acc_t* weights() const { return weight.empty() ? nullptr : weight.data(); }
  acc_t of(int64_t c) const { return weight.empty() ? acc_t(1) : weight[c]; }
};

void check_inputs(const Tensor& input, const Tensor& target, bool prob) {
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
}

// Probability targets are read with the logits' offsets.
Tensor with_logit_strides(const Tensor& target, const Tensor& input, bool prob) {
  if (!prob || target.strides() == input.strides()) return target;
  return at::empty_like(input).copy_(target);
}

// What forward and backward both derive from their arguments.
struct Problem {
  Tensor input, target;  // dense logits; the target, probabilities laid out like the logits
  bool prob;
  Reduction reduction;
  Geometry g;
};

Problem prepare(const Tensor& input_, const Tensor& target_, c10::string_view reduction) {
  const Tensor input = dense(input_);
  const bool prob = at::isFloatingType(target_.scalar_type());
  check_inputs(input, target_, prob);
  return {input, with_logit_strides(target_, input, prob), prob, parse_reduction(reduction), geometry_of(input)};
}

template <typename F>
void dispatch_target(const Tensor& target, F&& f) {
  switch (target.scalar_type()) {
    case at::kLong:
      return f(int64_t{});
    case at::kInt:
      return f(int32_t{});
    case at::kByte:
      return f(uint8_t{});
    default:
      TORCH_CHECK_VALUE(false,
                        "cross_entropy: target must be int64, int32 or uint8 class indices, or "
                        "probabilities of the input's dtype; got ",
                        target.scalar_type());
  }
}

std::tuple<Tensor, Tensor, Tensor> cross_entropy_cpu(const Tensor& input_, const Tensor& target_,
                                                     const std::optional<Tensor>& weight, c10::string_view reduction_,
                                                     int64_t ignore_index, double label_smoothing) {
  const auto [input, target, prob, reduction, g] = prepare(input_, target_, reduction_);
  Tensor lse = at::empty({g.batch, g.pixels}, input.options().dtype(at::toOpMathType(input.scalar_type())));
  Tensor loss =
      reduction == Reduction::None ? at::empty({g.batch, g.pixels}, input.options()) : at::empty({}, input.options());
  std::vector<double> tile_loss(g.tiles()), tile_weight(g.tiles());

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LossTerms<acc_t> terms(weight, g.classes, label_smoothing);
    const acc_t* wp = terms.weights();
    const acc_t eps = terms.smoothing, spread = terms.spread;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
    scalar_t* loss_p = reduction == Reduction::None ? loss.mutable_data_ptr<scalar_t>() : nullptr;

    dispatch_unit_stride(g, [&](auto unit) {
      constexpr bool kUnit = decltype(unit)::value;
      for_each_tile(g, [&](int64_t n, int64_t s0, int64_t pixels, int64_t tile) {
        const auto t = tile_at<scalar_t, kUnit>(x, g, n, s0, pixels);
        acc_t* tile_lse = lse_p + n * g.pixels + s0;
        tile_logsumexp(t, tile_lse);
        acc_t dot[kTile], mass[kTile], pixel_loss[kTile], pixel_weight[kTile];
        if (prob) {
          const scalar_t* q = target.const_data_ptr<scalar_t>() + (t.data - x);
          tile_weighted_sums<scalar_t, kUnit, true>(t, q, wp, eps, dot, mass);
          for (int64_t j = 0; j < pixels; ++j) {
            pixel_loss[j] = tile_lse[j] * mass[j] - dot[j];
            pixel_weight[j] = 1;
          }
        } else {
          if (eps != 0) tile_weighted_sums<scalar_t, kUnit, false>(t, nullptr, wp, eps, dot, mass);
          dispatch_target(target, [&](auto index) {
            using index_t = decltype(index);
            const index_t* tgt = target.const_data_ptr<index_t>() + n * target.stride(0) + s0 * target.stride(1);
            for (int64_t j = 0; j < pixels; ++j) {
              const int64_t cls = static_cast<int64_t>(tgt[j * target.stride(1)]);
              if (cls == ignore_index) {
                pixel_loss[j] = pixel_weight[j] = 0;
                continue;
              }
              TORCH_CHECK_INDEX(cls >= 0 && cls < g.classes, "cross_entropy: target class ", cls, " at (n=", n,
                                ", pixel=", s0 + j, ") is outside [0, ", g.classes, ") and is not ignore_index (",
                                ignore_index, ")");
              const acc_t wt = terms.of(cls);
              const acc_t nll = tile_lse[j] - cpu::widen<acc_t>(t.row(cls)[j * t.pixel_stride()]);
              pixel_loss[j] = (1 - eps) * wt * nll;
              if (eps != 0) pixel_loss[j] += spread * (terms.weight_total * tile_lse[j] - dot[j]);
              pixel_weight[j] = wt;
            }
          });
        }
        if (loss_p) {
          for (int64_t j = 0; j < pixels; ++j) loss_p[n * g.pixels + s0 + j] = cpu::narrow<scalar_t>(pixel_loss[j]);
        } else {
          double l = 0, wsum = 0;
          for (int64_t j = 0; j < pixels; ++j) {
            l += pixel_loss[j];
            wsum += pixel_weight[j];
          }
          tile_loss[tile] = l;
          tile_weight[tile] = wsum;
        }
      });
    });
  });

  double loss_sum = 0, weight_sum = 0;
  for (int64_t i = 0; i < g.tiles(); ++i) {
    loss_sum += tile_loss[i];
    weight_sum += tile_weight[i];
  }
  if (prob) weight_sum = static_cast<double>(g.batch * g.pixels);  // torch: plain mean over pixels
  if (reduction != Reduction::None) loss.fill_(reduction == Reduction::Mean ? loss_sum / weight_sum : loss_sum);
  Tensor total_weight = at::scalar_tensor(weight_sum, input.options().dtype(lse.scalar_type()));
  return {loss, lse, total_weight};
}

Tensor cross_entropy_backward_cpu(const Tensor& grad_loss, const Tensor& input_, const Tensor& target_,
                                  const std::optional<Tensor>& weight, const Tensor& lse_, const Tensor& total_weight,
                                  c10::string_view reduction_, int64_t ignore_index, double label_smoothing) {
  const auto [input, target, prob, reduction, g] = prepare(input_, target_, reduction_);
  const Tensor lse = lse_.contiguous();
  const Tensor grad_pixels = reduction == Reduction::None ? grad_loss.to(lse.scalar_type()).contiguous()
                                                          : grad_loss.to(lse.scalar_type()).reshape({});
  Tensor grad = cpu::empty_like_cached(input);  // keeps the logits' strides

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "cross_entropy_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LossTerms<acc_t> terms(weight, g.classes, label_smoothing);
    const acc_t* wp = terms.weights();
    const acc_t eps = terms.smoothing, spread = terms.spread;
    const acc_t* gp = grad_pixels.const_data_ptr<acc_t>();
    // d reduce / d pixel_loss
    const acc_t reduced_scale = reduction == Reduction::Mean ? gp[0] / total_weight.item<acc_t>()
                                                             : (reduction == Reduction::Sum ? gp[0] : acc_t(0));
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* grad_p = grad.mutable_data_ptr<scalar_t>();
    const acc_t* lse_p = lse.const_data_ptr<acc_t>();

    dispatch_unit_stride(g, [&](auto unit) {
      constexpr bool kUnit = decltype(unit)::value;
      for_each_tile(g, [&](int64_t n, int64_t s0, int64_t pixels, int64_t) {
        const auto t = tile_at<scalar_t, kUnit>(x, g, n, s0, pixels);
        const acc_t* tile_lse = lse_p + n * g.pixels + s0;
        scalar_t* tile_grad_p = grad_p + (t.data - x);
        acc_t scale[kTile], mass[kTile], dot[kTile];
        for (int64_t j = 0; j < pixels; ++j) {
          scale[j] = reduction == Reduction::None ? gp[n * g.pixels + s0 + j] : reduced_scale;
        }
        if (prob) {
          const scalar_t* q = target.const_data_ptr<scalar_t>() + (t.data - x);
          tile_weighted_sums<scalar_t, kUnit, true>(t, q, wp, eps, dot, mass);
          tile_grad<scalar_t, kUnit, true>(t, q, wp, eps, tile_lse, mass, scale, tile_grad_p);
          return;
        }
        dispatch_target(target, [&](auto index) {
          using index_t = decltype(index);
          const index_t* tgt = target.const_data_ptr<index_t>() + n * target.stride(0) + s0 * target.stride(1);
          int64_t cls[kTile];
          for (int64_t j = 0; j < pixels; ++j) {
            cls[j] = static_cast<int64_t>(tgt[j * target.stride(1)]);
            const bool ignored = cls[j] == ignore_index;
            TORCH_CHECK_INDEX(ignored || (cls[j] >= 0 && cls[j] < g.classes), "cross_entropy: target class ", cls[j],
                              " is outside [0, ", g.classes, ")");
            const acc_t wt = ignored ? acc_t(0) : terms.of(cls[j]);
            mass[j] = (1 - eps) * wt + spread * terms.weight_total;
            if (ignored) scale[j] = 0;  // also when the mean's total weight is 0 (torch gives 0, not NaN)
          }
          tile_grad<scalar_t, kUnit, false>(t, nullptr, wp, eps, tile_lse, mass, scale, tile_grad_p);
          for (int64_t j = 0; j < pixels; ++j) {
            if (cls[j] == ignore_index) continue;
            scalar_t& gt = tile_grad_p[cls[j] * t.class_stride + j * t.pixel_stride()];
            const acc_t wt = terms.of(cls[j]);
            gt = cpu::narrow<scalar_t>(cpu::widen<acc_t>(gt) - scale[j] * (1 - eps) * wt);
          }
        });
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
}

}  // namespace segfast

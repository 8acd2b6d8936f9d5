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
#include <type_traits>
#include <vector>

#include "common/class_index.h"
#include "common/cross_entropy.h"
#include "common/layout.h"
#include "common/macros.h"
#include "common/reduction.h"
#include "cpu/output_cache.h"
#include "cpu/softmax_tile.h"
#include "cpu/vec_math.h"

namespace segfast {
namespace {

using at::Tensor;
using cpu::for_each_tile;
using cpu::kTile;
using cpu::Tile;
using cpu::tile_at;
using cpu::tile_logsumexp;
using cpu::TileGrid;

// dot[j] = sum_c coef(c, j) x(c, j) and mass[j] = sum_c coef(c, j), where coef(c, j) is w_c
// (class-index targets, for label smoothing) or the probability-target coef_c of
// common/cross_entropy.h.
template <typename scalar_t, bool kUnit, bool kProb>
SEGFAST_CPU_MULTIVERSION void tile_weighted_sums(const Tile<scalar_t, kUnit> t, const scalar_t* prob,
                                                 const at::opmath_type<scalar_t>* weight,
                                                 at::opmath_type<scalar_t> smoothing, at::opmath_type<scalar_t>* dot,
                                                 at::opmath_type<scalar_t>* mass) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  const LabelSmoothing<acc_t> ls(smoothing, t.classes);
  for (int64_t j = 0; j < t.pixels; ++j) dot[j] = mass[j] = 0;
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
    const scalar_t* q = kProb ? prob + c * t.class_stride : nullptr;
    const acc_t w = weight ? weight[c] : acc_t(1);
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t coef = kProb ? ls.probability_coef(w, cpu::widen<acc_t>(q[j * ps])) : w;
      dot[j] += coef * cpu::widen<acc_t>(x[j * ps]);
      mass[j] += coef;
    }
  }
}

// grad(c, j) = scale[j] * (softmax(c, j) * mass[j] - coef(c, j)), coef as above, its spread part
// for class-index targets (whose target-class term the caller adds).
template <typename scalar_t, bool kUnit, bool kProb>
SEGFAST_CPU_MULTIVERSION void tile_grad(const Tile<scalar_t, kUnit> t, const scalar_t* prob,
                                        const at::opmath_type<scalar_t>* weight, at::opmath_type<scalar_t> smoothing,
                                        const at::opmath_type<scalar_t>* lse, const at::opmath_type<scalar_t>* mass,
                                        const at::opmath_type<scalar_t>* scale, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  const LabelSmoothing<acc_t> ls(smoothing, t.classes);
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
    const scalar_t* q = kProb ? prob + c * t.class_stride : nullptr;
    scalar_t* g = grad + c * t.class_stride;
    const acc_t w = weight ? weight[c] : acc_t(1);
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t coef = kProb ? ls.probability_coef(w, cpu::widen<acc_t>(q[j * ps])) : ls.spread_coef(w);
      const acc_t p = cpu::exp_vec(cpu::widen<acc_t>(x[j * ps]) - lse[j]);
      g[j * ps] = cpu::narrow<scalar_t>(scale[j] * (p * mass[j] - coef));
    }
  }
}

// Class weights (none: every class weighs 1) and label smoothing, in the accumulation type.
template <typename acc_t>
struct LossTerms {
  std::vector<acc_t> weight;  // empty when no weight was given
  acc_t weight_total, smoothing;
  LabelSmoothing<acc_t> ls;

  LossTerms(const std::optional<Tensor>& w, int64_t classes, double label_smoothing)
      : weight_total(static_cast<acc_t>(classes)),
        smoothing(static_cast<acc_t>(label_smoothing)),
        ls(static_cast<acc_t>(label_smoothing), classes) {
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

// Probability targets are read with the logits' offsets.
Tensor with_logit_strides(const Tensor& target, const Tensor& input, bool prob) {
  if (!prob || target.strides() == input.strides()) return target;
  return at::empty_like(input).copy_(target);
}

// What forward and backward both derive from their arguments.
struct Operands {
  Tensor input, target;  // dense logits; the target, probabilities laid out like the logits
  bool prob;
  Reduction reduction;
  TileGrid g;
};

Operands prepare(const Tensor& input_, const Tensor& target_, c10::string_view reduction) {
  const Tensor input = dense(input_);
  const bool prob = at::isFloatingType(target_.scalar_type());
  check_cross_entropy_args(input, target_, prob);
  return {input, with_logit_strides(target_, input, prob), prob, parse_reduction(reduction), cpu::tile_grid(input)};
}

// What the kernels read: logits, and the target (class indices, or probabilities laid out like the logits).
template <typename scalar_t, typename target_t>
struct Pointers {
  const scalar_t* logits;
  const target_t* target;
  int64_t target_batch_stride, target_pixel_stride;

  explicit Pointers(const Operands& in)
      : logits(in.input.const_data_ptr<scalar_t>()),
        target(in.target.const_data_ptr<target_t>()),
        target_batch_stride(in.target.stride(0)),
        target_pixel_stride(in.target.stride(1)) {}
  int64_t class_at(int64_t n, int64_t s) const {
    return static_cast<int64_t>(target[n * target_batch_stride + s * target_pixel_stride]);
  }
};

// Calls f(target_t{}, kUnit) once per call: the target's element type (the logits' scalar_t for
// probabilities, else the class-index type) and whether pixels are contiguous.
template <typename scalar_t, typename F>
void dispatch_target_and_stride(const Operands& in, F&& f) {
  auto with_target = [&](auto target) { cpu::dispatch_unit_stride(in.g, [&](auto unit) { f(target, unit); }); };
  if (in.prob) return with_target(scalar_t{});
  dispatch_class_index(in.target.scalar_type(), "cross_entropy: class-index target", with_target);
}

template <typename scalar_t, typename target_t, bool kUnit>
void cross_entropy_kernel(const Operands& in, const LossTerms<at::opmath_type<scalar_t>>& terms, int64_t ignore_index,
                          at::opmath_type<scalar_t>* lse, scalar_t* loss, std::vector<double>& tile_loss,
                          std::vector<double>& tile_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kProb = !std::is_integral_v<target_t>;
  const TileGrid& g = in.g;
  const Pointers<scalar_t, target_t> p(in);
  for_each_tile(g, [&](int64_t n, int64_t s0, int64_t pixels, int64_t tile) {
    const auto t = tile_at<scalar_t, kUnit>(p.logits, g, n, s0, pixels);
    acc_t* tile_lse = lse + n * g.pixels + s0;
    tile_logsumexp(t, tile_lse);
    acc_t dot[kTile], mass[kTile], pixel_loss[kTile], pixel_weight[kTile];
    if constexpr (kProb) {
      tile_weighted_sums<scalar_t, kUnit, true>(t, p.target + (t.data - p.logits), terms.weights(), terms.smoothing,
                                                dot, mass);
      for (int64_t j = 0; j < pixels; ++j) {
        pixel_loss[j] = tile_lse[j] * mass[j] - dot[j];
        pixel_weight[j] = 1;
      }
    } else {
      if (terms.smoothing != 0) {
        tile_weighted_sums<scalar_t, kUnit, false>(t, nullptr, terms.weights(), terms.smoothing, dot, mass);
      }
      for (int64_t j = 0; j < pixels; ++j) {
        const int64_t cls = p.class_at(n, s0 + j);
        if (cls == ignore_index) {
          pixel_loss[j] = pixel_weight[j] = 0;
          continue;
        }
        check_class_index("cross_entropy", cls, n, s0 + j, g.classes, ignore_index);
        const acc_t wt = terms.of(cls);
        const acc_t nll = tile_lse[j] - cpu::widen<acc_t>(t.row(cls)[j * t.pixel_stride()]);
        pixel_loss[j] = terms.ls.target_coef(wt) * nll;
        if (terms.smoothing != 0) pixel_loss[j] += terms.ls.spread * (terms.weight_total * tile_lse[j] - dot[j]);
        pixel_weight[j] = wt;
      }
    }
    if (loss != nullptr) {
      for (int64_t j = 0; j < pixels; ++j) loss[n * g.pixels + s0 + j] = cpu::narrow<scalar_t>(pixel_loss[j]);
    } else {
      tile_loss[tile] = cpu::sum_in_order(pixel_loss, pixels);
      tile_weight[tile] = cpu::sum_in_order(pixel_weight, pixels);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> cross_entropy_cpu(const Tensor& input_, const Tensor& target_,
                                                     const std::optional<Tensor>& weight, c10::string_view reduction_,
                                                     int64_t ignore_index, double label_smoothing) {
  const Operands in = prepare(input_, target_, reduction_);
  const TileGrid& g = in.g;
  const bool per_pixel = in.reduction == Reduction::None;
  Tensor lse = at::empty({g.batch, g.pixels}, in.input.options().dtype(at::toOpMathType(in.input.scalar_type())));
  Tensor loss = per_pixel ? at::empty({g.batch, g.pixels}, in.input.options()) : at::empty({}, in.input.options());
  std::vector<double> tile_loss(per_pixel ? 0 : g.tiles()), tile_weight(per_pixel ? 0 : g.tiles());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.input.scalar_type(), "cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LossTerms<acc_t> terms(weight, g.classes, label_smoothing);
    dispatch_target_and_stride<scalar_t>(in, [&](auto target, auto unit) {
      cross_entropy_kernel<scalar_t, decltype(target), decltype(unit)::value>(
          in, terms, ignore_index, lse.mutable_data_ptr<acc_t>(),
          per_pixel ? loss.mutable_data_ptr<scalar_t>() : nullptr, tile_loss, tile_weight);
    });
  });
  const double loss_sum = cpu::sum_in_order(tile_loss);
  // probability targets: a plain mean over pixels, as torch
  const double weight_sum = in.prob ? static_cast<double>(g.batch * g.pixels) : cpu::sum_in_order(tile_weight);
  if (!per_pixel) loss.fill_(in.reduction == Reduction::Mean ? loss_sum / weight_sum : loss_sum);
  Tensor total_weight = at::scalar_tensor(weight_sum, in.input.options().dtype(lse.scalar_type()));
  return {loss, lse, total_weight};
}

template <typename scalar_t, typename target_t, bool kUnit>
void cross_entropy_backward_kernel(const Operands& in, const LossTerms<at::opmath_type<scalar_t>>& terms,
                                   int64_t ignore_index, const at::opmath_type<scalar_t>* lse,
                                   const at::opmath_type<scalar_t>* grad_pixels, at::opmath_type<scalar_t> grad_scale,
                                   scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kProb = !std::is_integral_v<target_t>;
  const TileGrid& g = in.g;
  const Pointers<scalar_t, target_t> p(in);
  for_each_tile(g, [&](int64_t n, int64_t s0, int64_t pixels, int64_t) {
    const auto t = tile_at<scalar_t, kUnit>(p.logits, g, n, s0, pixels);
    const acc_t* tile_lse = lse + n * g.pixels + s0;
    scalar_t* tile_grad_p = grad + (t.data - p.logits);
    acc_t scale[kTile], mass[kTile], dot[kTile];
    for (int64_t j = 0; j < pixels; ++j) scale[j] = grad_pixels ? grad_pixels[n * g.pixels + s0 + j] : grad_scale;
    if constexpr (kProb) {
      const scalar_t* q = p.target + (t.data - p.logits);
      tile_weighted_sums<scalar_t, kUnit, true>(t, q, terms.weights(), terms.smoothing, dot, mass);
      tile_grad<scalar_t, kUnit, true>(t, q, terms.weights(), terms.smoothing, tile_lse, mass, scale, tile_grad_p);
    } else {
      int64_t cls[kTile];
      for (int64_t j = 0; j < pixels; ++j) {
        cls[j] = p.class_at(n, s0 + j);
        check_class_index("cross_entropy_backward", cls[j], n, s0 + j, g.classes, ignore_index);
        const bool ignored = cls[j] == ignore_index;
        const acc_t wt = ignored ? acc_t(0) : terms.of(cls[j]);
        mass[j] = terms.ls.target_coef(wt) + terms.ls.spread_coef(terms.weight_total);
        if (ignored) scale[j] = 0;  // also when the mean's total weight is 0 (torch gives 0, not NaN)
      }
      tile_grad<scalar_t, kUnit, false>(t, nullptr, terms.weights(), terms.smoothing, tile_lse, mass, scale,
                                        tile_grad_p);
      for (int64_t j = 0; j < pixels; ++j) {
        if (cls[j] == ignore_index) continue;
        scalar_t& gt = tile_grad_p[cls[j] * t.class_stride + j * t.pixel_stride()];
        gt = cpu::narrow<scalar_t>(cpu::widen<acc_t>(gt) - scale[j] * terms.ls.target_coef(terms.of(cls[j])));
      }
    }
  });
}

Tensor cross_entropy_backward_cpu(const Tensor& grad_loss, const Tensor& input_, const Tensor& target_,
                                  const std::optional<Tensor>& weight, const Tensor& lse_, const Tensor& total_weight,
                                  c10::string_view reduction_, int64_t ignore_index, double label_smoothing) {
  const Operands in = prepare(input_, target_, reduction_);
  const Tensor lse = lse_.contiguous();
  const bool per_pixel = in.reduction == Reduction::None;
  const Tensor grad_pixels =
      per_pixel ? grad_loss.to(lse.scalar_type()).contiguous() : grad_loss.to(lse.scalar_type()).reshape({});
  Tensor grad = cpu::empty_like_cached(in.input);  // keeps the logits' strides
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.input.scalar_type(), "cross_entropy_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LossTerms<acc_t> terms(weight, in.g.classes, label_smoothing);
    const acc_t* gp = grad_pixels.const_data_ptr<acc_t>();
    // d reduce / d pixel_loss, the same for every pixel under mean and sum
    const acc_t grad_scale = in.reduction == Reduction::Mean ? gp[0] / total_weight.item<acc_t>()
                                                             : (in.reduction == Reduction::Sum ? gp[0] : acc_t(0));
    dispatch_target_and_stride<scalar_t>(in, [&](auto target, auto unit) {
      cross_entropy_backward_kernel<scalar_t, decltype(target), decltype(unit)::value>(
          in, terms, ignore_index, lse.const_data_ptr<acc_t>(), per_pixel ? gp : nullptr, grad_scale,
          grad.mutable_data_ptr<scalar_t>());
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

// Binary and multi-label (sigmoid) losses on CPU, tile by tile (the tiles of cpu/softmax_tile.h:
// up to 64 pixels of every class): per element one exp and one log, vectorised over a class's
// pixels in the tile. Sums over pixels go through per-chunk partials (16 tiles of an image) added
// in a fixed order, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/class_index.h"
#include "common/layout.h"
#include "common/reduction.h"
#include "common/sigmoid_losses.h"
#include "cpu/focal_powers.h"
#include "cpu/output_cache.h"
#include "cpu/softmax_tile.h"
#include "cpu/vec_math.h"

namespace segfast {
namespace {

using at::Tensor;
using cpu::kTile;
using cpu::TileGrid;

constexpr int64_t kTilesPerChunk = 16;  // the pixels one partial sum covers: 1024

// The terms of one class's elements in one tile, 0 where the element is left out.
template <typename acc_t>
struct ClassTerms {
  acc_t in[kTile], x[kTile], y[kTile], p[kTile], bce[kTile];  // in: 1 for an element counted, else 0
};

// Which ClassTerms class_terms computes beyond in, x and y: the Dice + BCE gradient needs p alone
// (no log), the fused focal loops compute their own from x.
enum class Derived { None, P, PAndBce };

// ClassTerms of elements j < pixels at x[j * stride], target t[j * stride], p and bce as kDerived
// says; returns whether an integer target holds something other than 0, 1 and ignore_index.
template <bool kUnit, Derived kDerived, typename scalar_t, typename target_t>
SEGFAST_CPU_MULTIVERSION bool class_terms(const scalar_t* x, const target_t* t, int64_t stride, int64_t pixels,
                                          int64_t ignore_index, ClassTerms<at::opmath_type<scalar_t>>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = kUnit ? 1 : stride;
  const acc_t ignored_value = static_cast<acc_t>(ignore_index);
  acc_t* xs = out.x;
  bool bad = false;
  // the row's logits and targets, contiguous: a strided (channels_last) row is gathered here, and
  // the math below runs on plain arrays (GCC 12's v4 clone of a gathering loop with this math did
  // not terminate for bfloat16)
  for (int64_t j = 0; j < pixels; ++j) {
    xs[j] = cpu::widen<acc_t>(x[j * step]);
    acc_t yv;
    bool in;
    if constexpr (std::is_floating_point_v<target_t> || std::is_same_v<target_t, c10::BFloat16>) {
      yv = cpu::widen<acc_t>(t[j * step]);
      in = yv != ignored_value;
    } else {
      const auto raw = static_cast<int64_t>(t[j * step]);
      in = raw != ignore_index;
      bad |= in & (raw != 0) & (raw != 1);
      yv = static_cast<acc_t>(raw);
    }
    out.in[j] = in ? acc_t(1) : acc_t(0);
    out.y[j] = in ? yv : acc_t(0);
  }
  if constexpr (kDerived == Derived::None) return bad;
#pragma omp simd
  for (int64_t j = 0; j < pixels; ++j) {
    const acc_t e = cpu::exp_of_nonpositive_term(-std::abs(xs[j]));
    if constexpr (kDerived == Derived::PAndBce) {
      const SigmoidTerms<acc_t> s = sigmoid_terms(xs[j], out.y[j], e, cpu::log_of_sum(acc_t(1) + e));
      out.p[j] = s.p;
      out.bce[j] = s.bce;
    } else {
      out.p[j] = sigmoid_of_exp(xs[j], e);
    }
  }
  return bad;
}

// The IndexError for the first bad integer target element of a tile's class row.
template <typename target_t>
void raise_bad_target(const char* op, const target_t* t, int64_t stride, int64_t pixels, int64_t n, int64_t element0,
                      int64_t ignore_index) {
  for (int64_t j = 0; j < pixels; ++j) {
    check_binary_target(op, static_cast<int64_t>(t[j * stride]), n, element0 + j, ignore_index);
  }
}

// Runs body(n, s0, pixels, c, terms, offset) for every class row of every tile of chunk `chunk`
// (image n, tiles chunk * kTilesPerChunk ...), offset = the row's first element in the logits (and
// the target, which has the logits' strides); terms.p and terms.bce as kDerived says.
template <typename scalar_t, typename target_t, bool kUnit, Derived kDerived, typename Body>
void for_each_class_row(const TileGrid& g, const scalar_t* x, const target_t* t, int64_t ignore_index, const char* op,
                        int64_t n, int64_t first_tile, int64_t tiles, Body&& body) {
  ClassTerms<at::opmath_type<scalar_t>> terms;
  for (int64_t tile = first_tile; tile < first_tile + tiles; ++tile) {
    const int64_t s0 = tile * kTile;
    if (s0 >= g.pixels) return;
    const int64_t pixels = std::min(kTile, g.pixels - s0);
    for (int64_t c = 0; c < g.classes; ++c) {
      const int64_t offset = n * g.batch_stride + c * g.class_stride + s0 * g.pixel_stride;
      const bool bad =
          class_terms<kUnit, kDerived>(x + offset, t + offset, g.pixel_stride, pixels, ignore_index, terms);
      if (C10_UNLIKELY(bad)) {
        raise_bad_target(op, t + offset, g.pixel_stride, pixels, n, c * g.pixels + s0, ignore_index);
      }
      body(s0, pixels, c, terms, offset);
    }
  }
}

// Calls f(scalar_t{}, target_t{}, kUnit) for the logits' dtype, the target's dtype (the logits'
// floating dtype or a class-index dtype) and whether pixels are contiguous.
template <typename F>
void dispatch_sigmoid_types(const Tensor& input, const Tensor& target, const TileGrid& g, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "sigmoid loss", [&] {
    auto with_target = [&](auto target_type) {
      cpu::dispatch_unit_stride(g, [&](auto unit) { f(scalar_t{}, target_type, unit); });
    };
    if (at::isFloatingType(target.scalar_type())) return with_target(scalar_t{});
    dispatch_class_index(target.scalar_type(), "sigmoid loss target", with_target);
  });
}

// Runs chunk_body(n, chunk, first_tile) over every chunk of kTilesPerChunk tiles, in parallel.
template <typename F>
void for_each_chunk(const TileGrid& g, F&& chunk_body) {
  const int64_t chunks = (g.tiles_per_image() + kTilesPerChunk - 1) / kTilesPerChunk;
  at::parallel_for(0, g.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) chunk_body(i / chunks, i, i % chunks * kTilesPerChunk);
  });
}

int64_t chunks_of(const TileGrid& g) {
  return g.batch * ((g.tiles_per_image() + kTilesPerChunk - 1) / kTilesPerChunk);
}

// The logits dense, and the target with their strides (the kernels read both at one offset).
struct SigmoidOperands {
  Tensor input, target;
};

SigmoidOperands prepare(const char* op, const Tensor& input_, const Tensor& target_) {
  check_sigmoid_loss_inputs(op, input_, target_);
  const Tensor input = dense(input_);
  const Tensor target =
      target_.strides() == input.strides() ? target_ : at::empty_like(input, target_.options()).copy_(target_);
  return {input, target};
}

// ------------------------------------------------------------------------------------ sums

// A class row's five sums: p y, p (or p^2), y, BCE, count.
template <bool kSquared, typename acc_t>
SEGFAST_CPU_MULTIVERSION void add_class_sums(const ClassTerms<acc_t>& t, int64_t pixels, acc_t* sums, int64_t stride) {
  acc_t inter = 0, pred = 0, truth = 0, bce = 0, count = 0;
#pragma omp simd reduction(+ : inter, pred, truth, bce, count)
  for (int64_t j = 0; j < pixels; ++j) {
    const bool in = t.in[j] != acc_t(0);
    inter += in ? t.p[j] * t.y[j] : acc_t(0);
    pred += in ? (kSquared ? t.p[j] * t.p[j] : t.p[j]) : acc_t(0);
    truth += t.y[j];
    bce += in ? t.bce[j] : acc_t(0);
    count += t.in[j];
  }
  sums[0] += inter;
  sums[stride] += pred;
  sums[2 * stride] += truth;
  sums[3 * stride] += bce;
  sums[4 * stride] += count;
}

Tensor sigmoid_sums_cpu(const Tensor& input_, const Tensor& target_, int64_t ignore_index, bool squared) {
  const auto [input, target] = prepare("sigmoid_sums", input_, target_);
  const TileGrid g = cpu::tile_grid(input);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  Tensor sums = at::empty({5, g.batch, g.classes}, input.options().dtype(acc_type));
  dispatch_sigmoid_types(input, target, g, [&](auto logit, auto target_type, auto unit) {
    using scalar_t = decltype(logit);
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t width = 5 * g.classes;
    std::vector<acc_t> partial(chunks_of(g) * width, acc_t(0));  // (chunk, k, c)
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const auto* t = target.const_data_ptr<decltype(target_type)>();
    for_each_chunk(g, [&](int64_t n, int64_t chunk, int64_t first_tile) {
      acc_t* out = partial.data() + chunk * width;
      for_each_class_row<scalar_t, decltype(target_type), decltype(unit)::value, Derived::PAndBce>(
          g, x, t, ignore_index, "sigmoid_sums", n, first_tile, kTilesPerChunk,
          [&](int64_t, int64_t pixels, int64_t c, const ClassTerms<acc_t>& terms, int64_t) {
            if (squared) {
              add_class_sums<true>(terms, pixels, out + c, g.classes);
            } else {
              add_class_sums<false>(terms, pixels, out + c, g.classes);
            }
          });
    });
    // per image, its chunks' partials in chunk order
    const int64_t chunks = chunks_of(g) / std::max<int64_t>(g.batch, 1);
    acc_t* s = sums.mutable_data_ptr<acc_t>();
    for (int64_t n = 0; n < g.batch; ++n) {
      for (int64_t i = 0; i < width; ++i) {
        double total = 0;
        for (int64_t ch = 0; ch < chunks; ++ch) total += partial[(n * chunks + ch) * width + i];
        s[(i / g.classes * g.batch + n) * g.classes + i % g.classes] = static_cast<acc_t>(total);
      }
    }
  });
  return sums;
}

// d/dx of g_inter sum p y + g_pred sum p (p^2) + g_bce sum BCE: (g_inter y + g_pred (2p)) p (1 - p)
// + g_bce (p - y) for an element counted, 0 for one left out.
template <bool kSquared, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void class_sums_grad(const ClassTerms<at::opmath_type<scalar_t>>& t, int64_t pixels,
                                              int64_t stride, at::opmath_type<scalar_t> g_inter,
                                              at::opmath_type<scalar_t> g_pred, at::opmath_type<scalar_t> g_bce,
                                              scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t j = 0; j < pixels; ++j) {
    const acc_t p = t.p[j];
    const acc_t d =
        (g_inter * t.y[j] + g_pred * (kSquared ? acc_t(2) * p : acc_t(1))) * p * (acc_t(1) - p) + g_bce * (p - t.y[j]);
    grad[j * stride] = cpu::narrow<scalar_t>(t.in[j] != acc_t(0) ? d : acc_t(0));
  }
}

Tensor sigmoid_sums_backward_cpu(const Tensor& grad_sums_, const Tensor& input_, const Tensor& target_,
                                 int64_t ignore_index, bool squared) {
  const auto [input, target] = prepare("sigmoid_sums", input_, target_);
  const TileGrid g = cpu::tile_grid(input);
  const Tensor grad_sums = grad_sums_.to(at::toOpMathType(input.scalar_type())).contiguous();
  TORCH_CHECK_VALUE(grad_sums.sizes() == at::IntArrayRef({5, g.batch, g.classes}),
                    "sigmoid_sums_backward: grad_sums must be (5, N, C), got ", grad_sums.sizes());
  Tensor grad = cpu::empty_like_cached(input);
  dispatch_sigmoid_types(input, target, g, [&](auto logit, auto target_type, auto unit) {
    using scalar_t = decltype(logit);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kUnit = decltype(unit)::value;
    const acc_t* gs = grad_sums.const_data_ptr<acc_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    const int64_t plane = g.batch * g.classes;
    for_each_chunk(g, [&](int64_t n, int64_t, int64_t first_tile) {
      for_each_class_row<scalar_t, decltype(target_type), kUnit, Derived::P>(
          g, x, target.const_data_ptr<decltype(target_type)>(), ignore_index, "sigmoid_sums", n, first_tile,
          kTilesPerChunk, [&](int64_t, int64_t pixels, int64_t c, const ClassTerms<acc_t>& terms, int64_t offset) {
            const acc_t* at = gs + n * g.classes + c;
            const int64_t step = kUnit ? 1 : g.pixel_stride;
            if (squared) {
              class_sums_grad<true>(terms, pixels, step, at[0], at[plane], at[3 * plane], out + offset);
            } else {
              class_sums_grad<false>(terms, pixels, step, at[0], at[plane], at[3 * plane], out + offset);
            }
          });
    });
  });
  return grad;
}

// ----------------------------------------------------------------------------------- focal

// A class row's focal terms (0 where left out): per element the loss (forward) or its slope
// (backward, kSlope), only the one asked for computed.
template <bool kSlope, typename acc_t>
SEGFAST_CPU_MULTIVERSION void class_focal_terms(const ClassTerms<acc_t>& t, int64_t pixels, const double* alpha,
                                                int64_t c, acc_t gamma, acc_t* out) {
  acc_t q[kTile], alpha_t[kTile], q_gamma[kTile], q_gamma_less_1[kTile];
#pragma omp simd
  for (int64_t j = 0; j < pixels; ++j) {
    q[j] = sigmoid_focal_q(t.p[j], t.y[j]);
    alpha_t[j] = sigmoid_focal_alpha(alpha, c, t.y[j]);
  }
  cpu::focal_powers(q, pixels, gamma, q_gamma, q_gamma_less_1);
#pragma omp simd
  for (int64_t j = 0; j < pixels; ++j) {
    const SigmoidFocalTerms<acc_t> f = sigmoid_focal_terms_of_powers(
        SigmoidTerms<acc_t>{t.p[j], t.bce[j]}, t.y[j], alpha_t[j], q[j], q_gamma[j], q_gamma_less_1[j], gamma);
    out[j] = t.in[j] != acc_t(0) ? (kSlope ? f.slope : f.loss) : acc_t(0);
  }
}

// A class row's focal terms (0 where left out; the loss, or its slope if kSlope) for a small
// integer gamma, kTimes, in one loop from the gathered logits, everything in registers:
// class_terms' p and bce, then class_focal_terms' passes over q and its powers, store and load
// more than the math costs. The same formulas in the same order: the same values. kTimes and
// whether there is an alpha are constants and alpha_c is read once: a runtime loop or a load
// behind a null test in the body is control flow, and GCC would leave the loop scalar.
template <bool kSlope, int kTimes, bool kAlpha, typename acc_t>
SEGFAST_CPU_MULTIVERSION void class_focal_terms_fused(const ClassTerms<acc_t>& t, int64_t pixels, const double* alpha,
                                                      int64_t c, acc_t* out) {
  const double alpha_c = kAlpha ? alpha[c] : 0.0;
  const double* alpha_at_c = kAlpha ? &alpha_c : nullptr;  // sigmoid_focal_alpha(alpha_at_c, 0, y)
  constexpr acc_t gamma = kTimes;
#pragma omp simd
  for (int64_t j = 0; j < pixels; ++j) {
    const acc_t e = cpu::exp_of_nonpositive_term(-std::abs(t.x[j]));
    const SigmoidTerms<acc_t> s = sigmoid_terms(t.x[j], t.y[j], e, cpu::log_of_sum(acc_t(1) + e));
    const acc_t q = sigmoid_focal_q(s.p, t.y[j]);
    acc_t q_gamma = 1, q_gamma_less_1 = 1;
    for (int i = 0; i < kTimes; ++i) {
      q_gamma_less_1 = q_gamma;
      q_gamma *= q;
    }
    const acc_t alpha_t = sigmoid_focal_alpha(alpha_at_c, 0, t.y[j]);
    const acc_t value =
        kSlope ? sigmoid_focal_slope_of_powers(s.p, s.bce, t.y[j], alpha_t, q, q_gamma, q_gamma_less_1, gamma)
               : sigmoid_focal_loss_of_power(s.bce, alpha_t, q_gamma);
    out[j] = t.in[j] != acc_t(0) ? value : acc_t(0);
  }
}

// class_focal_terms_fused<kSlope, times, with alpha or not>, times one of kTimes
// (small_integer_gamma's range).
template <bool kSlope, typename acc_t, int... kTimes>
void class_focal_terms_small_gamma(std::integer_sequence<int, kTimes...>, int times, const ClassTerms<acc_t>& t,
                                   int64_t pixels, const double* alpha, int64_t c, acc_t* out) {
  const auto fused = [&](auto times_constant) {
    constexpr int k = decltype(times_constant)::value;
    alpha != nullptr ? class_focal_terms_fused<kSlope, k, true>(t, pixels, alpha, c, out)
                     : class_focal_terms_fused<kSlope, k, false>(t, pixels, alpha, c, out);
  };
  ((times == kTimes ? fused(std::integral_constant<int, kTimes>{}) : void()), ...);
}

// A class row's focal terms (the loss, or its slope if kSlope): the fused loop for a small integer
// gamma (`times` >= 0; class_terms computed Derived::None), else class_focal_terms (PAndBce).
template <bool kSlope, Derived kDerived, typename acc_t>
void class_focal_values(const ClassTerms<acc_t>& t, int64_t pixels, const double* alpha, int64_t c, int times,
                        acc_t gamma, acc_t* out) {
  if constexpr (kDerived == Derived::None) {
    class_focal_terms_small_gamma<kSlope>(std::make_integer_sequence<int, kMaxSmallIntegerGamma + 1>{}, times, t,
                                          pixels, alpha, c, out);
  } else {
    class_focal_terms<kSlope>(t, pixels, alpha, c, gamma, out);
  }
}

// Calls f(std::integral_constant<Derived, ...>) with what class_terms must compute for
// class_focal_values: nothing for a small integer gamma (the fused loop), else p and bce.
template <typename F>
void dispatch_focal_derived(int times, F&& f) {
  if (times >= 0) {
    f(std::integral_constant<Derived, Derived::None>{});
  } else {
    f(std::integral_constant<Derived, Derived::PAndBce>{});
  }
}

// A row's losses written at out[j * step] (when out is given) and summed with its count, the
// partial sums in vector lanes (a fixed order for a given build and CPU, whatever the threads).
template <typename scalar_t, typename acc_t>
SEGFAST_CPU_MULTIVERSION void store_and_sum(const acc_t* value, const acc_t* in, int64_t pixels, scalar_t* out,
                                            int64_t step, acc_t& sum, acc_t& count) {
  acc_t s = 0, k = 0;
#pragma omp simd reduction(+ : s, k)
  for (int64_t j = 0; j < pixels; ++j) {
    s += value[j];
    k += in[j];
  }
  sum = s;
  count = k;
  if (out == nullptr) return;
  for (int64_t j = 0; j < pixels; ++j) out[j * step] = cpu::narrow<scalar_t>(value[j]);
}

std::tuple<Tensor, Tensor> sigmoid_focal_loss_cpu(const Tensor& input_, const Tensor& target_,
                                                  const std::optional<Tensor>& alpha_, double gamma,
                                                  c10::string_view reduction_, int64_t ignore_index) {
  const auto [input, target] = prepare("sigmoid_focal_loss", input_, target_);
  const TileGrid g = cpu::tile_grid(input);
  const Reduction reduction = parse_reduction(reduction_);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const Tensor alpha = alpha_ && alpha_->defined() ? alpha_->to(at::kDouble).contiguous() : Tensor();
  TORCH_CHECK_VALUE(!alpha.defined() || alpha.numel() == g.classes, "sigmoid_focal_loss: alpha must have shape (",
                    g.classes, ",), got ", alpha.sizes());
  Tensor loss = reduction == Reduction::None ? at::empty_like(input) : Tensor();
  std::vector<double> chunk_loss(chunks_of(g), 0.0), chunk_count(chunks_of(g), 0.0);
  dispatch_sigmoid_types(input, target, g, [&](auto logit, auto target_type, auto unit) {
    using scalar_t = decltype(logit);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kUnit = decltype(unit)::value;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* out = loss.defined() ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    const double* a = alpha.defined() ? alpha.const_data_ptr<double>() : nullptr;
    const int times = small_integer_gamma(static_cast<acc_t>(gamma));
    dispatch_focal_derived(times, [&](auto derived) {
      constexpr Derived kDerived = decltype(derived)::value;
      for_each_chunk(g, [&](int64_t n, int64_t chunk, int64_t first_tile) {
        double sum = 0, count = 0;
        for_each_class_row<scalar_t, decltype(target_type), kUnit, kDerived>(
            g, x, target.const_data_ptr<decltype(target_type)>(), ignore_index, "sigmoid_focal_loss", n, first_tile,
            kTilesPerChunk, [&](int64_t, int64_t pixels, int64_t c, const ClassTerms<acc_t>& terms, int64_t offset) {
              acc_t value[kTile], row_sum, row_count;
              class_focal_values<false, kDerived>(terms, pixels, a, c, times, static_cast<acc_t>(gamma), value);
              store_and_sum(value, terms.in, pixels, out == nullptr ? nullptr : out + offset,
                            kUnit ? 1 : g.pixel_stride, row_sum, row_count);
              sum += row_sum;
              count += row_count;
            });
        chunk_loss[chunk] = sum;
        chunk_count[chunk] = count;
      });
    });
  });
  const double sum = cpu::sum_in_order(chunk_loss), count = cpu::sum_in_order(chunk_count);
  if (reduction != Reduction::None) {
    loss = at::scalar_tensor(reduction == Reduction::Mean ? sum / count : sum, input.options());
  }
  return {loss, at::scalar_tensor(count, input.options().dtype(acc_type))};
}

// out[j * step] = slope[j] times the loss's gradient: grad_loss[j * step] per element, else `scale`
// (0 where left out).
template <typename scalar_t, typename acc_t>
SEGFAST_CPU_MULTIVERSION void store_gradient(const acc_t* slope, const acc_t* in, int64_t pixels,
                                             const acc_t* grad_loss, acc_t scale, scalar_t* out, int64_t step) {
  if (grad_loss == nullptr) {
    for (int64_t j = 0; j < pixels; ++j) {
      out[j * step] = cpu::narrow<scalar_t>(in[j] != acc_t(0) ? slope[j] * scale : acc_t(0));
    }
    return;
  }
  for (int64_t j = 0; j < pixels; ++j) {
    out[j * step] = cpu::narrow<scalar_t>(in[j] != acc_t(0) ? slope[j] * grad_loss[j * step] : acc_t(0));
  }
}

Tensor sigmoid_focal_loss_backward_cpu(const Tensor& grad_loss, const Tensor& input_, const Tensor& target_,
                                       const std::optional<Tensor>& alpha_, double gamma, const Tensor& count,
                                       c10::string_view reduction_, int64_t ignore_index) {
  const auto [input, target] = prepare("sigmoid_focal_loss", input_, target_);
  const TileGrid g = cpu::tile_grid(input);
  const Reduction reduction = parse_reduction(reduction_);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const Tensor alpha = alpha_ && alpha_->defined() ? alpha_->to(at::kDouble).contiguous() : Tensor();
  // per element (reduction none), with the logits' strides, or one value
  TORCH_CHECK_VALUE(reduction != Reduction::None || grad_loss.sizes() == input.sizes(),
                    "sigmoid_focal_loss_backward: grad_loss must have the logits' shape ", input.sizes(), ", got ",
                    grad_loss.sizes());
  const Tensor g_loss = reduction == Reduction::None
                            ? at::empty_like(input, input.options().dtype(acc_type)).copy_(grad_loss)
                            : grad_loss.to(acc_type);
  Tensor grad = cpu::empty_like_cached(input);
  dispatch_sigmoid_types(input, target, g, [&](auto logit, auto target_type, auto unit) {
    using scalar_t = decltype(logit);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kUnit = decltype(unit)::value;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    const acc_t* gl = g_loss.const_data_ptr<acc_t>();
    const bool per_element = reduction == Reduction::None;
    const acc_t scale = per_element ? acc_t(0) : reduction == Reduction::Mean ? gl[0] / count.item<acc_t>() : gl[0];
    const double* a = alpha.defined() ? alpha.const_data_ptr<double>() : nullptr;
    const int times = small_integer_gamma(static_cast<acc_t>(gamma));
    dispatch_focal_derived(times, [&](auto derived) {
      constexpr Derived kDerived = decltype(derived)::value;
      for_each_chunk(g, [&](int64_t n, int64_t, int64_t first_tile) {
        for_each_class_row<scalar_t, decltype(target_type), kUnit, kDerived>(
            g, x, target.const_data_ptr<decltype(target_type)>(), ignore_index, "sigmoid_focal_loss", n, first_tile,
            kTilesPerChunk, [&](int64_t, int64_t pixels, int64_t c, const ClassTerms<acc_t>& terms, int64_t offset) {
              acc_t slope[kTile];
              class_focal_values<true, kDerived>(terms, pixels, a, c, times, static_cast<acc_t>(gamma), slope);
              store_gradient(slope, terms.in, pixels, per_element ? gl + offset : nullptr, scale, out + offset,
                             kUnit ? 1 : g.pixel_stride);
            });
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  m.impl("sigmoid_sums", &sigmoid_sums_cpu);
  m.impl("sigmoid_sums_backward", &sigmoid_sums_backward_cpu);
  m.impl("sigmoid_focal_loss", &sigmoid_focal_loss_cpu);
  m.impl("sigmoid_focal_loss_backward", &sigmoid_focal_loss_backward_cpu);
}

}  // namespace segfast

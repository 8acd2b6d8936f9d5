// Dice and focal losses on CPU, softmax fused in, tile by tile (cpu/softmax_tile.h): the
// log-sum-exp of a tile's pixels in two vectorised class passes, then one pass for the sums or the
// gradient. Sums over pixels go through per-tile partials added in a fixed order, so results do not
// depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "common/class_index.h"
#include "common/layout.h"
#include "common/reduction.h"
#include "common/segmentation_losses.h"
#include "cpu/focal_powers.h"
#include "cpu/output_cache.h"
#include "cpu/softmax_tile.h"
#include "cpu/vec_math.h"

namespace segfast {
namespace {

using at::Tensor;
using cpu::exp_vec;
using cpu::kTile;
using cpu::Tile;
using cpu::TileGrid;

// The classes of a tile's pixels, -1 where ignored; a bad index raises IndexError. The check is a
// flag in the branch-free loop; only a tile with a bad index is walked again for the message.
template <typename target_t>
void tile_classes(const Tensor& target, const target_t* t, int64_t n, int64_t s0, int64_t pixels, int64_t classes,
                  int64_t ignore_index, const char* op, int32_t* cls) {
  const int64_t stride = target.stride(1);
  const target_t* row = t + n * target.stride(0) + s0 * stride;
  bool bad = false;
  for (int64_t j = 0; j < pixels; ++j) {
    const auto c = static_cast<int64_t>(row[j * stride]);
    bad |= c != ignore_index && (c < 0 || c >= classes);
    cls[j] = c == ignore_index ? -1 : static_cast<int32_t>(c);  // classes < 2^31: check_loss_inputs
  }
  if (C10_UNLIKELY(bad)) {
    for (int64_t j = 0; j < pixels; ++j) {
      check_class_index(op, static_cast<int64_t>(row[j * stride]), n, s0 + j, classes, ignore_index);
    }
  }
}

// Runs body(n, s0, tile, t, softmax, cls) for every tile of the dense logits, with their classes and
// either their log-sum-exp (kProbs false: lse[j]) or their probabilities (kProbs true:
// probs[c * kTile + j], in a per-thread buffer).
template <bool kProbs, typename scalar_t, typename target_t, typename Body>
void for_each_softmax_tile(const Tensor& input, const Tensor& target, int64_t ignore_index, const char* op,
                           Body&& body) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileGrid g = cpu::tile_grid(input);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const target_t* tp = target.const_data_ptr<target_t>();
  cpu::dispatch_unit_stride(g, [&](auto unit) {
    cpu::for_each_tile(g, [&](int64_t n, int64_t s0, int64_t pixels, int64_t tile) {
      const auto t = cpu::tile_at<scalar_t, decltype(unit)::value>(x, g, n, s0, pixels);
      int32_t cls[kTile];  // int32: as wide as float lanes, so class compares vectorise with the math
      tile_classes(target, tp, n, s0, pixels, g.classes, ignore_index, op, cls);
      if constexpr (kProbs) {
        thread_local std::vector<acc_t> probs;
        probs.resize(g.classes * kTile);
        cpu::tile_softmax(t, probs.data());
        body(n, s0, tile, t, probs.data(), cls);
      } else {
        acc_t lse[kTile];
        cpu::tile_logsumexp(t, lse);
        body(n, s0, tile, t, lse, cls);
      }
    });
  });
}

// Calls f(scalar_t{}, target_t{}) for the logits' floating type and the target's class-index type.
template <typename F>
void dispatch_loss_types(const Tensor& input, const Tensor& target, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "dice_sums or focal_loss", [&] {
    dispatch_class_index(target.scalar_type(), "loss target", [&](auto index) { f(scalar_t{}, index); });
  });
}

// The tile's Dice sums per class from its softmax: pred[c] = sum over counted pixels (cls >= 0) of
// p(c, j) (or p(c, j)^2 if squared); inter[c] and truth[c] = sum of p(c, j) and count over the
// pixels of class c.
template <typename scalar_t>
SEGFAST_CPU_MULTIVERSION void tile_dice_sums(int64_t classes, int64_t pixels, const scalar_t* probs, const int32_t* cls,
                                             bool squared, scalar_t* inter, scalar_t* pred, scalar_t* truth) {
  const auto class_sums = [&](auto squares) {  // squared as a constant, so the loop has no branch
    for (int64_t c = 0; c < classes; ++c) {
      const scalar_t* p = probs + c * kTile;
      scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < pixels; ++j) {
        const scalar_t v = decltype(squares)::value ? p[j] * p[j] : p[j];
        sum += cls[j] < 0 ? scalar_t(0) : v;  // an ignored pixel's NaN stays out
      }
      pred[c] = sum;
    }
  };
  if (squared) {
    class_sums(std::true_type{});
  } else {
    class_sums(std::false_type{});
  }
  for (int64_t j = 0; j < pixels; ++j) {
    if (cls[j] < 0) continue;
    inter[cls[j]] += probs[cls[j] * kTile + j];
    truth[cls[j]] += 1;
  }
}

// Dice gradient of a tile from its softmax, written with the logits' offsets from grad:
// d loss / d x(c, j) = p_c (dp_c - sum_k p_k dp_k), dp_c = d loss / d p_c = g_pred[c] (2 p_c if
// squared, else 1) + g_inter[c] at the pixel's class; 0 at ignored pixels.
template <typename scalar_t, bool kUnit>
SEGFAST_CPU_MULTIVERSION void tile_dice_grad(const Tile<scalar_t, kUnit> t, const at::opmath_type<scalar_t>* probs,
                                             const int32_t* cls, const at::opmath_type<scalar_t>* g_pred,
                                             const at::opmath_type<scalar_t>* g_inter, bool squared, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  acc_t weighted[kTile];  // sum_k p_k dp_k
  for (int64_t j = 0; j < t.pixels; ++j) {
    weighted[j] = cls[j] < 0 ? acc_t(0) : probs[cls[j] * kTile + j] * g_inter[cls[j]];
  }
  for (int64_t c = 0; c < t.classes; ++c) {
    const acc_t* p = probs + c * kTile;
    const acc_t gp = g_pred[c];
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) weighted[j] += p[j] * gp * (squared ? 2 * p[j] : acc_t(1));
  }
  for (int64_t c = 0; c < t.classes; ++c) {
    const acc_t* p = probs + c * kTile;
    scalar_t* g = grad + c * t.class_stride;
    const acc_t gp = g_pred[c], gi = g_inter[c];
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t dp = gp * (squared ? 2 * p[j] : acc_t(1)) + (cls[j] == c ? gi : acc_t(0));
      g[j * ps] = cpu::narrow<scalar_t>(cls[j] < 0 ? acc_t(0) : p[j] * (dp - weighted[j]));
    }
  }
}

// Focal gradient of a tile: d loss / d x(c, j) = coef[j] (delta_{c, cls[j]} - p(c, j)), coef the
// pixel's scale x A (0 where ignored), written with the logits' offsets from grad.
template <typename scalar_t, bool kUnit>
SEGFAST_CPU_MULTIVERSION void tile_focal_grad(const Tile<scalar_t, kUnit> t, const at::opmath_type<scalar_t>* lse,
                                              const int32_t* cls, const at::opmath_type<scalar_t>* coef,
                                              scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
    scalar_t* g = grad + c * t.class_stride;
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t p = exp_vec(cpu::widen<acc_t>(x[j * ps]) - lse[j]);
      g[j * ps] = cpu::narrow<scalar_t>(coef[j] * ((cls[j] == c ? acc_t(1) : acc_t(0)) - p));
    }
  }
}

// Per tile and class: sum of p (or p^2) over counted pixels, sum of p over pixels of that class,
// and their count; then added per image in tile order into sums (3, N, C).
template <typename scalar_t, typename target_t>
void dice_sums_kernel(const Tensor& input, const Tensor& target, int64_t ignore_index, bool squared, Tensor& sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileGrid g = cpu::tile_grid(input);
  const int64_t classes = g.classes;
  std::vector<acc_t> partial(g.tiles() * 3 * classes, acc_t(0));
  for_each_softmax_tile<true, scalar_t, target_t>(
      input, target, ignore_index, "dice_sums",
      [&](int64_t, int64_t, int64_t tile, const auto& t, const acc_t* probs, const int32_t* cls) {
        acc_t* inter = partial.data() + tile * 3 * classes;
        acc_t *pred = inter + classes, *truth = pred + classes;
        tile_dice_sums(classes, t.pixels, probs, cls, squared, inter, pred, truth);
      });
  acc_t* out = sums.mutable_data_ptr<acc_t>();
  const int64_t per_image = g.tiles_per_image();
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t tile = n * per_image; tile < (n + 1) * per_image; ++tile) {
      for (int64_t k = 0; k < 3; ++k) {
        for (int64_t c = 0; c < classes; ++c)
          out[(k * g.batch + n) * classes + c] += partial[(tile * 3 + k) * classes + c];
      }
    }
  }
}

Tensor dice_sums_cpu(const Tensor& input_, const Tensor& target, int64_t ignore_index, bool squared) {
  check_loss_inputs("dice_sums", input_, target);
  const Tensor input = dense(input_);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  Tensor sums = at::zeros({3, input.size(0), input.size(1)}, input.options().dtype(acc_type));
  dispatch_loss_types(input, target, [&](auto logit, auto index) {
    dice_sums_kernel<decltype(logit), decltype(index)>(input, target, ignore_index, squared, sums);
  });
  return sums;
}

template <typename scalar_t, typename target_t>
void dice_sums_backward_kernel(const Tensor& grad_sums, const Tensor& input, const Tensor& target, int64_t ignore_index,
                               bool squared, Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileGrid g = cpu::tile_grid(input);
  const acc_t* gs = grad_sums.const_data_ptr<acc_t>();
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  for_each_softmax_tile<true, scalar_t, target_t>(
      input, target, ignore_index, "dice_sums",
      [&](int64_t n, int64_t, int64_t, const auto& t, const acc_t* probs, const int32_t* cls) {
        const acc_t *g_inter = gs + n * g.classes, *g_pred = gs + (g.batch + n) * g.classes;
        tile_dice_grad(t, probs, cls, g_pred, g_inter, squared, out + (t.data - input.const_data_ptr<scalar_t>()));
      });
}

Tensor dice_sums_backward_cpu(const Tensor& grad_sums_, const Tensor& input_, const Tensor& target,
                              int64_t ignore_index, bool squared) {
  check_loss_inputs("dice_sums", input_, target);
  const Tensor input = dense(input_);
  const int64_t batch = input.size(0), classes = input.size(1);
  const Tensor grad_sums = grad_sums_.to(at::toOpMathType(input.scalar_type())).contiguous();
  TORCH_CHECK_VALUE(grad_sums.sizes() == at::IntArrayRef({3, batch, classes}),
                    "dice_sums_backward: grad_sums must be (3, N, C), got ", grad_sums.sizes());
  Tensor grad = cpu::empty_like_cached(input);
  dispatch_loss_types(input, target, [&](auto logit, auto index) {
    dice_sums_backward_kernel<decltype(logit), decltype(index)>(grad_sums, input, target, ignore_index, squared, grad);
  });
  return grad;
}

// The per-class focal weight alpha_c (1 without alpha).
struct FocalAlpha {
  const double* alpha;
  template <typename acc_t>
  acc_t of(int64_t c) const {
    return static_cast<acc_t>(alpha != nullptr ? alpha[c] : 1.0);
  }
};

// The focal terms of a tile's pixels (0 where ignored), vectorised over the tile: the target
// logits gathered, then exp and the powers of 1 - pt for all pixels at once (pow only for a
// gamma that is not a small integer).
template <typename scalar_t, bool kUnit>
SEGFAST_CPU_MULTIVERSION void tile_focal_terms(const Tile<scalar_t, kUnit> t, const at::opmath_type<scalar_t>* lse,
                                               const int32_t* cls, FocalAlpha alpha, at::opmath_type<scalar_t> gamma,
                                               at::opmath_type<scalar_t>* loss, at::opmath_type<scalar_t>* a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixels = t.pixels;
  acc_t log_pt[kTile], weight[kTile], pt[kTile], q[kTile], q_gamma[kTile], q_gamma_less_1[kTile];
  for (int64_t j = 0; j < pixels; ++j) {
    log_pt[j] = cls[j] < 0 ? acc_t(0) : cpu::widen<acc_t>(t.row(cls[j])[j * t.pixel_stride()]) - lse[j];
    weight[j] = cls[j] < 0 ? acc_t(0) : alpha.of<acc_t>(cls[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < pixels; ++j) {
    pt[j] = exp_vec(log_pt[j]);
    q[j] = acc_t(1) - pt[j];
  }
  cpu::focal_powers(q, pixels, gamma, q_gamma, q_gamma_less_1);
#pragma omp simd
  for (int64_t j = 0; j < pixels; ++j) {
    const FocalTerms<acc_t> terms =
        focal_terms_of_powers(log_pt[j], pt[j], q_gamma[j], q_gamma_less_1[j], weight[j], gamma);
    loss[j] = cls[j] < 0 ? acc_t(0) : terms.loss;
    a[j] = cls[j] < 0 ? acc_t(0) : terms.a;
  }
}

// Per pixel: the log-sum-exp (saved for backward) and the loss; per tile: the loss sum and the
// counted pixels, for the fixed-order reduction.
template <typename scalar_t, typename target_t>
void focal_loss_kernel(const Tensor& input, const Tensor& target, int64_t ignore_index, FocalAlpha alpha, double gamma,
                       at::opmath_type<scalar_t>* lse, scalar_t* loss, std::vector<double>& tile_loss,
                       std::vector<double>& tile_pixels) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixels_per_image = input.size(2);
  for_each_softmax_tile<false, scalar_t, target_t>(
      input, target, ignore_index, "focal_loss",
      [&](int64_t n, int64_t s0, int64_t tile, const auto& t, const acc_t* lse_tile, const int32_t* cls) {
        acc_t value[kTile], unused[kTile];
        tile_focal_terms(t, lse_tile, cls, alpha, static_cast<acc_t>(gamma), value, unused);
        double sum = 0, counted = 0;
        for (int64_t j = 0; j < t.pixels; ++j) {
          const int64_t at = n * pixels_per_image + s0 + j;
          lse[at] = lse_tile[j];
          if (loss != nullptr) loss[at] = cpu::narrow<scalar_t>(value[j]);
          sum += value[j];
          counted += cls[j] >= 0 ? 1 : 0;
        }
        tile_loss[tile] = sum;
        tile_pixels[tile] = counted;
      });
}

std::tuple<Tensor, Tensor, Tensor> focal_loss_cpu(const Tensor& input_, const Tensor& target,
                                                  const std::optional<Tensor>& alpha_, double gamma,
                                                  c10::string_view reduction_, int64_t ignore_index) {
  check_loss_inputs("focal_loss", input_, target);
  const Tensor input = dense(input_);
  const Reduction reduction = parse_reduction(reduction_);
  const TileGrid g = cpu::tile_grid(input);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const Tensor alpha = alpha_ && alpha_->defined() ? alpha_->to(at::kDouble).contiguous() : Tensor();
  Tensor lse = at::empty({g.batch, g.pixels}, input.options().dtype(acc_type));
  Tensor loss = reduction == Reduction::None ? at::empty({g.batch, g.pixels}, input.options()) : Tensor();
  std::vector<double> tile_loss(g.tiles()), tile_pixels(g.tiles());
  dispatch_loss_types(input, target, [&](auto logit, auto index) {
    using scalar_t = decltype(logit);
    focal_loss_kernel<scalar_t, decltype(index)>(
        input, target, ignore_index, FocalAlpha{alpha.defined() ? alpha.const_data_ptr<double>() : nullptr}, gamma,
        lse.mutable_data_ptr<at::opmath_type<scalar_t>>(), loss.defined() ? loss.mutable_data_ptr<scalar_t>() : nullptr,
        tile_loss, tile_pixels);
  });
  const double sum = cpu::sum_in_order(tile_loss), count = cpu::sum_in_order(tile_pixels);
  Tensor count_t = at::scalar_tensor(count, input.options().dtype(acc_type));
  if (reduction != Reduction::None) {
    loss = at::scalar_tensor(reduction == Reduction::Mean ? sum / count : sum, input.options());
  }
  return {loss, lse, count_t};
}

// grad = scale * A * (onehot - softmax) per counted pixel, from the saved log-sum-exp; `grad_pixels`
// per pixel (reduction none) or null with `grad_scale` for every pixel.
template <typename scalar_t, typename target_t>
void focal_loss_backward_kernel(const Tensor& input, const Tensor& target, int64_t ignore_index, FocalAlpha alpha,
                                double gamma, const at::opmath_type<scalar_t>* lse,
                                const at::opmath_type<scalar_t>* grad_pixels, at::opmath_type<scalar_t> grad_scale,
                                scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileGrid g = cpu::tile_grid(input);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const target_t* tp = target.const_data_ptr<target_t>();
  cpu::dispatch_unit_stride(g, [&](auto unit) {
    cpu::for_each_tile(g, [&](int64_t n, int64_t s0, int64_t pixels, int64_t) {
      const auto t = cpu::tile_at<scalar_t, decltype(unit)::value>(x, g, n, s0, pixels);
      const acc_t* lse_tile = lse + n * g.pixels + s0;
      int32_t cls[kTile];  // int32: as wide as float lanes, so class compares vectorise with the math
      acc_t coef[kTile];   // scale * A (0 where ignored)
      tile_classes(target, tp, n, s0, pixels, g.classes, ignore_index, "focal_loss", cls);
      acc_t unused[kTile];
      tile_focal_terms(t, lse_tile, cls, alpha, static_cast<acc_t>(gamma), unused, coef);
      for (int64_t j = 0; j < pixels; ++j) {
        const acc_t scale = grad_pixels != nullptr ? grad_pixels[n * g.pixels + s0 + j] : grad_scale;
        coef[j] = cls[j] < 0 ? acc_t(0) : coef[j] * scale;  // an ignored pixel's NaN gradient stays out
      }
      tile_focal_grad(t, lse_tile, cls, coef, grad + (t.data - x));
    });
  });
}

Tensor focal_loss_backward_cpu(const Tensor& grad_loss, const Tensor& input_, const Tensor& target,
                               const std::optional<Tensor>& alpha_, double gamma, const Tensor& lse_,
                               const Tensor& count, c10::string_view reduction_, int64_t ignore_index) {
  check_loss_inputs("focal_loss", input_, target);
  const Tensor input = dense(input_);
  const Reduction reduction = parse_reduction(reduction_);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const Tensor lse = lse_.to(acc_type).contiguous(), g_loss = grad_loss.to(acc_type).contiguous();
  const Tensor alpha = alpha_ && alpha_->defined() ? alpha_->to(at::kDouble).contiguous() : Tensor();
  Tensor grad = cpu::empty_like_cached(input);
  dispatch_loss_types(input, target, [&](auto logit, auto index) {
    using scalar_t = decltype(logit);
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gl = g_loss.const_data_ptr<acc_t>();
    const acc_t grad_scale = reduction == Reduction::Mean ? gl[0] / count.item<acc_t>() : gl[0];
    focal_loss_backward_kernel<scalar_t, decltype(index)>(
        input, target, ignore_index, FocalAlpha{alpha.defined() ? alpha.const_data_ptr<double>() : nullptr}, gamma,
        lse.const_data_ptr<acc_t>(), reduction == Reduction::None ? gl : nullptr, grad_scale,
        grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  m.impl("dice_sums", &dice_sums_cpu);
  m.impl("dice_sums_backward", &dice_sums_backward_cpu);
  m.impl("focal_loss", &focal_loss_cpu);
  m.impl("focal_loss_backward", &focal_loss_backward_cpu);
}

}  // namespace segfast

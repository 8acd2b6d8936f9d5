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

// The classes of a tile's pixels, -1 where ignored; a bad index raises IndexError.
template <typename target_t>
void tile_classes(const Tensor& target, const target_t* t, int64_t n, int64_t s0, int64_t pixels, int64_t classes,
                  int64_t ignore_index, const char* op, int64_t* cls) {
  for (int64_t j = 0; j < pixels; ++j) {
    const auto c = static_cast<int64_t>(t[n * target.stride(0) + (s0 + j) * target.stride(1)]);
    check_class_index(op, c, n, s0 + j, classes, ignore_index);
    cls[j] = c == ignore_index ? -1 : c;
  }
}

// Runs body(tile, t, lse, cls) for every tile of the dense logits, with their log-sum-exp and classes.
template <typename scalar_t, typename target_t, typename Body>
void for_each_softmax_tile(const Tensor& input, const Tensor& target, int64_t ignore_index, const char* op,
                           Body&& body) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileGrid g = cpu::tile_grid(input);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const target_t* tp = target.const_data_ptr<target_t>();
  cpu::dispatch_unit_stride(g, [&](auto unit) {
    cpu::for_each_tile(g, [&](int64_t n, int64_t s0, int64_t pixels, int64_t tile) {
      const auto t = cpu::tile_at<scalar_t, decltype(unit)::value>(x, g, n, s0, pixels);
      acc_t lse[kTile];
      int64_t cls[kTile];
      cpu::tile_logsumexp(t, lse);
      tile_classes(target, tp, n, s0, pixels, g.classes, ignore_index, op, cls);
      body(n, s0, tile, t, lse, cls);
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

// softmax p(c, j) of a tile, recomputed from its log-sum-exp
template <typename scalar_t, bool kUnit>
at::opmath_type<scalar_t> prob(const Tile<scalar_t, kUnit>& t, const at::opmath_type<scalar_t>* lse, int64_t c,
                               int64_t j) {
  return exp_vec(static_cast<at::opmath_type<scalar_t>>(t.row(c)[j * t.pixel_stride()]) - lse[j]);
}

// sums[c] = sum over the tile's counted pixels (cls >= 0) of p(c, j), or p(c, j)^2 if squared
template <typename scalar_t, bool kUnit>
SEGFAST_CPU_MULTIVERSION void tile_prob_sums(const Tile<scalar_t, kUnit> t, const at::opmath_type<scalar_t>* lse,
                                             const int64_t* cls, bool squared, at::opmath_type<scalar_t>* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t p = exp_vec(cpu::widen<acc_t>(x[j * ps]) - lse[j]);
      sum += cls[j] < 0 ? acc_t(0) : (squared ? p * p : p);  // an ignored pixel's NaN stays out
    }
    sums[c] = sum;
  }
}

// Dice gradient of a tile, written with the logits' offsets from grad: d loss / d x(c, j) =
// p_c (dp_c - sum_k p_k dp_k), dp_c = d loss / d p_c = g_pred[c] (2 p_c if squared, else 1) +
// g_inter[c] at the pixel's class; 0 at ignored pixels.
template <typename scalar_t, bool kUnit>
SEGFAST_CPU_MULTIVERSION void tile_dice_grad(const Tile<scalar_t, kUnit> t, const at::opmath_type<scalar_t>* lse,
                                             const int64_t* cls, const at::opmath_type<scalar_t>* g_pred,
                                             const at::opmath_type<scalar_t>* g_inter, bool squared, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  acc_t weighted[kTile];  // sum_k p_k dp_k
  for (int64_t j = 0; j < t.pixels; ++j) {
    weighted[j] = cls[j] < 0 ? acc_t(0) : prob(t, lse, cls[j], j) * g_inter[cls[j]];
  }
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
    const acc_t gp = g_pred[c];
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t p = exp_vec(cpu::widen<acc_t>(x[j * ps]) - lse[j]);
      weighted[j] += p * gp * (squared ? 2 * p : acc_t(1));
    }
  }
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
    scalar_t* g = grad + c * t.class_stride;
    const acc_t gp = g_pred[c], gi = g_inter[c];
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t p = exp_vec(cpu::widen<acc_t>(x[j * ps]) - lse[j]);
      const acc_t dp = gp * (squared ? 2 * p : acc_t(1)) + (cls[j] == c ? gi : acc_t(0));
      g[j * ps] = cpu::narrow<scalar_t>(cls[j] < 0 ? acc_t(0) : p * (dp - weighted[j]));
    }
  }
}

// Focal gradient of a tile: d loss / d x(c, j) = coef[j] (delta_{c, cls[j]} - p(c, j)), coef the
// pixel's scale x A (0 where ignored), written with the logits' offsets from grad.
template <typename scalar_t, bool kUnit>
SEGFAST_CPU_MULTIVERSION void tile_focal_grad(const Tile<scalar_t, kUnit> t, const at::opmath_type<scalar_t>* lse,
                                              const int64_t* cls, const at::opmath_type<scalar_t>* coef,
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
  for_each_softmax_tile<scalar_t, target_t>(
      input, target, ignore_index, "dice_sums",
      [&](int64_t, int64_t, int64_t tile, const auto& t, const acc_t* lse, const int64_t* cls) {
        acc_t* inter = partial.data() + tile * 3 * classes;
        acc_t *pred = inter + classes, *truth = pred + classes;
        tile_prob_sums(t, lse, cls, squared, pred);
        for (int64_t j = 0; j < t.pixels; ++j) {
          if (cls[j] < 0) continue;
          inter[cls[j]] += prob(t, lse, cls[j], j);
          truth[cls[j]] += 1;
        }
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
  for_each_softmax_tile<scalar_t, target_t>(
      input, target, ignore_index, "dice_sums",
      [&](int64_t n, int64_t, int64_t, const auto& t, const acc_t* lse, const int64_t* cls) {
        const acc_t *g_inter = gs + n * g.classes, *g_pred = gs + (g.batch + n) * g.classes;
        tile_dice_grad(t, lse, cls, g_pred, g_inter, squared, out + (t.data - input.const_data_ptr<scalar_t>()));
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

// Per pixel: the log-sum-exp (saved for backward) and the loss; per tile: the loss sum and the
// counted pixels, for the fixed-order reduction.
template <typename scalar_t, typename target_t>
void focal_loss_kernel(const Tensor& input, const Tensor& target, int64_t ignore_index, FocalAlpha alpha, double gamma,
                       at::opmath_type<scalar_t>* lse, scalar_t* loss, std::vector<double>& tile_loss,
                       std::vector<double>& tile_pixels) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixels_per_image = input.size(2);
  for_each_softmax_tile<scalar_t, target_t>(
      input, target, ignore_index, "focal_loss",
      [&](int64_t n, int64_t s0, int64_t tile, const auto& t, const acc_t* lse_tile, const int64_t* cls) {
        double sum = 0, counted = 0;
        for (int64_t j = 0; j < t.pixels; ++j) {
          const int64_t at = n * pixels_per_image + s0 + j;
          lse[at] = lse_tile[j];
          acc_t value = 0;
          if (cls[j] >= 0) {
            const acc_t log_pt = cpu::widen<acc_t>(t.row(cls[j])[j * t.pixel_stride()]) - lse_tile[j];
            value = focal_terms<acc_t>(log_pt, alpha.of<acc_t>(cls[j]), static_cast<acc_t>(gamma)).loss;
            counted += 1;
          }
          if (loss != nullptr) loss[at] = cpu::narrow<scalar_t>(value);
          sum += value;
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
      int64_t cls[kTile];
      acc_t coef[kTile];  // scale * A
      tile_classes(target, tp, n, s0, pixels, g.classes, ignore_index, "focal_loss", cls);
      for (int64_t j = 0; j < pixels; ++j) {
        if (cls[j] < 0) {
          coef[j] = 0;
          continue;
        }
        const acc_t scale = grad_pixels != nullptr ? grad_pixels[n * g.pixels + s0 + j] : grad_scale;
        const acc_t log_pt = cpu::widen<acc_t>(t.row(cls[j])[j * t.pixel_stride()]) - lse_tile[j];
        coef[j] = scale * focal_terms<acc_t>(log_pt, alpha.of<acc_t>(cls[j]), static_cast<acc_t>(gamma)).a;
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

// Dice and focal losses on CPU, softmax fused in: one pass over each pixel's classes for the
// log-sum-exp, one for the sums or the gradient. Sums over pixels go through per-tile partials
// added in a fixed order, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
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

namespace segfast {
namespace {

using at::Tensor;

constexpr int64_t kTile = 256;  // pixels per task: fixed by the sizes, so is the order of the sums

// Calls f(n, s0, s1, tile) for every tile of pixels of every image, in parallel.
template <typename F>
void for_each_tile(int64_t batch, int64_t pixels, F&& f) {
  const int64_t per_image = (pixels + kTile - 1) / kTile;
  at::parallel_for(0, batch * per_image, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / per_image, s0 = t % per_image * kTile;
      f(n, s0, std::min(pixels, s0 + kTile), t);
    }
  });
}

int64_t tile_count(int64_t batch, int64_t pixels) { return batch * ((pixels + kTile - 1) / kTile); }

// The class of pixel (n, s), or -1 when ignored; a bad index raises IndexError.
template <typename target_t>
int64_t class_at(const Tensor& target, const target_t* t, int64_t n, int64_t s, int64_t classes,
                 int64_t ignore_index, const char* op) {
  const auto cls = static_cast<int64_t>(t[n * target.stride(0) + s * target.stride(1)]);
  if (cls == ignore_index) return -1;
  TORCH_CHECK_INDEX(cls >= 0 && cls < classes, op, ": target class ", cls, " at (n=", n, ", pixel=", s,
                    ") is outside [0, ", classes, ") and is not ignore_index (", ignore_index, ")");
  return cls;
}

Tensor dice_sums_cpu(const Tensor& input_, const Tensor& target, int64_t ignore_index, bool squared) {
  check_loss_inputs("dice_loss", input_, target);
  const Tensor input = dense(input_);
  const int64_t batch = input.size(0), classes = input.size(1), pixels = input.size(2);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  Tensor sums = at::zeros({3, batch, classes}, input.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "dice_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_class_index(target.scalar_type(), "loss target", [&](auto target_type) {
      using target_t = decltype(target_type);
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      const target_t* t = target.const_data_ptr<target_t>();
      std::vector<acc_t> partial(tile_count(batch, pixels) * 3 * classes, acc_t(0));
      for_each_tile(batch, pixels, [&](int64_t n, int64_t s0, int64_t s1, int64_t tile) {
        acc_t* inter = partial.data() + tile * 3 * classes;
        acc_t *pred = inter + classes, *truth = pred + classes;
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t cls = class_at(target, t, n, s, classes, ignore_index, "dice_loss");
          if (cls < 0) continue;
          const scalar_t* px = x + n * input.stride(0) + s * input.stride(2);
          const acc_t lse = pixel_logsumexp<acc_t>(px, classes, input.stride(1));
          for (int64_t c = 0; c < classes; ++c) {
            const acc_t p = std::exp(static_cast<acc_t>(px[c * input.stride(1)]) - lse);
            pred[c] += squared ? p * p : p;
          }
          inter[cls] += std::exp(static_cast<acc_t>(px[cls * input.stride(1)]) - lse);
          truth[cls] += 1;
        }
      });
      acc_t* out = sums.mutable_data_ptr<acc_t>();
      const int64_t per_image = tile_count(1, pixels);
      for (int64_t n = 0; n < batch; ++n) {
        for (int64_t tile = n * per_image; tile < (n + 1) * per_image; ++tile) {
          for (int64_t k = 0; k < 3; ++k) {
            for (int64_t c = 0; c < classes; ++c) {
              out[(k * batch + n) * classes + c] += partial[(tile * 3 + k) * classes + c];
            }
          }
        }
      }
    });
  });
  return sums;
}

Tensor dice_sums_backward_cpu(const Tensor& grad_sums_, const Tensor& input_, const Tensor& target,
                              int64_t ignore_index, bool squared) {
  check_loss_inputs("dice_loss", input_, target);
  const Tensor input = dense(input_);
  const int64_t batch = input.size(0), classes = input.size(1), pixels = input.size(2);
  const Tensor grad_sums = grad_sums_.to(at::toOpMathType(input.scalar_type())).contiguous();
  TORCH_CHECK_VALUE(grad_sums.sizes() == at::IntArrayRef({3, batch, classes}),
                    "dice_sums_backward: grad_sums must be (3, N, C), got ", grad_sums.sizes());
  Tensor grad = at::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "dice_sums_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_class_index(target.scalar_type(), "loss target", [&](auto target_type) {
      using target_t = decltype(target_type);
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      const target_t* t = target.const_data_ptr<target_t>();
      const acc_t* gs = grad_sums.const_data_ptr<acc_t>();
      scalar_t* g = grad.mutable_data_ptr<scalar_t>();
      const int64_t cs = input.stride(1);
      for_each_tile(batch, pixels, [&](int64_t n, int64_t s0, int64_t s1, int64_t) {
        std::vector<acc_t> dp(classes), p(classes);
        const acc_t *g_inter = gs + n * classes, *g_pred = gs + (batch + n) * classes;
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t at = n * input.stride(0) + s * input.stride(2);
          const int64_t cls = class_at(target, t, n, s, classes, ignore_index, "dice_loss");
          if (cls < 0) {
            for (int64_t c = 0; c < classes; ++c) g[at + c * cs] = scalar_t(0);
            continue;
          }
          const acc_t lse = pixel_logsumexp<acc_t>(x + at, classes, cs);
          acc_t weighted = 0;  // sum_c p_c dL/dp_c
          for (int64_t c = 0; c < classes; ++c) {
            p[c] = std::exp(static_cast<acc_t>(x[at + c * cs]) - lse);
            dp[c] = g_pred[c] * (squared ? 2 * p[c] : acc_t(1)) + (c == cls ? g_inter[c] : acc_t(0));
            weighted += p[c] * dp[c];
          }
          for (int64_t c = 0; c < classes; ++c) g[at + c * cs] = static_cast<scalar_t>(p[c] * (dp[c] - weighted));
        }
      });
    });
  });
  return grad;
}

std::tuple<Tensor, Tensor, Tensor> focal_loss_cpu(const Tensor& input_, const Tensor& target,
                                                  const std::optional<Tensor>& alpha_, double gamma,
                                                  c10::string_view reduction_, int64_t ignore_index) {
  check_loss_inputs("focal_loss", input_, target);
  const Tensor input = dense(input_);
  const Reduction reduction = parse_reduction(reduction_);
  const int64_t batch = input.size(0), classes = input.size(1), pixels = input.size(2);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const Tensor alpha = alpha_ && alpha_->defined() ? alpha_->to(at::kDouble).contiguous() : Tensor();
  Tensor lse = at::empty({batch, pixels}, input.options().dtype(acc_type));
  Tensor loss = reduction == Reduction::None ? at::empty({batch, pixels}, input.options()) : Tensor();
  std::vector<double> tile_loss(tile_count(batch, pixels)), tile_pixels(tile_count(batch, pixels));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "focal_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_class_index(target.scalar_type(), "loss target", [&](auto target_type) {
      using target_t = decltype(target_type);
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      const target_t* t = target.const_data_ptr<target_t>();
      const double* a = alpha.defined() ? alpha.const_data_ptr<double>() : nullptr;
      acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
      scalar_t* loss_p = loss.defined() ? loss.mutable_data_ptr<scalar_t>() : nullptr;
      for_each_tile(batch, pixels, [&](int64_t n, int64_t s0, int64_t s1, int64_t tile) {
        double sum = 0, counted = 0;
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t at = n * input.stride(0) + s * input.stride(2);
          const acc_t l = pixel_logsumexp<acc_t>(x + at, classes, input.stride(1));
          lse_p[n * pixels + s] = l;
          const int64_t cls = class_at(target, t, n, s, classes, ignore_index, "focal_loss");
          acc_t value = 0;
          if (cls >= 0) {
            const auto alpha_t = static_cast<acc_t>(a ? a[cls] : 1.0);
            value = focal_terms<acc_t>(static_cast<acc_t>(x[at + cls * input.stride(1)]) - l, alpha_t,
                                       static_cast<acc_t>(gamma)).loss;
            counted += 1;
          }
          if (loss_p != nullptr) loss_p[n * pixels + s] = static_cast<scalar_t>(value);
          sum += value;
        }
        tile_loss[tile] = sum;
        tile_pixels[tile] = counted;
      });
    });
  });
  double sum = 0, count = 0;
  for (size_t i = 0; i < tile_loss.size(); ++i) {
    sum += tile_loss[i];
    count += tile_pixels[i];
  }
  Tensor count_t = at::scalar_tensor(count, input.options().dtype(acc_type));
  if (reduction != Reduction::None) {
    loss = at::scalar_tensor(reduction == Reduction::Mean ? sum / count : sum, input.options());
  }
  return {loss, lse, count_t};
}

Tensor focal_loss_backward_cpu(const Tensor& grad_loss, const Tensor& input_, const Tensor& target,
                               const std::optional<Tensor>& alpha_, double gamma, const Tensor& lse_,
                               const Tensor& count, c10::string_view reduction_, int64_t ignore_index) {
  check_loss_inputs("focal_loss", input_, target);
  const Tensor input = dense(input_);
  const Reduction reduction = parse_reduction(reduction_);
  const int64_t batch = input.size(0), classes = input.size(1), pixels = input.size(2);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const Tensor lse = lse_.to(acc_type).contiguous(), g_loss = grad_loss.to(acc_type).contiguous();
  const Tensor alpha = alpha_ && alpha_->defined() ? alpha_->to(at::kDouble).contiguous() : Tensor();
  Tensor grad = at::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "focal_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gl = g_loss.const_data_ptr<acc_t>();
    const acc_t reduced = reduction == Reduction::Mean ? gl[0] / count.item<acc_t>() : gl[0];
    dispatch_class_index(target.scalar_type(), "loss target", [&](auto target_type) {
      using target_t = decltype(target_type);
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      const target_t* t = target.const_data_ptr<target_t>();
      const double* a = alpha.defined() ? alpha.const_data_ptr<double>() : nullptr;
      const acc_t* lse_p = lse.const_data_ptr<acc_t>();
      scalar_t* g = grad.mutable_data_ptr<scalar_t>();
      const int64_t cs = input.stride(1);
      for_each_tile(batch, pixels, [&](int64_t n, int64_t s0, int64_t s1, int64_t) {
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t at = n * input.stride(0) + s * input.stride(2);
          const int64_t cls = class_at(target, t, n, s, classes, ignore_index, "focal_loss");
          const acc_t scale = cls < 0 ? acc_t(0) : (reduction == Reduction::None ? gl[n * pixels + s] : reduced);
          const acc_t l = lse_p[n * pixels + s];
          const acc_t big_a = cls < 0 ? acc_t(0)
                                      : focal_terms<acc_t>(static_cast<acc_t>(x[at + cls * cs]) - l,
                                                           static_cast<acc_t>(a ? a[cls] : 1.0),
                                                           static_cast<acc_t>(gamma)).a;
          for (int64_t c = 0; c < classes; ++c) {
            const acc_t p = std::exp(static_cast<acc_t>(x[at + c * cs]) - l);
            g[at + c * cs] = static_cast<scalar_t>(scale * big_a * ((c == cls ? acc_t(1) : acc_t(0)) - p));
          }
        }
      });
    });
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

// Dice and focal losses on CUDA, softmax fused in; per-pixel math from
// common/segmentation_losses.h (shared with the CPU kernels). Sums over pixels go through per-block
// partials added in a fixed order (no float atomics), so results are the same run to run. A bad
// class index is flagged and raised as IndexError after the kernel, as in cross_entropy, and makes
// the loss NaN (what remains of the check inside a CUDA graph capture, cuda/bad_index.cuh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>

#include "common/class_index.h"
#include "common/devices.h"
#include "common/layout.h"
#include "common/reduction.h"
#include "common/segmentation_losses.h"
#include "common/softmax.h"
#include "cuda/bad_index.cuh"
#include "cuda/fast_divide.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

using at::Tensor;

struct PixelIndexing {
  int64_t batch, classes, pixels, batch_stride, class_stride, pixel_stride, target_stride0, target_stride1,
      ignore_index;
  cuda::FastDivider by_pixels;

  // pixel i of the (N, S) pixels: (n, s)
  __device__ cuda::QuotientRemainder split(int64_t i) const { return by_pixels.divmod(i); }

  __device__ int64_t logits_at(int64_t n, int64_t s) const { return n * batch_stride + s * pixel_stride; }
  static constexpr int64_t kIgnored = -1, kBadClass = -2;

  // the class of pixel (n, s), kIgnored, or kBadClass when out of range (flagged in bad)
  template <typename target_t>
  __device__ int64_t class_at(const target_t* t, int64_t n, int64_t s, unsigned long long* bad) const {
    const auto cls = static_cast<int64_t>(t[n * target_stride0 + s * target_stride1]);
    if (cls == ignore_index) return kIgnored;
    if (cls < 0 || cls >= classes) {
      if (bad != nullptr) cuda::flag_bad_pixel(bad, n * pixels + s);
      return kBadClass;
    }
    return cls;
  }
};

PixelIndexing indexing_of(const Tensor& x, const Tensor& t, int64_t ignore_index) {
  return {x.size(0),   x.size(1),   x.size(2),   x.stride(0),  x.stride(1),
          x.stride(2), t.stride(0), t.stride(1), ignore_index, cuda::FastDivider(x.size(2))};
}

// Calls f(scalar_t{}, target_t{}) for the logits' floating type and the target's class-index type.
template <typename F>
void dispatch_loss_types(const Tensor& input, const Tensor& target, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dice_sums or focal_loss", [&] {
    dispatch_class_index(target.scalar_type(), "loss target", [&](auto index) { f(scalar_t{}, index); });
  });
}

// The checked arguments every Dice and focal entry point starts from: dense logits and their indexing.
struct LossOperands {
  Tensor input;
  PixelIndexing g;
};

LossOperands prepare_loss(const char* op, const Tensor& input_, const Tensor& target, int64_t ignore_index) {
  check_loss_inputs(op, input_, target);
  check_same_device(op, {named("input", input_), named("target", target)});
  const Tensor input = dense(input_);
  return {input, indexing_of(input, target, ignore_index)};
}

// ----------------------------------------------------------------------------------------- Dice

// Each pixel's log-sum-exp, and the check of its class index (once a pixel, and also with no
// classes at all, where every index not ignored is out of range).
template <typename scalar_t, typename target_t>
__global__ void pixel_lse_kernel(const scalar_t* x, const target_t* t, PixelIndexing g, at::opmath_type<scalar_t>* lse,
                                 unsigned long long* bad) {
  SEGFAST_CUDA_KERNEL_LOOP(i, g.batch * g.pixels) {
    const auto [n, s] = g.split(i);
    g.class_at(t, n, s, bad);
    lse[i] = pixel_logsumexp<at::opmath_type<scalar_t>>(x + g.logits_at(n, s), g.classes, g.class_stride);
  }
}

// Adds pixel s of image n to class c's sums: p y, p (or p^2) and y (pixel_lse_kernel has flagged
// a bad class index; its pixel makes the sums NaN).
template <typename scalar_t, typename target_t, typename acc_t>
__device__ __forceinline__ void add_dice_pixel(const scalar_t* x, const target_t* t, const PixelIndexing& g, int64_t n,
                                               int64_t s, int64_t c, bool squared, const acc_t* lse, acc_t& inter,
                                               acc_t& pred, acc_t& truth) {
  const int64_t cls = g.class_at(t, n, s, nullptr);
  if (cls == PixelIndexing::kBadClass) pred = std::numeric_limits<acc_t>::quiet_NaN();
  if (cls < 0) return;
  const acc_t p = exp(static_cast<acc_t>(x[g.logits_at(n, s) + c * g.class_stride]) - lse[n * g.pixels + s]);
  pred += squared ? p * p : p;
  if (cls == c) {
    inter += p;
    truth += 1;
  }
}

// Block n * chunks + chunk sums, for each class, p y, p (or p^2) and y over its chunk of image n:
// partial[((n * chunks + chunk) * 3 + k) * classes + c]. A 1-D grid: N may pass gridDim.y's 65535.
template <typename scalar_t, typename target_t>
__global__ void dice_sums_kernel(const scalar_t* x, const target_t* t, PixelIndexing g, int64_t chunks, bool squared,
                                 const at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t chunk_len = (g.pixels + chunks - 1) / chunks;
  const int64_t s0 = chunk * chunk_len, s1 = std::min(g.pixels, s0 + chunk_len);
  for (int64_t c = 0; c < g.classes; ++c) {
    acc_t inter = 0, pred = 0, truth = 0;
    for (int64_t s = s0 + threadIdx.x; s < s1; s += blockDim.x) {
      add_dice_pixel(x, t, g, n, s, c, squared, lse, inter, pred, truth);
    }
    inter = cuda::block_sum(inter);
    pred = cuda::block_sum(pred);
    truth = cuda::block_sum(truth);
    if (threadIdx.x == 0) {
      acc_t* out = partial + (n * chunks + chunk) * 3 * g.classes + c;
      out[0] = inter;
      out[g.classes] = pred;
      out[2 * g.classes] = truth;
    }
  }
}

// Few pixels a sample ((N, C) logits have one): a block per sample would leave most of its threads
// idle and spend its time in block sums, so a thread takes a whole sample instead, chunks = 1.
constexpr int64_t kRowPixels = 32;

template <typename scalar_t, typename target_t>
__global__ void dice_sums_rows_kernel(const scalar_t* x, const target_t* t, PixelIndexing g, bool squared,
                                      const at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  SEGFAST_CUDA_KERNEL_LOOP(n, g.batch) {
    for (int64_t c = 0; c < g.classes; ++c) {
      acc_t inter = 0, pred = 0, truth = 0;
      for (int64_t s = 0; s < g.pixels; ++s) add_dice_pixel(x, t, g, n, s, c, squared, lse, inter, pred, truth);
      acc_t* out = partial + n * 3 * g.classes + c;
      out[0] = inter;
      out[g.classes] = pred;
      out[2 * g.classes] = truth;
    }
  }
}

template <typename scalar_t, typename target_t>
__global__ void dice_sums_backward_kernel(const scalar_t* x, const target_t* t, PixelIndexing g, bool squared,
                                          const at::opmath_type<scalar_t>* grad_sums, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  SEGFAST_CUDA_KERNEL_LOOP(i, g.batch * g.pixels) {
    const auto [n, s] = g.split(i);
    const int64_t at = g.logits_at(n, s);
    const int64_t cls = g.class_at(t, n, s, nullptr);
    if (cls < 0) {
      for (int64_t c = 0; c < g.classes; ++c) grad[at + c * g.class_stride] = scalar_t(0);
      continue;
    }
    const acc_t* g_inter = grad_sums + n * g.classes;
    const acc_t* g_pred = grad_sums + (g.batch + n) * g.classes;
    const acc_t lse = pixel_logsumexp<acc_t>(x + at, g.classes, g.class_stride);
    acc_t weighted = 0;
    for (int64_t c = 0; c < g.classes; ++c) {
      const acc_t p = exp(static_cast<acc_t>(x[at + c * g.class_stride]) - lse);
      weighted += p * (g_pred[c] * (squared ? 2 * p : acc_t(1)) + (c == cls ? g_inter[c] : acc_t(0)));
    }
    for (int64_t c = 0; c < g.classes; ++c) {
      const acc_t p = exp(static_cast<acc_t>(x[at + c * g.class_stride]) - lse);
      const acc_t dp = g_pred[c] * (squared ? 2 * p : acc_t(1)) + (c == cls ? g_inter[c] : acc_t(0));
      grad[at + c * g.class_stride] = static_cast<scalar_t>(p * (dp - weighted));
    }
  }
}

Tensor dice_sums_cuda(const Tensor& input_, const Tensor& target, int64_t ignore_index, bool squared) {
  const cuda::DeviceGuard guard(input_.device());
  const LossOperands in = prepare_loss("dice_sums", input_, target, ignore_index);
  const Tensor& input = in.input;
  const PixelIndexing& g = in.g;
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.pixels / (cuda::kThreads * 4), 1024));
  Tensor partial = at::zeros({g.batch, chunks, 3, g.classes}, input.options().dtype(acc_type));
  cuda::BadPixel bad(input);
  if (g.batch * g.pixels > 0) {
    Tensor lse = at::empty({g.batch, g.pixels}, input.options().dtype(acc_type));
    dispatch_loss_types(input, target, [&](auto logit, auto index) {
      using scalar_t = decltype(logit);
      using target_t = decltype(index);
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      const target_t* t = target.const_data_ptr<target_t>();
      cuda::launch(pixel_lse_kernel<scalar_t, target_t>, cuda::blocks_for(g.batch * g.pixels), cuda::kThreads, x, t, g,
                   lse.mutable_data_ptr<acc_t>(), bad.flag());
      if (g.classes == 0) return;
      if (g.pixels <= kRowPixels) {
        cuda::launch(dice_sums_rows_kernel<scalar_t, target_t>, cuda::blocks_for(g.batch), cuda::kThreads, x, t, g,
                     squared, lse.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>());
        return;
      }
      const auto blocks = static_cast<unsigned int>(chunks * g.batch);
      cuda::launch(dice_sums_kernel<scalar_t, target_t>, blocks, cuda::kThreads, x, t, g, chunks, squared,
                   lse.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>());
    });
  }
  bad.raise_if_any(target, g.pixels, g.classes, ignore_index, "dice_sums");
  return partial.sum(1).permute({1, 0, 2}).contiguous();  // (3, N, C), summed over chunks in a fixed order
}

Tensor dice_sums_backward_cuda(const Tensor& grad_sums_, const Tensor& input_, const Tensor& target,
                               int64_t ignore_index, bool squared) {
  const cuda::DeviceGuard guard(input_.device());
  check_same_device("dice_sums_backward", {named("input", input_), named("grad_sums", grad_sums_)});
  const LossOperands in = prepare_loss("dice_sums", input_, target, ignore_index);
  const Tensor& input = in.input;
  const PixelIndexing& g = in.g;
  const Tensor grad_sums = grad_sums_.to(at::toOpMathType(input.scalar_type())).contiguous();
  TORCH_CHECK_VALUE(grad_sums.sizes() == at::IntArrayRef({3, g.batch, g.classes}),
                    "dice_sums_backward: grad_sums must be (3, N, C), got ", grad_sums.sizes());
  Tensor grad = at::empty_like(input);
  const int64_t count = g.batch * g.pixels;
  if (count == 0) return grad;
  dispatch_loss_types(input, target, [&](auto logit, auto index) {
    using scalar_t = decltype(logit);
    using target_t = decltype(index);
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(dice_sums_backward_kernel<scalar_t, target_t>, cuda::blocks_for(count), cuda::kThreads,
                 input.const_data_ptr<scalar_t>(), target.const_data_ptr<target_t>(), g, squared,
                 grad_sums.const_data_ptr<acc_t>(), grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

// ---------------------------------------------------------------------------------------- focal

template <typename scalar_t, typename target_t>
__global__ void focal_loss_kernel(const scalar_t* x, const target_t* t, const double* alpha, double gamma,
                                  PixelIndexing g, at::opmath_type<scalar_t>* lse_out, scalar_t* loss_out,
                                  at::opmath_type<scalar_t>* partial, unsigned long long* bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  acc_t loss = 0, counted = 0;
  if (i < g.batch * g.pixels) {
    const auto [n, s] = g.split(i);
    const int64_t at = g.logits_at(n, s);
    const acc_t lse = pixel_logsumexp<acc_t>(x + at, g.classes, g.class_stride);
    lse_out[i] = lse;
    const int64_t cls = g.class_at(t, n, s, bad);
    if (cls == PixelIndexing::kBadClass) loss = std::numeric_limits<acc_t>::quiet_NaN();
    if (cls >= 0) {
      loss = focal_terms<acc_t>(static_cast<acc_t>(x[at + cls * g.class_stride]) - lse,
                                static_cast<acc_t>(alpha != nullptr ? alpha[cls] : 1.0), static_cast<acc_t>(gamma))
                 .loss;
      counted = 1;
    }
    if (loss_out != nullptr) loss_out[i] = static_cast<scalar_t>(loss);
  }
  if (partial != nullptr) {
    loss = cuda::block_sum(loss);
    counted = cuda::block_sum(counted);
    if (threadIdx.x == 0) {
      partial[2 * blockIdx.x] = loss;
      partial[2 * blockIdx.x + 1] = counted;
    }
  }
}

template <typename scalar_t, typename target_t>
__global__ void focal_loss_backward_kernel(const scalar_t* x, const target_t* t, const double* alpha, double gamma,
                                           PixelIndexing g, const at::opmath_type<scalar_t>* lse,
                                           const at::opmath_type<scalar_t>* grad_loss, bool per_pixel,
                                           const at::opmath_type<scalar_t>* mean_divisor, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  SEGFAST_CUDA_KERNEL_LOOP(i, g.batch * g.pixels) {
    const auto [n, s] = g.split(i);
    const int64_t at = g.logits_at(n, s);
    const int64_t cls = g.class_at(t, n, s, nullptr);
    acc_t scale = cls < 0 ? acc_t(0) : (per_pixel ? grad_loss[i] : grad_loss[0]);
    // ignored pixels keep 0, also when every pixel is ignored and the mean's divisor is 0
    if (mean_divisor != nullptr && cls >= 0) scale /= *mean_divisor;
    const acc_t a =
        cls < 0 ? acc_t(0)
                : focal_terms<acc_t>(static_cast<acc_t>(x[at + cls * g.class_stride]) - lse[i],
                                     static_cast<acc_t>(alpha != nullptr ? alpha[cls] : 1.0), static_cast<acc_t>(gamma))
                      .a;
    for (int64_t c = 0; c < g.classes; ++c) {
      const acc_t p = exp(static_cast<acc_t>(x[at + c * g.class_stride]) - lse[i]);
      grad[at + c * g.class_stride] = static_cast<scalar_t>(scale * a * ((c == cls ? acc_t(1) : acc_t(0)) - p));
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> focal_loss_cuda(const Tensor& input_, const Tensor& target,
                                                   const std::optional<Tensor>& alpha_, double gamma,
                                                   c10::string_view reduction_, int64_t ignore_index) {
  const cuda::DeviceGuard guard(input_.device());
  check_same_device("focal_loss", {named("input", input_), named("alpha", alpha_)});
  const LossOperands in = prepare_loss("focal_loss", input_, target, ignore_index);
  const Tensor& input = in.input;
  const PixelIndexing& g = in.g;
  const Reduction reduction = parse_reduction(reduction_);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const Tensor alpha = alpha_ && alpha_->defined() ? alpha_->to(at::kDouble).contiguous() : Tensor();
  const int64_t count = g.batch * g.pixels, blocks = (count + cuda::kThreads - 1) / cuda::kThreads;
  Tensor lse = at::empty({g.batch, g.pixels}, input.options().dtype(acc_type));
  Tensor loss = reduction == Reduction::None ? at::empty({g.batch, g.pixels}, input.options()) : Tensor();
  Tensor partial = at::zeros({blocks, 2}, input.options().dtype(acc_type));
  cuda::BadPixel bad(input);
  if (count > 0) {
    dispatch_loss_types(input, target, [&](auto logit, auto index) {
      using scalar_t = decltype(logit);
      using target_t = decltype(index);
      using acc_t = at::opmath_type<scalar_t>;
      cuda::launch(focal_loss_kernel<scalar_t, target_t>, blocks, cuda::kThreads, input.const_data_ptr<scalar_t>(),
                   target.const_data_ptr<target_t>(), alpha.defined() ? alpha.const_data_ptr<double>() : nullptr, gamma,
                   g, lse.mutable_data_ptr<acc_t>(), loss.defined() ? loss.mutable_data_ptr<scalar_t>() : nullptr,
                   partial.mutable_data_ptr<acc_t>(), bad.flag());
    });
  }
  bad.raise_if_any(target, g.pixels, g.classes, ignore_index, "focal_loss");
  const Tensor totals = partial.sum(0, false, at::kDouble);  // (loss sum, counted pixels), fixed order
  Tensor counted = totals[1].to(acc_type);
  if (reduction != Reduction::None) {
    loss = (reduction == Reduction::Mean ? totals[0].div(totals[1]) : totals[0]).to(input.scalar_type());
  }
  return {loss, lse, counted};
}

Tensor focal_loss_backward_cuda(const Tensor& grad_loss, const Tensor& input_, const Tensor& target,
                                const std::optional<Tensor>& alpha_, double gamma, const Tensor& lse_,
                                const Tensor& count, c10::string_view reduction_, int64_t ignore_index) {
  const cuda::DeviceGuard guard(input_.device());
  check_same_device("focal_loss_backward", {named("input", input_), named("alpha", alpha_),
                                            named("grad_loss", grad_loss), named("lse", lse_), named("count", count)});
  const LossOperands in = prepare_loss("focal_loss", input_, target, ignore_index);
  const Tensor& input = in.input;
  const PixelIndexing& g = in.g;
  const Reduction reduction = parse_reduction(reduction_);
  Tensor grad = at::empty_like(input);
  const int64_t pixels = g.batch * g.pixels;
  if (pixels == 0) return grad;
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const Tensor lse = lse_.to(acc_type).contiguous(), g_loss = grad_loss.to(acc_type).contiguous();
  const Tensor divisor = count.to(acc_type).reshape({1});
  const Tensor alpha = alpha_ && alpha_->defined() ? alpha_->to(at::kDouble).contiguous() : Tensor();
  dispatch_loss_types(input, target, [&](auto logit, auto index) {
    using scalar_t = decltype(logit);
    using target_t = decltype(index);
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(focal_loss_backward_kernel<scalar_t, target_t>, cuda::blocks_for(pixels), cuda::kThreads,
                 input.const_data_ptr<scalar_t>(), target.const_data_ptr<target_t>(),
                 alpha.defined() ? alpha.const_data_ptr<double>() : nullptr, gamma, g, lse.const_data_ptr<acc_t>(),
                 g_loss.const_data_ptr<acc_t>(), reduction == Reduction::None,
                 reduction == Reduction::Mean ? divisor.const_data_ptr<acc_t>() : nullptr,
                 grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace

SEGFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("dice_sums", &dice_sums_cuda);
  m.impl("dice_sums_backward", &dice_sums_backward_cuda);
  m.impl("focal_loss", &focal_loss_cuda);
  m.impl("focal_loss_backward", &focal_loss_backward_cuda);
}

}  // namespace segfast

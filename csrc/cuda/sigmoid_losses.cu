// Binary and multi-label (sigmoid) losses on CUDA; per-element math from common/sigmoid_losses.h
// (shared with the CPU kernels). sigmoid_sums: a block per chunk of one (sample, class) plane,
// block sums in a fixed tree, chunks added in a fixed order (no float atomics). Elementwise passes
// (backward, focal): a thread per element, focal's sums through per-block partials. A bad integer
// target is flagged and raised as IndexError after the kernel, as in cross_entropy, and makes the
// loss NaN (what remains of the check inside a CUDA graph capture, cuda/bad_index.cuh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "common/class_index.h"
#include "common/devices.h"
#include "common/layout.h"
#include "common/reduction.h"
#include "common/sigmoid_losses.h"
#include "cuda/bad_index.cuh"
#include "cuda/fast_divide.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

using at::Tensor;

// Where element (n, c, s) of the (N, C, S) logits (and of the target, which has their strides)
// lives; i = (n C + c) S + s enumerates them.
struct Elements {
  int64_t batch, classes, pixels, batch_stride, class_stride, pixel_stride, ignore_index;
  cuda::FastDivider by_pixels, by_classes;

  __device__ int64_t count() const { return batch * classes * pixels; }
  __device__ int64_t offset(int64_t i, int64_t* plane = nullptr) const {
    const auto [nc, s] = by_pixels.divmod(i);
    const auto [n, c] = by_classes.divmod(nc);
    if (plane != nullptr) *plane = nc;
    return n * batch_stride + c * class_stride + s * pixel_stride;
  }
};

Elements elements_of(const Tensor& x, int64_t ignore_index) {
  return {x.size(0),
          x.size(1),
          x.size(2),
          x.stride(0),
          x.stride(1),
          x.stride(2),
          ignore_index,
          cuda::FastDivider(x.size(2)),
          cuda::FastDivider(x.size(1))};
}

// One element's target as a number, and whether it is counted; a bad integer target (not 0, 1 or
// ignore_index) is flagged with its index i and left out.
template <typename target_t, typename acc_t>
__device__ bool target_of(const target_t* t, int64_t at, int64_t i, int64_t ignore_index, unsigned long long* bad,
                          acc_t& y) {
  if constexpr (std::is_integral_v<target_t>) {
    const auto raw = static_cast<int64_t>(t[at]);
    if (raw == ignore_index) return false;
    if (raw != 0 && raw != 1) {
      if (bad != nullptr) cuda::flag_bad_pixel(bad, i);
      y = std::numeric_limits<acc_t>::quiet_NaN();  // the sums and loss become NaN
      return true;
    }
    y = static_cast<acc_t>(raw);
    return true;
  } else {
    y = static_cast<acc_t>(t[at]);
    return y != static_cast<acc_t>(ignore_index);
  }
}

template <typename acc_t>
__device__ SigmoidTerms<acc_t> terms_of(acc_t x, acc_t y) {
  const acc_t e = exp(-fabs(x));
  return sigmoid_terms(x, y, e, static_cast<acc_t>(log1p(e)));
}

// Calls f(scalar_t{}, target_t{}): the logits' floating dtype, the target's (the same floating
// dtype, or a class-index dtype).
template <typename F>
void dispatch_sigmoid_types(const Tensor& input, const Tensor& target, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sigmoid loss", [&] {
    if (at::isFloatingType(target.scalar_type())) return f(scalar_t{}, scalar_t{});
    dispatch_class_index(target.scalar_type(), "sigmoid loss target", [&](auto index) { f(scalar_t{}, index); });
  });
}

// The logits dense, the target with their strides (one offset reads both).
struct SigmoidOperands {
  Tensor input, target;
};

SigmoidOperands prepare(const char* op, const Tensor& input_, const Tensor& target_) {
  check_sigmoid_loss_inputs(op, input_, target_);
  check_same_device(op, {named("input", input_), named("target", target_)});
  const Tensor input = dense(input_);
  const Tensor target =
      target_.strides() == input.strides() ? target_ : at::empty_like(input, target_.options()).copy_(target_);
  return {input, target};
}

// The IndexError for the first flagged element, when the flag can be read.
void raise_if_bad(const cuda::BadPixel& bad, const Tensor& target, const char* op, int64_t ignore_index) {
  if (!cuda::BadPixel::readable()) return;
  const int64_t first = bad.first();
  if (first == -1) return;
  const int64_t per_image = target.size(1) * target.size(2), n = first / per_image, e = first % per_image;
  const int64_t value = target[n][e / target.size(2)][e % target.size(2)].item<int64_t>();
  check_binary_target(op, value, n, e, ignore_index);
}

// ------------------------------------------------------------------------------------ sums

// Block (plane, chunk) sums its chunk of plane (n, c): partial[((plane * chunks + chunk) * 5 + k)].
template <typename scalar_t, typename target_t>
__global__ void sigmoid_sums_kernel(const scalar_t* x, const target_t* t, Elements g, int64_t chunks, bool squared,
                                    at::opmath_type<scalar_t>* partial, unsigned long long* bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t n = plane / g.classes, c = plane % g.classes;
  const int64_t chunk_len = (g.pixels + chunks - 1) / chunks;
  const int64_t s0 = chunk * chunk_len, s1 = std::min(g.pixels, s0 + chunk_len);
  acc_t sums[5] = {0, 0, 0, 0, 0};  // p y, p (p^2), y, BCE, count
  for (int64_t s = s0 + threadIdx.x; s < s1; s += blockDim.x) {
    const int64_t at = n * g.batch_stride + c * g.class_stride + s * g.pixel_stride;
    acc_t y = 0;
    if (!target_of(t, at, plane * g.pixels + s, g.ignore_index, bad, y)) continue;
    const SigmoidTerms<acc_t> e = terms_of(static_cast<acc_t>(x[at]), y);
    sums[0] += e.p * y;
    sums[1] += squared ? e.p * e.p : e.p;
    sums[2] += y;
    sums[3] += e.bce;
    sums[4] += acc_t(1);
  }
  for (int k = 0; k < 5; ++k) {
    const acc_t total = cuda::block_sum(sums[k]);
    if (threadIdx.x == 0) partial[(plane * chunks + chunk) * 5 + k] = total;
  }
}

Tensor sigmoid_sums_cuda(const Tensor& input_, const Tensor& target_, int64_t ignore_index, bool squared) {
  const cuda::DeviceGuard guard(input_.device());
  const auto [input, target] = prepare("sigmoid_sums", input_, target_);
  const Elements g = elements_of(input, ignore_index);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.pixels / (cuda::kThreads * 4), 1024));
  Tensor partial = at::zeros({g.batch, g.classes, chunks, 5}, input.options().dtype(acc_type));
  cuda::BadPixel bad(input);
  if (input.numel() > 0) {
    dispatch_sigmoid_types(input, target, [&](auto logit, auto target_type) {
      using scalar_t = decltype(logit);
      using target_t = decltype(target_type);
      cuda::launch(sigmoid_sums_kernel<scalar_t, target_t>, static_cast<unsigned int>(g.batch * g.classes * chunks),
                   cuda::kThreads, input.const_data_ptr<scalar_t>(), target.const_data_ptr<target_t>(), g, chunks,
                   squared, partial.mutable_data_ptr<at::opmath_type<scalar_t>>(), bad.flag());
    });
  }
  raise_if_bad(bad, target, "sigmoid_sums", ignore_index);
  return partial.sum(2).permute({2, 0, 1}).contiguous();  // (5, N, C), chunks added in a fixed order
}

template <typename scalar_t, typename target_t>
__global__ void sigmoid_sums_backward_kernel(const scalar_t* x, const target_t* t, Elements g, bool squared,
                                             const at::opmath_type<scalar_t>* grad_sums, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t planes = g.batch * g.classes;
  SEGFAST_CUDA_KERNEL_LOOP(i, g.count()) {
    int64_t plane = 0;
    const int64_t at = g.offset(i, &plane);
    acc_t y = 0;
    acc_t d = 0;
    if (target_of(t, at, i, g.ignore_index, static_cast<unsigned long long*>(nullptr), y)) {
      const SigmoidTerms<acc_t> e = terms_of(static_cast<acc_t>(x[at]), y);
      const acc_t g_inter = grad_sums[plane], g_pred = grad_sums[planes + plane], g_bce = grad_sums[3 * planes + plane];
      d = (g_inter * y + g_pred * (squared ? acc_t(2) * e.p : acc_t(1))) * e.p * (acc_t(1) - e.p) + g_bce * (e.p - y);
    }
    grad[at] = static_cast<scalar_t>(d);
  }
}

Tensor sigmoid_sums_backward_cuda(const Tensor& grad_sums_, const Tensor& input_, const Tensor& target_,
                                  int64_t ignore_index, bool squared) {
  const cuda::DeviceGuard guard(input_.device());
  check_same_device("sigmoid_sums_backward", {named("input", input_), named("grad_sums", grad_sums_)});
  const auto [input, target] = prepare("sigmoid_sums", input_, target_);
  const Elements g = elements_of(input, ignore_index);
  const Tensor grad_sums = grad_sums_.to(at::toOpMathType(input.scalar_type())).contiguous();
  TORCH_CHECK_VALUE(grad_sums.sizes() == at::IntArrayRef({5, g.batch, g.classes}),
                    "sigmoid_sums_backward: grad_sums must be (5, N, C), got ", grad_sums.sizes());
  Tensor grad = at::empty_like(input);
  if (input.numel() == 0) return grad;
  dispatch_sigmoid_types(input, target, [&](auto logit, auto target_type) {
    using scalar_t = decltype(logit);
    using target_t = decltype(target_type);
    cuda::launch(sigmoid_sums_backward_kernel<scalar_t, target_t>, cuda::blocks_for(input.numel()), cuda::kThreads,
                 input.const_data_ptr<scalar_t>(), target.const_data_ptr<target_t>(), g, squared,
                 grad_sums.const_data_ptr<at::opmath_type<scalar_t>>(), grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

// ----------------------------------------------------------------------------------- focal

template <typename scalar_t, typename target_t>
__global__ void sigmoid_focal_loss_kernel(const scalar_t* x, const target_t* t, const double* alpha, double gamma,
                                          Elements g, scalar_t* loss_out, at::opmath_type<scalar_t>* partial,
                                          unsigned long long* bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  acc_t loss = 0, counted = 0;
  if (i < g.count()) {
    int64_t plane = 0;
    const int64_t at = g.offset(i, &plane);
    acc_t y = 0;
    if (target_of(t, at, i, g.ignore_index, bad, y)) {
      const SigmoidTerms<acc_t> e = terms_of(static_cast<acc_t>(x[at]), y);
      loss =
          sigmoid_focal_terms(e, y, sigmoid_focal_alpha(alpha, plane % g.classes, y), static_cast<acc_t>(gamma)).loss;
      counted = 1;
    }
    if (loss_out != nullptr) loss_out[at] = static_cast<scalar_t>(loss);
  }
  loss = cuda::block_sum(loss);
  counted = cuda::block_sum(counted);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = loss;
    partial[2 * blockIdx.x + 1] = counted;
  }
}

template <typename scalar_t, typename target_t>
__global__ void sigmoid_focal_loss_backward_kernel(const scalar_t* x, const target_t* t, const double* alpha,
                                                   double gamma, Elements g, const at::opmath_type<scalar_t>* grad_loss,
                                                   bool per_element, const at::opmath_type<scalar_t>* mean_divisor,
                                                   scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  SEGFAST_CUDA_KERNEL_LOOP(i, g.count()) {
    int64_t plane = 0;
    const int64_t at = g.offset(i, &plane);
    acc_t y = 0, d = 0;
    if (target_of(t, at, i, g.ignore_index, static_cast<unsigned long long*>(nullptr), y)) {
      const SigmoidTerms<acc_t> e = terms_of(static_cast<acc_t>(x[at]), y);
      acc_t scale = per_element ? grad_loss[at] : grad_loss[0];
      if (mean_divisor != nullptr) scale /= *mean_divisor;
      d = scale *
          sigmoid_focal_terms(e, y, sigmoid_focal_alpha(alpha, plane % g.classes, y), static_cast<acc_t>(gamma)).slope;
    }
    grad[at] = static_cast<scalar_t>(d);
  }
}

Tensor alpha_of(const std::optional<Tensor>& alpha_, const Elements& g) {
  const Tensor alpha = alpha_ && alpha_->defined() ? alpha_->to(at::kDouble).contiguous() : Tensor();
  TORCH_CHECK_VALUE(!alpha.defined() || alpha.numel() == g.classes, "sigmoid_focal_loss: alpha must have shape (",
                    g.classes, ",), got ", alpha.sizes());
  return alpha;
}

std::tuple<Tensor, Tensor> sigmoid_focal_loss_cuda(const Tensor& input_, const Tensor& target_,
                                                   const std::optional<Tensor>& alpha_, double gamma,
                                                   c10::string_view reduction_, int64_t ignore_index) {
  const cuda::DeviceGuard guard(input_.device());
  check_same_device("sigmoid_focal_loss", {named("input", input_), named("alpha", alpha_)});
  const auto [input, target] = prepare("sigmoid_focal_loss", input_, target_);
  const Elements g = elements_of(input, ignore_index);
  const Reduction reduction = parse_reduction(reduction_);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const Tensor alpha = alpha_of(alpha_, g);
  const int64_t count = input.numel(), blocks = (count + cuda::kThreads - 1) / cuda::kThreads;
  Tensor loss = reduction == Reduction::None ? at::empty_like(input) : Tensor();
  Tensor partial = at::zeros({blocks, 2}, input.options().dtype(acc_type));
  cuda::BadPixel bad(input);
  if (count > 0) {
    dispatch_sigmoid_types(input, target, [&](auto logit, auto target_type) {
      using scalar_t = decltype(logit);
      using target_t = decltype(target_type);
      cuda::launch(sigmoid_focal_loss_kernel<scalar_t, target_t>, static_cast<unsigned int>(blocks), cuda::kThreads,
                   input.const_data_ptr<scalar_t>(), target.const_data_ptr<target_t>(),
                   alpha.defined() ? alpha.const_data_ptr<double>() : nullptr, gamma, g,
                   loss.defined() ? loss.mutable_data_ptr<scalar_t>() : nullptr,
                   partial.mutable_data_ptr<at::opmath_type<scalar_t>>(), bad.flag());
    });
  }
  raise_if_bad(bad, target, "sigmoid_focal_loss", ignore_index);
  const Tensor totals = partial.sum(0, false, at::kDouble);  // (loss sum, counted elements), fixed order
  if (reduction != Reduction::None) {
    loss = (reduction == Reduction::Mean ? totals[0].div(totals[1]) : totals[0]).to(input.scalar_type());
  }
  return {loss, totals[1].to(acc_type)};
}

Tensor sigmoid_focal_loss_backward_cuda(const Tensor& grad_loss, const Tensor& input_, const Tensor& target_,
                                        const std::optional<Tensor>& alpha_, double gamma, const Tensor& count,
                                        c10::string_view reduction_, int64_t ignore_index) {
  const cuda::DeviceGuard guard(input_.device());
  check_same_device("sigmoid_focal_loss_backward", {named("input", input_), named("alpha", alpha_),
                                                    named("grad_loss", grad_loss), named("count", count)});
  const auto [input, target] = prepare("sigmoid_focal_loss", input_, target_);
  const Elements g = elements_of(input, ignore_index);
  const Reduction reduction = parse_reduction(reduction_);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const Tensor alpha = alpha_of(alpha_, g);
  TORCH_CHECK_VALUE(reduction != Reduction::None || grad_loss.sizes() == input.sizes(),
                    "sigmoid_focal_loss_backward: grad_loss must have the logits' shape ", input.sizes(), ", got ",
                    grad_loss.sizes());
  // per element with the logits' strides (one offset reads both), or one value
  const Tensor g_loss = reduction == Reduction::None
                            ? at::empty_like(input, input.options().dtype(acc_type)).copy_(grad_loss)
                            : grad_loss.to(acc_type).reshape({1});
  const Tensor divisor = count.to(acc_type).reshape({1});
  Tensor grad = at::empty_like(input);
  if (input.numel() == 0) return grad;
  dispatch_sigmoid_types(input, target, [&](auto logit, auto target_type) {
    using scalar_t = decltype(logit);
    using target_t = decltype(target_type);
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(sigmoid_focal_loss_backward_kernel<scalar_t, target_t>, cuda::blocks_for(input.numel()),
                 cuda::kThreads, input.const_data_ptr<scalar_t>(), target.const_data_ptr<target_t>(),
                 alpha.defined() ? alpha.const_data_ptr<double>() : nullptr, gamma, g, g_loss.const_data_ptr<acc_t>(),
                 reduction == Reduction::None, reduction == Reduction::Mean ? divisor.const_data_ptr<acc_t>() : nullptr,
                 grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace

SEGFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("sigmoid_sums", &sigmoid_sums_cuda);
  m.impl("sigmoid_sums_backward", &sigmoid_sums_backward_cuda);
  m.impl("sigmoid_focal_loss", &sigmoid_focal_loss_cuda);
  m.impl("sigmoid_focal_loss_backward", &sigmoid_focal_loss_backward_cuda);
}

}  // namespace segfast

// Per-pixel softmax cross-entropy on CUDA, straight on (N, C, S) logits of any dense strides.
//
// A pixel's classes are walked once with an online log-sum-exp (common/softmax.h), by one thread
// (NCHW: a warp reads 32 neighbouring pixels of one class plane, coalesced) or, where a pixel's
// classes are contiguous and many, by a warp (PixelThreads). Accumulation is float32 (float64 for
// float64). The mean/sum reduction is deterministic: each block sums its pixels in a fixed tree,
// and the per-block partials are added by ATen's sum, whose order is fixed too; no float atomics.
// Backward recomputes softmax from the saved per-pixel log-sum-exp, as on CPU.
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
#include <string_view>

#include "common/class_index.h"
#include "common/cross_entropy.h"
#include "common/devices.h"
#include "common/layout.h"
#include "common/macros.h"
#include "common/reduction.h"
#include "common/softmax.h"
#include "cuda/bad_index.cuh"
#include "cuda/fast_divide.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

using at::Tensor;

// Where pixel (n, s) of class c lives, and the label smoothing every pixel uses.
template <typename acc_t>
struct CrossEntropyArgs {
  int64_t batch, classes, pixels;
  int64_t batch_stride, class_stride, pixel_stride;  // logits (and probability targets)
  int64_t target_batch_stride, target_pixel_stride;  // class-index targets
  int64_t ignore_index;
  acc_t smoothing;
  cuda::FastDivider by_pixels;

  __device__ int64_t offset(int64_t pixel) const {
    const auto [n, s] = by_pixels.divmod(pixel);
    return n * batch_stride + s * pixel_stride;
  }
  __device__ int64_t target_offset(int64_t pixel) const {
    const auto [n, s] = by_pixels.divmod(pixel);
    return n * target_batch_stride + s * target_pixel_stride;
  }
  SEGFAST_HOST_DEVICE LabelSmoothing<acc_t> label_smoothing() const { return {smoothing, classes}; }
};

template <typename acc_t>
__device__ acc_t class_weight(const acc_t* weight, int64_t c) {
  return weight == nullptr ? acc_t(1) : weight[c];
}

// The threads of one pixel. A thread per pixel walks all its classes: for NCHW logits a warp reads
// 32 neighbouring pixels of one class plane, coalesced. Where a pixel's classes are contiguous and
// many ((N, C) rows, channels_last with C >= 32) that thread would walk C classes alone, reading
// one stride-C column: a warp per pixel instead, each lane every 32nd class, reading the row
// coalesced, and the lanes' partial sums combined in a fixed butterfly (the same in every lane).
template <bool kWarp>
struct PixelThreads {
  static constexpr int kThreads = kWarp ? 32 : 1;
  int64_t pixel;
  int first_class;

  __device__ PixelThreads()
      : pixel((static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kThreads),
        first_class(kWarp ? static_cast<int>(threadIdx.x % 32) : 0) {}

  // the one thread that writes the pixel's results
  __device__ bool leads() const { return first_class == 0; }

  template <typename T>
  __device__ T total(T value) const {
    if constexpr (kWarp) return cuda::warp_sum(value);
    return value;
  }

  template <typename acc_t>
  __device__ OnlineLogSumExp<acc_t> total(OnlineLogSumExp<acc_t> part) const {
    if constexpr (kWarp) {
      for (int mask = 16; mask > 0; mask /= 2) {
        OnlineLogSumExp<acc_t> other;
        other.max = __shfl_xor_sync(0xffffffffu, part.max, mask);
        other.sum = __shfl_xor_sync(0xffffffffu, part.sum, mask);
        part.merge(other);  // lanes may round differently: the leader's value is the one used
      }
    }
    return part;
  }
};

inline bool warp_per_pixel(const at::Tensor& logits) {
  return logits.stride(1) == 1 && logits.size(1) >= 32;
}

// The per-pixel sums of one pass over the classes: log-sum-exp, and for label smoothing or
// probability targets dot = sum_c coef_c x_c and mass = sum_c coef_c, coef_c for probability
// targets or the spread part for class indices (common/cross_entropy.h).
template <typename acc_t>
struct PixelSums {
  acc_t lse, dot, mass;
};

template <bool kProb, bool kWarp, typename scalar_t, typename acc_t>
__device__ PixelSums<acc_t> pixel_sums(const PixelThreads<kWarp>& t, const scalar_t* x, const scalar_t* q,
                                       const acc_t* weight, const CrossEntropyArgs<acc_t>& p, bool need_dot) {
  const LabelSmoothing<acc_t> smoothing = p.label_smoothing();
  OnlineLogSumExp<acc_t> lse;
  acc_t dot = 0, mass = 0;
  for (int64_t c = t.first_class; c < p.classes; c += t.kThreads) {
    const acc_t v = static_cast<acc_t>(x[c * p.class_stride]);
    lse.add(v);
    if (need_dot) {
      const acc_t w = class_weight(weight, c);
      const acc_t coef = kProb ? smoothing.probability_coef(w, static_cast<acc_t>(q[c * p.class_stride])) : w;
      dot += coef * v;
      mass += coef;
    }
  }
  return {t.total(lse).value(), t.total(dot), t.total(mass)};
}

// A bad class index makes its pixel's loss NaN as well as being flagged: where the flag is not read
// (inside a CUDA graph capture, cuda/bad_index.cuh) the loss still says that something is wrong.
template <typename scalar_t, typename target_t, bool kProb, bool kWarp>
__global__ void cross_entropy_kernel(const scalar_t* logits, const target_t* target, const scalar_t* prob,
                                     const at::opmath_type<scalar_t>* weight,
                                     CrossEntropyArgs<at::opmath_type<scalar_t>> p, at::opmath_type<scalar_t>* lse_out,
                                     scalar_t* loss_out, at::opmath_type<scalar_t>* partial_loss,
                                     at::opmath_type<scalar_t>* partial_weight, unsigned long long* bad_pixel) {
  using acc_t = at::opmath_type<scalar_t>;
  const PixelThreads<kWarp> t;
  const int64_t i = t.pixel;
  acc_t loss = 0, pixel_weight = 0;
  if (i < p.batch * p.pixels) {  // the same for every thread of a pixel: its warp shuffles together
    const int64_t at = p.offset(i);
    acc_t lse;
    if constexpr (kProb) {
      const PixelSums<acc_t> s = pixel_sums<true>(t, logits + at, prob + at, weight, p, true);
      lse = s.lse;
      loss = s.lse * s.mass - s.dot;
      pixel_weight = 1;
    } else {
      const int64_t cls = static_cast<int64_t>(target[p.target_offset(i)]);
      const bool valid = cls >= 0 && cls < p.classes;
      const PixelSums<acc_t> s =
          pixel_sums<false>(t, logits + at, static_cast<const scalar_t*>(nullptr), weight, p, p.smoothing != 0);
      lse = s.lse;
      if (cls != p.ignore_index && !valid) {
        if (t.leads()) cuda::flag_bad_pixel(bad_pixel, i);
        loss = std::numeric_limits<acc_t>::quiet_NaN();
      } else if (cls != p.ignore_index) {
        const acc_t wt = class_weight(weight, cls);
        const LabelSmoothing<acc_t> smoothing = p.label_smoothing();
        loss = smoothing.target_coef(wt) * (s.lse - static_cast<acc_t>(logits[at + cls * p.class_stride]));
        if (p.smoothing != 0) loss += smoothing.spread * (s.mass * s.lse - s.dot);  // mass = sum of the weights
        pixel_weight = wt;
      }
    }
    if (t.leads()) {
      lse_out[i] = lse;
      if (loss_out != nullptr) loss_out[i] = static_cast<scalar_t>(loss);
    } else {
      loss = pixel_weight = 0;  // the pixel's block-sum term is its leader's
    }
  }
  if (partial_loss != nullptr) {
    loss = cuda::block_sum(loss);
    pixel_weight = cuda::block_sum(pixel_weight);
    if (threadIdx.x == 0) {
      partial_loss[blockIdx.x] = loss;
      partial_weight[blockIdx.x] = pixel_weight;
    }
  }
}

template <typename scalar_t, typename target_t, bool kProb, bool kWarp>
__global__ void cross_entropy_backward_kernel(const scalar_t* logits, const target_t* target, const scalar_t* prob,
                                              const at::opmath_type<scalar_t>* weight,
                                              CrossEntropyArgs<at::opmath_type<scalar_t>> p,
                                              const at::opmath_type<scalar_t>* lse,
                                              const at::opmath_type<scalar_t>* grad_loss, bool per_pixel_grad,
                                              const at::opmath_type<scalar_t>* mean_divisor, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const PixelThreads<kWarp> t;
  const int64_t i = t.pixel;
  if (i >= p.batch * p.pixels) return;  // a whole warp at once: no lane is left at a shuffle
  const int64_t at = p.offset(i);
  const LabelSmoothing<acc_t> smoothing = p.label_smoothing();
  acc_t scale = per_pixel_grad ? grad_loss[i] : grad_loss[0];
  if (mean_divisor != nullptr) scale /= *mean_divisor;
  int64_t cls = -1;
  acc_t mass = 0, target_weight = 0;
  if constexpr (kProb) {
    for (int64_t c = t.first_class; c < p.classes; c += t.kThreads) {
      mass += smoothing.probability_coef(class_weight(weight, c), static_cast<acc_t>(prob[at + c * p.class_stride]));
    }
    mass = t.total(mass);
  } else {
    cls = static_cast<int64_t>(target[p.target_offset(i)]);
    if (cls == p.ignore_index || cls < 0 || cls >= p.classes) {  // forward refused bad indices already
      cls = -1;
      scale = 0;  // also when the mean's total weight is 0: torch gives 0, not NaN
    } else {      // the same branch for every lane of a pixel's warp
      target_weight = class_weight(weight, cls);
      acc_t weight_total = 0;
      for (int64_t c = t.first_class; c < p.classes; c += t.kThreads) weight_total += class_weight(weight, c);
      weight_total = t.total(weight_total);
      mass = smoothing.target_coef(target_weight) + smoothing.spread_coef(weight_total);
    }
  }
  for (int64_t c = t.first_class; c < p.classes; c += t.kThreads) {
    const acc_t w = class_weight(weight, c);
    const acc_t coef = kProb ? smoothing.probability_coef(w, static_cast<acc_t>(prob[at + c * p.class_stride]))
                             : smoothing.spread_coef(w);
    const acc_t softmax = std::exp(static_cast<acc_t>(logits[at + c * p.class_stride]) - lse[i]);
    acc_t g = scale * (softmax * mass - coef);
    if (c == cls) g -= scale * smoothing.target_coef(target_weight);
    grad[at + c * p.class_stride] = static_cast<scalar_t>(g);
  }
}

// Logits are read in place through their strides and the gradient gets the same strides, so they
// must be dense; probability targets are read with the logits' offsets.
struct Operands {
  Tensor logits, target, weight;  // weight: in the accumulation type, or undefined
  bool prob;
};

Operands prepare(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight) {
  const Tensor logits = dense(input);
  const bool prob = at::isFloatingType(target.scalar_type());
  check_cross_entropy_args(input, target, prob);
  // probability targets are read with the logits' offsets
  const Tensor t = prob && target.strides() != logits.strides() ? at::empty_like(logits).copy_(target) : target;
  Tensor w;
  if (weight && weight->defined()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->numel() == input.size(1), "weight: expected shape (", input.size(1),
                      ",), got ", weight->sizes());
    w = weight->to(at::toOpMathType(input.scalar_type())).contiguous();
  }
  return {logits, t, w, prob};
}

template <typename acc_t>
CrossEntropyArgs<acc_t> args_of(const Operands& in, int64_t ignore_index, double label_smoothing) {
  const Tensor& x = in.logits;
  const bool index_target = !in.prob;
  return {x.size(0),
          x.size(1),
          x.size(2),
          x.stride(0),
          x.stride(1),
          x.stride(2),
          index_target ? in.target.stride(0) : 0,
          index_target ? in.target.stride(1) : 0,
          ignore_index,
          static_cast<acc_t>(label_smoothing),
          cuda::FastDivider(x.size(2))};
}

// Calls f(target_t{}, kProb, kWarp) for the target's type (probabilities of the logits' dtype, or
// class indices) and the threads per pixel.
template <typename scalar_t, typename F>
void dispatch_target(const Operands& in, bool warp, F&& f) {
  auto with_threads = [&](auto target_type, auto prob) {
    if (warp) return f(target_type, prob, std::true_type{});
    f(target_type, prob, std::false_type{});
  };
  if (in.prob) return with_threads(scalar_t{}, std::true_type{});
  dispatch_class_index(in.target.scalar_type(), "cross_entropy: class-index target",
                       [&](auto index) { with_threads(index, std::false_type{}); });
}

// Blocks of cuda::kThreads for `count` pixels of one or 32 threads each.
unsigned int pixel_blocks(int64_t count, bool warp) {
  const int64_t per_block = warp ? cuda::kThreads / 32 : cuda::kThreads;
  return static_cast<unsigned int>((count + per_block - 1) / per_block);
}

std::tuple<Tensor, Tensor, Tensor> cross_entropy_cuda(const Tensor& input, const Tensor& target_,
                                                      const std::optional<Tensor>& weight, c10::string_view reduction_,
                                                      int64_t ignore_index, double label_smoothing) {
  const cuda::DeviceGuard guard(input.device());
  check_same_device("cross_entropy", {named("input", input), named("target", target_), named("weight", weight)});
  const Operands in = prepare(input, target_, weight);
  const Reduction reduction = parse_reduction(reduction_);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const int64_t batch = input.size(0), pixels = input.size(2), count = batch * pixels;
  Tensor lse = at::empty({batch, pixels}, input.options().dtype(acc_type));
  Tensor loss = reduction == Reduction::None ? at::empty({batch, pixels}, input.options()) : Tensor();
  const bool warp = warp_per_pixel(in.logits);
  const int64_t blocks = pixel_blocks(count, warp);
  Tensor partial = at::zeros({2, reduction == Reduction::None ? 0 : blocks}, input.options().dtype(acc_type));
  cuda::BadPixel bad_pixel(input);
  if (count > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const CrossEntropyArgs<acc_t> p = args_of<acc_t>(in, ignore_index, label_smoothing);
      const acc_t* w = in.weight.defined() ? in.weight.const_data_ptr<acc_t>() : nullptr;
      acc_t* partial_p = reduction == Reduction::None ? nullptr : partial.mutable_data_ptr<acc_t>();
      dispatch_target<scalar_t>(in, warp, [&](auto target_type, auto prob, auto warp_per_pixel) {
        using target_t = decltype(target_type);
        constexpr bool kProb = decltype(prob)::value, kWarp = decltype(warp_per_pixel)::value;
        cuda::launch(cross_entropy_kernel<scalar_t, target_t, kProb, kWarp>, blocks, cuda::kThreads,
                     in.logits.const_data_ptr<scalar_t>(), kProb ? nullptr : in.target.const_data_ptr<target_t>(),
                     kProb ? in.target.const_data_ptr<scalar_t>() : nullptr, w, p, lse.mutable_data_ptr<acc_t>(),
                     loss.defined() ? loss.mutable_data_ptr<scalar_t>() : nullptr, partial_p,
                     partial_p == nullptr ? nullptr : partial_p + blocks, bad_pixel.flag());
      });
    });
  }
  if (!in.prob) bad_pixel.raise_if_any(in.target, pixels, input.size(1), ignore_index, "cross_entropy");
  // sums in float64, then the loss in the input's dtype, as on CPU
  Tensor total_weight = in.prob ? at::scalar_tensor(static_cast<double>(count), input.options().dtype(acc_type))
                                : partial[1].sum(at::kDouble).to(acc_type);
  if (reduction == Reduction::None) return {loss, lse, total_weight};
  Tensor loss_sum = partial[0].sum(at::kDouble);
  loss = (reduction == Reduction::Mean ? loss_sum.div(total_weight.to(at::kDouble)) : loss_sum).to(input.scalar_type());
  return {loss, lse, total_weight};
}

Tensor cross_entropy_backward_cuda(const Tensor& grad_loss, const Tensor& input, const Tensor& target_,
                                   const std::optional<Tensor>& weight, const Tensor& lse_, const Tensor& total_weight,
                                   c10::string_view reduction_, int64_t ignore_index, double label_smoothing) {
  const cuda::DeviceGuard guard(input.device());
  check_same_device("cross_entropy_backward",
                    {named("input", input), named("target", target_), named("weight", weight),
                     named("grad_loss", grad_loss), named("lse", lse_), named("total_weight", total_weight)});
  const Operands in = prepare(input, target_, weight);
  const Reduction reduction = parse_reduction(reduction_);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const Tensor lse = lse_.to(acc_type).contiguous();
  const Tensor grad_pixels = grad_loss.to(acc_type).contiguous();
  const Tensor divisor = total_weight.to(acc_type).reshape({1});
  Tensor grad = at::empty_like(in.logits);  // keeps the logits' strides
  const int64_t count = input.size(0) * input.size(2);
  if (count == 0 || input.size(1) == 0) return grad;
  TORCH_CHECK_VALUE(reduction != Reduction::None || grad_pixels.numel() == count,
                    "cross_entropy_backward: grad_loss must have one value per pixel (", count, "), got ",
                    grad_loss.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CrossEntropyArgs<acc_t> p = args_of<acc_t>(in, ignore_index, label_smoothing);
    const acc_t* w = in.weight.defined() ? in.weight.const_data_ptr<acc_t>() : nullptr;
    const bool warp = warp_per_pixel(in.logits);
    dispatch_target<scalar_t>(in, warp, [&](auto target_type, auto prob, auto warp_per_pixel) {
      using target_t = decltype(target_type);
      constexpr bool kProb = decltype(prob)::value, kWarp = decltype(warp_per_pixel)::value;
      cuda::launch(
          cross_entropy_backward_kernel<scalar_t, target_t, kProb, kWarp>, pixel_blocks(count, warp), cuda::kThreads,
          in.logits.const_data_ptr<scalar_t>(), kProb ? nullptr : in.target.const_data_ptr<target_t>(),
          kProb ? in.target.const_data_ptr<scalar_t>() : nullptr, w, p, lse.const_data_ptr<acc_t>(),
          grad_pixels.const_data_ptr<acc_t>(), reduction == Reduction::None,
          reduction == Reduction::Mean ? divisor.const_data_ptr<acc_t>() : nullptr, grad.mutable_data_ptr<scalar_t>());
    });
  });
  return grad;
}

}  // namespace

SEGFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("cross_entropy", &cross_entropy_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
}

}  // namespace segfast

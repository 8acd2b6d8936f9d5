// batch_norm_act on CUDA (math: common/batch_norm_act.h). Per-channel sums: one block per channel,
// a fixed tree (cuda::block_sum), no atomics, so results are the same run to run. Elementwise passes
// are grid-stride loops; NCHW and channels_last are read in place.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "common/batch_norm_act.h"
#include "common/layout.h"
#include "cuda/fast_divide.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

using at::Tensor;

// Where value i (of channel c) of a channel lives: NCHW planes or channels_last rows.
struct ChannelIndexing {
  int64_t batch, channels, inner;
  bool channels_last;
  cuda::FastDivider by_channels, by_inner;

  __device__ int64_t values() const { return batch * inner; }
  // offset of value j (0 <= j < values()) of channel c
  __device__ int64_t offset(int64_t c, int64_t j) const {
    if (channels_last) return j * channels + c;
    const auto [n, s] = by_inner.divmod(j);
    return (n * channels + c) * inner + s;
  }
  __device__ int64_t channel_of(int64_t offset) const {
    return by_channels.divmod(channels_last ? offset : by_inner.divide(offset)).remainder;
  }
};

ChannelIndexing indexing_of(const Tensor& t) {
  int64_t inner = 1;
  for (int64_t d = 2; d < t.dim(); ++d) inner *= t.size(d);
  return {t.size(0),
          t.size(1),
          inner,
          memory_format(t) == at::MemoryFormat::ChannelsLast,
          cuda::FastDivider(t.size(1)),
          cuda::FastDivider(inner)};
}

// Block c: the batch mean and invstd of channel c (sums of values shifted by the channel's first,
// so the variance does not cancel), and its running statistics updated as torch updates them.
template <typename scalar_t, typename stat_t>
__global__ void batch_norm_stats_kernel(const scalar_t* x, ChannelIndexing ix, double eps, double momentum,
                                        at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* invstd,
                                        stat_t* running_mean, stat_t* running_var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x, count = ix.values();
  const acc_t shift = static_cast<acc_t>(x[ix.offset(c, 0)]);
  acc_t s1 = 0, s2 = 0;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    const acc_t d = static_cast<acc_t>(x[ix.offset(c, j)]) - shift;
    s1 += d;
    s2 += d * d;
  }
  s1 = cuda::block_sum(s1);
  s2 = cuda::block_sum(s2);
  if (threadIdx.x == 0) {
    const double n = static_cast<double>(count), centred = static_cast<double>(s1) / n;
    const double var = max(0.0, static_cast<double>(s2) / n - centred * centred);
    mean[c] = static_cast<acc_t>(static_cast<double>(shift) + centred);
    invstd[c] = static_cast<acc_t>(1.0 / sqrt(var + eps));
    if (running_mean != nullptr) {
      running_mean[c] = static_cast<stat_t>(momentum * static_cast<double>(mean[c]) +
                                            (1 - momentum) * static_cast<double>(running_mean[c]));
      running_var[c] =
          static_cast<stat_t>(momentum * var * n / (n - 1) + (1 - momentum) * static_cast<double>(running_var[c]));
    }
  }
}

// What the elementwise passes read per channel: z = x * scale + shift (+ residual), and backward's
// xhat = (u - center) * spread (recover() in common/batch_norm_act.h; center and spread are null in
// forward).
template <typename acc_t>
struct ChannelAffine {
  const acc_t *mean, *invstd, *weight, *bias;  // weight, bias: null without affine
  const acc_t *center, *spread;

  __device__ acc_t scale(int64_t c) const { return (weight != nullptr ? weight[c] : acc_t(1)) * invstd[c]; }
  __device__ acc_t shift(int64_t c) const { return (bias != nullptr ? bias[c] : acc_t(0)) - mean[c] * scale(c); }
};

template <Activation A, typename scalar_t>
__global__ void batch_norm_act_kernel(const scalar_t* x, const scalar_t* residual, scalar_t* out, ChannelIndexing ix,
                                      ChannelAffine<at::opmath_type<scalar_t>> affine, int64_t n,
                                      at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  SEGFAST_CUDA_KERNEL_LOOP(i, n) {
    const int64_t c = ix.channel_of(i);
    acc_t z = static_cast<acc_t>(x[i]) * affine.scale(c) + affine.shift(c);
    if (residual != nullptr) z += static_cast<acc_t>(residual[i]);
    out[i] = static_cast<scalar_t>(activate<A>(z, slope));
  }
}

// g = grad_out * act'(z) of value i (channel c) from the saved value v (input, or output with
// kFromOutput), and xhat.
template <bool kFromOutput, Activation A, typename scalar_t>
__device__ void grad_z(const scalar_t* v, const scalar_t* residual, const scalar_t* grad_out,
                       const ChannelAffine<at::opmath_type<scalar_t>>& affine, int64_t c, int64_t i,
                       at::opmath_type<scalar_t> slope, at::opmath_type<scalar_t>& g, at::opmath_type<scalar_t>& xhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t r = residual != nullptr ? static_cast<acc_t>(residual[i]) : acc_t(0);
  const auto [z, u] = recover<kFromOutput, A>(static_cast<acc_t>(v[i]), r, affine.scale(c), affine.shift(c), slope);
  g = static_cast<acc_t>(grad_out[i]) * derivative_at<A>(z, slope);
  xhat = (u - affine.center[c]) * affine.spread[c];
}

// Block c: sum_g and sum_gxhat of channel c.
template <bool kFromOutput, Activation A, typename scalar_t>
__global__ void batch_norm_act_sums_kernel(const scalar_t* v, const scalar_t* residual, const scalar_t* grad_out,
                                           ChannelIndexing ix, ChannelAffine<at::opmath_type<scalar_t>> affine,
                                           at::opmath_type<scalar_t> slope, at::opmath_type<scalar_t>* sum_g,
                                           at::opmath_type<scalar_t>* sum_gxhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x, count = ix.values();
  acc_t s1 = 0, s2 = 0;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    acc_t g, xhat;
    grad_z<kFromOutput, A>(v, residual, grad_out, affine, c, ix.offset(c, j), slope, g, xhat);
    s1 += g;
    s2 += g * xhat;
  }
  s1 = cuda::block_sum(s1);
  s2 = cuda::block_sum(s2);
  if (threadIdx.x == 0) {
    sum_g[c] = s1;
    sum_gxhat[c] = s2;
  }
}

template <bool kFromOutput, Activation A, typename scalar_t>
__global__ void batch_norm_act_backward_kernel(const scalar_t* v, const scalar_t* residual, const scalar_t* grad_out,
                                               ChannelIndexing ix, ChannelAffine<at::opmath_type<scalar_t>> affine,
                                               at::opmath_type<scalar_t> slope, const at::opmath_type<scalar_t>* sum_g,
                                               const at::opmath_type<scalar_t>* sum_gxhat, int64_t n,
                                               scalar_t* grad_input, scalar_t* grad_residual) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t count = static_cast<acc_t>(ix.values());
  SEGFAST_CUDA_KERNEL_LOOP(i, n) {
    const int64_t c = ix.channel_of(i);
    acc_t g, xhat;
    grad_z<kFromOutput, A>(v, residual, grad_out, affine, c, i, slope, g, xhat);
    if (grad_residual != nullptr) grad_residual[i] = static_cast<scalar_t>(g);
    if (grad_input == nullptr) continue;
    const acc_t k = (affine.weight != nullptr ? affine.weight[c] : acc_t(1)) * affine.invstd[c];
    acc_t gi = k * g;
    if (sum_g != nullptr) gi -= k * (sum_g[c] + xhat * sum_gxhat[c]) / count;  // training: the statistics' gradient
    grad_input[i] = static_cast<scalar_t>(gi);
  }
}

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// The forward into `out` (a dense tensor of input's shape and layout; it may be the input itself).
std::tuple<Tensor, Tensor> batch_norm_act_into(const Tensor& input, const BatchNormActArgs& args, Tensor& out) {
  const auto& [weight, bias, running_mean, running_var, training, momentum, eps, act, negative_slope, residual_] = args;
  const Tensor residual = residual_ && residual_->defined() ? residual_->contiguous(memory_format(input)) : Tensor();
  const ChannelIndexing ix = indexing_of(input);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  Tensor mean = at::empty({ix.channels}, input.options().dtype(acc_type));
  Tensor invstd = at::empty({ix.channels}, input.options().dtype(acc_type));
  const int64_t n = input.numel();
  if (!training) {
    mean.copy_(*running_mean);
    invstd.copy_(running_var->to(at::kDouble).add(eps).rsqrt());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (training && ix.channels > 0) {
      const bool running = running_mean && running_mean->defined();
      const Tensor rm = running ? running_mean->to(at::kDouble) : Tensor();
      const Tensor rv = running ? running_var->to(at::kDouble) : Tensor();
      cuda::launch(batch_norm_stats_kernel<scalar_t, double>, static_cast<unsigned int>(ix.channels), cuda::kThreads,
                   input.const_data_ptr<scalar_t>(), ix, eps, momentum, mean.mutable_data_ptr<acc_t>(),
                   invstd.mutable_data_ptr<acc_t>(), running ? rm.mutable_data_ptr<double>() : nullptr,
                   running ? rv.mutable_data_ptr<double>() : nullptr);
      if (running) {
        running_mean->copy_(rm);
        running_var->copy_(rv);
      }
    }
    if (n == 0) return;
    const Tensor w = weight && weight->defined() ? weight->to(acc_type).contiguous() : Tensor();
    const Tensor b = bias && bias->defined() ? bias->to(acc_type).contiguous() : Tensor();
    const ChannelAffine<acc_t> affine{mean.const_data_ptr<acc_t>(),
                                      invstd.const_data_ptr<acc_t>(),
                                      data_or_null<acc_t>(w),
                                      data_or_null<acc_t>(b),
                                      nullptr,
                                      nullptr};
    dispatch_activation(act, [&](auto a) {
      cuda::launch(batch_norm_act_kernel<decltype(a)::value, scalar_t>, cuda::blocks_for(n), cuda::kThreads,
                   input.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(residual), out.mutable_data_ptr<scalar_t>(),
                   ix, affine, n, static_cast<acc_t>(negative_slope));
    });
  });
  return {mean, invstd};
}

std::pair<Tensor, Tensor> batch_norm_act_backward_into(const BatchNormActBackwardOperands& o) {
  const ChannelIndexing ix = indexing_of(o.saved);
  const auto acc_type = o.mean.scalar_type();
  const bool affine_params = o.weight && o.weight->defined();
  const bool need_sums = o.training || (affine_params && (o.output_mask[2] || o.output_mask[3]));
  Tensor sums = at::empty({2, ix.channels}, o.mean.options());
  const int64_t n = o.saved.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.saved.scalar_type(), "batch_norm_act_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor w = affine_params ? o.weight->to(acc_type).contiguous() : Tensor();
    const Tensor b = o.bias && o.bias->defined() ? o.bias->to(acc_type).contiguous() : Tensor();
    const ChannelAffine<acc_t> affine{o.mean.const_data_ptr<acc_t>(),   o.invstd.const_data_ptr<acc_t>(),
                                      data_or_null<acc_t>(w),           data_or_null<acc_t>(b),
                                      o.center.const_data_ptr<acc_t>(), o.spread.const_data_ptr<acc_t>()};
    const auto slope = static_cast<acc_t>(o.negative_slope);
    dispatch_saved_value(o.from_output, o.act, [&](auto from_out, auto a) {
      constexpr bool kFromOutput = decltype(from_out)::value;
      constexpr Activation kAct = decltype(a)::value;
      acc_t* sum_g = sums.mutable_data_ptr<acc_t>();
      if (need_sums && ix.channels > 0) {
        cuda::launch(batch_norm_act_sums_kernel<kFromOutput, kAct, scalar_t>, static_cast<unsigned int>(ix.channels),
                     cuda::kThreads, o.saved.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(o.residual),
                     o.grad_out.const_data_ptr<scalar_t>(), ix, affine, slope, sum_g, sum_g + ix.channels);
      }
      if (n == 0 || (!o.grad_input.defined() && !o.grad_residual.defined())) return;
      cuda::launch(batch_norm_act_backward_kernel<kFromOutput, kAct, scalar_t>, cuda::blocks_for(n), cuda::kThreads,
                   o.saved.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(o.residual),
                   o.grad_out.const_data_ptr<scalar_t>(), ix, affine, slope, o.training ? sum_g : nullptr,
                   o.training ? sum_g + ix.channels : nullptr, n,
                   o.grad_input.defined() ? o.grad_input.mutable_data_ptr<scalar_t>() : nullptr,
                   o.grad_residual.defined() ? o.grad_residual.mutable_data_ptr<scalar_t>() : nullptr);
    });
  });
  auto param_grad = [&](bool wanted, int row) { return wanted && affine_params ? sums[row] : Tensor(); };
  return {param_grad(o.output_mask[2], 1), param_grad(o.output_mask[3], 0)};
}

struct CudaBackend {
  using Guard = cuda::DeviceGuard;
  static Tensor empty_like(const Tensor& t) { return at::empty_like(t); }
  static constexpr auto forward_into = &batch_norm_act_into;
  static constexpr auto backward_into = &batch_norm_act_backward_into;
};

}  // namespace

SEGFAST_CUDA_LIBRARY_IMPL(m) {
  BatchNormActEntries<CudaBackend>::register_for(m);
}

}  // namespace segfast

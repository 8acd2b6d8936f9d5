// max_pool2d and avg_pool2d on CUDA, NCHW and channels_last, one thread per output element in
// forward and one per input element in backward. Backward gathers: every input element sums the
// gradients of the windows that cover it (the argmax decides for max pooling), so each element is
// written once, with no atomics and a fixed order: deterministic. Window geometry, argmax codes
// and torch's avg divisor come from common/pooling.h, shared with the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/devices.h"
#include "common/layout.h"
#include "common/pooling.h"
#include "cuda/fast_divide.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

using at::IntArrayRef;
using at::Tensor;

// Coordinates of element i of a dense (N, C, H, W) tensor in NCHW or channels_last order, and
// the element's index from its coordinates.
struct Element {
  int64_t n, c, y, x;
};

struct Layout {
  int64_t channels, height, width;
  bool channels_last;
  cuda::FastDivider by_channels, by_height, by_width;

  Layout(int64_t channels_, int64_t height_, int64_t width_, bool channels_last_)
      : channels(channels_),
        height(height_),
        width(width_),
        channels_last(channels_last_),
        by_channels(channels_),
        by_height(height_),
        by_width(width_) {}

  __device__ Element at(int64_t i) const {
    if (channels_last) {
      const auto [pixel, c] = by_channels.divmod(i);
      const auto [row, x] = by_width.divmod(pixel);
      const auto [n, y] = by_height.divmod(row);
      return {n, c, y, x};
    }
    const auto [row, x] = by_width.divmod(i);
    const auto [plane, y] = by_height.divmod(row);
    const auto [n, c] = by_channels.divmod(plane);
    return {n, c, y, x};
  }
  __device__ int64_t index(int64_t n, int64_t c, int64_t y, int64_t x) const {
    return channels_last ? ((n * height + y) * width + x) * channels + c
                         : ((n * channels + c) * height + y) * width + x;
  }
};

// The window geometry, the layouts of input and output, and the strides' dividers (backward finds
// the windows covering an element by dividing by the stride, once per tap).
struct PoolKernelArgs {
  Pool2d p;
  Layout in, out;
  cuda::FastDivider by_stride_h, by_stride_w;

  explicit PoolKernelArgs(const Pool2d& pool)
      : p(pool),
        in(pool.channels, pool.h.in, pool.w.in, pool.channels_last),
        out(pool.channels, pool.h.out, pool.w.out, pool.channels_last),
        by_stride_h(pool.h.stride),
        by_stride_w(pool.w.stride) {}
};

// ---------------------------------------------------------------------------------------- max

// argmax: the tap (kh * kW + kw) for compact codes, torch's flat plane offset for int64.
template <typename scalar_t, typename index_t>
__global__ void max_pool2d_kernel(const scalar_t* in, scalar_t* out, index_t* argmax, PoolKernelArgs a, int64_t count) {
  using acc_t = at::opmath_type<scalar_t>;
  const Pool2d& p = a.p;
  const Layout &il = a.in, &ol = a.out;
  SEGFAST_CUDA_KERNEL_LOOP(i, count) {
    const Element o = ol.at(i);
    const int64_t kh0 = p.h.first_tap(o.y), kh1 = p.h.last_tap(o.y);
    const int64_t kw0 = p.w.first_tap(o.x), kw1 = p.w.last_tap(o.x);
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int64_t tap = kh0 * p.w.kernel + kw0;  // torch starts from the first tap inside the input
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      for (int64_t kw = kw0; kw < kw1; ++kw) {
        const acc_t v = static_cast<acc_t>(in[il.index(o.n, o.c, p.h.tap(o.y, kh), p.w.tap(o.x, kw))]);
        max_update(v, kh * p.w.kernel + kw, best, tap);
      }
    }
    out[i] = static_cast<scalar_t>(best);
    if constexpr (std::is_same_v<index_t, int64_t>) {
      argmax[i] = p.h.tap(o.y, tap / p.w.kernel) * p.w.in + p.w.tap(o.x, tap % p.w.kernel);
    } else {
      argmax[i] = static_cast<index_t>(tap);
    }
  }
}

template <typename scalar_t, typename index_t>
__global__ void max_pool2d_backward_kernel(const scalar_t* grad_out, const index_t* argmax, scalar_t* grad_in,
                                           PoolKernelArgs a, int64_t count) {
  using acc_t = at::opmath_type<scalar_t>;
  const Pool2d& p = a.p;
  const Layout &il = a.in, &ol = a.out;
  SEGFAST_CUDA_KERNEL_LOOP(i, count) {
    const Element e = il.at(i);
    const int64_t offset = e.y * p.w.in + e.x;
    acc_t sum = 0;
    for (int64_t kh = 0; kh < p.h.kernel; ++kh) {
      const int64_t oy = p.h.output_with_tap(e.y, kh, a.by_stride_h);
      if (oy < 0) continue;
      for (int64_t kw = 0; kw < p.w.kernel; ++kw) {
        const int64_t ox = p.w.output_with_tap(e.x, kw, a.by_stride_w);
        if (ox < 0) continue;
        const int64_t o = ol.index(e.n, e.c, oy, ox);
        if (argmax_is(argmax[o], kh * p.w.kernel + kw, offset)) sum += static_cast<acc_t>(grad_out[o]);
      }
    }
    grad_in[i] = static_cast<scalar_t>(sum);
  }
}

std::tuple<Tensor, Tensor> max_pool2d_cuda(const Tensor& input_, IntArrayRef kernel, IntArrayRef stride,
                                           IntArrayRef padding, IntArrayRef dilation, bool ceil_mode,
                                           bool return_indices) {
  const cuda::DeviceGuard guard(input_.device());
  check_float_dtype("max_pool2d", "input", input_);
  const bool cl = is_channels_last(input_);
  const Pool2d p = make_pool("max_pool2d", input_.sizes(), cl, kernel, stride, padding, dilation, ceil_mode);
  const Tensor input = input_.contiguous(format_of(p));
  const auto argmax_type = return_indices ? at::kLong : (p.taps() <= 256 ? at::kByte : at::kInt);
  Tensor out = empty_pooled(input, p, input.scalar_type());
  Tensor argmax = empty_pooled(input, p, argmax_type);
  const int64_t count = out.numel();
  if (count == 0) return {out, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool2d", [&] {
    dispatch_argmax(argmax_type, [&](auto index) {
      using index_t = decltype(index);
      cuda::launch(max_pool2d_kernel<scalar_t, index_t>, cuda::blocks_for(count), cuda::kThreads,
                   input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                   argmax.mutable_data_ptr<index_t>(), PoolKernelArgs(p), count);
    });
  });
  return {out, argmax};
}

Tensor max_pool2d_backward_cuda(const Tensor& grad_out_, const Tensor& argmax_, IntArrayRef input_size,
                                IntArrayRef kernel, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                                bool ceil_mode) {
  const cuda::DeviceGuard guard(grad_out_.device());
  check_same_device("max_pool2d_backward", {named("grad_output", grad_out_), named("argmax", argmax_)});
  const Pool2d p = make_pool("max_pool2d_backward", input_size, is_channels_last(argmax_), kernel, stride, padding,
                             dilation, ceil_mode);
  const Tensor grad_out = grad_out_.contiguous(format_of(p)), argmax = argmax_.contiguous(format_of(p));
  check_grad_size("max_pool2d_backward", grad_out, p);
  TORCH_CHECK_VALUE(argmax.sizes() == grad_out.sizes(), "max_pool2d_backward: argmax ", argmax.sizes(),
                    " and grad_output ", grad_out.sizes(), " differ");
  Tensor grad_in = at::empty(input_size, grad_out.options(), format_of(p));
  const int64_t count = grad_in.numel();
  if (count == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "max_pool2d_backward", [&] {
    dispatch_argmax(argmax.scalar_type(), [&](auto index) {
      using index_t = decltype(index);
      cuda::launch(max_pool2d_backward_kernel<scalar_t, index_t>, cuda::blocks_for(count), cuda::kThreads,
                   grad_out.const_data_ptr<scalar_t>(), argmax.const_data_ptr<index_t>(),
                   grad_in.mutable_data_ptr<scalar_t>(), PoolKernelArgs(p), count);
    });
  });
  return grad_in;
}

// ---------------------------------------------------------------------------------------- avg

template <typename scalar_t>
__global__ void avg_pool2d_kernel(const scalar_t* in, scalar_t* out, PoolKernelArgs a, AvgDivisor divisor,
                                  int64_t count) {
  using acc_t = at::opmath_type<scalar_t>;
  const Pool2d& p = a.p;
  const Layout &il = a.in, &ol = a.out;
  SEGFAST_CUDA_KERNEL_LOOP(i, count) {
    const Element o = ol.at(i);
    const AvgWindow wh = avg_window(o.y, p.h.in, p.h.kernel, p.h.stride, p.h.pad);
    const AvgWindow ww = avg_window(o.x, p.w.in, p.w.kernel, p.w.stride, p.w.pad);
    acc_t sum = 0;
    for (int64_t y = wh.begin; y < wh.end; ++y) {
      for (int64_t x = ww.begin; x < ww.end; ++x) sum += static_cast<acc_t>(in[il.index(o.n, o.c, y, x)]);
    }
    out[i] = static_cast<scalar_t>(divide(sum, divisor(divisor.count(wh), divisor.count(ww))));
  }
}

template <typename scalar_t>
__global__ void avg_pool2d_backward_kernel(const scalar_t* grad_out, scalar_t* grad_in, PoolKernelArgs a,
                                           AvgDivisor divisor, int64_t count) {
  using acc_t = at::opmath_type<scalar_t>;
  const Pool2d& p = a.p;
  const Layout &il = a.in, &ol = a.out;
  SEGFAST_CUDA_KERNEL_LOOP(i, count) {
    const Element e = il.at(i);
    acc_t sum = 0;
    for (int64_t kh = 0; kh < p.h.kernel; ++kh) {
      const int64_t oy = p.h.output_with_tap(e.y, kh, a.by_stride_h);
      if (oy < 0) continue;
      const int64_t height_count = divisor.count(avg_window(oy, p.h.in, p.h.kernel, p.h.stride, p.h.pad));
      for (int64_t kw = 0; kw < p.w.kernel; ++kw) {
        const int64_t ox = p.w.output_with_tap(e.x, kw, a.by_stride_w);
        if (ox < 0) continue;
        const int64_t width_count = divisor.count(avg_window(ox, p.w.in, p.w.kernel, p.w.stride, p.w.pad));
        sum += divide(static_cast<acc_t>(grad_out[ol.index(e.n, e.c, oy, ox)]), divisor(height_count, width_count));
      }
    }
    grad_in[i] = static_cast<scalar_t>(sum);
  }
}

Tensor avg_pool2d_cuda(const Tensor& input_, IntArrayRef kernel, IntArrayRef stride, IntArrayRef padding,
                       bool ceil_mode, bool count_include_pad, std::optional<int64_t> divisor_override) {
  const cuda::DeviceGuard guard(input_.device());
  check_float_dtype("avg_pool2d", "input", input_);
  const Pool2d p = make_avg_pool("avg_pool2d", input_.sizes(), is_channels_last(input_), kernel, stride, padding,
                                 ceil_mode, divisor_override);
  const Tensor input = input_.contiguous(format_of(p));
  const AvgDivisor divisor{count_include_pad, divisor_override.value_or(0)};
  Tensor out = empty_pooled(input, p, input.scalar_type());
  const int64_t count = out.numel();
  if (count == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "avg_pool2d", [&] {
    cuda::launch(avg_pool2d_kernel<scalar_t>, cuda::blocks_for(count), cuda::kThreads, input.const_data_ptr<scalar_t>(),
                 out.mutable_data_ptr<scalar_t>(), PoolKernelArgs(p), divisor, count);
  });
  return out;
}

Tensor avg_pool2d_backward_cuda(const Tensor& grad_out_, IntArrayRef input_size, IntArrayRef kernel, IntArrayRef stride,
                                IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                                std::optional<int64_t> divisor_override) {
  const cuda::DeviceGuard guard(grad_out_.device());
  const Pool2d p = make_avg_pool("avg_pool2d_backward", input_size, is_channels_last(grad_out_), kernel, stride,
                                 padding, ceil_mode, divisor_override);
  const Tensor grad_out = grad_out_.contiguous(format_of(p));
  check_grad_size("avg_pool2d_backward", grad_out, p);
  const AvgDivisor divisor{count_include_pad, divisor_override.value_or(0)};
  Tensor grad_in = at::empty(input_size, grad_out.options(), format_of(p));
  const int64_t count = grad_in.numel();
  if (count == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "avg_pool2d_backward", [&] {
    cuda::launch(avg_pool2d_backward_kernel<scalar_t>, cuda::blocks_for(count), cuda::kThreads,
                 grad_out.const_data_ptr<scalar_t>(), grad_in.mutable_data_ptr<scalar_t>(), PoolKernelArgs(p), divisor,
                 count);
  });
  return grad_in;
}

}  // namespace

SEGFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("max_pool2d", &max_pool2d_cuda);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cuda);
  m.impl("avg_pool2d", &avg_pool2d_cuda);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward_cuda);
}

}  // namespace segfast

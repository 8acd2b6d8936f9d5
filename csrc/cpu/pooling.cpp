// max_pool2d and avg_pool2d on CPU, NCHW and channels_last.
//
// NCHW: for each output row, every window tap (kh, kw) sweeps the whole row of outputs, so the
// inner loop runs over outputs and vectorises. channels_last: the inner loop runs over channels.
// Max pooling keeps the argmax as the tap's offset inside the window (kh * kW + kw), uint8 while
// the window has at most 256 taps: 8x less backward state than torch's int64 indices.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/layout.h"
#include "common/pooling.h"
#include "cpu/output_cache.h"
#include "cpu/vec_math.h"

namespace segfast {
namespace {

using at::IntArrayRef;
using at::Tensor;

// Runs f(i, scratch) for every i in [0, count), in parallel; each chunk of work gets its own
// scratch of `scratch_size` elements.
template <typename T, typename F>
void parallel_with_scratch(int64_t count, int64_t scratch_size, F&& f) {
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(scratch_size);
    for (int64_t i = begin; i < end; ++i) f(i, scratch.data());
  });
}

// ---------------------------------------------------------------------------------------- max

// One NCHW output row `oh` of one plane. `best` and `tap` are scratch rows of w.out elements; the
// running argmax is kept as int32 beside the float max so that the tap sweep vectorises.
template <typename scalar_t, typename index_t>
SEGFAST_CPU_MULTIVERSION void max_pool_row_nchw(const scalar_t* plane, scalar_t* out, index_t* argmax,
                                                const PoolAxis& h, const PoolAxis& w, int64_t oh,
                                                at::opmath_type<scalar_t>* best, int32_t* tap) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t kh0 = h.first_tap(oh), kh1 = h.last_tap(oh);
  if (w.is_adjacent_pairs() && h.is_adjacent_pairs()) {  // 2x2 / stride 2: one pass, taps in torch's order
    const scalar_t* top = plane + 2 * oh * w.in;
    const scalar_t* bottom = top + w.in;
#pragma omp simd
    for (int64_t ow = 0; ow < w.out; ++ow) {
      acc_t max = cpu::widen<acc_t>(top[2 * ow]);
      int32_t arg = 0;
      max_update(cpu::widen<acc_t>(top[2 * ow + 1]), int32_t{1}, max, arg);
      max_update(cpu::widen<acc_t>(bottom[2 * ow]), int32_t{2}, max, arg);
      max_update(cpu::widen<acc_t>(bottom[2 * ow + 1]), int32_t{3}, max, arg);
      out[ow] = cpu::narrow<scalar_t>(max);
      argmax[ow] = static_cast<index_t>(arg);
    }
    return;
  }
  for (int64_t ow = 0; ow < w.out; ++ow) {  // torch starts from the first tap inside the input
    best[ow] = -std::numeric_limits<acc_t>::infinity();
    tap[ow] = static_cast<int32_t>(kh0 * w.kernel + w.first_tap(ow));
  }
  for (int64_t kh = kh0; kh < kh1; ++kh) {
    const scalar_t* row = plane + h.tap(oh, kh) * w.in;
    for (int64_t kw = 0; kw < w.kernel; ++kw) {
      const auto this_tap = static_cast<int32_t>(kh * w.kernel + kw);
      const int64_t o0 = w.first_output(kw), o1 = w.last_output(kw), step = w.stride;
      const scalar_t* src = row + w.tap(0, kw);
#pragma omp simd
      for (int64_t ow = o0; ow < o1; ++ow) max_update(cpu::widen<acc_t>(src[ow * step]), this_tap, best[ow], tap[ow]);
    }
  }
  for (int64_t ow = 0; ow < w.out; ++ow) {
    out[ow] = cpu::narrow<scalar_t>(best[ow]);
    argmax[ow] = static_cast<index_t>(tap[ow]);
  }
}

// One channels_last output pixel (all channels); `best` and `tap` are scratch of `channels` elements.
template <typename scalar_t, typename index_t>
SEGFAST_CPU_MULTIVERSION void max_pool_pixel_nhwc(const scalar_t* image, scalar_t* out, index_t* argmax,
                                                  const PoolAxis& h, const PoolAxis& w, int64_t channels, int64_t oh,
                                                  int64_t ow, at::opmath_type<scalar_t>* best, int32_t* tap) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t kh0 = h.first_tap(oh), kh1 = h.last_tap(oh);
  const int64_t kw0 = w.first_tap(ow), kw1 = w.last_tap(ow);
  for (int64_t c = 0; c < channels; ++c) {
    best[c] = -std::numeric_limits<acc_t>::infinity();
    tap[c] = static_cast<int32_t>(kh0 * w.kernel + kw0);
  }
  for (int64_t kh = kh0; kh < kh1; ++kh) {
    for (int64_t kw = kw0; kw < kw1; ++kw) {
      const scalar_t* src = image + (h.tap(oh, kh) * w.in + w.tap(ow, kw)) * channels;
      const auto this_tap = static_cast<int32_t>(kh * w.kernel + kw);
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) max_update(cpu::widen<acc_t>(src[c]), this_tap, best[c], tap[c]);
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    out[c] = cpu::narrow<scalar_t>(best[c]);
    argmax[c] = static_cast<index_t>(tap[c]);
  }
}

template <typename scalar_t, typename index_t>
void max_pool2d_kernel(const Tensor& input, Tensor& out, Tensor& argmax, const Pool2d& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  index_t* a = argmax.mutable_data_ptr<index_t>();
  const int64_t in_plane = p.h.in * p.w.in, out_plane = p.h.out * p.w.out;
  if (!p.channels_last) {
    at::parallel_for(0, p.planes() * p.h.out, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> best(p.w.out);
      std::vector<int32_t> tap(p.w.out);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t plane = row / p.h.out, oh = row % p.h.out;
        const int64_t at_out = plane * out_plane + oh * p.w.out;
        max_pool_row_nchw(in + plane * in_plane, o + at_out, a + at_out, p.h, p.w, oh, best.data(), tap.data());
      }
    });
  } else {
    at::parallel_for(0, p.batch * out_plane, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> best(p.channels);
      std::vector<int32_t> tap(p.channels);
      for (int64_t pixel = begin; pixel < end; ++pixel) {
        const int64_t n = pixel / out_plane, oh = pixel % out_plane / p.w.out, ow = pixel % p.w.out;
        max_pool_pixel_nhwc(in + n * in_plane * p.channels, o + pixel * p.channels, a + pixel * p.channels, p.h, p.w,
                            p.channels, oh, ow, best.data(), tap.data());
      }
    });
  }
}

// Flat input index (torch's return_indices) of each output's compact argmax.
template <typename index_t>
Tensor flat_indices(const Tensor& argmax, const Pool2d& p) {
  Tensor flat = at::empty(argmax.sizes(), argmax.options().dtype(at::kLong), format_of(p));
  const index_t* a = argmax.const_data_ptr<index_t>();
  int64_t* f = flat.mutable_data_ptr<int64_t>();
  const int64_t out_plane = p.h.out * p.w.out;
  at::parallel_for(0, argmax.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t pixel = p.channels_last ? i / p.channels % out_plane : i % out_plane;
      const int64_t oh = pixel / p.w.out, ow = pixel % p.w.out;
      const int64_t kh = a[i] / p.w.kernel, kw = a[i] % p.w.kernel;
      f[i] = p.h.tap(oh, kh) * p.w.in + p.w.tap(ow, kw);
    }
  });
  return flat;
}

std::tuple<Tensor, Tensor> max_pool2d_cpu(const Tensor& input_, IntArrayRef kernel, IntArrayRef stride,
                                          IntArrayRef padding, IntArrayRef dilation, bool ceil_mode,
                                          bool return_indices) {
  check_float_dtype("max_pool2d", "input", input_);
  const bool cl = is_channels_last(input_);
  const Tensor input = input_.contiguous(format_for(cl));
  const Pool2d p = make_pool("max_pool2d", input.sizes(), cl, kernel, stride, padding, dilation, ceil_mode);
  const auto compact = p.taps() <= 256 ? at::kByte : at::kInt;
  Tensor out = empty_pooled(input, p, input.scalar_type());
  Tensor argmax = empty_pooled(input, p, compact);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "max_pool2d", [&] {
    dispatch_argmax(compact, [&](auto index) {
      max_pool2d_kernel<scalar_t, decltype(index)>(input, out, argmax, p);
      if (return_indices) argmax = flat_indices<decltype(index)>(argmax, p);
    });
  });
  return {out, argmax};
}

// Backward. NCHW scatters: each output adds its gradient at its argmax (reads stay contiguous;
// a plane is one task, so overlapping windows never race and the order is fixed). channels_last
// gathers: every input pixel sums, over the windows that cover it, the gradients whose argmax
// points at it, vectorised over channels and written once. Either way a window with no tap inside
// the input (dilation + padding on a 1-pixel input, where torch's argmax lies outside the window)
// gives no gradient.
//
// Input offset in its plane of the argmax of output (oh, ow), or -1 outside the input.
template <typename index_t>
struct ArgmaxDecoder {
  const Pool2d& p;
  std::vector<int64_t> tap_row, tap_col;  // tap -> offset from the window origin

  explicit ArgmaxDecoder(const Pool2d& pool) : p(pool) {
    if constexpr (!std::is_same_v<index_t, int64_t>) {
      for (int64_t tap = 0; tap < p.taps(); ++tap) {
        tap_row.push_back(tap / p.w.kernel * p.h.dilation);
        tap_col.push_back(tap % p.w.kernel * p.w.dilation);
      }
    }
  }

  int64_t operator()(int64_t oh, int64_t ow, index_t code) const {
    if constexpr (std::is_same_v<index_t, int64_t>) {
      return code < p.h.in * p.w.in ? code : -1;
    } else {
      const int64_t ih = p.h.start(oh) + tap_row[code], iw = p.w.start(ow) + tap_col[code];
      return ih >= 0 && iw >= 0 && ih < p.h.in && iw < p.w.in ? ih * p.w.in + iw : -1;
    }
  }
};

// Calls add(oh, ow, kh, kw) for every window whose tap (kh, kw) lands on input pixel (ih, iw).
template <typename F>
inline void for_each_covering_window(const PoolAxis& h, const PoolAxis& w, int64_t ih, int64_t iw, F&& add) {
  for (int64_t kh = 0; kh < h.kernel; ++kh) {
    const int64_t oh = h.output_with_tap(ih, kh);
    if (oh < 0) continue;
    for (int64_t kw = 0; kw < w.kernel; ++kw) {
      const int64_t ow = w.output_with_tap(iw, kw);
      if (ow >= 0) add(oh, ow, kh, kw);
    }
  }
}

// One channels_last input pixel (all channels); `acc` is scratch of `channels` elements.
template <typename scalar_t, typename index_t>
SEGFAST_CPU_MULTIVERSION void max_pool_backward_pixel_nhwc(const scalar_t* grad_image, const index_t* argmax_image,
                                                           scalar_t* grad_pixel, const PoolAxis& h, const PoolAxis& w,
                                                           int64_t channels, int64_t ih, int64_t iw,
                                                           at::opmath_type<scalar_t>* acc) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < channels; ++c) acc[c] = 0;
  const int64_t offset = ih * w.in + iw;
  for_each_covering_window(h, w, ih, iw, [&](int64_t oh, int64_t ow, int64_t kh, int64_t kw) {
    const int64_t at = (oh * w.out + ow) * channels, tap = kh * w.kernel + kw;
    const scalar_t* g = grad_image + at;
    const index_t* a = argmax_image + at;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) acc[c] += argmax_is(a[c], tap, offset) ? cpu::widen<acc_t>(g[c]) : 0;
  });
  for (int64_t c = 0; c < channels; ++c) grad_pixel[c] = cpu::narrow<scalar_t>(acc[c]);
}

// 2x2 / stride 2: every input pixel lies in at most one window, so each input row is written once,
// from its window's gradient where the argmax is its tap, else 0 (`left`: the tap code of the row's
// pixels 0, 2, 4, ...). NCHW rows vectorise over the outputs, channels_last rows over channels.
template <typename scalar_t>
SEGFAST_CPU_MULTIVERSION void max_pool_backward_row_pairs(const scalar_t* g, const uint8_t* argmax, scalar_t* dst,
                                                          int64_t pairs, uint8_t left) {
#pragma omp simd
  for (int64_t ow = 0; ow < pairs; ++ow) {
    const scalar_t zero(0);
    dst[2 * ow] = argmax[ow] == left ? g[ow] : zero;
    dst[2 * ow + 1] = argmax[ow] == left + 1 ? g[ow] : zero;
  }
}

template <typename scalar_t>
SEGFAST_CPU_MULTIVERSION void max_pool_backward_row_pairs_nhwc(const scalar_t* g, const uint8_t* argmax, scalar_t* dst,
                                                               int64_t pairs, uint8_t left, int64_t channels) {
  for (int64_t iw = 0; iw < 2 * pairs; ++iw) {
    const scalar_t* from = g + iw / 2 * channels;
    const uint8_t* code = argmax + iw / 2 * channels;
    scalar_t* to = dst + iw * channels;
    const auto tap = static_cast<uint8_t>(left + iw % 2);
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) to[c] = code[c] == tap ? from[c] : scalar_t(0);
  }
}

template <typename scalar_t>
void max_pool2d_backward_pairs(const scalar_t* grad_out, const uint8_t* argmax, scalar_t* grad_in, const Pool2d& p) {
  const PoolAxis &h = p.h, &w = p.w;
  const int64_t per_pixel = p.channels_last ? p.channels : 1;  // values per (row, column) position
  const int64_t images = p.channels_last ? p.batch : p.planes();
  at::parallel_for(0, images * h.in, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t image = row / h.in, ih = row % h.in, oh = ih / 2;
      const int64_t pairs = oh < h.out ? w.out : 0, at = (image * h.out + oh) * w.out * per_pixel;
      const auto left = static_cast<uint8_t>(ih % 2 * 2);
      scalar_t* dst = grad_in + row * w.in * per_pixel;
      if (p.channels_last) {
        max_pool_backward_row_pairs_nhwc(grad_out + at, argmax + at, dst, pairs, left, p.channels);
      } else {
        max_pool_backward_row_pairs(grad_out + at, argmax + at, dst, pairs, left);
      }
      std::fill(dst + 2 * pairs * per_pixel, dst + w.in * per_pixel, scalar_t(0));
    }
  });
}

template <typename scalar_t, typename index_t>
void max_pool2d_backward_kernel(const Tensor& grad_out, const Tensor& argmax, Tensor& grad_in, const Pool2d& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const index_t* a = argmax.const_data_ptr<index_t>();
  scalar_t* gi = grad_in.mutable_data_ptr<scalar_t>();
  const int64_t in_plane = p.h.in * p.w.in, out_plane = p.h.out * p.w.out;
  if constexpr (std::is_same_v<index_t, uint8_t>) {
    if (p.w.is_adjacent_pairs() && p.h.is_adjacent_pairs()) return max_pool2d_backward_pairs(g, a, gi, p);
  }
  if (!p.channels_last) {
    const ArgmaxDecoder<index_t> position(p);
    at::parallel_for(0, p.planes(), 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(in_plane);  // float accumulation, also for bfloat16
      for (int64_t plane = begin; plane < end; ++plane) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const scalar_t* gp = g + plane * out_plane;
        const index_t* ap = a + plane * out_plane;
        for (int64_t oh = 0; oh < p.h.out; ++oh) {
          for (int64_t ow = 0; ow < p.w.out; ++ow) {
            const int64_t at = position(oh, ow, ap[oh * p.w.out + ow]);
            if (at >= 0) acc[at] += cpu::widen<acc_t>(gp[oh * p.w.out + ow]);
          }
        }
        std::copy(acc.begin(), acc.end(), gi + plane * in_plane);
      }
    });
  } else {
    parallel_with_scratch<acc_t>(p.batch * in_plane, p.channels, [&](int64_t pixel, acc_t* acc) {
      const int64_t n = pixel / in_plane, ih = pixel % in_plane / p.w.in, iw = pixel % p.w.in;
      max_pool_backward_pixel_nhwc(g + n * out_plane * p.channels, a + n * out_plane * p.channels,
                                   gi + pixel * p.channels, p.h, p.w, p.channels, ih, iw, acc);
    });
  }
}

Tensor max_pool2d_backward_cpu(const Tensor& grad_out_, const Tensor& argmax_, IntArrayRef input_size,
                               IntArrayRef kernel, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                               bool ceil_mode) {
  const bool cl = is_channels_last(argmax_);
  const auto format = format_for(cl);
  const Tensor grad_out = grad_out_.contiguous(format), argmax = argmax_.contiguous(format);
  const Pool2d p = make_pool("max_pool2d_backward", input_size, cl, kernel, stride, padding, dilation, ceil_mode);
  check_grad_size("max_pool2d_backward", grad_out, p);
  TORCH_CHECK_VALUE(argmax.sizes() == grad_out.sizes(), "max_pool2d_backward: argmax ", argmax.sizes(),
                    " and grad_output ", grad_out.sizes(), " differ");
  Tensor grad_in = cpu::empty_cached(input_size, grad_out.options(), format);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_out.scalar_type(), "max_pool2d_backward", [&] {
    dispatch_argmax(argmax.scalar_type(), [&](auto index) {
      max_pool2d_backward_kernel<scalar_t, decltype(index)>(grad_out, argmax, grad_in, p);
    });
  });
  return grad_in;
}

// ---------------------------------------------------------------------------------------- avg

// count() of every window along one axis.
std::vector<int64_t> window_counts(const PoolAxis& a, const AvgDivisor& divisor) {
  std::vector<int64_t> counts(a.out);
  for (int64_t o = 0; o < a.out; ++o) counts[o] = divisor.count(avg_window(o, a.in, a.kernel, a.stride, a.pad));
  return counts;
}

// One NCHW output row; `acc` is scratch of w.out elements.
template <typename scalar_t>
SEGFAST_CPU_MULTIVERSION void avg_pool_row_nchw(const scalar_t* plane, scalar_t* out, const PoolAxis& h,
                                                const PoolAxis& w, int64_t oh, const AvgDivisor& divisor,
                                                const int64_t* width_counts, at::opmath_type<scalar_t>* acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const AvgWindow wh = avg_window(oh, h.in, h.kernel, h.stride, h.pad);
  if (w.is_adjacent_pairs() && h.is_adjacent_pairs()) {  // 2x2 / stride 2: one pass, one divisor
    const scalar_t* top = plane + 2 * oh * w.in;
    const scalar_t* bottom = top + w.in;
    const auto div = static_cast<acc_t>(divisor(2, 2));
#pragma omp simd
    for (int64_t ow = 0; ow < w.out; ++ow) {
      const acc_t sum = cpu::widen<acc_t>(top[2 * ow]) + cpu::widen<acc_t>(top[2 * ow + 1]) +
                        cpu::widen<acc_t>(bottom[2 * ow]) + cpu::widen<acc_t>(bottom[2 * ow + 1]);
      out[ow] = cpu::narrow<scalar_t>(sum / div);
    }
    return;
  }
  for (int64_t ow = 0; ow < w.out; ++ow) acc[ow] = 0;
  for (int64_t ih = wh.begin; ih < wh.end; ++ih) {
    const scalar_t* row = plane + ih * w.in;
    for (int64_t kw = 0; kw < w.kernel; ++kw) {
      const int64_t o1 = w.last_output(kw);
      const scalar_t* src = row + w.tap(0, kw);
#pragma omp simd
      for (int64_t ow = w.first_output(kw); ow < o1; ++ow) acc[ow] += cpu::widen<acc_t>(src[ow * w.stride]);
    }
  }
  const int64_t height_count = divisor.count(wh);
#pragma omp simd
  for (int64_t ow = 0; ow < w.out; ++ow) {
    out[ow] = cpu::narrow<scalar_t>(divide(acc[ow], divisor(height_count, width_counts[ow])));
  }
}

template <typename scalar_t>
SEGFAST_CPU_MULTIVERSION void avg_pool_pixel_nhwc(const scalar_t* image, scalar_t* out, const PoolAxis& h,
                                                  const PoolAxis& w, int64_t channels, int64_t oh, int64_t ow,
                                                  const AvgDivisor& divisor, at::opmath_type<scalar_t>* acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const AvgWindow wh = avg_window(oh, h.in, h.kernel, h.stride, h.pad);
  const AvgWindow ww = avg_window(ow, w.in, w.kernel, w.stride, w.pad);
  for (int64_t c = 0; c < channels; ++c) acc[c] = 0;
  for (int64_t ih = wh.begin; ih < wh.end; ++ih) {
    for (int64_t iw = ww.begin; iw < ww.end; ++iw) {
      const scalar_t* src = image + (ih * w.in + iw) * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) acc[c] += cpu::widen<acc_t>(src[c]);
    }
  }
  const int64_t div = divisor(divisor.count(wh), divisor.count(ww));
  for (int64_t c = 0; c < channels; ++c) out[c] = cpu::narrow<scalar_t>(divide(acc[c], div));
}

// NCHW: each input row gathers from the outputs whose windows cover it, so rows are independent
// and written once, with no zero-fill and no races.
template <typename scalar_t>
SEGFAST_CPU_MULTIVERSION void avg_pool_backward_row_nchw(const scalar_t* grad_plane, scalar_t* grad_row,
                                                         const PoolAxis& h, const PoolAxis& w, int64_t ih,
                                                         const AvgDivisor& divisor, const int64_t* width_counts,
                                                         at::opmath_type<scalar_t>* acc) {
  using acc_t = at::opmath_type<scalar_t>;
  if (w.is_adjacent_pairs() && h.is_adjacent_pairs()) {  // 2x2 / stride 2: one window per input pixel
    const auto div = static_cast<acc_t>(divisor(2, 2));
    const int64_t oh = ih / 2, covered = oh < h.out ? 2 * w.out : 0;
    const scalar_t* g = grad_plane + oh * w.out;
#pragma omp simd
    for (int64_t ow = 0; ow < covered / 2; ++ow) {
      grad_row[2 * ow] = grad_row[2 * ow + 1] = cpu::narrow<scalar_t>(cpu::widen<acc_t>(g[ow]) / div);
    }
    std::fill(grad_row + covered, grad_row + w.in, scalar_t(0));
    return;
  }
  acc_t* share = acc + w.in;  // grad / divisor of each output of the row
  for (int64_t iw = 0; iw < w.in; ++iw) acc[iw] = 0;
  for (int64_t kh = 0; kh < h.kernel; ++kh) {
    const int64_t oh = h.output_with_tap(ih, kh);
    if (oh < 0) continue;
    const int64_t height_count = divisor.count(avg_window(oh, h.in, h.kernel, h.stride, h.pad));
    const scalar_t* g = grad_plane + oh * w.out;
#pragma omp simd
    for (int64_t ow = 0; ow < w.out; ++ow) {
      share[ow] = divide(cpu::widen<acc_t>(g[ow]), divisor(height_count, width_counts[ow]));
    }
    for (int64_t kw = 0; kw < w.kernel; ++kw) {  // outputs whose tap kw is inside the input
      acc_t* dst = acc + w.tap(0, kw);
      const int64_t o1 = w.last_output(kw), step = w.stride;
      for (int64_t ow = w.first_output(kw); ow < o1; ++ow) dst[ow * step] += share[ow];
    }
  }
  for (int64_t iw = 0; iw < w.in; ++iw) grad_row[iw] = cpu::narrow<scalar_t>(acc[iw]);
}

// channels_last: every input pixel gathers the gradients of the windows that cover it, divided
// as torch divides them, vectorised over channels and written once.
template <typename scalar_t>
SEGFAST_CPU_MULTIVERSION void avg_pool_backward_pixel_nhwc(const scalar_t* grad_image, scalar_t* grad_pixel,
                                                           const PoolAxis& h, const PoolAxis& w, int64_t channels,
                                                           int64_t ih, int64_t iw, const AvgDivisor& divisor,
                                                           const int64_t* width_counts,
                                                           at::opmath_type<scalar_t>* acc) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < channels; ++c) acc[c] = 0;
  for_each_covering_window(h, w, ih, iw, [&](int64_t oh, int64_t ow, int64_t, int64_t) {
    const int64_t height_count = divisor.count(avg_window(oh, h.in, h.kernel, h.stride, h.pad));
    const auto div = static_cast<acc_t>(divisor(height_count, width_counts[ow]));
    const scalar_t* g = grad_image + (oh * w.out + ow) * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) acc[c] += cpu::widen<acc_t>(g[c]) / div;
  });
  for (int64_t c = 0; c < channels; ++c) grad_pixel[c] = cpu::narrow<scalar_t>(acc[c]);
}

// Both avg-pool passes, over dst's rows (NCHW; the row functions take scratch of dst's width, and
// backward that of grad_output's row too) or pixels (channels_last), each gathering from src:
// forward (src the input, dst the output) and backward (src grad_output, dst grad_input).
template <bool kBackward, typename scalar_t>
void avg_pool2d_kernel(const Tensor& src_t, Tensor& dst_t, const Pool2d& p, const AvgDivisor& divisor) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<int64_t> width_counts = window_counts(p.w, divisor);
  const scalar_t* src = src_t.const_data_ptr<scalar_t>();
  scalar_t* dst = dst_t.mutable_data_ptr<scalar_t>();
  const int64_t in_plane = p.h.in * p.w.in, out_plane = p.h.out * p.w.out;
  const int64_t src_plane = kBackward ? out_plane : in_plane, dst_plane = kBackward ? in_plane : out_plane;
  const int64_t dst_h = kBackward ? p.h.in : p.h.out, dst_w = kBackward ? p.w.in : p.w.out;
  if (!p.channels_last) {
    parallel_with_scratch<acc_t>(p.planes() * dst_h, dst_w + (kBackward ? p.w.out : 0), [&](int64_t row, acc_t* acc) {
      const int64_t plane = row / dst_h, y = row % dst_h;
      const scalar_t* from = src + plane * src_plane;
      scalar_t* to = dst + plane * dst_plane + y * dst_w;
      if constexpr (kBackward) {
        avg_pool_backward_row_nchw(from, to, p.h, p.w, y, divisor, width_counts.data(), acc);
      } else {
        avg_pool_row_nchw(from, to, p.h, p.w, y, divisor, width_counts.data(), acc);
      }
    });
  } else {
    parallel_with_scratch<acc_t>(p.batch * dst_plane, p.channels, [&](int64_t pixel, acc_t* acc) {
      const int64_t n = pixel / dst_plane, y = pixel % dst_plane / dst_w, x = pixel % dst_w;
      const scalar_t* from = src + n * src_plane * p.channels;
      scalar_t* to = dst + pixel * p.channels;
      if constexpr (kBackward) {
        avg_pool_backward_pixel_nhwc(from, to, p.h, p.w, p.channels, y, x, divisor, width_counts.data(), acc);
      } else {
        avg_pool_pixel_nhwc(from, to, p.h, p.w, p.channels, y, x, divisor, acc);
      }
    });
  }
}

Tensor avg_pool2d_cpu(const Tensor& input_, IntArrayRef kernel, IntArrayRef stride, IntArrayRef padding, bool ceil_mode,
                      bool count_include_pad, std::optional<int64_t> divisor_override) {
  check_float_dtype("avg_pool2d", "input", input_);
  const bool cl = is_channels_last(input_);
  const Tensor input = input_.contiguous(format_for(cl));
  const Pool2d p = make_avg_pool("avg_pool2d", input.sizes(), cl, kernel, stride, padding, ceil_mode, divisor_override);
  const AvgDivisor divisor{count_include_pad, divisor_override.value_or(0)};
  Tensor out = empty_pooled(input, p, input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "avg_pool2d",
                                 [&] { avg_pool2d_kernel<false, scalar_t>(input, out, p, divisor); });
  return out;
}

Tensor avg_pool2d_backward_cpu(const Tensor& grad_out_, IntArrayRef input_size, IntArrayRef kernel, IntArrayRef stride,
                               IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                               std::optional<int64_t> divisor_override) {
  const bool cl = is_channels_last(grad_out_);
  const Tensor grad_out = grad_out_.contiguous(format_for(cl));
  const Pool2d p =
      make_avg_pool("avg_pool2d_backward", input_size, cl, kernel, stride, padding, ceil_mode, divisor_override);
  check_grad_size("avg_pool2d_backward", grad_out, p);
  const AvgDivisor divisor{count_include_pad, divisor_override.value_or(0)};
  Tensor grad_in = cpu::empty_cached(input_size, grad_out.options(), format_of(p));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_out.scalar_type(), "avg_pool2d_backward",
                                 [&] { avg_pool2d_kernel<true, scalar_t>(grad_out, grad_in, p, divisor); });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
  m.impl("avg_pool2d", &avg_pool2d_cpu);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward_cpu);
}

}  // namespace segfast

#pragma once
// Pooling window geometry, shared by the max and avg kernels on every backend.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "common/class_index.h"
#include "common/layout.h"
#include "common/macros.h"

namespace segfast {

// torch's pooling_output_shape: with ceil_mode the last window must start inside the input or
// the left padding.
SEGFAST_HOST_DEVICE int64_t pool_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                                             bool ceil_mode) {
  const int64_t span = in + 2 * pad - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  // floor division (span may be negative)
  int64_t out = (span >= 0 ? span / stride : -((-span + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// n / d by the division instruction: fast on the CPU (the CUDA kernels use cuda::FastDivider).
struct PlainDivider {
  int64_t d;
  SEGFAST_HOST_DEVICE int64_t divide(int64_t n) const { return n / d; }
};

// One spatial dimension of a pooling window.
struct PoolAxis {
  int64_t in, out, kernel, stride, pad, dilation;

  SEGFAST_HOST_DEVICE int64_t start(int64_t o) const { return o * stride - pad; }
  // Input coordinate of tap k of window o (may lie in the padding).
  SEGFAST_HOST_DEVICE int64_t tap(int64_t o, int64_t k) const { return start(o) + k * dilation; }
  // Taps [first, last) of window o that fall inside the input.
  SEGFAST_HOST_DEVICE int64_t first_tap(int64_t o) const {
    const int64_t s = start(o);
    return s >= 0 ? 0 : (-s + dilation - 1) / dilation;
  }
  SEGFAST_HOST_DEVICE int64_t last_tap(int64_t o) const {
    const int64_t room = in - start(o);  // taps k with k * dilation < room
    return room <= 0 ? 0 : std::min(kernel, (room + dilation - 1) / dilation);
  }
  // Outputs [first, last) whose tap k lies inside the input: 0 <= o*stride - pad + k*dilation < in.
  SEGFAST_HOST_DEVICE int64_t first_output(int64_t k) const {
    const int64_t need = pad - k * dilation;  // o * stride >= need
    return need <= 0 ? 0 : std::min(out, (need + stride - 1) / stride);
  }
  SEGFAST_HOST_DEVICE int64_t last_output(int64_t k) const {
    const int64_t limit = in + pad - k * dilation;  // o * stride < limit
    return limit <= 0 ? 0 : std::min(out, (limit + stride - 1) / stride);
  }
  // Every window is two adjacent taps inside the input (2x2/stride-2 pooling's width axis): the
  // CPU row kernels then read each pair with two plain loads instead of a strided tap sweep.
  SEGFAST_HOST_DEVICE bool is_adjacent_pairs() const {
    return kernel == 2 && stride == 2 && dilation == 1 && pad == 0 && 2 * out <= in;
  }
  // The output whose tap k lands on input coordinate i, or -1; `by_stride` divides by the stride
  // (the CUDA kernels pass a cuda::FastDivider).
  template <typename Divider>
  SEGFAST_HOST_DEVICE int64_t output_with_tap(int64_t i, int64_t k, const Divider& by_stride) const {
    const int64_t num = i + pad - k * dilation;
    if (num < 0) return -1;
    const int64_t o = by_stride.divide(num);
    return o * stride != num || o >= out ? -1 : o;
  }
  SEGFAST_HOST_DEVICE int64_t output_with_tap(int64_t i, int64_t k) const {
    return output_with_tap(i, k, PlainDivider{stride});
  }
};

// avg_pool2d's window in torch's definition: the count of taps inside input + padding (clipped
// at the padded edge), and the taps [begin, end) inside the input.
struct AvgWindow {
  int64_t begin, end, padded_count;
};

SEGFAST_HOST_DEVICE AvgWindow avg_window(int64_t o, int64_t in, int64_t kernel, int64_t stride, int64_t pad) {
  const int64_t start = o * stride - pad;
  const int64_t stop = std::min(start + kernel, in + pad);
  return {std::max<int64_t>(start, 0), std::min(stop, in), stop - start};
}

// A 2-D pooling problem: (batch, channels) planes, one PoolAxis per spatial dim.
struct Pool2d {
  int64_t batch, channels;
  PoolAxis h, w;
  bool channels_last;

  SEGFAST_HOST_DEVICE int64_t taps() const { return h.kernel * w.kernel; }
  SEGFAST_HOST_DEVICE int64_t planes() const { return batch * channels; }
};

// The window arguments, checked as F.max_pool2d / F.avg_pool2d check them; `op` names the op in
// the errors (the Python faces leave these checks to the kernels).
inline void check_pool_args(const char* op, c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
                            c10::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": kernel_size, stride, padding and dilation must have 2 values each");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK_VALUE(kernel[d] >= 1, op, ": kernel_size must be >= 1, got ", kernel);
    TORCH_CHECK_VALUE(stride[d] >= 1, op, ": stride must be >= 1, got ", stride);
    TORCH_CHECK_VALUE(dilation[d] >= 1, op, ": dilation must be >= 1, got ", dilation);
    TORCH_CHECK_VALUE(padding[d] >= 0, op, ": padding must be >= 0, got ", padding);
    TORCH_CHECK_VALUE(padding[d] <= kernel[d] / 2, op,
                      ": padding must be at most half of kernel_size, got padding=", padding,
                      " for kernel_size=", kernel);
  }
}

// The pooling of a (N, C, H, W) input of `size` (or, for a backward, the input it had).
inline Pool2d make_pool(const char* op, c10::IntArrayRef size, bool channels_last, c10::IntArrayRef kernel,
                        c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK_VALUE(size.size() == 4, op, ": kernels take 4-D (N, C, H, W) input, got ", size);
  check_pool_args(op, kernel, stride, padding, dilation);
  TORCH_CHECK_VALUE(size[1] > 0 && size[2] > 0 && size[3] > 0, op,
                    ": input must have non-empty channel and spatial dims, got ", size);
  auto axis = [&](int d) {
    const int64_t in = size[2 + d];
    const int64_t out = pool_output_size(in, kernel[d], stride[d], padding[d], dilation[d], ceil_mode);
    TORCH_CHECK_VALUE(out > 0, op, ": input ", d == 0 ? "height " : "width ", in,
                      " is too small for kernel_size=", kernel, ", padding=", padding, ", dilation=", dilation,
                      ": the output would be empty");
    return PoolAxis{in, out, kernel[d], stride[d], padding[d], dilation[d]};
  };
  return {size[0], size[1], axis(0), axis(1), channels_last};
}

inline Pool2d make_avg_pool(const char* op, c10::IntArrayRef size, bool channels_last, c10::IntArrayRef kernel,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, bool ceil_mode,
                            std::optional<int64_t> divisor_override) {
  TORCH_CHECK_VALUE(!divisor_override || *divisor_override != 0, op,
                    ": divisor_override must be a non-zero int or None, got 0");
  const int64_t no_dilation[2] = {1, 1};
  return make_pool(op, size, channels_last, kernel, stride, padding, no_dilation, ceil_mode);
}

// Running max over a window's taps; NaN wins, and a later NaN replaces an earlier one (torch's rule).
template <typename T, typename I>
SEGFAST_HOST_DEVICE void max_update(T v, I tap, T& best, I& arg) {
  const bool take = v > best || v != v;
  best = take ? v : best;
  arg = take ? tap : arg;
}

// The saved argmax "points at" tap `tap` at input offset `offset` (in its plane): compact codes
// (uint8/int32) hold the tap, torch's flat int64 indices the offset.
template <typename index_t>
SEGFAST_HOST_DEVICE bool argmax_is(index_t code, int64_t tap, int64_t offset) {
  if constexpr (std::is_same_v<index_t, int64_t>) {
    return code == offset;
  } else {
    return static_cast<int64_t>(code) == tap;
  }
}

// torch's avg_pool2d divisor: the override (0: none), else the product of the window's counts
// along each axis.
struct AvgDivisor {
  bool count_include_pad;
  int64_t divisor_override;

  // A window's count along one axis: 0 when it holds no input element on that axis.
  SEGFAST_HOST_DEVICE int64_t count(const AvgWindow& a) const {
    return a.begin >= a.end ? 0 : (count_include_pad ? a.padded_count : a.end - a.begin);
  }
  // The divisor of a window with counts (height, width); 0 for an empty window, whose output is 0.
  SEGFAST_HOST_DEVICE int64_t operator()(int64_t height, int64_t width) const {
    return height == 0 || width == 0 ? 0 : (divisor_override != 0 ? divisor_override : height * width);
  }
};

template <typename acc_t>
SEGFAST_HOST_DEVICE acc_t divide(acc_t sum, int64_t divisor) {
  return divisor == 0 ? acc_t(0) : sum / static_cast<acc_t>(divisor);
}

// ------------------------------------------------------------------- host side, every backend

inline at::MemoryFormat format_of(const Pool2d& p) {
  return format_for(p.channels_last);
}

inline bool is_channels_last(const at::Tensor& t) {
  return memory_format(t) == at::MemoryFormat::ChannelsLast;
}

// A pooled (N, C, out_h, out_w) tensor in the pooling's layout.
inline at::Tensor empty_pooled(const at::Tensor& input, const Pool2d& p, at::ScalarType dtype) {
  return at::empty({p.batch, p.channels, p.h.out, p.w.out}, input.options().dtype(dtype), format_of(p));
}

// Max pooling's argmax: uint8 or int32 tap codes, or torch's int64 plane offsets (return_indices).
template <typename F>
void dispatch_argmax(at::ScalarType type, F&& f) {
  dispatch_class_index(type, "max_pool2d_backward: argmax", std::forward<F>(f));
}

inline void check_grad_size(const char* op, const at::Tensor& grad_out, const Pool2d& p) {
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == p.batch && grad_out.size(1) == p.channels &&
                        grad_out.size(2) == p.h.out && grad_out.size(3) == p.w.out,
                    op, ": grad_output ", grad_out.sizes(), " does not match the pooled size (", p.batch, ", ",
                    p.channels, ", ", p.h.out, ", ", p.w.out, ")");
}

}  // namespace segfast

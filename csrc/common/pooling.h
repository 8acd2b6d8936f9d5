#pragma once
// Pooling window geometry, shared by the max and avg kernels on every backend.
#include <algorithm>
#include <cstdint>

#include "common/macros.h"

namespace segfast {

// torch's pooling_output_shape: with ceil_mode the last window must start inside the input or
// the left padding.
SEGFAST_HOST_DEVICE int64_t pool_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad,
                                             int64_t dilation, bool ceil_mode) {
  const int64_t span = in + 2 * pad - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  // floor division (span may be negative)
  int64_t out = (span >= 0 ? span / stride : -((-span + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

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
  // The output whose tap k lands on input coordinate i, or -1.
  SEGFAST_HOST_DEVICE int64_t output_with_tap(int64_t i, int64_t k) const {
    const int64_t num = i + pad - k * dilation;
    return num < 0 || num % stride != 0 || num / stride >= out ? -1 : num / stride;
  }
};

// avg_pool2d's window in torch's definition: the count of taps inside input + padding (clipped
// at the padded edge), and the taps [begin, end) inside the input.
struct AvgWindow {
  int64_t begin, end, padded_count;
};

SEGFAST_HOST_DEVICE AvgWindow avg_window(int64_t o, int64_t in, int64_t kernel, int64_t stride,
                                         int64_t pad) {
  const int64_t start = o * stride - pad;
  const int64_t stop = std::min(start + kernel, in + pad);
  return {std::max<int64_t>(start, 0), std::min(stop, in), stop - start};
}

}  // namespace segfast

#pragma once
// Log-sum-exp over one pixel's classes in a single pass, for the kernels that walk a pixel's classes
// one thread at a time, or a warp at a time with merge() (CUDA cross_entropy, Dice, focal). The CPU kernels use
// cpu/softmax_tile.h, a two-pass (max, then sum) version over a tile of pixels; both give the same answer on the
// infinities: -inf logits add nothing, also before the first finite one (masked classes), a +inf
// logit gives NaN as torch's log_softmax does, and a NaN logit reaches the result through the sum.
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"

namespace segfast {

template <typename acc_t>
struct OnlineLogSumExp {
  acc_t max = -std::numeric_limits<acc_t>::infinity(), sum = 0;

  SEGFAST_HOST_DEVICE void add(acc_t v) {
    if (v > max) {
      // the running sum is rescaled to the new max; exp(v - v) is 1, or NaN for v = +inf (as the
      // two-pass exp(x - max)); a sum of 0 (max still -inf) stays 0
      sum = (sum == acc_t(0) ? acc_t(0) : sum * exp(max - v)) + exp(v - v);
      max = v;
    } else if (v != -std::numeric_limits<acc_t>::infinity()) {
      sum += exp(v - max);
    }
  }
  // Takes in another part of the same pixel's classes (a warp's lanes each walk some of them).
  // The order of parts changes the rounding only; the infinities combine as in add().
  SEGFAST_HOST_DEVICE void merge(const OnlineLogSumExp& other) {
    const acc_t m = other.max > max ? other.max : max;
    sum = rescaled(sum, max, m) + rescaled(other.sum, other.max, m);
    max = m;
  }
  SEGFAST_HOST_DEVICE acc_t value() const { return max + log(sum); }

 private:
  // s exp(from - to): an empty part stays 0 (also at -inf), a NaN stays NaN, +inf - +inf gives NaN
  SEGFAST_HOST_DEVICE static acc_t rescaled(acc_t s, acc_t from, acc_t to) {
    return s == acc_t(0) ? acc_t(0) : s * exp(from - to);
  }
};

// log sum_c exp x[c * class_stride], c < classes.
template <typename acc_t, typename scalar_t>
SEGFAST_HOST_DEVICE acc_t pixel_logsumexp(const scalar_t* x, int64_t classes, int64_t class_stride) {
  OnlineLogSumExp<acc_t> lse;
  for (int64_t c = 0; c < classes; ++c) lse.add(static_cast<acc_t>(x[c * class_stride]));
  return lse.value();
}

}  // namespace segfast

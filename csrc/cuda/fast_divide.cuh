#pragma once
// Division by a divisor fixed at launch, for the kernels' per-element index math (element i of a
// (N, C, H, W) tensor, pixel i of (N, S)). On the GPU a 64-bit integer division is a subroutine of
// some seventy instructions; this is one multiply-high, a subtraction and three shifts or adds
// (Granlund and Montgomery's method for N-bit dividends, as libdivide's branch-free unsigned
// division): exact for every dividend below 2^64 and every divisor from 1 to 2^63.
#include <cstdint>

#include "common/macros.h"

namespace segfast::cuda {

struct QuotientRemainder {
  int64_t quotient, remainder;
};

class FastDivider {
 public:
  FastDivider() = default;

  // d >= 1 (a size); shift = ceil(log2 d), magic = floor(2^64 (2^shift - d) / d) + 1
  explicit FastDivider(int64_t d) : divisor_(static_cast<uint64_t>(d)) {
    while ((uint64_t{1} << shift_) < divisor_) ++shift_;
    if (divisor_ > 1) {
      const unsigned __int128 excess = (static_cast<unsigned __int128>(1) << shift_) - divisor_;
      magic_ = static_cast<uint64_t>((excess << 64) / divisor_) + 1;
    }
  }

  SEGFAST_HOST_DEVICE int64_t divisor() const { return static_cast<int64_t>(divisor_); }

  // n / d for n >= 0
  SEGFAST_HOST_DEVICE int64_t divide(int64_t n) const {
    const auto u = static_cast<uint64_t>(n);
    if (divisor_ == 1) return n;
    const uint64_t t = multiply_high(magic_, u);
    return static_cast<int64_t>((((u - t) >> 1) + t) >> (shift_ - 1));
  }

  SEGFAST_HOST_DEVICE QuotientRemainder divmod(int64_t n) const {
    const int64_t q = divide(n);
    return {q, n - q * static_cast<int64_t>(divisor_)};
  }

 private:
  SEGFAST_HOST_DEVICE static uint64_t multiply_high(uint64_t a, uint64_t b) {
#ifdef __CUDA_ARCH__
    return __umul64hi(a, b);
#else
    return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
  }

  uint64_t divisor_ = 1, magic_ = 0;
  unsigned int shift_ = 0;
};

}  // namespace segfast::cuda

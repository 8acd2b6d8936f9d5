#pragma once
// Elementwise math written so that GCC vectorises it inside `#pragma omp simd` loops (glibc's
// expf is a scalar call and would dominate the softmax kernels). Every function is always inlined
// (SEGFAST_HOST_DEVICE): as plain inline functions GCC left them calls in the fused sigmoid focal
// loop, whose body is larger than the others, and that loop scalar.
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>

#include "common/macros.h"

namespace segfast::cpu {

// scalar_t <-> its accumulation type inside the hot loops. c10::BFloat16's own conversions are
// plain inline functions, which GCC does not inline into the multiversioned loops (a call per
// element, no vectorisation); these are the same bit operations, always inlined.
template <typename acc_t, typename scalar_t>
SEGFAST_HOST_DEVICE acc_t widen(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16);
  } else {
    return static_cast<acc_t>(v);
  }
}

// round to nearest even, NaN -> the quiet NaN c10 uses (0x7fc0)
template <typename scalar_t, typename acc_t>
SEGFAST_HOST_DEVICE scalar_t narrow(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t bits = std::bit_cast<uint32_t>(static_cast<float>(v));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// e^x = p * 2^n for x in float's range: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and a
// degree-7 Taylor polynomial p = e^r (truncation error < 1e-9). NaN passes through to p.
struct ExpParts {
  float p;
  int32_t n;
};

SEGFAST_HOST_DEVICE ExpParts exp_parts(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = x * kLog2e + kRound;
  const float n = shifted - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return {p, std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kRound)};
}

// exp(x) for float, within 2 ulp for normal results: exp_parts, the scale 2^n applied in two
// halves so that results down to the subnormal range stay exact.
SEGFAST_HOST_DEVICE float exp_vec(float x) {
  const bool underflow = x < -104.0f, overflow = x > 88.8f;
  const ExpParts e = exp_parts(x < -104.0f ? -104.0f : (x > 88.8f ? 88.8f : x));  // NaN passes through
  const int32_t half = e.n >> 1;
  const float scale_a = std::bit_cast<float>((half + 127) << 23);
  const float scale_b = std::bit_cast<float>((e.n - half + 127) << 23);
  const float result = e.p * scale_a * scale_b;
  return underflow ? 0.0f : (overflow ? INFINITY : result);
}

// float64 is the gradcheck dtype: accuracy over speed.
SEGFAST_HOST_DEVICE double exp_vec(double x) {
  return std::exp(x);
}

// erfc(x) for x >= 0 (+inf and NaN pass through), vectorisable: the Chebyshev fit of Numerical
// Recipes, erfc(x) = t exp(-x^2 + P(t)) with t = 1 / (1 + x/2) (relative error 1e-7 in exact
// arithmetic, 4e-7 for x < 1 and 4e-6 in the far tail in float); x^2's rounding error (an FMA) is
// applied as a factor, else it would dominate the tail.
SEGFAST_HOST_DEVICE float erfc_of_nonnegative(float x) {
  const float t = 1.0f / (1.0f + 0.5f * x);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float x2 = x * x;
  const float x2_error = x2 < 1e30f ? std::fma(x, x, -x2) : 0.0f;  // 0 for +inf (inf - inf)
  return t * exp_vec(p - x2) * (1.0f - x2_error);
}

SEGFAST_HOST_DEVICE double erfc_of_nonnegative(double x) {
  return std::erfc(x);
}

// exp(x) for x <= 0 (or NaN) as a term of a sum that holds exp(0) = 1, as in a log-sum-exp: below
// -87.3 (results under float's smallest normal) it returns exp(-87.3) ~ 1.2e-38, which leaves such
// a sum unchanged; with no overflow, no subnormal scaling and no selects it is a quarter cheaper
// than exp_vec (the same exp_parts). NaN passes through.
SEGFAST_HOST_DEVICE float exp_of_nonpositive_term(float x) {
  const ExpParts e = exp_parts(x < -87.3f ? -87.3f : x);
  return e.p * std::bit_cast<float>((e.n + 127) << 23);  // n >= -126: a normal power of two
}

SEGFAST_HOST_DEVICE double exp_of_nonpositive_term(double x) {
  return std::exp(x);
}

// log(x) for a sum of exp terms that holds exp(0) = 1 (x >= 1, +inf or NaN), vectorisable: x =
// m 2^e with m in [sqrt(1/2), sqrt(2)), log(1 + f) for f = m - 1 by Cephes' logf polynomial
// (within 1 ulp on this range), e ln2 in two parts. +inf and NaN pass through.
SEGFAST_HOST_DEVICE float log_of_sum(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  const int32_t above_sqrt2 = (bits & 0x7fffff) > 0x3504f3 ? 1 : 0;  // mantissa of 1.4142135
  const float e = static_cast<float>((bits >> 23) - 127 + above_sqrt2);
  const float m = std::bit_cast<float>((bits & 0x7fffff) | ((127 - above_sqrt2) << 23));
  const float f = m - 1.0f, z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z + e * -2.12194440e-4f - 0.5f * z;
  const float result = f + y + e * 0.693359375f;
  return x < INFINITY ? result : x + x;  // +inf stays +inf, NaN stays NaN
}

SEGFAST_HOST_DEVICE double log_of_sum(double x) {
  return std::log(x);
}

}  // namespace segfast::cpu

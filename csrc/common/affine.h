#pragma once
// Affine sampling shared by the CPU and CUDA augmentation kernels: F.affine_grid + F.grid_sample's
// arithmetic (align_corners=False), coordinates in double so that the mask's nearest pixel is the
// one a float64 reference picks.
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace segfast {

// Unfused multiply and add: nvcc would contract a * b + c into an FMA (one rounding fewer),
// moving the nearest pixel at exact halves away from the CPU kernel's and the float64 reference's.
// (The CPU file is compiled with -ffp-contract=off for the same reason.)
// float and double (the bilinear sums use them too, in the accumulation type).
struct Unfused {
#ifdef __CUDA_ARCH__
  __device__ static float mul(float a, float b) { return __fmul_rn(a, b); }
  __device__ static double mul(double a, double b) { return __dmul_rn(a, b); }
  __device__ static float add(float a, float b) { return __fadd_rn(a, b); }
  __device__ static double add(double a, double b) { return __dadd_rn(a, b); }
#else
  template <typename T>
  static T mul(T a, T b) {
    return a * b;
  }
  template <typename T>
  static T add(T a, T b) {
    return a + b;
  }
#endif
};

// theta (2 x 3, output -> input, normalised coordinates) of one sample, and the sizes, as doubles:
// the arithmetic converts nothing from int64 (which AVX2 cannot vectorise).
struct AffineSample {
  double t00, t01, t02, t10, t11, t12;
  double in_h, in_w, out_h, out_w;

  // Input pixel coordinates (x, y), pixel centres at integers, of output pixel (ox, oy).
  SEGFAST_HOST_DEVICE void source(double ox, double oy, double& x, double& y) const {
    const double xn = Unfused::add(Unfused::mul(2.0, ox), 1.0) / out_w - 1.0;
    const double yn = Unfused::add(Unfused::mul(2.0, oy), 1.0) / out_h - 1.0;
    const double sx = Unfused::add(Unfused::add(Unfused::mul(t00, xn), Unfused::mul(t01, yn)), t02);
    const double sy = Unfused::add(Unfused::add(Unfused::mul(t10, xn), Unfused::mul(t11, yn)), t12);
    // clamped far outside the input so that the integer conversions below stay defined
    x = clamp_far(Unfused::add(Unfused::mul(sx + 1.0, in_w), -1.0) / 2.0);
    y = clamp_far(Unfused::add(Unfused::mul(sy + 1.0, in_h), -1.0) / 2.0);
  }
  static constexpr double kFar = 1e9;  // also keeps them in int32 range
  // Two unconditional selects (not fmin/fmax, library calls on the CPU, nor nested conditions, which
  // GCC will not if-convert under -ftrapping-math): the row loop on the CPU vectorises. NaN -> kFar.
  SEGFAST_HOST_DEVICE static double clamp_far(double v) {
    v = v < kFar ? v : kFar;
    return v > -kFar ? v : -kFar;
  }
};

// Bilinear sampling at (x, y): the four neighbours' offsets in a plane (-1 for a neighbour
// outside the input, which reads zero: grid_sample's padding_mode="zeros") and weights, computed
// once per output pixel and applied to every channel.
template <typename acc_t>
struct BilinearTaps {
  int64_t offset[4];
  acc_t weight[4];

  template <typename scalar_t>
  SEGFAST_HOST_DEVICE acc_t apply(const scalar_t* plane) const {
    acc_t v = 0;
    for (int k = 0; k < 4; ++k) {
      if (offset[k] >= 0) v = Unfused::add(v, Unfused::mul(weight[k], static_cast<acc_t>(plane[offset[k]])));
    }
    return v;
  }
};

template <typename acc_t>
SEGFAST_HOST_DEVICE BilinearTaps<acc_t> bilinear_taps(double x, double y, int64_t in_w, int64_t in_h, int64_t stride_y,
                                                      int64_t stride_x) {
  const double fx = floor(x), fy = floor(y);
  const auto x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  const auto ax = static_cast<acc_t>(x - fx), ay = static_cast<acc_t>(y - fy);
  BilinearTaps<acc_t> taps;
  for (int k = 0; k < 4; ++k) {
    const int64_t px = x0 + (k & 1), py = y0 + (k >> 1);
    const bool inside = px >= 0 && px < in_w && py >= 0 && py < in_h;
    taps.offset[k] = inside ? py * stride_y + px * stride_x : -1;
    taps.weight[k] = ((k & 1) ? ax : 1 - ax) * ((k >> 1) ? ay : 1 - ay);
  }
  return taps;
}

// The nearest input pixel, rounding halves to even as grid_sample's nearest mode does; false
// when it lies outside the input.
SEGFAST_HOST_DEVICE bool nearest_pixel(double x, double y, int64_t in_w, int64_t in_h, int64_t& px, int64_t& py) {
  px = static_cast<int64_t>(nearbyint(x));
  py = static_cast<int64_t>(nearbyint(y));
  return px >= 0 && px < in_w && py >= 0 && py < in_h;
}

}  // namespace segfast

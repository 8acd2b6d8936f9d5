// Joint image + mask affine augmentation on CUDA: one thread per output pixel maps back once
// (common/affine.h, shared with the CPU kernel) and writes every channel and the mask.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/affine.h"
#include "common/augment.h"
#include "common/class_index.h"
#include "common/devices.h"
#include "common/layout.h"
#include "cuda/fast_divide.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

using at::Tensor;

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

template <typename scalar_t, typename mask_t>
__global__ void affine_augment_kernel(const scalar_t* image, const mask_t* mask, const double* theta, scalar_t* out,
                                      mask_t* out_mask, int64_t batch, int64_t channels, int64_t in_h, int64_t in_w,
                                      cuda::FastDivider out_h, cuda::FastDivider out_w, Strides4 is, Strides4 os,
                                      Strides4 ms, mask_t ignore) {
  using acc_t = at::opmath_type<scalar_t>;
  SEGFAST_CUDA_KERNEL_LOOP(i, batch * out_h.divisor() * out_w.divisor()) {
    const auto [row, ox] = out_w.divmod(i);
    const auto [n, oy] = out_h.divmod(row);
    const double* t = theta + 6 * n;
    const AffineSample sample{t[0],
                              t[1],
                              t[2],
                              t[3],
                              t[4],
                              t[5],
                              double(in_h),
                              double(in_w),
                              double(out_h.divisor()),
                              double(out_w.divisor())};
    double x, y;
    sample.source(static_cast<double>(ox), static_cast<double>(oy), x, y);
    const auto taps = bilinear_taps<acc_t>(x, y, in_w, in_h, is.s2, is.s3);
    scalar_t* pixel = out + n * os.s0 + oy * os.s2 + ox * os.s3;
    for (int64_t c = 0; c < channels; ++c) {
      pixel[c * os.s1] = static_cast<scalar_t>(taps.apply(image + n * is.s0 + c * is.s1));
    }
    int64_t px, py;
    out_mask[i] = nearest_pixel(x, y, in_w, in_h, px, py) ? mask[n * ms.s0 + py * ms.s1 + px * ms.s2] : ignore;
  }
}

Strides4 strides_of(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.dim() > 3 ? t.stride(3) : 0};
}

std::tuple<Tensor, Tensor> affine_augment_cuda(const Tensor& image, const Tensor& mask, const Tensor& theta_,
                                               int64_t out_h, int64_t out_w, int64_t ignore_index) {
  check_augment_args(image, mask, theta_, out_h, out_w);
  check_same_device("affine_augment", {named("image", image), named("mask", mask)});
  const cuda::DeviceGuard guard(image.device());
  const Tensor theta = theta_.to(image.device(), at::kDouble).contiguous();
  const int64_t batch = image.size(0), channels = image.size(1);
  Tensor out = at::empty({batch, channels, out_h, out_w}, image.options(), memory_format(image));
  Tensor out_mask = at::empty({batch, out_h, out_w}, mask.options());
  const int64_t count = batch * out_h * out_w;
  if (count == 0) return {out, out_mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "affine_augment", [&] {
    dispatch_class_index(mask.scalar_type(), "affine_augment: mask", [&](auto mask_type) {
      using mask_t = decltype(mask_type);
      cuda::launch(affine_augment_kernel<scalar_t, mask_t>, cuda::blocks_for(count), cuda::kThreads,
                   image.const_data_ptr<scalar_t>(), mask.const_data_ptr<mask_t>(), theta.const_data_ptr<double>(),
                   out.mutable_data_ptr<scalar_t>(), out_mask.mutable_data_ptr<mask_t>(), batch, channels,
                   image.size(2), image.size(3), cuda::FastDivider(out_h), cuda::FastDivider(out_w), strides_of(image),
                   strides_of(out), strides_of(mask), static_cast<mask_t>(ignore_index));
    });
  });
  return {out, out_mask};
}

}  // namespace

SEGFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("affine_augment", &affine_augment_cuda);
}

}  // namespace segfast

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

// A mask element of `size` bytes (1, 4 or 8: the class-index dtypes uint8, int32, int64): one kernel
// serves every mask dtype instead of one per (image, output, mask) dtype triple.
struct MaskBytes {
  const char* in;
  char* out;
  int size;
  int64_t ignore;

  __device__ void copy(int64_t to, int64_t from) const {
    switch (size) {
      case 1:
        reinterpret_cast<uint8_t*>(out)[to] = reinterpret_cast<const uint8_t*>(in)[from];
        break;
      case 4:
        reinterpret_cast<int32_t*>(out)[to] = reinterpret_cast<const int32_t*>(in)[from];
        break;
      default:
        reinterpret_cast<int64_t*>(out)[to] = reinterpret_cast<const int64_t*>(in)[from];
    }
  }
  __device__ void fill(int64_t to) const {
    switch (size) {
      case 1:
        reinterpret_cast<uint8_t*>(out)[to] = static_cast<uint8_t>(ignore);
        break;
      case 4:
        reinterpret_cast<int32_t*>(out)[to] = static_cast<int32_t>(ignore);
        break;
      default:
        reinterpret_cast<int64_t*>(out)[to] = ignore;
    }
  }
};

template <typename in_t, typename out_t>
__global__ void affine_augment_kernel(const in_t* image, const double* theta, out_t* out, MaskBytes mask,
                                      const augment_acc_t<in_t, out_t>* sample_map,
                                      const augment_acc_t<in_t, out_t>* channel_map, int64_t batch, int64_t channels,
                                      int64_t in_h, int64_t in_w, cuda::FastDivider out_h, cuda::FastDivider out_w,
                                      Strides4 is, Strides4 os, Strides4 ms) {
  using acc_t = augment_acc_t<in_t, out_t>;
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
    const auto color = SampleColor<acc_t>::of(sample_map, n, acc_t(augment_unit<in_t>()));
    out_t* pixel = out + n * os.s0 + oy * os.s2 + ox * os.s3;
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t scale = channel_map != nullptr ? channel_map[c] : acc_t(1);
      const acc_t shift = channel_map != nullptr ? channel_map[channels + c] : acc_t(0);
      pixel[c * os.s1] = static_cast<out_t>(color.apply(taps.apply(image + n * is.s0 + c * is.s1), scale, shift));
    }
    int64_t px, py;
    if (nearest_pixel(x, y, in_w, in_h, px, py)) {
      mask.copy(i, n * ms.s0 + py * ms.s1 + px * ms.s2);
    } else {
      mask.fill(i);
    }
  }
}

Strides4 strides_of(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.dim() > 3 ? t.stride(3) : 0};
}

std::tuple<Tensor, Tensor> affine_augment_cuda(const Tensor& image, const Tensor& mask, const Tensor& theta_,
                                               int64_t out_h, int64_t out_w, int64_t ignore_index,
                                               const std::optional<Tensor>& color,
                                               const std::optional<Tensor>& normalize,
                                               std::optional<at::ScalarType> out_dtype,
                                               std::optional<at::MemoryFormat> out_memory_format) {
  check_augment_args(image, mask, theta_, out_h, out_w, color, normalize, out_dtype);
  check_same_device("affine_augment", {named("image", image), named("mask", mask)});
  TORCH_CHECK_VALUE(is_class_index_type(mask.scalar_type()), "affine_augment: mask must be int64, int32 or uint8, got ",
                    mask.scalar_type());
  const cuda::DeviceGuard guard(image.device());
  const Tensor theta = theta_.to(image.device(), at::kDouble).contiguous();
  const int64_t batch = image.size(0), channels = image.size(1);
  const at::ScalarType out_type = augment_out_dtype(image, out_dtype);
  Tensor out = at::empty({batch, channels, out_h, out_w}, image.options().dtype(out_type),
                         augment_out_format(image, out_memory_format));
  Tensor out_mask = at::empty({batch, out_h, out_w}, mask.options());
  const int64_t count = batch * out_h * out_w;
  if (count == 0) return {out, out_mask};
  const MaskBytes mask_bytes{static_cast<const char*>(mask.const_data_ptr()),
                             static_cast<char*>(out_mask.mutable_data_ptr()), static_cast<int>(mask.element_size()),
                             ignore_index};
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, image.scalar_type(), "affine_augment", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "affine_augment", [&] {
      using out_t = scalar_t;
      using acc_t = augment_acc_t<in_t, out_t>;
      const ColorMaps maps = color_maps(image, color, normalize, c10::CppTypeToScalarType<acc_t>::value);
      const auto data = [](const Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
      cuda::launch(affine_augment_kernel<in_t, out_t>, cuda::blocks_for(count), cuda::kThreads,
                   image.const_data_ptr<in_t>(), theta.const_data_ptr<double>(), out.mutable_data_ptr<out_t>(),
                   mask_bytes, data(maps.sample_map), data(maps.channel_map), batch, channels, image.size(2),
                   image.size(3), cuda::FastDivider(out_h), cuda::FastDivider(out_w), strides_of(image),
                   strides_of(out), strides_of(mask));
    });
  });
  return {out, out_mask};
}

}  // namespace

SEGFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("affine_augment", &affine_augment_cuda);
}

}  // namespace segfast

#pragma once
// Argument checks of affine_augment, shared by the CPU and CUDA kernels.
#include <ATen/core/Tensor.h>

namespace segfast {

inline void check_augment_args(const at::Tensor& image, const at::Tensor& mask, const at::Tensor& theta, int64_t out_h,
                               int64_t out_w) {
  TORCH_CHECK_VALUE(image.dim() == 4, "affine_augment: image must be (N, C, H, W), got ", image.sizes());
  TORCH_CHECK_VALUE(mask.dim() == 3 && mask.size(0) == image.size(0) && mask.size(1) == image.size(2) &&
                        mask.size(2) == image.size(3),
                    "affine_augment: mask must be (N, H, W) = (", image.size(0), ", ", image.size(2), ", ",
                    image.size(3), "), got ", mask.sizes());
  TORCH_CHECK_VALUE(theta.dim() == 3 && theta.size(0) == image.size(0) && theta.size(1) == 2 && theta.size(2) == 3,
                    "affine_augment: theta must be (N, 2, 3), got ", theta.sizes());
  TORCH_CHECK_VALUE(out_h > 0 && out_w > 0 && out_h < (int64_t{1} << 31) && out_w < (int64_t{1} << 31),
                    "affine_augment: output size must be positive and below 2^31, got ", out_h, "x", out_w);
}

}  // namespace segfast

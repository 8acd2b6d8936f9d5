#pragma once
// affine_augment's argument checks and colour transform, shared by the CPU and CUDA kernels.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/stack.h>

#include <limits>
#include <optional>
#include <type_traits>

#include "common/checks.h"
#include "common/layout.h"
#include "common/macros.h"

namespace segfast {

inline void check_augment_args(const at::Tensor& image, const at::Tensor& mask, const at::Tensor& theta, int64_t out_h,
                               int64_t out_w, const std::optional<at::Tensor>& color,
                               const std::optional<at::Tensor>& normalize, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(image.dim() == 4, "affine_augment: image must be (N, C, H, W), got ", image.sizes());
  TORCH_CHECK_TYPE(image.scalar_type() == at::kByte || at::isFloatingType(image.scalar_type()),
                   "affine_augment: image dtype must be uint8 or floating, got ", dtype_name(image.scalar_type()));
  const int64_t batch = image.size(0), channels = image.size(1);
  TORCH_CHECK_VALUE(
      mask.dim() == 3 && mask.size(0) == batch && mask.size(1) == image.size(2) && mask.size(2) == image.size(3),
      "affine_augment: mask must be (N, H, W) = (", batch, ", ", image.size(2), ", ", image.size(3), "), got ",
      mask.sizes());
  TORCH_CHECK_VALUE(theta.dim() == 3 && theta.size(0) == batch && theta.size(1) == 2 && theta.size(2) == 3,
                    "affine_augment: theta must be (N, 2, 3), got ", theta.sizes());
  TORCH_CHECK_VALUE(out_h > 0 && out_w > 0 && out_h < (int64_t{1} << 31) && out_w < (int64_t{1} << 31),
                    "affine_augment: output size must be positive and below 2^31, got ", out_h, "x", out_w);
  if (color) {
    TORCH_CHECK_VALUE(color->dim() == 2 && color->size(0) == batch && color->size(1) == 2 &&
                          color->is_floating_point() && color->device() == image.device(),
                      "affine_augment: color must be a floating (N, 2) = (", batch, ", 2) tensor on ", image.device(),
                      ", got ", color->scalar_type(), " ", color->sizes(), " on ", color->device());
  }
  if (normalize) {
    TORCH_CHECK_VALUE(normalize->dim() == 2 && normalize->size(0) == 2 && normalize->size(1) == channels &&
                          normalize->is_floating_point() && normalize->device() == image.device(),
                      "affine_augment: normalize must be a floating (2, C) = (2, ", channels, ") tensor on ",
                      image.device(), ", got ", normalize->scalar_type(), " ", normalize->sizes(), " on ",
                      normalize->device());
  }
  if (out_dtype) {
    TORCH_CHECK_TYPE(at::isFloatingType(*out_dtype), "affine_augment: out_dtype must be floating, got ",
                     dtype_name(*out_dtype));
  }
}

// The output dtype: out_dtype, else the image's if floating, else (uint8) float32.
inline at::ScalarType augment_out_dtype(const at::Tensor& image, std::optional<at::ScalarType> out_dtype) {
  return out_dtype.value_or(image.is_floating_point() ? image.scalar_type() : at::kFloat);
}

// The output layout: out_memory_format, else (None or preserve_format) the image's.
inline at::MemoryFormat augment_out_format(const at::Tensor& image, std::optional<at::MemoryFormat> format) {
  if (!format || *format == at::MemoryFormat::Preserve) return memory_format(image);
  TORCH_CHECK_VALUE(*format == at::MemoryFormat::Contiguous || *format == at::MemoryFormat::ChannelsLast,
                    "affine_augment: out_memory_format must be torch.contiguous_format or torch.channels_last, got ",
                    *format);
  return *format;
}

// What the kernels compute in: double when the image or the output is float64, else float.
template <typename in_t, typename out_t>
using augment_acc_t = std::conditional_t<std::is_same_v<in_t, double> || std::is_same_v<out_t, double>, double, float>;

// The colour transform of one output value v (the bilinear sample, in the image's units):
//   u = clamp(v * gain + bias, lo, hi) * scale + shift
// per sample gain = contrast / 255 for uint8 images (contrast for floating ones), bias = brightness,
// [lo, hi] = [0, 1] when jittered, else gain = 1 / 255 (or 1), bias = 0 and no clamp; per channel
// scale = 1 / std, shift = -mean / std (1 and 0 without normalisation). Unjittered, unnormalised
// floating images come out as the bilinear sample itself (v * 1 + 0).
template <typename acc_t>
struct SampleColor {
  acc_t gain, bias, lo, hi;

  // sample_map: (N, 2) [gain, bias] (color_maps), or null: no jitter
  SEGFAST_HOST_DEVICE static SampleColor of(const acc_t* sample_map, int64_t n, acc_t unit) {
    constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
    if (sample_map == nullptr) return {unit, acc_t(0), -inf, inf};
    return {sample_map[2 * n], sample_map[2 * n + 1], acc_t(0), acc_t(1)};
  }

  // selects, not fmin / fmax: NaN passes through and the CPU loops vectorise
  SEGFAST_HOST_DEVICE acc_t apply(acc_t v, acc_t scale, acc_t shift) const {
    v = v * gain + bias;
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return v * scale + shift;
  }
};

// 1 / 255 for uint8 images (their values read as fractions of 255), 1 for floating ones.
template <typename in_t>
constexpr double augment_unit() {
  return std::is_same_v<in_t, uint8_t> ? 1.0 / 255.0 : 1.0;
}

// The per-sample (N, 2) [gain, bias] and per-channel (2, C) [scale, shift] maps of SampleColor, in
// the kernels' accumulation dtype on the image's device (undefined where not given).
struct ColorMaps {
  at::Tensor sample_map, channel_map;
};

inline ColorMaps color_maps(const at::Tensor& image, const std::optional<at::Tensor>& color,
                            const std::optional<at::Tensor>& normalize, at::ScalarType acc_type) {
  ColorMaps maps;
  if (color) {
    const double unit = image.scalar_type() == at::kByte ? 1.0 / 255.0 : 1.0;
    const at::Tensor c = color->to(at::kDouble);
    maps.sample_map = at::stack({c.select(1, 0) * unit, c.select(1, 1)}, 1).to(acc_type).contiguous();
  }
  if (normalize) {
    const at::Tensor mean = normalize->select(0, 0).to(at::kDouble), std = normalize->select(0, 1).to(at::kDouble);
    maps.channel_map = at::stack({at::reciprocal(std), -mean / std}).to(acc_type).contiguous();
  }
  return maps;
}

}  // namespace segfast

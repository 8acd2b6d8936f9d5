// Joint image + mask affine augmentation on CPU: each output pixel maps back once (common/affine.h)
// and reads the image bilinearly and the mask at the nearest pixel, in one pass over the output.
//
// Work goes row by row: first every pixel's source coordinates and bilinear taps (the arithmetic
// of common/affine.h), then one loop per channel that gathers the four taps of every pixel, so
// the inner loops vectorise with gathers. A tap outside the input is read from a safe address and
// masked out (not multiplied by 0: a NaN there must not leak in, as grid_sample never reads it).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/affine.h"
#include "common/augment.h"
#include "common/class_index.h"
#include "common/layout.h"
#include "cpu/output_cache.h"
#include "cpu/vec_math.h"

namespace segfast {
namespace {

using at::Tensor;

// One output row's taps: offsets of the four neighbours in an input plane (0 when outside, with
// `inside` cleared), their weights, and the mask offset (-1: outside). index_t is int32 when every
// offset in a plane fits it (32-bit gathers: twice the lanes), else int64; the inside flags are
// index_t too (one element width in the loops: uint8 flags kept GCC from vectorising them).
template <typename acc_t, typename index_t>
struct RowTaps {
  std::vector<index_t> offset[4];
  std::vector<acc_t> weight[4];
  std::vector<index_t> inside[4];
  std::vector<index_t> mask_offset;

  explicit RowTaps(int64_t width) : mask_offset(width) {
    for (int k = 0; k < 4; ++k) {
      offset[k].resize(width);
      weight[k].resize(width);
      inside[k].resize(width);
    }
  }
};

struct Strides {
  int64_t image_y, image_x, mask_y, mask_x;
};

// The arithmetic of common/affine.h (AffineSample::source, bilinear_taps, nearest_pixel), written
// out over a row so that it vectorises; -ffp-contract=off (CMakeLists.txt) keeps every rounding
// as in the scalar definition and the float64 reference.
template <typename acc_t, typename index_t>
SEGFAST_CPU_MULTIVERSION void row_taps(const AffineSample& sample, int64_t oy, const Strides& st,
                                       RowTaps<acc_t, index_t>& r) {
  const AffineSample s = sample;  // a local copy: the stores below cannot alias it
  using uindex_t = std::make_unsigned_t<index_t>;
  const auto uw = static_cast<uindex_t>(s.in_w), uh = static_cast<uindex_t>(s.in_h);
  const auto width = static_cast<int32_t>(s.out_w);  // int32 -> double converts in vectors, int64 does not
  const auto row = static_cast<double>(oy);
  const auto sy_ = static_cast<index_t>(st.image_y), sx_ = static_cast<index_t>(st.image_x);
  const auto my = static_cast<index_t>(st.mask_y), mx = static_cast<index_t>(st.mask_x);
  index_t *o0 = r.offset[0].data(), *o1 = r.offset[1].data(), *o2 = r.offset[2].data(), *o3 = r.offset[3].data();
  acc_t *w0 = r.weight[0].data(), *w1 = r.weight[1].data(), *w2 = r.weight[2].data(), *w3 = r.weight[3].data();
  index_t *i0 = r.inside[0].data(), *i1 = r.inside[1].data(), *i2 = r.inside[2].data(), *i3 = r.inside[3].data();
  index_t* mo = r.mask_offset.data();
#pragma omp simd
  for (int32_t ox = 0; ox < width; ++ox) {
    double x, y;
    s.source(static_cast<double>(ox), row, x, y);
    const double fx = floor(x), fy = floor(y);
    const auto x0 = static_cast<index_t>(fx), y0 = static_cast<index_t>(fy);
    const auto ax = static_cast<acc_t>(x - fx), ay = static_cast<acc_t>(y - fy);
    // 0 <= v < n as one unsigned compare, and & not &&: GCC if-converts and vectorises only this form
    const bool x0_in = uindex_t(x0) < uw, x1_in = uindex_t(x0 + 1) < uw;
    const bool y0_in = uindex_t(y0) < uh, y1_in = uindex_t(y0 + 1) < uh;
    const bool in0 = x0_in & y0_in, in1 = x1_in & y0_in, in2 = x0_in & y1_in, in3 = x1_in & y1_in;
    i0[ox] = in0;
    i1[ox] = in1;
    i2[ox] = in2;
    i3[ox] = in3;
    o0[ox] = in0 ? y0 * sy_ + x0 * sx_ : 0;
    o1[ox] = in1 ? y0 * sy_ + (x0 + 1) * sx_ : 0;
    o2[ox] = in2 ? (y0 + 1) * sy_ + x0 * sx_ : 0;
    o3[ox] = in3 ? (y0 + 1) * sy_ + (x0 + 1) * sx_ : 0;
    w0[ox] = (1 - ax) * (1 - ay);
    w1[ox] = ax * (1 - ay);
    w2[ox] = (1 - ax) * ay;
    w3[ox] = ax * ay;
    const auto px = static_cast<index_t>(nearbyint(x)), py = static_cast<index_t>(nearbyint(y));
    mo[ox] = (uindex_t(px) < uw) & (uindex_t(py) < uh) ? py * my + px * mx : index_t(-1);
  }
}

// One channel of a row: the four taps of every pixel, their weighted sum, the colour transform.
template <typename in_t, typename out_t, typename acc_t, typename index_t>
SEGFAST_CPU_MULTIVERSION void gather_channel(const in_t* plane, out_t* out, int64_t out_stride, int64_t width,
                                             const RowTaps<acc_t, index_t>& r, SampleColor<acc_t> color, acc_t scale,
                                             acc_t shift) {
  const index_t *o0 = r.offset[0].data(), *o1 = r.offset[1].data(), *o2 = r.offset[2].data(), *o3 = r.offset[3].data();
  const acc_t *w0 = r.weight[0].data(), *w1 = r.weight[1].data(), *w2 = r.weight[2].data(), *w3 = r.weight[3].data();
  const index_t *i0 = r.inside[0].data(), *i1 = r.inside[1].data(), *i2 = r.inside[2].data(), *i3 = r.inside[3].data();
#pragma omp simd
  for (int64_t ox = 0; ox < width; ++ox) {
    const acc_t v0 = cpu::widen<acc_t>(plane[o0[ox]]), v1 = cpu::widen<acc_t>(plane[o1[ox]]);
    const acc_t v2 = cpu::widen<acc_t>(plane[o2[ox]]), v3 = cpu::widen<acc_t>(plane[o3[ox]]);
    acc_t v = i0[ox] ? w0[ox] * v0 : acc_t(0);
    v += i1[ox] ? w1[ox] * v1 : acc_t(0);
    v += i2[ox] ? w2[ox] * v2 : acc_t(0);
    v += i3[ox] ? w3[ox] * v3 : acc_t(0);
    out[ox * out_stride] = cpu::narrow<out_t>(color.apply(v, scale, shift));
  }
}

// Every channel of a row of a uint8 image whose channels are interleaved (HWC / channels_last,
// C <= 4): one 32-bit load per tap reads all channels of the pixel (bytes past them are dropped),
// a quarter of the loads of gather_channel. `limit`, the last plane offset that 4 bytes can be
// read from, keeps the image's final pixel inside the tensor: its word is loaded lower and shifted.
template <int kChannels, typename out_t, typename acc_t>
SEGFAST_CPU_MULTIVERSION void gather_pixels(const uint8_t* plane, int32_t limit, out_t* out, int64_t out_channel_stride,
                                            int64_t out_stride, int64_t width, const RowTaps<acc_t, int32_t>& r,
                                            SampleColor<acc_t> color, const acc_t* scale_, const acc_t* shift_) {
  acc_t scale[kChannels], shift[kChannels];
  for (int c = 0; c < kChannels; ++c) {
    scale[c] = scale_[c];
    shift[c] = shift_[c];
  }
  const int32_t *o0 = r.offset[0].data(), *o1 = r.offset[1].data(), *o2 = r.offset[2].data(), *o3 = r.offset[3].data();
  const acc_t *w0 = r.weight[0].data(), *w1 = r.weight[1].data(), *w2 = r.weight[2].data(), *w3 = r.weight[3].data();
  const int32_t *i0 = r.inside[0].data(), *i1 = r.inside[1].data(), *i2 = r.inside[2].data(), *i3 = r.inside[3].data();
  const auto word_at = [&](int32_t offset) {
    const int32_t at = offset < limit ? offset : limit;
    uint32_t word;
    std::memcpy(&word, plane + at, sizeof(word));
    return word >> (8 * (offset - at));
  };
#pragma omp simd
  for (int64_t ox = 0; ox < width; ++ox) {
    const uint32_t p0 = word_at(o0[ox]), p1 = word_at(o1[ox]), p2 = word_at(o2[ox]), p3 = word_at(o3[ox]);
    for (int c = 0; c < kChannels; ++c) {
      const auto byte = [c](uint32_t word) {
        return static_cast<acc_t>(static_cast<int32_t>((word >> (8 * c)) & 255u));
      };
      acc_t v = i0[ox] ? w0[ox] * byte(p0) : acc_t(0);
      v += i1[ox] ? w1[ox] * byte(p1) : acc_t(0);
      v += i2[ox] ? w2[ox] * byte(p2) : acc_t(0);
      v += i3[ox] ? w3[ox] * byte(p3) : acc_t(0);
      out[c * out_channel_stride + ox * out_stride] = cpu::narrow<out_t>(color.apply(v, scale[c], shift[c]));
    }
  }
}

template <typename mask_t, typename index_t>
SEGFAST_CPU_MULTIVERSION void gather_mask(const mask_t* plane, mask_t* out, int64_t width, const index_t* offset,
                                          mask_t ignore) {
#pragma omp simd
  for (int64_t ox = 0; ox < width; ++ox) out[ox] = offset[ox] >= 0 ? plane[offset[ox]] : ignore;
}

// The (2, C) [scale, shift] of SampleColor per channel: the channel map's, or 1 and 0.
template <typename acc_t>
std::vector<acc_t> channel_terms(const Tensor& channel_map, int64_t channels) {
  std::vector<acc_t> terms(2 * channels, acc_t(0));
  std::fill_n(terms.begin(), channels, acc_t(1));
  if (channel_map.defined()) std::copy_n(channel_map.const_data_ptr<acc_t>(), 2 * channels, terms.begin());
  return terms;
}

std::tuple<Tensor, Tensor> affine_augment_cpu(const Tensor& image, const Tensor& mask, const Tensor& theta_,
                                              int64_t out_h, int64_t out_w, int64_t ignore_index,
                                              const std::optional<Tensor>& color,
                                              const std::optional<Tensor>& normalize,
                                              std::optional<at::ScalarType> out_dtype,
                                              std::optional<at::MemoryFormat> out_memory_format) {
  check_augment_args(image, mask, theta_, out_h, out_w, color, normalize, out_dtype);
  TORCH_CHECK_TYPE(image.scalar_type() != at::kHalf, "affine_augment: float16 images are supported on CUDA only");
  const Tensor theta = theta_.to(at::kDouble).contiguous();
  const int64_t batch = image.size(0), channels = image.size(1), in_h = image.size(2), in_w = image.size(3);
  const at::ScalarType out_type = augment_out_dtype(image, out_dtype);
  Tensor out = cpu::empty_cached({batch, channels, out_h, out_w}, image.options().dtype(out_type),
                                 augment_out_format(image, out_memory_format));
  Tensor out_mask = cpu::empty_cached({batch, out_h, out_w}, mask.options());
  const double* t = theta.const_data_ptr<double>();
  const Strides st{image.stride(2), image.stride(3), mask.stride(1), mask.stride(2)};
  // the last byte of the image, from its data pointer, for gather_pixels' limit
  const int64_t image_end = (batch - 1) * image.stride(0) + (channels - 1) * image.stride(1) +
                            (in_h - 1) * image.stride(2) + (in_w - 1) * image.stride(3) + 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kByte, at::kBFloat16, image.scalar_type(), "affine_augment", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "affine_augment", [&] {
      using out_t = scalar_t;
      using acc_t = augment_acc_t<in_t, out_t>;
      const ColorMaps maps = color_maps(image, color, normalize, c10::CppTypeToScalarType<acc_t>::value);
      const acc_t* sample_map = maps.sample_map.defined() ? maps.sample_map.const_data_ptr<acc_t>() : nullptr;
      const std::vector<acc_t> terms = channel_terms<acc_t>(maps.channel_map, channels);
      const acc_t *scale = terms.data(), *shift = terms.data() + channels;
      dispatch_class_index(mask.scalar_type(), "affine_augment: mask", [&](auto mask_type) {
        using mask_t = decltype(mask_type);
        const in_t* in = image.const_data_ptr<in_t>();
        const mask_t* m = mask.const_data_ptr<mask_t>();
        out_t* o = out.mutable_data_ptr<out_t>();
        mask_t* om = out_mask.mutable_data_ptr<mask_t>();
        const auto ignore = static_cast<mask_t>(ignore_index);
        // int32 offsets when every plane offset (image and mask) fits
        const int64_t extent = std::max((in_h - 1) * st.image_y + (in_w - 1) * st.image_x,
                                        (in_h - 1) * st.mask_y + (in_w - 1) * st.mask_x);
        auto run = [&](auto index) {
          using index_t = decltype(index);
          // interleaved uint8 channels whose last sample's words all lie inside the image
          const bool by_pixel = std::is_same_v<in_t, uint8_t> && std::is_same_v<index_t, int32_t> &&
                                (channels == 3 || channels == 4) && image.stride(1) == 1 &&
                                image.stride(3) >= channels && image_end - (batch - 1) * image.stride(0) >= 4;
          at::parallel_for(0, batch * out_h, 4, [&](int64_t begin, int64_t end) {
            RowTaps<acc_t, index_t> taps(out_w);
            for (int64_t row = begin; row < end; ++row) {
              const int64_t n = row / out_h, oy = row % out_h;
              const double* tn = t + 6 * n;
              const AffineSample sample{tn[0], tn[1],        tn[2],        tn[3],         tn[4],
                                        tn[5], double(in_h), double(in_w), double(out_h), double(out_w)};
              row_taps(sample, oy, st, taps);
              const auto sample_color = SampleColor<acc_t>::of(sample_map, n, acc_t(augment_unit<in_t>()));
              out_t* out_row = o + n * out.stride(0) + oy * out.stride(2);
              if constexpr (std::is_same_v<in_t, uint8_t> && std::is_same_v<index_t, int32_t>) {
                if (by_pixel) {
                  const auto limit = static_cast<int32_t>(
                      std::min<int64_t>(image_end - 4 - n * image.stride(0), std::numeric_limits<int32_t>::max()));
                  const auto gather = channels == 3 ? gather_pixels<3, out_t, acc_t> : gather_pixels<4, out_t, acc_t>;
                  gather(in + n * image.stride(0), limit, out_row, out.stride(1), out.stride(3), out_w, taps,
                         sample_color, scale, shift);
                }
              }
              for (int64_t c = 0; c < channels && !by_pixel; ++c) {
                gather_channel(in + n * image.stride(0) + c * image.stride(1), out_row + c * out.stride(1),
                               out.stride(3), out_w, taps, sample_color, scale[c], shift[c]);
              }
              gather_mask(m + n * mask.stride(0), om + (n * out_h + oy) * out_w, out_w, taps.mask_offset.data(),
                          ignore);
            }
          });
        };
        if (extent < (int64_t{1} << 31) - 1) {
          run(int32_t{});
        } else {
          run(int64_t{});
        }
      });
    });
  });
  return {out, out_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  m.impl("affine_augment", &affine_augment_cpu);
}

}  // namespace segfast

#pragma once
// Softmax over the classes of (N, C, S) logits on CPU, a tile of pixels at a time; shared by the
// cross-entropy, Dice and focal kernels.
//
// Work is cut into tiles of kTile pixels of one image. Within a tile the C x kTile logits stay in
// L1, so the class loops (max, then sum of exp) read memory once; the inner loops run over pixels
// and vectorise when pixels are contiguous (NCHW). Tiles are fixed by the sizes, so sums over
// pixels made of per-tile partials added in tile order do not depend on the thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "common/macros.h"
#include "cpu/reduce.h"
#include "cpu/vec_math.h"

namespace segfast::cpu {

constexpr int64_t kTile = 64;

// A tile of logits: x(c, j) = data[c * class_stride + j * pixel_stride], j < pixels <= kTile.
// kUnit: pixel_stride is 1 (NCHW), known at compile time so the pixel loops vectorise.
template <typename scalar_t, bool kUnit>
struct Tile {
  const scalar_t* data;
  int64_t class_stride, pixel_stride_, classes, pixels;

  int64_t pixel_stride() const { return kUnit ? 1 : pixel_stride_; }
  const scalar_t* row(int64_t c) const { return data + c * class_stride; }
};

// max[j] = max_c x(c, j), the first pass of a tile's softmax (a NaN logit is skipped here and
// reaches the results through the sum of exp that follows); sum[j] zeroed for that sum.
template <typename scalar_t, bool kUnit>
inline void tile_class_max(const Tile<scalar_t, kUnit>& t, at::opmath_type<scalar_t>* max,
                           at::opmath_type<scalar_t>* sum) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  for (int64_t j = 0; j < t.pixels; ++j) {
    max[j] = -std::numeric_limits<acc_t>::infinity();
    sum[j] = 0;
  }
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t v = cpu::widen<acc_t>(x[j * ps]);
      max[j] = v > max[j] ? v : max[j];
    }
  }
}

// best[j], arg[j] = the value and the class torch.argmax picks for pixel j: the first maximum, or
// the first NaN (common/metrics.h: argmax_class, with the pixels vectorised). arg is 32-bit: the
// same lane count as float.
template <typename scalar_t, bool kUnit>
inline void tile_class_argmax(const Tile<scalar_t, kUnit>& t, at::opmath_type<scalar_t>* best, int32_t* arg) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  for (int64_t j = 0; j < t.pixels; ++j) {
    best[j] = cpu::widen<acc_t>(t.row(0)[j * ps]);
    arg[j] = 0;
  }
  for (int32_t c = 1; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t v = cpu::widen<acc_t>(x[j * ps]);
      const bool take = (best[j] == best[j]) & ((v > best[j]) | (v != v));  // a NaN best stays
      best[j] = take ? v : best[j];
      arg[j] = take ? c : arg[j];
    }
  }
}

// lse[j] = log sum_c exp x(c, j): a max pass, then a sum-of-exp pass over the L1-resident tile.
template <typename scalar_t, bool kUnit>
SEGFAST_CPU_MULTIVERSION void tile_logsumexp(const Tile<scalar_t, kUnit> t, at::opmath_type<scalar_t>* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  acc_t max[kTile], sum[kTile];
  tile_class_max(t, max, sum);
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      sum[j] += cpu::exp_of_nonpositive_term(cpu::widen<acc_t>(x[j * ps]) - max[j]);
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < t.pixels; ++j) lse[j] = max[j] + cpu::log_of_sum(sum[j]);
}

// The tile's softmax, probs[c * kTile + j] = exp(x(c, j) - max_j) / sum_k exp(x(k, j) - max_j), with
// one exp per logit (as torch's softmax), for the kernels that read every probability more than once.
template <typename scalar_t, bool kUnit>
SEGFAST_CPU_MULTIVERSION void tile_softmax(const Tile<scalar_t, kUnit> t, at::opmath_type<scalar_t>* probs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  acc_t max[kTile], sum[kTile];
  tile_class_max(t, max, sum);
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
    acc_t* e = probs + c * kTile;
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      e[j] = cpu::exp_vec(cpu::widen<acc_t>(x[j * ps]) - max[j]);
      sum[j] += e[j];
    }
  }
  for (int64_t c = 0; c < t.classes; ++c) {
    acc_t* e = probs + c * kTile;
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) e[j] /= sum[j];
  }
}

// How (N, C, S) logits are cut into tiles of kTile pixels of one image.
struct TileGrid {
  int64_t batch, classes, pixels;
  int64_t batch_stride, class_stride, pixel_stride;
  int64_t tiles_per_image() const { return (pixels + kTile - 1) / kTile; }
  int64_t tiles() const { return batch * tiles_per_image(); }
};

inline TileGrid tile_grid(const at::Tensor& input) {
  return {input.size(0), input.size(1), input.size(2), input.stride(0), input.stride(1), input.stride(2)};
}

// Calls f(n, s0, pixels, tile_index) for every tile, in parallel.
template <typename F>
void for_each_tile(const TileGrid& g, F&& f) {
  const int64_t per_image = g.tiles_per_image();
  at::parallel_for(0, g.tiles(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile / per_image, s0 = tile % per_image * kTile;
      f(n, s0, std::min(kTile, g.pixels - s0), tile);
    }
  });
}

template <typename scalar_t, bool kUnit>
Tile<scalar_t, kUnit> tile_at(const scalar_t* base, const TileGrid& g, int64_t n, int64_t s0, int64_t pixels) {
  return {base + n * g.batch_stride + s0 * g.pixel_stride, g.class_stride, g.pixel_stride, g.classes, pixels};
}

template <typename F>
void dispatch_unit_stride(const TileGrid& g, F&& f) {
  if (g.pixel_stride == 1) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace segfast::cpu

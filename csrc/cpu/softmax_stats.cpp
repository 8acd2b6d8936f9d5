// Per-pixel softmax statistics on CPU: argmax, max probability and entropy of (N, C, S) logits in
// one read, tile by tile (cpu/softmax_tile.h): a pass over the classes for the max and argmax, a
// second over the L1-resident tile for the two sums of common/softmax_stats.h, pixels in the inner,
// vectorised loops.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/macros.h"
#include "common/softmax_stats.h"
#include "cpu/softmax_tile.h"
#include "cpu/vec_math.h"

namespace segfast {
namespace {

using at::Tensor;
using cpu::kTile;

template <typename scalar_t, bool kUnit>
SEGFAST_CPU_MULTIVERSION void tile_stats(const cpu::Tile<scalar_t, kUnit> t, int64_t* argmax, scalar_t* max_prob,
                                         scalar_t* entropy) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ps = t.pixel_stride();
  acc_t best[kTile], sum[kTile], weighted[kTile];
  int32_t arg[kTile];
  // a NaN best (torch.argmax picks the first NaN) makes every z NaN below, so the probability and
  // entropy are NaN as torch's softmax gives them
  cpu::tile_class_argmax(t, best, arg);
  for (int64_t j = 0; j < t.pixels; ++j) sum[j] = weighted[j] = 0;
  for (int64_t c = 0; c < t.classes; ++c) {
    const scalar_t* x = t.row(c);
#pragma omp simd
    for (int64_t j = 0; j < t.pixels; ++j) {
      const acc_t z = cpu::widen<acc_t>(x[j * ps]) - best[j];
      const acc_t e = cpu::exp_of_nonpositive_term(z);
      sum[j] += e;
      weighted[j] += e * entropy_term_z(z);
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < t.pixels; ++j) {
    argmax[j] = arg[j];
    max_prob[j] = cpu::narrow<scalar_t>(acc_t(1) / sum[j]);
    entropy[j] = cpu::narrow<scalar_t>(cpu::log_of_sum(sum[j]) - weighted[j] / sum[j]);
  }
}

std::tuple<Tensor, Tensor, Tensor> softmax_stats_cpu(const Tensor& input) {
  check_softmax_stats_args(input);
  const int64_t batch = input.size(0), pixels = input.size(2);
  Tensor argmax = at::empty({batch, pixels}, input.options().dtype(at::kLong));
  Tensor max_prob = at::empty({batch, pixels}, input.options());
  Tensor entropy = at::empty({batch, pixels}, input.options());
  const cpu::TileGrid g = cpu::tile_grid(input);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "softmax_stats", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    int64_t* a = argmax.mutable_data_ptr<int64_t>();
    scalar_t *p = max_prob.mutable_data_ptr<scalar_t>(), *h = entropy.mutable_data_ptr<scalar_t>();
    cpu::dispatch_unit_stride(g, [&](auto unit) {
      cpu::for_each_tile(g, [&](int64_t n, int64_t s0, int64_t count, int64_t) {
        const int64_t at = n * pixels + s0;
        tile_stats(cpu::tile_at<scalar_t, decltype(unit)::value>(x, g, n, s0, count), a + at, p + at, h + at);
      });
    });
  });
  return {argmax, max_prob, entropy};
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  m.impl("softmax_stats", &softmax_stats_cpu);
}

}  // namespace segfast

// Confusion matrix on CPU: per-pixel argmax over the classes (when given logits) fused with the
// histogram of (target, prediction) pairs. Pixels go by tiles (cpu/softmax_tile.h): the argmax of a
// tile runs over the classes with the pixels in the inner, vectorised loop. Each thread's block of
// tiles counts into its own matrix, and the blocks are summed; integer counts, so the result is
// exact whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "common/class_index.h"
#include "common/macros.h"
#include "common/metrics.h"
#include "cpu/softmax_tile.h"
#include "cpu/vec_math.h"

namespace segfast {
namespace {

using at::Tensor;
using cpu::kTile;

// pred[j] = the class torch.argmax picks for the tile's pixel j.
template <typename scalar_t, bool kUnit>
SEGFAST_CPU_MULTIVERSION void tile_argmax(const cpu::Tile<scalar_t, kUnit> t, int64_t* pred) {
  at::opmath_type<scalar_t> best[kTile];
  int32_t arg[kTile];
  cpu::tile_class_argmax(t, best, arg);
  for (int64_t j = 0; j < t.pixels; ++j) pred[j] = arg[j];
}

// Calls predict(n, s0, pixels, pred) for every tile of the (N, S) pixels, each thread counting the
// (target, pred) pairs of its tiles into its own matrix; returns the sum.
template <typename Predict>
Tensor count_pairs(const Tensor& target, int64_t batch, int64_t pixels, int64_t num_classes, int64_t ignore_index,
                   Predict&& predict) {
  const int64_t cells = num_classes * num_classes;
  const int64_t per_image = (pixels + kTile - 1) / kTile, tiles = batch * per_image;
  const int64_t blocks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, tiles / 64));
  std::vector<int64_t> partial(blocks * cells, 0);
  dispatch_class_index(target.scalar_type(), "confusion_matrix: target", [&](auto target_type) {
    using target_t = decltype(target_type);
    const target_t* t = target.const_data_ptr<target_t>();
    const int64_t ts0 = target.stride(0), ts1 = target.stride(1);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      int64_t pred[kTile];
      for (int64_t b = b0; b < b1; ++b) {
        int64_t* hist = partial.data() + b * cells;
        for (int64_t tile = b * tiles / blocks; tile < (b + 1) * tiles / blocks; ++tile) {
          const int64_t n = tile / per_image, s0 = tile % per_image * kTile;
          const int64_t count = std::min(kTile, pixels - s0);
          predict(n, s0, count, pred);
          for (int64_t j = 0; j < count; ++j) {
            const auto cls = static_cast<int64_t>(t[n * ts0 + (s0 + j) * ts1]);
            if (cls == ignore_index) continue;
            check_class_index("confusion_matrix", cls, n, s0 + j, num_classes, ignore_index);
            if (C10_UNLIKELY(pred[j] < 0 || pred[j] >= num_classes)) {
              raise_bad_class_index("confusion_matrix", "predicted class", pred[j], n, s0 + j, num_classes, {});
            }
            ++hist[cls * num_classes + pred[j]];
          }
        }
      }
    });
  });
  Tensor matrix = at::zeros({num_classes, num_classes}, target.options().dtype(at::kLong));
  int64_t* m = matrix.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t c = 0; c < cells; ++c) m[c] += partial[b * cells + c];
  }
  return matrix;
}

Tensor confusion_matrix_cpu(const Tensor& input, const Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const auto [batch, pixels] = check_confusion_args(input, target, num_classes);
  if (at::isFloatingType(input.scalar_type())) {
    const cpu::TileGrid g = cpu::tile_grid(input);
    Tensor matrix;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "confusion_matrix", [&] {
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      cpu::dispatch_unit_stride(g, [&](auto unit) {
        matrix = count_pairs(target, batch, pixels, num_classes, ignore_index,
                             [&](int64_t n, int64_t s0, int64_t count, int64_t* pred) {
                               tile_argmax(cpu::tile_at<scalar_t, decltype(unit)::value>(x, g, n, s0, count), pred);
                             });
      });
    });
    return matrix;
  }
  Tensor matrix;
  dispatch_class_index(input.scalar_type(), "confusion_matrix: predicted classes", [&](auto index) {
    using index_t = decltype(index);
    const index_t* p = input.const_data_ptr<index_t>();
    const int64_t s0 = input.stride(0), s1 = input.stride(1);
    matrix = count_pairs(target, batch, pixels, num_classes, ignore_index,
                         [&](int64_t n, int64_t first, int64_t count, int64_t* pred) {
                           for (int64_t j = 0; j < count; ++j)
                             pred[j] = static_cast<int64_t>(p[n * s0 + (first + j) * s1]);
                         });
  });
  return matrix;
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  m.impl("confusion_matrix", &confusion_matrix_cpu);
}

}  // namespace segfast

#include "cpu/activation_pass.h"
#include "cpu/vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

namespace segfast::cpu {
namespace {

template <Activation A, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void activation_range(const scalar_t* z, scalar_t* out, int64_t count,
                                               at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = narrow<scalar_t>(activate<A>(widen<acc_t>(z[i]), slope));
}

// Rows [r0, r1): grad_z and the partial column sums of this block.
template <Activation A, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void backward_rows(const scalar_t* grad, const scalar_t* saved, scalar_t* grad_z, int64_t cols,
                                            int64_t r0, int64_t r1, at::opmath_type<scalar_t> slope,
                                            at::opmath_type<scalar_t>* column_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < cols; ++c) column_sums[c] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t at = r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const acc_t g =
          cpu::widen<acc_t>(grad[at + c]) * activation_derivative<A>(cpu::widen<acc_t>(saved[at + c]), slope);
      grad_z[at + c] = cpu::narrow<scalar_t>(g);
      column_sums[c] += g;
    }
  }
}

constexpr int64_t kRowBlock = 64;  // rows per partial sum: fixes the summation order

constexpr int64_t kPixelBlock = 1024;  // pixels per parallel task of apply_activation_to_nchw

// Pixels [p0, p1) of one image: z its (pixels, channels) rows, out its (channels, pixels) planes;
// pixel rows are read whole into scratch columns, then scratch rows written as channel planes.
template <Activation A, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void activation_to_nchw_block(const scalar_t* z, scalar_t* out, int64_t channels,
                                                       int64_t pixels, int64_t p0, int64_t p1,
                                                       at::opmath_type<scalar_t> slope,
                                                       at::opmath_type<scalar_t>* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t q0 = p0; q0 < p1; q0 += kSubTile) {
    const int64_t q1 = std::min(p1, q0 + kSubTile);
    for (int64_t p = q0; p < q1; ++p) {
      const scalar_t* zp = z + p * channels;
      acc_t* sp = scratch + (p - q0);
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) sp[c * kScratchStride] = activate<A>(widen<acc_t>(zp[c]), slope);
    }
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t* sc = scratch + c * kScratchStride;
      scalar_t* oc = out + c * pixels + q0;
#pragma omp simd
      for (int64_t j = 0; j < q1 - q0; ++j) oc[j] = narrow<scalar_t>(sc[j]);
    }
  }
}

}  // namespace

void apply_activation(const at::Tensor& z, const at::Tensor& out, Activation act, double negative_slope) {
  TORCH_INTERNAL_ASSERT(z.sizes() == out.sizes() && z.strides() == out.strides());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "activate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto a) {
      at::parallel_for(0, z.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
        activation_range<decltype(a)::value, scalar_t>(zp + begin, op + begin, end - begin,
                                                       static_cast<acc_t>(negative_slope));
      });
    });
  });
}

void apply_activation_to_nchw(const at::Tensor& z, const at::Tensor& out, Activation act, double negative_slope) {
  TORCH_INTERNAL_ASSERT(z.dim() == 4 && z.sizes() == out.sizes() && out.is_contiguous() &&
                        z.is_contiguous(at::MemoryFormat::ChannelsLast));
  const int64_t batch = z.size(0), channels = z.size(1), pixels = z.size(2) * z.size(3);
  const int64_t blocks = (pixels + kPixelBlock - 1) / kPixelBlock;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "activate_to_nchw", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto a) {
      at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> scratch(channels * kScratchStride);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t n = t / blocks, p0 = t % blocks * kPixelBlock;
          activation_to_nchw_block<decltype(a)::value, scalar_t>(
              zp + n * pixels * channels, op + n * channels * pixels, channels, pixels, p0,
              std::min(pixels, p0 + kPixelBlock), static_cast<acc_t>(negative_slope), scratch.data());
        }
      });
    });
  });
}

at::Tensor activation_backward_rows(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& grad_z,
                                    Activation act, double negative_slope) {
  TORCH_INTERNAL_ASSERT(grad.dim() == 2 && grad.is_contiguous() && saved.is_contiguous() && grad_z.is_contiguous());
  const int64_t rows = grad.size(0), cols = grad.size(1), blocks = (rows + kRowBlock - 1) / kRowBlock;
  at::Tensor column_sums = at::empty({cols}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "activation_backward_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partial(blocks * cols);
    dispatch_activation(act, [&](auto a) {
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          backward_rows<decltype(a)::value, scalar_t>(grad.const_data_ptr<scalar_t>(), saved.const_data_ptr<scalar_t>(),
                                                      grad_z.mutable_data_ptr<scalar_t>(), cols, b * kRowBlock,
                                                      std::min(rows, (b + 1) * kRowBlock),
                                                      static_cast<acc_t>(negative_slope), partial.data() + b * cols);
        }
      });
    });
    sum_block_partials(partial, cols, column_sums.mutable_data_ptr<scalar_t>());
  });
  return column_sums;
}

}  // namespace segfast::cpu

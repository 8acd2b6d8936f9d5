// Fused bias + activation (forward) and activation-derivative x gradient + bias-gradient partial
// sums (backward), for the CUDA ops whose core is cuDNN or cuBLAS.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "cuda/activation_pass.cuh"
#include "cuda/fast_divide.cuh"
#include "cuda/launch.cuh"

namespace segfast::cuda {
namespace {

using at::Tensor;

template <Activation A, typename scalar_t>
__global__ void bias_activation_kernel(scalar_t* z, const scalar_t* bias, scalar_t* out, int64_t n,
                                       FastDivider by_channels, FastDivider by_inner, at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  SEGFAST_CUDA_KERNEL_LOOP(i, n) {
    acc_t v = static_cast<acc_t>(z[i]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[by_channels.divmod(by_inner.divide(i)).remainder]);
    const scalar_t stored = static_cast<scalar_t>(v);  // the activation reads z as stored, as stock does
    if (out != z) z[i] = stored;
    out[i] = static_cast<scalar_t>(activate<A>(static_cast<acc_t>(stored), slope));
  }
}

// NCHW: block b handles chunk b % chunks of plane b / chunks (plane = n * channels + c) and
// writes its sum to partial[(n * chunks + chunk) * channels + c].
template <Activation A, typename scalar_t>
__global__ void activation_backward_planes_kernel(const scalar_t* grad, const scalar_t* saved, scalar_t* grad_z,
                                                  int64_t channels, int64_t inner, int64_t chunks,
                                                  at::opmath_type<scalar_t> slope, at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t chunk_len = (inner + chunks - 1) / chunks;
  const int64_t begin = plane * inner + chunk * chunk_len;
  const int64_t end = plane * inner + std::min(inner, (chunk + 1) * chunk_len);
  acc_t sum = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const acc_t g = static_cast<acc_t>(grad[i]) * activation_derivative<A>(static_cast<acc_t>(saved[i]), slope);
    grad_z[i] = static_cast<scalar_t>(g);
    sum += g;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    const int64_t n = plane / channels, c = plane % channels;
    partial[(n * chunks + chunk) * channels + c] = sum;
  }
}

// Channels innermost, a (rows, channels) matrix: a block of kColumns x kRowThreads threads covers
// kColumns channels (coalesced) and rows_per_block rows; partial[blockIdx.y * channels + c].
constexpr int kColumns = 32, kRowThreads = 8;

template <Activation A, typename scalar_t>
__global__ void activation_backward_columns_kernel(const scalar_t* grad, const scalar_t* saved, scalar_t* grad_z,
                                                   int64_t rows, int64_t channels, int64_t rows_per_block,
                                                   at::opmath_type<scalar_t> slope,
                                                   at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sums[kRowThreads][kColumns + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  const int64_t r0 = blockIdx.y * rows_per_block, r1 = std::min(rows, r0 + rows_per_block);
  acc_t sum = 0;
  if (c < channels) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowThreads) {
      const int64_t i = r * channels + c;
      const acc_t g = static_cast<acc_t>(grad[i]) * activation_derivative<A>(static_cast<acc_t>(saved[i]), slope);
      grad_z[i] = static_cast<scalar_t>(g);
      sum += g;
    }
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    for (int y = 1; y < kRowThreads; ++y) sum += sums[y][threadIdx.x];
    partial[blockIdx.y * channels + c] = sum;
  }
}

}  // namespace

void bias_activation(const Tensor& z, const std::optional<Tensor>& bias, const Tensor& out, int64_t channels,
                     int64_t inner, Activation act, double negative_slope) {
  const int64_t n = z.numel();
  if (n == 0) return;
  const cuda::DeviceGuard guard(z.device());
  const bool has_bias = bias && bias->defined();
  const Tensor b = has_bias ? bias->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bias_activation", [&] {
    dispatch_activation(act, [&](auto a) {
      cuda::launch(bias_activation_kernel<decltype(a)::value, scalar_t>, blocks_for(n), kThreads,
                   z.mutable_data_ptr<scalar_t>(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                   out.mutable_data_ptr<scalar_t>(), n, FastDivider(channels), FastDivider(inner),
                   static_cast<at::opmath_type<scalar_t>>(negative_slope));
    });
  });
}

Tensor activation_backward(const Tensor& grad, const Tensor& saved, const Tensor& grad_z, int64_t channels,
                           int64_t inner, Activation act, double negative_slope) {
  const cuda::DeviceGuard guard(grad.device());
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  const int64_t n = grad.numel();
  if (n == 0 || channels == 0) return at::zeros({channels}, grad.options());
  Tensor partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "activation_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto slope = static_cast<acc_t>(negative_slope);
    dispatch_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      if (inner > 1) {
        const int64_t planes = n / inner;
        // about 8 elements per thread; the count depends only on the sizes, so the sums do too
        const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(inner / (kThreads * 8), (1 << 30) / planes));
        partial = at::empty({planes / channels * chunks, channels}, grad.options().dtype(acc_type));
        cuda::launch(activation_backward_planes_kernel<A, scalar_t>, planes * chunks, kThreads,
                     grad.const_data_ptr<scalar_t>(), saved.const_data_ptr<scalar_t>(),
                     grad_z.mutable_data_ptr<scalar_t>(), channels, inner, chunks, slope,
                     partial.mutable_data_ptr<acc_t>());
      } else {
        const int64_t rows = n / channels;
        const int64_t rows_per_block = std::max<int64_t>(128, (rows + 65534) / 65535);
        const int64_t row_blocks = (rows + rows_per_block - 1) / rows_per_block;
        partial = at::empty({row_blocks, channels}, grad.options().dtype(acc_type));
        const dim3 grid((channels + kColumns - 1) / kColumns, row_blocks), block(kColumns, kRowThreads);
        cuda::launch(activation_backward_columns_kernel<A, scalar_t>, grid, block, grad.const_data_ptr<scalar_t>(),
                     saved.const_data_ptr<scalar_t>(), grad_z.mutable_data_ptr<scalar_t>(), rows, channels,
                     rows_per_block, slope, partial.mutable_data_ptr<acc_t>());
      }
    });
  });
  return partial.sum(0).to(grad.scalar_type());  // ATen's CUDA sum: a fixed reduction order
}

}  // namespace segfast::cuda

// Implicit-GEMM convolution on tensor cores with a fused bias + activation epilogue.
//
// The convolution is a GEMM: out(m, n) = sum_k A(m, k) B(k, n), m an output pixel (batch, y, x),
// n an output channel, k = (tap, input channel). A is never materialised: each K-step loads a
// 64 x 32 tile of input pixels for one tap straight from the channels_last input (zeros in the
// padding), B the matching 32 x 64 tile of the (C_out, kH, kW, C_in) weight. Four warps each own
// a 32 x 32 block of the 64 x 64 output tile (WMMA 16x16x16, which compiles to mma.sync), the
// fp32 accumulators go through shared memory once, and the epilogue adds the bias, applies the
// activation and stores each element once.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdlib>
#include <cstring>

#include "cuda/conv2d_act_igemm.cuh"
#include "cuda/launch.cuh"

namespace segfast::cuda::igemm {
namespace {

using at::Tensor;

template <typename T>
struct TensorCoreType;
template <>
struct TensorCoreType<c10::Half> {
  using type = __half;
};
template <>
struct TensorCoreType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kThreadsPerBlock = 128;
constexpr int kSkew = 8;    // row padding of the shared tiles: fewer bank conflicts, rows stay 16-byte aligned
constexpr int kVector = 8;  // 16-bit elements per 16-byte load

struct Shape {
  int64_t batch, in_h, in_w, in_c, out_h, out_w, out_c, kernel_h, kernel_w, pad_h, pad_w;

  __host__ __device__ int64_t pixels() const { return batch * out_h * out_w; }
  __host__ __device__ int64_t depth() const { return kernel_h * kernel_w * in_c; }
};

template <Activation A, typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    igemm_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ weight,
                 const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, scalar_t* __restrict__ preact, Shape s,
                 float slope) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 / f16 WMMA needs sm_80; chosen() never launches this below it
#else
  namespace wmma = nvcuda::wmma;
  using T = typename TensorCoreType<scalar_t>::type;
  __shared__ __align__(32) T a_tile[kTileM][kTileK + kSkew];  // (pixel, k)
  __shared__ __align__(32) T b_tile[kTileN][kTileK + kSkew];  // (output channel, k): B column-major
  __shared__ __align__(32) float c_tile[kTileM][kTileN + 4];

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM, n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int warp = threadIdx.x / 32, warp_m = warp / 2 * 32, warp_n = warp % 2 * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (auto& row : acc)
    for (auto& f : row) wmma::fill_fragment(f, 0.0f);

  const int64_t pixels = s.pixels(), depth = s.depth(), plane = s.out_h * s.out_w;
  for (int64_t k0 = 0; k0 < depth; k0 += kTileK) {
    const int64_t tap = k0 / s.in_c, c0 = k0 % s.in_c;  // in_c % kTileK == 0: one tap per K-step
    const int64_t dy = tap / s.kernel_w - s.pad_h, dx = tap % s.kernel_w - s.pad_w;
    for (int v = threadIdx.x; v < kTileM * kTileK / kVector; v += kThreadsPerBlock) {
      const int row = v / (kTileK / kVector), col = v % (kTileK / kVector) * kVector;
      const int64_t m = m0 + row;
      uint4 a = make_uint4(0, 0, 0, 0);
      if (m < pixels) {
        const int64_t n = m / plane, y = m % plane / s.out_w + dy, x = m % s.out_w + dx;
        if (y >= 0 && y < s.in_h && x >= 0 && x < s.in_w) {
          a = *reinterpret_cast<const uint4*>(input + ((n * s.in_h + y) * s.in_w + x) * s.in_c + c0 + col);
        }
      }
      *reinterpret_cast<uint4*>(&a_tile[row][col]) = a;
      const int64_t oc = n0 + row;
      uint4 b = make_uint4(0, 0, 0, 0);
      if (oc < s.out_c) b = *reinterpret_cast<const uint4*>(weight + oc * depth + k0 + col);
      *reinterpret_cast<uint4*>(&b_tile[row][col]) = b;
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &a_tile[warp_m + 16 * i][kk], kTileK + kSkew);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &b_tile[warp_n + 16 * j][kk], kTileK + kSkew);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&c_tile[warp_m + 16 * i][warp_n + 16 * j], acc[i][j], kTileN + 4, wmma::mem_row_major);
  __syncthreads();
  // epilogue: consecutive threads take consecutive channels, so channels_last stores coalesce
  for (int e = threadIdx.x; e < kTileM * kTileN; e += kThreadsPerBlock) {
    const int row = e / kTileN, col = e % kTileN;
    const int64_t m = m0 + row, oc = n0 + col;
    if (m >= pixels || oc >= s.out_c) continue;
    float v = c_tile[row][col];
    if (bias != nullptr) v += static_cast<float>(bias[oc]);
    const scalar_t z = static_cast<scalar_t>(v);
    if (preact != nullptr) preact[m * s.out_c + oc] = z;
    out[m * s.out_c + oc] = static_cast<scalar_t>(activate<A>(static_cast<float>(z), slope));
  }
#endif
}

bool aligned(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Shapes where a GPU benchmark showed this kernel faster than cuDNN, each row with its
// measurement. Empty until a GPU session has run benchmarks/gpu_session.sh: no shape is chosen by
// default, only with SEGFAST_CUDA_CONV=igemm.
struct MeasuredFaster {
  int64_t kernel, in_channels, out_channels;
};
constexpr MeasuredFaster kMeasuredFaster[] = {{0, 0, 0}};  // sentinel row, matches nothing

bool forced_by_environment() {  // read on every call: tests switch it
  const char* v = std::getenv("SEGFAST_CUDA_CONV");
  return v != nullptr && std::strcmp(v, "igemm") == 0;
}

}  // namespace

bool eligible(const Tensor& input, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
              at::IntArrayRef dilation, int64_t groups, at::MemoryFormat format) {
  const auto dtype = input.scalar_type();
  const int64_t k = weight.size(2);
  return (dtype == at::kHalf || dtype == at::kBFloat16) && format == at::MemoryFormat::ChannelsLast && groups == 1 &&
         stride[0] == 1 && stride[1] == 1 && dilation[0] == 1 && dilation[1] == 1 && (k == 1 || k == 3) &&
         weight.size(3) == k && padding[0] <= k / 2 && padding[1] <= k / 2 && input.size(1) % kTileK == 0 &&
         input.size(2) + 2 * padding[0] >= k && input.size(3) + 2 * padding[1] >= k;
}

// The WMMA tiles take bf16 / f16 tensor cores: sm_80 or newer.
bool has_tensor_cores(const Tensor& input) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, input.get_device()));
  return major >= 8;
}

bool chosen(const Tensor& input, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
            at::IntArrayRef dilation, int64_t groups, at::MemoryFormat format) {
  if (!eligible(input, weight, stride, padding, dilation, groups, format) || !has_tensor_cores(input)) return false;
  if (forced_by_environment()) return true;
  for (const MeasuredFaster& row : kMeasuredFaster) {
    if (row.kernel == weight.size(2) && row.in_channels == input.size(1) && row.out_channels == weight.size(0)) {
      return true;
    }
  }
  return false;
}

std::tuple<Tensor, Tensor> forward(const Tensor& input_, const Tensor& weight_, const std::optional<Tensor>& bias,
                                   at::IntArrayRef padding, Activation act, double negative_slope, bool keep_preact) {
  // 16-byte loads need 16-byte aligned rows: a view at an odd storage offset is copied first
  auto dense_aligned = [](const Tensor& t) {
    const Tensor d = t.contiguous(at::MemoryFormat::ChannelsLast);
    return aligned(d) ? d : d.clone(at::MemoryFormat::ChannelsLast);
  };
  const Tensor input = dense_aligned(input_);
  const Tensor weight = dense_aligned(weight_);  // (C_out, kH, kW, C_in) in memory
  const bool has_bias = bias && bias->defined();
  const Tensor b = has_bias ? bias->contiguous() : Tensor();
  const Shape s{input.size(0),
                input.size(2),
                input.size(3),
                input.size(1),
                input.size(2) + 2 * padding[0] - weight.size(2) + 1,
                input.size(3) + 2 * padding[1] - weight.size(3) + 1,
                weight.size(0),
                weight.size(2),
                weight.size(3),
                padding[0],
                padding[1]};
  const auto options = input.options().memory_format(at::MemoryFormat::ChannelsLast);
  Tensor out = at::empty({s.batch, s.out_c, s.out_h, s.out_w}, options);
  Tensor preact = keep_preact ? at::empty({s.batch, s.out_c, s.out_h, s.out_w}, options) : Tensor();
  if (out.numel() == 0) return {out, preact};
  const dim3 grid((s.pixels() + kTileM - 1) / kTileM, (s.out_c + kTileN - 1) / kTileN);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "conv2d_act_igemm", [&] {
    dispatch_activation(act, [&](auto a) {
      cuda::launch(igemm_kernel<decltype(a)::value, scalar_t>, grid, kThreadsPerBlock, input.const_data_ptr<scalar_t>(),
                   weight.const_data_ptr<scalar_t>(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                   out.mutable_data_ptr<scalar_t>(), keep_preact ? preact.mutable_data_ptr<scalar_t>() : nullptr, s,
                   static_cast<float>(negative_slope));
    });
  });
  return {out, preact};
}

}  // namespace segfast::cuda::igemm

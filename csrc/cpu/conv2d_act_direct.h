#pragma once
// Direct convolution for layers with few input channels (a network's first layer: RGB in),
// stride 1, no dilation, one group, NCHW. oneDNN spends most of such a layer's time on layout
// reorders. Here each output row is computed from zero-padded copies of the input rows it needs,
// a block of outputs in registers, with bias and activation applied before the single store; and
// the weight and bias gradients are reduced straight from grad_output x act'(saved), row by row,
// without materialising grad_z.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "common/activation.h"
#include "cpu/activation_pass.h"
#include "cpu/vec_math.h"

namespace segfast::cpu::direct {

constexpr int64_t kMaxInputChannels = 4;
constexpr int64_t kMaxKernel = 7;
constexpr int64_t kBlock = 64;    // output pixels accumulated together
constexpr int64_t kTaskRows = 4;  // output rows per backward task: fixes the gradient sum order

struct DirectShape {
  int64_t batch, in_channels, out_channels, in_h, in_w, out_h, out_w, kernel_h, kernel_w, pad_h, pad_w;

  int64_t input_rows() const { return in_channels * kernel_h; }    // rows one output row reads
  int64_t row_width() const { return in_w + 2 * pad_w + kBlock; }  // + slack for the last block
  int64_t weights() const { return out_channels * input_rows() * kernel_w; }
};

// For NCHW callers (the output is NCHW); checked by the caller.
inline bool eligible(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef dilation, int64_t groups) {
  return input.is_contiguous() && groups == 1 && input.size(1) <= kMaxInputChannels && stride[0] == 1 &&
         stride[1] == 1 && dilation[0] == 1 && dilation[1] == 1 && weight.size(2) <= kMaxKernel &&
         weight.size(3) <= kMaxKernel;
}

inline DirectShape direct_shape(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef padding) {
  const int64_t kh = weight.size(2), kw = weight.size(3);
  return {input.size(0),
          input.size(1),
          weight.size(0),
          input.size(2),
          input.size(3),
          input.size(2) + 2 * padding[0] - kh + 1,
          input.size(3) + 2 * padding[1] - kw + 1,
          kh,
          kw,
          padding[0],
          padding[1]};
}

// rows[(ci * kernel_h + r) * row_width + pad_w + iw] = x[ci][oh - pad_h + r][iw], zeros around.
template <typename scalar_t, typename acc_t>
void gather_rows(const scalar_t* image, const DirectShape& d, int64_t oh, acc_t* rows) {
  std::fill(rows, rows + d.input_rows() * d.row_width(), acc_t(0));
  for (int64_t ci = 0; ci < d.in_channels; ++ci) {
    for (int64_t r = 0; r < d.kernel_h; ++r) {
      const int64_t ih = oh - d.pad_h + r;
      if (ih < 0 || ih >= d.in_h) continue;
      const scalar_t* src = image + (ci * d.in_h + ih) * d.in_w;
      acc_t* dst = rows + (ci * d.kernel_h + r) * d.row_width() + d.pad_w;
      for (int64_t iw = 0; iw < d.in_w; ++iw) dst[iw] = cpu::widen<acc_t>(src[iw]);
    }
  }
}

// One output row of every output channel: out[co * plane + ow] = act(bias + conv), and the
// pre-activation into preact the same way when it is non-null.
template <Activation A, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void forward_row(const at::opmath_type<scalar_t>* rows, const at::opmath_type<scalar_t>* w,
                                          const at::opmath_type<scalar_t>* bias, const DirectShape& d, int64_t plane,
                                          scalar_t* out, scalar_t* preact, at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t taps = d.input_rows(), width = d.row_width();
  for (int64_t co = 0; co < d.out_channels; ++co) {
    for (int64_t ow0 = 0; ow0 < d.out_w; ow0 += kBlock) {
      acc_t acc[kBlock];
      for (int64_t j = 0; j < kBlock; ++j) acc[j] = bias ? bias[co] : acc_t(0);
      for (int64_t t = 0; t < taps; ++t) {
        const acc_t* r = rows + t * width + ow0;
        const acc_t* wt = w + (co * taps + t) * d.kernel_w;
        for (int64_t k = 0; k < d.kernel_w; ++k) {
          const acc_t wk = wt[k];
#pragma omp simd
          for (int64_t j = 0; j < kBlock; ++j) acc[j] += wk * r[j + k];
        }
      }
      const int64_t valid = std::min(kBlock, d.out_w - ow0);
      scalar_t* o = out + co * plane + ow0;
      if (preact) {
        for (int64_t j = 0; j < valid; ++j) preact[co * plane + ow0 + j] = cpu::narrow<scalar_t>(acc[j]);
      }
      for (int64_t j = 0; j < valid; ++j) o[j] = cpu::narrow<scalar_t>(activate<A>(acc[j], slope));
    }
  }
}

// One output row's contribution to the weight and bias gradients. `grad_z` is scratch of
// out_channels x out_w; grad_w and grad_b accumulate (this task's partial sums).
template <Activation A, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void backward_row(const at::opmath_type<scalar_t>* rows, const scalar_t* grad_out,
                                           const scalar_t* saved, const DirectShape& d, int64_t plane,
                                           at::opmath_type<scalar_t> slope, at::opmath_type<scalar_t>* grad_z,
                                           at::opmath_type<scalar_t>* grad_w, at::opmath_type<scalar_t>* grad_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t taps = d.input_rows(), width = d.row_width();
  for (int64_t co = 0; co < d.out_channels; ++co) {
    const scalar_t* g = grad_out + co * plane;
    const scalar_t* s = saved + co * plane;
    acc_t* gz = grad_z + co * d.out_w;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t ow = 0; ow < d.out_w; ++ow) {
      gz[ow] = cpu::widen<acc_t>(g[ow]) * activation_derivative<A>(cpu::widen<acc_t>(s[ow]), slope);
      sum += gz[ow];
    }
    grad_b[co] += sum;
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t k = 0; k < d.kernel_w; ++k) {
        const acc_t* r = rows + t * width + k;
        acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t ow = 0; ow < d.out_w; ++ow) dot += gz[ow] * r[ow];
        grad_w[(co * taps + t) * d.kernel_w + k] += dot;
      }
    }
  }
}

template <typename acc_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const at::Tensor c = t.contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
  return std::vector<acc_t>(c.const_data_ptr<acc_t>(), c.const_data_ptr<acc_t>() + c.numel());
}

// out (and preact, if defined) are NCHW tensors of the output's size.
template <Activation A, typename scalar_t>
void forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
             const DirectShape& d, at::Tensor& out, at::Tensor& preact, double negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> w = to_acc<acc_t>(weight);
  const std::vector<acc_t> b = bias && bias->defined() ? to_acc<acc_t>(*bias) : std::vector<acc_t>();
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  scalar_t* z = preact.defined() ? preact.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t plane = d.out_h * d.out_w, image = d.out_channels * plane;
  at::parallel_for(0, d.batch * d.out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rows(d.input_rows() * d.row_width());
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / d.out_h, oh = row % d.out_h;
      gather_rows(x + n * d.in_channels * d.in_h * d.in_w, d, oh, rows.data());
      const int64_t at = n * image + oh * d.out_w;
      forward_row<A, scalar_t>(rows.data(), w.data(), b.empty() ? nullptr : b.data(), d, plane, o + at,
                               z ? z + at : nullptr, static_cast<acc_t>(negative_slope));
    }
  });
}

// Weight and bias gradients, into grad_weight (weight's shape, contiguous) and grad_bias.
template <Activation A, typename scalar_t>
void backward(const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& input, const DirectShape& d,
              at::Tensor& grad_weight, at::Tensor& grad_bias, double negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* s = saved.const_data_ptr<scalar_t>();
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const int64_t plane = d.out_h * d.out_w, image = d.out_channels * plane, rows_total = d.batch * d.out_h;
  const int64_t tasks = (rows_total + kTaskRows - 1) / kTaskRows, stride = d.weights() + d.out_channels;
  std::vector<acc_t> partial(tasks * stride, acc_t(0));
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rows(d.input_rows() * d.row_width()), grad_z(d.out_channels * d.out_w);
    for (int64_t task = begin; task < end; ++task) {
      acc_t* gw = partial.data() + task * stride;
      for (int64_t row = task * kTaskRows; row < std::min(rows_total, (task + 1) * kTaskRows); ++row) {
        const int64_t n = row / d.out_h, oh = row % d.out_h;
        gather_rows(x + n * d.in_channels * d.in_h * d.in_w, d, oh, rows.data());
        const int64_t at = n * image + oh * d.out_w;
        backward_row<A, scalar_t>(rows.data(), g + at, s + at, d, plane, static_cast<acc_t>(negative_slope),
                                  grad_z.data(), gw, gw + d.weights());
      }
    }
  });
  std::vector<acc_t> total(stride);
  sum_block_partials(partial, stride, total.data());
  scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
  scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
  for (int64_t i = 0; i < d.weights(); ++i) gw[i] = cpu::narrow<scalar_t>(total[i]);
  for (int64_t c = 0; c < d.out_channels; ++c) gb[c] = cpu::narrow<scalar_t>(total[d.weights() + c]);
}

}  // namespace segfast::cpu::direct

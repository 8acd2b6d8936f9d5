// conv2d + bias + activation on CPU.
//
// The convolution core is ATen's (oneDNN for float32/bfloat16), which adds the bias inside its
// accumulator (one rounding, as F.conv2d). Ours is the single pass around it: the activation (+ the
// layout change when we convolve channels_last for an NCHW caller) in forward, and activation
// derivative x grad_output + the bias-gradient reduction (+ the layout change) in backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "common/activation.h"
#include "common/layout.h"

namespace segfast {
namespace {

using at::IntArrayRef;
using at::MemoryFormat;
using at::Tensor;

// Pixels per tile of the fused passes. Fixed (not per thread) so that the bias-gradient sum has
// the same order whatever the thread count.
constexpr int64_t kTile = 1024;

// The memory format F.conv2d gives its output: channels_last when input or weight is.
MemoryFormat output_format(const Tensor& input, const Tensor& weight) {
  return memory_format(input) == MemoryFormat::ChannelsLast || memory_format(weight) == MemoryFormat::ChannelsLast
             ? MemoryFormat::ChannelsLast
             : MemoryFormat::Contiguous;
}

// The format we convolve in. oneDNN (float32/bfloat16) is much faster channels_last when the
// input has few channels; converting such an input is cheap, and the layout change of the output
// rides on the fused pass. Measured on the 2-core dev machine, 3x3 conv 8x3x256x256 -> 32:
// forward 19 ms channels_last vs 38 ms NCHW, backward (weight) 4 ms vs 22 ms. At 64 input
// channels converting the input costs more than it saves, so NCHW stays NCHW there.
constexpr int64_t kChannelsLastMaxInputChannels = 16;

MemoryFormat compute_format(const Tensor& input, const Tensor& weight) {
  const MemoryFormat out = output_format(input, weight);
  const bool onednn_dtype = input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16;
  if (out == MemoryFormat::Contiguous && onednn_dtype && input.size(1) <= kChannelsLastMaxInputChannels) {
    return MemoryFormat::ChannelsLast;
  }
  return out;
}

// A 4-D NCHW or channels_last tensor seen as (N, C, P = H*W).
template <typename T>
struct PlaneView {
  T* data;
  int64_t batch_stride, channel_stride, pixel_stride;

  static PlaneView of(const Tensor& t) {
    TORCH_INTERNAL_ASSERT(t.stride(2) == t.size(3) * t.stride(3) || t.size(2) == 1);
    return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(3)};
  }
  T* at(int64_t n, int64_t c, int64_t p) const { return data + n * batch_stride + c * channel_stride + p * pixel_stride; }
};

// Calls f(n, p0, p1, tile) over fixed-size pixel tiles of every image, in parallel.
template <typename F>
void for_each_tile(int64_t batch, int64_t pixels, F&& f) {
  const int64_t per_image = (pixels + kTile - 1) / kTile;
  at::parallel_for(0, batch * per_image, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile / per_image, p0 = tile % per_image * kTile;
      f(n, p0, std::min(pixels, p0 + kTile), tile);
    }
  });
}

// out = act(z) over one tile, z and out in any of the two layouts (out may be z itself).
template <Activation A, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void activation_tile(PlaneView<scalar_t> z, PlaneView<scalar_t> out, int64_t channels,
                                              int64_t n, int64_t p0, int64_t p1, at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* zc = z.at(n, c, 0);
    scalar_t* oc = out.at(n, c, 0);
#pragma omp simd
    for (int64_t p = p0; p < p1; ++p) {
      oc[p * out.pixel_stride] = static_cast<scalar_t>(activate<A>(static_cast<acc_t>(zc[p * z.pixel_stride]), slope));
    }
  }
}

// grad_z = grad_out * act'(saved) over one tile, and bias_partial[c] = sum of the tile's grad_z.
template <Activation A, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void act_backward_tile(PlaneView<const scalar_t> grad_out, PlaneView<const scalar_t> saved,
                                                PlaneView<scalar_t> grad_z, int64_t channels, int64_t n, int64_t p0,
                                                int64_t p1, at::opmath_type<scalar_t> slope,
                                                at::opmath_type<scalar_t>* bias_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* gc = grad_out.at(n, c, 0);
    const scalar_t* sc = saved.at(n, c, 0);
    scalar_t* zc = grad_z.at(n, c, 0);
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = p0; p < p1; ++p) {
      const acc_t g = static_cast<acc_t>(gc[p * grad_out.pixel_stride]) *
                      activation_derivative<A>(static_cast<acc_t>(sc[p * saved.pixel_stride]), slope);
      zc[p * grad_z.pixel_stride] = static_cast<scalar_t>(g);
      sum += g;
    }
    bias_partial[c] = sum;
  }
}

void check_conv_args(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK_VALUE(input.dim() == 4, "conv2d_act kernel: expected 4-D input, got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(weight.dim() == 4, "conv2d_act kernel: expected 4-D weight, got ", weight.dim(), "-D");
  TORCH_CHECK_VALUE(input.scalar_type() == weight.scalar_type(), "conv2d_act: input dtype ", input.scalar_type(),
                    " and weight dtype ", weight.scalar_type(), " differ");
  if (bias && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "conv2d_act: bias must have shape (",
                      weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == input.scalar_type(), "conv2d_act: bias dtype ", bias->scalar_type(),
                      " differs from input dtype ", input.scalar_type());
  }
}

std::tuple<Tensor, Tensor> conv2d_act_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                          IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                                          int64_t groups, c10::string_view activation, double negative_slope) {
  check_conv_args(input, weight, bias);
  const Activation act = parse_activation(activation);
  const MemoryFormat out_format = output_format(input, weight), format = compute_format(input, weight);
  const Tensor x = input.contiguous(format), w = weight.contiguous(format);
  const int64_t no_output_padding[2] = {0, 0};
  const Tensor empty = at::empty({0}, input.options());
  Tensor z = at::convolution(x, w, bias, stride, padding, dilation, false, no_output_padding, groups);
  if (act == Activation::None) return {z.contiguous(out_format), empty};
  z = z.contiguous(format);
  // backward needs z itself unless the derivative follows from the output
  const bool keep_preact = !derivative_from_output(act, negative_slope);
  if (keep_preact) z = z.contiguous(out_format);
  Tensor out = z.is_contiguous(out_format) && !keep_preact ? z : at::empty(z.sizes(), z.options(), out_format);
  const int64_t channels = z.size(1), pixels = z.size(2) * z.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "conv2d_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto zv = PlaneView<scalar_t>::of(z), ov = PlaneView<scalar_t>::of(out);
    dispatch_activation(act, [&](auto a) {
      for_each_tile(z.size(0), pixels, [&](int64_t n, int64_t p0, int64_t p1, int64_t) {
        activation_tile<decltype(a)::value, scalar_t>(zv, ov, channels, n, p0, p1, static_cast<acc_t>(negative_slope));
      });
    });
  });
  return {out, keep_preact ? z : empty};
}

std::tuple<Tensor, Tensor, Tensor> conv2d_act_backward_cpu(const Tensor& grad_output, const Tensor& saved,
                                                           const Tensor& input, const Tensor& weight,
                                                           IntArrayRef stride, IntArrayRef padding,
                                                           IntArrayRef dilation, int64_t groups,
                                                           c10::string_view activation, double negative_slope,
                                                           std::array<bool, 3> output_mask) {
  check_conv_args(input, weight, std::nullopt);
  const Activation act = parse_activation(activation);
  const MemoryFormat format = compute_format(input, weight);
  const Tensor x = input.contiguous(format), w = weight.contiguous(format);
  const int64_t no_output_padding[2] = {0, 0};
  const int64_t out_channels = weight.size(0);
  auto finish = [&](const Tensor& gi, const Tensor& gw, const Tensor& gb) -> std::tuple<Tensor, Tensor, Tensor> {
    return {output_mask[0] ? gi.contiguous(memory_format(input)) : at::empty({0}, input.options()),
            output_mask[1] ? gw.contiguous(memory_format(weight)) : at::empty({0}, weight.options()),
            output_mask[2] ? gb : at::empty({0}, weight.options())};
  };
  if (act == Activation::None) {  // nothing to fuse: ATen reduces the bias gradient itself
    const int64_t bias_size[1] = {out_channels};
    auto [gi, gw, gb] = at::convolution_backward(grad_output.contiguous(format), x, w, IntArrayRef(bias_size), stride,
                                                 padding, dilation, false, no_output_padding, groups, output_mask);
    return finish(gi, gw, gb);
  }
  Tensor grad_bias = at::empty({out_channels}, weight.options());
  const Tensor g = grad_output.contiguous(memory_format(grad_output));
  const Tensor s = saved.contiguous(memory_format(saved));
  TORCH_CHECK_VALUE(s.sizes() == g.sizes(), "conv2d_act_backward: saved ", s.sizes(), " and grad_output ", g.sizes(),
                    " differ");
  Tensor grad_z = at::empty(g.sizes(), g.options(), format);
  const int64_t batch = g.size(0), pixels = g.size(2) * g.size(3);
  const int64_t tiles = batch * ((pixels + kTile - 1) / kTile);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "conv2d_act_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partial(tiles * out_channels);
    const auto gv = PlaneView<const scalar_t>::of(g), sv = PlaneView<const scalar_t>::of(s);
    const auto zv = PlaneView<scalar_t>::of(grad_z);
    dispatch_activation(act, [&](auto a) {
      for_each_tile(batch, pixels, [&](int64_t n, int64_t p0, int64_t p1, int64_t tile) {
        act_backward_tile<decltype(a)::value, scalar_t>(gv, sv, zv, out_channels, n, p0, p1,
                                                        static_cast<acc_t>(negative_slope),
                                                        partial.data() + tile * out_channels);
      });
    });
    if (output_mask[2]) {
      scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < out_channels; ++c) {
        acc_t sum = 0;
        for (int64_t t = 0; t < tiles; ++t) sum += partial[t * out_channels + c];
        gb[c] = static_cast<scalar_t>(sum);
      }
    }
  });
  auto [gi, gw, unused] = at::convolution_backward(grad_z, x, w, std::nullopt, stride, padding, dilation, false,
                                                   no_output_padding, groups,
                                                   {output_mask[0], output_mask[1], false});
  return finish(gi, gw, grad_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  m.impl("conv2d_act", &conv2d_act_cpu);
  m.impl("conv2d_act_backward", &conv2d_act_backward_cpu);
}

}  // namespace segfast

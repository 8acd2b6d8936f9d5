// conv2d + bias + activation on CPU.
//
// The convolution core is ATen's (oneDNN for float32/bfloat16), which adds the bias inside its
// accumulator (one rounding, as F.conv2d). Ours is the single pass around it: the activation, in
// place, in forward (+ the change back to NCHW when the convolution ran channels_last); in
// backward, activation derivative x grad_output + the bias-gradient reduction (+ the change to
// channels_last when the weight gradient is computed that way).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "common/activation.h"
#include "common/conv2d_act.h"
#include "common/grads.h"
#include "common/layout.h"
#include "cpu/activation_pass.h"
#include "cpu/conv2d_act_direct.h"
#include "cpu/dispatch.h"
#include "cpu/output_cache.h"
#include "cpu/vec_math.h"

namespace segfast {
namespace {

using at::IntArrayRef;
using at::MemoryFormat;
using at::Tensor;

// Pixels per tile of the backward pass: long contiguous runs when every view is NCHW, else a
// tile of every channel that stays in L2. Fixed by the layouts (not by the thread count), so the
// bias-gradient sum always adds in the same order.
int64_t tile_pixels(bool nchw) {
  return nchw ? 4096 : 256;
}

// The key of this layer in the dispatch table (cpu/dispatch.h).
cpu::dispatch::ConvKey conv_key(const Tensor& input, const Tensor& weight, int64_t out_h, int64_t out_w,
                                bool input_grad) {
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t square_kernel = kh == kw ? kh : 0;
  const int64_t pixels = input.size(0) * out_h * out_w;
  return {input.scalar_type(), square_kernel, input.size(1), weight.size(0), pixels, input_grad};
}

// The format of the backward convolution: channels_last for an NCHW caller where the table says
// so (oneDNN computes the weight gradient of a layer with few input channels much faster
// channels_last; converting such an input is cheap, and the fused pass writes grad_z channels_last
// at no extra cost). The forward has its own choice (ChannelsLastForward, in conv2d_act_cpu).
MemoryFormat backward_format(const Tensor& input, const Tensor& weight, const cpu::dispatch::ConvKey& key) {
  const MemoryFormat out = conv_output_format(input, weight);
  if (out == MemoryFormat::Contiguous &&
      cpu::dispatch::choose(cpu::dispatch::Choice::ChannelsLastBackward, key) == cpu::dispatch::Path::Segfast) {
    return MemoryFormat::ChannelsLast;
  }
  return out;
}

// A 4-D NCHW or channels_last tensor seen as (N, C, P = H*W).
template <typename T>
struct PlaneView {
  T* data;
  int64_t batch_stride, channel_stride, pixel_stride;

  bool nchw() const { return pixel_stride == 1; }

  static PlaneView of(const Tensor& t) {
    TORCH_INTERNAL_ASSERT(t.stride(2) == t.size(3) * t.stride(3) || t.size(2) == 1);
    return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(3)};
  }
  T* at(int64_t n, int64_t c, int64_t p) const {
    return data + n * batch_stride + c * channel_stride + p * pixel_stride;
  }
};

int64_t tile_count(int64_t batch, int64_t pixels, int64_t tile) {
  return batch * ((pixels + tile - 1) / tile);
}

// Calls f(n, p0, p1, tile_index) over pixel tiles of `tile` pixels of every image, in parallel.
template <typename F>
void for_each_pixel_block(int64_t batch, int64_t pixels, int64_t tile, F&& f) {
  const int64_t per_image = (pixels + tile - 1) / tile;
  at::parallel_for(0, batch * per_image, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / per_image, p0 = t % per_image * tile;
      f(n, p0, std::min(pixels, p0 + tile), t);
    }
  });
}

// The layouts of one backward pass, known at compile time so that its loops vectorise.
enum class PassLayout {
  NCHW,        // grad_output, saved and grad_z all NCHW
  NCHWToNHWC,  // NCHW in, channels_last grad_z (the channels_last weight-gradient path)
  Strided,     // anything else (channels_last callers): strides read at run time
};

// grad_z = grad_out * act'(saved) over one tile, and bias_partial[c] = sum of the tile's grad_z.
// Except for NCHW, the tile goes through `scratch` (channels x kScratchStride, cpu/activation_pass.h):
// computed channel by channel, then stored pixel by pixel, so both sides stay within L1.
using cpu::kScratchStride;
using cpu::kSubTile;

template <Activation A, PassLayout L, typename scalar_t>
SEGFAST_CPU_MULTIVERSION void act_backward_tile(PlaneView<const scalar_t> grad_out, PlaneView<const scalar_t> saved,
                                                PlaneView<scalar_t> grad_z, int64_t channels, int64_t n, int64_t p0,
                                                int64_t p1, at::opmath_type<scalar_t> slope,
                                                at::opmath_type<scalar_t>* bias_partial,
                                                at::opmath_type<scalar_t>* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kInPlace = L == PassLayout::NCHW;
  const int64_t gs = L == PassLayout::Strided ? grad_out.pixel_stride : 1;
  const int64_t ss = L == PassLayout::Strided ? saved.pixel_stride : 1;
  const int64_t zc_stride = L == PassLayout::Strided ? grad_z.channel_stride : 1;
  for (int64_t c = 0; c < channels; ++c) bias_partial[c] = 0;
  for (int64_t q0 = p0; q0 < p1; q0 += kInPlace ? p1 - p0 : kSubTile) {
    const int64_t q1 = kInPlace ? p1 : std::min(p1, q0 + kSubTile);
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* gc = grad_out.at(n, c, 0);
      const scalar_t* sc = saved.at(n, c, 0);
      scalar_t* zc = grad_z.at(n, c, 0);
      acc_t* tc = scratch + c * kScratchStride - q0;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t p = q0; p < q1; ++p) {
        const acc_t g = cpu::widen<acc_t>(gc[p * gs]) * activation_derivative<A>(cpu::widen<acc_t>(sc[p * ss]), slope);
        if constexpr (kInPlace) {
          zc[p] = cpu::narrow<scalar_t>(g);
        } else {
          tc[p] = g;
        }
        sum += g;
      }
      bias_partial[c] += sum;
    }
    if constexpr (!kInPlace) {
      for (int64_t p = q0; p < q1; ++p) {
        scalar_t* zp = grad_z.at(n, 0, p);
        const acc_t* tp = scratch + p - q0;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) zp[c * zc_stride] = cpu::narrow<scalar_t>(tp[c * kScratchStride]);
      }
    }
  }
}

template <typename F>
void dispatch_pass_layout(PassLayout layout, F&& f) {
  switch (layout) {
    case PassLayout::NCHW:
      return f(std::integral_constant<PassLayout, PassLayout::NCHW>{});
    case PassLayout::NCHWToNHWC:
      return f(std::integral_constant<PassLayout, PassLayout::NCHWToNHWC>{});
    case PassLayout::Strided:
      return f(std::integral_constant<PassLayout, PassLayout::Strided>{});
  }
}

// segfast's direct kernel serves NCHW callers of the shapes cpu::direct::eligible accepts, where
// the dispatch table says it is faster than oneDNN.
bool uses_direct_kernel(cpu::dispatch::Choice choice, const cpu::dispatch::ConvKey& key, const Tensor& input,
                        const Tensor& weight, IntArrayRef stride, IntArrayRef dilation, int64_t groups) {
  return conv_output_format(input, weight) == MemoryFormat::Contiguous &&
         cpu::direct::eligible(input, weight, stride, dilation, groups) &&
         cpu::dispatch::choose(choice, key) == cpu::dispatch::Path::Segfast;
}

std::tuple<Tensor, Tensor> conv2d_act_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                          IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                                          c10::string_view activation, double negative_slope) {
  check_conv_args(input, weight, bias, stride, padding, dilation, groups, negative_slope);
  const Activation act = parse_activation(activation);
  const MemoryFormat format = conv_output_format(input, weight);
  const Tensor empty = at::empty({0}, input.options());
  // backward needs z itself unless the derivative follows from the output
  const bool keep_preact = act != Activation::None && !derivative_from_output(act, negative_slope);
  auto out_size = [&](int d) {
    return (input.size(d + 2) + 2 * padding[d] - dilation[d] * (weight.size(d + 2) - 1) - 1) / stride[d] + 1;
  };
  const cpu::dispatch::ConvKey key = conv_key(input, weight, out_size(0), out_size(1), false);
  if (act != Activation::None &&
      uses_direct_kernel(cpu::dispatch::Choice::DirectConvForward, key, input, weight, stride, dilation, groups)) {
    const cpu::direct::DirectShape d = cpu::direct::direct_shape(input, weight, padding);
    Tensor out = at::empty({d.batch, d.out_channels, d.out_h, d.out_w}, input.options());
    Tensor preact = keep_preact ? at::empty_like(out) : Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "conv2d_act_direct", [&] {
      dispatch_activation(act, [&](auto a) {
        cpu::direct::forward<decltype(a)::value, scalar_t>(input, weight, bias, d, out, preact, negative_slope);
      });
    });
    return {out, keep_preact ? preact : empty};
  }
  if (act != Activation::None && format == MemoryFormat::Contiguous &&
      cpu::dispatch::choose(cpu::dispatch::Choice::ChannelsLastForward, key) == cpu::dispatch::Path::Segfast) {
    // an NCHW caller, run channels_last where the table says it is faster: the pre-activation
    // (kept for backward where needed) stays channels_last, the output comes out NCHW. The input's
    // channels_last copy and the output come from the output cache when large: fresh pages there
    // cost about as much as the layout change saves.
    const Tensor input_cl = cpu::empty_cached(input.sizes(), input.options(), MemoryFormat::ChannelsLast).copy_(input);
    const Tensor z =
        vendor_conv2d(input_cl, weight, bias, stride, padding, dilation, groups, MemoryFormat::ChannelsLast);
    Tensor out = cpu::empty_cached(z.sizes(), z.options());
    cpu::apply_activation_to_nchw(z, out, act, negative_slope);
    return {out, keep_preact ? z : empty};
  }
  Tensor z = vendor_conv2d(input, weight, bias, stride, padding, dilation, groups, format);
  if (act == Activation::None) return {z, empty};
  Tensor out = keep_preact ? at::empty_like(z) : z;
  cpu::apply_activation(z, out, act, negative_slope);
  return {out, keep_preact ? z : empty};
}

ConvActGrads conv2d_act_backward_cpu(const Tensor& grad_output, const Tensor& saved, const Tensor& input,
                                     const Tensor& weight, IntArrayRef stride, IntArrayRef padding,
                                     IntArrayRef dilation, int64_t groups, c10::string_view activation,
                                     double negative_slope, std::array<bool, 3> output_mask) {
  check_conv_backward_args(grad_output, saved, input, weight, stride, padding, dilation, groups, negative_slope);
  const Activation act = parse_activation(activation);
  const cpu::dispatch::ConvKey key = conv_key(input, weight, grad_output.size(2), grad_output.size(3), output_mask[0]);
  const MemoryFormat format = backward_format(input, weight, key);
  const int64_t no_output_padding[2] = {0, 0};
  const int64_t out_channels = weight.size(0);
  auto finish = [&](const Tensor& gi, const Tensor& gw, const Tensor& gb) {
    return masked_grads(output_mask, input, weight, [&] { return gi; }, [&] { return gw; }, [&] { return gb; });
  };
  const MemoryFormat caller = conv_output_format(input, weight);
  if (act == Activation::None && memory_format(grad_output) == caller) {
    // nothing to fuse: ATen reduces the bias gradient itself, in the caller's layout (with no fused
    // pass to absorb it, the channels_last change costs more in copies than it saves; measured in a
    // UNet step on the dev machine: 32 ms of copies per 5 steps vs 6 ms). A grad_output in the other
    // layout (a channels_last model's logits made NCHW) goes through the pass below instead: its
    // layout change and the bias gradient in one pass, where ATen's copy to channels_last is slow.
    const int64_t bias_size[1] = {out_channels};
    auto [gi, gw, gb] = at::convolution_backward(grad_output.contiguous(caller), input.contiguous(caller),
                                                 weight.contiguous(caller), IntArrayRef(bias_size), stride, padding,
                                                 dilation, false, no_output_padding, groups, output_mask);
    return finish(gi, gw, gb);
  }
  Tensor grad_bias = at::empty({out_channels}, weight.options());
  // without an activation the derivative is 1 and the pass reads grad_output in saved's place
  const Tensor& saved_or_grad = act == Activation::None ? grad_output : saved;
  if (!output_mask[0] && act != Activation::None &&
      uses_direct_kernel(cpu::dispatch::Choice::DirectConvWeightGrad, key, input, weight, stride, dilation, groups)) {
    const cpu::direct::DirectShape d = cpu::direct::direct_shape(input, weight, padding);
    const Tensor g = grad_output.contiguous(), s = saved.contiguous();
    TORCH_CHECK_VALUE(s.sizes() == g.sizes() && g.size(2) == d.out_h && g.size(3) == d.out_w,
                      "conv2d_act_backward: saved ", s.sizes(), " and grad_output ", g.sizes(), " differ");
    Tensor grad_weight = at::empty(weight.sizes(), weight.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "conv2d_act_direct_backward", [&] {
      dispatch_activation(act, [&](auto a) {
        cpu::direct::backward<decltype(a)::value, scalar_t>(g, s, input, d, grad_weight, grad_bias, negative_slope);
      });
    });
    return finish(Tensor(), grad_weight, grad_bias);
  }
  const Tensor g = grad_output.contiguous(memory_format(grad_output));
  const Tensor s = saved_or_grad.contiguous(memory_format(saved_or_grad));
  TORCH_CHECK_VALUE(s.sizes() == g.sizes(), "conv2d_act_backward: saved ", s.sizes(), " and grad_output ", g.sizes(),
                    " differ");
  Tensor grad_z = at::empty(g.sizes(), g.options(), format);
  const int64_t batch = g.size(0), pixels = g.size(2) * g.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "conv2d_act_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto gv = PlaneView<const scalar_t>::of(g), sv = PlaneView<const scalar_t>::of(s);
    const auto zv = PlaneView<scalar_t>::of(grad_z);
    const bool nchw_in = gv.nchw() && sv.nchw();
    const PassLayout layout = nchw_in && zv.nchw()                ? PassLayout::NCHW
                              : nchw_in && zv.channel_stride == 1 ? PassLayout::NCHWToNHWC
                                                                  : PassLayout::Strided;
    const int64_t tile = tile_pixels(layout == PassLayout::NCHW), tiles = tile_count(batch, pixels, tile);
    std::vector<acc_t> partial(tiles * out_channels);
    dispatch_activation(act, [&](auto a) {
      dispatch_pass_layout(layout, [&](auto l) {
        for_each_pixel_block(batch, pixels, tile, [&](int64_t n, int64_t p0, int64_t p1, int64_t t) {
          thread_local std::vector<acc_t> scratch;
          scratch.resize(out_channels * kScratchStride);
          act_backward_tile<decltype(a)::value, decltype(l)::value, scalar_t>(
              gv, sv, zv, out_channels, n, p0, p1, static_cast<acc_t>(negative_slope),
              partial.data() + t * out_channels, scratch.data());
        });
      });
    });
    if (output_mask[2]) cpu::sum_block_partials(partial, out_channels, grad_bias.mutable_data_ptr<scalar_t>());
  });
  auto [gi, gw, unused] = at::convolution_backward(grad_z, input.contiguous(format), weight.contiguous(format),
                                                   std::nullopt, stride, padding, dilation, false, no_output_padding,
                                                   groups, {output_mask[0], output_mask[1], false});
  return finish(gi, gw, grad_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  m.impl("conv2d_act", &conv2d_act_cpu);
  m.impl("conv2d_act_backward", &conv2d_act_backward_cpu);
}

}  // namespace segfast

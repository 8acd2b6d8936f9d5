#pragma once
// segfast's own convolution for conv2d_act on CUDA: implicit GEMM on tensor cores (fp16/bf16 in,
// fp32 accumulate) for channels_last, stride 1, dilation 1, groups 1, 1x1 and 3x3 kernels, with
// bias + activation applied in the epilogue before the single store.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common/activation.h"

namespace segfast::cuda::igemm {

// Whether the kernel can compute this convolution at all.
bool eligible(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
              at::IntArrayRef dilation, int64_t groups, at::MemoryFormat format);

// Whether conv2d_act uses it: an eligible shape that a GPU benchmark showed faster than cuDNN
// (the table in conv2d_act_igemm.cu), or any eligible shape when SEGFAST_CUDA_CONV=igemm.
bool chosen(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
            at::IntArrayRef dilation, int64_t groups, at::MemoryFormat format);

// (output, pre-activation); the pre-activation is written only when keep_preact.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, at::IntArrayRef padding,
                                           Activation act, double negative_slope, bool keep_preact);

}  // namespace segfast::cuda::igemm

#pragma once
#include <ATen/core/Tensor.h>

namespace segfast {

// The layout segfast's kernels keep, torch's rule (Tensor::suggest_memory_format): channels_last
// for a 4-D tensor whose strides order like NHWC, else contiguous. segfast/ops/_common.py:
// memory_format is the same rule for the fake kernels.
inline at::MemoryFormat memory_format(const at::Tensor& t) {
  return t.dim() == 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

inline at::MemoryFormat format_for(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Kernels that read a tensor in place through its strides, and give their output the same strides
// (empty_like), need it dense: an expanded or gapped view is copied first.
inline at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

// The memory format F.conv2d gives its output: channels_last when input or weight is.
inline at::MemoryFormat conv_output_format(const at::Tensor& input, const at::Tensor& weight) {
  return format_for(memory_format(input) == at::MemoryFormat::ChannelsLast ||
                    memory_format(weight) == at::MemoryFormat::ChannelsLast);
}

}  // namespace segfast

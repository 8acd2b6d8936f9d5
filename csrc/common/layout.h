#pragma once
#include <ATen/core/Tensor.h>

namespace segfast {

// The layout segfast's kernels keep: channels_last for a 4-D tensor stored NHWC (and not also
// NCHW-contiguous), else contiguous. segfast/ops/_common.py:memory_format is the same rule for
// the fake kernels.
inline at::MemoryFormat memory_format(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

}  // namespace segfast

// Autograd of conv2d_act (csrc/autograd/fused_act.h), registered for the Autograd key.
#include <torch/library.h>

#include "autograd/fused_act.h"

namespace segfast {
namespace {

struct Conv2dActNames {
  static constexpr const char forward[] = "segfast::conv2d_act";
  static constexpr const char backward[] = "segfast::conv2d_act_backward";
};

// stride, padding, dilation, groups
using Conv2dActAutograd = FusedAct<Conv2dActNames, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t>;

}  // namespace

TORCH_LIBRARY_IMPL(segfast, Autograd, m) {
  m.impl("conv2d_act", Conv2dActAutograd::kernel);
}

}  // namespace segfast

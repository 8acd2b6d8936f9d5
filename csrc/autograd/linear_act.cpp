// Autograd of linear_act (csrc/autograd/fused_act.h), registered for the Autograd key.
#include <torch/library.h>

#include "autograd/fused_act.h"

namespace segfast {
namespace {

struct LinearActNames {
  static constexpr const char forward[] = "segfast::linear_act";
  static constexpr const char backward[] = "segfast::linear_act_backward";
};

using LinearActAutograd = FusedAct<LinearActNames>;

}  // namespace

TORCH_LIBRARY_IMPL(segfast, Autograd, m) {
  m.impl("linear_act", LinearActAutograd::kernel);
}

}  // namespace segfast

// linear + bias + activation on CPU: the shared body (common/linear_act.h) with the CPU passes.
#include <torch/library.h>

#include "common/linear_act.h"
#include "cpu/activation_pass.h"

namespace segfast {
namespace {

struct CpuPasses {
  static void activation(const at::Tensor& z, const at::Tensor& out, Activation act, double negative_slope) {
    cpu::apply_activation(z, out, act, negative_slope);
  }
  static at::Tensor backward_rows(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& grad_z,
                                  Activation act, double negative_slope) {
    return cpu::activation_backward_rows(grad, saved, grad_z, act, negative_slope);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(segfast, CPU, m) {
  m.impl("linear_act", &LinearAct<CpuPasses>::forward);
  m.impl("linear_act_backward", &LinearAct<CpuPasses>::backward);
}

}  // namespace segfast

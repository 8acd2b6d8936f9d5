// linear + bias + activation on CUDA: the shared body (common/linear_act.h, cuBLAS through addmm)
// with the CUDA passes (a (rows, features) matrix: channel = feature, innermost).
#include <torch/library.h>

#include "common/linear_act.h"
#include "cuda/activation_pass.cuh"
#include "cuda/launch.cuh"

namespace segfast {
namespace {

struct CudaPasses {
  static void activation(const at::Tensor& z, const at::Tensor& out, Activation act, double negative_slope) {
    cuda::bias_activation(z, std::nullopt, out, z.size(1), 1, act, negative_slope);
  }
  static at::Tensor backward_rows(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& grad_z,
                                  Activation act, double negative_slope) {
    return cuda::activation_backward(grad, saved, grad_z, grad.size(1), 1, act, negative_slope);
  }
};

}  // namespace

SEGFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("linear_act", &LinearAct<CudaPasses>::forward);
  m.impl("linear_act_backward", &LinearAct<CudaPasses>::backward);
}

}  // namespace segfast

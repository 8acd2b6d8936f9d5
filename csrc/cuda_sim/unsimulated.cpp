// What the simulation leaves out: the tensor-core implicit GEMM (csrc/cuda/conv2d_act_igemm.cu),
// whose WMMA fragments have no host definition here. conv2d_act takes its vendor path instead, as
// it does on a GPU for every shape outside the igemm table.
#include "cuda/conv2d_act_igemm.cuh"

#include <c10/util/Exception.h>

namespace segfast::cuda::igemm {

bool eligible(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
              at::MemoryFormat) {
  return false;
}

bool chosen(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
            at::MemoryFormat) {
  return false;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           at::IntArrayRef, Activation, double, bool) {
  TORCH_CHECK(false, "cuda-sim: the implicit-GEMM convolution is not simulated");
}

}  // namespace segfast::cuda::igemm

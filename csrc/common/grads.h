#pragma once
// What a fused op's backward returns for (input, weight, bias), on every backend.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <array>
#include <tuple>

#include "common/layout.h"

namespace segfast {

// (grad_input, grad_weight, grad_bias), each computed (by calling its function) only where
// output_mask asks for it and an empty tensor in its place otherwise; the input and weight
// gradients in their tensor's layout.
template <typename GradInput, typename GradWeight, typename GradBias>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_grads(std::array<bool, 3> output_mask, const at::Tensor& input,
                                                            const at::Tensor& weight, GradInput&& grad_input,
                                                            GradWeight&& grad_weight, GradBias&& grad_bias) {
  return {output_mask[0] ? grad_input().contiguous(memory_format(input)) : at::empty({0}, input.options()),
          output_mask[1] ? grad_weight().contiguous(memory_format(weight)) : at::empty({0}, weight.options()),
          output_mask[2] ? grad_bias() : at::empty({0}, weight.options())};
}

}  // namespace segfast

#pragma once
// Every tensor argument of a kernel on one device. A CUDA kernel handed a CPU pointer (or another
// GPU's) reads foreign memory and ends the CUDA context, and the dispatcher sends a call to the CUDA
// kernel as soon as one argument is on a GPU: a direct torch.ops.segfast.* call with mixed devices
// is refused here instead, as a ValueError naming the argument.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>

namespace segfast {

struct NamedTensor {
  const char* name;
  const at::Tensor* tensor;  // null: an optional argument that was not given
};

inline NamedTensor named(const char* name, const at::Tensor& t) {
  return {name, &t};
}
inline NamedTensor named(const char* name, const std::optional<at::Tensor>& t) {
  return {name, t && t->defined() ? &*t : nullptr};
}

// The first tensor's device is the reference.
inline void check_same_device(const char* op, std::initializer_list<NamedTensor> args) {
  const NamedTensor& first = *args.begin();
  for (const NamedTensor& a : args) {
    if (a.tensor == nullptr || !a.tensor->defined()) continue;
    TORCH_CHECK_VALUE(a.tensor->device() == first.tensor->device(), op, ": ", a.name, " is on ", a.tensor->device(),
                      " but ", first.name, " is on ", first.tensor->device());
  }
}

}  // namespace segfast

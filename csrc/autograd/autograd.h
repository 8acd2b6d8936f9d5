#pragma once
// Dispatcher helpers: what the C++ autograd kernels (csrc/autograd/<family>.cpp, Autograd key), the
// composite ops and the typed pybind11 entries (csrc/bindings.cpp) share to call registered ops.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace segfast {

// The registered op `name` ("segfast::<op>") with the C++ signature of its schema, found once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The owning type of an op argument type, for whoever keeps arguments past the call (an autograd
// context) or takes them from Python (pybind11 cannot hold non-owning types).
template <typename T>
struct Owned {
  using type = T;
};
template <>
struct Owned<at::IntArrayRef> {
  using type = std::vector<int64_t>;
};
template <>
struct Owned<c10::string_view> {
  using type = std::string;
};
template <>
struct Owned<const std::optional<at::Tensor>&> {
  using type = std::optional<at::Tensor>;
};

// The Autograd kernel's path when no input needs a gradient: the op below autograd, without the
// Function's bookkeeping (a third of a tiny call's cost).
template <typename Signature, typename... Args>
decltype(auto) call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

}  // namespace segfast

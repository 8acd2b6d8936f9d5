#pragma once
// What the C++ autograd kernels (csrc/autograd/<family>.cpp, registered for the Autograd key) share:
// typed handles of the ops they call below autograd.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <utility>

namespace segfast {

// The registered op `name` ("segfast::<op>") with the C++ signature of its schema, found once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The Autograd kernel's path when no input needs a gradient: the op below autograd, without the
// Function's bookkeeping (a third of a tiny call's cost).
template <typename Signature, typename... Args>
decltype(auto) call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

}  // namespace segfast

#pragma once
// What the C++ autograd kernels (csrc/autograd/<family>.cpp, registered for the Autograd key) share:
// typed handles of the ops they call below autograd.
#include <ATen/core/dispatch/Dispatcher.h>

namespace segfast {

// The registered op `name` ("segfast::<op>") with the C++ signature of its schema, found once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace segfast

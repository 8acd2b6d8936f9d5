#pragma once
// Class-index tensors (targets, predictions) come as int64, int32 or uint8.
#include <cstdint>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace segfast {

// Calls f(index_t{}) for the dtype of a class-index tensor; `what` names it in the error.
template <typename F>
void dispatch_class_index(c10::ScalarType type, const char* what, F&& f) {
  switch (type) {
    case c10::kLong:
      return f(int64_t{});
    case c10::kInt:
      return f(int32_t{});
    case c10::kByte:
      return f(uint8_t{});
    default:
      TORCH_CHECK_VALUE(false, what, " must be int64, int32 or uint8, got ", type);
  }
}

}  // namespace segfast

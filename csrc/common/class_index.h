#pragma once
// Class-index tensors (targets, predictions, max-pool argmax codes) come as int64, int32 or uint8;
// a class index outside [0, classes) that is not ignore_index is an IndexError with one message on
// every backend.
#include <cstdint>
#include <optional>
#include <utility>

#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

namespace segfast {

// Whether `type` is one of the class-index dtypes dispatch_class_index takes.
inline bool is_class_index_type(c10::ScalarType type) {
  return type == c10::kLong || type == c10::kInt || type == c10::kByte;
}

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

// The IndexError for class `cls` of pixel `pixel` of image `n`; `what` names the tensor ("target
// class", "predicted class").
inline void raise_bad_class_index(const char* op, const char* what, int64_t cls, int64_t n, int64_t pixel,
                                  int64_t classes, std::optional<int64_t> ignore_index) {
  if (ignore_index) {
    TORCH_CHECK_INDEX(false, op, ": ", what, " ", cls, " at (n=", n, ", pixel=", pixel, ") is outside [0, ", classes,
                      ") and is not ignore_index (", *ignore_index, ")");
  }
  TORCH_CHECK_INDEX(false, op, ": ", what, " ", cls, " at (n=", n, ", pixel=", pixel, ") is outside [0, ", classes,
                    ")");
}

// A target class must be ignore_index or in [0, classes).
inline void check_class_index(const char* op, int64_t cls, int64_t n, int64_t pixel, int64_t classes,
                              int64_t ignore_index) {
  if (C10_UNLIKELY(cls != ignore_index && (cls < 0 || cls >= classes))) {
    raise_bad_class_index(op, "target class", cls, n, pixel, classes, ignore_index);
  }
}

}  // namespace segfast

#pragma once
// A loss's reduction argument, parsed once for every backend.
#include <string_view>

#include <c10/util/Exception.h>

namespace segfast {

enum class Reduction { None, Mean, Sum };

inline Reduction parse_reduction(std::string_view name) {
  if (name == "none") return Reduction::None;
  if (name == "mean") return Reduction::Mean;
  TORCH_CHECK_VALUE(name == "sum", "reduction must be one of none, mean, sum; got '", name, "'");
  return Reduction::Sum;
}

}  // namespace segfast

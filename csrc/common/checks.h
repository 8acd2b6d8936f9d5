#pragma once
// Argument checks every op's kernels share (CPU and CUDA alike), raising the Python exception types
// the faces document: TypeError for a dtype, ValueError for a value. Messages name the op and the
// argument, and say what was expected and what came.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <sstream>
#include <string>

#include "common/devices.h"

namespace segfast {

// "float32", as torch spells a dtype's name without "torch."
inline std::string dtype_name(at::ScalarType t) {
  return std::string(c10::getDtypeNames(t).first);
}

// The floating dtypes the kernels compute in: float32, float64, bfloat16, and float16 on CUDA.
inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto type = t.scalar_type();
  const bool half_ok = t.is_cuda() || t.is_meta();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kBFloat16 || (half_ok && type == at::kHalf),
                   op, ": ", name, " dtype must be one of float32, float64, bfloat16", half_ok ? ", float16" : "",
                   ", got ", dtype_name(type));
}

// Every tensor in `others` (null: an optional one not given) has the reference's dtype and device.
inline void check_same_dtype_and_device(const char* op, NamedTensor reference,
                                        std::initializer_list<NamedTensor> others) {
  const at::Tensor& ref = *reference.tensor;
  for (const NamedTensor& a : others) {
    if (a.tensor == nullptr || !a.tensor->defined()) continue;
    TORCH_CHECK_VALUE(a.tensor->device() == ref.device(), op, ": ", a.name, " is on ", a.tensor->device(), " but ",
                      reference.name, " is on ", ref.device());
    TORCH_CHECK_TYPE(a.tensor->scalar_type() == ref.scalar_type(), op, ": ", a.name, " dtype torch.",
                     dtype_name(a.tensor->scalar_type()), " differs from ", reference.name, " dtype torch.",
                     dtype_name(ref.scalar_type()));
  }
}

inline void check_dims(const char* op, const char* name, const at::Tensor& t, int64_t dims) {
  TORCH_CHECK_VALUE(t.dim() == dims, op, ": ", name, " must be ", dims, "-D, got ", t.dim(), "-D with shape ",
                    t.sizes());
}

// A shape as Python writes a tuple: "()", "(4,)", "(2, 3)" (the faces' messages quote shapes so).
inline std::string shape_str(c10::SymIntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i > 0 ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

inline void check_finite(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value), op, ": ", name, " must be a finite float, got ", value);
}

}  // namespace segfast

#pragma once
// Sums over per-tile or per-block partials, added in a fixed order (tile or block order), in
// double: the same bits whatever the thread count that produced the partials.
#include <cstdint>
#include <vector>

namespace segfast::cpu {

template <typename T>
double sum_in_order(const T* values, int64_t count) {
  double total = 0;
  for (int64_t i = 0; i < count; ++i) total += values[i];
  return total;
}

inline double sum_in_order(const std::vector<double>& values) {
  return sum_in_order(values.data(), static_cast<int64_t>(values.size()));
}

// out[i] = sum over blocks b of partial[b * width + i], added block by block.
template <typename acc_t, typename out_t>
void sum_block_partials(const std::vector<acc_t>& partial, int64_t width, out_t* out) {
  const int64_t blocks = width == 0 ? 0 : static_cast<int64_t>(partial.size()) / width;
  for (int64_t i = 0; i < width; ++i) {
    acc_t total = 0;
    for (int64_t b = 0; b < blocks; ++b) total += partial[b * width + i];
    out[i] = static_cast<out_t>(total);
  }
}

}  // namespace segfast::cpu

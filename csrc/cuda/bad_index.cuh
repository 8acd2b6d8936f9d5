#pragma once
// A bad class index found on the device becomes a Python IndexError on the host: kernels record the
// first bad pixel with atomicMin, and one device-to-host read after the kernel raises (a device-side
// assert would end the CUDA context instead). That read waits for the stream, and a CUDA graph
// capture cannot contain it: while the stream is capturing, the flag is not read, and what marks
// bad input is the result itself (the losses' kernels make it NaN, confusion_matrix is filled with
// -1), in every replay of the graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common/class_index.h"
#include "cuda/launch.cuh"

namespace segfast::cuda {

__device__ inline void flag_bad_pixel(unsigned long long* first, int64_t pixel) {
  atomicMin(first, static_cast<unsigned long long>(pixel));
}

class BadPixel {
 public:
  // -1 (all bits set) is above every pixel index for atomicMin: "no bad pixel"
  explicit BadPixel(const at::Tensor& like) : first_(at::full({}, int64_t{-1}, like.options().dtype(at::kLong))) {}

  unsigned long long* flag() { return reinterpret_cast<unsigned long long*>(first_.mutable_data_ptr<int64_t>()); }

  // the first bad pixel (n * pixels + s), or -1; synchronises with the stream, so never call it
  // while capturing
  int64_t first() const { return first_.item<int64_t>(); }

  // the flag, which the host may read: false inside a CUDA graph capture
  static bool readable() { return !stream_is_capturing(); }

  // IndexError for a bad target class at the first flagged pixel; returns that pixel (its target
  // class good: a caller checking more than the target looks there) or -1, also while capturing
  int64_t raise_if_any(const at::Tensor& target, int64_t pixels, int64_t classes, int64_t ignore_index,
                       const char* op) const {
    if (!readable()) return -1;
    const int64_t bad = first();
    if (bad == -1) return -1;
    const int64_t n = bad / pixels, s = bad % pixels;
    check_class_index(op, target[n][s].item<int64_t>(), n, s, classes, ignore_index);
    return bad;
  }

 private:
  at::Tensor first_;
};

}  // namespace segfast::cuda

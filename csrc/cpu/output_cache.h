#pragma once
// Large CPU outputs from a small cache of freed blocks.
//
// A fresh output above glibc's mmap threshold (32 MiB at most) is new memory on every call, and
// first touching it costs a page fault per 4 KiB: 12 ms for a 42 MiB cross-entropy gradient on the
// dev machine, more than computing it. segfast's large outputs (augmented batches, logits- and
// activation-sized gradients) are allocated here instead: a freed block goes back to a cache and
// the next output of the same size reuses it, already mapped, as torch's CUDA caching allocator
// does on the GPU. The cache holds at most SEGFAST_CPU_CACHE_MB (default 512) MiB of freed blocks
// (0 turns it off). The tensors are ordinary except that their storage cannot grow (resize_ to a
// larger size raises, as for tensors from torch.from_numpy).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <pthread.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace segfast::cpu {

constexpr int64_t kCachedMinBytes = int64_t{8} << 20;  // below it glibc reuses memory by itself
constexpr int64_t kBlockAlign = int64_t{2} << 20;

class OutputCache {
 public:
  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may outlive statics
    return *cache;
  }

  void* take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* block = it->second;
        free_.erase(it);
        cached_bytes_ -= bytes;
        return block;
      }
    }
    void* block = std::aligned_alloc(kBlockAlign, bytes);
    TORCH_CHECK(block != nullptr, "segfast: out of memory allocating ", bytes, " bytes");
    return block;
  }

  void give(void* block, int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= limit_bytes_) {
        free_.emplace(bytes, block);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(block);
  }

 private:
  OutputCache() {
    const char* mb = std::getenv("SEGFAST_CPU_CACHE_MB");
    limit_bytes_ = (mb != nullptr ? std::atoll(mb) : 512) << 20;
    // a fork (DataLoader workers) while another thread holds the mutex would leave it locked in
    // the child: hold it across fork, release it on both sides
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
  }

  std::mutex mutex_;
  std::multimap<int64_t, void*> free_;  // block size -> block
  int64_t cached_bytes_ = 0, limit_bytes_ = 0;
};

// A CPU tensor from the cache with layout's sizes and strides (layout: a meta tensor).
inline at::Tensor from_cache(const at::Tensor& layout, const at::TensorOptions& options) {
  const int64_t bytes = layout.numel() * layout.element_size();
  const int64_t rounded = (bytes + kBlockAlign - 1) / kBlockAlign * kBlockAlign;
  void* block = OutputCache::instance().take(rounded);
  return at::from_blob(
      block, layout.sizes(), layout.strides(), [rounded](void* p) { OutputCache::instance().give(p, rounded); },
      options);
}

// at::empty, from the cache when it is large (the meta tensor that gives the strides only then)
inline at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options,
                               at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  if (c10::multiply_integers(sizes) * options.dtype().itemsize() < kCachedMinBytes) {
    return at::empty(sizes, options, format);
  }
  return from_cache(at::empty(sizes, options.device(at::kMeta), format), options);
}

// like at::empty_like(t): the same strides when t is dense
inline at::Tensor empty_like_cached(const at::Tensor& t) {
  if (t.numel() * t.element_size() < kCachedMinBytes) return at::empty_like(t);
  return from_cache(at::empty_like(t, t.options().device(at::kMeta)), t.options());
}

}  // namespace segfast::cpu

// tessera/core/device.hpp — devices are types, and each device knows how to hold memory.
//
// `Tensor<float, Cpu>` and `Tensor<float, Cuda>` are different types, so a kernel can never
// be handed memory it cannot touch, and there is no run-time dispatch on hot paths.
// Cuda memory needs the CUDA runtime: a program that uses it must link `tessera::cuda`
// (which defines TESSERA_WITH_CUDA). Without it, using Cuda memory is a compile error
// with a message that says so, never a link error.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <type_traits>
#include <unordered_map>

#include "tessera/core/error.hpp"

#if defined(TESSERA_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace tessera {

struct Cpu {
  static constexpr const char* name = "cpu";
};
struct Cuda {
  static constexpr const char* name = "cuda";
};

template <class D>
concept DeviceTag = std::same_as<D, Cpu> || std::same_as<D, Cuda>;

// Every owning tensor is 64-byte aligned: one cache line, and the widest (AVX-512) load.
inline constexpr std::size_t kTensorAlignment = 64;

namespace detail {
template <class...>
inline constexpr bool always_false = false;

#if defined(TESSERA_WITH_CUDA)
inline void cuda_check(cudaError_t status, const char* what) {
  TESSERA_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}
#endif
}  // namespace detail

template <DeviceTag D>
struct DeviceMemory;

namespace detail {
// Large CPU buffers are kept for reuse instead of being returned to the OS.
//
// Why: a fresh multi-megabyte buffer from malloc is fresh pages from the kernel, and the
// first touch of each 4 KiB page is a page fault. On the machines we measured, zero-filling a
// fresh 128 MiB buffer costs ~150 ms, more than a softmax over it. A training or serving loop
// allocates the same shapes every step, so an exact-size cache turns those faults into a
// list lookup. Only blocks of at least kMinCachedBytes are cached, up to kMaxCachedBytes in
// all (environment TESSERA_CPU_CACHE_MB overrides; 0 disables). Small blocks go straight to
// malloc, which already recycles them well.
class LargeBlockCache {
 public:
  static constexpr std::size_t kMinCachedBytes = std::size_t{1} << 20;

  static LargeBlockCache& instance() {
    static LargeBlockCache cache;
    return cache;
  }

  void* take(std::size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    cached_bytes_ -= bytes;
    return p;
  }

  // Keeps the block when it fits in the budget; otherwise frees it.
  void give(void* p, std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= limit_) {
        free_.emplace(bytes, p);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  // Frees every cached block (for memory-tight phases, and for tests).
  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, p] : free_) std::free(p);
    free_.clear();
    cached_bytes_ = 0;
  }

  std::size_t cached_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  ~LargeBlockCache() { release_all(); }

 private:
  LargeBlockCache() {
    if (const char* mb = std::getenv("TESSERA_CPU_CACHE_MB")) {
      limit_ = static_cast<std::size_t>(std::strtoull(mb, nullptr, 10)) << 20;
    }
  }

  mutable std::mutex mutex_;
  std::unordered_multimap<std::size_t, void*> free_;
  std::size_t cached_bytes_ = 0;
  std::size_t limit_ = std::size_t{1} << 30;  // 1 GiB
};
}  // namespace detail

template <>
struct DeviceMemory<Cpu> {
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const std::size_t rounded = rounded_size(bytes);
    if (rounded >= detail::LargeBlockCache::kMinCachedBytes) {
      if (void* p = detail::LargeBlockCache::instance().take(rounded)) return p;
    }
    void* p = std::aligned_alloc(kTensorAlignment, rounded);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  // `bytes` must be the size the block was allocated with.
  static void release(void* p, std::size_t bytes) {
    if (p == nullptr) return;
    const std::size_t rounded = rounded_size(bytes);
    if (rounded >= detail::LargeBlockCache::kMinCachedBytes) {
      detail::LargeBlockCache::instance().give(p, rounded);
    } else {
      std::free(p);
    }
  }
  static void zero(void* p, std::size_t bytes) {
    if (bytes) std::memset(p, 0, bytes);
  }

 private:
  static std::size_t rounded_size(std::size_t bytes) {
    return (bytes + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
  }
};

template <>
struct DeviceMemory<Cuda> {
  template <class Byte = std::byte>
  static void* allocate(std::size_t bytes) {
#if defined(TESSERA_WITH_CUDA)
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    detail::cuda_check(cudaMalloc(&p, bytes), "cudaMalloc");
    return p;
#else
    static_assert(detail::always_false<Byte>,
                  "tessera: Cuda tensors need the CUDA runtime; link tessera::cuda "
                  "(configure with TESSERA_CUDA=AUTO or ON on a machine with nvcc)");
    return nullptr;
#endif
  }
  template <class Byte = std::byte>
  static void release(void* p, std::size_t /*bytes*/) {
#if defined(TESSERA_WITH_CUDA)
    if (p) cudaFree(p);
#else
    static_assert(detail::always_false<Byte>, "tessera: Cuda tensors need tessera::cuda");
#endif
  }
  template <class Byte = std::byte>
  static void zero(void* p, std::size_t bytes) {
#if defined(TESSERA_WITH_CUDA)
    if (bytes) detail::cuda_check(cudaMemset(p, 0, bytes), "cudaMemset");
#else
    static_assert(detail::always_false<Byte>, "tessera: Cuda tensors need tessera::cuda");
#endif
  }
};

// Copies `bytes` from memory on device Src to memory on device Dst.
template <DeviceTag Dst, DeviceTag Src>
void copy_bytes(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0) return;
  if constexpr (std::same_as<Dst, Cpu> && std::same_as<Src, Cpu>) {
    std::memcpy(dst, src, bytes);
  } else {
#if defined(TESSERA_WITH_CUDA)
    constexpr cudaMemcpyKind kind =
        std::same_as<Dst, Cpu>   ? cudaMemcpyDeviceToHost
        : std::same_as<Src, Cpu> ? cudaMemcpyHostToDevice
                                 : cudaMemcpyDeviceToDevice;
    detail::cuda_check(cudaMemcpy(dst, src, bytes, kind), "cudaMemcpy");
#else
    static_assert(detail::always_false<Dst, Src>, "tessera: copies to or from Cuda need tessera::cuda");
#endif
  }
}

}  // namespace tessera

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
#include <new>
#include <type_traits>

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

template <>
struct DeviceMemory<Cpu> {
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const std::size_t rounded = (bytes + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
    void* p = std::aligned_alloc(kTensorAlignment, rounded);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  static void release(void* p) { std::free(p); }
  static void zero(void* p, std::size_t bytes) {
    if (bytes) std::memset(p, 0, bytes);
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
  static void release(void* p) {
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

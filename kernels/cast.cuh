// kernels/cast.cuh — element-type conversion on the GPU between float, double, bf16, fp16,
// fp8_e4m3 and fp8_e5m2; the CUDA twin of tessera/ops/cast.hpp.
//
// How it is built, and why:
//   * The same conversion chain as the CPU op, so both give the same bits: every conversion
//     goes through float (double -> float -> bf16 rounds twice, as on the CPU), conversions to
//     double and between identical types are exact.
//   * The roundings are CUDA's own device intrinsics (__float2bfloat16_rn, __float2half_rn,
//     __nv_cvt_float_to_fp8 with __NV_SATFINITE / __NV_NOSAT). tessera's number types
//     (core/number.hpp) reproduce CUDA's host conversions bit for bit, and the host and device
//     conversions agree, so the CPU op and this kernel agree bit for bit; the test checks it on
//     every FP8 code and on random floats (NaN is compared as "is NaN": its payload is not
//     part of the contract).
//   * FP8 overflow follows the `overflow` argument exactly as on the CPU: kSatFinite (the
//     default) clamps to the largest finite value (also +-inf), kNone keeps the format's rule
//     (e4m3 -> NaN, e5m2 -> inf).
//   * One thread per element in a grid-stride loop; the operation is memory-bound, and each
//     element is independent, so there is nothing to be gained from a fancier kernel before
//     the data path is vectorised (a later step if profiles ask for it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "kernels/common.cuh"

namespace tessera::cuda {

namespace cast_detail {

template <class T>
inline constexpr bool is_fp8_v = std::is_same_v<T, fp8_e4m3> || std::is_same_v<T, fp8_e5m2>;

template <class T>
__device__ __forceinline__ float to_float_device(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, double>) {
    return static_cast<float>(v);  // cvt.rn.f32.f64, as static_cast on the CPU
  } else if constexpr (std::is_same_v<T, bf16>) {
    return __bfloat162float(__ushort_as_bfloat16(v.bits));
  } else if constexpr (std::is_same_v<T, fp16>) {
    return __half2float(__ushort_as_half(v.bits));
  } else {
    constexpr __nv_fp8_interpretation_t kind = std::is_same_v<T, fp8_e4m3> ? __NV_E4M3 : __NV_E5M2;
    // Every FP8 value is an fp16 value, so this is exact.
    const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(v.bits), kind);
    return __half2float(__half(h));
  }
}

template <class To>
__device__ __forceinline__ To from_float_device(float f, Fp8Saturation overflow) {
  if constexpr (std::is_same_v<To, float>) {
    return f;
  } else if constexpr (std::is_same_v<To, bf16>) {
    return bf16::from_bits(__bfloat16_as_ushort(__float2bfloat16_rn(f)));
  } else if constexpr (std::is_same_v<To, fp16>) {
    return fp16::from_bits(__half_as_ushort(__float2half_rn(f)));
  } else {
    constexpr __nv_fp8_interpretation_t kind = std::is_same_v<To, fp8_e4m3> ? __NV_E4M3 : __NV_E5M2;
    const __nv_saturation_t sat =
        overflow == Fp8Saturation::kSatFinite ? __NV_SATFINITE : __NV_NOSAT;
    return To::from_bits(static_cast<std::uint8_t>(__nv_cvt_float_to_fp8(f, sat, kind)));
  }
}

template <class To, class From>
__device__ __forceinline__ To convert(From v, Fp8Saturation overflow) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<To, double>) {
    if constexpr (std::is_same_v<From, float>) {
      return static_cast<double>(v);
    } else {
      return static_cast<double>(to_float_device(v));
    }
  } else {
    return from_float_device<To>(to_float_device(v), overflow);
  }
}

template <class To, class From>
__global__ void cast_kernel(const From* __restrict__ in, int64_t n, Fp8Saturation overflow,
                            To* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = convert<To, From>(in[i], overflow);
}

}  // namespace cast_detail

// Converts every element of x to To (see the file header for rounding and FP8 overflow).
// x may be a strided view; the result is a new contiguous tensor of the same shape.
template <class To, class From>
Tensor<To, Cuda> cast(TensorView<const From, Cuda> x,
                      Fp8Saturation overflow = Fp8Saturation::kSatFinite,
                      cudaStream_t stream = nullptr) {
  static_assert(Number<To> && Number<From>, "cuda::cast: To and From must be tessera number types");
  const Dense<From> in(x, stream);
  auto out = Tensor<To, Cuda>::empty(x.shape());
  const int64_t n = x.numel();
  if (n == 0) return out;
  cast_detail::cast_kernel<To, From>
      <<<grid_for(n), kThreadsPerBlock, 0, stream>>>(in.data, n, overflow, out.data());
  TESSERA_CUDA_CHECK_LAUNCH("cast_kernel");
  return out;
}

// The same for a tensor or a mutable view, so `cuda::cast<bf16>(t)` deduces From.
template <class To, class From>
Tensor<To, Cuda> cast(const Tensor<From, Cuda>& x,
                      Fp8Saturation overflow = Fp8Saturation::kSatFinite,
                      cudaStream_t stream = nullptr) {
  return cast<To, From>(x.view(), overflow, stream);
}
template <class To, class From>
requires(!std::is_const_v<From>) Tensor<To, Cuda> cast(
    TensorView<From, Cuda> x, Fp8Saturation overflow = Fp8Saturation::kSatFinite,
    cudaStream_t stream = nullptr) {
  return cast<To, From>(TensorView<const From, Cuda>(x), overflow, stream);
}

}  // namespace tessera::cuda

// kernels/fp8_quantize.cuh — FP8 quantisation on the GPU: per-tensor amax, scale and quantise,
// and the fine-grained 1x128 (activation) and 128x128 (weight) tile layouts; the CUDA twin of
// tessera/quant/fp8_scaling.hpp, with the same scale conventions:
//   * per tensor: `scale` is the quantisation multiplier (Transformer Engine's):
//         q = fp8(x * scale),  x ~ float(q) * (1 / scale),  scale = scale_from_amax(amax)
//   * tiles and blocks: the stored scales are dequantisation multipliers (DeepSeek-V3's):
//         s = a / fp8_max,  q = fp8(x * (fp8_max / a)),  x ~ float(q) * s
//     with a = the tile's amax, raised to fp8_min_scaled_amax<Fp8>() (and fp8_max for an
//     all-zero tile, whose scale is then 1).
//
// How it is built, and why:
//   * amax is cub::DeviceReduce::TransformReduce with |x| as the transform and a max that
//     keeps NaN (a NaN anywhere gives NaN, an inf gives inf, as on the CPU). max is exact, so
//     the order CUB picks cannot change the result.
//   * Per-tensor scales are host floats, as on the CPU (scale_from_amax is the CPU function
//     itself). quantize_per_tensor_current() chains amax -> scale -> quantise for "current"
//     scaling: it reads the amax back (one 4-byte copy and a stream synchronisation), because a
//     non-finite amax must throw, as on the CPU, before anything is quantised with it.
//   * 1x128 tiles: one warp per tile (each lane takes elements lane, lane+32, lane+64,
//     lane+96: coalesced), a warp max, then each lane quantises its four values. 128x128
//     blocks: one 256-thread block per weight block, a block max, then the same.
//   * Every multiplier and scale is computed by the same float operations as on the CPU
//     (IEEE division; x * multiplier is a single rounding that nvcc cannot contract), and the
//     rounding to FP8 is __nv_cvt_float_to_fp8(..., __NV_SATFINITE, ...), which tessera's FP8
//     types reproduce bit for bit. So codes and scales equal the CPU's exactly; the tests
//     compare bits.
//   * A tile with a non-finite amax throws (the CPU does too): the kernel records the first
//     such tile, the wrapper reads it back and names it. One small read-back per call.
//   * Inputs may be float, bf16 or fp16 (widened to float exactly); the CPU functions take
//     float, so a bf16 input quantises exactly as its float widening does there.
//
// Shapes: 1x128 takes any x of rank >= 1, rows = all leading axes, cols = the last axis;
// scales are (rows, ceil(cols / 128)). 128x128 takes a rank-2 w (rows, cols); scales are
// (ceil(rows / 128), ceil(cols / 128)). Ragged last tiles are allowed.
#pragma once

#include <cuda_fp8.h>

#include <cmath>
#include <cstdint>
#include <cub/device/device_reduce.cuh>
#include <limits>
#include <type_traits>

#include "kernels/common.cuh"
#include "tessera/quant/fp8_scaling.hpp"

namespace tessera::cuda {

// Codes plus one dequantisation scale per tile (see the file header for the layouts).
template <Fp8Type Fp8>
struct Fp8Tiles {
  Tensor<Fp8, Cuda> q;         // same shape as the input
  Tensor<float, Cuda> scales;  // (rows, ceil(cols/128)) or (ceil(rows/128), ceil(cols/128))
};

// The result of current per-tensor scaling.
template <Fp8Type Fp8>
struct Fp8PerTensor {
  Tensor<Fp8, Cuda> q;  // same shape as the input
  float scale = 1.0f;   // quantisation multiplier: x ~ float(q) / scale
  float amax = 0.0f;    // max |x|
};

namespace fp8_detail {

template <class T>
inline constexpr bool is_quantizable_v =
    std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

template <Fp8Type Fp8>
__device__ __forceinline__ Fp8 to_fp8_sat(float v) {
  constexpr __nv_fp8_interpretation_t kind = std::is_same_v<Fp8, fp8_e4m3> ? __NV_E4M3 : __NV_E5M2;
  return Fp8::from_bits(static_cast<std::uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, kind)));
}

template <Fp8Type Fp8>
__device__ __forceinline__ float from_fp8(Fp8 q) {
  constexpr __nv_fp8_interpretation_t kind = std::is_same_v<Fp8, fp8_e4m3> ? __NV_E4M3 : __NV_E5M2;
  return __half2float(
      __half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(q.bits), kind)));
}

template <class T>
struct AbsValue {
  __device__ __forceinline__ float operator()(T v) const { return fabsf(load_acc<float>(v)); }
};

// max that keeps NaN, for non-negative inputs.
struct NanMax {
  __device__ __forceinline__ float operator()(float a, float b) const {
    return (a != a || a > b) ? a : b;
  }
};

// The tile's amax -> (quantisation multiplier, dequantisation scale), as the CPU computes it.
template <Fp8Type Fp8>
__device__ __forceinline__ void tile_scales(float tile_amax, float& multiplier, float& scale) {
  constexpr float kMax = number_traits<Fp8>::max_finite;
  constexpr float kFloor = kMax * 0x1p-125f;  // fp8_min_scaled_amax<Fp8>()
  const float a = tile_amax == 0.0f ? kMax : (tile_amax > kFloor ? tile_amax : kFloor);
  multiplier = kMax / a;
  scale = a / kMax;
}

__device__ __forceinline__ bool finite(float v) { return v - v == 0.0f; }

template <class T, Fp8Type Fp8>
__global__ void quantize_per_tensor_kernel(const T* __restrict__ x, int64_t n, float scale,
                                           Fp8* __restrict__ q) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    q[i] = to_fp8_sat<Fp8>(load_acc<float>(x[i]) * scale);
}

template <Fp8Type Fp8>
__global__ void dequantize_per_tensor_kernel(const Fp8* __restrict__ q, int64_t n, float scale_inv,
                                             float* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = from_fp8(q[i]) * scale_inv;
}

// One warp per 1x128 tile; `tiles_across` tiles per row.
template <class T, Fp8Type Fp8>
__global__ void quantize_1x128_kernel(const T* __restrict__ x, int64_t rows, int64_t cols,
                                      int64_t tiles_across, Fp8* __restrict__ q,
                                      float* __restrict__ scales, unsigned long long* bad_tile) {
  constexpr int kPerLane = static_cast<int>(kFp8TileSize) / kWarpSize;  // 4
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t tiles = rows * tiles_across;
  for (int64_t tile = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; tile < tiles;
       tile += int64_t{gridDim.x} * warps_per_block) {
    const int64_t r = tile / tiles_across;
    const int64_t c0 = (tile % tiles_across) * kFp8TileSize;
    const T* xr = x + r * cols;
    float v[kPerLane];
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t c = c0 + lane + k * kWarpSize;
      v[k] = c < cols ? load_acc<float>(xr[c]) : 0.0f;
      m = NanMax{}(fabsf(v[k]), m);
    }
    m = warp_reduce(m, NanMax{});
    if (!finite(m)) {
      if (lane == 0) report_bad_index(bad_tile, tile);
      continue;
    }
    float multiplier, scale;
    tile_scales<Fp8>(m, multiplier, scale);
    if (lane == 0) scales[tile] = scale;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t c = c0 + lane + k * kWarpSize;
      if (c < cols) q[r * cols + c] = to_fp8_sat<Fp8>(v[k] * multiplier);
    }
  }
}

// One block per 128x128 weight block.
template <class T, Fp8Type Fp8>
__global__ void quantize_128x128_kernel(const T* __restrict__ w, int64_t rows, int64_t cols,
                                        int64_t tiles_across, Fp8* __restrict__ q,
                                        float* __restrict__ scales, unsigned long long* bad_tile) {
  const int64_t r0 = blockIdx.y * kFp8TileSize, c0 = blockIdx.x * kFp8TileSize;
  const int64_t h = rows - r0 < kFp8TileSize ? rows - r0 : kFp8TileSize;
  const int64_t wd = cols - c0 < kFp8TileSize ? cols - c0 : kFp8TileSize;
  float m = 0.0f;
  for (int64_t e = threadIdx.x; e < h * kFp8TileSize; e += blockDim.x) {
    const int64_t i = e / kFp8TileSize, j = e % kFp8TileSize;
    if (j < wd) m = NanMax{}(fabsf(load_acc<float>(w[(r0 + i) * cols + c0 + j])), m);
  }
  m = block_reduce(m, NanMax{}, 0.0f);
  const int64_t tile = blockIdx.y * tiles_across + blockIdx.x;
  if (!finite(m)) {
    if (threadIdx.x == 0) report_bad_index(bad_tile, tile);
    return;
  }
  float multiplier, scale;
  tile_scales<Fp8>(m, multiplier, scale);
  if (threadIdx.x == 0) scales[tile] = scale;
  for (int64_t e = threadIdx.x; e < h * kFp8TileSize; e += blockDim.x) {
    const int64_t i = e / kFp8TileSize, j = e % kFp8TileSize;
    if (j < wd) {
      const int64_t at = (r0 + i) * cols + c0 + j;
      q[at] = to_fp8_sat<Fp8>(load_acc<float>(w[at]) * multiplier);
    }
  }
}

// out (rows, cols) = float(q) * scales[tile of (r, c)], tiles of (tile_rows, 128).
template <Fp8Type Fp8>
__global__ void dequantize_tiled_kernel(const Fp8* __restrict__ q, const float* __restrict__ scales,
                                        int64_t rows, int64_t cols, int64_t tile_rows,
                                        int64_t tiles_across, float* __restrict__ out) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    out[i] = from_fp8(q[i]) * scales[(r / tile_rows) * tiles_across + c / kFp8TileSize];
  }
}

inline void throw_bad_tile(const char* who, unsigned long long tile, int64_t tiles_across,
                           int64_t tile_rows) {
  const auto t = static_cast<int64_t>(tile);
  fail(who, ": the tile at row ", (t / tiles_across) * tile_rows, ", column ",
       (t % tiles_across) * kFp8TileSize,
       " has a non-finite amax; FP8 scaling needs finite values");
}

}  // namespace fp8_detail

// max |x| over the whole tensor, left on the device (shape [1]); no synchronisation.
template <class T>
Tensor<float, Cuda> amax_device(TensorView<const T, Cuda> x, cudaStream_t stream = nullptr) {
  static_assert(fp8_detail::is_quantizable_v<T>, "cuda::amax: T must be float, bf16 or fp16");
  auto out = zeros_on<float>(Shape{1}, stream);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const Dense<T> xd(x, stream);
  std::size_t temp_bytes = 0;
  TESSERA_CUDA_CHECK(cub::DeviceReduce::TransformReduce(nullptr, temp_bytes, xd.data, out.data(), n,
                                                        fp8_detail::NanMax{},
                                                        fp8_detail::AbsValue<T>{}, 0.0f, stream));
  void* temp = nullptr;
  TESSERA_CUDA_CHECK(cudaMallocAsync(&temp, temp_bytes, stream));
  const cudaError_t status = cub::DeviceReduce::TransformReduce(
      temp, temp_bytes, xd.data, out.data(), n, fp8_detail::NanMax{}, fp8_detail::AbsValue<T>{},
      0.0f, stream);
  TESSERA_CUDA_CHECK(cudaFreeAsync(temp, stream));
  TESSERA_CUDA_CHECK(status);
  return out;
}

// max |x| as a host float (synchronises the stream). NaN anywhere gives NaN; inf gives inf.
template <class T>
float amax(TensorView<const T, Cuda> x, cudaStream_t stream = nullptr) {
  const auto d = amax_device<T>(x, stream);
  return read_element(d.data(), 0, stream);
}

// q = fp8(x * scale), saturating; scale is the quantisation multiplier (as the CPU's).
template <Fp8Type Fp8, class T>
Tensor<Fp8, Cuda> quantize_per_tensor(TensorView<const T, Cuda> x, float scale,
                                      cudaStream_t stream = nullptr) {
  static_assert(fp8_detail::is_quantizable_v<T>,
                "cuda::quantize_per_tensor: T must be float, bf16 or fp16");
  TESSERA_CHECK(std::isfinite(scale) && scale > 0.0f, "quantize_per_tensor: scale = ", scale,
                " must be finite and > 0");
  auto q = Tensor<Fp8, Cuda>::empty(x.shape());
  const int64_t n = x.numel();
  if (n == 0) return q;
  const Dense<T> xd(x, stream);
  fp8_detail::quantize_per_tensor_kernel<T, Fp8>
      <<<grid_for(n), kThreadsPerBlock, 0, stream>>>(xd.data, n, scale, q.data());
  TESSERA_CUDA_CHECK_LAUNCH("quantize_per_tensor_kernel");
  return q;
}

// out = float(q) * (1 / scale), the reciprocal taken once on the host (as the CPU does).
template <Fp8Type Fp8>
Tensor<float, Cuda> dequantize_per_tensor(TensorView<const Fp8, Cuda> q, float scale,
                                          cudaStream_t stream = nullptr) {
  TESSERA_CHECK(std::isfinite(scale) && scale > 0.0f, "dequantize_per_tensor: scale = ", scale,
                " must be finite and > 0");
  auto out = Tensor<float, Cuda>::empty(q.shape());
  const int64_t n = q.numel();
  if (n == 0) return out;
  const Dense<Fp8> qd(q, stream);
  const float scale_inv = 1.0f / scale;
  fp8_detail::dequantize_per_tensor_kernel<Fp8>
      <<<grid_for(n), kThreadsPerBlock, 0, stream>>>(qd.data, n, scale_inv, out.data());
  TESSERA_CUDA_CHECK_LAUNCH("dequantize_per_tensor_kernel");
  return out;
}

// Current scaling: amax of x now, scale = scale_from_amax<Fp8>(amax, margin), then quantise.
// Throws (as scale_from_amax does) when the amax is not finite.
template <Fp8Type Fp8, class T>
Fp8PerTensor<Fp8> quantize_per_tensor_current(TensorView<const T, Cuda> x, int margin = 0,
                                              cudaStream_t stream = nullptr) {
  Fp8PerTensor<Fp8> r;
  r.amax = amax<T>(x, stream);
  r.scale = scale_from_amax<Fp8>(r.amax, margin);
  r.q = quantize_per_tensor<Fp8, T>(x, r.scale, stream);
  return r;
}

// Activations: x (..., cols) -> codes of the same shape and scales (rows, ceil(cols/128)), one
// dequantisation scale per 1x128 tile of a row.
template <Fp8Type Fp8, class T>
Fp8Tiles<Fp8> quantize_tiles_1x128(TensorView<const T, Cuda> x, cudaStream_t stream = nullptr) {
  static_assert(fp8_detail::is_quantizable_v<T>,
                "cuda::quantize_tiles_1x128: T must be float, bf16 or fp16");
  TESSERA_CHECK(x.rank() >= 1,
                "quantize_tiles_1x128: tensor 'x' has rank 0; expected rank >= 1 (..., cols)");
  const int64_t cols = x.dim(-1), rows = leading_rows(x.shape());
  const int64_t across = ::tessera::detail::tile_count(cols, kFp8TileSize);
  Fp8Tiles<Fp8> out{Tensor<Fp8, Cuda>::empty(x.shape()),
                    Tensor<float, Cuda>::empty({rows, across})};
  const int64_t tiles = rows * across;
  if (tiles == 0) return out;
  const Dense<T> xd(x, stream);
  BadIndexFlag bad(stream);
  constexpr int kWarps = kThreadsPerBlock / kWarpSize;
  fp8_detail::quantize_1x128_kernel<T, Fp8>
      <<<grid_for(tiles, kWarps), kThreadsPerBlock, 0, stream>>>(
          xd.data, rows, cols, across, out.q.data(), out.scales.data(), bad.device());
  TESSERA_CUDA_CHECK_LAUNCH("quantize_1x128_kernel");
  if (const auto first = bad.read(); first != BadIndexFlag::kNone)
    fp8_detail::throw_bad_tile("quantize_tiles_1x128", first, across, 1);
  return out;
}

template <Fp8Type Fp8>
Tensor<float, Cuda> dequantize_tiles_1x128(TensorView<const Fp8, Cuda> q,
                                           TensorView<const float, Cuda> scales,
                                           cudaStream_t stream = nullptr) {
  TESSERA_CHECK(q.rank() >= 1,
                "dequantize_tiles_1x128: tensor 'q' has rank 0; expected rank >= 1 (..., cols)");
  const int64_t cols = q.dim(-1), rows = leading_rows(q.shape());
  const int64_t across = ::tessera::detail::tile_count(cols, kFp8TileSize);
  check_shape("dequantize_tiles_1x128", "scales", scales.shape(), Shape{rows, across});
  auto out = Tensor<float, Cuda>::empty(q.shape());
  if (out.numel() == 0) return out;
  const Dense<Fp8> qd(q, stream);
  const Dense<float> sd(scales, stream);
  fp8_detail::dequantize_tiled_kernel<Fp8><<<grid_for(rows * cols), kThreadsPerBlock, 0, stream>>>(
      qd.data, sd.data, rows, cols, 1, across, out.data());
  TESSERA_CUDA_CHECK_LAUNCH("dequantize_tiled_kernel");
  return out;
}

// Weights: w (rows, cols) -> codes (rows, cols) and scales (ceil(rows/128), ceil(cols/128)),
// one dequantisation scale per 128x128 block.
template <Fp8Type Fp8, class T>
Fp8Tiles<Fp8> quantize_blocks_128x128(TensorView<const T, Cuda> w, cudaStream_t stream = nullptr) {
  static_assert(fp8_detail::is_quantizable_v<T>,
                "cuda::quantize_blocks_128x128: T must be float, bf16 or fp16");
  check_rank("quantize_blocks_128x128", "w", w.shape(), 2);
  const int64_t rows = w.dim(0), cols = w.dim(1);
  const int64_t across = ::tessera::detail::tile_count(cols, kFp8TileSize),
                down = ::tessera::detail::tile_count(rows, kFp8TileSize);
  Fp8Tiles<Fp8> out{Tensor<Fp8, Cuda>::empty(w.shape()),
                    Tensor<float, Cuda>::empty({down, across})};
  if (across * down == 0) return out;
  TESSERA_CHECK(across <= std::numeric_limits<int32_t>::max() && down <= 65535,
                "quantize_blocks_128x128: shape ", w.shape(), " is too large for one launch");
  const Dense<T> wd(w, stream);
  BadIndexFlag bad(stream);
  const dim3 grid(static_cast<unsigned>(across), static_cast<unsigned>(down));
  fp8_detail::quantize_128x128_kernel<T, Fp8><<<grid, kThreadsPerBlock, 0, stream>>>(
      wd.data, rows, cols, across, out.q.data(), out.scales.data(), bad.device());
  TESSERA_CUDA_CHECK_LAUNCH("quantize_128x128_kernel");
  if (const auto first = bad.read(); first != BadIndexFlag::kNone)
    fp8_detail::throw_bad_tile("quantize_blocks_128x128", first, across, kFp8TileSize);
  return out;
}

template <Fp8Type Fp8>
Tensor<float, Cuda> dequantize_blocks_128x128(TensorView<const Fp8, Cuda> q,
                                              TensorView<const float, Cuda> scales,
                                              cudaStream_t stream = nullptr) {
  check_rank("dequantize_blocks_128x128", "q", q.shape(), 2);
  const int64_t rows = q.dim(0), cols = q.dim(1);
  const int64_t across = ::tessera::detail::tile_count(cols, kFp8TileSize),
                down = ::tessera::detail::tile_count(rows, kFp8TileSize);
  check_shape("dequantize_blocks_128x128", "scales", scales.shape(), Shape{down, across});
  auto out = Tensor<float, Cuda>::empty(q.shape());
  if (out.numel() == 0) return out;
  const Dense<Fp8> qd(q, stream);
  const Dense<float> sd(scales, stream);
  fp8_detail::dequantize_tiled_kernel<Fp8><<<grid_for(rows * cols), kThreadsPerBlock, 0, stream>>>(
      qd.data, sd.data, rows, cols, kFp8TileSize, across, out.data());
  TESSERA_CUDA_CHECK_LAUNCH("dequantize_tiled_kernel");
  return out;
}

}  // namespace tessera::cuda

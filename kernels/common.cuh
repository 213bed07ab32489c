// kernels/common.cuh — what every tessera CUDA kernel file shares: error checks that throw
// tessera::Error, warp and block reductions, launch helpers, the arithmetic type of each
// element type, a strided-to-contiguous copy, and a deterministic column sum.
//
// Why these pieces, and why here:
//   * A CUDA call that fails must not be ignored or abort the process: it becomes a
//     tessera::Error naming the call and CUDA's own error string, so a test (or a server)
//     sees the same kind of error as a broken shape precondition on the CPU.
//   * Kernels compute the way the CPU ops do: bf16/fp16 (and FP8) widen to float, double
//     stays double (acc_t<T>, load_acc, store_acc). The CPU implementation is the reference
//     every kernel here is tested against (tests/cuda/test_cuda_ops.cu).
//   * Reductions are deterministic: a block reduces in a fixed tree (warp butterfly, then one
//     warp over the per-warp partials), the launch configuration depends only on the shape,
//     and nothing uses floating-point atomics. Running a kernel twice gives the same bits.
//     (Not the CPU's bits: the CPU sums in a different order; tests use tolerances.)
//   * Host wrappers accept strided views, as the CPU ops do: a view that is not contiguous is
//     copied by `contiguous()` below (one gather kernel), never rejected.
//
// Only translation units compiled by nvcc may include this file (DESIGN.md: kernels/ is pulled
// in only under __CUDACC__), and the program must link tessera::cuda.
#pragma once

#if !defined(__CUDACC__)
#error "tessera: kernels/*.cuh are CUDA sources; include them only from .cu files compiled by nvcc"
#endif
#if !defined(TESSERA_WITH_CUDA)
#error "tessera: kernels/*.cuh need TESSERA_WITH_CUDA (link the CMake target tessera::cuda)"
#endif

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::cuda {

// ---- errors --------------------------------------------------------------------------------
namespace detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* call, const char* file,
                                          int line) {
  fail("CUDA error ", static_cast<int>(status), " (", cudaGetErrorName(status),
       "): ", cudaGetErrorString(status), " in `", call, "` at ", file, ":", line);
}

inline void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess) throw_cuda_error(status, call, file, line);
}

}  // namespace detail

// TESSERA_CUDA_CHECK(call): runs a CUDA runtime call and throws tessera::Error with CUDA's
// error name and string, the call's text and the source location when it does not succeed.
#define TESSERA_CUDA_CHECK(call) \
  ::tessera::cuda::detail::check_cuda((call), #call, __FILE__, __LINE__)

// After a kernel launch: a bad configuration is reported at once (cudaGetLastError); errors
// inside the kernel surface at the next synchronising call, which is checked too.
#define TESSERA_CUDA_CHECK_LAUNCH(kernel_name)                                                \
  ::tessera::cuda::detail::check_cuda(cudaGetLastError(), "launch of " kernel_name, __FILE__, \
                                      __LINE__)

// ---- arithmetic types ----------------------------------------------------------------------
// The type arithmetic happens in: double for double, float for everything else (as the CPU
// ops' acc_t).
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Widens a stored value to the arithmetic type A, exactly.
template <class A, class T>
__host__ __device__ __forceinline__ A load_acc(T v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return static_cast<A>(v);
  } else {
    return static_cast<A>(to_float(v));
  }
}

// Rounds an arithmetic value once to the stored type T (round to nearest even; FP8 saturates,
// as tessera::from_float does on the CPU).
template <class T, class A>
__host__ __device__ __forceinline__ T store_acc(A v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return static_cast<T>(v);
  } else {
    return from_float<T>(static_cast<float>(v));
  }
}

template <class A>
__device__ __forceinline__ A neg_infinity() {
  if constexpr (std::is_same_v<A, double>) {
    return -__longlong_as_double(0x7FF0000000000000ll);
  } else {
    return -__int_as_float(0x7F800000);
  }
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float rsqrt_acc(float x) { return rsqrtf(x); }
__device__ __forceinline__ double rsqrt_acc(double x) { return rsqrt(x); }
__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }

// ---- reductions ----------------------------------------------------------------------------
inline constexpr int kWarpSize = 32;
inline constexpr unsigned kFullMask = 0xFFFF'FFFFu;

struct SumOp {
  template <class A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return a + b;
  }
};
struct MaxOp {
  template <class A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    // fmax would drop a NaN; a NaN input must stay visible in the result.
    return (a != a || a > b) ? a : b;
  }
};

// Lane exchange for the reductions; a kernel reducing a struct adds an overload for it next
// to the struct (found by argument-dependent lookup).
__device__ __forceinline__ float shuffle_xor(float v, int offset) {
  return __shfl_xor_sync(kFullMask, v, offset);
}
__device__ __forceinline__ double shuffle_xor(double v, int offset) {
  return __shfl_xor_sync(kFullMask, v, offset);
}

// Butterfly (xor) reduction over the 32 lanes of a warp. Every lane ends with the same bits:
// at each step lanes i and i^offset combine the same two values, and the operations used
// here (+, max, the softmax merge) are commutative.
template <class A, class Op>
__device__ __forceinline__ A warp_reduce(A v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = op(v, shuffle_xor(v, offset));
  return v;
}
template <class A>
__device__ __forceinline__ A warp_sum(A v) {
  return warp_reduce(v, SumOp{});
}
template <class A>
__device__ __forceinline__ A warp_max(A v) {
  return warp_reduce(v, MaxOp{});
}

// Reduction over the whole block; every thread gets the result. blockDim.x must be a multiple
// of 32 (at most 1024). Safe to call several times in a row (the leading barrier protects the
// shared scratch from the previous call's readers).
template <class A, class Op>
__device__ __forceinline__ A block_reduce(A v, Op op, A identity) {
  __shared__ A partial[kWarpSize];
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  return warp_reduce(lane < warps ? partial[lane] : identity, op);
}
template <class A>
__device__ __forceinline__ A block_sum(A v) {
  return block_reduce(v, SumOp{}, A(0));
}
template <class A>
__device__ __forceinline__ A block_max(A v) {
  return block_reduce(v, MaxOp{}, neg_infinity<A>());
}

// ---- launch helpers ------------------------------------------------------------------------
inline constexpr int kThreadsPerBlock = 256;

// Blocks for a grid-stride loop over n elements: enough to fill the GPU, bounded so the grid
// never exceeds what a launch accepts.
inline unsigned grid_for(int64_t n, int threads = kThreadsPerBlock) {
  const int64_t blocks = (n + threads - 1) / threads;
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

// Threads per block for a one-block-per-row kernel over `cols` features: a multiple of 32,
// from 32 up to 1024, so short rows do not idle 7/8 of a block and long rows have enough
// threads in flight. It depends only on `cols`, which keeps reductions deterministic.
inline int row_threads(int64_t cols) {
  int t = kWarpSize;
  while (t < 1024 && t * 4 < cols) t *= 2;
  return t;
}

// Rows go on grid.x (up to 2^31 - 1 blocks), so any row count a tensor can hold fits.
inline dim3 row_grid(int64_t rows) {
  TESSERA_CHECK(rows <= std::numeric_limits<int32_t>::max(), "cuda: ", rows,
                " rows exceed one launch's grid; split the tensor");
  return dim3(static_cast<unsigned>(rows < 1 ? 1 : rows));
}

// The number of rows of a row op: the product of every extent but the last.
inline int64_t leading_rows(const Shape& s) {
  int64_t r = 1;
  for (int i = 0; i + 1 < s.rank(); ++i) r *= s[i];
  return r;
}

// ---- allocation ----------------------------------------------------------------------------
// A zero-filled tensor whose fill is ordered on `stream` (Tensor::zeros fills with a plain
// cudaMemset on the legacy default stream, which a non-blocking stream does not wait for).
template <class T>
Tensor<T, Cuda> zeros_on(Shape shape, cudaStream_t stream) {
  auto t = Tensor<T, Cuda>::empty(shape);
  if (t.size_bytes() > 0) TESSERA_CUDA_CHECK(cudaMemsetAsync(t.data(), 0, t.size_bytes(), stream));
  return t;
}

// ---- strided views -------------------------------------------------------------------------
namespace detail {

struct StridedLayout {
  int rank;
  int64_t dims[Shape::kMaxRank];
  int64_t strides[Shape::kMaxRank];
};

template <class T>
__global__ void gather_strided_kernel(const T* __restrict__ src, StridedLayout layout, int64_t n,
                                      T* __restrict__ dst) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    int64_t rest = i, offset = 0;
    for (int a = layout.rank - 1; a >= 0; --a) {
      const int64_t idx = rest % layout.dims[a];
      rest /= layout.dims[a];
      offset += idx * layout.strides[a];
    }
    dst[i] = src[offset];
  }
}

}  // namespace detail

// A contiguous copy of a (possibly strided) Cuda view.
template <class T>
Tensor<T, Cuda> contiguous(TensorView<const T, Cuda> x, cudaStream_t stream = nullptr) {
  auto out = Tensor<T, Cuda>::empty(x.shape());
  const int64_t n = x.numel();
  if (n == 0) return out;
  if (x.is_contiguous()) {
    TESSERA_CUDA_CHECK(
        cudaMemcpyAsync(out.data(), x.data(), out.size_bytes(), cudaMemcpyDeviceToDevice, stream));
    return out;
  }
  detail::StridedLayout layout{};
  layout.rank = x.rank();
  for (int a = 0; a < x.rank(); ++a) {
    layout.dims[a] = x.shape()[a];
    layout.strides[a] = x.strides()[a];
  }
  detail::gather_strided_kernel<T>
      <<<grid_for(n), kThreadsPerBlock, 0, stream>>>(x.data(), layout, n, out.data());
  TESSERA_CUDA_CHECK_LAUNCH("gather_strided_kernel");
  return out;
}

// x's elements, contiguous: borrowed when x already is, copied otherwise.
template <class T>
struct Dense {
  Tensor<T, Cuda> owned;
  const T* data = nullptr;
  Dense(TensorView<const T, Cuda> x, cudaStream_t stream) {
    if (x.is_contiguous()) {
      data = x.data();
    } else {
      owned = contiguous<T>(x, stream);
      data = owned.data();
    }
  }
};

// ---- reporting bad indices found on the device ---------------------------------------------
// A kernel that meets an out-of-range index (a position outside the RoPE table, a target id
// outside the vocabulary) records the smallest offending flat index here; the host wrapper
// then reads it back and throws, naming the element and its value. Nothing is clamped. The
// price is one 8-byte copy and a stream synchronisation per call that has such inputs.
class BadIndexFlag {
 public:
  static constexpr unsigned long long kNone = ~0ull;

  explicit BadIndexFlag(cudaStream_t stream) : stream_(stream) {
    flag_ = Tensor<unsigned long long, Cuda>::empty({1});
    TESSERA_CUDA_CHECK(cudaMemsetAsync(flag_.data(), 0xFF, sizeof(unsigned long long), stream_));
  }
  unsigned long long* device() { return flag_.data(); }

  // The smallest flat index a kernel reported, or kNone.
  unsigned long long read() const {
    unsigned long long host = kNone;
    TESSERA_CUDA_CHECK(
        cudaMemcpyAsync(&host, flag_.data(), sizeof host, cudaMemcpyDeviceToHost, stream_));
    TESSERA_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return host;
  }

 private:
  cudaStream_t stream_;
  Tensor<unsigned long long, Cuda> flag_;
};

__device__ __forceinline__ void report_bad_index(unsigned long long* flag, int64_t index) {
  atomicMin(flag, static_cast<unsigned long long>(index));
}

// One element of a device array, copied to the host (for error messages).
template <class T>
T read_element(const T* device_ptr, int64_t index, cudaStream_t stream) {
  T host{};
  TESSERA_CUDA_CHECK(
      cudaMemcpyAsync(&host, device_ptr + index, sizeof(T), cudaMemcpyDeviceToHost, stream));
  TESSERA_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

// "[i, j, k]" for flat index `flat` of `shape`.
inline std::string index_str(int64_t flat, const Shape& shape) {
  std::string s;
  for (int a = shape.rank() - 1; a >= 0; --a) {
    s = std::to_string(flat % shape[a]) + (s.empty() ? "" : ", ") + s;
    flat /= shape[a];
  }
  return "[" + s + "]";
}

// ---- deterministic column sums -------------------------------------------------------------
// out[j] = sum over rows r of in[r * cols + j], in A, rounded once to Out. Used for bias
// gradients and for the second pass of RMSNorm's weight gradient. Each block owns 32 columns
// and a chunk of kColumnSumChunk rows; its 8 warps (threadIdx.y) take rows y, y+8, y+16, ...
// of the chunk in order, then one thread sums the 8 partials in order. With more than one
// chunk, the per-chunk sums (in A) are summed by a second launch of the same kernel. The
// chunking depends only on the shape and nothing uses atomics, so every run gives the same
// bits.
namespace detail {

inline constexpr int kColumnSumRowsPerBlock = 8;
inline constexpr int64_t kColumnSumChunk = 1024;

template <class In, class Out, class A>
__global__ void column_sum_kernel(const In* __restrict__ in, int64_t rows, int64_t cols,
                                  Out* __restrict__ out) {
  __shared__ A partial[kColumnSumRowsPerBlock][kWarpSize + 1];  // +1: no bank conflicts
  const int64_t col = blockIdx.x * int64_t{kWarpSize} + threadIdx.x;
  const int64_t begin = blockIdx.y * kColumnSumChunk;
  const int64_t end = begin + kColumnSumChunk < rows ? begin + kColumnSumChunk : rows;
  A acc = A(0);
  if (col < cols) {
    for (int64_t r = begin + threadIdx.y; r < end; r += kColumnSumRowsPerBlock)
      acc += load_acc<A>(in[r * cols + col]);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    A sum = A(0);
    for (int y = 0; y < kColumnSumRowsPerBlock; ++y) sum += partial[y][threadIdx.x];
    out[blockIdx.y * cols + col] = store_acc<Out, A>(sum);  // row blockIdx.y of (chunks, cols)
  }
}

template <class In, class Out, class A>
void launch_column_sum(const In* in, int64_t rows, int64_t cols, Out* out, cudaStream_t stream) {
  const int64_t col_blocks = (cols + kWarpSize - 1) / kWarpSize;
  const int64_t chunks = rows <= 0 ? 1 : (rows + kColumnSumChunk - 1) / kColumnSumChunk;
  TESSERA_CHECK(col_blocks <= std::numeric_limits<int32_t>::max() && chunks <= 65535,
                "column_sum: (", rows, ", ", cols, ") is too large for one launch");
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
  column_sum_kernel<In, Out, A>
      <<<grid, dim3(kWarpSize, kColumnSumRowsPerBlock), 0, stream>>>(in, rows, cols, out);
  TESSERA_CUDA_CHECK_LAUNCH("column_sum_kernel");
}

}  // namespace detail

template <class In, class Out, class A = acc_t<Out>>
void column_sum(const In* in, int64_t rows, int64_t cols, Out* out, cudaStream_t stream) {
  if (cols == 0) return;
  if (rows <= detail::kColumnSumChunk) {
    detail::launch_column_sum<In, Out, A>(in, rows, cols, out, stream);
    return;
  }
  const int64_t chunks = (rows + detail::kColumnSumChunk - 1) / detail::kColumnSumChunk;
  auto partial = Tensor<A, Cuda>::empty({chunks, cols});  // (chunks, cols), one sum per chunk
  detail::launch_column_sum<In, A, A>(in, rows, cols, partial.data(), stream);
  column_sum<A, Out, A>(partial.data(), chunks, cols, out, stream);
}

}  // namespace tessera::cuda

// kernels/matmul_cublas.cuh — matrix products on the GPU through cuBLAS and cuBLASLt; the CUDA
// twin of tessera/ops/matmul.hpp (matmul, matmul_backward, linear, linear_backward), with the
// same shapes, argument order and broadcasting rules.
//
// How it is built, and why:
//   * float and double go to cublasGemmStridedBatchedEx_64 with CUBLAS_COMPUTE_32F /
//     CUBLAS_COMPUTE_64F. TF32 is OFF by default (Fp32Math::kExact): an fp32 product is then
//     computed in fp32 as on the CPU, and the tests can compare with a tight tolerance.
//     Fp32Math::kTf32 (CUBLAS_COMPUTE_32F_FAST_TF32) opts in to tensor cores with 10-bit
//     mantissa inputs, roughly 8x the fp32 throughput on Hopper, at about 1e-3 relative error.
//   * bf16 and fp16 go to cublasLtMatmul: inputs in the 16-bit type, fp32 accumulation
//     (CUBLAS_COMPUTE_32F), output rounded once, as the CPU op does. linear's bias rides in
//     the epilogue (CUBLASLT_EPILOGUE_BIAS), so it is added in fp32 before that one rounding,
//     again as on the CPU. Should the heuristic offer no algorithm for a shape (it has
//     alignment rules), the product falls back to cublasGemmStridedBatchedEx with an fp32
//     output and a small kernel that adds the bias and rounds once: the same numbers, slower.
//   * Row-major results from a column-major library, by the usual operand swap: a row-major
//     (M, N) matrix C has exactly the bytes of the column-major (N, M) matrix C^T, and
//     C^T = op(b)^T op(a)^T. So cuBLAS is called with m = N, n = M, the operands swapped (b
//     first), and each operand's transpose flag taken from how its bytes are laid out: the
//     bytes of a row-major X with leading dimension ld are the column-major X^T with the
//     same ld (CUBLAS_OP_N); a column-major X (a transposed view) needs CUBLAS_OP_T. Nothing
//     is copied for transposed views; views that are neither row- nor column-major in their
//     last two axes are gathered to contiguous first.
//   * One cuBLAS handle and one cuBLASLt handle per (host thread, device), created on first use
//     and cached in thread_local storage: a handle is not safe to share between threads that
//     call concurrently, and creating one per call costs far more than a small product. The
//     cuBLASLt workspace (32 MiB, the size NVIDIA recommends for Hopper) is allocated
//     stream-ordered per call (cudaMallocAsync / cudaFreeAsync), so two calls on different
//     streams never share scratch memory.
//   * A (B, M, K) x (K, N) product whose a is row-major with batches back to back is one
//     (B*M, K) x (K, N) product, as on the CPU. Other broadcasts use batch stride 0 with
//     cuBLAS, and one call per batch entry with cuBLASLt.
//   * Summation order inside a product is cuBLAS's (blocked, possibly split-K): results differ
//     from the CPU's in the last bits; for a fixed shape, GPU and library version cuBLAS is
//     run-to-run deterministic (no atomics-based algorithms are requested).
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "kernels/common.cuh"

// For the shared vocabulary: Transpose, MatmulGrads, LinearGrads and the shape checks. Under
// nvcc, matmul.hpp leaves out its oneDNN back end (nvcc 13's front end cannot parse oneDNN's
// C++ header in C++20 mode).
#include "tessera/ops/matmul.hpp"

namespace tessera::cuda {

using ops::Transpose;

// How fp32 products use the tensor cores (see the file header). Ignored for other types.
enum class Fp32Math { kExact, kTf32 };

// The gradients, as ops::MatmulGrads / ops::LinearGrads but holding Cuda tensors.
template <class T>
struct MatmulGrads {
  Tensor<T, Cuda> da;  // same shape as a
  Tensor<T, Cuda> db;  // same shape as b
};

template <class T>
struct LinearGrads {
  Tensor<T, Cuda> dx;       // same shape as x: (..., in)
  Tensor<T, Cuda> dweight;  // (out, in)
  Tensor<T, Cuda> dbias;    // (out); empty when the layer has no bias
};

namespace blas_detail {

[[noreturn]] inline void throw_cublas_error(cublasStatus_t status, const char* call,
                                            const char* file, int line) {
  fail("cuBLAS error ", static_cast<int>(status), " (", cublasGetStatusName(status),
       "): ", cublasGetStatusString(status), " in `", call, "` at ", file, ":", line);
}

inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS) throw_cublas_error(status, call, file, line);
}

#define TESSERA_CUBLAS_CHECK(call) \
  ::tessera::cuda::blas_detail::check_cublas((call), #call, __FILE__, __LINE__)

inline constexpr std::size_t kLtWorkspaceBytes = std::size_t{32} << 20;

struct Handles {
  cublasHandle_t blas = nullptr;
  cublasLtHandle_t lt = nullptr;
  Handles() {
    TESSERA_CUBLAS_CHECK(cublasCreate(&blas));
    // Default math: no TF32 unless a call asks for CUBLAS_COMPUTE_32F_FAST_TF32, and no
    // reduced-precision reductions inside 16-bit products.
    TESSERA_CUBLAS_CHECK(cublasSetMathMode(
        blas, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                        CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    TESSERA_CUBLAS_CHECK(cublasLtCreate(&lt));
  }
  Handles(const Handles&) = delete;
  Handles& operator=(const Handles&) = delete;
  ~Handles() {
    // At thread or process exit the CUDA runtime may already be gone; nothing to report then.
    if (lt) cublasLtDestroy(lt);
    if (blas) cublasDestroy(blas);
  }
};

// This thread's handles for the current device.
inline Handles& handles() {
  int device = 0;
  TESSERA_CUDA_CHECK(cudaGetDevice(&device));
  thread_local std::vector<std::unique_ptr<Handles>> per_device;
  if (static_cast<std::size_t>(device) >= per_device.size()) per_device.resize(device + 1);
  auto& h = per_device[device];
  if (!h) h = std::make_unique<Handles>();
  return *h;
}

template <class T>
constexpr cudaDataType_t data_type() {
  if constexpr (std::is_same_v<T, float>)
    return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, double>)
    return CUDA_R_64F;
  else if constexpr (std::is_same_v<T, bf16>)
    return CUDA_R_16BF;
  else if constexpr (std::is_same_v<T, fp16>)
    return CUDA_R_16F;
  else
    static_assert(::tessera::detail::always_false<T>,
                  "cuda::matmul: T must be float, double, bf16 or fp16");
}

template <class T>
inline constexpr bool is_low_precision_v = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

// One operand as the logical matrix op(X) (rows, cols): element (g, i, j) is at
// data[g * batch_stride + i * ld + j] when row_major, else at data[g * batch_stride + j * ld + i].
template <class T>
struct Operand {
  Tensor<T, Cuda> owned;  // a contiguous copy, when the view's strides did not fit
  const T* data = nullptr;
  int64_t batch_stride = 0;
  int64_t rows = 0, cols = 0;
  int64_t ld = 1;
  bool row_major = true;
};

template <class T>
Operand<T> make_operand(TensorView<const T, Cuda> x, Transpose t, cudaStream_t stream) {
  Operand<T> h;
  const int r = x.rank();
  const int64_t rows = x.dim(-2), cols = x.dim(-1);
  bool row_major = true;
  int64_t ld = 1;
  const bool batch_ok = r == 2 || x.dim(0) <= 1 || x.strides()[0] >= 0;
  if (!batch_ok || !ops::matmul_detail::fit_layout(rows, cols, x.strides()[-2], x.strides()[-1],
                                                   row_major, ld)) {
    h.owned = contiguous<T>(x, stream);
    x = h.owned.view();
    row_major = true;
    ld = cols > 1 ? cols : 1;
  }
  const bool tr = t == Transpose::kYes;
  h.data = x.data();
  h.batch_stride = r == 3 ? x.strides()[0] : 0;
  h.rows = tr ? cols : rows;
  h.cols = tr ? rows : cols;
  h.ld = ld;
  h.row_major = row_major != tr;  // the transpose of a row-major matrix is column-major
  return h;
}

// The operand's bytes as a column-major matrix for the swapped call (see the file header).
template <class T>
cublasOperation_t swapped_op(const Operand<T>& x) {
  return x.row_major ? CUBLAS_OP_N : CUBLAS_OP_T;
}

// ---- small kernels -------------------------------------------------------------------------
// y[r, j] = round(acc[r, j] + bias[j]) (bias optional); acc is T itself or an fp32 scratch.
template <class T, class Acc>
__global__ void bias_round_kernel(const Acc* __restrict__ acc, const T* __restrict__ bias,
                                  int64_t rows, int64_t n, T* __restrict__ y) {
  using A = acc_t<T>;
  const int64_t total = rows * n;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    A v = load_acc<A>(acc[i]);
    if (bias) v += load_acc<A>(bias[i % n]);
    y[i] = store_acc<T, A>(v);
  }
}

// y[r, j] = bias[j], or zero: the product of an empty inner dimension.
template <class T>
__global__ void fill_rows_kernel(const T* __restrict__ bias, int64_t rows, int64_t n,
                                 T* __restrict__ y) {
  const int64_t total = rows * n;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x)
    y[i] = bias ? bias[i % n] : store_acc<T, float>(0.0f);
}

template <class T, class Acc>
void bias_round(const Acc* acc, const T* bias, int64_t rows, int64_t n, T* y, cudaStream_t stream) {
  if (rows * n == 0) return;
  bias_round_kernel<T, Acc>
      <<<grid_for(rows * n), kThreadsPerBlock, 0, stream>>>(acc, bias, rows, n, y);
  TESSERA_CUDA_CHECK_LAUNCH("bias_round_kernel");
}

// ---- cuBLAS (float, double; the 16-bit fallback) -------------------------------------------
// c (batch, M, N), of type C, = op(a) op(b), accumulated in compute_type.
template <class T, class C>
void gemm_cublas(const Operand<T>& a, const Operand<T>& b, int64_t batch, int64_t m, int64_t n,
                 int64_t k, C* c, cublasComputeType_t compute_type, cudaStream_t stream) {
  Handles& h = handles();
  TESSERA_CUBLAS_CHECK(cublasSetStream(h.blas, stream));
  using S = std::conditional_t<std::is_same_v<C, double>, double, float>;  // scale type
  const S alpha = 1, beta = 0;
  TESSERA_CUBLAS_CHECK(cublasGemmStridedBatchedEx_64(
      h.blas, swapped_op(b), swapped_op(a), n, m, k, &alpha, b.data, data_type<T>(), b.ld,
      b.batch_stride, a.data, data_type<T>(), a.ld, a.batch_stride, &beta, c, data_type<C>(), n,
      m * n, batch, compute_type, CUBLAS_GEMM_DEFAULT));
}

// ---- cuBLASLt (bf16, fp16) -----------------------------------------------------------------
struct LtDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* p) const { cublasLtMatmulDescDestroy(p); }
  void operator()(cublasLtMatrixLayoutOpaque_t* p) const { cublasLtMatrixLayoutDestroy(p); }
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const { cublasLtMatmulPreferenceDestroy(p); }
};
using LtDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, LtDeleter>;
using LtLayout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LtDeleter>;
using LtPreference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, LtDeleter>;

template <class V>
void set_layout_attr(cublasLtMatrixLayout_t layout, cublasLtMatrixLayoutAttribute_t attr, V value) {
  TESSERA_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, attr, &value, sizeof value));
}
template <class V>
void set_desc_attr(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, V value) {
  TESSERA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof value));
}
template <class V>
void set_pref_attr(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr,
                   V value) {
  TESSERA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof value));
}

// The column-major layout of `stored_rows` x `stored_cols` elements with leading dimension ld.
inline LtLayout make_layout(cudaDataType_t type, int64_t stored_rows, int64_t stored_cols,
                            int64_t ld, int64_t batch, int64_t batch_stride) {
  cublasLtMatrixLayout_t raw = nullptr;
  TESSERA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&raw, type, static_cast<uint64_t>(stored_rows),
                                                  static_cast<uint64_t>(stored_cols), ld));
  LtLayout layout(raw);
  if (batch > 1) {
    set_layout_attr(raw, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, static_cast<int32_t>(batch));
    set_layout_attr(raw, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, batch_stride);
  }
  return layout;
}

// The largest power of two (up to 256) dividing the address and, for batches, the batch
// stride in bytes: what the heuristic must assume about every matrix it will touch.
inline uint32_t alignment_of(const void* p, int64_t batch, int64_t batch_stride_bytes) {
  uint64_t bits = reinterpret_cast<uintptr_t>(p) | 256u;
  if (batch > 1 && batch_stride_bytes != 0) bits |= static_cast<uint64_t>(batch_stride_bytes);
  return static_cast<uint32_t>(bits & (~bits + 1));
}

// c (batch, M, N) = op(a) op(b) (+ bias over every row), in 16-bit T with fp32 accumulation.
// Returns false when the heuristic has no algorithm for this shape and alignment.
template <class T>
bool gemm_lt(const Operand<T>& a, const Operand<T>& b, int64_t batch, int64_t m, int64_t n,
             int64_t k, T* c, const T* bias, cudaStream_t stream) {
  Handles& h = handles();
  constexpr cudaDataType_t type = data_type<T>();
  cublasLtMatmulDesc_t raw_desc = nullptr;
  TESSERA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&raw_desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  LtDesc desc(raw_desc);
  // The swapped call: first operand b (as op(b)^T, N x K), second a (as op(a)^T, K x M).
  const cublasOperation_t op_first = swapped_op(b), op_second = swapped_op(a);
  set_desc_attr(raw_desc, CUBLASLT_MATMUL_DESC_TRANSA, op_first);
  set_desc_attr(raw_desc, CUBLASLT_MATMUL_DESC_TRANSB, op_second);
  if (bias) {
    // The bias has one value per row of the column-major D (N, M): per output feature.
    set_desc_attr(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS);
    set_desc_attr(raw_desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(bias));
    set_desc_attr(raw_desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, type);
  }
  const LtLayout la = op_first == CUBLAS_OP_N
                          ? make_layout(type, n, k, b.ld, batch, b.batch_stride)
                          : make_layout(type, k, n, b.ld, batch, b.batch_stride);
  const LtLayout lb = op_second == CUBLAS_OP_N
                          ? make_layout(type, k, m, a.ld, batch, a.batch_stride)
                          : make_layout(type, m, k, a.ld, batch, a.batch_stride);
  const LtLayout lc = make_layout(type, n, m, n, batch, m * n);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  TESSERA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
  LtPreference pref(raw_pref);
  set_pref_attr(raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kLtWorkspaceBytes);
  const int64_t es = static_cast<int64_t>(sizeof(T));
  set_pref_attr(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                alignment_of(b.data, batch, b.batch_stride * es));
  set_pref_attr(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                alignment_of(a.data, batch, a.batch_stride * es));
  set_pref_attr(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                alignment_of(c, batch, m * n * es));
  set_pref_attr(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                alignment_of(c, batch, m * n * es));

  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(
      h.lt, raw_desc, la.get(), lb.get(), lc.get(), lc.get(), raw_pref, 1, &result, &found);
  if (hs == CUBLAS_STATUS_NOT_SUPPORTED || found == 0) return false;
  TESSERA_CUBLAS_CHECK(hs);

  void* workspace = nullptr;
  const std::size_t ws_bytes = result.workspaceSize;
  if (ws_bytes > 0) TESSERA_CUDA_CHECK(cudaMallocAsync(&workspace, ws_bytes, stream));
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t st =
      cublasLtMatmul(h.lt, raw_desc, &alpha, b.data, la.get(), a.data, lb.get(), &beta, c, lc.get(),
                     c, lc.get(), &result.algo, workspace, ws_bytes, stream);
  if (workspace) TESSERA_CUDA_CHECK(cudaFreeAsync(workspace, stream));
  TESSERA_CUBLAS_CHECK(st);
  return true;
}

// ---- one product ---------------------------------------------------------------------------
template <class T>
void run(const Operand<T>& a, const Operand<T>& b, int64_t batch, int64_t m, int64_t n, int64_t k,
         T* c, const T* bias, Fp32Math math, cudaStream_t stream) {
  const int64_t rows = batch * m;
  if (rows == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: zeros, or the bias
    fill_rows_kernel<T><<<grid_for(rows * n), kThreadsPerBlock, 0, stream>>>(bias, rows, n, c);
    TESSERA_CUDA_CHECK_LAUNCH("fill_rows_kernel");
    return;
  }
  if constexpr (!is_low_precision_v<T>) {
    const cublasComputeType_t compute = std::is_same_v<T, double> ? CUBLAS_COMPUTE_64F
                                        : math == Fp32Math::kTf32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                  : CUBLAS_COMPUTE_32F;
    gemm_cublas<T, T>(a, b, batch, m, n, k, c, compute, stream);
    if (bias) bias_round<T, T>(c, bias, rows, n, c, stream);
  } else {
    // cuBLASLt takes a batch stride of 0 only for some algorithms; a broadcast operand is
    // instead run one batch entry at a time.
    const bool broadcast = batch > 1 && (a.batch_stride == 0 || b.batch_stride == 0);
    bool done = true;
    if (!broadcast) {
      done = gemm_lt<T>(a, b, batch, m, n, k, c, bias, stream);
    } else {
      for (int64_t g = 0; g < batch && done; ++g) {
        Operand<T> ag, bg;
        ag.data = a.data + g * a.batch_stride;
        ag.rows = a.rows, ag.cols = a.cols, ag.ld = a.ld, ag.row_major = a.row_major;
        bg.data = b.data + g * b.batch_stride;
        bg.rows = b.rows, bg.cols = b.cols, bg.ld = b.ld, bg.row_major = b.row_major;
        done = gemm_lt<T>(ag, bg, 1, m, n, k, c + g * m * n, bias, stream);
      }
    }
    if (!done) {
      // No cuBLASLt algorithm: fp32 output, then bias and one rounding (same numbers).
      auto scratch = Tensor<float, Cuda>::empty({rows, n});  // (batch * M, N)
      gemm_cublas<T, float>(a, b, batch, m, n, k, scratch.data(), CUBLAS_COMPUTE_32F, stream);
      bias_round<T, float>(scratch.data(), bias, rows, n, c, stream);
    }
  }
}

template <class T>
void matmul_into(const char* op, TensorView<const T, Cuda> a, TensorView<const T, Cuda> b,
                 Transpose ta, Transpose tb, const T* bias, T* out, Fp32Math math,
                 cudaStream_t stream) {
  const ops::matmul_detail::Dims d = ops::matmul_detail::dims_of(op, a.shape(), b.shape(), ta, tb);
  Operand<T> ha = make_operand<T>(a, ta, stream);
  Operand<T> hb = make_operand<T>(b, tb, stream);
  int64_t batch = d.batch, m = d.m;
  // (B, M, K) x (K, N) with a's batches back to back is one (B*M, K) x (K, N) product.
  if (d.a_batched && !d.b_batched && ha.row_major && ha.batch_stride == m * ha.ld) {
    m *= batch;
    ha.rows = m;
    ha.batch_stride = 0;
    batch = 1;
  }
  if (!d.a_batched) ha.batch_stride = 0;
  if (!d.b_batched) hb.batch_stride = 0;
  run<T>(ha, hb, batch, m, d.n, d.k, out, bias, math, stream);
}

}  // namespace blas_detail

// op(a) * op(b): (M, K) x (K, N) -> (M, N); (B, M, K) x (B, K, N) -> (B, M, N); a rank-2
// operand next to a rank-3 one is used for every batch entry. As ops::matmul.
template <class T>
Tensor<T, Cuda> matmul(TensorView<const T, Cuda> a, TensorView<const T, Cuda> b,
                       Transpose ta = Transpose::kNo, Transpose tb = Transpose::kNo,
                       Fp32Math math = Fp32Math::kExact, cudaStream_t stream = nullptr) {
  auto out = Tensor<T, Cuda>::empty(
      ops::matmul_detail::dims_of("matmul", a.shape(), b.shape(), ta, tb).out);
  blas_detail::matmul_into<T>("matmul", a, b, ta, tb, nullptr, out.data(), math, stream);
  return out;
}

// Gradients of c = op(a) op(b) given dc = dout; as ops::matmul_backward. Each gradient is one
// product (rounded once for bf16/fp16); a broadcast (rank-2) operand's gradient is summed over
// the batch inside that product, by stacking the batch along the inner dimension.
template <class T>
MatmulGrads<T> matmul_backward(TensorView<const T, Cuda> dout, TensorView<const T, Cuda> a,
                               TensorView<const T, Cuda> b, Transpose ta = Transpose::kNo,
                               Transpose tb = Transpose::kNo, Fp32Math math = Fp32Math::kExact,
                               cudaStream_t stream = nullptr) {
  constexpr Transpose kNo = Transpose::kNo, kYes = Transpose::kYes;
  const ops::matmul_detail::Dims d =
      ops::matmul_detail::dims_of("matmul_backward", a.shape(), b.shape(), ta, tb);
  check_shape("matmul_backward", "dout", dout.shape(), d.out);
  const bool at = ta == kYes, bt = tb == kYes;
  const int64_t B = d.batch, M = d.m, N = d.n, K = d.k;
  auto mm = [&](TensorView<const T, Cuda> x, TensorView<const T, Cuda> y, Transpose tx,
                Transpose ty) { return matmul<T>(x, y, tx, ty, math, stream); };
  MatmulGrads<T> g;

  // da: op(a) gets dc op(b)^T.
  if (d.a_batched || !d.b_batched) {
    g.da = at ? (bt ? mm(b, dout, kYes, kYes) : mm(b, dout, kNo, kYes))
              : (bt ? mm(dout, b, kNo, kNo) : mm(dout, b, kNo, kYes));
  } else {
    // a (M, K) broadcast over b's batch: sum_g dc_g op(b_g)^T
    //   = [dc_0 dc_1 ...] (M, B*N) x [op(b_0)^T; op(b_1)^T; ...] (B*N, K).
    const Dense<T> bt_stack(bt ? b : b.transpose(1, 2), stream);         // (B, N, K)
    const Dense<T> dc_cat(dout.transpose(0, 1), stream);                 // (M, B, N)
    const TensorView<const T, Cuda> bs(bt_stack.data, Shape{B * N, K});  // (B*N, K)
    const TensorView<const T, Cuda> dc(dc_cat.data, Shape{M, B * N});    // (M, B*N)
    g.da = at ? mm(bs, dc, kYes, kYes) : mm(dc, bs, kNo, kNo);
  }

  // db: op(b) gets op(a)^T dc.
  if (d.b_batched || !d.a_batched) {
    g.db = bt ? (at ? mm(dout, a, kYes, kYes) : mm(dout, a, kYes, kNo))
              : (at ? mm(a, dout, kNo, kNo) : mm(a, dout, kYes, kNo));
  } else {
    // b (K, N) broadcast over a's batch: sum_g op(a_g)^T dc_g
    //   = [op(a_0); op(a_1); ...]^T (K, B*M) x [dc_0; dc_1; ...] (B*M, N).
    const Dense<T> a_stack(at ? a.transpose(1, 2) : a, stream);          // (B, M, K)
    const Dense<T> dc_stack(dout, stream);                               // (B, M, N)
    const TensorView<const T, Cuda> as(a_stack.data, Shape{B * M, K});   // (B*M, K)
    const TensorView<const T, Cuda> dc(dc_stack.data, Shape{B * M, N});  // (B*M, N)
    g.db = bt ? mm(dc, as, kYes, kNo) : mm(as, dc, kYes, kNo);
  }
  return g;
}

// The fully connected layer's op: y = x weight^T + bias; as ops::linear.
//   x (..., in), weight (out, in), bias (out) or none -> y (..., out).
// For bf16/fp16 the bias is added in fp32 before the single rounding (cuBLASLt epilogue).
template <class T>
Tensor<T, Cuda> linear(TensorView<const T, Cuda> x, TensorView<const T, Cuda> weight,
                       std::optional<TensorView<const T, Cuda>> bias = std::nullopt,
                       Fp32Math math = Fp32Math::kExact, cudaStream_t stream = nullptr) {
  TESSERA_CHECK(x.rank() >= 1, "linear: tensor 'x' has rank 0; expected rank >= 1 (..., in)");
  check_rank("linear", "weight", weight.shape(), 2);
  const int64_t in = x.dim(-1), out_features = weight.dim(0);
  TESSERA_CHECK(weight.dim(1) == in, "linear: tensor 'weight' has shape ", weight.shape(),
                ", expected [", out_features, ", ", in, "] (in = the last axis of 'x' ", x.shape(),
                ")");
  std::optional<Dense<T>> db;
  const T* pbias = nullptr;
  if (bias) {
    check_shape("linear", "bias", bias->shape(), Shape{out_features});
    db.emplace(*bias, stream);
    pbias = db->data;
  }
  Shape out_shape = x.shape();
  out_shape[-1] = out_features;
  auto y = Tensor<T, Cuda>::empty(out_shape);  // (..., out)
  const Dense<T> xd(x, stream);
  const TensorView<const T, Cuda> x2(xd.data, Shape{leading_rows(x.shape()), in});  // (rows, in)
  blas_detail::matmul_into<T>("linear", x2, weight, Transpose::kNo, Transpose::kYes, pbias,
                              y.data(), math, stream);
  return y;
}

// Gradients of linear: dx = dy weight (..., in), dweight = dy^T x (out, in), dbias = dy summed
// over every row (out; deterministic column sum) when with_bias, else an empty tensor.
template <class T>
LinearGrads<T> linear_backward(TensorView<const T, Cuda> dout, TensorView<const T, Cuda> x,
                               TensorView<const T, Cuda> weight, bool with_bias,
                               Fp32Math math = Fp32Math::kExact, cudaStream_t stream = nullptr) {
  TESSERA_CHECK(x.rank() >= 1,
                "linear_backward: tensor 'x' has rank 0; expected rank >= 1 (..., in)");
  check_rank("linear_backward", "weight", weight.shape(), 2);
  const int64_t in = x.dim(-1), out_features = weight.dim(0);
  TESSERA_CHECK(weight.dim(1) == in, "linear_backward: tensor 'weight' has shape ", weight.shape(),
                ", expected [", out_features, ", ", in, "] (in = the last axis of 'x' ", x.shape(),
                ")");
  Shape out_shape = x.shape();
  out_shape[-1] = out_features;
  check_shape("linear_backward", "dout", dout.shape(), out_shape);
  const int64_t r = leading_rows(x.shape());
  const Dense<T> xd(x, stream), dd(dout, stream);
  const TensorView<const T, Cuda> x2(xd.data, Shape{r, in});            // (rows, in)
  const TensorView<const T, Cuda> d2(dd.data, Shape{r, out_features});  // (rows, out)
  LinearGrads<T> g;
  g.dx = Tensor<T, Cuda>::empty(x.shape());
  blas_detail::matmul_into<T>("linear_backward", d2, weight, Transpose::kNo, Transpose::kNo,
                              nullptr, g.dx.data(), math, stream);
  g.dweight = matmul<T>(d2, x2, Transpose::kYes, Transpose::kNo, math, stream);  // (out, in)
  if (with_bias) {
    g.dbias = Tensor<T, Cuda>::empty({out_features});
    column_sum<T, T>(dd.data, r, out_features, g.dbias.data(), stream);
  }
  return g;
}

}  // namespace tessera::cuda

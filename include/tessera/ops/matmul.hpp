// tessera/ops/matmul.hpp — matrix products (plain and batched) and the linear layer's op,
// forward and backward, on the fastest CPU back end the machine and the build offer.
//
// Why several back ends, chosen at run time:
//   * fp32 (and fp64) products of useful size go to OpenBLAS (cblas_sgemm / cblas_dgemm): its
//     kernels are tuned per micro-architecture and picked by OpenBLAS itself at load time.
//     When OpenBLAS did not recognise the processor (its kernel is older than the CPU's AVX2 /
//     AVX-512, see openblas_matches_cpu) fp32 goes to oneDNN's f32 kernels instead.
//     Eigen's own GEMM is the portable fallback when OpenBLAS is not linked, and the choice
//     inside an OpenMP parallel region (OpenBLAS would start its own threads there).
//   * bf16 products go to oneDNN when the processor has native bf16 arithmetic (avx512_bf16
//     or AMX): it accumulates in fp32 and rounds once, and picks its AMX or AVX-512 kernel
//     itself. Primitives are created once per shape/layout and cached. Elsewhere bf16 and
//     fp16 are widened to fp32, multiplied with sgemm and rounded once.
//   * Tiny products (M*N*K < kSmallProduct) use a plain loop: no library call overhead.
//   * TESSERA_CPU_PATH (tessera/core/cpu_features.hpp) forces one back end, and matmul_via()
//     takes one explicitly, so tests can run every path the machine has against the same
//     reference. matmul_path() says which one a call would take.
//
// Numerics: double is computed in double; float in float; bf16/fp16 accumulate in fp32 and
// round once on output (a fused bias is added before that rounding). The summation order
// inside a product is the back end's: the plain loop sums each output in k order, the BLAS
// libraries block the k loop (their results can differ in the last bits from one back end,
// or one thread count, to another).
//
// Operands are described by pointer + strides, so a transposed or sliced view (row-major or
// column-major in its last two axes, any batch stride) is passed to the library without a
// copy; anything else is copied to contiguous first.
//
// Shapes: a (M, K) or (B, M, K), b (K, N) or (B, K, N), each read transposed in its last two
// axes when its Transpose flag says so. A rank-2 operand next to a rank-3 one is broadcast over
// the batch (the same weight for every batch entry); its gradient is the sum over the batch.
#pragma once

#include <algorithm>
#include <array>
#include <cctype>
#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "tessera/core/cpu_features.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/ops/cast.hpp"
#include "tessera/ops/elementwise.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(TESSERA_HAVE_OPENBLAS)
#include <cblas.h>
#endif
// oneDNN's header does not get through nvcc's C++20 front end, and the oneDNN path is a CPU
// back end anyway: translation units compiled by nvcc build matmul without it. So that such a
// unit and an ordinary .cpp can be linked into one program without two different definitions
// of the same inline function, the back-end-dependent part lives in an inline namespace named
// after the configuration (the names then mangle differently).
#if defined(TESSERA_HAVE_DNNL) && !defined(__CUDACC__)
#define TESSERA_MATMUL_DNNL 1
#include <oneapi/dnnl/dnnl.hpp>
#define TESSERA_MATMUL_ABI with_onednn
#else
#define TESSERA_MATMUL_DNNL 0
#define TESSERA_MATMUL_ABI without_onednn
#endif

namespace tessera::ops {

// Whether an operand is read as stored (kNo) or transposed in its last two axes (kYes).
enum class Transpose : bool { kNo = false, kYes = true };

// The CPU back end of a product: kScalar (plain loops), kEigen, kOpenBlas, kOneDnn.
using MatmulPath = CpuPath;

// Below this many multiply-adds per product, the plain loop wins over a library call.
inline constexpr int64_t kSmallProduct = 16 * 16 * 16;

template <class T>
struct MatmulGrads {
  Tensor<T> da;  // same shape as a
  Tensor<T> db;  // same shape as b
};

template <class T>
struct LinearGrads {
  Tensor<T> dx;       // same shape as x: (..., in)
  Tensor<T> dweight;  // (out, in)
  Tensor<T> dbias;    // (out); an empty tensor (no elements) when the layer has no bias
};

inline namespace TESSERA_MATMUL_ABI {
namespace matmul_detail {

using cast_detail::acc_t;
using cast_detail::load;
using cast_detail::store;

template <class T>
inline constexpr bool is_low_precision_v = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

// The sizes of one call, after the shape checks.
struct Dims {
  int64_t batch = 1;  // 1 when both operands are rank 2
  int64_t m = 0, n = 0, k = 0;
  bool a_batched = false, b_batched = false;
  Shape out;  // (M, N) or (B, M, N)
};

inline const char* yes_no(Transpose t) { return t == Transpose::kYes ? "yes" : "no"; }

inline Dims dims_of(const char* op, const Shape& a, const Shape& b, Transpose ta, Transpose tb) {
  TESSERA_CHECK(a.rank() == 2 || a.rank() == 3, op, ": tensor 'a' has rank ", a.rank(), " (shape ",
                a, "), expected rank 2 (M, K) or 3 (B, M, K)");
  TESSERA_CHECK(b.rank() == 2 || b.rank() == 3, op, ": tensor 'b' has rank ", b.rank(), " (shape ",
                b, "), expected rank 2 (K, N) or 3 (B, K, N)");
  Dims d;
  d.a_batched = a.rank() == 3;
  d.b_batched = b.rank() == 3;
  const bool at = ta == Transpose::kYes, bt = tb == Transpose::kYes;
  d.m = at ? a[-1] : a[-2];
  const int64_t ka = at ? a[-2] : a[-1];
  const int64_t kb = bt ? b[-1] : b[-2];
  d.n = bt ? b[-2] : b[-1];
  TESSERA_CHECK(ka == kb, op, ": inner dimensions differ: op(a) is (", d.m, ", K=", ka,
                ") and op(b) is (K=", kb, ", ", d.n, ") [a ", a, " transposed: ", yes_no(ta),
                "; b ", b, " transposed: ", yes_no(tb), "]");
  d.k = ka;
  if (d.a_batched && d.b_batched)
    TESSERA_CHECK(a[0] == b[0], op, ": batch sizes differ: tensor 'a' ", a, " has ", a[0],
                  ", tensor 'b' ", b, " has ", b[0]);
  if (d.a_batched) d.batch = a[0];
  else if (d.b_batched) d.batch = b[0];
  d.out = (d.a_batched || d.b_batched) ? Shape{d.batch, d.m, d.n} : Shape{d.m, d.n};
  return d;
}

// One operand of a batched product, as the logical matrix op(X) of shape (rows, cols):
// element (g, i, j) is at data[g * batch_stride + i * ld + j] when row_major, else at
// data[g * batch_stride + j * ld + i]. batch_stride 0 repeats one matrix over the batch.
template <class T>
struct Operand {
  const T* data = nullptr;
  int64_t batch_stride = 0;
  int64_t rows = 0, cols = 0;
  int64_t ld = 1;
  bool row_major = true;

  const T& at(int64_t g, int64_t i, int64_t j) const {
    return data[g * batch_stride + (row_major ? i * ld + j : j * ld + i)];
  }
};

// An operand plus the contiguous copy it points into when the view's strides did not fit.
template <class T>
struct OperandHolder {
  Tensor<T> owned;
  Operand<T> op;
};

// Describes the stored matrix (R, C) with strides (sr, sc) as row- or column-major with a
// leading dimension, if it is either.
inline bool fit_layout(int64_t r, int64_t c, int64_t sr, int64_t sc, bool& row_major, int64_t& ld) {
  if ((c <= 1 || sc == 1) && (r <= 1 || sr >= std::max<int64_t>(c, 1))) {
    row_major = true;
    ld = r <= 1 ? std::max<int64_t>(c, 1) : sr;
    return true;
  }
  if ((r <= 1 || sr == 1) && (c <= 1 || sc >= std::max<int64_t>(r, 1))) {
    row_major = false;
    ld = c <= 1 ? std::max<int64_t>(r, 1) : sc;
    return true;
  }
  return false;
}

template <class T>
OperandHolder<T> make_operand(TensorView<const T, Cpu> x, Transpose t) {
  OperandHolder<T> h;
  const int r = x.rank();
  const int64_t rows = x.dim(-2), cols = x.dim(-1);
  bool row_major = true;
  int64_t ld = 1;
  const bool batch_ok = r == 2 || x.dim(0) <= 1 || x.strides()[0] >= 0;
  if (!batch_ok || !fit_layout(rows, cols, x.strides()[-2], x.strides()[-1], row_major, ld)) {
    h.owned = x.contiguous();
    x = h.owned.view();
    row_major = true;
    ld = std::max<int64_t>(cols, 1);
  }
  const bool tr = t == Transpose::kYes;
  h.op.data = x.data();
  h.op.batch_stride = r == 3 ? x.strides()[0] : 0;
  h.op.rows = tr ? cols : rows;
  h.op.cols = tr ? rows : cols;
  h.op.ld = ld;
  h.op.row_major = row_major != tr;  // the transpose of a row-major matrix is column-major
  return h;
}

// --- plain loops --------------------------------------------------------------------------
// c (batch, M, N) = a (batch, M, K) * b (batch, K, N), each output summed in k order.
// Parallel over output rows; each row is one thread's, so the result is thread-count free.
template <class T>
void gemm_scalar(const Operand<T>& a, const Operand<T>& b, int64_t batch, int64_t m, int64_t n,
                 int64_t k, T* c) {
  using A = acc_t<T>;
  const int64_t rows = batch * m;
#pragma omp parallel if (rows > 1 && rows * n * k >= (int64_t{1} << 16))
  {
    std::vector<A> acc(static_cast<size_t>(n));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = r / m, i = r % m;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t p = 0; p < k; ++p) {
        const A aip = load<A>(a.at(g, i, p));
        if (b.row_major) {
          const T* brow = b.data + g * b.batch_stride + p * b.ld;
          for (int64_t j = 0; j < n; ++j) acc[j] += aip * load<A>(brow[j]);
        } else {
          for (int64_t j = 0; j < n; ++j) acc[j] += aip * load<A>(b.at(g, p, j));
        }
      }
      T* crow = c + r * n;
      for (int64_t j = 0; j < n; ++j) crow[j] = store<T>(acc[j]);
    }
  }
}

// --- Eigen --------------------------------------------------------------------------------
template <class T, class F>
void with_eigen_map(const Operand<T>& x, int64_t g, F&& f) {
  using Stride = Eigen::OuterStride<>;
  using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ColMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  const T* p = x.data + g * x.batch_stride;
  if (x.row_major) {
    f(Eigen::Map<const RowMat, 0, Stride>(p, x.rows, x.cols, Stride(x.ld)));
  } else {
    f(Eigen::Map<const ColMat, 0, Stride>(p, x.rows, x.cols, Stride(x.ld)));
  }
}

// Many small products run one per thread (Eigen then stays single-threaded inside, since it
// does not nest parallel regions); one large product uses Eigen's own threads.
template <class T>
void gemm_eigen(const Operand<T>& a, const Operand<T>& b, int64_t batch, int64_t m, int64_t n,
                int64_t k, T* c) {
  using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  auto one = [&](int64_t g) {
    Eigen::Map<RowMat> cm(c + g * m * n, m, n);
    with_eigen_map(a, g, [&](const auto& am) {
      with_eigen_map(b, g, [&](const auto& bm) { cm.noalias() = am * bm; });
    });
  };
  const bool per_thread = batch > 1 && m * n * k < 128 * 128 * 128;
#pragma omp parallel for schedule(static) if (per_thread)
  for (int64_t g = 0; g < batch; ++g) one(g);
}

// --- OpenBLAS -----------------------------------------------------------------------------
#if defined(TESSERA_HAVE_OPENBLAS)
// OpenBLAS (pthreads build) keeps its own pool; size it to what OpenMP would use, so
// OMP_NUM_THREADS / omp_set_num_threads govern every back end alike.
inline void sync_openblas_threads() {
#if defined(_OPENMP)
  static std::mutex mu;
  static int last = -1;
  const int want = std::max(1, omp_get_max_threads());
  std::lock_guard<std::mutex> lock(mu);
  if (want != last) {
    openblas_set_num_threads(want);
    last = want;
  }
#endif
}

// OpenBLAS's DYNAMIC_ARCH build picks its kernels from the CPU model at load time; on a model
// it does not know (new or virtualised processors) it falls back to an SSE3 kernel ("Prescott")
// that runs an order of magnitude below the machine. OPENBLAS_CORETYPE (read by OpenBLAS at
// load time, e.g. SkylakeX or Haswell) fixes that; until then fp32 prefers oneDNN.
inline bool openblas_matches_cpu() {
  static const bool ok = [] {
    if (!cpu_features().avx2) return true;  // no wider kernel to expect
    const char* core = openblas_get_corename();
    std::string name = core ? core : "";
    for (char& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    for (const char* good : {"haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"})
      if (name == good) return true;
    return false;
  }();
  return ok;
}

template <class T>
void gemm_openblas(const Operand<T>& a, const Operand<T>& b, int64_t batch, int64_t m, int64_t n,
                   int64_t k, T* c) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  TESSERA_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && a.ld <= INT_MAX && b.ld <= INT_MAX,
                "matmul: OpenBLAS takes 32-bit sizes; (M, N, K) = (", m, ", ", n, ", ", k,
                ") is too large (use TESSERA_CPU_PATH=eigen)");
  sync_openblas_threads();
  const auto ta = a.row_major ? CblasNoTrans : CblasTrans;
  const auto tb = b.row_major ? CblasNoTrans : CblasTrans;
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  for (int64_t g = 0; g < batch; ++g) {
    const T* pa = a.data + g * a.batch_stride;
    const T* pb = b.data + g * b.batch_stride;
    T* pc = c + g * m * n;
    if constexpr (std::is_same_v<T, float>) {
      cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, 1.0f, pa, static_cast<int>(a.ld), pb,
                  static_cast<int>(b.ld), 0.0f, pc, N);
    } else {
      cblas_dgemm(CblasRowMajor, ta, tb, M, N, K, 1.0, pa, static_cast<int>(a.ld), pb,
                  static_cast<int>(b.ld), 0.0, pc, N);
    }
  }
}
#endif

// --- oneDNN -------------------------------------------------------------------------------
#if TESSERA_MATMUL_DNNL
inline dnnl::engine& dnnl_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

template <class T>
constexpr dnnl::memory::data_type dnnl_type() {
  if constexpr (std::is_same_v<T, float>) {
    return dnnl::memory::data_type::f32;
  } else {
    static_assert(std::is_same_v<T, bf16> && sizeof(bf16) == 2, "oneDNN path: float or bf16 only");
    return dnnl::memory::data_type::bf16;
  }
}

// (batch, rows, cols) descriptor of an operand; a broadcast operand has batch extent 1.
template <class T>
dnnl::memory::desc dnnl_desc(const Operand<T>& x, int64_t batch) {
  const int64_t nb = x.batch_stride == 0 ? 1 : batch;
  const int64_t span = x.row_major ? x.rows * x.ld : x.cols * x.ld;
  const int64_t bs = nb == 1 ? std::max<int64_t>(span, 1) : x.batch_stride;
  const dnnl::memory::dims dims{nb, x.rows, x.cols};
  const dnnl::memory::dims strides =
      x.row_major ? dnnl::memory::dims{bs, x.ld, 1} : dnnl::memory::dims{bs, 1, x.ld};
  return dnnl::memory::desc(dims, dnnl_type<T>(), strides);
}

// Primitives are created once per (type, sizes, layouts, bias) and reused: creating one
// costs far more than running a small product. Bounded, so a sweep over many shapes (say,
// growing sequence lengths) cannot grow it without end.
class DnnlCache {
 public:
  using Key = std::array<int64_t, 13>;
  static DnnlCache& instance() {
    static DnnlCache cache;
    return cache;
  }
  template <class Make>
  dnnl::matmul get(const Key& key, Make&& make) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(key);
    if (it != map_.end()) return it->second;
    if (map_.size() >= kCapacity) map_.clear();
    return map_.emplace(key, make()).first->second;
  }

 private:
  static constexpr size_t kCapacity = 256;
  std::mutex mu_;
  std::map<Key, dnnl::matmul> map_;
};

// oneDNN fixes the thread count when it creates a primitive, so a caller that changes
// omp_set_num_threads() between products needs a different one.
inline int64_t dnnl_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

template <class T>
void gemm_onednn(const Operand<T>& a, const Operand<T>& b, int64_t batch, int64_t m, int64_t n,
                 int64_t k, T* c, const T* bias) {
  const DnnlCache::Key key{static_cast<int64_t>(dnnl_type<T>()), batch, m, n, k,
                           a.batch_stride, a.ld, a.row_major, b.batch_stride, b.ld,
                           b.row_major, bias != nullptr, dnnl_threads()};
  const auto a_md = dnnl_desc(a, batch);
  const auto b_md = dnnl_desc(b, batch);
  const dnnl::memory::desc c_md({batch, m, n}, dnnl_type<T>(), dnnl::memory::dims{m * n, n, 1});
  const dnnl::memory::desc bias_md({1, 1, n}, dnnl_type<T>(), dnnl::memory::dims{n, n, 1});
  dnnl::engine& eng = dnnl_engine();
  dnnl::matmul prim;
  try {
    prim = DnnlCache::instance().get(key, [&] {
#if DNNL_VERSION_MAJOR >= 3
      auto pd = bias ? dnnl::matmul::primitive_desc(eng, a_md, b_md, bias_md, c_md)
                     : dnnl::matmul::primitive_desc(eng, a_md, b_md, c_md);
#else
      auto desc = bias ? dnnl::matmul::desc(a_md, b_md, bias_md, c_md)
                       : dnnl::matmul::desc(a_md, b_md, c_md);
      auto pd = dnnl::matmul::primitive_desc(desc, eng);
#endif
      return dnnl::matmul(pd);
    });
    auto mem = [&](const dnnl::memory::desc& md, const void* p) {
      return dnnl::memory(md, eng, const_cast<void*>(p));  // oneDNN does not write inputs
    };
    std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, mem(a_md, a.data)},
                                               {DNNL_ARG_WEIGHTS, mem(b_md, b.data)},
                                               {DNNL_ARG_DST, mem(c_md, c)}};
    if (bias) args.emplace(DNNL_ARG_BIAS, mem(bias_md, bias));
    dnnl::stream stream(eng);
    prim.execute(stream, args);
    stream.wait();
  } catch (const dnnl::error& e) {
    fail("matmul: oneDNN failed for (B, M, N, K) = (", batch, ", ", m, ", ", n, ", ", k,
         "): ", e.what(), " (use TESSERA_CPU_PATH=openblas or eigen)");
  }
}
#endif

// --- path choice --------------------------------------------------------------------------
template <class T>
bool path_available(MatmulPath p) {
  switch (p) {
    case MatmulPath::kScalar:
    case MatmulPath::kEigen:
      return true;
    case MatmulPath::kOpenBlas:
#if defined(TESSERA_HAVE_OPENBLAS)
      return true;
#else
      return false;
#endif
    case MatmulPath::kOneDnn:
#if TESSERA_MATMUL_DNNL
      if constexpr (std::is_same_v<T, float>) {
        return true;
      } else if constexpr (std::is_same_v<T, bf16>) {
        const CpuFeatures& f = cpu_features();
        return f.avx512_bf16 || f.amx_bf16;
      } else {
        return false;
      }
#else
      return false;
#endif
  }
  return false;
}

inline bool in_parallel_region() {
#if defined(_OPENMP)
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

template <class T>
MatmulPath choose_path(int64_t batch, int64_t m, int64_t n, int64_t k) {
  if (const auto forced = cpu_path_override(); forced && path_available<T>(*forced)) return *forced;
  const int64_t work = m * n * k;
  if (work < kSmallProduct) return MatmulPath::kScalar;
  if constexpr (std::is_same_v<T, bf16>) {
    if (path_available<T>(MatmulPath::kOneDnn)) return MatmulPath::kOneDnn;
  }
#if defined(TESSERA_HAVE_OPENBLAS)
  if constexpr (std::is_same_v<T, float>) {
    if (!openblas_matches_cpu() && path_available<T>(MatmulPath::kOneDnn)) return MatmulPath::kOneDnn;
  }
#endif
  if (path_available<T>(MatmulPath::kOpenBlas) && !in_parallel_region() &&
      (batch == 1 || work >= 64 * 64 * 64))
    return MatmulPath::kOpenBlas;
  return MatmulPath::kEigen;
}

// --- running one product ------------------------------------------------------------------
template <class T>
void run_native(MatmulPath path, const Operand<T>& a, const Operand<T>& b, int64_t batch,
                int64_t m, int64_t n, int64_t k, T* c) {
  switch (path) {
    case MatmulPath::kScalar:
      gemm_scalar(a, b, batch, m, n, k, c);
      return;
    case MatmulPath::kEigen:
      gemm_eigen(a, b, batch, m, n, k, c);
      return;
    case MatmulPath::kOpenBlas:
#if defined(TESSERA_HAVE_OPENBLAS)
      gemm_openblas(a, b, batch, m, n, k, c);
      return;
#else
      break;
#endif
    case MatmulPath::kOneDnn:
#if TESSERA_MATMUL_DNNL
      if constexpr (std::is_same_v<T, float>) {
        gemm_onednn<T>(a, b, batch, m, n, k, c, nullptr);
        return;
      }
#endif
      break;
  }
  fail("matmul: path ", to_string(path), " is not available here");
}

// A low-precision operand widened to a contiguous row-major fp32 copy.
template <class T>
Operand<float> widen(const Operand<T>& x, int64_t batch, Tensor<float>& storage) {
  const int64_t nb = x.batch_stride == 0 ? 1 : batch;
  storage = Tensor<float>::empty(Shape{nb, x.rows, x.cols});  // (nvcc 13 needs the Shape spelled out)
  float* out = storage.data();
  const int64_t rows = nb * x.rows, cols = x.cols;
#pragma omp parallel for schedule(static) if (rows * cols >= (int64_t{1} << 15))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) out[r * cols + j] = load<float>(x.at(r / x.rows, r % x.rows, j));
  return {out, nb == 1 ? 0 : x.rows * x.cols, x.rows, x.cols, std::max<int64_t>(cols, 1), true};
}

// c (batch, M, N) = op(a) op(b) (+ bias over every row), on `path`.
template <class T>
void run(MatmulPath path, const Operand<T>& a, const Operand<T>& b, int64_t batch, int64_t m,
         int64_t n, int64_t k, T* c, const T* bias) {
  using A = acc_t<T>;
  const int64_t rows = batch * m;
  if (rows == 0 || n == 0) return;
  auto add_bias_rows = [&](A* out) {
#pragma omp parallel for schedule(static) if (rows * n >= (int64_t{1} << 15))
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j) out[r * n + j] += load<A>(bias[j]);
  };
  if (k == 0) {  // an empty sum: zeros, or the bias
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j) c[r * n + j] = bias ? bias[j] : store<T>(A(0));
    return;
  }
  if constexpr (!is_low_precision_v<T>) {
    if (path == MatmulPath::kOneDnn && bias) {
#if TESSERA_MATMUL_DNNL
      if constexpr (std::is_same_v<T, float>) {
        gemm_onednn<T>(a, b, batch, m, n, k, c, bias);
        return;
      }
#endif
    }
    run_native(path, a, b, batch, m, n, k, c);
    if (bias) add_bias_rows(c);
  } else {
#if TESSERA_MATMUL_DNNL
    if constexpr (std::is_same_v<T, bf16>) {
      if (path == MatmulPath::kOneDnn) {
        gemm_onednn<T>(a, b, batch, m, n, k, c, bias);
        return;
      }
    }
#endif
    TESSERA_CHECK(path != MatmulPath::kOneDnn, "matmul: path onednn is not available for ",
                  number_traits<T>::name);
    Tensor<float> sa, sb;
    const Operand<float> fa = widen(a, batch, sa);
    const Operand<float> fb = widen(b, batch, sb);
    auto fc = Tensor<float>::empty({rows, n});  // (batch * M, N)
    run_native(path, fa, fb, batch, m, n, k, fc.data());
    if (bias) add_bias_rows(fc.data());
    const float* pf = fc.data();
    const int64_t total = rows * n;
#pragma omp parallel for schedule(static) if (total >= (int64_t{1} << 15))
    for (int64_t i = 0; i < total; ++i) c[i] = store<T>(pf[i]);
  }
}

// The whole forward: checks, operand description, the fold of a broadcast b into one big
// product, and the run. Writes into `out` (numel batch * M * N).
template <class T>
void matmul_into(const char* op, std::optional<MatmulPath> path, TensorView<const T, Cpu> a,
                 TensorView<const T, Cpu> b, Transpose ta, Transpose tb, const T* bias, T* out) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || is_low_precision_v<T>,
                "matmul: T must be float, double, bf16 or fp16 (FP8 products go through "
                "quant/fp8_scaling.hpp with explicit scales)");
  const Dims d = dims_of(op, a.shape(), b.shape(), ta, tb);
  const MatmulPath p = path ? *path : choose_path<T>(d.batch, d.m, d.n, d.k);
  TESSERA_CHECK(path_available<T>(p), op, ": path ", to_string(p), " is not available for ",
                number_traits<T>::name, " here (", cpu_features_summary(), ")");
  OperandHolder<T> ha = make_operand(a, ta);
  OperandHolder<T> hb = make_operand(b, tb);
  int64_t batch = d.batch, m = d.m;
  // (B, M, K) x (K, N) with a's batches back to back is one (B*M, K) x (K, N) product.
  if (d.a_batched && !d.b_batched && ha.op.row_major && ha.op.batch_stride == m * ha.op.ld) {
    m *= batch;
    ha.op.rows = m;
    ha.op.batch_stride = 0;
    batch = 1;
  }
  if (!d.a_batched) ha.op.batch_stride = 0;
  if (!d.b_batched) hb.op.batch_stride = 0;
  run(p, ha.op, hb.op, batch, m, d.n, d.k, out, bias);
}

// The number of rows of a row op: the product of every extent but the last.
inline int64_t leading(const Shape& s) {
  int64_t r = 1;
  for (int i = 0; i + 1 < s.rank(); ++i) r *= s[i];
  return r;
}

// A view of x's elements as contiguous, borrowed or copied.
template <class T>
struct DenseView {
  Tensor<T> owned;
  TensorView<const T, Cpu> view;
  explicit DenseView(TensorView<const T, Cpu> x) : view(x) {
    if (!x.is_contiguous()) {
      owned = x.contiguous();
      view = owned.view();
    }
  }
};

}  // namespace matmul_detail
}  // namespace TESSERA_MATMUL_ABI

// One line for logs: the compiled-in back ends and, for OpenBLAS, the kernel it chose.
inline std::string matmul_summary() {
  std::string s = cpu_features_summary();
#if defined(TESSERA_HAVE_OPENBLAS)
  const char* core = openblas_get_corename();
  s += "; openblas kernel ";
  s += core ? core : "?";
  if (!matmul_detail::openblas_matches_cpu())
    s += " (below this CPU: fp32 goes to oneDNN where built; set OPENBLAS_CORETYPE, e.g. "
         "SkylakeX or Haswell, to fix)";
#endif
  return s;
}

// Whether `path` can run products of element type T on this machine and build.
template <class T>
bool matmul_path_available(MatmulPath path) {
  return matmul_detail::path_available<T>(path);
}

// The back end matmul<T> would use for operands of these shapes (honours TESSERA_CPU_PATH;
// a forced path that cannot take T falls back to the automatic choice).
template <class T>
MatmulPath matmul_path(const Shape& a, const Shape& b, Transpose ta = Transpose::kNo,
                       Transpose tb = Transpose::kNo) {
  const matmul_detail::Dims d = matmul_detail::dims_of("matmul_path", a, b, ta, tb);
  return matmul_detail::choose_path<T>(d.batch, d.m, d.n, d.k);
}

// op(a) * op(b): (M, K) x (K, N) -> (M, N); (B, M, K) x (B, K, N) -> (B, M, N); a rank-2
// operand next to a rank-3 one is used for every batch entry.
template <class T>
Tensor<T> matmul(TensorView<const T, Cpu> a, TensorView<const T, Cpu> b,
                 Transpose ta = Transpose::kNo, Transpose tb = Transpose::kNo) {
  auto out = Tensor<T>::empty(matmul_detail::dims_of("matmul", a.shape(), b.shape(), ta, tb).out);
  matmul_detail::matmul_into<T>("matmul", std::nullopt, a, b, ta, tb, nullptr, out.data());
  return out;
}

// The same product on an explicitly chosen back end; throws when it is not available here.
template <class T>
Tensor<T> matmul_via(MatmulPath path, TensorView<const T, Cpu> a, TensorView<const T, Cpu> b,
                     Transpose ta = Transpose::kNo, Transpose tb = Transpose::kNo) {
  auto out = Tensor<T>::empty(matmul_detail::dims_of("matmul", a.shape(), b.shape(), ta, tb).out);
  matmul_detail::matmul_into<T>("matmul", path, a, b, ta, tb, nullptr, out.data());
  return out;
}

// Gradients of c = op(a) op(b) given dc = dout (shape of c). Each gradient is one product
// (rounded once for bf16/fp16); a broadcast (rank-2) operand's gradient is summed over the
// batch inside that product, by stacking the batch along the inner dimension.
template <class T>
MatmulGrads<T> matmul_backward(TensorView<const T, Cpu> dout, TensorView<const T, Cpu> a,
                               TensorView<const T, Cpu> b, Transpose ta = Transpose::kNo,
                               Transpose tb = Transpose::kNo) {
  using matmul_detail::DenseView;
  constexpr Transpose kNo = Transpose::kNo, kYes = Transpose::kYes;
  const matmul_detail::Dims d = matmul_detail::dims_of("matmul_backward", a.shape(), b.shape(), ta, tb);
  check_shape("matmul_backward", "dout", dout.shape(), d.out);
  const bool at = ta == kYes, bt = tb == kYes;
  const int64_t B = d.batch, M = d.m, N = d.n, K = d.k;
  MatmulGrads<T> g;

  // da: op(a) gets dc op(b)^T.
  if (d.a_batched || !d.b_batched) {
    g.da = at ? (bt ? matmul<T>(b, dout, kYes, kYes) : matmul<T>(b, dout, kNo, kYes))
              : (bt ? matmul<T>(dout, b, kNo, kNo) : matmul<T>(dout, b, kNo, kYes));
  } else {
    // a (M, K) broadcast over b's batch: sum_g dc_g op(b_g)^T
    //   = [dc_0 dc_1 ...] (M, B*N) x [op(b_0)^T; op(b_1)^T; ...] (B*N, K).
    const DenseView<T> bt_stack(bt ? b : b.transpose(1, 2));            // (B, N, K)
    const DenseView<T> dc_cat(dout.transpose(0, 1));                     // (M, B, N)
    const auto bs = bt_stack.view.reshape({B * N, K});                   // (B*N, K)
    const auto dc = dc_cat.view.reshape({M, B * N});                     // (M, B*N)
    g.da = at ? matmul<T>(bs, dc, kYes, kYes) : matmul<T>(dc, bs, kNo, kNo);
  }

  // db: op(b) gets op(a)^T dc.
  if (d.b_batched || !d.a_batched) {
    g.db = bt ? (at ? matmul<T>(dout, a, kYes, kYes) : matmul<T>(dout, a, kYes, kNo))
              : (at ? matmul<T>(a, dout, kNo, kNo) : matmul<T>(a, dout, kYes, kNo));
  } else {
    // b (K, N) broadcast over a's batch: sum_g op(a_g)^T dc_g
    //   = [op(a_0); op(a_1); ...]^T (K, B*M) x [dc_0; dc_1; ...] (B*M, N).
    const DenseView<T> a_stack(at ? a.transpose(1, 2) : a);  // (B, M, K)
    const DenseView<T> dc_stack(dout);                        // (B, M, N)
    const auto as = a_stack.view.reshape({B * M, K});         // (B*M, K)
    const auto dc = dc_stack.view.reshape({B * M, N});        // (B*M, N)
    g.db = bt ? matmul<T>(dc, as, kYes, kNo) : matmul<T>(as, dc, kYes, kNo);
  }
  return g;
}

// The fully connected layer's op: y = x weight^T + bias.
//   x (..., in), weight (out, in) as nn.Linear stores it, bias (out) or none -> y (..., out).
// The bias is added before the single rounding of a bf16/fp16 output.
template <class T>
Tensor<T> linear(TensorView<const T, Cpu> x, TensorView<const T, Cpu> weight,
                 std::optional<TensorView<const T, Cpu>> bias = std::nullopt) {
  TESSERA_CHECK(x.rank() >= 1, "linear: tensor 'x' has rank 0; expected rank >= 1 (..., in)");
  check_rank("linear", "weight", weight.shape(), 2);
  const int64_t in = x.dim(-1), out_features = weight.dim(0);
  TESSERA_CHECK(weight.dim(1) == in, "linear: tensor 'weight' has shape ", weight.shape(),
                ", expected [", out_features, ", ", in, "] (in = the last axis of 'x' ", x.shape(), ")");
  const T* pbias = nullptr;
  matmul_detail::DenseView<T> db(bias ? *bias : TensorView<const T, Cpu>());
  if (bias) {
    check_shape("linear", "bias", bias->shape(), Shape{out_features});
    pbias = db.view.data();
  }
  Shape out_shape = x.shape();
  out_shape[-1] = out_features;
  auto y = Tensor<T>::empty(out_shape);  // (..., out)
  const matmul_detail::DenseView<T> xd(x);
  const TensorView<const T, Cpu> x2(xd.view.data(), Shape{matmul_detail::leading(x.shape()), in});  // (rows, in)
  matmul_detail::matmul_into<T>("linear", std::nullopt, x2, weight, Transpose::kNo,
                                Transpose::kYes, pbias, y.data());
  return y;
}

// Gradients of linear: dx = dy weight (..., in), dweight = dy^T x (out, in), dbias = dy summed
// over every row (out) when with_bias, else an empty tensor.
template <class T>
LinearGrads<T> linear_backward(TensorView<const T, Cpu> dout, TensorView<const T, Cpu> x,
                               TensorView<const T, Cpu> weight, bool with_bias) {
  TESSERA_CHECK(x.rank() >= 1, "linear_backward: tensor 'x' has rank 0; expected rank >= 1 (..., in)");
  check_rank("linear_backward", "weight", weight.shape(), 2);
  const int64_t in = x.dim(-1), out_features = weight.dim(0);
  TESSERA_CHECK(weight.dim(1) == in, "linear_backward: tensor 'weight' has shape ",
                weight.shape(), ", expected [", out_features, ", ", in,
                "] (in = the last axis of 'x' ", x.shape(), ")");
  Shape out_shape = x.shape();
  out_shape[-1] = out_features;
  check_shape("linear_backward", "dout", dout.shape(), out_shape);
  const int64_t r = matmul_detail::leading(x.shape());
  const matmul_detail::DenseView<T> xd(x), dd(dout);
  const TensorView<const T, Cpu> x2(xd.view.data(), Shape{r, in});             // (rows, in)
  const TensorView<const T, Cpu> d2(dd.view.data(), Shape{r, out_features});   // (rows, out)
  LinearGrads<T> g;
  g.dx = Tensor<T>::empty(x.shape());
  matmul_detail::matmul_into<T>("linear_backward", std::nullopt, d2, weight, Transpose::kNo,
                                Transpose::kNo, nullptr, g.dx.data());
  g.dweight = matmul<T>(d2, x2, Transpose::kYes, Transpose::kNo);  // (out, in)
  if (with_bias) g.dbias = bias_grad<T>(d2);
  return g;
}

}  // namespace tessera::ops

// Every CUDA kernel against the CPU op it mirrors: random inputs made on the CPU with a fixed,
// printed seed, the CPU op and the kernel run on the same values, and the results compared
// element by element with a per-op tolerance (each stated where it is used, with why).
// Shapes are deliberately odd (rows 5, 7, 13; widths 11, 129, 8192) so that partial warps,
// partial blocks, ragged FP8 tiles and unaligned leading dimensions are all exercised.
//
// Without a CUDA device every case is skipped through a Boost.Test precondition (never passed);
// CTest turns Boost's skip message into "Skipped" (tests/cuda/CMakeLists.txt).
//
// Tolerances: |gpu - cpu| <= atol + rtol * |cpu| element-wise, unless stated otherwise.
//   exact ops (cast, FP8 quantisation, RoPE pass-through) compare bits;
//   row ops in float/double: a few ulps of the type (different summation order and exp);
//   bf16/fp16 outputs: 2 ulps of the format relative (one rounding flip caused by fp32
//   differences in the last bits, plus the fp32 error itself);
//   matrix products: scaled by sqrt(K) * eps * sum_k |a_ik| |b_kj| (see check_matmul).
#define BOOST_TEST_MODULE test_cuda_ops
#include <boost/test/unit_test.hpp>

// Under nvcc the CPU matmul leaves out its oneDNN back end (see matmul.hpp); the reference
// then uses OpenBLAS/Eigen/plain loops, all of which it is itself tested against.

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cast.cuh"
#include "kernels/common.cuh"
#include "kernels/cross_entropy.cuh"
#include "kernels/fp8_quantize.cuh"
#include "kernels/matmul_cublas.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/softmax.cuh"
#include "tessera/ops/cast.hpp"
#include "tessera/ops/cross_entropy.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/ops/norm.hpp"
#include "tessera/ops/rope.hpp"
#include "tessera/ops/softmax.hpp"
#include "tessera/quant/fp8_scaling.hpp"

// Everything lives in a named namespace: nvcc writes host stubs for the kernels at global
// scope that spell CCCL's `cuda::std::...` unqualified, and a global `using namespace tessera`
// would make `cuda` ambiguous there (with tessera::cuda).
namespace tessera_cuda_ops_test {

namespace utf = boost::unit_test;
using namespace tessera;
using ops::Transpose;
// Not `cuda::`: with `using namespace tessera`, that name is ambiguous with CCCL's ::cuda.
namespace tc = tessera::cuda;

namespace {

// ---- the precondition ------------------------------------------------------------------------
struct has_cuda_device {
  boost::test_tools::assertion_result operator()(utf::test_unit_id) const {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status == cudaSuccess && count > 0) return true;
    boost::test_tools::assertion_result r(false);
    r.message() << "no CUDA device (cudaGetDeviceCount: "
                << (status == cudaSuccess ? std::string("0 devices")
                                          : std::string(cudaGetErrorString(status)))
                << ")";
    return r;
  }
};

#define CUDA_TEST_CASE(name) BOOST_AUTO_TEST_CASE(name, *utf::precondition(has_cuda_device{}))

// ---- inputs ----------------------------------------------------------------------------------
template <class T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else if constexpr (std::is_same_v<T, float>) {
    return static_cast<float>(v);
  } else {
    return from_float<T>(static_cast<float>(v));
  }
}

template <class T>
double as_double(T v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<double>(v);
  } else {
    return static_cast<double>(to_float(v));
  }
}

// Uniform in [lo, hi), rounded to T. The seed is printed so a failure can be replayed.
template <class T>
Tensor<T> random_tensor(Shape shape, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  BOOST_TEST_MESSAGE("  random " << number_traits<T>::name << shape << " seed " << seed);
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  auto t = Tensor<T>::empty(shape);
  for (T& v : t.span()) v = from_double<T>(dist(gen));
  return t;
}

template <class T>
Tensor<T, Cuda> to_gpu(const Tensor<T>& t) {
  return t.template to<Cuda>();
}
template <class T>
Tensor<T> to_cpu(const Tensor<T, Cuda>& t) {
  return t.template to<Cpu>();
}

// ---- comparisons -----------------------------------------------------------------------------
// |got - want| <= atol + rtol * |want| for every element (NaN must meet NaN, inf the same inf).
template <class T>
void check_close(const std::string& what, const Tensor<T>& got, const Tensor<T>& want, double atol,
                 double rtol) {
  BOOST_TEST_CONTEXT(what) {
    BOOST_TEST_REQUIRE(got.shape() == want.shape(),
                       "shape " << got.shape() << " vs " << want.shape());
    int64_t bad = 0, worst = -1;
    double worst_excess = 0.0, norm = 0.0;
    for (int64_t i = 0; i < want.numel(); ++i) {
      const double g = as_double(got.data()[i]), w = as_double(want.data()[i]);
      if (std::isnan(w) || std::isnan(g)) {
        if (std::isnan(w) != std::isnan(g)) {
          ++bad;
          if (worst < 0) worst = i;
        }
        continue;
      }
      if (std::isinf(w) || std::isinf(g)) {
        if (g != w) {
          ++bad;
          if (worst < 0) worst = i;
        }
        continue;
      }
      norm += std::abs(w);
      const double excess = std::abs(g - w) - (atol + rtol * std::abs(w));
      if (excess > 0) {
        ++bad;
        if (worst < 0 || excess > worst_excess) worst = i, worst_excess = excess;
      }
    }
    BOOST_TEST(bad == 0, bad << " of " << want.numel() << " elements differ; worst at flat index "
                             << worst << ": gpu "
                             << (worst >= 0 ? as_double(got.data()[worst]) : 0.0) << ", cpu "
                             << (worst >= 0 ? as_double(want.data()[worst]) : 0.0) << " (atol "
                             << atol << ", rtol " << rtol << ")");
    BOOST_TEST_MESSAGE("  " << what << ": " << want.numel() << " elements, sum |cpu| = " << norm);
  }
}

template <class T>
void check_close(const std::string& what, const Tensor<T, Cuda>& got, const Tensor<T>& want,
                 double atol, double rtol) {
  check_close(what, to_cpu(got), want, atol, rtol);
}

// Bit-for-bit equality (NaN: both NaN, any payload; see kernels/cast.cuh).
template <class T>
void check_bits(const std::string& what, const Tensor<T>& got, const Tensor<T>& want) {
  BOOST_TEST_CONTEXT(what) {
    BOOST_TEST_REQUIRE(got.shape() == want.shape(),
                       "shape " << got.shape() << " vs " << want.shape());
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < want.numel(); ++i) {
      const T g = got.data()[i], w = want.data()[i];
      const bool both_nan = std::isnan(as_double(g)) && std::isnan(as_double(w));
      if (!both_nan && std::memcmp(&g, &w, sizeof(T)) != 0) {
        ++bad;
        if (first < 0) first = i;
      }
    }
    BOOST_TEST(bad == 0, bad << " of " << want.numel()
                             << " elements differ in their bits; first at " << first << ": gpu "
                             << (first >= 0 ? as_double(got.data()[first]) : 0.0) << ", cpu "
                             << (first >= 0 ? as_double(want.data()[first]) : 0.0));
  }
}
template <class T>
void check_bits(const std::string& what, const Tensor<T, Cuda>& got, const Tensor<T>& want) {
  check_bits(what, to_cpu(got), want);
}

template <class T>
bool all_equal_bits(const Tensor<T>& a, const Tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

// The tolerance of a T output that went through fp32 arithmetic: `ulps` ulps of T relative,
// with an absolute floor for values near zero.
template <class T>
double rtol_of(double ulps) {
  return ulps * static_cast<double>(number_traits<T>::epsilon);
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

// =============================================================================================
BOOST_AUTO_TEST_SUITE(common)

CUDA_TEST_CASE(strided_views_are_gathered) {
  // A (5, 7) view with strides (14, 2) into a (5, 14) tensor: neither row- nor column-major.
  const auto host = random_tensor<float>({5, 14}, 11);
  const auto dev = to_gpu(host);
  const TensorView<const float, Cuda> v(dev.data(), Shape{5, 7}, Strides{14, 2});
  const TensorView<const float, Cpu> hv(host.data(), Shape{5, 7}, Strides{14, 2});
  check_bits("gather", tc::contiguous<float>(v), hv.contiguous());
  // and a rank-3 transpose
  const auto h3 = random_tensor<bf16>({3, 5, 7}, 12);
  const auto d3 = to_gpu(h3);
  check_bits("transpose", tc::contiguous<bf16>(d3.transpose(0, 2)),
             h3.transpose(0, 2).contiguous());
}

CUDA_TEST_CASE(column_sum_is_deterministic_and_matches) {
  for (int64_t rows : {5, 1000, 5000}) {  // 5000 rows: two passes (chunks of 1024)
    const auto h = random_tensor<float>({rows, 129}, 20 + rows);
    const auto d = to_gpu(h);
    auto out1 = Tensor<float, Cuda>::empty({129});
    auto out2 = Tensor<float, Cuda>::empty({129});
    tc::column_sum<float, float>(d.data(), rows, 129, out1.data(), nullptr);
    tc::column_sum<float, float>(d.data(), rows, 129, out2.data(), nullptr);
    const auto r1 = to_cpu(out1), r2 = to_cpu(out2);
    BOOST_TEST(all_equal_bits(r1, r2), "column_sum differs between two runs");
    auto want = Tensor<float>::empty({129});
    for (int64_t j = 0; j < 129; ++j) {
      double s = 0;
      for (int64_t r = 0; r < rows; ++r) s += h(r, j);
      want(j) = static_cast<float>(s);
    }
    // fp32 sums of `rows` values in [-1, 1): error ~ sqrt(rows) * eps per partial.
    check_close("column_sum rows " + std::to_string(rows), r1, want,
                1e-6 * static_cast<double>(rows), 0.0);
  }
}

CUDA_TEST_CASE(cuda_errors_throw_tessera_error) {
  // An impossible allocation (non-sticky: the context stays usable for the next cases)
  // surfaces as tessera::Error naming the call and CUDA's message.
  const std::string msg = error_of([] {
    void* p = nullptr;
    TESSERA_CUDA_CHECK(cudaMalloc(&p, std::size_t{1} << 62));
  });
  BOOST_TEST(msg.find("cudaMalloc") != std::string::npos, msg);
  BOOST_TEST(msg.find("CUDA error") != std::string::npos, msg);
  (void)cudaGetLastError();  // clear the recorded error; the context must still work
  BOOST_TEST(cudaGetLastError() == cudaSuccess);
  BOOST_TEST(to_cpu(to_gpu(Tensor<float>::full({3}, 2.0f)))(2) == 2.0f);
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
// cast: bit-exact with ops::cast.
BOOST_AUTO_TEST_SUITE(cast)

namespace {

// Random floats over many binades, plus the special values every conversion must get right.
Tensor<float> cast_inputs(uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<float> v = {0.0f,
                          -0.0f,
                          1.0f,
                          -1.0f,
                          448.0f,
                          449.0f,
                          464.0f,
                          -480.0f,
                          57344.0f,
                          61440.0f,
                          65504.0f,
                          65520.0f,
                          1e-8f,
                          -1e-10f,
                          0x1p-9f,
                          0x1p-10f,
                          0x1p-16f,
                          0x1p-17f,
                          3.3895314e38f,
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(),
                          std::numeric_limits<float>::denorm_min()};
  std::uniform_int_distribution<int> exp_dist(-30, 20);
  std::uniform_real_distribution<float> mant(-2.0f, 2.0f);
  while (v.size() < 8192 + 129) v.push_back(std::ldexp(mant(gen), exp_dist(gen)));
  std::uniform_int_distribution<uint32_t> bits;  // raw bit patterns: every float class
  for (int i = 0; i < 4096; ++i) {
    const uint32_t b = bits(gen);
    float f;
    std::memcpy(&f, &b, 4);
    v.push_back(f);
  }
  return Tensor<float>::from(Shape{static_cast<int64_t>(v.size())}, std::span<const float>(v));
}

template <class To, class From>
void check_cast(const Tensor<From>& host, Fp8Saturation mode, const std::string& what) {
  const auto dev = to_gpu(host);
  check_bits(what, tc::cast<To, From>(dev.view(), mode), ops::cast<To, From>(host.view(), mode));
}

template <class To>
void check_from_float(const Tensor<float>& x, const std::string& name) {
  check_cast<To, float>(x, Fp8Saturation::kSatFinite, "float -> " + name + " (satfinite)");
  check_cast<To, float>(x, Fp8Saturation::kNone, "float -> " + name + " (nosat)");
}

template <class Fp8>
Tensor<Fp8> every_code() {
  auto t = Tensor<Fp8>::empty({256});
  for (int i = 0; i < 256; ++i) t.data()[i] = Fp8::from_bits(static_cast<uint8_t>(i));
  return t;
}

}  // namespace

CUDA_TEST_CASE(float_to_every_type_bit_exact) {
  const auto x = cast_inputs(101);
  check_from_float<bf16>(x, "bf16");
  check_from_float<fp16>(x, "fp16");
  check_from_float<fp8_e4m3>(x, "fp8_e4m3");
  check_from_float<fp8_e5m2>(x, "fp8_e5m2");
  check_from_float<double>(x, "double");
  check_from_float<float>(x, "float");
}

CUDA_TEST_CASE(every_fp8_code_decodes_bit_exact) {
  const auto e4 = every_code<fp8_e4m3>();
  const auto e5 = every_code<fp8_e5m2>();
  check_cast<float, fp8_e4m3>(e4, Fp8Saturation::kSatFinite, "e4m3 -> float");
  check_cast<float, fp8_e5m2>(e5, Fp8Saturation::kSatFinite, "e5m2 -> float");
  check_cast<bf16, fp8_e4m3>(e4, Fp8Saturation::kSatFinite, "e4m3 -> bf16");
  check_cast<fp16, fp8_e5m2>(e5, Fp8Saturation::kSatFinite, "e5m2 -> fp16");
  check_cast<fp8_e5m2, fp8_e4m3>(e4, Fp8Saturation::kNone, "e4m3 -> e5m2");
  check_cast<fp8_e4m3, fp8_e5m2>(e5, Fp8Saturation::kNone, "e5m2 -> e4m3 (nosat)");
  check_cast<fp8_e4m3, fp8_e5m2>(e5, Fp8Saturation::kSatFinite, "e5m2 -> e4m3 (satfinite)");
  check_cast<double, fp8_e4m3>(e4, Fp8Saturation::kSatFinite, "e4m3 -> double");
}

CUDA_TEST_CASE(between_16_bit_and_double_bit_exact) {
  const auto x = cast_inputs(102);
  const auto b = ops::cast<bf16, float>(x.view());
  const auto h = ops::cast<fp16, float>(x.view());
  const auto d = ops::cast<double, float>(x.view());
  check_cast<float, bf16>(b, Fp8Saturation::kSatFinite, "bf16 -> float");
  check_cast<fp16, bf16>(b, Fp8Saturation::kSatFinite, "bf16 -> fp16");
  check_cast<fp8_e4m3, bf16>(b, Fp8Saturation::kSatFinite, "bf16 -> e4m3");
  check_cast<bf16, fp16>(h, Fp8Saturation::kSatFinite, "fp16 -> bf16");
  check_cast<fp8_e5m2, fp16>(h, Fp8Saturation::kNone, "fp16 -> e5m2 (nosat)");
  check_cast<bf16, double>(d, Fp8Saturation::kSatFinite, "double -> bf16");
  check_cast<fp8_e4m3, double>(d, Fp8Saturation::kNone, "double -> e4m3 (nosat)");
  check_cast<double, bf16>(b, Fp8Saturation::kSatFinite, "bf16 -> double");
}

CUDA_TEST_CASE(strided_input_and_odd_shapes) {
  const auto x = random_tensor<float>({13, 129}, 103, -500.0, 500.0);
  const auto dev = to_gpu(x);
  check_bits("transposed float -> e4m3", tc::cast<fp8_e4m3>(dev.transpose(0, 1)),
             ops::cast<fp8_e4m3>(x.transpose(0, 1)));
  const auto empty = Tensor<float, Cuda>::empty({0, 7});
  BOOST_TEST(tc::cast<bf16>(empty).numel() == 0);
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
// matmul / linear via cuBLAS and cuBLASLt, against ops::matmul.
BOOST_AUTO_TEST_SUITE(matmul)

namespace {

template <class T>
Tensor<double> abs_double(TensorView<const T, Cpu> x) {
  const auto c = x.contiguous();
  auto out = Tensor<double>::empty(x.shape());
  for (int64_t i = 0; i < c.numel(); ++i) out.data()[i] = std::abs(as_double(c.data()[i]));
  return out;
}

// Compares a product with the CPU's. The tolerance of element (i, j) is
//   out_ulps * eps_T * |c_ij| + 4 * sqrt(K) * eps_acc * sum_k |a_ik| |b_kj|:
// the first term is the output rounding of a 16-bit T (a flip of one ulp when the two fp32
// sums straddle a rounding boundary), the second the accumulation error of two different
// summation orders (expected size sqrt(K) * eps times the sum of magnitudes; 4x margin).
template <class T>
void check_matmul(const std::string& what, const Tensor<T, Cuda>& got_dev, const Tensor<T>& want,
                  const Tensor<double>& magnitude, int64_t k, double acc_eps) {
  const auto got = to_cpu(got_dev);
  BOOST_TEST_CONTEXT(what) {
    BOOST_TEST_REQUIRE(got.shape() == want.shape());
    BOOST_TEST_REQUIRE(magnitude.numel() == want.numel());
    const double out_eps = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>
                               ? 1.01 * static_cast<double>(number_traits<T>::epsilon)
                               : 0.0;
    int64_t bad = 0, worst = -1;
    double worst_ratio = 0, norm = 0;
    for (int64_t i = 0; i < want.numel(); ++i) {
      const double g = as_double(got.data()[i]), w = as_double(want.data()[i]);
      const double tol = out_eps * std::abs(w) +
                         4.0 * std::sqrt(static_cast<double>(k)) * acc_eps * magnitude.data()[i] +
                         1e-30;
      norm += std::abs(w);
      const double ratio = std::abs(g - w) / tol;
      if (!(ratio <= 1.0)) {
        ++bad;
        if (ratio > worst_ratio || worst < 0) worst = i, worst_ratio = ratio;
      }
    }
    BOOST_TEST(bad == 0, bad << " of " << want.numel() << " differ; worst at " << worst
                             << " (error / tol = " << worst_ratio << ")");
    if (k > 0) BOOST_TEST(norm > 0.0, "the product is all zero");
  }
}

// The CPU reference of a product in T. float and double: the CPU op itself. bf16 and fp16:
// the CPU op's fp32 path spelled out (widen exactly, multiply with ops::matmul<float>, round
// once), which is what ops::matmul<bf16> computes without oneDNN. It is called through float
// because nvcc 13 rejects ops::matmul.hpp's low-precision widen() (a cudafe++ bug with a
// braced list holding `x.rows`; see docs/cuda.md), while the float path compiles.
template <class T>
inline constexpr bool kLowPrecision = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

template <class To, class From>
Tensor<To> cast_to(TensorView<const From, Cpu> x) {
  return ops::cast<To, From>(x);
}

template <class T>
Tensor<T> ref_matmul(TensorView<const T, Cpu> a, TensorView<const T, Cpu> b,
                     Transpose ta = Transpose::kNo, Transpose tb = Transpose::kNo) {
  if constexpr (kLowPrecision<T>) {
    return cast_to<T, float>(
        ops::matmul<float>(cast_to<float, T>(a), cast_to<float, T>(b), ta, tb));
  } else {
    return ops::matmul<T>(a, b, ta, tb);
  }
}

template <class T>
ops::MatmulGrads<T> ref_matmul_backward(TensorView<const T, Cpu> dc, TensorView<const T, Cpu> a,
                                        TensorView<const T, Cpu> b, Transpose ta, Transpose tb) {
  if constexpr (kLowPrecision<T>) {
    const auto g = ops::matmul_backward<float>(cast_to<float, T>(dc), cast_to<float, T>(a),
                                               cast_to<float, T>(b), ta, tb);
    return {cast_to<T, float>(g.da), cast_to<T, float>(g.db)};
  } else {
    return ops::matmul_backward<T>(dc, a, b, ta, tb);
  }
}

template <class T>
Tensor<T> ref_linear(TensorView<const T, Cpu> x, TensorView<const T, Cpu> w,
                     std::optional<TensorView<const T, Cpu>> bias) {
  if constexpr (kLowPrecision<T>) {
    const auto xf = cast_to<float, T>(x), wf = cast_to<float, T>(w);
    std::optional<Tensor<float>> bf;
    std::optional<TensorView<const float, Cpu>> bv;
    if (bias) bf = cast_to<float, T>(*bias), bv = bf->view();
    return cast_to<T, float>(ops::linear<float>(xf, wf, bv));
  } else {
    return ops::linear<T>(x, w, bias);
  }
}

template <class T>
ops::LinearGrads<T> ref_linear_backward(TensorView<const T, Cpu> dy, TensorView<const T, Cpu> x,
                                        TensorView<const T, Cpu> w, bool with_bias) {
  if constexpr (kLowPrecision<T>) {
    const auto g = ops::linear_backward<float>(cast_to<float, T>(dy), cast_to<float, T>(x),
                                               cast_to<float, T>(w), with_bias);
    ops::LinearGrads<T> r{cast_to<T, float>(g.dx), cast_to<T, float>(g.dweight), Tensor<T>()};
    if (with_bias) r.dbias = cast_to<T, float>(g.dbias);
    return r;
  } else {
    return ops::linear_backward<T>(dy, x, w, with_bias);
  }
}

template <class T>
double acc_eps_of(tc::Fp32Math math = tc::Fp32Math::kExact) {
  if (std::is_same_v<T, double>) return std::numeric_limits<double>::epsilon();
  if (std::is_same_v<T, float> && math == tc::Fp32Math::kTf32) return 0x1p-10;  // TF32 inputs
  return std::numeric_limits<float>::epsilon();
}

// ops::matmul and tc::matmul on the same operands; also their backward.
template <class T>
void run_matmul(Shape sa, Shape sb, Transpose ta, Transpose tb, uint64_t seed, bool backward = true,
                tc::Fp32Math math = tc::Fp32Math::kExact) {
  const std::string what = std::string(number_traits<T>::name) + " a" + sa.str() +
                           (ta == Transpose::kYes ? "^T" : "") + " b" + sb.str() +
                           (tb == Transpose::kYes ? "^T" : "");
  const auto a = random_tensor<T>(sa, seed), b = random_tensor<T>(sb, seed + 1);
  const auto da = to_gpu(a), db = to_gpu(b);
  const auto want = ref_matmul<T>(a, b, ta, tb);
  const auto got = tc::matmul<T>(da, db, ta, tb, math);
  // sum_k |a||b|: the same product on magnitudes, in double.
  const auto mag = ops::matmul<double>(abs_double<T>(a), abs_double<T>(b), ta, tb);
  const int64_t k = ta == Transpose::kYes ? sa[-2] : sa[-1];
  check_matmul(what, got, want, mag, k, acc_eps_of<T>(math));
  if (!backward) return;
  const auto dc = random_tensor<T>(want.shape(), seed + 2);
  const auto ddc = to_gpu(dc);
  const auto gw = ref_matmul_backward<T>(dc, a, b, ta, tb);
  const auto gg = tc::matmul_backward<T>(ddc, da, db, ta, tb, math);
  // da = dc op(b)^T sums over N (and the batch when a is broadcast); db over M (and batch).
  const auto abs_dc = abs_double<T>(dc);
  const auto mag_da =
      ops::matmul_backward<double>(abs_dc, abs_double<T>(a), abs_double<T>(b), ta, tb);
  const int64_t batch = want.rank() == 3 ? want.dim(0) : 1;
  const int64_t m = want.dim(-2), n = want.dim(-1);
  check_matmul(what + " da", gg.da, gw.da, mag_da.da, n * (sa.rank() == 2 ? batch : 1),
               acc_eps_of<T>(math));
  check_matmul(what + " db", gg.db, gw.db, mag_da.db, m * (sb.rank() == 2 ? batch : 1),
               acc_eps_of<T>(math));
}

template <class T>
void run_all_layouts(uint64_t seed) {
  constexpr Transpose N = Transpose::kNo, Y = Transpose::kYes;
  run_matmul<T>({5, 11}, {11, 7}, N, N, seed);
  run_matmul<T>({11, 5}, {11, 7}, Y, N, seed + 10);
  run_matmul<T>({5, 11}, {7, 11}, N, Y, seed + 20);
  run_matmul<T>({11, 5}, {7, 11}, Y, Y, seed + 30);
  run_matmul<T>({13, 129}, {129, 7}, N, N, seed + 40);
  run_matmul<T>({3, 7, 13}, {3, 13, 11}, N, N, seed + 50);       // batched
  run_matmul<T>({3, 13, 7}, {3, 11, 13}, Y, Y, seed + 60);       // batched, both transposed
  run_matmul<T>({3, 7, 13}, {13, 11}, N, N, seed + 70);          // b broadcast (folded)
  run_matmul<T>({3, 13, 7}, {13, 11}, Y, N, seed + 80);          // b broadcast, a transposed
  run_matmul<T>({7, 13}, {3, 13, 11}, N, N, seed + 90);          // a broadcast
  run_matmul<T>({5, 8192}, {8192, 7}, N, N, seed + 100, false);  // long K
  run_matmul<T>({13, 0}, {0, 5}, N, N, seed + 110, false);       // K = 0: zeros
}

}  // namespace

CUDA_TEST_CASE(float_exact_all_layouts) { run_all_layouts<float>(1000); }
CUDA_TEST_CASE(double_all_layouts) { run_all_layouts<double>(2000); }
CUDA_TEST_CASE(bf16_lt_all_layouts) { run_all_layouts<bf16>(3000); }
CUDA_TEST_CASE(fp16_lt_all_layouts) { run_all_layouts<fp16>(4000); }

CUDA_TEST_CASE(float_tf32_opt_in) {
  // TF32 rounds the inputs to 10 mantissa bits: the accumulation term uses eps = 2^-10.
  run_matmul<float>({13, 129}, {129, 7}, Transpose::kNo, Transpose::kNo, 5000, false,
                    tc::Fp32Math::kTf32);
}

CUDA_TEST_CASE(unaligned_and_gathered_operands) {
  // A slice starting one element in (unaligned for cuBLASLt's 16-byte kernels), and a view with
  // strides (14, 2) that must be gathered before the call.
  const auto a = random_tensor<bf16>({7, 14}, 6000), b = random_tensor<bf16>({7, 11}, 6001);
  const auto da = to_gpu(a), db = to_gpu(b);
  const TensorView<const bf16, Cpu> ha(a.data() + 1, Shape{7, 7}, Strides{14, 2});
  const TensorView<const bf16, Cuda> ga(da.data() + 1, Shape{7, 7}, Strides{14, 2});
  const auto want = ref_matmul<bf16>(ha, b);
  const auto mag = ops::matmul<double>(abs_double<bf16>(ha), abs_double<bf16>(b.view()));
  check_matmul("gathered", tc::matmul<bf16>(ga, db), want, mag, 7, acc_eps_of<bf16>());
  const auto sa = da.slice(1, 1, 12);  // (7, 11), ld 14, offset 1 element
  const auto want2 = ref_matmul<bf16>(a.slice(1, 1, 12), b.transpose(0, 1));
  const auto mag2 =
      ops::matmul<double>(abs_double<bf16>(a.slice(1, 1, 12)), abs_double<bf16>(b.transpose(0, 1)));
  check_matmul("unaligned slice", tc::matmul<bf16>(sa, db.transpose(0, 1)), want2, mag2, 11,
               acc_eps_of<bf16>());
}

CUDA_TEST_CASE(linear_forward_backward) {
  auto run = [](auto tag, Shape xs, int64_t out, bool with_bias, uint64_t seed) {
    using T = decltype(tag);
    const int64_t in = xs[-1];
    const auto x = random_tensor<T>(xs, seed), w = random_tensor<T>({out, in}, seed + 1);
    const auto bias = random_tensor<T>({out}, seed + 2);
    const auto dx = to_gpu(x), dw = to_gpu(w), dbias = to_gpu(bias);
    std::optional<TensorView<const T, Cpu>> hb;
    std::optional<TensorView<const T, Cuda>> gb;
    if (with_bias) hb = bias.view(), gb = dbias.view();
    const auto want = ref_linear<T>(x, w, hb);
    const auto got = tc::linear<T>(dx, dw, gb);
    // magnitudes: |x| |w|^T (+ |bias|)
    auto mag = ops::linear<double>(abs_double<T>(x), abs_double<T>(w), std::nullopt);
    if (with_bias)
      for (int64_t i = 0; i < mag.numel(); ++i)
        mag.data()[i] += std::abs(as_double(bias.data()[i % out]));
    const std::string what =
        std::string(number_traits<T>::name) + " linear x" + xs.str() + (with_bias ? " +bias" : "");
    check_matmul(what, got, want, mag, in + 1, acc_eps_of<T>());

    const auto dy = random_tensor<T>(want.shape(), seed + 3);
    const auto ddy = to_gpu(dy);
    const auto gw = ref_linear_backward<T>(dy, x, w, with_bias);
    const auto gg = tc::linear_backward<T>(ddy, dx, dw, with_bias);
    const auto ady = abs_double<T>(dy);
    const auto mg =
        ops::linear_backward<double>(ady, abs_double<T>(x), abs_double<T>(w), with_bias);
    const int64_t rows = x.numel() / in;
    check_matmul(what + " dx", gg.dx, gw.dx, mg.dx, out, acc_eps_of<T>());
    check_matmul(what + " dweight", gg.dweight, gw.dweight, mg.dweight, rows, acc_eps_of<T>());
    if (with_bias) {
      check_matmul(what + " dbias", gg.dbias, gw.dbias, mg.dbias, rows, acc_eps_of<T>());
      // Deterministic: the same call again gives the same bits.
      const auto again = tc::linear_backward<T>(ddy, dx, dw, with_bias);
      BOOST_TEST(all_equal_bits(to_cpu(again.dbias), to_cpu(gg.dbias)),
                 "dbias differs between two runs");
      BOOST_TEST(all_equal_bits(to_cpu(again.dweight), to_cpu(gg.dweight)),
                 "dweight differs between two runs");
    } else {
      BOOST_TEST(gg.dbias.numel() == 0);
    }
  };
  run(float{}, {5, 11}, 7, true, 7000);
  run(float{}, {2, 13, 129}, 11, false, 7100);
  run(bf16{}, {7, 129}, 13, true, 7200);
  run(bf16{}, {2, 5, 11}, 129, true, 7300);
  run(fp16{}, {13, 11}, 5, true, 7400);
  run(double{}, {5, 11}, 7, true, 7500);
}

CUDA_TEST_CASE(shape_errors) {
  const auto a = Tensor<float, Cuda>::zeros({5, 11}), b = Tensor<float, Cuda>::zeros({7, 11});
  const std::string msg = error_of([&] { (void)tc::matmul<float>(a, b); });
  BOOST_TEST(msg.find("inner dimensions differ") != std::string::npos, msg);
  const auto bias = Tensor<float, Cuda>::zeros({8});
  const std::string msg2 = error_of([&] { (void)tc::linear<float>(a, b, bias.view()); });
  BOOST_TEST(msg2.find("'bias'") != std::string::npos, msg2);
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
// RoPE, against ops::rope (same table, built once on the host).
BOOST_AUTO_TEST_SUITE(rope)

namespace {

Tensor<int32_t> random_positions(Shape s, int32_t max, uint64_t seed) {
  std::mt19937_64 gen(seed);
  auto p = Tensor<int32_t>::empty(s);
  for (int32_t& v : p.span()) v = static_cast<int32_t>(gen() % static_cast<uint64_t>(max));
  return p;
}

template <class T, class Acc>
void run_rope(const ops::RopeConfig& config, Shape xs, int64_t max_pos, uint64_t seed, double atol,
              double rtol) {
  const int64_t head_dim = xs[-1];
  const ops::RopeTable<Acc> host_table(config, head_dim, max_pos);
  const tc::RopeTable<Acc> table(host_table);
  const auto x = random_tensor<T>(xs, seed);
  const auto dx = to_gpu(x);
  const std::string what =
      std::string(number_traits<T>::name) + " x" + xs.str() +
      (config.layout == ops::RopeLayout::kInterleaved ? " interleaved" : " half-split") +
      " rotary_dim " + std::to_string(host_table.rotary_dim());
  const int64_t seq = xs[-3];
  // Positions as a (seq) tensor, as a (batch, seq) tensor (rank-4 x only), and as a start offset.
  const auto pos = random_positions({seq}, static_cast<int32_t>(max_pos), seed + 1);
  const auto dpos = to_gpu(pos);
  check_close(what + " positions (seq)", tc::rope<T>(dx, table, dpos),
              ops::rope<T>(x, host_table, pos), atol, rtol);
  check_close(what + " backward", tc::rope_backward<T>(dx, table, dpos),
              ops::rope_backward<T>(x, host_table, pos), atol, rtol);
  if (xs.rank() == 4) {
    const auto pos2 = random_positions({xs[0], seq}, static_cast<int32_t>(max_pos), seed + 2);
    const auto dpos2 = to_gpu(pos2);
    check_close(what + " positions (batch, seq)", tc::rope<T>(dx, table, dpos2),
                ops::rope<T>(x, host_table, pos2), atol, rtol);
  }
  const int64_t start = max_pos - seq;
  check_close(what + " start offset", tc::rope<T>(dx, table, start),
              ops::rope<T>(x, host_table, start), atol, rtol);
  check_close(what + " backward start offset", tc::rope_backward<T>(dx, table, start),
              ops::rope_backward<T>(x, host_table, start), atol, rtol);
}

}  // namespace

// Tolerances: each output is a*c - b*s (a, b, c, s all O(1)); the GPU may fuse it into an FMA
// where the CPU rounds the product first, so results differ by a few ulps of the arithmetic
// type in absolute terms: atol = rtol = 4 eps (float or double). bf16/fp16 outputs may in
// addition flip one ulp of the format: rtol = 2 ulps of T.
CUDA_TEST_CASE(float_layouts_and_partial_rotary) {
  ops::RopeConfig c;
  for (auto layout : {ops::RopeLayout::kHalfSplit, ops::RopeLayout::kInterleaved}) {
    c.layout = layout;
    c.rotary_dim = -1;
    const double eps = rtol_of<float>(4);
    run_rope<float, float>(c, {2, 7, 3, 128}, 4096, 100, eps, eps);
    c.rotary_dim = 8;  // partial: features 8..10 pass through
    run_rope<float, float>(c, {13, 5, 11}, 64, 200, eps, eps);
  }
}

CUDA_TEST_CASE(low_precision_and_double) {
  ops::RopeConfig c;
  c.scaling.kind = ops::RopeScalingKind::kYarn;
  c.scaling.factor = 4.0;
  const double eps = rtol_of<float>(4);
  run_rope<bf16, float>(c, {2, 5, 3, 64}, 16384, 300, eps, rtol_of<bf16>(2));
  run_rope<fp16, float>(c, {7, 2, 64}, 1024, 400, eps, rtol_of<fp16>(2));
  run_rope<double, double>(c, {2, 5, 3, 64}, 16384, 500, rtol_of<double>(4), rtol_of<double>(4));
}

CUDA_TEST_CASE(position_errors) {
  ops::RopeConfig c;
  const ops::RopeTable<float> host_table(c, 16, 32);
  const tc::RopeTable<float> table(host_table);
  const auto x = Tensor<float, Cuda>::zeros({2, 5, 3, 16});
  auto pos = Tensor<int32_t>::from(Shape{2, 5}, {0, 1, 2, 3, 4, 5, 6, 32, 8, 9});
  const auto dpos = to_gpu(pos);
  const std::string msg = error_of([&] { (void)tc::rope<float>(x, table, dpos); });
  BOOST_TEST(msg.find("positions[1, 2] = 32") != std::string::npos, msg);
  const std::string msg2 = error_of([&] { (void)tc::rope<float>(x, table, int64_t{30}); });
  BOOST_TEST(msg2.find("outside the RopeTable") != std::string::npos, msg2);
  const auto bad_shape = Tensor<float, Cuda>::zeros({2, 5, 3, 15});
  const std::string msg3 = error_of([&] { (void)tc::rope<float>(bad_shape, table, int64_t{0}); });
  BOOST_TEST(msg3.find("head_dim") != std::string::npos, msg3);
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
// softmax and log-softmax, against ops::softmax / ops::log_softmax.
BOOST_AUTO_TEST_SUITE(softmax)

namespace {

// Tolerances, with eps the arithmetic type's (float for bf16/fp16) and n the row length:
//   softmax: probabilities are <= 1 and agree to a few ulps (expf vs the CPU's polynomial, both
//     within 2 ulp, and another summation order): atol 16 eps, rtol 16 eps;
//   log_softmax: x - lse has absolute error ~ eps * (|x| + log n): atol 16 eps (max|x| + log n +
//   1); backward: one row sum of n terms each <= 1 in magnitude: atol 16 eps sqrt(n); bf16/fp16
//   outputs may also flip one ulp of the format: rtol 2 ulps of T.
template <class T>
void run_softmax(Shape shape, uint64_t seed, double lo, double hi) {
  constexpr bool kLow = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;
  const double eps = std::is_same_v<T, double>
                         ? std::numeric_limits<double>::epsilon()
                         : static_cast<double>(std::numeric_limits<float>::epsilon());
  const double n = static_cast<double>(shape[-1]);
  const double rt = kLow ? rtol_of<T>(2) : 16 * eps;
  const double at = 16 * eps;
  const double at_log = 16 * eps * (std::max(std::abs(lo), std::abs(hi)) + std::log(n) + 1);
  const double at_bwd = 16 * eps * std::sqrt(n);
  const auto x = random_tensor<T>(shape, seed, lo, hi);
  const auto dx = to_gpu(x);
  const std::string what = std::string(number_traits<T>::name) + " " + shape.str();
  const auto y = ops::softmax<T>(x);
  check_close(what + " softmax", tc::softmax<T>(dx), y, at, rt);
  const auto ly = ops::log_softmax<T>(x);
  check_close(what + " log_softmax", tc::log_softmax<T>(dx), ly, at_log, rt);

  const auto dy = random_tensor<T>(shape, seed + 1);
  const auto ddy = to_gpu(dy);
  const auto gy = to_gpu(y);
  check_close(what + " softmax_backward", tc::softmax_backward<T>(ddy, gy),
              ops::softmax_backward<T>(dy, y), at_bwd, rt);
  const auto gly = to_gpu(ly);
  check_close(what + " log_softmax_backward", tc::log_softmax_backward<T>(ddy, gly),
              ops::log_softmax_backward<T>(dy, ly), at_bwd, rt);
}

template <class T>
void run_all_shapes(uint64_t seed) {
  run_softmax<T>({5, 11}, seed, -3, 3);
  run_softmax<T>({7, 129}, seed + 10, -10, 10);
  run_softmax<T>({13, 8192}, seed + 20, -5, 5);
  run_softmax<T>({2, 3, 129}, seed + 30, -1, 1);
  run_softmax<T>({5, 1}, seed + 40, -1, 1);
}

}  // namespace

CUDA_TEST_CASE(float_shapes) { run_all_shapes<float>(8000); }
CUDA_TEST_CASE(double_shapes) { run_all_shapes<double>(8100); }
CUDA_TEST_CASE(bf16_shapes) { run_all_shapes<bf16>(8200); }
CUDA_TEST_CASE(fp16_shapes) { run_all_shapes<fp16>(8300); }

CUDA_TEST_CASE(masks_nan_and_large_logits) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto x = random_tensor<float>({6, 129}, 8400, -5, 5);
  for (int64_t j = 0; j < 129; j += 2) x(0, j) = -inf;  // half masked
  for (int64_t j = 0; j < 129; ++j) x(1, j) = -inf;     // fully masked: NaN row
  x(2, 77) = nan;                                       // NaN row
  for (int64_t j = 0; j < 129; ++j) x(3, j) = 1e4f + static_cast<float>(j % 7);  // large logits
  for (int64_t j = 0; j < 100; ++j) x(4, j) = -inf;                              // masked prefix
  x(5, 3) = inf;  // +inf: NaN row, as exp(inf - inf)
  const auto dx = to_gpu(x);
  // Tolerances as run_softmax's; log_softmax's absolute term scales with the 1e4 logits.
  check_close("softmax masks", tc::softmax<float>(dx), ops::softmax<float>(x), rtol_of<float>(16),
              rtol_of<float>(16));
  check_close("log_softmax masks", tc::log_softmax<float>(dx), ops::log_softmax<float>(x),
              rtol_of<float>(16) * (1e4 + 16), rtol_of<float>(16));
  const auto y = to_cpu(tc::softmax<float>(dx));
  BOOST_TEST(y(0, 0) == 0.0f);  // masked entries are exactly zero
  BOOST_TEST(std::isnan(y(1, 5)));
  BOOST_TEST(std::isnan(y(2, 5)));
}

CUDA_TEST_CASE(strided_input_and_errors) {
  const auto x = random_tensor<float>({129, 7}, 8500);
  const auto dx = to_gpu(x);
  check_close("transposed", tc::softmax<float>(dx.transpose(0, 1)),
              ops::softmax<float>(x.transpose(0, 1)), rtol_of<float>(16), rtol_of<float>(16));
  const auto y = Tensor<float, Cuda>::zeros({5, 11});
  const auto dy = Tensor<float, Cuda>::zeros({5, 12});
  const std::string msg = error_of([&] { (void)tc::softmax_backward<float>(dy, y); });
  BOOST_TEST(msg.find("same shape") != std::string::npos, msg);
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
// FP8 quantisation, bit-exact with quant/fp8_scaling.hpp.
BOOST_AUTO_TEST_SUITE(fp8_quantize)

namespace {

template <class Fp8>
void run_tiles(int64_t rows, int64_t cols, uint64_t seed) {
  const std::string what = std::string(number_traits<Fp8>::name) + " (" + std::to_string(rows) +
                           ", " + std::to_string(cols) + ")";
  auto x = random_tensor<float>({rows, cols}, seed, -3, 3);
  // Spread the tiles' ranges: row r scaled by 4^(r % 5 - 2); one tile all zero; one tiny tile.
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) x(r, c) *= std::ldexp(1.0f, 2 * static_cast<int>(r % 5) - 4);
  for (int64_t c = 0; c < std::min<int64_t>(cols, 128); ++c) x(0, c) = 0.0f;
  if (rows > 1)
    for (int64_t c = 0; c < std::min<int64_t>(cols, 128); ++c) x(1, c) *= 1e-38f;
  const auto dx = to_gpu(x);

  // 1x128
  auto q = Tensor<Fp8>::empty({rows, cols});
  auto s = Tensor<float>::empty({rows, ::tessera::detail::tile_count(cols, kFp8TileSize)});
  quantize_tiles_1x128<Fp8>(x.data(), rows, cols, q.data(), s.data());
  const auto g = tc::quantize_tiles_1x128<Fp8>(dx.view());
  check_bits(what + " 1x128 codes", g.q, q);
  check_bits(what + " 1x128 scales", g.scales, s);
  auto back = Tensor<float>::empty({rows, cols});
  dequantize_tiles_1x128<Fp8>(q.data(), s.data(), rows, cols, back.data());
  check_bits(what + " 1x128 dequantised", tc::dequantize_tiles_1x128<Fp8>(g.q, g.scales), back);

  // 128x128
  auto s2 = Tensor<float>::empty({::tessera::detail::tile_count(rows, kFp8TileSize),
                                  ::tessera::detail::tile_count(cols, kFp8TileSize)});
  quantize_blocks_128x128<Fp8>(x.data(), rows, cols, q.data(), s2.data());
  const auto g2 = tc::quantize_blocks_128x128<Fp8>(dx.view());
  check_bits(what + " 128x128 codes", g2.q, q);
  check_bits(what + " 128x128 scales", g2.scales, s2);
  dequantize_blocks_128x128<Fp8>(q.data(), s2.data(), rows, cols, back.data());
  check_bits(what + " 128x128 dequantised", tc::dequantize_blocks_128x128<Fp8>(g2.q, g2.scales),
             back);
}

}  // namespace

CUDA_TEST_CASE(tiles_bit_exact) {
  for (auto [rows, cols] :
       {std::pair<int64_t, int64_t>{5, 11}, {7, 129}, {13, 8192}, {129, 300}, {1, 128}}) {
    run_tiles<fp8_e4m3>(rows, cols, 9000 + rows * cols);
    run_tiles<fp8_e5m2>(rows, cols, 9500 + rows * cols);
  }
}

CUDA_TEST_CASE(per_tensor_bit_exact) {
  const auto x = random_tensor<float>({13, 8192}, 9900, -20, 20);
  const auto dx = to_gpu(x);
  const float want_amax = amax(x.span());
  BOOST_TEST(tc::amax<float>(dx) == want_amax);
  const float scale = scale_from_amax<fp8_e4m3>(want_amax, 1);
  auto q = Tensor<fp8_e4m3>::empty(x.shape());
  quantize_per_tensor<fp8_e4m3>(x.data(), x.numel(), scale, q.data());
  const auto gq = tc::quantize_per_tensor<fp8_e4m3, float>(dx, scale);
  check_bits("per-tensor codes", gq, q);
  auto back = Tensor<float>::empty(x.shape());
  dequantize_per_tensor<fp8_e4m3>(q.data(), q.numel(), scale, back.data());
  check_bits("per-tensor dequantised", tc::dequantize_per_tensor<fp8_e4m3>(gq, scale), back);
  const auto cur = tc::quantize_per_tensor_current<fp8_e5m2, float>(dx, 0);
  BOOST_TEST(cur.amax == want_amax);
  BOOST_TEST(cur.scale == scale_from_amax<fp8_e5m2>(want_amax, 0));
  auto q5 = Tensor<fp8_e5m2>::empty(x.shape());
  quantize_per_tensor<fp8_e5m2>(x.data(), x.numel(), cur.scale, q5.data());
  check_bits("current scaling codes", cur.q, q5);

  // bf16 input: the same as its exact float widening on the CPU.
  const auto xb = ops::cast<bf16, float>(x.view());
  const auto xbf = ops::cast<float, bf16>(xb.view());
  BOOST_TEST(tc::amax<bf16>(to_gpu(xb)) == amax(xbf.span()));
  quantize_per_tensor<fp8_e4m3>(xbf.data(), xbf.numel(), scale, q.data());
  check_bits("bf16 input codes", tc::quantize_per_tensor<fp8_e4m3, bf16>(to_gpu(xb), scale), q);
}

CUDA_TEST_CASE(non_finite_values) {
  auto x = random_tensor<float>({7, 300}, 9950);
  x(3, 200) = std::numeric_limits<float>::infinity();
  auto dx = to_gpu(x);
  BOOST_TEST(std::isinf(tc::amax<float>(dx)));
  const std::string msg = error_of([&] { (void)tc::quantize_tiles_1x128<fp8_e4m3, float>(dx); });
  BOOST_TEST(msg.find("row 3, column 128") != std::string::npos, msg);
  const std::string msg2 =
      error_of([&] { (void)tc::quantize_blocks_128x128<fp8_e4m3, float>(dx); });
  BOOST_TEST(msg2.find("row 0, column 128") != std::string::npos, msg2);
  const std::string msg3 =
      error_of([&] { (void)tc::quantize_per_tensor_current<fp8_e4m3, float>(dx); });
  BOOST_TEST(msg3.find("amax") != std::string::npos, msg3);
  x(3, 200) = std::numeric_limits<float>::quiet_NaN();
  dx = to_gpu(x);
  BOOST_TEST(std::isnan(tc::amax<float>(dx)));
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
// RMSNorm, against ops::rms_norm / ops::rms_norm_backward.
BOOST_AUTO_TEST_SUITE(rmsnorm)

namespace {

// Tolerances, eps the arithmetic type's: rstd and y are one sum of n squares away from the
// inputs: rtol 16 eps (atol 16 eps for y near zero). dx subtracts x * c from dy * w, where c
// comes from a sum of n terms: atol 16 eps sqrt(n) * 4 (rstd <= ~2, |w| <= 1). dweight sums
// `rows` terms: atol 16 eps sqrt(rows) * 4. bf16/fp16 outputs: rtol 2 ulps of T.
template <class T>
void run_rms(Shape shape, uint64_t seed) {
  using A = ops::row_acc_t<T>;
  constexpr bool kLow = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;
  const double eps = std::numeric_limits<A>::epsilon();
  const int64_t n = shape[-1], rows = shape.numel() / n;
  const double rt = kLow ? rtol_of<T>(2) : 16 * eps;
  const std::string what = std::string(number_traits<T>::name) + " rms_norm " + shape.str();
  const auto x = random_tensor<T>(shape, seed), w = random_tensor<T>({n}, seed + 1),
             dy = random_tensor<T>(shape, seed + 2);
  const auto gx = to_gpu(x), gw = to_gpu(w), gdy = to_gpu(dy);
  const auto want = ops::rms_norm<T>(x, w, 1e-6);
  const auto got = tc::rms_norm<T>(gx, gw, 1e-6);
  check_close(what + " y", got.y, want.y, 16 * eps, rt);
  check_close(what + " rstd", got.rstd, want.rstd, 0.0, 16 * eps);
  const auto gwant = ops::rms_norm_backward<T>(dy, x, w, want.rstd);
  const auto grstd = to_gpu(want.rstd);  // the same rstd for both, so only backward is compared
  const auto ggot = tc::rms_norm_backward<T>(gdy, gx, gw, grstd);
  check_close(what + " dx", ggot.dx, gwant.dx, 64 * eps * std::sqrt(static_cast<double>(n)), rt);
  check_close(what + " dweight", ggot.dweight, gwant.dweight,
              64 * eps * std::sqrt(static_cast<double>(rows)), rt);
  const auto again = tc::rms_norm_backward<T>(gdy, gx, gw, grstd);
  BOOST_TEST(all_equal_bits(to_cpu(again.dweight), to_cpu(ggot.dweight)),
             what << ": dweight differs between runs");
  BOOST_TEST(all_equal_bits(to_cpu(again.dx), to_cpu(ggot.dx)),
             what << ": dx differs between runs");
}

template <class T>
void run_rms_shapes(uint64_t seed) {
  run_rms<T>({5, 11}, seed);
  run_rms<T>({7, 129}, seed + 10);
  run_rms<T>({13, 8192}, seed + 20);
  run_rms<T>({2, 3, 129}, seed + 30);
  run_rms<T>({3000, 129}, seed + 40);  // more rows than backward blocks: several rows per block
}

}  // namespace

CUDA_TEST_CASE(float_shapes) { run_rms_shapes<float>(10000); }
CUDA_TEST_CASE(double_shapes) { run_rms_shapes<double>(10100); }
CUDA_TEST_CASE(bf16_shapes) { run_rms_shapes<bf16>(10200); }
CUDA_TEST_CASE(fp16_shapes) { run_rms_shapes<fp16>(10300); }

CUDA_TEST_CASE(errors) {
  const auto x = Tensor<float, Cuda>::zeros({5, 11}), w = Tensor<float, Cuda>::zeros({12});
  const std::string msg = error_of([&] { (void)tc::rms_norm<float>(x, w); });
  BOOST_TEST(msg.find("'weight'") != std::string::npos, msg);
  const auto w11 = Tensor<float, Cuda>::zeros({11});
  const std::string msg2 = error_of([&] { (void)tc::rms_norm<float>(x, w11, -1.0); });
  BOOST_TEST(msg2.find("eps") != std::string::npos, msg2);
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
// Cross-entropy, against ops::cross_entropy / ops::cross_entropy_backward.
BOOST_AUTO_TEST_SUITE(cross_entropy)

namespace {

Tensor<int32_t> random_targets(Shape s, int64_t vocab, uint64_t seed, int32_t ignore,
                               int every_nth_ignored) {
  std::mt19937_64 gen(seed);
  auto t = Tensor<int32_t>::empty(s);
  int64_t i = 0;
  for (int32_t& v : t.span()) {
    v = static_cast<int32_t>(gen() % static_cast<uint64_t>(vocab));
    if (every_nth_ignored > 0 && i++ % every_nth_ignored == 1) v = ignore;
  }
  return t;
}

// Tolerances, eps the arithmetic type's: lse = m + log(s) with s a sum of n exps: absolute
// error ~ eps (|m| + log n): atol 16 eps (max|x| + log n + 1). Row losses likewise; the mean
// or sum over rows is in double on both sides. The loss in T: rtol 2 ulps of bf16/fp16, or
// 16 eps. dlogits = g (p - ...): atol 16 eps |g|, rtol as the loss.
template <class T>
void run_ce(Shape shape, ops::CrossEntropyOptions options, uint64_t seed, double range,
            int every_nth_ignored) {
  using A = ops::row_acc_t<T>;
  constexpr bool kLow = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;
  const double eps = std::numeric_limits<A>::epsilon();
  const int64_t vocab = shape[-1];
  Shape ts = shape;
  std::vector<int64_t> lead(shape.begin(), shape.end() - 1);
  ts = Shape(std::span<const int64_t>(lead));
  const std::string what = std::string(number_traits<T>::name) + " cross_entropy " + shape.str() +
                           " " + ops::to_string(options.reduction) + " smoothing " +
                           std::to_string(options.label_smoothing);
  const auto x = random_tensor<T>(shape, seed, -range, range);
  const auto t = random_targets(ts, vocab, seed + 1, options.ignore_index, every_nth_ignored);
  const auto gx = to_gpu(x);
  const auto gt = to_gpu(t);
  const auto want = ops::cross_entropy<T>(x, t, options);
  const auto got = tc::cross_entropy<T>(gx, gt, options);
  const double at = 16 * eps * (range + std::log(static_cast<double>(vocab)) + 1);
  const double rt = kLow ? rtol_of<T>(2) : 16 * eps;
  BOOST_TEST(got.valid_rows == want.valid_rows, what);
  check_close(what + " logsumexp", got.logsumexp, want.logsumexp, at, 16 * eps);
  check_close(what + " loss", got.loss, want.loss, at, rt);

  const auto dloss = options.reduction == ops::Reduction::kNone
                         ? random_tensor<T>(ts, seed + 2)
                         : Tensor<T>::full(Shape{}, from_double<T>(0.75));
  const auto gdl = to_gpu(dloss);
  const auto glse = to_gpu(want.logsumexp);  // the same saved state for both
  const auto dwant = ops::cross_entropy_backward<T>(dloss, x, t, want.logsumexp, options);
  const auto dgot = tc::cross_entropy_backward<T>(gdl, gx, gt, glse, options);
  check_close(what + " dlogits", dgot, dwant, 16 * eps, rt);
}

}  // namespace

CUDA_TEST_CASE(reductions_and_smoothing) {
  using ops::Reduction;
  for (Reduction r : {Reduction::kMean, Reduction::kSum, Reduction::kNone}) {
    for (float smoothing : {0.0f, 0.1f}) {
      ops::CrossEntropyOptions o;
      o.reduction = r;
      o.label_smoothing = smoothing;
      run_ce<float>({5, 11}, o, 11000, 3.0, 0);
      run_ce<float>({13, 8192}, o, 11100, 10.0, 4);
      run_ce<float>({2, 3, 129}, o, 11200, 5.0, 3);
      run_ce<double>({7, 129}, o, 11300, 5.0, 2);
      run_ce<bf16>({13, 8192}, o, 11400, 10.0, 5);
      run_ce<fp16>({7, 129}, o, 11500, 5.0, 0);
    }
  }
}

CUDA_TEST_CASE(ignore_index_and_all_ignored) {
  ops::CrossEntropyOptions o;
  o.ignore_index = 3;
  run_ce<float>({7, 129}, o, 11600, 4.0, 2);
  // Every row ignored under kMean: NaN loss, zero gradient, as PyTorch and the CPU op.
  const auto x = random_tensor<float>({5, 11}, 11700);
  const auto t = Tensor<int32_t>::from(Shape{5}, {3, 3, 3, 3, 3});
  const auto got = tc::cross_entropy<float>(to_gpu(x), to_gpu(t), o);
  BOOST_TEST(got.valid_rows == 0);
  BOOST_TEST(std::isnan(to_cpu(got.loss).data()[0]));
  const auto dl = to_gpu(Tensor<float>::full(Shape{}, 1.0f));
  const auto d =
      to_cpu(tc::cross_entropy_backward<float>(dl, to_gpu(x), to_gpu(t), got.logsumexp, o));
  BOOST_TEST(std::all_of(d.span().begin(), d.span().end(), [](float v) { return v == 0.0f; }));
}

CUDA_TEST_CASE(bad_targets_throw) {
  const auto x = to_gpu(random_tensor<float>({5, 11}, 11800));
  const auto t = to_gpu(Tensor<int32_t>::from(Shape{5}, {0, 1, 11, 2, -5}));
  const std::string msg = error_of([&] { (void)tc::cross_entropy<float>(x, t); });
  BOOST_TEST(msg.find("target 11 at row 2 is out of range [0, 11)") != std::string::npos, msg);
  const auto lse = Tensor<float, Cuda>::zeros({5});
  const auto dl = to_gpu(Tensor<float>::full(Shape{}, 1.0f));
  const std::string msg2 =
      error_of([&] { (void)tc::cross_entropy_backward<float>(dl, x, t, lse); });
  BOOST_TEST(msg2.find("target 11 at row 2") != std::string::npos, msg2);
  const auto t4 = to_gpu(Tensor<int32_t>::from(Shape{4}, {0, 1, 2, 3}));
  const std::string msg3 = error_of([&] { (void)tc::cross_entropy<float>(x, t4); });
  BOOST_TEST(msg3.find("'targets'") != std::string::npos, msg3);
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace tessera_cuda_ops_test

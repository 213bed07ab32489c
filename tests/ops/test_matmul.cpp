// matmul, matmul_backward, linear, linear_backward and the CPU feature / path machinery.
//
// Forward: every back end this machine and build can run (scalar, Eigen, OpenBLAS, oneDNN)
// x every element type (double, float, bf16, fp16) x the four transpose combinations x odd
// shapes x (plain, batched, b broadcast, a broadcast) against one naive double reference
// (j-outer loops, written differently from the library). Strided views (transposed, sliced,
// batch-interleaved, and one that must be copied) on every path. The error bound of a product
// is per element: K * eps_acc * sum_k |a_ik b_kj| for the accumulation plus eps_out * |c| for
// the final rounding of a low-precision output — rigorous for the plain loop, generous for
// blocked BLAS sums (whose error bound is smaller).
// Backward: central finite differences in double for every transpose/broadcast combination,
// and bf16 against the double gradient of the same (rounded) inputs.
// Every test prints its seed; the suite also runs once per forced TESSERA_CPU_PATH (CTest).
#define BOOST_TEST_MODULE matmul
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "finite_difference.hpp"
#include "tessera/core/cpu_features.hpp"
#include "tessera/ops/cast.hpp"
#include "tessera/ops/matmul.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace tessera;
using namespace tessera::ops;
using tessera::testing::check_close;
using tessera::testing::dot;
using tessera::testing::numeric_gradient;
using tessera::testing::random_tensor;

namespace {

constexpr uint64_t kSeed = 977;
constexpr Transpose kNo = Transpose::kNo, kYes = Transpose::kYes;
const MatmulPath kAllPaths[] = {MatmulPath::kScalar, MatmulPath::kEigen, MatmulPath::kOpenBlas,
                                MatmulPath::kOneDnn};

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Element (g, i, j) of op(x), x being a contiguous (R, C) or (B, R, C) tensor in double.
double op_at(const Tensor<double>& x, Transpose t, int64_t g, int64_t i, int64_t j) {
  if (t == kYes) std::swap(i, j);
  const int64_t r = x.dim(-2), c = x.dim(-1);
  return x.data()[(x.rank() == 3 ? g * r * c : 0) + i * c + j];
}

// The reference: c = op(a) op(b), plus the per-element magnitude sum_k |a_ik b_kj|.
struct Reference {
  Tensor<double> c;
  Tensor<double> magnitude;
};
Reference reference(const Tensor<double>& a, const Tensor<double>& b, Transpose ta, Transpose tb) {
  const bool batched = a.rank() == 3 || b.rank() == 3;
  const int64_t batch = a.rank() == 3 ? a.dim(0) : b.rank() == 3 ? b.dim(0) : 1;
  const int64_t m = ta == kYes ? a.dim(-1) : a.dim(-2);
  const int64_t k = ta == kYes ? a.dim(-2) : a.dim(-1);
  const int64_t n = tb == kYes ? b.dim(-2) : b.dim(-1);
  const Shape s = batched ? Shape{batch, m, n} : Shape{m, n};
  Reference r{Tensor<double>::zeros(s), Tensor<double>::zeros(s)};
  for (int64_t g = 0; g < batch; ++g)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) {
        double sum = 0, mag = 0;
        for (int64_t p = 0; p < k; ++p) {
          const double prod = op_at(a, ta, g, i, p) * op_at(b, tb, g, p, j);
          sum += prod;
          mag += std::fabs(prod);
        }
        r.c.data()[(g * m + i) * n + j] = sum;
        r.magnitude.data()[(g * m + i) * n + j] = mag;
      }
  return r;
}

template <class T>
double acc_eps() {
  return std::is_same_v<T, double> ? number_traits<double>::epsilon : number_traits<float>::epsilon;
}

// |got - ref| <= K * eps_acc * magnitude + eps_out * |ref| (+ a tiny floor), element-wise.
template <class T>
void check_product(const Tensor<T>& got, const Reference& ref, int64_t k, const std::string& what) {
  BOOST_TEST_REQUIRE(got.shape() == ref.c.shape(), what << ": shape " << got.shape() << " vs "
                                                        << ref.c.shape());
  const Tensor<double> g = cast<double>(got);
  const double eps_out = number_traits<T>::is_low_precision ? double(number_traits<T>::epsilon) : 0.0;
  int64_t bad = 0, worst = -1;
  double worst_ratio = 0, norm = 0;
  for (int64_t i = 0; i < g.numel(); ++i) {
    const double r = ref.c.data()[i];
    const double bound = double(std::max<int64_t>(k, 1)) * acc_eps<T>() * ref.magnitude.data()[i] +
                         eps_out * std::fabs(r) + 1e-300;
    const double err = std::fabs(g.data()[i] - r);
    norm += std::fabs(g.data()[i]);
    if (!(err <= bound)) ++bad;
    const double ratio = std::isnan(err) ? INFINITY : err / bound;
    if (worst < 0 || ratio > worst_ratio) worst_ratio = ratio, worst = i;
  }
  BOOST_CHECK_MESSAGE(bad == 0, what << ": " << bad << " of " << g.numel()
                                     << " elements out of bound; worst at flat index " << worst
                                     << ": got " << g.data()[worst] << ", reference "
                                     << ref.c.data()[worst] << " (error/bound " << worst_ratio
                                     << ")");
  if (g.numel() > 0 && ref.magnitude.numel() > 0) BOOST_CHECK_MESSAGE(norm > 0, what << ": all-zero output");
}

// Random inputs rounded to T; the reference is computed from the rounded values.
template <class T>
struct Inputs {
  Tensor<T> a, b;
  Tensor<double> a64, b64;
};
template <class T>
Inputs<T> make_inputs(Shape sa, Shape sb, uint64_t seed) {
  Inputs<T> in;
  in.a = cast<T>(random_tensor(sa, seed));
  in.b = cast<T>(random_tensor(sb, seed + 1));
  in.a64 = cast<double>(in.a);
  in.b64 = cast<double>(in.b);
  return in;
}

// The stored shape of an operand whose logical op(X) is (rows, cols).
Shape stored(std::optional<int64_t> batch, int64_t rows, int64_t cols, Transpose t) {
  if (t == kYes) std::swap(rows, cols);
  return batch ? Shape{*batch, rows, cols} : Shape{rows, cols};
}

const char* name(Transpose t) { return t == kYes ? "T" : "N"; }

struct Mnk {
  int64_t m, n, k;
};
const Mnk kShapes[] = {{1, 1, 1}, {5, 7, 11}, {13, 5, 7}, {7, 13, 1}, {33, 17, 65}, {64, 80, 48}};

enum class Batching { kNone, kBoth, kBroadcastB, kBroadcastA };

template <class T>
void forward_sweep() {
  BOOST_TEST_MESSAGE("forward sweep " << number_traits<T>::name << ", seed " << kSeed);
  for (MatmulPath path : kAllPaths)
    if (!matmul_path_available<T>(path))
      BOOST_TEST_MESSAGE("  path " << to_string(path) << " not available for "
                                   << number_traits<T>::name << ": skipped");
  int ran = 0;
  for (const Mnk& s : kShapes)
    for (Transpose ta : {kNo, kYes})
      for (Transpose tb : {kNo, kYes})
        for (Batching bm : {Batching::kNone, Batching::kBoth, Batching::kBroadcastB,
                            Batching::kBroadcastA}) {
          const int64_t batch = 3;
          const std::optional<int64_t> ba =
              (bm == Batching::kBoth || bm == Batching::kBroadcastB) ? std::optional(batch) : std::nullopt;
          const std::optional<int64_t> bb =
              (bm == Batching::kBoth || bm == Batching::kBroadcastA) ? std::optional(batch) : std::nullopt;
          const auto in = make_inputs<T>(stored(ba, s.m, s.k, ta), stored(bb, s.k, s.n, tb),
                                         kSeed + s.m * 1000 + s.n * 10 + s.k);
          const Reference ref = reference(in.a64, in.b64, ta, tb);
          for (MatmulPath path : kAllPaths) {
            if (!matmul_path_available<T>(path)) continue;
            const Tensor<T> c = matmul_via<T>(path, in.a, in.b, ta, tb);
            check_product(c, ref, s.k,
                          std::string(to_string(path)) + " " + number_traits<T>::name + " " +
                              name(ta) + name(tb) + " (M,N,K)=(" + std::to_string(s.m) + "," +
                              std::to_string(s.n) + "," + std::to_string(s.k) + ") batching " +
                              std::to_string(int(bm)));
            ++ran;
          }
        }
  BOOST_TEST(ran > 0);
}

}  // namespace

BOOST_AUTO_TEST_CASE(reports_cpu_features) {
  const CpuFeatures& f = cpu_features();
  BOOST_TEST_MESSAGE(matmul_summary());
  BOOST_TEST(&f == &cpu_features());  // detected once
  // Feature implications the detection must respect.
  if (f.avx512bw || f.avx512_bf16 || f.avx512_vnni) BOOST_TEST(f.avx512f);
  if (f.amx_bf16) BOOST_TEST(f.amx_tile);
  BOOST_TEST(!f.str().empty());
  // Scalar and Eigen run everywhere, for every type.
  BOOST_TEST(matmul_path_available<double>(MatmulPath::kScalar));
  BOOST_TEST(matmul_path_available<fp16>(MatmulPath::kEigen));
  // oneDNN takes float and bf16 only; bf16 only with native bf16 arithmetic.
  BOOST_TEST(!matmul_path_available<double>(MatmulPath::kOneDnn));
  BOOST_TEST(!matmul_path_available<fp16>(MatmulPath::kOneDnn));
#if defined(TESSERA_HAVE_DNNL)
  BOOST_TEST(matmul_path_available<bf16>(MatmulPath::kOneDnn) == (f.avx512_bf16 || f.amx_bf16));
#endif
#if defined(TESSERA_HAVE_OPENBLAS)
  BOOST_TEST(matmul_path_available<float>(MatmulPath::kOpenBlas));
#endif
}

BOOST_AUTO_TEST_CASE(forward_double) { forward_sweep<double>(); }
BOOST_AUTO_TEST_CASE(forward_float) { forward_sweep<float>(); }
BOOST_AUTO_TEST_CASE(forward_bf16) { forward_sweep<bf16>(); }
BOOST_AUTO_TEST_CASE(forward_fp16) { forward_sweep<fp16>(); }

BOOST_AUTO_TEST_CASE(exact_small_integers) {
  // Integer-valued inputs: every path must be exact (all partial sums are small integers).
  auto a = Tensor<float>::from({2, 3}, {1, 2, 3, 4, 5, 6});
  auto b = Tensor<float>::from({3, 2}, {7, 8, 9, 10, 11, 12});
  for (MatmulPath p : kAllPaths) {
    if (!matmul_path_available<float>(p)) continue;
    const Tensor<float> c = matmul_via<float>(p, a, b);
    BOOST_TEST(c.shape() == Shape({2, 2}));
    BOOST_TEST(c(0, 0) == 58.0f);
    BOOST_TEST(c(0, 1) == 64.0f);
    BOOST_TEST(c(1, 0) == 139.0f);
    BOOST_TEST(c(1, 1) == 154.0f);
  }
}

BOOST_AUTO_TEST_CASE(strided_views_on_every_path) {
  BOOST_TEST_MESSAGE("seed " << kSeed + 5);
  // a_big (M, K + 3): a column slice has ld > K. a_t (K, M) transposed view is column-major.
  // The batch-interleaved view (M, B, K) -> (B, M, K) has batch stride K and ld B*K.
  // b_every_other (K, 2N) sliced with stride 2 fits no BLAS layout and must be copied.
  const int64_t M = 9, K = 20, N = 11, B = 3;
  auto a_big = cast<float>(random_tensor({M, K + 3}, kSeed + 5));
  auto a_kt = cast<float>(random_tensor({K, M}, kSeed + 6));
  auto b = cast<float>(random_tensor({K, N}, kSeed + 7));
  auto inter = cast<float>(random_tensor({M, B, K}, kSeed + 8));
  auto b3 = cast<float>(random_tensor({B, K, N}, kSeed + 9));
  auto b_wide = cast<float>(random_tensor({K, 2 * N}, kSeed + 10));
  auto b_m = cast<float>(random_tensor({M, N}, kSeed + 11));

  const TensorView<const float> a_slice = a_big.slice(1, 2, 2 + K);    // (M, K), ld K+3
  const TensorView<const float> a_tview = a_kt.transpose(0, 1);        // (M, K), column-major
  const TensorView<const float> a_inter = inter.transpose(0, 1);       // (B, M, K)
  const TensorView<const float> b_every_other(b_wide.data(), Shape{K, N}, Strides{2 * N, 2});

  for (MatmulPath p : kAllPaths) {
    if (!matmul_path_available<float>(p)) continue;
    const std::string ps = to_string(p);
    {
      const Tensor<double> a64 = cast<double>(a_slice), b64 = cast<double>(b);
      check_product(matmul_via<float>(p, a_slice, b), reference(a64, b64, kNo, kNo), K, ps + " sliced a");
    }
    {
      const Tensor<double> a64 = cast<double>(a_tview), b64 = cast<double>(b);
      check_product(matmul_via<float>(p, a_tview, b), reference(a64, b64, kNo, kNo), K, ps + " transposed view a");
      // A transposed view transposed again by the flag: op(a_tview) = a_kt (K, M).
      const Tensor<double> akt64 = cast<double>(a_kt), bm64 = cast<double>(b_m);
      check_product(matmul_via<float>(p, a_tview, b_m, kYes, kNo), reference(akt64, bm64, kNo, kNo), M,
                    ps + " flag on a transposed view");
    }
    {
      const Tensor<double> a64 = cast<double>(a_inter), b64 = cast<double>(b3);
      check_product(matmul_via<float>(p, a_inter, b3), reference(a64, b64, kNo, kNo), K, ps + " interleaved batch a");
      check_product(matmul_via<float>(p, a_inter, b), reference(a64, cast<double>(b), kNo, kNo), K,
                    ps + " interleaved batch a, broadcast b");
    }
    {
      const Tensor<double> a64 = cast<double>(a_slice), b64 = cast<double>(b_every_other);
      check_product(matmul_via<float>(p, a_slice, b_every_other), reference(a64, b64, kNo, kNo), K,
                    ps + " strided b (copied)");
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_extents) {
  // K = 0 is an empty sum: zeros. M = 0 or N = 0: an empty result.
  auto a = Tensor<float>::zeros({3, 0});
  auto b = Tensor<float>::zeros({0, 4});
  for (MatmulPath p : kAllPaths) {
    if (!matmul_path_available<float>(p)) continue;
    const Tensor<float> c = matmul_via<float>(p, a, b);
    BOOST_TEST(c.shape() == Shape({3, 4}));
    for (float v : c.span()) BOOST_TEST(v == 0.0f);
  }
  auto e = matmul<float>(Tensor<float>::zeros({0, 5}), Tensor<float>::zeros({5, 2}));
  BOOST_TEST(e.shape() == Shape({0, 2}));
}

BOOST_AUTO_TEST_CASE(deterministic) {
  // Same inputs, same path: bit-identical results, run after run. The plain loop is also
  // independent of the thread count.
  auto in = make_inputs<float>({2, 37, 29}, {29, 41}, kSeed + 20);
  for (MatmulPath p : kAllPaths) {
    if (!matmul_path_available<float>(p)) continue;
    const Tensor<float> c1 = matmul_via<float>(p, in.a, in.b);
    const Tensor<float> c2 = matmul_via<float>(p, in.a, in.b);
    BOOST_TEST(std::memcmp(c1.data(), c2.data(), c1.size_bytes()) == 0, to_string(p));
  }
#if defined(_OPENMP)
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const Tensor<float> one = matmul_via<float>(MatmulPath::kScalar, in.a, in.b);
  omp_set_num_threads(2);
  const Tensor<float> two = matmul_via<float>(MatmulPath::kScalar, in.a, in.b);
  omp_set_num_threads(saved);
  BOOST_TEST(std::memcmp(one.data(), two.data(), one.size_bytes()) == 0);
#endif
}

BOOST_AUTO_TEST_CASE(path_choice_and_override) {
  const char* saved = std::getenv("TESSERA_CPU_PATH");
  const std::string saved_value = saved ? saved : "";
  ::unsetenv("TESSERA_CPU_PATH");
  // Tiny products take the plain loop.
  BOOST_TEST(to_string(matmul_path<float>({2, 3}, {3, 2})) == std::string("scalar"));
  const MatmulPath big_float = matmul_path<float>({256, 256}, {256, 256});
#if defined(TESSERA_HAVE_OPENBLAS)
  const bool weak_blas = !matmul_detail::openblas_matches_cpu() && matmul_path_available<float>(MatmulPath::kOneDnn);
  BOOST_TEST(to_string(big_float) == std::string(weak_blas ? "onednn" : "openblas"));
  BOOST_TEST(to_string(matmul_path<double>({256, 256}, {256, 256})) == std::string("openblas"));
#else
  BOOST_TEST(to_string(big_float) == std::string("eigen"));
#endif
  if (matmul_path_available<bf16>(MatmulPath::kOneDnn))
    BOOST_TEST(to_string(matmul_path<bf16>({64, 64}, {64, 64})) == std::string("onednn"));
  BOOST_TEST(to_string(matmul_path<fp16>({64, 64}, {64, 64})) != std::string("onednn"));

  ::setenv("TESSERA_CPU_PATH", "eigen", 1);
  BOOST_TEST(to_string(matmul_path<float>({256, 256}, {256, 256})) == std::string("eigen"));
  BOOST_TEST(to_string(matmul_path<bf16>({2, 3}, {3, 2})) == std::string("eigen"));
  ::setenv("TESSERA_CPU_PATH", "onednn", 1);  // double cannot: the automatic choice stands
  BOOST_TEST(to_string(matmul_path<double>({2, 3}, {3, 2})) == std::string("scalar"));
  ::setenv("TESSERA_CPU_PATH", "cublas", 1);
  const std::string msg = error_of([] { (void)matmul<float>(Tensor<float>::zeros({2, 2}), Tensor<float>::zeros({2, 2})); });
  BOOST_TEST(msg.find("TESSERA_CPU_PATH") != std::string::npos, msg);
  BOOST_TEST(msg.find("cublas") != std::string::npos, msg);
  BOOST_TEST(msg.find("openblas") != std::string::npos, msg);

  if (saved) ::setenv("TESSERA_CPU_PATH", saved_value.c_str(), 1);
  else ::unsetenv("TESSERA_CPU_PATH");
}

BOOST_AUTO_TEST_CASE(shape_errors) {
  auto a = Tensor<float>::zeros({4, 5});
  auto b = Tensor<float>::zeros({6, 3});
  std::string m = error_of([&] { (void)matmul<float>(a, b); });
  BOOST_TEST(m.find("matmul") != std::string::npos, m);
  BOOST_TEST(m.find("inner dimensions differ") != std::string::npos, m);
  BOOST_TEST(m.find("K=5") != std::string::npos, m);
  BOOST_TEST(m.find("K=6") != std::string::npos, m);

  m = error_of([&] { (void)matmul<float>(Tensor<float>::zeros({5}), b); });
  BOOST_TEST(m.find("tensor 'a' has rank 1") != std::string::npos, m);
  m = error_of([&] { (void)matmul<float>(a, Tensor<float>::zeros({1, 2, 5, 3})); });
  BOOST_TEST(m.find("tensor 'b' has rank 4") != std::string::npos, m);
  m = error_of([&] {
    (void)matmul<float>(Tensor<float>::zeros({2, 4, 5}), Tensor<float>::zeros({3, 5, 6}));
  });
  BOOST_TEST(m.find("batch sizes differ") != std::string::npos, m);
  // The transpose flags are part of the check.
  BOOST_CHECK_NO_THROW((void)matmul<float>(a, Tensor<float>::zeros({3, 5}), kNo, kYes));
  BOOST_CHECK_THROW((void)matmul<float>(a, Tensor<float>::zeros({3, 5}), kNo, kNo), Error);

  m = error_of([&] {
    (void)matmul_backward<float>(Tensor<float>::zeros({4, 4}), a, Tensor<float>::zeros({5, 3}));
  });
  BOOST_TEST(m.find("'dout'") != std::string::npos, m);
  BOOST_TEST(m.find("[4, 3]") != std::string::npos, m);

  // A path the type cannot take is refused with the reason.
  m = error_of([] {
    (void)matmul_via<double>(MatmulPath::kOneDnn, Tensor<double>::zeros({2, 2}), Tensor<double>::zeros({2, 2}));
  });
  BOOST_TEST(m.find("onednn") != std::string::npos, m);
  BOOST_TEST(m.find("double") != std::string::npos, m);
}

// ---- backward -----------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(backward_finite_differences) {
  const int64_t B = 2, M = 3, K = 5, N = 4;
  uint64_t seed = kSeed + 100;
  for (Batching bm : {Batching::kNone, Batching::kBoth, Batching::kBroadcastB, Batching::kBroadcastA})
    for (Transpose ta : {kNo, kYes})
      for (Transpose tb : {kNo, kYes}) {
        const std::optional<int64_t> ba =
            (bm == Batching::kBoth || bm == Batching::kBroadcastB) ? std::optional(B) : std::nullopt;
        const std::optional<int64_t> bb =
            (bm == Batching::kBoth || bm == Batching::kBroadcastA) ? std::optional(B) : std::nullopt;
        const std::string what = std::string(name(ta)) + name(tb) + " batching " + std::to_string(int(bm)) +
                                 " seed " + std::to_string(seed);
        BOOST_TEST_MESSAGE("backward " << what);
        const Tensor<double> a = random_tensor(stored(ba, M, K, ta), seed++);
        const Tensor<double> b = random_tensor(stored(bb, K, N, tb), seed++);
        const bool batched = ba || bb;
        const Tensor<double> g = random_tensor(batched ? Shape{B, M, N} : Shape{M, N}, seed++);
        const MatmulGrads<double> grads = matmul_backward<double>(g, a, b, ta, tb);
        const Tensor<double> da_num = numeric_gradient(
            [&](TensorView<const double> x) { return dot(matmul<double>(x, b, ta, tb), g); }, a);
        const Tensor<double> db_num = numeric_gradient(
            [&](TensorView<const double> x) { return dot(matmul<double>(a, x, ta, tb), g); }, b);
        check_close(grads.da, da_num, 1e-7, 1e-8, ("da " + what).c_str());
        check_close(grads.db, db_num, 1e-7, 1e-8, ("db " + what).c_str());
      }
}

BOOST_AUTO_TEST_CASE(backward_bf16_against_double) {
  // bf16 gradients are one product each, rounded once: within K * eps_f32 * |.| + eps_bf16 * |ref|.
  const int64_t B = 3, M = 17, K = 40, N = 9;
  BOOST_TEST_MESSAGE("seed " << kSeed + 200);
  for (Transpose ta : {kNo, kYes})
    for (Transpose tb : {kNo, kYes}) {
      auto a = cast<bf16>(random_tensor(stored(B, M, K, ta), kSeed + 200));
      auto b = cast<bf16>(random_tensor(stored(std::nullopt, K, N, tb), kSeed + 201));  // broadcast
      auto g = cast<bf16>(random_tensor({B, M, N}, kSeed + 202));
      const auto got = matmul_backward<bf16>(g, a, b, ta, tb);
      const auto want = matmul_backward<double>(cast<double>(g), cast<double>(a), cast<double>(b), ta, tb);
      const double eps = number_traits<bf16>::epsilon;
      // Magnitudes are sums of |products| over B*M <= 51 terms of size <= 1: bound them by the
      // term count (a loose but honest absolute tolerance) plus the final rounding.
      check_close(cast<double>(got.da), want.da, eps, N * 1e-6, "bf16 da");
      check_close(cast<double>(got.db), want.db, eps, B * M * 1e-6, "bf16 db");
    }
}

// ---- linear -------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(linear_forward) {
  BOOST_TEST_MESSAGE("seed " << kSeed + 300);
  const int64_t in = 13, out = 7;
  const Tensor<double> w = random_tensor({out, in}, kSeed + 300);
  const Tensor<double> bias = random_tensor({out}, kSeed + 301);
  for (const Shape& xs : {Shape{in}, Shape{5, in}, Shape{2, 3, in}, Shape{1, 1, 11, in}}) {
    const Tensor<double> x = random_tensor(xs, kSeed + 302);
    const Tensor<double> y = linear<double>(x, w, bias.view());
    const Tensor<double> y0 = linear<double>(x, w);
    Shape ys = xs;
    ys[-1] = out;
    BOOST_TEST(y.shape() == ys);
    const int64_t rows = x.numel() / in;
    auto want = Tensor<double>::empty(ys);
    auto want0 = Tensor<double>::empty(ys);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < out; ++o) {
        double s = 0;
        for (int64_t i = 0; i < in; ++i) s += x.data()[r * in + i] * w(o, i);
        want0.data()[r * out + o] = s;
        want.data()[r * out + o] = s + bias(o);
      }
    check_close(y, want, 1e-13, 1e-13, "linear with bias");
    check_close(y0, want0, 1e-13, 1e-13, "linear without bias");
  }
  // bf16: the bias is added before the one rounding.
  auto xb = cast<bf16>(random_tensor({6, in}, kSeed + 303));
  auto wb = cast<bf16>(w);
  auto bb = cast<bf16>(bias);
  const Tensor<double> yb = cast<double>(linear<bf16>(xb, wb, bb.view()));
  const Tensor<double> yd = linear<double>(cast<double>(xb), cast<double>(wb), cast<double>(bb).view());
  check_close(yb, yd, number_traits<bf16>::epsilon, in * 1e-6, "linear bf16");
}

BOOST_AUTO_TEST_CASE(linear_backward_finite_differences) {
  BOOST_TEST_MESSAGE("seed " << kSeed + 400);
  const int64_t in = 5, out = 7;
  const Tensor<double> x = random_tensor({2, 3, in}, kSeed + 400);
  const Tensor<double> w = random_tensor({out, in}, kSeed + 401);
  const Tensor<double> bias = random_tensor({out}, kSeed + 402);
  const Tensor<double> g = random_tensor({2, 3, out}, kSeed + 403);
  const LinearGrads<double> grads = linear_backward<double>(g, x, w, true);
  BOOST_TEST(grads.dx.shape() == x.shape());
  BOOST_TEST(grads.dweight.shape() == w.shape());
  BOOST_TEST(grads.dbias.shape() == bias.shape());
  check_close(grads.dx,
              numeric_gradient([&](TensorView<const double> v) { return dot(linear<double>(v, w, bias.view()), g); }, x),
              1e-7, 1e-8, "linear dx");
  check_close(grads.dweight,
              numeric_gradient([&](TensorView<const double> v) { return dot(linear<double>(x, v, bias.view()), g); }, w),
              1e-7, 1e-8, "linear dweight");
  check_close(grads.dbias,
              numeric_gradient([&](TensorView<const double> v) { return dot(linear<double>(x, w, v), g); }, bias),
              1e-7, 1e-8, "linear dbias");
  const LinearGrads<double> no_bias = linear_backward<double>(g, x, w, false);
  BOOST_TEST(no_bias.dbias.numel() == 0);  // an empty tensor: nothing computed
  check_close(no_bias.dx, grads.dx, 0, 0, "dx does not depend on the bias");
}

BOOST_AUTO_TEST_CASE(linear_errors) {
  auto x = Tensor<float>::zeros({4, 5});
  auto w = Tensor<float>::zeros({3, 6});
  std::string m = error_of([&] { (void)linear<float>(x, w); });
  BOOST_TEST(m.find("linear") != std::string::npos, m);
  BOOST_TEST(m.find("'weight'") != std::string::npos, m);
  BOOST_TEST(m.find("[3, 6]") != std::string::npos, m);
  BOOST_TEST(m.find("[3, 5]") != std::string::npos, m);
  auto w_ok = Tensor<float>::zeros({3, 5});
  auto bad_bias = Tensor<float>::zeros({4});
  m = error_of([&] { (void)linear<float>(x, w_ok, bad_bias.view()); });
  BOOST_TEST(m.find("'bias'") != std::string::npos, m);
  BOOST_TEST(m.find("[4]") != std::string::npos, m);
  m = error_of([&] { (void)linear_backward<float>(Tensor<float>::zeros({4, 4}), x, w_ok, true); });
  BOOST_TEST(m.find("'dout'") != std::string::npos, m);
}

// LibTorch cross-checks of matmul (every transpose combination, batched and broadcast, on
// every CPU back end this machine has) and linear (with and without bias), forward and
// backward, in float and bf16.
#define BOOST_TEST_MODULE torch_matmul
#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cross_check.hpp"
#include "tessera/ops/matmul.hpp"

using namespace tessera;
using namespace tessera::cross_check;
using ops::Transpose;

BOOST_TEST_GLOBAL_FIXTURE(TorchSetup);

namespace {

using Types = std::tuple<float, bf16>;

// ---- tolerances ---------------------------------------------------------------------------------
// A product sums K terms; two float sums of the same terms in different orders (blocked BLAS
// kernels on both sides) differ by at most about K eps sum|a_i b_i|, and for random N(0,1)
// inputs sum|a_i b_i| is of the order of the output's largest element. So float gets 2 K eps
// in both the relative and the scale-relative term (for K = 61 that is 7e-6).
// bf16: both sides accumulate in fp32 and round once, so the float difference plus one bf16
// ulp of the element (for_type in cross_check.hpp).
template <class T>
Tolerance product_tol(int64_t k) {
  const double t = 2.0 * static_cast<double>(k) * kFloatEps;
  return for_type<T>({t, t});
}

const char* tname(Transpose t) { return t == Transpose::kYes ? "T" : "N"; }

// Shape of an operand whose op() is (rows, cols), stored transposed when t says so.
Shape stored(std::optional<int64_t> batch, int64_t rows, int64_t cols, Transpose t) {
  const int64_t r = t == Transpose::kYes ? cols : rows, c = t == Transpose::kYes ? rows : cols;
  return batch ? Shape{*batch, r, c} : Shape{r, c};
}

struct Case {
  std::optional<int64_t> a_batch, b_batch;
  int64_t m, k, n;
};

// Odd sizes below and above the scalar-loop threshold (16^3 multiply-adds), batched, and both
// broadcast directions.
const std::vector<Case> kCases = {
    {{}, {}, 5, 7, 11},  {{}, {}, 37, 61, 29}, {3, 3, 5, 13, 7},
    {3, {}, 19, 23, 17}, {{}, 3, 19, 23, 17},  {2, 2, 33, 47, 21},
};

constexpr ops::MatmulPath kAllPaths[] = {ops::MatmulPath::kScalar, ops::MatmulPath::kEigen,
                                         ops::MatmulPath::kOpenBlas, ops::MatmulPath::kOneDnn};

}  // namespace

BOOST_AUTO_TEST_SUITE(matmul)

BOOST_AUTO_TEST_CASE_TEMPLATE(every_transpose_and_batch_layout, T, Types) {
  for (const Case& c : kCases) {
    for (Transpose ta : {Transpose::kNo, Transpose::kYes}) {
      for (Transpose tb : {Transpose::kNo, Transpose::kYes}) {
        const std::string tag = "matmul<" + name_of<T>() + "> " + tname(ta) + tname(tb) + " a" +
                                stored(c.a_batch, c.m, c.k, ta).str() + " b" +
                                stored(c.b_batch, c.k, c.n, tb).str();
        Gen gen(tag);
        auto a = normal<T>(gen, stored(c.a_batch, c.m, c.k, ta));
        auto b = normal<T>(gen, stored(c.b_batch, c.k, c.n, tb));
        const int64_t batch = c.a_batch ? *c.a_batch : c.b_batch ? *c.b_batch : 0;
        auto dy = normal<T>(gen, batch ? Shape{batch, c.m, c.n} : Shape{c.m, c.n});
        const auto ref = torch_ref::matmul(a.array, b.array, ta == Transpose::kYes,
                                           tb == Transpose::kYes, dy.array, precision_of<T>);
        // Forward on every back end this machine and build offer for T.
        for (ops::MatmulPath path : kAllPaths) {
          if (!ops::matmul_path_available<T>(path)) continue;
          auto y = ops::matmul_via<T>(path, a.tensor, b.tensor, ta, tb);
          check_close(tag + " y [" + to_string(path) + "]", y, ref.y, product_tol<T>(c.k));
        }
        // Backward on the automatic choice (TESSERA_CPU_PATH selects another).
        auto g = ops::matmul_backward<T>(dy.tensor, a.tensor, b.tensor, ta, tb);
        // da sums over n (and over the batch when a is broadcast), db over m (and the batch).
        const int64_t a_terms = c.n * (!c.a_batch && c.b_batch ? *c.b_batch : 1);
        const int64_t b_terms = c.m * (!c.b_batch && c.a_batch ? *c.a_batch : 1);
        check_close(tag + " da", g.da, ref.da, product_tol<T>(a_terms));
        check_close(tag + " db", g.db, ref.db, product_tol<T>(b_terms));
      }
    }
  }
}

// Strided operands: a column slice of a wider matrix and a transposed view are read in place
// (or copied) by tessera; LibTorch gets the same values densely.
BOOST_AUTO_TEST_CASE_TEMPLATE(strided_views, T, Types) {
  const std::string tag = "matmul<" + name_of<T>() + "> strided";
  Gen gen(tag);
  auto wide = normal<T>(gen, {29, 50});
  auto bt = normal<T>(gen, {23, 31});
  auto a = wide.tensor.slice(1, 3, 34);  // (29, 31), row stride 50
  auto b = bt.tensor.transpose(0, 1);    // (31, 23), column-major
  auto dy = normal<T>(gen, {29, 23});
  const auto ref =
      torch_ref::matmul(to_array<T>(a), to_array<T>(b), false, false, dy.array, precision_of<T>);
  auto y = ops::matmul<T>(a, b);
  auto g = ops::matmul_backward<T>(dy.tensor, a, b);
  check_close(tag + " y", y, ref.y, product_tol<T>(31));
  check_close(tag + " da", g.da, ref.da, product_tol<T>(23));
  check_close(tag + " db", g.db, ref.db, product_tol<T>(29));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(linear)

BOOST_AUTO_TEST_CASE_TEMPLATE(with_and_without_bias, T, Types) {
  struct LinearCase {
    Shape x;
    int64_t out;
  };
  for (const LinearCase& c :
       {LinearCase{{7, 13}, 11}, LinearCase{{2, 5, 13}, 11}, LinearCase{{3, 11, 70}, 45}}) {
    for (bool with_bias : {false, true}) {
      const std::string tag = "linear<" + name_of<T>() + "> x" + c.x.str() + " out " +
                              std::to_string(c.out) + (with_bias ? " +bias" : "");
      Gen gen(tag);
      const int64_t in = c.x[-1];
      auto x = normal<T>(gen, c.x);
      auto w = normal<T>(gen, {c.out, in}, 0.3);
      auto bias = normal<T>(gen, {c.out});
      Shape yshape = c.x;
      yshape[-1] = c.out;
      auto dy = normal<T>(gen, yshape);
      std::optional<TensorView<const T, Cpu>> tb;
      std::optional<Array> rb;
      if (with_bias) {
        tb = bias.tensor.view();
        rb = bias.array;
      }
      const auto ref = torch_ref::linear(x.array, w.array, rb, dy.array, precision_of<T>);
      auto y = ops::linear<T>(x.tensor, w.tensor, tb);
      auto g = ops::linear_backward<T>(dy.tensor, x.tensor, w.tensor, with_bias);
      const int64_t rows = c.x.numel() / in;
      check_close(tag + " y", y, ref.y, product_tol<T>(in + 1));
      check_close(tag + " dx", g.dx, ref.dx, product_tol<T>(c.out));
      check_close(tag + " dweight", g.dweight, ref.dw, product_tol<T>(rows));
      if (with_bias)
        check_close(tag + " dbias", g.dbias, ref.db, product_tol<T>(rows));
      else
        BOOST_TEST(g.dbias.data() == nullptr);  // no bias: an empty tensor, no storage
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

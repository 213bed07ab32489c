// Embedding: the forward gather is bit-exact for every id shape (rank 0 to 5) and number type,
// strided tables work, bad ids throw with the position, the id and the vocab size; the
// backward scatter-add matches a plain sequential loop bit for bit at every thread count
// (the determinism promise), central finite differences in double, and bf16/fp16 rounding
// once after a float sum.
#define BOOST_TEST_MODULE embedding
#include <omp.h>

#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "finite_difference.hpp"
#include "tessera/ops/embedding.hpp"

using namespace tessera;
using tessera::testing::check_close;
using tessera::testing::dot;
using tessera::testing::numeric_gradient;
using tessera::testing::random_tensor;

namespace {

constexpr uint64_t kSeed = 104729;

template <class To, class From>
Tensor<To> cast(TensorView<const From> x) {
  const Tensor<From> c = x.contiguous();
  auto out = Tensor<To>::empty(x.shape());
  for (int64_t i = 0; i < c.numel(); ++i) {
    if constexpr (std::is_same_v<To, double>) {
      if constexpr (std::is_same_v<From, double> || std::is_same_v<From, float>) {
        out.data()[i] = c.data()[i];
      } else {
        out.data()[i] = static_cast<double>(to_float(c.data()[i]));
      }
    } else if constexpr (std::is_same_v<To, float>) {
      out.data()[i] = static_cast<float>(c.data()[i]);
    } else {
      out.data()[i] = from_float<To>(static_cast<float>(c.data()[i]));
    }
  }
  return out;
}

Tensor<int32_t> random_ids(Shape s, int32_t vocab, uint64_t seed) {
  std::mt19937_64 gen(seed);
  auto p = Tensor<int32_t>::empty(s);
  for (int32_t& v : p.span()) v = static_cast<int32_t>(gen() % static_cast<uint64_t>(vocab));
  return p;
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

// out row t must be the bytes of table row ids[t].
template <class T>
bool rows_match(const Tensor<T>& out, TensorView<const T> table, const Tensor<int32_t>& ids) {
  const int64_t dim = table.dim(1);
  for (int64_t t = 0; t < ids.numel(); ++t)
    for (int64_t c = 0; c < dim; ++c) {
      const T want = table(static_cast<int64_t>(ids.data()[t]), c);
      if (std::memcmp(&out.data()[t * dim + c], &want, sizeof(T)) != 0) return false;
    }
  return true;
}

// Plain sequential scatter-add in token order, accumulated in float (double for double).
template <class T, class A = std::conditional_t<std::is_same_v<T, double>, double, float>>
Tensor<T> naive_backward(const Tensor<T>& dout, const Tensor<int32_t>& ids, int64_t vocab) {
  const int64_t dim = dout.dim(-1);
  std::vector<A> acc(static_cast<size_t>(vocab * dim), A(0));
  for (int64_t t = 0; t < ids.numel(); ++t)
    for (int64_t c = 0; c < dim; ++c) {
      if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
        acc[ids.data()[t] * dim + c] += dout.data()[t * dim + c];
      } else {
        acc[ids.data()[t] * dim + c] += to_float(dout.data()[t * dim + c]);
      }
    }
  auto g = Tensor<T>::empty({vocab, dim});
  for (int64_t i = 0; i < vocab * dim; ++i) {
    if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
      g.data()[i] = acc[i];
    } else {
      g.data()[i] = from_float<T>(acc[i]);
    }
  }
  return g;
}

template <class T>
bool same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

}  // namespace

BOOST_AUTO_TEST_CASE(forward_gathers_rows_for_every_id_shape) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  const Tensor<float> table = cast<float, double>(random_tensor({13, 7}, kSeed));
  uint64_t seed = kSeed + 1;
  for (const Shape& s : {Shape{}, Shape{5}, Shape{5, 11}, Shape{2, 3, 5}, Shape{1, 2, 1, 3, 2}}) {
    const Tensor<int32_t> ids = random_ids(s, 13, seed++);
    const Tensor<float> out = ops::embedding<float>(table, ids);
    std::vector<int64_t> want(s.begin(), s.end());
    want.push_back(7);
    BOOST_TEST_INFO("ids shape " << s);
    BOOST_TEST(out.shape() == Shape(want));
    BOOST_TEST(rows_match<float>(out, table, ids));
  }
  // Large enough for the parallel path.
  const Tensor<int32_t> ids = random_ids({64, 129}, 13, seed++);
  const Tensor<float> big_table = cast<float, double>(random_tensor({13, 67}, seed++));
  BOOST_TEST(rows_match<float>(ops::embedding<float>(big_table, ids), big_table, ids));
}

BOOST_AUTO_TEST_CASE(forward_is_bit_exact_for_low_precision) {
  const Tensor<int32_t> ids = random_ids({7, 5}, 11, kSeed + 10);
  const Tensor<bf16> tb = cast<bf16, double>(random_tensor({11, 9}, kSeed + 11));
  BOOST_TEST(rows_match<bf16>(ops::embedding<bf16>(tb, ids), tb, ids));
  const Tensor<fp16> th = cast<fp16, double>(random_tensor({11, 9}, kSeed + 12));
  BOOST_TEST(rows_match<fp16>(ops::embedding<fp16>(th, ids), th, ids));
  const Tensor<double> td = random_tensor({11, 9}, kSeed + 13);
  BOOST_TEST(rows_match<double>(ops::embedding<double>(td, ids), td, ids));
}

BOOST_AUTO_TEST_CASE(strided_tables) {
  const Tensor<float> wide = cast<float, double>(random_tensor({13, 20}, kSeed + 20));
  const Tensor<int32_t> ids = random_ids({4, 6}, 13, kSeed + 21);
  auto cols = wide.slice(1, 3, 10);  // rows contiguous, row stride 20
  BOOST_TEST(rows_match<float>(ops::embedding<float>(cols, ids), cols, ids));
  const Tensor<float> tall = cast<float, double>(random_tensor({7, 13}, kSeed + 22));
  auto transposed = tall.transpose(0, 1);  // (13, 7), rows strided: copied first
  BOOST_TEST(rows_match<float>(ops::embedding<float>(transposed, ids), transposed, ids));
  // Strided ids.
  const Tensor<int32_t> ids_t = random_ids({6, 4}, 13, kSeed + 23);
  auto idv = ids_t.transpose(0, 1);
  BOOST_TEST(rows_match<float>(ops::embedding<float>(wide, idv), wide, idv.contiguous()));
}

BOOST_AUTO_TEST_CASE(backward_matches_finite_differences) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  uint64_t seed = kSeed + 30;
  for (const Shape& s : {Shape{5}, Shape{3, 7}, Shape{2, 2, 5}}) {
    const Tensor<double> table = random_tensor({11, 5}, seed++);
    const Tensor<int32_t> ids = random_ids(s, 11, seed++);  // repeats are likely: 11 ids
    std::vector<int64_t> os(s.begin(), s.end());
    os.push_back(5);
    const Tensor<double> g = random_tensor(Shape(os), seed++);
    auto loss = [&](TensorView<const double> t) { return dot(ops::embedding<double>(t, ids), g); };
    const Tensor<double> dtable = ops::embedding_backward<double>(g, ids, 11);
    BOOST_TEST_INFO("ids shape " << s);
    // The loss is linear in the table, so the only error is the difference's rounding noise,
    // eps_double * |L| / h ~ 1e-9.
    check_close(dtable, numeric_gradient(loss, table), 1e-7, 1e-8, "embedding dtable");
    BOOST_TEST(same_bits(dtable, naive_backward(g, ids, 11)));
  }
}

BOOST_AUTO_TEST_CASE(backward_is_deterministic_across_thread_counts) {
  // Few ids, many tokens: every gradient row is a long float sum, whose value depends on the
  // order of its terms. The result must equal the sequential token-order sum, bit for bit,
  // whatever the thread count.
  BOOST_TEST_MESSAGE("seed " << kSeed);
  const int64_t vocab = 37, dim = 67;
  const Tensor<int32_t> ids = random_ids({8, 613}, 7, kSeed + 40);  // ids 0..6 only
  auto dout = cast<float, double>(random_tensor({8, 613, dim}, kSeed + 41));
  for (float& v : dout.span()) v *= 1000.0f;  // wide magnitudes make order matter
  const Tensor<float> expected = naive_backward(dout, ids, vocab);
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3, 8}) {
    omp_set_num_threads(threads);
    const Tensor<float> got = ops::embedding_backward<float>(dout, ids, vocab);
    BOOST_TEST_INFO(threads << " threads");
    BOOST_TEST(same_bits(got, expected));
  }
  omp_set_num_threads(saved);
  // Untouched rows are exactly zero.
  const Tensor<float> got = ops::embedding_backward<float>(dout, ids, vocab);
  for (int64_t v = 7; v < vocab; ++v)
    for (int64_t c = 0; c < dim; ++c) BOOST_TEST(got(v, c) == 0.0f);
}

template <class T>
void check_low_precision_backward() {
  const Tensor<int32_t> ids = random_ids({9, 31}, 5, kSeed + 50);
  const Tensor<T> dout = cast<T, double>(random_tensor({9, 31, 13}, kSeed + 51));
  BOOST_TEST_INFO(number_traits<T>::name);
  // Accumulated in float and rounded once: equal to the naive float-accumulating loop.
  BOOST_TEST(same_bits(ops::embedding_backward<T>(dout, ids, 6), naive_backward(dout, ids, 6)));
}

BOOST_AUTO_TEST_CASE(bf16_fp16_backward_round_once) {
  check_low_precision_backward<bf16>();
  check_low_precision_backward<fp16>();
}

BOOST_AUTO_TEST_CASE(empty_inputs) {
  const Tensor<float> table = Tensor<float>::full({4, 3}, 1.0f);
  const auto out = ops::embedding<float>(table, Tensor<int32_t>::zeros({0, 5}));
  BOOST_TEST(out.shape() == (Shape{0, 5, 3}));
  const auto g = ops::embedding_backward<float>(Tensor<float>::zeros({0, 5, 3}),
                                                Tensor<int32_t>::zeros({0, 5}), 4);
  BOOST_TEST(g.shape() == (Shape{4, 3}));
  for (float v : g.span()) BOOST_TEST(v == 0.0f);
}

BOOST_AUTO_TEST_CASE(errors_name_position_id_and_vocab) {
  const Tensor<float> table = Tensor<float>::zeros({13, 4});
  auto ids = Tensor<int32_t>::zeros({2, 5});
  ids(1, 3) = 13;
  std::string msg = error_of([&] { (void)ops::embedding<float>(table, ids); });
  BOOST_TEST(msg.find("embedding") != std::string::npos);
  BOOST_TEST(msg.find("ids[1, 3] = 13") != std::string::npos);
  BOOST_TEST(msg.find("vocab size 13") != std::string::npos);
  ids(1, 3) = -2;
  msg = error_of([&] { (void)ops::embedding<float>(table, ids); });
  BOOST_TEST(msg.find("ids[1, 3] = -2") != std::string::npos);
  msg = error_of([&] {
    (void)ops::embedding_backward<float>(Tensor<float>::zeros({2, 5, 4}), ids, 13);
  });
  BOOST_TEST(msg.find("embedding_backward") != std::string::npos);
  BOOST_TEST(msg.find("ids[1, 3] = -2") != std::string::npos);

  ids(1, 3) = 0;
  BOOST_CHECK_THROW((void)ops::embedding<float>(Tensor<float>::zeros({13}), ids), Error);
  msg = error_of([&] {
    (void)ops::embedding_backward<float>(Tensor<float>::zeros({2, 4, 4}), ids, 13);
  });
  BOOST_TEST(msg.find("'dout'") != std::string::npos);
  BOOST_TEST(msg.find("[2, 5, 4]") != std::string::npos);
  BOOST_CHECK_THROW((void)ops::embedding_backward<float>(Tensor<float>::zeros({2, 5}), ids, 13),
                    Error);
  BOOST_CHECK_THROW((void)ops::embedding_backward<float>(Tensor<float>::zeros({2, 5, 4}), ids, 0),
                    Error);
  msg = error_of([&] {
    (void)ops::embedding<float>(table, Tensor<int32_t>::zeros({1, 1, 1, 1, 1, 1}));
  });
  BOOST_TEST(msg.find("maximum rank") != std::string::npos);
}

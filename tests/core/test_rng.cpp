// Philox4x32-10 and the tessera random stream: the cipher against Random123's published
// known answers, the stream layout, the slicing and thread-count guarantees that make fills
// reproducible, distribution moments against statistically justified bounds, and the
// sequential Philox class (position/seek, as a checkpoint restores it).
#define BOOST_TEST_MODULE rng
#include <boost/test/unit_test.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "tessera/core/rng.hpp"

using namespace tessera;

namespace {

using Words = std::array<uint32_t, 4>;
using Key = std::array<uint32_t, 2>;

// One seed for the statistical tests, printed so a failure can be replayed.
constexpr uint64_t kStatSeed = 20240607;

// Sets the OpenMP team size for one scope and restores it afterwards.
struct ThreadCount {
  explicit ThreadCount(int n) {
#if defined(_OPENMP)
    saved_ = omp_get_max_threads();
    omp_set_num_threads(n);
#else
    (void)n;
#endif
  }
  ~ThreadCount() {
#if defined(_OPENMP)
    omp_set_num_threads(saved_);
#endif
  }
  int saved_ = 1;
};

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Bitwise equality, so that -0.0 vs 0.0 or two NaNs are not papered over.
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

struct Moments {
  double mean;
  double variance;  // population variance around the sample mean
};
template <class T>
Moments moments(const std::vector<T>& x) {
  double sum = 0;
  for (T v : x) sum += v;
  const double mean = sum / static_cast<double>(x.size());
  double ss = 0;
  for (T v : x) ss += (v - mean) * (v - mean);
  return {mean, ss / static_cast<double>(x.size())};
}

}  // namespace

// ---- the cipher -------------------------------------------------------------------------

// Random123 tests/kat_vectors, rows "philox4x32 10" (counter[4] key[2] -> output[4]). Taken
// from the reference file as reproduced in D. E. Shaw Research's Random123-Boost test
// (dokat<philox4x32_prf<10>>) and cross-checked against several independent ports.
constexpr Words kKatCounter[3] = {{0x00000000, 0x00000000, 0x00000000, 0x00000000},
                                  {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
                                  {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}};
constexpr Key kKatKey[3] = {{0x00000000, 0x00000000},
                            {0xffffffff, 0xffffffff},
                            {0xa4093822, 0x299f31d0}};
constexpr Words kKatOutput[3] = {{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
                                 {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
                                 {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}};

// The cipher is constexpr: a wrong round function fails the build, not just the test.
static_assert(philox4x32_10(kKatCounter[0], kKatKey[0]) == kKatOutput[0]);
static_assert(philox4x32_10(kKatCounter[1], kKatKey[1]) == kKatOutput[1]);
static_assert(philox4x32_10(kKatCounter[2], kKatKey[2]) == kKatOutput[2]);

BOOST_AUTO_TEST_CASE(philox4x32_10_known_answers) {
  for (int k = 0; k < 3; ++k) {
    const Words& c = kKatCounter[k];
    const Key& key = kKatKey[k];
    BOOST_TEST(philox4x32_10(c, key) == kKatOutput[k]);
    // The device-friendly overload on plain structs computes the same.
    const Philox4x32 out =
        philox4x32_10(Philox4x32{{c[0], c[1], c[2], c[3]}}, PhiloxKey{{key[0], key[1]}});
    for (int j = 0; j < 4; ++j) BOOST_TEST(out.v[j] == kKatOutput[k][j]);
  }
}

// ---- the stream layout ------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(stream_element_is_word_of_counter_block) {
  // Seed 0, subsequence 0: elements 0..3 are exactly the all-zero known answer.
  for (uint64_t i = 0; i < 4; ++i) BOOST_TEST(philox_u32(Seed{0}, 0, i) == kKatOutput[0][i]);

  // Every half of seed, subsequence and block index lands in its documented word, including
  // block indices past 2^32 (counter word 1) and the high halves of seed and subsequence.
  const uint64_t seed = 0x0123456789abcdefull;
  const uint64_t sub = 0xfedcba9876543210ull;
  for (uint64_t i : {uint64_t{0}, uint64_t{5}, uint64_t{4} << 32, (uint64_t{4} << 32) + 7,
                     uint64_t{0x3fffffffffffffff}}) {
    const uint64_t block = i / 4;
    const Words expected = philox4x32_10(
        Words{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
              static_cast<uint32_t>(sub), static_cast<uint32_t>(sub >> 32)},
        Key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
    BOOST_TEST(philox_u32(Seed{seed}, sub, i) == expected[i % 4], "index " << i);
  }
}

BOOST_AUTO_TEST_CASE(same_seed_same_stream_other_seed_or_subsequence_differs) {
  const int64_t n = 4096;
  std::vector<float> a(n), b(n), other_sub(n), other_seed(n);
  fill_uniform(a.data(), n, Seed{7}, 3, 0.0f, 1.0f);
  fill_uniform(b.data(), n, Seed{7}, 3, 0.0f, 1.0f);
  fill_uniform(other_sub.data(), n, Seed{7}, 4, 0.0f, 1.0f);
  fill_uniform(other_seed.data(), n, Seed{8}, 3, 0.0f, 1.0f);
  BOOST_TEST(same_bits(a, b));
  // Two independent streams agree on a 24-bit value with probability 2^-24 per element, so
  // over 4096 elements even a single coincidence is unlikely (p ~ 2.4e-4); allow a few.
  int same_sub = 0, same_seed = 0;
  for (int64_t i = 0; i < n; ++i) {
    same_sub += a[i] == other_sub[i];
    same_seed += a[i] == other_seed[i];
  }
  BOOST_TEST(same_sub <= 2);
  BOOST_TEST(same_seed <= 2);
}

// ---- mapping words to numbers -----------------------------------------------------------

BOOST_AUTO_TEST_CASE(uniform_mapping_edges) {
  BOOST_TEST(uniform01(0u) == 0.0f);
  BOOST_TEST(uniform01(0xffu) == 0.0f);  // the low 8 bits are dropped
  BOOST_TEST(uniform01(0x100u) == std::ldexp(1.0f, -24));
  BOOST_TEST(uniform01(0xffffffffu) == 1.0f - std::ldexp(1.0f, -24));
  BOOST_TEST(uniform01(0xffffffffu) < 1.0f);

  // [1, 2) in float: 1 + (1 - 2^-24) is a tie that rounds to 2; the result must stay below hi.
  const float top = uniform_from_u32<float>(0xffffffffu, 1.0f, 2.0f);
  BOOST_TEST(top < 2.0f);
  BOOST_TEST(top == std::nextafter(2.0f, 1.0f));
  BOOST_TEST(uniform_from_u32<float>(0u, 1.0f, 2.0f) == 1.0f);
  BOOST_TEST(uniform_from_u32<double>(0xffffffffu, 1.0, 2.0) == 2.0 - std::ldexp(1.0, -24));
  BOOST_TEST(uniform_from_u32<float>(0x12345678u, 0.0f, 1.0f) == uniform01(0x12345678u));

  // Box-Muller at its extremes: the radius uniform is in (0, 1], so no log(0).
  const NormalPair zero_radius = box_muller(0xffffffffu, 0x40000000u);
  BOOST_TEST(zero_radius.z0 == 0.0);
  const NormalPair largest = box_muller(0u, 0u);  // angle 0: all of r on the cosine branch
  BOOST_TEST(largest.z0 == std::sqrt(2.0 * 32.0 * std::log(2.0)),
             boost::test_tools::tolerance(1e-12));
  BOOST_TEST(std::isfinite(largest.z0));
}

BOOST_AUTO_TEST_CASE(float_and_double_fills_draw_the_same_numbers) {
  // The double path uses the same 24-bit uniforms and the same double normals, so the float
  // fill is the double fill rounded: double-precision checks can reuse float test inputs.
  const int64_t n = 1001;
  std::vector<float> uf(n), nf(n);
  std::vector<double> ud(n), nd(n);
  fill_uniform(uf.data(), n, Seed{11}, 2, 0.0f, 1.0f, 3);
  fill_uniform(ud.data(), n, Seed{11}, 2, 0.0, 1.0, 3);
  fill_normal(nf.data(), n, Seed{11}, 2, 0.0f, 1.0f, 3);
  fill_normal(nd.data(), n, Seed{11}, 2, 0.0, 1.0, 3);
  int mismatches = 0;
  for (int64_t i = 0; i < n; ++i) {
    mismatches += static_cast<double>(uf[i]) != ud[i];
    mismatches += nf[i] != static_cast<float>(nd[i]);
  }
  BOOST_TEST(mismatches == 0);
}

// ---- fills ------------------------------------------------------------------------------

// A fill of [first, first + len) must equal the same slice of a fill of [0, N), and must not
// write outside its range: odd offsets and lengths cross Philox block boundaries in every way.
template <class T, class Fill>
void check_subranges(Fill fill) {
  const int64_t total = 1000;
  std::vector<T> full(total);
  fill(full.data(), total, int64_t{0});
  const T sentinel = T(-12345.5);
  const int64_t guard = 8;
  const std::array<std::array<int64_t, 2>, 9> ranges = {
      {{0, 5}, {1, 7}, {2, 11}, {3, 13}, {4, 4}, {5, 1}, {997, 3}, {500, 0}, {13, 987}}};
  for (const auto& [first, len] : ranges) {
    std::vector<T> buf(len + 2 * guard, sentinel);
    fill(buf.data() + guard, len, first);
    for (int64_t g = 0; g < guard; ++g) {
      BOOST_TEST(buf[g] == sentinel, "write before the range at first " << first);
      BOOST_TEST(buf[guard + len + g] == sentinel, "write after the range at first " << first);
    }
    std::vector<T> part(buf.begin() + guard, buf.begin() + guard + len);
    std::vector<T> slice(full.begin() + first, full.begin() + first + len);
    BOOST_TEST(same_bits(part, slice), "subrange [" << first << ", " << first + len << ")");
  }
}

BOOST_AUTO_TEST_CASE(subrange_fill_equals_slice_of_full_fill) {
  check_subranges<float>([](float* out, int64_t n, int64_t first) {
    fill_uniform(out, n, Seed{42}, 9, -0.5f, 0.5f, first);
  });
  check_subranges<double>([](double* out, int64_t n, int64_t first) {
    fill_uniform(out, n, Seed{42}, 9, -3.0, 5.0, first);
  });
  check_subranges<float>([](float* out, int64_t n, int64_t first) {
    fill_normal(out, n, Seed{42}, 9, 1.0f, 0.02f, first);
  });
  check_subranges<double>([](double* out, int64_t n, int64_t first) {
    fill_normal(out, n, Seed{42}, 9, 0.0, 1.0, first);
  });
}

BOOST_AUTO_TEST_CASE(fill_matches_per_element_functions) {
  // The per-element functions are what a CUDA kernel calls, one thread per element.
  const int64_t n = 37, first = 6;
  std::vector<float> u(n), z(n);
  fill_uniform(u.data(), n, Seed{5}, 1, -2.0f, 2.0f, first);
  fill_normal(z.data(), n, Seed{5}, 1, 0.5f, 3.0f, first);
  for (int64_t k = 0; k < n; ++k) {
    const auto i = static_cast<uint64_t>(first + k);
    BOOST_TEST(u[k] == uniform_at<float>(Seed{5}, 1, i, -2.0f, 2.0f));
    BOOST_TEST(z[k] == normal_at<float>(Seed{5}, 1, i, 0.5f, 3.0f));
  }
}

BOOST_AUTO_TEST_CASE(fill_is_independent_of_thread_count) {
  // Large enough to take the parallel path; odd size and offset so threads split mid-block.
  const int64_t n = (int64_t{1} << 20) + 3, first = 5;
  std::vector<float> u1(n), u2(n), u3(n);
  std::vector<double> z1(n), z2(n), z3(n);
  {
    ThreadCount t(1);
    fill_uniform(u1.data(), n, Seed{99}, 0, -1.0f, 1.0f, first);
    fill_normal(z1.data(), n, Seed{99}, 0, 0.0, 1.0, first);
  }
  {
    ThreadCount t(2);
    fill_uniform(u2.data(), n, Seed{99}, 0, -1.0f, 1.0f, first);
    fill_normal(z2.data(), n, Seed{99}, 0, 0.0, 1.0, first);
  }
  {
    ThreadCount t(3);
    fill_uniform(u3.data(), n, Seed{99}, 0, -1.0f, 1.0f, first);
    fill_normal(z3.data(), n, Seed{99}, 0, 0.0, 1.0, first);
  }
  BOOST_TEST(same_bits(u1, u2));
  BOOST_TEST(same_bits(u1, u3));
  BOOST_TEST(same_bits(z1, z2));
  BOOST_TEST(same_bits(z1, z3));
}

// ---- distributions ----------------------------------------------------------------------
// Bounds are 6 standard errors of the estimator for n = 1e6 (a false failure has probability
// ~2e-9 per check). For U[0,1): Var(mean) = (1/12)/n; the sample variance has variance
// (mu4 - sigma^4)/n with mu4 = 1/80, so (1/80 - 1/144)/n = (1/180)/n. For N(0,1): Var(mean) =
// 1/n and Var(sample variance) = 2/n; scaled by stddev and stddev^2 for N(mean, stddev).

BOOST_AUTO_TEST_CASE(uniform_moments_and_range) {
  BOOST_TEST_MESSAGE("uniform_moments_and_range: seed " << kStatSeed);
  const int64_t n = 1000000;
  const double nd = static_cast<double>(n);
  std::vector<float> x(n);
  fill_uniform(x.data(), n, Seed{kStatSeed}, 0, 0.0f, 1.0f);
  const Moments m = moments(x);
  BOOST_TEST(std::abs(m.mean - 0.5) < 6.0 * std::sqrt(1.0 / 12.0 / nd));
  BOOST_TEST(std::abs(m.variance - 1.0 / 12.0) < 6.0 * std::sqrt(1.0 / 180.0 / nd));

  // An affine range keeps every value in [lo, hi) and scales the moments.
  const float lo = -3.0f, hi = 5.0f;
  std::vector<float> y(n);
  fill_uniform(y.data(), n, Seed{kStatSeed}, 1, lo, hi);
  int outside = 0;
  for (float v : y) outside += !(v >= lo && v < hi);
  BOOST_TEST(outside == 0);
  const double w = hi - lo;
  const Moments my = moments(y);
  BOOST_TEST(std::abs(my.mean - 1.0) < 6.0 * w * std::sqrt(1.0 / 12.0 / nd));
  BOOST_TEST(std::abs(my.variance - w * w / 12.0) < 6.0 * w * w * std::sqrt(1.0 / 180.0 / nd));

  // Ten equal bins: each count is Binomial(n, 0.1), standard deviation sqrt(n * 0.09) = 300.
  std::array<int64_t, 10> bins{};
  for (float v : x) ++bins[static_cast<int>(v * 10.0f)];
  for (int64_t c : bins) BOOST_TEST(std::abs(static_cast<double>(c) - 100000.0) < 6.0 * 300.0);
}

BOOST_AUTO_TEST_CASE(normal_moments) {
  BOOST_TEST_MESSAGE("normal_moments: seed " << kStatSeed);
  const int64_t n = 1000000;
  const double nd = static_cast<double>(n);
  std::vector<double> z(n);
  fill_normal(z.data(), n, Seed{kStatSeed}, 2, 0.0, 1.0);
  const Moments m = moments(z);
  BOOST_TEST(std::abs(m.mean) < 6.0 / std::sqrt(nd));
  BOOST_TEST(std::abs(m.variance - 1.0) < 6.0 * std::sqrt(2.0 / nd));

  // P(|z| < 1) = 0.682689...; a Binomial proportion has standard error sqrt(p(1-p)/n).
  const double p = 0.6826894921370859;
  int64_t inside = 0;
  for (double v : z) inside += std::abs(v) < 1.0;
  BOOST_TEST(std::abs(static_cast<double>(inside) / nd - p) < 6.0 * std::sqrt(p * (1 - p) / nd));

  // The cosine and sine branches of one Box-Muller draw are uncorrelated: the sample
  // correlation of n/2 pairs has standard error 1/sqrt(n/2).
  double cross = 0;
  for (int64_t i = 0; i + 1 < n; i += 2) cross += z[i] * z[i + 1];
  BOOST_TEST(std::abs(cross / (nd / 2)) < 6.0 / std::sqrt(nd / 2));

  const float mean = 3.0f, stddev = 2.0f;
  std::vector<float> y(n);
  fill_normal(y.data(), n, Seed{kStatSeed}, 3, mean, stddev);
  const Moments my = moments(y);
  BOOST_TEST(std::abs(my.mean - mean) < 6.0 * stddev / std::sqrt(nd));
  BOOST_TEST(std::abs(my.variance - stddev * stddev) < 6.0 * stddev * stddev * std::sqrt(2.0 / nd));
}

// ---- the sequential class ---------------------------------------------------------------

BOOST_AUTO_TEST_CASE(philox_class_reads_the_same_stream) {
  const Seed seed{123};
  const uint64_t sub = 77;
  Philox g(seed, sub);
  for (uint64_t i = 0; i < 19; ++i) BOOST_TEST(g.next_u32() == philox_u32(seed, sub, i));
  BOOST_TEST(g.position() == 19u);

  // Position p is element p of the fill functions, read as a uniform or as a normal.
  const int64_t n = 23, first = 19;
  std::vector<float> u(n), z(n);
  fill_uniform(u.data(), n, seed, sub, 0.0f, 1.0f, first);
  fill_normal(z.data(), n, seed, sub, 0.0f, 1.0f, first);
  for (int64_t k = 0; k < n; ++k) BOOST_TEST(g.next_uniform() == u[k]);
  g.seek(first);
  for (int64_t k = 0; k < n; ++k) BOOST_TEST(g.next_normal() == z[k]);
  BOOST_TEST(g.position() == static_cast<uint64_t>(first + n));
  BOOST_TEST(g.seed().value == seed.value);
  BOOST_TEST(g.subsequence() == sub);
}

BOOST_AUTO_TEST_CASE(philox_class_seek_restores_bit_exactly) {
  Philox g(Seed{2024}, 5);
  for (int i = 0; i < 7; ++i) g.next_normal();  // odd: the checkpoint lands inside a pair
  const uint64_t saved = g.position();
  std::vector<float> after;
  for (int i = 0; i < 21; ++i) after.push_back(i % 3 == 0 ? g.next_uniform() : g.next_normal());

  // A fresh generator (as after loading a checkpoint) that seeks continues identically.
  Philox restored(Seed{2024}, 5);
  restored.seek(saved);
  BOOST_TEST(restored.position() == saved);
  std::vector<float> again;
  for (int i = 0; i < 21; ++i)
    again.push_back(i % 3 == 0 ? restored.next_uniform() : restored.next_normal());
  BOOST_TEST(same_bits(after, again));

  // Seeking far ahead costs nothing and lands on the right element.
  const uint64_t far = (uint64_t{1} << 40) + 3;
  restored.seek(far);
  BOOST_TEST(restored.next_u32() == philox_u32(Seed{2024}, 5, far));

  // Seeking back to a position inside the cached block must not reuse a stale block.
  Philox h(Seed{1}, 0);
  h.seek(8);
  const uint32_t w8 = h.next_u32();
  h.seek(1);
  BOOST_TEST(h.next_u32() == philox_u32(Seed{1}, 0, 1));
  h.seek(8);
  BOOST_TEST(h.next_u32() == w8);
}

// ---- preconditions ----------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(bad_arguments_throw_with_the_values) {
  std::vector<float> x(4);
  BOOST_TEST(error_of([&] { fill_uniform(x.data(), 4, Seed{1}, 0, 1.0f, 1.0f); }) ==
             "fill_uniform: need lo < hi, got lo = 1, hi = 1");
  BOOST_TEST(error_of([&] { fill_uniform(x.data(), -1, Seed{1}, 0, 0.0f, 1.0f); }) ==
             "fill_uniform: n must be >= 0, got -1");
  BOOST_TEST(!error_of([&] {
                fill_uniform(x.data(), 4, Seed{1}, 0, -std::numeric_limits<float>::max(),
                             std::numeric_limits<float>::max());
              }).empty());
  BOOST_TEST(error_of([&] { fill_normal(x.data(), 4, Seed{1}, 0, 0.0f, -1.0f); }) ==
             "fill_normal: stddev must be finite and >= 0, got -1");
  BOOST_TEST(error_of([&] { fill_normal(x.data(), 4, Seed{1}, 0, 0.0f, 1.0f, -2); }) ==
             "fill_normal: first_index must be >= 0, got -2");
  BOOST_TEST(!error_of([&] {
                fill_normal(x.data(), 4, Seed{1}, 0, 0.0f, 1.0f,
                            std::numeric_limits<int64_t>::max() - 2);
              }).empty());
  BOOST_TEST(!error_of([&] { fill_normal<float>(nullptr, 4, Seed{1}, 0, 0.0f, 1.0f); }).empty());
  // n = 0 is a valid empty fill, even with a null pointer.
  BOOST_TEST(error_of([&] { fill_uniform<float>(nullptr, 0, Seed{1}, 0, 0.0f, 1.0f); }).empty());

  // stddev = 0 is allowed and gives the mean exactly.
  fill_normal(x.data(), 4, Seed{1}, 0, 2.5f, 0.0f);
  for (float v : x) BOOST_TEST(v == 2.5f);
}

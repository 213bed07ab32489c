// tests/reference/cross_check.hpp — what every LibTorch cross-check shares: the run's seed,
// random inputs that are exactly representable in the precision under test, conversions
// between tessera tensors and torch_ref arrays, and the tolerance-checked comparison.
//
// Inputs are fresh at every run (the seed comes from std::random_device and the clock) so
// that, over many CI runs, the ops meet many more inputs than a fixed seed would show them.
// The seed is printed at the start and in every failure message; TESSERA_TEST_SEED=<n>
// reproduces a run exactly. Each test case draws from its own generator, seeded from the run
// seed and the case's name, so adding or reordering cases never changes another case's
// inputs.
//
// Deliberately independent of tessera/core/rng.hpp (std::mt19937_64, scaled by hand): the
// inputs should not depend on the library under test.
#pragma once

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <numbers>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

#include "tessera/core/number.hpp"
#include "tessera/core/tensor.hpp"
#include "torch_ref.hpp"

namespace tessera::cross_check {

using torch_ref::Array;
using torch_ref::IndexArray;
using torch_ref::Precision;

// ---- the run's seed --------------------------------------------------------------------------

inline uint64_t run_seed() {
  static const uint64_t seed = [] {
    if (const char* env = std::getenv("TESSERA_TEST_SEED"); env && *env) {
      uint64_t v = 0;
      const std::string_view text(env);
      const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), v);
      if (err != std::errc() || end != text.data() + text.size())
        throw std::invalid_argument("TESSERA_TEST_SEED='" + std::string(text) +
                                    "' is not a decimal unsigned 64-bit integer");
      return v;
    }
    std::random_device device;
    const auto now =
        static_cast<uint64_t>(std::chrono::high_resolution_clock::now().time_since_epoch().count());
    // Kept below 2^53 so the number survives being pasted through a JSON log or a double.
    return ((uint64_t{device()} << 32) ^ uint64_t{device()} ^ now) & ((uint64_t{1} << 53) - 1);
  }();
  return seed;
}

// Boost.Test global fixture: one line in the log with the seed and the LibTorch build, and
// LibTorch limited to two intra-op threads (CI has two cores, shared with tessera's OpenMP).
struct TorchSetup {
  TorchSetup() {
    torch_ref::set_num_threads(2);
    const uint64_t seed = run_seed();  // may throw on a malformed TESSERA_TEST_SEED
    std::cout << "LibTorch cross-check: seed " << seed << " (rerun with TESSERA_TEST_SEED=" << seed
              << "), " << torch_ref::describe() << std::endl;
  }
};

// ---- random inputs ---------------------------------------------------------------------------

// A generator per test case: the run seed mixed with a hash (FNV-1a) of the case's name.
class Gen {
 public:
  explicit Gen(std::string_view name) : engine_(mix(name)) {}

  double uniform(double lo, double hi) {
    const double u = static_cast<double>(engine_() >> 11) * 0x1.0p-53;  // [0, 1)
    return lo + (hi - lo) * u;
  }
  // Box-Muller; (0, 1] for the logarithm's argument.
  double normal() {
    const double u1 = 1.0 - static_cast<double>(engine_() >> 11) * 0x1.0p-53;
    const double u2 = static_cast<double>(engine_() >> 11) * 0x1.0p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }
  // Uniform integer in [lo, hi].
  int64_t integer(int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(engine_() % static_cast<uint64_t>(hi - lo + 1));
  }

 private:
  static uint64_t mix(std::string_view name) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (char c : name) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
    return h ^ (run_seed() * 0x9E3779B97F4A7C15ull);
  }
  std::mt19937_64 engine_;
};

// The cross-checks run float and bf16 (fp16 would need a reference precision of its own).
template <class T>
requires std::is_same_v<T, float> || std::is_same_v<T, bf16>
inline constexpr Precision precision_of =
    std::is_same_v<T, float> ? Precision::kFloat32 : Precision::kBFloat16;

template <class T>
inline float widen(T v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return to_float(v);
}
template <class T>
inline T narrow(float v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return from_float<T>(v);
}

inline std::vector<int64_t> dims_of(const Shape& s) { return {s.begin(), s.end()}; }

// A tessera tensor of T and the same values, widened to float, as a torch_ref array. Both
// sides therefore see bit-identical inputs whatever the precision.
template <class T>
struct Input {
  Tensor<T> tensor;
  Array array;
};

template <class T, class Draw>
Input<T> make_input(const Shape& shape, Draw draw) {
  Input<T> in{Tensor<T>::empty(shape), Array{{}, dims_of(shape)}};
  in.array.data.resize(static_cast<size_t>(shape.numel()));
  for (int64_t i = 0; i < shape.numel(); ++i) {
    const T v = narrow<T>(static_cast<float>(draw()));
    in.tensor.data()[i] = v;
    in.array.data[i] = widen(v);
  }
  return in;
}

// N(0, stddev^2) values, rounded to T.
template <class T>
Input<T> normal(Gen& gen, const Shape& shape, double stddev = 1.0, double mean = 0.0) {
  return make_input<T>(shape, [&] { return mean + stddev * gen.normal(); });
}
// U[lo, hi) values, rounded to T.
template <class T>
Input<T> uniform(Gen& gen, const Shape& shape, double lo, double hi) {
  return make_input<T>(shape, [&] { return gen.uniform(lo, hi); });
}

// A tessera tensor (or view) as a float array.
template <class T>
Array to_array(TensorView<const T, Cpu> view) {
  const Tensor<T> t = view.contiguous();
  Array a{std::vector<float>(static_cast<size_t>(t.numel())), dims_of(t.shape())};
  for (int64_t i = 0; i < t.numel(); ++i) a.data[i] = widen(t.data()[i]);
  return a;
}
template <class T>
Array to_array(const Tensor<T>& t) {
  return to_array<T>(t.view());
}

// ---- comparison --------------------------------------------------------------------------------

// |actual - expected| <= rtol * |expected| + atol * scale, element by element. scale is by
// default the largest |expected| in the tensor: the atol term is there for elements that are
// small only because of cancellation (a gradient element near zero inherits the rounding error
// of the large terms that cancelled, not a fraction of its own size); relative to the tensor's
// scale it still catches every real bug, which shows up as an O(1) relative error. Where the
// cancelling terms can be much larger than the result (a softmax gradient of a nearly one-hot
// row), the test passes the size of those terms as `scale` instead.
struct Tolerance {
  double rtol;
  double atol;
  double scale = 0.0;  // the unit of atol; 0: the largest finite |expected|

  Tolerance with_scale(double s) const { return {rtol, atol, s}; }
};

// The unit roundoff of each format: half the distance from 1 to the next number.
inline constexpr double kFloatEps = 0x1.0p-24;
inline constexpr double kBf16Eps = 0x1.0p-8;

// The bf16 tolerance that follows from a float one. For bf16, tessera and the reference both
// compute in float from the same bf16 inputs and round the result once, so they differ by the
// float computations' difference (the float tolerance, atol included: it covers elements that
// cancelled, where a tiny float difference can even flip the sign) plus at most one bf16 ulp of
// the element itself, which is <= 2 eps_b relative. Nothing more: an atol of a bf16 ulp of
// the tensor's scale would let a bf16 accumulator through (LibTorch's own bf16 batched matmul
// for small sizes passes such a check, and fails this one).
template <class T>
Tolerance for_type(Tolerance float_tol) {
  if constexpr (std::is_same_v<T, float>)
    return float_tol;
  else
    return {float_tol.rtol + 2 * kBf16Eps, float_tol.atol, float_tol.scale};
}

// Compares a tessera result with LibTorch's. Fails (one Boost.Test error, naming the seed)
// when shapes differ, when any element is out of tolerance or NaN, or when the reference is
// all zeros (a comparison of two zero tensors proves nothing) unless allow_zero.
//
// `terms`, when given, sets atol's unit per element instead (element-wise ops whose formula
// cancels for some inputs only, such as the tanh-GELU gradient where 1 - tanh^2 is tiny):
// allowed_i = rtol |expected_i| + atol terms_i.
inline void check_close(const std::string& what, const Array& actual, const Array& expected,
                        Tolerance tol, bool allow_zero = false,
                        const std::vector<double>* terms = nullptr) {
  if (actual.shape != expected.shape) {
    auto str = [](const std::vector<int64_t>& s) {
      std::string r = "[";
      for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
      return r + "]";
    };
    BOOST_ERROR(what << ": tessera's shape " << str(actual.shape) << " differs from LibTorch's "
                     << str(expected.shape) << " (seed " << run_seed() << ")");
    return;
  }
  double largest = 0.0;  // the largest finite |expected|
  for (float e : expected.data)
    if (std::isfinite(e)) largest = std::max(largest, std::fabs(static_cast<double>(e)));
  const double scale = tol.scale > 0.0 ? tol.scale : largest;
  if (terms && terms->size() != actual.data.size()) {
    BOOST_ERROR(what << ": " << terms->size() << " term scales for " << actual.numel()
                     << " elements");
    return;
  }
  if (!allow_zero && expected.numel() > 0 && !(largest > 0.0)) {
    BOOST_ERROR(what << ": LibTorch's result is all zeros; the test's inputs prove nothing (seed "
                     << run_seed() << ")");
    return;
  }
  int64_t failures = 0, worst = -1;
  double worst_ratio = 0.0;  // |diff| / allowed
  for (size_t i = 0; i < actual.data.size(); ++i) {
    const double a = actual.data[i], e = expected.data[i];
    const double diff = a == e ? 0.0 : std::fabs(a - e);  // equal infinities match
    const double allowed = tol.rtol * std::fabs(e) + tol.atol * (terms ? (*terms)[i] : scale);
    const bool bad = !(diff <= allowed);  // NaN fails
    failures += bad;
    const double ratio = std::isnan(diff) ? INFINITY
                         : allowed > 0    ? diff / allowed
                         : diff > 0       ? INFINITY
                                          : 0.0;
    if (worst < 0 || ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = static_cast<int64_t>(i);
    }
  }
  // One assertion per comparison, passed or failed, so Boost.Test counts what was checked.
  BOOST_TEST(failures == 0,
             what << ": " << failures << " of " << actual.numel()
                  << " elements out of tolerance (rtol " << tol.rtol << ", atol " << tol.atol
                  << " x scale " << scale << "); worst at flat index " << worst << ": tessera "
                  << (worst >= 0 ? actual.data[worst] : 0.0f) << ", LibTorch "
                  << (worst >= 0 ? expected.data[worst] : 0.0f) << " (seed " << run_seed() << ")");
  BOOST_TEST_MESSAGE(what << ": worst element at " << worst_ratio << " of the tolerance");
}

template <class T>
void check_close(const std::string& what, const Tensor<T>& actual, const Array& expected,
                 Tolerance tol, bool allow_zero = false) {
  check_close(what, to_array(actual), expected, tol, allow_zero);
}

// With a per-element unit for atol (see check_close above).
template <class T>
void check_close_terms(const std::string& what, const Tensor<T>& actual, const Array& expected,
                       Tolerance tol, const std::vector<double>& terms) {
  check_close(what, to_array(actual), expected, tol, /*allow_zero=*/false, &terms);
}

// For results that must match exactly (gathers, index outputs, conversions).
inline void check_equal(const std::string& what, const Array& actual, const Array& expected) {
  check_close(what, actual, expected, Tolerance{0.0, 0.0}, /*allow_zero=*/true);
}

// "float" / "bf16", for case names and messages.
template <class T>
std::string name_of() {
  return std::is_same_v<T, float> ? "float" : "bf16";
}

}  // namespace tessera::cross_check

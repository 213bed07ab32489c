// benchmarks/harness.hpp — how tessera_bench times two implementations of one op fairly.
//
// The machine this runs on is small and shared (2 cores, other processes compiling), so a
// single timing means little. For each row:
//   1. warm-up: each side runs twice untimed (first-touch page faults, oneDNN primitive
//      creation, OpenMP/OpenBLAS thread start-up all land there);
//   2. one timed call per side estimates its cost, and the repetition count N of that side is
//      chosen so its timed calls add up to about `target_s` (clamped to [min_reps, max_reps]);
//   3. the N calls of each side are run in `kRounds` alternating blocks (tessera, torch,
//      tessera, torch, ...), so a burst of outside load hits both sides alike;
//   4. each call is timed alone with a steady clock; the row reports the median per side.
// Nothing here knows about tessera or LibTorch: a side is a `std::function<void()>`.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

namespace bench {

struct TimingOptions {
  double target_s = 0.3;  // timed seconds per side and row
  int min_reps = 5;
  int max_reps = 2000;
};

struct Timing {
  double median_s = 0;
  int reps = 0;
};

inline double seconds_of(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(t1 - t0).count();
}

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  const size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(mid), v.end());
  const double hi = v[mid];
  if (v.size() % 2 == 1) return hi;
  return 0.5 * (hi + *std::max_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(mid)));
}

// Times side `a` and side `b` as described above; returns {a, b}.
inline std::pair<Timing, Timing> time_pair(const std::function<void()>& a,
                                           const std::function<void()>& b,
                                           const TimingOptions& opt) {
  constexpr int kRounds = 3;
  for (int i = 0; i < 2; ++i) a();
  for (int i = 0; i < 2; ++i) b();
  auto reps_for = [&](double one_call_s) {
    const double n = std::ceil(opt.target_s / std::max(one_call_s, 1e-9));
    return static_cast<int>(std::clamp<double>(n, opt.min_reps, opt.max_reps));
  };
  const int reps_a = reps_for(seconds_of(a));
  const int reps_b = reps_for(seconds_of(b));
  std::vector<double> sa, sb;
  sa.reserve(static_cast<size_t>(reps_a));
  sb.reserve(static_cast<size_t>(reps_b));
  for (int r = 0; r < kRounds; ++r) {
    // Round r runs the calls [r*N/kRounds, (r+1)*N/kRounds) of each side.
    for (int i = r * reps_a / kRounds; i < (r + 1) * reps_a / kRounds; ++i) sa.push_back(seconds_of(a));
    for (int i = r * reps_b / kRounds; i < (r + 1) * reps_b / kRounds; ++i) sb.push_back(seconds_of(b));
  }
  return {{median(sa), reps_a}, {median(sb), reps_b}};
}

// max |x - ref| / max |ref|: how far two sides' outputs are apart, relative to the output's
// scale (printed, never asserted: it shows that both sides computed the same thing).
inline double relative_difference(const std::vector<float>& x, const std::vector<float>& ref) {
  if (x.size() != ref.size()) return INFINITY;
  double diff = 0, scale = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(x[i]) - ref[i]));
    scale = std::max(scale, std::abs(static_cast<double>(ref[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

// The largest relative_difference over an op's outputs (each output against its own scale).
inline double relative_difference(const std::vector<std::vector<float>>& x,
                                  const std::vector<std::vector<float>>& ref) {
  if (x.size() != ref.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, relative_difference(x[i], ref[i]));
  return worst;
}

}  // namespace bench

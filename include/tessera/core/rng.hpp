// tessera/core/rng.hpp — deterministic, counter-based random numbers (Philox4x32-10).
//
// Why counter-based: a training run must give the same weights, dropout masks and samples on
// one thread or sixteen, on the CPU or the GPU, and after resuming from a checkpoint. A
// sequential generator (Mersenne Twister, PCG) makes element i depend on every draw before
// it, so parallel fills and GPU kernels would each need their own splitting scheme and
// would not agree with one another. Philox (Salmon, Moraes, Dror, Shaw: "Parallel random
// numbers: as easy as 1, 2, 3", SC'11) is a keyed bijection of a 128-bit counter: element i
// is a pure function of (seed, subsequence, i). Any thread can compute any element without
// talking to anyone, a subrange can be produced on its own, and "restoring the generator"
// means remembering one integer.
//
// The stream (identical on CPU and GPU; docs/rng.md):
//   element i of the stream (seed, subsequence) is word i % 4 of
//     philox4x32_10(counter = {lo32(i/4), hi32(i/4), lo32(subsequence), hi32(subsequence)},
//                   key     = {lo32(seed), hi32(seed)})
//   uniform in [0,1)  : (u >> 8) * 2^-24   — 24 bits, exact in float, at most 1 - 2^-24
//   uniform in [lo,hi): fma(hi - lo, uniform01(u), lo), pulled below hi if rounding hit it
//   normal            : Box-Muller on the pair of words (i & ~1, i | 1) of the same block;
//                       even i takes the cosine branch, odd i the sine branch
// Everything above the raw words is a function of the element's own word(s), so any slice of
// a fill equals the same slice of a larger fill, whatever the thread count.
#pragma once

#include <array>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "tessera/core/config.hpp"
#include "tessera/core/error.hpp"

namespace tessera {

// A seed is a type rather than a bare integer so that a seed can never be passed where a
// subsequence, an index or a size is expected (they are all 64-bit integers).
struct Seed {
  constexpr explicit Seed(uint64_t v) : value(v) {}
  uint64_t value;
  friend constexpr bool operator==(Seed, Seed) = default;
};

// Four 32-bit words: a Philox counter or an output block. Plain aggregates rather than
// std::array so the round function compiles in CUDA device code without
// --expt-relaxed-constexpr (std::array's members are host-only constexpr functions there).
struct Philox4x32 {
  uint32_t v[4];
};
struct PhiloxKey {
  uint32_t v[2];
};

namespace detail {

// Constants from Random123's philox.h: the multipliers were chosen by the Philox authors for
// avalanche; the key increments ("Weyl" constants) are the golden ratio and sqrt(3) - 1
// scaled to 32 bits.
inline constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
inline constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
inline constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

TESSERA_HD constexpr Philox4x32 philox_round(Philox4x32 c, PhiloxKey k) {
  // One 32x32 -> 64-bit product yields both halves; nvcc turns this into mul.wide.u32.
  const uint64_t p0 = uint64_t{kPhiloxM0} * c.v[0];
  const uint64_t p1 = uint64_t{kPhiloxM1} * c.v[2];
  const auto hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
  const auto hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
  return Philox4x32{{hi1 ^ c.v[1] ^ k.v[0], lo1, hi0 ^ c.v[3] ^ k.v[1], lo0}};
}

}  // namespace detail

// Philox4x32 with 10 rounds, bit-compatible with Random123's philox4x32_R(10, ...) and with
// cuRAND's Philox core. Pure and constexpr: usable in static_assert, host code and kernels.
TESSERA_HD constexpr Philox4x32 philox4x32_10(Philox4x32 counter, PhiloxKey key) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {  // the key is bumped between rounds, not before the first
      key.v[0] += detail::kPhiloxW0;
      key.v[1] += detail::kPhiloxW1;
    }
    counter = detail::philox_round(counter, key);
  }
  return counter;
}

// The same function on std::array, for host code and tests. Host-only (see Philox4x32).
// A braced call `philox4x32_10({..}, {..})` is ambiguous between the two overloads: name the
// type, e.g. `philox4x32_10(std::array<uint32_t, 4>{..}, std::array<uint32_t, 2>{..})`.
constexpr std::array<uint32_t, 4> philox4x32_10(const std::array<uint32_t, 4>& counter,
                                                const std::array<uint32_t, 2>& key) {
  const Philox4x32 out = philox4x32_10(Philox4x32{{counter[0], counter[1], counter[2], counter[3]}},
                                       PhiloxKey{{key[0], key[1]}});
  return {out.v[0], out.v[1], out.v[2], out.v[3]};
}

// ---- the stream ------------------------------------------------------------------------

// The four words of block `block` of stream (seed, subsequence): elements 4*block .. +3.
TESSERA_HD constexpr Philox4x32 philox_block(Seed seed, uint64_t subsequence, uint64_t block) {
  return philox4x32_10(
      Philox4x32{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                  static_cast<uint32_t>(subsequence), static_cast<uint32_t>(subsequence >> 32)}},
      PhiloxKey{{static_cast<uint32_t>(seed.value), static_cast<uint32_t>(seed.value >> 32)}});
}

// Element `index` of stream (seed, subsequence) as a raw 32-bit word.
TESSERA_HD constexpr uint32_t philox_u32(Seed seed, uint64_t subsequence, uint64_t index) {
  return philox_block(seed, subsequence, index / 4).v[index % 4];
}

// Uniform in [0, 1): the top 24 bits of u times 2^-24. Why 24 bits: a float has a 24-bit
// significand, so every value k * 2^-24 (k < 2^24) is exact, the grid is evenly spaced, and
// the largest value is 1 - 2^-24 < 1. Using all 32 bits would round the top values up to
// exactly 1.0f. The same float is used for double outputs, so a float and a double fill with
// one seed draw the same numbers (double-precision gradient checks reuse float inputs).
TESSERA_HD constexpr float uniform01(uint32_t u) {
  return static_cast<float>(u >> 8) * (1.0f / 16777216.0f);  // 2^-24
}

template <class T>
concept RngReal = std::same_as<T, float> || std::same_as<T, double>;

namespace detail {

// Host code uses <cmath>; device code uses the CUDA math library's global functions, which
// nvcc declares for __device__ use. Both are correctly rounded for fma and nextafter, so
// uniforms in [lo, hi) are bit-identical on CPU and GPU.
TESSERA_HD inline float fma_(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return ::fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
TESSERA_HD inline double fma_(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
TESSERA_HD inline float nextafter_(float from, float to) {
#if defined(__CUDA_ARCH__)
  return ::nextafterf(from, to);
#else
  return std::nextafter(from, to);
#endif
}
TESSERA_HD inline double nextafter_(double from, double to) {
#if defined(__CUDA_ARCH__)
  return ::nextafter(from, to);
#else
  return std::nextafter(from, to);
#endif
}

// Box-Muller needs log, sqrt, sin, cos. They are evaluated in double whatever the output
// type: the float result is then the correctly rounded value of an almost exact number, so CPU
// (glibc) and GPU (libdevice), whose last-bit errors differ, still agree on the float.
TESSERA_HD inline double log_(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}
TESSERA_HD inline double sqrt_(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}
TESSERA_HD inline double sin_(double x) {
#if defined(__CUDA_ARCH__)
  return ::sin(x);
#else
  return std::sin(x);
#endif
}
TESSERA_HD inline double cos_(double x) {
#if defined(__CUDA_ARCH__)
  return ::cos(x);
#else
  return std::cos(x);
#endif
}

}  // namespace detail

// Maps a word to [lo, hi) as fma(hi - lo, uniform01(u), lo): one rounding, so the CPU and the
// GPU agree bit for bit (a compiler may otherwise contract a*b+c differently on each). The
// rounding can land exactly on hi (e.g. [1, 2) and u = 2^32 - 1); such a value becomes the
// largest T below hi, so the documented half-open range always holds.
// Precondition (checked by the fill functions, not here): lo < hi and hi - lo finite.
template <RngReal T>
TESSERA_HD inline T uniform_from_u32(uint32_t u, T lo, T hi) {
  const T x = detail::fma_(hi - lo, static_cast<T>(uniform01(u)), lo);
  return x < hi ? x : detail::nextafter_(hi, lo);
}

// Two independent standard normals from two words (Box-Muller). The radius uses
// (a + 1) * 2^-32, which lies in (0, 1], so log never sees 0; the angle uses b * 2^-32 in
// [0, 1). All 32 bits are used (exact in double), which puts the largest |z| at
// sqrt(2 * 32 * ln 2) ~ 6.66: the tails beyond that are cut, a probability of about 3e-11.
struct NormalPair {
  double z0;  // r * cos(theta): the even element of the pair
  double z1;  // r * sin(theta): the odd element
};
TESSERA_HD inline NormalPair box_muller(uint32_t a, uint32_t b) {
  constexpr double kTwoPow32Inv = 1.0 / 4294967296.0;
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  const double u_radius = (static_cast<double>(a) + 1.0) * kTwoPow32Inv;  // (0, 1]
  const double u_angle = static_cast<double>(b) * kTwoPow32Inv;           // [0, 1)
  const double r = detail::sqrt_(-2.0 * detail::log_(u_radius));
  const double theta = kTwoPi * u_angle;
  return {r * detail::cos_(theta), r * detail::sin_(theta)};
}

// Element `index` of the stream as a standard normal (double). Even and odd elements of a
// pair share their two words and are the cosine and sine branch of one Box-Muller draw.
TESSERA_HD inline double standard_normal_at(Seed seed, uint64_t subsequence, uint64_t index) {
  const Philox4x32 w = philox_block(seed, subsequence, index / 4);
  const unsigned j = static_cast<unsigned>(index % 4);
  const NormalPair z = box_muller(w.v[j & 2u], w.v[j | 1u]);
  return (j & 1u) ? z.z1 : z.z0;
}

// Element `index` of the stream as a uniform in [lo, hi): what a CUDA kernel calls per thread.
template <RngReal T>
TESSERA_HD inline T uniform_at(Seed seed, uint64_t subsequence, uint64_t index, T lo, T hi) {
  return uniform_from_u32<T>(philox_u32(seed, subsequence, index), lo, hi);
}

// Element `index` of the stream as a normal(mean, stddev): fma(stddev, T(z), mean).
template <RngReal T>
TESSERA_HD inline T normal_at(Seed seed, uint64_t subsequence, uint64_t index, T mean, T stddev) {
  return detail::fma_(stddev, static_cast<T>(standard_normal_at(seed, subsequence, index)), mean);
}

// ---- fills on raw pointers ---------------------------------------------------------------

namespace detail {

// Below this many Philox blocks a parallel region costs more than it saves (one block is a
// few nanoseconds; starting a team is microseconds).
inline constexpr int64_t kParallelMinBlocks = 4096;

inline void check_fill_range(const char* what, const void* out, int64_t n, int64_t first_index) {
  TESSERA_CHECK(n >= 0, what, ": n must be >= 0, got ", n);
  TESSERA_CHECK(first_index >= 0, what, ": first_index must be >= 0, got ", first_index);
  TESSERA_CHECK(n <= std::numeric_limits<int64_t>::max() - first_index, what,
                ": first_index + n overflows int64 (first_index ", first_index, ", n ", n, ")");
  TESSERA_CHECK(n == 0 || out != nullptr, what, ": output pointer is null for n = ", n);
}

// Writes out[k] = element (first_index + k) for k in [0, n). Works block by block: `block_values`
// turns the four words of a block into its four values, and only the values inside the range
// are stored. Each block is a pure function of its index, so the result does not depend on the
// number of threads or on the schedule.
template <class T, class BlockValues>
void fill_by_blocks(T* out, int64_t n, Seed seed, uint64_t subsequence, int64_t first_index,
                    BlockValues block_values) {
  if (n == 0) return;
  const int64_t first = first_index, last = first_index + n;  // elements [first, last)
  const int64_t first_block = first / 4;
  const int64_t num_blocks = (last - 1) / 4 - first_block + 1;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (num_blocks >= kParallelMinBlocks)
#endif
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t block = first_block + b;
    T values[4];
    block_values(philox_block(seed, subsequence, static_cast<uint64_t>(block)), values);
    for (int j = 0; j < 4; ++j) {
      const int64_t element = 4 * block + j;
      if (element >= first && element < last) out[element - first] = values[j];
    }
  }
}

}  // namespace detail

// out[k] = uniform in [lo, hi) of element (first_index + k) of stream (seed, subsequence),
// for k in [0, n). Filling [a, b) and then [b, c) gives exactly the fill of [a, c).
// Throws tessera::Error unless lo < hi with hi - lo finite, n >= 0 and first_index >= 0.
template <RngReal T>
void fill_uniform(T* out, int64_t n, Seed seed, uint64_t subsequence, std::type_identity_t<T> lo,
                  std::type_identity_t<T> hi, int64_t first_index = 0) {
  detail::check_fill_range("fill_uniform", out, n, first_index);
  TESSERA_CHECK(lo < hi, "fill_uniform: need lo < hi, got lo = ", lo, ", hi = ", hi);
  TESSERA_CHECK(std::isfinite(hi - lo), "fill_uniform: hi - lo must be finite, got lo = ", lo,
                ", hi = ", hi);
  detail::fill_by_blocks(out, n, seed, subsequence, first_index,
                         [lo, hi](const Philox4x32& w, T* values) {
                           for (int j = 0; j < 4; ++j)
                             values[j] = uniform_from_u32<T>(w.v[j], lo, hi);
                         });
}

// out[k] = normal(mean, stddev) of element (first_index + k) of stream (seed, subsequence).
// Same slicing guarantee as fill_uniform. stddev = 0 gives `mean` everywhere.
// Throws tessera::Error unless mean is finite and stddev is finite and >= 0.
template <RngReal T>
void fill_normal(T* out, int64_t n, Seed seed, uint64_t subsequence, std::type_identity_t<T> mean,
                 std::type_identity_t<T> stddev, int64_t first_index = 0) {
  detail::check_fill_range("fill_normal", out, n, first_index);
  TESSERA_CHECK(std::isfinite(mean), "fill_normal: mean must be finite, got ", mean);
  TESSERA_CHECK(std::isfinite(stddev) && stddev >= 0,
                "fill_normal: stddev must be finite and >= 0, got ", stddev);
  detail::fill_by_blocks(out, n, seed, subsequence, first_index,
                         [mean, stddev](const Philox4x32& w, T* values) {
                           const NormalPair a = box_muller(w.v[0], w.v[1]);
                           const NormalPair b = box_muller(w.v[2], w.v[3]);
                           const double z[4] = {a.z0, a.z1, b.z0, b.z1};
                           for (int j = 0; j < 4; ++j)
                             values[j] = detail::fma_(stddev, static_cast<T>(z[j]), mean);
                         });
}

// ---- a sequential view of one stream -----------------------------------------------------

// Reads one stream (seed, subsequence) front to back, for code that draws a few numbers at a
// time (samplers, data shuffling). The whole state is (seed, subsequence, position): a
// checkpoint that stores position() and later calls seek() continues bit-exactly.
//
// Position p is stream element p, whichever way it is read: next_u32() returns
// philox_u32(.., p), next_uniform() returns uniform01 of that word, next_normal() returns
// normal_at<float>(.., p, 0, 1), each advancing the position by one. So Philox at position p
// agrees with fill_uniform / fill_normal at first_index = p. Mixing kinds on one stream reuses
// words (a normal at p also looks at word p ^ 1); give independent uses their own subsequence.
class Philox {
 public:
  TESSERA_HD Philox(Seed seed, uint64_t subsequence) : seed_(seed), subsequence_(subsequence) {}

  TESSERA_HD uint32_t next_u32() {
    const uint32_t word = block_of(position_).v[position_ % 4];
    ++position_;
    return word;
  }

  // Uniform in [0, 1), see uniform01.
  TESSERA_HD float next_uniform() { return uniform01(next_u32()); }

  // Standard normal, see box_muller.
  TESSERA_HD float next_normal() {
    const Philox4x32& w = block_of(position_);
    const unsigned j = static_cast<unsigned>(position_ % 4);
    ++position_;
    const NormalPair z = box_muller(w.v[j & 2u], w.v[j | 1u]);
    return static_cast<float>((j & 1u) ? z.z1 : z.z0);
  }

  // Index of the element the next call returns. 2^64 draws would wrap, which no run reaches.
  TESSERA_HD uint64_t position() const { return position_; }
  TESSERA_HD void seek(uint64_t position) { position_ = position; }

  TESSERA_HD Seed seed() const { return seed_; }
  TESSERA_HD uint64_t subsequence() const { return subsequence_; }

 private:
  // Four consecutive draws share one Philox call; the block is cached, not part of the state.
  TESSERA_HD const Philox4x32& block_of(uint64_t position) {
    const uint64_t block = position / 4;
    if (block != cached_block_) {
      cache_ = philox_block(seed_, subsequence_, block);
      cached_block_ = block;
    }
    return cache_;
  }

  Seed seed_;
  uint64_t subsequence_;
  uint64_t position_ = 0;
  // Block indices are below 2^62, so the all-ones value never names a real block.
  uint64_t cached_block_ = ~uint64_t{0};
  Philox4x32 cache_{};
};

}  // namespace tessera

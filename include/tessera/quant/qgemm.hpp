// tessera/quant/qgemm.hpp — y = x · W^T with W stored in a quantised format, for inference.
//
//   quant::matmul(x, M, ldx, W, y, ldy)   x (M, K) row stride ldx, W (N, K), y (M, N) row stride ldy
//   quant::linear(x, W)                   x (..., K) -> y (..., N)
//   quant::matmul_via(path, ...)          the same on one named kernel path (tests, benchmarks)
//
// Built for small M (1 to a few dozen rows: decoding, continuous batching), where the product is
// bound by reading W from memory, not by arithmetic. So:
//   * W is never expanded in memory. Each kernel loads a few output rows' codes, turns them
//     into floats in registers (unpack, scale, add the zero point) and multiplies them into
//     every row of x while they are there: the weight bytes come from DRAM once per call, for
//     all M rows, which is why a batch of M costs far less than M calls.
//   * Tiles of 4 output rows x 4 activation rows keep 16 accumulators in flight (AVX-512), so
//     even M = 1 has four independent FMA chains.
//   * OpenMP splits the output rows N into one contiguous range per thread.
//
// Determinism, which a continuous-batching engine relies on: every output element y[m, n] is
// computed by one fixed sequence of operations (its accumulator starts at zero, takes the
// weight chunks in K order, is reduced by one fixed tree, then scaled), whatever M, the tile it
// falls in, or the number of threads. A row of x therefore gives bit-identical output alone or
// in any batch. The sequence differs between kernel paths (vector width), as the row ops' does.
//
// Kernel paths, picked per call from CPUID (core/cpu_features.hpp):
//   kAvx512Vnni  (avx512f + avx512bw + avx512_vnni; the default where present) INT4 only: x is
//            quantised to int8 and multiplied by the codes with vpdpbusd (below); the other
//            formats run kAvx512's kernels.
//   kAvx512  16-lane floats. INT4: the block's 16 possible weights fma(q, scale, zero) are built
//            in one register and the codes (16 bytes -> 16 int32 lanes, low nibbles as they
//            are, high ones shifted down) are looked up with vpermps. FP8 E4M3: the byte is
//            moved into an fp16 bit pattern (sign to bit 15, exponent and mantissa shifted left
//            by 7), which is exactly the code's value times 2^-8 (subnormals included), and
//            vcvtph2ps converts it in hardware; the 2^8 is folded into the row scale (FP8
//            blocks: into the block's scale, which multiplies the decoded weights of each
//            k-step, so they are exactly dequantize()'s values). BF16: zero-extend and shift
//            left 16.
//   kAvx2    the same with 8 lanes (INT4 by int -> float conversion and one FMA per value).
//   kScalar  decodes one row of W to floats, then plain dot products in K order.
// From M = 5 rows on, each 4-row tile of W is decoded once into a small float buffer that the
// FMAs of all M rows read, instead of being decoded again for every 4 rows of x.
//
// INT4 on kAvx512Vnni (llama.cpp's Q4 x Q8 scheme): each call quantises every row of x (times
// AWQ's 1/s) to int8 per sub-block of 32 values, d = max|x| / 127, q = round-to-even(x / d),
// and keeps the float sum of x over each weight group (summed in double, rounded once). Then
//     y = Σ_groups ( scale · Σ_sub d · Σ nibble·q  +  zero_point · Σ x )
// with the inner sums exact in int32 (vpdpbusd: 64 u8 x s8 products per instruction). One lane
// per output row (16-row tiles, codes transposed so that no horizontal sum is needed), so each
// y[m, n] is still one fixed sequence of float steps: batch and thread invariance hold as on the
// float paths. Only the nibble part meets the activation rounding (at most d/2 per value); the
// zero point multiplies the unrounded sum.
// Why: the float paths are bound by FMA throughput from M = 16 rows on (2 FMAs per 32 weights
// and row; this core retires about one 16-lane FMA per cycle), so INT4 batching stopped scaling.
// The VNNI tile spends about 10 instructions per 512 weight-row products instead of 32.
// Measured (benchmarks/qgemm_bench --filter head, LM head 49152 x 576, int4_rtn<32>, 2 threads,
// CPU time per thread, docs/quantization.md): M = 1: 823 us vs 867 us on kAvx512 (both near the
// read bandwidth); M = 4: 904 vs 1383; M = 16: 2117 vs 6668; M = 32: 3502 vs 12740.
// The cost is the activation rounding: SmolLM2-135M perplexity on KJV Matthew 5-7 (3328 targets,
// windows of 256, forward_cached through QuantizedWeights) with the file's Q4_1 blocks goes
// from 13.68 (kAvx512) to 13.97 (+2.1%); AWQ g64: 17.32 -> 17.75 (+2.5%). It is the default
// because decoding is no slower and batches of 16-32 run 3-3.6x faster; TESSERA_QGEMM_PATH=avx512
// gives back the float products without activation rounding (as fast at M = 1). Sub-blocks of
// 16-bit activations (vpdpwssd, half vpdpbusd's rate) would keep most of the speed-up at a
// rounding 258 times smaller; not written.
//
// The SIMD INT4 paths read x in a permuted order (within each chunk of 2·lanes values: the
// even positions, then the odd ones), matching the nibble order of the codes; x is copied into
// that order once per call (M·K floats, next to N·K/2 weight bytes). AWQ's 1/s is applied in
// the same copy.
//
// TESSERA_QGEMM_PATH=scalar|avx2|avx512|avx512-vnni narrows the choice (a path the CPU lacks
// falls back to the widest one below it that it has; an unknown name throws).
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "tessera/core/config.hpp"
#include "tessera/core/cpu_features.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/int4.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/quant/weight_formats.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__CUDACC__)
#include <cpuid.h>
#include <immintrin.h>
#define TESSERA_QGEMM_X86 1
#define TESSERA_QGEMM_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2")))
#define TESSERA_QGEMM_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")))
#define TESSERA_QGEMM_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2")))
#endif

namespace tessera::quant {

// Ordered narrowest first: kernel_path() falls back from an unavailable path to the next lower.
enum class KernelPath { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3 };

inline const char* to_string(KernelPath p) {
  switch (p) {
    case KernelPath::kScalar: return "scalar";
    case KernelPath::kAvx2: return "avx2";
    case KernelPath::kAvx512: return "avx512";
    case KernelPath::kAvx512Vnni: return "avx512-vnni";
  }
  return "?";
}

namespace qgemm_detail {
// F16C (vcvtph2ps on 8 lanes, the AVX2 path's FP8 decode): CPUID leaf 1, ECX bit 29. Every
// AVX2 processor has it in practice, but CpuFeatures does not record it, so it is asked here.
inline bool has_f16c() {
#if defined(TESSERA_QGEMM_X86)
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  return ((ecx >> 29) & 1u) != 0;
#else
  return false;
#endif
}
}  // namespace qgemm_detail

inline bool path_available(KernelPath p) {
#if defined(TESSERA_QGEMM_X86)
  const CpuFeatures& f = cpu_features();
  switch (p) {
    case KernelPath::kAvx512: return f.avx512f && f.avx512bw && f.avx2 && f.fma;
    // A superset of kAvx512 (its non-INT4 formats run kAvx512's kernels).
    case KernelPath::kAvx512Vnni:
      return f.avx512f && f.avx512bw && f.avx512_vnni && f.avx2 && f.fma;
    case KernelPath::kAvx2: {
      static const bool f16c = qgemm_detail::has_f16c();
      return f.avx2 && f.fma && f16c;
    }
    case KernelPath::kScalar: return true;
  }
  return false;
#else
  return p == KernelPath::kScalar;
#endif
}

// Every path this processor runs, narrowest first.
inline std::vector<KernelPath> available_paths() {
  std::vector<KernelPath> out;
  for (KernelPath p :
       {KernelPath::kScalar, KernelPath::kAvx2, KernelPath::kAvx512, KernelPath::kAvx512Vnni})
    if (path_available(p)) out.push_back(p);
  return out;
}

// The widest available path, narrowed by TESSERA_QGEMM_PATH (read on every call, so a test may
// set it between calls).
inline KernelPath kernel_path() {
  static const KernelPath best = available_paths().back();
  const char* v = std::getenv("TESSERA_QGEMM_PATH");
  if (v == nullptr || *v == '\0') return best;
  const std::string_view name(v);
  KernelPath asked = KernelPath::kScalar;
  if (name == "scalar") {
    asked = KernelPath::kScalar;
  } else if (name == "avx2") {
    asked = KernelPath::kAvx2;
  } else if (name == "avx512") {
    asked = KernelPath::kAvx512;
  } else if (name == "avx512-vnni") {
    asked = KernelPath::kAvx512Vnni;
  } else {
    fail("TESSERA_QGEMM_PATH: '", name,
         "' is unknown; expected one of scalar, avx2, avx512, avx512-vnni");
  }
  while (asked != KernelPath::kScalar && !path_available(asked))
    asked = static_cast<KernelPath>(static_cast<int>(asked) - 1);
  return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
}

namespace qgemm_detail {

// Below this many weights a parallel region costs more than it saves.
inline constexpr std::int64_t kParallelMinWeights = std::int64_t{1} << 15;

// Where a kernel finds its operands. x is the (possibly permuted, AWQ-scaled) activation copy.
template <class E>
struct Operands {
  const E* w;               // row n starts at w + n * per_row
  std::int64_t per_row;     // elements (or INT4 blocks) per row
  std::int64_t k;
  const float* x;
  std::int64_t ldx;
  std::int64_t m;
  float* y;
  std::int64_t ldy;
  const float* row_scale;   // FP8: per output row; nullptr otherwise
  float row_scale_factor;   // folded into row_scale (2^8 for the fp16 trick of the SIMD paths)
  bool prefetch = true;     // w streams from memory (false for a decoded tile in L1)
  // kAvx512Vnni, INT4 only: the activations quantised by prepare_vnni (x is then unused).
  const std::int8_t* xq = nullptr;  // row r's codes at xq + r·K
  const float* dx = nullptr;        // row r's steps at dx + r·K/32
  const float* xs = nullptr;        // row r's group sums at xs + r·K/G
  // FP8BlockWeights: row n's scale for weights [b·2^block_shift, (b+1)·2^block_shift) at
  // block_scale[n·blocks_per_row + b]. The decoded weights are multiplied by it (times
  // row_scale_factor) as they are decoded, so they equal QuantizedMatrix::dequantize()'s values
  // and row_scale stays null. A k-step (16 or 32 weights) never straddles two blocks.
  const float* block_scale = nullptr;
  std::int64_t blocks_per_row = 0;
  int block_shift = 0;
};

template <class E>
TESSERA_FORCE_INLINE float block_factor(const Operands<E>& o, std::int64_t n, std::int64_t k0) {
  return o.block_scale[n * o.blocks_per_row + (k0 >> o.block_shift)] * o.row_scale_factor;
}

// Software prefetch, two tiles ahead. A core keeps only so many cache misses in flight, and
// with ~30 instructions of decode and FMA per 100 bytes of INT4 codes the out-of-order window
// alone does not look far enough ahead: from DRAM the M = 1 kernel ran at about half the speed
// it reaches on cache-resident weights. Each k-step prefetches the share of the tile two tiles
// on that this step's reads correspond to, so the stream stays ahead at every width.
// (Prefetches never fault, so running past the matrix's end is harmless.)
template <class E, int NB>
struct Prefetcher {
  std::uintptr_t base = 0;
  std::int64_t step_bytes = 0;  // bytes of a whole NB-row tile per k-step
  TESSERA_FORCE_INLINE Prefetcher(const Operands<E>& o, bool enable, std::int64_t n0, int step) {
    if (!enable || !o.prefetch) return;
    const auto row_bytes = static_cast<std::int64_t>(sizeof(E)) * o.per_row;
    base = reinterpret_cast<std::uintptr_t>(o.w) +
           static_cast<std::uintptr_t>((n0 + 2 * NB) * row_bytes);
    step_bytes = NB * row_bytes * step / o.k;
  }
  TESSERA_FORCE_INLINE void at(std::int64_t step_index) const {
    const std::uintptr_t p = base + static_cast<std::uintptr_t>(step_index * step_bytes);
    for (std::int64_t off = 0; off < step_bytes; off += 64)
      __builtin_prefetch(reinterpret_cast<const void*>(p + static_cast<std::uintptr_t>(off)), 0, 3);
  }
};

// ---- scalar ----------------------------------------------------------------------------------
template <class E>
void decode_row_scalar(const E* row, std::int64_t k, float* out) {
  if constexpr (std::is_same_v<E, float>) {
    std::copy_n(row, k, out);
  } else if constexpr (std::is_same_v<E, bf16> || std::is_same_v<E, fp8_e4m3>) {
    for (std::int64_t i = 0; i < k; ++i) out[i] = to_float(row[i]);
  } else {
    dequantize_int4(std::span<const E>(row, static_cast<std::size_t>(k / E::kGroup)), out);
  }
}

template <class E>
void rows_scalar(const Operands<E>& o, std::int64_t n0, std::int64_t n1) {
  std::vector<float> w(static_cast<std::size_t>(o.k));
  for (std::int64_t n = n0; n < n1; ++n) {
    decode_row_scalar(o.w + n * o.per_row, o.k, w.data());
    if (o.block_scale != nullptr)
      for (std::int64_t i = 0; i < o.k; ++i) w[static_cast<std::size_t>(i)] *= block_factor(o, n, i);
    for (std::int64_t r = 0; r < o.m; ++r) {
      const float* x = o.x + r * o.ldx;
      float acc = 0.0f;
      for (std::int64_t i = 0; i < o.k; ++i) acc += w[static_cast<std::size_t>(i)] * x[i];
      if (o.row_scale != nullptr) acc *= o.row_scale[n];
      o.y[r * o.ldy + n] = acc;
    }
  }
}

// The K tail beyond the last whole vector step (FP32 / BF16 / FP8 only; INT4's K is a multiple
// of its group). FP8 values carry the SIMD paths' 2^-8, like their vector part.
template <class E>
TESSERA_FORCE_INLINE float tail_weight(const E* row, std::int64_t i) {
  if constexpr (std::is_same_v<E, fp8_e4m3>) {
    return to_float(row[i]) * 0x1p-8f;
  } else if constexpr (std::is_same_v<E, float>) {
    return row[i];
  } else if constexpr (std::is_same_v<E, bf16>) {
    return to_float(row[i]);
  } else {
    return row[i / E::kGroup].value(static_cast<int>(i % E::kGroup));
  }
}

#if defined(TESSERA_QGEMM_X86)
// GCC 12 warns that the "undefined" vectors inside its own intrinsics (_mm512_cvtph_ps,
// _mm512_reduce_add_ps, ...) may be used uninitialised, once they are inlined here; they are
// don't-care inputs by design.
#pragma GCC diagnostic push
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"
// ---- AVX-512: 16 lanes, one step covers 32 weights -------------------------------------------
TESSERA_QGEMM_AVX512 inline void decode512(const float* row, std::int64_t k0, __m512& w0,
                                           __m512& w1) {
  w0 = _mm512_loadu_ps(row + k0);
  w1 = _mm512_loadu_ps(row + k0 + 16);
}
TESSERA_QGEMM_AVX512 inline void decode512(const bf16* row, std::int64_t k0, __m512& w0,
                                           __m512& w1) {
  const __m512i h = _mm512_loadu_si512(reinterpret_cast<const void*>(row + k0));
  w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
  w1 = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
}
TESSERA_QGEMM_AVX512 inline void decode512(const fp8_e4m3* row, std::int64_t k0, __m512& w0,
                                           __m512& w1) {
  const __m512i t = _mm512_cvtepu8_epi16(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k0)));
  const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(t, _mm512_set1_epi16(0x80)), 8);
  const __m512i mag = _mm512_slli_epi16(_mm512_and_si512(t, _mm512_set1_epi16(0x7F)), 7);
  const __m512i h = _mm512_or_si512(sign, mag);
  w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}
// FP8BlockWeights: row n's decoded weights at k0 times their block's scale (a no-op otherwise).
template <class E>
TESSERA_QGEMM_AVX512 TESSERA_FORCE_INLINE void scale_block512(const Operands<E>& o, std::int64_t n,
                                                              std::int64_t k0, __m512& w0, __m512& w1) {
  if constexpr (std::is_same_v<E, fp8_e4m3>) {
    if (o.block_scale != nullptr) {
      const __m512 f = _mm512_set1_ps(block_factor(o, n, k0));
      w0 = _mm512_mul_ps(w0, f);
      w1 = _mm512_mul_ps(w1, f);
    }
  }
}
template <int G>
TESSERA_QGEMM_AVX512 inline void decode512(const Int4Block<G>* row, std::int64_t k0, __m512& w0,
                                           __m512& w1) {
  // The block's sixteen possible weights, fma(q, scale, zero) for q = 0..15, form one register;
  // vpermps then looks each code up (it reads only the low 4 bits of an index, so the low
  // nibble needs no mask). That is 2 permutes instead of mask + 2 int->float converts + 2 FMAs
  // per 32 weights, with the same values.
  const Int4Block<G>& b = row[k0 / G];
  const __m512 table = _mm512_fmadd_ps(
      _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_ps(b.scale), _mm512_set1_ps(b.zero_point));
  const __m512i q = _mm512_cvtepu8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.packed + (k0 % G) / 2)));
  w0 = _mm512_permutexvar_ps(q, table);
  w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
}

// y[r, n0 + j] for j < NB, r < MR. Every (j, r) accumulator sees the same operations in the same
// order whatever NB and MR are: that is the determinism contract.
template <class E, int NB, int MR>
TESSERA_QGEMM_AVX512 TESSERA_FORCE_INLINE void tile512(const Operands<E>& o, std::int64_t n0,
                                                       std::int64_t r0) {
  const std::int64_t k_main = o.k / 32 * 32;
  const E* rows[NB];
  for (int j = 0; j < NB; ++j) rows[j] = o.w + (n0 + j) * o.per_row;
  __m512 acc[NB][MR];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < MR; ++r) acc[j][r] = _mm512_setzero_ps();
  const float* x = o.x + r0 * o.ldx;
  const Prefetcher<E, NB> ahead(o, r0 == 0, n0, 32);  // the first pass over these rows
  for (std::int64_t k0 = 0; k0 < k_main; k0 += 32) {
    ahead.at(k0 / 32);
    __m512 w0[NB], w1[NB];
    for (int j = 0; j < NB; ++j) {
      decode512(rows[j], k0, w0[j], w1[j]);
      scale_block512(o, n0 + j, k0, w0[j], w1[j]);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512 xe = _mm512_loadu_ps(x + r * o.ldx + k0);
      const __m512 xo = _mm512_loadu_ps(x + r * o.ldx + k0 + 16);
      for (int j = 0; j < NB; ++j) {
        acc[j][r] = _mm512_fmadd_ps(w0[j], xe, acc[j][r]);
        acc[j][r] = _mm512_fmadd_ps(w1[j], xo, acc[j][r]);
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < MR; ++r) {
      float s = _mm512_reduce_add_ps(acc[j][r]);
      for (std::int64_t i = k_main; i < o.k; ++i) s += tail_weight(rows[j], i) * x[r * o.ldx + i];
      if (o.row_scale != nullptr) s *= o.row_scale[n0 + j] * o.row_scale_factor;
      o.y[(r0 + r) * o.ldy + n0 + j] = s;
    }
}

// Decodes rows [n, n + nb) into w (nb rows of K floats, each value exactly what decode512 and
// tail_weight give), so that a tile over w runs the very same arithmetic as one over the codes.
template <class E>
TESSERA_QGEMM_AVX512 TESSERA_FORCE_INLINE void decode_rows512(const Operands<E>& o, std::int64_t n,
                                                              int nb, float* w) {
  const std::int64_t k_main = o.k / 32 * 32;
  for (int j = 0; j < nb; ++j) {
    const E* row = o.w + (n + j) * o.per_row;
    float* out = w + j * o.k;
    const Prefetcher<E, 1> ahead(o, true, n + j + 6, 32);  // this row, two 4-row tiles on
    for (std::int64_t k0 = 0; k0 < k_main; k0 += 32) {
      ahead.at(k0 / 32);
      __m512 w0, w1;
      decode512(row, k0, w0, w1);
      scale_block512(o, n + j, k0, w0, w1);
      _mm512_storeu_ps(out + k0, w0);
      _mm512_storeu_ps(out + k0 + 16, w1);
    }
    for (std::int64_t i = k_main; i < o.k; ++i) out[i] = tail_weight(row, i);
  }
}

// The operands of a tile over decoded rows: w is (nb, K) floats, outputs start at column n.
template <class E>
TESSERA_FORCE_INLINE Operands<float> decoded_operands(const Operands<E>& o, std::int64_t n,
                                                      const float* w) {
  return Operands<float>{w, o.k, o.k, o.x, o.ldx, o.m, o.y + n, o.ldy,
                         o.row_scale != nullptr ? o.row_scale + n : nullptr, o.row_scale_factor,
                         false};
}

// Beyond 4 rows of x a 4-row tile would decode the same codes again for every 4 rows, and the
// decode costs about as much as the 32 FMAs it feeds; so the tile's rows are decoded once into
// a small buffer (4·K floats, in L1/L2) that the FMAs then read. Same values, same order: the
// results are bit-identical to the direct path, which the batch-invariance test checks.
inline constexpr std::int64_t kDecodeOnceRows = 4;

template <class E>
__attribute__((noinline)) TESSERA_QGEMM_AVX512 void rows_avx512(const Operands<E>& o,
                                                                std::int64_t n0, std::int64_t n1) {
  std::int64_t n = n0;
  if (!std::is_same_v<E, float> && o.m > kDecodeOnceRows) {
    std::vector<float> wbuf(static_cast<std::size_t>(4 * o.k));
    for (; n + 4 <= n1; n += 4) {
      decode_rows512(o, n, 4, wbuf.data());
      const Operands<float> d = decoded_operands(o, n, wbuf.data());
      std::int64_t r = 0;
      for (; r + 4 <= o.m; r += 4) tile512<float, 4, 4>(d, 0, r);
      for (; r < o.m; ++r) tile512<float, 4, 1>(d, 0, r);
    }
  }
  for (; n + 4 <= n1; n += 4) {
    std::int64_t r = 0;
    for (; r + 4 <= o.m; r += 4) tile512<E, 4, 4>(o, n, r);
    for (; r < o.m; ++r) tile512<E, 4, 1>(o, n, r);
  }
  for (; n < n1; ++n) {
    std::int64_t r = 0;
    for (; r + 4 <= o.m; r += 4) tile512<E, 1, 4>(o, n, r);
    for (; r < o.m; ++r) tile512<E, 1, 1>(o, n, r);
  }
}

// ---- AVX2: 8 lanes, one step covers 16 weights -----------------------------------------------
TESSERA_QGEMM_AVX2 inline void decode256(const float* row, std::int64_t k0, __m256& w0,
                                         __m256& w1) {
  w0 = _mm256_loadu_ps(row + k0);
  w1 = _mm256_loadu_ps(row + k0 + 8);
}
TESSERA_QGEMM_AVX2 inline void decode256(const bf16* row, std::int64_t k0, __m256& w0,
                                         __m256& w1) {
  const __m128i* p = reinterpret_cast<const __m128i*>(row + k0);
  w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16));
  w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p + 1)), 16));
}
TESSERA_QGEMM_AVX2 inline void decode256(const fp8_e4m3* row, std::int64_t k0, __m256& w0,
                                         __m256& w1) {
  const __m256i t =
      _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0)));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(t, _mm256_set1_epi16(0x80)), 8);
  const __m256i mag = _mm256_slli_epi16(_mm256_and_si256(t, _mm256_set1_epi16(0x7F)), 7);
  const __m256i h = _mm256_or_si256(sign, mag);
  w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}
template <class E>
TESSERA_QGEMM_AVX2 TESSERA_FORCE_INLINE void scale_block256(const Operands<E>& o, std::int64_t n,
                                                            std::int64_t k0, __m256& w0, __m256& w1) {
  if constexpr (std::is_same_v<E, fp8_e4m3>) {
    if (o.block_scale != nullptr) {
      const __m256 f = _mm256_set1_ps(block_factor(o, n, k0));
      w0 = _mm256_mul_ps(w0, f);
      w1 = _mm256_mul_ps(w1, f);
    }
  }
}
template <int G>
TESSERA_QGEMM_AVX2 inline void decode256(const Int4Block<G>* row, std::int64_t k0, __m256& w0,
                                         __m256& w1) {
  const Int4Block<G>& b = row[k0 / G];
  const __m256i q = _mm256_cvtepu8_epi32(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b.packed + (k0 % G) / 2)));
  const __m256 scale = _mm256_set1_ps(b.scale), zero = _mm256_set1_ps(b.zero_point);
  w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0x0F))), scale,
                       zero);
  w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), scale, zero);
}

TESSERA_QGEMM_AVX2 TESSERA_FORCE_INLINE float reduce_add256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// As tile512; 2 x 4 tiles leave room in AVX2's 16 registers.
template <class E, int NB, int MR>
TESSERA_QGEMM_AVX2 TESSERA_FORCE_INLINE void tile256(const Operands<E>& o, std::int64_t n0,
                                                     std::int64_t r0) {
  const std::int64_t k_main = o.k / 16 * 16;
  const E* rows[NB];
  for (int j = 0; j < NB; ++j) rows[j] = o.w + (n0 + j) * o.per_row;
  __m256 acc[NB][MR];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < MR; ++r) acc[j][r] = _mm256_setzero_ps();
  const float* x = o.x + r0 * o.ldx;
  const Prefetcher<E, NB> ahead(o, r0 == 0, n0, 16);
  for (std::int64_t k0 = 0; k0 < k_main; k0 += 16) {
    ahead.at(k0 / 16);
    __m256 w0[NB], w1[NB];
    for (int j = 0; j < NB; ++j) {
      decode256(rows[j], k0, w0[j], w1[j]);
      scale_block256(o, n0 + j, k0, w0[j], w1[j]);
    }
    for (int r = 0; r < MR; ++r) {
      const __m256 xe = _mm256_loadu_ps(x + r * o.ldx + k0);
      const __m256 xo = _mm256_loadu_ps(x + r * o.ldx + k0 + 8);
      for (int j = 0; j < NB; ++j) {
        acc[j][r] = _mm256_fmadd_ps(w0[j], xe, acc[j][r]);
        acc[j][r] = _mm256_fmadd_ps(w1[j], xo, acc[j][r]);
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < MR; ++r) {
      float s = reduce_add256(acc[j][r]);
      for (std::int64_t i = k_main; i < o.k; ++i) s += tail_weight(rows[j], i) * x[r * o.ldx + i];
      if (o.row_scale != nullptr) s *= o.row_scale[n0 + j] * o.row_scale_factor;
      o.y[(r0 + r) * o.ldy + n0 + j] = s;
    }
}

template <class E>
TESSERA_QGEMM_AVX2 TESSERA_FORCE_INLINE void decode_rows256(const Operands<E>& o, std::int64_t n,
                                                            int nb, float* w) {
  const std::int64_t k_main = o.k / 16 * 16;
  for (int j = 0; j < nb; ++j) {
    const E* row = o.w + (n + j) * o.per_row;
    float* out = w + j * o.k;
    const Prefetcher<E, 1> ahead(o, true, n + j + 2, 16);
    for (std::int64_t k0 = 0; k0 < k_main; k0 += 16) {
      ahead.at(k0 / 16);
      __m256 w0, w1;
      decode256(row, k0, w0, w1);
      scale_block256(o, n + j, k0, w0, w1);
      _mm256_storeu_ps(out + k0, w0);
      _mm256_storeu_ps(out + k0 + 8, w1);
    }
    for (std::int64_t i = k_main; i < o.k; ++i) out[i] = tail_weight(row, i);
  }
}

template <class E>
__attribute__((noinline)) TESSERA_QGEMM_AVX2 void rows_avx2(const Operands<E>& o, std::int64_t n0,
                                                            std::int64_t n1) {
  std::int64_t n = n0;
  if (!std::is_same_v<E, float> && o.m > kDecodeOnceRows) {
    std::vector<float> wbuf(static_cast<std::size_t>(2 * o.k));
    for (; n + 2 <= n1; n += 2) {
      decode_rows256(o, n, 2, wbuf.data());
      const Operands<float> d = decoded_operands(o, n, wbuf.data());
      std::int64_t r = 0;
      for (; r + 4 <= o.m; r += 4) tile256<float, 2, 4>(d, 0, r);
      for (; r < o.m; ++r) tile256<float, 2, 1>(d, 0, r);
    }
  }
  for (; n + 2 <= n1; n += 2) {
    std::int64_t r = 0;
    for (; r + 4 <= o.m; r += 4) tile256<E, 2, 4>(o, n, r);
    for (; r < o.m; ++r) tile256<E, 2, 1>(o, n, r);
  }
  for (; n < n1; ++n) {
    std::int64_t r = 0;
    for (; r + 4 <= o.m; r += 4) tile256<E, 1, 4>(o, n, r);
    for (; r < o.m; ++r) tile256<E, 1, 1>(o, n, r);
  }
}

// ---- AVX-512 VNNI: INT4 codes times int8 activations -----------------------------------------
// y[r, n] = Σ_g ( scale_g · Σ_{c in g} d[r, c] · isum(r, n, c)  +  zero_g · xsum[r, g] )
// where c runs over the 32-value sub-blocks of x, d[r, c] = max |x| / 127 over the sub-block,
// isum is the exact integer sum of nibble · round(x / d) over its 32 positions (vpdpbusd: 64
// u8 x s8 products into 16 int32 lanes per instruction) and xsum the sum of the unrounded x over
// the weight group. The zero point multiplies the float sum, so only the nibble part sees the
// activation rounding.
//
// Layout: one lane per weight row. A tile is 16 rows of W; for each sub-block their codes are
// rearranged (unpack_vnni) so that register s, lane j holds four nibbles of row j as bytes, and
// vpdpbusd multiplies them by four activation codes broadcast to every lane. Eight such steps
// finish the sub-block with each lane's sum complete: no horizontal reduction anywhere, so every
// y[r, n] is its own lane's fixed sequence of float steps (convert, fma by d, per group two fmas),
// whichever lane, tile, batch or thread it falls in; the integer sums are exact in any order.

// x (M, K) -> int8 codes, steps and group sums for rows_vnni (layout in Operands). The codes of
// each sub-block are stored as its 16 even positions, then its 16 odd ones: the order in which
// unpack_vnni leaves the low and the high nibbles. inv: AWQ's 1/s per column, or null.
template <int G>
TESSERA_QGEMM_VNNI void prepare_vnni(const float* x, std::int64_t m, std::int64_t ldx,
                                     std::int64_t k, const float* inv, std::int8_t* xq, float* dx,
                                     float* xs) {
  const __m512i even =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (std::int64_t r = 0; r < m; ++r) {
    const float* src = x + r * ldx;
    std::int8_t* q = xq + r * k;
    double group_sum = 0;
    for (std::int64_t c0 = 0; c0 < k; c0 += 32) {
      __m512 a = _mm512_loadu_ps(src + c0), b = _mm512_loadu_ps(src + c0 + 16);
      if (inv != nullptr) {  // the same float product as the other paths' copy of x
        a = _mm512_mul_ps(a, _mm512_loadu_ps(inv + c0));
        b = _mm512_mul_ps(b, _mm512_loadu_ps(inv + c0 + 16));
      }
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const float step = amax / 127.0f;
      dx[r * (k / 32) + c0 / 32] = step;
      __m512i qa = _mm512_setzero_si512(), qb = qa;
      if (step > 0.0f) {  // an all-zero sub-block has step 0 and codes 0
        const __m512 st = _mm512_set1_ps(step);
        // Round to nearest, ties to even, whatever MXCSR says. |x / step| <= 127 up to an ulp,
        // and the saturating narrowing below keeps codes in int8 even for a denormal step.
        qa = _mm512_cvt_roundps_epi32(_mm512_div_ps(a, st),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        qb = _mm512_cvt_roundps_epi32(_mm512_div_ps(b, st),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c0),
                       _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(qa, even, qb)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c0 + 16),
                       _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(qa, odd, qb)));
      // The group sum in double, rounded once: the zero-point term is then as exact as float
      // allows (a float running sum would lose digits to cancellation in long groups).
      const __m512d lo = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a)),
                                       _mm512_cvtps_pd(_mm512_extractf32x8_ps(a, 1)));
      const __m512d hi = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(b)),
                                       _mm512_cvtps_pd(_mm512_extractf32x8_ps(b, 1)));
      group_sum += _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
      if ((c0 + 32) % G == 0) {
        xs[r * (k / G) + c0 / G] = static_cast<float>(group_sum);
        group_sum = 0;
      }
    }
  }
}

// The codes of sub-block c (32 weights) of 16 rows, in vpdpbusd's form: register s, lane j holds
// row j's nibbles of positions 8s, 8s+2, 8s+4, 8s+6 (s < 4; the low nibbles of packed bytes
// 4s..4s+3) or 8(s-4)+1, +3, +5, +7 (s >= 4; their high nibbles), one per byte.
template <int G>
TESSERA_QGEMM_VNNI TESSERA_FORCE_INLINE void unpack_vnni(const Int4Block<G>* const* rows,
                                                         std::int64_t c, __m512i q[8]) {
  const std::int64_t blk = c * 32 / G;
  const std::int64_t off = c * 32 % G / 2;
  auto at = [&](int j) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j][blk].packed + off));
  };
  // r[t]'s 128-bit lane l is row 4l + t; a 4 x 4 dword transpose within each 128-bit lane then
  // leaves dword s of row 4l + t in lane 4l + t of register s.
  __m512i r[4];
  for (int t = 0; t < 4; ++t)
    r[t] = _mm512_inserti32x4(
        _mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(at(t)), at(4 + t), 1),
                           at(8 + t), 2),
        at(12 + t), 3);
  const __m512i t0 = _mm512_unpacklo_epi32(r[0], r[1]), t1 = _mm512_unpackhi_epi32(r[0], r[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(r[2], r[3]), t3 = _mm512_unpackhi_epi32(r[2], r[3]);
  const __m512i d[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                        _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int s = 0; s < 4; ++s) {
    q[s] = _mm512_and_si512(d[s], low);
    q[s + 4] = _mm512_and_si512(_mm512_srli_epi32(d[s], 4), low);
  }
}

// Each tile row's scale and zero point of group g, one lane per row.
template <int G>
TESSERA_QGEMM_VNNI TESSERA_FORCE_INLINE void scales_vnni(const Int4Block<G>* row0, __m512i index,
                                                         std::int64_t g, __m512& scale,
                                                         __m512& zero) {
  scale = _mm512_i32gather_ps(index, &row0[g].scale, 1);
  zero = _mm512_i32gather_ps(index, &row0[g].zero_point, 1);
}

// Byte offsets of the tile's 16 rows from its first; lanes past the last row repeat it (their
// results are computed and dropped, so every load stays inside the matrix).
template <int G>
TESSERA_QGEMM_VNNI TESSERA_FORCE_INLINE __m512i row_index_vnni(const Operands<Int4Block<G>>& o,
                                                               int nb) {
  const __m512i j = _mm512_min_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(nb - 1));
  return _mm512_mullo_epi32(
      j, _mm512_set1_epi32(static_cast<int>(o.per_row * std::int64_t{sizeof(Int4Block<G>)})));
}

// u[r] = fma(float(isum of sub-block), d[r], u[r]) for MR rows of x. The integer sum is exact
// in any order, so it runs as two chains (vpdpbusd's latency) without changing a bit.
template <int MR>
TESSERA_QGEMM_VNNI TESSERA_FORCE_INLINE void dot_vnni(const __m512i q[8], const std::int8_t* xq,
                                                      std::int64_t ldq, const float* dx,
                                                      std::int64_t ldd, __m512 u[MR]) {
  for (int r = 0; r < MR; ++r) {
    const std::int8_t* xr = xq + r * ldq;
    // (Not a lambda: a lambda does not inherit the target attribute its intrinsics need.)
    __m512i xb[8];
    for (int s = 0; s < 8; ++s) {
      std::int32_t v;
      std::memcpy(&v, xr + 4 * s, 4);
      xb[s] = _mm512_set1_epi32(v);
    }
    __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[0], xb[0]);
    __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[4], xb[4]);
    for (int s = 1; s < 4; ++s) {
      s0 = _mm512_dpbusd_epi32(s0, q[s], xb[s]);
      s1 = _mm512_dpbusd_epi32(s1, q[s + 4], xb[s + 4]);
    }
    u[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)),
                           _mm512_set1_ps(dx[r * ldd]), u[r]);
  }
}

// A 64-byte block for the unpacked tile buffer (std::vector<__m512i> would drop the alignment
// attribute of its element type).
struct alignas(64) Zmm {
  unsigned char bytes[64];
};

// y[r0 + r, n0 + j] for r < MR, j < nb <= 16. Buffered: the codes, scales and zero points come
// from wbuf / sbuf (fill_vnni, once per tile) instead of the matrix; the arithmetic is the same.
template <int G, int MR, bool Buffered>
TESSERA_QGEMM_VNNI TESSERA_FORCE_INLINE void tile_vnni(const Operands<Int4Block<G>>& o,
                                                       std::int64_t n0, int nb, std::int64_t r0,
                                                       const Zmm* wbuf, const Zmm* sbuf) {
  const std::int64_t groups = o.k / G, subs = G / 32, ldd = o.k / 32;
  const Int4Block<G>* rows[16];
  for (int j = 0; j < 16; ++j) rows[j] = o.w + (n0 + std::min(j, nb - 1)) * o.per_row;
  const __m512i index = row_index_vnni(o, nb);
  const Prefetcher<Int4Block<G>, 16> ahead(o, !Buffered, n0, 32);
  const std::int8_t* xq = o.xq + r0 * o.k;
  const float* dx = o.dx + r0 * ldd;
  const float* xs = o.xs + r0 * groups;
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (std::int64_t g = 0; g < groups; ++g) {
    __m512 scale, zero;
    if constexpr (Buffered) {
      scale = _mm512_load_ps(sbuf[2 * g].bytes);
      zero = _mm512_load_ps(sbuf[2 * g + 1].bytes);
    } else {
      scales_vnni(rows[0], index, g, scale, zero);
    }
    __m512 u[MR];
    for (int r = 0; r < MR; ++r) u[r] = _mm512_setzero_ps();
    for (std::int64_t sub = 0; sub < subs; ++sub) {
      const std::int64_t c = g * subs + sub;
      __m512i q[8];
      if constexpr (Buffered) {
        for (int s = 0; s < 8; ++s) q[s] = _mm512_load_si512(wbuf[8 * c + s].bytes);
      } else {
        ahead.at(c);
        unpack_vnni(rows, c, q);
      }
      dot_vnni<MR>(q, xq + 32 * c, o.k, dx + c, ldd, u);
    }
    for (int r = 0; r < MR; ++r) {
      acc[r] = _mm512_fmadd_ps(u[r], scale, acc[r]);
      acc[r] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xs[r * groups + g]), acc[r]);
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << nb) - 1u);
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(o.y + (r0 + r) * o.ldy + n0, mask, acc[r]);
}

// Unpacks a tile's codes, scales and zero points into wbuf (K/32 · 8 blocks) and sbuf (2·K/G).
template <int G>
TESSERA_QGEMM_VNNI TESSERA_FORCE_INLINE void fill_vnni(const Operands<Int4Block<G>>& o,
                                                       std::int64_t n0, int nb, Zmm* wbuf,
                                                       Zmm* sbuf) {
  const std::int64_t groups = o.k / G, subs = G / 32;
  const Int4Block<G>* rows[16];
  for (int j = 0; j < 16; ++j) rows[j] = o.w + (n0 + std::min(j, nb - 1)) * o.per_row;
  const __m512i index = row_index_vnni(o, nb);
  const Prefetcher<Int4Block<G>, 16> ahead(o, true, n0, 32);
  for (std::int64_t g = 0; g < groups; ++g) {
    __m512 scale, zero;
    scales_vnni(rows[0], index, g, scale, zero);
    _mm512_store_ps(sbuf[2 * g].bytes, scale);
    _mm512_store_ps(sbuf[2 * g + 1].bytes, zero);
    for (std::int64_t sub = 0; sub < subs; ++sub) {
      const std::int64_t c = g * subs + sub;
      ahead.at(c);
      __m512i q[8];
      unpack_vnni(rows, c, q);
      for (int s = 0; s < 8; ++s) _mm512_store_si512(wbuf[8 * c + s].bytes, q[s]);
    }
  }
}

template <int G, bool Buffered>
TESSERA_QGEMM_VNNI TESSERA_FORCE_INLINE void tile_rows_vnni(const Operands<Int4Block<G>>& o,
                                                            std::int64_t n0, int nb,
                                                            std::int64_t r0, std::int64_t mr,
                                                            const Zmm* wbuf, const Zmm* sbuf) {
  switch (mr) {
    case 1: tile_vnni<G, 1, Buffered>(o, n0, nb, r0, wbuf, sbuf); return;
    case 2: tile_vnni<G, 2, Buffered>(o, n0, nb, r0, wbuf, sbuf); return;
    case 3: tile_vnni<G, 3, Buffered>(o, n0, nb, r0, wbuf, sbuf); return;
    default: tile_vnni<G, 4, Buffered>(o, n0, nb, r0, wbuf, sbuf); return;
  }
}

// Up to 4 rows of x, the codes are unpacked in registers and used at once. Beyond, each 16-row
// tile is unpacked once into a buffer (16·K bytes of codes, in L1/L2) that every 4 rows of x
// read: the unpacking then costs once per tile instead of once per 4 rows.
template <int G>
__attribute__((noinline)) TESSERA_QGEMM_VNNI void rows_vnni(const Operands<Int4Block<G>>& o,
                                                            std::int64_t n0, std::int64_t n1) {
  if (o.m <= kDecodeOnceRows) {
    for (std::int64_t n = n0; n < n1; n += 16)
      tile_rows_vnni<G, false>(o, n, static_cast<int>(std::min<std::int64_t>(16, n1 - n)), 0, o.m,
                               nullptr, nullptr);
    return;
  }
  std::vector<Zmm> wbuf(static_cast<std::size_t>(o.k / 32 * 8)),
      sbuf(static_cast<std::size_t>(2 * (o.k / G)));
  for (std::int64_t n = n0; n < n1; n += 16) {
    const int nb = static_cast<int>(std::min<std::int64_t>(16, n1 - n));
    fill_vnni(o, n, nb, wbuf.data(), sbuf.data());
    for (std::int64_t r = 0; r < o.m; r += 4)
      tile_rows_vnni<G, true>(o, n, nb, r, std::min<std::int64_t>(4, o.m - r), wbuf.data(),
                              sbuf.data());
  }
}
#pragma GCC diagnostic pop
#endif  // TESSERA_QGEMM_X86

template <class E>
void run_rows(KernelPath path, const Operands<E>& o, std::int64_t n0, std::int64_t n1) {
#if defined(TESSERA_QGEMM_X86)
  switch (path) {
    case KernelPath::kAvx512Vnni:
      if constexpr (requires { E::kGroup; }) {
        rows_vnni<E::kGroup>(o, n0, n1);
      } else {
        rows_avx512<E>(o, n0, n1);
      }
      return;
    case KernelPath::kAvx512: rows_avx512<E>(o, n0, n1); return;
    case KernelPath::kAvx2: rows_avx2<E>(o, n0, n1); return;
    case KernelPath::kScalar: break;
  }
#endif
  (void)path;
  rows_scalar<E>(o, n0, n1);
}

inline int lanes(KernelPath p) {
  switch (p) {
    case KernelPath::kAvx512Vnni:
    case KernelPath::kAvx512: return 16;
    case KernelPath::kAvx2: return 8;
    case KernelPath::kScalar: break;
  }
  return 1;
}

}  // namespace qgemm_detail

// y (M, N) = x (M, K) · Wdeq^T on `path`. x and y must not overlap.
template <WeightFormat F>
void matmul_via(KernelPath path, const float* x, std::int64_t m, std::int64_t ldx,
                const QuantizedMatrix<F>& w, float* y, std::int64_t ldy) {
  using E = typename F::Element;
  const std::int64_t n = w.rows(), k = w.cols();
  TESSERA_CHECK(n > 0 && k > 0, "quant::matmul<", F::kName, ">: W is empty");
  TESSERA_CHECK(m >= 0, "quant::matmul: M = ", m, " is negative");
  TESSERA_CHECK(ldx >= k && ldy >= n, "quant::matmul<", F::kName, ">: ldx = ", ldx, " and ldy = ",
                ldy, " must be at least K = ", k, " and N = ", n);
  TESSERA_CHECK(m == 0 || (x != nullptr && y != nullptr), "quant::matmul: null x or y");
  TESSERA_CHECK(path_available(path), "quant::matmul: kernel path ", to_string(path),
                " is not available on this processor (", cpu_features().str(), ")");
  if (m == 0) return;

  qgemm_detail::Operands<E> o{w.data().data(), k / w.group(), k, x, ldx, m, y, ldy, nullptr, 1.0f};
  if constexpr (std::is_same_v<F, FP8Weights>) {
    o.row_scale = w.row_scales().data();
    o.row_scale_factor = path == KernelPath::kScalar ? 1.0f : 256.0f;
  } else if constexpr (is_fp8_block_v<F>) {
    static_assert((F::kBlock & (F::kBlock - 1)) == 0 && F::kBlock >= 32);
    o.block_scale = w.row_scales().data();
    o.blocks_per_row = k / F::kBlock;
    o.block_shift = std::countr_zero(static_cast<unsigned>(F::kBlock));
    o.row_scale_factor = path == KernelPath::kScalar ? 1.0f : 256.0f;
  }
  std::vector<float> xbuf;
  std::vector<std::int8_t> xq;
  if constexpr (is_int4_v<F>) {
    const int step = 2 * qgemm_detail::lanes(path);
    if (path == KernelPath::kAvx512Vnni) {
#if defined(TESSERA_QGEMM_X86)
      // The tile's gather indices are int32 byte offsets of 16 rows.
      TESSERA_CHECK(16 * (k / F::kGroup) * static_cast<std::int64_t>(sizeof(E)) < (std::int64_t{1} << 31),
                    "quant::matmul<", F::kName, ">: K = ", k, " is too large for the ",
                    to_string(path), " path");
      constexpr std::int64_t G = F::kGroup;
      xq.resize(static_cast<std::size_t>(m * k));
      xbuf.resize(static_cast<std::size_t>(m * (k / 32 + k / G)));
      const float* inv = F::kActivationAware ? w.input_scales_inv().data() : nullptr;
      qgemm_detail::prepare_vnni<F::kGroup>(x, m, ldx, k, inv, xq.data(), xbuf.data(),
                                           xbuf.data() + m * (k / 32));
      o.x = nullptr;
      o.xq = xq.data();
      o.dx = xbuf.data();
      o.xs = xbuf.data() + m * (k / 32);
#endif
    } else if (F::kActivationAware || step > 2) {
      xbuf.resize(static_cast<std::size_t>(m * k));
      const float* inv = F::kActivationAware ? w.input_scales_inv().data() : nullptr;
      for (std::int64_t r = 0; r < m; ++r) {
        const float* src = x + r * ldx;
        float* dst = xbuf.data() + r * k;
        for (std::int64_t c0 = 0; c0 < k; c0 += step) {
          for (int j = 0; j < step; ++j) {
            // Position j of the chunk holds the chunk's value 2j (j < step/2) or 2(j - step/2) + 1.
            const int from = step == 2 ? j : (j < step / 2 ? 2 * j : 2 * (j - step / 2) + 1);
            const float v = src[c0 + from];
            dst[c0 + j] = inv != nullptr ? v * inv[c0 + from] : v;
          }
        }
      }
      o.x = xbuf.data();
      o.ldx = k;
    }
  }
#if defined(_OPENMP)
  if (n > 1 && n * k >= qgemm_detail::kParallelMinWeights && omp_get_max_threads() > 1 &&
      !omp_in_parallel()) {
#pragma omp parallel
    {
      const std::int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      const std::int64_t begin = n * t / threads, end = n * (t + 1) / threads;
      if (begin < end) qgemm_detail::run_rows<E>(path, o, begin, end);
    }
    return;
  }
#endif
  qgemm_detail::run_rows<E>(path, o, 0, n);
}

// The same on the path kernel_path() picks.
template <WeightFormat F>
void matmul(const float* x, std::int64_t m, std::int64_t ldx, const QuantizedMatrix<F>& w, float* y,
            std::int64_t ldy) {
  matmul_via(kernel_path(), x, m, ldx, w, y, ldy);
}

// x (..., K) -> y (..., N).
template <WeightFormat F>
Tensor<float> linear(TensorView<const float, Cpu> x, const QuantizedMatrix<F>& w) {
  TESSERA_CHECK(x.rank() >= 1 && x.dim(-1) == w.cols(), "quant::linear<", F::kName,
                ">: x has shape ", x.shape(), "; expected (..., ", w.cols(), ")");
  Tensor<float> owned;
  const float* px = x.data();
  if (!x.is_contiguous()) {
    owned = x.contiguous();
    px = owned.data();
  }
  Shape out_shape = x.shape();
  out_shape[-1] = w.rows();
  auto y = Tensor<float>::empty(out_shape);  // (..., N)
  const std::int64_t m = x.numel() / w.cols();
  matmul(px, m, w.cols(), w, y.data(), w.rows());
  return y;
}

}  // namespace tessera::quant

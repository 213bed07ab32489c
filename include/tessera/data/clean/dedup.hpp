// tessera/data/clean/dedup.hpp — stage 3: exact and near-duplicate removal.
//
// Exact: the xxHash64 of the (already normalised) text; the first copy is kept. Only the
// 8-byte hash is remembered, so memory grows with the number of distinct documents, not
// their size. A 64-bit collision among n documents has probability ~n^2/2^65 (1e-9 for
// 200k documents), which is accepted.
//
// Near: MinHash over character shingles (k consecutive code points, whitespace included),
// with LSH banding. For permutation i, h_i(x) = (a_i * x + b_i) mod (2^61 - 1) over the
// xxHash64 of each shingle, a_i, b_i drawn from SplitMix64(seed): deterministic, same on
// every machine. P[min h_i(A) = min h_i(B)] = J(A, B), so the fraction of agreeing
// signature entries estimates the Jaccard similarity with standard error
// sqrt(J(1-J)/permutations). Signatures are split into `bands` bands of permutations/bands
// rows; two documents become candidates when any band agrees exactly, and a candidate is
// removed when its estimated Jaccard with an earlier kept document reaches `threshold`.
// Character shingles work for Chinese (no spaces) and English alike.
//
// Signature entries are stored as the low 32 bits of the 61-bit minimum: a false match
// between different minima has probability 2^-32, far below the estimator's own noise,
// and it halves the memory per kept document (permutations * 4 bytes).
//
// Needs xxHash (TESSERA_HAVE_XXHASH, used header-only); without it the stages throw.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#if defined(TESSERA_HAVE_XXHASH)
#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>
#endif

#include "tessera/core/error.hpp"
#include "tessera/data/clean/text.hpp"

namespace tessera::data::clean {

inline uint64_t hash64(std::string_view bytes, uint64_t seed = 0) {
#if defined(TESSERA_HAVE_XXHASH)
  return XXH64(bytes.data(), bytes.size(), seed);
#else
  (void)bytes;
  (void)seed;
  fail(
      "clean: deduplication needs xxHash, which this build does not have "
      "(link tessera::text with libxxhash-dev installed)");
#endif
}

class ExactDedup final : public Stage {
 public:
  ExactDedup() {
    report_.stage = name();
    (void)hash64("");  // fail at construction, not at the first document, when xxHash is missing
  }
  std::string name() const override { return "exact_dedup"; }
  bool process(Document& doc) override {
    if (seen_.insert(hash64(doc.text)).second) return true;
    report_.count("docs_exact_duplicate");
    return false;
  }

 private:
  std::unordered_set<uint64_t> seen_;
};

struct MinHashOptions {
  int shingle = 5;         // code points per shingle
  int permutations = 128;  // signature length
  int bands = 16;          // LSH bands; permutations must be a multiple
  double threshold = 0.8;  // estimated Jaccard at which a candidate is a near duplicate
  uint64_t seed = 0x5eed0fd5ull;
};

// Computes shingle sets and MinHash signatures; usable on its own (tests, analysis).
class MinHasher {
 public:
  static constexpr uint64_t kPrime = (1ull << 61) - 1;

  explicit MinHasher(MinHashOptions options = {}) : opt_(options) {
    TESSERA_CHECK(opt_.shingle >= 1, "clean::MinHasher: shingle size must be >= 1, got ",
                  opt_.shingle);
    TESSERA_CHECK(opt_.permutations >= 1, "clean::MinHasher: permutations must be >= 1, got ",
                  opt_.permutations);
    TESSERA_CHECK(opt_.bands >= 1 && opt_.permutations % opt_.bands == 0,
                  "clean::MinHasher: bands (", opt_.bands, ") must divide permutations (",
                  opt_.permutations, ")");
    TESSERA_CHECK(opt_.threshold > 0.0 && opt_.threshold <= 1.0,
                  "clean::MinHasher: threshold must be in (0, 1], got ", opt_.threshold);
    uint64_t state = opt_.seed;
    for (int i = 0; i < opt_.permutations; ++i) {
      a_.push_back(1 + splitmix64(state) % (kPrime - 1));  // a != 0 keeps h_i a bijection
      b_.push_back(splitmix64(state) % kPrime);
    }
  }

  const MinHashOptions& options() const { return opt_; }

  // Sorted, distinct shingle hashes. A text shorter than one shingle is one shingle.
  std::vector<uint64_t> shingles(std::string_view text) const {
    std::vector<size_t> starts;  // byte offset of each code point
    for (size_t i = 0; i < text.size();) {
      starts.push_back(i);
      decode_utf8(text, i);
    }
    std::vector<uint64_t> out;
    const size_t k = static_cast<size_t>(opt_.shingle);
    if (starts.empty()) return out;
    if (starts.size() <= k) {
      out.push_back(hash64(text));
      return out;
    }
    for (size_t s = 0; s + k <= starts.size(); ++s) {
      const size_t end = s + k < starts.size() ? starts[s + k] : text.size();
      out.push_back(hash64(text.substr(starts[s], end - starts[s])));
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
  }

  std::vector<uint32_t> signature(const std::vector<uint64_t>& shingle_set) const {
    std::vector<uint32_t> sig(a_.size());
    for (size_t i = 0; i < a_.size(); ++i) {
      uint64_t min = kPrime;
      for (uint64_t x : shingle_set) min = std::min(min, mul_add_mod(a_[i], x % kPrime, b_[i]));
      sig[i] = static_cast<uint32_t>(min);  // low 32 bits, see the file comment
    }
    if (shingle_set.empty()) sig.clear();
    return sig;
  }
  std::vector<uint32_t> signature(std::string_view text) const { return signature(shingles(text)); }

  static double estimate_jaccard(const std::vector<uint32_t>& x, const std::vector<uint32_t>& y) {
    TESSERA_CHECK(x.size() == y.size() && !x.empty(),
                  "clean::MinHasher: signatures differ in length (", x.size(), " vs ", y.size(),
                  ")");
    size_t same = 0;
    for (size_t i = 0; i < x.size(); ++i) same += x[i] == y[i];
    return static_cast<double>(same) / static_cast<double>(x.size());
  }

 private:
  // (a * x + b) mod (2^61 - 1) without division: fold the 122-bit product twice.
  static uint64_t mul_add_mod(uint64_t a, uint64_t x, uint64_t b) {
    __extension__ typedef unsigned __int128 u128;  // __extension__: g++/clang builtin, not ISO
    const u128 p = static_cast<u128>(a) * x + b;
    uint64_t r = static_cast<uint64_t>(p & kPrime) + static_cast<uint64_t>(p >> 61);
    r = (r & kPrime) + (r >> 61);
    return r >= kPrime ? r - kPrime : r;
  }

  MinHashOptions opt_;
  std::vector<uint64_t> a_, b_;
};

// Exact Jaccard similarity of two sorted, distinct sets.
inline double exact_jaccard(const std::vector<uint64_t>& x, const std::vector<uint64_t>& y) {
  if (x.empty() && y.empty()) return 1.0;
  size_t i = 0, j = 0, both = 0;
  while (i < x.size() && j < y.size()) {
    if (x[i] == y[j]) {
      ++both;
      ++i;
      ++j;
    } else if (x[i] < y[j])
      ++i;
    else
      ++j;
  }
  return static_cast<double>(both) / static_cast<double>(x.size() + y.size() - both);
}

// A near-duplicate removed by NearDedup: where it was, which kept document it matched.
struct NearDuplicatePair {
  std::string removed_source, kept_source;
  int64_t removed_line = 0, kept_line = 0;
  double estimated_jaccard = 0.0;
};

class NearDedup final : public Stage {
 public:
  explicit NearDedup(MinHashOptions options = {})
      : hasher_(options), buckets_(static_cast<size_t>(options.bands)) {
    report_.stage = name();
    (void)hash64("");
  }
  std::string name() const override { return "near_dedup"; }

  bool process(Document& doc) override {
    const auto sig = hasher_.signature(doc.text);
    if (sig.empty()) return true;
    const int bands = hasher_.options().bands;
    const size_t rows = sig.size() / static_cast<size_t>(bands);
    std::vector<uint64_t> keys(static_cast<size_t>(bands));
    double best = -1.0;
    uint32_t best_id = 0;
    for (int b = 0; b < bands; ++b) {
      // The band's rows hashed together, salted by the band number so bands do not collide.
      keys[b] = hash64(std::string_view(reinterpret_cast<const char*>(sig.data() + b * rows),
                                        rows * sizeof(uint32_t)),
                       static_cast<uint64_t>(b));
      auto it = buckets_[b].find(keys[b]);
      if (it == buckets_[b].end()) continue;
      for (uint32_t id : it->second) {
        const double j = MinHasher::estimate_jaccard(sig, kept_[id].signature);
        if (j > best) {
          best = j;
          best_id = id;
        }
      }
    }
    if (best >= hasher_.options().threshold) {
      const Kept& k = kept_[best_id];
      pairs_.push_back({doc.source, k.source, doc.line, k.line, best});
      report_.count("docs_near_duplicate");
      return false;
    }
    if (best >= 0.0) report_.count("candidates_below_threshold");
    const auto id = static_cast<uint32_t>(kept_.size());
    kept_.push_back({sig, doc.source, doc.line});
    for (int b = 0; b < bands; ++b) buckets_[b][keys[b]].push_back(id);
    return true;
  }

  const std::vector<NearDuplicatePair>& removed_pairs() const { return pairs_; }

  void finish() override {
    report_.notes.clear();
    if (pairs_.empty()) return;
    double sum = 0, lo = 1, hi = 0;
    int hist[5] = {0, 0, 0, 0, 0};  // [t,.85) [.85,.9) [.9,.95) [.95,1) [1]
    for (const auto& p : pairs_) {
      sum += p.estimated_jaccard;
      lo = std::min(lo, p.estimated_jaccard);
      hi = std::max(hi, p.estimated_jaccard);
      const double j = p.estimated_jaccard;
      ++hist[j >= 1.0 ? 4 : j >= 0.95 ? 3 : j >= 0.9 ? 2 : j >= 0.85 ? 1 : 0];
    }
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "estimated Jaccard of %zu removed pairs: mean %.3f, min %.3f, max %.3f; "
                  "<0.85: %d, 0.85-0.9: %d, 0.9-0.95: %d, 0.95-1: %d, =1: %d",
                  pairs_.size(), sum / static_cast<double>(pairs_.size()), lo, hi, hist[0], hist[1],
                  hist[2], hist[3], hist[4]);
    report_.notes.push_back(buf);
    for (size_t i = 0; i < std::min<size_t>(pairs_.size(), 5); ++i) {
      const auto& p = pairs_[i];
      report_.notes.push_back("example: " + p.removed_source + ":" +
                              std::to_string(p.removed_line) + " ~ " + p.kept_source + ":" +
                              std::to_string(p.kept_line) + " (J~" +
                              std::to_string(p.estimated_jaccard).substr(0, 5) + ")");
    }
  }

 private:
  struct Kept {
    std::vector<uint32_t> signature;
    std::string source;
    int64_t line;
  };
  MinHasher hasher_;
  std::vector<std::unordered_map<uint64_t, std::vector<uint32_t>>> buckets_;
  std::vector<Kept> kept_;
  std::vector<NearDuplicatePair> pairs_;
};

}  // namespace tessera::data::clean

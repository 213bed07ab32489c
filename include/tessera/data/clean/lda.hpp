// tessera/data/clean/lda.hpp — stage 5: topic domains by LDA, and balanced sampling.
//
// The R1 recipe balances its pre-training mix across topic domains. Domains come from
// latent Dirichlet allocation trained by collapsed Gibbs sampling (Griffiths & Steyvers
// 2004): each token's topic is resampled from
//     p(z = k) ∝ (n_dk + alpha) (n_kw + beta) / (n_k + V beta)
// with the token's own count removed. One SplitMix64-seeded xoshiro256** stream drives a
// fixed sweep order (documents, then tokens), so the same seed gives the same topics on
// every run and machine. A document's domain is the argmax of its topic counts.
//
// Tokens for LDA: lower-cased Latin words of two or more letters and single Han
// characters, minus the stop lists of quality.hpp; words in fewer than `min_doc_freq`
// documents or in more than `max_doc_fraction` of them are pruned (they carry no topic).
//
// BalancedSampler picks, per domain, the share of the output the target mix asks for,
// taking the largest output that needs no document twice (or a requested size, capped per
// domain by what the domain has). Which documents of a domain are taken is decided by a
// seeded hash of their index: deterministic and independent of input order within a domain.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <string>
#include <unordered_map>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/data/clean/quality.hpp"
#include "tessera/data/clean/text.hpp"

namespace tessera::data::clean {

// xoshiro256** seeded from SplitMix64: fast, fixed, and the same on every platform.
class Xoshiro256 {
 public:
  explicit Xoshiro256(uint64_t seed) {
    for (auto& x : s_) x = splitmix64(seed);
  }
  uint64_t next() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

// The LDA tokens of a text (see the file comment). With `han_bigrams`, a run of Han
// characters gives its overlapping character pairs instead of single characters: modern
// Chinese words are mostly two characters, so pairs carry more topic than characters
// (软件 "software" vs 软 "soft" + 件 "item"), without needing a segmenter.
inline std::vector<std::string> lda_tokens(std::string_view text, bool remove_stop_words = true,
                                           bool han_bigrams = false) {
  std::vector<std::string> out;
  const auto units = word_units(text);
  auto han_unit = [](std::string_view w) {
    size_t i = 0;
    const char32_t c = decode_utf8(w, i);
    return i == w.size() && is_han(c);
  };
  for (size_t u = 0; u < units.size(); ++u) {
    const std::string_view w = units[u];
    if (han_unit(w)) {
      if (han_bigrams) {
        // Pair with the next unit only if it is Han and directly follows in the text.
        if (u + 1 < units.size() && han_unit(units[u + 1]) &&
            w.data() + w.size() == units[u + 1].data())
          out.emplace_back(std::string(w) + std::string(units[u + 1]));
      } else if (!remove_stop_words || !chinese_stop_chars().count(w)) {
        out.emplace_back(w);
      }
      continue;
    }
    std::string lower(w);
    bool letters = true;
    for (auto& ch : lower) {
      if (ch >= 'A' && ch <= 'Z')
        ch = static_cast<char>(ch - 'A' + 'a');
      else if (!(ch >= 'a' && ch <= 'z') && !(static_cast<unsigned char>(ch) >= 0x80) && ch != '\'')
        letters = false;
    }
    if (!letters || to_codepoints(lower).size() < 2) continue;
    if (remove_stop_words && english_stop_words().count(lower)) continue;
    out.push_back(std::move(lower));
  }
  return out;
}

struct LdaOptions {
  int topics = 32;
  double alpha = 0.1;    // document-topic prior (sparse: documents have few topics)
  double beta = 0.01;    // topic-word prior
  int iterations = 200;  // Gibbs sweeps
  uint64_t seed = 20250101;
  // Gibbs sampling can settle in a local optimum (two planted topics merged, another one
  // split). With restarts > 1, fit runs from that many seeds (seed, seed+1, ...) and keeps
  // the run with the highest log joint likelihood log p(w, z).
  int restarts = 1;
  int64_t min_doc_freq = 2;
  double max_doc_fraction = 0.3;
  bool han_bigrams = false;  // Han tokens: single characters (false) or adjacent pairs (true)
};

// Collapsed Gibbs LDA over documents given as word ids in [0, vocabulary).
class Lda {
 public:
  explicit Lda(LdaOptions options = {}) : opt_(options) {
    TESSERA_CHECK(opt_.topics >= 1, "clean::Lda: topics must be >= 1, got ", opt_.topics);
    TESSERA_CHECK(opt_.alpha > 0 && opt_.beta > 0, "clean::Lda: alpha and beta must be > 0, got ",
                  opt_.alpha, ", ", opt_.beta);
    TESSERA_CHECK(opt_.iterations >= 0, "clean::Lda: iterations must be >= 0, got ",
                  opt_.iterations);
    TESSERA_CHECK(opt_.restarts >= 1, "clean::Lda: restarts must be >= 1, got ", opt_.restarts);
  }

  void fit(const std::vector<std::vector<int32_t>>& docs, int32_t vocabulary) {
    TESSERA_CHECK(vocabulary >= 1, "clean::Lda::fit: vocabulary must be >= 1, got ", vocabulary);
    double best = -INFINITY;
    State best_state;
    for (int r = 0; r < opt_.restarts; ++r) {
      fit_once(docs, vocabulary, opt_.seed + static_cast<uint64_t>(r));
      const double ll = log_likelihood(docs);
      if (ll > best) {
        best = ll;
        best_state = std::move(state_);
      }
    }
    state_ = std::move(best_state);
    log_likelihood_ = best;
  }

  // log p(w, z) of the kept run (Griffiths & Steyvers 2004, eq. 2 and its document term).
  double log_likelihood() const { return log_likelihood_; }

 private:
  double log_likelihood(const std::vector<std::vector<int32_t>>& docs) const {
    const int K = opt_.topics;
    const double a = opt_.alpha, b = opt_.beta;
    double ll = K * (std::lgamma(V_ * b) - V_ * std::lgamma(b));
    for (int k = 0; k < K; ++k) {
      for (int32_t w = 0; w < V_; ++w)
        ll += std::lgamma(state_.n_wk[static_cast<size_t>(w) * K + k] + b);
      ll -= std::lgamma(state_.n_k[k] + V_ * b);
    }
    ll += static_cast<double>(docs.size()) * (std::lgamma(K * a) - K * std::lgamma(a));
    for (size_t d = 0; d < docs.size(); ++d) {
      for (int k = 0; k < K; ++k) ll += std::lgamma(state_.n_dk[d * K + k] + a);
      ll -= std::lgamma(static_cast<double>(docs[d].size()) + K * a);
    }
    return ll;
  }

  void fit_once(const std::vector<std::vector<int32_t>>& docs, int32_t vocabulary, uint64_t seed) {
    const int K = opt_.topics;
    V_ = vocabulary;
    state_.n_dk.assign(docs.size() * K, 0);
    state_.n_wk.assign(static_cast<size_t>(V_) * K, 0);
    state_.n_k.assign(K, 0);
    state_.z.assign(docs.size(), {});
    Xoshiro256 rng(seed);
    for (size_t d = 0; d < docs.size(); ++d) {
      state_.z[d].resize(docs[d].size());
      for (size_t i = 0; i < docs[d].size(); ++i) {
        const int32_t w = docs[d][i];
        TESSERA_CHECK(w >= 0 && w < V_, "clean::Lda::fit: document ", d, " token ", i, " has id ",
                      w, ", expected [0, ", V_, ")");
        const int k = static_cast<int>(rng.next() % static_cast<uint64_t>(K));
        state_.z[d][i] = k;
        ++state_.n_dk[d * K + k];
        ++state_.n_wk[static_cast<size_t>(w) * K + k];
        ++state_.n_k[k];
      }
    }
    std::vector<double> p(K);
    const double vbeta = V_ * opt_.beta;
    for (int it = 0; it < opt_.iterations; ++it) {
      for (size_t d = 0; d < docs.size(); ++d) {
        int32_t* ndk = state_.n_dk.data() + d * K;
        for (size_t i = 0; i < docs[d].size(); ++i) {
          const int32_t w = docs[d][i];
          int k = state_.z[d][i];
          --ndk[k];
          --state_.n_wk[static_cast<size_t>(w) * K + k];
          --state_.n_k[k];
          double total = 0;
          for (int t = 0; t < K; ++t) {
            total += (ndk[t] + opt_.alpha) *
                     (state_.n_wk[static_cast<size_t>(w) * K + t] + opt_.beta) /
                     (state_.n_k[t] + vbeta);
            p[t] = total;
          }
          const double u = rng.uniform() * total;
          k = static_cast<int>(std::upper_bound(p.begin(), p.end(), u) - p.begin());
          if (k >= K) k = K - 1;  // u == total only through rounding
          state_.z[d][i] = k;
          ++ndk[k];
          ++state_.n_wk[static_cast<size_t>(w) * K + k];
          ++state_.n_k[k];
        }
      }
    }
  }

 public:
  int topics() const { return opt_.topics; }
  int32_t vocabulary() const { return V_; }

  // argmax_k n_dk (lowest k on ties); -1 for a document without tokens.
  int domain(size_t d) const {
    const int K = opt_.topics;
    const int32_t* ndk = state_.n_dk.data() + d * K;
    if (std::accumulate(ndk, ndk + K, 0) == 0) return -1;
    return static_cast<int>(std::max_element(ndk, ndk + K) - ndk);
  }

  // Topic-word distribution phi_k(w) = (n_kw + beta) / (n_k + V beta).
  double phi(int k, int32_t w) const {
    return (state_.n_wk[static_cast<size_t>(w) * opt_.topics + k] + opt_.beta) /
           (state_.n_k[k] + V_ * opt_.beta);
  }

  std::vector<int32_t> top_words(int k, int n) const {
    std::vector<int32_t> ids(static_cast<size_t>(V_));
    std::iota(ids.begin(), ids.end(), 0);
    const int K = opt_.topics;
    auto count = [&](int32_t w) { return state_.n_wk[static_cast<size_t>(w) * K + k]; };
    const int m = std::min<int>(n, V_);
    std::partial_sort(ids.begin(), ids.begin() + m, ids.end(), [&](int32_t a, int32_t b) {
      return count(a) != count(b) ? count(a) > count(b) : a < b;
    });
    ids.resize(static_cast<size_t>(m));
    return ids;
  }

  int64_t topic_tokens(int k) const { return state_.n_k[k]; }

 private:
  // The sampler's counts; a struct so the best restart can be kept by moving it.
  struct State {
    std::vector<int32_t> n_dk, n_wk, n_k;  // (docs, K), (V, K) word-major for the sampler, (K)
    std::vector<std::vector<int>> z;
  };
  LdaOptions opt_;
  int32_t V_ = 0;
  State state_;
  double log_likelihood_ = 0;
};

struct BalanceOptions {
  bool enabled = true;
  std::vector<double> target_mix;  // one weight per domain; empty: uniform over non-empty domains
  int64_t total = 0;               // documents wanted; 0: the most possible without repeats
  uint64_t seed = 7;
};

// Returns keep flags for documents whose domains are `domains` (-1: no domain, never kept
// when balancing). `quota_out`, when given, receives the per-domain quotas.
inline std::vector<char> balance_select(const std::vector<int>& domains, int topics,
                                        const BalanceOptions& opt,
                                        std::vector<int64_t>* quota_out = nullptr) {
  std::vector<int64_t> have(topics, 0);
  for (int d : domains) {
    TESSERA_CHECK(d >= -1 && d < topics, "clean::balance_select: domain ", d, " outside [-1, ",
                  topics, ")");
    if (d >= 0) ++have[d];
  }
  std::vector<double> mix = opt.target_mix;
  if (mix.empty()) {
    mix.assign(topics, 0.0);
    for (int k = 0; k < topics; ++k) mix[k] = have[k] > 0 ? 1.0 : 0.0;
  }
  TESSERA_CHECK(static_cast<int>(mix.size()) == topics, "clean::balance_select: target_mix has ",
                mix.size(), " weights, expected one per domain (", topics, ")");
  double sum = 0;
  for (double w : mix) {
    TESSERA_CHECK(w >= 0, "clean::balance_select: target_mix weights must be >= 0, got ", w);
    sum += w;
  }
  TESSERA_CHECK(sum > 0, "clean::balance_select: target_mix sums to 0");
  for (auto& w : mix) w /= sum;
  // The largest total the mix allows without taking any document twice.
  double n_max = INFINITY;
  for (int k = 0; k < topics; ++k)
    if (mix[k] > 0) n_max = std::min(n_max, static_cast<double>(have[k]) / mix[k]);
  const double n = opt.total > 0 ? static_cast<double>(opt.total) : n_max;
  std::vector<int64_t> quota(topics);
  for (int k = 0; k < topics; ++k)
    quota[k] = std::min<int64_t>(have[k], static_cast<int64_t>(std::floor(mix[k] * n + 1e-9)));
  // Rank each domain's documents by a seeded hash of their index; take the first quota.
  std::vector<std::vector<std::pair<uint64_t, size_t>>> ranked(topics);
  for (size_t i = 0; i < domains.size(); ++i) {
    if (domains[i] < 0) continue;
    uint64_t s = opt.seed ^ (i * 0x9E3779B97F4A7C15ull);
    ranked[domains[i]].push_back({splitmix64(s), i});
  }
  std::vector<char> keep(domains.size(), 0);
  for (int k = 0; k < topics; ++k) {
    auto& r = ranked[k];
    std::sort(r.begin(), r.end());
    for (int64_t j = 0; j < quota[k]; ++j) keep[r[j].second] = 1;
  }
  if (quota_out) *quota_out = quota;
  return keep;
}

// The corpus stage: observe every document, fit LDA, then label (and balance) them.
class LdaDomains final : public Stage {
 public:
  explicit LdaDomains(LdaOptions lda = {}, BalanceOptions balance = {.enabled = false})
      : lda_opt_(lda), balance_(std::move(balance)), lda_(lda) {
    report_.stage = name();
  }
  std::string name() const override { return balance_.enabled ? "lda_balance" : "lda"; }
  bool needs_corpus() const override { return true; }

  void observe(const Document& doc) override {
    std::vector<int32_t> ids;
    std::unordered_map<int32_t, char> seen;
    for (auto& t : lda_tokens(doc.text, true, lda_opt_.han_bigrams)) {
      auto [it, added] = vocab_.try_emplace(t, static_cast<int32_t>(words_.size()));
      if (added) {
        words_.push_back(t);
        df_.push_back(0);
      }
      if (seen.emplace(it->second, 1).second) ++df_[it->second];
      ids.push_back(it->second);
    }
    raw_.push_back(std::move(ids));
  }

  void fit() override {
    // Prune by document frequency, then renumber the surviving words densely.
    const auto n_docs = static_cast<double>(raw_.size());
    std::vector<int32_t> remap(words_.size(), -1);
    std::vector<std::string> kept_words;
    for (size_t w = 0; w < words_.size(); ++w) {
      if (df_[w] >= lda_opt_.min_doc_freq && df_[w] <= lda_opt_.max_doc_fraction * n_docs) {
        remap[w] = static_cast<int32_t>(kept_words.size());
        kept_words.push_back(words_[w]);
      }
    }
    report_.count("vocabulary_pruned", static_cast<int64_t>(words_.size() - kept_words.size()));
    for (auto& doc : raw_) {
      std::vector<int32_t> ids;
      for (int32_t w : doc)
        if (remap[w] >= 0) ids.push_back(remap[w]);
      doc.swap(ids);
    }
    words_.swap(kept_words);
    vocab_.clear();
    df_.clear();
    if (!words_.empty()) lda_.fit(raw_, static_cast<int32_t>(words_.size()));
    domains_.resize(raw_.size());
    for (size_t d = 0; d < raw_.size(); ++d) domains_[d] = words_.empty() ? -1 : lda_.domain(d);
    if (balance_.enabled) keep_ = balance_select(domains_, lda_opt_.topics, balance_, &quota_);
  }

  bool process(Document& doc) override {
    TESSERA_CHECK(next_ < domains_.size(), "clean::LdaDomains: process() saw more documents (",
                  next_ + 1, ") than observe() (", domains_.size(), ")");
    const size_t d = next_++;
    doc.domain = domains_[d];
    if (doc.domain < 0) {
      report_.count("docs_without_topic_words");
      if (balance_.enabled) return false;
    }
    if (balance_.enabled && !keep_[d]) {
      report_.count("docs_dropped_by_balance");
      return false;
    }
    return true;
  }

  void finish() override {
    report_.notes.clear();
    if (words_.empty()) return;
    std::vector<int64_t> docs_per_topic(lda_opt_.topics, 0);
    for (int d : domains_)
      if (d >= 0) ++docs_per_topic[d];
    char buf[128];
    std::snprintf(buf, sizeof buf,
                  "LDA: K=%d alpha=%g beta=%g iterations=%d seed=%llu vocabulary=%zu documents=%zu",
                  lda_opt_.topics, lda_opt_.alpha, lda_opt_.beta, lda_opt_.iterations,
                  static_cast<unsigned long long>(lda_opt_.seed), words_.size(), raw_.size());
    report_.notes.push_back(buf);
    for (int k = 0; k < lda_opt_.topics; ++k) {
      std::string line =
          "topic " + std::to_string(k) + " (" + std::to_string(docs_per_topic[k]) + " docs";
      if (balance_.enabled) line += ", kept " + std::to_string(quota_[k]);
      line += "):";
      for (int32_t w : lda_.top_words(k, 10)) line += " " + words_[w];
      report_.notes.push_back(line);
    }
  }

  const std::vector<int>& domains() const { return domains_; }
  const Lda& model() const { return lda_; }
  const std::vector<std::string>& vocabulary() const { return words_; }

 private:
  LdaOptions lda_opt_;
  BalanceOptions balance_;
  Lda lda_;
  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> words_;
  std::vector<int64_t> df_;
  std::vector<std::vector<int32_t>> raw_;
  std::vector<int> domains_;
  std::vector<char> keep_;
  std::vector<int64_t> quota_;
  size_t next_ = 0;
};

}  // namespace tessera::data::clean

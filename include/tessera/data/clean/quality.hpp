// tessera/data/clean/quality.hpp — stage 4: rule-based quality scoring with a threshold.
//
// The signals follow the Gopher rules (Rae et al. 2021, appendix A) because they are cheap,
// explainable and language-light: document length, mean word length, fraction of
// duplicated lines, fraction of characters in the most frequent 2/3/4-gram, fraction of
// characters in duplicated 5-grams, symbol and digit ratios, fraction of words with a
// letter, and the stop-word count. Chinese has no spaces, so its "words" are single Han
// characters (text.hpp: word_units) and its stop words are function characters (的 了 是
// 之 乎 者 也 ...); a document is scored by the Chinese stop list when most of its letters
// are Han.
//
// Score = fraction of rules passed, in [0, 1]; a document is kept when
// score >= threshold. Each failing rule is counted by name in the report.
//
// Extension point for the learned classifier (DESIGN: "quality scoring with an encoder
// classifier"): QualityOptions::learned is a callable returning a probability in [0, 1];
// when set, the score becomes (1 - learned_weight) * rule_score + learned_weight * p.
// It is empty by default; data/clean/quality_model.hpp provides the learned model (a frozen
// BERT encoder from models/bert.hpp plus a trained head) and a stage that folds it in.
#pragma once

#include <algorithm>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/data/clean/text.hpp"

namespace tessera::data::clean {

struct QualitySignals {
  int64_t chars = 0;                         // code points, whitespace excluded
  int64_t words = 0;                         // word units (Latin words, single Han characters)
  double mean_word_length = 0;               // over non-Han words, in code points
  double han_ratio = 0;                      // Han letters / letters
  double duplicate_line_fraction = 0;        // characters in lines that repeat an earlier line
  double top_ngram_fraction[3] = {0, 0, 0};  // n = 2, 3, 4: chars in the most frequent n-gram
  double duplicate_5gram_fraction = 0;       // chars in 5-grams that occur more than once
  double symbol_ratio = 0;         // symbol + punctuation code points / non-space code points
  double digit_ratio = 0;          // digits / non-space code points
  double alpha_word_fraction = 0;  // words containing at least one letter
  int64_t stop_words = 0;          // words in the language's stop list
};

inline const std::unordered_set<std::string_view>& english_stop_words() {
  // Gopher's list (the, be, to, of, and, that, have, with) extended with the commonest
  // English function words.
  static const std::unordered_set<std::string_view> kWords = {
      "the",  "be",   "to",    "of",   "and",  "that",  "have",  "with", "a",    "an",
      "in",   "is",   "it",    "for",  "on",   "as",    "are",   "was",  "were", "i",
      "you",  "he",   "she",   "we",   "they", "this",  "not",   "but",  "or",   "at",
      "by",   "from", "his",   "her",  "my",   "your",  "their", "its",  "will", "shall",
      "all",  "so",   "if",    "no",   "do",   "unto",  "thou",  "thee", "thy",  "him",
      "them", "me",   "there", "when", "what", "which", "who"};
  return kWords;
}

inline const std::unordered_set<std::string_view>& chinese_stop_chars() {
  // Modern function characters and the classical particles (之乎者也矣焉哉), so Tang poems
  // and Debian documentation are judged by the same rule.
  static const std::unordered_set<std::string_view> kChars = {
      "的", "了", "是", "在", "不", "有", "和", "也", "就", "都", "而", "及", "与",
      "着", "或", "一", "个", "我", "你", "他", "她", "它", "们", "这", "那", "之",
      "其", "以", "为", "于", "所", "把", "被", "从", "对", "向", "到", "说", "要",
      "会", "能", "可", "很", "又", "还", "呢", "吗", "吧", "啊", "乎", "者", "矣",
      "焉", "哉", "兮", "何", "无", "人", "如", "此", "自", "上", "中", "来"};
  return kChars;
}

inline QualitySignals compute_quality_signals(std::string_view text) {
  QualitySignals s;
  int64_t non_space = 0, symbols = 0, digits = 0, han = 0, letters = 0;
  for (size_t i = 0; i < text.size();) {
    const char32_t c = decode_utf8(text, i);
    if (c == kInvalidCodepoint) continue;
    const CharClass k = char_class(c);
    if (k == CharClass::kSpace) continue;
    ++non_space;
    if (k == CharClass::kPunct || k == CharClass::kSymbol) ++symbols;
    if (k == CharClass::kDigit) ++digits;
    if (k == CharClass::kLetter) {
      ++letters;
      han += is_han(c);
    }
  }
  s.chars = non_space;
  if (non_space > 0) {
    s.symbol_ratio = static_cast<double>(symbols) / static_cast<double>(non_space);
    s.digit_ratio = static_cast<double>(digits) / static_cast<double>(non_space);
  }
  s.han_ratio = letters > 0 ? static_cast<double>(han) / static_cast<double>(letters) : 0.0;

  // Duplicate lines, weighted by characters (Gopher: "duplicate line character fraction").
  {
    std::unordered_set<std::string_view> seen;
    size_t dup = 0, total = 0;
    size_t start = 0;
    while (start <= text.size()) {
      size_t end = text.find('\n', start);
      if (end == std::string_view::npos) end = text.size();
      const std::string_view line = text.substr(start, end - start);
      if (!line.empty()) {
        total += line.size();
        if (!seen.insert(line).second) dup += line.size();
      }
      start = end + 1;
    }
    s.duplicate_line_fraction =
        total > 0 ? static_cast<double>(dup) / static_cast<double>(total) : 0.0;
  }

  const std::vector<std::string_view> words = word_units(text);
  s.words = static_cast<int64_t>(words.size());
  if (words.empty()) return s;
  size_t word_chars = 0, latin_words = 0, latin_chars = 0, alpha_words = 0;
  const bool chinese = s.han_ratio >= 0.5;
  std::string lower;
  for (auto w : words) {
    const std::u32string cps = to_codepoints(w);
    word_chars += cps.size();
    const bool is_han_word = cps.size() == 1 && is_han(cps[0]);
    if (!is_han_word) {
      ++latin_words;
      latin_chars += cps.size();
    }
    alpha_words += std::any_of(cps.begin(), cps.end(),
                               [](char32_t c) { return char_class(c) == CharClass::kLetter; });
    if (chinese) {
      s.stop_words += is_han_word && chinese_stop_chars().count(w);
    } else {
      lower.assign(w);
      std::transform(lower.begin(), lower.end(), lower.begin(), [](char ch) {
        return (ch >= 'A' && ch <= 'Z') ? static_cast<char>(ch - 'A' + 'a') : ch;
      });
      s.stop_words += english_stop_words().count(lower);
    }
  }
  s.mean_word_length =
      latin_words > 0 ? static_cast<double>(latin_chars) / static_cast<double>(latin_words) : 0.0;
  s.alpha_word_fraction = static_cast<double>(alpha_words) / static_cast<double>(words.size());

  // n-gram repetition over word units; an n-gram's "characters" are its words' code points.
  std::vector<size_t> lens(words.size());
  for (size_t i = 0; i < words.size(); ++i) lens[i] = to_codepoints(words[i]).size();
  auto ngram_key = [&](size_t i, size_t n) {
    std::string key;
    for (size_t k = 0; k < n; ++k) {
      key.append(words[i + k]);
      key += '\x1f';
    }
    return key;
  };
  for (size_t n = 2; n <= 4; ++n) {
    if (words.size() < n) break;
    std::unordered_map<std::string, std::pair<size_t, size_t>> counts;  // key -> (count, chars)
    for (size_t i = 0; i + n <= words.size(); ++i) {
      auto& c = counts[ngram_key(i, n)];
      ++c.first;
      if (c.second == 0)
        for (size_t k = 0; k < n; ++k) c.second += lens[i + k];
    }
    size_t best = 0;
    for (const auto& [key, c] : counts)
      if (c.first > 1) best = std::max(best, c.first * c.second);
    s.top_ngram_fraction[n - 2] =
        std::min(1.0, static_cast<double>(best) / static_cast<double>(word_chars));
  }
  if (words.size() >= 5) {
    std::unordered_map<std::string, int> counts;
    for (size_t i = 0; i + 5 <= words.size(); ++i) ++counts[ngram_key(i, 5)];
    std::vector<char> covered(words.size(), 0);
    for (size_t i = 0; i + 5 <= words.size(); ++i)
      if (counts[ngram_key(i, 5)] > 1) std::fill(covered.begin() + i, covered.begin() + i + 5, 1);
    size_t dup = 0;
    for (size_t i = 0; i < words.size(); ++i) dup += covered[i] ? lens[i] : 0;
    s.duplicate_5gram_fraction = static_cast<double>(dup) / static_cast<double>(word_chars);
  }
  return s;
}

// Thresholds of the rules. Defaults are Gopher's where the corpora here allow (its minimum
// of 50 words would remove every Tang poem and most fortunes; it is a parameter).
struct QualityRules {
  int64_t min_words = 8, max_words = 100000;
  double min_mean_word_length = 2.0, max_mean_word_length = 10.0;  // Latin words only
  // Repetition fractions of a short text are dominated by chance (a 13-character proverb
  // that says 莫遮 twice has a 2-gram fraction of 0.3), so the n-gram rules apply only
  // from this many words on. Gopher applies its rules to documents of 50+ words.
  int64_t min_words_for_ngram_rules = 50;
  double max_duplicate_line_fraction = 0.2;
  double max_top_ngram_fraction[3] = {0.20, 0.18, 0.16};  // Gopher: 2-, 3-, 4-grams
  double max_duplicate_5gram_fraction = 0.15;
  double max_symbol_ratio = 0.25;
  double max_digit_ratio = 0.25;
  double min_alpha_word_fraction = 0.8;
  int64_t min_stop_words = 2;     // English (Gopher)
  int64_t min_stop_chars_zh = 1;  // Chinese
};

// The learned classifier's extension point: a probability that the text is good.
using LearnedQualityScorer = std::function<double(std::string_view text)>;

struct QualityOptions {
  QualityRules rules;
  double threshold = 0.85;       // keep when score >= threshold
  LearnedQualityScorer learned;  // empty until the Encoder-based classifier exists
  double learned_weight = 0.5;
};

struct QualityVerdict {
  double score = 0;
  std::vector<std::string> failed;  // names of failed rules
};

inline QualityVerdict score_quality(const QualitySignals& s, const QualityRules& r) {
  QualityVerdict v;
  int total = 0;
  auto rule = [&](bool ok, const char* name) {
    ++total;
    if (!ok) v.failed.emplace_back(name);
  };
  rule(s.words >= r.min_words && s.words <= r.max_words, "length");
  const bool chinese = s.han_ratio >= 0.5;
  if (!chinese)
    rule(s.mean_word_length >= r.min_mean_word_length &&
             s.mean_word_length <= r.max_mean_word_length,
         "mean_word_length");
  rule(s.duplicate_line_fraction <= r.max_duplicate_line_fraction, "duplicate_lines");
  const bool ngrams = s.words >= r.min_words_for_ngram_rules;
  rule(!ngrams || (s.top_ngram_fraction[0] <= r.max_top_ngram_fraction[0] &&
                   s.top_ngram_fraction[1] <= r.max_top_ngram_fraction[1] &&
                   s.top_ngram_fraction[2] <= r.max_top_ngram_fraction[2]),
       "top_ngram_repetition");
  rule(!ngrams || s.duplicate_5gram_fraction <= r.max_duplicate_5gram_fraction, "duplicate_5grams");
  rule(s.symbol_ratio <= r.max_symbol_ratio, "symbol_ratio");
  rule(s.digit_ratio <= r.max_digit_ratio, "digit_ratio");
  rule(s.alpha_word_fraction >= r.min_alpha_word_fraction, "alpha_words");
  rule(s.stop_words >= (chinese ? r.min_stop_chars_zh : r.min_stop_words),
       chinese ? "stop_chars_zh" : "stop_words");
  v.score = static_cast<double>(total - static_cast<int>(v.failed.size())) / total;
  return v;
}

class QualityFilter final : public Stage {
 public:
  explicit QualityFilter(QualityOptions options = {}) : opt_(std::move(options)) {
    report_.stage = name();
    TESSERA_CHECK(opt_.threshold >= 0.0 && opt_.threshold <= 1.0,
                  "clean::QualityFilter: threshold must be in [0, 1], got ", opt_.threshold);
    TESSERA_CHECK(opt_.learned_weight >= 0.0 && opt_.learned_weight <= 1.0,
                  "clean::QualityFilter: learned_weight must be in [0, 1], got ",
                  opt_.learned_weight);
  }
  std::string name() const override { return "quality"; }

  bool process(Document& doc) override {
    const QualityVerdict v = score_quality(compute_quality_signals(doc.text), opt_.rules);
    double score = v.score;
    if (opt_.learned) {
      const double p = opt_.learned(doc.text);
      TESSERA_CHECK(p >= 0.0 && p <= 1.0, "clean::QualityFilter: learned scorer returned ", p,
                    ", expected [0, 1]");
      score = (1.0 - opt_.learned_weight) * score + opt_.learned_weight * p;
    }
    doc.quality = score;
    const bool keep = score >= opt_.threshold;
    for (const auto& f : v.failed) ++(keep ? failed_kept_ : failed_dropped_)[f];
    if (!keep) report_.count("docs_below_threshold");
    return keep;
  }

  void finish() override {
    report_.notes.clear();
    std::string a = "rule failures in dropped documents:",
                b = "rule failures tolerated in kept documents:";
    for (const auto& [rule, n] : failed_dropped_) a += " " + rule + "=" + std::to_string(n);
    for (const auto& [rule, n] : failed_kept_) b += " " + rule + "=" + std::to_string(n);
    report_.notes = {a, b};
  }

 private:
  QualityOptions opt_;
  std::map<std::string, int64_t> failed_dropped_, failed_kept_;
};

}  // namespace tessera::data::clean

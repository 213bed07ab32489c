// tessera/data/tokenizer_pretokenizer.hpp — the split rules real byte-level BPE models use.
//
// Why hand-written scanners instead of a regex engine: the Hugging Face tokenizer.json files
// of GPT-2 and DeepSeek-V3 split text with Oniguruma regexes that use \p{..} classes and
// negative lookahead, which std::regex cannot express, and a general engine would be the
// slowest part of encoding. Each supported regex is recognised by its exact text and replaced
// by a scanner that implements Oniguruma's semantics for it (leftmost match, alternatives
// tried in order, greedy quantifiers with backtracking). A regex we do not know is an error,
// never a silent mis-split. Pieces are byte ranges of the input, so nothing is copied.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/data/tokenizer_unicode.hpp"

namespace tessera::data {

// A split rule: one supported regex, applied with the "Isolated" behaviour (each match is a
// piece, and so is each run of text between matches).
enum class SplitRule : std::uint8_t {
  kGpt2,          // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kDigits1To3,    // \p{N}{1,3}
  kCjkKanaRuns,   // [\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+
  kDeepSeekWords,  // DeepSeek-V3's GPT-4-style pattern (see kDeepSeekWordsPattern)
  kDigitEach       // \p{N}: each digit alone (Hugging Face's Digits(individual_digits=true),
                   // SmolLM2's and StarCoder's first step; GGUF's pre-tokenizer "smollm")
};

inline constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kDigits1To3Pattern = R"(\p{N}{1,3})";
inline constexpr std::string_view kCjkKanaRunsPattern =
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+";
inline constexpr std::string_view kDigitEachPattern = R"(\p{N})";
inline constexpr std::string_view kDeepSeekWordsPattern =
    "[!\"#$%&'()*+,\\-./"
    ":;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";

inline std::string_view split_rule_pattern(SplitRule r) {
  switch (r) {
    case SplitRule::kGpt2:
      return kGpt2Pattern;
    case SplitRule::kDigits1To3:
      return kDigits1To3Pattern;
    case SplitRule::kCjkKanaRuns:
      return kCjkKanaRunsPattern;
    case SplitRule::kDeepSeekWords:
      return kDeepSeekWordsPattern;
    case SplitRule::kDigitEach:
      return kDigitEachPattern;
  }
  return {};
}

// Maps a regex from a tokenizer.json to its scanner; throws for anything else.
inline SplitRule split_rule_from_pattern(std::string_view pattern) {
  for (SplitRule r : {SplitRule::kGpt2, SplitRule::kDigits1To3, SplitRule::kCjkKanaRuns,
                      SplitRule::kDeepSeekWords, SplitRule::kDigitEach}) {
    if (split_rule_pattern(r) == pattern) return r;
  }
  fail("tokenizer pre_tokenizer: unsupported split regex \"", pattern,
       "\"; tessera implements exactly these: GPT-2's, \\p{N}{1,3}, \\p{N}, the DeepSeek-V3 "
       "CJK/kana run and the DeepSeek-V3 GPT-4-style pattern (docs/tokenizer.md)");
}

namespace detail {

// Leftmost-first matchers: return the end of the match starting at byte i of s[0, e), or i
// when no alternative matches there. `s` is the piece being split, so e == s.size() and the
// end of the piece is the end of the subject string, as in Hugging Face's Split.
struct Scan {
  std::string_view s;
  std::size_t e;

  Utf8Char at(std::size_t i) const { return utf8_at(s, i); }
  std::uint8_t cls(std::size_t i) const { return unicode_class(at(i).cp); }

  template <class Pred>
  std::size_t run(std::size_t i, Pred pred) const {  // end of the run of chars satisfying pred
    while (i < e) {
      const Utf8Char c = at(i);
      if (!pred(c.cp, unicode_class(c.cp))) break;
      i += c.len;
    }
    return i;
  }

  // \s+(?!\S)|\s+ from a white-space char at i: all of the run when it ends the subject,
  // otherwise all but its last char (so the next word keeps its leading space), or the single
  // char when the run is one char long.
  std::size_t space_tail(std::size_t i) const {
    std::size_t j = i, last = i;
    while (j < e) {
      const Utf8Char c = at(j);
      if (!is_space(unicode_class(c.cp))) break;
      last = j;
      j += c.len;
    }
    if (j == e) return j;
    return last > i ? last : j;
  }

  std::size_t gpt2(std::size_t i) const {
    const Utf8Char c0 = at(i);
    if (c0.cp == '\'' && i + 1 < e) {
      const char a = s[i + 1];
      if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
      if (i + 2 < e) {
        const char b = s[i + 2];
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
          return i + 3;
      }
    }
    std::size_t start = i;
    std::uint8_t k = unicode_class(c0.cp);
    if (c0.cp == ' ' && i + 1 < e) {  // " ?" prefers taking the space
      const std::uint8_t k1 = cls(i + 1);
      if (!is_space(k1)) {
        start = i + 1;
        k = k1;
      }
    }
    if (is_letter(k)) return run(start, [](char32_t, std::uint8_t c) { return is_letter(c); });
    if (is_number(k)) return run(start, [](char32_t, std::uint8_t c) { return is_number(c); });
    if (!is_space(k)) {
      return run(start, [](char32_t, std::uint8_t c) {
        return !is_space(c) && !is_letter(c) && !is_number(c);
      });
    }
    return space_tail(i);
  }

  std::size_t digit(std::size_t i) const {
    const Utf8Char c = at(i);
    return is_number(unicode_class(c.cp)) ? i + c.len : i;
  }

  std::size_t digits(std::size_t i) const {
    std::size_t j = i;
    for (int n = 0; n < 3 && j < e; ++n) {
      const Utf8Char c = at(j);
      if (!is_number(unicode_class(c.cp))) break;
      j += c.len;
    }
    return j;
  }

  static bool cjk_kana(char32_t cp) {
    return (cp >= 0x4E00 && cp <= 0x9FA5) || (cp >= 0x3040 && cp <= 0x30FF);
  }
  std::size_t cjk(std::size_t i) const {
    return run(i, [](char32_t cp, std::uint8_t) { return cjk_kana(cp); });
  }

  static bool ascii_punct(char32_t cp) {
    return cp < 0x80 && ((cp >= '!' && cp <= '/') || (cp >= ':' && cp <= '@') ||
                         (cp >= '[' && cp <= '`') || (cp >= '{' && cp <= '~'));
  }
  static bool ascii_alpha(char32_t cp) {
    return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z');
  }

  std::size_t deepseek(std::size_t i) const {
    const Utf8Char c0 = at(i);
    const std::uint8_t k0 = unicode_class(c0.cp);
    const std::size_t i1 = i + c0.len;
    auto letter_or_mark = [](char32_t, std::uint8_t c) { return is_letter(c) || is_mark(c); };
    // [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+
    if (ascii_punct(c0.cp) && i1 < e && ascii_alpha(static_cast<unsigned char>(s[i1]))) {
      return run(i1, [](char32_t cp, std::uint8_t) { return ascii_alpha(cp); });
    }
    // [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
    if (c0.cp != '\r' && c0.cp != '\n' && !is_letter(k0) && !is_punct_or_symbol(k0) && i1 < e) {
      const std::size_t j = run(i1, letter_or_mark);
      if (j > i1) return j;
    }
    if (is_letter(k0) || is_mark(k0)) return run(i, letter_or_mark);
    // " ?[\p{P}\p{S}]+[\r\n]*"
    std::size_t p = i;
    if (c0.cp == ' ' && i1 < e && is_punct_or_symbol(cls(i1))) p = i1;
    if (is_punct_or_symbol(cls(p))) {
      const std::size_t j = run(p, [](char32_t, std::uint8_t c) { return is_punct_or_symbol(c); });
      return run(j, [](char32_t cp, std::uint8_t) { return cp == '\r' || cp == '\n'; });
    }
    if (!is_space(k0)) return i;  // no alternative matches: part of a gap
    // \s*[\r\n]+ : up to and including the last \r or \n of the white-space run.
    std::size_t j = i, end_nl = i;
    while (j < e) {
      const Utf8Char c = at(j);
      if (!is_space(unicode_class(c.cp))) break;
      if (c.cp == '\r' || c.cp == '\n') end_nl = j + 1;
      j += c.len;
    }
    if (end_nl > i) return end_nl;
    return space_tail(i);
  }

  std::size_t match(SplitRule r, std::size_t i) const {
    switch (r) {
      case SplitRule::kGpt2:
        return gpt2(i);
      case SplitRule::kDigits1To3:
        return digits(i);
      case SplitRule::kCjkKanaRuns:
        return cjk(i);
      case SplitRule::kDeepSeekWords:
        return deepseek(i);
      case SplitRule::kDigitEach:
        return digit(i);
    }
    return i;
  }
};

}  // namespace detail

// The pre-tokeniser of a byte-level BPE model: a sequence of isolated splits, each applied to
// every piece the previous one produced (Hugging Face's Sequence semantics).
class PreTokenizer {
 public:
  PreTokenizer() = default;
  explicit PreTokenizer(std::vector<SplitRule> rules) : rules_(std::move(rules)) {}

  static PreTokenizer gpt2() { return PreTokenizer({SplitRule::kGpt2}); }
  static PreTokenizer deepseek_v3() {
    return PreTokenizer(
        {SplitRule::kDigits1To3, SplitRule::kCjkKanaRuns, SplitRule::kDeepSeekWords});
  }

  const std::vector<SplitRule>& rules() const { return rules_; }

  // Calls emit(offset, length) for each piece of text, in order; the pieces tile the text.
  template <class Emit>
  void split(std::string_view text, Emit&& emit) const {
    if (text.empty()) return;
    split_from(0, text, 0, emit);
  }

  std::vector<std::string_view> split(std::string_view text) const {
    std::vector<std::string_view> out;
    split(text, [&](std::size_t off, std::size_t len) { out.push_back(text.substr(off, len)); });
    return out;
  }

  // Reads a Hugging Face pre_tokenizer object. Supported: ByteLevel (add_prefix_space false;
  // use_regex true means the GPT-2 rule), Split with a supported Regex and behaviour
  // "Isolated", and Sequence of those. ByteLevel must be the last step (it maps bytes to
  // characters, which tessera does implicitly by working on bytes).
  static PreTokenizer from_json(const nlohmann::json& j) {
    PreTokenizer p;
    if (j.is_null()) return p;
    bool byte_level_seen = false;
    p.add_json(j, byte_level_seen);
    TESSERA_CHECK(byte_level_seen,
                  "tokenizer pre_tokenizer: no ByteLevel step; tessera reads "
                  "byte-level BPE tokenizers only");
    return p;
  }

  nlohmann::json to_json() const {
    // GPT-2's rule is spelled as ByteLevel's own regex when it is the last step.
    const bool gpt2_last = !rules_.empty() && rules_.back() == SplitRule::kGpt2;
    const std::size_t n_split = rules_.size() - (gpt2_last ? 1 : 0);
    nlohmann::json steps = nlohmann::json::array();
    for (std::size_t k = 0; k < n_split; ++k) {
      if (rules_[k] == SplitRule::kDigitEach) {
        steps.push_back({{"type", "Digits"}, {"individual_digits", true}});
        continue;
      }
      steps.push_back({{"type", "Split"},
                       {"pattern", {{"Regex", std::string(split_rule_pattern(rules_[k]))}}},
                       {"behavior", "Isolated"},
                       {"invert", false}});
    }
    steps.push_back({{"type", "ByteLevel"},
                     {"add_prefix_space", false},
                     {"trim_offsets", true},
                     {"use_regex", gpt2_last}});
    if (steps.size() == 1) return steps[0];
    return {{"type", "Sequence"}, {"pretokenizers", steps}};
  }

 private:
  void add_json(const nlohmann::json& j, bool& byte_level_seen) {
    const std::string type = j.value("type", "");
    TESSERA_CHECK(!byte_level_seen, "tokenizer pre_tokenizer: a ", type,
                  " step after ByteLevel is not supported");
    if (type == "Sequence") {
      for (const auto& step : j.at("pretokenizers")) add_json(step, byte_level_seen);
    } else if (type == "ByteLevel") {
      TESSERA_CHECK(
          !j.value("add_prefix_space", false),
          "tokenizer pre_tokenizer: ByteLevel with add_prefix_space=true is not supported");
      if (j.value("use_regex", true)) rules_.push_back(SplitRule::kGpt2);
      byte_level_seen = true;
    } else if (type == "Digits") {
      // Hugging Face splits on char::is_numeric (categories Nd, Nl, No): \p{N}.
      TESSERA_CHECK(j.value("individual_digits", false),
                    "tokenizer pre_tokenizer: Digits with individual_digits=false is not "
                    "supported");
      rules_.push_back(SplitRule::kDigitEach);
    } else if (type == "Split") {
      const auto& pat = j.at("pattern");
      TESSERA_CHECK(pat.contains("Regex"), "tokenizer pre_tokenizer: Split with pattern ",
                    pat.dump(), " is not supported (only Regex patterns are)");
      const std::string behavior = j.value("behavior", "");
      TESSERA_CHECK(behavior == "Isolated", "tokenizer pre_tokenizer: Split behaviour \"", behavior,
                    "\" is not supported (only \"Isolated\" is)");
      TESSERA_CHECK(!j.value("invert", false),
                    "tokenizer pre_tokenizer: inverted Split is not supported");
      rules_.push_back(split_rule_from_pattern(pat.at("Regex").get<std::string>()));
    } else {
      fail("tokenizer pre_tokenizer: step type \"", type,
           "\" is not supported (supported: "
           "Sequence, Split, Digits, ByteLevel)");
    }
  }

  template <class Emit>
  void split_from(std::size_t step, std::string_view text, std::size_t base, Emit& emit) const {
    if (step == rules_.size()) {
      emit(base, text.size());
      return;
    }
    const SplitRule rule = rules_[step];
    const detail::Scan sc{text, text.size()};
    std::size_t gap = 0, i = 0;
    while (i < text.size()) {
      const std::size_t end = sc.match(rule, i);
      if (end > i) {
        if (gap < i) split_from(step + 1, text.substr(gap, i - gap), base + gap, emit);
        split_from(step + 1, text.substr(i, end - i), base + i, emit);
        i = gap = end;
      } else {
        i += utf8_at(text, i).len;
      }
    }
    if (gap < text.size()) split_from(step + 1, text.substr(gap), base + gap, emit);
  }

  std::vector<SplitRule> rules_;
};

}  // namespace tessera::data

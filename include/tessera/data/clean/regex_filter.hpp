// tessera/data/clean/regex_filter.hpp — stage 2: keep word characters, whitespace and CJK;
// detect the language by script ratios.
//
// Why RE2: rules come from users (configurable), and RE2 runs in time linear in the input
// for any pattern, so a bad rule cannot hang a run on a long line; it also has Unicode
// script classes (\p{Han}) built in.
//
// The default rules remove URLs and e-mail addresses, then every character that is not a
// letter, digit, mark, underscore, whitespace or CJK punctuation (U+3000-303F, full-width
// forms U+FF00-FFEF); `keep_punctuation` adds \p{P} to what is kept. Users may append
// their own rules: remove/replace a pattern, drop a document that matches, or require a
// match. Language detection counts letters by script (Han, Latin, other) and labels the
// document "zh" when Han letters are at least `zh_min_han_ratio` of its letters (Chinese
// text carries Latin command names and terms, and a Han character is a word where a Latin
// letter is a fifth of one), "latin" when Latin letters are at least `latin_min_ratio`,
// "other", or "none" when it has no letters.
//
// Needs RE2 (TESSERA_HAVE_RE2); without it constructing the filter throws.
#pragma once

#include <memory>
#include <set>
#include <string>
#include <vector>

#if defined(TESSERA_HAVE_RE2)
#include <re2/re2.h>
#endif

#include "tessera/core/error.hpp"
#include "tessera/data/clean/text.hpp"

namespace tessera::data::clean {

struct RegexRule {
  enum class Action {
    kReplace,       // replace every match with `replacement` (empty: remove)
    kDropDocument,  // drop the document if the pattern matches anywhere
    kRequire,       // drop the document unless the pattern matches somewhere
  };
  std::string name;
  std::string pattern;  // RE2 syntax
  Action action = Action::kReplace;
  std::string replacement;
};

// The default character-class rule: everything outside the kept set is removed.
inline std::string disallowed_chars_pattern(bool keep_punctuation) {
  return std::string(R"([^\p{L}\p{N}\p{M}_\s\x{3000}-\x{303F}\x{FF00}-\x{FFEF})") +
         (keep_punctuation ? R"(\p{P})" : "") + "]+";
}

inline std::vector<RegexRule> default_regex_rules(bool keep_punctuation = false) {
  return {
      {"url", R"((?i)\b(?:https?|ftp)://\S+|\bwww\.\S+)", RegexRule::Action::kReplace, ""},
      {"email", R"([\w.+-]+@[\w-]+(?:\.[\w-]+)+)", RegexRule::Action::kReplace, ""},
      {"disallowed_chars", disallowed_chars_pattern(keep_punctuation), RegexRule::Action::kReplace,
       ""},
  };
}

struct LanguageCounts {
  int64_t han = 0, latin = 0, other = 0;
  int64_t letters() const { return han + latin + other; }
};

inline LanguageCounts count_scripts(std::string_view text) {
  LanguageCounts c;
  for (size_t i = 0; i < text.size();) {
    const char32_t cp = decode_utf8(text, i);
    if (cp == kInvalidCodepoint || char_class(cp) != CharClass::kLetter) continue;
    switch (script_of_letter(cp)) {
      case Script::kHan:
        ++c.han;
        break;
      case Script::kLatin:
        ++c.latin;
        break;
      case Script::kOther:
        ++c.other;
        break;
    }
  }
  return c;
}

struct LanguageOptions {
  double zh_min_han_ratio = 0.2;
  double latin_min_ratio = 0.5;
};

inline std::string detect_language(std::string_view text, const LanguageOptions& opt = {}) {
  const LanguageCounts c = count_scripts(text);
  if (c.letters() == 0) return "none";
  const double n = static_cast<double>(c.letters());
  if (c.han / n >= opt.zh_min_han_ratio) return "zh";
  if (c.latin / n >= opt.latin_min_ratio) return "latin";
  return "other";
}

struct RegexFilterOptions {
  std::vector<RegexRule> rules = default_regex_rules();
  LanguageOptions language;
  std::set<std::string> keep_languages;  // empty: keep every language
  int64_t min_chars = 1;                 // code points left after the rules
};

class RegexFilter final : public Stage {
 public:
  explicit RegexFilter(RegexFilterOptions options = {}) : opt_(std::move(options)) {
    report_.stage = name();
#if defined(TESSERA_HAVE_RE2)
    for (const auto& rule : opt_.rules) {
      auto re = std::make_shared<RE2>(rule.pattern, RE2::Quiet);
      TESSERA_CHECK(re->ok(), "clean::RegexFilter: rule '", rule.name, "' pattern '", rule.pattern,
                    "' does not compile: ", re->error());
      compiled_.push_back(std::move(re));
    }
    spaces_ = std::make_shared<RE2>(R"([ \t]{2,})");
    trim_ = std::make_shared<RE2>(R"((?m)^[ \t]+|[ \t]+$)");
    blank_lines_ = std::make_shared<RE2>(R"(\n{2,})");
#else
    fail(
        "clean::RegexFilter needs RE2, which this build does not have "
        "(link tessera::text with libre2-dev installed)");
#endif
  }

  std::string name() const override { return "regex_filter"; }

  bool process(Document& doc) override {
#if defined(TESSERA_HAVE_RE2)
    for (size_t r = 0; r < opt_.rules.size(); ++r) {
      const RegexRule& rule = opt_.rules[r];
      const RE2& re = *compiled_[r];
      switch (rule.action) {
        case RegexRule::Action::kReplace: {
          const size_t before = doc.text.size();
          const int n = RE2::GlobalReplace(&doc.text, re, rule.replacement);
          if (n > 0) {
            report_.count(rule.name + "_matches", n);
            report_.count(rule.name + "_bytes",
                          static_cast<int64_t>(before) - static_cast<int64_t>(doc.text.size()));
          }
          break;
        }
        case RegexRule::Action::kDropDocument:
          if (RE2::PartialMatch(doc.text, re)) return drop("docs_dropped_by_" + rule.name);
          break;
        case RegexRule::Action::kRequire:
          if (!RE2::PartialMatch(doc.text, re)) return drop("docs_missing_" + rule.name);
          break;
      }
    }
    // Removing characters leaves double spaces and ragged lines; tidy them.
    RE2::GlobalReplace(&doc.text, *spaces_, " ");
    RE2::GlobalReplace(&doc.text, *trim_, "");
    RE2::GlobalReplace(&doc.text, *blank_lines_, "\n");
    while (!doc.text.empty() && (doc.text.back() == '\n' || doc.text.back() == ' '))
      doc.text.pop_back();
    size_t lead = 0;
    while (lead < doc.text.size() && (doc.text[lead] == '\n' || doc.text[lead] == ' ')) ++lead;
    doc.text.erase(0, lead);

    if (static_cast<int64_t>(to_codepoints(doc.text).size()) < opt_.min_chars)
      return drop("docs_too_short");
    doc.lang = detect_language(doc.text, opt_.language);
    ++languages_[doc.lang];
    if (!opt_.keep_languages.empty() && !opt_.keep_languages.count(doc.lang))
      return drop("docs_lang_" + doc.lang);
    return true;
#else
    (void)doc;
    return false;
#endif
  }

  // Documents seen per detected language (before the language filter).
  const std::map<std::string, int64_t>& languages() const { return languages_; }

  void finish() override {
    std::string s = "languages detected:";
    for (const auto& [lang, n] : languages_) s += " " + lang + "=" + std::to_string(n);
    report_.notes = {s};
  }

 private:
  bool drop(const std::string& why) {
    report_.count(why);
    return false;
  }

  RegexFilterOptions opt_;
#if defined(TESSERA_HAVE_RE2)
  std::vector<std::shared_ptr<RE2>> compiled_;
  std::shared_ptr<RE2> spaces_, trim_, blank_lines_;
#endif
  std::map<std::string, int64_t> languages_;
};

}  // namespace tessera::data::clean

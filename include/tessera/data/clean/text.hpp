// tessera/data/clean/text.hpp — the small text vocabulary every cleaning stage shares: a
// document, a stage's report, the Stage interface, and UTF-8 / script helpers.
//
// Why a runtime Stage interface (virtual functions) when tessera avoids virtual dispatch:
// the cleaning chain is chosen on the command line, and a virtual call per *document* costs
// nothing next to the per-character work each stage does. Hot loops stay inside the stages.
//
// Why our own UTF-8 decoder: stages must survive invalid bytes (fortune files mix encodings)
// and count what they drop, so decoding reports an error instead of throwing.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#if defined(TESSERA_HAVE_UTF8PROC)
#include <utf8proc.h>
#endif

#include "tessera/core/error.hpp"

namespace tessera::data::clean {

// One document flowing through the chain. `source` and `line` locate it in the input so
// reports and errors can point at it; the other fields are filled in by stages.
struct Document {
  Document() = default;
  explicit Document(std::string text_, std::string source_ = {}, int64_t line_ = 0)
      : text(std::move(text_)), source(std::move(source_)), line(line_) {}

  std::string text;
  std::string source;     // input file ("-" for stdin)
  int64_t line = 0;       // 1-based line where the record starts
  std::string lang;       // set by the regex filter: "zh", "latin", "other", "none"
  int domain = -1;        // set by the LDA stage
  double quality = -1.0;  // set by the quality stage, in [0, 1]
};

// What a stage did. The pipeline fills docs/bytes in and out; the stage fills `removed`
// (a named count of what it took away: characters, documents by reason, ...) and `notes`.
struct StageReport {
  std::string stage;
  int64_t docs_in = 0, docs_out = 0;
  int64_t bytes_in = 0, bytes_out = 0;
  std::map<std::string, int64_t> removed;
  std::vector<std::string> notes;
  void count(const std::string& what, int64_t n = 1) {
    if (n != 0) removed[what] += n;
  }
};

// A cleaning stage. Streaming stages implement `process` only. A corpus stage (LDA needs
// every document before it can assign any) returns true from `needs_corpus`; the pipeline
// then calls `observe` on every document, `fit` once, and `process` on the same documents
// in the same order.
class Stage {
 public:
  virtual ~Stage() = default;
  virtual std::string name() const = 0;
  // Edits the document in place; returns false to drop it.
  virtual bool process(Document& doc) = 0;
  virtual bool needs_corpus() const { return false; }
  virtual void observe(const Document&) {}
  virtual void fit() {}
  // Called once after the last document: summarise into report().notes.
  virtual void finish() {}
  StageReport& report() { return report_; }
  const StageReport& report() const { return report_; }

 protected:
  StageReport report_;
};

// ---- UTF-8 ----------------------------------------------------------------------------

inline constexpr char32_t kInvalidCodepoint = 0xFFFFFFFFu;

// Decodes the code point at s[i] and advances i. On a malformed, overlong or surrogate
// sequence returns kInvalidCodepoint and advances by one byte, so a caller can drop or
// replace that byte and resynchronise.
inline char32_t decode_utf8(std::string_view s, size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  int len = 0;
  char32_t cp = 0, min = 0;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2;
    cp = b0 & 0x1F;
    min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3;
    cp = b0 & 0x0F;
    min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4;
    cp = b0 & 0x07;
    min = 0x10000;
  } else {
    ++i;
    return kInvalidCodepoint;
  }
  if (i + len > s.size()) {
    ++i;
    return kInvalidCodepoint;
  }
  for (int k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) {
      ++i;
      return kInvalidCodepoint;
    }
    cp = (cp << 6) | (b & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    ++i;
    return kInvalidCodepoint;
  }
  i += len;
  return cp;
}

inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Decodes a whole string, dropping invalid bytes.
inline std::u32string to_codepoints(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const char32_t cp = decode_utf8(s, i);
    if (cp != kInvalidCodepoint) out += cp;
  }
  return out;
}

// ---- scripts and character classes ------------------------------------------------------

// CJK unified ideographs (basic, extensions A-F) and compatibility ideographs: what the
// language detector and the per-character Chinese signals count as Han.
inline bool is_han(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
         (c >= 0x20000 && c <= 0x2EBEF) || (c >= 0xF900 && c <= 0xFAFF) ||
         (c >= 0x2F800 && c <= 0x2FA1F) || c == 0x3007;
}

inline bool is_latin_letter(char32_t c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
         (c >= 0xC0 && c <= 0x24F && c != 0xD7 && c != 0xF7) || (c >= 0x1E00 && c <= 0x1EFF);
}

enum class CharClass { kLetter, kMark, kDigit, kSpace, kPunct, kSymbol, kControl, kFormat, kOther };

// The Unicode general category folded into the classes the stages count. With utf8proc the
// categories are exact; without it ASCII is exact and the rest is approximated by block
// (documented in docs/data.md), which is enough for ratio signals but not for NFKC.
inline CharClass char_class(char32_t c) {
  if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v')
    return CharClass::kSpace;
#if defined(TESSERA_HAVE_UTF8PROC)
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
      return CharClass::kLetter;
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
      return CharClass::kMark;
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
      return CharClass::kDigit;
    case UTF8PROC_CATEGORY_ZS:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
      return CharClass::kSpace;
    case UTF8PROC_CATEGORY_PC:
    case UTF8PROC_CATEGORY_PD:
    case UTF8PROC_CATEGORY_PS:
    case UTF8PROC_CATEGORY_PE:
    case UTF8PROC_CATEGORY_PI:
    case UTF8PROC_CATEGORY_PF:
    case UTF8PROC_CATEGORY_PO:
      return CharClass::kPunct;
    case UTF8PROC_CATEGORY_SM:
    case UTF8PROC_CATEGORY_SC:
    case UTF8PROC_CATEGORY_SK:
    case UTF8PROC_CATEGORY_SO:
      return CharClass::kSymbol;
    case UTF8PROC_CATEGORY_CC:
      return CharClass::kControl;
    case UTF8PROC_CATEGORY_CF:
      return CharClass::kFormat;
    default:
      return CharClass::kOther;
  }
#else
  if (c < 0x80) {
    if (c < 0x20 || c == 0x7F) return CharClass::kControl;
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')) return CharClass::kLetter;
    if (c >= '0' && c <= '9') return CharClass::kDigit;
    if (c == '$' || c == '+' || c == '<' || c == '=' || c == '>' || c == '^' || c == '`' ||
        c == '|' || c == '~')
      return CharClass::kSymbol;
    return CharClass::kPunct;
  }
  if (c >= 0x80 && c < 0xA0) return CharClass::kControl;
  if (c == 0xA0 || c == 0x3000 || (c >= 0x2000 && c <= 0x200A)) return CharClass::kSpace;
  if (c == 0xAD || (c >= 0x200B && c <= 0x200F) || c == 0xFEFF || (c >= 0x2060 && c <= 0x2064))
    return CharClass::kFormat;
  if ((c >= 0x2010 && c <= 0x205F) || (c >= 0x3001 && c <= 0x303F && c != 0x3007) ||
      (c >= 0xFF01 && c <= 0xFF0F) || (c >= 0xFF1A && c <= 0xFF20) || (c >= 0xA1 && c <= 0xBF))
    return CharClass::kPunct;
  if ((c >= 0x2100 && c <= 0x2BFF) || (c >= 0x1F000 && c <= 0x1FAFF)) return CharClass::kSymbol;
  if (c >= 0x300 && c <= 0x36F) return CharClass::kMark;
  if (c >= 0xFF10 && c <= 0xFF19) return CharClass::kDigit;
  return CharClass::kLetter;
#endif
}

// Script buckets for language detection by ratio.
enum class Script { kHan, kLatin, kOther };
inline Script script_of_letter(char32_t c) {
  if (is_han(c)) return Script::kHan;
  if (is_latin_letter(c)) return Script::kLatin;
  return Script::kOther;
}

// A "word" for the quality signals and LDA: a run of letters/digits/marks outside Han, or a
// single Han character (Chinese has no spaces; per character is the Chinese equivalent of
// a word in Gopher-style rules). Returns the units as views into `text`.
inline std::vector<std::string_view> word_units(std::string_view text) {
  std::vector<std::string_view> units;
  size_t start = std::string_view::npos;
  for (size_t i = 0; i < text.size();) {
    const size_t at = i;
    const char32_t c = decode_utf8(text, i);
    const bool han = c != kInvalidCodepoint && is_han(c);
    bool wordish = false;
    if (c != kInvalidCodepoint && !han) {
      const CharClass k = char_class(c);
      wordish = k == CharClass::kLetter || k == CharClass::kDigit || k == CharClass::kMark ||
                c == '_' || (c == '\'' && start != std::string_view::npos);
    }
    if (wordish) {
      if (start == std::string_view::npos) start = at;
      continue;
    }
    if (start != std::string_view::npos) {
      units.push_back(text.substr(start, at - start));
      start = std::string_view::npos;
    }
    if (han) units.push_back(text.substr(at, i - at));
  }
  if (start != std::string_view::npos) units.push_back(text.substr(start));
  return units;
}

// SplitMix64: a tiny, fixed, well-mixed generator for deterministic seeds (MinHash
// permutations, LDA sampling, balanced selection). Same numbers on every platform.
inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace tessera::data::clean

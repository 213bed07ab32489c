// tessera/data/tokenizer_unicode.hpp — UTF-8 stepping and Unicode classes for pre-tokenisation.
//
// Why: tokenizer split rules ask "is this a letter, a mark, a number, punctuation, a symbol,
// white space?" at every character. Text handed to a tokenizer may be any bytes, so the
// decoder never throws: a byte that does not start a well-formed UTF-8 sequence is one
// "character" of its own (class other), which keeps every byte in exactly one piece and makes
// decode(encode(bytes)) an exact round trip for invalid UTF-8 too.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "tessera/data/unicode_categories.hpp"

namespace tessera::data {

// One decoded character: its code point (kInvalidCodePoint for a stray byte) and byte length.
struct Utf8Char {
  char32_t cp;
  std::uint32_t len;
};
inline constexpr char32_t kInvalidCodePoint = 0xFFFFFFFFu;

// Decodes the character starting at s[i] (i < s.size()). Overlong forms, surrogates, code
// points above U+10FFFF and truncated sequences are rejected byte by byte, as a strict
// decoder (Rust's, Python's) would.
inline Utf8Char utf8_at(std::string_view s, std::size_t i) noexcept {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return {b0, 1};
  const std::size_t left = s.size() - i;
  auto cont = [&](std::size_t k) { return (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80; };
  auto byte = [&](std::size_t k) {
    return static_cast<char32_t>(static_cast<unsigned char>(s[i + k]) & 0x3F);
  };
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    if (left >= 2 && cont(1)) return {(static_cast<char32_t>(b0 & 0x1F) << 6) | byte(1), 2};
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (left >= 3 && cont(1) && cont(2)) {
      const char32_t cp = (static_cast<char32_t>(b0 & 0x0F) << 12) | (byte(1) << 6) | byte(2);
      if (cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF)) return {cp, 3};
    }
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (left >= 4 && cont(1) && cont(2) && cont(3)) {
      const char32_t cp =
          (static_cast<char32_t>(b0 & 0x07) << 18) | (byte(1) << 12) | (byte(2) << 6) | byte(3);
      if (cp >= 0x10000 && cp <= 0x10FFFF) return {cp, 4};
    }
  }
  return {kInvalidCodePoint, 1};
}

// Appends the UTF-8 form of cp.
template <class String>
void append_utf8(String& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Unicode major category of a character, plus a flag for Oniguruma's \s (U+0009..U+000D,
// U+0085, Zs, Zl, Zp), which is what the Hugging Face library's regexes mean by \s.
namespace uclass {
inline constexpr std::uint8_t kOther = 0, kLetter = 1, kMark = 2, kNumber = 3, kPunct = 4,
                              kSymbol = 5, kSpaceFlag = 8, kMajorMask = 7;
}

namespace detail {
// The Basic Multilingual Plane is looked up directly (64 KiB, built once); the rest by binary
// search over the range table.
inline const std::array<std::uint8_t, 0x10000>& bmp_class_table() {
  static const auto table = [] {
    std::array<std::uint8_t, 0x10000> t{};
    using namespace unicode_tables;
    for (int r = 0; r < kRangeCount; ++r) {
      const std::uint32_t lo = kRangeStart[r];
      if (lo >= 0x10000) break;
      const std::uint32_t hi = r + 1 < kRangeCount ? kRangeStart[r + 1] : 0x110000;
      for (std::uint32_t cp = lo; cp < hi && cp < 0x10000; ++cp) t[cp] = kRangeClass[r];
    }
    return t;
  }();
  return table;
}
}  // namespace detail

inline std::uint8_t unicode_class(char32_t cp) noexcept {
  if (cp < 0x10000) return detail::bmp_class_table()[cp];
  if (cp > 0x10FFFF) return uclass::kOther;
  using namespace unicode_tables;
  int lo = 0, hi = kRangeCount - 1;  // last range whose start <= cp
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (kRangeStart[mid] <= cp)
      lo = mid;
    else
      hi = mid - 1;
  }
  return kRangeClass[lo];
}

inline bool is_space(std::uint8_t c) noexcept { return (c & uclass::kSpaceFlag) != 0; }
inline bool is_letter(std::uint8_t c) noexcept {
  return (c & uclass::kMajorMask) == uclass::kLetter;
}
inline bool is_mark(std::uint8_t c) noexcept { return (c & uclass::kMajorMask) == uclass::kMark; }
inline bool is_number(std::uint8_t c) noexcept {
  return (c & uclass::kMajorMask) == uclass::kNumber;
}
inline bool is_punct_or_symbol(std::uint8_t c) noexcept {
  const auto m = c & uclass::kMajorMask;
  return m == uclass::kPunct || m == uclass::kSymbol;
}

// CJK unified ideographs as jieba and per-character splitting see them (basic block and
// extension A); the DeepSeek-V3 split rule has its own narrower ranges.
inline bool is_cjk_ideograph(char32_t cp) noexcept {
  return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
         (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x20000 && cp <= 0x2FA1F);
}

}  // namespace tessera::data

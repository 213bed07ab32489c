// tessera/data/clean/normalize.hpp — stage 1: make equal text equal.
//
// Deduplication, filtering and tokenisation all compare bytes, so text that *looks* equal
// must *be* equal first. The order of the steps matters and is fixed:
//   1. ANSI escapes (ESC[...m colour codes in the Debian fortune files) are removed first,
//      because once the ESC control byte is gone their parameters look like text ("[33m").
//   2. Invalid UTF-8 bytes are dropped (utf8proc refuses invalid input).
//   3. NFKC (utf8proc): full-width Latin, compatibility ideographs, ligatures, etc.
//   4. Optional traditional-to-simplified conversion (OpenCC, config t2s.json): after NFKC
//      so OpenCC sees canonical code points.
//   5. Control (Cc) and format (Cf: zero-width spaces, BOM, soft hyphen) characters removed.
//   6. Whitespace collapsed: runs of spaces become one space; lines are trimmed and blank
//      lines dropped, but line breaks are kept by default (poems and verse keep their shape).
// A document that ends up empty is dropped.
//
// Needs utf8proc for NFKC and OpenCC for t2s. Without them (TESSERA_HAVE_UTF8PROC /
// TESSERA_HAVE_OPENCC undefined) constructing a Normalizer that asks for the step throws.
#pragma once

#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#if defined(TESSERA_HAVE_UTF8PROC)
#include <utf8proc.h>
#endif
#if defined(TESSERA_HAVE_OPENCC)
#include <opencc/opencc.h>
#endif

#include "tessera/core/error.hpp"
#include "tessera/data/clean/text.hpp"

namespace tessera::data::clean {

struct NormalizeOptions {
  bool strip_ansi = true;
  bool nfkc = true;
  bool traditional_to_simplified = false;
  std::string opencc_config = "t2s.json";  // looked up in OpenCC's data dir (/usr/share/opencc)
  bool remove_control = true;
  bool collapse_whitespace = true;
  bool keep_newlines = true;
};

// Removes ANSI CSI sequences (ESC '[' parameter bytes, final byte 0x40-0x7E) and two-byte
// ESC sequences; returns how many sequences were removed.
inline int64_t strip_ansi_escapes(std::string& s) {
  int64_t removed = 0;
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    if (s[i] != '\x1b') {
      out += s[i++];
      continue;
    }
    ++removed;
    size_t j = i + 1;
    if (j < s.size() && s[j] == '[') {
      ++j;
      while (j < s.size() && static_cast<unsigned char>(s[j]) >= 0x20 &&
             static_cast<unsigned char>(s[j]) <= 0x3F)
        ++j;
      if (j < s.size() && static_cast<unsigned char>(s[j]) >= 0x40 &&
          static_cast<unsigned char>(s[j]) <= 0x7E)
        ++j;
    } else if (j < s.size() && static_cast<unsigned char>(s[j]) >= 0x40 &&
               static_cast<unsigned char>(s[j]) <= 0x5F) {
      ++j;
    }
    i = j;
  }
  s.swap(out);
  return removed;
}

class Normalizer final : public Stage {
 public:
  explicit Normalizer(NormalizeOptions options = {}) : opt_(std::move(options)) {
    report_.stage = name();
#if !defined(TESSERA_HAVE_UTF8PROC)
    TESSERA_CHECK(!opt_.nfkc,
                  "clean::Normalizer: NFKC needs utf8proc, which this build does not have "
                  "(link tessera::text with libutf8proc-dev installed, or set nfkc = false)");
#endif
    if (opt_.traditional_to_simplified) {
#if defined(TESSERA_HAVE_OPENCC)
      opencc_t handle = opencc_open(opt_.opencc_config.c_str());
      TESSERA_CHECK(handle != reinterpret_cast<opencc_t>(-1),
                    "clean::Normalizer: OpenCC cannot open config '", opt_.opencc_config,
                    "': ", opencc_error());
      opencc_ =
          std::shared_ptr<void>(handle, [](void* h) { opencc_close(static_cast<opencc_t>(h)); });
#else
      fail(
          "clean::Normalizer: traditional-to-simplified needs OpenCC, which this build does not "
          "have "
          "(link tessera::text with libopencc-dev installed)");
#endif
    }
  }

  std::string name() const override { return "normalize"; }

  // The normalised text; counts what it removed into the report.
  std::string normalize(std::string text) {
    if (opt_.strip_ansi) report_.count("ansi_escapes", strip_ansi_escapes(text));
    text = valid_utf8(text);
#if defined(TESSERA_HAVE_UTF8PROC)
    if (opt_.nfkc) {
      auto* mapped = utf8proc_NFKC(reinterpret_cast<const utf8proc_uint8_t*>(text.c_str()));
      TESSERA_CHECK(mapped != nullptr, "clean::Normalizer: utf8proc NFKC failed on valid UTF-8");
      std::string nfkc(reinterpret_cast<const char*>(mapped));
      std::free(mapped);
      if (nfkc != text) report_.count("docs_changed_by_nfkc");
      text.swap(nfkc);
    }
#endif
#if defined(TESSERA_HAVE_OPENCC)
    if (opencc_) {
      char* converted =
          opencc_convert_utf8(static_cast<opencc_t>(opencc_.get()), text.data(), text.size());
      TESSERA_CHECK(converted != nullptr,
                    "clean::Normalizer: OpenCC conversion failed: ", opencc_error());
      std::string simplified(converted);
      opencc_convert_utf8_free(converted);
      if (simplified != text) {
        report_.count("docs_changed_by_t2s");
        report_.count("chars_changed_by_t2s", changed_codepoints(text, simplified));
      }
      text.swap(simplified);
    }
#endif
    return clean_chars_and_space(text);
  }

  bool process(Document& doc) override {
    doc.text = normalize(std::move(doc.text));
    if (doc.text.empty()) {
      report_.count("docs_empty_after_normalize");
      return false;
    }
    return true;
  }

 private:
  std::string valid_utf8(const std::string& s) {
    std::string out;
    out.reserve(s.size());
    int64_t bad = 0;
    for (size_t i = 0; i < s.size();) {
      const size_t at = i;
      const char32_t c = decode_utf8(s, i);
      if (c == kInvalidCodepoint)
        ++bad;
      else
        out.append(s, at, i - at);
    }
    report_.count("invalid_utf8_bytes", bad);
    return out;
  }

  static int64_t changed_codepoints(std::string_view a, std::string_view b) {
    const std::u32string x = to_codepoints(a), y = to_codepoints(b);
    int64_t n = 0;
    for (size_t i = 0; i < std::min(x.size(), y.size()); ++i) n += x[i] != y[i];
    return n + static_cast<int64_t>(std::max(x.size(), y.size()) - std::min(x.size(), y.size()));
  }

  // Steps 5 and 6 in one pass over code points.
  std::string clean_chars_and_space(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    int64_t control = 0, format = 0, space = 0;
    bool pending_space = false, pending_newline = false;
    for (size_t i = 0; i < s.size();) {
      const size_t at = i;
      const char32_t c = decode_utf8(s, i);
      const bool newline = c == '\n' || c == 0x2028 || c == 0x2029;
      const CharClass k = char_class(c);
      if (opt_.collapse_whitespace && (newline || k == CharClass::kSpace)) {
        if (newline && opt_.keep_newlines)
          pending_newline = true;
        else
          pending_space = true;
        ++space;
        continue;
      }
      if (opt_.remove_control && !newline && c != '\t' &&
          (k == CharClass::kControl || k == CharClass::kFormat)) {
        ++(k == CharClass::kControl ? control : format);
        continue;
      }
      if (!out.empty()) {
        if (pending_newline) {
          out += '\n';
          --space;
        } else if (pending_space) {
          out += ' ';
          --space;
        }
      }
      pending_space = pending_newline = false;
      out.append(s, at, i - at);
    }
    report_.count("control_chars", control);
    report_.count("format_chars", format);
    report_.count("whitespace_chars", space);
    return out;
  }

  NormalizeOptions opt_;
  std::shared_ptr<void> opencc_;  // opencc_t handle, shared so the stage stays copyable
};

}  // namespace tessera::data::clean

// tessera/data/wordpiece.hpp — BERT's WordPiece tokenizer: normalise, split, greedy pieces.
//
// Why it is built this way:
// - A BERT checkpoint is only usable with exactly the ids it was trained on, so this follows
//   the Hugging Face `tokenizers` library (BertNormalizer + BertPreTokenizer + WordPiece +
//   the [CLS] A [SEP] template), which is what every published BERT tokenizer.json names.
//   tests/bert checks ids against that library on thousands of real English and Chinese texts.
// - Normalisation is per character, in the reference's order: clean (drop NUL, U+FFFD and
//   control/format/unassigned characters, map white space to ' '), put spaces around CJK
//   ideographs (so each becomes a word), strip accents (NFD, drop nonspacing marks), lower-case.
//   NFD and lower-casing come from tables generated from Unicode 14 (wordpiece_tables.hpp), so
//   the header needs no utf8proc or ICU. One approximation: NFD's canonical reordering of
//   combining characters is not applied. Nearly every character it moves is a nonspacing mark,
//   which is dropped anyway; what is left are 25 spacing marks with a non-zero combining class
//   (viramas, Hangul tone marks, musical symbols), whose order would only change where two
//   of them with different classes follow each other in non-canonical order.
// - Words are split on white space and on punctuation (Unicode P* and all ASCII symbols),
//   each punctuation character a word. WordPiece then takes, from the left, the longest
//   vocabulary entry that matches (continuations spelled with "##"); a word longer than 100
//   characters or with an unmatchable rest becomes one [UNK], as in the reference.
// - Special tokens ([CLS], [SEP], [PAD], [UNK], [MASK]) written literally in the text are
//   cut out first and kept as their ids (the reference's added tokens, normalized = false).
// - Ids are int32: they go straight into ops::embedding, which takes int32 ids.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/data/tokenizer_unicode.hpp"
#include "tessera/data/wordpiece_tables.hpp"

namespace tessera::data {

struct WordPieceOptions {
  bool lowercase = true;              // do_lower_case
  std::optional<bool> strip_accents;  // unset: follows `lowercase`, BERT's rule
  bool handle_chinese_chars = true;   // tokenize_chinese_chars: each ideograph a word
  bool clean_text = true;
  int64_t max_input_chars_per_word = 100;
  std::string continuing_subword_prefix = "##";
  std::string unk_token = "[UNK]", cls_token = "[CLS]", sep_token = "[SEP]", pad_token = "[PAD]",
              mask_token = "[MASK]";
};

struct WordPieceEncodeOptions {
  bool add_special_tokens = true;      // [CLS] A [SEP] (pairs: [CLS] A [SEP] B [SEP])
  bool special_tokens_in_text = true;  // "[SEP]" written in the text is the [SEP] token
  // Longest result in tokens, special tokens included; 0 means no limit. Pieces are cut from
  // the end (pairs: the reference's longest-first rule). sentence-transformers models use
  // their max_seq_length here (256 for all-MiniLM-L6-v2).
  int64_t max_length = 0;
};

struct WordPieceEncoding {
  std::vector<std::int32_t> ids;
  std::vector<std::int32_t> type_ids;  // BERT's token types: 0 for A (and [CLS]), 1 for B
};

namespace wordpiece_detail {

inline bool is_nonspacing_mark(char32_t c) {
  using namespace wordpiece_tables;
  int lo = 0, hi = kNonspacingMarkRangeCount - 1;
  while (lo <= hi) {
    const int mid = (lo + hi) / 2;
    if (c < kNonspacingMarks[mid][0])
      hi = mid - 1;
    else if (c > kNonspacingMarks[mid][1])
      lo = mid + 1;
    else
      return true;
  }
  return false;
}

inline const wordpiece_tables::CharMapping* find_mapping(const wordpiece_tables::CharMapping* t,
                                                         int n, char32_t c) {
  const auto* end = t + n;
  const auto* it = std::lower_bound(
      t, end, c, [](const wordpiece_tables::CharMapping& m, char32_t v) { return m.from < v; });
  return it != end && it->from == c ? it : nullptr;
}

// The reference's predicates (tokenizers/src/normalizers/bert.rs, pre_tokenizers/bert.rs).
// \t \n \r count as white space although they are control characters.
inline bool is_control(char32_t c) {
  if (c == '\t' || c == '\n' || c == '\r') return false;
  const std::uint8_t k = unicode_class(c);
  // Major class 0 is C* and Z*; every Z* character carries the space flag. Of the control
  // characters only U+000B, U+000C and U+0085 carry it too.
  return (k & uclass::kMajorMask) == uclass::kOther &&
         (!is_space(k) || c == 0x0B || c == 0x0C || c == 0x85);
}
inline bool is_whitespace(char32_t c) { return is_space(unicode_class(c)); }
inline bool is_punctuation(char32_t c) {
  if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) ||
      (c >= 123 && c <= 126))
    return true;
  return (unicode_class(c) & uclass::kMajorMask) == uclass::kPunct;
}
// "Chinese character" as BERT defines it: the CJK Unified Ideographs blocks (not Hangul,
// not kana).
inline bool is_chinese_char(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
         (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B73F) ||
         (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

inline void append_lower(std::u32string& out, char32_t c, bool lowercase) {
  if (lowercase) {
    if (const auto* m =
            find_mapping(wordpiece_tables::kLowercase, wordpiece_tables::kLowercaseCount, c)) {
      out.append(m->to, m->to + m->count);
      return;
    }
  }
  out.push_back(c);
}

// Strip accents (NFD minus nonspacing marks) then lower-case, for one character.
inline void append_folded(std::u32string& out, char32_t c, bool strip, bool lowercase) {
  if (strip) {
    if (is_nonspacing_mark(c)) return;
    if (c >= 0xAC00 && c <= 0xD7A3) {  // Hangul syllable: algorithmic NFD into jamo (all Lo)
      const char32_t s = c - 0xAC00;
      out.push_back(0x1100 + s / (21 * 28));
      out.push_back(0x1161 + (s % (21 * 28)) / 28);
      if (s % 28 != 0) out.push_back(0x11A7 + s % 28);
      return;
    }
    if (const auto* m = find_mapping(wordpiece_tables::kStripAccents,
                                     wordpiece_tables::kStripAccentsCount, c)) {
      for (int k = 0; k < m->count; ++k) append_lower(out, m->to[k], lowercase);
      return;
    }
  }
  append_lower(out, c, lowercase);
}

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using Vocab = std::unordered_map<std::string, std::int32_t, StringHash, std::equal_to<>>;

}  // namespace wordpiece_detail

class WordPieceTokenizer {
 public:
  // vocab.txt: one token per line, the id is the line number (0-based). Trailing white space
  // of a line is not part of the token; a token listed twice keeps its last line, as in both
  // reference implementations.
  static WordPieceTokenizer from_vocab_file(const std::filesystem::path& path,
                                            WordPieceOptions options = {}) {
    std::ifstream in(path, std::ios::binary);
    TESSERA_CHECK(in.good(), "WordPieceTokenizer: cannot open vocabulary file '", path.string(),
                  "'");
    std::vector<std::string> tokens;
    for (std::string line; std::getline(in, line);) {
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t'))
        line.pop_back();
      tokens.push_back(std::move(line));
    }
    return from_vocab(std::move(tokens), std::move(options), path.string());
  }

  // A Hugging Face model directory: vocab.txt, and tokenizer_config.json when present
  // (do_lower_case, strip_accents, tokenize_chinese_chars and the special token spellings).
  static WordPieceTokenizer from_pretrained(const std::filesystem::path& dir) {
    WordPieceOptions o;
    const auto cfg_path = dir / "tokenizer_config.json";
    if (std::filesystem::exists(cfg_path)) {
      std::ifstream in(cfg_path);
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(in);
      } catch (const std::exception& e) {
        fail("WordPieceTokenizer: '", cfg_path.string(), "' is not valid JSON: ", e.what());
      }
      TESSERA_CHECK(j.is_object(), "WordPieceTokenizer: '", cfg_path.string(),
                    "' is not a JSON object");
      auto flag = [&](const char* key, bool& v) {
        if (j.contains(key) && !j[key].is_null()) {
          TESSERA_CHECK(j[key].is_boolean(), "WordPieceTokenizer: '", cfg_path.string(), "': ", key,
                        " must be true or false");
          v = j[key].get<bool>();
        }
      };
      flag("do_lower_case", o.lowercase);
      flag("tokenize_chinese_chars", o.handle_chinese_chars);
      if (j.contains("strip_accents") && !j["strip_accents"].is_null()) {
        bool s = false;
        flag("strip_accents", s);
        o.strip_accents = s;
      }
      // Special tokens are strings, or {"content": ...} objects in newer files.
      auto token = [&](const char* key, std::string& v) {
        if (!j.contains(key) || j[key].is_null()) return;
        const auto& t = j[key];
        if (t.is_string())
          v = t.get<std::string>();
        else if (t.is_object() && t.contains("content") && t["content"].is_string())
          v = t["content"].get<std::string>();
        else
          fail("WordPieceTokenizer: '", cfg_path.string(), "': ", key,
               " must be a string or an object with \"content\"");
      };
      token("unk_token", o.unk_token);
      token("cls_token", o.cls_token);
      token("sep_token", o.sep_token);
      token("pad_token", o.pad_token);
      token("mask_token", o.mask_token);
    }
    return from_vocab_file(dir / "vocab.txt", std::move(o));
  }

  static WordPieceTokenizer from_vocab(std::vector<std::string> tokens, WordPieceOptions options,
                                       std::string source = "vocabulary") {
    WordPieceTokenizer t;
    t.opt_ = std::move(options);
    t.source_ = std::move(source);
    TESSERA_CHECK(!tokens.empty(), "WordPieceTokenizer: '", t.source_, "' holds no tokens");
    TESSERA_CHECK(tokens.size() < (1u << 31), "WordPieceTokenizer: '", t.source_,
                  "' has more tokens than int32 ids can hold");
    TESSERA_CHECK(t.opt_.max_input_chars_per_word > 0,
                  "WordPieceTokenizer: max_input_chars_per_word must be positive, got ",
                  t.opt_.max_input_chars_per_word);
    TESSERA_CHECK(!t.opt_.continuing_subword_prefix.empty(),
                  "WordPieceTokenizer: the continuing-subword prefix must not be empty");
    const std::string& prefix = t.opt_.continuing_subword_prefix;
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const auto id = static_cast<std::int32_t>(i);
      t.vocab_[tokens[i]] = id;
      if (tokens[i].size() > prefix.size() && tokens[i].starts_with(prefix))
        t.continuation_[tokens[i].substr(prefix.size())] = id;
    }
    t.tokens_ = std::move(tokens);
    auto required = [&](const std::string& name, const char* role) {
      const auto id = t.token_to_id(name);
      TESSERA_CHECK(id.has_value(), "WordPieceTokenizer: '", t.source_, "' has no ", role,
                    " token '", name, "'");
      return *id;
    };
    t.unk_id_ = required(t.opt_.unk_token, "unknown");
    t.cls_id_ = required(t.opt_.cls_token, "classifier");
    t.sep_id_ = required(t.opt_.sep_token, "separator");
    t.pad_id_ = required(t.opt_.pad_token, "padding");
    for (const std::string* s : {&t.opt_.pad_token, &t.opt_.unk_token, &t.opt_.cls_token,
                                 &t.opt_.sep_token, &t.opt_.mask_token}) {
      if (const auto id = t.token_to_id(*s)) {
        t.specials_.emplace_back(*s, *id);
        t.special_ids_.push_back(*id);
      }
    }
    // Leftmost-longest matching tries the longer spelling first at each position.
    std::sort(t.specials_.begin(), t.specials_.end(),
              [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    return t;
  }

  const WordPieceOptions& options() const { return opt_; }
  int64_t vocab_size() const { return static_cast<int64_t>(tokens_.size()); }
  std::int32_t unk_id() const { return unk_id_; }
  std::int32_t cls_id() const { return cls_id_; }
  std::int32_t sep_id() const { return sep_id_; }
  std::int32_t pad_id() const { return pad_id_; }
  bool is_special(std::int32_t id) const {
    return std::find(special_ids_.begin(), special_ids_.end(), id) != special_ids_.end();
  }

  std::optional<std::int32_t> token_to_id(std::string_view token) const {
    const auto it = vocab_.find(token);
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }
  const std::string& id_to_token(std::int32_t id) const {
    TESSERA_CHECK(id >= 0 && id < vocab_size(), "WordPieceTokenizer: id ", id,
                  " is out of range for a vocabulary of ", vocab_size(), " tokens");
    return tokens_[static_cast<std::size_t>(id)];
  }

  // BertNormalizer: the text each word is cut from (UTF-8). Invalid UTF-8 bytes become U+FFFD
  // first (what a str decoded with errors="replace" holds), which cleaning then removes.
  std::string normalize(std::string_view text) const {
    const std::u32string n = normalize_codepoints(text);
    std::string out;
    out.reserve(n.size());
    for (char32_t c : n) append_utf8(out, c);
    return out;
  }

  // Normalised words, split on white space and punctuation (no special-token handling).
  std::vector<std::string> pre_tokenize(std::string_view text) const {
    std::vector<std::string> words;
    split_words(normalize_codepoints(text), [&](std::string_view w) { words.emplace_back(w); });
    return words;
  }

  // WordPiece pieces of the text as strings, without special tokens added.
  std::vector<std::string> tokenize(std::string_view text) const {
    std::vector<std::string> out;
    for (std::int32_t id : encode(text, {.add_special_tokens = false}).ids)
      out.push_back(id_to_token(id));
    return out;
  }

  WordPieceEncoding encode(std::string_view text, const WordPieceEncodeOptions& o = {}) const {
    std::vector<std::int32_t> a = pieces(text, o.special_tokens_in_text);
    if (o.max_length > 0) {
      const int64_t budget = o.max_length - (o.add_special_tokens ? 2 : 0);
      TESSERA_CHECK(budget >= 0, "WordPieceTokenizer::encode: max_length ", o.max_length,
                    " leaves no room for the 2 special tokens");
      if (static_cast<int64_t>(a.size()) > budget) a.resize(static_cast<std::size_t>(budget));
    }
    WordPieceEncoding e;
    if (o.add_special_tokens) e.ids.push_back(cls_id_);
    e.ids.insert(e.ids.end(), a.begin(), a.end());
    if (o.add_special_tokens) e.ids.push_back(sep_id_);
    e.type_ids.assign(e.ids.size(), 0);
    return e;
  }

  // A sentence pair: [CLS] A [SEP] B [SEP], token types 0 for [CLS] A [SEP], 1 for B [SEP].
  // Truncation follows the reference's longest-first rule: when both are too long each keeps
  // half of the budget (A the smaller half), otherwise only the longer one is cut.
  WordPieceEncoding encode_pair(std::string_view text_a, std::string_view text_b,
                                const WordPieceEncodeOptions& o = {}) const {
    std::vector<std::int32_t> a = pieces(text_a, o.special_tokens_in_text);
    std::vector<std::int32_t> b = pieces(text_b, o.special_tokens_in_text);
    if (o.max_length > 0) {
      const int64_t budget = o.max_length - (o.add_special_tokens ? 3 : 0);
      TESSERA_CHECK(budget >= 0, "WordPieceTokenizer::encode_pair: max_length ", o.max_length,
                    " leaves no room for the 3 special tokens");
      auto n1 = static_cast<int64_t>(a.size()), n2 = static_cast<int64_t>(b.size());
      if (n1 + n2 > budget) {
        const bool swap = n1 > n2;
        if (swap) std::swap(n1, n2);
        n2 = n1 > budget ? n1 : std::max(n1, budget - n1);
        if (n1 + n2 > budget) {
          n1 = budget / 2;
          n2 = n1 + budget % 2;
        }
        if (swap) std::swap(n1, n2);
        a.resize(std::min<std::size_t>(a.size(), static_cast<std::size_t>(n1)));
        b.resize(std::min<std::size_t>(b.size(), static_cast<std::size_t>(n2)));
      }
    }
    WordPieceEncoding e;
    if (o.add_special_tokens) e.ids.push_back(cls_id_);
    e.ids.insert(e.ids.end(), a.begin(), a.end());
    if (o.add_special_tokens) e.ids.push_back(sep_id_);
    e.type_ids.assign(e.ids.size(), 0);
    e.ids.insert(e.ids.end(), b.begin(), b.end());
    if (o.add_special_tokens) e.ids.push_back(sep_id_);
    e.type_ids.resize(e.ids.size(), 1);
    return e;
  }

  // One encoding per text, spread over OpenMP threads; the result does not depend on the
  // thread count. An error in one text is rethrown after the loop.
  std::vector<WordPieceEncoding> encode_batch(const std::vector<std::string>& texts,
                                              const WordPieceEncodeOptions& o = {}) const {
    std::vector<WordPieceEncoding> out(texts.size());
    std::exception_ptr error;
    const auto n = static_cast<int64_t>(texts.size());
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t i = 0; i < n; ++i) {
      try {
        out[static_cast<std::size_t>(i)] = encode(texts[static_cast<std::size_t>(i)], o);
      } catch (...) {
#pragma omp critical(tessera_wordpiece_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return out;
  }

  // The reference's WordPiece decoder: pieces joined by spaces, "##" continuations glued to
  // the previous piece, and no space before . ? ! , (its "cleanup").
  std::string decode(const std::vector<std::int32_t>& ids, bool skip_special = true) const {
    std::string out;
    const std::string& prefix = opt_.continuing_subword_prefix;
    bool first = true;
    for (std::int32_t id : ids) {
      if (skip_special && is_special(id)) continue;
      const std::string& t = id_to_token(id);
      std::string piece;
      if (!first && t.starts_with(prefix))
        piece = t.substr(prefix.size());
      else if (!first)
        piece = " " + t;
      else
        piece = t;
      first = false;
      if (piece == " ." || piece == " ?" || piece == " !" || piece == " ,") piece.erase(0, 1);
      out += piece;
    }
    return out;
  }

 private:
  WordPieceTokenizer() = default;

  std::u32string normalize_codepoints(std::string_view text) const {
    using namespace wordpiece_detail;
    const bool strip = opt_.strip_accents.value_or(opt_.lowercase);
    std::u32string out;
    out.reserve(text.size());
    for (std::size_t i = 0; i < text.size();) {
      const Utf8Char u = utf8_at(text, i);
      i += u.len;
      const char32_t c = u.cp == kInvalidCodePoint ? char32_t{0xFFFD} : u.cp;
      if (opt_.clean_text) {
        if (c == 0 || c == 0xFFFD || is_control(c)) continue;
        if (is_whitespace(c)) {
          out.push_back(' ');
          continue;
        }
      }
      if (opt_.handle_chinese_chars && is_chinese_char(c)) {
        out.push_back(' ');
        append_folded(out, c, strip, opt_.lowercase);
        out.push_back(' ');
        continue;
      }
      append_folded(out, c, strip, opt_.lowercase);
    }
    return out;
  }

  // Calls f(word) for every word of normalised text: white space separates, punctuation
  // characters are words of their own.
  template <class F>
  static void split_words(const std::u32string& norm, F&& f) {
    using namespace wordpiece_detail;
    std::string word;
    auto flush = [&] {
      if (!word.empty()) f(std::string_view(word));
      word.clear();
    };
    for (char32_t c : norm) {
      if (is_whitespace(c)) {
        flush();
      } else if (is_punctuation(c)) {
        flush();
        append_utf8(word, c);
        flush();
      } else {
        append_utf8(word, c);
      }
    }
    flush();
  }

  // Greedy longest-match-first pieces of one word, appended to out.
  void word_pieces(std::string_view word, std::vector<std::int32_t>& out) const {
    std::vector<std::size_t> bounds;  // byte offset of every character start, and the end
    for (std::size_t i = 0; i < word.size(); i += utf8_at(word, i).len) bounds.push_back(i);
    if (static_cast<int64_t>(bounds.size()) > opt_.max_input_chars_per_word) {
      out.push_back(unk_id_);
      return;
    }
    bounds.push_back(word.size());
    const std::size_t mark = out.size();
    std::size_t start = 0;  // index into bounds
    while (start + 1 < bounds.size()) {
      const auto& map = start == 0 ? vocab_ : continuation_;
      std::size_t end = bounds.size() - 1;
      std::int32_t found = -1;
      for (; end > start; --end) {
        const auto it = map.find(word.substr(bounds[start], bounds[end] - bounds[start]));
        if (it != map.end()) {
          found = it->second;
          break;
        }
      }
      if (found < 0) {  // the rest cannot be spelled: the whole word is unknown
        out.resize(mark);
        out.push_back(unk_id_);
        return;
      }
      out.push_back(found);
      start = end;
    }
  }

  // WordPiece ids of a text, without [CLS]/[SEP] around it.
  std::vector<std::int32_t> pieces(std::string_view text, bool specials_in_text) const {
    std::vector<std::int32_t> ids;
    auto plain = [&](std::string_view segment) {
      if (segment.empty()) return;
      split_words(normalize_codepoints(segment), [&](std::string_view w) { word_pieces(w, ids); });
    };
    if (!specials_in_text || specials_.empty()) {
      plain(text);
      return ids;
    }
    std::size_t pos = 0, from = 0;
    while (pos < text.size()) {
      const std::pair<std::string, std::int32_t>* hit = nullptr;
      for (const auto& s : specials_)
        if (!s.first.empty() && text.compare(pos, s.first.size(), s.first) == 0) {
          hit = &s;
          break;
        }
      if (!hit) {
        ++pos;
        continue;
      }
      plain(text.substr(from, pos - from));
      ids.push_back(hit->second);
      pos += hit->first.size();
      from = pos;
    }
    plain(text.substr(from));
    return ids;
  }

  WordPieceOptions opt_;
  std::string source_;
  std::vector<std::string> tokens_;
  wordpiece_detail::Vocab vocab_, continuation_;
  std::vector<std::pair<std::string, std::int32_t>> specials_;  // longest spelling first
  std::vector<std::int32_t> special_ids_;
  std::int32_t unk_id_ = 0, cls_id_ = 0, sep_id_ = 0, pad_id_ = 0;
};

}  // namespace tessera::data

// tessera/data/bpe_tokenizer.hpp — byte-level BPE: load, encode, decode, save.
//
// Why it is built this way:
// - Real models are byte-level BPE in Hugging Face's tokenizer.json form (DeepSeek-V3/R1) or
//   GPT-2's encoder.json + vocab.bpe, and a model is only usable with exactly the ids it was
//   trained on. So this reads those files and reproduces the Hugging Face `tokenizers`
//   library's ids bit for bit (tests/data check thousands of real texts against it).
// - Tokens are held as raw bytes, not as GPT-2's byte-to-character alias strings: encoding
//   then never re-maps text, and decode is a concatenation that round-trips any byte string,
//   invalid UTF-8 included.
// - Speed: merges are looked up by (left id, right id) in an open-addressing table; each
//   pre-token is merged lowest-rank-first (a plain scan for short words, a heap over a linked
//   list for long ones, so a 10 MB line without spaces stays O(n log n)); results are cached
//   per word in a thread-local cache; encode_batch spreads texts over OpenMP threads.
// - Added tokens (special or not) are cut out of the text first, leftmost-longest, as the
//   reference library does; special tokens can be switched off so that text which merely
//   looks like "<|endoftext|>" is encoded as ordinary text.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <queue>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/data/tokenizer_chinese.hpp"
#include "tessera/data/tokenizer_pretokenizer.hpp"
#include "tessera/data/tokenizer_unicode.hpp"

namespace tessera::data {

using TokenId = std::uint32_t;

// GPT-2's reversible map from bytes to printable characters, used by the vocabulary and
// merges files: printable Latin-1 bytes stand for themselves, the rest are shifted to U+0100+.
struct ByteLevelAlphabet {
  std::array<char32_t, 256> byte_to_char{};
  std::unordered_map<char32_t, std::uint8_t> char_to_byte;

  static const ByteLevelAlphabet& get() {
    static const ByteLevelAlphabet a = [] {
      ByteLevelAlphabet t;
      int n = 0;
      for (int b = 0; b < 256; ++b) {
        const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        t.byte_to_char[b] = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
        t.char_to_byte[t.byte_to_char[b]] = static_cast<std::uint8_t>(b);
      }
      return t;
    }();
    return a;
  }

  // Alias string -> bytes, the way the reference ByteLevel decoder does it: when every
  // character is in the alphabet, the bytes it stands for; otherwise the UTF-8 text itself.
  std::string decode(std::string_view token) const {
    std::string out;
    out.reserve(token.size());
    for (std::size_t i = 0; i < token.size();) {
      const Utf8Char c = utf8_at(token, i);
      const auto it = char_to_byte.find(c.cp);
      if (c.cp == kInvalidCodePoint || it == char_to_byte.end()) return std::string(token);
      out.push_back(static_cast<char>(it->second));
      i += c.len;
    }
    return out;
  }

  std::string encode(std::string_view bytes) const {
    std::string out;
    out.reserve(bytes.size() * 2);
    for (unsigned char b : bytes) append_utf8(out, byte_to_char[b]);
    return out;
  }
};

// A token matched in raw text before pre-tokenisation (Hugging Face's added_tokens entry).
struct AddedToken {
  std::string content;
  TokenId id = 0;
  bool special = true;      // may be switched off per call (EncodeOptions::special_tokens)
  bool normalized = false;  // matched after the other added tokens, as the reference does
  bool lstrip = false;      // the match also takes white space on its left
  bool rstrip = false;      // ... and on its right
};

struct EncodeOptions {
  // When false, special added tokens are not recognised and text spelling them is encoded as
  // ordinary text (the reference library's encode_special_tokens=True). Non-special added
  // tokens (user terms) are always kept whole.
  bool special_tokens = true;
};

namespace detail {

// (left id, right id) -> (rank, merged id), open addressing with linear probing.
class MergeTable {
 public:
  struct Value {
    TokenId rank;
    TokenId id;
  };

  void reserve(std::size_t n) {
    std::size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    slots_.assign(cap, Slot{kEmpty, {0, 0}});
    mask_ = cap - 1;
  }

  void insert(TokenId a, TokenId b, Value v) {
    const std::uint64_t key = pack(a, b);
    for (std::size_t i = hash(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == kEmpty || slots_[i].key == key) {
        slots_[i] = {key, v};
        return;
      }
    }
  }

  const Value* find(TokenId a, TokenId b) const {
    if (slots_.empty()) return nullptr;
    const std::uint64_t key = pack(a, b);
    for (std::size_t i = hash(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return &slots_[i].value;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr std::uint64_t kEmpty = ~std::uint64_t{0};
  struct Slot {
    std::uint64_t key;
    Value value;
  };
  static std::uint64_t pack(TokenId a, TokenId b) { return (std::uint64_t{a} << 32) | b; }
  std::size_t hash(std::uint64_t k) const {
    return static_cast<std::size_t>((k * 0x9E3779B97F4A7C15ull) >> 20) & mask_;
  }
  std::vector<Slot> slots_;
  std::size_t mask_ = 0;
};

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

inline std::atomic<std::uint64_t>& tokenizer_instance_counter() {
  static std::atomic<std::uint64_t> n{0};
  return n;
}

}  // namespace detail

template <class CjkSegmenter = KeepCjkRuns>
class BasicBpeTokenizer {
 public:
  using Id = TokenId;
  using Segmenter = CjkSegmenter;
  static constexpr Id kNoId = std::numeric_limits<Id>::max();

  // ---- construction --------------------------------------------------------------------

  // vocab: alias-string form (as in tokenizer.json) -> id; merges: alias-string pairs in rank
  // order. Every merge's parts and result must be in vocab.
  static BasicBpeTokenizer from_parts(
      const std::vector<std::pair<std::string, Id>>& vocab,
      const std::vector<std::pair<std::string, std::string>>& merges, std::vector<AddedToken> added,
      PreTokenizer pre, CjkSegmenter segmenter = {}, bool ignore_merges = false) {
    BasicBpeTokenizer t;
    t.segmenter_ = std::move(segmenter);
    t.pre_ = std::move(pre);
    t.ignore_merges_ = ignore_merges;
    const auto& alpha = ByteLevelAlphabet::get();
    auto& by_alias = t.alias_index_;
    by_alias.reserve(vocab.size());
    Id max_id = 0;
    for (const auto& [tok, id] : vocab) {
      TESSERA_CHECK(id != kNoId, "tokenizer vocab: id ", id, " of \"", tok, "\" is reserved");
      max_id = std::max(max_id, id);
    }
    for (const auto& a : added) max_id = std::max(max_id, a.id);
    const std::size_t n = vocab.empty() && added.empty() ? 0 : std::size_t{max_id} + 1;
    t.alias_.assign(n, {});
    t.bytes_.assign(n, {});
    t.in_model_.assign(n, 0);
    for (const auto& [tok, id] : vocab) {
      TESSERA_CHECK(t.alias_index_.emplace(tok, id).second, "tokenizer vocab: token \"", tok,
                    "\" appears twice");
      TESSERA_CHECK(!t.in_model_[id], "tokenizer vocab: id ", id, " is used by \"", t.alias_[id],
                    "\" and \"", tok, "\"");
      t.alias_[id] = tok;
      t.bytes_[id] = alpha.decode(tok);
      t.in_model_[id] = 1;
      if (t.ignore_merges_) t.whole_.emplace(t.bytes_[id], id);
    }
    t.byte_id_.fill(kNoId);
    for (int b = 0; b < 256; ++b) {
      std::string a;
      append_utf8(a, alpha.byte_to_char[b]);
      if (auto it = by_alias.find(a); it != by_alias.end()) t.byte_id_[b] = it->second;
    }
    t.merges_.reserve(merges.size());
    t.merge_list_.reserve(merges.size());
    for (std::size_t r = 0; r < merges.size(); ++r) {
      const auto& [l, rr] = merges[r];
      const auto il = by_alias.find(l), ir = by_alias.find(rr), im = by_alias.find(l + rr);
      TESSERA_CHECK(il != by_alias.end() && ir != by_alias.end(), "tokenizer merges: merge ", r,
                    " (\"", l, "\", \"", rr, "\") uses a token missing from the vocabulary");
      TESSERA_CHECK(im != by_alias.end(), "tokenizer merges: merge ", r, " (\"", l, "\", \"", rr,
                    "\") makes \"", l + rr, "\", which is missing from the vocabulary");
      // A repeated pair keeps its first (lowest) rank, as the reference does.
      if (!t.merges_.find(il->second, ir->second)) {
        t.merges_.insert(il->second, ir->second, {static_cast<Id>(r), im->second});
      }
      t.merge_list_.emplace_back(il->second, ir->second);
    }
    for (auto& a : added) {
      TESSERA_CHECK(!a.content.empty(), "tokenizer added_tokens: token ", a.id, " is empty");
      if (t.in_model_[a.id]) {
        TESSERA_CHECK(t.alias_[a.id] == a.content, "tokenizer added_tokens: id ", a.id, " is \"",
                      a.content, "\" but the vocabulary has \"", t.alias_[a.id], "\" there");
      }
      t.bytes_[a.id] = alpha.decode(a.content);
      t.alias_[a.id] = a.content;
    }
    t.added_ = std::move(added);
    t.index_added();
    return t;
  }

  // A Hugging Face tokenizer.json holding a byte-level BPE model.
  static BasicBpeTokenizer from_json(const nlohmann::json& j, CjkSegmenter segmenter = {}) {
    const auto& m = j.at("model");
    TESSERA_CHECK(m.value("type", "BPE") == "BPE", "tokenizer.json: model type \"",
                  m.value("type", ""), "\" is not supported (only BPE is)");
    auto null_or = [&](const char* key) { return !m.contains(key) || m.at(key).is_null(); };
    TESSERA_CHECK(null_or("dropout"), "tokenizer.json: BPE dropout is not supported");
    TESSERA_CHECK(
        null_or("continuing_subword_prefix") && null_or("end_of_word_suffix"),
        "tokenizer.json: continuing_subword_prefix / end_of_word_suffix are not supported");
    TESSERA_CHECK(!m.value("byte_fallback", false),
                  "tokenizer.json: byte_fallback is not supported "
                  "(byte-level BPE has every byte in its vocabulary)");
    check_normalizer(j.contains("normalizer") ? j.at("normalizer") : nlohmann::json());
    const auto dec = j.contains("decoder") ? j.at("decoder") : nlohmann::json();
    TESSERA_CHECK(dec.is_object() && dec.value("type", "") == "ByteLevel",
                  "tokenizer.json: decoder ", dec.dump(), " is not supported (only ByteLevel is)");
    const auto post = j.contains("post_processor") ? j.at("post_processor") : nlohmann::json();
    TESSERA_CHECK(post.is_null() || post.value("type", "") == "ByteLevel",
                  "tokenizer.json: post_processor type \"",
                  post.is_null() ? "" : post.value("type", ""),
                  "\" is not supported (only ByteLevel or none; tessera adds BOS/EOS explicitly)");

    std::vector<std::pair<std::string, Id>> vocab;
    vocab.reserve(m.at("vocab").size());
    for (const auto& [k, v] : m.at("vocab").items()) vocab.emplace_back(k, v.template get<Id>());
    std::vector<std::pair<std::string, std::string>> merges;
    merges.reserve(m.at("merges").size());
    for (const auto& e : m.at("merges")) {
      if (e.is_string()) {  // "left right"
        const std::string s = e.get<std::string>();
        const auto sp = s.find(' ');
        TESSERA_CHECK(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos,
                      "tokenizer.json: merge \"", s, "\" is not of the form \"left right\"");
        merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
      } else {  // ["left", "right"]
        TESSERA_CHECK(e.is_array() && e.size() == 2, "tokenizer.json: merge ", e.dump(),
                      " is neither \"a b\" nor [a, b]");
        merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
      }
    }
    std::vector<AddedToken> added;
    if (j.contains("added_tokens")) {
      for (const auto& a : j.at("added_tokens")) {
        TESSERA_CHECK(!a.value("single_word", false), "tokenizer.json: added token \"",
                      a.value("content", ""), "\" has single_word=true, which is not supported");
        added.push_back({a.at("content").get<std::string>(), a.at("id").template get<Id>(),
                         a.value("special", false), a.value("normalized", false),
                         a.value("lstrip", false), a.value("rstrip", false)});
      }
    }
    const PreTokenizer pre = PreTokenizer::from_json(
        j.contains("pre_tokenizer") ? j.at("pre_tokenizer") : nlohmann::json());
    if (!m.contains("unk_token") || m.at("unk_token").is_null()) {
      return from_parts(vocab, merges, std::move(added), pre, std::move(segmenter),
                        m.value("ignore_merges", false));
    }
    auto t = from_parts(vocab, merges, std::move(added), pre, std::move(segmenter),
                        m.value("ignore_merges", false));
    t.unk_ = t.token_to_id(m.at("unk_token").get<std::string>()).value_or(kNoId);
    return t;
  }

  static BasicBpeTokenizer from_file(const std::filesystem::path& tokenizer_json,
                                     CjkSegmenter segmenter = {}) {
    std::ifstream in(tokenizer_json);
    TESSERA_CHECK(in, "tokenizer: cannot open ", tokenizer_json.string());
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      fail("tokenizer: ", tokenizer_json.string(), " is not valid JSON: ", e.what());
    }
    try {
      return from_json(j, std::move(segmenter));
    } catch (const nlohmann::json::exception& e) {
      fail("tokenizer: ", tokenizer_json.string(), " is not a tokenizer.json: ", e.what());
    }
  }

  // GPT-2's original files: encoder.json (token -> id) and vocab.bpe (one merge a line).
  // "<|endoftext|>" becomes a special added token, as in the Hugging Face GPT-2 tokenizer.
  static BasicBpeTokenizer from_gpt2_files(const std::filesystem::path& encoder_json,
                                           const std::filesystem::path& vocab_bpe,
                                           CjkSegmenter segmenter = {}) {
    std::ifstream ej(encoder_json);
    TESSERA_CHECK(ej, "tokenizer: cannot open ", encoder_json.string());
    const nlohmann::json enc = nlohmann::json::parse(ej);
    std::vector<std::pair<std::string, Id>> vocab;
    for (const auto& [k, v] : enc.items()) vocab.emplace_back(k, v.template get<Id>());
    std::ifstream mb(vocab_bpe);
    TESSERA_CHECK(mb, "tokenizer: cannot open ", vocab_bpe.string());
    std::vector<std::pair<std::string, std::string>> merges;
    std::string line;
    std::size_t line_no = 0;
    while (std::getline(mb, line)) {
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || line.rfind("#version", 0) == 0) continue;
      const auto sp = line.find(' ');
      TESSERA_CHECK(sp != std::string::npos, "tokenizer: ", vocab_bpe.string(), ":", line_no,
                    ": expected \"left right\", got \"", line, "\"");
      merges.emplace_back(line.substr(0, sp), line.substr(sp + 1));
    }
    std::vector<AddedToken> added;
    if (auto it = enc.find("<|endoftext|>"); it != enc.end()) {
      added.push_back({"<|endoftext|>", it->template get<Id>(), true, false, false, false});
    }
    return from_parts(vocab, merges, std::move(added), PreTokenizer::gpt2(), std::move(segmenter));
  }

  // ---- saving ----------------------------------------------------------------------------

  nlohmann::json to_json() const {
    nlohmann::json added = nlohmann::json::array();
    for (const auto& a : added_) {
      added.push_back({{"id", a.id},
                       {"content", a.content},
                       {"single_word", false},
                       {"lstrip", a.lstrip},
                       {"rstrip", a.rstrip},
                       {"normalized", a.normalized},
                       {"special", a.special}});
    }
    std::sort(added.begin(), added.end(),
              [](const auto& x, const auto& y) { return x["id"] < y["id"]; });
    nlohmann::json vocab = nlohmann::json::object();  // keys sorted; the reader does not care
    for (Id id = 0; id < alias_.size(); ++id) {
      if (in_model_[id]) vocab[alias_[id]] = id;
    }
    nlohmann::json merges = nlohmann::json::array();
    for (const auto& [l, r] : merge_list_) merges.push_back(alias_[l] + " " + alias_[r]);
    nlohmann::json model = {{"type", "BPE"},
                            {"dropout", nullptr},
                            {"unk_token", nullptr},
                            {"continuing_subword_prefix", nullptr},
                            {"end_of_word_suffix", nullptr},
                            {"fuse_unk", false},
                            {"byte_fallback", false},
                            {"ignore_merges", ignore_merges_},
                            {"merges", merges}};
    model["vocab"] = std::move(vocab);
    return {{"version", "1.0"},
            {"truncation", nullptr},
            {"padding", nullptr},
            {"added_tokens", added},
            {"normalizer", nullptr},
            {"pre_tokenizer", pre_.to_json()},
            {"post_processor",
             {{"type", "ByteLevel"},
              {"add_prefix_space", false},
              {"trim_offsets", false},
              {"use_regex", false}}},
            {"decoder",
             {{"type", "ByteLevel"},
              {"add_prefix_space", false},
              {"trim_offsets", true},
              {"use_regex", true}}},
            {"model", model}};
  }

  void save(const std::filesystem::path& path) const {
    std::ofstream out(path);
    TESSERA_CHECK(out, "tokenizer: cannot write ", path.string());
    out << to_json().dump(1) << '\n';
    TESSERA_CHECK(out.good(), "tokenizer: writing ", path.string(), " failed");
  }

  // ---- encode ----------------------------------------------------------------------------

  std::vector<Id> encode(std::string_view text, EncodeOptions opt = {}) const {
    std::vector<Id> out;
    out.reserve(text.size() / 3 + 1);
    encode_into(text, out, opt);
    return out;
  }

  // Appends the ids of text to out.
  void encode_into(std::string_view text, std::vector<Id>& out, EncodeOptions opt = {}) const {
    split_added(text, opt, 0, [&](std::string_view seg, Id added_id) {
      if (added_id != kNoId) {
        out.push_back(added_id);
      } else {
        encode_ordinary(seg, out);
      }
    });
  }

  // Encodes every text, in parallel over OpenMP threads; the result does not depend on the
  // thread count. An error in any text is rethrown after the loop.
  std::vector<std::vector<Id>> encode_batch(std::span<const std::string> texts,
                                            EncodeOptions opt = {}) const {
    std::vector<std::vector<Id>> out(texts.size());
    std::exception_ptr error;
    const auto n = static_cast<std::int64_t>(texts.size());
#pragma omp parallel for schedule(dynamic, 8)
    for (std::int64_t i = 0; i < n; ++i) {
      try {
        out[static_cast<std::size_t>(i)] = encode(texts[static_cast<std::size_t>(i)], opt);
      } catch (...) {
#pragma omp critical(tessera_tokenizer_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return out;
  }

  // ---- decode ----------------------------------------------------------------------------

  // The bytes the ids stand for. Exact inverse of encode for any input bytes.
  std::string decode(std::span<const Id> ids, bool skip_special = false) const {
    std::string out;
    for (Id id : ids) {
      TESSERA_CHECK(id < bytes_.size() && (in_model_[id] || is_added(id)), "tokenizer decode: id ",
                    id, " is not in the vocabulary (size ", bytes_.size(), ")");
      if (skip_special && is_special(id)) continue;
      out += bytes_[id];
    }
    return out;
  }
  std::string decode(const std::vector<Id>& ids, bool skip_special = false) const {
    return decode(std::span<const Id>(ids), skip_special);
  }

  // ---- vocabulary ------------------------------------------------------------------------

  // One more than the largest id (ids below it may be unused in odd files).
  std::size_t vocab_size() const { return bytes_.size(); }
  std::size_t merge_count() const { return merge_list_.size(); }
  const std::vector<AddedToken>& added_tokens() const { return added_; }
  const PreTokenizer& pre_tokenizer() const { return pre_; }
  const CjkSegmenter& segmenter() const { return segmenter_; }

  // The token's text as the vocabulary file spells it (byte-level alias form).
  const std::string& id_to_token(Id id) const {
    TESSERA_CHECK(id < alias_.size() && (in_model_[id] || is_added(id)), "tokenizer: id ", id,
                  " is not in the vocabulary");
    return alias_[id];
  }
  // The raw bytes of a token.
  const std::string& id_to_bytes(Id id) const {
    id_to_token(id);
    return bytes_[id];
  }
  // Looks a token up by its vocabulary spelling or an added token's content.
  std::optional<Id> token_to_id(std::string_view token) const {
    for (const auto& a : added_) {
      if (a.content == token) return a.id;
    }
    if (auto it = alias_index_.find(token); it != alias_index_.end()) return it->second;
    return std::nullopt;
  }
  // The id of a special token, or an error naming it (e.g. a BOS token the user asked for).
  Id special_token_id(std::string_view content) const {
    for (const auto& a : added_) {
      if (a.content == content && a.special) return a.id;
    }
    std::ostringstream known;
    int shown = 0;
    for (const auto& a : added_) {
      if (a.special && shown++ < 8) known << (shown > 1 ? ", " : "") << '"' << a.content << '"';
    }
    fail("tokenizer: \"", content,
         "\" is not a special token of this tokenizer (some that are: ", known.str(), ")");
  }
  bool is_special(Id id) const { return id < special_.size() && special_[id] == 2; }
  bool is_added(Id id) const { return id < special_.size() && special_[id] != 0; }

  // The pieces BPE sees for text without added tokens (pre-tokeniser, then the CJK policy).
  std::vector<std::string_view> pieces(std::string_view text) const {
    std::vector<std::string_view> out;
    for_each_piece(text, [&](std::string_view p) { out.push_back(p); });
    return out;
  }

  // Calls f(piece) for every piece BPE would see in text: added tokens are cut out first
  // (and skipped), the rest pre-tokenised and cut by the CJK policy. The trainer counts
  // words with this, so training and encoding see the same pieces.
  template <class F>
  void visit_pieces(std::string_view text, F&& f, EncodeOptions opt = {}) const {
    split_added(text, opt, 0, [&](std::string_view seg, Id added_id) {
      if (added_id == kNoId) for_each_piece(seg, f);
    });
  }

  // BPE of one piece, bypassing pre-tokenisation (used by the trainer's tests and tools).
  void encode_piece(std::string_view piece, std::vector<Id>& out) const { bpe(piece, out); }

 private:
  static void check_normalizer(const nlohmann::json& n) {
    if (n.is_null()) return;
    const std::string type = n.value("type", "");
    if (type == "Sequence" && n.at("normalizers").empty()) return;
    fail("tokenizer.json: normalizer ", n.dump(),
         " is not supported (only none or an empty Sequence)");
  }

  void index_added() {
    special_.assign(bytes_.size(), 0);
    for (auto& v : first_byte_) v.clear();
    std::vector<std::size_t> order(added_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return added_[a].content.size() > added_[b].content.size();
    });
    for (std::size_t i : order) {
      const auto& a = added_[i];
      first_byte_[static_cast<unsigned char>(a.content[0])].push_back(
          static_cast<std::uint32_t>(i));
      special_[a.id] = a.special ? 2 : 1;
    }
  }

  // Cuts text at added tokens. Pass 0 looks for tokens with normalized=false, pass 1 for the
  // others in what pass 0 left (the reference library's order). emit(segment, id or kNoId).
  static bool ascii_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

  template <class Emit>
  void split_added(std::string_view text, const EncodeOptions& opt, int pass, Emit&& emit) const {
    if (pass == 2 || added_.empty()) {
      if (!text.empty()) emit(text, kNoId);
      return;
    }
    auto pass_on = [&](std::string_view seg) {
      if (!seg.empty()) split_added(seg, opt, pass + 1, emit);
    };
    std::size_t done = 0, i = 0;
    while (i < text.size()) {
      const AddedToken* hit = nullptr;
      for (std::uint32_t k : first_byte_[static_cast<unsigned char>(text[i])]) {
        const AddedToken& a = added_[k];
        if (a.normalized != (pass == 1) || (a.special && !opt.special_tokens)) continue;
        if (text.compare(i, a.content.size(), a.content) == 0) {
          hit = &a;  // candidates are longest first, so the first hit is leftmost-longest
          break;
        }
      }
      if (!hit) {
        ++i;
        continue;
      }
      std::size_t b = i, e = i + hit->content.size();
      if (hit->lstrip) {
        while (b > done && ascii_space(text[b - 1])) --b;
      }
      if (hit->rstrip) {
        while (e < text.size() && ascii_space(text[e])) ++e;
      }
      pass_on(text.substr(done, b - done));
      emit(text.substr(b, e - b), hit->id);
      i = done = e;
    }
    pass_on(text.substr(done));
  }

  template <class F>
  void for_each_piece(std::string_view text, F&& f) const {
    pre_.split(text, [&](std::size_t off, std::size_t len) {
      const std::string_view piece = text.substr(off, len);
      if constexpr (CjkSegmenter::kCuts) {
        thread_local std::vector<std::size_t> cuts;
        cuts.clear();
        segmenter_.cuts(piece, cuts);
        std::size_t from = 0;
        for (std::size_t c : cuts) {
          if (c > from) f(piece.substr(from, c - from));
          from = c;
        }
        f(piece.substr(from));
      } else {
        f(piece);
      }
    });
  }

  void encode_ordinary(std::string_view text, std::vector<Id>& out) const {
    for_each_piece(text, [&](std::string_view piece) { bpe(piece, out); });
  }

  Id byte_token(unsigned char b) const {
    const Id id = byte_id_[b];
    if (id != kNoId) return id;
    TESSERA_CHECK(unk_ != kNoId, "tokenizer encode: byte 0x", std::hex, int{b},
                  " has no token in this vocabulary and there is no unknown token");
    return unk_;
  }

  // Byte-pair merging of one piece: repeatedly merge the adjacent pair of lowest rank,
  // leftmost first. Short pieces use a plain array; long ones a heap (see file header).
  void bpe(std::string_view piece, std::vector<Id>& out) const {
    if (piece.size() == 1) {
      out.push_back(byte_token(static_cast<unsigned char>(piece[0])));
      return;
    }
    if (ignore_merges_) {
      if (auto it = whole_.find(piece); it != whole_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    constexpr std::size_t kCacheMaxWord = 256, kCacheMaxEntries = 1 << 17;
    struct Cache {
      std::uint64_t owner = ~std::uint64_t{0};
      std::unordered_map<std::string, std::vector<Id>, detail::StringHash, std::equal_to<>> map;
    };
    thread_local Cache cache;
    const bool cacheable = piece.size() <= kCacheMaxWord;
    if (cacheable) {
      if (cache.owner != instance_) {
        cache.map.clear();
        cache.owner = instance_;
      }
      if (auto it = cache.map.find(piece); it != cache.map.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const std::size_t start = out.size();
    if (piece.size() <= 48) {
      bpe_small(piece, out);
    } else {
      bpe_large(piece, out);
    }
    if (cacheable) {
      if (cache.map.size() >= kCacheMaxEntries) cache.map.clear();
      cache.map.emplace(
          std::string(piece),
          std::vector<Id>(out.begin() + static_cast<std::ptrdiff_t>(start), out.end()));
    }
  }

  void bpe_small(std::string_view piece, std::vector<Id>& out) const {
    std::array<Id, 48> sym;
    std::array<Id, 48> rank;  // rank of the pair (sym[k], sym[k+1])
    std::array<Id, 48> made;  // id it merges into
    std::size_t n = piece.size();
    for (std::size_t k = 0; k < n; ++k) sym[k] = byte_token(static_cast<unsigned char>(piece[k]));
    auto look = [&](std::size_t k) {
      const auto* m = merges_.find(sym[k], sym[k + 1]);
      rank[k] = m ? m->rank : kNoId;
      made[k] = m ? m->id : kNoId;
    };
    for (std::size_t k = 0; k + 1 < n; ++k) look(k);
    while (n > 1) {
      std::size_t best = 0;
      for (std::size_t k = 1; k + 1 < n; ++k) {
        if (rank[k] < rank[best]) best = k;
      }
      if (rank[best] == kNoId) break;
      sym[best] = made[best];
      for (std::size_t k = best + 1; k + 1 < n; ++k) {
        sym[k] = sym[k + 1];
        rank[k] = rank[k + 1];
        made[k] = made[k + 1];
      }
      --n;
      if (best > 0) look(best - 1);
      if (best + 1 < n) look(best);
    }
    out.insert(out.end(), sym.begin(), sym.begin() + static_cast<std::ptrdiff_t>(n));
  }

  void bpe_large(std::string_view piece, std::vector<Id>& out) const {
    struct Sym {
      Id id;
      std::int64_t prev, next;
      bool alive;
    };
    struct Cand {
      Id rank;
      std::int64_t pos;
      Id made;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    const auto n = static_cast<std::int64_t>(piece.size());
    std::vector<Sym> s(static_cast<std::size_t>(n));
    for (std::int64_t k = 0; k < n; ++k) {
      s[static_cast<std::size_t>(k)] = {
          byte_token(static_cast<unsigned char>(piece[static_cast<std::size_t>(k)])), k - 1,
          k + 1 < n ? k + 1 : -1, true};
    }
    std::priority_queue<Cand, std::vector<Cand>, std::greater<>> heap;
    auto push = [&](std::int64_t a) {
      const std::int64_t b = s[static_cast<std::size_t>(a)].next;
      if (b < 0) return;
      if (const auto* m =
              merges_.find(s[static_cast<std::size_t>(a)].id, s[static_cast<std::size_t>(b)].id)) {
        heap.push({m->rank, a, m->id});
      }
    };
    for (std::int64_t k = 0; k + 1 < n; ++k) push(k);
    while (!heap.empty()) {
      const Cand c = heap.top();
      heap.pop();
      Sym& a = s[static_cast<std::size_t>(c.pos)];
      if (!a.alive || a.next < 0) continue;
      Sym& b = s[static_cast<std::size_t>(a.next)];
      const auto* m = merges_.find(a.id, b.id);
      if (!m || m->id != c.made) continue;  // stale: this pair has changed since it was queued
      a.id = c.made;
      b.alive = false;
      a.next = b.next;
      if (a.next >= 0) s[static_cast<std::size_t>(a.next)].prev = c.pos;
      if (a.prev >= 0) push(a.prev);
      push(c.pos);
    }
    for (std::int64_t k = 0; k >= 0; k = s[static_cast<std::size_t>(k)].next) {
      out.push_back(s[static_cast<std::size_t>(k)].id);
    }
  }

  BasicBpeTokenizer() : instance_(++detail::tokenizer_instance_counter()) {}

 public:
  BasicBpeTokenizer(const BasicBpeTokenizer& o) { *this = o; }
  BasicBpeTokenizer& operator=(const BasicBpeTokenizer& o) {
    if (this != &o) {
      copy_fields(o);
      instance_ = ++detail::tokenizer_instance_counter();
    }
    return *this;
  }
  // A moved-from tokenizer gets a fresh identity, so no thread's word cache can answer for it.
  BasicBpeTokenizer(BasicBpeTokenizer&& o) noexcept { move_from(o); }
  BasicBpeTokenizer& operator=(BasicBpeTokenizer&& o) noexcept {
    if (this != &o) move_from(o);
    return *this;
  }

 private:
  void move_from(BasicBpeTokenizer& o) noexcept {
    alias_ = std::move(o.alias_);
    bytes_ = std::move(o.bytes_);
    in_model_ = std::move(o.in_model_);
    special_ = std::move(o.special_);
    byte_id_ = o.byte_id_;
    merges_ = std::move(o.merges_);
    merge_list_ = std::move(o.merge_list_);
    added_ = std::move(o.added_);
    first_byte_ = std::move(o.first_byte_);
    pre_ = std::move(o.pre_);
    segmenter_ = std::move(o.segmenter_);
    whole_ = std::move(o.whole_);
    alias_index_ = std::move(o.alias_index_);
    ignore_merges_ = o.ignore_merges_;
    unk_ = o.unk_;
    instance_ = o.instance_;
    o.instance_ = ++detail::tokenizer_instance_counter();
  }

  void copy_fields(const BasicBpeTokenizer& o) {
    alias_ = o.alias_;
    bytes_ = o.bytes_;
    in_model_ = o.in_model_;
    special_ = o.special_;
    byte_id_ = o.byte_id_;
    merges_ = o.merges_;
    merge_list_ = o.merge_list_;
    added_ = o.added_;
    first_byte_ = o.first_byte_;
    pre_ = o.pre_;
    segmenter_ = o.segmenter_;
    whole_ = o.whole_;
    alias_index_ = o.alias_index_;
    ignore_merges_ = o.ignore_merges_;
    unk_ = o.unk_;
  }

  std::vector<std::string> alias_;      // id -> vocabulary spelling
  std::vector<std::string> bytes_;      // id -> raw bytes
  std::vector<std::uint8_t> in_model_;  // id is a BPE vocabulary entry
  std::vector<std::uint8_t> special_;   // 0 no added token, 1 added, 2 added and special
  std::array<Id, 256> byte_id_{};
  detail::MergeTable merges_;
  std::vector<std::pair<Id, Id>> merge_list_;  // rank order, for saving
  std::vector<AddedToken> added_;
  std::array<std::vector<std::uint32_t>, 256> first_byte_;  // added-token candidates, longest first
  PreTokenizer pre_;
  CjkSegmenter segmenter_{};
  std::unordered_map<std::string, Id, detail::StringHash, std::equal_to<>> whole_;
  std::unordered_map<std::string, Id, detail::StringHash, std::equal_to<>> alias_index_;
  bool ignore_merges_ = false;
  Id unk_ = kNoId;
  std::uint64_t instance_ = 0;
};

// The tokenizer of published models: pieces exactly as Hugging Face's library makes them.
using BpeTokenizer = BasicBpeTokenizer<KeepCjkRuns>;

}  // namespace tessera::data

// tessera/io/gguf_llama.hpp — what a GGUF file of the Llama architecture says about its model
// and its tokenizer, validated: hyperparameters, the tensor table, and the embedded byte-level
// BPE tokenizer mapped onto tessera's data::BpeTokenizer.
//
// Why a separate header from models/llama.hpp: these are the checks on untrusted metadata
// (layer and head counts in range, token ids inside the vocabulary, byte tokens well formed),
// cheap to compile and run, so the fuzz target and the regression tests exercise them without
// instantiating a model. models/llama.hpp then only moves validated tensors into a Decoder.
//
//   const io::GgufFile file = io::GgufFile::open(path);
//   const io::LlamaHparams hp = io::read_llama_hparams(file);     // + check_llama_tensors
//   const io::GgufTokenizer tok = io::read_gguf_tokenizer(file);  // tok.tokenizer.encode(...)
//
// Limits (refused with a message naming the key and the value): layers <= kLlamaMaxLayers
// (llama.cpp's LLAMA_MAX_LAYERS, 512), heads <= kLlamaMaxHeads, kv_heads dividing heads, an
// even head_dim with the whole of it rotated (partial RoPE is not mapped), a vocabulary of at
// most kGgufMaxVocab tokens that agrees with llama.vocab_size and the embedding.
#pragma once

#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/data/bpe_tokenizer.hpp"
#include "tessera/data/tokenizer_pretokenizer.hpp"
#include "tessera/io/gguf.hpp"

namespace tessera::io {

inline constexpr std::int64_t kLlamaMaxLayers = 512;
inline constexpr std::int64_t kLlamaMaxHeads = 1024;
inline constexpr std::int64_t kLlamaMaxWidth = 1 << 20;   // d_model and ffn_hidden
inline constexpr std::int64_t kGgufMaxVocab = 1 << 24;

struct LlamaHparams {
  std::int64_t layers = 0, d_model = 0, heads = 0, kv_heads = 0, ffn_hidden = 0, vocab = 0;
  std::int64_t context = 0, head_dim = 0;
  double rope_theta = 10000.0, norm_eps = 1e-5;
  bool tied_embeddings = true;  // no output.weight: the head is the embedding table
};

namespace gguf_llama_detail {

inline std::int64_t in_range(const GgufFile& f, std::string_view key, std::uint64_t v,
                             std::int64_t lo, std::int64_t hi) {
  TESSERA_CHECK(v >= static_cast<std::uint64_t>(lo) && v <= static_cast<std::uint64_t>(hi),
                "gguf '", f.source(), "': ", key, " = ", v, " is outside [", lo, ", ", hi, "]");
  return static_cast<std::int64_t>(v);
}

}  // namespace gguf_llama_detail

inline void check_llama_tensors(const GgufFile& f, const LlamaHparams& hp);

// Reads and range-checks the llama.* hyperparameters, then checks the tensor table against
// them (check_llama_tensors).
inline LlamaHparams read_llama_hparams(const GgufFile& f) {
  using gguf_llama_detail::in_range;
  const std::string& arch = f.get_string("general.architecture");
  TESSERA_CHECK(arch == "llama", "gguf '", f.source(), "': general.architecture is \"", arch,
                "\"; tessera maps only \"llama\" onto its Decoder");
  LlamaHparams hp;
  hp.layers = in_range(f, "llama.block_count", f.get_u64("llama.block_count"), 1, kLlamaMaxLayers);
  hp.d_model = in_range(f, "llama.embedding_length", f.get_u64("llama.embedding_length"), 1,
                        kLlamaMaxWidth);
  hp.heads = in_range(f, "llama.attention.head_count", f.get_u64("llama.attention.head_count"), 1,
                      kLlamaMaxHeads);
  hp.kv_heads = in_range(f, "llama.attention.head_count_kv",
                         f.get_u64("llama.attention.head_count_kv",
                                   static_cast<std::uint64_t>(hp.heads)),
                         1, hp.heads);
  TESSERA_CHECK(hp.heads % hp.kv_heads == 0, "gguf '", f.source(), "': head_count ", hp.heads,
                " is not a multiple of head_count_kv ", hp.kv_heads);
  TESSERA_CHECK(hp.d_model % hp.heads == 0 && (hp.d_model / hp.heads) % 2 == 0, "gguf '",
                f.source(), "': embedding_length ", hp.d_model, " / head_count ", hp.heads,
                " is not an even head dimension");
  hp.head_dim = hp.d_model / hp.heads;
  hp.ffn_hidden = in_range(f, "llama.feed_forward_length", f.get_u64("llama.feed_forward_length"),
                           1, kLlamaMaxWidth);
  hp.context = in_range(f, "llama.context_length", f.get_u64("llama.context_length", 2048), 1,
                        std::int64_t{1} << 24);
  const std::uint64_t rope_dim =
      f.get_u64("llama.rope.dimension_count", static_cast<std::uint64_t>(hp.head_dim));
  TESSERA_CHECK(rope_dim == static_cast<std::uint64_t>(hp.head_dim), "gguf '", f.source(),
                "': llama.rope.dimension_count ", rope_dim, " differs from the head dimension ",
                hp.head_dim, " (partial RoPE is not mapped)");
  hp.rope_theta = f.get_f64("llama.rope.freq_base", 10000.0);
  TESSERA_CHECK(std::isfinite(hp.rope_theta) && hp.rope_theta > 1.0, "gguf '", f.source(),
                "': llama.rope.freq_base ", hp.rope_theta, " is not a finite number > 1");
  TESSERA_CHECK(!f.contains("llama.rope.scaling.type") ||
                    f.get_string("llama.rope.scaling.type") == "none",
                "gguf '", f.source(), "': RoPE scaling is not mapped");
  hp.norm_eps = f.get_f64("llama.attention.layer_norm_rms_epsilon");
  TESSERA_CHECK(std::isfinite(hp.norm_eps) && hp.norm_eps > 0 && hp.norm_eps < 1, "gguf '",
                f.source(), "': layer_norm_rms_epsilon ", hp.norm_eps, " is outside (0, 1)");
  const std::uint64_t n_tokens =
      f.contains("tokenizer.ggml.tokens") ? f.strings("tokenizer.ggml.tokens").size() : 0;
  hp.vocab = in_range(f, "llama.vocab_size", f.get_u64("llama.vocab_size", n_tokens), 1,
                      kGgufMaxVocab);
  hp.tied_embeddings = f.find_tensor("output.weight") == nullptr;
  check_llama_tensors(f, hp);
  return hp;
}

// The tensors a llama file must hold, each with its row-major shape; anything else (a layer
// index at or past block_count, an unknown name, a wrong shape) is refused.
inline std::vector<std::pair<std::string, Shape>> llama_tensor_table(const LlamaHparams& hp) {
  const std::int64_t C = hp.d_model, kv = hp.kv_heads * hp.head_dim, F = hp.ffn_hidden;
  std::vector<std::pair<std::string, Shape>> t;
  t.emplace_back("token_embd.weight", Shape{hp.vocab, C});
  t.emplace_back("output_norm.weight", Shape{C});
  if (!hp.tied_embeddings) t.emplace_back("output.weight", Shape{hp.vocab, C});
  for (std::int64_t l = 0; l < hp.layers; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    t.emplace_back(b + "attn_norm.weight", Shape{C});
    t.emplace_back(b + "attn_q.weight", Shape{C, C});
    t.emplace_back(b + "attn_k.weight", Shape{kv, C});
    t.emplace_back(b + "attn_v.weight", Shape{kv, C});
    t.emplace_back(b + "attn_output.weight", Shape{C, C});
    t.emplace_back(b + "ffn_norm.weight", Shape{C});
    t.emplace_back(b + "ffn_gate.weight", Shape{F, C});
    t.emplace_back(b + "ffn_up.weight", Shape{F, C});
    t.emplace_back(b + "ffn_down.weight", Shape{C, F});
  }
  return t;
}

inline void check_llama_tensors(const GgufFile& f, const LlamaHparams& hp) {
  const auto table = llama_tensor_table(hp);
  std::set<std::string, std::less<>> expected;
  for (const auto& [name, shape] : table) {
    expected.insert(name);
    const GgufTensorInfo* t = f.find_tensor(name);
    TESSERA_CHECK(t != nullptr, "gguf '", f.source(), "': tensor '", name, "' is missing");
    TESSERA_CHECK(t->shape() == shape, "gguf '", f.source(), "': tensor '", name, "' has shape ",
                  t->shape(), ", the hyperparameters give ", shape);
  }
  for (const GgufTensorInfo& t : f.tensors()) {
    if (expected.contains(t.name)) continue;
    if (t.name.starts_with("blk.")) {
      const std::string rest = t.name.substr(4);
      const auto dot = rest.find('.');
      const std::string idx = rest.substr(0, dot);
      const bool numeric = !idx.empty() && idx.size() < 10 &&
                           idx.find_first_not_of("0123456789") == std::string::npos;
      TESSERA_CHECK(!numeric || std::stoll(idx) < hp.layers, "gguf '", f.source(), "': tensor '",
                    t.name, "' names layer ", idx, " but llama.block_count is ", hp.layers);
    }
    if (t.name == "rope_freqs.weight") continue;  // only with RoPE scaling, refused above
    fail("gguf '", f.source(), "': tensor '", t.name, "' is not part of a llama model");
  }
}

// ---- the embedded tokenizer ------------------------------------------------------------------

// llama.cpp's token types (tokenizer.ggml.token_type).
enum class GgufTokenType : std::int32_t {
  kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6
};

struct GgufTokenizer {
  data::BpeTokenizer tokenizer;
  std::string pre;  // tokenizer.ggml.pre
  data::TokenId bos = data::BpeTokenizer::kNoId, eos = data::BpeTokenizer::kNoId;
  data::TokenId pad = data::BpeTokenizer::kNoId, unk = data::BpeTokenizer::kNoId;
  bool add_bos = false;
  std::string chat_template = {};  // tokenizer.chat_template ("" when absent)
};

// GGUF's pre-tokenizer names (llama.cpp's LLAMA_VOCAB_PRE_TYPE_*) that tessera's scanners
// implement exactly.
inline data::PreTokenizer gguf_pre_tokenizer(const std::string& pre, const std::string& source) {
  using data::SplitRule;
  if (pre == "gpt2" || pre == "default") return data::PreTokenizer::gpt2();
  if (pre == "smollm") return data::PreTokenizer({SplitRule::kDigitEach, SplitRule::kGpt2});
  fail("gguf '", source, "': tokenizer.ggml.pre \"", pre,
       "\" is not supported (supported: gpt2, default, smollm)");
}

// Maps tokenizer.ggml.* (model "gpt2", i.e. byte-level BPE) onto data::BpeTokenizer: NORMAL
// tokens form the vocabulary, CONTROL tokens are special added tokens and USER_DEFINED ones
// non-special added tokens (both are in the vocabulary too, as in the tokenizer.json the file
// was converted from), merges keep their rank order.
inline GgufTokenizer read_gguf_tokenizer(const GgufFile& f) {
  const std::string where = "gguf '" + f.source() + "': ";
  const std::string& model = f.get_string("tokenizer.ggml.model");
  TESSERA_CHECK(model == "gpt2", where, "tokenizer.ggml.model \"", model,
                "\" is not supported (only \"gpt2\", byte-level BPE, is)");
  const auto& tokens = f.strings("tokenizer.ggml.tokens");
  TESSERA_CHECK(!tokens.empty() && tokens.size() <= static_cast<std::size_t>(kGgufMaxVocab),
                where, "tokenizer.ggml.tokens holds ", tokens.size(), " tokens, expected 1 to ",
                kGgufMaxVocab);
  std::vector<std::int64_t> types(tokens.size(), static_cast<std::int64_t>(GgufTokenType::kNormal));
  if (f.contains("tokenizer.ggml.token_type")) {
    types = f.signed_ints("tokenizer.ggml.token_type");
    TESSERA_CHECK(types.size() == tokens.size(), where, "tokenizer.ggml.token_type holds ",
                  types.size(), " entries for ", tokens.size(), " tokens");
  }
  const auto n = static_cast<data::TokenId>(tokens.size());

  std::vector<std::pair<std::string, data::TokenId>> vocab;
  std::vector<data::AddedToken> added;
  vocab.reserve(tokens.size());
  std::set<std::string_view> seen;
  for (data::TokenId id = 0; id < n; ++id) {
    const std::int64_t type = types[id];
    TESSERA_CHECK(type >= 1 && type <= 6, where, "token ", id, " has token type ", type,
                  ", outside llama.cpp's 1..6");
    TESSERA_CHECK(!tokens[id].empty(), where, "token ", id, " is empty");
    TESSERA_CHECK(seen.insert(tokens[id]).second, where, "token \"", tokens[id], "\" (id ", id,
                  ") appears twice");
    vocab.emplace_back(tokens[id], id);
    if (type == static_cast<std::int64_t>(GgufTokenType::kControl) ||
        type == static_cast<std::int64_t>(GgufTokenType::kUserDefined)) {
      added.push_back({tokens[id], id, type == static_cast<std::int64_t>(GgufTokenType::kControl),
                       false, false, false});
    }
  }
  // A BYTE-type token names its byte as "<0xHH>"; llama.cpp once parsed that text without
  // checking it and indexed a 256-entry table with the result. Such tokens belong to
  // SentencePiece vocabularies, but whatever the model, a malformed one is refused here. (A
  // byte-level vocabulary may lack a few bytes' tokens: SmolLM2 has none for the 21 bytes that
  // never occur in UTF-8 text or rarely in it, such as 0xC0; encoding such a byte is then an
  // error of the tokenizer, never an out-of-range read.)
  auto hex = [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F') || (c >= 'a' && c <= 'f');
  };
  for (data::TokenId id = 0; id < n; ++id) {
    if (types[id] != static_cast<std::int64_t>(GgufTokenType::kByte)) continue;
    const std::string& t = tokens[id];
    TESSERA_CHECK(t.size() == 6 && t.starts_with("<0x") && t[5] == '>' && hex(t[3]) && hex(t[4]),
                  where, "byte token ", id, " \"", t, "\" is not of the form <0xHH>");
  }
  std::vector<std::pair<std::string, std::string>> merges;
  if (f.contains("tokenizer.ggml.merges")) {
    const auto& m = f.strings("tokenizer.ggml.merges");
    merges.reserve(m.size());
    for (std::size_t r = 0; r < m.size(); ++r) {
      const auto sp = m[r].find(' ');
      TESSERA_CHECK(sp != std::string::npos && m[r].find(' ', sp + 1) == std::string::npos, where,
                    "merge ", r, " \"", m[r], "\" is not of the form \"left right\"");
      merges.emplace_back(m[r].substr(0, sp), m[r].substr(sp + 1));
    }
  }
  const std::string pre =
      f.contains("tokenizer.ggml.pre") ? f.get_string("tokenizer.ggml.pre") : "default";
  GgufTokenizer out{data::BpeTokenizer::from_parts(vocab, merges, std::move(added),
                                                   gguf_pre_tokenizer(pre, f.source())),
                    pre};
  // Every special id must index the vocabulary (llama.cpp once read past it).
  auto id_of = [&](const char* key) {
    if (!f.contains(key)) return data::BpeTokenizer::kNoId;
    const std::uint64_t v = f.get_u64(key);
    TESSERA_CHECK(v < n, where, key, " = ", v, " is outside the vocabulary of ", n, " tokens");
    return static_cast<data::TokenId>(v);
  };
  out.bos = id_of("tokenizer.ggml.bos_token_id");
  out.eos = id_of("tokenizer.ggml.eos_token_id");
  out.pad = id_of("tokenizer.ggml.padding_token_id");
  out.unk = id_of("tokenizer.ggml.unknown_token_id");
  (void)id_of("tokenizer.ggml.seperator_token_id");
  (void)id_of("tokenizer.ggml.eot_token_id");
  out.add_bos = f.get_bool("tokenizer.ggml.add_bos_token", false);
  if (f.contains("tokenizer.chat_template")) out.chat_template = f.get_string("tokenizer.chat_template");
  return out;
}

}  // namespace tessera::io

// tessera/models/bert.hpp — a BERT encoder that loads Hugging Face weights, and the
// sentence-transformers embedding on top of it (all-MiniLM-L6-v2 and friends).
//
// Why a model of its own next to the R1 Encoder<Config> (models/encoder.hpp): a published
// BERT checkpoint fixes its architecture, and it is not the R1 block. BERT adds learned
// absolute position and token-type embeddings to the word embeddings, normalises *after*
// each residual sum (post-norm) with LayerNorm, has biases on every projection, and uses
// exact (erf) GELU; the R1 stack is pre-norm RMSNorm with RoPE and no biases. Loading real
// weights is the point here, so the layer sizes come from the checkpoint's config.json at run
// time and only the number type is a template parameter.
//
// Inference only (no backward): it serves sentence embeddings, e.g. for the learned quality
// filter (data/clean/quality_model.hpp). The work is in ops::linear (oneDNN / OpenBLAS behind
// it), ops::layer_norm, ops::gelu and ops::softmax; attention is softmax(Q K^T / sqrt(d)) V per
// sentence with two batched ops::matmul calls over the heads, sentences spread over OpenMP
// threads. Padding keys get the most negative finite score, as in the reference, so their
// probability is exactly 0.
//
//   auto model = tessera::models::SentenceEncoder<float>::from_pretrained(dir);
//   Tensor<float> e = model.encode({"A sentence.", "另一个句子。"});   // (2, 384), unit rows
//
// Shapes: ids, token types, attention mask (B, L) int32; hidden states (B, L, hidden);
// sentence embeddings (B, hidden).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/data/wordpiece.hpp"
#include "tessera/io/safetensors.hpp"
#include "tessera/ops/activation.hpp"
#include "tessera/ops/elementwise.hpp"
#include "tessera/ops/embedding.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/ops/norm.hpp"
#include "tessera/ops/softmax.hpp"

namespace tessera::models {

// The sizes of a BERT checkpoint (Hugging Face config.json names in the comments).
struct BertConfig {
  int64_t vocab_size = 30522;                     // vocab_size
  int64_t hidden_size = 384;                      // hidden_size
  int64_t num_layers = 6;                         // num_hidden_layers
  int64_t num_heads = 12;                         // num_attention_heads
  int64_t intermediate_size = 1536;               // intermediate_size
  int64_t max_positions = 512;                    // max_position_embeddings
  int64_t type_vocab_size = 2;                    // type_vocab_size
  double layer_norm_eps = 1e-12;                  // layer_norm_eps
  ops::GeluApprox gelu = ops::GeluApprox::kNone;  // hidden_act: "gelu" exact, "gelu_new" tanh

  int64_t head_dim() const { return hidden_size / num_heads; }

  void validate(std::string_view where = "BertConfig") const {
    auto positive = [&](int64_t v, const char* name) {
      TESSERA_CHECK(v > 0, where, ": ", name, " must be positive, got ", v);
    };
    positive(vocab_size, "vocab_size");
    positive(hidden_size, "hidden_size");
    positive(num_layers, "num_hidden_layers");
    positive(num_heads, "num_attention_heads");
    positive(intermediate_size, "intermediate_size");
    positive(max_positions, "max_position_embeddings");
    positive(type_vocab_size, "type_vocab_size");
    TESSERA_CHECK(hidden_size % num_heads == 0, where, ": hidden_size ", hidden_size,
                  " is not a multiple of num_attention_heads ", num_heads);
    TESSERA_CHECK(std::isfinite(layer_norm_eps) && layer_norm_eps >= 0, where,
                  ": layer_norm_eps must be finite and non-negative, got ", layer_norm_eps);
    TESSERA_CHECK(vocab_size < (int64_t{1} << 31), where, ": vocab_size ", vocab_size,
                  " does not fit int32 ids");
  }

  // Reads a Hugging Face config.json. Only what changes the arithmetic is accepted:
  // model_type "bert" (when given), absolute positions, an encoder (not is_decoder), and
  // hidden_act gelu / gelu_new / gelu_pytorch_tanh.
  static BertConfig from_json(const nlohmann::json& j, const std::string& source) {
    const std::string where = "BertConfig '" + source + "'";
    TESSERA_CHECK(j.is_object(), where, ": not a JSON object");
    auto text = [&](const char* key, const char* fallback) {
      if (!j.contains(key) || j[key].is_null()) return std::string(fallback);
      TESSERA_CHECK(j[key].is_string(), where, ": ", key, " must be a string");
      return j[key].get<std::string>();
    };
    auto integer = [&](const char* key) {
      TESSERA_CHECK(j.contains(key), where, ": ", key, " is missing");
      TESSERA_CHECK(j[key].is_number_integer(), where, ": ", key, " must be an integer, got ",
                    j[key].dump());
      return j[key].get<int64_t>();
    };
    const std::string type = text("model_type", "bert");
    TESSERA_CHECK(type == "bert", where, ": model_type is '", type, "', expected 'bert'");
    const std::string pos = text("position_embedding_type", "absolute");
    TESSERA_CHECK(pos == "absolute", where, ": position_embedding_type '", pos,
                  "' is not supported (only 'absolute')");
    TESSERA_CHECK(
        !(j.contains("is_decoder") && j["is_decoder"].is_boolean() && j["is_decoder"].get<bool>()),
        where, ": is_decoder is true; BertEncoder is an encoder");
    BertConfig c;
    c.vocab_size = integer("vocab_size");
    c.hidden_size = integer("hidden_size");
    c.num_layers = integer("num_hidden_layers");
    c.num_heads = integer("num_attention_heads");
    c.intermediate_size = integer("intermediate_size");
    c.max_positions = integer("max_position_embeddings");
    c.type_vocab_size = j.contains("type_vocab_size") ? integer("type_vocab_size") : 2;
    if (j.contains("layer_norm_eps")) {
      TESSERA_CHECK(j["layer_norm_eps"].is_number(), where, ": layer_norm_eps must be a number");
      c.layer_norm_eps = j["layer_norm_eps"].get<double>();
    }
    const std::string act = text("hidden_act", "gelu");
    if (act == "gelu")
      c.gelu = ops::GeluApprox::kNone;
    else if (act == "gelu_new" || act == "gelu_pytorch_tanh")
      c.gelu = ops::GeluApprox::kTanh;
    else
      fail(where, ": hidden_act '", act,
           "' is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh)");
    c.validate(where);
    return c;
  }

  static BertConfig from_file(const std::filesystem::path& path) {
    std::ifstream in(path);
    TESSERA_CHECK(in.good(), "BertConfig: cannot open '", path.string(), "'");
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const std::exception& e) {
      fail("BertConfig '", path.string(), "': not valid JSON: ", e.what());
    }
    return from_json(j, path.string());
  }
};

template <class T = float>
class BertEncoder {
 public:
  struct Layer {
    Tensor<T> q_w, q_b, k_w, k_b, v_w, v_b;  // (hidden, hidden), (hidden)
    Tensor<T> o_w, o_b, ln1_w, ln1_b;        // attention output projection and its LayerNorm
    Tensor<T> ff1_w, ff1_b;                  // (intermediate, hidden), (intermediate)
    Tensor<T> ff2_w, ff2_b, ln2_w, ln2_b;    // (hidden, intermediate), (hidden)
  };

  // Loads the weights of a Hugging Face BertModel from a safetensors file. Tensor names are
  // the checkpoint's ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.
  // query.weight", ...), optionally under a "bert." prefix (task-head checkpoints). Every
  // missing or mis-shaped tensor is listed in one error; the pooler and other heads are not
  // used. Stored floats of any width are converted to T (io::SafetensorsFile::read_as).
  static BertEncoder load(const BertConfig& config, const std::filesystem::path& weights) {
    config.validate();
    BertEncoder m;
    m.cfg_ = config;
    io::SafetensorsFile file = io::SafetensorsFile::open(weights);
    const std::string prefix = !file.contains("embeddings.word_embeddings.weight") &&
                                       file.contains("bert.embeddings.word_embeddings.weight")
                                   ? "bert."
                                   : "";
    std::vector<std::string> problems;
    std::set<std::string> used;
    m.visit_parameters([&](const std::string& name, Tensor<T>& t) {
      const std::string stored = prefix + name;
      used.insert(stored);
      if (!file.contains(stored)) {
        problems.push_back("tensor '" + stored + "' is missing");
        return;
      }
      const io::TensorInfo& info = file.info(stored);
      const std::vector<int64_t> want(t.shape().begin(), t.shape().end());
      if (info.shape != want) {
        problems.push_back("tensor '" + stored + "' has shape " + shape_text(info.shape) +
                           ", the config needs " + shape_text(want));
        return;
      }
      if (!io::is_floating(info.dtype)) {
        problems.push_back("tensor '" + stored + "' is stored as " +
                           std::string(io::dtype_name(info.dtype)) + ", not a float type");
      }
    });
    // A layer beyond num_hidden_layers means the config and the weights disagree.
    for (const auto& name : file.names()) {
      const std::string layer_prefix = prefix + "encoder.layer.";
      if (!name.starts_with(layer_prefix) || used.count(name)) continue;
      problems.push_back("tensor '" + name + "' is not part of a " +
                         std::to_string(config.num_layers) + "-layer model");
    }
    if (!problems.empty()) {
      std::string msg = "BertEncoder: '" + weights.string() + "' does not fit the config (" +
                        std::to_string(config.num_layers) + " layers, hidden " +
                        std::to_string(config.hidden_size) + "): ";
      for (std::size_t i = 0; i < problems.size() && i < 12; ++i)
        msg += (i ? "; " : "") + problems[i];
      if (problems.size() > 12) msg += "; and " + std::to_string(problems.size() - 12) + " more";
      fail(msg);
    }
    m.visit_parameters(
        [&](const std::string& name, Tensor<T>& t) { t = file.read_as<T>(prefix + name); });
    return m;
  }

  // A model of the config's shapes with zero weights, to be filled through visit_parameters.
  static BertEncoder with_config(const BertConfig& config) {
    config.validate();
    BertEncoder m;
    m.cfg_ = config;
    m.visit_parameters([](const std::string&, Tensor<T>&) {});
    return m;
  }

  // A model directory: config.json and model.safetensors.
  static BertEncoder from_pretrained(const std::filesystem::path& dir) {
    const auto weights = dir / "model.safetensors";
    TESSERA_CHECK(std::filesystem::exists(weights), "BertEncoder: '", weights.string(),
                  "' does not exist");
    return load(BertConfig::from_file(dir / "config.json"), weights);
  }

  const BertConfig& config() const { return cfg_; }

  // Every weight under its Hugging Face name, with the shape the config gives it (tensors
  // are allocated here for a fresh model). f(const std::string& name, Tensor<T>& t).
  template <class F>
  void visit_parameters(F&& f) {
    const int64_t h = cfg_.hidden_size, ff = cfg_.intermediate_size;
    auto param = [&](const std::string& name, Tensor<T>& t, Shape shape) {
      if (t.shape() != shape) t = Tensor<T>(shape);
      f(name, t);
    };
    param("embeddings.word_embeddings.weight", word_, Shape{cfg_.vocab_size, h});
    param("embeddings.position_embeddings.weight", position_, Shape{cfg_.max_positions, h});
    param("embeddings.token_type_embeddings.weight", token_type_, Shape{cfg_.type_vocab_size, h});
    param("embeddings.LayerNorm.weight", emb_ln_w_, Shape{h});
    param("embeddings.LayerNorm.bias", emb_ln_b_, Shape{h});
    layers_.resize(static_cast<std::size_t>(cfg_.num_layers));
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      Layer& l = layers_[static_cast<std::size_t>(i)];
      const std::string p = "encoder.layer." + std::to_string(i) + ".";
      param(p + "attention.self.query.weight", l.q_w, Shape{h, h});
      param(p + "attention.self.query.bias", l.q_b, Shape{h});
      param(p + "attention.self.key.weight", l.k_w, Shape{h, h});
      param(p + "attention.self.key.bias", l.k_b, Shape{h});
      param(p + "attention.self.value.weight", l.v_w, Shape{h, h});
      param(p + "attention.self.value.bias", l.v_b, Shape{h});
      param(p + "attention.output.dense.weight", l.o_w, Shape{h, h});
      param(p + "attention.output.dense.bias", l.o_b, Shape{h});
      param(p + "attention.output.LayerNorm.weight", l.ln1_w, Shape{h});
      param(p + "attention.output.LayerNorm.bias", l.ln1_b, Shape{h});
      param(p + "intermediate.dense.weight", l.ff1_w, Shape{ff, h});
      param(p + "intermediate.dense.bias", l.ff1_b, Shape{ff});
      param(p + "output.dense.weight", l.ff2_w, Shape{h, ff});
      param(p + "output.dense.bias", l.ff2_b, Shape{h});
      param(p + "output.LayerNorm.weight", l.ln2_w, Shape{h});
      param(p + "output.LayerNorm.bias", l.ln2_b, Shape{h});
    }
  }

  // The last hidden state (B, L, hidden) for ids, attention mask (1 = token, 0 = padding) and
  // token types (B, L); token_types may be omitted (all 0). Positions are 0..L-1 in every row.
  // Padded positions are computed as in the reference (they attend to the real tokens) but
  // never influence a real token.
  Tensor<T> forward(TensorView<const int32_t> ids, TensorView<const int32_t> mask,
                    std::optional<TensorView<const int32_t>> token_types = std::nullopt) const {
    TESSERA_CHECK(ids.rank() == 2, "BertEncoder::forward: ids must be (batch, length), got ",
                  ids.shape());
    check_same_shape("BertEncoder::forward", "attention_mask", mask.shape(), "ids", ids.shape());
    const int64_t batch = ids.dim(0), len = ids.dim(1), h = cfg_.hidden_size;
    TESSERA_CHECK(len <= cfg_.max_positions, "BertEncoder::forward: length ", len,
                  " exceeds max_position_embeddings ", cfg_.max_positions);
    const Tensor<int32_t> m = mask.contiguous();
    for (int64_t i = 0; i < m.numel(); ++i)
      TESSERA_CHECK(m.data()[i] == 0 || m.data()[i] == 1, "BertEncoder::forward: attention_mask[",
                    i / len, ", ", i % len, "] = ", m.data()[i], ", expected 0 or 1");
    Tensor<int32_t> types = Tensor<int32_t>::zeros(ids.shape());
    if (token_types) {
      check_same_shape("BertEncoder::forward", "token_types", token_types->shape(), "ids",
                       ids.shape());
      types = token_types->contiguous();
    }
    if (batch == 0 || len == 0) return Tensor<T>(Shape{batch, len, h});

    // Embeddings: word + token type + position, then LayerNorm (the reference's order).
    Tensor<T> x = ops::embedding<T>(word_, ids);                 // (B, L, H), ids checked there
    const Tensor<T> tt = ops::embedding<T>(token_type_, types);  // (B, L, H), types checked
    {
      T* px = x.data();
      const T* pt = tt.data();
      const T* pp = position_.data();
      const int64_t rows = batch * len;
#pragma omp parallel for schedule(static) if (rows * h >= (int64_t{1} << 15))
      for (int64_t r = 0; r < rows; ++r) {
        const T* pos = pp + (r % len) * h;
        for (int64_t j = 0; j < h; ++j) px[r * h + j] = (px[r * h + j] + pt[r * h + j]) + pos[j];
      }
    }
    x = ops::layer_norm<T>(x.reshape({batch * len, h}), emb_ln_w_, emb_ln_b_,
                           cfg_.layer_norm_eps)
            .y;  // (N, H), N = B * L
    for (const Layer& l : layers_) x = layer_forward(l, x, m, batch, len);
    return Tensor<T>::from(Shape{batch, len, h}, x.span());
  }

 private:
  static std::string shape_text(const std::vector<int64_t>& s) {
    std::string out = "[";
    for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
  }

  // One post-norm block: x = LN(x + Attn(x)); x = LN(x + FFN(x)).  x: (N, H)
  Tensor<T> layer_forward(const Layer& l, const Tensor<T>& x, const Tensor<int32_t>& mask,
                          int64_t batch, int64_t len) const {
    const Tensor<T> q = ops::linear<T>(x, l.q_w, l.q_b.view());  // (N, H)
    const Tensor<T> k = ops::linear<T>(x, l.k_w, l.k_b.view());
    const Tensor<T> v = ops::linear<T>(x, l.v_w, l.v_b.view());
    const Tensor<T> ctx = attention(q, k, v, mask, batch, len);  // (N, H)
    const Tensor<T> a = ops::linear<T>(ctx, l.o_w, l.o_b.view());
    Tensor<T> x1 = ops::layer_norm<T>(ops::add<T>(a, x), l.ln1_w, l.ln1_b, cfg_.layer_norm_eps).y;
    const Tensor<T> hid =
        ops::gelu<T>(ops::linear<T>(x1, l.ff1_w, l.ff1_b.view()), cfg_.gelu);  // (N, I)
    const Tensor<T> o = ops::linear<T>(hid, l.ff2_w, l.ff2_b.view());          // (N, H)
    return ops::layer_norm<T>(ops::add<T>(o, x1), l.ln2_w, l.ln2_b, cfg_.layer_norm_eps).y;
  }

  // softmax(Q K^T / sqrt(d) + mask) V per sentence, all heads of a sentence in one batched
  // product. q, k, v, result: (N, H), row b*L + t, column head*d + j.
  Tensor<T> attention(const Tensor<T>& q, const Tensor<T>& k, const Tensor<T>& v,
                      const Tensor<int32_t>& mask, int64_t batch, int64_t len) const {
    const int64_t h = cfg_.hidden_size, heads = cfg_.num_heads, d = cfg_.head_dim();
    Tensor<T> ctx = Tensor<T>::empty(Shape{batch * len, h});
    const T scale = static_cast<T>(std::sqrt(static_cast<double>(d)));
    std::exception_ptr error;
    // One sentence per thread: the products inside are small, and the ops run them
    // single-threaded inside a parallel region.
#pragma omp parallel for schedule(dynamic, 1) if (batch > 1)
    for (int64_t b = 0; b < batch; ++b) {
      try {
        // (L, H) rows of sentence b, seen as (heads, L, d) without a copy.
        auto heads_of = [&](const Tensor<T>& t) {
          return t.slice(0, b * len, (b + 1) * len).reshape({len, heads, d}).transpose(0, 1);
        };
        Tensor<T> s = ops::matmul<T>(heads_of(q), heads_of(k), ops::Transpose::kNo,
                                     ops::Transpose::kYes);  // (heads, L, L)
        const int32_t* mb = mask.data() + b * len;
        T* ps = s.data();
        for (int64_t r = 0; r < heads * len; ++r)
          for (int64_t c = 0; c < len; ++c)
            ps[r * len + c] = mb[c] ? ps[r * len + c] / scale : std::numeric_limits<T>::lowest();
        const Tensor<T> p = ops::softmax<T>(s);
        const Tensor<T> o = ops::matmul<T>(p, heads_of(v));  // (heads, L, d)
        const T* po = o.data();
        T* pc = ctx.data() + b * len * h;
        for (int64_t hd = 0; hd < heads; ++hd)
          for (int64_t t = 0; t < len; ++t)
            std::copy_n(po + (hd * len + t) * d, d, pc + t * h + hd * d);
      } catch (...) {
#pragma omp critical(tessera_bert_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return ctx;
  }

  BertConfig cfg_;
  Tensor<T> word_, position_, token_type_, emb_ln_w_, emb_ln_b_;
  std::vector<Layer> layers_;
};

// Mean of the hidden states over the tokens whose mask is 1, optionally scaled to unit L2
// norm: sentence-transformers' Pooling(mean) + Normalize. Sums are taken in double, in token
// order. A row without tokens gives zeros (the reference divides by max(count, 1e-9)).
// hidden (B, L, H), mask (B, L) -> (B, H)
template <class T>
Tensor<T> mean_pool(TensorView<const T> hidden, TensorView<const int32_t> mask, bool normalize) {
  TESSERA_CHECK(hidden.rank() == 3, "mean_pool: hidden must be (batch, length, features), got ",
                hidden.shape());
  check_shape("mean_pool", "mask", mask.shape(), Shape{hidden.dim(0), hidden.dim(1)});
  const Tensor<T> hc = hidden.contiguous();
  const Tensor<int32_t> mc = mask.contiguous();
  const int64_t batch = hidden.dim(0), len = hidden.dim(1), h = hidden.dim(2);
  Tensor<T> out = Tensor<T>::empty(Shape{batch, h});
  std::vector<double> acc(static_cast<std::size_t>(h));
  for (int64_t b = 0; b < batch; ++b) {
    std::fill(acc.begin(), acc.end(), 0.0);
    int64_t count = 0;
    for (int64_t t = 0; t < len; ++t) {
      if (!mc.data()[b * len + t]) continue;
      ++count;
      const T* row = hc.data() + (b * len + t) * h;
      for (int64_t j = 0; j < h; ++j)
        acc[static_cast<std::size_t>(j)] += static_cast<double>(row[j]);
    }
    double norm = 0;
    for (auto& a : acc) {
      a /= static_cast<double>(std::max<int64_t>(count, 1));
      norm += a * a;
    }
    const double div = normalize ? std::max(std::sqrt(norm), 1e-12) : 1.0;
    for (int64_t j = 0; j < h; ++j)
      out.data()[b * h + j] = static_cast<T>(acc[static_cast<std::size_t>(j)] / div);
  }
  return out;
}

// How a sentence-transformers model turns token states into one vector, from its
// modules.json, <pooling>/config.json and sentence_bert_config.json. Only the chain
// Transformer -> Pooling(mean) [-> Normalize] is supported; anything else is refused by name.
struct SentencePooling {
  bool normalize = true;
  int64_t max_seq_length = 256;

  static SentencePooling from_pretrained(const std::filesystem::path& dir) {
    auto read = [](const std::filesystem::path& p) {
      std::ifstream in(p);
      TESSERA_CHECK(in.good(), "SentencePooling: cannot open '", p.string(), "'");
      try {
        return nlohmann::json::parse(in);
      } catch (const std::exception& e) {
        fail("SentencePooling: '", p.string(), "' is not valid JSON: ", e.what());
      }
    };
    SentencePooling sp;
    sp.normalize = false;
    const nlohmann::json modules = read(dir / "modules.json");
    TESSERA_CHECK(modules.is_array(), "SentencePooling: '", (dir / "modules.json").string(),
                  "' is not a JSON array");
    bool pooled = false;
    for (const auto& mod : modules) {
      const std::string type = mod.value("type", "");
      if (type.ends_with(".Transformer")) continue;
      if (type.ends_with(".Normalize")) {
        sp.normalize = true;
        continue;
      }
      if (type.ends_with(".Pooling")) {
        const auto cfg = read(dir / mod.value("path", "") / "config.json");
        const bool mean = cfg.value("pooling_mode_mean_tokens", false);
        const bool other = cfg.value("pooling_mode_cls_token", false) ||
                           cfg.value("pooling_mode_max_tokens", false) ||
                           cfg.value("pooling_mode_mean_sqrt_len_tokens", false);
        TESSERA_CHECK(mean && !other, "SentencePooling: '", dir.string(),
                      "' pools other than by the mean over tokens; only mean pooling is supported");
        pooled = true;
        continue;
      }
      fail("SentencePooling: '", dir.string(), "' has module '", type,
           "', which is not supported (Transformer, Pooling, Normalize)");
    }
    TESSERA_CHECK(pooled, "SentencePooling: '", dir.string(), "' has no Pooling module");
    const auto st = dir / "sentence_bert_config.json";
    if (std::filesystem::exists(st)) {
      const auto j = read(st);
      if (j.contains("max_seq_length") && j["max_seq_length"].is_number_integer())
        sp.max_seq_length = j["max_seq_length"].get<int64_t>();
    }
    return sp;
  }
};

// A sentence-transformers model: WordPiece tokenizer + BertEncoder + mean pooling (+ L2
// normalisation). Texts are tokenized with truncation to max_seq_length, sorted by length and
// run in batches of at most `max_batch_tokens` padded tokens, so little work goes to padding.
template <class T = float>
class SentenceEncoder {
 public:
  SentenceEncoder(data::WordPieceTokenizer tokenizer, BertEncoder<T> encoder,
                  SentencePooling pooling)
      : tok_(std::move(tokenizer)), enc_(std::move(encoder)), pool_(pooling) {
    TESSERA_CHECK(pool_.max_seq_length >= 2 && pool_.max_seq_length <= enc_.config().max_positions,
                  "SentenceEncoder: max_seq_length ", pool_.max_seq_length,
                  " must be in [2, max_position_embeddings = ", enc_.config().max_positions, "]");
    TESSERA_CHECK(tok_.vocab_size() == enc_.config().vocab_size,
                  "SentenceEncoder: the tokenizer has ", tok_.vocab_size(),
                  " tokens, the model's vocab_size is ", enc_.config().vocab_size);
  }

  // vocab.txt, tokenizer_config.json, config.json, model.safetensors, modules.json and the
  // pooling config of a sentence-transformers directory.
  static SentenceEncoder from_pretrained(const std::filesystem::path& dir) {
    return SentenceEncoder(data::WordPieceTokenizer::from_pretrained(dir),
                           BertEncoder<T>::from_pretrained(dir),
                           SentencePooling::from_pretrained(dir));
  }

  const data::WordPieceTokenizer& tokenizer() const { return tok_; }
  const BertEncoder<T>& encoder() const { return enc_; }
  const SentencePooling& pooling() const { return pool_; }
  int64_t hidden_size() const { return enc_.config().hidden_size; }

  // Padded tokens per forward batch (the batch holds at least one sentence).
  int64_t max_batch_tokens = 8192;

  // Token ids as the model sees them: [CLS] pieces [SEP], at most max_seq_length tokens
  // (or `max_tokens` when smaller and positive).
  std::vector<data::WordPieceEncoding> tokenize(const std::vector<std::string>& texts,
                                                int64_t max_tokens = 0) const {
    const int64_t limit =
        max_tokens > 0 ? std::min(max_tokens, pool_.max_seq_length) : pool_.max_seq_length;
    return tok_.encode_batch(texts, {.max_length = limit});
  }

  // Sentence embeddings (n, hidden) of the texts, in their order.
  Tensor<T> encode(const std::vector<std::string>& texts, int64_t max_tokens = 0) const {
    return encode_tokens(tokenize(texts, max_tokens));
  }

  // The same for encodings made elsewhere (each at most max_position_embeddings long).
  Tensor<T> encode_tokens(const std::vector<data::WordPieceEncoding>& encs) const {
    const int64_t n = static_cast<int64_t>(encs.size()), h = hidden_size();
    Tensor<T> out = Tensor<T>::empty(Shape{n, h});
    std::vector<int64_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    // Longest first; ties by index, so batches (and their rounding) are deterministic.
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return encs[static_cast<std::size_t>(a)].ids.size() >
             encs[static_cast<std::size_t>(b)].ids.size();
    });
    for (std::size_t begin = 0; begin < order.size();) {
      // Lengths are rounded up to a multiple of 8 so batches share oneDNN primitives.
      const auto round8 = [&](std::size_t len) {
        return std::min<int64_t>((static_cast<int64_t>(len) + 7) / 8 * 8,
                                 enc_.config().max_positions);
      };
      const int64_t len =
          std::max<int64_t>(round8(encs[static_cast<std::size_t>(order[begin])].ids.size()), 1);
      std::size_t end = begin + 1;
      while (end < order.size() && static_cast<int64_t>(end - begin + 1) * len <= max_batch_tokens)
        ++end;
      const auto b = static_cast<int64_t>(end - begin);
      Tensor<int32_t> ids(Shape{b, len}), types(Shape{b, len}), mask(Shape{b, len});
      for (int64_t r = 0; r < b; ++r) {
        const auto& e = encs[static_cast<std::size_t>(order[begin + static_cast<std::size_t>(r)])];
        TESSERA_CHECK(e.type_ids.size() == e.ids.size(), "SentenceEncoder: an encoding has ",
                      e.ids.size(), " ids but ", e.type_ids.size(), " token types");
        TESSERA_CHECK(static_cast<int64_t>(e.ids.size()) <= len,
                      "SentenceEncoder: an encoding has ", e.ids.size(),
                      " tokens, more than max_position_embeddings = ", enc_.config().max_positions);
        for (std::size_t t = 0; t < e.ids.size(); ++t) {
          ids(r, static_cast<int64_t>(t)) = e.ids[t];
          types(r, static_cast<int64_t>(t)) = e.type_ids[t];
          mask(r, static_cast<int64_t>(t)) = 1;
        }
        for (int64_t t = static_cast<int64_t>(e.ids.size()); t < len; ++t)
          ids(r, t) = tok_.pad_id();
      }
      const Tensor<T> hidden = enc_.forward(ids, mask, types.view());
      const Tensor<T> pooled = mean_pool<T>(hidden, mask, pool_.normalize);
      for (int64_t r = 0; r < b; ++r)
        std::copy_n(pooled.data() + r * h, h,
                    out.data() + order[begin + static_cast<std::size_t>(r)] * h);
      begin = end;
    }
    return out;
  }

 private:
  data::WordPieceTokenizer tok_;
  BertEncoder<T> enc_;
  SentencePooling pool_;
};

}  // namespace tessera::models

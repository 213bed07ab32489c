// tessera/quant/model_quant.hpp — weight-only quantisation of a whole Decoder: which matrices,
// the calibration activations AWQ needs, and the quantised model's perplexity on real text.
//
//   auto cal = ts::quant::collect_calibration(model, calibration_tokens);      // (B, T) ids
//   auto q = ts::quant::quantize_linears<ts::quant::Int4AWQ<128>>(model, &cal);
//   ts::quant::load_effective_weights(model, q);     // the weights the INT4 kernels multiply by
//   double ppl = ts::quant::perplexity(model, held_out_tokens, 256);
//
// What is quantised: every matrix that a linear product multiplies activations by — attention's
// wq, wk, wv, wo, the dense FFN's and every expert's w_gate, w_up, w_down, and the LM head.
// What is not: the embedding lookup (a row copy, no product; but see the tied head below), the
// norms' gains, the MoE router and the window selector (tiny, and a flipped routing or window
// decision costs far more than their bytes: DeepSeek-V3 keeps its gating in high precision too).
//
// A tied head is the embedding table itself, so quantising the head quantises the lookup too;
// load_effective_weights writes the head's effective weights into the shared table. That is what
// the shipped SmolLM2 GGUF does (its token_embd is Q8_0, used for both).
//
// Calibration (AWQ's input): the rows each product multiplies, taken from one forward of the
// model over calibration tokens with the model's own saved activations (nn layers keep their
// inputs for the backward: attention keeps its normed input and the pre-wo output, the FFN its
// input and silu(gate)*up, every expert the rows routed to it). At most `max_rows` rows per
// matrix are kept, evenly spaced, so a large calibration set stays cheap for the search.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/io/safetensors.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/ops/cast.hpp"
#include "tessera/quant/weight_formats.hpp"

namespace tessera::quant {

// Whether parameter `name` (Decoder::visit_parameters' naming) is a linear product's weight.
inline bool is_linear_weight(std::string_view name) {
  auto ends_with = [&](std::string_view s) {
    return name.size() >= s.size() && name.substr(name.size() - s.size()) == s;
  };
  if (name == "lm_head.weight") return true;
  if (name.find(".router.") != std::string_view::npos) return false;
  if (name.find(".selector.") != std::string_view::npos) return false;
  return ends_with(".attn.wq") || ends_with(".attn.wk") || ends_with(".attn.wv") ||
         ends_with(".attn.wo") || ends_with(".w_gate") || ends_with(".w_up") ||
         ends_with(".w_down");
}

// The name the head is quantised under, tied or not.
inline constexpr std::string_view kHeadName = "lm_head.weight";

// Calibration rows per weight name.
struct CalibrationSet {
  std::map<std::string, Calibration> inputs;

  const Calibration* find(const std::string& name) const {
    auto it = inputs.find(name);
    return it == inputs.end() ? nullptr : &it->second;
  }
};

namespace model_quant_detail {

// Up to max_rows rows of x (..., K), evenly spaced, as float (rows, K). Empty x -> (0, K).
template <class T>
Tensor<float> sample_rows(const Tensor<T>& x, int64_t K, int64_t max_rows) {
  const int64_t rows = x.numel() == 0 ? 0 : x.numel() / K;
  const int64_t take = std::min(rows, max_rows);
  Tensor<float> out(Shape{take, K});
  const Tensor<T>& xc = x;  // an owning tensor is contiguous
  for (int64_t i = 0; i < take; ++i) {
    // Row floor(i * rows / take): the first row, evenly spaced, never past the end.
    const int64_t r = i * rows / take;
    for (int64_t k = 0; k < K; ++k)
      out.data()[i * K + k] = ops::cast_detail::load<float>(xc.data()[r * K + k]);
  }
  return out;
}

// Appends rows (rows, K) to the calibration of `name` (so several batches can be collected).
inline void append(CalibrationSet& set, const std::string& name, Tensor<float> rows,
                   int64_t max_rows) {
  Calibration& c = set.inputs[name];
  if (c.x.numel() == 0) {
    c.x = std::move(rows);
    return;
  }
  const int64_t K = c.x.dim(1);
  TESSERA_CHECK(rows.dim(1) == K, "collect_calibration: '", name, "' rows have ", rows.dim(1),
                " columns, earlier ones ", K);
  const int64_t have = c.x.dim(0), add = std::min(rows.dim(0), max_rows - have);
  if (add <= 0) return;
  Tensor<float> joined(Shape{have + add, K});
  std::copy(c.x.data(), c.x.data() + have * K, joined.data());
  std::copy(rows.data(), rows.data() + add * K, joined.data() + have * K);
  c.x = std::move(joined);
}

// f(layer, block Saved) in layer order, whichever way the trunk stores its blocks.
template <class SavedBlocks, class F>
void each_saved_block(const SavedBlocks& s, F&& f) {
  if constexpr (requires { s.dense; s.moe; }) {
    int64_t l = 0;
    for (const auto& b : s.dense) f(l++, b);
    for (const auto& b : s.moe) f(l++, b);
  } else {
    std::apply([&](const auto&... b) {
      int64_t l = 0;
      (f(l++, b), ...);
    }, s.layers);
  }
}

}  // namespace model_quant_detail

// One forward over `tokens` (B, T); the rows every linear weight multiplies, at most max_rows
// per weight (added to `set` when given, so batches can be collected one at a time).
template <class Config>
CalibrationSet collect_calibration(const models::Decoder<Config, Cpu>& model,
                                   TensorView<const int32_t, Cpu> tokens, int64_t max_rows = 1024,
                                   CalibrationSet set = {}) {
  using namespace model_quant_detail;
  using M = models::Decoder<Config, Cpu>;
  using R = typename M::Resolved;
  TESSERA_CHECK(max_rows >= 1, "collect_calibration: max_rows = ", max_rows, " must be >= 1");
  typename M::Saved saved;
  (void)model.forward(tokens, saved);
  constexpr int64_t C = R::d_model;
  each_saved_block(saved.trunk, [&](int64_t l, const auto& s) {
    const std::string p = "layers." + std::to_string(l) + ".";
    Tensor<float> xa = sample_rows(s.attn.x, C, max_rows);
    for (const char* w : {"attn.wq", "attn.wk", "attn.wv"}) append(set, p + w, xa.clone(), max_rows);
    append(set, p + "attn.wo", sample_rows(s.attn.o, R::heads * R::head_dim, max_rows), max_rows);
    auto expert = [&](const std::string& base, const auto& es, int64_t hidden) {
      if (es.x.numel() == 0) return;  // an expert that got no token in this batch
      Tensor<float> xf = sample_rows(es.x, C, max_rows);
      append(set, base + "w_gate", xf.clone(), max_rows);
      append(set, base + "w_up", std::move(xf), max_rows);
      append(set, base + "w_down", sample_rows(es.act, hidden, max_rows), max_rows);
    };
    if constexpr (requires { s.ffn.expert_saved; }) {
      for (size_t e = 0; e < s.ffn.expert_saved.size(); ++e)
        expert(p + "ffn.experts." + std::to_string(e) + ".", s.ffn.expert_saved[e], R::moe_hidden);
      for (size_t e = 0; e < s.ffn.shared_saved.size(); ++e)
        expert(p + "ffn.shared_experts." + std::to_string(e) + ".", s.ffn.shared_saved[e],
               R::moe_hidden);
    } else {
      expert(p + "ffn.", s.ffn, R::ffn_hidden);
    }
  });
  append(set, std::string(kHeadName), sample_rows(saved.hidden, C, max_rows), max_rows);
  return set;
}

// Every linear weight of a model, quantised to one format, by parameter name (the head as
// "lm_head.weight" also when tied).
template <class Format>
struct QuantizedLinears {
  std::map<std::string, QuantizedMatrix<Format>> matrices;

  // Bytes the products read per token (the bandwidth bound of decoding).
  int64_t bytes() const {
    int64_t b = 0;
    for (const auto& [name, m] : matrices) b += m.bytes();
    return b;
  }
  const QuantizedMatrix<Format>& at(const std::string& name) const {
    auto it = matrices.find(name);
    TESSERA_CHECK(it != matrices.end(), "QuantizedLinears: no quantised weight '", name, "'");
    return it->second;
  }
};

// INT4 groups run along K; a matrix whose K is not a multiple of the group (the flagship's dense
// FFN has K = 344 for w_down) is stored with K rounded up and zero columns appended, as GGUF
// pads a row to whole blocks. The zero columns cost no accuracy (they multiply the zeros a
// product appends to its input) and their few bytes are counted in bytes().
template <class Format>
constexpr int64_t padded_cols(int64_t k) {
  if constexpr (is_int4_v<Format>) {
    return (k + Format::kGroup - 1) / Format::kGroup * Format::kGroup;
  } else {
    return k;
  }
}

namespace model_quant_detail {
// (rows, k) -> (rows, kp), zero columns appended.
inline Tensor<float> pad_columns(const Tensor<float>& x, int64_t kp) {
  const int64_t rows = x.dim(0), k = x.dim(1);
  if (kp == k) return x.clone();
  Tensor<float> out = Tensor<float>::zeros({rows, kp});
  for (int64_t r = 0; r < rows; ++r) std::copy(x.data() + r * k, x.data() + (r + 1) * k, out.data() + r * kp);
  return out;
}

template <class T>
Tensor<float> to_float(const Tensor<T>& w) {
  Tensor<float> f(w.shape());
  const Tensor<T>& c = w;
  for (int64_t i = 0; i < c.numel(); ++i) f.data()[i] = ops::cast_detail::load<float>(c.data()[i]);
  return f;
}
}  // namespace model_quant_detail

// Quantises every linear weight of `model`. Formats that need calibration (AWQ) throw, naming
// the weight, when `calibration` lacks its rows; an expert that no calibration token reached is
// quantised with the rows of a sibling expert of its layer (same product), else the format's
// own error says what is missing.
template <class Format, class Config>
QuantizedLinears<Format> quantize_linears(models::Decoder<Config, Cpu>& model,
                                          const CalibrationSet* calibration = nullptr) {
  using namespace model_quant_detail;
  QuantizedLinears<Format> out;
  auto one = [&](const std::string& name, const Tensor<float>& w) {
    const Calibration* cal = calibration ? calibration->find(name) : nullptr;
    if (calibration && !cal && name.find(".experts.") != std::string::npos) {
      // An expert no calibration token reached: its siblings' rows of the same product (the
      // same normed hidden states for w_gate/w_up, the same kind of activations for w_down).
      const std::string layer = name.substr(0, name.find(".experts.") + 9);
      const std::string leaf = name.substr(name.rfind('.'));
      for (const auto& [other, c] : calibration->inputs)
        if (other.rfind(layer, 0) == 0 && other.size() >= leaf.size() &&
            other.substr(other.size() - leaf.size()) == leaf) {
          cal = &c;
          break;
        }
    }
    try {
      const int64_t kp = padded_cols<Format>(w.dim(1));
      if (kp != w.dim(1)) {
        Calibration padded;
        if (cal) padded.x = pad_columns(cal->x, kp);
        out.matrices.emplace(name, quantize<Format>(pad_columns(w, kp), cal ? &padded : nullptr));
        return;
      }
      out.matrices.emplace(name, quantize<Format>(w, cal));
    } catch (const Error& e) {
      fail("quantize_linears: weight '", name, "': ", e.what());
    }
  };
  model.visit_parameters([&](std::string_view name, auto& p) {
    if (is_linear_weight(name)) one(std::string(name), to_float(p.value));
  });
  if constexpr (models::Decoder<Config, Cpu>::Resolved::tie_embeddings)
    one(std::string(kHeadName), to_float(model.lm_head_weight().value));
  return out;
}

// Writes each quantised weight's effective value (what the quantised products multiply by) into
// the model, so the model's own forward computes with the quantised weights. A tied head
// overwrites the shared embedding table (see the file comment).
template <class Format, class Config>
void load_effective_weights(models::Decoder<Config, Cpu>& model, const QuantizedLinears<Format>& q) {
  using T = typename models::Decoder<Config, Cpu>::T;
  auto write = [&](const std::string& name, nn::Parameter<T>& p) {
    const auto& m = q.at(name);
    const int64_t N = p.value.dim(0), K = p.value.dim(1);
    TESSERA_CHECK(m.rows() == N && m.cols() == padded_cols<Format>(K), "load_effective_weights: '",
                  name, "' is (", m.rows(), ", ", m.cols(), "), the model's ", p.value.shape());
    std::vector<float> row(static_cast<size_t>(m.cols()));
    for (int64_t n = 0; n < N; ++n) {
      m.dequantize_row(n, row.data());
      for (int64_t k = 0; k < K; ++k) p.value.data()[n * K + k] = ops::cast_detail::store<T>(row[k]);
    }
  };
  model.visit_parameters([&](std::string_view name, nn::Parameter<T>& p) {
    if (is_linear_weight(name)) write(std::string(name), p);
  });
  if constexpr (models::Decoder<Config, Cpu>::Resolved::tie_embeddings)
    write(std::string(kHeadName), model.lm_head_weight());
}

// Perplexity exp(mean CE) of next-token prediction over `tokens`, cut into consecutive windows of
// `window` + 1 tokens that overlap by one (each window predicts its last `window` tokens from its
// own context only); `batch` windows per forward. The tail shorter than a window is dropped.
template <class Config>
double perplexity(const models::Decoder<Config, Cpu>& model, std::span<const int32_t> tokens,
                  int64_t window, int64_t batch = 4) {
  using M = models::Decoder<Config, Cpu>;
  TESSERA_CHECK(window >= 1 && window <= M::Resolved::max_seq, "perplexity: window = ", window,
                " must be in [1, max_seq = ", M::Resolved::max_seq, "]");
  TESSERA_CHECK(batch >= 1, "perplexity: batch = ", batch, " must be >= 1");
  const int64_t windows = (static_cast<int64_t>(tokens.size()) - 1) / window;
  TESSERA_CHECK(windows >= 1, "perplexity: ", tokens.size(), " tokens do not fill one window of ",
                window, " + 1");
  double nll = 0.0;
  int64_t count = 0;
  for (int64_t w0 = 0; w0 < windows; w0 += batch) {
    const int64_t b = std::min(batch, windows - w0);
    Tensor<int32_t> x(Shape{b, window}), y(Shape{b, window});
    for (int64_t i = 0; i < b; ++i)
      for (int64_t t = 0; t < window; ++t) {
        const size_t at = static_cast<size_t>((w0 + i) * window + t);
        x.data()[i * window + t] = tokens[at];
        y.data()[i * window + t] = tokens[at + 1];
      }
    typename M::Saved saved;
    const models::ModelStats st = model.forward(x, y, saved);
    nll += st.cross_entropy * static_cast<double>(st.targets);
    count += st.targets;
  }
  return std::exp(nll / static_cast<double>(count));
}

// ---- files ----------------------------------------------------------------------------------
//
// A quantised model is one safetensors file: every weight that is not a linear product's under
// its own name and dtype (embedding, norms, router, selector, buffers), and each quantised matrix
// as its parts, under the weight's name plus a suffix:
//   int4:  .q4 (U8, (N, K/2), two codes per byte, the earlier in the low nibble),
//          .scale and .zero (F32, (N, K/G): value = code * scale + zero), and for AWQ
//          .input_scale_inv (F32, (K): the product multiplies activations by it first);
//   fp8:   .fp8 (F8_E4M3, (N, K)) and .scale (F32, (N): one per output channel);
//   bf16:  .bf16 (BF16, (N, K));  fp32: .f32 (F32, (N, K)).
// Metadata "tessera.quant.format" names the format ("int4_awq", group in
// "tessera.quant.group"), so a file is refused when read as another format.

namespace model_quant_detail {

template <class Format>
std::string format_label() {
  if constexpr (is_int4_v<Format>) {
    return std::string(Format::kName) + "-g" + std::to_string(Format::kGroup);
  } else {
    return Format::kName;
  }
}

// The parts of one matrix, owning their bytes until the file is written.
struct Parts {
  std::vector<std::vector<std::byte>> buffers;
  std::vector<io::TensorEntry> entries;

  template <class E>
  void add(const std::string& name, io::Dtype dtype, std::vector<int64_t> shape,
           const std::vector<E>& values) {
    std::vector<std::byte> b(values.size() * sizeof(E));
    if (!b.empty()) std::memcpy(b.data(), values.data(), b.size());
    buffers.push_back(std::move(b));
    entries.emplace_back(name, dtype, std::move(shape), std::span<const std::byte>(buffers.back()));
  }
};

template <class Format>
void add_matrix(Parts& parts, const std::string& name, const QuantizedMatrix<Format>& m) {
  const int64_t N = m.rows(), K = m.cols();
  if constexpr (is_int4_v<Format>) {
    constexpr int G = Format::kGroup;
    const auto blocks = m.data();
    std::vector<uint8_t> codes;
    std::vector<float> scale, zero;
    codes.reserve(static_cast<size_t>(N * K / 2));
    for (const auto& b : blocks) {
      codes.insert(codes.end(), b.packed, b.packed + G / 2);
      scale.push_back(b.scale);
      zero.push_back(b.zero_point);
    }
    parts.add(name + ".q4", io::Dtype::U8, {N, K / 2}, codes);
    parts.add(name + ".scale", io::Dtype::F32, {N, K / G}, scale);
    parts.add(name + ".zero", io::Dtype::F32, {N, K / G}, zero);
    if constexpr (Format::kActivationAware) {
      const auto inv = m.input_scales_inv();
      parts.add(name + ".input_scale_inv", io::Dtype::F32, {K},
                std::vector<float>(inv.begin(), inv.end()));
    }
  } else if constexpr (std::is_same_v<Format, FP8Weights>) {
    const auto d = m.data();
    const auto s = m.row_scales();
    parts.add(name + ".fp8", io::Dtype::F8_E4M3, {N, K}, std::vector<fp8_e4m3>(d.begin(), d.end()));
    parts.add(name + ".scale", io::Dtype::F32, {N}, std::vector<float>(s.begin(), s.end()));
  } else if constexpr (std::is_same_v<Format, BF16Weights>) {
    const auto d = m.data();
    parts.add(name + ".bf16", io::Dtype::BF16, {N, K}, std::vector<bf16>(d.begin(), d.end()));
  } else {
    const auto d = m.data();
    parts.add(name + ".f32", io::Dtype::F32, {N, K}, std::vector<float>(d.begin(), d.end()));
  }
}

template <class E>
std::vector<E> read_vector(io::SafetensorsFile& f, const std::string& name,
                           std::vector<int64_t> shape) {
  TESSERA_CHECK(f.contains(name), "load_quantized '", f.source(), "': tensor '", name,
                "' is missing");
  const Tensor<E> t = f.read<E>(name);
  TESSERA_CHECK(std::vector<int64_t>(t.shape().begin(), t.shape().end()) == shape,
                "load_quantized '", f.source(), "': tensor '", name, "' has shape ", t.shape(),
                ", expected ", Shape(shape));
  return std::vector<E>(t.data(), t.data() + t.numel());
}

template <class Format>
QuantizedMatrix<Format> read_matrix(io::SafetensorsFile& f, const std::string& name,
                                    int64_t N, int64_t K) {
  if constexpr (is_int4_v<Format>) {
    constexpr int G = Format::kGroup;
    TESSERA_CHECK(K % G == 0, "load_quantized: '", name, "' has K = ", K,
                  ", not a multiple of the group ", G);
    const auto codes = read_vector<uint8_t>(f, name + ".q4", {N, K / 2});
    const auto scale = read_vector<float>(f, name + ".scale", {N, K / G});
    const auto zero = read_vector<float>(f, name + ".zero", {N, K / G});
    std::vector<typename Format::Element> blocks(static_cast<size_t>(N * K / G));
    for (size_t i = 0; i < blocks.size(); ++i) {
      blocks[i].scale = scale[i];
      blocks[i].zero_point = zero[i];
      std::memcpy(blocks[i].packed, codes.data() + i * (G / 2), G / 2);
    }
    std::vector<float> inv;
    if constexpr (Format::kActivationAware) inv = read_vector<float>(f, name + ".input_scale_inv", {K});
    return QuantizedMatrix<Format>::from_parts(N, K, std::move(blocks), {}, std::move(inv));
  } else if constexpr (std::is_same_v<Format, FP8Weights>) {
    return QuantizedMatrix<Format>::from_parts(N, K, read_vector<fp8_e4m3>(f, name + ".fp8", {N, K}),
                                               read_vector<float>(f, name + ".scale", {N}));
  } else if constexpr (std::is_same_v<Format, BF16Weights>) {
    return QuantizedMatrix<Format>::from_parts(N, K, read_vector<bf16>(f, name + ".bf16", {N, K}));
  } else {
    return QuantizedMatrix<Format>::from_parts(N, K, read_vector<float>(f, name + ".f32", {N, K}));
  }
}

}  // namespace model_quant_detail

// Writes `model`'s non-linear weights and the quantised matrices `q` to one file (atomically).
template <class Format, class Config>
void save_quantized(const std::filesystem::path& path, models::Decoder<Config, Cpu>& model,
                    const QuantizedLinears<Format>& q) {
  using namespace model_quant_detail;
  Parts parts;
  model.visit_weights([&](std::string_view name, auto& t) {
    if (is_linear_weight(name)) return;
    parts.entries.emplace_back(std::string(name), t);
  });
  for (const auto& [name, m] : q.matrices) add_matrix(parts, name, m);
  std::map<std::string, std::string> meta = model.metadata();
  meta["tessera.quant.format"] = format_label<Format>();
  io::save_safetensors(path, parts.entries, meta);
}

// Reads a file written by save_quantized<Format> for this model type: the non-linear weights go
// into `model`, each linear weight of the model is set to its quantised matrix's effective value
// (so model.forward computes with the quantised weights; the tied embedding table keeps its
// stored values for the lookup), and the quantised matrices are returned for the kernels.
template <class Format, class Config>
QuantizedLinears<Format> load_quantized(const std::filesystem::path& path,
                                        models::Decoder<Config, Cpu>& model) {
  using namespace model_quant_detail;
  using T = typename models::Decoder<Config, Cpu>::T;
  io::SafetensorsFile f = io::SafetensorsFile::open(path);
  const auto& meta = f.metadata();
  const auto it = meta.find("tessera.quant.format");
  TESSERA_CHECK(it != meta.end(), "load_quantized '", path.string(),
                "': not a quantised model (no tessera.quant.format in its metadata)");
  TESSERA_CHECK(it->second == format_label<Format>(), "load_quantized '", path.string(),
                "': the file holds ", it->second, " weights, not ", format_label<Format>());
  if (auto c = meta.find("tessera.config"); c != meta.end())
    TESSERA_CHECK(c->second == model.metadata().at("tessera.config"), "load_quantized '",
                  path.string(), "': the file is for the model ", c->second, ", not ",
                  model.metadata().at("tessera.config"));
  QuantizedLinears<Format> q;
  model.visit_weights([&](std::string_view name_view, auto& t) {
    const std::string name(name_view);
    if (is_linear_weight(name)) {
      const int64_t N = t.dim(0), K = t.dim(1);
      const auto& m = q.matrices.emplace(name, read_matrix<Format>(f, name, N, padded_cols<Format>(K)))
                          .first->second;
      std::vector<float> row(static_cast<size_t>(m.cols()));
      for (int64_t n = 0; n < N; ++n) {
        m.dequantize_row(n, row.data());
        for (int64_t k = 0; k < K; ++k) t.data()[n * K + k] = ops::cast_detail::store<T>(row[k]);
      }
      return;
    }
    using E = typename std::decay_t<decltype(t)>::value_type;
    TESSERA_CHECK(f.contains(name), "load_quantized '", path.string(), "': tensor '", name,
                  "' is missing");
    Tensor<E> v = f.read<E>(name);
    TESSERA_CHECK(v.shape() == t.shape(), "load_quantized '", path.string(), "': tensor '", name,
                  "' has shape ", v.shape(), ", the model's ", t.shape());
    std::copy(v.data(), v.data() + v.numel(), t.data());
  });
  if constexpr (models::Decoder<Config, Cpu>::Resolved::tie_embeddings) {
    const auto& table = model.lm_head_weight().value;
    q.matrices.emplace(std::string(kHeadName),
                       read_matrix<Format>(f, std::string(kHeadName), table.dim(0),
                                           padded_cols<Format>(table.dim(1))));
  }
  return q;
}

}  // namespace tessera::quant

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
// matrix are kept, evenly spaced, so a large calibration set stays cheap for the search. The set
// also keeps the token windows: AWQ's module search (see AwqOptions) reruns the blocks on them.
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
#include "tessera/ops/matmul.hpp"
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

// Calibration rows per weight name, and the token windows they came from.
struct CalibrationSet {
  std::map<std::string, Calibration> inputs;
  // Each batch of windows (B, T) collect_calibration ran: AWQ's module search (quantize_linears)
  // runs the blocks on them again, because attention's output needs whole sequences, not rows.
  std::vector<Tensor<int32_t>> tokens;
  int64_t max_rows = 1024;  // the cap collect_calibration was given

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
  set.tokens.push_back(tokens.contiguous());
  set.max_rows = max_rows;
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
  constexpr int64_t m = k_multiple<Format>();
  return (k + m - 1) / m * m;
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

// How the AWQ search is scored (quantize_linears with an Int4AWQ format). The products that read
// one input share one scale vector s, and α is scored by the output of the module they feed, as
// the reference implementation (llm-awq's auto_scale) does:
//   wq, wk, wv      read norm1's output; scored by the attention layer's output (its softmax, the
//                   window policy and wo in full precision), over whole calibration sequences
//   w_gate, w_up    read norm2's output (or an expert's routed rows); scored by the output of
//                   their SwiGLU FFN, w_down in full precision (each expert by its own output)
//   wo, w_down      each by its own output (quant::quantize's per-product search)
//   the head        by KL(softmax(logits_ref) || softmax(logits)) summed over calibration rows:
//                   its module is the predicted distribution. (Scored by the logits' squared
//                   error, AWQ's head tracked the reference model worse than RTN's on the flagship.)
// The module error is the sum over calibration tokens and outputs of (y - y_ref)² against the
// unquantised module on the same input. After α, each product of a group may clip its groups
// (detail::awq_clip, scored per product); a product's clipping is kept only when it lowers the
// module error. α = 0 without clipping is plain RTN and a candidate is taken only when strictly
// better, so every group's module error is at most RTN's on the calibration tokens.
// Sharing s is also what lets an inference kernel run q, k and v (gate and up) as one product:
// the fused matrix has one input scale vector.
// Each block's inputs come from the unquantised blocks before it (llm-awq's choice), unless
// AwqOptions::quantized_inputs asks for the quantised earlier blocks' outputs.
struct AwqOptions {
  // true: the module objective above. false: every product searched alone on its own output
  // (quant::quantize with its calibration rows), each with its own scales.
  bool module_objective = true;
  // true: block l's search sees the outputs of blocks < l with their quantised weights (and the
  // FFN's search the quantised attention of its own block).
  bool quantized_inputs = false;
};

// What the module search chose for one group of products that share scales.
struct AwqGroupResult {
  std::vector<std::string> names;  // e.g. layers.0.attn.wq, .wk, .wv
  float alpha = 0;                 // the shared exponent
  double rtn_error = 0;            // module error with α = 0, no clipping (plain RTN)
  double scaled_error = 0;         // with the chosen α, no clipping
  double error = 0;                // final: the chosen α and the clipping kept
  std::vector<bool> clipped;       // per product: whether its clipping was kept
};
struct AwqReport {
  std::vector<AwqGroupResult> groups;
};

namespace model_quant_detail {

// W (N, K) into Format, K padded to the group with zero columns (rows too when given).
template <class Format>
QuantizedMatrix<Format> quantize_padded(const Tensor<float>& w, const Calibration* cal) {
  const int64_t kp = padded_cols<Format>(w.dim(1));
  if (kp == w.dim(1)) return quantize<Format>(w, cal);
  Calibration padded;
  if (cal) padded.x = pad_columns(cal->x, kp);
  return quantize<Format>(pad_columns(w, kp), cal ? &padded : nullptr);
}

// sum (a - b)² in double.
template <class T>
double squared_difference(const Tensor<T>& a, const Tensor<T>& b) {
  TESSERA_CHECK(a.numel() == b.numel(), "AWQ module error: outputs of ", a.numel(), " and ",
                b.numel(), " elements");
  double e = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double d = ops::cast_detail::load<double>(a.data()[i]) - ops::cast_detail::load<double>(b.data()[i]);
    e += d * d;
  }
  return e;
}

// sum over rows of KL(softmax(ref) || softmax(got)), logits (S, V), in double: what the head's
// rounding does to the model's predicted distribution, which is what its loss sees (the logits'
// squared error weighs every token of the vocabulary alike, the loss almost only the likely ones).
template <class T>
double kl_divergence(const Tensor<T>& ref, const Tensor<T>& got) {
  const int64_t V = ref.dim(-1), S = ref.numel() / V;
  std::vector<double> per_row(static_cast<size_t>(S));
#pragma omp parallel for schedule(static) if (S * V > (1 << 16))
  for (int64_t r = 0; r < S; ++r) {
    const T* a = ref.data() + r * V;
    const T* b = got.data() + r * V;
    double ma = -INFINITY, mb = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      ma = std::max(ma, ops::cast_detail::load<double>(a[v]));
      mb = std::max(mb, ops::cast_detail::load<double>(b[v]));
    }
    double za = 0, zb = 0;
    for (int64_t v = 0; v < V; ++v) {
      za += std::exp(ops::cast_detail::load<double>(a[v]) - ma);
      zb += std::exp(ops::cast_detail::load<double>(b[v]) - mb);
    }
    const double la = ma + std::log(za), lb = mb + std::log(zb);
    double kl = 0;
    for (int64_t v = 0; v < V; ++v) {
      const double pa = ops::cast_detail::load<double>(a[v]) - la;  // log p
      const double pb = ops::cast_detail::load<double>(b[v]) - lb;  // log q
      kl += std::exp(pa) * (pa - pb);
    }
    per_row[static_cast<size_t>(r)] = kl;
  }
  double total = 0;
  for (const double e : per_row) total += e;  // in row order: the same for every thread count
  return total;
}

// Rows (..., K) of several tensors as one float (rows, K).
template <class T>
Tensor<float> all_rows(const std::vector<const Tensor<T>*>& parts, int64_t K) {
  int64_t rows = 0;
  for (const Tensor<T>* t : parts) rows += t->numel() / K;
  Tensor<float> out(Shape{rows, K});
  int64_t at = 0;
  for (const Tensor<T>* t : parts) {
    const Tensor<T>& c = *t;  // an owning tensor is contiguous
    for (int64_t i = 0; i < c.numel(); ++i) out.data()[at + i] = ops::cast_detail::load<float>(c.data()[i]);
    at += c.numel();
  }
  return out;
}

template <class T>
Tensor<T> to_model_type(const Tensor<float>& x) {
  Tensor<T> out(x.shape());
  for (int64_t i = 0; i < x.numel(); ++i) out.data()[i] = ops::cast_detail::store<T>(x.data()[i]);
  return out;
}

// Writes the first K columns of eff (N, Kp) into p.
template <class T>
void write_columns(nn::Parameter<T>& p, const float* eff, int64_t kp) {
  const int64_t N = p.value.dim(0), K = p.value.dim(1);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) p.value.data()[n * K + k] = ops::cast_detail::store<T>(eff[n * kp + k]);
}

// The search for one group of products that read the same input (see the comment above
// AwqOptions): `x` (S, K) the input rows for the channel means and the clipping, `module_error`
// the module's output error with the group's current values in the model. Leaves the model's
// weights as they were; adds the group's matrices to `out`.
template <class Format, class T, class ModuleError>
void awq_group(const std::vector<std::string>& names, const std::vector<nn::Parameter<T>*>& params,
               const Tensor<float>& x, ModuleError&& module_error, QuantizedLinears<Format>& out,
               AwqReport* report) {
  constexpr int G = Format::kGroup;
  const int64_t K = params.front()->value.dim(1), kp = padded_cols<Format>(K);
  std::vector<Tensor<float>> w;         // (N, Kp) in float, zero columns appended
  std::vector<Tensor<T>> original;
  for (nn::Parameter<T>* p : params) {
    TESSERA_CHECK(p->value.dim(1) == K, "quantize_linears: '", names[w.size()], "' has K = ",
                  p->value.dim(1), ", the others of its group ", K);
    w.push_back(pad_columns(to_float(p->value), kp));
    original.push_back(p->value.clone());
  }
  TESSERA_CHECK(x.rank() == 2 && x.dim(1) == K && x.dim(0) > 0, "quantize_linears: '", names[0],
                "': calibration rows have shape ", x.shape(), "; expected (S, ", K, ") with S > 0");
  const std::vector<float> a = detail::awq_channel_means(x.data(), x.dim(0), K, "quantize_linears");
  // Scales over the real columns (normalised over them), 1 for the padding.
  auto scales = [&](float alpha) {
    std::vector<float> s, s_inv;
    detail::awq_scales(a, alpha, s, s_inv);
    s.resize(static_cast<size_t>(kp), 1.0f);
    return s;
  };
  AwqGroupResult r;
  r.names = names;
  std::vector<float> eff;
  for (int g = 0; g < kAwqGrid; ++g) {
    const float alpha = static_cast<float>(g) / kAwqGrid;
    const std::vector<float> s = scales(alpha);
    for (size_t i = 0; i < params.size(); ++i) {
      eff.resize(static_cast<size_t>(w[i].numel()));
      detail::awq_effective<G>(w[i].data(), w[i].dim(0), kp, s, eff.data());
      write_columns(*params[i], eff.data(), kp);
    }
    const double e = module_error();
    if (g == 0) r.rtn_error = e;
    // Strictly better only: ties keep the smaller α (α = 0 is plain RTN).
    if (g == 0 || e < r.scaled_error) {
      r.scaled_error = e;
      r.alpha = alpha;
    }
  }
  // The chosen scales, then each product's clipping where it lowers the module error.
  const std::vector<float> s = scales(r.alpha);
  const Calibration clip{pad_columns(x, kp)};
  std::vector<QuantizedMatrix<Format>> chosen;
  for (size_t i = 0; i < params.size(); ++i) {
    chosen.push_back(quantize_awq_with_scales<Format>(w[i], s, r.alpha, nullptr));
    write_columns(*params[i], chosen.back().dequantize().data(), kp);
  }
  r.error = r.scaled_error;
  for (size_t i = 0; i < params.size(); ++i) {
    QuantizedMatrix<Format> clipped = quantize_awq_with_scales<Format>(w[i], s, r.alpha, &clip);
    write_columns(*params[i], clipped.dequantize().data(), kp);
    const double e = module_error();
    r.clipped.push_back(e < r.error);
    if (e < r.error) {
      r.error = e;
      chosen[i] = std::move(clipped);
    } else {
      write_columns(*params[i], chosen[i].dequantize().data(), kp);
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    params[i]->value = std::move(original[i]);
    out.matrices.insert_or_assign(names[i], std::move(chosen[i]));
  }
  if (report) report->groups.push_back(std::move(r));
}

// Writes the effective values of the matrices `names` (already in q) into their parameters.
template <class Format, class T>
void load_some(QuantizedLinears<Format>& q, const std::vector<std::pair<std::string, nn::Parameter<T>*>>& ps) {
  for (const auto& [name, p] : ps) {
    const auto& m = q.at(name);
    write_columns(*p, m.dequantize().data(), m.cols());
  }
}

// A SwiGLU FFN (the dense FFN or one expert) on rows x (S, C): gate and up share scales scored by
// the FFN's output, then w_down by its own output on the FFN's activations.
template <class Format, class T>
void awq_swiglu(const std::string& base, nn::SwiGluFfn<T>& ffn, const Tensor<float>& x,
                QuantizedLinears<Format>& out, AwqReport* report) {
  const Tensor<T> xt = to_model_type<T>(x);
  typename nn::SwiGluFfn<T>::Saved ref_saved;
  const Tensor<T> ref = ffn.forward(xt, ref_saved);
  awq_group<Format, T>({base + "w_gate", base + "w_up"}, {&ffn.w_gate, &ffn.w_up}, x,
                    [&] {
                      typename nn::SwiGluFfn<T>::Saved s;
                      return squared_difference(ffn.forward(xt, s), ref);
                    },
                    out, report);
  const Calibration act{all_rows<T>({&ref_saved.act}, ffn.hidden())};
  out.matrices.insert_or_assign(base + "w_down", quantize_padded<Format>(to_float(ffn.w_down.value), &act));
}

// The AWQ module search over the whole model (see the comment above AwqOptions).
template <class Format, class Config>
void awq_by_module(models::Decoder<Config, Cpu>& model, const CalibrationSet& cal,
                   const AwqOptions& options, QuantizedLinears<Format>& out, AwqReport* report) {
  using M = models::Decoder<Config, Cpu>;
  using T = typename M::T;
  using R = typename M::Resolved;
  constexpr int64_t C = R::d_model;
  const int64_t max_rows = cal.max_rows;
  const size_t nb = cal.tokens.size();
  // Every linear weight, to put back after a quantized_inputs search.
  std::map<std::string, Tensor<T>> originals;
  if (options.quantized_inputs)
    model.visit_parameters([&](std::string_view name, nn::Parameter<T>& p) {
      if (is_linear_weight(name)) originals.emplace(std::string(name), p.value.clone());
    });
  std::vector<Tensor<T>> h(nb);  // each batch's input of the current block (B, T, C)
  for (size_t b = 0; b < nb; ++b) {
    typename nn::Embedding<T>::Saved es;
    h[b] = model.embedding().forward(cal.tokens[b], es);
  }
  model.for_each_block([&](int64_t l, auto& block) {
    using Block = std::remove_cvref_t<decltype(block)>;
    const std::string p = "layers." + std::to_string(l) + ".";
    std::vector<typename Block::Saved> saved(nb);
    std::vector<Tensor<T>> next(nb);
    for (size_t b = 0; b < nb; ++b) next[b] = block.forward(h[b], saved[b]);

    // q, k, v by the attention output on whole sequences; wo by its own output.
    auto& attn = block.attn();
    std::vector<const Tensor<T>*> xs;
    std::vector<Tensor<T>> ref(nb);
    for (size_t b = 0; b < nb; ++b) {
      xs.push_back(&saved[b].attn.x);
      typename Block::AttentionLayer::Saved s;
      ref[b] = attn.forward(saved[b].attn.x, s);
    }
    const std::vector<std::string> qkv{p + "attn.wq", p + "attn.wk", p + "attn.wv"};
    awq_group<Format, T>(qkv, {&attn.wq(), &attn.wk(), &attn.wv()}, all_rows<T>(xs, C),
                      [&] {
                        double e = 0;
                        for (size_t b = 0; b < nb; ++b) {
                          typename Block::AttentionLayer::Saved s;
                          e += squared_difference(attn.forward(saved[b].attn.x, s), ref[b]);
                        }
                        return e;
                      },
                      out, report);
    std::vector<const Tensor<T>*> os;
    for (size_t b = 0; b < nb; ++b) os.push_back(&saved[b].attn.o);
    const Calibration o_rows{sample_rows(all_rows<T>(os, R::heads * R::head_dim), R::heads * R::head_dim, max_rows)};
    out.matrices.insert_or_assign(p + "attn.wo", quantize_padded<Format>(to_float(attn.wo().value), &o_rows));

    if (options.quantized_inputs) {  // the FFN's search sees this block's quantised attention
      load_some<Format, T>(out, {{qkv[0], &attn.wq()}, {qkv[1], &attn.wk()}, {qkv[2], &attn.wv()},
                                 {p + "attn.wo", &attn.wo()}});
      for (size_t b = 0; b < nb; ++b) next[b] = block.forward(h[b], saved[b]);
    }

    // The FFN: gate and up by the FFN's (each expert's) output, w_down by its own.
    auto& ffn = block.ffn();
    std::vector<std::pair<std::string, nn::Parameter<T>*>> ffn_params;
    auto swiglu = [&](const std::string& base, nn::SwiGluFfn<T>& f, const Tensor<float>& rows) {
      awq_swiglu<Format>(base, f, sample_rows(rows, C, max_rows), out, report);
      ffn_params.emplace_back(base + "w_gate", &f.w_gate);
      ffn_params.emplace_back(base + "w_up", &f.w_up);
      ffn_params.emplace_back(base + "w_down", &f.w_down);
    };
    if constexpr (requires { saved[0].ffn.expert_saved; }) {
      std::vector<const Tensor<T>*> tokens_in;
      for (size_t b = 0; b < nb; ++b) tokens_in.push_back(&saved[b].ffn.route.x);
      const Tensor<float> all_tokens = all_rows<T>(tokens_in, C);
      for (int e = 0; e < Block::FfnLayer::kExperts; ++e) {
        std::vector<const Tensor<T>*> routed;
        for (size_t b = 0; b < nb; ++b)
          if (saved[b].ffn.expert_saved.size() > static_cast<size_t>(e) &&
              saved[b].ffn.expert_saved[static_cast<size_t>(e)].x.numel() > 0)
            routed.push_back(&saved[b].ffn.expert_saved[static_cast<size_t>(e)].x);
        // An expert no calibration token reached: the layer's tokens, the inputs it may get.
        swiglu(p + "ffn.experts." + std::to_string(e) + ".", ffn.expert(e),
               routed.empty() ? all_tokens.clone() : all_rows<T>(routed, C));
      }
      for (int e = 0; e < Block::FfnLayer::kShared; ++e)
        swiglu(p + "ffn.shared_experts." + std::to_string(e) + ".", ffn.shared_expert(e), all_tokens);
    } else {
      std::vector<const Tensor<T>*> rows;
      for (size_t b = 0; b < nb; ++b) rows.push_back(&saved[b].ffn.x);
      swiglu(p + "ffn.", ffn, all_rows<T>(rows, C));
    }
    if (options.quantized_inputs) {  // the next block's search sees this block quantised
      load_some<Format, T>(out, ffn_params);
      for (size_t b = 0; b < nb; ++b) {
        typename Block::Saved s;
        next[b] = block.forward(h[b], s);
      }
    }
    h = std::move(next);
  });
  // The head on the final-normed hidden states.
  std::vector<Tensor<T>> hidden(nb);
  std::vector<const Tensor<T>*> hs;
  for (size_t b = 0; b < nb; ++b) {
    typename nn::RMSNorm<T>::Saved ns;
    hidden[b] = model.final_norm().forward(h[b], ns);
    hs.push_back(&hidden[b]);
  }
  const Tensor<float> head_rows = sample_rows(all_rows<T>(hs, C), C, max_rows);
  const Tensor<T> head_in = to_model_type<T>(head_rows);
  nn::Parameter<T>& head = model.lm_head_weight();
  const Tensor<T> ref_logits = ops::linear<T>(head_in, head.value);
  awq_group<Format, T>({std::string(kHeadName)}, {&head}, head_rows,
                       [&] { return kl_divergence(ref_logits, ops::linear<T>(head_in, head.value)); },
                       out, report);
  if (options.quantized_inputs)
    model.visit_parameters([&](std::string_view name, nn::Parameter<T>& p) {
      if (auto it = originals.find(std::string(name)); it != originals.end()) p.value = std::move(it->second);
    });
}

}  // namespace model_quant_detail

// Quantises every linear weight of `model`. Formats that need calibration (AWQ) throw, naming
// the weight, when `calibration` lacks its rows. AWQ with the module objective (the default,
// see AwqOptions) reruns the blocks on calibration->tokens; a CalibrationSet without tokens (rows
// gathered by hand) falls back to the per-product search. In the per-product search an expert
// that no calibration token reached is quantised with the rows of a sibling expert of its layer
// (same product), else the format's own error says what is missing. `model` is left as it was.
// report (AWQ with the module objective): what each group of shared-scale products chose.
template <class Format, class Config>
QuantizedLinears<Format> quantize_linears(models::Decoder<Config, Cpu>& model,
                                          const CalibrationSet* calibration = nullptr,
                                          const AwqOptions& options = {},
                                          AwqReport* report = nullptr) {
  using namespace model_quant_detail;
  QuantizedLinears<Format> out;
  if constexpr (is_awq_v<Format>) {
    if (calibration && options.module_objective && !calibration->tokens.empty()) {
      awq_by_module(model, *calibration, options, out, report);
      return out;
    }
  }
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
      out.matrices.emplace(name, quantize_padded<Format>(w, cal));
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
//   fp8 blocks of B: .fp8 (F8_E4M3, (N, K)) and .scale (F32, (N, K/B): one per block of a row);
//   bf16:  .bf16 (BF16, (N, K));  fp32: .f32 (F32, (N, K)).
// Metadata "tessera.quant.format" names the format ("int4_awq-g64", "fp8_e4m3_block-b128"), so a
// file is refused when read as another format.

namespace model_quant_detail {

template <class Format>
std::string format_label() {
  if constexpr (is_int4_v<Format>) {
    return std::string(Format::kName) + "-g" + std::to_string(Format::kGroup);
  } else if constexpr (is_fp8_block_v<Format>) {
    return std::string(Format::kName) + "-b" + std::to_string(Format::kBlock);
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
  } else if constexpr (is_fp8_block_v<Format>) {
    const auto d = m.data();
    const auto s = m.row_scales();
    parts.add(name + ".fp8", io::Dtype::F8_E4M3, {N, K}, std::vector<fp8_e4m3>(d.begin(), d.end()));
    parts.add(name + ".scale", io::Dtype::F32, {N, K / Format::kBlock}, std::vector<float>(s.begin(), s.end()));
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
  } else if constexpr (is_fp8_block_v<Format>) {
    constexpr int B = Format::kBlock;
    TESSERA_CHECK(K % B == 0, "load_quantized: '", name, "' has K = ", K, ", not a multiple of the block ", B);
    return QuantizedMatrix<Format>::from_parts(N, K, read_vector<fp8_e4m3>(f, name + ".fp8", {N, K}),
                                               read_vector<float>(f, name + ".scale", {N, K / B}));
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

// tessera/models/llama.hpp — Llama-architecture checkpoints (GGUF) as tessera Decoders.
//
//   const auto file = ts::io::GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf");
//   auto model = std::make_unique<ts::Decoder<ts::models::SmolLM2_135M>>(ts::Seed{0});
//   ts::models::load_gguf(*model, file);        // dequantised to the model's Scalar
//
// Why the architecture maps without new layers: a Llama block is tessera's pre-norm block with
// the CausalFull window, grouped-query attention without biases, RoPE on q and k, RMSNorm
// (x * rsqrt(mean(x^2) + eps) * w) and a dense SwiGLU FFN (w_down(silu(w_gate x) * w_up x));
// the head is the embedding table when the file has no output.weight. So a Llama model is a
// config (numbers only) and a weight mapping:
//
//   token_embd.weight        -> embed.weight              output_norm.weight -> norm.weight
//   blk.L.attn_norm.weight   -> layers.L.norm1.weight     output.weight      -> lm_head.weight
//   blk.L.attn_q/k/v.weight  -> layers.L.attn.wq/wk/wv    (q and k un-permuted, see below)
//   blk.L.attn_output.weight -> layers.L.attn.wo
//   blk.L.ffn_norm.weight    -> layers.L.norm2.weight
//   blk.L.ffn_gate/up/down   -> layers.L.ffn.w_gate/w_up/w_down
//
// RoPE pairing. Hugging Face Llama checkpoints rotate feature i with feature i + head_dim/2
// (the half-split layout, tessera's default). llama.cpp rotates adjacent pairs (2i, 2i+1), so
// its converter (convert_hf_to_gguf.py, LlamaModel.permute) reorders the rows of wq and wk
// within each head: GGUF row h*hd + 2i + j holds Hugging Face row h*hd + j*hd/2 + i (i < hd/2,
// j in {0, 1}). load_gguf undoes that permutation, so the model runs with the half-split
// layout exactly as the original checkpoint did. (The permutation only renames features
// inside q and k consistently, so the scores q.k, and hence the outputs, are the same either
// way; the reference in tests/infer runs llama.cpp's convention on the raw GGUF rows, which
// checks the un-permutation.)
//
// The file's numbers are checked against the config (layers, widths, heads, vocabulary, tied
// head, RoPE base and RMSNorm epsilon in float precision): a config is a type, so a file whose
// numbers differ needs another config, and load_gguf says which number differs.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/io/gguf.hpp"
#include "tessera/io/gguf_llama.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/ops/cast.hpp"

namespace tessera::models {

// SmolLM2-135M(-Instruct), Hugging Face's small Llama: 30 blocks of width 576, 9 query heads on
// 3 kv heads (head_dim 64), SwiGLU width 1536, a 49152-token byte-level BPE vocabulary, RoPE base
// 100000, RMSNorm epsilon 1e-5, the head tied to the embedding, trained to 8192 tokens.
struct SmolLM2_135M {
  static constexpr int vocab = 49152, d_model = 576, layers = 30, heads = 9, kv_heads = 3;
  static constexpr int ffn_hidden = 1536, max_seq = 8192;
  static constexpr bool tie_embeddings = true;
  static constexpr double rope_theta = 100000.0;
  static constexpr double norm_eps = 1e-5;
};

namespace llama_detail {

// GGUF's q/k row order back to Hugging Face's (see the file header). w: (heads * hd, C).
inline Tensor<float> unpermute_qk(const Tensor<float>& w, int64_t heads) {
  const int64_t rows = w.dim(0), cols = w.dim(1), hd = rows / heads, half = hd / 2;
  Tensor<float> out(w.shape());
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t j = 0; j < 2; ++j) {
        const float* src = w.data() + (h * hd + 2 * i + j) * cols;
        float* dst = out.data() + (h * hd + j * half + i) * cols;
        std::copy(src, src + cols, dst);
      }
  return out;
}

// The GGUF tensor behind a tessera parameter name, and the heads to un-permute by (0: none).
struct Source {
  std::string name;
  int64_t unpermute_heads = 0;
};

template <class R>
Source gguf_source(std::string_view param) {
  if (param == "embed.weight") return {"token_embd.weight"};
  if (param == "norm.weight") return {"output_norm.weight"};
  if (param == "lm_head.weight") return {"output.weight"};
  if (param.starts_with("layers.")) {
    const std::string_view rest = param.substr(7);
    const auto dot = rest.find('.');
    const std::string layer(rest.substr(0, dot));
    const std::string_view what = rest.substr(dot + 1);
    const std::string b = "blk." + layer + ".";
    static const std::map<std::string_view, std::string_view> names = {
        {"norm1.weight", "attn_norm.weight"}, {"attn.wq", "attn_q.weight"},
        {"attn.wk", "attn_k.weight"},         {"attn.wv", "attn_v.weight"},
        {"attn.wo", "attn_output.weight"},    {"norm2.weight", "ffn_norm.weight"},
        {"ffn.w_gate", "ffn_gate.weight"},    {"ffn.w_up", "ffn_up.weight"},
        {"ffn.w_down", "ffn_down.weight"}};
    if (const auto it = names.find(what); it != names.end()) {
      const int64_t heads = what == "attn.wq" ? R::heads : what == "attn.wk" ? R::kv_heads : 0;
      return {b + std::string(it->second), heads};
    }
  }
  fail("load_gguf: parameter '", param,
       "' has no counterpart in a llama GGUF file (the config must be a dense, CausalFull "
       "decoder without a learned window gate)");
}

}  // namespace llama_detail

// Checks the file's hyperparameters against Config and fills every parameter of `model` with
// the file's tensors, dequantised (and rounded to the model's Scalar). Throws tessera::Error,
// naming the number or tensor, when they do not fit; the model is then partly overwritten.
template <class Config>
void load_gguf(Decoder<Config, Cpu>& model, const io::GgufFile& file) {
  using R = typename Decoder<Config, Cpu>::Resolved;
  using T = typename Decoder<Config, Cpu>::T;
  static_assert(!R::kMoE, "load_gguf: a llama file has dense FFNs; the config's Ffn must be DenseFfn");
  const io::LlamaHparams hp = io::read_llama_hparams(file);
  const std::string where = "load_gguf '" + file.source() + "': ";
  auto same = [&](const char* what, int64_t in_file, int64_t in_config) {
    TESSERA_CHECK(in_file == in_config, where, what, " is ", in_file, " in the file but ",
                  in_config, " in the config");
  };
  same("layers", hp.layers, R::layers);
  same("d_model", hp.d_model, R::d_model);
  same("heads", hp.heads, R::heads);
  same("kv_heads", hp.kv_heads, R::kv_heads);
  same("ffn_hidden", hp.ffn_hidden, R::ffn_hidden);
  same("vocab", hp.vocab, R::vocab);
  TESSERA_CHECK(hp.tied_embeddings == R::tie_embeddings, where, "the file's head is ",
                hp.tied_embeddings ? "tied to the embedding" : "its own matrix (output.weight)",
                " but the config has tie_embeddings = ", R::tie_embeddings);
  // The file stores both numbers as float32: compare in that precision.
  TESSERA_CHECK(static_cast<float>(hp.rope_theta) == static_cast<float>(R::rope_theta), where,
                "rope.freq_base is ", hp.rope_theta, " in the file but ", R::rope_theta,
                " in the config");
  TESSERA_CHECK(static_cast<float>(hp.norm_eps) == static_cast<float>(R::norm_eps), where,
                "layer_norm_rms_epsilon is ", hp.norm_eps, " in the file but ", R::norm_eps,
                " in the config");

  model.visit_parameters([&](std::string_view name, nn::Parameter<T>& p) {
    const llama_detail::Source src = llama_detail::gguf_source<R>(name);
    Tensor<float> w = file.dequantize(src.name);
    if (src.unpermute_heads > 0) w = llama_detail::unpermute_qk(w, src.unpermute_heads);
    TESSERA_CHECK(w.shape() == p.value.shape(), where, "tensor '", src.name, "' has shape ",
                  w.shape(), ", parameter '", name, "' needs ", p.value.shape());
    T* dst = p.value.data();
    const float* s = w.data();
    for (int64_t i = 0; i < w.numel(); ++i) dst[i] = ops::cast_detail::store<T>(s[i]);
  });
}

}  // namespace tessera::models

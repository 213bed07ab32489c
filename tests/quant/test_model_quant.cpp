// Whole-model weight quantisation (quant/model_quant.hpp): the calibration rows are the inputs
// each product really multiplies (recomputed here through the layers' own forwards), every
// linear weight and only those is quantised, the effective weights reproduce each matrix's
// dequantised value, a quantised file reads back bit for bit (and a file of another format or
// model is refused), and perplexity() equals exp of the loss computed directly.
#define BOOST_TEST_MODULE model_quant
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "tessera/core/rng.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/infer/quantized_weights.hpp"
#include "tessera/quant/model_quant.hpp"

namespace ts = tessera;
namespace q = tessera::quant;
namespace fs = std::filesystem;

namespace {

// One dense block, one MoE block (4 experts in 2 groups, top 2, a shared expert); K of every
// product (64, 64 for wo, 96 and 32 for w_down) is a multiple of the INT4 group 32.
struct TinyMoE {
  static constexpr int vocab = 80, d_model = 64, layers = 2, heads = 4, kv_heads = 2;
  static constexpr int ffn_hidden = 96, moe_hidden = 32, max_seq = 64, dense_layers = 1;
  static constexpr double rope_theta = 500.0, norm_eps = 1e-5;
  using Ffn = ts::nn::MoE<ts::nn::Experts<4>, ts::nn::TopK<2>, ts::nn::GroupLimited<2, 1>,
                          ts::nn::BiasBalance, ts::nn::SharedExperts<1>>;
};
struct TinyTied : TinyMoE {
  static constexpr bool tie_embeddings = true;
};

ts::Tensor<int32_t> tokens(int64_t b, int64_t t, uint64_t seed) {
  ts::Tensor<int32_t> x(ts::Shape{b, t});
  for (int64_t i = 0; i < x.numel(); ++i)
    x.data()[i] = static_cast<int32_t>(ts::philox_u32(ts::Seed{seed}, 0, static_cast<uint64_t>(i)) % 80);
  return x;
}

fs::path temp_file(const std::string& name) {
  return fs::temp_directory_path() / ("tessera_test_model_quant_" + std::to_string(::getpid()) + "_" + name);
}

}  // namespace

BOOST_AUTO_TEST_CASE(calibration_rows_are_the_inputs_of_each_product) {
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{3});
  const auto x = tokens(2, 16, 7);
  const q::CalibrationSet cal = q::collect_calibration(*model, x, 1024);

  // Layer 0's attention input, recomputed: RMSNorm(embedding(x)).
  ts::nn::Embedding<float>::Saved es;
  const ts::Tensor<float> h = model->embedding().forward(x, es);
  ts::nn::RMSNorm<float>::Saved ns;
  const ts::Tensor<float>* normed = nullptr;
  ts::Tensor<float> n0;
  model->for_each_block([&](int64_t l, auto& block) {
    if (l == 0) n0 = block.norm1().forward(h, ns);
  });
  normed = &n0;
  const ts::Tensor<float>& rows = cal.inputs.at("layers.0.attn.wq").x;
  BOOST_TEST(rows.dim(0) == 32);
  BOOST_TEST(rows.dim(1) == 64);
  for (int64_t i = 0; i < rows.numel(); ++i) BOOST_TEST(rows.data()[i] == normed->data()[i]);
  // wk and wv multiply the same rows; wo, the FFN and the experts have their own.
  BOOST_TEST(cal.inputs.at("layers.0.attn.wk").x.numel() == rows.numel());
  BOOST_TEST(cal.inputs.at("layers.0.attn.wo").x.dim(1) == 64);
  BOOST_TEST(cal.inputs.at("layers.0.ffn.w_down").x.dim(1) == 96);
  BOOST_TEST(cal.inputs.at("layers.1.ffn.shared_experts.0.w_down").x.dim(1) == 32);
  // Every expert row count sums to tokens * top_k (each token reaches 2 routed experts).
  int64_t routed = 0;
  for (int e = 0; e < 4; ++e) {
    auto it = cal.inputs.find("layers.1.ffn.experts." + std::to_string(e) + ".w_up");
    if (it != cal.inputs.end()) routed += it->second.x.dim(0);
  }
  BOOST_TEST(routed == 32 * 2);
  BOOST_TEST(cal.inputs.at("lm_head.weight").x.dim(0) == 32);

  // max_rows keeps evenly spaced rows: row i of 8 is row 4 i of the 32.
  const q::CalibrationSet few = q::collect_calibration(*model, x, 8);
  const ts::Tensor<float>& r8 = few.inputs.at("layers.0.attn.wq").x;
  BOOST_TEST(r8.dim(0) == 8);
  for (int64_t i = 0; i < 8; ++i)
    for (int64_t k = 0; k < 64; ++k) BOOST_TEST(r8.data()[i * 64 + k] == rows.data()[(4 * i) * 64 + k]);
}

BOOST_AUTO_TEST_CASE(every_linear_weight_and_only_those_is_quantised) {
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{3});
  const q::CalibrationSet cal = q::collect_calibration(*model, tokens(2, 16, 7));
  const auto ql = q::quantize_linears<q::Int4AWQ<32>>(*model, &cal);
  std::set<std::string> expected;
  model->visit_parameters([&](std::string_view name, auto& p) {
    const std::string n(name);
    const bool linear = n.find("attn.w") != std::string::npos || n.find(".w_") != std::string::npos ||
                        n == "lm_head.weight";
    if (linear && p.value.rank() == 2) expected.insert(n);
  });
  std::set<std::string> got;
  for (const auto& [name, m] : ql.matrices) got.insert(name);
  BOOST_TEST(got == expected, boost::test_tools::per_element());
  // 4 per attention x 2 layers, 3 dense, (4 routed + 1 shared) x 3, the head.
  BOOST_TEST(got.size() == 8u + 3u + 15u + 1u);

  // Effective weights equal each matrix's dequantised value, bit for bit.
  q::load_effective_weights(*model, ql);
  model->visit_parameters([&](std::string_view name, auto& p) {
    auto it = ql.matrices.find(std::string(name));
    if (it == ql.matrices.end()) return;
    const ts::Tensor<float> d = it->second.dequantize();
    for (int64_t i = 0; i < d.numel(); ++i) BOOST_TEST(p.value.data()[i] == d.data()[i]);
  });
}

BOOST_AUTO_TEST_CASE(awq_without_calibration_is_refused_by_name) {
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{3});
  BOOST_CHECK_EXCEPTION(q::quantize_linears<q::Int4AWQ<32>>(*model, nullptr), ts::Error,
                        [](const ts::Error& e) {
                          return std::string(e.what()).find("layers.0.attn.wq") != std::string::npos;
                        });
  // RTN needs none.
  BOOST_CHECK_NO_THROW(q::quantize_linears<q::Int4RTN<32>>(*model, nullptr));
}

template <class Format, class Config>
void round_trip(const std::string& file_name) {
  auto model = std::make_unique<ts::Decoder<Config>>(ts::Seed{5});
  const auto x = tokens(2, 16, 9);
  const q::CalibrationSet cal = q::collect_calibration(*model, x);
  const auto ql = q::quantize_linears<Format>(*model, &cal);
  const fs::path path = temp_file(file_name);
  q::save_quantized(path, *model, ql);

  auto loaded = std::make_unique<ts::Decoder<Config>>(ts::Seed{99});  // other weights first
  const auto back = q::load_quantized<Format>(path, *loaded);
  BOOST_TEST(back.matrices.size() == ql.matrices.size());
  for (const auto& [name, m] : ql.matrices) {
    const ts::Tensor<float> a = m.dequantize(), b = back.at(name).dequantize();
    BOOST_TEST(a.numel() == b.numel());
    for (int64_t i = 0; i < a.numel(); ++i) BOOST_TEST(a.data()[i] == b.data()[i]);
    BOOST_TEST(m.bytes() == back.at(name).bytes());
  }
  // The loaded model computes what the original computes with the quantised weights.
  q::load_effective_weights(*model, ql);
  if constexpr (ts::Decoder<Config>::Resolved::tie_embeddings) q::load_effective_weights(*loaded, back);
  typename ts::Decoder<Config>::Saved s1, s2;
  const ts::Tensor<float> l1 = model->forward(x, s1), l2 = loaded->forward(x, s2);
  for (int64_t i = 0; i < l1.numel(); ++i) BOOST_TEST(l1.data()[i] == l2.data()[i]);

  // Read as another format: refused, naming both.
  auto other = std::make_unique<ts::Decoder<Config>>(ts::Seed{5});
  BOOST_CHECK_EXCEPTION(q::load_quantized<q::BF16Weights>(path, *other), ts::Error,
                        [](const ts::Error& e) {
                          return std::string(e.what()).find("not bf16") != std::string::npos;
                        });
  fs::remove(path);
}

BOOST_AUTO_TEST_CASE(quantised_files_read_back_bit_for_bit) {
  round_trip<q::Int4AWQ<32>, TinyMoE>("awq.safetensors");
  round_trip<q::Int4RTN<32>, TinyTied>("rtn_tied.safetensors");
  round_trip<q::FP8Weights, TinyMoE>("fp8.safetensors");
  // Group 64 does not divide the dense w_down's K = 96 or the experts' K = 32: stored padded.
  round_trip<q::Int4AWQ<64>, TinyMoE>("awq_padded.safetensors");
}

BOOST_AUTO_TEST_CASE(a_k_that_is_not_a_multiple_of_the_group_is_padded_with_zero_columns) {
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{3});
  const q::CalibrationSet cal = q::collect_calibration(*model, tokens(2, 16, 7));
  const auto ql = q::quantize_linears<q::Int4RTN<64>>(*model, &cal);
  const auto& down = ql.at("layers.0.ffn.w_down");  // (64, 96) -> (64, 128)
  BOOST_TEST(down.rows() == 64);
  BOOST_TEST(down.cols() == 128);
  BOOST_TEST(q::padded_cols<q::Int4RTN<64>>(96) == 128);
  BOOST_TEST(q::padded_cols<q::FP8Weights>(96) == 96);
  // The first 96 columns are what quantising the rows with zeros appended gives (the second
  // group of each row holds 32 weights and 32 zeros).
  ts::Tensor<float> w(ts::Shape{64, 128});
  model->visit_parameters([&](std::string_view name, auto& p) {
    if (name != "layers.0.ffn.w_down") return;
    for (int64_t n = 0; n < 64; ++n)
      for (int64_t k = 0; k < 128; ++k) w.data()[n * 128 + k] = k < 96 ? p.value.data()[n * 96 + k] : 0.0f;
  });
  const ts::Tensor<float> expect = q::quantize<q::Int4RTN<64>>(w).dequantize();
  const ts::Tensor<float> got = down.dequantize();
  for (int64_t i = 0; i < got.numel(); ++i) BOOST_TEST(got.data()[i] == expect.data()[i]);
}

BOOST_AUTO_TEST_CASE(a_file_for_another_model_is_refused) {
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{5});
  const auto ql = q::quantize_linears<q::FP8Weights>(*model);
  const fs::path path = temp_file("other_model.safetensors");
  q::save_quantized(path, *model, ql);
  auto tied = std::make_unique<ts::Decoder<TinyTied>>(ts::Seed{5});
  BOOST_CHECK_EXCEPTION(q::load_quantized<q::FP8Weights>(path, *tied), ts::Error,
                        [](const ts::Error& e) {
                          return std::string(e.what()).find("is for the model") != std::string::npos;
                        });
  fs::remove(path);
}

BOOST_AUTO_TEST_CASE(perplexity_is_exp_of_the_mean_loss) {
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{3});
  const auto x = tokens(1, 3 * 16 + 5, 11);  // 3 windows of 16 (+1), a 4-token tail dropped
  const std::span<const int32_t> all(x.data(), static_cast<size_t>(x.numel()));
  const double ppl = q::perplexity(*model, all, 16, 2);
  // Directly: the three windows as one batch, loss = mean CE over 48 targets.
  ts::Tensor<int32_t> in(ts::Shape{3, 16}), out(ts::Shape{3, 16});
  for (int64_t w = 0; w < 3; ++w)
    for (int64_t t = 0; t < 16; ++t) {
      in.data()[w * 16 + t] = x.data()[w * 16 + t];
      out.data()[w * 16 + t] = x.data()[w * 16 + t + 1];
    }
  typename ts::Decoder<TinyMoE>::Saved s;
  const ts::models::ModelStats st = model->forward(in, out, s);
  BOOST_TEST(st.targets == 48);
  BOOST_TEST(ppl == std::exp(st.cross_entropy), boost::test_tools::tolerance(1e-5));
  BOOST_CHECK_THROW(q::perplexity(*model, all.subspan(0, 10), 16), ts::Error);
}

// Decoding through the packed matrices (infer::QuantizedWeights, quant::linear's kernels) gives
// the logits of the model holding the same matrices' effective values (ops::linear in fp32), to
// fp32 summation-order rounding; a sequence decoded beside another gets the same bits as alone.
template <class Format, class Config>
void decode_matches_effective_weights() {
  auto model = std::make_unique<ts::Decoder<Config>>(ts::Seed{8});
  const auto x = tokens(2, 16, 21);
  const q::CalibrationSet cal = q::collect_calibration(*model, x);
  const auto ql = q::quantize_linears<Format>(*model, &cal);
  q::load_effective_weights(*model, ql);
  const ts::infer::QuantizedWeights weights(*model, ql);
  BOOST_TEST(weights.bytes() > 0);

  const std::vector<int32_t> prompt(x.data(), x.data() + 12), other(x.data() + 16, x.data() + 23);
  auto pool = ts::infer::make_pool(*model, 256);
  auto dense_cache = ts::infer::make_cache(*model, pool), q_cache = ts::infer::make_cache(*model, pool);
  const ts::Tensor<float> dense = ts::infer::forward_cached(*model, prompt, dense_cache, true);
  const ts::Tensor<float> packed = ts::infer::forward_cached(*model, prompt, q_cache, weights, true);
  float scale = 0;
  for (int64_t i = 0; i < dense.numel(); ++i) scale = std::max(scale, std::abs(dense.data()[i]));
  for (int64_t i = 0; i < dense.numel(); ++i)
    BOOST_TEST(std::abs(packed.data()[i] - dense.data()[i]) <= 1e-5f * scale);

  // Batched beside another sequence vs alone: the same bits.
  auto a = ts::infer::make_cache(*model, pool), b = ts::infer::make_cache(*model, pool);
  std::vector<ts::infer::BatchEntry<float>> step{{a, prompt, ts::infer::Logits::kAll},
                                                 {b, other, ts::infer::Logits::kAll}};
  const auto together = ts::infer::forward_batch(*model, step, weights);
  if constexpr (!ts::Decoder<Config>::Resolved::kMoE) {  // an MoE layer runs ops::linear inside
    for (int64_t i = 0; i < packed.numel(); ++i) BOOST_TEST(together[0].data()[i] == packed.data()[i]);
  }
}

struct TinyDenseTied {
  static constexpr int vocab = 80, d_model = 64, layers = 2, heads = 4, kv_heads = 2;
  static constexpr int ffn_hidden = 96, max_seq = 64;
  static constexpr bool tie_embeddings = true;
  static constexpr double rope_theta = 500.0, norm_eps = 1e-5;
};

BOOST_AUTO_TEST_CASE(decoding_through_the_packed_matrices) {
  decode_matches_effective_weights<q::Int4AWQ<64>, TinyDenseTied>();  // w_down padded 96 -> 128
  decode_matches_effective_weights<q::Int4RTN<32>, TinyDenseTied>();
  decode_matches_effective_weights<q::FP8Weights, TinyDenseTied>();
  decode_matches_effective_weights<q::BF16Weights, TinyMoE>();
}

// Whole-model weight quantisation (quant/model_quant.hpp): the calibration rows are the inputs
// each product really multiplies (recomputed here through the layers' own forwards), every
// linear weight and only those is quantised, the effective weights reproduce each matrix's
// dequantised value, a quantised file reads back bit for bit (and a file of another format or
// model is refused), and perplexity() equals exp of the loss computed directly.
#define BOOST_TEST_MODULE model_quant
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "tessera/core/memory.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/infer/generate.hpp"
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
  // Blocks of 64: the dense w_down (K = 96) and the experts (K = 32) are stored padded.
  round_trip<q::FP8BlockWeights<64>, TinyMoE>("fp8_blocks.safetensors");
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
  BOOST_TEST(q::padded_cols<q::FP8BlockWeights<64>>(96) == 128);
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
  auto dense_cache = ts::infer::make_cache(*model, pool);
  const ts::Tensor<float> dense = ts::infer::forward_cached(*model, prompt, dense_cache, true);
  float scale = 0;
  for (int64_t i = 0; i < dense.numel(); ++i) scale = std::max(scale, std::abs(dense.data()[i]));

  // The 1e-5 bound holds for the float kernels, which do not round activations: "avx512" pins
  // the widest of them. The default path may be avx512-vnni, which multiplies INT4 codes by int8
  // activations (its own bound is checked product by product in test_qgemm); it must still give
  // a batched sequence the bits it gets alone.
  const char* const env = std::getenv("TESSERA_QGEMM_PATH");
  const std::string keep = env ? env : "";
  for (const bool float_path : {true, false}) {
    if (float_path) setenv("TESSERA_QGEMM_PATH", "avx512", 1);
    else if (keep.empty()) unsetenv("TESSERA_QGEMM_PATH");
    else setenv("TESSERA_QGEMM_PATH", keep.c_str(), 1);
    auto q_cache = ts::infer::make_cache(*model, pool);
    const ts::Tensor<float> packed = ts::infer::forward_cached(*model, prompt, q_cache, weights, true);
    float worst = 0;
    for (int64_t i = 0; i < dense.numel(); ++i)
      worst = std::max(worst, std::abs(packed.data()[i] - dense.data()[i]) / scale);
    std::printf("%s %s: max |packed - dense| / max |dense| = %.3g\n", Format::kName,
                float_path ? "avx512" : q::to_string(q::kernel_path()), worst);
    if (float_path) BOOST_TEST(worst <= 1e-5f);

    // Batched beside another sequence vs alone: the same bits.
    auto a = ts::infer::make_cache(*model, pool), b = ts::infer::make_cache(*model, pool);
    std::vector<ts::infer::BatchEntry<float>> step{{a, prompt, ts::infer::Logits::kAll},
                                                   {b, other, ts::infer::Logits::kAll}};
    const auto together = ts::infer::forward_batch(*model, step, weights);
    if constexpr (!ts::Decoder<Config>::Resolved::kMoE) {  // an MoE layer runs ops::linear inside
      for (int64_t i = 0; i < packed.numel(); ++i) BOOST_TEST(together[0].data()[i] == packed.data()[i]);
    }
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
  decode_matches_effective_weights<q::FP8BlockWeights<64>, TinyDenseTied>();  // w_down padded
  decode_matches_effective_weights<q::BF16Weights, TinyMoE>();
}

// generate() through a Weights object: the steps of a hand-written loop over forward_cached with
// those weights (greedy), streamed token by token, ending at a stop token. The model's own
// linear weights are zeroed first (QuantizedWeights holds its own matrices): a generate() that
// used them would see all-zero logits and emit token 0 every step.
BOOST_AUTO_TEST_CASE(generate_runs_through_the_packed_matrices) {
  // BF16 on the untied MoE model: what decode_matches_effective_weights instantiates (compile
  // time); untied, so zeroing the linear weights zeroes the head too.
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{8});
  const ts::infer::QuantizedWeights weights(*model, q::quantize_linears<q::BF16Weights>(*model));
  model->visit_parameters([&](std::string_view name, auto& p) {
    if (q::is_linear_weight(name)) std::fill(p.value.data(), p.value.data() + p.value.numel(), 0.0f);
  });
  ts::Tensor<float>& head = model->lm_head_weight().value;
  std::fill(head.data(), head.data() + head.numel(), 0.0f);
  const std::vector<int32_t> prompt{3, 14, 15, 9, 26};
  constexpr int kNew = 12;
  auto cache = ts::infer::make_cache(*model);
  std::vector<int32_t> want;
  ts::Tensor<float> logits = ts::infer::forward_cached(*model, prompt, cache, weights);
  for (int i = 0; i < kNew; ++i) {
    const float* l = logits.data();
    want.push_back(static_cast<int32_t>(std::max_element(l, l + logits.numel()) - l));
    if (i + 1 < kNew) logits = ts::infer::forward_cached(*model, std::span(&want.back(), 1), cache, weights);
  }
  BOOST_TEST(std::count(want.begin(), want.end(), 0) < kNew);
  ts::infer::GenerateOptions opt;
  opt.max_new_tokens = kNew;
  std::vector<int32_t> streamed;
  const auto got = ts::infer::generate(*model, weights, prompt, opt, [&](int32_t id) {
    streamed.push_back(id);
    return true;
  });
  BOOST_TEST(got == want, boost::test_tools::per_element());
  BOOST_TEST(streamed == want, boost::test_tools::per_element());
  opt.stop_tokens = {want[4]};
  const auto stopped = ts::infer::generate(*model, weights, prompt, opt);
  const auto first = std::find(want.begin(), want.end(), want[4]);
  BOOST_TEST(stopped == std::vector<int32_t>(want.begin(), first + 1), boost::test_tools::per_element());
}

// HeadWeights::kModel: the head's product is the model's own (DenseWeights' bits), the rest
// stays quantised, and bytes() counts the fp32 head instead of the packed one.
BOOST_AUTO_TEST_CASE(the_head_can_stay_the_models_own) {
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{8});
  const auto ql = q::quantize_linears<q::BF16Weights>(*model);
  const ts::infer::QuantizedWeights packed(*model, ql);
  const ts::infer::QuantizedWeights own_head(*model, ql, ts::infer::HeadWeights::kModel);
  const ts::infer::DenseWeights<ts::Decoder<TinyMoE>> dense(*model);
  using Id = ts::infer::WeightId;
  ts::Tensor<float> x = ts::Tensor<float>::empty(ts::Shape{3, TinyMoE::d_model});
  for (int64_t i = 0; i < x.numel(); ++i) x.data()[i] = static_cast<float>(i % 17) / 8.0f - 1.0f;
  const ts::Tensor<float> h_own = own_head.linear(-1, Id::kHead, x), h_dense = dense.linear(-1, Id::kHead, x);
  const ts::Tensor<float> h_packed = packed.linear(-1, Id::kHead, x);
  BOOST_TEST_REQUIRE(h_own.numel() == h_dense.numel());
  int64_t differ_dense = 0, differ_packed = 0;
  for (int64_t i = 0; i < h_own.numel(); ++i) {
    differ_dense += h_own.data()[i] != h_dense.data()[i];
    differ_packed += h_own.data()[i] != h_packed.data()[i];
  }
  BOOST_TEST(differ_dense == 0);
  BOOST_TEST(differ_packed > 0);  // bf16 rounding of the packed head shows
  const ts::Tensor<float> q_own = own_head.linear(0, Id::kQ, x), q_packed = packed.linear(0, Id::kQ, x);
  for (int64_t i = 0; i < q_own.numel(); ++i) BOOST_TEST(q_own.data()[i] == q_packed.data()[i]);
  const int64_t head_fp32 = model->lm_head_weight().value.numel() * 4;
  BOOST_TEST(own_head.bytes() == packed.bytes() - static_cast<int64_t>(ql.at(std::string(q::kHeadName)).bytes()) + head_fp32);
  BOOST_CHECK_EXCEPTION(own_head.matrix(-1, Id::kHead), ts::Error, [](const ts::Error& e) {
    return std::string(e.what()).find("HeadWeights::kModel") != std::string::npos;
  });
}

// release_model_weights frees exactly the model's copies of the packed matrices (counted by
// core/memory.hpp), decoding through the packed matrices gives the same bits afterwards, and the
// model's own forward refuses instead of reading freed weights. A tied head is the embedding
// table: kept.
template <class Config, class Format>
void release_keeps_decoding() {
  auto model = std::make_unique<ts::Decoder<Config>>(ts::Seed{8});
  const ts::infer::QuantizedWeights weights(*model, q::quantize_linears<Format>(*model));
  const std::vector<int32_t> prompt{3, 14, 15, 9, 26, 5};
  auto before_cache = ts::infer::make_cache(*model);
  const ts::Tensor<float> before = ts::infer::forward_cached(*model, prompt, before_cache, weights, true);
  int64_t expect = 0;
  model->visit_parameters([&](std::string_view name, auto& p) {
    if (q::is_linear_weight(name)) expect += (p.value.numel() + p.grad.numel()) * 4;  // and its gradient
  });
  if constexpr (ts::Decoder<Config>::Resolved::tie_embeddings) {
    BOOST_TEST(model->lm_head_weight().value.numel() > 0);  // the table: counted by no name above
  }
  const int64_t live = ts::memory::live_bytes();
  BOOST_TEST(weights.release_model_weights(*model) == expect);
  BOOST_TEST(live - ts::memory::live_bytes() == expect);
  BOOST_TEST((model->lm_head_weight().value.numel() > 0) == ts::Decoder<Config>::Resolved::tie_embeddings);
  auto after_cache = ts::infer::make_cache(*model);
  const ts::Tensor<float> after = ts::infer::forward_cached(*model, prompt, after_cache, weights, true);
  BOOST_TEST_REQUIRE(after.numel() == before.numel());
  BOOST_TEST(std::memcmp(after.data(), before.data(), static_cast<size_t>(after.numel()) * 4) == 0);
  const auto x = tokens(1, 8, 3);
  typename ts::Decoder<Config>::Saved saved;
  BOOST_CHECK_EXCEPTION(model->forward(x, saved), ts::Error, [](const ts::Error& e) {
    std::printf("after release, the model's own forward: %s\n", e.what());
    return true;
  });
}

BOOST_AUTO_TEST_CASE(releasing_the_models_copies_keeps_decoding) {
  release_keeps_decoding<TinyMoE, q::BF16Weights>();
  release_keeps_decoding<TinyDenseTied, q::Int4RTN<32>>();
}

// infer::QuantizedWeights stores q/k/v and gate/up stacked (one matrix per group) when they
// share columns and input scales; the stacked product must give exactly the bits of the
// separate products, through linear_group and through linear() of one weight alone.
template <class Format>
void stacked_products_equal_separate_ones() {
  auto model = std::make_unique<ts::Decoder<TinyDenseTied>>(ts::Seed{5});
  const auto x = tokens(2, 16, 9);
  const q::CalibrationSet cal = q::collect_calibration(*model, x);
  const auto ql = q::quantize_linears<Format>(*model, &cal);
  const ts::infer::QuantizedWeights weights(*model, ql);
  using Id = ts::infer::WeightId;
  ts::Tensor<float> in = ts::Tensor<float>::empty(ts::Shape{3, 64});
  for (int64_t i = 0; i < in.numel(); ++i)
    in.data()[i] = static_cast<float>(ts::philox_u32(ts::Seed{77}, 0, static_cast<uint64_t>(i)) % 2001) / 1000.0f - 1.0f;
  for (int64_t l = 0; l < 2; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    for (const std::vector<Id>& group : {std::vector<Id>{Id::kQ, Id::kK, Id::kV},
                                        std::vector<Id>{Id::kFfnGate, Id::kFfnUp}}) {
      // Stacked exactly when the matrices can share one call.
      bool shareable = true;
      const auto& first = ql.at(p + ts::infer::weight_name(group[0]));
      for (Id id : group) {
        const auto& m = ql.at(p + ts::infer::weight_name(id));
        shareable = shareable && m.cols() == first.cols() &&
                    std::ranges::equal(m.input_scales_inv(), first.input_scales_inv());
      }
      for (Id id : group) BOOST_TEST(weights.stacked(l, id) == shareable);
      const auto together = weights.linear_group(l, group, in);
      BOOST_TEST_REQUIRE(together.size() == group.size());
      for (std::size_t g = 0; g < group.size(); ++g) {
        const ts::Tensor<float> alone = q::linear(in, ql.at(p + ts::infer::weight_name(group[g])));
        const ts::Tensor<float> one = weights.linear(l, group[g], in);
        BOOST_TEST_REQUIRE(together[g].numel() == alone.numel());
        BOOST_TEST(together[g].shape() == alone.shape());
        for (int64_t i = 0; i < alone.numel(); ++i) {
          BOOST_TEST(together[g].data()[i] == alone.data()[i]);
          BOOST_TEST(one.data()[i] == alone.data()[i]);
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(stacked_products_are_the_separate_products) {
  // The formats decode_matches_effective_weights instantiates for this model (compile time).
  stacked_products_equal_separate_ones<q::Int4RTN<32>>();
  stacked_products_equal_separate_ones<q::Int4AWQ<64>>();
  stacked_products_equal_separate_ones<q::FP8Weights>();
  stacked_products_equal_separate_ones<q::FP8BlockWeights<64>>();
}

// An MoE block's experts (routed and shared) are multiplied from the packed matrices
// (QuantizedWeights::expert_ffn), not from the model's parameters: decoding through the packed
// matrices matches the model holding their effective values, and zeroing the model's expert
// parameters afterwards changes nothing on the packed path (and moves the dense path's logits).
BOOST_AUTO_TEST_CASE(moe_experts_run_from_the_packed_matrices) {
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{8});
  const auto x = tokens(2, 16, 21);
  // BF16: the format decode_matches_effective_weights instantiates for TinyMoE (compile time).
  const auto ql = q::quantize_linears<q::BF16Weights>(*model);
  q::load_effective_weights(*model, ql);
  const ts::infer::QuantizedWeights weights(*model, ql);
  BOOST_TEST(weights.expert_bytes() > 0);
  const std::vector<int32_t> prompt(x.data(), x.data() + 12);
  auto pool = ts::infer::make_pool(*model, 256);
  auto run = [&](bool packed) {
    auto cache = ts::infer::make_cache(*model, pool);
    return packed ? ts::infer::forward_cached(*model, prompt, cache, weights, true)
                  : ts::infer::forward_cached(*model, prompt, cache, true);
  };
  // The float kernels do not round activations, so the 1e-5 bound holds for them.
  const char* const env = std::getenv("TESSERA_QGEMM_PATH");
  const std::string keep = env ? env : "";
  setenv("TESSERA_QGEMM_PATH", "avx512", 1);
  const ts::Tensor<float> dense = run(false), packed = run(true);
  float scale = 0;
  for (int64_t i = 0; i < dense.numel(); ++i) scale = std::max(scale, std::abs(dense.data()[i]));
  for (int64_t i = 0; i < dense.numel(); ++i)
    BOOST_TEST(std::abs(packed.data()[i] - dense.data()[i]) <= 1e-5f * scale);

  model->for_each_block([&](int64_t, auto& block) {
    if constexpr (std::decay_t<decltype(block)>::kMoE) {
      auto zero = [](auto& ffn) {
        for (auto* w : {&ffn.w_gate.value, &ffn.w_up.value, &ffn.w_down.value})
          std::fill(w->data(), w->data() + w->numel(), 0.0f);
      };
      for (int e = 0; e < 4; ++e) zero(block.ffn().expert(e));
      zero(block.ffn().shared_expert(0));
    }
  });
  const ts::Tensor<float> packed_again = run(true), dense_again = run(false);
  if (keep.empty()) unsetenv("TESSERA_QGEMM_PATH");
  else setenv("TESSERA_QGEMM_PATH", keep.c_str(), 1);
  for (int64_t i = 0; i < packed.numel(); ++i) BOOST_TEST(packed_again.data()[i] == packed.data()[i]);
  float moved = 0;
  for (int64_t i = 0; i < dense.numel(); ++i)
    moved = std::max(moved, std::abs(dense_again.data()[i] - dense.data()[i]));
  BOOST_TEST(moved > 1e-3f * scale);
}

// ---- AWQ's module search (quant/model_quant.hpp, the comment above AwqOptions) --------------

namespace {

// Layer l's block input for the calibration tokens, through the model's own layers.
ts::Tensor<float> block_input(ts::Decoder<TinyMoE>& model, const ts::Tensor<int32_t>& x, int64_t layer) {
  ts::nn::Embedding<float>::Saved es;
  ts::Tensor<float> h = model.embedding().forward(x, es);
  model.for_each_block([&](int64_t l, auto& block) {
    if (l >= layer) return;
    typename std::remove_cvref_t<decltype(block)>::Saved s;
    h = block.forward(h, s);
  });
  return h;
}

// Q(W·diag(s))·diag(1/s) with core/int4.hpp's group quantiser, s from the documented formula.
ts::Tensor<float> awq_effective_here(const ts::Tensor<float>& w, const std::vector<float>& s) {
  const int64_t n = w.dim(0), k = w.dim(1);
  std::vector<float> scaled(static_cast<size_t>(n * k));
  for (int64_t i = 0; i < n * k; ++i) scaled[static_cast<size_t>(i)] = w.data()[i] * s[static_cast<size_t>(i % k)];
  const auto blocks = ts::quantize_int4<32>(scaled.data(), n * k, ts::Int4Mode::kAsymmetric);
  ts::Tensor<float> out(w.shape());
  ts::dequantize_int4(blocks, out.data());
  for (int64_t i = 0; i < n * k; ++i) out.data()[i] *= 1.0f / s[static_cast<size_t>(i % k)];
  return out;
}

std::vector<float> scales_here(const ts::Tensor<float>& x, float alpha) {
  const int64_t k = x.dim(-1), rows = x.numel() / k;
  std::vector<float> s(static_cast<size_t>(k));
  float lo = 0, hi = 0;
  for (int64_t c = 0; c < k; ++c) {
    double a = 0;
    for (int64_t r = 0; r < rows; ++r) a += std::abs(static_cast<double>(x.data()[r * k + c]));
    const float ac = std::max(static_cast<float>(a / static_cast<double>(rows)), 1e-4f);
    s[static_cast<size_t>(c)] = std::pow(ac, alpha);
    lo = c == 0 ? s[0] : std::min(lo, s[static_cast<size_t>(c)]);
    hi = c == 0 ? s[0] : std::max(hi, s[static_cast<size_t>(c)]);
  }
  for (float& v : s) v /= std::sqrt(hi * lo);
  return s;
}

double sq_error(const ts::Tensor<float>& a, const ts::Tensor<float>& b) {
  double e = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double d = static_cast<double>(a.data()[i]) - static_cast<double>(b.data()[i]);
    e += d * d;
  }
  return e;
}

}  // namespace

BOOST_AUTO_TEST_CASE(awq_products_that_read_one_input_share_one_scale_vector) {
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{3});
  const q::CalibrationSet cal = q::collect_calibration(*model, tokens(2, 16, 7));
  q::AwqReport report;
  const auto ql = q::quantize_linears<q::Int4AWQ<32>>(*model, &cal, {}, &report);
  auto same = [&](const std::string& a, const std::string& b) {
    const auto sa = ql.at(a).input_scales_inv(), sb = ql.at(b).input_scales_inv();
    return std::vector<float>(sa.begin(), sa.end()) == std::vector<float>(sb.begin(), sb.end()) &&
           ql.at(a).awq_alpha() == ql.at(b).awq_alpha();
  };
  std::vector<std::string> bases{"layers.1.ffn.shared_experts.0."};
  for (int e = 0; e < 4; ++e) bases.push_back("layers.1.ffn.experts." + std::to_string(e) + ".");
  bases.push_back("layers.0.ffn.");
  for (const std::string l : {"layers.0.", "layers.1."}) {
    BOOST_TEST(same(l + "attn.wq", l + "attn.wk"));
    BOOST_TEST(same(l + "attn.wq", l + "attn.wv"));
  }
  for (const auto& b : bases) BOOST_TEST(same(b + "w_gate", b + "w_up"), b);
  // One report group per shared vector: 2 attentions, the dense FFN, 5 experts, the head.
  BOOST_TEST(report.groups.size() == 2u + 1u + 5u + 1u);
  // Each product searched alone (the other objective) picks its own scales, so the check above
  // can tell the two apart.
  q::AwqOptions alone;
  alone.module_objective = false;
  const auto separate = q::quantize_linears<q::Int4AWQ<32>>(*model, &cal, alone);
  int differ = 0;
  for (const std::string l : {"layers.0.", "layers.1."}) {
    const auto a = separate.at(l + "attn.wq").input_scales_inv(), b = separate.at(l + "attn.wk").input_scales_inv();
    differ += std::vector<float>(a.begin(), a.end()) != std::vector<float>(b.begin(), b.end());
  }
  BOOST_TEST(differ > 0);
}

BOOST_AUTO_TEST_CASE(awq_alpha_minimises_the_module_output_error_over_the_grid) {
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{3});
  const auto x = tokens(2, 16, 7);
  const q::CalibrationSet cal = q::collect_calibration(*model, x);
  q::AwqReport report;
  const auto ql = q::quantize_linears<q::Int4AWQ<32>>(*model, &cal, {}, &report);
  for (const int64_t layer : {0, 1}) {
    // Attention of `layer` on its input norm1(h), recomputed here; the objective is the squared
    // error of the attention output against the unquantised weights' output.
    const ts::Tensor<float> h = block_input(*model, x, layer);
    model->for_each_block([&](int64_t l, auto& block) {
      if (l != layer) return;
      ts::nn::RMSNorm<float>::Saved ns;
      const ts::Tensor<float> xin = block.norm1().forward(h, ns);
      auto& attn = block.attn();
      typename std::remove_cvref_t<decltype(attn)>::Saved s0;
      const ts::Tensor<float> ref = attn.forward(xin, s0);
      ts::nn::Parameter<float>* ps[3] = {&attn.wq(), &attn.wk(), &attn.wv()};
      std::vector<ts::Tensor<float>> orig;
      for (auto* p : ps) orig.push_back(p->value.clone());
      std::vector<double> err;
      for (int g = 0; g < q::kAwqGrid; ++g) {
        const std::vector<float> s = scales_here(xin, static_cast<float>(g) / q::kAwqGrid);
        for (int i = 0; i < 3; ++i) ps[i]->value = awq_effective_here(orig[static_cast<size_t>(i)], s);
        typename std::remove_cvref_t<decltype(attn)>::Saved s1;
        err.push_back(sq_error(attn.forward(xin, s1), ref));
      }
      for (int i = 0; i < 3; ++i) ps[i]->value = std::move(orig[static_cast<size_t>(i)]);
      const int best = static_cast<int>(std::min_element(err.begin(), err.end()) - err.begin());
      const std::string name = "layers." + std::to_string(layer) + ".attn.wq";
      std::printf("%s: module error over the grid: alpha 0 %.5g, best alpha %.2f %.5g\n",
                  name.c_str(), err[0], best / double(q::kAwqGrid), err[static_cast<size_t>(best)]);
      BOOST_TEST(ql.at(name).awq_alpha() == static_cast<float>(best) / q::kAwqGrid);
      const auto it = std::find_if(report.groups.begin(), report.groups.end(),
                                   [&](const q::AwqGroupResult& r) { return r.names[0] == name; });
      BOOST_REQUIRE(it != report.groups.end());
      BOOST_TEST(it->rtn_error == err[0], boost::test_tools::tolerance(1e-9));
      BOOST_TEST(it->scaled_error == err[static_cast<size_t>(best)], boost::test_tools::tolerance(1e-9));
    });
  }
}

BOOST_AUTO_TEST_CASE(awq_is_never_worse_than_rtn_on_its_module_objective) {
  auto model = std::make_unique<ts::Decoder<TinyMoE>>(ts::Seed{4});
  const auto x = tokens(2, 16, 8);
  const q::CalibrationSet cal = q::collect_calibration(*model, x);
  q::AwqReport report;
  const auto awq = q::quantize_linears<q::Int4AWQ<32>>(*model, &cal, {}, &report);
  const auto rtn = q::quantize_linears<q::Int4RTN<32>>(*model);
  for (const auto& g : report.groups) {
    BOOST_TEST(g.error <= g.scaled_error, g.names[0]);
    BOOST_TEST(g.scaled_error <= g.rtn_error, g.names[0]);
  }
  // With the quantised earlier blocks feeding the search, the same holds, and the model is left
  // with its own weights (the search writes candidates into it).
  std::vector<ts::Tensor<float>> before;
  model->visit_parameters([&](std::string_view, auto& p) { before.push_back(p.value.clone()); });
  q::AwqOptions sequential;
  sequential.quantized_inputs = true;
  q::AwqReport seq_report;
  (void)q::quantize_linears<q::Int4AWQ<32>>(*model, &cal, sequential, &seq_report);
  BOOST_TEST(seq_report.groups.size() == report.groups.size());
  for (const auto& g : seq_report.groups) BOOST_TEST(g.error <= g.rtn_error, g.names[0]);
  size_t at = 0;
  int64_t changed = 0;
  model->visit_parameters([&](std::string_view, auto& p) {
    const ts::Tensor<float>& b = before[at++];
    for (int64_t i = 0; i < b.numel(); ++i) changed += p.value.data()[i] != b.data()[i];
  });
  BOOST_TEST(changed == 0);
  // Recomputed here for the dense FFN of layer 0: AWQ's final gate/up (clipping included) against
  // RTN's, on the FFN output over the calibration tokens.
  const ts::Tensor<float> h = block_input(*model, x, 0);
  model->for_each_block([&](int64_t l, auto& block) {
    if constexpr (!std::remove_cvref_t<decltype(block)>::kMoE) {
    if (l != 0) return;
    typename std::remove_cvref_t<decltype(block)>::Saved s;
    (void)block.forward(h, s);
    auto& ffn = block.ffn();
    typename std::remove_cvref_t<decltype(ffn)>::Saved f0, f1, f2;
    const ts::Tensor<float> ref = ffn.forward(s.ffn.x, f0);
    const ts::Tensor<float> gate = ffn.w_gate.value.clone(), up = ffn.w_up.value.clone();
    auto with = [&](const auto& qm, auto& saved) {
      ffn.w_gate.value = qm.at("layers.0.ffn.w_gate").dequantize();
      ffn.w_up.value = qm.at("layers.0.ffn.w_up").dequantize();
      return sq_error(ffn.forward(s.ffn.x, saved), ref);
    };
    const double e_awq = with(awq, f1), e_rtn = with(rtn, f2);
    ffn.w_gate.value = gate.clone();
    ffn.w_up.value = up.clone();
    std::printf("layers.0 FFN output error: AWQ %.5g, RTN %.5g\n", e_awq, e_rtn);
    BOOST_TEST(e_awq <= e_rtn);
    }
  });
}

// tests/infer/test_smollm2.cpp — the real SmolLM2-135M-Instruct (GGUF, Q4_1) run by tessera
// (docs/inference.md).
//
// Suites, one CTest entry each:
//   cache_tiny  no data: a small random Llama-shaped Decoder; forward_cached over a sequence fed
//               in chunks (1, 3, the rest) gives Decoder::forward's logits at every position;
//               two sequences share a paged block pool
//   tiny_gguf   a small random Llama GGUF (untied head, a different tensor format per weight)
//               written by the gguf package: logits and greedy tokens vs the numpy reference
//   tokenizer   the GGUF-embedded tokenizer vs the Hugging Face `tokenizers` library on real
//               English text (fortunes) and edge cases; chat prompts vs jinja2 on the file's
//               own template (tests/infer/smollm2_reference.py --tokenize)
//   cache_real  the same cache check on the real model, 40 tokens
//   greedy      greedy continuations of 22 prompts (20 plain, 2 chat) equal, token for token,
//               those of an independent float64 numpy forward of the same dequantised weights
//               (smollm2_reference.py --greedy: gguf-py's dequantisation, llama.cpp's RoPE
//               pairing on the file's row order)
#define BOOST_TEST_MODULE smollm2
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cache_check.hpp"
#include "common/smollm2.hpp"
#include "common/subprocess.hpp"
#include "tessera/infer/generate.hpp"
#include "tessera/infer/kv_cache.hpp"
#include "tessera/io/gguf.hpp"
#include "tessera/io/gguf_llama.hpp"
#include "tessera/models/llama.hpp"
#include "tessera/quant/model_quant.hpp"

#ifndef TESSERA_INFER_TEST_DIR
#define TESSERA_INFER_TEST_DIR "tests/infer"
#endif

namespace fs = std::filesystem;
namespace ts = tessera;
using ts::models::SmolLM2_135M;

namespace {

const std::string kScript = std::string(TESSERA_INFER_TEST_DIR) + "/smollm2_reference.py";

using ts::test::python_with;
using ts::test::run_capture;

fs::path scratch(const std::string& name) {
  return ts::test::scratch_dir("tessera_smollm2_" + name);
}

// Runs the reference in `mode` on `request`; returns its JSON (or null after a skip line).
nlohmann::json reference(const std::string& py, const std::string& mode, const fs::path& gguf,
                         const nlohmann::json& request) {
  const fs::path dir = scratch(mode.substr(2));
  {
    std::ofstream(dir / "in.json") << request.dump();
  }
  int rc = 0;
  const auto t0 = std::chrono::steady_clock::now();
  run_capture(py + " " + kScript + " " + mode + " " + gguf.string() + " " +
                  (dir / "in.json").string() + " " + (dir / "out.json").string(),
              &rc);
  std::cout << "reference " << mode << ": "
            << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
            << " s" << std::endl;
  if (rc == 77) {
    std::cout << "TESSERA_SKIP: the reference's Python modules are missing" << std::endl;
    fs::remove_all(dir);
    return nullptr;
  }
  BOOST_REQUIRE_EQUAL(rc, 0);
  std::ifstream in(dir / "out.json");
  nlohmann::json out = nlohmann::json::parse(in);
  fs::remove_all(dir);
  return out;
}

// The real model, loaded once per process.
struct Real {
  fs::path path;
  std::unique_ptr<ts::io::GgufFile> file;
  std::unique_ptr<ts::Decoder<SmolLM2_135M>> model;
  std::unique_ptr<ts::io::GgufTokenizer> tok;
};

Real* real() {
  static Real r = [] {
    Real x;
    x.path = ts::test::smollm2_gguf();
    if (x.path.empty()) return x;
    const auto t0 = std::chrono::steady_clock::now();
    x.file = std::make_unique<ts::io::GgufFile>(ts::io::GgufFile::open(x.path));
    x.model = std::make_unique<ts::Decoder<SmolLM2_135M>>(ts::Seed{0});
    ts::models::load_gguf(*x.model, *x.file);
    x.tok = std::make_unique<ts::io::GgufTokenizer>(ts::io::read_gguf_tokenizer(*x.file));
    std::cout << "SmolLM2 loaded in "
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
              << " s" << std::endl;
    return x;
  }();
  return r.model ? &r : nullptr;
}

std::vector<int32_t> to_i32(const std::vector<ts::data::TokenId>& ids) {
  return std::vector<int32_t>(ids.begin(), ids.end());
}

struct TinyLlama {
  static constexpr int vocab = 97, d_model = 48, layers = 3, heads = 6, kv_heads = 2;
  static constexpr int ffn_hidden = 40, max_seq = 64;
  static constexpr bool tie_embeddings = true;
  static constexpr double rope_theta = 500.0, norm_eps = 1e-5;
};

// The shape of smollm2_reference.py --make-tiny's file: untied head, Q4_K FFN (d_model and
// ffn_hidden multiples of 256).
struct TinyGguf {
  static constexpr int vocab = 300, d_model = 256, layers = 2, heads = 4, kv_heads = 2;
  static constexpr int ffn_hidden = 512, max_seq = 64;
  static constexpr bool tie_embeddings = false;
  static constexpr double rope_theta = 10000.0, norm_eps = 1e-5;
};

}  // namespace

// A small random Llama GGUF written by the gguf package (untied head; Q8_0, Q4_0, Q4_1, F16,
// BF16, Q4_K and F32 tensors) through load_gguf and generate, against the numpy reference: the
// same comparison as `greedy` without the real file, and the untied-head path.
BOOST_AUTO_TEST_SUITE(tiny_gguf)

BOOST_AUTO_TEST_CASE(logits_and_greedy_equal_numpy_reference) {
  const std::string py = python_with("numpy, gguf");
  if (py.empty()) {
    std::cout << "TESSERA_SKIP: numpy and gguf cannot be imported" << std::endl;
    return;
  }
  const fs::path dir = scratch("tiny");
  const fs::path file = dir / "tiny.gguf";
  int rc = 0;
  run_capture(py + " " + kScript + " --make-tiny " + file.string() + " 3", &rc);
  BOOST_REQUIRE_EQUAL(rc, 0);
  const auto gguf = ts::io::GgufFile::open(file);
  ts::Decoder<TinyGguf> model{ts::Seed{1}};
  ts::models::load_gguf(model, gguf);
  const std::vector<std::vector<int32_t>> prompts = {
      {1, 2, 3, 4, 5}, {7, 8, 9}, {299, 0, 150, 42, 42, 42, 17}, {100}};
  constexpr int kNew = 8;
  const auto ref = reference(py, "--greedy", file,
                             {{"prompts", prompts}, {"new_tokens", kNew}, {"first_logits", true}});
  if (ref.is_null()) return;
  double worst = 0, scale = 0;
  int compared = 0;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    auto cache = ts::infer::make_cache(model);
    const auto logits = ts::infer::forward_cached(model, prompts[i], cache);
    const auto want = ref["first_logits"][i].get<std::vector<double>>();
    BOOST_REQUIRE_EQUAL(static_cast<std::size_t>(logits.numel()), want.size());
    for (std::size_t v = 0; v < want.size(); ++v) {
      worst = std::max(worst, std::abs(logits.data()[v] - want[v]));
      scale = std::max(scale, std::abs(want[v]));
    }
    ts::infer::GenerateOptions opt;
    opt.max_new_tokens = kNew;
    const auto out = ts::infer::generate(model, prompts[i], opt);
    const auto toks = ref["tokens"][i].get<std::vector<int32_t>>();
    const auto gaps = ref["gaps"][i].get<std::vector<double>>();
    for (int k = 0; k < kNew; ++k) {
      if (out[k] == toks[k]) {
        ++compared;
        continue;
      }
      // Only a near-tie (within float rounding of the logits) may be decided differently;
      // after it the continuations differ, so the rest is not compared.
      BOOST_TEST_MESSAGE("prompt " << i << " step " << k << ": tessera " << out[k]
                                   << ", reference " << toks[k] << ", reference gap " << gaps[k]);
      BOOST_TEST(gaps[k] < 1e-3);
      break;
    }
  }
  std::cout << "tiny GGUF: logits max |diff| " << worst << " (up to " << scale << "), "
            << compared << " greedy tokens equal" << std::endl;
  BOOST_TEST(scale > 0.5);
  BOOST_TEST(worst <= 1e-4 * std::max(1.0, scale));
  BOOST_TEST(compared >= 24);
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(cache_tiny)

BOOST_AUTO_TEST_CASE(chunks_equal_full_forward) {
  ts::Decoder<TinyLlama> model{ts::Seed{7}};
  // Larger weights than the default init so the attention is far from uniform.
  model.visit_parameters([](std::string_view, ts::nn::Parameter<float>& p) {
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data()[i] *= 4.0f;
  });
  std::vector<int32_t> seq;
  for (int i = 0; i < 29; ++i) seq.push_back((i * 37 + 11) % TinyLlama::vocab);
  ts::test::check_cache_against_full(model, seq, 2e-5);     // blocks of 16 positions
  ts::test::check_cache_against_full(model, seq, 2e-5, 4);  // chunks cross block boundaries
}

// Two sequences drawing blocks from one small pool, decoded in turns, each equal to its own
// full forward; finished sequences give their blocks back; a full pool is an error that leaves
// the cache as it was.
BOOST_AUTO_TEST_CASE(sequences_share_a_paged_pool) {
  ts::Decoder<TinyLlama> model{ts::Seed{7}};
  auto pool = ts::infer::make_pool(model, 48, 4);  // 12 blocks of 4 positions
  BOOST_TEST(pool->max_blocks() == 12);
  std::vector<int32_t> a, b;
  for (int i = 0; i < 21; ++i) a.push_back((i * 5 + 3) % TinyLlama::vocab);
  for (int i = 0; i < 17; ++i) b.push_back((i * 11 + 1) % TinyLlama::vocab);
  auto full_last = [&](const std::vector<int32_t>& seq, int64_t upto) {
    ts::Tensor<int32_t> ids(ts::Shape{1, upto});
    std::copy(seq.begin(), seq.begin() + upto, ids.data());
    typename ts::Decoder<TinyLlama>::Saved saved;
    const auto f = model.forward(ids, saved);
    const int64_t V = f.dim(2);
    return std::vector<float>(f.data() + (upto - 1) * V, f.data() + upto * V);
  };
  {
    auto ca = ts::infer::make_cache(model, pool);
    auto cb = ts::infer::make_cache(model, pool);
    ts::infer::forward_cached(model, std::span(a.data(), 5), ca);
    ts::infer::forward_cached(model, std::span(b.data(), 7), cb);
    double worst = 0;
    for (int64_t pa = 5, pb = 7; pa < 21 || pb < 17;) {
      if (pa < 21) {
        const auto l = ts::infer::forward_cached(model, std::span(a.data() + pa, 1), ca);
        const auto want = full_last(a, ++pa);
        for (std::size_t v = 0; v < want.size(); ++v)
          worst = std::max(worst, std::abs(static_cast<double>(l.data()[v]) - want[v]));
      }
      if (pb < 17) {
        const auto l = ts::infer::forward_cached(model, std::span(b.data() + pb, 1), cb);
        const auto want = full_last(b, ++pb);
        for (std::size_t v = 0; v < want.size(); ++v)
          worst = std::max(worst, std::abs(static_cast<double>(l.data()[v]) - want[v]));
      }
    }
    BOOST_TEST(worst < 1e-4);
    BOOST_TEST(pool->blocks_in_use() == 6 + 5);  // ceil(21 / 4) + ceil(17 / 4)
    // The pool has 1 block left: 8 more positions for a third sequence do not fit.
    auto cc = ts::infer::make_cache(model, pool);
    std::vector<int32_t> eight(8, 3);
    BOOST_CHECK_EXCEPTION(ts::infer::forward_cached(model, eight, cc), ts::Error,
                          [](const ts::Error& e) {
                            return std::string(e.what()).find("all 12 blocks") != std::string::npos;
                          });
    BOOST_TEST(cc.length == 0);
    BOOST_TEST(cc.block_table().empty());
    BOOST_TEST(pool->blocks_in_use() == 11);
  }
  BOOST_TEST(pool->blocks_in_use() == 0);  // every cache gave its blocks back
  auto again = ts::infer::make_cache(model, pool);
  ts::infer::forward_cached(model, a, again);
  BOOST_TEST(pool->blocks_in_use() == 6);
}

BOOST_AUTO_TEST_CASE(refuses_overflow_and_bad_ids) {
  ts::Decoder<TinyLlama> model{ts::Seed{7}};
  auto cache = ts::infer::make_cache(model);
  std::vector<int32_t> bad = {1, 97};
  BOOST_CHECK_THROW(ts::infer::forward_cached(model, bad, cache), ts::Error);
  std::vector<int32_t> long_seq(65, 1);
  BOOST_CHECK_THROW(ts::infer::forward_cached(model, long_seq, cache), ts::Error);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(tokenizer)

BOOST_AUTO_TEST_CASE(ids_equal_hf_tokenizers_and_chat_equals_jinja) {
  const fs::path path = ts::test::smollm2_gguf();
  if (path.empty()) return;
  const std::string py = python_with("gguf, tokenizers, jinja2");
  if (py.empty()) {
    std::cout << "TESSERA_SKIP: gguf, tokenizers and jinja2 cannot be imported" << std::endl;
    return;
  }
  const auto file = ts::io::GgufFile::open(path);
  const auto tok = ts::io::read_gguf_tokenizer(file);
  std::vector<std::string> texts = {
      "Hello world 12345", "The year 2024, pi = 3.14159", "  leading spaces\n\n\ttabs",
      "<|im_start|>user\nHi<|im_end|>", "caf\xc3\xa9 na\xc3\xafve \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80",
      "don't won't they're I'll", "x\xd9\xa3\xd9\xa4y", "", "a  b   c    d"};
  // Real English text: fortune records (Debian's fortunes package).
  for (const char* name : {"computers", "science", "wisdom", "literature"}) {
    std::ifstream in(std::string("/usr/share/games/fortunes/") + name);
    std::string line, rec;
    int k = 0;
    while (std::getline(in, line) && k < 120) {
      if (line == "%") {
        if (!rec.empty()) texts.push_back(rec), ++k;
        rec.clear();
      } else {
        rec += line + "\n";
      }
    }
  }
  BOOST_TEST_MESSAGE(texts.size() << " texts");
  const nlohmann::json chats = nlohmann::json::array(
      {nlohmann::json::array({{{"role", "user"}, {"content", "What is 2+2?"}}}),
       nlohmann::json::array({{{"role", "system"}, {"content", "Be brief."}},
                              {{"role", "user"}, {"content", "Name a colour."}},
                              {{"role", "assistant"}, {"content", "Blue."}},
                              {{"role", "user"}, {"content", "Another?"}}})});
  const auto ref = reference(py, "--tokenize", path, {{"texts", texts}, {"chats", chats}});
  if (ref.is_null()) return;
  BOOST_REQUIRE_EQUAL(ref["ids"].size(), texts.size());
  int64_t total = 0;
  for (std::size_t i = 0; i < texts.size(); ++i) {
    const auto ids = tok.tokenizer.encode(texts[i]);
    const auto want = ref["ids"][i].get<std::vector<ts::data::TokenId>>();
    BOOST_TEST_CONTEXT("text " << i << ": " << texts[i].substr(0, 60)) {
      BOOST_TEST(ids == want, boost::test_tools::per_element());
      BOOST_TEST(tok.tokenizer.decode(ids) == texts[i]);
    }
    total += static_cast<int64_t>(ids.size());
  }
  std::cout << texts.size() << " texts, " << total << " tokens equal" << std::endl;
  BOOST_TEST(total > 5000);
  for (std::size_t c = 0; c < chats.size(); ++c) {
    std::vector<ts::infer::ChatMessage> msgs;
    for (const auto& m : chats[c]) msgs.push_back({m["role"], m["content"]});
    BOOST_TEST(ts::infer::render_chat(msgs, tok.chat_template) == ref["chats"][c].get<std::string>());
  }
  BOOST_TEST(tok.eos == 2u);
  BOOST_TEST(tok.tokenizer.decode(std::vector<ts::data::TokenId>{tok.eos}) == "<|im_end|>");
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(cache_real)

BOOST_AUTO_TEST_CASE(chunks_equal_full_forward) {
  Real* r = real();
  if (!r) return;
  const auto seq = to_i32(r->tok->tokenizer.encode(
      "The quick brown fox jumps over the lazy dog. A stitch in time saves nine; many hands make "
      "light work, and the early bird catches"));
  BOOST_REQUIRE_GE(seq.size(), 20u);
  ts::test::check_cache_against_full(*r->model, seq, 1e-4);
}

// The file's Q4_1 blocks, dequantised by load_gguf, quantised again as Int4RTN<32> (group 32,
// asymmetric, the grid from each group's min and max): every one of the 106M block weights comes
// back bit for bit, so the "Q4_1 as shipped" rows of decode_bench and quant_quality are the file's
// own weights.
BOOST_AUTO_TEST_CASE(q4_1_blocks_are_their_own_int4_rtn_32) {
  Real* r = real();
  if (!r) return;
  int64_t weights = 0, differ = 0;
  r->model->visit_parameters([&](std::string_view name, auto& p) {
    if (!ts::quant::is_linear_weight(name)) return;
    const ts::Tensor<float> back = ts::quant::quantize<ts::quant::Int4RTN<32>>(p.value).dequantize();
    for (int64_t i = 0; i < back.numel(); ++i) differ += back.data()[i] != p.value.data()[i];
    weights += back.numel();
  });
  BOOST_TEST(weights == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576));  // q, o; k, v; FFN
  BOOST_TEST(differ == 0);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(greedy)

BOOST_AUTO_TEST_CASE(continuations_equal_numpy_reference) {
  Real* r = real();
  if (!r) return;
  const std::string py = python_with("numpy, gguf");
  if (py.empty()) {
    std::cout << "TESSERA_SKIP: numpy and gguf cannot be imported" << std::endl;
    return;
  }
  const std::vector<std::string> plain = {
      "The capital of France is", "Once upon a time, there was a", "The largest planet in the solar system is",
      "Water boils at", "The first president of the United States was", "In 1492, Columbus",
      "def fibonacci(n):", "The chemical symbol for gold is", "Photosynthesis is the process by which",
      "Shakespeare wrote", "1, 2, 3, 4, 5,", "The opposite of hot is", "My favourite food is",
      "To make a cup of tea, first", "The Great Wall of China", "Machine learning is",
      "The speed of light is about", "Dogs are", "import numpy as np\n", "Monday, Tuesday,"};
  const std::vector<std::string> chats = {"What is the capital of Italy?",
                                          "Write a haiku about the sea."};
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& p : plain) prompts.push_back(to_i32(r->tok->tokenizer.encode(p)));
  for (const auto& c : chats) {
    const std::vector<ts::infer::ChatMessage> msgs = {{"user", c}};
    prompts.push_back(
        to_i32(r->tok->tokenizer.encode(ts::infer::render_chat(msgs, r->tok->chat_template))));
  }
  constexpr int kNew = 6;
  const auto ref = reference(py, "--greedy", r->path, {{"prompts", prompts}, {"new_tokens", kNew}});
  if (ref.is_null()) return;
  ts::infer::GenerateOptions opt;
  opt.max_new_tokens = kNew;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t generated = 0;
  double min_gap = 1e9;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    std::vector<int32_t> streamed;
    const auto out = ts::infer::generate(*r->model, prompts[i], opt, [&](int32_t id) {
      streamed.push_back(id);
      return true;
    });
    BOOST_TEST(streamed == out, boost::test_tools::per_element());
    generated += static_cast<int64_t>(out.size());
    const auto want = ref["tokens"][i].get<std::vector<int32_t>>();
    const auto gaps = ref["gaps"][i].get<std::vector<double>>();
    for (double g : gaps) min_gap = std::min(min_gap, g);
    std::vector<ts::data::TokenId> shown(out.begin(), out.end());
    BOOST_TEST_CONTEXT("prompt " << i << " -> \"" << r->tok->tokenizer.decode(shown) << "\"") {
      BOOST_TEST(out == want, boost::test_tools::per_element());
      for (std::size_t k = 0; k < std::min(out.size(), want.size()); ++k)
        if (out[k] != want[k]) {
          BOOST_TEST_MESSAGE("first difference at step " << k << ", reference top-2 gap "
                                                          << gaps[k]);
          break;
        }
    }
    if (i == 0 || i + 1 == prompts.size())
      std::cout << "prompt " << i << " -> " << r->tok->tokenizer.decode(shown) << std::endl;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << prompts.size() << " prompts, " << generated << " tokens equal the reference in "
            << secs << " s (smallest reference top-2 gap " << min_gap << ")" << std::endl;
  BOOST_TEST(prompts.size() >= 20u);
}

BOOST_AUTO_TEST_SUITE_END()

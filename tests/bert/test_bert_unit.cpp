// Unit tests of the BERT pieces that need no outside reference and no real data: the
// WordPiece tokenizer on a small hand-made vocabulary (expected pieces worked out by hand from
// the algorithm), BertEncoder on a small random checkpoint (loading, refusals, padding and
// batching invariance, pooling), and the quality head (synthetic negatives, training on
// separable data, save/load). The comparisons with the reference libraries are in
// test_wordpiece_hf.cpp, test_bert.cpp and test_quality_model.cpp.
#define BOOST_TEST_MODULE bert_unit
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "bert_test_common.hpp"
#include "tessera/data/clean/quality_model.hpp"
#include "tessera/data/wordpiece.hpp"
#include "tessera/models/bert.hpp"
#include "tiny_bert.hpp"

namespace fs = std::filesystem;
namespace td = tessera::data;
namespace tm_ = tessera::models;
namespace clean = tessera::data::clean;
using tessera::Shape;
using tessera::Tensor;
using Ids = std::vector<std::int32_t>;

namespace {

// ids: 0 [PAD] 1 [UNK] 2 [CLS] 3 [SEP] 4 [MASK] 5 un 6 una 7 ##ffable 8 ##aff 9 ##able
// 10 hello 11 world 12 , 13 ! 14 北 15 京 16 cafe 17 é 18 ##s 19 [ 20 sep 21 ] 22 ; 23 ᄒ
// 24 ##ᅡ 25 ##ᆫ 26 ab 27 i
std::vector<std::string> tiny_vocab() {
  return {"[PAD]",    "[UNK]", "[CLS]",  "[SEP]", "[MASK]", "un", "una",
          "##ffable", "##aff", "##able", "hello", "world",  ",",  "!",
          "北",       "京",    "cafe",   "é",     "##s",    "[",  "sep",
          "]",        ";",     "ᄒ",     "##ᅡ",  "##ᆫ",   "ab", "i"};
}

td::WordPieceTokenizer tiny(td::WordPieceOptions o = {}) {
  return td::WordPieceTokenizer::from_vocab(tiny_vocab(), o, "tiny");
}

Ids pieces(const td::WordPieceTokenizer& t, const std::string& s) {
  return t.encode(s, {.add_special_tokens = false}).ids;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const tessera::Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

BOOST_AUTO_TEST_SUITE(wordpiece)

BOOST_AUTO_TEST_CASE(greedy_longest_match_first) {
  const auto t = tiny();
  // "una" is longer than "un" and wins, then the longest continuation "##ffable".
  BOOST_TEST(pieces(t, "unaffable") == (Ids{6, 7}));
  BOOST_TEST(pieces(t, "Hello, WORLD!") == (Ids{10, 12, 11, 13}));
  // An unmatchable rest makes the whole word one [UNK], not "una [UNK]".
  BOOST_TEST(pieces(t, "unaxyz hello") == (Ids{1, 10}));
  BOOST_TEST(t.encode("hello").ids == (Ids{2, 10, 3}));
  BOOST_TEST(t.encode("hello").type_ids == (Ids{0, 0, 0}));
  BOOST_TEST(t.encode("").ids == (Ids{2, 3}));
  BOOST_TEST(t.tokenize("unaffable") == (std::vector<std::string>{"una", "##ffable"}));
}

BOOST_AUTO_TEST_CASE(long_words_are_unknown) {
  td::WordPieceOptions o;
  o.max_input_chars_per_word = 5;
  const auto t = tiny(o);
  BOOST_TEST(pieces(t, "hello") == (Ids{10}));  // 5 characters: allowed
  BOOST_TEST(pieces(t, "cafes") == (Ids{16, 18}));
  BOOST_TEST(pieces(t, "helloo") == (Ids{1}));                    // 6: [UNK] without trying
  BOOST_TEST(pieces(tiny(), std::string(101, 'a')) == (Ids{1}));  // the default limit, 100
}

BOOST_AUTO_TEST_CASE(normalisation_follows_bert) {
  const auto t = tiny();
  // Accents stripped (NFD, marks dropped), then lower-cased; İ is I + U+0307 -> i.
  BOOST_TEST(t.normalize("Café ÉCOLE İ") == "cafe ecole i");
  BOOST_TEST(pieces(t, "CAFÉS") == (Ids{16, 18}));
  // Combining marks on their own are nonspacing marks too.
  BOOST_TEST(t.normalize("cafe\u0301") == "cafe");
  // Hangul syllables decompose algorithmically into conjoining jamo.
  BOOST_TEST(t.normalize("한") == "\u1112\u1161\u11AB");
  BOOST_TEST(pieces(t, "한") == (Ids{23, 24, 25}));
  // CJK ideographs become words of their own; kana and Hangul do not.
  BOOST_TEST(t.normalize("北京") == " 北  京 ");
  BOOST_TEST(pieces(t, "北京") == (Ids{14, 15}));
  // Control and format characters go, white space becomes ' ', \t \n \r are white space.
  BOOST_TEST(t.normalize("a\x01"
                         "b\u200bc\td\u00a0e\u3000f\r\ng") == "abc d e f  g");
  BOOST_TEST(t.normalize(std::string("a\0b", 3)) == "ab");
  // Invalid UTF-8 is U+FFFD, which cleaning removes.
  BOOST_TEST(t.normalize("a\xff"
                         "b") == "ab");
  // U+037E GREEK QUESTION MARK decomposes to ';', which is then punctuation.
  BOOST_TEST(pieces(t, "ab\u037eab") == (Ids{26, 22, 26}));
  // ASCII symbols count as punctuation: "$" is split off (and unknown here).
  BOOST_TEST(t.pre_tokenize("ab$ab") == (std::vector<std::string>{"ab", "$", "ab"}));

  td::WordPieceOptions cased;
  cased.lowercase = false;
  BOOST_TEST(tiny(cased).normalize("Café") == "Café");
  td::WordPieceOptions keep_accents;
  keep_accents.strip_accents = false;
  BOOST_TEST(tiny(keep_accents).normalize("CAFÉ") == "café");
  BOOST_TEST(pieces(tiny(keep_accents), "É") == (Ids{17}));
}

BOOST_AUTO_TEST_CASE(special_tokens_in_text) {
  const auto t = tiny();
  BOOST_TEST(t.encode("hello[SEP]world").ids == (Ids{2, 10, 3, 11, 3}));
  BOOST_TEST(t.encode("[MASK][MASK]").ids == (Ids{2, 4, 4, 3}));
  // Switched off, the spelling is ordinary text: "[", "sep", "]".
  BOOST_TEST(t.encode("hello[SEP]", {.special_tokens_in_text = false}).ids ==
             (Ids{2, 10, 19, 20, 21, 3}));
  BOOST_TEST(t.decode({2, 10, 12, 11, 13, 3}) == "hello, world!");
  BOOST_TEST(t.decode({2, 6, 7, 3}) == "unaffable");
  BOOST_TEST(t.decode({2, 6, 7, 3}, false) == "[CLS] unaffable [SEP]");
}

BOOST_AUTO_TEST_CASE(truncation_single_and_pairs) {
  const auto t = tiny();
  const std::string five = "hello world hello world hello";  // 5 pieces
  BOOST_TEST(t.encode(five, {.max_length = 4}).ids == (Ids{2, 10, 11, 3}));
  BOOST_TEST(t.encode(five, {.max_length = 2}).ids == (Ids{2, 3}));
  BOOST_TEST(t.encode(five, {.add_special_tokens = false, .max_length = 2}).ids == (Ids{10, 11}));
  BOOST_TEST(error_of([&] { t.encode(five, {.max_length = 1}); }).find("max_length 1") !=
             std::string::npos);
  // Pairs, longest first: both too long -> halves (A the smaller one); one too long -> cut it.
  auto pair = t.encode_pair(five, five, {.max_length = 3 + 5});
  BOOST_TEST(pair.ids == (Ids{2, 10, 11, 3, 10, 11, 10, 3}));
  BOOST_TEST(pair.type_ids == (Ids{0, 0, 0, 0, 1, 1, 1, 1}));
  pair = t.encode_pair("hello", five, {.max_length = 3 + 4});
  BOOST_TEST(pair.ids == (Ids{2, 10, 3, 10, 11, 10, 3}));
  pair = t.encode_pair(five, "world", {.max_length = 3 + 3});
  BOOST_TEST(pair.ids == (Ids{2, 10, 11, 3, 11, 3}));
  pair = t.encode_pair("hello", "world");
  BOOST_TEST(pair.ids == (Ids{2, 10, 3, 11, 3}));
  BOOST_TEST(pair.type_ids == (Ids{0, 0, 0, 1, 1}));
}

BOOST_AUTO_TEST_CASE(batch_equals_single) {
  const auto t = tiny();
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back(i % 3 ? "hello world 北京 una" : "CAFÉS!");
  const auto batch = t.encode_batch(texts);
  for (std::size_t i = 0; i < texts.size(); ++i) BOOST_TEST(batch[i].ids == t.encode(texts[i]).ids);
}

BOOST_AUTO_TEST_CASE(bad_input_is_refused) {
  BOOST_TEST(error_of([] {
               td::WordPieceTokenizer::from_vocab_file("/nonexistent/vocab.txt");
             }).find("cannot open vocabulary file '/nonexistent/vocab.txt'") != std::string::npos);
  auto v = tiny_vocab();
  v.erase(v.begin() + 1);  // no [UNK]
  BOOST_TEST(error_of([&] {
               td::WordPieceTokenizer::from_vocab(v, {}, "v.txt");
             }).find("'v.txt' has no unknown token '[UNK]'") != std::string::npos);
  BOOST_TEST(error_of([] {
               td::WordPieceTokenizer::from_vocab({}, {}, "empty.txt");
             }).find("holds no tokens") != std::string::npos);
  BOOST_TEST(error_of([] { tiny().id_to_token(28); }).find("id 28 is out of range") !=
             std::string::npos);
  // A directory whose tokenizer_config.json is broken is reported with the file's name.
  const fs::path dir = tessera::test::bert::scratch_dir("wp_cfg");
  std::ofstream(dir / "tokenizer_config.json") << "{ not json";
  BOOST_TEST(error_of([&] {
               td::WordPieceTokenizer::from_pretrained(dir);
             }).find("tokenizer_config.json' is not valid JSON") != std::string::npos);
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_CASE(vocab_file_lines) {
  const fs::path dir = tessera::test::bert::scratch_dir("wp_vocab");
  {
    std::ofstream out(dir / "vocab.txt", std::ios::binary);
    for (const auto& tok : tiny_vocab()) out << tok << "\r\n";  // CRLF lines are accepted
  }
  std::ofstream(dir / "tokenizer_config.json") << R"({"do_lower_case": false, "strip_accents": null,
    "unk_token": {"content": "[UNK]"}})";
  const auto t = td::WordPieceTokenizer::from_pretrained(dir);
  BOOST_TEST(t.vocab_size() == 28);
  BOOST_TEST(!t.options().lowercase);
  BOOST_TEST(t.token_to_id("##ffable").value() == 7);
  BOOST_TEST(pieces(t, "Hello") == (Ids{1}));  // cased: "Hello" is not in the vocabulary
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------------

BOOST_AUTO_TEST_SUITE(bert_model)

BOOST_AUTO_TEST_CASE(padding_and_batching_do_not_change_results) {
  // float only: each number type instantiates every op again (~17 s of compile time), and
  // double is compared with the reference in test_bert_double.
  const fs::path dir = tessera::test::bert::scratch_dir("tiny");
  tessera::test::bert::write_tiny_bert(dir, {});
  const auto m = tm_::BertEncoder<float>::from_pretrained(dir);
  // Sentence alone, (1, 5).
  const Tensor<int32_t> ids1 = Tensor<int32_t>::from(Shape{1, 5}, {2, 7, 9, 11, 3});
  const Tensor<int32_t> ones = Tensor<int32_t>::full(Shape{1, 5}, 1);
  const Tensor<float> alone = m.forward(ids1, ones);
  BOOST_REQUIRE(alone.shape() == (Shape{1, 5, 16}));
  // The same sentence as row 1 of a padded batch of 3 with length 9 (token types 0 given);
  // its padding holds a real id, which must not matter either.
  Tensor<int32_t> ids(Shape{3, 9}), mask(Shape{3, 9});
  const int32_t rows[3][9] = {{2, 5, 6, 7, 8, 9, 10, 11, 3},
                              {2, 7, 9, 11, 3, 30, 30, 30, 30},
                              {2, 12, 3, 0, 0, 0, 0, 0, 0}};
  const int lens[3] = {9, 5, 3};
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 9; ++c) {
      ids(r, c) = rows[r][c];
      mask(r, c) = c < lens[r];
    }
  const Tensor<int32_t> types(Shape{3, 9});
  const Tensor<float> batch = m.forward(ids, mask, types.view());
  double worst = 0, scale = 0;
  for (int t = 0; t < 5; ++t)
    for (int j = 0; j < 16; ++j) {
      worst = std::max(worst, static_cast<double>(std::abs(batch(1, t, j) - alone(0, t, j))));
      scale = std::max(scale, static_cast<double>(std::abs(alone(0, t, j))));
    }
  // Masked keys get probability exactly 0; what is left is the summation order of products
  // of other sizes (a few float ulps through two layers). A key that leaked through the mask
  // would move the result by O(0.1).
  BOOST_TEST(worst <= 1e-5 * scale);
  BOOST_TEST(scale > 0.1);
  // Token types matter (a real embedding), and so does order (learned positions).
  const Tensor<int32_t> type1 = Tensor<int32_t>::full(Shape{1, 5}, 1);
  const Tensor<float> typed = m.forward(ids1, ones, type1.view());
  BOOST_TEST(std::abs(typed(0, 2, 0) - alone(0, 2, 0)) > 1e-3);
  const Tensor<int32_t> swapped = Tensor<int32_t>::from(Shape{1, 5}, {2, 9, 7, 11, 3});
  BOOST_TEST(std::abs(m.forward(swapped, ones)(0, 1, 0) - alone(0, 2, 0)) > 1e-3);
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_CASE(sentence_encoder_batches_like_single_texts) {
  // The tiny model's 37 ids, spelled as a vocabulary, so text goes through the whole chain.
  std::vector<std::string> vocab = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
  for (int i = 5; i < 37; ++i) vocab.push_back("w" + std::to_string(i));
  const fs::path dir = tessera::test::bert::scratch_dir("tiny_se");
  tessera::test::bert::write_tiny_bert(dir, {});
  const tm_::SentenceEncoder<float> se(td::WordPieceTokenizer::from_vocab(vocab, {}, "tiny"),
                                       tm_::BertEncoder<float>::from_pretrained(dir),
                                       {.normalize = true, .max_seq_length = 40});
  std::vector<std::string> texts = {"w5 w6 w7", "", "w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19",
                                    "w20 zz w21"};
  std::string long_text;
  for (int i = 0; i < 60; ++i) long_text += "w" + std::to_string(5 + i % 32) + " ";
  texts.push_back(long_text);  // cut to 40 tokens
  const Tensor<float> all = se.encode(texts);
  BOOST_REQUIRE(all.shape() == (Shape{5, 16}));
  double worst = 0;
  for (std::size_t i = 0; i < texts.size(); ++i) {
    const Tensor<float> one = se.encode({texts[i]});
    double norm = 0;
    for (int64_t j = 0; j < 16; ++j) {
      worst = std::max(worst,
                       static_cast<double>(std::abs(one(0, j) - all(static_cast<int64_t>(i), j))));
      norm += one(0, j) * one(0, j);
    }
    BOOST_TEST(std::abs(norm - 1.0) < 1e-5);  // normalised
  }
  BOOST_TEST(worst <= 1e-5);
  BOOST_TEST(se.tokenize({long_text})[0].ids.size() == 40u);
  BOOST_TEST(se.tokenize({long_text}, 8)[0].ids.size() == 8u);
  // Encodings made elsewhere are checked before they reach the model.
  td::WordPieceEncoding too_long{std::vector<int32_t>(41, 5), std::vector<int32_t>(41, 0)};
  BOOST_TEST(error_of([&] {
               se.encode_tokens({too_long});
             }).find("41 tokens, more than max_position_embeddings = 40") != std::string::npos);
  // A tokenizer whose vocabulary does not match the model is refused.
  vocab.push_back("extra");
  BOOST_TEST(error_of([&] {
               tm_::SentenceEncoder<float>(td::WordPieceTokenizer::from_vocab(vocab, {}, "v"),
                                           tm_::BertEncoder<float>::from_pretrained(dir),
                                           {.normalize = true, .max_seq_length = 40});
             }).find("the tokenizer has 38 tokens, the model's vocab_size is 37") !=
             std::string::npos);
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_CASE(mean_pool_and_normalise) {
  // hidden (2, 3, 2): row 0 has tokens 0 and 1, row 1 only token 2; a row without tokens is 0.
  const Tensor<float> h =
      Tensor<float>::from(Shape{2, 3, 2}, {1, 2, 3, 4, 100, 100, 100, 100, 100, 100, 6, 8});
  const Tensor<int32_t> mask = Tensor<int32_t>::from(Shape{2, 3}, {1, 1, 0, 0, 0, 1});
  const Tensor<float> mean = tm_::mean_pool<float>(h, mask, false);
  BOOST_TEST(mean(0, 0) == 2.0f);
  BOOST_TEST(mean(0, 1) == 3.0f);
  BOOST_TEST(mean(1, 0) == 6.0f);
  const Tensor<float> unit = tm_::mean_pool<float>(h, mask, true);
  BOOST_TEST(unit(1, 0) == 0.6f);
  BOOST_TEST(unit(1, 1) == 0.8f);
  const Tensor<float> none = tm_::mean_pool<float>(h, Tensor<int32_t>(Shape{2, 3}), true);
  BOOST_TEST(none(0, 0) == 0.0f);
}

BOOST_AUTO_TEST_CASE(bad_checkpoints_are_refused_by_name) {
  namespace tb = tessera::test::bert;
  const fs::path root = tb::scratch_dir("bad");
  auto load_error = [&](const tb::TinyBertOptions& o, const std::string& name) {
    tb::write_tiny_bert(root / name, o);
    return error_of([&] { tm_::BertEncoder<float>::from_pretrained(root / name); });
  };
  tb::TinyBertOptions o;
  o.drop = "encoder.layer.1.attention.self.key.bias";
  std::string e = load_error(o, "drop");
  BOOST_TEST(
      e.find("tensor 'encoder.layer.1.attention.self.key.bias' is missing") != std::string::npos,
      e);
  o = {};
  o.reshape = "encoder.layer.0.intermediate.dense.weight";
  e = load_error(o, "reshape");
  BOOST_TEST(e.find("tensor 'encoder.layer.0.intermediate.dense.weight' has shape [25, 16], the "
                    "config needs [24, 16]") != std::string::npos,
             e);
  o = {};
  o.extra_layer = true;
  e = load_error(o, "extra");
  BOOST_TEST(e.find("'encoder.layer.2.") != std::string::npos, e);
  BOOST_TEST(e.find("is not part of a 2-layer model") != std::string::npos, e);
  // Task-head checkpoints keep the encoder under "bert.": accepted.
  o = {};
  o.prefix = "bert.";
  tb::write_tiny_bert(root / "prefixed", o);
  BOOST_CHECK_NO_THROW(tm_::BertEncoder<float>::from_pretrained(root / "prefixed"));
  // Missing files.
  BOOST_TEST(error_of([&] {
               tm_::BertEncoder<float>::from_pretrained(root / "none");
             }).find("model.safetensors' does not exist") != std::string::npos);

  // Config refusals, each naming what to change.
  auto cfg_error = [](nlohmann::json j) {
    return error_of([&] { tm_::BertConfig::from_json(j, "config.json"); });
  };
  auto j = tb::tiny_config_json({});
  auto k = j;
  k["hidden_act"] = "relu";
  BOOST_TEST(cfg_error(k).find("hidden_act 'relu' is not supported") != std::string::npos);
  k = j;
  k["position_embedding_type"] = "relative_key";
  BOOST_TEST(cfg_error(k).find("position_embedding_type 'relative_key'") != std::string::npos);
  k = j;
  k["num_attention_heads"] = 5;
  BOOST_TEST(cfg_error(k).find("hidden_size 16 is not a multiple of num_attention_heads 5") !=
             std::string::npos);
  k = j;
  k.erase("vocab_size");
  BOOST_TEST(cfg_error(k).find("vocab_size is missing") != std::string::npos);
  k = j;
  k["model_type"] = "roberta";
  BOOST_TEST(cfg_error(k).find("model_type is 'roberta'") != std::string::npos);

  // Inputs.
  tb::write_tiny_bert(root / "ok", {});
  const auto m = tm_::BertEncoder<float>::from_pretrained(root / "ok");
  const Tensor<int32_t> ids = Tensor<int32_t>::from(Shape{1, 3}, {2, 5, 3});
  BOOST_TEST(error_of([&] {
               m.forward(ids, Tensor<int32_t>::from(Shape{1, 3}, {1, 2, 1}));
             }).find("attention_mask[0, 1] = 2, expected 0 or 1") != std::string::npos);
  BOOST_TEST(error_of([&] {
               m.forward(Tensor<int32_t>::from(Shape{1, 3}, {2, 37, 3}),
                         Tensor<int32_t>::full(Shape{1, 3}, 1));
             }).find("out of range for vocab size 37") != std::string::npos);
  BOOST_TEST(error_of([&] {
               const Tensor<int32_t> types = Tensor<int32_t>::from(Shape{1, 3}, {0, 2, 0});
               m.forward(ids, Tensor<int32_t>::full(Shape{1, 3}, 1), types.view());
             }).find("out of range for vocab size 2") != std::string::npos);
  BOOST_TEST(error_of([&] {
               m.forward(Tensor<int32_t>(Shape{1, 41}), Tensor<int32_t>(Shape{1, 41}));
             }).find("length 41 exceeds max_position_embeddings 40") != std::string::npos);
  fs::remove_all(root);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------------

BOOST_AUTO_TEST_SUITE(quality_head)

BOOST_AUTO_TEST_CASE(negatives_are_deterministic_and_shaped_like_their_source) {
  const std::string en = "The quick brown fox jumps over the lazy dog while the cat sleeps.";
  const std::string zh = "床前明月光，疑是地上霜。举头望明月，低头思故乡。";
  for (auto kind : clean::kNegativeKinds) {
    BOOST_TEST(clean::make_negative(en, kind, 5) == clean::make_negative(en, kind, 5));
    BOOST_TEST(clean::make_negative(en, kind, 5) != en);
    BOOST_TEST(clean::make_negative(zh, kind, 5) != zh);
  }
  // Shuffled words: the same words, another order.
  auto words = [](const std::string& s) {
    std::multiset<std::string> w;
    std::istringstream in(s);
    for (std::string x; in >> x;) w.insert(x);
    return w;
  };
  BOOST_TEST(
      (words(clean::make_negative(en, clean::NegativeKind::kShuffledWords, 3)) == words(en)));
  // Chinese: Han characters permuted in place, punctuation where it was.
  const std::u32string zs = clean::to_codepoints(zh);
  const std::u32string sh =
      clean::to_codepoints(clean::make_negative(zh, clean::NegativeKind::kShuffledWords, 3));
  BOOST_REQUIRE(sh.size() == zs.size());
  for (std::size_t i = 0; i < zs.size(); ++i)
    BOOST_TEST((clean::is_han(zs[i]) == clean::is_han(sh[i])));
  BOOST_TEST(std::multiset<char32_t>(zs.begin(), zs.end()) ==
             std::multiset<char32_t>(sh.begin(), sh.end()));
  // Random characters: drawn from the text's own characters, spaces kept.
  const std::u32string rc =
      clean::to_codepoints(clean::make_negative(en, clean::NegativeKind::kRandomCharacters, 9));
  const std::u32string es = clean::to_codepoints(en);
  BOOST_REQUIRE(rc.size() == es.size());
  for (std::size_t i = 0; i < rc.size(); ++i) {
    BOOST_TEST(((rc[i] == U' ') == (es[i] == U' ')));
    BOOST_TEST(es.find(rc[i]) != std::u32string::npos);
  }
  // Repetition: about as long as the source, one span several times.
  const std::string rep = clean::make_negative(en, clean::NegativeKind::kRepetition, 1);
  BOOST_TEST(rep.size() >= en.size());
  BOOST_TEST(rep.size() <= 3 * en.size());
}

BOOST_AUTO_TEST_CASE(head_learns_separable_data_and_round_trips) {
  // Two Gaussian clouds in 12 dimensions, means 1.5 apart along every axis (Bayes error ~0).
  const int64_t n = 400, d = 12;
  Tensor<float> x = Tensor<float>::empty(Shape{n, d});
  tessera::fill_normal(x.data(), x.numel(), tessera::Seed(3), 0, 0.0f, 1.0f);
  std::vector<int> y(n);
  for (int64_t i = 0; i < n; ++i) {
    y[static_cast<std::size_t>(i)] = i % 2;
    for (int64_t j = 0; j < d; ++j) x(i, j) += (i % 2 ? 0.75f : -0.75f);
  }
  for (int64_t hidden : {0, 16}) {
    clean::QualityHeadOptions o;
    o.hidden = hidden;
    o.epochs = 200;
    o.learning_rate = hidden ? 0.1 : 0.5;
    o.weight_decay = 1e-4;
    std::vector<double> losses;
    const auto head = clean::QualityHead::train(x, y, o, &losses);
    BOOST_REQUIRE(losses.size() == 201u);
    BOOST_TEST_MESSAGE("hidden " << hidden << ": loss " << losses.front() << " -> "
                                 << losses.back());
    BOOST_TEST(losses.back() < 0.5 * losses.front());
    BOOST_TEST(losses.back() < 0.05);
    const auto p = head.predict(x);
    int ok = 0;
    for (int64_t i = 0; i < n; ++i)
      ok += (p[static_cast<std::size_t>(i)] >= 0.5) == (y[static_cast<std::size_t>(i)] == 1);
    BOOST_TEST(ok >= 0.99 * n);

    const fs::path dir = tessera::test::bert::scratch_dir("head");
    auto copy = clean::QualityHead::load([&] {
      auto h = clean::QualityHead::train(x, y, o);
      h.metadata["note"] = "x";
      h.save(dir / "head.safetensors");
      return dir / "head.safetensors";
    }());
    BOOST_TEST(copy.hidden() == hidden);
    BOOST_TEST(copy.metadata.at("note") == "x");
    BOOST_TEST(copy.predict(x) == p);  // training is deterministic, the file exact
    fs::remove_all(dir);
  }
  // Refusals.
  BOOST_TEST(error_of([&] {
               clean::QualityHead::train(x, std::vector<int>(n, 1), {});
             }).find("both classes are needed") != std::string::npos);
  const fs::path dir = tessera::test::bert::scratch_dir("badhead");
  tessera::io::save_safetensors(dir / "w.safetensors", {{"w", x}});
  BOOST_TEST(error_of([&] {
               clean::QualityHead::load(dir / "w.safetensors");
             }).find("not a quality head") != std::string::npos);
  const Tensor<float> mean(Shape{d}), std1 = Tensor<float>::full(Shape{d}, 1.0f), w2(Shape{1, 5}),
                                      b2(Shape{1});
  tessera::io::save_safetensors(
      dir / "h.safetensors", {{"mean", mean}, {"std", std1}, {"w2", w2}, {"b2", b2}},
      {{"tessera.kind", "quality_head"}, {"hidden", "0"}, {"threshold", "0.5"}});
  BOOST_TEST(error_of([&] {
               clean::QualityHead::load(dir / "h.safetensors");
             }).find("tensor 'w2' has shape [1, 5], expected [1, 12]") != std::string::npos);
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_SUITE_END()

// Tokenizer tests that need no Python: split rules and ids on fixed cases (expected values
// produced once by the Hugging Face `tokenizers` library 0.23.3 and written down here), exact
// round trips for random and invalid bytes, special tokens, bad input, save/load, the Chinese
// segmentation policies (expected words from python3-jieba with HMM=False) and training.
#define BOOST_TEST_MODULE bpe_tokenizer
#include <boost/test/unit_test.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "tessera/data/bpe_tokenizer.hpp"
#include "common/shared_data.hpp"

namespace td = tessera::data;
using Ids = std::vector<td::TokenId>;

namespace {

const std::filesystem::path kTok = tessera::test::tokenizers_dir();

// Cases that read the real tokenizers run only where ../shared/data is present.
boost::test_tools::assertion_result real_tokenizers(boost::unit_test::test_unit_id) {
  return tessera::test::have_real_tokenizers();
}

const td::BpeTokenizer& deepseek() {
  static const auto t = td::BpeTokenizer::from_file(kTok / "deepseek-v3/tokenizer.json");
  return t;
}
const td::BpeTokenizer& gpt2() {
  static const auto t =
      td::BpeTokenizer::from_gpt2_files(kTok / "gpt2/encoder.json", kTok / "gpt2/vocab.bpe");
  return t;
}

std::vector<std::string> strs(const std::vector<std::string_view>& v) {
  return {v.begin(), v.end()};
}

bool message_has(const tessera::Error& e, const std::string& part) {
  const bool ok = std::string(e.what()).find(part) != std::string::npos;
  if (!ok) BOOST_TEST_MESSAGE("message was: " << e.what());
  return ok;
}

}  // namespace

BOOST_AUTO_TEST_CASE(unicode_classes) {
  using namespace td;
  BOOST_TEST(is_letter(unicode_class(U'A')));
  BOOST_TEST(is_letter(unicode_class(U'中')));
  BOOST_TEST(is_number(unicode_class(U'7')));
  BOOST_TEST(is_number(unicode_class(U'²')));
  BOOST_TEST(is_mark(unicode_class(0x0301)));
  BOOST_TEST(is_punct_or_symbol(unicode_class(U'，')));
  BOOST_TEST(is_punct_or_symbol(unicode_class(0x1F600)));  // emoji: So, outside the BMP
  BOOST_TEST(is_space(unicode_class(0x3000)));
  BOOST_TEST(is_space(unicode_class(0x85)));
  BOOST_TEST(!is_space(unicode_class(0x200B)));  // ZERO WIDTH SPACE is Cf, not \s
  BOOST_TEST(unicode_class(kInvalidCodePoint) == uclass::kOther);
  const std::string bad =
      "\xC0\xAF\xED\xA0\x80\xF4\x90\x80\x80";  // overlong, surrogate, > U+10FFFF
  for (std::size_t i = 0; i < bad.size(); ++i)
    BOOST_TEST((utf8_at(bad, i).cp == kInvalidCodePoint));
}

BOOST_AUTO_TEST_CASE(split_rules_match_reference) {
  const auto ds = td::PreTokenizer::deepseek_v3();
  const auto g2 = td::PreTokenizer::gpt2();
  using V = std::vector<std::string>;
  BOOST_TEST(strs(ds.split("Hello, world! It's 2024.")) ==
                 (V{"Hello", ",", " world", "!", " It", "'s", " ", "202", "4", "."}),
             boost::test_tools::per_element());
  BOOST_TEST(strs(g2.split("Hello, world! It's 2024.")) ==
                 (V{"Hello", ",", " world", "!", " It", "'s", " 2024", "."}),
             boost::test_tools::per_element());
  BOOST_TEST(
      strs(ds.split("  two  spaces\n\nnew")) == (V{" ", " two", " ", " spaces", "\n\n", "new"}),
      boost::test_tools::per_element());
  BOOST_TEST(
      strs(g2.split("  two  spaces\n\nnew")) == (V{" ", " two", " ", " spaces", "\n", "\n", "new"}),
      boost::test_tools::per_element());
  BOOST_TEST(
      strs(ds.split("数字12345和中文ひらがな")) == (V{"数字", "123", "45", "和中文ひらがな"}),
      boost::test_tools::per_element());
  BOOST_TEST(strs(ds.split("a\u200db 😀👍🏽")) == (V{"a", "\u200db", " 😀👍🏽"}),
             boost::test_tools::per_element());
  BOOST_TEST(strs(g2.split("a\u200db 😀👍🏽")) == (V{"a", "\u200d", "b", " 😀👍🏽"}),
             boost::test_tools::per_element());
  BOOST_TEST(
      strs(ds.split("x=foo(bar)\r\n\tend  ")) == (V{"x", "=foo", "(bar", ")\r\n", "\tend", "  "}),
      boost::test_tools::per_element());
  BOOST_TEST(strs(g2.split("x=foo(bar)\r\n\tend  ")) ==
                 (V{"x", "=", "foo", "(", "bar", ")", "\r\n", "\t", "end", "  "}),
             boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(real_tokenizers_give_reference_ids, *boost::unit_test::precondition(real_tokenizers)) {
  BOOST_TEST(deepseek().vocab_size() == 128815u);
  BOOST_TEST(deepseek().merge_count() == 127741u);
  BOOST_TEST(deepseek().added_tokens().size() == 818u);
  BOOST_TEST(deepseek().encode("Hello, world! It's 2024.") ==
                 (Ids{19923, 14, 2058, 3, 983, 734, 223, 939, 22, 16}),
             boost::test_tools::per_element());
  BOOST_TEST(deepseek().encode("数字12345和中文ひらがな") ==
                 (Ids{8283, 6895, 1883, 548, 21134, 40259, 4970, 2936, 2942}),
             boost::test_tools::per_element());
  BOOST_TEST(deepseek().encode("a\u200db 😀👍🏽") ==
                 (Ids{67, 46088, 68, 53769, 225, 92526, 40965, 124}),
             boost::test_tools::per_element());
  BOOST_TEST(deepseek().encode("x=foo(bar)\r\n\tend  ") ==
                 (Ids{90, 31, 40897, 10, 6515, 11, 204, 201, 55655, 262}),
             boost::test_tools::per_element());
  BOOST_TEST(deepseek().encode("<｜begin▁of▁sentence｜>你好，世界123456") ==
                 (Ids{0, 30594, 303, 3427, 6895, 18009}),
             boost::test_tools::per_element());
  BOOST_TEST(gpt2().encode("Hello world") == (Ids{15496, 995}), boost::test_tools::per_element());
  BOOST_TEST(gpt2().vocab_size() == 50257u);
}

BOOST_AUTO_TEST_CASE(special_tokens, *boost::unit_test::precondition(real_tokenizers)) {
  const std::string text = "a<|endoftext|>b";
  const Ids with = gpt2().encode(text);
  BOOST_TEST(with == (Ids{64, 50256, 65}), boost::test_tools::per_element());
  const Ids without = gpt2().encode(text, {.special_tokens = false});
  BOOST_TEST(without.size() > 3u);
  BOOST_TEST(std::count(without.begin(), without.end(), 50256u) == 0);
  BOOST_TEST(gpt2().decode(without) == text);
  BOOST_TEST(gpt2().decode(with) == text);
  BOOST_TEST(gpt2().decode(with, /*skip_special=*/true) == "ab");
  BOOST_TEST(gpt2().is_special(50256));
  BOOST_TEST(gpt2().special_token_id("<|endoftext|>") == 50256u);
  // Leftmost-longest: the longer added token wins where two start at the same byte.
  const std::string bos = "<｜begin▁of▁sentence｜>";
  BOOST_TEST(deepseek().encode(bos + bos) == (Ids{0, 0}), boost::test_tools::per_element());
  BOOST_TEST(deepseek().special_token_id(bos) == 0u);
}

BOOST_AUTO_TEST_CASE(bad_input_is_handled, *boost::unit_test::precondition(real_tokenizers)) {
  // Empty input.
  BOOST_TEST(deepseek().encode("").empty());
  BOOST_TEST(deepseek().decode(Ids{}).empty());
  // Unknown special token and unknown ids: errors that say what was asked for.
  try {
    gpt2().special_token_id("<|im_start|>");
    BOOST_FAIL("expected an error");
  } catch (const tessera::Error& e) {
    BOOST_TEST(message_has(e, "\"<|im_start|>\" is not a special token"));
    BOOST_TEST(message_has(e, "<|endoftext|>"));
  }
  try {
    gpt2().decode(Ids{15496, 50257});
    BOOST_FAIL("expected an error");
  } catch (const tessera::Error& e) {
    BOOST_TEST(message_has(e, "id 50257 is not in the vocabulary"));
  }
  // Text that only looks like a special token is ordinary text.
  BOOST_TEST(gpt2().decode(gpt2().encode("<|im_start|>")) == "<|im_start|>");
  // Invalid UTF-8 round-trips byte for byte.
  for (const std::string& s : {std::string("\xff\xfe"), std::string("ab\xc3"),
                               std::string("\xe4\xb8"), std::string("x\x80y \xed\xa0\x80 z"),
                               std::string("\0\0a\0", 4), std::string("\xf0\x9f\x98") + "😀"}) {
    BOOST_TEST(deepseek().decode(deepseek().encode(s)) == s);
    BOOST_TEST(gpt2().decode(gpt2().encode(s)) == s);
  }
}

BOOST_AUTO_TEST_CASE(random_bytes_round_trip, *boost::unit_test::precondition(real_tokenizers)) {
  const unsigned seed = 20261129;
  BOOST_TEST_MESSAGE("seed " << seed);
  std::mt19937 rng(seed);
  for (int round = 0; round < 200; ++round) {
    std::string s(rng() % 300, '\0');
    const bool ascii_heavy = round % 2 == 0;
    for (auto& c : s)
      c = static_cast<char>(ascii_heavy && rng() % 4 ? 32 + rng() % 95 : rng() % 256);
    BOOST_TEST(deepseek().decode(deepseek().encode(s)) == s);
    BOOST_TEST(gpt2().decode(gpt2().encode(s)) == s);
  }
}

BOOST_AUTO_TEST_CASE(ten_megabyte_single_line, *boost::unit_test::precondition(real_tokenizers)) {
  std::string line;
  const std::string unit = "The quick brown fox 12345 跳过了懒狗，😀 and   spaces\t";
  while (line.size() < 10'000'000) line += unit;
  const auto t0 = std::chrono::steady_clock::now();
  const Ids ids = deepseek().encode(line);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  BOOST_TEST_MESSAGE("10 MB line: " << ids.size() << " ids in " << s << " s");
  BOOST_TEST(deepseek().decode(ids) == line);
  // One 2 MB "word" without any split point exercises the heap path of the merge loop.
  std::string word(2'000'000, 'a');
  for (std::size_t i = 0; i < word.size(); i += 7) word[i] = 'b';
  const Ids w = gpt2().encode(word);
  BOOST_TEST(gpt2().decode(w) == word);
  BOOST_TEST(w.size() < word.size() / 2);
}

// Words of 30..120 bytes cross the switch from the array merge loop (<= 48 bytes) to the heap
// one; both must agree with GPT-2's original algorithm (encoder.py: take the lowest-rank pair,
// merge all its occurrences left to right, repeat), written here independently.
BOOST_AUTO_TEST_CASE(merge_loops_match_original_gpt2_algorithm, *boost::unit_test::precondition(real_tokenizers)) {
  std::map<std::pair<std::string, std::string>, int> rank;
  {
    std::ifstream in(kTok / "gpt2/vocab.bpe");
    std::string line;
    int r = 0;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') continue;
      const auto sp = line.find(' ');
      rank.emplace(std::make_pair(line.substr(0, sp), line.substr(sp + 1)), r++);
    }
  }
  const unsigned seed = 7;
  BOOST_TEST_MESSAGE("seed " << seed);
  std::mt19937 rng(seed);
  for (int round = 0; round < 60; ++round) {
    std::string w;
    const int len = 30 + static_cast<int>(rng() % 91);
    for (int i = 0; i < len; ++i) w.push_back("etaoinshrdlu"[rng() % 12]);
    std::vector<std::string> sym;
    for (char c : w) sym.emplace_back(1, c);
    while (sym.size() > 1) {
      int best = std::numeric_limits<int>::max();
      std::pair<std::string, std::string> pair;
      for (std::size_t k = 0; k + 1 < sym.size(); ++k) {
        const auto it = rank.find({sym[k], sym[k + 1]});
        if (it != rank.end() && it->second < best) best = it->second, pair = it->first;
      }
      if (best == std::numeric_limits<int>::max()) break;
      std::vector<std::string> next;
      for (std::size_t k = 0; k < sym.size(); ++k) {
        if (k + 1 < sym.size() && sym[k] == pair.first && sym[k + 1] == pair.second) {
          next.push_back(sym[k] + sym[k + 1]);
          ++k;
        } else {
          next.push_back(sym[k]);
        }
      }
      sym = std::move(next);
    }
    Ids expected;
    for (const auto& t : sym) expected.push_back(*gpt2().token_to_id(t));
    Ids got;
    gpt2().encode_piece(w, got);
    BOOST_TEST(got == expected, "word of " << w.size() << " bytes: " << w);
  }
}

BOOST_AUTO_TEST_CASE(batch_equals_single, *boost::unit_test::precondition(real_tokenizers)) {
  std::vector<std::string> texts;
  for (int i = 0; i < 300; ++i)
    texts.push_back("text number " + std::to_string(i * 7919) + " 中文" + std::string(i % 5, ' '));
  const auto batch = deepseek().encode_batch(texts);
  for (std::size_t i = 0; i < texts.size(); ++i)
    BOOST_TEST(batch[i] == deepseek().encode(texts[i]));
}

BOOST_AUTO_TEST_CASE(unsupported_files_are_rejected_clearly) {
  nlohmann::json j = nlohmann::json::parse(R"({
    "added_tokens": [], "normalizer": null, "decoder": {"type": "ByteLevel"},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "\\p{Han}+"}, "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]},
    "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})");
  try {
    td::BpeTokenizer::from_json(j);
    BOOST_FAIL("expected an error");
  } catch (const tessera::Error& e) {
    BOOST_TEST(message_has(e, "unsupported split regex \"\\p{Han}+\""));
  }
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  BOOST_CHECK_THROW(td::BpeTokenizer::from_json(j), tessera::Error);
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}};
  j["model"]["type"] = "WordPiece";
  BOOST_CHECK_THROW(td::BpeTokenizer::from_json(j), tessera::Error);
  BOOST_CHECK_THROW(td::BpeTokenizer::from_file("/nonexistent/tokenizer.json"), tessera::Error);
}

BOOST_AUTO_TEST_CASE(save_and_reload, *boost::unit_test::precondition(real_tokenizers)) {
  const auto path = std::filesystem::temp_directory_path() / "tessera_test_gpt2_tokenizer.json";
  gpt2().save(path);
  const auto back = td::BpeTokenizer::from_file(path);
  std::filesystem::remove(path);
  for (const char* s : {"Hello world", "It's 2024, 中文 and émoji 😀<|endoftext|>", "  x\n\n"}) {
    BOOST_TEST(back.encode(s) == gpt2().encode(s));
  }
  // Merges given as [left, right] arrays load the same as "left right" strings.
  nlohmann::json j = gpt2().to_json();
  for (auto& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    const auto sp = s.find(' ');
    m = nlohmann::json::array({s.substr(0, sp), s.substr(sp + 1)});
  }
  BOOST_TEST(td::BpeTokenizer::from_json(j).encode("Hello world again") ==
             gpt2().encode("Hello world again"));
}

BOOST_AUTO_TEST_CASE(chinese_policies, *boost::unit_test::precondition(real_tokenizers)) {
  const auto dict = td::JiebaSegmenter::default_dictionary_path();
  if (dict.empty()) {
    BOOST_TEST_MESSAGE("python3-jieba not installed: dictionary cases not run");
  } else {
    const td::JiebaSegmenter jieba(dict);
    using V = std::vector<std::string>;
    BOOST_TEST(strs(jieba.segment("我来到北京清华大学")) == (V{"我", "来到", "北京", "清华大学"}),
               boost::test_tools::per_element());
    BOOST_TEST(strs(jieba.segment("他来到了网易杭研大厦")) ==
                   (V{"他", "来到", "了", "网易", "杭", "研", "大厦"}),
               boost::test_tools::per_element());
    BOOST_TEST(strs(jieba.segment("小明硕士毕业于中国科学院计算所")) ==
                   (V{"小", "明", "硕士", "毕业", "于", "中国科学院", "计算所"}),
               boost::test_tools::per_element());
    BOOST_TEST(
        strs(jieba.segment("结婚的和尚未结婚的")) == (V{"结婚", "的", "和", "尚未", "结婚", "的"}),
        boost::test_tools::per_element());
    // As a type parameter: DeepSeek-V3's vocabulary with dictionary word pieces.
    auto t = td::BasicBpeTokenizer<td::JiebaSegmenter>::from_file(
        kTok / "deepseek-v3/tokenizer.json", jieba);
    BOOST_TEST(strs(t.pieces("我来到北京清华大学")) == (V{"我", "来到", "北京", "清华大学"}),
               boost::test_tools::per_element());
    const std::string mixed = "Hello 我来到北京清华大学 123";
    BOOST_TEST(t.decode(t.encode(mixed)) == mixed);
  }
  auto c = td::BasicBpeTokenizer<td::SplitCjkCharacters>::from_gpt2_files(
      kTok / "gpt2/encoder.json", kTok / "gpt2/vocab.bpe");
  BOOST_TEST(strs(c.pieces("hi 中文abc")) == (std::vector<std::string>{"hi", " 中", "文abc"}),
             boost::test_tools::per_element());
  BOOST_TEST(c.decode(c.encode("hi 中文abc")) == "hi 中文abc");
}

#include "tessera/data/tokenizer_trainer.hpp"

BOOST_AUTO_TEST_CASE(trainer_small_corpus) {
  td::BpeTrainerOptions opt;
  opt.vocab_size = 400;
  opt.special_tokens = {"<|endoftext|>", "<|pad|>"};
  opt.terms = {"tessera", "深度学习"};
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) {
    texts.push_back("the cat sat on the mat with the other cat number " + std::to_string(i) +
                    ". 深度学习和机器学习，学习很重要。tessera tiles");
  }
  td::BpeTrainer trainer(opt);
  trainer.add_texts(texts);
  const auto tok = trainer.train();
  BOOST_TEST_MESSAGE(trainer.stats().distinct_words << " words, " << trainer.stats().merges
                                                    << " merges");
  // Training stops early when no pair is seen twice; vocab_size is an upper bound.
  BOOST_TEST(tok.vocab_size() <= 400u);
  BOOST_TEST(tok.vocab_size() >= 2u + 256u + 2u + 50u);
  BOOST_TEST(trainer.stats().merges > 50u);
  BOOST_TEST(tok.special_token_id("<|endoftext|>") == 0u);
  // Frequent words become single tokens; user terms always are.
  BOOST_TEST(tok.encode(" the").size() == 1u);
  BOOST_TEST(tok.encode("tessera").size() == 1u);
  BOOST_TEST(tok.encode("深度学习").size() == 1u);
  BOOST_TEST(tok.encode("xtesserax").size() == 3u);  // the term is cut out even inside a word
  for (const auto& t : texts) BOOST_TEST(tok.decode(tok.encode(t)) == t);
  const std::string odd = "never seen: ĳ \xff\xfe 😀 <|endoftext|>";
  BOOST_TEST(tok.decode(tok.encode(odd)) == odd);
  // Deterministic: the same counts give the same file, whatever the thread count.
  td::BpeTrainer again(opt);
  for (const auto& t : texts) again.add_text(t);
  BOOST_TEST(again.train().to_json().dump() == tok.to_json().dump());
  // A too-small vocabulary is refused with the arithmetic in the message.
  opt.vocab_size = 100;
  try {
    td::BpeTrainer bad(opt);
    BOOST_FAIL("expected an error");
  } catch (const tessera::Error& e) {
    BOOST_TEST(message_has(e, "vocab_size 100 is smaller than the 260 tokens"));
  }
}

// Exact agreement with the Hugging Face `tokenizers` library (the reference), on real text.
//
// Each case writes its sample texts to a temporary JSONL file, runs
// scripts/tokenizer_reference.py (python3 with `tokenizers`) on the same tokenizer files, and
// requires identical ids and byte-identical decoded text. Samples: English fortunes, the
// Chinese fortunes (Tang poems, Song ci, `chinese`), the King James Bible, plus edge cases.
// When the library or a text package is missing the case prints "TESSERA_SKIP" (CTest then
// reports the test as skipped) instead of passing.
#define BOOST_TEST_MODULE tokenizer_hf
#include <unistd.h>

#include <boost/test/unit_test.hpp>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tessera/data/bpe_tokenizer.hpp"
#include "tessera/data/tokenizer_trainer.hpp"
#include "common/shared_data.hpp"

namespace fs = std::filesystem;
namespace td = tessera::data;
using Ids = std::vector<td::TokenId>;

namespace {

const fs::path kTok = tessera::test::tokenizers_dir();
const fs::path kFortunes = "/usr/share/games/fortunes";

void skip(const std::string& why) {
  std::cout << "TESSERA_SKIP: " << why << std::endl;
  BOOST_TEST_MESSAGE("skipped: " << why);
}

// The first interpreter that can import `tokenizers`, or "" when none can.
std::string reference_python() {
  for (const char* py : {"python3", "/usr/bin/python3"}) {
    const std::string cmd = std::string(py) + " -c 'import tokenizers' >/dev/null 2>&1";
    if (std::system(cmd.c_str()) == 0) return py;
  }
  return {};
}

bool valid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const auto c = td::utf8_at(s, i);
    if (c.cp == td::kInvalidCodePoint) return false;
    i += c.len;
  }
  return true;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Fortune records are separated by lines holding "%".
std::vector<std::string> fortune_records(const fs::path& p) {
  std::vector<std::string> out;
  std::istringstream in(read_file(p));
  std::string line, rec;
  while (std::getline(in, line)) {
    if (line == "%") {
      if (!rec.empty()) out.push_back(rec);
      rec.clear();
    } else {
      rec += line + "\n";
    }
  }
  if (!rec.empty()) out.push_back(rec);
  return out;
}

// Real text from the Debian packages; empty (and `missing` names the package) when absent.
std::vector<std::string> corpus_sample(std::string& missing) {
  std::vector<std::string> texts;
  const fs::path zh[] = {kFortunes / "tang300", kFortunes / "song100", kFortunes / "chinese"};
  for (const auto& p : zh) {
    if (!fs::exists(p)) {
      missing = "fortunes-zh (" + p.string() + ")";
      return {};
    }
  }
  if (!fs::exists(kFortunes / "fortunes")) {
    missing = "fortunes (" + (kFortunes / "fortunes").string() + ")";
    return {};
  }
  if (std::system("command -v bible >/dev/null 2>&1") != 0) {
    missing = "bible-kjv (the `bible` program)";
    return {};
  }
  for (const auto& r : fortune_records(zh[0])) texts.push_back(r);
  for (const auto& r : fortune_records(zh[1])) texts.push_back(r);
  const auto chinese = fortune_records(zh[2]);
  for (std::size_t i = 0; i < chinese.size(); i += 3) texts.push_back(chinese[i]);
  // English: every 8th record of every plain fortune file (not .dat/.u8, not the Chinese ones).
  std::vector<fs::path> english;
  for (const auto& e : fs::directory_iterator(kFortunes)) {
    const auto name = e.path().filename().string();
    if (!e.is_regular_file() || e.path().has_extension() || name == "tang300" ||
        name == "song100" || name == "chinese")
      continue;
    english.push_back(e.path());
  }
  std::sort(english.begin(), english.end());
  std::size_t k = 0;
  for (const auto& p : english) {
    for (const auto& r : fortune_records(p)) {
      if (k++ % 8 == 0) texts.push_back(r);
    }
  }
  // The Bible: every 15th line, and every 40th chapter whole (long texts with newlines).
  FILE* pipe = popen("bible \"Gen1:1-Rev22:21\" 2>/dev/null", "r");
  BOOST_REQUIRE(pipe);
  std::string all;
  char buf[65536];
  std::size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) all.append(buf, n);
  pclose(pipe);
  std::istringstream in(all);
  std::string line, chapter;
  std::size_t ln = 0, chapters = 0;
  while (std::getline(in, line)) {
    if (ln++ % 15 == 0 && !line.empty()) texts.push_back(line);
    if (line.rfind("Genesis", 0) == 0 ||
        (!line.empty() && line[0] != ' ' && line.find(' ') != std::string::npos &&
         std::isdigit(static_cast<unsigned char>(line.back())))) {
      if (chapters++ % 40 == 0 && !chapter.empty()) texts.push_back(chapter);
      chapter.clear();
    }
    chapter += line + "\n";
  }
  // The reference takes str, so invalid UTF-8 (a few Latin-1 fortunes) is checked as a round
  // trip only, in bad_input_is_handled of test_bpe_tokenizer.
  std::erase_if(texts, [](const std::string& s) { return !valid_utf8(s); });
  return texts;
}

std::vector<std::string> edge_cases() {
  std::vector<std::string> t = {
      "",
      " ",
      "   ",
      "\n",
      "\r\n\r\n",
      "a  b   c    d",
      "trailing spaces   ",
      "\t\ttabs\tand\u00a0nbsp\u3000ideographic space",
      "emoji 😀👍🏽👨‍👩‍👧‍👦 🇨🇳🇺🇸 ❤️ ✈︎",
      "mixed: Hello世界こんにちは안녕하세요Привет مرحبا שלום नमस्ते",
      "digits 1 12 123 1234 12345 123456789012345678901234567890",
      "full-width １２３４５ and roman Ⅻ and superscript x²³",
      "I'm you're we've they'll he'd she's IT'S",
      "code: if (x == 1) { return y->z[0]; } // comment\n\tfoo_bar = \"baz\";",
      "<｜begin▁of▁sentence｜>user: hi<｜end▁of▁sentence｜><|endoftext|>",
      "<｜User｜>问题<｜Assistant｜><think>\n嗯\n</think>",
      "combining: e\u0301 a\u0308 \u0915\u094d\u0937",
      "zero\u200bwidth\u200djoin\ufeffbom",
      "control \x01\x02\x1b[31mred\x1b[0m",
      "punct!!! ??? ... --- ,,, 。。。 ！！！",
      "URL https://example.com/a?b=c&d=e#f and email a.b@c.de",
      "中文标点：“你好”，《书名》、【括号】",
      "カタカナとひらがなと漢字",
      std::string(300, ' ') + "x",
      std::string(1000, 'a'),
      "\U0010FFFF\U000E0001 private \ue000",
  };
  std::string ws;
  for (int i = 0; i < 40; ++i) ws += i % 3 ? " " : "\n";
  t.push_back(ws + "end");
  // Random strings over characters chosen to hit every branch of the split rules: letters,
  // marks, ASCII and other digits, punctuation, symbols, each kind of white space, CJK, kana,
  // Hangul, emoji with joiners and modifiers, contractions, format and private-use characters.
  const char32_t alphabet[] = {
      U'a',   U'Z',   U'q',   U'é',   U'ß',   U'Ж',   U'ع',    U'\'',   U's',    U't',
      U'l',   U'e',   U'0',   U'7',   U'٣',   U'²',   U'Ⅻ',    U'①',    U'.',    U',',
      U'!',   U'?',   U'-',   U'_',   U'(',   U')',   U'[',    U'\\',   U'`',    U'~',
      U'$',   U'+',   U'€',   U'©',   U'「',  U'。',  U'，',   U' ',    U' ',    U' ',
      U'\t',  U'\n',  U'\r',  U'\v',  0x85,   0xA0,   0x3000,  0x2028,  U'中',   U'文',
      U'龥',  U'龦',  U'あ',  U'カ',  U'ー',  U'한',  0x1F600, 0x1F44D, 0x1F3FD, 0x200D,
      0xFE0F, 0x0301, 0x094D, 0x200B, 0xFEFF, 0xE000, 0x1F1E8, 0x20000, 0x0001,  0x001B};
  std::mt19937 rng(12345);  // fixed: the reference ids are recomputed each run anyway
  for (int n = 0; n < 1500; ++n) {
    std::string s;
    const int len = 1 + static_cast<int>(rng() % 24);
    for (int k = 0; k < len; ++k) td::append_utf8(s, alphabet[rng() % std::size(alphabet)]);
    t.push_back(s);
  }
  return t;
}

struct Reference {
  std::vector<Ids> ids;
  std::vector<Ids> ids_plain;  // special tokens encoded as text
  std::vector<std::string> decoded;
};

// Runs the reference script; returns false (after printing the skip line) when it cannot.
bool run_reference(const std::vector<std::string>& texts, const std::string& tokenizer_args,
                   Reference& ref) {
  const std::string py = reference_python();
  if (py.empty()) {
    skip(
        "Python package `tokenizers` is not importable by python3 or /usr/bin/python3 "
        "(pip install tokenizers)");
    return false;
  }
  const fs::path dir = fs::temp_directory_path() / ("tessera_tok_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path in = dir / "texts.jsonl", out = dir / "ref.jsonl";
  {
    std::ofstream f(in);
    for (const auto& t : texts) f << nlohmann::json(t).dump() << '\n';
  }
  const std::string cmd = py + " scripts/tokenizer_reference.py --texts " + in.string() +
                          " --out " + out.string() + " " + tokenizer_args;
  const int rc = std::system(cmd.c_str());
  BOOST_REQUIRE_MESSAGE(rc == 0, "reference script failed: " << cmd);
  std::ifstream f(out);
  std::string line;
  while (std::getline(f, line)) {
    const auto j = nlohmann::json::parse(line);
    ref.ids.push_back(j.at("ids").get<Ids>());
    ref.ids_plain.push_back(j.at("ids_plain").get<Ids>());
    ref.decoded.push_back(j.at("decoded").get<std::string>());
  }
  fs::remove_all(dir);
  BOOST_REQUIRE_EQUAL(ref.ids.size(), texts.size());
  return true;
}

void compare(const td::BpeTokenizer& tok, const std::vector<std::string>& texts,
             const Reference& ref, td::EncodeOptions opt = {}) {
  const auto ours = tok.encode_batch(texts, opt);
  const auto& ref_ids = opt.special_tokens ? ref.ids : ref.ids_plain;
  std::size_t id_mismatch = 0, decode_mismatch = 0, tokens = 0, bytes = 0;
  for (std::size_t i = 0; i < texts.size(); ++i) {
    tokens += ours[i].size();
    bytes += texts[i].size();
    if (ours[i] != ref_ids[i]) {
      if (id_mismatch++ < 5) {
        BOOST_ERROR("ids differ for text " << i << ": " << nlohmann::json(texts[i]).dump()
                                           << "\n  ours: " << nlohmann::json(ours[i]).dump()
                                           << "\n  ref:  " << nlohmann::json(ref_ids[i]).dump());
      }
    }
    const std::string back = tok.decode(ours[i]);
    if (back != texts[i] || (opt.special_tokens && back != ref.decoded[i])) {
      if (decode_mismatch++ < 5) {
        BOOST_ERROR("decode differs for text "
                    << i << ": " << nlohmann::json(texts[i]).dump()
                    << "\n  ours: " << nlohmann::json(back).dump()
                    << "\n  ref:  " << nlohmann::json(ref.decoded[i]).dump());
      }
    }
  }
  BOOST_TEST_MESSAGE(texts.size() << " texts, " << bytes << " bytes, " << tokens << " tokens; "
                                  << id_mismatch << " id mismatches, " << decode_mismatch
                                  << " decode mismatches");
  BOOST_TEST(id_mismatch == 0u);
  BOOST_TEST(decode_mismatch == 0u);
  BOOST_TEST(tokens > 0u);
}

const std::string kDeepSeekArgs =
    "--tokenizer-json " + (kTok / "deepseek-v3/tokenizer.json").string();
const std::string kGpt2Args =
    "--gpt2 " + (kTok / "gpt2/encoder.json").string() + " " + (kTok / "gpt2/vocab.bpe").string();

}  // namespace

BOOST_AUTO_TEST_SUITE(hf)

BOOST_AUTO_TEST_CASE(deepseek_corpus) {
  if (!tessera::test::have_real_tokenizers()) return;
  std::string missing;
  const auto texts = corpus_sample(missing);
  if (texts.empty()) return skip("text package missing: " + missing);
  Reference ref;
  if (!run_reference(texts, kDeepSeekArgs, ref)) return;
  compare(td::BpeTokenizer::from_file(kTok / "deepseek-v3/tokenizer.json"), texts, ref);
}

BOOST_AUTO_TEST_CASE(gpt2_corpus) {
  if (!tessera::test::have_real_tokenizers()) return;
  std::string missing;
  const auto texts = corpus_sample(missing);
  if (texts.empty()) return skip("text package missing: " + missing);
  Reference ref;
  if (!run_reference(texts, kGpt2Args, ref)) return;
  compare(td::BpeTokenizer::from_gpt2_files(kTok / "gpt2/encoder.json", kTok / "gpt2/vocab.bpe"),
          texts, ref);
}

BOOST_AUTO_TEST_CASE(deepseek_edge_cases) {
  if (!tessera::test::have_real_tokenizers()) return;
  const auto texts = edge_cases();
  const auto tok = td::BpeTokenizer::from_file(kTok / "deepseek-v3/tokenizer.json");
  Reference ref;
  if (!run_reference(texts, kDeepSeekArgs, ref)) return;
  compare(tok, texts, ref);
  compare(tok, texts, ref, {.special_tokens = false});
}

BOOST_AUTO_TEST_CASE(gpt2_edge_cases) {
  if (!tessera::test::have_real_tokenizers()) return;
  const auto texts = edge_cases();
  const auto tok =
      td::BpeTokenizer::from_gpt2_files(kTok / "gpt2/encoder.json", kTok / "gpt2/vocab.bpe");
  Reference ref;
  if (!run_reference(texts, kGpt2Args, ref)) return;
  compare(tok, texts, ref);
  compare(tok, texts, ref, {.special_tokens = false});
  // The same tokenizer written by tessera as tokenizer.json (ByteLevel with GPT-2's regex):
  // the reference reads it and encodes as it did from the original files.
  const fs::path file =
      fs::temp_directory_path() / ("tessera_gpt2_" + std::to_string(::getpid()) + ".json");
  tok.save(file);
  Reference from_json;
  const bool ran = run_reference(texts, "--tokenizer-json " + file.string(), from_json);
  fs::remove(file);
  if (!ran) return;
  compare(tok, texts, from_json);
}

// A tokenizer trained by tessera (with special tokens and user terms) saves a tokenizer.json
// that the reference library loads and encodes exactly as tessera does.
BOOST_AUTO_TEST_CASE(trained_roundtrip) {
  std::string missing;
  auto texts = corpus_sample(missing);
  if (texts.empty()) return skip("text package missing: " + missing);
  td::BpeTrainerOptions opt;
  opt.vocab_size = 2000;
  opt.special_tokens = {"<|endoftext|>", "<｜User｜>"};
  opt.terms = {"Jehovah", "天下", "tessera"};
  td::BpeTrainer trainer(opt);
  std::vector<std::string> train_texts;
  for (std::size_t i = 1; i < texts.size(); i += 4) train_texts.push_back(texts[i]);
  trainer.add_texts(train_texts);
  const auto tok = trainer.train();
  std::vector<std::string> sample;  // held-out texts, mostly
  for (std::size_t i = 0; i < texts.size(); i += 3) sample.push_back(texts[i]);
  texts = std::move(sample);
  BOOST_TEST_MESSAGE("trained: " << trainer.stats().merges << " merges over "
                                 << trainer.stats().distinct_words << " words");
  BOOST_TEST(tok.vocab_size() == 2000u);
  const fs::path file =
      fs::temp_directory_path() / ("tessera_trained_" + std::to_string(::getpid()) + ".json");
  tok.save(file);
  for (const auto& e : edge_cases()) texts.push_back(e);
  texts.push_back("tessera 天下 Jehovah<|endoftext|><｜User｜>");
  Reference ref;
  const bool ran = run_reference(texts, "--tokenizer-json " + file.string(), ref);
  fs::remove(file);
  if (!ran) return;
  compare(tok, texts, ref);
  compare(tok, texts, ref, {.special_tokens = false});
  BOOST_TEST(tok.encode("天下").size() == 1u);
}

// JiebaSegmenter against jieba itself (python3-jieba, HMM off) on every run of Chinese
// characters in the `chinese` fortunes (thousands of runs): identical word boundaries.
BOOST_AUTO_TEST_CASE(jieba_agrees) {
  const auto dict = td::JiebaSegmenter::default_dictionary_path();
  if (dict.empty()) return skip("python3-jieba is not installed (its dict.txt is missing)");
  if (!fs::exists(kFortunes / "chinese")) return skip("text package missing: fortunes-zh");
  std::vector<std::string> runs;
  const std::string text = read_file(kFortunes / "chinese");
  for (std::size_t i = 0; i < text.size() && runs.size() < 6000;) {
    std::size_t j = i;
    while (j < text.size()) {
      const auto c = td::utf8_at(text, j);
      if (!(c.cp >= 0x4E00 && c.cp <= 0x9FFF)) break;
      j += c.len;
    }
    if (j > i) {
      runs.push_back(text.substr(i, j - i));
      i = j;
    } else {
      i += td::utf8_at(text, i).len;
    }
  }
  const fs::path dir = fs::temp_directory_path() / ("tessera_jieba_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  {
    std::ofstream f(dir / "runs.txt");
    for (const auto& r : runs) f << r << '\n';
  }
  // jieba is a Debian package: /usr/bin/python3 sees it, a pyenv python3 may not.
  int rc = 77;
  for (const char* py : {"/usr/bin/python3", "python3"}) {
    const std::string cmd = std::string(py) + " scripts/tokenizer_reference.py --jieba --texts " +
                            (dir / "runs.txt").string() + " --out " + (dir / "words.txt").string() +
                            " 2>/dev/null";
    rc = std::system(cmd.c_str());
    if (rc == 0) break;
  }
  if (rc != 0) {
    fs::remove_all(dir);
    return skip("the jieba Python module is not importable (python3-jieba)");
  }
  const td::JiebaSegmenter jieba(dict);
  std::ifstream in(dir / "words.txt");
  std::string line;
  std::size_t n = 0, differ = 0;
  for (const auto& r : runs) {
    BOOST_REQUIRE(std::getline(in, line));
    std::string ours;
    for (auto w : jieba.segment(r)) ours += (ours.empty() ? "" : " ") + std::string(w);
    ++n;
    if (ours != line && differ++ < 5)
      BOOST_ERROR("run " << r << ": ours \"" << ours << "\", jieba \"" << line << "\"");
  }
  fs::remove_all(dir);
  BOOST_TEST_MESSAGE(n << " runs, " << differ << " differ");
  BOOST_TEST(differ == 0u);
  BOOST_TEST(n > 1000u);
}

BOOST_AUTO_TEST_SUITE_END()

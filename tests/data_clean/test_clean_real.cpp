// The cleaning stages on real Debian text (fortunes, fortunes-zh). When the packages are
// not installed every case prints "SKIPPED:" and CTest reports the test skipped.
#define BOOST_TEST_MODULE data_clean_real
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <filesystem>

#include "tessera/data/clean/pipeline.hpp"

namespace fs = std::filesystem;
using namespace tessera::data::clean;

namespace {
const std::string kFortunes = "/usr/share/games/fortunes/";

// Reads every record of a fortune file through the given stages (normalise by default).
std::vector<std::string> fortune_records(const std::string& name, bool normalize = true) {
  DocumentReader r(kFortunes + name, InputFormat::kFortune, OnError::kStop);
  Normalizer n;
  std::vector<std::string> out;
  Document d;
  while (r.next(d))
    if (!normalize || n.process(d)) out.push_back(d.text);
  return out;
}

bool have(std::initializer_list<const char*> files) {
  for (const char* f : files)
    if (!fs::exists(kFortunes + f)) {
      std::cout << "SKIPPED: " << kFortunes << f
                << " not installed (apt-get install fortunes fortunes-zh)\n";
      return false;
    }
  return true;
}
}  // namespace

// The fortune files carry ANSI colour codes; after normalisation none is left and the
// text around them is intact.
BOOST_AUTO_TEST_CASE(normalize_strips_ansi_from_fortunes) {
  if (!have({"chinese"})) return;
  DocumentReader r(kFortunes + "chinese", InputFormat::kFortune, OnError::kStop);
  Normalizer n;
  Document d;
  int64_t docs = 0;
  while (r.next(d)) {
    if (!n.process(d)) continue;
    ++docs;
    BOOST_TEST_REQUIRE(d.text.find('\x1b') == std::string::npos);
    BOOST_TEST_REQUIRE(d.text.find("[33m") == std::string::npos);
  }
  BOOST_TEST_MESSAGE("chinese: " << docs << " records, " << n.report().removed.at("ansi_escapes")
                                 << " ANSI escapes");
  BOOST_TEST(docs > 5000);
  BOOST_TEST(n.report().removed.at("ansi_escapes") > 1000);
}

// MinHash's estimate against the exact Jaccard similarity on real text pairs. Each pair is
// a real record and a copy with some of its lines deleted (a range of similarities), or two
// neighbouring records (near 0). For P permutations the estimate is a Binomial(P, J)/P
// count, so every pair must lie within 4.5 standard errors, and the squared errors
// normalised by J(1-J)/P must average near 1 (a mis-scaled estimator fails this).
BOOST_AUTO_TEST_CASE(minhash_estimate_matches_exact_jaccard_on_real_text) {
  if (!have({"tang300", "fortunes"})) return;
  const int P = 128;
  MinHasher h({.shingle = 3, .permutations = P, .bands = 16});
  std::vector<std::string> docs = fortune_records("tang300");
  const auto en = fortune_records("fortunes");
  docs.insert(docs.end(), en.begin(), en.begin() + std::min<size_t>(en.size(), 200));
  double z2 = 0;
  int n = 0, checked = 0;
  for (size_t i = 0; i + 1 < docs.size(); ++i) {
    // Drop every third line (or, for one-line records, the second half).
    std::string edited;
    size_t start = 0, line = 0;
    while (start <= docs[i].size()) {
      size_t end = docs[i].find('\n', start);
      if (end == std::string::npos) end = docs[i].size();
      if (line++ % 3 != 1) edited += docs[i].substr(start, end - start) + "\n";
      start = end + 1;
    }
    if (edited.size() >= docs[i].size()) edited = docs[i].substr(0, docs[i].size() / 2);
    for (const std::string* other : {&edited, &docs[i + 1]}) {
      const auto a = h.shingles(docs[i]), b = h.shingles(*other);
      const double exact = exact_jaccard(a, b);
      const double est = MinHasher::estimate_jaccard(h.signature(a), h.signature(b));
      const double var = exact * (1 - exact) / P;
      BOOST_TEST_REQUIRE(std::abs(est - exact) <= 4.5 * std::sqrt(var) + 1.0 / P,
                         "record " << i << ": exact " << exact << " estimated " << est);
      ++checked;
      if (exact > 0.05 && exact < 0.95) {
        z2 += (est - exact) * (est - exact) / var;
        ++n;
      }
    }
  }
  BOOST_TEST_MESSAGE(checked << " pairs; mean normalised squared error " << z2 / n << " over " << n
                             << " pairs");
  BOOST_TEST(n > 100);
  BOOST_TEST(z2 / n > 0.6);
  BOOST_TEST(z2 / n < 1.5);
}

// Tang poems are Chinese with classical function characters; the regex filter labels them
// zh and keeps their text; the quality stage keeps the large majority.
BOOST_AUTO_TEST_CASE(chain_on_tang_poems) {
  if (!have({"tang300"})) return;
  const std::string out =
      (fs::temp_directory_path() / ("tessera_clean_tang_" + std::to_string(::getpid()))).string();
  Pipeline p({.input_format = InputFormat::kFortune});
  StageConfig c;
  for (const char* s : {"normalize", "filter", "exact-dedup", "near-dedup", "quality"})
    p.add(make_stage(s, c));
  const auto rep = p.run({kFortunes + "tang300"}, out);
  BOOST_TEST_MESSAGE(rep.markdown());
  BOOST_TEST(rep.docs_read == 313);  // 313 `%`-terminated records in Debian's tang300
  const auto& filter = dynamic_cast<RegexFilter&>(p.stage(1));
  BOOST_TEST(filter.languages().at("zh") >= 310);
  BOOST_TEST(rep.docs_written > 250);
  fs::remove(out);
}

// LDA on real text in two languages. Chinese poems and English fortunes share no LDA
// token, so a topic that mixes them explains the data badly: with K = 4 every topic must
// be (almost) one language, and both languages must own a topic.
BOOST_AUTO_TEST_CASE(lda_topics_do_not_mix_real_chinese_and_english) {
  if (!have({"tang300", "fortunes"})) return;
  auto zh = fortune_records("tang300");
  auto en = fortune_records("fortunes");
  en.resize(std::min<size_t>(en.size(), 300));
  const int K = 4;
  LdaDomains lda({.topics = K,
                  .iterations = 60,
                  .seed = 3,
                  .restarts = 2,
                  .min_doc_freq = 3,
                  .max_doc_fraction = 0.3});
  for (const auto& t : zh) lda.observe(Document{t});
  for (const auto& t : en) lda.observe(Document{t});
  lda.fit();
  const auto& dom = lda.domains();
  std::vector<int> zh_count(K, 0), en_count(K, 0);
  for (size_t i = 0; i < dom.size(); ++i)
    if (dom[i] >= 0) ++(i < zh.size() ? zh_count : en_count)[dom[i]];
  bool zh_owns = false, en_owns = false;
  for (int k = 0; k < K; ++k) {
    const int total = zh_count[k] + en_count[k];
    BOOST_TEST_MESSAGE("topic " << k << ": " << zh_count[k] << " zh, " << en_count[k] << " en");
    if (total < 10) continue;
    BOOST_TEST(std::max(zh_count[k], en_count[k]) >= 0.95 * total,
               "topic " << k << " mixes languages");
    zh_owns |= zh_count[k] > en_count[k];
    en_owns |= en_count[k] > zh_count[k];
  }
  BOOST_TEST(zh_owns);
  BOOST_TEST(en_owns);
  lda.finish();
  for (const auto& n : lda.report().notes) BOOST_TEST_MESSAGE(n);
}

// Unit tests of the cleaning stages on small, hand-made inputs whose right answers are
// known exactly, plus LDA on synthetic documents with planted topics.
#define BOOST_TEST_MODULE data_clean_stages
#include <boost/test/unit_test.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include "tessera/data/clean/pipeline.hpp"

namespace fs = std::filesystem;
using namespace tessera::data::clean;

namespace {
bool message_has(const tessera::Error& e, const std::string& part) {
  return std::string(e.what()).find(part) != std::string::npos;
}

std::string temp_path(const std::string& name) {
  return (fs::temp_directory_path() / ("tessera_clean_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}
}  // namespace

BOOST_AUTO_TEST_CASE(utf8_decoder_flags_invalid_bytes) {
  const std::string s = "a\xC3\xA9\xFF\xE4\xBD\xA0\xC0\xAF";  // a é <bad> 你 <overlong '/'>
  size_t i = 0;
  std::vector<uint32_t> cps;  // uint32_t: Boost.Test cannot print char32_t
  while (i < s.size()) cps.push_back(decode_utf8(s, i));
  const std::vector<uint32_t> want = {
      'a', 0xE9, kInvalidCodepoint, 0x4F60, kInvalidCodepoint, kInvalidCodepoint};
  BOOST_TEST(cps == want, boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(normalizer_strips_ansi_control_and_whitespace) {
  Normalizer n;
  // The colour codes as they appear in the Debian fortune files.
  const std::string in =
      "\x1b[33m  -- Debian\x1b[32m \x1b[0m  rocks\t\t\x07 \n\n\n  line two \xE2\x80\x8B ";
  BOOST_TEST(n.normalize(in) == "-- Debian rocks\nline two");
  const auto& r = n.report().removed;
  BOOST_TEST(r.at("ansi_escapes") == 3);
  BOOST_TEST(r.at("control_chars") == 1);  // BEL
  BOOST_TEST(r.at("format_chars") == 1);   // zero-width space
}

BOOST_AUTO_TEST_CASE(normalizer_nfkc_and_invalid_bytes) {
  Normalizer n;
  // Full-width Latin and digits, the "ﬁ" ligature, a compatibility ideograph, a bad byte.
  BOOST_TEST(n.normalize("\xEF\xBC\xA1\xEF\xBC\xA2\xEF\xBC\x91 \xEF\xAC\x81ne \xEF\xA4\x80\xFF") ==
             "AB1 fine \xE8\xB1\x88");
  BOOST_TEST(n.report().removed.at("invalid_utf8_bytes") == 1);
  BOOST_TEST(n.report().removed.at("docs_changed_by_nfkc") == 1);
}

BOOST_AUTO_TEST_CASE(normalizer_traditional_to_simplified) {
  NormalizeOptions o;
  o.traditional_to_simplified = true;
  Normalizer n(o);
  BOOST_TEST(n.normalize("漢字與學習") == "汉字与学习");
  BOOST_TEST(n.report().removed.at("chars_changed_by_t2s") == 4);
  o.opencc_config = "no-such-config.json";
  BOOST_CHECK_EXCEPTION(Normalizer{o}, tessera::Error, [](const tessera::Error& e) {
    return message_has(e, "no-such-config.json");
  });
}

BOOST_AUTO_TEST_CASE(normalizer_drops_empty_documents) {
  Normalizer n;
  Document d{" \x1b[0m \t\n"};
  BOOST_TEST(!n.process(d));
  BOOST_TEST(n.report().removed.at("docs_empty_after_normalize") == 1);
}

BOOST_AUTO_TEST_CASE(regex_filter_keeps_words_whitespace_and_cjk) {
  RegexFilter f;
  Document d{
      "你好，世界。 Hello, <b>world</b>! see https://debian.org/x?y=1 or mail a.b@c.org ★ 42_x"};
  BOOST_TEST(f.process(d));
  BOOST_TEST(d.text == "你好，世界。 Hello bworldb see or mail 42_x");
  BOOST_TEST(d.lang == "latin");  // 4 Han letters of 29: below the 0.2 Han ratio for zh
  BOOST_TEST(f.report().removed.at("url_matches") == 1);
  BOOST_TEST(f.report().removed.at("email_matches") == 1);

  RegexFilterOptions o;
  o.rules = default_regex_rules(/*keep_punctuation=*/true);
  RegexFilter keep_punct(o);
  Document e{"Hello, world! ★"};
  BOOST_TEST(keep_punct.process(e));
  BOOST_TEST(e.text == "Hello, world!");
}

BOOST_AUTO_TEST_CASE(regex_filter_custom_rules_and_languages) {
  RegexFilterOptions o;
  o.rules.push_back({"lorem", "(?i)lorem ipsum", RegexRule::Action::kDropDocument, ""});
  o.rules.push_back({"has_letter", R"(\p{L})", RegexRule::Action::kRequire, ""});
  o.keep_languages = {"latin"};
  RegexFilter f(o);
  Document a{"Lorem ipsum dolor"}, b{"12345 678"}, c{"床前明月光"}, d{"The quick brown fox"},
      e{"Ελληνικά γράμματα"};
  BOOST_TEST(!f.process(a));
  BOOST_TEST(!f.process(b));
  BOOST_TEST(!f.process(c));
  BOOST_TEST(f.process(d));
  BOOST_TEST(!f.process(e));
  BOOST_TEST(f.report().removed.at("docs_dropped_by_lorem") == 1);
  BOOST_TEST(f.report().removed.at("docs_missing_has_letter") == 1);
  BOOST_TEST(f.report().removed.at("docs_lang_zh") == 1);
  BOOST_TEST(f.report().removed.at("docs_lang_other") == 1);

  RegexFilterOptions bad;
  bad.rules = {{"broken", "(unclosed", RegexRule::Action::kReplace, ""}};
  BOOST_CHECK_EXCEPTION(RegexFilter{bad}, tessera::Error, [](const tessera::Error& e) {
    return message_has(e, "broken") && message_has(e, "(unclosed");
  });
}

BOOST_AUTO_TEST_CASE(language_detection_by_script_ratio) {
  BOOST_TEST(detect_language("安装 Debian 软件包需要 apt-get install") == "zh");
  BOOST_TEST(detect_language("In the beginning God created the heaven") == "latin");
  BOOST_TEST(detect_language("Привет мир") == "other");
  BOOST_TEST(detect_language("123 456 !!") == "none");
}

BOOST_AUTO_TEST_CASE(exact_dedup_keeps_first_copy) {
  ExactDedup x;
  Document a{"same text"}, b{"same text"}, c{"other text"};
  BOOST_TEST(x.process(a));
  BOOST_TEST(!x.process(b));
  BOOST_TEST(x.process(c));
  BOOST_TEST(x.report().removed.at("docs_exact_duplicate") == 1);
}

BOOST_AUTO_TEST_CASE(minhash_estimates_and_config_errors) {
  MinHasher h({.shingle = 3, .permutations = 256, .bands = 32});
  const std::string a = "the quick brown fox jumps over the lazy dog and runs far away";
  const std::string b = "the quick brown fox jumps over the lazy cat and runs far away";
  const auto sa = h.shingles(a), sb = h.shingles(b);
  const double exact = exact_jaccard(sa, sb);
  const double est = MinHasher::estimate_jaccard(h.signature(sa), h.signature(sb));
  const double sigma = std::sqrt(exact * (1 - exact) / 256);
  BOOST_TEST_MESSAGE("exact " << exact << " estimated " << est << " sigma " << sigma);
  BOOST_TEST(std::abs(est - exact) <= 4 * sigma + 1.0 / 256);
  BOOST_TEST(MinHasher::estimate_jaccard(h.signature(a), h.signature(a)) == 1.0);
  // Same seed, same signature: deterministic.
  BOOST_TEST(MinHasher({.shingle = 3, .permutations = 256, .bands = 32}).signature(a) ==
             h.signature(a));
  BOOST_CHECK_EXCEPTION(MinHasher({.permutations = 100, .bands = 16}), tessera::Error,
                        [](const tessera::Error& e) {
                          return message_has(e, "bands (16) must divide permutations (100)");
                        });
}

BOOST_AUTO_TEST_CASE(near_dedup_removes_near_copies_only) {
  NearDedup n({.shingle = 5, .permutations = 128, .bands = 32, .threshold = 0.7});
  Document a{
      "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
      "must be in want of a wife.",
      "f", 1};
  Document b{
      "It is a truth universally acknowledged, that a single man in possession of a good fortune "
      "must be in want of a wife!",
      "f", 9};
  Document c{
      "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
      "in my purse.",
      "f", 20};
  BOOST_TEST(n.process(a));
  BOOST_TEST(!n.process(b));
  BOOST_TEST(n.process(c));
  BOOST_REQUIRE(n.removed_pairs().size() == 1);
  BOOST_TEST(n.removed_pairs()[0].kept_line == 1);
  BOOST_TEST(n.removed_pairs()[0].removed_line == 9);
  BOOST_TEST(n.removed_pairs()[0].estimated_jaccard >= 0.7);
  n.finish();
  BOOST_TEST(!n.report().notes.empty());
}

BOOST_AUTO_TEST_CASE(quality_rules_flag_repetition_and_symbols) {
  const std::string good =
      "The committee met on Tuesday to discuss the budget for the coming year, and most of the "
      "members "
      "agreed that the library should stay open in the evenings.";
  const auto gs = compute_quality_signals(good);
  BOOST_TEST(score_quality(gs, {}).failed.empty());

  std::string spam;
  for (int i = 0; i < 20; ++i) spam += "buy cheap pills now\n";
  const auto ss = compute_quality_signals(spam);
  BOOST_TEST(ss.duplicate_line_fraction > 0.9);
  BOOST_TEST(ss.top_ngram_fraction[0] > 0.2);
  const auto v = score_quality(ss, {});
  BOOST_TEST(v.score < 0.85);

  const auto sym =
      compute_quality_signals("$$$ ### @@@ !!! 123 456 789 000 111 222 %%% ^^^ &&& *** abc");
  BOOST_TEST(sym.symbol_ratio > 0.25);
  BOOST_TEST(sym.digit_ratio > 0.25);

  // Short texts are not judged on n-gram repetition (chance dominates below 50 words).
  const auto proverb = compute_quality_signals("冷天莫遮火热天莫遮风");
  BOOST_TEST(proverb.top_ngram_fraction[0] > 0.2);
  for (const auto& f : score_quality(proverb, {}).failed) BOOST_TEST(f != "top_ngram_repetition");

  // Chinese: per-character words and function-character stop words.
  const auto zh = compute_quality_signals("这是一个关于自由软件的简短说明，它告诉你如何安装系统。");
  BOOST_TEST(zh.han_ratio == 1.0);
  BOOST_TEST(zh.stop_words >= 3);
  BOOST_TEST(score_quality(zh, {}).failed.empty());
}

BOOST_AUTO_TEST_CASE(quality_learned_extension_point) {
  QualityOptions o;
  o.learned = [](std::string_view t) {
    return t.find("good") != std::string_view::npos ? 1.0 : 0.0;
  };
  o.learned_weight = 1.0;
  o.threshold = 0.5;
  QualityFilter q(o);
  Document a{"good"}, b{"bad"};
  BOOST_TEST(q.process(a));
  BOOST_TEST(a.quality == 1.0);
  BOOST_TEST(!q.process(b));
  o.learned = [](std::string_view) { return 2.0; };
  QualityFilter broken(o);
  BOOST_CHECK_EXCEPTION(broken.process(a), tessera::Error,
                        [](const tessera::Error& e) { return message_has(e, "returned 2"); });
}

// Four topics over disjoint 10-word vocabularies; each document draws 90% of its words
// from one topic and 10% uniformly. Gibbs sampling must recover the word sets and the
// document labels (up to a permutation of topic numbers). Seed 7 alone settles in a local
// optimum (two planted topics merged); four restarts pick the run of highest likelihood.
BOOST_AUTO_TEST_CASE(lda_recovers_planted_topics) {
  const int K = 4, words_per_topic = 10, V = K * words_per_topic, docs = 200, len = 40;
  const uint64_t seed = 12345;
  BOOST_TEST_MESSAGE("planted-topic seed " << seed);
  Xoshiro256 rng(seed);
  std::vector<std::vector<int32_t>> corpus(docs);
  std::vector<int> truth(docs);
  for (int d = 0; d < docs; ++d) {
    truth[d] = d % K;
    for (int i = 0; i < len; ++i) {
      const bool noise = rng.uniform() < 0.1;
      corpus[d].push_back(
          noise ? static_cast<int32_t>(rng.next() % V)
                : static_cast<int32_t>(truth[d] * words_per_topic + rng.next() % words_per_topic));
    }
  }
  Lda single({.topics = K, .alpha = 0.1, .beta = 0.01, .iterations = 100, .seed = 7});
  single.fit(corpus, V);
  Lda lda({.topics = K, .alpha = 0.1, .beta = 0.01, .iterations = 100, .seed = 7, .restarts = 4});
  lda.fit(corpus, V);
  BOOST_TEST(lda.log_likelihood() > single.log_likelihood());
  std::set<int> planted_seen;
  std::vector<int> topic_to_planted(K, -1);
  for (int k = 0; k < K; ++k) {
    std::set<int> groups;
    for (int32_t w : lda.top_words(k, words_per_topic)) groups.insert(w / words_per_topic);
    BOOST_TEST(groups.size() == 1u, "topic " << k << " mixes planted topics");
    topic_to_planted[k] = *groups.begin();
    planted_seen.insert(*groups.begin());
  }
  BOOST_TEST(planted_seen.size() == static_cast<size_t>(K));
  int correct = 0;
  for (int d = 0; d < docs; ++d) correct += topic_to_planted[lda.domain(d)] == truth[d];
  BOOST_TEST(correct == docs);

  // Deterministic: the same seed gives the same labels.
  Lda again({.topics = K, .alpha = 0.1, .beta = 0.01, .iterations = 100, .seed = 7, .restarts = 4});
  again.fit(corpus, V);
  for (int d = 0; d < docs; ++d) BOOST_TEST_REQUIRE(again.domain(d) == lda.domain(d));

  std::vector<std::vector<int32_t>> bad = {{0, 41}};
  BOOST_CHECK_EXCEPTION(lda.fit(bad, V), tessera::Error,
                        [](const tessera::Error& e) { return message_has(e, "41"); });
}

BOOST_AUTO_TEST_CASE(lda_tokens_latin_words_and_han_units) {
  using V = std::vector<std::string>;
  BOOST_TEST(lda_tokens("The Debian package is installed: 安装软件的包") ==
                 (V{"debian", "package", "installed", "安", "装", "软", "件", "包"}),
             boost::test_tools::per_element());
  BOOST_TEST(lda_tokens("安装软件 x 的包", true, /*han_bigrams=*/true) ==
                 (V{"安装", "装软", "软件", "的包"}),
             boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(balance_select_hits_target_mix) {
  std::vector<int> domains;
  for (int i = 0; i < 100; ++i) domains.push_back(0);
  for (int i = 0; i < 30; ++i) domains.push_back(1);
  for (int i = 0; i < 10; ++i) domains.push_back(2);
  domains.push_back(-1);
  std::vector<int64_t> quota;
  auto keep = balance_select(domains, 3, {}, &quota);  // uniform: limited by domain 2
  BOOST_TEST(quota == (std::vector<int64_t>{10, 10, 10}), boost::test_tools::per_element());
  std::vector<int> kept_per(3, 0);
  for (size_t i = 0; i < domains.size(); ++i)
    if (keep[i]) ++kept_per[domains[i]];
  BOOST_TEST(kept_per == (std::vector<int>{10, 10, 10}), boost::test_tools::per_element());
  BOOST_TEST(!keep.back());

  BalanceOptions mix;
  mix.target_mix = {0.5, 0.3, 0.2};
  balance_select(domains, 3, mix, &quota);  // limited by domain 2: 10 / 0.2 = 50 total
  BOOST_TEST(quota == (std::vector<int64_t>{25, 15, 10}), boost::test_tools::per_element());
  mix.target_mix = {1, 1};
  BOOST_CHECK_THROW(balance_select(domains, 3, mix), tessera::Error);
}

BOOST_AUTO_TEST_CASE(pipeline_reports_bad_jsonl_lines_and_continues) {
  const std::string in = temp_path("in.jsonl"), out = temp_path("out.jsonl");
  {
    std::ofstream f(in);
    f << R"({"text": "First document, plain."})"
      << "\n"
      << "this is not json\n"
      << R"({"body": "wrong field"})"
      << "\n"
      << R"({"text": "First document, plain."})"
      << "\n"
      << R"({"text": "Second document."})"
      << "\n";
  }
  Pipeline p({.input_format = InputFormat::kJsonl, .on_error = OnError::kContinue});
  StageConfig c;
  for (const char* s : {"normalize", "filter", "exact-dedup"}) p.add(make_stage(s, c));
  const auto rep = p.run({in, temp_path("missing.txt")}, out);
  BOOST_TEST(!rep.stopped);
  BOOST_REQUIRE(rep.errors.size() == 3u);
  BOOST_TEST(rep.errors[0].str() == in + ":2: not a JSON object");
  BOOST_TEST(rep.errors[1].str() == in + ":3: no string field \"text\"");
  BOOST_TEST(message_has(tessera::Error(rep.errors[2].str()), "missing.txt:0: cannot open"));
  BOOST_TEST(rep.docs_read == 3);
  BOOST_TEST(rep.docs_written == 2);
  const auto lines = read_lines(out);
  BOOST_REQUIRE(lines.size() == 2u);
  BOOST_TEST(nlohmann::json::parse(lines[1])["text"] == "Second document");
  BOOST_TEST(nlohmann::json::parse(lines[1])["line"] == 5);
  BOOST_TEST(rep.stages[2].removed.at("docs_exact_duplicate") == 1);
  BOOST_TEST(rep.markdown().find("| exact_dedup | 3 | 2 |") != std::string::npos);
  fs::remove(in);
  fs::remove(out);
}

BOOST_AUTO_TEST_CASE(pipeline_stop_keeps_what_was_written) {
  const std::string in = temp_path("stop.jsonl"), out = temp_path("stop_out.jsonl");
  {
    std::ofstream f(in);
    f << R"({"text": "one"})"
      << "\n"
      << R"({"text": "two"})"
      << "\n"
      << "{broken\n"
      << R"({"text": "four"})"
      << "\n";
  }
  Pipeline p({.input_format = InputFormat::kJsonl, .on_error = OnError::kStop});
  p.add(make_stage("normalize", {}));
  const auto rep = p.run({in}, out);
  BOOST_TEST(rep.stopped);
  BOOST_TEST(rep.stop_reason == in + ":3: not a JSON object");
  BOOST_TEST(read_lines(out).size() == 2u);
  BOOST_TEST(!fs::exists(out + ".tmp"));
  fs::remove(in);
  fs::remove(out);
}

BOOST_AUTO_TEST_CASE(pipeline_runs_corpus_stage_in_two_passes) {
  const std::string in = temp_path("fortune.txt"), out = temp_path("lda_out.jsonl");
  {
    std::ofstream f(in);
    for (int i = 0; i < 30; ++i) {
      f << (i % 2 ? "apple banana cherry apple banana grape melon "
                  : "engine wheel brake engine wheel gear clutch ")
        << i << "\n%\n";
    }
  }
  Pipeline p({.input_format = InputFormat::kFortune});
  StageConfig c;
  c.lda = {.topics = 2, .iterations = 50, .min_doc_freq = 2, .max_doc_fraction = 0.9};
  p.add(make_stage("normalize", c)).add(make_stage("lda", c)).add(make_stage("exact-dedup", c));
  const auto rep = p.run({in}, out);
  const auto lines = read_lines(out);
  BOOST_REQUIRE(lines.size() == 30u);
  const int d0 = nlohmann::json::parse(lines[0])["domain"],
            d1 = nlohmann::json::parse(lines[1])["domain"];
  BOOST_TEST(d0 != d1);
  for (size_t i = 0; i < lines.size(); ++i)
    BOOST_TEST(nlohmann::json::parse(lines[i])["domain"] == (i % 2 ? d1 : d0));
  BOOST_TEST(rep.stages[1].notes.size() == 3u);  // header + one line per topic
  BOOST_TEST(!fs::exists(out + ".segment0.jsonl"));
  BOOST_CHECK_EXCEPTION(make_stage("sharpen", c), tessera::Error,
                        [](const tessera::Error& e) { return message_has(e, "near-dedup"); });
  fs::remove(in);
  fs::remove(out);
}

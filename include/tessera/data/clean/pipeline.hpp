// tessera/data/clean/pipeline.hpp — runs a chain of cleaning stages over files.
//
// The chain is cut into segments at each corpus stage (LDA must see every document before
// it labels any). The first segment streams the inputs; each later segment streams the
// previous segment's JSONL spool file twice (observe + fit, then process). Only a corpus
// stage's compact state (word ids for LDA, hashes and signatures for dedup) is held in
// memory, never the text of the corpus.
//
// Errors: with OnError::kContinue a bad record is logged (file:line) and skipped; with
// kStop reading ends at the first error, the documents read before it still run through
// the whole chain, the output is flushed and renamed as usual, and the report says where
// and why the run stopped. Output is written to `<output>.tmp` and renamed at the end.
#pragma once

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/data/clean/dedup.hpp"
#include "tessera/data/clean/io.hpp"
#include "tessera/data/clean/lda.hpp"
#include "tessera/data/clean/normalize.hpp"
#include "tessera/data/clean/quality.hpp"
#include "tessera/data/clean/regex_filter.hpp"
#include "tessera/data/clean/text.hpp"

namespace tessera::data::clean {

struct Progress {
  std::string phase;            // e.g. "read", "lda observe", "lda write"
  int64_t done = 0, total = 0;  // bytes or documents; total 0 when unknown
  int64_t documents = 0;
};

struct PipelineOptions {
  InputFormat input_format = InputFormat::kFortune;
  std::string json_field = "text";
  OutputFormat output_format = OutputFormat::kJsonl;
  OnError on_error = OnError::kContinue;
  std::function<void(const Progress&)> progress;  // called every `progress_every` documents
  int64_t progress_every = 500;
};

struct PipelineReport {
  std::vector<StageReport> stages;
  int64_t docs_read = 0, docs_written = 0;
  std::vector<ReadError> errors;
  bool stopped = false;  // an input error ended reading early (OnError::kStop)
  std::string stop_reason;
  double seconds = 0;
  std::string output;

  std::string markdown() const {
    std::ostringstream o;
    o << "# clean_text report\n\n";
    o << "documents read: " << docs_read << ", written: " << docs_written << " to `" << output
      << "`, " << seconds << " s\n\n";
    if (stopped) o << "**stopped early**: " << stop_reason << "\n\n";
    o << "| stage | docs in | docs out | bytes in | bytes out | removed |\n| --- | ---: | ---: | "
         "---: | ---: | --- |\n";
    for (const auto& s : stages) {
      o << "| " << s.stage << " | " << s.docs_in << " | " << s.docs_out << " | " << s.bytes_in
        << " | " << s.bytes_out << " | ";
      bool first = true;
      for (const auto& [what, n] : s.removed) {
        o << (first ? "" : ", ") << what << " " << n;
        first = false;
      }
      o << " |\n";
    }
    for (const auto& s : stages) {
      if (s.notes.empty()) continue;
      o << "\n## " << s.stage << "\n\n";
      for (const auto& n : s.notes) o << "- " << n << "\n";
    }
    if (!errors.empty()) {
      o << "\n## input errors (" << errors.size() << ")\n\n";
      for (size_t i = 0; i < std::min<size_t>(errors.size(), 50); ++i)
        o << "- " << errors[i].str() << "\n";
      if (errors.size() > 50) o << "- ... " << errors.size() - 50 << " more\n";
    }
    return o.str();
  }
};

class Pipeline {
 public:
  explicit Pipeline(PipelineOptions options = {}) : opt_(std::move(options)) {}

  Pipeline& add(std::unique_ptr<Stage> stage) {
    stages_.push_back(std::move(stage));
    return *this;
  }
  size_t size() const { return stages_.size(); }
  Stage& stage(size_t i) { return *stages_.at(i); }

  PipelineReport run(const std::vector<std::string>& inputs, const std::string& output) {
    TESSERA_CHECK(!inputs.empty(), "clean::Pipeline::run: no input files");
    const auto t0 = std::chrono::steady_clock::now();
    PipelineReport rep;
    rep.output = output;
    // Segment boundaries: a segment starts at 0 and at every corpus stage.
    std::vector<size_t> starts = {0};
    for (size_t i = 0; i < stages_.size(); ++i)
      if (stages_[i]->needs_corpus() && i != 0) starts.push_back(i);
    const bool first_is_corpus = !stages_.empty() && stages_[0]->needs_corpus();
    if (first_is_corpus) starts.insert(starts.begin(), 0);  // an empty segment spools the inputs
    starts.push_back(stages_.size());

    int64_t total_bytes = 0;
    for (const auto& f : inputs) {
      std::error_code ec;
      const auto n = f == "-" ? 0 : std::filesystem::file_size(f, ec);
      if (!ec) total_bytes += static_cast<int64_t>(n);
    }

    std::string source;  // spool file feeding the current segment ("" = the inputs)
    for (size_t seg = 0; seg + 1 < starts.size(); ++seg) {
      const size_t begin = starts[seg], end = starts[seg + 1];
      const bool last = seg + 2 == starts.size();
      const std::string target =
          last ? output : output + ".segment" + std::to_string(seg) + ".jsonl";
      {
        AtomicWriter writer(target, last ? opt_.output_format : OutputFormat::kJsonl);
        if (source.empty()) {
          run_inputs(inputs, total_bytes, begin, end, writer, rep);
        } else {
          run_spool(source, begin, end, writer);
        }
        writer.commit();
        if (last) rep.docs_written = writer.count();
      }
      if (!source.empty()) std::filesystem::remove(source);
      source = target;
    }
    for (auto& s : stages_) {
      s->finish();
      rep.stages.push_back(s->report());
    }
    rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return rep;
  }

 private:
  // Passes doc through stages [begin, end); true if it survives.
  bool apply(Document& doc, size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      StageReport& r = stages_[i]->report();
      ++r.docs_in;
      r.bytes_in += static_cast<int64_t>(doc.text.size());
      if (!stages_[i]->process(doc)) return false;
      ++r.docs_out;
      r.bytes_out += static_cast<int64_t>(doc.text.size());
    }
    return true;
  }

  void tick(const char* phase, int64_t done, int64_t total, int64_t docs, bool force = false) {
    if (opt_.progress && (force || docs % opt_.progress_every == 0))
      opt_.progress({phase, done, total, docs});
  }

  void run_inputs(const std::vector<std::string>& inputs, int64_t total_bytes, size_t begin,
                  size_t end, AtomicWriter& writer, PipelineReport& rep) {
    int64_t bytes_before = 0;
    auto log = [&rep](const ReadError& e) { rep.errors.push_back(e); };
    for (const auto& file : inputs) {
      try {
        DocumentReader reader(file, opt_.input_format, opt_.on_error, log, opt_.json_field);
        Document doc;
        while (reader.next(doc)) {
          ++rep.docs_read;
          if (apply(doc, begin, end)) writer.write(doc);
          tick("read", bytes_before + reader.bytes_read(), total_bytes, rep.docs_read);
        }
        bytes_before += reader.bytes_read();
      } catch (const ReadFailure& e) {
        rep.errors.push_back(e.error);
        rep.stopped = true;
        rep.stop_reason = e.error.str();
        return;
      }
    }
    tick("read", total_bytes, total_bytes, rep.docs_read, true);
  }

  void run_spool(const std::string& spool, size_t begin, size_t end, AtomicWriter& writer) {
    Stage& corpus = *stages_[begin];
    const std::string name = corpus.name();
    int64_t n = 0;
    {
      DocumentReader reader(spool, InputFormat::kJsonl, OnError::kStop);
      Document doc;
      while (reader.next(doc)) {
        corpus.observe(doc);
        ++n;
        tick((name + " observe").c_str(), n, 0, n);
      }
    }
    if (opt_.progress) opt_.progress({name + " fit", 0, 0, n});
    corpus.fit();
    DocumentReader reader(spool, InputFormat::kJsonl, OnError::kStop);
    Document doc;
    int64_t m = 0;
    while (reader.next(doc)) {
      if (apply(doc, begin, end)) writer.write(doc);
      ++m;
      tick((name + " write").c_str(), m, n, m);
    }
    tick((name + " write").c_str(), m, n, m, true);
  }

  PipelineOptions opt_;
  std::vector<std::unique_ptr<Stage>> stages_;
};

// Everything a chain can be configured with, so a command line (or a test) can build any
// chain by stage names.
struct StageConfig {
  NormalizeOptions normalize;
  RegexFilterOptions filter;
  MinHashOptions minhash;
  QualityOptions quality;
  LdaOptions lda;
  BalanceOptions balance;
};

inline constexpr const char* kStageNames =
    "normalize, filter, exact-dedup, near-dedup, quality, lda, balance";

// The one place stage names become stages; the error lists what exists.
inline std::unique_ptr<Stage> make_stage(const std::string& name, const StageConfig& c) {
  if (name == "normalize") return std::make_unique<Normalizer>(c.normalize);
  if (name == "filter") return std::make_unique<RegexFilter>(c.filter);
  if (name == "exact-dedup") return std::make_unique<ExactDedup>();
  if (name == "near-dedup") return std::make_unique<NearDedup>(c.minhash);
  if (name == "quality") return std::make_unique<QualityFilter>(c.quality);
  if (name == "lda") {
    BalanceOptions off = c.balance;
    off.enabled = false;
    return std::make_unique<LdaDomains>(c.lda, off);
  }
  if (name == "balance") {
    BalanceOptions on = c.balance;
    on.enabled = true;
    return std::make_unique<LdaDomains>(c.lda, on);
  }
  fail("clean: unknown stage '", name, "'; stages are: ", kStageNames);
}

}  // namespace tessera::data::clean

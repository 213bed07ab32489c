// tessera/data/clean/io.hpp — streaming document reader and crash-safe writer.
//
// Why streaming: the corpora the pipeline is meant for do not fit in memory, so a reader
// yields one record at a time from a std::istream and never holds a whole file.
//
// Why errors carry file and line: a bad JSONL line in a 10 GB dump has to be findable.
// The caller chooses whether an error stops the run or is recorded and skipped.
//
// Why write-to-temp-then-rename: a reader of the output never sees a half-written file
// under the final name, and a run stopped by an error still renames what it flushed so no
// written document is lost.
#pragma once

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/data/clean/text.hpp"

namespace tessera::data::clean {

// How records are delimited in an input file.
enum class InputFormat {
  kLines,       // one document per line
  kParagraphs,  // documents separated by blank lines (the Bible, Debian Reference)
  kFortune,     // records separated by a line holding only `%` (fortune files)
  kJsonl,       // one JSON object per line; the text is in a configurable field
};

enum class OnError { kStop, kContinue };

inline InputFormat parse_input_format(const std::string& s) {
  if (s == "lines") return InputFormat::kLines;
  if (s == "paragraphs") return InputFormat::kParagraphs;
  if (s == "fortune") return InputFormat::kFortune;
  if (s == "jsonl") return InputFormat::kJsonl;
  fail("input format '", s, "' is not one of: lines, paragraphs, fortune, jsonl");
}

// An input problem located in its file.
struct ReadError {
  std::string file;
  int64_t line = 0;  // 0 when the whole file is affected (cannot be opened)
  std::string what;
  std::string str() const { return file + ":" + std::to_string(line) + ": " + what; }
};

// Thrown (under OnError::kStop) for an input problem; carries the located error.
class ReadFailure : public Error {
 public:
  explicit ReadFailure(ReadError e) : Error(e.str()), error(std::move(e)) {}
  ReadError error;
};

// Reads documents one record at a time. Under kContinue, bad records are passed to
// `on_error` and skipped; under kStop a ReadFailure is thrown.
class DocumentReader {
 public:
  DocumentReader(std::string path, InputFormat format, OnError policy,
                 std::function<void(const ReadError&)> on_error = {},
                 std::string json_field = "text")
      : path_(std::move(path)),
        format_(format),
        policy_(policy),
        on_error_(std::move(on_error)),
        field_(std::move(json_field)) {
    if (path_ == "-") {
      in_ = &std::cin;
    } else {
      file_ = std::make_unique<std::ifstream>(path_, std::ios::binary);
      if (!*file_) {
        error({path_, 0, "cannot open for reading"});
        done_ = true;
      }
      in_ = file_.get();
    }
  }

  // Bytes consumed so far (for progress bars).
  int64_t bytes_read() const { return bytes_; }

  // Fills `doc` with the next record; false at the end of the input.
  bool next(Document& doc) {
    if (done_) return false;
    std::string line;
    if (format_ == InputFormat::kLines || format_ == InputFormat::kJsonl) {
      while (getline(line)) {
        if (format_ == InputFormat::kLines) {
          doc = Document{line, path_, line_no_};
          return true;
        }
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank JSONL line
        if (parse_json(line, doc)) return true;
      }
      return false;
    }
    // Multi-line records: accumulate until a delimiter.
    std::string record;
    int64_t start = 0;
    while (getline(line)) {
      const bool delimiter = format_ == InputFormat::kFortune
                                 ? (line == "%" || line == "%\r")
                                 : line.find_first_not_of(" \t\r") == std::string::npos;
      if (delimiter) {
        if (!record.empty()) {
          doc = Document{std::move(record), path_, start};
          return true;
        }
        continue;
      }
      if (record.empty())
        start = line_no_;
      else
        record += '\n';
      record += line;
    }
    if (!record.empty()) {
      doc = Document{std::move(record), path_, start};
      return true;
    }
    return false;
  }

 private:
  bool getline(std::string& line) {
    if (!std::getline(*in_, line)) {
      if (in_->bad()) error({path_, line_no_ + 1, "read error"});
      done_ = true;
      return false;
    }
    ++line_no_;
    bytes_ += static_cast<int64_t>(line.size()) + 1;
    if (!line.empty() && line.back() == '\r' && format_ != InputFormat::kFortune) line.pop_back();
    return true;
  }

  // Reads our own intermediate fields too, so a JSONL file written by the pipeline can be
  // read back without losing the stages' annotations.
  bool parse_json(const std::string& line, Document& doc) {
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      error({path_, line_no_, "not a JSON object"});
      return false;
    }
    auto it = j.find(field_);
    if (it == j.end() || !it->is_string()) {
      error({path_, line_no_, "no string field \"" + field_ + "\""});
      return false;
    }
    doc = Document{it->get<std::string>(), path_, line_no_};
    if (auto s = j.find("source"); s != j.end() && s->is_string())
      doc.source = s->get<std::string>();
    if (auto s = j.find("line"); s != j.end() && s->is_number_integer())
      doc.line = s->get<int64_t>();
    if (auto s = j.find("lang"); s != j.end() && s->is_string()) doc.lang = s->get<std::string>();
    if (auto s = j.find("domain"); s != j.end() && s->is_number_integer())
      doc.domain = s->get<int>();
    if (auto s = j.find("quality"); s != j.end() && s->is_number()) doc.quality = s->get<double>();
    return true;
  }

  void error(ReadError e) {
    if (policy_ == OnError::kStop) throw ReadFailure(std::move(e));
    if (on_error_) on_error_(e);
  }

  std::string path_;
  InputFormat format_;
  OnError policy_;
  std::function<void(const ReadError&)> on_error_;
  std::string field_;
  std::unique_ptr<std::ifstream> file_;
  std::istream* in_ = nullptr;
  int64_t line_no_ = 0, bytes_ = 0;
  bool done_ = false;
};

// JSONL form of a document; annotations are written only once a stage has set them.
// Invalid UTF-8 is replaced (U+FFFD) rather than throwing, so unnormalised text can be written.
inline std::string to_jsonl(const Document& doc) {
  nlohmann::json j;
  j["text"] = doc.text;
  j["source"] = doc.source;
  j["line"] = doc.line;
  if (!doc.lang.empty()) j["lang"] = doc.lang;
  if (doc.domain >= 0) j["domain"] = doc.domain;
  if (doc.quality >= 0) j["quality"] = doc.quality;
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

enum class OutputFormat {
  kJsonl,  // one object per line with the annotations
  kText,   // the texts only, separated by a line holding `%` (fortune form, lossless for text)
};

// Writes to `<path>.tmp` and renames to `path` on commit(). If the writer is destroyed
// without commit (an exception escaped), the flushed temporary file is left in place so
// nothing is lost, and its name says it is incomplete.
class AtomicWriter {
 public:
  AtomicWriter(std::string path, OutputFormat format)
      : path_(std::move(path)),
        tmp_(path_ + ".tmp"),
        format_(format),
        out_(tmp_, std::ios::binary) {
    TESSERA_CHECK(out_.good(), "clean: cannot open output '", tmp_, "' for writing");
  }
  AtomicWriter(const AtomicWriter&) = delete;
  AtomicWriter& operator=(const AtomicWriter&) = delete;
  ~AtomicWriter() {
    if (!committed_) out_.flush();
  }

  void write(const Document& doc) {
    if (format_ == OutputFormat::kJsonl) {
      out_ << to_jsonl(doc) << '\n';
    } else {
      if (count_ > 0) out_ << "%\n";
      out_ << doc.text << '\n';
    }
    ++count_;
    TESSERA_CHECK(out_.good(), "clean: write to '", tmp_, "' failed after ", count_, " documents");
  }
  int64_t count() const { return count_; }
  const std::string& path() const { return path_; }

  void commit() {
    if (committed_) return;
    out_.flush();
    out_.close();
    std::error_code ec;
    std::filesystem::rename(tmp_, path_, ec);
    TESSERA_CHECK(!ec, "clean: cannot rename '", tmp_, "' to '", path_, "': ", ec.message());
    committed_ = true;
  }

 private:
  std::string path_, tmp_;
  OutputFormat format_;
  std::ofstream out_;
  int64_t count_ = 0;
  bool committed_ = false;
};

}  // namespace tessera::data::clean

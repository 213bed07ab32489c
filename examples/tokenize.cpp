// tokenize — train, encode and decode with tessera's byte-level BPE tokenizer.
//
// What you will learn: how a tokenizer.json (or GPT-2's encoder.json + vocab.bpe) is loaded,
// how text and JSONL stream through encode_batch in blocks (OpenMP inside, constant memory),
// how a runtime choice (the Chinese segmentation policy) becomes a type in one switch, and how
// a tokenizer is trained and saved in the form the Hugging Face library reads.
//
//   tokenize train  -o tok.json [--vocab-size N] [--min-count N] [--special TOK]...
//                   [--terms FILE] [--pre deepseek|gpt2] [--cjk keep|char|jieba]
//                   [--jieba-dict PATH] [--field NAME] FILE...
//   tokenize encode (--tokenizer tok.json | --gpt2 ENCODER.json VOCAB.bpe) [--no-special]
//                   [--bos TOK] [--eos TOK] [--cjk ...] [--field NAME] [-o OUT] [FILE...]
//   tokenize decode (--tokenizer tok.json | --gpt2 ...) [--skip-special] [--raw] [-o OUT] [FILE...]
//   common: --on-error stop|skip (default stop), --quiet
//
// Input files ending in .jsonl hold one JSON object per line (the text is in --field, default
// "text") or one JSON string per line; other files are text, one document per line. encode
// writes one JSON array of ids per input line; decode reads such arrays and writes one JSON
// string per line (or the raw bytes with --raw). A bad line is reported as FILE:LINE; with
// --on-error skip it becomes `null` in the output and the run goes on. Output is flushed
// block by block, so what was written before an error stays written.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "tessera/data/bpe_tokenizer.hpp"
#include "tessera/data/tokenizer_trainer.hpp"

namespace td = tessera::data;

namespace {

struct Args {
  std::string command;
  std::vector<std::string> files;
  std::string out = "-", tokenizer, gpt2_encoder, gpt2_merges, field = "text";
  std::string cjk = "keep", jieba_dict, pre = "deepseek", terms_file, bos, eos;
  std::vector<std::string> specials;
  std::size_t vocab_size = 32000, min_count = 2;
  bool no_special = false, skip_special = false, raw = false, quiet = false, skip_errors = false;
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "tokenize: " << why << "\n"
            << "usage: tokenize train -o tok.json [--vocab-size N] [--special TOK]... [--terms "
               "FILE] FILE...\n"
            << "       tokenize encode --tokenizer tok.json [--no-special] [--bos TOK] [--eos TOK] "
               "[FILE...]\n"
            << "       tokenize decode --tokenizer tok.json [--skip-special] [--raw] [FILE...]\n"
            << "(see the comment at the top of examples/tokenize.cpp for every option)\n";
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  if (argc < 2) usage("no command");
  a.command = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string s = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(s + " needs a value");
      return argv[++i];
    };
    if (s == "-o" || s == "--out")
      a.out = value();
    else if (s == "--tokenizer")
      a.tokenizer = value();
    else if (s == "--gpt2") {
      a.gpt2_encoder = value();
      a.gpt2_merges = value();
    } else if (s == "--field")
      a.field = value();
    else if (s == "--cjk")
      a.cjk = value();
    else if (s == "--jieba-dict")
      a.jieba_dict = value();
    else if (s == "--pre")
      a.pre = value();
    else if (s == "--terms")
      a.terms_file = value();
    else if (s == "--special")
      a.specials.push_back(value());
    else if (s == "--bos")
      a.bos = value();
    else if (s == "--eos")
      a.eos = value();
    else if (s == "--vocab-size")
      a.vocab_size = std::stoul(value());
    else if (s == "--min-count")
      a.min_count = std::stoul(value());
    else if (s == "--no-special")
      a.no_special = true;
    else if (s == "--skip-special")
      a.skip_special = true;
    else if (s == "--raw")
      a.raw = true;
    else if (s == "--quiet")
      a.quiet = true;
    else if (s == "--on-error") {
      const std::string v = value();
      if (v != "stop" && v != "skip") usage("--on-error takes stop or skip");
      a.skip_errors = v == "skip";
    } else if (!s.empty() && s[0] == '-' && s != "-")
      usage("unknown option " + s);
    else
      a.files.push_back(s);
  }
  if (a.files.empty() && a.command != "train") a.files.push_back("-");
  return a;
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// Calls f(file, line_no, line) for every line of every input file ("-" is stdin).
template <class F>
void for_each_line(const std::vector<std::string>& files, F&& f) {
  for (const auto& file : files) {
    std::ifstream in;
    if (file != "-") {
      in.open(file, std::ios::binary);
      TESSERA_CHECK(in, "cannot read ", file);
    }
    std::istream& is = file == "-" ? std::cin : in;
    std::string line;
    std::size_t no = 0;
    while (std::getline(is, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      f(file, ++no, line);
    }
  }
}

// The text of one input line: the line itself, or from JSONL the string or its --field.
std::string text_of(const Args& a, const std::string& file, const std::string& line) {
  if (!ends_with(file, ".jsonl")) return line;
  const auto j = nlohmann::json::parse(line);
  if (j.is_string()) return j.get<std::string>();
  TESSERA_CHECK(j.is_object() && j.contains(a.field) && j.at(a.field).is_string(),
                "expected a JSON string or an object with a string field \"", a.field, "\"");
  return j.at(a.field).get<std::string>();
}

struct Progress {
  bool quiet;
  std::size_t lines = 0, bytes = 0;
  void tick(std::size_t l, std::size_t b) {
    lines += l;
    bytes += b;
    if (!quiet)
      std::fprintf(stderr, "\r%zu lines, %.1f MB", lines, static_cast<double>(bytes) / 1e6);
  }
  void done() {
    if (!quiet) std::fprintf(stderr, "\n");
  }
};

template <class Seg>
int encode(const Args& a, const td::BasicBpeTokenizer<Seg>& tok, std::ostream& out) {
  const td::EncodeOptions opt{.special_tokens = !a.no_special};
  std::vector<td::TokenId> prefix, suffix;  // unknown names are an error, before any output
  if (!a.bos.empty()) prefix.push_back(tok.special_token_id(a.bos));
  if (!a.eos.empty()) suffix.push_back(tok.special_token_id(a.eos));
  std::vector<std::string> block;
  std::vector<char> bad;  // lines of the block that failed to parse
  std::size_t errors = 0, bytes = 0;
  Progress progress{a.quiet};
  auto flush = [&] {
    const auto ids = tok.encode_batch(block, opt);
    for (std::size_t i = 0; i < block.size(); ++i) {
      if (bad[i]) {
        out << "null\n";
        continue;
      }
      nlohmann::json arr = nlohmann::json::array();
      for (auto id : prefix) arr.push_back(id);
      for (auto id : ids[i]) arr.push_back(id);
      for (auto id : suffix) arr.push_back(id);
      out << arr.dump() << '\n';
    }
    out.flush();
    progress.tick(block.size(), bytes);
    block.clear();
    bad.clear();
    bytes = 0;
  };
  for_each_line(a.files, [&](const std::string& file, std::size_t no, const std::string& line) {
    try {
      block.push_back(text_of(a, file, line));
      bad.push_back(0);
    } catch (const std::exception& e) {
      ++errors;
      std::cerr << "\n" << file << ":" << no << ": " << e.what() << "\n";
      if (!a.skip_errors) {
        flush();  // keep what came before the bad line
        throw;
      }
      block.emplace_back();
      bad.push_back(1);
    }
    bytes += line.size() + 1;
    if (block.size() == 4096) flush();
  });
  flush();
  progress.done();
  return errors ? 1 : 0;
}

template <class Seg>
int decode(const Args& a, const td::BasicBpeTokenizer<Seg>& tok, std::ostream& out) {
  std::size_t errors = 0;
  Progress progress{a.quiet};
  for_each_line(a.files, [&](const std::string& file, std::size_t no, const std::string& line) {
    try {
      const auto j = nlohmann::json::parse(line);
      if (j.is_null()) {  // a line that encode skipped
        out << (a.raw ? "\n" : "null\n");
        return;
      }
      const std::string text = tok.decode(j.get<std::vector<td::TokenId>>(), a.skip_special);
      if (a.raw) {
        out << text << '\n';
      } else {
        out << nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
            << '\n';
      }
      if (no % 4096 == 0) progress.tick(4096, 0);
    } catch (const std::exception& e) {
      ++errors;
      std::cerr << "\n" << file << ":" << no << ": " << e.what() << "\n";
      if (!a.skip_errors) throw;
      out << (a.raw ? "\n" : "null\n");
    }
  });
  progress.done();
  return errors ? 1 : 0;
}

template <class Seg>
int train(const Args& a, Seg seg, std::ostream&) {
  TESSERA_CHECK(a.out != "-", "train needs -o tokenizer.json");
  TESSERA_CHECK(!a.files.empty(), "train needs at least one input file");
  td::BpeTrainerOptions opt;
  opt.vocab_size = a.vocab_size;
  opt.min_pair_count = a.min_count;
  opt.special_tokens = a.specials;
  if (a.pre == "gpt2")
    opt.pre_tokenizer = td::PreTokenizer::gpt2();
  else if (a.pre != "deepseek")
    usage("--pre takes deepseek or gpt2");
  if (!a.terms_file.empty()) {
    for_each_line({a.terms_file}, [&](const std::string&, std::size_t, const std::string& l) {
      if (!l.empty()) opt.terms.push_back(l);
    });
  }
  td::BasicBpeTrainer<Seg> trainer(opt, std::move(seg));
  std::vector<std::string> block;
  Progress progress{a.quiet};
  std::size_t bytes = 0;
  auto flush = [&] {
    trainer.add_texts(block);
    progress.tick(block.size(), bytes);
    block.clear();
    bytes = 0;
  };
  for_each_line(a.files, [&](const std::string& file, std::size_t no, const std::string& line) {
    try {
      block.push_back(text_of(a, file, line) + (ends_with(file, ".jsonl") ? "" : "\n"));
    } catch (const std::exception& e) {
      std::cerr << "\n" << file << ":" << no << ": " << e.what() << "\n";
      if (!a.skip_errors) throw;
    }
    bytes += line.size() + 1;
    if (block.size() == 65536) flush();
  });
  flush();
  progress.done();
  const auto tok = trainer.train();
  tok.save(a.out);
  const auto& st = trainer.stats();
  std::cerr << "trained " << a.out << ": " << tok.vocab_size() << " tokens, " << st.merges
            << " merges from " << st.distinct_words << " distinct words in " << st.bytes
            << " bytes\n";
  return 0;
}

template <class Seg>
int run(const Args& a, Seg seg) {
  std::ofstream file;
  if (a.out != "-" && a.command != "train") {
    file.open(a.out, std::ios::binary);
    TESSERA_CHECK(file, "cannot write ", a.out);
  }
  std::ostream& out = file.is_open() ? file : std::cout;
  if (a.command == "train") return train(a, std::move(seg), out);
  TESSERA_CHECK(!a.tokenizer.empty() || !a.gpt2_encoder.empty(),
                "give --tokenizer FILE or --gpt2 ENCODER VOCAB");
  const auto tok = a.tokenizer.empty()
                       ? td::BasicBpeTokenizer<Seg>::from_gpt2_files(a.gpt2_encoder, a.gpt2_merges,
                                                                     std::move(seg))
                       : td::BasicBpeTokenizer<Seg>::from_file(a.tokenizer, std::move(seg));
  if (a.command == "encode") return encode(a, tok, out);
  if (a.command == "decode") return decode(a, tok, out);
  usage("unknown command \"" + a.command + "\" (train, encode, decode)");
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  try {
    // The one place a runtime choice becomes a type.
    if (a.cjk == "keep") return run(a, td::KeepCjkRuns{});
    if (a.cjk == "char") return run(a, td::SplitCjkCharacters{});
    if (a.cjk == "jieba") {
      const auto dict = a.jieba_dict.empty() ? td::JiebaSegmenter::default_dictionary_path()
                                             : std::filesystem::path(a.jieba_dict);
      TESSERA_CHECK(!dict.empty(),
                    "--cjk jieba: no dictionary found; install python3-jieba or give --jieba-dict");
      return run(a, td::JiebaSegmenter(dict));
    }
    usage("--cjk takes keep, char or jieba (got \"" + a.cjk + "\")");
  } catch (const std::exception& e) {
    std::cerr << "tokenize: " << e.what() << "\n";
    return 1;
  }
}

// complete_r1 — continues a text with the R1 model that examples/train_r1 trained, streaming it
// token by token: the completion side of the flagship program.
//
// What you will learn:
//   * a checkpoint is one safetensors file of named weights; r1::load_checkpoint reads
//     train_r1's (bf16 under the default recipe) into an fp32 Decoder<R1Small>;
//   * the run directory also holds the BPE tokenizer train_r1 trained (tokenizer.json);
//   * infer::generate runs the prompt once, keeps every layer's keys and values in a paged cache
//     (here a variable-window, mixture-of-experts model: each 32-token block picks its window
//     when its first token arrives) and streams each new token through a callback;
//   * --quantized FILE decodes through weights written by quantize_model instead
//     (infer::QuantizedWeights: INT4 / FP8 / BF16 matrices multiplied by SIMD kernels).
//
// Run train_r1 first (scripts/demo.sh), then:
//   complete_r1 --prompt "In the beginning"
//   complete_r1 --prompt "床前明月光" --temperature 0.8 --top-k 40
//   complete_r1 --prompt "And God said" --quantized r1-int4-awq.safetensors --format int4-awq-64
// Options: --run-dir DIR (/tmp/tessera_train_r1), --max-tokens N (60), --temperature T (0.8),
// --top-k K (40), --top-p P (1), --seed S (1), --quantized FILE --format NAME.
#include <tessera/data/bpe_tokenizer.hpp>
#include <tessera/infer/generate.hpp>
#include <tessera/infer/quantized_weights.hpp>
#include <tessera/quant/model_quant.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "r1_config.hpp"

namespace ts = tessera;
namespace fs = std::filesystem;
using Model = ts::Decoder<r1::R1Small>;

namespace {

struct Options {
  std::string run_dir = (fs::temp_directory_path() / "tessera_train_r1").string();
  std::string prompt = "In the beginning", quantized, format;
  long max_tokens = 60;
  ts::infer::SamplingOptions sampling{.temperature = 0.8f, .top_k = 40, .seed = 1};
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "complete_r1: %s\nusage: complete_r1 [--run-dir DIR] [--prompt TEXT] [--max-tokens N]\n"
               "                   [--temperature T] [--top-k K] [--top-p P] [--seed S]\n"
               "                   [--quantized FILE --format bf16|fp8|fp8-block-128|int4-rtn-G|int4-awq-G]\n",
               why.c_str());
  std::exit(2);
}

// One token at a time from the cache: generate() with the model's own weights or through
// quantised ones. Each token's text is printed as soon as it is chosen.
// Byte-level tokens may end inside a UTF-8 character (a Chinese character is 3 bytes, often
// split over two tokens): print what is complete, hold back an unfinished tail for the next token.
class Utf8Printer {
 public:
  void push(const std::string& piece) {
    held_ += piece;
    std::size_t cut = held_.size();
    // Walk back over at most 3 continuation bytes to the last lead byte; keep it if its
    // sequence is not complete yet.
    for (std::size_t back = 1; back <= 4 && back <= held_.size(); ++back) {
      const auto c = static_cast<unsigned char>(held_[held_.size() - back]);
      if ((c & 0xC0) == 0x80) continue;  // continuation byte
      const std::size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
      if (need > back) cut = held_.size() - back;
      break;
    }
    std::cout << held_.substr(0, cut) << std::flush;
    held_.erase(0, cut);
  }
  ~Utf8Printer() { std::cout << held_ << std::flush; }  // whatever is left, as it is

 private:
  std::string held_;
};

template <class Weights>
void complete(Model& model, const Weights* weights, const std::vector<int32_t>& prompt,
              const ts::data::BpeTokenizer& tok, const Options& o) {
  Utf8Printer out;
  auto on_token = [&](int32_t id) {
    out.push(tok.decode(std::vector<ts::data::TokenId>{static_cast<ts::data::TokenId>(id)}));
    return true;
  };
  ts::infer::GenerateOptions g;
  g.max_new_tokens = o.max_tokens;
  g.sampling = o.sampling;
  if (weights) ts::infer::generate(model, *weights, prompt, g, on_token);
  else ts::infer::generate(model, prompt, g, on_token);
}

template <class Format>
void complete_quantized(Model& model, const std::vector<int32_t>& prompt,
                        const ts::data::BpeTokenizer& tok, const Options& o) {
  auto q = ts::quant::load_quantized<Format>(o.quantized, model);
  const ts::infer::QuantizedWeights weights(model, std::move(q));  // takes the matrices over
  std::fprintf(stderr, "decoding through %s weights (%.2f MB per token)\n", o.format.c_str(),
               static_cast<double>(weights.bytes()) / 1e6);
  std::cout << o.prompt << std::flush;
  complete(model, &weights, prompt, tok, o);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--run-dir") o.run_dir = val();
    else if (a == "--prompt") o.prompt = val();
    else if (a == "--max-tokens") o.max_tokens = std::stol(val());
    else if (a == "--temperature") o.sampling.temperature = std::stof(val());
    else if (a == "--top-k") o.sampling.top_k = std::stoi(val());
    else if (a == "--top-p") o.sampling.top_p = std::stof(val());
    else if (a == "--seed") o.sampling.seed = std::stoull(val());
    else if (a == "--quantized") o.quantized = val();
    else if (a == "--format") o.format = val();
    else usage("unknown argument '" + a + "'");
  }
  if (o.quantized.empty() != o.format.empty()) usage("--quantized and --format go together");
  try {
    const fs::path ckpt = r1::newest_checkpoint(o.run_dir);
    TESSERA_CHECK(!ckpt.empty(), "no checkpoint under ", o.run_dir,
                  "/checkpoints: run train_r1 first (scripts/demo.sh)");
    auto model = std::make_unique<Model>(ts::Seed{1});
    const std::string held = r1::load_checkpoint(*model, ckpt);
    const auto tok = ts::data::BpeTokenizer::from_file(fs::path(o.run_dir) / "tokenizer.json");
    std::vector<int32_t> prompt;
    for (auto id : tok.encode(o.prompt)) prompt.push_back(static_cast<int32_t>(id));
    TESSERA_CHECK(!prompt.empty(), "the prompt is empty");
    TESSERA_CHECK(static_cast<long>(prompt.size()) + o.max_tokens <= r1::R1Small::max_seq,
                  "prompt (", prompt.size(), " tokens) + --max-tokens ", o.max_tokens,
                  " exceed the model's context of ", r1::R1Small::max_seq);
    std::fprintf(stderr, "%s (%s weights), %zu prompt tokens\n", ckpt.string().c_str(), held.c_str(),
                 prompt.size());
    if (o.quantized.empty()) {
      std::cout << o.prompt << std::flush;
      complete<ts::infer::DenseWeights<Model>>(*model, nullptr, prompt, tok, o);
    } else if (o.format == "bf16") {
      complete_quantized<ts::quant::BF16Weights>(*model, prompt, tok, o);
    } else if (o.format == "fp8") {
      complete_quantized<ts::quant::FP8Weights>(*model, prompt, tok, o);
    } else if (o.format == "fp8-block-128") {
      complete_quantized<ts::quant::FP8BlockWeights<128>>(*model, prompt, tok, o);
    } else if (o.format == "int4-rtn-64") {
      complete_quantized<ts::quant::Int4RTN<64>>(*model, prompt, tok, o);
    } else if (o.format == "int4-awq-64") {
      complete_quantized<ts::quant::Int4AWQ<64>>(*model, prompt, tok, o);
    } else {
      usage("--format must be bf16, fp8, fp8-block-128, int4-rtn-64 or int4-awq-64 (what quantize_model wrote)");
    }
    std::cout << std::endl;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "complete_r1: %s\n", e.what());
    return 1;
  }
  return 0;
}

// quantize_model — converts a model checkpoint to quantised weights, using calibration text.
//
//   # the flagship model trained by examples/train_r1 (its run directory holds the tokenizer):
//   quantize_model --model r1
//                  --checkpoint /tmp/tessera_train_r1/checkpoints/step-00000300/model.safetensors
//                  --tokenizer /tmp/tessera_train_r1/tokenizer.json
//                  --calibration notes.txt --format int4-awq-64 --out r1-int4-awq.safetensors
//   # SmolLM2-135M-Instruct straight from its GGUF file (weights and tokenizer inside):
//   quantize_model --model smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf
//                  --calibration notes.txt --format fp8 --out smollm2-fp8.safetensors
// (one command each, written over several lines here).
//
// What happens, step by step:
//   1. the checkpoint is read into an fp32 model (bf16 checkpoints of a bf16-mixed run are
//      widened exactly);
//   2. the calibration text is tokenised and cut into windows; one forward over them records the
//      rows that each linear product multiplies (quant/model_quant.hpp: collect_calibration);
//   3. every linear weight (attention projections, FFN and expert matrices, the LM head) is
//      quantised to the format; AWQ searches its per-channel scales on those rows, q/k/v and
//      gate/up sharing one scale vector scored by their attention's / FFN's output;
//   4. the file is written (quant/model_quant.hpp: save_quantized lists its layout) and the
//      perplexity of the calibration text is printed for the original and the quantised
//      weights, a quick sanity check that the conversion kept the model working.
// Formats: bf16, fp8 (E4M3, a scale per output channel), fp8-block-128 (E4M3, a scale per 128
// weights of a row), int4-rtn-G and int4-awq-G with group
// G = 32, 64 or 128. docs/quantization.md explains them.
#include <tessera/io/gguf.hpp>
#include <tessera/io/gguf_llama.hpp>
#include <tessera/models/llama.hpp>
#include <tessera/quant/model_quant.hpp>
#include <tessera/tessera.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "r1_config.hpp"

namespace ts = tessera;
namespace q = tessera::quant;
namespace fs = std::filesystem;

namespace {

struct Options {
  std::string model, checkpoint, gguf, tokenizer, format = "int4-awq-128", out;
  std::vector<std::string> calibration;
  long windows = 8;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "quantize_model: %s\n"
               "usage: quantize_model --model r1 --checkpoint FILE.safetensors --tokenizer FILE.json\n"
               "                      | --model smollm2 --gguf FILE.gguf\n"
               "                      --calibration TEXT [--calibration TEXT ...] [--windows N]\n"
               "                      --format bf16|fp8|fp8-block-128|int4-rtn-G|int4-awq-G (G = 32, 64, 128)\n"
               "                      --out FILE.safetensors\n",
               why);
  std::exit(2);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in, "quantize_model: cannot read the calibration file '", path, "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Calibration windows (n, T) from the text's tokens; fewer when the text is short.
ts::Tensor<int32_t> windows_of(const std::vector<int32_t>& ids, int64_t T, int64_t want) {
  const int64_t n = std::min<int64_t>(want, static_cast<int64_t>(ids.size()) / T);
  TESSERA_CHECK(n >= 1, "quantize_model: the calibration text has ", ids.size(),
                " tokens, fewer than one window of ", T);
  ts::Tensor<int32_t> w(ts::Shape{n, T});
  std::copy(ids.begin(), ids.begin() + n * T, w.data());
  return w;
}

template <class Format, class Config>
void convert(ts::Decoder<Config>& model, const std::vector<int32_t>& ids, int64_t T,
             const Options& o) {
  using clock = std::chrono::steady_clock;
  const ts::Tensor<int32_t> cal_tokens = windows_of(ids, T, o.windows);
  const std::span<const int32_t> flat(cal_tokens.data(), static_cast<size_t>(cal_tokens.numel()));
  const double ppl_before = q::perplexity(model, flat, T - 1);

  auto t0 = clock::now();
  const q::CalibrationSet cal = q::collect_calibration(model, cal_tokens, 512);
  std::printf("2. calibration: %lld windows of %lld tokens; rows recorded for %zu matrices\n",
              static_cast<long long>(cal_tokens.dim(0)), static_cast<long long>(T),
              cal.inputs.size());
  q::AwqReport report;
  const q::QuantizedLinears<Format> ql = q::quantize_linears<Format>(model, &cal, {}, &report);
  int64_t elements = 0;
  for (const auto& [name, m] : ql.matrices) elements += m.rows() * m.cols();
  std::printf("3. quantised %zu matrices (%lld weights) to %s: %.1f MB -> %.1f MB (%.2f bits per "
              "weight) in %.1f s\n",
              ql.matrices.size(), static_cast<long long>(elements), o.format.c_str(),
              4.0 * static_cast<double>(elements) / 1e6, static_cast<double>(ql.bytes()) / 1e6,
              8.0 * static_cast<double>(ql.bytes()) / static_cast<double>(elements),
              std::chrono::duration<double>(clock::now() - t0).count());
  if constexpr (q::is_awq_v<Format>) {
    double sum = 0;
    int zero = 0;
    for (const auto& [name, m] : ql.matrices) {
      sum += m.awq_alpha();
      zero += m.awq_alpha() == 0.0f;
    }
    std::printf("   AWQ: mean exponent alpha %.2f; %d of %zu matrices kept plain RTN (alpha 0)\n",
                sum / static_cast<double>(ql.matrices.size()), zero, ql.matrices.size());
    // The groups that share one scale vector (q/k/v, gate/up, and the head alone), each scored by
    // its module's output on the calibration tokens: the mean of error / RTN's error.
    double ratio = 0;
    for (const auto& g : report.groups) ratio += g.rtn_error > 0 ? g.error / g.rtn_error : 1.0;
    if (!report.groups.empty())
      std::printf("   AWQ: %zu groups scored by their module's output; their error is %.0f%% of "
                  "RTN's on average\n",
                  report.groups.size(), 100.0 * ratio / static_cast<double>(report.groups.size()));
  }
  q::save_quantized(o.out, model, ql);
  std::printf("4. wrote %s (%.1f MB)\n", o.out.c_str(),
              static_cast<double>(fs::file_size(o.out)) / 1e6);

  // Read back what was written, as a user of the file would, and score the calibration text.
  auto check = std::make_unique<ts::Decoder<Config>>(ts::Seed{1});
  (void)q::load_quantized<Format>(o.out, *check);
  if constexpr (ts::Decoder<Config>::Resolved::tie_embeddings) {
    // The file keeps the tied table unquantised for the lookup; score with the quantised head.
    q::load_effective_weights(*check, ql);
  }
  const double ppl_after = q::perplexity(*check, flat, T - 1);
  std::printf("   calibration-text perplexity: original %.3f, quantised (read back from the file) "
              "%.3f\n",
              ppl_before, ppl_after);
}

// Runs `f.template operator()<Format>()` for the format named on the command line.
template <class F>
void with_format(const std::string& name, F&& f) {
  if (name == "bf16") return f.template operator()<q::BF16Weights>();
  if (name == "fp8") return f.template operator()<q::FP8Weights>();
  if (name == "fp8-block-128") return f.template operator()<q::FP8BlockWeights<128>>();
  if (name == "int4-rtn-32") return f.template operator()<q::Int4RTN<32>>();
  if (name == "int4-rtn-64") return f.template operator()<q::Int4RTN<64>>();
  if (name == "int4-rtn-128") return f.template operator()<q::Int4RTN<128>>();
  if (name == "int4-awq-32") return f.template operator()<q::Int4AWQ<32>>();
  if (name == "int4-awq-64") return f.template operator()<q::Int4AWQ<64>>();
  if (name == "int4-awq-128") return f.template operator()<q::Int4AWQ<128>>();
  usage(("unknown format '" + name + "'").c_str());
}

std::vector<int32_t> to_ids(const std::vector<ts::data::TokenId>& v) {
  return std::vector<int32_t>(v.begin(), v.end());
}

void run_r1(const Options& o) {
  using r1::R1Small;
  if (o.checkpoint.empty() || o.tokenizer.empty()) usage("--model r1 needs --checkpoint and --tokenizer");
  auto model = std::make_unique<ts::Decoder<R1Small>>(ts::Seed{1});
  const std::string held = r1::load_checkpoint(*model, o.checkpoint);
  std::printf("1. read %s (%s)\n", o.checkpoint.c_str(),
              held == "fp32" ? "fp32" : "bf16, widened to fp32");
  const auto tok = ts::data::BpeTokenizer::from_file(o.tokenizer);
  std::string text;
  for (const auto& c : o.calibration) text += read_file(c);
  const auto ids = to_ids(tok.encode(text));
  with_format(o.format, [&]<class Format>() { convert<Format>(*model, ids, 129, o); });
}

void run_smollm2(const Options& o) {
  if (o.gguf.empty()) usage("--model smollm2 needs --gguf");
  const ts::io::GgufFile file = ts::io::GgufFile::open(o.gguf);
  const auto tok = ts::io::read_gguf_tokenizer(file);
  auto model = std::make_unique<ts::Decoder<ts::models::SmolLM2_135M>>(ts::Seed{1});
  ts::models::load_gguf(*model, file);
  std::printf("1. read %s (dequantised to fp32)\n", o.gguf.c_str());
  std::string text;
  for (const auto& c : o.calibration) text += read_file(c);
  const auto ids = to_ids(tok.tokenizer.encode(text));
  with_format(o.format, [&]<class Format>() { convert<Format>(*model, ids, 257, o); });
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) usage((a + " needs a value").c_str());
      return argv[++i];
    };
    if (a == "--model") o.model = val();
    else if (a == "--checkpoint") o.checkpoint = val();
    else if (a == "--gguf") o.gguf = val();
    else if (a == "--tokenizer") o.tokenizer = val();
    else if (a == "--calibration") o.calibration.push_back(val());
    else if (a == "--windows") o.windows = std::stol(val());
    else if (a == "--format") o.format = val();
    else if (a == "--out") o.out = val();
    else usage(("unknown argument '" + a + "'").c_str());
  }
  if (o.out.empty()) usage("--out is required");
  if (o.calibration.empty()) usage("--calibration is required (AWQ's scales are searched on it)");
  if (o.windows < 1) usage("--windows must be >= 1");
  try {
    if (o.model == "r1") run_r1(o);
    else if (o.model == "smollm2") run_smollm2(o);
    else usage("--model must be r1 or smollm2");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quantize_model: %s\n", e.what());
    return 1;
  }
  return 0;
}

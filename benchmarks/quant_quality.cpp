// quant_quality — what weight quantisation costs in quality, on real text: perplexity of
// held-out English (King James Bible, fortunes) with the weights in FP32, BF16, FP8 (E4M3, a
// scale per output channel, and a scale per block of 128 weights of a row), INT4
// round-to-nearest and INT4 AWQ (both group 64 unless --group names other sizes; a K that is not
// a multiple of the group or block is padded, quant/model_quant.hpp), for
//   * SmolLM2-135M-Instruct (its shipped Q4_1 weights dequantised to FP32 are the reference), and
//   * the flagship R1 model of examples/train_r1 (when a run directory is given).
// Beside perplexity, each row reports how closely the quantised model tracks the fp32 one on the
// same windows: the mean KL(p_fp32 || p_quantised) per predicted token and the share of tokens
// whose most likely next token is unchanged (kl_to_reference says why both are shown).
// The quantised weights are applied as their effective values (dequantised), so the table
// measures the formats' rounding alone; the SIMD kernels that multiply by them directly are
// checked against that same dequantised reference in tests/quant.
//
// Calibration (AWQ only) uses other text than the evaluation: Genesis 1-4 and the fortunes file
// `computers`; evaluation: Matthew 5-7 and the fortunes files `wisdom` and `literature`.
//
//   build/release/benchmarks/quant_quality [--tokens N] [--r1-run DIR] [--no-smollm2] [--group 32,64,128]
//                                          [--calibration-windows 8] [--calibration-rows N]
// docs/quantization.md records the table.
#include <tessera/data/clean/normalize.hpp>
#include <tessera/io/gguf.hpp>
#include <tessera/io/gguf_llama.hpp>
#include <tessera/models/llama.hpp>
#include <tessera/quant/model_quant.hpp>
#include <tessera/tessera.hpp>
#include <tessera/train/token_data.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <regex>
#include <string>
#include <vector>

#include "../examples/r1_config.hpp"
#include "../tests/common/smollm2.hpp"

namespace ts = tessera;
namespace q = tessera::quant;
namespace fs = std::filesystem;

namespace {

// Calibration windows per model and rows kept per matrix (0: the model's default).
int64_t g_calibration_windows = 8, g_calibration_rows = 0;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// `bible` output for a range, verse references dropped.
std::string bible(const char* range) {
  const std::string cmd = std::string("bible -l10000 '") + range + "' 2>/dev/null";
  FILE* p = ::popen(cmd.c_str(), "r");
  TESSERA_CHECK(p, "quant_quality: cannot run `bible` (apt-get install bible-kjv)");
  std::string out;
  char buf[1 << 14];
  while (std::fgets(buf, sizeof buf, p)) {
    std::string line(buf);
    // "Gen1:1: In the beginning ..." -> the text after the reference.
    const auto colon = line.find(": ");
    if (colon != std::string::npos && colon < 16) line = line.substr(colon + 2);
    out += line;
  }
  ::pclose(p);
  TESSERA_CHECK(!out.empty(), "quant_quality: `bible '", range, "'` printed nothing (apt-get install bible-kjv)");
  return out;
}

// A fortunes file's records, separators and colour escapes removed, one blank line between.
std::string fortunes(const char* name) {
  const fs::path p = fs::path("/usr/share/games/fortunes") / name;
  std::ifstream in(p, std::ios::binary);
  TESSERA_CHECK(in, "quant_quality: cannot read ", p.string(), " (apt-get install fortunes)");
  std::string line, out;
  while (std::getline(in, line)) out += line == "%" ? std::string("\n") : line + "\n";
  ts::data::clean::strip_ansi_escapes(out);
  return out;
}

struct Texts {
  std::vector<int32_t> calibration, kjv, fortunes;
  const char* kjv_name = "KJV";
  const char* fortunes_name = "fortunes";
};

// The reference weights of every linear product, to restore between variants.
template <class Config>
std::map<std::string, ts::Tensor<float>> snapshot(ts::Decoder<Config>& model) {
  std::map<std::string, ts::Tensor<float>> s;
  model.visit_parameters([&](std::string_view name, auto& p) {
    if (q::is_linear_weight(name)) s.emplace(std::string(name), p.value.clone());
  });
  s.emplace(std::string(q::kHeadName), model.lm_head_weight().value.clone());
  return s;
}
template <class Config>
void restore(ts::Decoder<Config>& model, const std::map<std::string, ts::Tensor<float>>& s) {
  model.visit_parameters([&](std::string_view name, auto& p) {
    if (auto it = s.find(std::string(name)); it != s.end()) p.value = it->second.clone();
  });
  model.lm_head_weight().value = s.at(std::string(q::kHeadName)).clone();
}

struct Row {
  std::string format;
  double bits_per_weight, ppl_kjv, ppl_fortunes, seconds;
  double kl = 0, top1 = 1;  // against the fp32 model, both texts
  std::vector<double> window_nll;  // mean loss per token of each window, both texts
};

// How closely a quantised model tracks the fp32 one on a text: the mean over predicted tokens of
// KL(p_fp32 || p_quantised) and the fraction of tokens whose most likely next token is the same,
// in the windows perplexity() uses. `ref` holds the fp32 log-probabilities: filled when empty.
// Perplexity differences between formats that cost well under 1% mix the systematic loss (this
// KL, to second order) with a first-order term that depends on which tokens the text holds and
// is as likely to help as to hurt; the KL is that systematic part alone.
template <class Config>
std::pair<double, int64_t> kl_to_reference(const ts::Decoder<Config>& model,
                                           const std::vector<int32_t>& tokens, int64_t window,
                                           std::vector<float>& ref, int64_t& same_top1,
                                           std::vector<double>& window_nll) {
  using M = ts::Decoder<Config>;
  constexpr int64_t V = M::Resolved::vocab;
  const int64_t windows = (static_cast<int64_t>(tokens.size()) - 1) / window;
  const bool fill = ref.empty();
  if (fill) ref.resize(static_cast<size_t>(windows * window * V));
  double kl = 0;
  int64_t count = 0;
  for (int64_t w0 = 0; w0 < windows; w0 += 4) {
    const int64_t b = std::min<int64_t>(4, windows - w0);
    ts::Tensor<int32_t> x(ts::Shape{b, window});
    for (int64_t i = 0; i < b * window; ++i) x.data()[i] = tokens[static_cast<size_t>(w0 * window + i)];
    typename M::Saved saved;
    const ts::Tensor<float> logits = model.forward(x, saved);
    for (int64_t r = 0; r < b * window; ++r, ++count) {
      const float* l = logits.data() + r * V;
      float* p = ref.data() + (w0 * window + r) * V;
      double m = l[0], z = 0;
      for (int64_t v = 1; v < V; ++v) m = std::max(m, static_cast<double>(l[v]));
      for (int64_t v = 0; v < V; ++v) z += std::exp(static_cast<double>(l[v]) - m);
      const double lz = m + std::log(z);
      if (r % window == 0) window_nll.push_back(0.0);
      const int32_t target = tokens[static_cast<size_t>(w0 * window + r + 1)];
      window_nll.back() += (lz - static_cast<double>(l[target])) / static_cast<double>(window);
      if (fill) {
        for (int64_t v = 0; v < V; ++v) p[v] = static_cast<float>(static_cast<double>(l[v]) - lz);
        ++same_top1;  // the reference itself
        continue;
      }
      double k = 0;
      int64_t best_p = 0, best_q = 0;
      for (int64_t v = 0; v < V; ++v) {
        const double lp = p[v], lq = static_cast<double>(l[v]) - lz;
        k += std::exp(lp) * (lp - lq);
        if (p[v] > p[best_p]) best_p = v;
        if (l[v] > l[best_q]) best_q = v;
      }
      kl += k;
      same_top1 += best_p == best_q;
    }
  }
  return {kl, count};
}

// The fp32 model's log-probabilities on the two texts (kl_to_reference).
std::vector<float> g_ref_kjv, g_ref_fortunes;

template <class Format, class Config>
Row measure(const char* label, ts::Decoder<Config>& model, const q::CalibrationSet& cal,
            const Texts& t, int64_t window, const std::map<std::string, ts::Tensor<float>>& ref) {
  const auto t0 = std::chrono::steady_clock::now();
  restore(model, ref);
  int64_t elements = 0;
  for (const auto& [name, w] : ref) elements += w.numel();
  double bits = 32.0;
  if constexpr (!std::is_same_v<Format, void>) {
    const q::QuantizedLinears<Format> ql = q::quantize_linears<Format>(model, &cal);
    bits = 8.0 * static_cast<double>(ql.bytes()) / static_cast<double>(elements);
    q::load_effective_weights(model, ql);
  }
  Row r{label, bits, 0.0, 0.0, 0.0, 0.0, 1.0, {}};
  int64_t same = 0;
  // Perplexity from the same forward passes as the KL: the windows perplexity() uses (whole
  // windows, every position predicted), all of the same length, so exp of the mean window loss.
  auto ppl = [&](size_t from) {
    const double sum = std::accumulate(r.window_nll.begin() + static_cast<std::ptrdiff_t>(from), r.window_nll.end(), 0.0);
    return std::exp(sum / static_cast<double>(r.window_nll.size() - from));
  };
  const auto [kl1, n1] = kl_to_reference(model, t.kjv, window, g_ref_kjv, same, r.window_nll);
  r.ppl_kjv = ppl(0);
  const size_t kjv_windows = r.window_nll.size();
  const auto [kl2, n2] = kl_to_reference(model, t.fortunes, window, g_ref_fortunes, same, r.window_nll);
  r.ppl_fortunes = ppl(kjv_windows);
  r.kl = (kl1 + kl2) / static_cast<double>(n1 + n2);
  r.top1 = static_cast<double>(same) / static_cast<double>(n1 + n2);
  r.seconds = seconds_since(t0);
  std::printf("  %-16s %6.2f bits/weight   %s %8.3f   %s %8.3f   KL to fp32 %.5f, same top-1 %.2f%%"
              "   (%.0f s)\n",
              label, r.bits_per_weight, t.kjv_name, r.ppl_kjv, t.fortunes_name, r.ppl_fortunes,
              r.kl, 100.0 * r.top1, r.seconds);
  std::fflush(stdout);
  return r;
}

// AWQ against RTN at one group size. Perplexity differences this small are noisy, so beside the
// share of RTN's perplexity loss that AWQ removes it prints the paired difference in mean loss
// per token (AWQ - RTN) over the evaluation windows with its standard error: the same windows
// through both models, so what varies between windows is the text, and the error says whether
// the sign of the difference could be the text's doing.
void compare_awq_to_rtn(int group, const Row& fp32, const Row& rtn, const Row& awq) {
  const double base = fp32.ppl_kjv + fp32.ppl_fortunes;
  const double rtn_loss = rtn.ppl_kjv + rtn.ppl_fortunes - base;
  const double awq_loss = awq.ppl_kjv + awq.ppl_fortunes - base;
  const size_t n = rtn.window_nll.size();
  TESSERA_CHECK(n >= 2 && awq.window_nll.size() == n && fp32.window_nll.size() == n,
                "quant_quality: the rows were measured on different windows");
  double mean = 0, mean_rtn = 0;
  for (size_t w = 0; w < n; ++w) {
    mean += awq.window_nll[w] - rtn.window_nll[w];
    mean_rtn += rtn.window_nll[w] - fp32.window_nll[w];
  }
  mean /= static_cast<double>(n);
  mean_rtn /= static_cast<double>(n);
  double var = 0;
  for (size_t w = 0; w < n; ++w) {
    const double d = awq.window_nll[w] - rtn.window_nll[w] - mean;
    var += d * d;
  }
  const double se = std::sqrt(var / static_cast<double>(n - 1) / static_cast<double>(n));
  std::printf("  group %d, AWQ vs RTN: perplexity increase over fp32 (sum of both texts) %.3f vs %.3f: "
              "AWQ removes %.0f%% of RTN's loss; KL to fp32 %.5f vs %.5f (%.0f%% lower)\n"
              "    mean loss per token, AWQ - RTN: %+.5f +- %.5f nats (standard error over %zu "
              "windows; RTN - fp32: %+.5f)\n",
              group, awq_loss, rtn_loss, rtn_loss > 0 ? 100.0 * (rtn_loss - awq_loss) / rtn_loss : 0.0,
              awq.kl, rtn.kl, 100.0 * (1.0 - awq.kl / rtn.kl), mean, se, n, mean_rtn);
  std::fflush(stdout);
}

template <class Config>
std::vector<Row> table(ts::Decoder<Config>& model, const Texts& t, int64_t window,
                       int64_t calibration_rows, const std::vector<int>& groups) {
  // Calibration: up to 8 windows of the calibration text through the reference model.
  const int64_t cal_windows = std::min<int64_t>(g_calibration_windows, static_cast<int64_t>(t.calibration.size()) / window);
  TESSERA_CHECK(cal_windows >= 1, "quant_quality: calibration text too short");
  ts::Tensor<int32_t> cal_tokens(ts::Shape{cal_windows, window});
  std::copy(t.calibration.begin(), t.calibration.begin() + cal_windows * window, cal_tokens.data());
  const q::CalibrationSet cal = q::collect_calibration(model, cal_tokens, calibration_rows);
  const auto ref = snapshot(model);
  g_ref_kjv.clear();
  g_ref_fortunes.clear();
  std::vector<Row> rows;
  rows.push_back(measure<void>("fp32 (reference)", model, cal, t, window, ref));
  rows.push_back(measure<q::BF16Weights>("bf16", model, cal, t, window, ref));
  rows.push_back(measure<q::FP8Weights>("fp8-e4m3", model, cal, t, window, ref));
  rows.push_back(measure<q::FP8BlockWeights<128>>("fp8-e4m3-b128", model, cal, t, window, ref));
  for (const int group : groups) {
    const size_t at = rows.size();
    if (group == 128) {
      rows.push_back(measure<q::Int4RTN<128>>("int4-rtn-g128", model, cal, t, window, ref));
      rows.push_back(measure<q::Int4AWQ<128>>("int4-awq-g128", model, cal, t, window, ref));
    } else if (group == 32) {
      rows.push_back(measure<q::Int4RTN<32>>("int4-rtn-g32", model, cal, t, window, ref));
      rows.push_back(measure<q::Int4AWQ<32>>("int4-awq-g32", model, cal, t, window, ref));
    } else {
      rows.push_back(measure<q::Int4RTN<64>>("int4-rtn-g64", model, cal, t, window, ref));
      rows.push_back(measure<q::Int4AWQ<64>>("int4-awq-g64", model, cal, t, window, ref));
    }
    compare_awq_to_rtn(group, rows[0], rows[at], rows[at + 1]);
  }
  restore(model, ref);
  return rows;
}

std::vector<int32_t> first(const std::vector<int32_t>& v, size_t n) {
  return {v.begin(), v.begin() + static_cast<std::ptrdiff_t>(std::min(n, v.size()))};
}

template <class Tok>
std::vector<int32_t> encode(const Tok& tok, const std::string& text) {
  std::vector<int32_t> out;
  for (auto id : tok.encode(text)) out.push_back(static_cast<int32_t>(id));
  return out;
}

void smollm2(size_t tokens, const std::vector<int>& groups) {
  const fs::path path = ts::test::smollm2_gguf();
  if (path.empty()) return;
  std::printf("\nSmolLM2-135M-Instruct (%s), weights dequantised from Q4_1 to fp32 = reference\n",
              path.filename().string().c_str());
  const ts::io::GgufFile file = ts::io::GgufFile::open(path);
  const auto tok = ts::io::read_gguf_tokenizer(file);
  auto model = std::make_unique<ts::Decoder<ts::models::SmolLM2_135M>>(ts::Seed{1});
  ts::models::load_gguf(*model, file);
  Texts t;
  t.calibration = encode(tok.tokenizer, bible("Gen1:1-Gen4:26") + fortunes("computers"));
  t.kjv = first(encode(tok.tokenizer, bible("Matt5:1-Matt7:29")), tokens);
  t.fortunes = first(encode(tok.tokenizer, fortunes("wisdom") + fortunes("literature")), tokens);
  std::printf("  evaluation: %zu KJV tokens (Matthew 5-7), %zu fortunes tokens; windows of 256\n",
              t.kjv.size(), t.fortunes.size());
  // 128 calibration rows per matrix: AWQ's search costs rows x weights x 20 multiply-adds.
  table(*model, t, 256, g_calibration_rows > 0 ? g_calibration_rows : 128, groups);
}

// The flagship model from a train_r1 run directory: newest checkpoint, its tokenizer shards.
void flagship(const fs::path& run, const std::vector<int>& groups) {
  using namespace r1;
  std::printf("\nFlagship R1 model (examples/train_r1), run directory %s\n", run.string().c_str());
  const fs::path newest = r1::newest_checkpoint(run);
  TESSERA_CHECK(!newest.empty(), "quant_quality: no checkpoint under ", (run / "checkpoints").string());
  auto fp32 = std::make_unique<ts::Decoder<R1Small>>(ts::Seed{1});
  r1::load_checkpoint(*fp32, newest);
  const ts::train::TokenShard train = ts::train::TokenShard::open(run / "train.tok");
  const ts::train::TokenShard val = ts::train::TokenShard::open(run / "val.tok");
  Texts t;
  // Calibration: 8 windows spread evenly over the training shard, which lists its sources one
  // after another (Chinese poems first, the Bible last): a calibration set from one source
  // tunes AWQ's scales to that source's activations only.
  const uint64_t cal_windows = static_cast<uint64_t>(g_calibration_windows);
  for (uint64_t w = 0; w < cal_windows; ++w) {
    const uint64_t at = w * (train.size() - 129) / cal_windows;
    for (uint64_t i = at; i < at + 128; ++i) t.calibration.push_back(static_cast<int32_t>(train[i]));
  }
  // The validation split holds every 20th document of train_r1's corpus in the corpus's order:
  // Chinese poems and fortunes, then English fortunes, then the King James Bible one chapter per
  // document (its first line a heading such as "1 Samuel 3"). The English documents are the
  // held-out text evaluated here, as for SmolLM2: the Bible chapters, and the English fortunes.
  const auto tok = ts::data::BpeTokenizer::from_file(run / "tokenizer.json");
  const uint32_t eot = tok.special_token_id("<|endoftext|>");
  std::vector<std::vector<int32_t>> docs(1);
  for (uint64_t i = 0; i < val.size(); ++i) {
    docs.back().push_back(static_cast<int32_t>(val[i]));
    if (val[i] == eot) docs.emplace_back();
  }
  if (docs.back().empty()) docs.pop_back();
  auto text_of = [&](const std::vector<int32_t>& d) {
    std::vector<uint32_t> ids(d.begin(), d.end());
    return tok.decode(ids, /*skip_special=*/true);
  };
  const std::regex chapter_heading("([1-3] )?[A-Z][a-z]+( of [A-Z][a-z]+)? [0-9]+\n[^]*");
  size_t bible_from = docs.size();  // the trailing run of chapters
  while (bible_from > 0 && std::regex_match(text_of(docs[bible_from - 1]), chapter_heading)) --bible_from;
  size_t chinese = 0;
  for (size_t d = 0; d < bible_from; ++d) {
    const std::string s = text_of(docs[d]);
    const auto wide = std::count_if(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) >= 0x80; });
    if (4 * static_cast<size_t>(wide) > s.size()) {  // CJK text is 3 bytes >= 0x80 per character
      ++chinese;
      continue;
    }
    t.fortunes.insert(t.fortunes.end(), docs[d].begin(), docs[d].end());
  }
  for (size_t d = bible_from; d < docs.size(); ++d) t.kjv.insert(t.kjv.end(), docs[d].begin(), docs[d].end());
  TESSERA_CHECK(t.kjv.size() > 1000 && t.fortunes.size() > 1000, "quant_quality: the validation split of ",
                run.string(), " holds ", t.kjv.size(), " Bible and ", t.fortunes.size(),
                " English fortune tokens; a train_r1 run over all three packages is needed");
  t.kjv_name = "KJV (held out)";
  t.fortunes_name = "fortunes (held out)";
  std::printf("  checkpoint %s; evaluation: the validation split's English documents, %zu Bible chapters "
              "(%zu tokens) and %zu fortunes (%zu tokens; its %zu Chinese documents are left out); "
              "windows of 128\n",
              newest.parent_path().filename().string().c_str(), docs.size() - bible_from, t.kjv.size(),
              bible_from - chinese, t.fortunes.size(), chinese);
  table(*fp32, t, 128, g_calibration_rows > 0 ? g_calibration_rows : 1024, groups);
}

}  // namespace

int main(int argc, char** argv) {
  size_t tokens = 4096;
  std::string r1_run;
  bool run_smollm2 = true;
  std::vector<int> groups{64};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "quant_quality: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--tokens") tokens = static_cast<size_t>(std::stoul(val()));
    else if (a == "--r1-run") r1_run = val();
    else if (a == "--no-smollm2") run_smollm2 = false;
    else if (a == "--group") {  // one size or a list: 32,64,128
      groups.clear();
      const std::string list = val();
      for (size_t at = 0; at < list.size();) {
        const size_t comma = std::min(list.find(',', at), list.size());
        const std::string g = list.substr(at, comma - at);
        if (g != "32" && g != "64" && g != "128") {
          std::fprintf(stderr, "quant_quality: --group takes 32, 64 or 128 or a list of them (32,64,128), not '%s'\n", g.c_str());
          return 2;
        }
        groups.push_back(std::stoi(g));
        at = comma + 1;
      }
    }
    else if (a == "--calibration-windows") g_calibration_windows = std::stol(val());
    else if (a == "--calibration-rows") g_calibration_rows = std::stol(val());
    else {
      std::fprintf(stderr, "usage: quant_quality [--tokens N] [--r1-run DIR] [--no-smollm2] [--group 32|64|128|32,64,128]\n"
                   "                     [--calibration-windows 8] [--calibration-rows N]\n");
      return 2;
    }
  }
  try {
    if (run_smollm2) smollm2(tokens, groups);
    if (!r1_run.empty()) flagship(r1_run, groups);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quant_quality: %s\n", e.what());
    return 1;
  }
  return 0;
}

// benchmarks/train_bench.cpp — training throughput of the flagship model of examples/train_r1.cpp,
// tessera next to the same decoder written in LibTorch 1.13, and what each activation recompute
// policy costs in time and saves in memory.
//
// What it answers (issue 4): tokens/s of one training step — forward, backward, AdamW update
// and the aux-loss-free bias update — of R1Small (vocab 4096, d_model 128, 4 layers, 4 heads /
// 2 kv heads, the first block dense, then 8 experts in 4 groups, top-2 groups, top-2 experts,
// one shared expert, BiasBalance) at train_r1's batch 8 x 128 tokens, in float, at 1 and 2
// threads; and, per recompute policy (StoreAll, Selective, RecomputeBlock), the step time and
// the peak bytes of live tensors the step adds (core/memory.hpp), beyond the parameters,
// gradients and AdamW moments.
//
// The LibTorch side (torch_side::decoder_train_f32) cannot express VariableWindow with its
// learned gate: its attention is matmul + masked softmax over every (query, key) pair, so any
// window costs it full causal attention. The table therefore has two tessera rows for the
// comparison: the flagship (VariableWindow<Sizes<32, 64, kFull>, LearnedSelector, 32>) and the
// same model under CausalFull, the window LibTorch runs; the ratio is quoted against both. Both
// sides start from the same weights (tessera's, copied) and train on the same batch; the first
// step's loss of tessera CausalFull and of LibTorch are printed side by side as the check that
// they are the same model. train_r1 itself trains in bf16-mixed by default; this compares
// float, the precision both sides have.
//
// Timing: per thread count a child process (oneDNN and OpenBLAS fix their threads when first
// used) with OMP_NUM_THREADS / OPENBLAS_NUM_THREADS set and OMP_WAIT_POLICY=passive (unless
// set). Each variant keeps its model and optimizer, runs two untimed warm-up steps, then
// --steps timed steps, the variants alternating step by step so a burst of outside load hits
// all alike. Median (minimum) per variant.
//
// Usage: train_bench [--threads 1,2] [--steps 6] [--no-torch]
//   OPENBLAS_CORETYPE=Cooperlake train_bench    (LibTorch's OpenBLAS then uses its AVX-512
//                                                sgemm kernels; docs/performance.md)
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "harness.hpp"
#include "machine.hpp"
#include "tessera/core/cpu_features.hpp"
#include "tessera/core/memory.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/train/optimizer.hpp"
#include "torch_side.hpp"
#include "../examples/r1_config.hpp"

#if defined(TESSERA_HAVE_OPENBLAS)
#include <cblas.h>
#endif

namespace {

namespace ts = tessera;
namespace tr = tessera::train;
using bench::cpu_model;
using bench::load_average;
using bench::shell_quote;

constexpr uint64_t kSeed = 20261129;
constexpr int64_t kBatch = 8, kSeq = 128;  // train_r1's defaults
constexpr double kLr = 1e-3;

// examples/train_r1.cpp's R1Small, as it trains.
using r1::R1Small;
template <class Policy>
struct R1With : R1Small {
  using Recompute = Policy;
};
struct R1Full : R1Small {
  using Window = ts::CausalFull;
};

struct Options {
  std::vector<int> threads{1, 2};
  int steps = 6;
  bool torch = true;
  bool child = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "train_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--threads") {
      o.threads.clear();
      const std::string v = val();
      size_t p = 0;
      while (p < v.size()) {
        const size_t q = v.find(',', p);
        o.threads.push_back(std::stoi(v.substr(p, q - p)));
        p = q == std::string::npos ? v.size() : q + 1;
      }
    } else if (a == "--steps") {
      o.steps = std::max(1, std::stoi(val()));
    } else if (a == "--no-torch") {
      o.torch = false;
    } else if (a == "--child") {
      o.child = true;
    } else {
      std::fprintf(stderr, "usage: train_bench [--threads 1,2] [--steps 6] [--no-torch]\n");
      std::exit(2);
    }
  }
  return o;
}

// One side of the table: a training step, and what it measured.
struct Variant {
  std::string name;
  std::function<double()> step;  // returns the step's loss
  std::vector<double> seconds;
  double first_loss = 0;
  int64_t step_peak = 0;    // the most a step added on top of them
};

ts::Tensor<int32_t> batch_tokens() {
  ts::Philox rng(ts::Seed{kSeed}, 7);
  auto seq = ts::Tensor<int32_t>::empty({kBatch, kSeq + 1});
  for (int64_t i = 0; i < seq.numel(); ++i)
    seq.data()[i] = static_cast<int32_t>(rng.next_u32() % R1Small::vocab);
  return seq;
}

template <class Config>
struct TesseraSide {
  using Model = ts::Decoder<Config>;
  Model model{ts::Seed{kSeed}};
  tr::AdamW<float> opt{tr::AdamWOptions{0.9, 0.95, 1e-8, 0.1, false}};
  ts::models::NextTokenBatch batch;

  explicit TesseraSide(const ts::Tensor<int32_t>& seq) : batch(ts::models::next_token_batch(seq)) {}

  double step() {
    double loss = 0;
    {
      // Freed before the update, so the step's peak is the forward/backward's, not the
      // activations and the AdamW temporaries together. The bias update reads only the routing
      // load, so it may come before the weight update.
      typename Model::Saved saved;
      loss = model.forward(batch.tokens, batch.targets, saved).loss;
      model.zero_grad();
      model.backward(saved);
      model.update_balance(saved);
    }
    opt.step(model, kLr);
    return loss;
  }
};

template <class Config>
Variant tessera_variant(const std::string& name, const ts::Tensor<int32_t>& seq) {
  auto side = std::make_shared<TesseraSide<Config>>(seq);
  return {name, [side] { return side->step(); }, {}, 0, 0};
}

// LibTorch's model from tessera's CausalFull model's weights (the learned gate is all that
// R1Small has beyond them, and LibTorch leaves it out).
Variant torch_variant(const ts::Tensor<int32_t>& seq) {
  using Model = ts::Decoder<R1Full>;
  using R = Model::Resolved;
  auto model = std::make_shared<Model>(ts::Seed{kSeed});
  std::vector<torch_side::NamedWeight> weights;
  model->visit_parameters([&](std::string_view name, ts::nn::Parameter<float>& p) {
    weights.push_back({std::string(name), p.value.data(),
                       std::vector<int64_t>(p.value.shape().begin(), p.value.shape().end())});
  });
  torch_side::DecoderShape s;
  s.batch = kBatch;
  s.seq = kSeq;
  s.vocab = R::vocab;
  s.d_model = R::d_model;
  s.layers = R::layers;
  s.heads = R::heads;
  s.kv_heads = R::kv_heads;
  s.dense_layers = R::dense_layers;
  s.experts = R::experts;
  s.top_k = R::top_k;
  s.groups = 4;
  s.top_groups = 2;
  s.shared = R::shared_experts;
  s.eps = R::norm_eps;
  s.rope_theta = R::rope_theta;
  s.lr = kLr;
  auto tokens = std::make_shared<std::vector<int32_t>>(seq.data(), seq.data() + seq.numel());
  torch_side::Bench b = torch_side::decoder_train_f32(weights, tokens->data(), s);
  // LibTorch copied the weights; the tokens stay borrowed, so the closure keeps them.
  return {"LibTorch", [b, tokens] {
            b.run();
            return static_cast<double>(b.result()[0][0]);
          },
          {}, 0, 0};
}

int child_main(const Options& o) {
  const int t = o.threads.front();
  omp_set_num_threads(t);
  torch_side::set_num_threads(t);
#if defined(TESSERA_HAVE_OPENBLAS)
  openblas_set_num_threads(t);
#endif
  const ts::Tensor<int32_t> seq = batch_tokens();
  std::vector<Variant> vs;
  vs.push_back(tessera_variant<R1With<ts::StoreAll>>("tessera variable store_all", seq));
  vs.push_back(tessera_variant<R1With<ts::Selective>>("tessera variable selective", seq));
  vs.push_back(tessera_variant<R1With<ts::RecomputeBlock>>("tessera variable recompute_block", seq));
  vs.push_back(tessera_variant<R1Full>("tessera causal store_all", seq));
  if (o.torch) vs.push_back(torch_variant(seq));
  // Warm-up: the first step's loss (same weights, same batch on every side); the second step's
  // memory (the AdamW moments exist by then, so the step adds only its own tensors).
  for (Variant& v : vs) v.first_loss = v.step();
  for (Variant& v : vs) {
    const int64_t before = ts::memory::live_bytes();
    ts::memory::reset_peak();
    v.step();
    v.step_peak = ts::memory::peak_bytes() - before;
  }
  for (int r = 0; r < o.steps; ++r)
    for (Variant& v : vs) v.seconds.push_back(bench::seconds_of([&] { v.step(); }));
  for (const Variant& v : vs) {
    const double med = bench::median(v.seconds);
    const double mn = *std::min_element(v.seconds.begin(), v.seconds.end());
    std::printf("ROW %d %.9e %.9e %lld %.9f %s\n", t, med, mn,
                static_cast<long long>(v.step_peak), v.first_loss, v.name.c_str());
  }
  std::fflush(stdout);
  return 0;
}

struct Row {
  int threads = 0;
  double median = 0, min = 0, first_loss = 0;
  long long peak = 0;
  std::string name;
};

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  bench::restart_with_warm_heap(argv, "train_bench");
  if (o.child) return child_main(o);

  using R = ts::Decoder<R1Small>::Resolved;
  std::printf("train_bench: one training step (forward, backward, AdamW, bias update) of "
              "train_r1's R1Small, tessera vs LibTorch (seed %llu)\n",
              static_cast<unsigned long long>(kSeed));
  std::printf("machine : %s, %d logical CPUs, load average %s at start\n", cpu_model().c_str(),
              omp_get_num_procs(), load_average().c_str());
  std::printf("tessera : %s\n", ts::cpu_features_summary().c_str());
#if defined(TESSERA_HAVE_OPENBLAS)
  std::printf("OpenBLAS: %s (core %s)\n", openblas_get_config(), openblas_get_corename());
#endif
  if (o.torch) std::printf("torch   : %s\n", torch_side::describe().c_str());
  std::printf("model   : vocab %lld, d_model %lld, %lld layers (%lld dense), %lld heads (%lld kv), "
              "ffn %lld, %lld experts top-%lld (4 groups, top 2) + %lld shared, width %lld; "
              "float; batch %lld x %lld tokens\n",
              (long long)R::vocab, (long long)R::d_model, (long long)R::layers,
              (long long)R::dense_layers, (long long)R::heads, (long long)R::kv_heads,
              (long long)R::ffn_hidden, (long long)R::experts, (long long)R::top_k,
              (long long)R::shared_experts, (long long)R::moe_hidden, (long long)kBatch,
              (long long)kSeq);
  std::printf("timing  : 2 warm-up steps, %d timed steps per variant, alternating; one process "
              "per thread count; OMP_WAIT_POLICY=%s; OPENBLAS_CORETYPE=%s\n",
              o.steps, std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "passive",
              std::getenv("OPENBLAS_CORETYPE") ? std::getenv("OPENBLAS_CORETYPE") : "(unset)");
  std::printf("peak    : the most live tensor bytes a step adds beyond weights, grads and AdamW "
              "moments (core/memory.hpp; tessera only)\n\n");
  std::fflush(stdout);

  std::error_code ec;
  const std::string self = std::filesystem::read_symlink("/proc/self/exe", ec).string();
  if (ec) {
    std::fprintf(stderr, "train_bench: cannot find its own executable\n");
    return 1;
  }
  std::vector<Row> rows;
  bool ok = true;
  for (int t : o.threads) {
    const std::string n = std::to_string(t);
    // Idle OpenMP threads sleep (unless the caller chose): spinning ones turn this small model's
    // many short parallel regions into a crawl whenever anything else uses the cores (train_r1).
    const char* wait = std::getenv("OMP_WAIT_POLICY");
    std::string cmd = "OMP_NUM_THREADS=" + n + " OPENBLAS_NUM_THREADS=" + n +
                      " OMP_WAIT_POLICY=" + (wait ? std::string(wait) : "passive") + " " +
                      shell_quote(self) + " --child --threads " + n + " --steps " +
                      std::to_string(o.steps);
    if (!o.torch) cmd += " --no-torch";
    std::fprintf(stderr, "train_bench: measuring at %d thread(s)...\n", t);
    FILE* pipe = popen(cmd.c_str(), "r");
    if (pipe == nullptr) return 1;
    char line[512];
    while (std::fgets(line, sizeof line, pipe) != nullptr) {
      Row r;
      int used = 0;
      if (std::sscanf(line, "ROW %d %lf %lf %lld %lf %n", &r.threads, &r.median, &r.min, &r.peak,
                      &r.first_loss, &used) != 5)
        continue;
      r.name = std::string(line + used);
      while (!r.name.empty() && (r.name.back() == '\n' || r.name.back() == ' ')) r.name.pop_back();
      rows.push_back(r);
    }
    if (pclose(pipe) != 0) {
      std::fprintf(stderr, "train_bench: the %d-thread run failed\n", t);
      ok = false;
    }
  }
  std::printf("| %-32s | thr | step ms median (min) | tokens/s | step peak MiB | first loss | "
              "LibTorch time / this |\n",
              "variant");
  std::printf("|%s|-----|----------------------|----------|---------------|------------|"
              "----------------------|\n",
              std::string(34, '-').c_str());
  for (const Row& r : rows) {
    double torch_s = 0;
    for (const Row& q : rows)
      if (q.threads == r.threads && q.name == "LibTorch") torch_s = q.median;
    char ms[64], ratio[32] = "-";
    std::snprintf(ms, sizeof ms, "%.0f (%.0f)", r.median * 1e3, r.min * 1e3);
    if (torch_s > 0) std::snprintf(ratio, sizeof ratio, "%.2f", torch_s / r.median);
    std::printf("| %-32s | %3d | %-20s | %8.0f | %13s | %10.5f | %20s |\n", r.name.c_str(),
                r.threads, ms, double(kBatch * kSeq) / r.median,
                r.name == "LibTorch" ? "-" : std::to_string(r.peak / 1048576.0).substr(0, 6).c_str(),
                r.first_loss, ratio);
  }
  std::printf("\nload average at end: %s\n", load_average().c_str());
  return ok ? 0 : 1;
}

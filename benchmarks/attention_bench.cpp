// benchmarks/attention_bench.cpp — the attention core under three window policies, next to the
// dense attention a LibTorch 1.13 user writes.
//
// What it answers (issue 3): how long does tessera's tiled online-softmax attention take at
// T = 1k ... 16k tokens for CausalFull, SlidingWindow<512> and the variable window
// (VariableWindow<Sizes<128, 512, 2048, kFull>, HeuristicSelector>), how much of full causal
// attention's work does each do (AttentionStats::work_fraction), and how does that compare with
// LibTorch's matmul + masked softmax + matmul on the same q, k, v? The targets are
// checked at the end: a windowed policy's cost grows linearly in T, and at 16k the variable
// window is at least 2x faster than full causal.
//
// What is timed: the attention core only, Attention::core_forward (q, k, v -> o, logsumexp) and
// core_forward + core_backward (-> dq, dk, dv), on the q, k, v (after RoPE) of one forward of
// the layer. The projections are left out: they cost the same under every policy and grow
// linearly in T. LibTorch gets the very same q, k, v, d_o bytes (from_blob) and an explicit mask
// built from the same per-row windows; it computes all T x T scores whatever the window (that is
// what dense attention does), and its backward is autograd's. rel.diff = max|tessera - torch| /
// max|torch| per output (o; dq, dk, dv) shows that both computed the same thing.
//
// Inputs: x (1, T, 512) is real text, the bytes of a fortune file embedded by a fixed random
// table (256 x 512, seeded), so the heuristic selector sees text-like content (on i.i.d. noise
// it picks `full` everywhere, as designed). d_model 512, 8 heads, 8 kv heads, head_dim 64.
//
// Rates: GFLOP/s counts the useful work of the allowed (query, key) pairs, 4 D flops a pair
// forward and 10 D backward (Q K^T, dO V^T, dV, dQ, dK), as FlashAttention reports it; the
// kernel really does 14 D backward (it recomputes S and dP in its second pass), and tiles that
// are partly masked cost whole.
//
// Timing: one untimed warm-up call per side, then --repeat rounds that alternate the sides
// (tessera, torch, tessera, ...), so a burst of outside load hits both; the table shows the
// median and, in brackets, the minimum. Each timed call starts after --settle seconds of idle,
// so that neither side runs while the other's thread pools still spin (bench::alternate). One
// thread count per process (--threads, default the OpenMP default): oneDNN and OpenBLAS fix
// their parallelisation when first used.
//
// Memory: by default the program restarts itself with glibc tunables that keep freed memory, as
// tessera_bench does (see there): LibTorch allocates its T x T tensors anew on every call, and on
// the VM this was written on a first touch of fresh pages costs more than the arithmetic.
// --fresh-pages keeps glibc's defaults. LibTorch is skipped at a T where its T x T tensors would
// take more than half of the memory available at start (printed).
//
// Usage: attention_bench [--max-t 16384] [--min-t 1024] [--repeat 3] [--threads N] [--settle 0.3]
//                        [--policy SUBSTRING] [--no-torch] [--text FILE] [--fresh-pages]
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "bench_common.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/attention.hpp"

namespace {

using bench::cpu_model;
using bench::load_average;
using bench::Stat;

namespace nn = tessera::nn;
using tessera::Seed;
using tessera::Tensor;

constexpr uint64_t kSeed = 20240611;  // weights, the byte embedding and d_o
constexpr int64_t kBatch = 1, kDModel = 512, kHeads = 8, kKvHeads = 8;
constexpr int64_t kHeadDim = kDModel / kHeads;

using Variable = nn::VariableWindow<nn::Sizes<128, 512, 2048, nn::kFull>, nn::HeuristicSelector>;

// ---- command line --------------------------------------------------------------------------

struct Options {
  int64_t min_t = 1024;
  int64_t max_t = 16384;
  int repeat = 3;
  int threads = 0;      // 0: OpenMP's default
  double settle = 0.3;  // seconds of idle before each timed call (bench::alternate)
  bool torch = true;
  bool fresh_pages = false;
  std::string policy;  // substring filter on the policy name
  std::string text = "/usr/share/games/fortunes/computers";
};

constexpr const char* kSynopsis =
    " [--max-t 16384] [--min-t 1024] [--repeat 3] [--threads N]\n"
    "          [--settle 0.3] [--policy SUBSTRING] [--no-torch] [--text FILE] [--fresh-pages]\n"
    "  --max-t, --min-t  sequence lengths: powers of two times --min-t up to --max-t\n"
    "  --repeat          timed calls per side and row (median and minimum shown)\n"
    "  --threads         OpenMP, LibTorch and OpenBLAS threads (default: OpenMP's)\n"
    "  --settle          seconds of idle before each timed call (default 0.3)\n"
    "  --policy          only the policies whose name contains SUBSTRING\n"
    "  --no-torch        tessera only\n"
    "  --text            the text whose bytes are embedded as the input\n"
    "  --fresh-pages     keep glibc's allocator defaults (see the source)\n";

Options parse(int argc, char** argv) {
  Options o;
  bench::Args args(argc, argv, "attention_bench", kSynopsis);
  while (args.next()) {
    const std::string& a = args.flag();
    if (a == "--max-t") {
      o.max_t = args.positive();
    } else if (a == "--min-t") {
      o.min_t = args.positive();
    } else if (a == "--repeat") {
      o.repeat = static_cast<int>(std::min<int64_t>(args.positive(), 1000));
    } else if (a == "--threads") {
      o.threads = static_cast<int>(std::min<int64_t>(args.positive(), 1024));
    } else if (a == "--settle") {
      o.settle = args.seconds(10);
    } else if (a == "--policy") {
      o.policy = args.value();
    } else if (a == "--text") {
      o.text = args.value();
    } else if (a == "--no-torch") {
      o.torch = false;
    } else if (a == "--fresh-pages") {
      o.fresh_pages = true;
    } else if (a == "--help" || a == "-h") {
      args.usage();
    } else {
      args.unknown();
    }
  }
  if (o.min_t > o.max_t) args.fail("--min-t is larger than --max-t");
  return o;
}

// ---- the machine ----------------------------------------------------------------------------

// MemAvailable from /proc/meminfo, in bytes (0 if unknown).
double available_memory() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  double kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024.0;
  return 0;
}

// ---- inputs ---------------------------------------------------------------------------------

// The first `n` bytes of `path`, repeated if the file is shorter; empty if it cannot be read.
std::string read_text(const std::string& path, int64_t n) {
  std::ifstream f(path, std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (s.empty()) return s;
  std::string out;
  while (static_cast<int64_t>(out.size()) < n) out += s;
  out.resize(static_cast<size_t>(n));
  return out;
}

// x (1, T, C): each byte of `text` embedded by a fixed N(0, 1) table (256, C); N(0, 1) noise
// when there is no text.
Tensor<float> embed(const std::string& text, int64_t T) {
  auto x = Tensor<float>::empty({kBatch, T, kDModel});
  if (text.empty()) {
    tessera::fill_normal<float>(x.data(), x.numel(), Seed{kSeed}, 2, 0.0f, 1.0f);
    return x;
  }
  std::vector<float> table(static_cast<size_t>(256 * kDModel));
  tessera::fill_normal<float>(table.data(), 256 * kDModel, Seed{kSeed}, 1, 0.0f, 1.0f);
  for (int64_t t = 0; t < T; ++t) {
    const auto byte = static_cast<unsigned char>(text[static_cast<size_t>(t)]);
    std::copy_n(table.data() + byte * kDModel, kDModel, x.data() + t * kDModel);
  }
  return x;
}

// ---- one row --------------------------------------------------------------------------------

struct Row {
  std::string policy;
  int64_t T = 0;
  double work = 0;      // AttentionStats::work_fraction
  std::string windows;  // VariableWindow: query blocks per size
  double pairs = 0;     // allowed (query, key) pairs, over batch and one head
  Stat fwd, fwd_bwd;    // tessera, seconds
  Stat torch_fwd, torch_fwd_bwd;
  std::string torch_note;  // why LibTorch did not run, if it did not
  double diff_fwd = NAN, diff_bwd = NAN;
};

template <class T>
std::vector<float> as_vector(const Tensor<T>& t) {
  return std::vector<float>(t.data(), t.data() + t.numel());
}

template <class W>
Row measure(const char* name, int64_t T, const Options& o, const std::string& text,
            double torch_budget) {
  Row row;
  row.policy = name;
  row.T = T;
  nn::AttentionOptions opts;
  opts.max_seq = o.max_t;
  using Layer = nn::Attention<float, W>;
  const Layer layer(kDModel, kHeads, kKvHeads, Seed{kSeed}, 0, opts);
  const Tensor<float> x = embed(text, T);
  typename Layer::Saved saved;
  (void)layer.forward(x, saved);  // q, k, v after RoPE, the window choices, the stats
  row.work = saved.stats.work_fraction();
  if constexpr (W::kAdaptive) {
    std::ostringstream h;
    for (size_t s = 0; s < saved.stats.window_histogram.size(); ++s)
      h << (s ? "/" : "") << saved.stats.window_histogram[s];
    row.windows = h.str();
  }
  auto d_o = Tensor<float>::empty({kBatch, T, kHeads, kHeadDim});
  tessera::fill_normal<float>(d_o.data(), d_o.numel(), Seed{kSeed}, 3, 0.0f, 1.0f);

  // Each row's window, for the torch mask and the pair count (>= T: full causal).
  std::vector<int64_t> window(static_cast<size_t>(kBatch * T));
  const int64_t nqb = (T + layer.block() - 1) / layer.block();
  for (int64_t b = 0; b < kBatch; ++b)
    for (int64_t i = 0; i < T; ++i) {
      int64_t w = T;
      if constexpr (W::kAdaptive) {
        w = std::min<int64_t>(
            T, W::kSizes[static_cast<size_t>(saved.choice.index[b * nqb + i / layer.block()])]);
      } else if constexpr (requires { W::kWindow; }) {
        w = std::min<int64_t>(T, W::kWindow);
      }
      window[static_cast<size_t>(b * T + i)] = w;
      row.pairs += static_cast<double>(std::min(i + 1, w));
    }

  typename Layer::CoreGrads grads;
  const std::function<void()> fwd = [&] { layer.core_forward(saved); };
  const std::function<void()> fwd_bwd = [&] {
    layer.core_forward(saved);
    grads = layer.core_backward(saved, d_o);
  };

  // LibTorch's live T x T float tensors: scores and probabilities forward; autograd adds the
  // probabilities' and the scores' gradients (and a scaled copy) backward; plus the bool mask.
  const double tt = static_cast<double>(kBatch) * kHeads * static_cast<double>(T) * T * 4.0;
  const double mask = static_cast<double>(kBatch) * T * T;
  auto torch_ok = [&](double need, const char* what) {
    if (!o.torch) {
      row.torch_note = "not run (--no-torch)";
      return false;
    }
    if (need > torch_budget) {
      char buf[160];
      std::snprintf(
          buf, sizeof buf, "%s%s skipped: its T x T tensors need ~%.1f GiB, budget %.1f GiB",
          row.torch_note.empty() ? "" : "; ", what, need / (1 << 30), torch_budget / (1 << 30));
      row.torch_note += buf;
      return false;
    }
    return true;
  };

  {
    std::function<void()> torch_run;
    torch_side::Bench tb;
    if (torch_ok(2 * tt + mask, "fwd")) {
      tb = torch_side::attention_f32(saved.q.data(), saved.k.data(), saved.v.data(), nullptr,
                                     window.data(), kBatch, T, kHeads, kKvHeads, kHeadDim, false);
      torch_run = tb.run;
    }
    std::tie(row.fwd, row.torch_fwd) = bench::alternate(fwd, torch_run, o.repeat, o.settle);
    if (torch_run) row.diff_fwd = bench::relative_difference({as_vector(saved.o)}, tb.result());
  }
  {
    std::function<void()> torch_run;
    torch_side::Bench tb;
    if (torch_ok(5 * tt + mask, "fwd+bwd")) {
      tb = torch_side::attention_f32(saved.q.data(), saved.k.data(), saved.v.data(), d_o.data(),
                                     window.data(), kBatch, T, kHeads, kKvHeads, kHeadDim, true);
      torch_run = tb.run;
    }
    std::tie(row.fwd_bwd, row.torch_fwd_bwd) =
        bench::alternate(fwd_bwd, torch_run, o.repeat, o.settle);
    if (torch_run)
      row.diff_bwd = bench::relative_difference(
          {as_vector(saved.o), as_vector(grads.dq), as_vector(grads.dk), as_vector(grads.dv)},
          tb.result());
  }
  return row;
}

// ---- the table ------------------------------------------------------------------------------

std::string ms(const Stat& s) {
  if (std::isnan(s.median)) return "-";
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.1f (%.1f)", s.median * 1e3, s.min * 1e3);
  return buf;
}

std::string gflops(double flops, const Stat& s) {
  if (std::isnan(s.median)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", flops / s.median * 1e-9);
  return buf;
}

std::string ratio(const Stat& torch, const Stat& tessera) {
  if (std::isnan(torch.median) || std::isnan(tessera.median)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", torch.median / tessera.median);
  return buf;
}

std::string diff(double a, double b) {
  if (std::isnan(a) && std::isnan(b)) return "-";
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.0e / %.0e", a, b);
  return buf;
}

void print_header() {
  std::printf(
      "| %-18s | %5s | %5s | %-14s | %-17s | %7s | %-17s | %5s | %-17s | %7s | %-17s | %5s | %-13s "
      "|\n",
      "policy", "T", "work", "windows", "fwd ms", "GFLOP/s", "torch fwd ms", "ratio", "fwd+bwd ms",
      "GFLOP/s", "torch fwd+bwd ms", "ratio", "rel.diff f/b");
  std::printf(
      "|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n", std::string(20, '-').c_str(),
      std::string(7, '-').c_str(), std::string(7, '-').c_str(), std::string(16, '-').c_str(),
      std::string(19, '-').c_str(), std::string(9, '-').c_str(), std::string(19, '-').c_str(),
      std::string(7, '-').c_str(), std::string(19, '-').c_str(), std::string(9, '-').c_str(),
      std::string(19, '-').c_str(), std::string(7, '-').c_str(), std::string(15, '-').c_str());
}

void print_row(const Row& r) {
  const double per_pair = static_cast<double>(kHeads) * kHeadDim;
  const double f_fwd = 4.0 * per_pair * r.pairs, f_bwd = 14.0 * per_pair * r.pairs;
  std::printf(
      "| %-18s | %5lld | %5.3f | %-14s | %-17s | %7s | %-17s | %5s | %-17s | %7s | %-17s | %5s | "
      "%-13s |\n",
      r.policy.c_str(), static_cast<long long>(r.T), r.work,
      r.windows.empty() ? "-" : r.windows.c_str(), ms(r.fwd).c_str(), gflops(f_fwd, r.fwd).c_str(),
      ms(r.torch_fwd).c_str(), ratio(r.torch_fwd, r.fwd).c_str(), ms(r.fwd_bwd).c_str(),
      gflops(f_bwd, r.fwd_bwd).c_str(), ms(r.torch_fwd_bwd).c_str(),
      ratio(r.torch_fwd_bwd, r.fwd_bwd).c_str(), diff(r.diff_fwd, r.diff_bwd).c_str());
  std::fflush(stdout);
}

const Row* find(const std::vector<Row>& rows, const std::string& policy, int64_t T) {
  for (const Row& r : rows)
    if (r.policy == policy && r.T == T) return &r;
  return nullptr;
}

// How time grows with T: the least-squares slope of log(time) over log(T) across the given
// rows (1: linear, 2: quadratic). One doubling alone is at the mercy of a single disturbed
// call on a shared machine; the slope over several lengths is not.
double growth(const std::vector<const Row*>& rs, double (*value)(const Row&)) {
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  const double n = static_cast<double>(rs.size());
  for (const Row* r : rs) {
    const double x = std::log(static_cast<double>(r->T)), y = std::log(value(*r));
    sx += x;
    sy += y;
    sxx += x * x;
    sxy += x * y;
  }
  return (n * sxy - sx * sy) / (n * sxx - sx * sx);
}

// The targets, judged on the medians (the minima are printed beside).
void print_targets(const std::vector<Row>& rows, const std::vector<int64_t>& ts) {
  std::printf("\nTargets (medians; minima in brackets):\n");
  const int64_t last = ts.back();
  // A window's cost is linear only once T is well past it: fit the last three lengths.
  std::vector<int64_t> tail(ts.end() - std::min<std::ptrdiff_t>(3, std::ssize(ts)), ts.end());
  for (const char* p : {"SlidingWindow<512>", "VariableWindow"}) {
    std::vector<const Row*> rs;
    for (int64_t t : tail)
      if (const Row* r = find(rows, p, t)) rs.push_back(r);
    if (rs.size() < 2) continue;
    const double f = growth(rs, [](const Row& r) { return r.fwd.median; });
    const double fb = growth(rs, [](const Row& r) { return r.fwd_bwd.median; });
    std::printf(
        "  %-18s grows linearly in T: time ~ T^%.2f (T^%.2f) fwd, T^%.2f (T^%.2f) fwd+bwd "
        "over T=%lld..%lld (linear 1, quadratic 2; tiles visited ~ T^%.2f) -> %s\n",
        p, f, growth(rs, [](const Row& r) { return r.fwd.min; }), fb,
        growth(rs, [](const Row& r) { return r.fwd_bwd.min; }),
        static_cast<long long>(rs.front()->T), static_cast<long long>(rs.back()->T),
        growth(rs, [](const Row& r) { return r.work * r.T * (r.T + 64.0); }),
        f < 1.3 && fb < 1.3 ? "MET" : "NOT MET");
  }
  const Row* full = find(rows, "CausalFull", last);
  const Row* var = find(rows, "VariableWindow", last);
  if (full != nullptr && var != nullptr) {
    const double f = full->fwd.median / var->fwd.median;
    const double fb = full->fwd_bwd.median / var->fwd_bwd.median;
    std::printf(
        "  VariableWindow vs CausalFull at T=%lld: %.2fx (%.2fx) faster fwd, %.2fx (%.2fx) "
        "fwd+bwd (target >= 2x at 16384) -> %s%s\n",
        static_cast<long long>(last), f, full->fwd.min / var->fwd.min, fb,
        full->fwd_bwd.min / var->fwd_bwd.min, f >= 2.0 && fb >= 2.0 ? "MET" : "NOT MET",
        last == 16384 ? "" : " (not measured at 16384: see --max-t)");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const bool warm_heap = bench::use_warm_heap(argv, "attention_bench", o.fresh_pages);
  // Without --threads, OpenMP and OpenBLAS keep their defaults and LibTorch follows OpenMP's.
  if (o.threads > 0)
    bench::set_threads(o.threads);
  else
    torch_side::set_num_threads(omp_get_max_threads());
  const int threads = omp_get_max_threads();

  std::vector<int64_t> ts;
  for (int64_t t = o.min_t; t <= o.max_t; t *= 2) ts.push_back(t);
  const std::string text = read_text(o.text, o.max_t);
  const double budget = 0.5 * available_memory();

  std::printf("attention_bench: attention core, tessera vs LibTorch (same q, k, v), seed %llu\n",
              static_cast<unsigned long long>(kSeed));
  std::printf("machine : %s, %d logical CPUs, %d thread(s), load average %s at start\n",
              cpu_model().c_str(), omp_get_num_procs(), threads, load_average().c_str());
  std::printf("tessera : %s; attention kernel path %s\n", tessera::cpu_features_summary().c_str(),
              tessera::ops::rows_detail::to_string(tessera::ops::rows_detail::row_isa()));
  std::printf("torch   : %s\n", torch_side::describe().c_str());
  std::printf(
      "shape   : batch %lld, d_model %lld, %lld heads, %lld kv heads, head_dim %lld, float; "
      "query/key tiles of 64\n",
      static_cast<long long>(kBatch), static_cast<long long>(kDModel),
      static_cast<long long>(kHeads), static_cast<long long>(kKvHeads),
      static_cast<long long>(kHeadDim));
  std::printf("input   : %s\n",
              text.empty() ? "N(0, 1) noise (no text could be read; the heuristic picks `full`)"
                           : ("bytes of " + o.text + " through a seeded random embedding").c_str());
  std::printf(
      "timing  : 1 warm-up, then %d alternating rounds per side, %.2f s idle before each timed "
      "call; ms = median (minimum); core only (no projections)\n",
      o.repeat, o.settle);
  std::printf("rates   : GFLOP/s of useful work: 4 D flops per allowed pair fwd, 14 D fwd+bwd\n");
  std::printf(
      "windows : VariableWindow query blocks per size 128/512/2048/full (HeuristicSelector)\n");
  std::printf("memory  : %s; LibTorch budget %.1f GiB (half of MemAvailable)\n",
              bench::heap_note(warm_heap), budget / (1 << 30));
  std::printf("ratio   : torch time / tessera time (> 1: tessera faster)\n\n");
  print_header();

  std::vector<Row> rows;
  auto want = [&](const char* name) {
    return o.policy.empty() || std::string(name).find(o.policy) != std::string::npos;
  };
  for (int64_t T : ts) {
    auto run = [&]<class W>(const char* name, W*) {
      if (!want(name)) return;
      std::fprintf(stderr, "attention_bench: %s T=%lld...\n", name, static_cast<long long>(T));
      rows.push_back(measure<W>(name, T, o, text, budget));
      print_row(rows.back());
    };
    run("CausalFull", static_cast<nn::CausalFull*>(nullptr));
    run("SlidingWindow<512>", static_cast<nn::SlidingWindow<512>*>(nullptr));
    run("VariableWindow", static_cast<Variable*>(nullptr));
  }
  bool notes = false;
  if (!o.torch) std::printf("\nLibTorch: not run (--no-torch)\n");
  for (const Row& r : rows)
    if (o.torch && !r.torch_note.empty()) {
      if (!notes) std::printf("\nLibTorch:\n");
      notes = true;
      std::printf("  %s T=%lld: %s\n", r.policy.c_str(), static_cast<long long>(r.T),
                  r.torch_note.c_str());
    }
  print_targets(rows, ts);
  std::printf("\nload average at end: %s\n", load_average().c_str());
  return 0;
}

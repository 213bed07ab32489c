// benchmarks/tessera_bench.cpp — tessera's CPU ops against LibTorch's, side by side.
//
// What it answers: on this machine, with the same inputs and the same thread count, how long
// does one call of tessera's op take next to the LibTorch call a PyTorch user would write?
// Each row prints both medians, the achieved rate (GFLOP/s for products, GB/s of compulsory
// traffic for row ops) and ratio = torch time / tessera time, so ratio > 1 means tessera is
// faster. It also prints how far the two outputs are apart (rel.diff = max|tessera - torch| /
// max|torch|) to show both sides computed the same thing; nothing is asserted, and the program
// is deliberately not a CTest test: timings on a shared CI machine are not pass/fail material.
//
// This file is the tessera half (C++20, includes no torch); torch_side.cpp is the LibTorch half,
// reached through plain pointers (torch_side.hpp). harness.hpp says how a row is timed.
//
// Usage: tessera_bench [--quick] [--threads 1,2] [--filter SUBSTRING] [--fresh-pages]
//
// Allocation: both sides return freshly allocated outputs (that is their API). glibc serves
// blocks of 32 MiB and more with mmap and unmaps them on free, so each call's output would be
// new memory whose first touch page-faults — on the VM this was written on, about 2 ms per MiB,
// more than the op itself for the row ops. By default the program therefore restarts itself
// with glibc tunables that keep freed memory (restart_with_warm_heap), so a call reuses the
// previous call's pages, as a caching allocator or a preallocated workspace would; both sides
// get the same treatment. --fresh-pages keeps glibc's defaults: the cost a plain malloc user
// sees (tessera's tensors still reuse pages there, through the large-block cache of
// core/device.hpp; LibTorch's CPU allocator has none).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/ops/matmul.hpp"
#if __has_include("tessera/ops/softmax.hpp")
#include "tessera/ops/softmax.hpp"
#define TESSERA_BENCH_SOFTMAX 1
#endif
#if __has_include("tessera/ops/norm.hpp")
#include "tessera/ops/norm.hpp"
#define TESSERA_BENCH_NORM 1
#endif
#if __has_include("tessera/ops/cross_entropy.hpp")
#include "tessera/ops/cross_entropy.hpp"
#define TESSERA_BENCH_CROSS_ENTROPY 1
#endif

#if defined(TESSERA_HAVE_DNNL)
#include <oneapi/dnnl/dnnl.h>
#endif

namespace {

using bench::load_average;

using tessera::Cpu;
using tessera::Seed;
using tessera::Tensor;
using tessera::TensorView;
namespace ops = tessera::ops;

constexpr uint64_t kSeed = 20240607;  // every input of every row comes from this seed

// ---- command line --------------------------------------------------------------------------

struct Options {
  bool quick = false;
  bool fresh_pages = false;
  bool child = false;  // internal: time one thread count and print raw rows (see main)
  std::vector<int> threads{1, 2};
  std::string filter;
};

constexpr const char* kSynopsis =
    " [--quick] [--threads 1,2] [--filter SUBSTRING] [--fresh-pages]\n"
    "  --quick        fewer sizes and repetitions (a smoke run, not a measurement)\n"
    "  --threads      comma-separated thread counts; each runs in its own process\n"
    "  --filter       run only the rows whose op name contains SUBSTRING\n"
    "  --fresh-pages  keep glibc's allocator defaults: every large output is fresh\n"
    "                 memory the kernel must fault in on each call (see the source)\n";

Options parse(int argc, char** argv) {
  Options o;
  bench::Args args(argc, argv, "tessera_bench", kSynopsis);
  while (args.next()) {
    const std::string& a = args.flag();
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--fresh-pages") {
      o.fresh_pages = true;
    } else if (a == "--child") {
      o.child = true;
    } else if (a == "--filter") {
      o.filter = args.value();
    } else if (a == "--threads") {
      o.threads = args.thread_counts();
    } else if (a == "--help" || a == "-h") {
      args.usage();
    } else {
      args.unknown();
    }
  }
  if (o.child && o.threads.size() != 1) args.fail("--child takes exactly one thread count");
  return o;
}

// ---- one row --------------------------------------------------------------------------------

using Outputs = std::vector<std::vector<float>>;

// One side of a row: a call of the op, and its last outputs widened to float.
struct Side {
  std::function<void()> run;
  std::function<Outputs()> result;
};

// A row of the table before timing: what it is, how much work one call does, and a function
// that makes the inputs (once, shared by every thread count) and both sides over them.
struct Case {
  std::string op, shape, dtype;
  double work = 0;   // floating-point operations (products) or bytes moved (row ops) per call
  bool flops = true; // work is FLOPs (rate in GFLOP/s), else bytes (rate in GB/s)
  std::string path;  // tessera's back end
  std::function<std::pair<Side, torch_side::Bench>()> prepare;
};

template <class T>
std::vector<float> widened(const Tensor<T>& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  const T* p = t.data();
  for (size_t i = 0; i < v.size(); ++i) v[i] = tessera::to_float(p[i]);
  return v;
}

// Fills a fresh (rows, cols) float tensor from stream `subsequence` of kSeed.
Tensor<float> uniform(tessera::Shape shape, uint64_t subsequence, float lo, float hi) {
  auto t = Tensor<float>::empty(shape);
  tessera::fill_uniform<float>(t.data(), t.numel(), Seed{kSeed}, subsequence, lo, hi);
  return t;
}

std::string dims(std::initializer_list<int64_t> d) {
  std::string s;
  for (int64_t x : d) {
    if (!s.empty()) s += 'x';
    s += std::to_string(x);
  }
  return s;
}

// ---- matrix products ------------------------------------------------------------------------

Case matmul_f32(int64_t m, int64_t k, int64_t n) {
  Case c{"matmul", dims({m, k, n}), "fp32", 2.0 * m * k * n, true, "", {}};
  c.path = tessera::to_string(ops::matmul_path<float>({m, k}, {k, n}));
  c.prepare = [m, k, n] {
    auto a = std::make_shared<Tensor<float>>(uniform({m, k}, 1, -1.f, 1.f));
    auto b = std::make_shared<Tensor<float>>(uniform({k, n}, 2, -1.f, 1.f));
    auto out = std::make_shared<Tensor<float>>();
    Side t{[a, b, out] { *out = ops::matmul<float>(*a, *b); }, [out] { return Outputs{widened(*out)}; }};
    return std::pair{t, torch_side::matmul_f32(a->data(), b->data(), m, k, n)};
  };
  return c;
}

Case matmul_bf16(int64_t m, int64_t k, int64_t n) {
  using tessera::bf16;
  static_assert(sizeof(bf16) == sizeof(uint16_t));
  Case c{"matmul", dims({m, k, n}), "bf16", 2.0 * m * k * n, true, "", {}};
  c.path = tessera::to_string(ops::matmul_path<bf16>({m, k}, {k, n}));
  c.prepare = [m, k, n] {
    // The same values as the fp32 row, rounded to bf16 once; LibTorch gets the same bits.
    auto to_bf16 = [](const Tensor<float>& f, std::vector<uint16_t>& bits) {
      auto t = std::make_shared<Tensor<bf16>>(Tensor<bf16>::empty(f.shape()));
      bits.resize(static_cast<size_t>(f.numel()));
      for (int64_t i = 0; i < f.numel(); ++i) {
        t->data()[i] = bf16(f.data()[i]);
        bits[static_cast<size_t>(i)] = t->data()[i].bits;
      }
      return t;
    };
    auto bits = std::make_shared<std::pair<std::vector<uint16_t>, std::vector<uint16_t>>>();
    auto a = to_bf16(uniform({m, k}, 1, -1.f, 1.f), bits->first);
    auto b = to_bf16(uniform({k, n}, 2, -1.f, 1.f), bits->second);
    auto out = std::make_shared<Tensor<bf16>>();
    Side t{[a, b, out] { *out = ops::matmul<bf16>(*a, *b); }, [out] { return Outputs{widened(*out)}; }};
    torch_side::Bench tb = torch_side::matmul_bf16(bits->first.data(), bits->second.data(), m, k, n);
    tb.run = [bits, run = tb.run] { run(); };  // keeps the bit copies alive with the closure
    return std::pair{t, tb};
  };
  return c;
}

// ---- row ops --------------------------------------------------------------------------------
// Rates count compulsory traffic only: every input read once, every output written once.

#if defined(TESSERA_BENCH_SOFTMAX)
Case softmax_f32(int64_t rows, int64_t cols) {
  Case c{"softmax", dims({rows, cols}), "fp32", 2.0 * 4 * rows * cols, false, "-", {}};
  c.prepare = [rows, cols] {
    auto x = std::make_shared<Tensor<float>>(uniform({rows, cols}, 3, -8.f, 8.f));
    auto out = std::make_shared<Tensor<float>>();
    Side t{[x, out] { *out = ops::softmax<float>(*x); }, [out] { return Outputs{widened(*out)}; }};
    return std::pair{t, torch_side::softmax_f32(x->data(), rows, cols)};
  };
  return c;
}
#endif

#if defined(TESSERA_BENCH_NORM)
Case rmsnorm_f32(int64_t rows, int64_t cols) {
  constexpr float kEps = 1e-6f;
  Case c{"rmsnorm", dims({rows, cols}), "fp32", 4.0 * (2 * rows * cols + cols), false, "-", {}};
  c.prepare = [rows, cols] {
    auto x = std::make_shared<Tensor<float>>(uniform({rows, cols}, 4, -2.f, 2.f));
    auto w = std::make_shared<Tensor<float>>(uniform({cols}, 5, 0.5f, 1.5f));
    auto out = std::make_shared<Tensor<float>>();
    Side t{[x, w, out] { *out = ops::rms_norm<float>(*x, *w, kEps).y; },
           [out] { return Outputs{widened(*out)}; }};
    return std::pair{t, torch_side::rmsnorm_f32(x->data(), w->data(), rows, cols, kEps)};
  };
  return c;
}
#endif

#if defined(TESSERA_BENCH_CROSS_ENTROPY)
Case cross_entropy_f32(int64_t rows, int64_t vocab) {
  // logits read, targets read, dlogits written (the loss is one number).
  Case c{"cross_entropy fwd+bwd", dims({rows, vocab}), "fp32",
         4.0 * 2 * rows * vocab + 4.0 * rows, false, "-", {}};
  c.prepare = [rows, vocab] {
    auto logits = std::make_shared<Tensor<float>>(uniform({rows, vocab}, 6, -6.f, 6.f));
    // tessera takes int32 class ids, LibTorch int64: the same ids in both widths.
    auto targets = std::make_shared<Tensor<int32_t>>(Tensor<int32_t>::empty({rows}));
    auto targets64 = std::make_shared<std::vector<int64_t>>(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      const uint32_t u = tessera::philox_u32(Seed{kSeed}, 7, static_cast<uint64_t>(r));
      targets->data()[r] = static_cast<int32_t>(u % static_cast<uint32_t>(vocab));
      (*targets64)[static_cast<size_t>(r)] = targets->data()[r];
    }
    struct Out {
      Tensor<float> loss;
      Tensor<float> dlogits;
    };
    auto out = std::make_shared<Out>();
    const auto dloss = std::make_shared<Tensor<float>>(Tensor<float>::full({}, 1.0f));
    Side t{[logits, targets, dloss, out] {
             // forward (mean loss), then backward with dloss = 1, as loss.backward() does
             auto fwd = ops::cross_entropy<float>(*logits, *targets);
             out->dlogits = ops::cross_entropy_backward<float>(*dloss, *logits, *targets,
                                                               fwd.logsumexp);
             out->loss = std::move(fwd.loss);
           },
           [out] { return Outputs{widened(out->loss), widened(out->dlogits)}; }};
    torch_side::Bench tb =
        torch_side::cross_entropy_f32(logits->data(), targets64->data(), rows, vocab);
    tb.run = [targets64, run = tb.run] { run(); };  // keeps the int64 ids alive
    return std::pair{t, tb};
  };
  return c;
}
#endif

std::vector<Case> cases(const Options& o) {
  std::vector<Case> cs;
  const std::vector<int64_t> squares = o.quick ? std::vector<int64_t>{256, 1024}
                                               : std::vector<int64_t>{256, 512, 1024, 2048};
  for (auto make : {&matmul_f32, &matmul_bf16}) {
    for (int64_t s : squares) cs.push_back(make(s, s, s));
    cs.push_back(make(4096, 512, 2048));  // an LM projection: 4096 tokens, 512 -> 2048
  }
  [[maybe_unused]] const int64_t rows = o.quick ? 1024 : 4096;
#if defined(TESSERA_BENCH_SOFTMAX)
  cs.push_back(softmax_f32(rows, 8192));
#endif
#if defined(TESSERA_BENCH_NORM)
  cs.push_back(rmsnorm_f32(rows, 2048));
  if (!o.quick) cs.push_back(rmsnorm_f32(rows, 8192));
#endif
#if defined(TESSERA_BENCH_CROSS_ENTROPY)
  cs.push_back(cross_entropy_f32(rows, 8192));
#endif
  if (!o.filter.empty())
    std::erase_if(cs, [&](const Case& c) { return c.op.find(o.filter) == std::string::npos; });
  return cs;
}

// ---- the table ------------------------------------------------------------------------------

struct Row {
  const Case* c;
  int threads;
  bench::Timing tessera, torch;
  double rel_diff;
  double ratio() const { return torch.median_s / tessera.median_s; }
};

std::string rate(const Case& c, double seconds) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", c.work / seconds * 1e-9, c.flops ? "GFLOP/s" : "GB/s");
  return buf;
}

void print_header() {
  std::printf("| %-21s | %-14s | %-5s | %-3s | %-11s | %-11s | %-15s | %-15s | %-6s | %-8s | %-8s | %-9s |\n",
              "op", "shape", "dtype", "thr", "tessera ms", "torch ms", "tessera rate",
              "torch rate", "ratio", "path", "rel.diff", "reps t/T");
  std::printf("|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n", std::string(23, '-').c_str(),
              std::string(16, '-').c_str(), std::string(7, '-').c_str(), std::string(5, '-').c_str(),
              std::string(13, '-').c_str(), std::string(13, '-').c_str(), std::string(17, '-').c_str(),
              std::string(17, '-').c_str(), std::string(8, '-').c_str(), std::string(10, '-').c_str(),
              std::string(10, '-').c_str(), std::string(11, '-').c_str());
}

void print_row(const Row& r) {
  const Case& c = *r.c;
  char reps[32];
  std::snprintf(reps, sizeof reps, "%d/%d", r.tessera.reps, r.torch.reps);
  std::printf("| %-21s | %-14s | %-5s | %3d | %11.3f | %11.3f | %-15s | %-15s | %6.2f | %-8s | %8.1e | %-9s |\n",
              c.op.c_str(), c.shape.c_str(), c.dtype.c_str(), r.threads, r.tessera.median_s * 1e3,
              r.torch.median_s * 1e3, rate(c, r.tessera.median_s).c_str(),
              rate(c, r.torch.median_s).c_str(), r.ratio(), c.path.c_str(), r.rel_diff, reps);
  std::fflush(stdout);
}

// The targets: products at least 0.9x LibTorch, row ops at least 1.5x.
void print_targets(const std::vector<Row>& rows) {
  struct Target {
    const char* name;
    double goal;
    bool (*match)(const Case&);
  };
  const Target targets[] = {
      {"matmul fp32", 0.9, [](const Case& c) { return c.op == "matmul" && c.dtype == "fp32"; }},
      {"matmul bf16", 0.9, [](const Case& c) { return c.op == "matmul" && c.dtype == "bf16"; }},
      {"softmax", 1.5, [](const Case& c) { return c.op == "softmax"; }},
      {"rmsnorm", 1.5, [](const Case& c) { return c.op == "rmsnorm"; }},
      {"cross_entropy fwd+bwd", 1.5, [](const Case& c) { return c.op == "cross_entropy fwd+bwd"; }},
  };
  std::printf("\nTargets (ratio = torch/tessera; the worst row of each group counts):\n");
  for (const Target& t : targets) {
    double worst = INFINITY, sum_log = 0;
    int n = 0;
    const Row* worst_row = nullptr;
    for (const Row& r : rows) {
      if (!t.match(*r.c)) continue;
      ++n;
      sum_log += std::log(r.ratio());
      if (r.ratio() < worst) {
        worst = r.ratio();
        worst_row = &r;
      }
    }
    if (n == 0) {
      std::printf("  %-22s not run\n", t.name);
      continue;
    }
    std::printf("  %-22s >= %.1fx: worst %.2fx (%s, %d thr), geomean %.2fx over %d rows -> %s\n",
                t.name, t.goal, worst, worst_row->c->shape.c_str(), worst_row->threads,
                std::exp(sum_log / n), n, worst >= t.goal ? "MET" : "NOT MET");
  }
}


// ---- processes ------------------------------------------------------------------------------
// Each thread count is measured in a fresh child process (this program, with --child). Why:
// the libraries keep per-process state that depends on the thread count at the time they first
// ran a shape — oneDNN fixes a primitive's parallelisation when it is created, and both sides
// cache primitives; OpenBLAS and libgomp keep spinning thread pools. Changing the count in one
// process measured a mix of old and new state (LibTorch's bf16 256^3 product took 30x longer at
// 2 threads after a 1-thread pass). A program normally picks its thread count once; so does
// each child, from OMP_NUM_THREADS / OPENBLAS_NUM_THREADS set before it starts.

// One raw row as a child prints it: "ROW <case> <threads> <t s> <t reps> <T s> <T reps> <diff>".
void print_raw_row(size_t case_index, const Row& r) {
  std::printf("ROW %zu %d %.9e %d %.9e %d %.9e\n", case_index, r.threads, r.tessera.median_s,
              r.tessera.reps, r.torch.median_s, r.torch.reps, r.rel_diff);
  std::fflush(stdout);
}

// Runs the child for `threads` and collects its rows; the child's stderr passes through.
bool run_child(const char* self, const Options& o, int threads, const std::vector<Case>& cs,
               std::vector<std::pair<size_t, Row>>& out) {
  std::string cmd = bench::child_command(self, threads);
  if (o.quick) cmd += " --quick";
  if (o.fresh_pages) cmd += " --fresh-pages";
  if (!o.filter.empty()) cmd += " --filter " + bench::shell_quote(o.filter);
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return false;
  char line[512];
  while (std::fgets(line, sizeof line, pipe) != nullptr) {
    size_t ci = 0;
    Row r{};
    if (std::sscanf(line, "ROW %zu %d %lf %d %lf %d %lf", &ci, &r.threads, &r.tessera.median_s,
                    &r.tessera.reps, &r.torch.median_s, &r.torch.reps, &r.rel_diff) != 7 ||
        ci >= cs.size())
      continue;
    r.c = &cs[ci];
    std::fprintf(stderr, "  [%d thr] %s %s %s: ratio %.2f\n", threads, r.c->op.c_str(),
                 r.c->shape.c_str(), r.c->dtype.c_str(), r.ratio());
    out.emplace_back(ci, r);
  }
  return pclose(pipe) == 0;
}

// The child: one thread count, every case, raw rows on stdout.
int child_main(const Options& o, const bench::TimingOptions& timing) {
  const int t = o.threads.front();
  bench::set_threads(t);
  const std::vector<Case> cs = cases(o);
  for (size_t i = 0; i < cs.size(); ++i) {
    auto [tessera_side, torch_bench] = cs[i].prepare();
    const auto [tt, tT] = bench::time_pair(tessera_side.run, torch_bench.run, timing);
    const Row r{&cs[i], t, tt, tT,
                bench::relative_difference(tessera_side.result(), torch_bench.result())};
    print_raw_row(i, r);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const bool warm_heap = bench::use_warm_heap(argv, "tessera_bench", o.fresh_pages);
  bench::TimingOptions timing;
  if (o.quick) timing = {0.05, 3, 200};
  if (o.child) return child_main(o, timing);

  std::printf("tessera_bench%s: tessera vs LibTorch, same inputs (seed %llu), same thread count\n",
              o.quick ? " --quick" : "", static_cast<unsigned long long>(kSeed));
  bench::print_machine();
#if defined(TESSERA_HAVE_DNNL)
  {
    const dnnl_version_t* v = dnnl_version();
    std::printf("oneDNN  : %d.%d.%d (cpu runtime %s)\n", v->major, v->minor, v->patch,
                v->cpu_runtime == DNNL_RUNTIME_OMP ? "OpenMP" : "other");
  }
#endif
  std::printf("torch   : %s\n", torch_side::describe().c_str());
  std::printf("timing  : median of N calls per side (N so that ~%.2f s per side, %d <= N <= %d), "
              "after 2 warm-up calls; sides alternate in 3 blocks; one process per thread count\n",
              timing.target_s, timing.min_reps, timing.max_reps);
  std::printf("matmul  : shape M x K x N, C(M,N) = A(M,K) B(K,N), row-major, no transposes; "
              "rate = 2MNK/t\n");
  std::printf("row ops : rate = compulsory bytes/t (inputs read once + outputs written once); "
              "cross_entropy = mean loss + dlogits\n");
  std::printf("memory  : %s\n",
              warm_heap ? "warm heap (GLIBC_TUNABLES keep freed memory: an output reuses the last "
                          "call's pages)"
                        : "fresh pages (glibc defaults: large outputs are mmapped anew on every call)");
  std::printf("ratio   : torch time / tessera time (> 1: tessera faster); rel.diff = "
              "max|tessera - torch| / max|torch|\n\n");
#if !defined(TESSERA_BENCH_SOFTMAX) || !defined(TESSERA_BENCH_NORM) || !defined(TESSERA_BENCH_CROSS_ENTROPY)
  std::printf("note    : some op headers were missing when this was built; their rows are absent\n\n");
#endif
  std::fflush(stdout);

  const std::vector<Case> cs = cases(o);
  const std::string self = bench::own_executable("tessera_bench");
  if (self.empty()) return 1;
  std::vector<std::pair<size_t, Row>> collected;
  bool ok = true;
  for (int t : o.threads) {
    std::fprintf(stderr, "tessera_bench: measuring at %d thread(s)...\n", t);
    if (!run_child(self.c_str(), o, t, cs, collected)) {
      std::fprintf(stderr, "tessera_bench: the %d-thread run failed\n", t);
      ok = false;
    }
  }
  // The table: cases in order, each case's thread counts next to each other.
  std::stable_sort(collected.begin(), collected.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<Row> rows;
  print_header();
  for (const auto& [ci, r] : collected) {
    print_row(r);
    rows.push_back(r);
  }
  print_targets(rows);
  std::printf("\nload average at end: %s\n", load_average().c_str());
  return ok ? 0 : 1;
}

// benchmarks/block_bench.cpp — one pre-norm decoder block, tessera next to the same block written
// in LibTorch 1.13, forward and forward + backward.
//
// What it answers (issue 3): how long does nn::TransformerBlock<float, CausalFull, Ffn> take on
// batch 4 x 512 tokens, d_model 512, 8 heads (8 kv heads, head_dim 64), with a dense SwiGLU FFN
// of width 2048 and with a mixture of experts (8 experts, top-2, TopKSoftmax, no shared expert,
// expert width 1024 by default: the decoder configs' `moe_hidden` rule, ffn_hidden / top_k, so
// that a token does the dense block's FFN work), and how does that compare with the block a
// LibTorch user writes (torch_side.hpp: LlamaRMSNorm, rotate_half RoPE, matmul + masked softmax
// attention, SwiGLU, Mixtral's per-expert gather loop, autograd for backward)? The target is
// tessera >= 1.5x LibTorch.
//
// Both sides read the very same bytes: the block's weights (tessera's, seeded) and x, dy
// (seeded N(0, 1)) are wrapped by LibTorch with from_blob. rel.diff = max|tessera - torch| /
// max|torch| over y (forward) and y, dx, dwq, dw_down (forward + backward; w_down of the dense
// FFN or of expert 0) shows both computed the same block.
//
// What a call does. tessera: block.forward(x, saved) (+ block.backward(dy, saved), which
// accumulates into the grads; zero_grad is not timed). LibTorch: the forward (+ grads reset to
// none, y.backward(dy)). Both keep what backward needs (tessera's Saved, autograd's graph).
//
// Timing: one untimed warm-up call per side, then --repeat rounds that alternate the sides; each
// timed call starts after --settle seconds idle (OpenBLAS's workers spin ~0.1 s after a product
// and would take the cores from the next call). Median (minimum). Each thread count runs in its
// own child process (oneDNN and OpenBLAS fix their parallelisation when first used; see
// tessera_bench), with OMP_NUM_THREADS / OPENBLAS_NUM_THREADS set. Glibc keeps freed memory (the
// warm-heap restart of tessera_bench) unless --fresh-pages.
//
// Usage: block_bench [--threads 1,2] [--repeat 5] [--settle 0.2] [--filter dense|moe]
//                    [--expert-hidden 1024] [--fresh-pages] [--profile] [--no-torch]
//   --profile: tessera only, the time of each sub-op of one forward and backward (where the time
//   goes), at the first thread count.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "bench_common.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/moe.hpp"
#include "tessera/nn/router.hpp"
#include "tessera/nn/transformer_block.hpp"
#include "tessera/ops/elementwise.hpp"
#include "tessera/ops/matmul.hpp"

namespace {

using bench::load_average;
using bench::Stat;

namespace nn = tessera::nn;
using tessera::Seed;
using tessera::Tensor;

constexpr uint64_t kSeed = 20261129;
constexpr int64_t kBatch = 4, kSeq = 512, kDModel = 512, kHeads = 8, kKvHeads = 8, kHidden = 2048;
constexpr int kExperts = 8, kTopK = 2;

using Moe = nn::MoE<nn::Experts<kExperts>, nn::TopK<kTopK>, nn::TopKSoftmax>;
using DenseBlock = nn::TransformerBlock<float, nn::CausalFull, nn::DenseFfn>;
using MoEBlock = nn::TransformerBlock<float, nn::CausalFull, Moe>;

struct Options {
  std::vector<int> threads{1, 2};
  int repeat = 5;
  double settle = 0.2;
  std::string filter;
  int64_t expert_hidden = kHidden / kTopK;
  bool fresh_pages = false;
  bool child = false;
  bool profile = false;
  bool torch = true;  // --no-torch: tessera alone (the torch column shows an empty call)
};

constexpr const char* kSynopsis =
    " [--threads 1,2] [--repeat 5] [--settle 0.2] [--filter dense|moe]\n"
    "          [--expert-hidden 1024] [--fresh-pages] [--profile] [--no-torch]\n";

// Counts (--repeat, --expert-hidden) above this are typing errors, not experiments.
constexpr int64_t kMaxCount = 1 << 20;

Options parse(int argc, char** argv) {
  Options o;
  bench::Args args(argc, argv, "block_bench", kSynopsis);
  while (args.next()) {
    const std::string& a = args.flag();
    if (a == "--threads") {
      o.threads = args.thread_counts();
    } else if (a == "--repeat") {
      o.repeat = static_cast<int>(args.positive(kMaxCount));
    } else if (a == "--settle") {
      o.settle = args.seconds(10);
    } else if (a == "--filter") {
      o.filter = args.value();
    } else if (a == "--expert-hidden") {
      o.expert_hidden = args.positive(kMaxCount);
    } else if (a == "--fresh-pages") {
      o.fresh_pages = true;
    } else if (a == "--child") {
      o.child = true;
    } else if (a == "--profile") {
      o.profile = true;
    } else if (a == "--no-torch") {
      o.torch = false;
    } else if (a == "--help" || a == "-h") {
      args.usage();
    } else {
      args.unknown();
    }
  }
  return o;
}

// ---- one case ---------------------------------------------------------------------------------

struct Row {
  std::string ffn;   // "dense" or "moe"
  bool backward = false;
  int threads = 0;
  Stat tessera, torch;
  double diff = NAN;
  double ratio() const { return torch.median / tessera.median; }
};

std::vector<float> as_vector(const Tensor<float>& t) {
  return std::vector<float>(t.data(), t.data() + t.numel());
}

nn::BlockOptions block_options() {
  nn::BlockOptions o;
  o.attention.max_seq = kSeq;
  return o;
}

// A (batch, seq, d_model) N(0, 1) tensor from stream `subsequence` of kSeed: x is stream 1, dy 2.
Tensor<float> block_input(uint64_t subsequence) {
  auto t = Tensor<float>::empty({kBatch, kSeq, kDModel});
  tessera::fill_normal<float>(t.data(), t.numel(), Seed{kSeed}, subsequence, 0.0f, 1.0f);
  return t;
}

template <class Block>
torch_side::BlockPointers pointers(Block& block) {
  torch_side::BlockPointers p;
  p.norm1 = block.norm1().weight.value.data();
  p.wq = block.attn().wq().value.data();
  p.wk = block.attn().wk().value.data();
  p.wv = block.attn().wv().value.data();
  p.wo = block.attn().wo().value.data();
  p.norm2 = block.norm2().weight.value.data();
  auto ffn = [](auto& f) {
    return torch_side::FfnPointers{f.w_gate.value.data(), f.w_up.value.data(),
                                   f.w_down.value.data()};
  };
  if constexpr (Block::kMoE) {
    p.router = block.ffn().router().gate.value.data();
    for (int e = 0; e < kExperts; ++e) p.experts.push_back(ffn(block.ffn().expert(e)));
  } else {
    p.dense = ffn(block.ffn());
  }
  return p;
}

template <class Block>
Tensor<float>& down_grad(Block& block) {
  if constexpr (Block::kMoE) {
    return block.ffn().expert(0).w_down.grad;
  } else {
    return block.ffn().w_down.grad;
  }
}

template <class Block>
Row measure(const char* name, bool backward, int threads, const Options& o) {
  const int64_t hidden = Block::kMoE ? o.expert_hidden : kHidden;
  Block block(kDModel, kHeads, kKvHeads, hidden, Seed{kSeed}, 1, block_options());
  const Tensor<float> x = block_input(1);
  const Tensor<float> dy = block_input(2);

  torch_side::BlockShape shape;
  shape.batch = kBatch;
  shape.seq = kSeq;
  shape.d_model = kDModel;
  shape.heads = kHeads;
  shape.kv_heads = kKvHeads;
  shape.hidden = hidden;
  shape.experts = Block::kMoE ? kExperts : 0;
  shape.top_k = kTopK;
  shape.eps = 1e-6;
  shape.rope_theta = block_options().attention.rope.theta;
  torch_side::Bench torch_bench =
      torch_side::block_f32(x.data(), dy.data(), shape, pointers(block), backward);

  typename Block::Saved saved;
  Tensor<float> y, dx;
  auto tessera_run = [&] {
    y = block.forward(x, saved);
    if (backward) dx = block.backward(dy, saved);
  };
  Row row;
  row.ffn = name;
  row.backward = backward;
  row.threads = threads;
  const std::function<void()> torch_run = o.torch ? torch_bench.run : [] {};
  std::tie(row.tessera, row.torch) = bench::alternate(tessera_run, torch_run, o.repeat, o.settle);
  if (!o.torch) return row;

  // One clean call per side for the comparison (tessera's grads accumulate across calls).
  block.visit_parameters([](std::string_view, nn::Parameter<float>& p) { p.zero_grad(); });
  tessera_run();
  torch_bench.run();
  std::vector<std::vector<float>> ours{as_vector(y)};
  if (backward) {
    ours.push_back(as_vector(dx));
    ours.push_back(as_vector(block.attn().wq().grad));
    ours.push_back(as_vector(down_grad(block)));
  }
  row.diff = bench::relative_difference(ours, torch_bench.result());
  return row;
}

// ---- profile: where tessera's time goes ---------------------------------------------------------

// Times each sub-op of the block by calling the layers one by one (the block's own forward and
// backward are these calls plus three residual adds).
template <class Block>
void profile(const char* name, const Options& o) {
  const int64_t hidden = Block::kMoE ? o.expert_hidden : kHidden;
  Block block(kDModel, kHeads, kKvHeads, hidden, Seed{kSeed}, 1, block_options());
  const Tensor<float> x = block_input(1);
  const Tensor<float> dy = block_input(2);
  typename Block::Saved s;
  std::vector<std::pair<std::string, std::vector<double>>> parts;
  auto timed = [&](const std::string& what, auto&& f) {
    const auto t0 = std::chrono::steady_clock::now();
    auto r = f();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    auto it = std::find_if(parts.begin(), parts.end(), [&](auto& p) { return p.first == what; });
    if (it == parts.end()) {
      parts.push_back({what, {}});
      it = parts.end() - 1;
    }
    it->second.push_back(dt);
    return r;
  };
  for (int rep = 0; rep < o.repeat + 1; ++rep) {
    const Tensor<float> h1 = timed("fwd norm1", [&] { return block.norm1().forward(x, s.norm1); });
    typename Block::AttentionLayer::Saved& sa = s.attn;
    const Tensor<float> a = timed("fwd attention (projections + core)", [&] {
      return block.attn().forward(h1, sa);
    });
    timed("  of which core (Attention::core_forward)", [&] {
      block.attn().core_forward(sa);
      return 0;
    });
    const Tensor<float> h = timed("fwd residual add", [&] { return tessera::ops::add<float>(x, a); });
    const Tensor<float> h2 = timed("fwd norm2", [&] { return block.norm2().forward(h, s.norm2); });
    const Tensor<float> f = timed(std::string("fwd ffn (") + name + ")",
                                  [&] { return block.ffn().forward(h2, s.ffn); });
    (void)timed("fwd residual add ", [&] { return tessera::ops::add<float>(h, f); });
    Tensor<float> dh2;
    if constexpr (Block::kMoE) {
      dh2 = timed("bwd ffn", [&] { return block.ffn().backward(dy, s.ffn, 1.0); });
    } else {
      dh2 = timed("bwd ffn", [&] { return block.ffn().backward(dy, s.ffn); });
    }
    const Tensor<float> dn2 = timed("bwd norm2", [&] { return block.norm2().backward(dh2, s.norm2); });
    const Tensor<float> dh = timed("bwd residual add", [&] { return tessera::ops::add<float>(dy, dn2); });
    const Tensor<float> dh1 = timed("bwd attention", [&] { return block.attn().backward(dh, sa); });
    const Tensor<float> dn1 = timed("bwd norm1", [&] { return block.norm1().backward(dh1, s.norm1); });
    (void)timed("bwd residual add ", [&] { return tessera::ops::add<float>(dh, dn1); });
    // The block's own forward and backward, which should cost the sum of the parts above.
    typename Block::Saved whole;
    (void)timed("  whole block forward (for comparison)", [&] { return block.forward(x, whole); });
    (void)timed("  whole block backward (for comparison)", [&] { return block.backward(dy, whole); });
    if (rep == 0) parts.clear();  // the first pass is the warm-up
  }
  std::printf("\nprofile: %s block, %d thread(s), median of %d passes, ms\n", name,
              omp_get_max_threads(), o.repeat);
  double total = 0;
  for (auto& [what, v] : parts)
    if (what.rfind("  ", 0) != 0) total += bench::median(v);
  for (auto& [what, v] : parts)
    std::printf("  %-42s %8.2f  %5.1f%%\n", what.c_str(), bench::median(v) * 1e3,
                100.0 * bench::median(v) / total);
  std::printf("  %-42s %8.2f\n", "total (sub-ops, core counted once)", total * 1e3);
}

// ---- output -------------------------------------------------------------------------------------

void print_header() {
  std::printf(
      "| block             | pass    | thr | tessera ms      | torch ms          | ratio | "
      "rel.diff |\n"
      "|-------------------|---------|-----|-----------------|-------------------|-------|"
      "----------|\n");
}

void print_row(const Row& r) {
  char t[64], T[64];
  std::snprintf(t, sizeof t, "%.1f (%.1f)", r.tessera.median * 1e3, r.tessera.min * 1e3);
  std::snprintf(T, sizeof T, "%.1f (%.1f)", r.torch.median * 1e3, r.torch.min * 1e3);
  std::printf("| %-17s | %-7s | %3d | %-15s | %-17s | %5.2f | %8.1e |\n", r.ffn.c_str(),
              r.backward ? "fwd+bwd" : "fwd", r.threads, t, T, r.ratio(), r.diff);
}

// "ROW <ffn> <bwd> <thr> <t med> <t min> <T med> <T min> <diff>", as a child prints it.
void print_raw(const Row& r) {
  std::printf("ROW %s %d %d %.9e %.9e %.9e %.9e %.9e\n", r.ffn.c_str(), r.backward ? 1 : 0,
              r.threads, r.tessera.median, r.tessera.min, r.torch.median, r.torch.min, r.diff);
  std::fflush(stdout);
}

bool want(const Options& o, const char* name) {
  return o.filter.empty() || std::string(name).find(o.filter) != std::string::npos;
}

int child_main(const Options& o) {
  const int t = o.threads.front();
  bench::set_threads(t);
  if (o.profile) {
    if (want(o, "dense")) profile<DenseBlock>("dense", o);
    if (want(o, "moe")) profile<MoEBlock>("moe", o);
    return 0;
  }
  for (bool backward : {false, true}) {
    if (want(o, "dense")) print_raw(measure<DenseBlock>("dense", backward, t, o));
    if (want(o, "moe")) print_raw(measure<MoEBlock>("moe", backward, t, o));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const bool warm_heap = bench::use_warm_heap(argv, "block_bench", o.fresh_pages);
  if (o.child || o.profile) {
    if (o.profile && !o.child) bench::set_threads(o.threads.front());
    return child_main(o);
  }

  std::printf("block_bench: one pre-norm decoder block, tessera vs LibTorch (same weights and "
              "inputs, seed %llu)\n",
              static_cast<unsigned long long>(kSeed));
  bench::print_machine();
  std::printf("torch   : %s\n", torch_side::describe().c_str());
  std::printf("block   : batch %lld x %lld tokens, d_model %lld, %lld heads (%lld kv), head_dim "
              "%lld, CausalFull, float; dense FFN 2048; MoE %d experts top-%d TopKSoftmax, "
              "expert width %lld\n",
              static_cast<long long>(kBatch), static_cast<long long>(kSeq),
              static_cast<long long>(kDModel), static_cast<long long>(kHeads),
              static_cast<long long>(kKvHeads), static_cast<long long>(kDModel / kHeads),
              kExperts, kTopK, static_cast<long long>(o.expert_hidden));
  std::printf("timing  : 1 warm-up, %d alternating rounds, %.2f s idle before each timed call; "
              "ms = median (minimum); one process per thread count\n",
              o.repeat, o.settle);
  std::printf("memory  : %s\n", bench::heap_note(warm_heap));
  std::printf("ratio   : torch time / tessera time (> 1: tessera faster); rel.diff over y (fwd) "
              "or y, dx, dwq, dw_down (fwd+bwd)\n\n");
  std::fflush(stdout);

  const std::string self = bench::own_executable("block_bench");
  if (self.empty()) return 1;
  std::vector<Row> rows;
  bool ok = true;
  for (int t : o.threads) {
    std::string cmd = bench::child_command(self, t) + " --repeat " + std::to_string(o.repeat) +
                      " --settle " + std::to_string(o.settle) + " --expert-hidden " +
                      std::to_string(o.expert_hidden);
    if (o.fresh_pages) cmd += " --fresh-pages";
    if (!o.filter.empty()) cmd += " --filter " + bench::shell_quote(o.filter);
    if (!o.torch) cmd += " --no-torch";
    std::fprintf(stderr, "block_bench: measuring at %d thread(s)...\n", t);
    FILE* pipe = popen(cmd.c_str(), "r");
    if (pipe == nullptr) return 1;
    char line[512], ffn[64];
    while (std::fgets(line, sizeof line, pipe) != nullptr) {
      Row r;
      int bwd = 0;
      if (std::sscanf(line, "ROW %63s %d %d %lf %lf %lf %lf %lf", ffn, &bwd, &r.threads,
                      &r.tessera.median, &r.tessera.min, &r.torch.median, &r.torch.min,
                      &r.diff) != 8)
        continue;
      r.ffn = std::string(ffn) == "moe" ? "moe 8x top-2" : "dense SwiGLU 2048";
      r.backward = bwd != 0;
      std::fprintf(stderr, "  [%d thr] %s %s: ratio %.2f\n", t, r.ffn.c_str(),
                   r.backward ? "fwd+bwd" : "fwd", r.ratio());
      rows.push_back(r);
    }
    if (pclose(pipe) != 0) {
      std::fprintf(stderr, "block_bench: the %d-thread run failed\n", t);
      ok = false;
    }
  }
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
    return std::tie(a.ffn, a.backward) < std::tie(b.ffn, b.backward);
  });
  print_header();
  for (const Row& r : rows) print_row(r);
  double worst = INFINITY;
  const Row* w = nullptr;
  for (const Row& r : rows)
    if (r.ratio() < worst) {
      worst = r.ratio();
      w = &r;
    }
  if (w != nullptr)
    std::printf("\nTarget: tessera >= 1.5x LibTorch on every row: worst %.2fx (%s %s, %d thr) -> %s\n",
                worst, w->ffn.c_str(), w->backward ? "fwd+bwd" : "fwd", w->threads,
                worst >= 1.5 ? "MET" : "NOT MET");
  std::printf("load average at end: %s\n", load_average().c_str());
  return ok ? 0 : 1;
}

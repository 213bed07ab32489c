// 03 — Mixture of experts: routing, groups, load and balance
//
// What you will learn:
//   * an MoE layer is a type: MoE<Experts<16>, TopK<2>, Router, Balance, SharedExperts<1>>;
//   * each token runs only its top-k routed experts plus the shared one, so only a fraction
//     of the FFN's parameters is active per token;
//   * hierarchical (group-limited) routing first picks the best groups of experts for a token
//     and then its top-k experts inside them, so a token touches few groups (on a cluster: few
//     machines);
//   * DeepSeek-V3's auxiliary-loss-free balancing nudges a per-expert bias against the load
//     error after each step, and the load evens out without any extra loss term.
// (Top-4 makes the group limit visible: with top-2 a token could never reach more than two
// groups anyway.)
// The program checks every claim it prints and exits non-zero if one is false.
#include <tessera/tessera.hpp>

#include <cstdio>
#include <random>
#include <set>
#include <vector>

namespace ts = tessera;
namespace nn = tessera::nn;

static int failures = 0;
static void check(bool ok, const char* claim) {
  std::printf("  [%s] %s\n", ok ? "ok" : "FAILED", claim);
  failures += ok ? 0 : 1;
}

constexpr int kExperts = 16, kTopK = 4, kGroups = 4, kTopGroups = 2, kShared = 1;
constexpr int64_t kDModel = 32, kHidden = 64, kTokens = 2048;

using Hierarchical = nn::MoE<nn::Experts<kExperts>, nn::TopK<kTopK>,
                             nn::GroupLimited<kGroups, kTopGroups>, nn::BiasBalance,
                             nn::SharedExperts<kShared>>;
using Flat = nn::MoE<nn::Experts<kExperts>, nn::TopK<kTopK>, nn::TopKSigmoid, nn::NoBalance,
                     nn::SharedExperts<kShared>>;

// The largest number of expert groups any single token was sent to.
template <class Saved>
int max_groups_per_token(const Saved& saved) {
  const auto& chosen = saved.route.chosen;  // (tokens, top_k) expert ids
  int worst = 0;
  for (int64_t t = 0; t < chosen.dim(0); ++t) {
    std::set<int> groups;
    for (int64_t j = 0; j < chosen.dim(1); ++j)
      groups.insert(chosen(t, j) / (kExperts / kGroups));
    worst = std::max(worst, static_cast<int>(groups.size()));
  }
  return worst;
}

void print_load(const nn::MoEStats& st) {
  for (int g = 0; g < kGroups; ++g) {
    int64_t group_load = 0;
    std::printf("    group %d:", g);
    for (int e = g * kExperts / kGroups; e < (g + 1) * kExperts / kGroups; ++e) {
      std::printf(" %4lld", static_cast<long long>(st.load[e]));
      group_load += st.load[e];
    }
    std::printf("   (group total %lld)\n", static_cast<long long>(group_load));
  }
  std::printf("    load imbalance (max / mean): %.2f\n", st.load_imbalance());
}

int main() {
  // Token vectors with some structure: a few clusters, as real hidden states have, so that a
  // fresh router prefers some experts over others.
  std::mt19937 gen(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> centres(4 * kDModel);
  for (float& v : centres) v = 2.0f * normal(gen);
  auto x = ts::Tensor<float>::empty({kTokens, kDModel});
  for (int64_t t = 0; t < kTokens; ++t)
    for (int64_t c = 0; c < kDModel; ++c)
      x(t, c) = centres[(t % 4) * kDModel + c] + normal(gen);

  std::puts("Hierarchical routing: 16 experts in 4 groups, each token picks 2 groups, then its");
  std::puts("top 4 experts inside them; plus 1 shared expert every token runs.");
  Hierarchical::Layer<float> moe(kDModel, kHidden, ts::Seed{3}, /*subsequence=*/0);
  Hierarchical::Layer<float>::Saved saved;
  (void)moe.forward(x.view(), saved);
  std::puts("  assignments per expert:");
  print_load(saved.stats);
  int64_t total = 0;
  for (int64_t v : saved.stats.load) total += v;
  check(total == kTokens * kTopK, "every token made exactly top-k assignments");
  check(max_groups_per_token(saved) <= kTopGroups, "no token reached more than 2 groups");
  const double nominal = double(kTopK + kShared) / double(kExperts + kShared);
  std::printf("  active FFN parameters per token: %.4f (= (k + shared) / (experts + shared) "
              "= 5/17 = %.4f)\n",
              saved.stats.active_fraction, nominal);
  check(std::abs(saved.stats.active_fraction - nominal) < 1e-12,
        "without a capacity limit every token uses k routed experts and the shared one");

  Flat::Layer<float> flat(kDModel, kHidden, ts::Seed{3}, 0);
  Flat::Layer<float>::Saved flat_saved;
  (void)flat.forward(x.view(), flat_saved);
  const int flat_groups = max_groups_per_token(flat_saved);
  std::printf("  for comparison, flat top-4 routing sends some token to %d different groups\n",
              flat_groups);
  check(flat_groups > kTopGroups, "without the group limit, tokens spread over more groups");

  std::puts("\nAuxiliary-loss-free balancing: after each step, bias += gamma * sign(mean - load).");
  const double before = saved.stats.load_imbalance();
  for (int step = 1; step <= 300; ++step) {
    moe.update_bias(saved.stats);  // the caller does this once per training step
    (void)moe.forward(x.view(), saved);
    if (step % 100 == 0)
      std::printf("  step %3d: load imbalance %.2f\n", step, saved.stats.load_imbalance());
  }
  std::puts("  assignments per expert after 300 steps:");
  print_load(saved.stats);
  check(saved.stats.load_imbalance() < before, "the bias evened out the load");

  std::printf("%s\n", failures ? "SOME CHECKS FAILED" : "all checks passed");
  return failures ? 1 : 0;
}

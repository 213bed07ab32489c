// tests/infer/test_kv_cache_windows.cpp — the KV cache under every fixed causal window policy:
// forward_cached fed in chunks (1, 3, the rest; blocks of 16 and of 4 positions) gives
// Decoder::forward's logits at every position for CausalFull, SlidingWindow<5> and
// LocalGlobal<4, 3>, and for a config whose layers have different windows. The full forward
// runs tessera's tiled attention kernel, which skips key tiles outside the window; the cache
// path masks each key with the policy's `allowed`. (Its own program: four more Decoder
// instantiations.) VariableWindow and MoE blocks are refused at compile time.
#define BOOST_TEST_MODULE kv_cache_windows
#include <boost/test/unit_test.hpp>

#include <type_traits>
#include <vector>

#include "cache_check.hpp"

namespace ts = tessera;

namespace {

struct Tiny {
  static constexpr int vocab = 97, d_model = 48, layers = 3, heads = 6, kv_heads = 2;
  static constexpr int ffn_hidden = 40, max_seq = 64, attention_block = 8;
  static constexpr bool tie_embeddings = true;
  static constexpr double rope_theta = 500.0, norm_eps = 1e-5;
};
struct TinySliding : Tiny {
  using Window = ts::nn::SlidingWindow<5>;
};
struct TinyLocalGlobal : Tiny {
  using Window = ts::nn::LocalGlobal<4, 3>;
};
// Per-layer windows (models/config.hpp's WindowAt): sliding, local-global, full.
struct TinyPerLayer : Tiny {
  template <int Layer>
  using WindowAt = std::conditional_t<
      Layer == 0, ts::nn::SlidingWindow<3>,
      std::conditional_t<Layer == 1, ts::nn::LocalGlobal<6, 2>, ts::nn::CausalFull>>;
};

template <class Config>
void check() {
  ts::Decoder<Config> model{ts::Seed{11}};
  // Larger weights than the default init, so attention is far from uniform and a wrong mask
  // shows.
  model.visit_parameters([](std::string_view, ts::nn::Parameter<float>& p) {
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data()[i] *= 4.0f;
  });
  std::vector<int32_t> seq;
  for (int i = 0; i < 29; ++i) seq.push_back((i * 37 + 11) % Config::vocab);
  ts::test::check_cache_against_full(model, seq, 2e-5);
  ts::test::check_cache_against_full(model, seq, 2e-5, 4);
}

}  // namespace

BOOST_AUTO_TEST_CASE(causal_full) { check<Tiny>(); }
BOOST_AUTO_TEST_CASE(sliding_window_5) { check<TinySliding>(); }
BOOST_AUTO_TEST_CASE(local_global_4_3) { check<TinyLocalGlobal>(); }
BOOST_AUTO_TEST_CASE(per_layer_windows) { check<TinyPerLayer>(); }

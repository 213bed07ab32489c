// tests/models/config_compile_fail.cpp — a bad config is rejected at compile time with a
// message that says what to change.
//
// Built once without a macro (the good configs must compile) and once per bad config with
// -DTESSERA_BAD_CONFIG=<Name> (checked as a decoder config) or -DTESSERA_BAD_ENCODER=<Name>
// (checked as an encoder config); CTest runs each build and requires the compiler's output to
// contain the rule's static_assert message (tests/models/CMakeLists.txt). Only the config
// header is included, so each build is a few seconds.
#include <type_traits>

#include "tessera/models/config.hpp"

namespace ts = tessera;

namespace {

struct Good {
  static constexpr int vocab = 256, d_model = 64, layers = 4, heads = 4, kv_heads = 2;
  static constexpr int dense_layers = 1;
  using Window = ts::VariableWindow<ts::Sizes<64, 256, ts::kFull>, ts::HeuristicSelector>;
  using Ffn = ts::MoE<ts::Experts<8>, ts::TopK<2>, ts::GroupLimited<4, 2>, ts::AuxLossBalance>;
};
struct GoodEncoder {
  static constexpr int vocab = 256, d_model = 64, layers = 2, heads = 4, classes = 2;
};

struct HeadsDoNotDivide : Good { static constexpr int heads = 6, kv_heads = 6; };
struct KvHeadsDoNotDivide : Good { static constexpr int kv_heads = 3; };
struct OddHeadDim : Good { static constexpr int d_model = 12, heads = 4, kv_heads = 4; };
struct TopKAboveExperts : Good { using Ffn = ts::MoE<ts::Experts<4>, ts::TopK<5>, ts::TopKSoftmax>; };
struct WindowSizesNotIncreasing : Good {
  using Window = ts::VariableWindow<ts::Sizes<512, 128, ts::kFull>, ts::LearnedSelector>;
};
struct DenseLayersAboveLayers : Good { static constexpr int dense_layers = 5; };
struct BidirectionalDecoder : Good { using Window = ts::Bidirectional; };
// Per-layer windows: layer 2 of 4 bidirectional, in a decoder.
struct BidirectionalLayer : Good {
  template <int Layer>
  using WindowAt = std::conditional_t<Layer == 2, ts::Bidirectional, ts::SlidingWindow<128>>;
};
struct GoodLayered : Good {
  template <int Layer>
  using WindowAt = std::conditional_t<Layer % 2 == 0, ts::SlidingWindow<128>, Window>;
};
struct MissingVocab { static constexpr int d_model = 64, layers = 1, heads = 4; };
struct OneClass : GoodEncoder { static constexpr int classes = 1; };

}  // namespace

#if defined(TESSERA_BAD_CONFIG)
static_assert(ts::check_decoder_config<TESSERA_BAD_CONFIG>());
#elif defined(TESSERA_BAD_ENCODER)
static_assert(ts::check_encoder_config<TESSERA_BAD_ENCODER>());
#else
static_assert(ts::check_decoder_config<Good>());
static_assert(ts::check_decoder_config<GoodLayered>() && ts::DecoderConfig<GoodLayered>);
static_assert(!ts::DecoderConfig<BidirectionalLayer>);
static_assert(ts::check_encoder_config<GoodEncoder>());
static_assert(ts::DecoderConfig<Good> && ts::EncoderConfig<GoodEncoder>);
#endif

int main() { return 0; }

// tests/models/test_config.cpp — the config concepts and the defaults of models/config.hpp.
// Most checks are compile-time (a failing one stops the build of this test); the run-time cases
// print the resolved values. The readable messages of a rejected config are checked by the
// compile-fail tests (config_compile_fail.cpp).
#define BOOST_TEST_MODULE test_config
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <type_traits>

#include "tessera/models/config.hpp"

namespace ts = tessera;
namespace models = tessera::models;

namespace {

// The API sketch's model, spelled as a user would.
struct TinyR1 {
  static constexpr int vocab = 8192, d_model = 256, layers = 6;
  static constexpr int heads = 8, kv_heads = 2, max_seq = 16384, dense_layers = 1;
  using Window = ts::VariableWindow<ts::Sizes<128, 512, 2048, ts::kFull>, ts::LearnedSelector>;
  using Ffn = ts::MoE<ts::Experts<16>, ts::TopK<2>, ts::GroupLimited<4, 2>, ts::BiasBalance,
                      ts::SharedExperts<1>>;
};
// Variants are one line each.
struct TinyR1Sliding : TinyR1 { using Window = ts::SlidingWindow<512>; };
struct TinyR1Dense : TinyR1 { using Ffn = ts::DenseFfn; };
struct TinyR1Mqa : TinyR1 { static constexpr int kv_heads = 1; };

// The smallest decoder: four numbers.
struct Minimal {
  static constexpr int vocab = 1, d_model = 2, layers = 1, heads = 1;
};
struct Classifier {
  static constexpr int vocab = 256, d_model = 64, layers = 2, heads = 4, classes = 2;
};

static_assert(ts::DecoderConfig<TinyR1>);
static_assert(ts::DecoderConfig<TinyR1Sliding>);
static_assert(ts::DecoderConfig<TinyR1Dense>);
static_assert(ts::DecoderConfig<TinyR1Mqa>);
static_assert(ts::DecoderConfig<Minimal>);
static_assert(ts::check_decoder_config<TinyR1>());
static_assert(ts::EncoderConfig<Classifier>);
static_assert(ts::check_encoder_config<Classifier>());
static_assert(!ts::EncoderConfig<TinyR1>);      // no classes

// One broken rule each; the concept names the rule (see rules::) and says false.
struct NoVocab { static constexpr int d_model = 8, layers = 1, heads = 2; };
struct ZeroVocab : Minimal { static constexpr int vocab = 0; };
struct HeadsDoNotDivide : TinyR1 { static constexpr int heads = 7, kv_heads = 7; };
struct KvDoNotDivide : TinyR1 { static constexpr int kv_heads = 3; };
struct TooManyDense : TinyR1 { static constexpr int dense_layers = 7; };
struct TopKAboveExperts : TinyR1 { using Ffn = ts::MoE<ts::Experts<4>, ts::TopK<5>, ts::TopKSoftmax>; };
struct GroupsDoNotDivide : TinyR1 {
  using Ffn = ts::MoE<ts::Experts<10>, ts::TopK<2>, ts::GroupLimited<4, 2>>;
};
struct TopKAboveGroups : TinyR1 {
  using Ffn = ts::MoE<ts::Experts<8>, ts::TopK<3>, ts::GroupLimited<4, 1>>;
};
struct SizesDescending : TinyR1 {
  using Window = ts::VariableWindow<ts::Sizes<512, 128>, ts::LearnedSelector>;
};
struct BidirectionalDecoder : TinyR1 { using Window = ts::Bidirectional; };
struct IntScalar : Minimal { using Scalar = int; };
struct NotAnFfn : Minimal { using Ffn = int; };
struct OneClass : Classifier { static constexpr int classes = 1; };

static_assert(!ts::DecoderConfig<NoVocab>);
static_assert(!ts::DecoderConfig<ZeroVocab>);
static_assert(!ts::DecoderConfig<HeadsDoNotDivide>);
static_assert(!models::rules::HeadsDivideDModel<HeadsDoNotDivide>);
static_assert(!ts::DecoderConfig<KvDoNotDivide>);
static_assert(!models::rules::KvHeadsDivideHeads<KvDoNotDivide>);
static_assert(!ts::DecoderConfig<TooManyDense>);
static_assert(!ts::DecoderConfig<TopKAboveExperts>);
static_assert(!ts::DecoderConfig<GroupsDoNotDivide>);
static_assert(!ts::DecoderConfig<TopKAboveGroups>);
static_assert(!ts::DecoderConfig<SizesDescending>);
static_assert(!ts::DecoderConfig<BidirectionalDecoder>);
static_assert(ts::EncoderConfig<BidirectionalDecoder> == false);  // and no classes either
static_assert(!ts::DecoderConfig<IntScalar>);
static_assert(!ts::DecoderConfig<NotAnFfn>);
static_assert(!ts::EncoderConfig<OneClass>);

// head_dim odd with heads dividing d_model: d_model 6, heads 2 -> head_dim 3.
struct OddHeadDim : Minimal { static constexpr int d_model = 6, heads = 2; };
static_assert(models::rules::HeadsDivideDModel<OddHeadDim> && !models::rules::HeadDimEven<OddHeadDim>);
static_assert(!ts::DecoderConfig<OddHeadDim>);

using R = models::ResolvedConfig<TinyR1, models::DecoderDefaultWindow>;
using RMin = models::ResolvedConfig<Minimal, models::DecoderDefaultWindow>;
using RClf = models::ResolvedConfig<Classifier, models::EncoderDefaultWindow>;

}  // namespace

BOOST_AUTO_TEST_CASE(resolved_values_and_defaults) {
  // Given values are kept.
  BOOST_TEST(R::vocab == 8192);
  BOOST_TEST(R::kv_heads == 2);
  BOOST_TEST(R::head_dim == 32);
  BOOST_TEST(R::dense_layers == 1);
  BOOST_TEST(R::max_seq == 16384);
  // SwiGLU width: ceil(8/3 * 256) = 683, rounded up to a multiple of 8.
  BOOST_TEST(R::ffn_hidden == 688);
  // Expert width: the dense width over the top-2 + 1 shared experts a token uses, rounded up.
  BOOST_TEST(R::moe_hidden == 230);
  BOOST_TEST(R::kMoE);
  BOOST_TEST(R::experts == 16);
  BOOST_TEST(R::top_k == 2);
  BOOST_TEST(R::shared_experts == 1);
  BOOST_TEST((std::is_same_v<R::Scalar, float>));
  // Defaults of the minimal config.
  BOOST_TEST(RMin::kv_heads == 1);
  BOOST_TEST(RMin::ffn_hidden == 8);  // ceil(16 / 3) = 6 -> 8
  BOOST_TEST(RMin::moe_hidden == RMin::ffn_hidden);
  BOOST_TEST(!RMin::kMoE);
  BOOST_TEST(RMin::max_seq == 4096);
  BOOST_TEST(RMin::dense_layers == 0);
  BOOST_TEST(!RMin::tie_embeddings);
  BOOST_TEST(RMin::rope_theta == 10000.0);
  BOOST_TEST(RMin::norm_eps == 1e-6);
  BOOST_TEST(RMin::attention_block == 64);
  BOOST_TEST(RMin::capacity_factor == 0.0);
  BOOST_TEST(RMin::window_penalty < 0.0);  // keep the selector's own default
  BOOST_TEST((std::is_same_v<RMin::Window, ts::CausalFull>));
  BOOST_TEST((std::is_same_v<RMin::Ffn, ts::DenseFfn>));
  // An encoder's window defaults to bidirectional.
  BOOST_TEST((std::is_same_v<RClf::Window, ts::Bidirectional>));
  BOOST_TEST(RClf::classes == 2);
}

BOOST_AUTO_TEST_CASE(default_ffn_width) {
  // ceil(8 d / 3) rounded up to a multiple of 8, checked against the formula in doubles.
  for (int64_t d = 1; d <= 4096; d += 37) {
    const int64_t want = static_cast<int64_t>(std::ceil(std::ceil(8.0 * double(d) / 3.0) / 8.0)) * 8;
    BOOST_TEST(models::config_detail::default_ffn_hidden(d) == want);
  }
}

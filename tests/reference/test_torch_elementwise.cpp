// LibTorch cross-checks of the element-wise ops (add, mul, scale, add_scaled, add_bias), the
// number-format casts and top-k, forward and backward, in float and bf16.
#define BOOST_TEST_MODULE torch_elementwise
#include <bit>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "cross_check.hpp"
#include "tessera/ops/cast.hpp"
#include "tessera/ops/elementwise.hpp"
#include "tessera/ops/topk.hpp"

using namespace tessera;
using namespace tessera::cross_check;

BOOST_TEST_GLOBAL_FIXTURE(TorchSetup);

namespace {

using Types = std::tuple<float, bf16>;

// ---- tolerances ---------------------------------------------------------------------------------
// One arithmetic operation per element on both sides (a + b, a * b, alpha * x with the
// scalar used as a float) from the same inputs, computed in float and rounded once: the
// results are bit-identical (IEEE arithmetic is exact-then-round) in float and in bf16, so the
// tolerance is zero. a + alpha * b is two operations, which either side may contract into an
// fma: one float rounding of alpha * b apart (2 float eps of the scale where a + alpha * b
// cancels). The bias gradient is a sum over rows: float sums in a different order differ by a
// few eps of the sum (rows <= 35 here: 64 eps). bf16: the float difference plus one bf16 ulp
// of the element (for_type in cross_check.hpp).
template <class T>
Tolerance exact() {
  return {0.0, 0.0};
}
template <class T>
Tolerance one_rounding() {
  return for_type<T>({2 * kFloatEps, 2 * kFloatEps});
}
template <class T>
Tolerance row_sum() {
  return for_type<T>({64 * kFloatEps, 64 * kFloatEps});
}

const std::vector<Shape> kShapes = {{7}, {5, 11}, {3, 7, 13}};

}  // namespace

BOOST_AUTO_TEST_SUITE(elementwise)

BOOST_AUTO_TEST_CASE_TEMPLATE(add_mul_scale, T, Types) {
  for (const Shape& shape : kShapes) {
    const std::string tag = "<" + name_of<T>() + "> " + shape.str();
    Gen gen("add_mul_scale" + tag);
    auto a = normal<T>(gen, shape), b = normal<T>(gen, shape), dy = normal<T>(gen, shape);
    constexpr Precision p = precision_of<T>;
    {
      auto y = ops::add<T>(a.tensor, b.tensor);
      auto g = ops::add_backward<T>(dy.tensor);
      auto ref = torch_ref::add(a.array, b.array, dy.array, p);
      check_close("add" + tag + " y", y, ref.y, exact<T>());
      check_close("add" + tag + " da", g.da, ref.da, exact<T>());
      check_close("add" + tag + " db", g.db, ref.db, exact<T>());
    }
    {
      auto y = ops::mul<T>(a.tensor, b.tensor);
      auto g = ops::mul_backward<T>(dy.tensor, a.tensor, b.tensor);
      auto ref = torch_ref::mul(a.array, b.array, dy.array, p);
      check_close("mul" + tag + " y", y, ref.y, exact<T>());
      check_close("mul" + tag + " da", g.da, ref.da, exact<T>());
      check_close("mul" + tag + " db", g.db, ref.db, exact<T>());
    }
    {
      // A scale that is not a power of two, so the product really rounds.
      const double alpha = -0.7071067811865476;
      auto y = ops::scale<T>(a.tensor, alpha);
      auto dx = ops::scale_backward<T>(dy.tensor, alpha);
      auto ref = torch_ref::scale(a.array, alpha, dy.array, p);
      check_close("scale" + tag + " y", y, ref.y, exact<T>());
      check_close("scale" + tag + " dx", dx, ref.dx, exact<T>());
    }
    {
      const double alpha = 0.3;
      auto y = ops::add_scaled<T>(a.tensor, b.tensor, alpha);
      auto g = ops::add_scaled_backward<T>(dy.tensor, alpha);
      auto ref = torch_ref::add_scaled(a.array, b.array, alpha, dy.array, p);
      check_close("add_scaled" + tag + " y", y, ref.y, one_rounding<T>());
      check_close("add_scaled" + tag + " da", g.da, ref.da, exact<T>());
      check_close("add_scaled" + tag + " db", g.db, ref.db, one_rounding<T>());
    }
  }
}

// add_bias is LibTorch's broadcasting x + bias; its bias gradient is autograd's sum over the
// broadcast axes.
BOOST_AUTO_TEST_CASE_TEMPLATE(add_bias, T, Types) {
  for (const Shape& shape : {Shape{13}, Shape{5, 11}, Shape{5, 7, 13}}) {
    const std::string tag = "add_bias<" + name_of<T>() + "> " + shape.str();
    Gen gen(tag);
    auto x = normal<T>(gen, shape), bias = normal<T>(gen, {shape[-1]}), dy = normal<T>(gen, shape);
    auto y = ops::add_bias<T>(x.tensor, bias.tensor);
    auto g = ops::add_bias_backward<T>(dy.tensor);
    auto ref = torch_ref::add(x.array, bias.array, dy.array, precision_of<T>);
    check_close(tag + " y", y, ref.y, exact<T>());
    check_close(tag + " dx", g.dx, ref.da, exact<T>());
    check_close(tag + " dbias", g.dbias, ref.db, row_sum<T>());
  }
}

// Strided inputs (a transposed view) must give the same answer as contiguous ones.
BOOST_AUTO_TEST_CASE_TEMPLATE(strided_views, T, Types) {
  Gen gen("strided<" + name_of<T>() + ">");
  auto a = normal<T>(gen, {11, 5}), b = normal<T>(gen, {5, 11}), dy = normal<T>(gen, {5, 11});
  auto at = a.tensor.transpose(0, 1);  // (5, 11), strided
  auto y = ops::mul<T>(at, b.tensor);
  auto g = ops::mul_backward<T>(dy.tensor, at, b.tensor);
  auto ref = torch_ref::mul(to_array<T>(at), b.array, dy.array, precision_of<T>);
  check_close("mul strided y", y, ref.y, exact<T>());
  check_close("mul strided da", g.da, ref.da, exact<T>());
  check_close("mul strided db", g.db, ref.db, exact<T>());
}

BOOST_AUTO_TEST_SUITE_END()

// ---- casts -------------------------------------------------------------------------------------

namespace {

// Bit-for-bit equality of two float arrays holding converted values, with every NaN equal to
// every NaN (tessera's canonical NaN is 0x7FFF for bf16 and fp16, LibTorch's bf16 NaN is
// 0x7FC0; both are quiet NaNs and nothing should depend on the payload). -0 and +0 differ.
void check_bits(const std::string& what, const Array& actual, const Array& expected) {
  BOOST_REQUIRE(actual.shape == expected.shape);
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < actual.data.size(); ++i) {
    const float a = actual.data[i], e = expected.data[i];
    const bool same = (std::isnan(a) && std::isnan(e)) ||
                      std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(e);
    if (!same && bad++ == 0) first = static_cast<int64_t>(i);
  }
  BOOST_TEST(bad == 0,
             what << ": " << bad << " of " << actual.numel()
                  << " conversions differ from LibTorch's; first at " << first << ": tessera "
                  << (first >= 0 ? actual.data[first] : 0.0f) << " (0x" << std::hex
                  << (first >= 0 ? std::bit_cast<uint32_t>(actual.data[first]) : 0u)
                  << "), LibTorch " << (first >= 0 ? expected.data[first] : 0.0f) << " (0x"
                  << (first >= 0 ? std::bit_cast<uint32_t>(expected.data[first]) : 0u) << std::dec
                  << ") (seed " << run_seed() << ")");
}

// Floats that exercise every rounding path: random magnitudes over the whole exponent range
// (normals, the formats' subnormals and underflow to zero, overflow), exact ties of each
// format's rounding (dropped bits exactly half an ulp, both parities), ±0, ±inf, NaN, and
// the extremes of float.
std::vector<float> conversion_inputs(Gen& gen, int n_random) {
  std::vector<float> v = {0.0f,
                          -0.0f,
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(),
                          std::numeric_limits<float>::max(),
                          -std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(),
                          65504.0f,   // fp16 max
                          65520.0f,   // rounds to fp16 inf (the tie above max)
                          65519.99f,  // rounds down to fp16 max
                          0x1.0p-24f,
                          0x1.0p-25f,
                          0x1.8p-25f,
                          0x1.0p-14f};
  for (int i = 0; i < n_random; ++i) {
    const double mag = std::ldexp(gen.uniform(1.0, 2.0), static_cast<int>(gen.integer(-149, 127)));
    const float f = static_cast<float>(gen.integer(0, 1) ? mag : -mag);
    uint32_t u = std::bit_cast<uint32_t>(f);
    switch (i % 4) {
      case 0:
        u = (u & ~0xFFFFu) | 0x8000u;
        break;  // bf16 tie
      case 1:
        u = (u & ~0x1FFFu) | 0x1000u;
        break;  // fp16 tie (normal range)
      default:
        break;  // random low bits
    }
    if ((u & 0x7F800000u) == 0x7F800000u) u &= ~0x00800000u;  // keep it finite
    v.push_back(std::bit_cast<float>(u));
  }
  return v;
}

template <class To>
torch_ref::Format format_of() {
  if constexpr (std::is_same_v<To, float>)
    return torch_ref::Format::kFloat32;
  else if constexpr (std::is_same_v<To, bf16>)
    return torch_ref::Format::kBFloat16;
  else
    return torch_ref::Format::kFloat16;
}

// cast<To>(x) against x.to(dtype); the gradient of a cast is the reverse cast of dy, which
// autograd does for LibTorch and ops::cast<From> does for tessera.
template <class From, class To>
void check_cast(const std::string& name, const Tensor<From>& x, Gen& gen) {
  auto y = ops::cast<To>(x);
  Tensor<To> dy = ops::cast<To>(normal<float>(gen, x.shape()).tensor);
  auto dx = ops::cast<From>(dy);
  auto ref = torch_ref::cast(to_array(x), format_of<From>(), format_of<To>(), to_array(dy));
  check_bits(name + " y", to_array(y), ref.y);
  check_bits(name + " dx", to_array(dx), ref.dx);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(cast)

BOOST_AUTO_TEST_CASE(float_to_bf16_and_fp16_bit_exact) {
  Gen gen("cast");
  const std::vector<float> values = conversion_inputs(gen, 20000);
  const auto x = Tensor<float>::from({static_cast<int64_t>(values.size())}, values);
  check_cast<float, bf16>("cast float->bf16", x, gen);
  check_cast<float, fp16>("cast float->fp16", x, gen);
  // And back: every bf16 / fp16 value the conversion produced, widened exactly.
  check_cast<bf16, float>("cast bf16->float", ops::cast<bf16>(x), gen);
  check_cast<fp16, float>("cast fp16->float", ops::cast<fp16>(x), gen);
}

// Every one of the 65536 bf16 and fp16 codes, widened to float.
BOOST_AUTO_TEST_CASE(every_16_bit_code_widens_exactly) {
  Gen gen("cast all codes");
  auto b = Tensor<bf16>::empty({65536});
  auto h = Tensor<fp16>::empty({65536});
  for (uint32_t c = 0; c < 65536; ++c) {
    b.data()[c] = bf16::from_bits(static_cast<uint16_t>(c));
    h.data()[c] = fp16::from_bits(static_cast<uint16_t>(c));
  }
  check_cast<bf16, float>("cast bf16 codes->float", b, gen);
  check_cast<fp16, float>("cast fp16 codes->float", h, gen);
}

BOOST_AUTO_TEST_SUITE_END()

// ---- top-k
// ---------------------------------------------------------------------------------------

BOOST_AUTO_TEST_SUITE(topk)

// LibTorch does not specify the order of equal values, so the inputs have distinct values in
// every row (redrawn on a collision, which bf16's 8 bits make common); with distinct values
// the values, the indices and the scattered gradient are all determined and must match
// exactly (the backward only moves numbers).
BOOST_AUTO_TEST_CASE_TEMPLATE(values_indices_gradient, T, Types) {
  for (const auto& [shape, k] : std::vector<std::pair<Shape, int64_t>>{
           {{13}, 1}, {{5, 11}, 3}, {{3, 7, 13}, 5}, {{2, 64}, 8}, {{4, 9}, 9}}) {
    const std::string tag = "topk<" + name_of<T>() + "> " + shape.str() + " k=" + std::to_string(k);
    Gen gen(tag);
    const int64_t n = shape[-1];
    auto x = make_input<T>(shape, [&, row = std::set<float>(), i = int64_t{0}]() mutable {
      if (i++ % n == 0) row.clear();
      for (;;) {
        const float v = widen(narrow<T>(static_cast<float>(gen.normal())));
        if (row.insert(v).second) return static_cast<double>(v);
      }
    });
    Shape kshape = shape;
    kshape[-1] = k;
    auto dy = normal<T>(gen, kshape);
    auto r = ops::topk<T>(x.tensor, k);
    auto dx = ops::topk_backward<T>(dy.tensor, r.indices, n);
    auto ref = torch_ref::topk(x.array, k, /*largest=*/true, dy.array, precision_of<T>);
    check_equal(tag + " values", to_array(r.values), ref.values);
    Array idx{{}, ref.indices.shape}, idx_ref{{}, ref.indices.shape};
    for (int64_t i = 0; i < r.indices.numel(); ++i) {
      idx.data.push_back(static_cast<float>(r.indices.data()[i]));
      idx_ref.data.push_back(static_cast<float>(ref.indices.data[i]));
    }
    check_equal(tag + " indices", idx, idx_ref);
    check_close(tag + " dx", dx, ref.dx, exact<T>());
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ---- what LibTorch's own bf16 kernels do
// ---------------------------------------------------------

// Not a check of tessera: the table behind torch_ref's choice of a float-then-round bf16
// reference (docs/testing.md). It asserts only what that choice relies on: LibTorch's own bf16
// results are within a few ulps of float-then-round for most ops, so the reference describes
// the same numbers LibTorch users see, only without LibTorch's extra roundings.
BOOST_AUTO_TEST_CASE(native_bf16_survey) {
  const auto rows = torch_ref::native_bf16_survey();
  BOOST_TEST(!rows.empty());
  for (const auto& row : rows) {
    BOOST_TEST_MESSAGE(row.op << ": " << 100.0 * row.fraction_differing
                              << "% of elements differ, by at most " << row.max_ulps
                              << " ulp of the largest element; elements >= 1/8 of the largest "
                              << "by at most " << row.max_elem_ulps << " of their own ulps");
    BOOST_TEST(row.fraction_differing < 1.0, row.op);
  }
}

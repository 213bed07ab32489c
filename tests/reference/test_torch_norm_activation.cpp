// LibTorch cross-checks of RMSNorm and LayerNorm (output, row statistics and every gradient)
// and of the activations SiLU, GELU (exact and tanh), SwiGLU (separate and fused), in float
// and bf16.
//
// LibTorch 1.13 has no RMSNorm and no SwiGLU: torch_ref.cpp writes them with torch ops
// (x * rsqrt(mean(x^2) + eps) * w, silu(gate) * up) and autograd derives their backward.
#define BOOST_TEST_MODULE torch_norm_activation
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cross_check.hpp"
#include "tessera/ops/activation.hpp"
#include "tessera/ops/norm.hpp"

using namespace tessera;
using namespace tessera::cross_check;

BOOST_TEST_GLOBAL_FIXTURE(TorchSetup);

namespace {

using Types = std::tuple<float, bf16>;

// ---- tolerances ---------------------------------------------------------------------------------
// Norms. Float: the row statistics sum n <= 1000 terms in different orders (sqrt(n) eps in
// practice), rsqrt and the products add a few eps; the backward's mean(g * xhat) cancels and
// the weight gradients sum over rows (<= 35 here) with cancellation, which the scale-relative
// term absorbs. 64 eps (3.8e-6) in both terms covers all of it with margin.
// bf16: tessera and the reference both widen the same bf16 numbers, compute in float (the
// statistics are kept in float on both sides) and round each output once: the float
// difference plus one bf16 ulp of the element (for_type in cross_check.hpp).
// The statistics (mean, rstd) are float for both types, computed from the same values: 64
// float eps.
template <class T>
Tolerance norm_tol() {
  return for_type<T>({64 * kFloatEps, 64 * kFloatEps});
}
const Tolerance kStatTol{64 * kFloatEps, 64 * kFloatEps};

// Activations are element-wise. Float: tessera calls libm (expf, erff, tanhf), LibTorch
// SLEEF's vectorised functions (within 1 ulp); the formulas agree term by term, so results
// differ by a few float ulps of the formula's terms. Where the terms cancel, that is much more
// than a few ulps of the result:
//   GELU           0.5 x (1 + erf(x / sqrt 2)), 1 + erf ~ 0 for x << 0          terms ~ |x|
//   GELU' (exact)  Phi(x) + x phi(x), cancelling for x < 0                   terms ~ 1 + |x| phi(x)
//   GELU (tanh)    0.5 x (1 + t),  t = tanh(u)                                terms ~ |x|
//   GELU' (tanh)   0.5 (1 + t) + 0.5 x (1 - t^2) u'(x): 1 - t^2 has an absolute error of a few
//                  eps whatever its size                                   terms ~ 1 + |x| u'(x)
//   SiLU'          s (1 + x (1 - s)), s = sigmoid(x): 1 - s ~ 0 for x >> 0      terms ~ 1 + |x|
// (times |dy| for gradients). So the scale-relative term is per element, in units of those
// terms: 16 float eps. bf16 adds one bf16 ulp of the element, both sides rounding once.
template <class T>
Tolerance act_tol() {
  return for_type<T>({16 * kFloatEps, 16 * kFloatEps});
}

// Per-element term sizes of the formulas above, in double.
template <class F>
std::vector<double> terms_of(const Array& x, const Array* dy, F term) {
  std::vector<double> t(x.data.size());
  for (size_t i = 0; i < t.size(); ++i)
    t[i] = term(static_cast<double>(x.data[i])) * (dy ? std::fabs(dy->data[i]) : 1.0);
  return t;
}
constexpr double kSqrt2OverPi = 0.79788456080286535588;
double gelu_tanh_du(double x) { return kSqrt2OverPi * (1.0 + 3 * 0.044715 * x * x); }
double normal_pdf(double x) { return 0.39894228040143267794 * std::exp(-0.5 * x * x); }

const std::vector<Shape> kNormShapes = {{7}, {5, 11}, {3, 7, 13}, {4, 1000}, {35, 64}};

// Normal values with, every 97th element, an extreme one (up to +-90) so the activations' tails
// (sigmoid's overflow-free branch, erf and tanh saturation) are exercised.
template <class T>
Input<T> activation_input(Gen& gen, const Shape& shape) {
  int64_t i = 0;
  return make_input<T>(
      shape, [&] { return i++ % 97 == 0 ? gen.uniform(-90.0, 90.0) : 3.0 * gen.normal(); });
}

const std::vector<Shape> kActShapes = {{7}, {5, 11}, {3, 7, 13}, {8, 512}};

}  // namespace

BOOST_AUTO_TEST_SUITE(norms)

BOOST_AUTO_TEST_CASE_TEMPLATE(rms_norm, T, Types) {
  for (const Shape& shape : kNormShapes) {
    for (double eps : {1e-6, 1e-2}) {
      const std::string tag = "rms_norm<" + name_of<T>() + "> " + shape.str() + " eps " +
                              (eps < 1e-3 ? "1e-6" : "1e-2");
      Gen gen(tag);
      auto x = normal<T>(gen, shape, 2.0);
      auto w = normal<T>(gen, {shape[-1]}, 0.5, 1.0);
      auto dy = normal<T>(gen, shape);
      auto fwd = ops::rms_norm<T>(x.tensor, w.tensor, eps);
      auto g = ops::rms_norm_backward<T>(dy.tensor, x.tensor, w.tensor, fwd.rstd);
      const auto ref = torch_ref::rmsnorm(x.array, w.array, eps, dy.array, precision_of<T>);
      check_close(tag + " y", fwd.y, ref.y, norm_tol<T>());
      check_close(tag + " rstd", fwd.rstd, ref.rstd, kStatTol);
      check_close(tag + " dx", g.dx, ref.dx, norm_tol<T>());
      check_close(tag + " dweight", g.dweight, ref.dweight, norm_tol<T>());
    }
  }
}

// A mean far from zero (5, std 1) checks the two-pass variance against LibTorch's Welford.
BOOST_AUTO_TEST_CASE_TEMPLATE(layer_norm, T, Types) {
  for (const Shape& shape : kNormShapes) {
    const std::string tag = "layer_norm<" + name_of<T>() + "> " + shape.str();
    Gen gen(tag);
    auto x = normal<T>(gen, shape, 1.0, 5.0);
    auto w = normal<T>(gen, {shape[-1]}, 0.5, 1.0);
    auto b = normal<T>(gen, {shape[-1]}, 0.5);
    auto dy = normal<T>(gen, shape);
    const double eps = 1e-5;
    auto fwd = ops::layer_norm<T>(x.tensor, w.tensor, b.tensor, eps);
    auto g = ops::layer_norm_backward<T>(dy.tensor, x.tensor, w.tensor, fwd.mean, fwd.rstd);
    const auto ref =
        torch_ref::layernorm(x.array, w.array, b.array, eps, dy.array, precision_of<T>);
    check_close(tag + " y", fwd.y, ref.y, norm_tol<T>());
    check_close(tag + " mean", fwd.mean, ref.mean, kStatTol);
    check_close(tag + " rstd", fwd.rstd, ref.rstd, kStatTol);
    check_close(tag + " dx", g.dx, ref.dx, norm_tol<T>());
    check_close(tag + " dweight", g.dweight, ref.dweight, norm_tol<T>());
    check_close(tag + " dbias", g.dbias, ref.dbias, norm_tol<T>());
  }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(activations)

BOOST_AUTO_TEST_CASE_TEMPLATE(silu, T, Types) {
  for (const Shape& shape : kActShapes) {
    const std::string tag = "silu<" + name_of<T>() + "> " + shape.str();
    Gen gen(tag);
    auto x = activation_input<T>(gen, shape);
    auto dy = normal<T>(gen, shape);
    auto y = ops::silu<T>(x.tensor);
    auto dx = ops::silu_backward<T>(dy.tensor, x.tensor);
    const auto ref = torch_ref::silu(x.array, dy.array, precision_of<T>);
    check_close(tag + " y", y, ref.y, act_tol<T>());
    check_close_terms(tag + " dx", dx, ref.dx, act_tol<T>(),
                      terms_of(x.array, &dy.array, [](double v) { return 1 + std::fabs(v); }));
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(gelu, T, Types) {
  for (const Shape& shape : kActShapes) {
    for (auto approx : {ops::GeluApprox::kNone, ops::GeluApprox::kTanh}) {
      const std::string mode = approx == ops::GeluApprox::kNone ? "none" : "tanh";
      const std::string tag = "gelu<" + name_of<T>() + "> " + mode + " " + shape.str();
      Gen gen(tag);
      auto x = activation_input<T>(gen, shape);
      auto dy = normal<T>(gen, shape);
      auto y = ops::gelu<T>(x.tensor, approx);
      auto dx = ops::gelu_backward<T>(dy.tensor, x.tensor, approx);
      const auto ref = torch_ref::gelu(x.array, mode, dy.array, precision_of<T>);
      const bool exact = approx == ops::GeluApprox::kNone;
      check_close_terms(tag + " y", y, ref.y, act_tol<T>(),
                        terms_of(x.array, nullptr, [](double v) { return std::fabs(v); }));
      check_close_terms(tag + " dx", dx, ref.dx, act_tol<T>(),
                        terms_of(x.array, &dy.array, [exact](double v) {
                          return 1 + std::fabs(v) * (exact ? normal_pdf(v) : gelu_tanh_du(v));
                        }));
    }
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(swiglu, T, Types) {
  for (const Shape& shape : kActShapes) {
    const std::string tag = "swiglu<" + name_of<T>() + "> " + shape.str();
    Gen gen(tag);
    auto gate = activation_input<T>(gen, shape);
    auto up = normal<T>(gen, shape, 2.0);
    auto dy = normal<T>(gen, shape);
    auto y = ops::swiglu<T>(gate.tensor, up.tensor);
    auto g = ops::swiglu_backward<T>(dy.tensor, gate.tensor, up.tensor);
    const auto ref = torch_ref::swiglu(gate.array, up.array, dy.array, precision_of<T>);
    check_close(tag + " y", y, ref.y, act_tol<T>());
    // dgate = dy * up * silu'(gate): SiLU's terms, times |dy * up|.
    Array dy_up = dy.array;
    for (size_t i = 0; i < dy_up.data.size(); ++i) dy_up.data[i] *= up.array.data[i];
    check_close_terms(tag + " dgate", g.dgate, ref.dgate, act_tol<T>(),
                      terms_of(gate.array, &dy_up, [](double v) { return 1 + std::fabs(v); }));
    check_close(tag + " dup", g.dup, ref.dup, act_tol<T>());
  }
}

// Fused layout: gate_up (..., 2h) = [gate | up]; LibTorch gets the two halves.
BOOST_AUTO_TEST_CASE_TEMPLATE(swiglu_fused, T, Types) {
  for (const Shape& shape : {Shape{14}, Shape{5, 22}, Shape{3, 7, 26}, Shape{8, 1024}}) {
    const std::string tag = "swiglu_fused<" + name_of<T>() + "> " + shape.str();
    Gen gen(tag);
    auto gate_up = activation_input<T>(gen, shape);
    const int64_t h = shape[-1] / 2;
    Shape half = shape;
    half[-1] = h;
    auto dy = normal<T>(gen, half);
    auto y = ops::swiglu_fused<T>(gate_up.tensor);
    auto dx = ops::swiglu_fused_backward<T>(dy.tensor, gate_up.tensor);
    const int last = shape.rank() - 1;
    const auto ref = torch_ref::swiglu(to_array<T>(gate_up.tensor.slice(last, 0, h)),
                                       to_array<T>(gate_up.tensor.slice(last, h, 2 * h)), dy.array,
                                       precision_of<T>);
    check_close(tag + " y", y, ref.y, act_tol<T>());
    const Array gate = to_array<T>(gate_up.tensor.slice(last, 0, h));
    const Array up = to_array<T>(gate_up.tensor.slice(last, h, 2 * h));
    Array dy_up = dy.array;
    for (size_t i = 0; i < dy_up.data.size(); ++i) dy_up.data[i] *= up.data[i];
    const auto dgate_terms = terms_of(gate, &dy_up, [](double v) { return 1 + std::fabs(v); });
    check_close(tag + " d(gate half)", to_array<T>(dx.slice(last, 0, h)), ref.dgate, act_tol<T>(),
                false, &dgate_terms);
    check_close(tag + " d(up half)", to_array<T>(dx.slice(last, h, 2 * h)), ref.dup, act_tol<T>());
  }
}

BOOST_AUTO_TEST_SUITE_END()

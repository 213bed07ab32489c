// tests/ops/finite_difference.hpp — the shared helpers every op test uses to check a
// backward pass against central finite differences in double.
//
// Why central differences in double: the truncation error of (f(x+h) - f(x-h)) / 2h is
// O(h^2) and the rounding error O(eps_double / h), so h = 1e-6 gives roughly 1e-10
// absolute accuracy for O(1) losses — far below any backward bug worth catching, so the
// tolerances in the tests can be tight (1e-6 relative is typical).
//
// The usual pattern for an op y = f(x) with backward dx = f_backward(dy, ...):
//   pick a random "upstream gradient" g of y's shape, define the scalar loss
//   L(x) = dot(f(x), g); then dL/dx = f_backward(g, ...), which is compared with
//   numeric_gradient(L, x).
//
// Deliberately independent of tessera/core/rng.hpp: a bug in the library's RNG must not be
// able to hide a bug in an op test.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <utility>

#include <boost/test/unit_test.hpp>

#include "tessera/core/tensor.hpp"

namespace tessera::testing {

// Central-difference gradient of the scalar `loss_of_input(TensorView<const double>)` at x.
// x is perturbed one element at a time in a private copy; `loss_of_input` must not keep the
// view beyond the call.
template <class F>
Tensor<double> numeric_gradient(F&& loss_of_input, const Tensor<double>& x, double eps = 1e-6) {
  Tensor<double> probe = x.clone();
  auto grad = Tensor<double>::zeros(x.shape());
  double* p = probe.data();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double saved = p[i];
    p[i] = saved + eps;
    const double up = static_cast<double>(loss_of_input(TensorView<const double>(probe.view())));
    p[i] = saved - eps;
    const double down = static_cast<double>(loss_of_input(TensorView<const double>(probe.view())));
    p[i] = saved;
    grad.data()[i] = (up - down) / (2.0 * eps);
  }
  return grad;
}

// Sum of element-wise products; the two views must have the same shape (strides may differ).
inline double dot(TensorView<const double> a, TensorView<const double> b) {
  check_same_shape("testing::dot", "a", a.shape(), "b", b.shape());
  const Tensor<double> ac = a.contiguous();
  const Tensor<double> bc = b.contiguous();
  double s = 0.0;
  for (int64_t i = 0; i < ac.numel(); ++i) s += ac.data()[i] * bc.data()[i];
  return s;
}

// Uniform(-1, 1) values from std::mt19937_64(seed), in row-major order. Same seed, same tensor
// on every platform with a conforming mt19937_64 (uniform_real_distribution's algorithm is
// implementation-defined, so we scale the raw 64-bit output ourselves).
inline Tensor<double> random_tensor(Shape shape, uint64_t seed) {
  std::mt19937_64 gen(seed);
  auto t = Tensor<double>::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double u = static_cast<double>(gen() >> 11) * 0x1.0p-53;  // [0, 1)
    t.data()[i] = 2.0 * u - 1.0;
  }
  return t;
}

// Checks |actual - expected| <= atol + rtol * |expected| element-wise. On failure reports
// (as one Boost.Test error) how many elements failed, and the worst one with its index.
inline void check_close(TensorView<const double> actual, TensorView<const double> expected,
                        double rtol, double atol, const char* what) {
  if (!(actual.shape() == expected.shape())) {
    BOOST_CHECK_MESSAGE(false, what << ": shape " << actual.shape() << " differs from expected "
                                    << expected.shape());
    return;
  }
  const Tensor<double> a = actual.contiguous();
  const Tensor<double> e = expected.contiguous();
  const Shape& shape = a.shape();
  int64_t failures = 0, worst = -1;
  double worst_excess = 0.0;  // |diff| / allowed: > 1 means out of tolerance
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double av = a.data()[i], ev = e.data()[i];
    const double diff = std::fabs(av - ev);
    const double allowed = atol + rtol * std::fabs(ev);
    const bool bad = !(diff <= allowed);  // also catches NaN
    if (bad) ++failures;
    const double excess = std::isnan(diff) ? INFINITY
                          : allowed > 0    ? diff / allowed
                          : diff > 0       ? INFINITY
                                           : 0.0;
    if (worst < 0 || excess > worst_excess) {
      worst_excess = excess;
      worst = i;
    }
  }
  if (failures == 0) {
    BOOST_CHECK_MESSAGE(true, what);  // counts as a passed assertion
    return;
  }
  // Turn the flat offset of the worst element into a multi-index.
  int64_t rest = worst;
  std::string parts;
  for (int ax = shape.rank() - 1; ax >= 0; --ax) {
    const int64_t d = shape[ax];
    parts = std::to_string(rest % d) + (parts.empty() ? "" : ", ") + parts;
    rest /= d;
  }
  BOOST_CHECK_MESSAGE(false, what << ": " << failures << " of " << a.numel()
                                  << " elements out of tolerance (rtol " << rtol << ", atol "
                                  << atol << "); worst at (" << parts << "): actual "
                                  << a.data()[worst] << ", expected " << e.data()[worst]
                                  << ", |diff| " << std::fabs(a.data()[worst] - e.data()[worst]));
}

}  // namespace tessera::testing

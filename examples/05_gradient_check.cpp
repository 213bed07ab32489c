// 05 — Checking a backward pass with finite differences
//
// What you will learn:
//   * every tessera op has an explicit backward, `op_backward`, instead of an autograd tape;
//   * because the precision is a template parameter, the same op runs in `double`, where a
//     central finite difference (f(x + h) - f(x - h)) / 2h is accurate to about 1e-9 — so
//     the analytic gradient can be checked against it directly;
//   * how to turn a vector-valued op into a scalar loss for the check: L = sum(y * r) with a
//     fixed random r, whose gradient with respect to y is simply r.
// The program checks RMSNorm's gradients for the input and the weight, and exits non-zero if
// they disagree.
#include <tessera/tessera.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace ts = tessera;
namespace ops = tessera::ops;

namespace {
ts::Tensor<double> random_tensor(ts::Shape shape, std::uint64_t subsequence) {
  auto t = ts::Tensor<double>::empty(shape);
  ts::fill_uniform(t.data(), t.numel(), ts::Seed{7}, subsequence, -1.0, 1.0);
  return t;
}

double dot(const ts::Tensor<double>& a, const ts::Tensor<double>& b) {
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) s += a.data()[i] * b.data()[i];
  return s;
}

// Largest |analytic - numeric| over all elements of `param`, perturbing one at a time.
template <class Loss>
double worst_error(ts::Tensor<double>& param, const ts::Tensor<double>& analytic, Loss&& loss) {
  const double h = 1e-6;
  double worst = 0;
  for (std::int64_t i = 0; i < param.numel(); ++i) {
    const double saved = param.data()[i];
    param.data()[i] = saved + h;
    const double up = loss();
    param.data()[i] = saved - h;
    const double down = loss();
    param.data()[i] = saved;
    worst = std::max(worst, std::fabs((up - down) / (2 * h) - analytic.data()[i]));
  }
  return worst;
}
}  // namespace

int main() {
  // 5 rows of 7 features: odd sizes catch indexing mistakes that powers of two hide.
  auto x = random_tensor({5, 7}, 0);       // (rows, features)
  auto weight = random_tensor({7}, 1);     // (features)
  const auto r = random_tensor({5, 7}, 2); // fixed direction that makes the loss a scalar

  auto loss = [&] { return dot(ops::rms_norm<double>(x, weight, 1e-6).y, r); };

  // Analytic gradients: dL/dy = r, pushed back through rms_norm_backward.
  auto forward = ops::rms_norm<double>(x, weight, 1e-6);
  auto grads = ops::rms_norm_backward<double>(r, x, weight, forward.rstd);

  const double err_x = worst_error(x, grads.dx, loss);
  const double err_w = worst_error(weight, grads.dweight, loss);
  std::printf("RMSNorm, 5 x 7, double precision:\n");
  std::printf("  worst |dL/dx - finite difference|      = %.2e\n", err_x);
  std::printf("  worst |dL/dweight - finite difference| = %.2e\n", err_w);
  // The central difference's truncation error is O(h^2) ~ 1e-12 and its rounding error
  // ~ 1e-16 / h ~ 1e-10, so a correct gradient agrees to well under 1e-7; a wrong one is off
  // by O(1).
  const bool ok = err_x < 1e-7 && err_w < 1e-7;
  std::printf("%s\n", ok ? "gradients agree with finite differences" : "GRADIENTS DISAGREE");
  return ok ? 0 : 1;
}

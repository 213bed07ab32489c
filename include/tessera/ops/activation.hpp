// tessera/ops/activation.hpp — SiLU, GELU (exact and tanh) and SwiGLU, forward and backward.
//
// Why these three: SwiGLU (silu(gate) * up) is the FFN non-linearity of the DeepSeek / Llama
// stacks, GELU is the FFN non-linearity of the encoders (BERT, ViT), and SiLU is SwiGLU's gate.
//
// How they are built:
//   * Element-wise, so every output element depends on one (or two) input elements; the loops
//     are OpenMP-parallel over elements and the result never depends on the thread count.
//   * Low-precision inputs (bf16, fp16) are widened to float, computed in float and rounded
//     once on output; double stays double end to end (the finite-difference tests rely on it).
//   * Backward passes take the saved *input* (not the output): recomputing sigmoid/erf is
//     cheaper than keeping a second activation-sized tensor alive, and it is what the
//     activation-recompute policy drops anyway.
//   * SiLU's sigmoid is evaluated in the branch that never overflows exp(), so large |x|
//     gives exactly x (x >> 0) or -0 (x << 0) instead of NaN.
//
// Shapes: any shape; "fused" SwiGLU treats the last axis as features and splits it in halves.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::ops {

// PyTorch's `approximate` argument of torch.nn.functional.gelu: kNone is 'none' (the exact
// erf form), kTanh is 'tanh'.
enum class GeluApprox { kNone, kTanh };

template <class T>
struct SwiGluGrads {
  Tensor<T> dgate;  // same shape as gate
  Tensor<T> dup;    // same shape as up
};

namespace activation_detail {

// The type arithmetic happens in: double for double, float for everything else.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
inline acc_t<T> load(T v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return v;
  } else {
    return to_float(v);
  }
}

template <class T>
inline T store(acc_t<T> v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return v;
  } else {
    return from_float<T>(v);
  }
}

// A contiguous view of the input: borrowed when it already is contiguous, copied otherwise.
template <class T>
struct Dense {
  Tensor<T> owned;
  const T* data = nullptr;
  explicit Dense(TensorView<const T, Cpu> v) {
    if (v.is_contiguous()) {
      data = v.data();
    } else {
      owned = v.contiguous();
      data = owned.data();
    }
  }
};

// Below this many elements the thread start-up costs more than the loop.
inline constexpr int64_t kParallelMin = 1 << 14;

// sigmoid without overflow: exp() is only ever called on a non-positive argument.
template <class A>
inline A sigmoid(A x) {
  if (x >= A(0)) return A(1) / (A(1) + std::exp(-x));
  const A e = std::exp(x);
  return e / (A(1) + e);
}

template <class A>
inline A silu(A x) {
  return x * sigmoid(x);
}
// d/dx x*s(x) = s(x) + x*s(x)*(1 - s(x)) = s(x) * (1 + x*(1 - s(x)))
template <class A>
inline A silu_grad(A x) {
  const A s = sigmoid(x);
  return s * (A(1) + x * (A(1) - s));
}

inline constexpr double kSqrt1_2 = 0.70710678118654752440;      // 1/sqrt(2)
inline constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/sqrt(2*pi)
inline constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2/pi)
inline constexpr double kGeluTanhCoeff = 0.044715;

template <class A>
inline A gelu(A x, GeluApprox approx) {
  if (approx == GeluApprox::kNone) return A(0.5) * x * (A(1) + std::erf(x * A(kSqrt1_2)));
  const A inner = A(kSqrt2OverPi) * (x + A(kGeluTanhCoeff) * x * x * x);
  return A(0.5) * x * (A(1) + std::tanh(inner));
}

// exact:  Phi(x) + x*phi(x)
// tanh:   0.5*(1 + t) + 0.5*x*(1 - t^2) * sqrt(2/pi) * (1 + 3*0.044715*x^2),  t = tanh(inner)
template <class A>
inline A gelu_grad(A x, GeluApprox approx) {
  if (approx == GeluApprox::kNone) {
    const A cdf = A(0.5) * (A(1) + std::erf(x * A(kSqrt1_2)));
    const A pdf = A(kInvSqrt2Pi) * std::exp(A(-0.5) * x * x);
    return cdf + x * pdf;
  }
  const A x2 = x * x;
  const A t = std::tanh(A(kSqrt2OverPi) * (x + A(kGeluTanhCoeff) * x2 * x));
  const A dinner = A(kSqrt2OverPi) * (A(1) + A(3 * kGeluTanhCoeff) * x2);
  return A(0.5) * (A(1) + t) + A(0.5) * x * (A(1) - t * t) * dinner;
}

// out[i] = f(x[i])
template <class T, class F>
Tensor<T> map1(TensorView<const T, Cpu> x, F f) {
  const Dense<T> xd(x);
  auto out = Tensor<T>::empty(x.shape());
  const T* px = xd.data;
  T* po = out.data();
  const int64_t n = x.numel();
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) po[i] = store<T>(f(load(px[i])));
  return out;
}

// out[i] = dout[i] * f'(x[i])
template <class T, class G>
Tensor<T> backward1(const char* op, TensorView<const T, Cpu> dout, TensorView<const T, Cpu> x,
                    G grad) {
  check_same_shape(op, "dout", dout.shape(), "x", x.shape());
  const Dense<T> xd(x), dd(dout);
  auto dx = Tensor<T>::empty(x.shape());
  const T* px = xd.data;
  const T* pd = dd.data;
  T* po = dx.data();
  const int64_t n = x.numel();
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) po[i] = store<T>(load(pd[i]) * grad(load(px[i])));
  return dx;
}

// The SwiGLU kernels, written once for the separate and the fused layouts: `rows` rows of
// `hidden` features, gate row r at gate + r*gate_stride, up row r at up + r*up_stride.
template <class T>
void swiglu_rows(const T* gate, const T* up, int64_t gate_stride, int64_t up_stride, int64_t rows,
                 int64_t hidden, T* out) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static) if (rows * hidden >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gate + r * gate_stride;
    const T* u = up + r * up_stride;
    T* o = out + r * hidden;
    for (int64_t j = 0; j < hidden; ++j) o[j] = store<T>(silu<A>(load(g[j])) * load(u[j]));
  }
}

// dgate = dout * up * silu'(gate), dup = dout * silu(gate); the two gradient rows are written
// at dgate + r*dgate_stride and dup + r*dup_stride (the same buffer, offset, when fused).
template <class T>
void swiglu_backward_rows(const T* dout, const T* gate, const T* up, int64_t gate_stride,
                          int64_t up_stride, int64_t rows, int64_t hidden, T* dgate,
                          int64_t dgate_stride, T* dup, int64_t dup_stride) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static) if (rows * hidden >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* d = dout + r * hidden;
    const T* g = gate + r * gate_stride;
    const T* u = up + r * up_stride;
    T* dg = dgate + r * dgate_stride;
    T* du = dup + r * dup_stride;
    for (int64_t j = 0; j < hidden; ++j) {
      const A gj = load(g[j]), dj = load(d[j]);
      const A s = sigmoid(gj);
      dg[j] = store<T>(dj * load(u[j]) * s * (A(1) + gj * (A(1) - s)));
      du[j] = store<T>(dj * gj * s);
    }
  }
}

inline int64_t fused_hidden(const char* op, const char* name, const Shape& s) {
  TESSERA_CHECK(s.rank() >= 1, op, ": tensor '", name,
                "' must have at least one axis (the [gate | up] features), got shape ", s);
  TESSERA_CHECK(s[-1] % 2 == 0, op, ": tensor '", name, "' has shape ", s,
                "; its last axis must be even (2 * hidden, [gate | up]), got ", s[-1]);
  return s[-1] / 2;
}

}  // namespace activation_detail

// ---- SiLU -------------------------------------------------------------------------------

// silu(x) = x * sigmoid(x). Any shape; output has x's shape.
template <class T>
Tensor<T> silu(TensorView<const T, Cpu> x) {
  using A = activation_detail::acc_t<T>;
  return activation_detail::map1<T>(x, [](A v) { return activation_detail::silu(v); });
}

// dx = dout * sigmoid(x) * (1 + x * (1 - sigmoid(x))). dout and x have the same shape.
template <class T>
Tensor<T> silu_backward(TensorView<const T, Cpu> dout, TensorView<const T, Cpu> x) {
  using A = activation_detail::acc_t<T>;
  return activation_detail::backward1<T>("silu_backward", dout, x,
                                         [](A v) { return activation_detail::silu_grad(v); });
}

// ---- GELU -------------------------------------------------------------------------------

// kNone: 0.5 * x * (1 + erf(x / sqrt(2)))
// kTanh: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
template <class T>
Tensor<T> gelu(TensorView<const T, Cpu> x, GeluApprox approx = GeluApprox::kNone) {
  using A = activation_detail::acc_t<T>;
  return activation_detail::map1<T>(x,
                                    [approx](A v) { return activation_detail::gelu(v, approx); });
}

template <class T>
Tensor<T> gelu_backward(TensorView<const T, Cpu> dout, TensorView<const T, Cpu> x,
                        GeluApprox approx = GeluApprox::kNone) {
  using A = activation_detail::acc_t<T>;
  return activation_detail::backward1<T>(
      "gelu_backward", dout, x, [approx](A v) { return activation_detail::gelu_grad(v, approx); });
}

// ---- SwiGLU -----------------------------------------------------------------------------

// silu(gate) * up; gate and up have the same (any) shape, which is also the output's.
template <class T>
Tensor<T> swiglu(TensorView<const T, Cpu> gate, TensorView<const T, Cpu> up) {
  check_same_shape("swiglu", "gate", gate.shape(), "up", up.shape());
  const activation_detail::Dense<T> g(gate), u(up);
  auto out = Tensor<T>::empty(gate.shape());
  const int64_t hidden = gate.rank() == 0 ? 1 : gate.dim(-1);
  const int64_t rows = hidden == 0 ? 0 : gate.numel() / hidden;
  activation_detail::swiglu_rows<T>(g.data, u.data, hidden, hidden, rows, hidden, out.data());
  return out;
}

template <class T>
SwiGluGrads<T> swiglu_backward(TensorView<const T, Cpu> dout, TensorView<const T, Cpu> gate,
                               TensorView<const T, Cpu> up) {
  check_same_shape("swiglu_backward", "gate", gate.shape(), "up", up.shape());
  check_shape("swiglu_backward", "dout", dout.shape(), gate.shape());
  const activation_detail::Dense<T> d(dout), g(gate), u(up);
  SwiGluGrads<T> grads{Tensor<T>::empty(gate.shape()), Tensor<T>::empty(gate.shape())};
  const int64_t hidden = gate.rank() == 0 ? 1 : gate.dim(-1);
  const int64_t rows = hidden == 0 ? 0 : gate.numel() / hidden;
  activation_detail::swiglu_backward_rows<T>(d.data, g.data, u.data, hidden, hidden, rows, hidden,
                                             grads.dgate.data(), hidden, grads.dup.data(), hidden);
  return grads;
}

// Fused SwiGLU over one projection output: gate_up (..., 2*hidden) -> (..., hidden).
// Split order: the FIRST half of the last axis is the gate, the SECOND half is up, i.e.
//   gate = gate_up[..., :hidden], up = gate_up[..., hidden:]
// (the order of torch.chunk(x, 2, dim=-1) -> (gate, up) used by Megatron-LM's swiglu; a
// checkpoint that concatenates W_gate and W_up in that order loads unchanged).
template <class T>
Tensor<T> swiglu_fused(TensorView<const T, Cpu> gate_up) {
  const int64_t hidden =
      activation_detail::fused_hidden("swiglu_fused", "gate_up", gate_up.shape());
  const activation_detail::Dense<T> x(gate_up);
  Shape out_shape = gate_up.shape();
  out_shape[-1] = hidden;
  auto out = Tensor<T>::empty(out_shape);
  if (out.numel() == 0) return out;
  const int64_t rows = out.numel() / hidden;
  activation_detail::swiglu_rows<T>(x.data, x.data + hidden, 2 * hidden, 2 * hidden, rows, hidden,
                                    out.data());
  return out;
}

// Gradient of swiglu_fused: dout (..., hidden), gate_up (..., 2*hidden) -> d_gate_up
// (..., 2*hidden) laid out like the input, [dgate | dup].
template <class T>
Tensor<T> swiglu_fused_backward(TensorView<const T, Cpu> dout, TensorView<const T, Cpu> gate_up) {
  const int64_t hidden =
      activation_detail::fused_hidden("swiglu_fused_backward", "gate_up", gate_up.shape());
  Shape expected = gate_up.shape();
  expected[-1] = hidden;
  check_shape("swiglu_fused_backward", "dout", dout.shape(), expected);
  const activation_detail::Dense<T> d(dout), x(gate_up);
  auto dx = Tensor<T>::empty(gate_up.shape());
  if (dout.numel() == 0) {  // the gradient of an empty output is all zeros
    return Tensor<T>(gate_up.shape());
  }
  const int64_t rows = dout.numel() / hidden;
  activation_detail::swiglu_backward_rows<T>(d.data, x.data, x.data + hidden, 2 * hidden,
                                             2 * hidden, rows, hidden, dx.data(), 2 * hidden,
                                             dx.data() + hidden, 2 * hidden);
  return dx;
}

}  // namespace tessera::ops

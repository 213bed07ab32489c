// tests/reference/torch_ref.cpp — the one translation unit that includes <torch/torch.h>.
//
// Each function builds leaf tensors from the plain arrays (bf16 leaves for Precision::kBFloat16),
// runs the op forward in float32, rounds the output to the leaves' dtype, calls backward(dy)
// and copies the output and the leaves' gradients back into plain arrays. Autograd rounds each
// leaf's gradient to its dtype once, at the leaf. The ops LibTorch 1.13 lacks (rms_norm,
// swiglu, rope) are written here from their published formulas with torch ops, so autograd
// derives their backward independently of tessera's hand-written one. The two layers (attention
// with an explicit mask, mixture of experts as a loop over experts) are written the same way,
// plainly, from their definitions; for bf16 they round where tessera stores an intermediate.
#include "torch_ref.hpp"

#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numbers>
#include <sstream>
#include <stdexcept>

namespace torch_ref {
namespace {

torch::ScalarType dtype_of(Precision p) {
  return p == Precision::kBFloat16 ? torch::kBFloat16 : torch::kFloat32;
}

void check_numel(const Array& a, const char* what) {
  if (static_cast<int64_t>(a.data.size()) != a.numel()) {
    std::ostringstream msg;
    msg << "torch_ref: array '" << what << "' holds " << a.data.size() << " values but its shape"
        << " has " << a.numel();
    throw std::invalid_argument(msg.str());
  }
}

// A float32 copy of `a`, converted to `p`'s dtype. The conversion to bf16 is exact for the
// tests' inputs (they are bf16-rounded before they get here).
torch::Tensor tensor(const Array& a, Precision p, bool requires_grad, const char* what) {
  check_numel(a, what);
  auto t = torch::from_blob(const_cast<float*>(a.data.data()), a.shape, torch::kFloat32).clone();
  t = t.to(dtype_of(p));
  if (requires_grad) t.requires_grad_(true);
  return t;
}

torch::Tensor index_tensor(const IndexArray& a) {
  return torch::from_blob(const_cast<int64_t*>(a.data.data()), a.shape, torch::kInt64).clone();
}

Array array(const torch::Tensor& t) {
  Array out;
  if (!t.defined()) return out;  // an input autograd never reached: reported as empty
  auto f = t.detach().to(torch::kFloat32).contiguous();
  out.shape.assign(f.sizes().begin(), f.sizes().end());
  out.data.resize(static_cast<size_t>(f.numel()));
  if (f.numel() > 0) std::memcpy(out.data.data(), f.data_ptr<float>(), out.data.size() * 4);
  return out;
}

IndexArray index_array(const torch::Tensor& t) {
  IndexArray out;
  auto i = t.detach().to(torch::kInt64).contiguous();
  out.shape.assign(i.sizes().begin(), i.sizes().end());
  out.data.assign(i.data_ptr<int64_t>(), i.data_ptr<int64_t>() + i.numel());
  return out;
}

// Gradients of leaves that did not take part (zero-size inputs) come back undefined; an empty
// array with the leaf's shape is clearer for the caller, who then sees zeros.
Array grad_of(const torch::Tensor& leaf) {
  if (leaf.grad().defined()) return array(leaf.grad());
  return array(torch::zeros_like(leaf));
}

void backward(const torch::Tensor& y, const Array& dy, Precision p) {
  y.backward(tensor(dy, p, false, "dy"));
}

// The computation runs in float32 whatever the leaves' dtype, and its result is rounded once
// to the precision under test (see torch_ref.hpp for why). For float32 both are no-ops.
torch::Tensor f32(const torch::Tensor& t) { return t.to(torch::kFloat32); }
torch::Tensor out(const torch::Tensor& y, Precision p) { return y.to(dtype_of(p)); }

}  // namespace

void set_num_threads(int n) { torch::set_num_threads(n); }

std::string describe() {
  std::ostringstream s;
  s << "LibTorch " << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "."
    << TORCH_VERSION_PATCH << ", " << torch::get_num_threads() << " intra-op threads";
  return s.str();
}

CastResult cast(const Array& x, Format from, Format to, const Array& dy) {
  auto dtype = [](Format f) {
    return f == Format::kFloat32    ? torch::kFloat32
           : f == Format::kBFloat16 ? torch::kBFloat16
                                    : torch::kFloat16;
  };
  // Float -> `from` is exact: x holds values of that format.
  auto tx = tensor(x, Precision::kFloat32, false, "x").to(dtype(from)).requires_grad_(true);
  auto y = tx.to(dtype(to));
  y.backward(tensor(dy, Precision::kFloat32, false, "dy").to(dtype(to)));
  return {array(y), grad_of(tx)};
}

// ---- matrix products -----------------------------------------------------------------------

MatmulResult matmul(const Array& a, const Array& b, bool trans_a, bool trans_b, const Array& dy,
                    Precision p) {
  auto ta = tensor(a, p, true, "a"), tb = tensor(b, p, true, "b");
  auto fa = f32(ta), fb = f32(tb);
  auto y = out(
      torch::matmul(trans_a ? fa.transpose(-1, -2) : fa, trans_b ? fb.transpose(-1, -2) : fb), p);
  backward(y, dy, p);
  return {array(y), grad_of(ta), grad_of(tb)};
}

LinearResult linear(const Array& x, const Array& w, const std::optional<Array>& bias,
                    const Array& dy, Precision p) {
  auto tx = tensor(x, p, true, "x"), tw = tensor(w, p, true, "w");
  torch::Tensor tbias;
  if (bias) tbias = tensor(*bias, p, true, "bias");
  auto y = out(torch::nn::functional::linear(f32(tx), f32(tw), bias ? f32(tbias) : tbias), p);
  backward(y, dy, p);
  return {array(y), grad_of(tx), grad_of(tw), bias ? grad_of(tbias) : Array{}};
}

// ---- element-wise ----------------------------------------------------------------------------

BinaryResult add(const Array& a, const Array& b, const Array& dy, Precision p) {
  auto ta = tensor(a, p, true, "a"), tb = tensor(b, p, true, "b");
  auto y = out(f32(ta) + f32(tb), p);
  backward(y, dy, p);
  return {array(y), grad_of(ta), grad_of(tb)};
}

BinaryResult mul(const Array& a, const Array& b, const Array& dy, Precision p) {
  auto ta = tensor(a, p, true, "a"), tb = tensor(b, p, true, "b");
  auto y = out(f32(ta) * f32(tb), p);
  backward(y, dy, p);
  return {array(y), grad_of(ta), grad_of(tb)};
}

UnaryResult scale(const Array& x, double alpha, const Array& dy, Precision p) {
  auto tx = tensor(x, p, true, "x");
  auto y = out(f32(tx) * alpha, p);
  backward(y, dy, p);
  return {array(y), grad_of(tx)};
}

BinaryResult add_scaled(const Array& a, const Array& b, double alpha, const Array& dy,
                        Precision p) {
  auto ta = tensor(a, p, true, "a"), tb = tensor(b, p, true, "b");
  auto y = out(torch::add(f32(ta), f32(tb), alpha), p);
  backward(y, dy, p);
  return {array(y), grad_of(ta), grad_of(tb)};
}

// ---- selection ---------------------------------------------------------------------------------

TopkResult topk(const Array& x, int64_t k, bool largest, const Array& dy, Precision p) {
  auto tx = tensor(x, p, true, "x");
  auto [values, indices] = torch::topk(f32(tx), k, /*dim=*/-1, largest, /*sorted=*/true);
  values = out(values, p);
  backward(values, dy, p);
  return {array(values), index_array(indices), grad_of(tx)};
}

// ---- softmax family --------------------------------------------------------------------------

UnaryResult softmax(const Array& x, const Array& dy, Precision p) {
  auto tx = tensor(x, p, true, "x");
  auto y = out(torch::softmax(f32(tx), -1), p);
  backward(y, dy, p);
  return {array(y), grad_of(tx)};
}

UnaryResult log_softmax(const Array& x, const Array& dy, Precision p) {
  auto tx = tensor(x, p, true, "x");
  auto y = out(torch::log_softmax(f32(tx), -1), p);
  backward(y, dy, p);
  return {array(y), grad_of(tx)};
}

std::vector<SurveyRow> native_bf16_survey() {
  torch::manual_seed(0);
  const auto bf = torch::kBFloat16;
  auto r = [](int64_t a, int64_t b) { return torch::randn({a, b}).to(torch::kBFloat16); };
  std::vector<SurveyRow> rows;
  // native: LibTorch's bf16 result; ideal: the float result on the same inputs, rounded once.
  auto add = [&](const std::string& op, const torch::Tensor& native, const torch::Tensor& ideal) {
    auto n = native.detach().to(torch::kFloat64), i = ideal.detach().to(bf).to(torch::kFloat64);
    // ulp of a bf16 value v: 2^(floor(log2 |v|) - 7).
    const double largest = i.abs().max().item<double>();
    const double ulp = std::pow(2.0, std::floor(std::log2(largest)) - 7);
    auto big = i.abs() >= largest / 8;
    auto elem_ulp = torch::pow(2.0, torch::floor(torch::log2(i.abs().clamp_min(largest / 8))) - 7);
    rows.push_back({op, (n != i).to(torch::kFloat64).mean().item<double>(),
                    (n - i).abs().max().item<double>() / ulp,
                    ((n - i).abs() / elem_ulp).masked_select(big).max().item<double>()});
  };
  auto f = [](const torch::Tensor& t) { return t.to(torch::kFloat32); };
  {
    auto a = r(64, 333), b = r(333, 97);
    add("matmul 2-D (64x333 @ 333x97)", torch::matmul(a, b), torch::matmul(f(a), f(b)));
    auto x = torch::randn({3, 13, 5}).to(bf), y = torch::randn({3, 13, 7}).to(bf);
    add("matmul batched, small (3x(5x13 @ 13x7), a transposed)",
        torch::matmul(x.transpose(1, 2), y), torch::matmul(f(x).transpose(1, 2), f(y)));
    auto bias = torch::randn({97}).to(bf);
    auto w = r(97, 333);
    add("linear with bias (64x333, 97 out)", torch::nn::functional::linear(a, w, bias),
        torch::nn::functional::linear(f(a), f(w), f(bias)));
  }
  {
    auto x = r(64, 333);
    add("x * 0.7071 (scalar)", x * 0.70710678118654752, f(x) * 0.70710678118654752);
    add("sum over rows", x.sum(0), f(x).sum(0));
    add("softmax", torch::softmax(x, -1), torch::softmax(f(x), -1));
    add("log_softmax", torch::log_softmax(x, -1), torch::log_softmax(f(x), -1));
    add("silu", torch::silu(x), torch::silu(f(x)));
    add("gelu (erf)", torch::gelu(x), torch::gelu(f(x)));
    add("gelu (tanh)", torch::gelu(x, "tanh"), torch::gelu(f(x), "tanh"));
    auto w = torch::randn({333}).to(bf), b = torch::randn({333}).to(bf);
    auto dy = r(64, 333);
    auto xn = x.clone().requires_grad_(true), wn = w.clone().requires_grad_(true);
    auto xi = f(x).requires_grad_(true), wi = f(w).requires_grad_(true);
    auto yn = torch::layer_norm(xn, {333}, wn, b, 1e-5);
    auto yi = torch::layer_norm(xi, {333}, wi, f(b), 1e-5);
    yn.backward(dy);
    yi.backward(f(dy));
    add("layer_norm y", yn, yi);
    add("layer_norm dx", xn.grad(), xi.grad());
    add("layer_norm dweight", wn.grad(), wi.grad());
    auto sn = x.clone().requires_grad_(true), si = f(x).requires_grad_(true);
    torch::softmax(sn, -1).backward(dy);
    torch::softmax(si, -1).backward(f(dy));
    add("softmax dx", sn.grad(), si.grad());
  }
  {
    auto w = torch::randn({3, 4}).to(bf);
    auto ids = torch::zeros({1000}, torch::kInt64);  // one id, repeated 1000 times
    auto dy = torch::randn({1000, 4}).to(bf);
    auto wn = w.clone().requires_grad_(true), wi = f(w).requires_grad_(true);
    torch::nn::functional::embedding(ids, wn).backward(dy);
    torch::nn::functional::embedding(ids, wi).backward(f(dy));
    add("embedding dweight (one id x1000)", wn.grad(), wi.grad());
  }
  return rows;
}

Array softmax_backward(const Array& y, const Array& dy, Precision p) {
  auto ty = f32(tensor(y, p, false, "y")), tdy = f32(tensor(dy, p, false, "dy"));
  return array(out(torch::_softmax_backward_data(tdy, ty, -1, torch::kFloat32), p));
}

Array log_softmax_backward(const Array& y, const Array& dy, Precision p) {
  auto ty = f32(tensor(y, p, false, "y")), tdy = f32(tensor(dy, p, false, "dy"));
  return array(out(torch::_log_softmax_backward_data(tdy, ty, -1, torch::kFloat32), p));
}

CrossEntropyResult cross_entropy(const Array& logits, const IndexArray& targets,
                                 int64_t ignore_index, double label_smoothing, Reduction reduction,
                                 const Array& dloss, Precision p) {
  namespace F = torch::nn::functional;
  auto tl = tensor(logits, p, true, "logits");
  auto options =
      F::CrossEntropyFuncOptions().ignore_index(ignore_index).label_smoothing(label_smoothing);
  switch (reduction) {
    case Reduction::kNone:
      options.reduction(torch::kNone);
      break;
    case Reduction::kMean:
      options.reduction(torch::kMean);
      break;
    case Reduction::kSum:
      options.reduction(torch::kSum);
      break;
  }
  const int64_t classes = logits.shape.back();
  auto loss = F::cross_entropy(f32(tl).reshape({-1, classes}), index_tensor(targets).reshape({-1}),
                               options);
  if (reduction == Reduction::kNone) loss = loss.reshape(targets.shape);
  loss = out(loss, p);
  backward(loss, dloss, p);
  return {array(loss), grad_of(tl)};
}

// ---- normalisation -----------------------------------------------------------------------------

NormResult rmsnorm(const Array& x, const Array& weight, double eps, const Array& dy, Precision p) {
  auto tx = tensor(x, p, true, "x"), tw = tensor(weight, p, true, "weight");
  auto xf = f32(tx);
  auto inv_rms = torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  auto y = out(xf * inv_rms * f32(tw), p);
  backward(y, dy, p);
  return {array(y), grad_of(tx), grad_of(tw), Array{}, Array{}, array(inv_rms.reshape({-1}))};
}

NormResult layernorm(const Array& x, const Array& weight, const std::optional<Array>& bias,
                     double eps, const Array& dy, Precision p) {
  auto tx = tensor(x, p, true, "x"), tw = tensor(weight, p, true, "weight");
  torch::Tensor tb;
  if (bias) tb = tensor(*bias, p, true, "bias");
  // native_layer_norm is what layer_norm calls; it also returns the row statistics.
  auto [yf, mean, rstd] =
      torch::native_layer_norm(f32(tx), {x.shape.back()}, f32(tw), bias ? f32(tb) : tb, eps);
  auto y = out(yf, p);
  backward(y, dy, p);
  return {array(y),
          grad_of(tx),
          grad_of(tw),
          bias ? grad_of(tb) : Array{},
          array(mean.reshape({-1})),
          array(rstd.reshape({-1}))};
}

// ---- activations -------------------------------------------------------------------------------

UnaryResult silu(const Array& x, const Array& dy, Precision p) {
  auto tx = tensor(x, p, true, "x");
  auto y = out(torch::silu(f32(tx)), p);
  backward(y, dy, p);
  return {array(y), grad_of(tx)};
}

UnaryResult gelu(const Array& x, const std::string& approximate, const Array& dy, Precision p) {
  auto tx = tensor(x, p, true, "x");
  auto y = out(torch::gelu(f32(tx), approximate), p);
  backward(y, dy, p);
  return {array(y), grad_of(tx)};
}

SwiGluResult swiglu(const Array& gate, const Array& up, const Array& dy, Precision p) {
  auto tg = tensor(gate, p, true, "gate"), tu = tensor(up, p, true, "up");
  auto y = out(torch::silu(f32(tg)) * f32(tu), p);
  backward(y, dy, p);
  return {array(y), grad_of(tg), grad_of(tu)};
}

// ---- rotary position embedding -----------------------------------------------------------------

// The frequency tables, in double, written from the papers rather than from tessera's code:
//   plain   inv_freq[i] = base^(-2i/d)                             (RoFormer, Su et al. 2021)
//   linear  positions divided by `factor` == inv_freq / factor     (Chen et al. 2023, "PI")
//   NTK     base' = base * factor^(d / (d - 2))                    (bloc97's NTK-aware scaling)
//   YaRN    per-pair blend of interpolated (inv_freq / factor) and original inv_freq with a
//           linear ramp over the pairs whose wavelength makes between beta_fast and beta_slow
//           rotations in the original context (ramp ends floored / ceiled to whole pairs);
//           cos/sin scaled by get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim),
//           get_mscale(s, m) = 0.1 m ln(s) + 1, which is 0.1 ln(factor) + 1 with the defaults
//           (Peng et al. 2023, YaRN; the ratio form is DeepSeek-V3's)
namespace {
torch::Tensor inv_freq_f64(const RopeSpec& spec, double* attention_scale_out) {
  const int64_t d = spec.rotary_dim;
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto exponent = torch::arange(0, d, 2, f64) / static_cast<double>(d);  // 2i/d
  double base = spec.base;
  if (spec.scaling == RopeScaling::kNtk)
    base = spec.base * std::pow(spec.factor, static_cast<double>(d) / static_cast<double>(d - 2));
  auto inv_freq = 1.0 / torch::pow(base, exponent);
  double attention_scale = 1.0;
  if (spec.scaling == RopeScaling::kLinear) inv_freq = inv_freq / spec.factor;
  if (spec.scaling == RopeScaling::kYarn) {
    // Pair index whose wavelength 2*pi/inv_freq fits `rotations` times into the original
    // context: solve L / (2 pi base^(2i/d)) = rotations for i.
    auto correction_dim = [&](double rotations) {
      return static_cast<double>(d) *
             std::log(static_cast<double>(spec.original_max_positions) /
                      (rotations * 2.0 * std::numbers::pi)) /
             (2.0 * std::log(spec.base));
    };
    double low = std::max(std::floor(correction_dim(spec.beta_fast)), 0.0);
    double high = std::min(std::ceil(correction_dim(spec.beta_slow)), static_cast<double>(d - 1));
    if (low == high) high += 0.001;  // avoid a zero-width ramp
    auto ramp = ((torch::arange(0, d / 2, f64) - low) / (high - low)).clamp(0.0, 1.0);
    auto extrapolate = 1.0 - ramp;  // 1: keep the original frequency, 0: interpolate
    inv_freq = (inv_freq / spec.factor) * (1.0 - extrapolate) + inv_freq * extrapolate;
    auto get_mscale = [&](double m) {
      return spec.factor <= 1.0 ? 1.0 : 0.1 * m * std::log(spec.factor) + 1.0;
    };
    attention_scale = spec.attention_factor > 0.0 ? spec.attention_factor
                      : spec.mscale_all_dim != 0.0
                          ? get_mscale(spec.mscale) / get_mscale(spec.mscale_all_dim)
                          : get_mscale(spec.mscale);
  }
  *attention_scale_out = attention_scale;
  return inv_freq;
}
}  // namespace

RopeTables rope_tables(const RopeSpec& spec) {
  double scale = 1.0;
  auto inv_freq = inv_freq_f64(spec, &scale);
  return {array(inv_freq), scale};
}

namespace {
// Rotates the first rotary_dim features of every head of xf (float, (..., T, H, D)) at positions
// `pos` ((T) or (..., T), int64), as the papers define it; the rest pass through.
torch::Tensor rope_rotate(const torch::Tensor& xf, const torch::Tensor& positions,
                          const RopeSpec& spec) {
  const int64_t head_dim = xf.size(-1);
  RopeSpec s = spec;
  if (s.rotary_dim == 0) s.rotary_dim = head_dim;
  const int64_t d = s.rotary_dim;
  // Angles in double, then cos/sin rounded to float: the tables a float kernel would use.
  auto pos = positions.to(torch::kFloat64);  // (T) or (B, T)
  double attention_scale = 1.0;
  auto inv_freq = inv_freq_f64(s, &attention_scale);                     // (d/2)
  auto angle = pos.unsqueeze(-1) * inv_freq;                             // (..., T, d/2)
  auto cos = (torch::cos(angle) * attention_scale).to(torch::kFloat32);  // (..., T, d/2)
  auto sin = (torch::sin(angle) * attention_scale).to(torch::kFloat32);
  // Broadcast over heads: x is (..., T, H, D), the tables (..., T, 1, d/2).
  cos = cos.unsqueeze(-2);
  sin = sin.unsqueeze(-2);

  auto rot = xf.narrow(-1, 0, d);
  auto pass = xf.narrow(-1, d, head_dim - d);
  torch::Tensor rotated;
  if (s.layout == RopeLayout::kHalfSplit) {
    auto x1 = rot.narrow(-1, 0, d / 2), x2 = rot.narrow(-1, d / 2, d / 2);
    rotated = torch::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1);
  } else {
    auto x1 = rot.slice(-1, 0, d, 2), x2 = rot.slice(-1, 1, d, 2);
    auto r1 = x1 * cos - x2 * sin, r2 = x2 * cos + x1 * sin;
    rotated = torch::stack({r1, r2}, -1).flatten(-2);  // re-interleave the pairs
  }
  return torch::cat({rotated, pass}, -1);
}
}  // namespace

UnaryResult rope(const Array& x, const IndexArray& positions, const RopeSpec& spec, const Array& dy,
                 Precision p) {
  auto tx = tensor(x, p, true, "x");
  auto y = out(rope_rotate(f32(tx), index_tensor(positions), spec), p);
  backward(y, dy, p);
  return {array(y), grad_of(tx)};
}

// ---- embedding
// -----------------------------------------------------------------------------------

EmbeddingResult embedding(const Array& weight, const IndexArray& ids, const Array& dy,
                          Precision p) {
  auto tw = tensor(weight, p, true, "weight");
  auto y = out(torch::nn::functional::embedding(index_tensor(ids), f32(tw)), p);
  backward(y, dy, p);
  return {array(y), grad_of(tw)};
}

// ---- attention ----------------------------------------------------------------------------------

namespace {

// Rounds a float tensor to the precision under test and widens it back: a point where tessera
// stores an intermediate result in T. Autograd's backward of the two casts rounds the gradient
// passing through the same point, as tessera's backward stores that gradient in T.
torch::Tensor rnd(const torch::Tensor& t, Precision p) {
  return p == Precision::kBFloat16 ? t.to(torch::kBFloat16).to(torch::kFloat32) : t;
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("torch_ref: " + what);
}

torch::Tensor f64_tensor(const std::vector<double>& v) {
  return torch::from_blob(const_cast<double*>(v.data()), {static_cast<int64_t>(v.size())},
                          torch::kFloat64)
      .clone();
}

}  // namespace

namespace {

// The attention output o (B, T, heads * hd) before the output projection, from xf (B, T, C) in
// float and the projection leaves; shared by attention() and decoder().
torch::Tensor attention_o(const torch::Tensor& xf, const torch::Tensor& twq,
                          const torch::Tensor& twk, const torch::Tensor& twv, int64_t heads,
                          int64_t kv_heads, const RopeSpec& rope, const Mask& mask, Precision p) {
  namespace F = torch::nn::functional;
  const int64_t B = xf.size(0), T = xf.size(1), C = xf.size(2);
  require(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && twq.dim() == 2 &&
              twq.size(0) % heads == 0,
          "attention: heads / kv_heads / wq do not fit together");
  const int64_t hd = twq.size(0) / heads, group = heads / kv_heads;
  require(twk.sizes() == torch::IntArrayRef{kv_heads * hd, C} && twv.sizes() == twk.sizes(),
          "attention: weight shapes do not match (B, T, C), heads and kv_heads");
  require(mask.shape == std::vector<int64_t>{B, T, T} &&
              static_cast<int64_t>(mask.allowed.size()) == B * T * T,
          "attention: the mask must be (B, T, T)");
  auto positions = torch::arange(T, torch::kInt64);
  // (B, T, H, hd) and (B, T, KV, hd): projection, then RoPE, each stored in T by tessera.
  auto q =
      rnd(rope_rotate(rnd(F::linear(xf, f32(twq)), p).view({B, T, heads, hd}), positions, rope), p);
  auto k = rnd(
      rope_rotate(rnd(F::linear(xf, f32(twk)), p).view({B, T, kv_heads, hd}), positions, rope), p);
  auto v = rnd(F::linear(xf, f32(twv)), p).view({B, T, kv_heads, hd});
  // Heads first; every kv head serves `group` consecutive query heads.
  auto qh = q.transpose(1, 2);                              // (B, H, T, hd)
  auto kh = k.transpose(1, 2).repeat_interleave(group, 1);  // (B, H, T, hd)
  auto vh = v.transpose(1, 2).repeat_interleave(group, 1);  // (B, H, T, hd)
  auto scores = torch::matmul(qh, kh.transpose(-1, -2)) / std::sqrt(static_cast<double>(hd));
  auto allowed =
      torch::from_blob(const_cast<uint8_t*>(mask.allowed.data()), {B, 1, T, T}, torch::kUInt8)
          .to(torch::kBool);
  scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  auto probs = torch::softmax(scores, -1);  // (B, H, T, T)
  return rnd(torch::matmul(probs, vh).transpose(1, 2).reshape({B, T, heads * hd}), p);
}

}  // namespace

AttentionResult attention(const Array& x, const Array& wq, const Array& wk, const Array& wv,
                          const Array& wo, int64_t heads, int64_t kv_heads, const RopeSpec& rope,
                          const Mask& mask, const std::optional<AttentionGate>& gate,
                          const Array& dy, Precision p) {
  namespace F = torch::nn::functional;
  require(x.shape.size() == 3, "attention: x must be (B, T, C)");
  const int64_t B = x.shape[0], T = x.shape[1], C = x.shape[2];
  require(wq.shape.size() == 2 && heads > 0 && wo.shape == std::vector<int64_t>{C, wq.shape[0]},
          "attention: weight shapes do not match (B, T, C), heads and kv_heads");
  auto tx = tensor(x, p, true, "x");
  auto twq = tensor(wq, p, true, "wq"), twk = tensor(wk, p, true, "wk");
  auto twv = tensor(wv, p, true, "wv"), two = tensor(wo, p, true, "wo");
  auto o = attention_o(f32(tx), twq, twk, twv, heads, kv_heads, rope, mask, p);

  AttentionResult r;
  torch::Tensor tgw, tgb, aux;
  if (gate) {
    const int64_t blk = gate->block, nb = (T + blk - 1) / blk;
    const int64_t n = static_cast<int64_t>(gate->cost.size());
    require(blk > 0 && gate->weight.shape == std::vector<int64_t>{n, C} &&
                gate->bias.shape == std::vector<int64_t>{n} &&
                gate->choice.shape == std::vector<int64_t>{B, nb},
            "attention: gate shapes do not match");
    tgw = tensor(gate->weight, p, true, "gate.weight");
    tgb = tensor(gate->bias, p, true, "gate.bias");
    auto xd = tx.to(torch::kFloat64);
    std::vector<torch::Tensor> means;  // per block (B, C)
    for (int64_t qb = 0; qb < nb; ++qb) {
      const int64_t begin = std::max<int64_t>(0, qb * blk - blk + 1), end = qb * blk + 1;
      means.push_back(xd.narrow(1, begin, end - begin).mean(1));
    }
    auto m = torch::stack(means, 1);                                               // (B, nb, C)
    auto logits = F::linear(m, tgw.to(torch::kFloat64), tgb.to(torch::kFloat64));  // (B, nb, n)
    r.gate_argmax = index_array(logits.argmax(-1));  // the first maximum, as tessera
    auto pg = torch::softmax(logits, -1);
    auto choice = index_tensor(gate->choice);                         // (B, nb)
    auto pc = pg.gather(-1, choice.unsqueeze(-1)).squeeze(-1);        // (B, nb)
    auto factor = (pc / pc.detach()).to(torch::kFloat32);             // == 1, straight-through
    auto per_row = factor.repeat_interleave(blk, 1).narrow(1, 0, T);  // (B, T)
    o = rnd(o * per_row.unsqueeze(-1), p);
    auto cost = f64_tensor(gate->cost);
    auto expected = (pg * cost).sum(-1);  // (B, nb)
    auto chosen_cost = cost.index_select(0, choice.flatten()).view({B, nb});
    aux = gate->penalty * (chosen_cost + expected - expected.detach()).mean();
    r.aux_loss = aux.item<double>();
  }
  auto y = out(F::linear(o, f32(two)), p);  // (B, T, C)
  if (aux.defined())
    torch::autograd::backward({y, aux}, {tensor(dy, p, false, "dy"), torch::ones_like(aux)});
  else
    backward(y, dy, p);
  r.y = array(y);
  r.dx = grad_of(tx);
  r.dwq = grad_of(twq);
  r.dwk = grad_of(twk);
  r.dwv = grad_of(twv);
  r.dwo = grad_of(two);
  if (gate) {
    r.dgate_weight = grad_of(tgw);
    r.dgate_bias = grad_of(tgb);
  }
  return r;
}

// ---- mixture of experts ------------------------------------------------------------------------

namespace {
// Indices that sort each row by descending value, equal values in index order (stable): the
// "ties to the lower index" rule of the routing.
torch::Tensor ranked(const torch::Tensor& t) {
  return std::get<1>(torch::sort(t, /*stable=*/true, /*dim=*/-1, /*descending=*/true));
}
}  // namespace

namespace {

struct FfnLeaves {
  torch::Tensor gate, up, down;
};

FfnLeaves ffn_leaves(const FfnWeights& w, Precision p) {
  return FfnLeaves{tensor(w.w_gate, p, true, "w_gate"), tensor(w.w_up, p, true, "w_up"),
                   tensor(w.w_down, p, true, "w_down")};
}

// SwiGLU, rounded where tessera's SwiGluFfn stores gate, up, act and its output.
torch::Tensor swiglu_ffn(const FfnLeaves& l, const torch::Tensor& xs, Precision p) {
  namespace F = torch::nn::functional;
  auto g = rnd(F::linear(xs, f32(l.gate)), p);
  auto u = rnd(F::linear(xs, f32(l.up)), p);
  auto a = rnd(torch::silu(g) * u, p);
  return rnd(F::linear(a, f32(l.down)), p);
}

// The mixture of experts on xf (tokens, d) in float (see moe() in torch_ref.hpp): y in float
// (not rounded), the aux loss (undefined without one) and the routing.
struct MoEGraph {
  torch::Tensor y, aux, chosen, weights, selection;
  std::vector<int64_t> kept;
};

MoEGraph moe_graph(const torch::Tensor& xf, const torch::Tensor& tg,
                   const std::vector<FfnLeaves>& te, const std::vector<FfnLeaves>& ts,
                   const MoESpec& spec, Precision p) {
  namespace F = torch::nn::functional;
  require(xf.dim() == 2 && tg.dim() == 2 && tg.size(1) == xf.size(1),
          "moe: x must be (tokens, d) and gate (experts, d)");
  const int64_t tokens = xf.size(0), d = xf.size(1), n = tg.size(0), k = spec.top_k;
  require(static_cast<int64_t>(te.size()) == n, "moe: one FfnWeights per expert");
  require(1 <= k && k <= n && spec.groups >= 1 && n % spec.groups == 0 && 1 <= spec.top_groups &&
              spec.top_groups <= spec.groups,
          "moe: top_k / groups do not fit the experts");
  auto logits = rnd(F::linear(xf, f32(tg)), p);  // (tokens, n)
  auto s = spec.score == RouterScore::kSoftmax ? torch::softmax(logits, -1)
                                               : torch::sigmoid(logits);  // (tokens, n)

  // The choice: no gradient. Selection scores s (+ bias), -inf outside the kept groups.
  auto sel = s.detach().clone();
  if (spec.selection_bias)
    sel = sel + tensor(*spec.selection_bias, Precision::kFloat32, false, "selection_bias");
  if (spec.groups > 1) {
    const int64_t per = n / spec.groups;
    auto best =
        std::get<0>(sel.view({tokens, spec.groups, per}).topk(std::min<int64_t>(2, per), -1));
    auto group_score = best.sum(-1);  // (tokens, groups)
    auto top = ranked(group_score).narrow(1, 0, spec.top_groups);
    auto keep = torch::zeros({tokens, spec.groups}, torch::kBool).scatter(1, top, true);
    sel = sel.masked_fill(keep.repeat_interleave(per, 1).logical_not(),
                          -std::numeric_limits<double>::infinity());
  }
  auto chosen = ranked(sel).narrow(1, 0, k).contiguous();  // (tokens, k)
  auto w = s.gather(1, chosen);                            // (tokens, k)
  if (spec.renormalize) w = w / w.sum(-1, /*keepdim=*/true);

  // Experts one by one: the assignments a = t * k + j routed to e, in token order; under a
  // capacity the first `capacity` of them run and the rest are dropped.
  auto flat = chosen.flatten();
  auto wflat = w.flatten();
  std::vector<int64_t> kept(static_cast<size_t>(tokens * k), 1);
  auto y = torch::zeros({tokens, d}, torch::kFloat32);
  for (int64_t e = 0; e < n; ++e) {
    auto assigned = (flat == e).nonzero().flatten();  // ascending: token order
    if (spec.capacity >= 0 && assigned.size(0) > spec.capacity) {
      auto acc = assigned.accessor<int64_t, 1>();
      for (int64_t i = spec.capacity; i < assigned.size(0); ++i) kept[size_t(acc[i])] = 0;
      assigned = assigned.narrow(0, 0, spec.capacity);
    }
    if (assigned.numel() == 0) continue;
    auto tok = torch::div(assigned, k, "floor");
    auto ye = swiglu_ffn(te[size_t(e)], xf.index_select(0, tok), p);  // (rows, d)
    y = y.index_add(0, tok, ye * wflat.index_select(0, assigned).unsqueeze(1));
  }
  for (const FfnLeaves& l : ts) y = y + swiglu_ffn(l, xf, p);

  MoEGraph g;
  if (spec.aux_alpha > 0) {
    // f_i: share of the assignments (before capacity), a count; P_i: mean of p_i over tokens,
    // p = s for softmax, s / sum(s) for sigmoid scores.
    auto f = torch::bincount(flat, {}, n).to(torch::kFloat64) / static_cast<double>(tokens * k);
    auto sd = s.to(torch::kFloat64);
    auto prob = spec.score == RouterScore::kSoftmax ? sd : sd / sd.sum(-1, /*keepdim=*/true);
    g.aux = spec.aux_alpha * static_cast<double>(n) * (f * prob.mean(0)).sum();
  }
  g.y = y;
  g.chosen = chosen;
  g.weights = w;
  g.selection = sel;
  g.kept = std::move(kept);
  return g;
}

}  // namespace

MoEResult moe(const Array& x, const Array& gate, const std::vector<FfnWeights>& experts,
              const std::vector<FfnWeights>& shared, const MoESpec& spec, const Array& dy,
              Precision p) {
  require(x.shape.size() == 2 && gate.shape.size() == 2 && gate.shape[1] == x.shape[1],
          "moe: x must be (tokens, d) and gate (experts, d)");
  std::vector<FfnLeaves> te, ts;
  for (const auto& w : experts) te.push_back(ffn_leaves(w, p));
  for (const auto& w : shared) ts.push_back(ffn_leaves(w, p));
  auto tx = tensor(x, p, true, "x"), tg = tensor(gate, p, true, "gate");
  MoEGraph g = moe_graph(f32(tx), tg, te, ts, spec, p);
  auto y = out(g.y, p);

  MoEResult r;
  if (g.aux.defined()) {
    r.aux_loss = g.aux.item<double>();
    torch::autograd::backward({y, g.aux},
                              {tensor(dy, p, false, "dy"), torch::full_like(g.aux, spec.aux_grad)});
  } else {
    backward(y, dy, p);
  }

  r.y = array(y);
  r.dx = grad_of(tx);
  r.dgate = grad_of(tg);
  for (const FfnLeaves& l : te)
    r.experts.push_back({grad_of(l.gate), grad_of(l.up), grad_of(l.down)});
  for (const FfnLeaves& l : ts)
    r.shared.push_back({grad_of(l.gate), grad_of(l.up), grad_of(l.down)});
  r.chosen = index_array(g.chosen);
  r.weights = array(g.weights);
  const int64_t tokens = x.shape[0], k = spec.top_k;
  r.kept = IndexArray{g.kept, {tokens, k}};
  r.selection = array(g.selection);
  return r;
}

// ---- a whole decoder ---------------------------------------------------------------------------

DecoderResult decoder(const std::vector<NamedArray>& weights, const IndexArray& tokens,
                      const IndexArray& targets, const DecoderSpec& spec) {
  namespace F = torch::nn::functional;
  const Precision p = Precision::kFloat32;
  require(tokens.shape.size() == 2 && targets.shape == tokens.shape,
          "decoder: tokens and targets must be (B, T)");
  const int64_t B = tokens.shape[0], T = tokens.shape[1], C = spec.d_model;
  // Every weight a leaf, found by its documented name (docs/models.md).
  std::vector<std::pair<std::string, torch::Tensor>> leaves;
  for (const NamedArray& w : weights)
    leaves.emplace_back(w.name, tensor(w.array, p, true, w.name.c_str()));
  std::vector<bool> used(leaves.size(), false);
  auto get = [&](const std::string& name) -> torch::Tensor {
    for (size_t i = 0; i < leaves.size(); ++i)
      if (leaves[i].first == name) {
        used[i] = true;
        return leaves[i].second;
      }
    throw std::invalid_argument("torch_ref::decoder: no weight named '" + name + "'");
  };
  auto rmsnorm = [&](const torch::Tensor& x, const torch::Tensor& w) {
    return rnd(x * torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + spec.norm_eps) * f32(w), p);
  };
  auto ffn = [&](const std::string& prefix) {
    return FfnLeaves{get(prefix + "w_gate"), get(prefix + "w_up"), get(prefix + "w_down")};
  };

  auto h = F::embedding(index_tensor(tokens), f32(get("embed.weight")));  // (B, T, C)
  torch::Tensor aux_total = torch::zeros({}, torch::kFloat64);
  DecoderResult r;
  for (size_t l = 0; l < spec.layers.size(); ++l) {
    const DecoderLayerSpec& ls = spec.layers[l];
    const std::string pre = "layers." + std::to_string(l) + ".";
    auto n1 = rmsnorm(h, get(pre + "norm1.weight"));
    auto o = attention_o(n1, get(pre + "attn.wq"), get(pre + "attn.wk"), get(pre + "attn.wv"),
                         spec.heads, spec.kv_heads, spec.rope, ls.mask, p);
    h = rnd(h + rnd(F::linear(o, f32(get(pre + "attn.wo"))), p), p);
    auto n2 = rmsnorm(h, get(pre + "norm2.weight"));
    torch::Tensor f;
    if (!ls.moe) {
      f = swiglu_ffn(ffn(pre + "ffn."), n2, p);
      r.chosen.emplace_back();
    } else {
      std::vector<FfnLeaves> te, ts;
      for (int64_t e = 0; e < ls.experts; ++e)
        te.push_back(ffn(pre + "ffn.experts." + std::to_string(e) + "."));
      for (int64_t e = 0; e < ls.shared; ++e)
        ts.push_back(ffn(pre + "ffn.shared_experts." + std::to_string(e) + "."));
      MoEGraph g = moe_graph(n2.reshape({B * T, C}), get(pre + "ffn.router.gate"), te, ts, *ls.moe, p);
      f = rnd(g.y, p).view({B, T, C});
      if (g.aux.defined()) aux_total = aux_total + g.aux;
      r.chosen.push_back(index_array(g.chosen));
    }
    h = rnd(h + f, p);
  }
  auto hn = rmsnorm(h, get("norm.weight"));
  auto head = spec.tie_embeddings ? get("embed.weight") : get("lm_head.weight");
  auto logits = rnd(F::linear(hn, f32(head)), p);  // (B, T, V)
  auto ce = F::cross_entropy(logits.reshape({B * T, spec.vocab}),
                             index_tensor(targets).reshape({B * T}),
                             F::CrossEntropyFuncOptions().ignore_index(spec.ignore_index));
  auto loss = ce.to(torch::kFloat64) + aux_total;
  loss.backward();
  for (size_t i = 0; i < leaves.size(); ++i)
    if (!used[i])
      throw std::invalid_argument("torch_ref::decoder: weight '" + leaves[i].first +
                                  "' is not part of the described model");
  r.loss = loss.item<double>();
  r.cross_entropy = ce.item<double>();
  r.aux_loss = aux_total.item<double>();
  r.logits = array(logits);
  for (const auto& [name, leaf] : leaves) r.grads.push_back({name, grad_of(leaf)});
  return r;
}

}  // namespace torch_ref

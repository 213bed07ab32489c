// tessera/quant/fp8_training.hpp — the FP8 matrix products of the FP8 training recipes
// (train/precision.hpp: FP8Delayed, FP8Tile), and the hook through which a layer's linear
// products reach them.
//
// What is quantised: the operands of the linear products inside attention's projections
// (wq, wk, wv, wo), the dense SwiGLU FFN and every MoE expert (routed and shared). The
// embedding, the LM head, the router's gate, the norms, attention's score / softmax / value
// products and the window selector stay in the model's precision, as DeepSeek-V3 keeps them
// (section 3.3.1: the components sensitive to low precision, or too cheap to matter).
//
// The two recipes (both accumulate in fp32):
//
//  * Fp8DelayedProducts (NVIDIA Transformer Engine's DelayedScaling, margin 0, history 16, "max"
//    reduction): one scale per tensor, q = fp8(v · scale), scale = fp8_max / max(amax history)
//    · 2^-margin. Forward: x and W in E4M3. Backward: dy in E5M2 (its range, 2^-16 .. 57344,
//    is what an unscaled-by-loss gradient needs), reused with the forward's E4M3 x and W:
//    dx = dy W and dW = dy^T x. Each product's amaxes (x, W, dy) are RECORDED during the step
//    (the max over every call of the step) and the history rolls only in end_step(), which the
//    trainer calls once per optimizer step, as TE updates its scales once per step. So within a
//    step every scale is fixed: a forward run twice (activation recompute) gives the same bits,
//    and backward re-derives exactly the forward's codes of x and W from the saved fp32 x and W
//    (the same scale applied to the same values); a GPU kernel would keep the 1-byte codes
//    instead. First step, or a product seen for the first time: no history yet, so the scale
//    comes from the tensor's own current amax (just-in-time scaling for that one call; a pure
//    function of the tensor, so recompute-safe too).
//
//  * Fp8TileProducts (DeepSeek-V3 section 3.3.2): activations in E4M3 with one scale per 1x128
//    tile along the reduction axis K, weights in E4M3 with one scale per 128x128 block; the
//    product is computed per 128-wide slice of K on the codes, and each slice's fp32 partial sum
//    is multiplied by (activation tile scale · weight block scale) and added in fp32, as
//    DeepGEMM promotes its partial sums. Backward: E4M3 for every operand, as DeepSeek-V3 does
//    ("we adopt the E4M3 format on all tensors for higher precision"): with one scale per 128
//    values the tile already covers the gradient's dynamic range, so E5M2's extra exponent bit
//    buys nothing and E4M3's extra mantissa bit halves the rounding error. dgrad dx = dy W: dy
//    in 1x128 tiles along its out axis (now the reduction), W reusing its forward 128x128
//    blocks (a square block serves W and W^T alike, which is why DeepSeek-V3 blocks weights
//    128x128). wgrad dW = dy^T x: both operands tiled 128x1 (128 tokens per scale, along the
//    token axis that wgrad reduces over), as DeepSeek-V3 re-tiles its cached activations; we
//    quantise the saved fp32 x directly (one rounding instead of their two). Stateless.
//
// Numerics on the CPU: the FP8 codes are those of core/number.hpp's bit-exact conversions (round
// to nearest even, saturating; computed here by a float-domain rounding checked against them),
// the scales those of quant/fp8_scaling.hpp. Products run on the
// codes widened to float (exactly representable) through ops::matmul's fp32 GEMM, one GEMM per
// 128-slice of K (per-tensor scaling is the one-slice case), then the slice's scale product
// multiplies the partial sums, summed in fp32. That is the kernels' arithmetic, so it equals
// "dequantise, then multiply in double" up to fp32 summation order and rounding.
//
// The hook. Layers are templated on their number type only (Attention<T, Window>,
// SwiGluFfn<T>), and WithRecipe<Config, FP8Tile> keeps Scalar = float, so a layer cannot see
// the recipe in its type without adding a recipe parameter to every layer, block, trunk and
// decoder type. Instead the recipe TYPE picks the products object (FP8Tile::Products =
// Fp8TileProducts, FP8Delayed::Products = Fp8DelayedProducts), the Trainer owns one, and
// installs it for the duration of a step with an Fp8Scope (a thread_local pointer, restored on
// exit). The layers call recipe_linear / recipe_linear_backward instead of ops::linear /
// ops::linear_backward: with no scope installed these ARE ops::linear / linear_backward, so
// every model outside an FP8 trainer computes exactly what it computed before. The pointer is
// thread_local because a forward runs its layers on the calling thread (OpenMP threads only run
// inside ops); two trainers on two threads do not see each other's recipe. A forward outside
// Trainer::step / evaluate (sampling) runs in fp32 unless it installs
// Fp8Scope(trainer.fp8_products(), /*record=*/false).
//
// Delayed scaling identifies a product by its weight's data pointer (one weight matrix, one
// product); Trainer::state() saves the histories under the weights' parameter names.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <map>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/quant/fp8_scaling.hpp"

namespace tessera {

// The three operands of a linear product y = x W^T and its gradients.
enum class Fp8Operand : int { kInput = 0, kWeight = 1, kGradOutput = 2 };
inline constexpr int kFp8Operands = 3;

// An FP8-quantised (rows, cols) matrix: the codes widened to float (exact), and one
// dequantisation multiplier per (tile_rows, tile_cols) tile; tile_cols is the width of the
// K-slices a product with it runs in.
struct Fp8Matrix {
  std::vector<float> codes;   // (rows, cols)
  std::vector<float> scales;  // (ceil(rows / tile_rows), ceil(cols / tile_cols))
  int64_t rows = 0, cols = 0, tile_rows = 1, tile_cols = 1;

  int64_t tiles_across() const { return (cols + tile_cols - 1) / tile_cols; }
  float scale(int64_t r, int64_t slice) const {
    return scales[static_cast<size_t>((r / tile_rows) * tiles_across() + slice)];
  }
};

namespace fp8_detail {

// (rows, cols) -> (cols, rows)
inline std::vector<float> transposed(const float* x, int64_t rows, int64_t cols) {
  std::vector<float> t(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[static_cast<size_t>(c * rows + r)] = x[r * cols + c];
  return t;
}

}  // namespace fp8_detail

// float(Fp8::from_float(v, kSatFinite)) for a finite v, computed in float arithmetic: the
// products only need the code's value, and core/number.hpp's encoder (through double, written
// to mirror CUDA's bit by bit) costs ~16 ns an element where this costs ~1. Round to nearest
// even at the format's quantum (mantissa bits above its smallest normal, a fixed step below),
// then saturate. Rounding a float once at that quantum is what the encoder does to the same
// (exactly widened) value; test_fp8_recipes compares the two at every code boundary.
template <Fp8Type Fp8>
inline float fp8_round(float v) {
  using Tr = number_traits<Fp8>;
  constexpr int kDrop = 23 - Tr::mantissa_bits;  // float mantissa bits below the format's
  constexpr float kMinNormal = Tr::min_subnormal * float(1 << Tr::mantissa_bits);
  // Adding this puts the sum's float ulp at the subnormal quantum, so the add rounds to it.
  constexpr float kSubnormalRounder = Tr::min_subnormal * float(1 << 23);
  const float a = std::fabs(v);
  float r;
  if (a >= kMinNormal) {
    std::uint32_t u = std::bit_cast<std::uint32_t>(a);
    u += ((1u << (kDrop - 1)) - 1u) + ((u >> kDrop) & 1u);
    r = std::bit_cast<float>(u & ~((1u << kDrop) - 1u));  // inf when it carries past float's max
  } else {
    r = (a + kSubnormalRounder) - kSubnormalRounder;
  }
  return std::copysign(std::min(r, Tr::max_finite), v);
}

namespace fp8_detail {

template <Fp8Type Fp8>
void round_tile(const float* x, int64_t rows, int64_t cols, int64_t r0, int64_t r1, int64_t c0,
                int64_t c1, float multiplier, float* codes) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < c1; ++c) codes[r * cols + c] = fp8_round<Fp8>(x[r * cols + c] * multiplier);
}

// quant/fp8_scaling.hpp's tiled quantisation (same amax floor, same pair of scales), writing the
// codes' values: tiles of (tile_rows, tile_cols).
template <Fp8Type Fp8>
Fp8Matrix tiled(const float* x, int64_t rows, int64_t cols, int64_t tile_rows, int64_t tile_cols) {
  constexpr float kMax = number_traits<Fp8>::max_finite;
  Fp8Matrix m{std::vector<float>(static_cast<size_t>(rows * cols)), {}, rows, cols, tile_rows,
              tile_cols};
  m.scales.resize(static_cast<size_t>(((rows + tile_rows - 1) / tile_rows) * m.tiles_across()));
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const int64_t r1 = std::min(rows, r0 + tile_rows);
    for (int64_t c0 = 0; c0 < cols; c0 += tile_cols) {
      const int64_t c1 = std::min(cols, c0 + tile_cols);
      float tile_amax = 0.0f;
      // amax's NaN first: std::max(m, NaN) would return m and hide it.
      for (int64_t r = r0; r < r1 && !std::isnan(tile_amax); ++r)
        tile_amax = std::max(amax(x + r * cols + c0, c1 - c0), tile_amax);
      TESSERA_CHECK(std::isfinite(tile_amax), "fp8 tile at row ", r0, ", column ", c0,
                    " has amax ", tile_amax, "; FP8 scaling needs finite values");
      const float a = tile_amax == 0.0f ? kMax : std::max(tile_amax, fp8_min_scaled_amax<Fp8>());
      m.scales[static_cast<size_t>((r0 / tile_rows) * m.tiles_across() + c0 / tile_cols)] = a / kMax;
      round_tile<Fp8>(x, rows, cols, r0, r1, c0, c1, kMax / a, m.codes.data());
    }
  }
  return m;
}

}  // namespace fp8_detail

// One scale for the whole matrix; `scale` is the quantisation multiplier (TE's convention,
// quant/fp8_scaling.hpp), the stored dequantisation multiplier is 1 / scale (TE's scale_inv).
// The codes are those of quantize_per_tensor (test_fp8_recipes checks it).
template <Fp8Type Fp8>
Fp8Matrix fp8_per_tensor(const float* x, int64_t rows, int64_t cols, float scale) {
  TESSERA_CHECK(std::isfinite(scale) && scale > 0.0f, "fp8_per_tensor: scale = ", scale,
                " must be finite and > 0");
  Fp8Matrix m{std::vector<float>(static_cast<size_t>(rows * cols)), {1.0f / scale}, rows, cols,
              std::max<int64_t>(rows, 1), std::max<int64_t>(cols, 1)};
  fp8_detail::round_tile<Fp8>(x, rows, cols, 0, rows, 0, cols, scale, m.codes.data());
  return m;
}

// One scale per 1x128 tile along each row: quantize_tiles_1x128's codes and scales.
template <Fp8Type Fp8>
Fp8Matrix fp8_tiles_1x128(const float* x, int64_t rows, int64_t cols) {
  return fp8_detail::tiled<Fp8>(x, rows, cols, 1, kFp8TileSize);
}

// One scale per 128x128 block: quantize_blocks_128x128's codes and scales.
template <Fp8Type Fp8>
Fp8Matrix fp8_blocks_128x128(const float* w, int64_t rows, int64_t cols) {
  return fp8_detail::tiled<Fp8>(w, rows, cols, kFp8TileSize, kFp8TileSize);
}

// The same codes and scales read as the (cols, rows) transpose: the tile grid transposes too.
inline Fp8Matrix fp8_transpose(const Fp8Matrix& m) {
  const int64_t down = (m.rows + m.tile_rows - 1) / m.tile_rows, across = m.tiles_across();
  Fp8Matrix t{fp8_detail::transposed(m.codes.data(), m.rows, m.cols),
              fp8_detail::transposed(m.scales.data(), down, across), m.cols, m.rows, m.tile_cols,
              m.tile_rows};
  return t;
}

// out (M, N) = sum over K-slices s of (sa(m, s) · sb(n, s)) · sum_{k in s} a[m, k] b[n, k], for
// a (M, K) and b (N, K) cut into the same K-slices. Each slice's partial product is one fp32
// GEMM on the codes; the scale product is formed in fp32 and applied to it, and the slices are
// added in fp32 in slice order.
inline void fp8_product(const Fp8Matrix& a, const Fp8Matrix& b, float* out) {
  TESSERA_CHECK(a.cols == b.cols && a.tile_cols == b.tile_cols, "fp8_product: operands (", a.rows,
                ", ", a.cols, ") with K-slices of ", a.tile_cols, " and (", b.rows, ", ", b.cols,
                ") with K-slices of ", b.tile_cols, " must share K and its slicing");
  const int64_t M = a.rows, N = b.rows, K = a.cols, w = a.tile_cols;
  std::fill_n(out, M * N, 0.0f);
  if (M * N == 0) return;
  const TensorView<const float, Cpu> av(a.codes.data(), Shape{M, K});
  const TensorView<const float, Cpu> bv(b.codes.data(), Shape{N, K});
  std::vector<float> sb(static_cast<size_t>(N));
  for (int64_t s = 0, k0 = 0; k0 < K; ++s, k0 += w) {
    const int64_t k1 = std::min(K, k0 + w);
    const Tensor<float> p = ops::matmul<float>(av.slice(1, k0, k1), bv.slice(1, k0, k1),
                                               ops::Transpose::kNo, ops::Transpose::kYes);
    for (int64_t n = 0; n < N; ++n) sb[size_t(n)] = b.scale(n, s);
    for (int64_t m = 0; m < M; ++m) {
      const float sa = a.scale(m, s);
      const float* pm = p.data() + m * N;
      float* om = out + m * N;
      for (int64_t n = 0; n < N; ++n) om[n] += (sa * sb[size_t(n)]) * pm[n];
    }
  }
}

// What a layer's linear product asks of an FP8 recipe. Operands are contiguous row-major fp32:
// x (rows, in), w (out, in), dy (rows, out).
class Fp8Products {
 public:
  virtual ~Fp8Products() = default;
  // y (rows, out) = x w^T
  virtual void linear(const float* x, const float* w, int64_t rows, int64_t in, int64_t out,
                      float* y) = 0;
  // dx (rows, in) = dy w; dw (out, in) = dy^T x (written, not accumulated)
  virtual void linear_backward(const float* dy, const float* x, const float* w, int64_t rows,
                               int64_t in, int64_t out, float* dx, float* dw) = 0;
  // Whether calls record amaxes for the next scales (off while evaluating).
  bool recording = true;
};

// ---- DeepSeek-V3's fine-grained tiles ---------------------------------------------------
class Fp8TileProducts final : public Fp8Products {
 public:
  void linear(const float* x, const float* w, int64_t rows, int64_t in, int64_t out,
              float* y) override {
    fp8_product(fp8_tiles_1x128<fp8_e4m3>(x, rows, in), fp8_blocks_128x128<fp8_e4m3>(w, out, in), y);
  }

  void linear_backward(const float* dy, const float* x, const float* w, int64_t rows, int64_t in,
                       int64_t out, float* dx, float* dw) override {
    // dgrad reduces over `out`: dy (rows, out) in 1x128 tiles, w^T (in, out) in w's blocks.
    const Fp8Matrix wt = fp8_transpose(fp8_blocks_128x128<fp8_e4m3>(w, out, in));
    fp8_product(fp8_tiles_1x128<fp8_e4m3>(dy, rows, out), wt, dx);
    // wgrad reduces over the rows (tokens): both operands tiled along them.
    const std::vector<float> dyt = fp8_detail::transposed(dy, rows, out);  // (out, rows)
    const std::vector<float> xt = fp8_detail::transposed(x, rows, in);     // (in, rows)
    fp8_product(fp8_tiles_1x128<fp8_e4m3>(dyt.data(), out, rows),
                fp8_tiles_1x128<fp8_e4m3>(xt.data(), in, rows), dw);
  }
};

// ---- Transformer Engine's delayed per-tensor scaling ------------------------------------
struct DelayedScalingOptions {
  int history = 16;  // amax_history_len
  int margin = 0;    // scale = fp8_max / amax · 2^-margin
};

class Fp8DelayedProducts final : public Fp8Products {
 public:
  // Per product (keyed by its weight's data pointer) and operand: the amaxes of past steps,
  // oldest first, and the running max of the current step (< 0: not seen this step).
  struct Site {
    std::array<std::vector<float>, kFp8Operands> history;
    std::array<float, kFp8Operands> pending{-1.0f, -1.0f, -1.0f};
  };

  explicit Fp8DelayedProducts(DelayedScalingOptions options = {}) : o_(options) {
    TESSERA_CHECK(o_.history >= 1 && o_.margin >= 0, "Fp8DelayedProducts: history = ", o_.history,
                  " must be >= 1 and margin = ", o_.margin, " >= 0");
  }
  const DelayedScalingOptions& options() const { return o_; }

  // The quantisation multiplier an operand of product `key` gets now, for a tensor whose own
  // amax is `current` (used only while the history is empty).
  template <Fp8Type Fp8>
  float scale(const void* key, Fp8Operand op, float current) const {
    const auto it = sites_.find(key);
    const std::vector<float>* h = it == sites_.end() ? nullptr : &it->second.history[index(op)];
    const float a = h == nullptr || h->empty() ? current : *std::max_element(h->begin(), h->end());
    return scale_from_amax<Fp8>(a, o_.margin);
  }

  void linear(const float* x, const float* w, int64_t rows, int64_t in, int64_t out,
              float* y) override {
    const Fp8Matrix xq = quantise<fp8_e4m3>(w, Fp8Operand::kInput, x, rows, in);
    const Fp8Matrix wq = quantise<fp8_e4m3>(w, Fp8Operand::kWeight, w, out, in);
    fp8_product(xq, wq, y);
  }

  void linear_backward(const float* dy, const float* x, const float* w, int64_t rows, int64_t in,
                       int64_t out, float* dx, float* dw) override {
    // The forward's E4M3 codes again (the scales cannot have moved within the step).
    const Fp8Matrix xq = quantise<fp8_e4m3>(w, Fp8Operand::kInput, x, rows, in);
    const Fp8Matrix wq = quantise<fp8_e4m3>(w, Fp8Operand::kWeight, w, out, in);
    const Fp8Matrix dyq = quantise<fp8_e5m2>(w, Fp8Operand::kGradOutput, dy, rows, out);
    fp8_product(dyq, fp8_transpose(wq), dx);                   // (rows, out) x (in, out)^T
    fp8_product(fp8_transpose(dyq), fp8_transpose(xq), dw);    // (out, rows) x (in, rows)^T
  }

  // The end of an optimizer step: each operand seen in the step pushes the step's amax onto its
  // history (dropping the oldest beyond `history`). The only place the scales change.
  void end_step() {
    for (auto& [key, site] : sites_)
      for (int i = 0; i < kFp8Operands; ++i) {
        if (site.pending[size_t(i)] < 0.0f) continue;
        std::vector<float>& h = site.history[size_t(i)];
        h.push_back(site.pending[size_t(i)]);
        if (static_cast<int>(h.size()) > o_.history) h.erase(h.begin());
        site.pending[size_t(i)] = -1.0f;
      }
  }

  const std::map<const void*, Site>& sites() const { return sites_; }
  // Restores a history (a checkpoint's), oldest first; at most `history` values are kept.
  void set_history(const void* key, Fp8Operand op, std::vector<float> amaxes) {
    if (static_cast<int>(amaxes.size()) > o_.history)
      amaxes.erase(amaxes.begin(), amaxes.end() - o_.history);
    sites_[key].history[index(op)] = std::move(amaxes);
  }

 private:
  static size_t index(Fp8Operand op) { return static_cast<size_t>(op); }

  template <Fp8Type Fp8>
  Fp8Matrix quantise(const void* key, Fp8Operand op, const float* v, int64_t rows, int64_t cols) {
    const float a = amax(v, rows * cols);
    const float s = scale<Fp8>(key, op, a);  // throws on a non-finite amax
    if (recording) {
      float& p = sites_[key].pending[index(op)];
      p = std::max(p, a);
    }
    return fp8_per_tensor<Fp8>(v, rows, cols, s);
  }

  DelayedScalingOptions o_;
  std::map<const void*, Site> sites_;
};

// ---- the hook ----------------------------------------------------------------------------
namespace fp8_detail {
inline thread_local Fp8Products* t_products = nullptr;
}  // namespace fp8_detail

// The products installed on this thread, or nullptr (every product in the model's precision).
inline Fp8Products* active_fp8_products() { return fp8_detail::t_products; }

// Installs `products` (and its recording flag) until the end of the scope; scopes nest.
class Fp8Scope {
 public:
  explicit Fp8Scope(Fp8Products& products, bool record = true)
      : previous_(fp8_detail::t_products), products_(products), was_recording_(products.recording) {
    products.recording = record;
    fp8_detail::t_products = &products;
  }
  ~Fp8Scope() {
    products_.recording = was_recording_;
    fp8_detail::t_products = previous_;
  }
  Fp8Scope(const Fp8Scope&) = delete;
  Fp8Scope& operator=(const Fp8Scope&) = delete;

 private:
  Fp8Products* previous_;
  Fp8Products& products_;
  bool was_recording_;
};

namespace fp8_detail {
template <class T>
const T* dense(TensorView<const T, Cpu> v, Tensor<T>& holder) {
  if (v.is_contiguous()) return v.data();
  holder = v.contiguous();
  return holder.data();
}
template <class T>
void check_model_precision(const char* who) {
  TESSERA_CHECK((std::is_same_v<T, float> || active_fp8_products() == nullptr), who,
                ": an FP8 recipe is installed, but this model computes in ", number_traits<T>::name,
                "; the FP8 recipes run float models (WithRecipe<Config, FP8Tile / FP8Delayed>)");
}
}  // namespace fp8_detail

// ops::linear(x, w) without bias, or the installed FP8 recipe's product.
// x (..., in), w (out, in) -> y (..., out)
template <class T>
Tensor<T> recipe_linear(TensorView<const T, Cpu> x, TensorView<const T, Cpu> w) {
  fp8_detail::check_model_precision<T>("recipe_linear");
  if constexpr (std::is_same_v<T, float>) {
    if (Fp8Products* p = active_fp8_products()) {
      check_rank("recipe_linear", "w", w.shape(), 2);
      TESSERA_CHECK(w.is_contiguous(), "recipe_linear: the weight must be a parameter's own "
                    "(contiguous) storage: its address names the product's FP8 scaling state");
      const int64_t in = w.dim(1), out = w.dim(0);
      TESSERA_CHECK(x.rank() >= 1 && x.dim(-1) == in, "recipe_linear: tensor 'x' has shape ",
                    x.shape(), "; expected (..., ", in, ") for w ", w.shape());
      Shape ys = x.shape();
      ys[-1] = out;
      Tensor<float> y = Tensor<float>::empty(ys);
      Tensor<float> xh;
      p->linear(fp8_detail::dense(x, xh), w.data(), x.numel() / in, in, out, y.data());
      return y;
    }
  }
  return ops::linear<T>(x, w);
}

// ops::linear_backward(dy, x, w, false), or the installed FP8 recipe's. dbias is empty.
template <class T>
ops::LinearGrads<T> recipe_linear_backward(TensorView<const T, Cpu> dy, TensorView<const T, Cpu> x,
                                           TensorView<const T, Cpu> w) {
  fp8_detail::check_model_precision<T>("recipe_linear_backward");
  if constexpr (std::is_same_v<T, float>) {
    if (Fp8Products* p = active_fp8_products()) {
      check_rank("recipe_linear_backward", "w", w.shape(), 2);
      TESSERA_CHECK(w.is_contiguous(), "recipe_linear_backward: the weight must be a parameter's "
                    "own (contiguous) storage: its address names the product's FP8 scaling state");
      const int64_t in = w.dim(1), out = w.dim(0);
      TESSERA_CHECK(x.rank() >= 1 && x.dim(-1) == in, "recipe_linear_backward: tensor 'x' has shape ",
                    x.shape(), "; expected (..., ", in, ") for w ", w.shape());
      Shape ys = x.shape();
      ys[-1] = out;
      check_shape("recipe_linear_backward", "dy", dy.shape(), ys);
      ops::LinearGrads<float> g;
      g.dx = Tensor<float>::empty(x.shape());
      g.dweight = Tensor<float>::empty(w.shape());
      Tensor<float> dyh, xh;
      p->linear_backward(fp8_detail::dense(dy, dyh), fp8_detail::dense(x, xh), w.data(),
                         x.numel() / in, in, out, g.dx.data(), g.dweight.data());
      return g;
    }
  }
  return ops::linear_backward<T>(dy, x, w, false);
}

}  // namespace tessera

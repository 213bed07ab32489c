// tessera/ops/rope.hpp — rotary position embedding (RoPE) with long-context scaling.
//
// RoPE rotates each pair of query/key features by an angle proportional to the token's
// position, so that the attention logit q_m . k_n depends on the positions only through m - n.
//
// How it is built, and why:
//   * The cos/sin table (positions x rotary_dim/2) is computed once, in a RopeTable, and reused
//     by every call (every layer, every step, every decode token). It is computed in double —
//     angle = position * inv_freq in double, cos/sin in double, rounded once to the table's
//     type — because at long context the angle is large: at position 16383 the fastest pair
//     turns 16383 rad, and a float angle there is already wrong in the third decimal
//     (float spacing at 16384 is 2^-9), which would silently corrupt every long sequence.
//   * Two pair layouts, because checkpoints use both:
//       kHalfSplit   (GPT-NeoX / Llama / DeepSeek HF checkpoints): pair i is (x[i], x[i + r/2])
//       kInterleaved (GPT-J / Meta's original Llama / DeepSeek-V3 reference code):
//                    pair i is (x[2i], x[2i + 1])
//     with r = rotary_dim. Features at index >= rotary_dim pass through unchanged (partial
//     rotary, as GPT-NeoX's rotary_pct / GPT-J's rotary_dim).
//   * Pair i turns by angle(p, i) = p * inv_freq[i], inv_freq[i] = theta^(-2i/r), then the
//     scaling kind adjusts inv_freq (and, for YaRN, multiplies cos and sin by the attention
//     factor); the formulas are written at `rope_inv_freq` and in docs/ops-activations.md.
//   * Positions come either as an int32 tensor (packed sequences, per-batch offsets) or as a
//     start offset (KV-cache decoding: token s sits at start + s). A position outside the table
//     throws; it is never clamped or wrapped.
//   * Backward is the transpose of the forward map. Each pair's map is a * R(angle) with a the
//     attention factor (1 unless YaRN), whose transpose is a * R(-angle): the same kernel with
//     the sine negated.
//   * Low-precision inputs are widened to float and rounded once on output; double inputs are
//     computed in double (with a RopeTable<double> the whole path is double).
//
// Shapes: x is (batch, seq, heads, head_dim) or (seq, heads, head_dim); positions are (seq)
// (shared by the batch) or (batch, seq).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <type_traits>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::ops {

// Which features form a rotating pair (see the file header).
enum class RopeLayout { kHalfSplit, kInterleaved };

enum class RopeScalingKind {
  kNone,    // inv_freq[i] = theta^(-2i/r)
  kLinear,  // position interpolation: inv_freq[i] / factor
  kNtk,     // NTK-aware: theta' = theta * factor^(r/(r-2))
  kYarn,    // YaRN: per-pair ramp between interpolation and extrapolation, plus attention factor
};

struct RopeScaling {
  RopeScalingKind kind = RopeScalingKind::kNone;
  double factor = 1.0;  // context extension factor (new length / trained length); > 0

  // YaRN only (defaults are the YaRN paper's and DeepSeek-V3's).
  int64_t original_max_position = 4096;  // the context length the model was trained at
  double beta_fast = 32.0;               // pairs turning more than beta_fast times: extrapolate
  double beta_slow = 1.0;                // pairs turning fewer than beta_slow times: interpolate
  // Attention factor multiplied into cos and sin (so into q and k; the logits see its square).
  // 0 means derived: yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim),
  // the denominator being 1 when mscale_all_dim is 0. With the defaults that is
  // 0.1 * ln(factor) + 1, as in the YaRN paper. DeepSeek-V3's config sets mscale =
  // mscale_all_dim = 1, giving 1 here; its attention then multiplies the softmax scale by
  // yarn_get_mscale(factor, mscale_all_dim)^2 instead.
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  double attention_factor = 0.0;
};

struct RopeConfig {
  float theta = 10000.0f;  // the base
  int rotary_dim = -1;     // features rotated, from the start of head_dim; -1 = all of head_dim
  RopeScaling scaling{};
  RopeLayout layout = RopeLayout::kHalfSplit;
};

// YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 for factor > 1, else 1.
inline double yarn_get_mscale(double factor, double mscale = 1.0) {
  return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0;
}

// The pair index at which a frequency completes `rotations` full turns over `max_position`
// tokens: r * ln(max_position / (2 pi rotations)) / (2 ln theta). Not an integer in general.
inline double yarn_correction_dim(double rotations, int64_t rotary_dim, double theta,
                                  int64_t max_position) {
  return static_cast<double>(rotary_dim) *
         std::log(static_cast<double>(max_position) / (rotations * 2.0 * std::numbers::pi)) /
         (2.0 * std::log(theta));
}

// The ramp's ends [low, high] in pair indices: pairs below low extrapolate (keep their trained
// frequency), pairs above high interpolate (frequency / factor), and in between a linear blend.
struct YarnRange {
  double low;
  double high;
};
inline YarnRange yarn_correction_range(double beta_fast, double beta_slow, int64_t rotary_dim,
                                       double theta, int64_t original_max_position) {
  const double low =
      std::floor(yarn_correction_dim(beta_fast, rotary_dim, theta, original_max_position));
  const double high =
      std::ceil(yarn_correction_dim(beta_slow, rotary_dim, theta, original_max_position));
  return {std::max(low, 0.0), std::min(high, static_cast<double>(rotary_dim - 1))};
}

// Resolves rotary_dim = -1 against head_dim and checks the whole config; returns rotary_dim.
inline int64_t rope_rotary_dim(const RopeConfig& config, int64_t head_dim) {
  TESSERA_CHECK(head_dim > 0, "rope: head_dim must be positive, got ", head_dim);
  const int64_t r = config.rotary_dim == -1 ? head_dim : config.rotary_dim;
  TESSERA_CHECK(r >= 2 && r <= head_dim && r % 2 == 0, "rope: rotary_dim must be even and in [2, ",
                "head_dim = ", head_dim, "] (or -1 for all of head_dim), got ", config.rotary_dim,
                config.rotary_dim == -1 ? " (head_dim is odd)" : "");
  TESSERA_CHECK(std::isfinite(config.theta) && config.theta > 1.0f,
                "rope: theta must be a finite number > 1, got ", config.theta);
  const RopeScaling& s = config.scaling;
  if (s.kind != RopeScalingKind::kNone) {
    TESSERA_CHECK(std::isfinite(s.factor) && s.factor > 0.0,
                  "rope: scaling.factor must be a finite positive number, got ", s.factor);
  }
  if (s.kind == RopeScalingKind::kNtk) {
    TESSERA_CHECK(r > 2, "rope: NTK-aware scaling needs rotary_dim > 2 (theta is scaled by ",
                  "factor^(r/(r-2))), got rotary_dim ", r);
  }
  if (s.kind == RopeScalingKind::kYarn) {
    TESSERA_CHECK(s.original_max_position > 0,
                  "rope: YaRN needs scaling.original_max_position > 0, got ",
                  s.original_max_position);
    TESSERA_CHECK(s.beta_fast > 0.0 && s.beta_slow > 0.0,
                  "rope: YaRN needs positive beta_fast and beta_slow, got ", s.beta_fast, " and ",
                  s.beta_slow);
    TESSERA_CHECK(s.attention_factor >= 0.0,
                  "rope: YaRN attention_factor must be >= 0 (0 = derived), got ",
                  s.attention_factor);
  }
  return r;
}

// The per-pair angular frequencies after scaling, in double: rotary_dim / 2 values.
//   none:   inv_freq[i] = theta^(-2i/r)
//   linear: theta^(-2i/r) / factor                       (Chen et al. 2023, position interpolation)
//   NTK:    (theta * factor^(r/(r-2)))^(-2i/r)           (bloc97's NTK-aware scaled RoPE)
//   YaRN:   extra[i] * (1 - ramp[i]) + extra[i] / factor * ramp[i],  extra[i] = theta^(-2i/r),
//           ramp[i] = clamp((i - low) / (high - low), 0, 1), [low, high] = yarn_correction_range
//           (high += 0.001 when low == high)             (Peng et al. 2023, YaRN; as the reference
//           code jquesnelle/yarn LlamaYaRNScaledRotaryEmbedding and DeepSeek-V3's
//           inference/model.py precompute_freqs_cis compute it)
inline std::vector<double> rope_inv_freq(const RopeConfig& config, int64_t rotary_dim) {
  const RopeScaling& s = config.scaling;
  double theta = config.theta;
  if (s.kind == RopeScalingKind::kNtk) {
    theta *=
        std::pow(s.factor, static_cast<double>(rotary_dim) / static_cast<double>(rotary_dim - 2));
  }
  const int64_t pairs = rotary_dim / 2;
  std::vector<double> inv(static_cast<size_t>(pairs));
  for (int64_t i = 0; i < pairs; ++i) {
    inv[i] = 1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(rotary_dim));
  }
  if (s.kind == RopeScalingKind::kLinear) {
    for (double& f : inv) f /= s.factor;
  } else if (s.kind == RopeScalingKind::kYarn) {
    YarnRange range = yarn_correction_range(s.beta_fast, s.beta_slow, rotary_dim, config.theta,
                                            s.original_max_position);
    if (range.low == range.high) range.high += 0.001;  // avoid 0/0 in the ramp
    for (int64_t i = 0; i < pairs; ++i) {
      const double ramp =
          std::clamp((static_cast<double>(i) - range.low) / (range.high - range.low), 0.0, 1.0);
      inv[i] = inv[i] * (1.0 - ramp) + inv[i] / s.factor * ramp;
    }
  }
  return inv;
}

// The factor multiplied into cos and sin: 1 unless the scaling is YaRN (see RopeScaling).
inline double rope_attention_factor(const RopeScaling& s) {
  if (s.kind != RopeScalingKind::kYarn) return 1.0;
  if (s.attention_factor > 0.0) return s.attention_factor;
  const double denom = s.mscale_all_dim != 0.0 ? yarn_get_mscale(s.factor, s.mscale_all_dim) : 1.0;
  return yarn_get_mscale(s.factor, s.mscale) / denom;
}

// The cos/sin table for positions [0, max_positions), built once and shared by every call.
// Acc is the type it is stored in: float (the default; also used for bf16/fp16 inputs) or
// double (for double inputs that must stay exact, e.g. finite-difference tests).
template <class Acc = float>
class RopeTable {
  static_assert(std::is_same_v<Acc, float> || std::is_same_v<Acc, double>,
                "RopeTable<Acc>: Acc must be float or double");

 public:
  RopeTable(const RopeConfig& config, int64_t head_dim, int64_t max_positions)
      : config_(config),
        head_dim_(head_dim),
        rotary_dim_(rope_rotary_dim(config, head_dim)),
        max_positions_(max_positions),
        attention_factor_(rope_attention_factor(config.scaling)),
        inv_freq_(rope_inv_freq(config, rotary_dim_)) {
    TESSERA_CHECK(max_positions >= 0, "RopeTable: max_positions must be >= 0, got ", max_positions);
    const int64_t pairs = rotary_dim_ / 2;
    cos_ = Tensor<Acc>::empty({max_positions, pairs});  // (positions, rotary_dim/2)
    sin_ = Tensor<Acc>::empty({max_positions, pairs});  // (positions, rotary_dim/2)
    Acc* pc = cos_.data();
    Acc* ps = sin_.data();
    const double* inv = inv_freq_.data();
    const double a = attention_factor_;
#pragma omp parallel for schedule(static) if (max_positions * pairs >= (1 << 14))
    for (int64_t p = 0; p < max_positions; ++p) {
      for (int64_t i = 0; i < pairs; ++i) {
        const double angle = static_cast<double>(p) * inv[i];
        pc[p * pairs + i] = static_cast<Acc>(a * std::cos(angle));
        ps[p * pairs + i] = static_cast<Acc>(a * std::sin(angle));
      }
    }
  }

  const RopeConfig& config() const { return config_; }
  RopeLayout layout() const { return config_.layout; }
  int64_t head_dim() const { return head_dim_; }
  int64_t rotary_dim() const { return rotary_dim_; }
  int64_t max_positions() const { return max_positions_; }
  double attention_factor() const { return attention_factor_; }
  const std::vector<double>& inv_freq() const { return inv_freq_; }  // rotary_dim/2 values
  const Tensor<Acc>& cos() const {
    return cos_;
  }  // (max_positions, rotary_dim/2), times the factor
  const Tensor<Acc>& sin() const {
    return sin_;
  }  // (max_positions, rotary_dim/2), times the factor

 private:
  RopeConfig config_;
  int64_t head_dim_;
  int64_t rotary_dim_;
  int64_t max_positions_;
  double attention_factor_;
  std::vector<double> inv_freq_;
  Tensor<Acc> cos_;
  Tensor<Acc> sin_;
};

namespace rope_detail {

template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T, class A>
inline A load(T v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<A>(v);
  } else {
    return static_cast<A>(to_float(v));
  }
}

template <class T, class A>
inline T store(A v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<T>(v);
  } else {
    return from_float<T>(static_cast<float>(v));
  }
}

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

inline std::string index_str(int64_t flat, const Shape& shape) {
  std::string s;
  for (int a = shape.rank() - 1; a >= 0; --a) {
    s = std::to_string(flat % shape[a]) + (s.empty() ? "" : ", ") + s;
    flat /= shape[a];
  }
  return "[" + s + "]";
}

// x's (batch, seq, heads, head_dim), with batch = 1 for a rank-3 input.
struct Dims {
  int64_t batch, seq, heads, head_dim;
};

template <class Acc>
Dims check_input(const char* op, const char* name, const Shape& s, const RopeTable<Acc>& table) {
  TESSERA_CHECK(s.rank() == 3 || s.rank() == 4, op, ": tensor '", name,
                "' must be (batch, seq, heads, head_dim) or (seq, heads, head_dim), got shape ", s);
  TESSERA_CHECK(s[-1] == table.head_dim(), op, ": tensor '", name, "' has head_dim ", s[-1],
                " (shape ", s, "), but the RopeTable was built for head_dim ", table.head_dim());
  return s.rank() == 4 ? Dims{s[0], s[1], s[2], s[3]} : Dims{1, s[0], s[1], s[2]};
}

// out = a * R(sign * angle) x, row by row; pos(b, s) gives each row's table position.
// C is the compute type: double when either x or the table is double, float otherwise.
template <class T, class Acc, class Pos>
Tensor<T> apply(TensorView<const T, Cpu> x, const RopeTable<Acc>& table, const Dims& d, Pos pos,
                bool inverse) {
  using C = std::conditional_t<std::is_same_v<acc_t<T>, double> || std::is_same_v<Acc, double>,
                               double, float>;
  const Dense<T> xd(x);
  auto out = Tensor<T>::empty(x.shape());
  const int64_t rows = d.batch * d.seq;
  const int64_t pairs = table.rotary_dim() / 2;
  const int64_t rd = table.rotary_dim();
  const bool interleaved = table.layout() == RopeLayout::kInterleaved;
  const Acc* cos_tab = table.cos().data();
  const Acc* sin_tab = table.sin().data();
  const T* px = xd.data;
  T* po = out.data();
  const C sign = inverse ? C(-1) : C(1);
#pragma omp parallel for schedule(static) if (x.numel() >= (1 << 14))
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t p = pos(row / d.seq, row % d.seq);
    const Acc* c = cos_tab + p * pairs;
    const Acc* s = sin_tab + p * pairs;
    for (int64_t h = 0; h < d.heads; ++h) {
      const int64_t base = (row * d.heads + h) * d.head_dim;
      const T* xi = px + base;
      T* yo = po + base;
      for (int64_t i = 0; i < pairs; ++i) {
        const int64_t i0 = interleaved ? 2 * i : i;
        const int64_t i1 = interleaved ? 2 * i + 1 : i + pairs;
        const C a = load<T, C>(xi[i0]), b = load<T, C>(xi[i1]);
        const C ci = static_cast<C>(c[i]), si = sign * static_cast<C>(s[i]);
        yo[i0] = store<T, C>(a * ci - b * si);
        yo[i1] = store<T, C>(b * ci + a * si);
      }
      for (int64_t j = rd; j < d.head_dim; ++j) yo[j] = xi[j];  // partial rotary: pass through
    }
  }
  return out;
}

template <class T, class Acc>
Tensor<T> run(const char* op, const char* name, TensorView<const T, Cpu> x,
              const RopeTable<Acc>& table, TensorView<const int32_t, Cpu> positions, bool inverse) {
  const Dims d = check_input(op, name, x.shape(), table);
  const Shape& ps = positions.shape();
  const bool per_batch = ps.rank() == 2;
  const bool shape_ok = (ps.rank() == 1 && ps[0] == d.seq) ||
                        (per_batch && x.rank() == 4 && ps == Shape{d.batch, d.seq});
  TESSERA_CHECK(shape_ok, op, ": tensor 'positions' has shape ", ps, ", expected [", d.seq, "]",
                x.rank() == 4
                    ? " or [" + std::to_string(d.batch) + ", " + std::to_string(d.seq) + "]"
                    : std::string(),
                " for '", name, "' of shape ", x.shape());
  const Dense<int32_t> pd(positions);
  const int32_t* pp = pd.data;
  // Checked up front, so the parallel loop never throws.
  for (int64_t i = 0; i < ps.numel(); ++i) {
    TESSERA_CHECK(pp[i] >= 0 && pp[i] < table.max_positions(), op, ": positions", index_str(i, ps),
                  " = ", pp[i], " is outside the RopeTable's positions [0, ", table.max_positions(),
                  "); build the table with a larger max_positions");
  }
  const int64_t seq = d.seq;
  if (per_batch) {
    return apply<T>(
        x, table, d, [pp, seq](int64_t b, int64_t s) { return pp[b * seq + s]; }, inverse);
  }
  return apply<T>(
      x, table, d, [pp](int64_t, int64_t s) { return pp[s]; }, inverse);
}

template <class T, class Acc>
Tensor<T> run(const char* op, const char* name, TensorView<const T, Cpu> x,
              const RopeTable<Acc>& table, int64_t start, bool inverse) {
  const Dims d = check_input(op, name, x.shape(), table);
  TESSERA_CHECK(start >= 0 && start + d.seq <= table.max_positions(), op, ": positions [", start,
                ", ", start + d.seq, ") of '", name, "' (shape ", x.shape(), ", start offset ",
                start, ") are outside the RopeTable's positions [0, ", table.max_positions(),
                "); build the table with a larger max_positions");
  return apply<T>(
      x, table, d, [start](int64_t, int64_t s) { return start + s; }, inverse);
}

}  // namespace rope_detail

// Rotates x (batch, seq, heads, head_dim) or (seq, heads, head_dim); token (b, s) sits at
// positions[s] (positions of shape (seq)) or positions[b, s] (shape (batch, seq)).
template <class T, class Acc>
Tensor<T> rope(TensorView<const T, Cpu> x, const RopeTable<Acc>& table,
               TensorView<const int32_t, Cpu> positions) {
  return rope_detail::run<T>("rope", "x", x, table, positions, false);
}

// Token s of every batch row sits at position start + s (KV-cache decoding: start = the number
// of tokens already cached).
template <class T, class Acc>
Tensor<T> rope(TensorView<const T, Cpu> x, const RopeTable<Acc>& table, int64_t start = 0) {
  return rope_detail::run<T>("rope", "x", x, table, start, false);
}

// dx = the transpose of rope applied to dout: rotation by the negative angle (times the same
// attention factor). Same positions as the forward call.
template <class T, class Acc>
Tensor<T> rope_backward(TensorView<const T, Cpu> dout, const RopeTable<Acc>& table,
                        TensorView<const int32_t, Cpu> positions) {
  return rope_detail::run<T>("rope_backward", "dout", dout, table, positions, true);
}

template <class T, class Acc>
Tensor<T> rope_backward(TensorView<const T, Cpu> dout, const RopeTable<Acc>& table,
                        int64_t start = 0) {
  return rope_detail::run<T>("rope_backward", "dout", dout, table, start, true);
}

}  // namespace tessera::ops

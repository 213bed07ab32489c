// tessera/train/optimizer.hpp — AdamW and SGD with momentum over a model's parameters, with
// fp32 master weights and fp32 gradient accumulators for low-precision parameters, and the
// global gradient norm (for clipping and for overflow detection) computed in double.
//
//   ts::train::AdamW<Model::value_type> opt({.lr = 3e-4, .weight_decay = 0.1});
//   for each micro-batch:  model.forward(...);  model.backward(saved, 1.0 / micro_batches);
//                          opt.absorb_grads(model);     // bf16/fp16: grads -> fp32, zeroed
//   const double norm = opt.grad_norm(model);           // sqrt(sum g^2), in double
//   opt.step(model, schedule(step), clip_scale(norm, 1.0));
//   opt.zero_grad(model);
//
// Why the optimizer owns the master weights and the fp32 gradients. A model stores one type
// (Config::Scalar) for values and gradients. With bf16 storage an update smaller than half an
// ulp of the weight (lr 3e-4 on a weight of 0.5 is 2^-12, below bf16's 2^-9 spacing) is lost,
// and a sum of micro-batch gradients rounded to 8 bits after every addition drifts. So for a
// low-precision parameter the optimizer keeps an fp32 copy (the master), applies every update
// to it, and writes bf16(master) back into the model; absorb_grads moves each micro-batch's
// gradient into an fp32 accumulator and zeroes the model's, so each micro-batch is rounded once
// and the sum is fp32. For float and double parameters both are the model's own tensors.
//
// The update follows PyTorch's torch.optim.AdamW / SGD (single-tensor path) operation by
// operation and in the same order, so the numbers can be compared with it:
//   AdamW: w *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//          w -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//   SGD:   g += wd w (coupled decay);  buf = g at the first step, else mu buf + (1 - dampening) g;
//          g = nesterov ? g + mu buf : buf;  w -= lr g
// Weight decay applies to tensors of rank >= 2 (matrices, embedding tables), not to norm
// weights or biases, unless the options say otherwise (`decay_all`).
//
// Parameters are identified by their visit order and name; every call checks that the model
// still hands out the same names in the same order, so an optimizer cannot be applied to
// another model by mistake.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/parameter.hpp"

namespace tessera::train {

// The type the optimizer computes and keeps state in: double for double parameters, float
// for everything else.
template <class T>
using master_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The multiplier global-norm clipping applies to every gradient (PyTorch's clip_grad_norm_:
// max_norm / (norm + 1e-6), at most 1). max_norm <= 0 switches clipping off.
inline double clip_scale(double norm, double max_norm) {
  if (max_norm <= 0.0) return 1.0;
  TESSERA_CHECK(std::isfinite(norm), "clip_scale: the gradient norm is ", norm,
                " (an overflow; skip the step instead of clipping it)");
  const double s = max_norm / (norm + 1e-6);
  return s < 1.0 ? s : 1.0;
}

namespace detail {

template <class T>
inline constexpr bool kNeedsMaster = !std::is_same_v<T, float> && !std::is_same_v<T, double>;

// One parameter's optimizer-side state: the slots an optimizer uses (AdamW: m and v; SGD: m as
// the momentum buffer), and for low-precision parameters the fp32 master and gradient.
template <class T>
struct Slot {
  using S = master_t<T>;
  std::string name;
  bool decay = false;
  Tensor<S> master;  // low precision only
  Tensor<S> grad;    // low precision only: the sum of absorbed micro-batch gradients
  Tensor<S> m, v;
};

// Walks the model's parameters together with their slots, creating the slots at the first call.
template <class T>
class Slots {
 public:
  using S = master_t<T>;

  Slots(bool decay_all, int moments) : decay_all_(decay_all), moments_(moments) {}

  template <class Model, class F>
  void walk(Model& model, const char* who, F&& f) {
    std::size_t i = 0;
    const bool creating = slots_.empty();
    model.visit_parameters([&](std::string_view name, nn::Parameter<T>& p) {
      if (creating) {
        Slot<T>& s = slots_.emplace_back();
        s.name = std::string(name);
        s.decay = decay_all_ || p.value.rank() >= 2;
        if (moments_ >= 1) s.m = Tensor<S>::zeros(p.value.shape());
        if (moments_ >= 2) s.v = Tensor<S>::zeros(p.value.shape());
        if constexpr (kNeedsMaster<T>) {
          s.master = Tensor<S>::empty(p.value.shape());
          for (int64_t k = 0; k < p.value.numel(); ++k) s.master.data()[k] = to_float(p.value.data()[k]);
          s.grad = Tensor<S>::zeros(p.value.shape());
        }
      }
      TESSERA_CHECK(i < slots_.size(), who, ": the model hands out parameter '", name,
                    "' beyond the ", slots_.size(), " this optimizer was built for");
      Slot<T>& s = slots_[i++];
      TESSERA_CHECK(s.name == name, who, ": parameter ", i - 1, " is '", name,
                    "', the optimizer's state is for '", s.name,
                    "' (another model, or parameters visited in another order)");
      TESSERA_CHECK(s.m.numel() == 0 || s.m.shape() == p.value.shape(), who, ": parameter '",
                    name, "' has shape ", p.value.shape(), ", its state has ", s.m.shape());
      f(s, p);
    });
    TESSERA_CHECK(i == slots_.size(), who, ": the model handed out ", i,
                  " parameters, the optimizer holds state for ", slots_.size());
  }

  std::vector<Slot<T>>& slots() { return slots_; }
  bool empty() const { return slots_.empty(); }

 private:
  bool decay_all_;
  int moments_;
  std::vector<Slot<T>> slots_;
};

// The gradient the update reads: the fp32 accumulator for low precision, else the model's own.
template <class T>
const master_t<T>* grad_of(Slot<T>& s, nn::Parameter<T>& p) {
  if constexpr (kNeedsMaster<T>) {
    return s.grad.data();
  } else {
    return p.grad.data();
  }
}
template <class T>
master_t<T>* value_of(Slot<T>& s, nn::Parameter<T>& p) {
  if constexpr (kNeedsMaster<T>) {
    return s.master.data();
  } else {
    return p.value.data();
  }
}
template <class T>
void write_back(Slot<T>& s, nn::Parameter<T>& p) {
  if constexpr (kNeedsMaster<T>) {
    for (int64_t k = 0; k < p.value.numel(); ++k) p.value.data()[k] = from_float<T>(s.master.data()[k]);
  }
}

// Shared by the optimizers: gradient bookkeeping and the state a checkpoint saves.
template <class T, int kMoments>
class OptimizerBase {
 public:
  using S = master_t<T>;
  using value_type = T;

  explicit OptimizerBase(bool decay_all) : slots_(decay_all, kMoments) {}

  // Creates the state (zero moments, masters copied from the model) if there is none yet.
  template <class Model>
  void init(Model& model) {
    slots_.walk(model, "optimizer init", [](Slot<T>&, nn::Parameter<T>&) {});
  }

  // Moves the model's gradients into the fp32 accumulators and zeroes them (low precision);
  // nothing for float/double, whose backward already accumulates in the parameter's type.
  template <class Model>
  void absorb_grads(Model& model) {
    if constexpr (kNeedsMaster<T>) {
      slots_.walk(model, "absorb_grads", [](Slot<T>& s, nn::Parameter<T>& p) {
        if (p.grad.numel() == 0) return;
        for (int64_t k = 0; k < p.value.numel(); ++k) {
          s.grad.data()[k] += to_float(p.grad.data()[k]);
          p.grad.data()[k] = T{};
        }
      });
    } else {
      init(model);
    }
  }

  // sqrt(sum of every gradient element squared), accumulated in double in visit order. Not
  // finite when any gradient overflowed (what FP16 loss scaling looks for).
  template <class Model>
  double grad_norm(Model& model) {
    double sum = 0.0;
    slots_.walk(model, "grad_norm", [&](Slot<T>& s, nn::Parameter<T>& p) {
      if constexpr (!kNeedsMaster<T>) {
        if (p.grad.numel() == 0) return;
      }
      const S* g = grad_of(s, p);
      for (int64_t k = 0; k < p.value.numel(); ++k) {
        const double x = static_cast<double>(g[k]);
        sum += x * x;
      }
    });
    return std::sqrt(sum);
  }

  // Zeroes the gradients the next step accumulates into (model and fp32 accumulators).
  template <class Model>
  void zero_grad(Model& model) {
    slots_.walk(model, "zero_grad", [](Slot<T>& s, nn::Parameter<T>& p) {
      p.zero_grad();
      if constexpr (kNeedsMaster<T>) std::fill_n(s.grad.data(), s.grad.numel(), S{});
    });
  }

  int64_t steps() const { return steps_; }
  void set_steps(int64_t s) { steps_ = s; }

  // Every state tensor, f(name, Tensor<S>&): "<param>.m", "<param>.v" (AdamW), "<param>.master"
  // (low precision). The gradient accumulators are not state: they are zero between steps.
  template <class F>
  void visit_state(F&& f) {
    TESSERA_CHECK(!slots_.empty(),
                  "optimizer visit_state: no state yet; call init(model) (or step) first");
    for (Slot<T>& s : slots_.slots()) {
      if (kMoments >= 1) f(std::string_view(s.name + ".m"), s.m);
      if (kMoments >= 2) f(std::string_view(s.name + ".v"), s.v);
      if constexpr (kNeedsMaster<T>) f(std::string_view(s.name + ".master"), s.master);
    }
  }

  // After the masters were loaded from a checkpoint: the model's values become their rounding.
  template <class Model>
  void sync_model_from_master(Model& model) {
    slots_.walk(model, "sync_model_from_master",
                [](Slot<T>& s, nn::Parameter<T>& p) { write_back(s, p); });
  }

 protected:
  Slots<T> slots_;
  int64_t steps_ = 0;
};

}  // namespace detail

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  bool decay_all = false;  // decay norm weights and biases (rank < 2) too
};

template <class T>
class AdamW : public detail::OptimizerBase<T, 2> {
  using Base = detail::OptimizerBase<T, 2>;
  using S = typename Base::S;

 public:
  static constexpr std::string_view kName = "adamw";

  explicit AdamW(AdamWOptions o = {}) : Base(o.decay_all), o_(o) {
    TESSERA_CHECK(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1, "AdamW: betas (",
                  o.beta1, ", ", o.beta2, ") must lie in [0, 1)");
    TESSERA_CHECK(o.eps > 0 && o.weight_decay >= 0, "AdamW: eps = ", o.eps,
                  " must be > 0 and weight_decay = ", o.weight_decay, " >= 0");
  }
  const AdamWOptions& options() const { return o_; }

  // One update with learning rate lr on grad_scale * (accumulated gradient). grad_scale carries
  // the clipping factor and, under loss scaling, 1 / loss_scale.
  template <class Model>
  void step(Model& model, double lr, double grad_scale = 1.0) {
    TESSERA_CHECK(std::isfinite(lr) && lr >= 0 && std::isfinite(grad_scale), "AdamW::step: lr = ",
                  lr, ", grad_scale = ", grad_scale);
    const int64_t t = ++this->steps_;
    const double bc1 = 1.0 - std::pow(o_.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(o_.beta2, static_cast<double>(t));
    const S step_size = static_cast<S>(lr / bc1);
    const S bc2_sqrt = static_cast<S>(std::sqrt(bc2));
    const S b1 = static_cast<S>(o_.beta1), b2 = static_cast<S>(o_.beta2);
    const S one_b1 = static_cast<S>(1.0 - o_.beta1), one_b2 = static_cast<S>(1.0 - o_.beta2);
    const S eps = static_cast<S>(o_.eps), gs = static_cast<S>(grad_scale);
    const S decay = static_cast<S>(1.0 - lr * o_.weight_decay);
    this->slots_.walk(model, "AdamW::step", [&](detail::Slot<T>& s, nn::Parameter<T>& p) {
      const S* g = detail::grad_of(s, p);
      S* w = detail::value_of(s, p);
      S* m = s.m.data();
      S* v = s.v.data();
      const int64_t n = p.value.numel();
      const bool dec = s.decay && o_.weight_decay != 0.0;
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
      for (int64_t k = 0; k < n; ++k) {
        const S gk = grad_scale == 1.0 ? g[k] : g[k] * gs;
        if (dec) w[k] *= decay;
        m[k] = m[k] * b1 + gk * one_b1;
        v[k] = v[k] * b2 + gk * gk * one_b2;
        const S denom = std::sqrt(v[k]) / bc2_sqrt + eps;
        w[k] += -step_size * (m[k] / denom);
      }
      detail::write_back(s, p);
    });
  }

 private:
  AdamWOptions o_;
};

struct SgdOptions {
  double momentum = 0.9;
  double dampening = 0.0;
  double weight_decay = 0.0;  // coupled (added to the gradient), as torch.optim.SGD
  bool nesterov = false;
  bool decay_all = false;
};

template <class T>
class Sgd : public detail::OptimizerBase<T, 1> {
  using Base = detail::OptimizerBase<T, 1>;
  using S = typename Base::S;

 public:
  static constexpr std::string_view kName = "sgd";

  explicit Sgd(SgdOptions o = {}) : Base(o.decay_all), o_(o) {
    TESSERA_CHECK(o.momentum >= 0 && o.dampening >= 0 && o.weight_decay >= 0,
                  "Sgd: momentum, dampening and weight_decay must be >= 0");
    TESSERA_CHECK(!o.nesterov || (o.momentum > 0 && o.dampening == 0),
                  "Sgd: Nesterov momentum needs momentum > 0 and dampening 0");
  }
  const SgdOptions& options() const { return o_; }

  template <class Model>
  void step(Model& model, double lr, double grad_scale = 1.0) {
    TESSERA_CHECK(std::isfinite(lr) && lr >= 0 && std::isfinite(grad_scale), "Sgd::step: lr = ",
                  lr, ", grad_scale = ", grad_scale);
    const bool first = this->steps_ == 0;
    ++this->steps_;
    const S mu = static_cast<S>(o_.momentum), damp = static_cast<S>(1.0 - o_.dampening);
    const S wd = static_cast<S>(o_.weight_decay), lr_s = static_cast<S>(lr);
    const S gs = static_cast<S>(grad_scale);
    this->slots_.walk(model, "Sgd::step", [&](detail::Slot<T>& s, nn::Parameter<T>& p) {
      const S* g = detail::grad_of(s, p);
      S* w = detail::value_of(s, p);
      S* buf = s.m.data();
      const int64_t n = p.value.numel();
      const bool dec = s.decay && o_.weight_decay != 0.0;
      for (int64_t k = 0; k < n; ++k) {
        S d = grad_scale == 1.0 ? g[k] : g[k] * gs;
        if (dec) d += wd * w[k];
        if (o_.momentum != 0.0) {
          buf[k] = first ? d : buf[k] * mu + d * damp;
          d = o_.nesterov ? d + mu * buf[k] : buf[k];
        }
        w[k] += -lr_s * d;
      }
      detail::write_back(s, p);
    });
  }

 private:
  SgdOptions o_;
};

}  // namespace tessera::train

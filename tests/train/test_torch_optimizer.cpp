// tests/train/test_torch_optimizer.cpp — tessera's AdamW and SGD against LibTorch's
// torch::optim::AdamW / SGD: 20 steps on the same parameters and the same random gradients,
// with the learning rate following tessera's WarmupCosine, decay on matrices only (two
// LibTorch parameter groups), compared after every step. Both implement PyTorch's update in
// the same operation order in float, so they agree to a few float ulps (the tolerance is
// 8 eps_f relative to each tensor's largest value; a wrong bias correction, a decay applied to
// the vector, or eps inside the square root is off by 1e-3 or more).
// Also: bf16 parameters with fp32 masters against LibTorch float parameters given the same
// (bf16-exact) gradients: masters equal LibTorch's values, and the bf16 weights are their rounding.
#define BOOST_TEST_MODULE test_torch_optimizer
#include <boost/test/unit_test.hpp>

#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "tessera/core/rng.hpp"
#include "tessera/train/optimizer.hpp"
#include "tessera/train/schedule.hpp"

namespace ts = tessera;
namespace tr = tessera::train;
namespace nn = tessera::nn;

namespace {

constexpr float kEps = 1.1920929e-7f / 2;  // float unit roundoff

template <class T>
struct Params {
  std::vector<nn::Parameter<T>> p;
  std::vector<std::string> names = {"w1", "bias", "w3"};
  Params() {
    const std::vector<std::vector<int64_t>> shapes = {{7, 13}, {13}, {5, 3, 4}};
    ts::Philox rng(ts::Seed{2024}, 0);
    for (const auto& s : shapes) {
      nn::Parameter<T> q;
      q.value = ts::Tensor<T>::empty(ts::Shape(std::span<const int64_t>(s)));
      for (int64_t i = 0; i < q.value.numel(); ++i) q.value.data()[i] = static_cast<T>(0.5f * rng.next_normal());
      q.zero_grad();
      p.push_back(std::move(q));
    }
  }
  template <class F>
  void visit_parameters(F&& f) {
    for (std::size_t i = 0; i < p.size(); ++i) f(std::string_view(names[i]), p[i]);
  }
};

// The same values as LibTorch tensors (float).
template <class T>
std::vector<torch::Tensor> to_torch(Params<T>& ps) {
  std::vector<torch::Tensor> out;
  for (auto& q : ps.p) {
    std::vector<int64_t> shape(q.value.shape().begin(), q.value.shape().end());
    auto t = torch::empty(shape, torch::kFloat32);
    for (int64_t i = 0; i < q.value.numel(); ++i) t.data_ptr<float>()[i] = ts::to_float(q.value.data()[i]);
    out.push_back(t.set_requires_grad(true));
  }
  return out;
}

// Fresh random gradients into both (rounded to T first, so both see the same numbers).
template <class T>
void set_grads(Params<T>& ps, std::vector<torch::Tensor>& tp, ts::Philox& rng) {
  for (std::size_t k = 0; k < ps.p.size(); ++k) {
    auto& q = ps.p[k];
    auto g = torch::empty_like(tp[k]).detach();
    for (int64_t i = 0; i < q.grad.numel(); ++i) {
      q.grad.data()[i] = static_cast<T>(rng.next_normal() * (k == 1 ? 0.01f : 1.0f));
      g.data_ptr<float>()[i] = ts::to_float(q.grad.data()[i]);
    }
    tp[k].mutable_grad() = g;
  }
}

double worst_ratio(const ts::Tensor<float>& ours, const torch::Tensor& theirs) {
  double scale = 0, worst = 0;
  const float* t = theirs.data_ptr<float>();
  for (int64_t i = 0; i < ours.numel(); ++i) scale = std::max(scale, std::fabs(double(t[i])));
  for (int64_t i = 0; i < ours.numel(); ++i)
    worst = std::max(worst, std::fabs(double(ours.data()[i]) - t[i]) / (8 * kEps * scale));
  return worst;
}

}  // namespace

BOOST_AUTO_TEST_CASE(adamw_20_steps_match_libtorch) {
  torch::set_num_threads(1);
  Params<float> ours;
  auto theirs = to_torch(ours);
  tr::AdamWOptions o;
  o.beta1 = 0.9;
  o.beta2 = 0.95;
  o.eps = 1e-8;
  o.weight_decay = 0.1;
  tr::AdamW<float> opt(o);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{theirs[0], theirs[2]},
                      std::make_unique<torch::optim::AdamWOptions>(
                          torch::optim::AdamWOptions(1e-3).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1)));
  groups.emplace_back(std::vector<torch::Tensor>{theirs[1]},
                      std::make_unique<torch::optim::AdamWOptions>(
                          torch::optim::AdamWOptions(1e-3).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.0)));
  torch::optim::AdamW ref(groups, torch::optim::AdamWOptions(1e-3));
  const tr::WarmupCosine lr(3e-2, 4, 20, 3e-3);
  ts::Philox rng(ts::Seed{77}, 1);
  double worst = 0;
  for (int step = 0; step < 20; ++step) {
    set_grads(ours, theirs, rng);
    for (auto& g : ref.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr(step));
    ref.step();
    opt.step(ours, lr(step));
    for (std::size_t k = 0; k < 3; ++k) {
      const double r = worst_ratio(ours.p[k].value, theirs[k].detach());
      worst = std::max(worst, r);
      BOOST_TEST(r <= 1.0, "step " << step << " tensor " << ours.names[k] << ": " << r << " of the tolerance");
    }
  }
  BOOST_TEST_MESSAGE("AdamW vs LibTorch: worst element at " << worst << " of the tolerance");
  // The parameters moved far more than the tolerance (the check could fail).
  BOOST_TEST(std::fabs(ours.p[0].value.data()[0] - Params<float>().p[0].value.data()[0]) > 1e-2);
}

BOOST_AUTO_TEST_CASE(sgd_nesterov_20_steps_match_libtorch) {
  torch::set_num_threads(1);
  Params<float> ours;
  auto theirs = to_torch(ours);
  tr::SgdOptions o;
  o.momentum = 0.9;
  o.nesterov = true;
  o.weight_decay = 1e-2;
  tr::Sgd<float> opt(o);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{theirs[0], theirs[2]},
                      std::make_unique<torch::optim::SGDOptions>(
                          torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(1e-2)));
  groups.emplace_back(std::vector<torch::Tensor>{theirs[1]},
                      std::make_unique<torch::optim::SGDOptions>(
                          torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(0.0)));
  torch::optim::SGD ref(groups, torch::optim::SGDOptions(0.1));
  ts::Philox rng(ts::Seed{78}, 1);
  for (int step = 0; step < 20; ++step) {
    set_grads(ours, theirs, rng);
    const double lr = 0.05 / (1 + step);
    for (auto& g : ref.param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr);
    ref.step();
    opt.step(ours, lr);
    for (std::size_t k = 0; k < 3; ++k)
      BOOST_TEST(worst_ratio(ours.p[k].value, theirs[k].detach()) <= 1.0, "step " << step << " " << ours.names[k]);
  }
}

BOOST_AUTO_TEST_CASE(bf16_masters_follow_libtorch_float_adamw) {
  torch::set_num_threads(1);
  Params<ts::bf16> ours;
  auto theirs = to_torch(ours);  // float copies of the bf16 starting values
  tr::AdamWOptions o;
  o.weight_decay = 0.0;
  tr::AdamW<ts::bf16> opt(o);
  torch::optim::AdamW ref(theirs, torch::optim::AdamWOptions(1e-3).weight_decay(0.0));
  ts::Philox rng(ts::Seed{79}, 1);
  for (int step = 0; step < 20; ++step) {
    set_grads(ours, theirs, rng);  // bf16 gradients; LibTorch gets the same values in float
    opt.absorb_grads(ours);
    ref.step();
    opt.step(ours, 1e-3);
    opt.zero_grad(ours);
  }
  std::size_t k = 0;
  opt.visit_state([&](std::string_view name, ts::Tensor<float>& t) {
    if (!name.ends_with(".master")) return;
    BOOST_TEST(worst_ratio(t, theirs[k].detach()) <= 1.0, std::string(name));
    for (int64_t i = 0; i < t.numel(); ++i)
      BOOST_TEST_REQUIRE(ours.p[k].value.data()[i].bits == ts::bf16(t.data()[i]).bits);
    ++k;
  });
  BOOST_TEST(k == 3u);
}

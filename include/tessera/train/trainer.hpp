// tessera/train/trainer.hpp — one optimizer step of a decoder LM, the pieces put together in
// the order that makes a run reproducible and resumable.
//
//   using Model = ts::Decoder<ts::train::WithRecipe<R1, ts::train::BF16Mixed>>;
//   Model model{ts::Seed{1}};
//   ts::train::AdamW<Model::value_type> opt({.weight_decay = 0.1});
//   ts::train::BatchLoader loader(data, 128, 8, ts::Seed{2});
//   ts::train::Trainer<Model, ts::train::BF16Mixed, decltype(opt)> trainer(
//       model, opt, loader, ts::train::WarmupCosine(3e-3, 20, 400), {.micro_batches = 2});
//   while (trainer.step_index() < 400) ts::train::StepReport r = trainer.step();
//
// A step (step index s, counted from 0):
//   1. for each of `micro_batches` batches from the loader: forward, backward with
//      loss_scale = S / micro_batches (S = 1, or the dynamic fp16 loss scale), and
//      optimizer.absorb_grads (fp32 accumulation for low-precision models). Gradients are
//      thus the mean over micro-batches of each one's mean-over-targets gradient.
//   2. the global gradient norm in double, divided by S;
//   3. FP16Mixed: a non-finite norm (or loss) skips the update and lowers S (said in the report);
//   4. the update with lr = schedule(s) and grad_scale = clip_scale(norm, max_grad_norm) / S;
//   5. update_balance for the aux-loss-free MoE bias, from the last micro-batch's routing;
//   6. zero_grad;
//   7. FP8Delayed: end_step() rolls the amax histories, the only place its scales change.
// With an FP8 recipe, steps 1 (forwards and backwards) and evaluate() run inside an Fp8Scope
// that installs the trainer's Recipe::Products (quant/fp8_training.hpp) in the model's
// attention, FFN and expert products; evaluate() uses the scales without recording amaxes.
// Everything a resumed run needs besides weights and optimizer state is in state(): the step,
// the loader's position, the loss scale and FP8Delayed's amax histories (by parameter name);
// restore(info) puts it back.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "tessera/core/error.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/train/checkpoint.hpp"
#include "tessera/train/optimizer.hpp"
#include "tessera/train/precision.hpp"
#include "tessera/train/schedule.hpp"
#include "tessera/train/token_data.hpp"

namespace tessera::train {

struct TrainerOptions {
  std::int64_t micro_batches = 1;
  double max_grad_norm = 1.0;  // <= 0: no clipping
  std::int64_t loss_scale_growth_interval = 200;
};

struct StepReport {
  std::int64_t step = 0;        // the index of the step just taken (from 0)
  double loss = 0.0;            // mean over micro-batches of the loss (cross-entropy + aux)
  double cross_entropy = 0.0;   // mean over micro-batches
  double lr = 0.0;
  double grad_norm = 0.0;       // before clipping, unscaled
  bool skipped = false;         // FP16Mixed overflow: no update was made
  double loss_scale = 1.0;
  std::int64_t tokens = 0;      // targets predicted in this step
};

namespace trainer_detail {
// What a trainer holds for its recipe: the FP8 recipes' Products, nothing for the others.
struct NoProducts {};
template <class R>
struct ProductsOf {
  using type = NoProducts;
  static type make() { return {}; }
};
template <Fp8Recipe R>
struct ProductsOf<R> {
  using type = typename R::Products;
  static type make() { return R::make_products(); }
};
}  // namespace trainer_detail

// Schedule: any callable lr(step) (train/schedule.hpp).
template <class Model, PrecisionRecipe Recipe, class Optimizer, class Schedule = WarmupCosine>
class Trainer {
  static_assert(Recipe::kAvailable, "Trainer: this precision recipe is not available yet");
  static_assert(std::is_same_v<typename Model::value_type, typename Recipe::Compute>,
                "Trainer: the model's Scalar must be the recipe's Compute type; build the model "
                "from WithRecipe<Config, Recipe>");
  static constexpr bool kFp8 = Fp8Recipe<Recipe>;
  using Products = typename trainer_detail::ProductsOf<Recipe>::type;
  static constexpr bool kDelayed = std::is_same_v<Products, Fp8DelayedProducts>;
  static constexpr const char* kOperandKeys[kFp8Operands] = {"input", "weight", "grad_output"};
  static Products make_products() { return trainer_detail::ProductsOf<Recipe>::make(); }

 public:
  Trainer(Model& model, Optimizer& optimizer, BatchLoader& loader, Schedule schedule,
          TrainerOptions options = {})
      : model_(model),
        opt_(optimizer),
        loader_(loader),
        schedule_(schedule),
        o_(options),
        products_(make_products()) {
    TESSERA_CHECK(o_.micro_batches >= 1, "Trainer: micro_batches ", o_.micro_batches,
                  " must be >= 1");
    scaler_.growth_interval = o_.loss_scale_growth_interval;
    opt_.init(model_);
    model_.zero_grad();
    opt_.zero_grad(model_);
  }

  StepReport step() {
    StepReport r;
    r.step = step_;
    const double S = Recipe::kLossScaling ? scaler_.scale : 1.0;
    r.loss_scale = S;
    bool finite = true;
    std::optional<Fp8Scope> fp8;
    if constexpr (kFp8) fp8.emplace(products_);
    for (std::int64_t mb = 0; mb < o_.micro_batches; ++mb) {
      const Tensor<std::int32_t> seq = loader_.next();  // (B, T + 1)
      const models::NextTokenBatch batch = models::next_token_batch(seq);
      const models::ModelStats st = model_.forward(batch.tokens, batch.targets, saved_);
      r.loss += st.loss / static_cast<double>(o_.micro_batches);
      r.cross_entropy += st.cross_entropy / static_cast<double>(o_.micro_batches);
      r.tokens += st.targets;
      if (!std::isfinite(st.loss)) {
        finite = false;
        if (!Recipe::kLossScaling)
          fail("Trainer: step ", step_, ": the loss is ", st.loss, " (diverged)");
        continue;  // skip backward: the step is skipped anyway
      }
      model_.backward(saved_, S / static_cast<double>(o_.micro_batches));
      opt_.absorb_grads(model_);
    }
    r.grad_norm = finite ? opt_.grad_norm(model_) / S : std::numeric_limits<double>::infinity();
    finite = finite && std::isfinite(r.grad_norm);
    if constexpr (Recipe::kLossScaling) {
      r.skipped = !scaler_.update(finite);
    } else {
      TESSERA_CHECK(finite, "Trainer: step ", step_, ": the gradient norm is ", r.grad_norm);
    }
    r.lr = schedule_(step_);
    if (!r.skipped) {
      opt_.step(model_, r.lr, clip_scale(r.grad_norm, o_.max_grad_norm) / S);
      model_.update_balance(saved_);
    }
    model_.zero_grad();
    opt_.zero_grad(model_);
    if constexpr (kDelayed) products_.end_step();
    ++step_;
    return r;
  }

  // Mean cross-entropy per target (nats) over `batches` batches of `loader` (the aux losses
  // are left out: perplexity is about the text).
  double evaluate(BatchLoader& loader, std::int64_t batches) {
    double sum = 0.0;
    std::int64_t count = 0;
    std::optional<Fp8Scope> fp8;
    if constexpr (kFp8) fp8.emplace(products_, /*record=*/false);
    for (std::int64_t b = 0; b < batches; ++b) {
      const Tensor<std::int32_t> seq = loader.next();
      const models::NextTokenBatch batch = models::next_token_batch(seq);
      typename Model::Saved saved;
      const models::ModelStats st = model_.forward(batch.tokens, batch.targets, saved);
      sum += st.cross_entropy * static_cast<double>(st.targets);
      count += st.targets;
    }
    return sum / static_cast<double>(count);
  }

  std::int64_t step_index() const { return step_; }
  const DynamicLossScale& loss_scale() const { return scaler_; }
  typename Model::Saved& last_saved() { return saved_; }

  // The FP8 recipe's products. A forward outside step() and evaluate() (sampling) computes in
  // plain fp32 unless it installs them: Fp8Scope scope(trainer.fp8_products(), false).
  Products& fp8_products()
    requires Fp8Recipe<Recipe>
  {
    return products_;
  }

  nlohmann::json state() const {
    const LoaderPosition p = loader_.position();
    nlohmann::json s = {{"step", step_},
                        {"recipe", std::string(Recipe::kName)},
                        {"loader", {{"epoch", p.epoch}, {"index", p.index}}},
                        {"loss_scale", {{"scale", scaler_.scale}, {"clean_steps", scaler_.clean_steps},
                                        {"skipped", scaler_.skipped}}}};
    if constexpr (kDelayed) {
      // Under the parameter's name: the address that keys a product does not survive a restart.
      nlohmann::json h = nlohmann::json::object();
      model_.visit_parameters([&](std::string_view name, auto& param) {
        const auto it = products_.sites().find(param.value.data());
        if (it == products_.sites().end()) return;
        nlohmann::json& e = h[std::string(name)];
        for (int i = 0; i < kFp8Operands; ++i) e[kOperandKeys[i]] = it->second.history[size_t(i)];
      });
      s["fp8_amax_history"] = std::move(h);
    }
    return s;
  }

  void save(CheckpointManager& ckpt) { ckpt.save(step_, model_, opt_, state()); }

  // After CheckpointManager::load_latest / load filled the model and the optimizer.
  void restore(const CheckpointInfo& info) {
    const nlohmann::json& s = info.state;
    TESSERA_CHECK(s.value("recipe", std::string()) == Recipe::kName, "Trainer::restore: checkpoint ",
                  info.dir.string(), " was written by a ", s.value("recipe", std::string()),
                  " run, this run is ", Recipe::kName);
    step_ = s.at("step").get<std::int64_t>();
    loader_.seek({s.at("loader").at("epoch").get<std::uint64_t>(),
                  s.at("loader").at("index").get<std::uint64_t>()});
    scaler_.scale = s.at("loss_scale").at("scale").get<double>();
    scaler_.clean_steps = s.at("loss_scale").at("clean_steps").get<std::int64_t>();
    scaler_.skipped = s.at("loss_scale").at("skipped").get<std::int64_t>();
    if constexpr (kDelayed) {
      products_ = make_products();
      const nlohmann::json h = s.value("fp8_amax_history", nlohmann::json::object());
      model_.visit_parameters([&](std::string_view name, auto& param) {
        const auto it = h.find(std::string(name));
        if (it == h.end()) return;
        for (int i = 0; i < kFp8Operands; ++i)
          products_.set_history(param.value.data(), static_cast<Fp8Operand>(i),
                                it->value(kOperandKeys[i], std::vector<float>{}));
      });
    }
    model_.zero_grad();
    opt_.zero_grad(model_);
  }

 private:
  Model& model_;
  Optimizer& opt_;
  BatchLoader& loader_;
  Schedule schedule_;
  TrainerOptions o_;
  DynamicLossScale scaler_;
  std::int64_t step_ = 0;
  typename Model::Saved saved_;
  Products products_;
};

}  // namespace tessera::train

// tessera/train/precision.hpp — precision recipes as types, and dynamic loss scaling.
//
//   struct R1 { ... };                                            // a config, Scalar left out
//   using Model = ts::Decoder<ts::train::WithRecipe<R1, ts::train::BF16Mixed>>;
//
// A recipe says what the model computes and stores in (Compute, which becomes the config's
// Scalar) and what the trainer must add around it:
//
// | recipe      | model values, grads, activations | optimizer side                   | extra                   |
// | ----------- | -------------------------------- | -------------------------------- | ----------------------- |
// | FP32        | float                            | float moments                    | —                       |
// | BF16Mixed   | bf16 (ops compute in fp32, round once per stored tensor) | fp32 master weights, fp32 gradient accumulators, fp32 moments | — |
// | FP16Mixed   | fp16                             | as BF16Mixed                     | dynamic loss scaling: backward runs on loss * S; a step whose gradients overflow (inf/NaN norm) is skipped and S halves; S doubles after `growth_interval` clean steps |
// | FP8Delayed  | float; the linear products of attention, dense FFN and experts take E4M3 x and W (per-tensor scales from a 16-step amax history) and E5M2 dy | as FP32 | Trainer calls end_step() once per step to roll the amax histories |
// | FP8Tile     | float; the same products take E4M3 operands everywhere with 1x128 activation / gradient tiles and 128x128 weight blocks | as FP32 | — |
//
// Why BF16Mixed's gradients are "fp32": the model's backward writes each micro-batch's
// gradient in bf16 (one rounding of an fp32-computed value), and the optimizer immediately
// adds it into an fp32 accumulator (train/optimizer.hpp), so accumulation over micro-batches,
// the norm, clipping and the update are all fp32. What is not fp32 is the gradient *inside*
// one backward pass (a bf16 model keeps its intermediates in bf16).
//
// The FP8 recipes keep Compute = float: the model stores and updates fp32 values, and only the
// operands of its heavy matrix products are rounded to FP8 (with fp32 accumulation), as FP8
// training on GPUs does. A recipe's `Products` type (quant/fp8_training.hpp) is what the
// Trainer installs around each step for the layers' products to use; the embedding, LM head,
// router, norms and attention's score / value products stay fp32.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <string>
#include <string_view>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/quant/fp8_training.hpp"

namespace tessera::train {

namespace precision_detail {

// What a recipe declares besides its name. Each recipe refines one of these two (policies
// inherit, as CUTLASS's do), so a recipe's own body says only what sets it apart.
template <class Compute_, bool kLossScaling_ = false>
struct RecipeBase {
  using Compute = Compute_;
  static constexpr bool kAvailable = true;
  static constexpr bool kLossScaling = kLossScaling_;
};

// An FP8 recipe: a float model whose heavy products take FP8 operands (see above), through the
// `Products` the Trainer installs, made default unless the recipe says otherwise.
template <class Products_>
struct Fp8RecipeBase : RecipeBase<float> {
  using Products = Products_;
  static Products make_products() { return Products(); }
};

}  // namespace precision_detail

struct FP32 : precision_detail::RecipeBase<float> {
  static constexpr std::string_view kName = "fp32";
};

struct BF16Mixed : precision_detail::RecipeBase<bf16> {
  static constexpr std::string_view kName = "bf16-mixed";
};

struct FP16Mixed : precision_detail::RecipeBase<fp16, /*kLossScaling_=*/true> {
  static constexpr std::string_view kName = "fp16-mixed";
};

// Transformer Engine's DelayedScaling defaults (margin 0, amax_history_len 16, max reduction).
struct FP8Delayed : precision_detail::Fp8RecipeBase<Fp8DelayedProducts> {
  static constexpr std::string_view kName = "fp8-delayed";
  static constexpr int kAmaxHistory = 16;
  static constexpr int kMargin = 0;
  static Products make_products() { return Products({.history = kAmaxHistory, .margin = kMargin}); }
};

// DeepSeek-V3's fine-grained recipe (section 3.3). No loss scaling: a 1x128 tile's own scale
// lifts small gradients into E4M3's range.
struct FP8Tile : precision_detail::Fp8RecipeBase<Fp8TileProducts> {
  static constexpr std::string_view kName = "fp8-tile";
};

template <class R>
concept PrecisionRecipe = requires {
  { R::kName } -> std::convertible_to<std::string_view>;
  typename R::Compute;
  { R::kAvailable } -> std::convertible_to<bool>;
  { R::kLossScaling } -> std::convertible_to<bool>;
};

// The FP8 recipes: those whose Trainer installs quantised products in the model's layers.
template <class R>
concept Fp8Recipe = PrecisionRecipe<R> && requires {
  typename R::Products;
  { R::make_products() } -> std::same_as<typename R::Products>;
};

// A config with the recipe's compute type as its Scalar.
template <class Config, PrecisionRecipe Recipe>
struct WithRecipe : Config {
  static_assert(Recipe::kAvailable, "tessera precision recipe: this recipe is not available");
  using Scalar = typename Recipe::Compute;
  using recipe = Recipe;
};

// The names a command line accepts.
inline constexpr std::string_view kRecipeNames =
    "fp32, bf16-mixed, fp16-mixed, fp8-delayed, fp8-tile";
inline void check_recipe_name(std::string_view name) {
  for (std::string_view n : {FP32::kName, BF16Mixed::kName, FP16Mixed::kName, FP8Delayed::kName,
                             FP8Tile::kName})
    if (name == n) return;
  fail("precision '", name, "' is unknown; the recipes are ", kRecipeNames);
}

// Dynamic loss scaling (as torch.cuda.amp.GradScaler): scale the loss so that small fp16
// gradients do not flush to zero, and back off when they overflow instead.
struct DynamicLossScale {
  double scale = 32768.0;  // 2^15: the largest power of two fp16 holds (the model rounds it to T)
  double growth = 2.0;
  double backoff = 0.5;
  std::int64_t growth_interval = 200;
  std::int64_t clean_steps = 0;
  std::int64_t skipped = 0;

  // After the gradients of one step were computed with `scale`: returns true when the step
  // may be taken (finite gradients), false when it must be skipped (and the scale backs off).
  bool update(bool finite) {
    if (!finite) {
      scale *= backoff;
      clean_steps = 0;
      ++skipped;
      TESSERA_CHECK(scale >= 1.0, "DynamicLossScale: the loss scale fell below 1 (", scale,
                    "); the gradients overflow even unscaled");
      return false;
    }
    if (++clean_steps >= growth_interval) {
      scale *= growth;
      clean_steps = 0;
    }
    return true;
  }
};

}  // namespace tessera::train

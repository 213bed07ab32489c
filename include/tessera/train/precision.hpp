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
// | FP8Delayed  | not available                    |                                  |                         |
// | FP8Tile     | not available                    |                                  |                         |
//
// Why BF16Mixed's gradients are "fp32": the model's backward writes each micro-batch's
// gradient in bf16 (one rounding of an fp32-computed value), and the optimizer immediately
// adds it into an fp32 accumulator (train/optimizer.hpp), so accumulation over micro-batches,
// the norm, clipping and the update are all fp32. What is not fp32 is the gradient *inside*
// one backward pass (a bf16 model keeps its intermediates in bf16).
//
// The FP8 recipes need FP8 matrix products inside the model's linear layers (E4M3 operands with
// per-tensor or per-tile scales in the forward, E5M2 gradients in the backward). The number
// types and the scaling arithmetic exist (core/number.hpp, quant/fp8_scaling.hpp), but the
// layers do not yet take a quantisation hook, so the recipes are declared here and refused with
// a message rather than approximated: kAvailable is false, WithRecipe static_asserts, and
// recipe_by_name throws.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"

namespace tessera::train {

struct FP32 {
  static constexpr std::string_view kName = "fp32";
  using Compute = float;
  static constexpr bool kAvailable = true;
  static constexpr bool kLossScaling = false;
};

struct BF16Mixed {
  static constexpr std::string_view kName = "bf16-mixed";
  using Compute = bf16;
  static constexpr bool kAvailable = true;
  static constexpr bool kLossScaling = false;
};

struct FP16Mixed {
  static constexpr std::string_view kName = "fp16-mixed";
  using Compute = fp16;
  static constexpr bool kAvailable = true;
  static constexpr bool kLossScaling = true;
};

inline constexpr std::string_view kFp8Missing =
    "is not available yet: the linear layers have no FP8 quantisation hook (E4M3 forward / E5M2 "
    "backward products with per-tensor or per-tile scales); use fp32, bf16-mixed or fp16-mixed";

struct FP8Delayed {
  static constexpr std::string_view kName = "fp8-delayed";
  using Compute = float;
  static constexpr bool kAvailable = false;
  static constexpr bool kLossScaling = false;
};

struct FP8Tile {
  static constexpr std::string_view kName = "fp8-tile";
  using Compute = float;
  static constexpr bool kAvailable = false;
  static constexpr bool kLossScaling = false;
};

template <class R>
concept PrecisionRecipe = requires {
  { R::kName } -> std::convertible_to<std::string_view>;
  typename R::Compute;
  { R::kAvailable } -> std::convertible_to<bool>;
  { R::kLossScaling } -> std::convertible_to<bool>;
};

// A config with the recipe's compute type as its Scalar.
template <class Config, PrecisionRecipe Recipe>
struct WithRecipe : Config {
  static_assert(Recipe::kAvailable,
                "tessera precision recipe: FP8Delayed / FP8Tile are not available yet (the linear "
                "layers have no FP8 quantisation hook); use FP32, BF16Mixed or FP16Mixed");
  using Scalar = typename Recipe::Compute;
  using recipe = Recipe;
};

// The names a command line accepts, and a clear refusal for the missing ones.
inline constexpr std::string_view kRecipeNames = "fp32, bf16-mixed, fp16-mixed (fp8-delayed, fp8-tile: not available)";
inline void check_recipe_name(std::string_view name) {
  if (name == FP32::kName || name == BF16Mixed::kName || name == FP16Mixed::kName) return;
  if (name == FP8Delayed::kName || name == FP8Tile::kName)
    fail("precision '", name, "' ", kFp8Missing);
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
